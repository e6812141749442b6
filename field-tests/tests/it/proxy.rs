//! The proxy's faults, each against a tiny loopback server. Timing checks are lower bounds
//! only ("took at least"), so a slow machine cannot make them fail.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use cpis_field_tests::proxy::{
    Bandwidth, Cut, Faults, Latency, LinkFaults, Proxy, ProxyHandle, Reset,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common;
use crate::servers::{self, pattern};

/// Bound on anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(10);

async fn proxy(name: &str, upstream: std::net::SocketAddr, faults: Faults) -> ProxyHandle {
    Proxy::start_seeded(upstream, faults, common::seed(name))
        .await
        .unwrap()
}

async fn connect(p: &ProxyHandle) -> TcpStream {
    TcpStream::connect(p.local_addr()).await.unwrap()
}

/// Sends `msg` to an echo server and reads it back; returns the round-trip time.
async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let started = Instant::now();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(PROMPT, s.read_exact(&mut back))
        .await
        .expect("echo within the bound")
        .unwrap();
    assert_eq!(back, msg);
    started.elapsed()
}

/// Reads until EOF; returns the bytes and how long it took.
async fn read_all(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("EOF within the bound")
        .unwrap();
    (out, started.elapsed())
}

fn assert_pattern(data: &[u8], seed: u64) {
    for (i, b) in data.iter().enumerate() {
        assert_eq!(*b, pattern(i), "byte {i} altered (seed {seed})");
    }
}

#[tokio::test]
async fn clean_link_forwards_and_counts() {
    let echo = servers::echo().await;
    let p = proxy("clean", echo.addr, Faults::none()).await;
    let mut s = connect(&p).await;
    let msg: Vec<u8> = (0..1000).map(pattern).collect();
    roundtrip(&mut s, &msg).await;
    let st = p.stats();
    assert_eq!((st.connections, st.open), (1, 1));
    assert_eq!((st.bytes_up, st.bytes_down), (1000, 1000));
    drop(s);
    p.shutdown().await;
}

#[tokio::test]
async fn latency_is_added_each_way() {
    let echo = servers::echo().await;
    let one_way = LinkFaults {
        latency: Some(Latency {
            fixed: Duration::from_millis(100),
            jitter: Duration::from_millis(50),
        }),
        bandwidth: None,
    };
    let faults = Faults {
        up: one_way,
        down: one_way,
        ..Faults::none()
    };
    let p = proxy("latency", echo.addr, faults).await;
    let mut s = connect(&p).await;
    for i in 0..3 {
        let rtt = roundtrip(&mut s, b"ping").await;
        assert!(
            rtt >= Duration::from_millis(200),
            "round trip {i} took {rtt:?}, less than 2 x 100 ms (seed {})",
            p.seed()
        );
    }
}

#[tokio::test]
async fn bandwidth_cap_slows_a_download() {
    const LEN: usize = 32 * 1024;
    let src = servers::source(LEN).await;
    let bw = Bandwidth::kbit(256);
    let faults = Faults {
        down: LinkFaults {
            bandwidth: Some(bw),
            latency: None,
        },
        ..Faults::none()
    };
    let p = proxy("bandwidth", src.addr, faults).await;
    let mut s = connect(&p).await;
    let (data, took) = read_all(&mut s).await;
    assert_eq!(data.len(), LEN);
    assert_pattern(&data, p.seed());
    // The bucket starts full, so the first burst is free.
    let floor = Duration::from_secs_f64((LEN as u64 - bw.burst()) as f64 / bw.bytes_per_sec as f64);
    eprintln!("[bandwidth] {LEN} bytes at 256 kbit/s in {took:?} (floor {floor:?})");
    assert!(took >= floor, "{LEN} bytes took {took:?} < {floor:?}");
    assert_eq!(p.stats().bytes_down, LEN as u64);
}

#[tokio::test]
async fn two_g_preset_is_slow_and_late() {
    const LEN: usize = 8 * 1024;
    let src = servers::source(LEN).await;
    let faults = Faults::two_g();
    let bw = faults.down.bandwidth.unwrap();
    let p = proxy("2g", src.addr, faults).await;
    let started = Instant::now();
    let mut s = connect(&p).await;
    let (data, _) = read_all(&mut s).await;
    let took = started.elapsed();
    assert_eq!(data.len(), LEN);
    assert_pattern(&data, p.seed());
    let floor = Duration::from_millis(150)
        + Duration::from_secs_f64((LEN as u64 - bw.burst()) as f64 / bw.bytes_per_sec as f64);
    eprintln!("[2g] {LEN} bytes in {took:?} (floor {floor:?})");
    assert!(
        took >= floor,
        "took {took:?} < {floor:?} (seed {})",
        p.seed()
    );
}

#[tokio::test]
async fn stall_holds_data_but_keeps_the_connection() {
    let echo = servers::echo().await;
    let p = proxy("stall", echo.addr, Faults::none()).await;
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"a").await;
    let stall = Duration::from_millis(400);
    p.set_faults(Faults::none().with_stall(0, stall))
        .await
        .unwrap();
    let held = roundtrip(&mut s, b"b").await;
    assert!(
        held >= stall,
        "stalled round trip took {held:?} < {stall:?}"
    );
    // Once per connection per set_faults: the connection carries on.
    roundtrip(&mut s, b"c").await;
    assert_eq!(p.stats().stalls, 1);
}

