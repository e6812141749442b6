//! A fault-injecting TCP proxy on loopback: sits between a client (the tablet agent) and an
//! upstream server (the sync server) and adds latency, bandwidth caps, stalls, cuts,
//! blackholes, resets and refusals, changeable while traffic flows.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> Result<(), cpis_field_tests::proxy::ProxyError> {
//! use cpis_field_tests::proxy::{Faults, Proxy};
//! let proxy = Proxy::start(server, Faults::two_g()).await?;
//! let url = format!("https://127.0.0.1:{}", proxy.local_addr().port());
//! // ... point the agent at `url` ...
//! proxy.set_faults(Faults::none().with_cut_every_connection(64 * 1024)).await?;
//! println!("{:?} (seed {})", proxy.stats(), proxy.seed());
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! It works on bytes, below TLS, so it cannot tamper with content usefully (TLS would detect
//! it); content tampering belongs at the HTTP layer. Every connection runs as a task in one
//! [`TaskTracker`] under one [`CancellationToken`]: nothing outlives [`ProxyHandle::shutdown`]
//! (or the handle being dropped). Random choices (latency jitter) come from the proxy's seed.

mod conn;
mod faults;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use faults::{Bandwidth, Cut, Direction, Faults, Latency, LinkFaults, Reset, Stall};

/// How long `set_faults` waits for the listener to stop or start, and `shutdown` for the
/// connection tasks to end.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the proxy could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding the proxy on 127.0.0.1: {0}")]
    Bind(#[source] io::Error),
    #[error("listening again on {addr} after refusing connections: {reason}")]
    Rebind { addr: SocketAddr, reason: String },
    #[error("the proxy did not {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("the proxy has stopped")]
    Stopped,
}

/// Traffic counters, since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub open: u64,
    /// Bytes delivered to the upstream server.
    pub bytes_up: u64,
    /// Bytes delivered to clients.
    pub bytes_down: u64,
    /// Connections ended by a [`Cut`].
    pub cuts: u64,
    /// Connections ended by a [`Reset`] (or reset because the upstream reset or refused).
    pub resets: u64,
    /// Stalls that started.
    pub stalls: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    open: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    cuts: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            connections: get(&self.connections),
            open: get(&self.open),
            bytes_up: get(&self.bytes_up),
            bytes_down: get(&self.bytes_down),
            cuts: get(&self.cuts),
            resets: get(&self.resets),
            stalls: get(&self.stalls),
        }
    }
}

/// State shared by the accept loop, every connection task and the handle.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    seed: u64,
    faults: watch::Sender<Faults>,
    /// Bumped by every `set_faults` (stalls fire once per connection per generation).
    generation: AtomicU64,
    /// A once-only cut has not fired yet since the last `set_faults`.
    cut_armed: AtomicBool,
    counters: Counters,
}

/// Whether the accept loop is taking connections.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listening {
    Yes,
    Refusing,
    Failed(String),
}

