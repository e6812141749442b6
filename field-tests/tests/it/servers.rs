//! Tiny loopback servers for the proxy's own tests: echo, and a source that sends a fixed
//! payload on every connection. Their tasks live in a `JoinSet` aborted on drop.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A loopback server; its tasks stop when it is dropped.
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    _tasks: JoinSet<()>,
}

/// Echoes every byte back on every connection.
pub(crate) async fn echo() -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    TestServer {
        addr,
        _tasks: tasks,
    }
}

/// The byte at offset `i` of [`source`]'s payload.
pub(crate) fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Sends `len` bytes of [`pattern`] on every connection, then closes its side.
pub(crate) async fn source(len: usize) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let payload: Vec<u8> = (0..len).map(pattern).collect();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let payload = payload.clone();
            conns.spawn(async move {
                let _ = s.write_all(&payload).await;
                let _ = s.shutdown().await;
                // Hold the socket until the peer is done, so nothing resets it early.
                let mut sink = [0u8; 1024];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    TestServer {
        addr,
        _tasks: tasks,
    }
}