#[tokio::test]
async fn stall_part_way_through_a_download() {
    const LEN: usize = 20_000;
    let src = servers::source(LEN).await;
    let stall = Duration::from_millis(300);
    let p = proxy(
        "stall-mid",
        src.addr,
        Faults::none().with_stall(5_000, stall),
    )
    .await;
    let mut s = connect(&p).await;
    let mut first = vec![0u8; 5_000];
    tokio::time::timeout(PROMPT, s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    let (rest, took) = read_all(&mut s).await;
    assert_eq!(first.len() + rest.len(), LEN);
    assert_pattern(&[first, rest].concat(), p.seed());
    assert!(took >= stall, "the rest came after {took:?} < {stall:?}");
}

#[tokio::test]
async fn cut_delivers_exactly_n_bytes_then_eof() {
    let src = servers::source(10_000).await;
    let p = proxy(
        "cut",
        src.addr,
        Faults::none().with_cut_every_connection(3_000),
    )
    .await;
    for _ in 0..2 {
        let mut s = connect(&p).await;
        // read_to_end succeeding means a clean EOF, not a reset.
        let (data, _) = read_all(&mut s).await;
        assert_eq!(data.len(), 3_000);
        assert_pattern(&data, p.seed());
    }
    assert_eq!(p.stats().cuts, 2);

    // Once only: the first connection is cut, the next gets everything.
    p.set_faults(Faults {
        cut: Some(Cut {
            after_bytes: 3_000,
            every_connection: false,
        }),
        ..Faults::none()
    })
    .await
    .unwrap();
    let (first, _) = read_all(&mut connect(&p).await).await;
    let (second, _) = read_all(&mut connect(&p).await).await;
    assert_eq!((first.len(), second.len()), (3_000, 10_000));
    assert_eq!(p.stats().cuts, 3);
}

#[tokio::test]
async fn blackhole_times_out_the_client_then_releases() {
    let echo = servers::echo().await;
    let p = proxy("blackhole", echo.addr, Faults::none().with_blackhole(true)).await;
    let mut s = connect(&p).await;
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    let waited = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut back)).await;
    assert!(waited.is_err(), "a blackholed connection answered");
    assert_eq!(p.stats().bytes_up, 0);
    // The link comes back: what was held goes through, as TCP retransmission would do.
    p.set_faults(Faults::none()).await.unwrap();
    tokio::time::timeout(PROMPT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
}

#[tokio::test]
async fn reset_on_accept_gives_econnreset() {
    let src = servers::source(1_000).await;
    let p = proxy(
        "reset",
        src.addr,
        Faults::none().with_reset(Reset::OnAccept),
    )
    .await;
    let mut s = connect(&p).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(PROMPT, s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    assert_eq!(p.stats().resets, 1);
}

#[tokio::test]
async fn reset_after_bytes_gives_econnreset() {
    let src = servers::source(10_000).await;
    let p = proxy(
        "reset-after",
        src.addr,
        Faults::none().with_reset(Reset::AfterBytes(2_000)),
    )
    .await;
    let mut s = connect(&p).await;
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    let err = loop {
        match tokio::time::timeout(PROMPT, s.read(&mut buf))
            .await
            .unwrap()
        {
            Ok(0) => panic!("clean EOF after {got} bytes; expected a reset"),
            Ok(n) => got += n,
            Err(e) => break e.kind(),
        }
    };
    assert_eq!(err, ErrorKind::ConnectionReset);
    assert!(got <= 2_000, "{got} bytes passed a reset at 2000");
    assert_eq!(p.stats().bytes_down, 2_000);
}

#[tokio::test]
async fn refuse_then_listen_again_on_the_same_port() {
    let echo = servers::echo().await;
    let p = proxy("refuse", echo.addr, Faults::none()).await;
    let mut open = connect(&p).await;
    p.set_faults(Faults::none().with_refuse(true))
        .await
        .unwrap();
    let refused = TcpStream::connect(p.local_addr()).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    // A connection opened before carries on.
    roundtrip(&mut open, b"still here").await;
    p.set_faults(Faults::none()).await.unwrap();
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"back").await;
}

#[tokio::test]
async fn a_fault_change_applies_to_an_open_connection() {
    let echo = servers::echo().await;
    let p = proxy("runtime", echo.addr, Faults::none()).await;
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"before").await;
    p.set_faults(Faults::link(
        100_000,
        Latency::fixed(Duration::from_millis(150)),
    ))
    .await
    .unwrap();
    let rtt = roundtrip(&mut s, b"after").await;
    assert!(
        rtt >= Duration::from_millis(300),
        "round trip {rtt:?} after adding 2 x 150 ms"
    );
    p.set_faults(Faults::none()).await.unwrap();
    roundtrip(&mut s, b"clean again").await;
}

#[tokio::test]
async fn shutdown_closes_every_connection() {
    let echo = servers::echo().await;
    let p = proxy("shutdown", echo.addr, Faults::none()).await;
    let mut s = connect(&p).await;
    roundtrip(&mut s, b"x").await;
    p.shutdown().await;
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(PROMPT, s.read(&mut buf))
        .await
        .expect("the connection ends promptly");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "still open after shutdown: {r:?}"
    );
}