/// Starts proxies.
#[derive(Debug)]
pub struct Proxy;

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream`, with a random seed (or the
    /// one in `CPIS_FIELD_SEED`); [`ProxyHandle::seed`] tells which.
    pub async fn start(upstream: SocketAddr, faults: Faults) -> Result<ProxyHandle, ProxyError> {
        Self::start_seeded(upstream, faults, crate::seed::pick()).await
    }

    /// Starts a proxy whose random choices all derive from `seed`.
    pub async fn start_seeded(
        upstream: SocketAddr,
        faults: Faults,
        seed: u64,
    ) -> Result<ProxyHandle, ProxyError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(ProxyError::Bind)?;
        let addr = listener.local_addr().map_err(ProxyError::Bind)?;
        let shared = Arc::new(Shared {
            upstream,
            seed,
            faults: watch::Sender::new(faults),
            generation: AtomicU64::new(0),
            cut_armed: AtomicBool::new(true),
            counters: Counters::default(),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (listening_tx, listening) = watch::channel(Listening::Yes);
        let accept = accept_loop(
            listener,
            addr,
            shared.clone(),
            tracker.clone(),
            cancel.clone(),
            listening_tx,
        );
        tracker.spawn(cancel.clone().run_until_cancelled_owned(accept));
        let handle = ProxyHandle {
            shared,
            addr,
            tracker,
            cancel,
            listening,
        };
        if faults.refuse {
            handle.wait_listening(true).await?;
        }
        Ok(handle)
    }
}

/// A running proxy. Dropping it stops every task (without waiting); [`Self::shutdown`]
/// also waits for them.
#[derive(Debug)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tracker: TaskTracker,
    cancel: CancellationToken,
    listening: watch::Receiver<Listening>,
}

impl ProxyHandle {
    /// Where clients connect (127.0.0.1 and a port of the system's choosing; the same port
    /// again after a refusal ends).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The seed every random choice derives from.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.shared.faults.borrow()
    }

    /// Replaces the faults. Latency, bandwidth, blackhole and the byte marks apply to the next
    /// data on every open connection too. Returns once a change of `refuse` has taken effect
    /// (the listener is closed, or listening again).
    pub async fn set_faults(&self, faults: Faults) -> Result<(), ProxyError> {
        if self.cancel.is_cancelled() {
            return Err(ProxyError::Stopped);
        }
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.cut_armed.store(true, Ordering::SeqCst);
        self.shared.faults.send_replace(faults);
        self.wait_listening(faults.refuse).await
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, ends every connection, and waits (bounded) for all tasks to finish.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        // Every task is cancellable, so this is quick; the bound only guards a bug.
        let _ = tokio::time::timeout(CONTROL_TIMEOUT, self.tracker.wait()).await;
    }

    async fn wait_listening(&self, refusing: bool) -> Result<(), ProxyError> {
        let mut rx = self.listening.clone();
        let state = tokio::time::timeout(
            CONTROL_TIMEOUT,
            rx.wait_for(|s| match s {
                Listening::Yes => !refusing,
                Listening::Refusing => refusing,
                Listening::Failed(_) => true,
            }),
        )
        .await
        .map_err(|_| ProxyError::Timeout {
            what: if refusing {
                "stop listening"
            } else {
                "listen again"
            },
            timeout: CONTROL_TIMEOUT,
        })?
        .map_err(|_| ProxyError::Stopped)?
        .clone();
        match state {
            Listening::Failed(reason) => Err(ProxyError::Rebind {
                addr: self.addr,
                reason,
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

/// Accepts connections (one task each), closing the listener while `refuse` is set and
/// binding the same address again when it is cleared.
async fn accept_loop(
    first: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    listening: watch::Sender<Listening>,
) {
    let mut faults = shared.faults.subscribe();
    let mut listener = Some(first);
    let mut next_id = 0u64;
    loop {
        let refuse = faults.borrow_and_update().refuse;
        if refuse {
            if let Some(l) = listener.take() {
                // Connections the kernel completed before the change are served, not reset.
                for stream in drain_backlog(l) {
                    next_id += 1;
                    let task = conn::serve(next_id, stream, shared.clone());
                    tracker.spawn(cancel.child_token().run_until_cancelled_owned(task));
                }
            }
            listening.send_replace(Listening::Refusing);
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match rebind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    listening.send_replace(Listening::Failed(e.to_string()));
                    return;
                }
            },
        };
        listening.send_if_modified(|s| {
            let changed = *s != Listening::Yes;
            *s = Listening::Yes;
            changed
        });
        let l = listener.insert(current);
        tokio::select! {
            accepted = l.accept() => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    let task = conn::serve(next_id, stream, shared.clone());
                    tracker.spawn(cancel.child_token().run_until_cancelled_owned(task));
                }
                // Out of file descriptors and the like: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Closes a listener, returning the connections waiting in its backlog.
fn drain_backlog(listener: TcpListener) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    // `into_std` leaves the listener non-blocking: `accept` stops at an empty backlog.
    let Ok(listener) = listener.into_std() else {
        return out;
    };
    while let Ok((stream, _)) = listener.accept() {
        if stream.set_nonblocking(true).is_ok()
            && let Ok(stream) = tokio::net::TcpStream::from_std(stream)
        {
            out.push(stream);
        }
    }
    out
}

/// Binds `addr` again; retries briefly in case the port is still being released.
async fn rebind(addr: SocketAddr) -> io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| io::Error::other("bind failed")))
}
