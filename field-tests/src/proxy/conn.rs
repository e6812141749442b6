//! One proxied connection: two pumps (client → upstream, upstream → client), each a reader
//! stage (bandwidth, latency stamp) feeding a writer stage (delay, blackhole/stall gate, byte
//! marks for cut, reset and stall) through a bounded channel, so latency is pipelined and a
//! slow writer slows the reader.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::faults::{Bandwidth, Direction, Faults, Reset};
use super::{Counters, Shared};

/// Largest chunk read at once.
const BUF: usize = 16 * 1024;
/// Chunks in flight between a pump's reader and writer (the "wire").
const IN_FLIGHT: usize = 64;
/// After a cut, how long the client's remaining data is read and dropped so that its socket
/// sees a clean EOF rather than a reset.
const DRAIN: Duration = Duration::from_secs(2);

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The source closed; the EOF was passed on.
    Eof,
    /// The downstream byte mark of a [`super::Cut`] was reached.
    Cut,
    /// The downstream byte mark of [`Reset::AfterBytes`] was reached.
    Reset,
    /// Reading or writing failed.
    Failed(io::ErrorKind),
    /// The other pump ended the connection.
    Stopped,
}

/// What the reader stage hands the writer stage.
#[derive(Debug)]
enum Item {
    Data(Instant, Vec<u8>),
    Eof(Instant),
    Failed(io::ErrorKind),
}

/// Per-connection state shared by its two pumps.
#[derive(Debug, Default)]
struct ConnState {
    /// Bytes delivered to the client.
    down_bytes: AtomicU64,
    stall: Mutex<StallState>,
}

#[derive(Debug, Default)]
struct StallState {
    until: Option<Instant>,
    /// The fault generation whose stall already fired on this connection.
    fired_generation: Option<u64>,
}

impl ConnState {
    fn stalled_until(&self) -> Option<Instant> {
        self.stall.lock().map_or(None, |s| s.until)
    }

    fn down_bytes(&self) -> u64 {
        self.down_bytes.load(Ordering::Relaxed)
    }
}

