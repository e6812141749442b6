//! A loopback TCP proxy in front of the real sync server: it counts the bytes it passes from
//! the server to the agent and, when armed, cuts every connection once a byte budget is
//! spent — a network that drops in the middle of a download, with no hook in the product.
//! TLS runs end to end through it (the server certificate names 127.0.0.1, any port).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Debug)]
struct Budget {
    /// Bytes passed from the server to the client so far.
    down: u64,
    /// Total `down` after which connections are cut.
    limit: u64,
    /// Connections cut so far.
    cuts: u64,
    /// New connections are closed at once (the server is unreachable).
    refuse: bool,
    /// New connections are accepted and never answered.
    blackhole: bool,
}

impl Budget {
    /// How many of `n` bytes may pass now (the rest is never sent).
    fn take(&mut self, n: u64) -> u64 {
        let allowed = n.min(self.limit.saturating_sub(self.down));
        self.down += allowed;
        allowed
    }
}

#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) base: String,
    budget: Arc<Mutex<Budget>>,
    /// The accept loop; it owns the connections' tasks. Dropped with the proxy.
    _tasks: JoinSet<()>,
}

impl Proxy {
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let budget = Arc::new(Mutex::new(Budget {
            down: 0,
            limit: u64::MAX,
            cuts: 0,
            refuse: false,
            blackhole: false,
        }));
        let mut tasks = JoinSet::new();
        let b = budget.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (refuse, blackhole) = {
                    let g = b.lock().unwrap();
                    (g.refuse, g.blackhole)
                };
                if refuse {
                    drop(client);
                    continue;
                }
                if blackhole {
                    conns.spawn(async move {
                        let _held = client;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                let b = b.clone();
                conns.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, b).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Proxy {
            base,
            budget,
            _tasks: tasks,
        }
    }

    /// Bytes passed from the server to clients so far.
    pub(crate) fn served(&self) -> u64 {
        self.budget.lock().unwrap().down
    }

    /// Cuts every connection once `n` more bytes have passed from the server.
    pub(crate) fn cut_after(&self, n: u64) {
        let mut b = self.budget.lock().unwrap();
        b.limit = b.down + n;
    }

    /// Lets everything through again.
    pub(crate) fn heal(&self) {
        let mut b = self.budget.lock().unwrap();
        b.limit = u64::MAX;
        b.refuse = false;
        b.blackhole = false;
    }

    /// The server becomes unreachable: open connections are cut at their next byte and new
    /// ones closed at once.
    pub(crate) fn go_offline(&self) {
        let mut b = self.budget.lock().unwrap();
        b.limit = b.down;
        b.refuse = true;
    }

    /// New connections are accepted and never answered (open ones are cut).
    pub(crate) fn blackhole(&self) {
        let mut b = self.budget.lock().unwrap();
        b.limit = b.down;
        b.blackhole = true;
    }

    /// Connections cut so far.
    pub(crate) fn cuts(&self) -> u64 {
        self.budget.lock().unwrap().cuts
    }
}

async fn pipe(client: TcpStream, server: TcpStream, budget: Arc<Mutex<Budget>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
        // Half-closed: keep the other direction going until it ends.
        std::future::pending::<()>().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let allowed = budget.lock().unwrap().take(n as u64) as usize;
            if cw.write_all(&buf[..allowed]).await.is_err() {
                return;
            }
            if allowed < n {
                budget.lock().unwrap().cuts += 1;
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    // Dropping the halves closes both sockets: the client sees the connection end.
}