/// Counts an open connection for as long as it lives.
struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted connection until it ends (the caller cancels it on shutdown).
pub(super) async fn serve(id: u64, mut client: TcpStream, shared: std::sync::Arc<Shared>) {
    let counters = &shared.counters;
    Counters::add(&counters.connections, 1);
    Counters::add(&counters.open, 1);
    let _open = OpenGuard(counters);
    let mut faults = shared.faults.subscribe();
    let at_accept = *faults.borrow_and_update();
    if at_accept.reset == Some(Reset::OnAccept) {
        Counters::add(&counters.resets, 1);
        reset(client);
        return;
    }
    let conn = ConnState::default();
    // A blackhole holds new connections before anything happens upstream.
    gate(&mut faults, &conn).await;
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        Counters::add(&counters.resets, 1);
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let stop = CancellationToken::new();
    let (up, down) = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let pump = |dir| Pump {
            dir,
            shared: &shared,
            conn: &conn,
            stop: &stop,
            seed: mix(shared.seed, id, dir),
        };
        let (to_upstream, to_client) = (pump(Direction::Up), pump(Direction::Down));
        tokio::join!(
            to_upstream.run(&mut cr, &mut uw),
            to_client.run(&mut ur, &mut cw),
        )
    };
    drop(upstream);
    let ends = [up, down];
    if ends.contains(&End::Reset) || ends.contains(&End::Failed(io::ErrorKind::ConnectionReset)) {
        Counters::add(&counters.resets, 1);
        reset(client);
    } else if ends.contains(&End::Cut) {
        Counters::add(&counters.cuts, 1);
        let _ = client.shutdown().await;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(DRAIN, async {
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// Closes with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A per-connection, per-direction seed.
fn mix(seed: u64, id: u64, dir: Direction) -> u64 {
    let d = match dir {
        Direction::Up => 0x5555_5555_5555_5555,
        Direction::Down => 0xAAAA_AAAA_AAAA_AAAA,
    };
    seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ d
}

/// Waits while the link is blackholed or this connection is stalled.
async fn gate(faults: &mut watch::Receiver<Faults>, conn: &ConnState) {
    loop {
        let blackhole = faults.borrow_and_update().blackhole;
        let until = conn.stalled_until().filter(|u| *u > Instant::now());
        if !blackhole && until.is_none() {
            return;
        }
        tokio::select! {
            changed = faults.changed() => {
                if changed.is_err() {
                    // The proxy is going away; its cancellation ends this task.
                    std::future::pending::<()>().await;
                }
            }
            () = sleep_until_opt(until) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A token bucket; see [`Bandwidth`].
#[derive(Debug, Default)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// Takes `n` bytes' worth of tokens (`n` ≤ the burst), waiting for any shortfall.
    async fn take(&mut self, n: usize, bw: Bandwidth) {
        let rate = bw.bytes_per_sec as f64;
        let cap = bw.burst() as f64;
        let now = Instant::now();
        self.tokens = match self.last {
            None => cap,
            Some(t) => (self.tokens + (now - t).as_secs_f64() * rate).min(cap),
        };
        self.last = Some(now);
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            // The debt is repaid by the refill computed at the next call.
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / rate)).await;
        }
    }
}

/// One direction of a connection.
struct Pump<'a> {
    dir: Direction,
    shared: &'a Shared,
    conn: &'a ConnState,
    stop: &'a CancellationToken,
    seed: u64,
}

impl Pump<'_> {
    async fn run<R, W>(&self, reader: &mut R, writer: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let read = async {
            self.read_stage(reader, tx).await;
            // The writer decides when this pump ends.
            std::future::pending::<()>().await;
        };
        let end = tokio::select! {
            () = self.stop.cancelled() => End::Stopped,
            end = self.write_stage(writer, rx) => end,
            () = read => End::Stopped,
        };
        if end != End::Eof {
            self.stop.cancel();
        }
        end
    }

    /// Reads chunks (no larger than the bandwidth burst), pays for them in the token bucket,
    /// stamps each with its delivery time and queues it.
    async fn read_stage<R: AsyncRead + Unpin>(&self, reader: &mut R, tx: mpsc::Sender<Item>) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut bucket = Bucket::default();
        let mut last = Instant::now();
        let mut buf = vec![0u8; BUF];
        loop {
            let link = *self.shared.faults.borrow().dir(self.dir);
            let max = link
                .bandwidth
                .map_or(BUF, |b| usize::try_from(b.burst()).unwrap_or(BUF).min(BUF));
            let n = match reader.read(&mut buf[..max]).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(Item::Failed(e.kind())).await;
                    return;
                }
            };
            // Faults changed while waiting for data apply to this chunk.
            let link = *self.shared.faults.borrow().dir(self.dir);
            if n > 0
                && let Some(bw) = link.bandwidth
            {
                bucket.take(n, bw).await;
            }
            let delay = link.latency.map_or(Duration::ZERO, |l| {
                let jitter = u64::try_from(l.jitter.as_nanos()).unwrap_or(u64::MAX);
                l.fixed + Duration::from_nanos(rng.gen_range(0..=jitter))
            });
            // In order: a chunk never overtakes the one before it.
            last = last.max(Instant::now() + delay);
            let item = if n == 0 {
                Item::Eof(last)
            } else {
                Item::Data(last, buf[..n].to_vec())
            };
            if tx.send(item).await.is_err() || n == 0 {
                return;
            }
        }
    }

    /// Delivers queued chunks at their time, through the gate, honouring the byte marks.
    async fn write_stage<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        mut rx: mpsc::Receiver<Item>,
    ) -> End {
        let mut faults = self.shared.faults.subscribe();
        let counter = match self.dir {
            Direction::Up => &self.shared.counters.bytes_up,
            Direction::Down => &self.shared.counters.bytes_down,
        };
        while let Some(item) = rx.recv().await {
            let (at, data) = match item {
                Item::Failed(kind) => return End::Failed(kind),
                Item::Eof(at) => {
                    tokio::time::sleep_until(at).await;
                    gate(&mut faults, self.conn).await;
                    let _ = writer.shutdown().await;
                    return End::Eof;
                }
                Item::Data(at, data) => (at, data),
            };
            tokio::time::sleep_until(at).await;
            let mut rest = data.as_slice();
            while !rest.is_empty() {
                gate(&mut faults, self.conn).await;
                let take = match self.dir {
                    Direction::Up => rest.len(),
                    Direction::Down => match self.down_allowance(rest.len()) {
                        Allowance::Send(n) => n,
                        Allowance::StallNow => continue,
                        Allowance::End(end) => return end,
                    },
                };
                if let Err(e) = writer.write_all(&rest[..take]).await {
                    return End::Failed(e.kind());
                }
                Counters::add(counter, take as u64);
                if self.dir == Direction::Down {
                    self.conn
                        .down_bytes
                        .fetch_add(take as u64, Ordering::Relaxed);
                }
                rest = &rest[take..];
                // A mark reached exactly ends the connection now, not at the next data.
                if self.dir == Direction::Down {
                    let f = *self.shared.faults.borrow();
                    if let Some(end) = self.mark_reached(&f, self.conn.down_bytes()) {
                        return end;
                    }
                }
            }
        }
        End::Stopped
    }

    /// How much of `want` bytes may go downstream now, given the stall, cut and reset marks.
    fn down_allowance(&self, want: usize) -> Allowance {
        let f = *self.shared.faults.borrow();
        let sent = self.conn.down_bytes();
        if let Some(end) = self.mark_reached(&f, sent) {
            return Allowance::End(end);
        }
        let mut limit = u64::try_from(want).unwrap_or(u64::MAX);
        if let Some(stall) = f.stall {
            let generation = self.shared.generation.load(Ordering::SeqCst);
            if let Ok(mut s) = self.conn.stall.lock()
                && s.fired_generation != Some(generation)
            {
                if sent >= stall.after_bytes {
                    s.fired_generation = Some(generation);
                    s.until = Some(Instant::now() + stall.duration);
                    Counters::add(&self.shared.counters.stalls, 1);
                    return Allowance::StallNow;
                }
                limit = limit.min(stall.after_bytes - sent);
            }
        }
        if let Some(Reset::AfterBytes(mark)) = f.reset {
            limit = limit.min(mark.saturating_sub(sent));
        }
        if let Some(cut) = f.cut
            && (cut.every_connection || self.shared.cut_armed.load(Ordering::SeqCst))
        {
            limit = limit.min(cut.after_bytes.saturating_sub(sent));
        }
        Allowance::Send(usize::try_from(limit).unwrap_or(usize::MAX))
    }

    /// Whether a reset or cut mark has been reached after `sent` bytes downstream.
    fn mark_reached(&self, f: &Faults, sent: u64) -> Option<End> {
        if let Some(Reset::AfterBytes(mark)) = f.reset
            && sent >= mark
        {
            return Some(End::Reset);
        }
        let cut = f.cut?;
        let fire = sent >= cut.after_bytes
            && (cut.every_connection || self.shared.cut_armed.swap(false, Ordering::SeqCst));
        fire.then_some(End::Cut)
    }
}

/// What the downstream marks allow.
enum Allowance {
    Send(usize),
    StallNow,
    End(End),
}
