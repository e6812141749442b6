//! `cpis-bench-tool`: the measuring helpers `benchmarks.sh` drives against real processes on
//! loopback. Not part of the product; it never links the product's crates that touch keys.
//!
//! * `enrol PORT CA TOKEN OUT_DIR`: enrols a device with the sync server's real `POST
//!   /v1/enrol` (a fresh P-256 key and CSR) and writes `device.pem` and `device-key.pem`, so
//!   the load generator can present the same mutual-TLS identity a tablet does.
//! * `fetch PORT PATH CA CERT KEY OUT`: one `GET https://localhost:PORT/PATH` with that
//!   identity; writes the body to OUT and prints `RESULT fetch status=.. body_bytes=..`.
//! * `load PORT PATH CA CERT KEY CONNECTIONS SECONDS LABEL`: the load generator. CONNECTIONS
//!   kept-alive HTTP/1.1 connections over TLS (rustls with ring, the product's TLS stack),
//!   one request in flight on each, for one second of warm-up and then SECONDS measured.
//!   Every answer must be 200 with a body, else it fails. Prints `RESULT LABEL polls_per_s=..
//!   p50_us=.. p99_us=.. requests=.. body_bytes_min=.. body_bytes_max=.. connections=.. seconds=..
//!   reconnects=.. all_requests=..` (all_requests counts the warm-up too). The same binary, settings and identity are used against every server.
//! * `relay TARGET_PORT PORT_FILE LOG`: a TCP relay on 127.0.0.1 (its port written to
//!   PORT_FILE) to 127.0.0.1:TARGET_PORT that appends `<client-to-server> <server-to-client>`
//!   bytes to LOG for each connection once both directions are closed: the bytes a tablet's
//!   sync really carries, TLS records and handshakes included.
//!
//! The host name is always `localhost` (SNI and `Host`), the address always 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpis_protocol::api::{EnrolRequest, EnrolResponse, paths};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const HOST: &str = "localhost";
const USAGE: &str = "usage:
  cpis-bench-tool enrol PORT CA TOKEN OUT_DIR
  cpis-bench-tool fetch PORT PATH CA CERT KEY OUT
  cpis-bench-tool load PORT PATH CA CERT KEY CONNECTIONS SECONDS LABEL
  cpis-bench-tool relay TARGET_PORT PORT_FILE LOG";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        match (args.first().map(String::as_str), args.len()) {
            (Some("enrol"), 5) => enrol(&args[1..]).await,
            (Some("fetch"), 7) => fetch(&args[1..]).await,
            (Some("load"), 9) => load(&args[1..]).await,
            (Some("relay"), 4) => relay(&args[1..]).await,
            _ => Err(format!("bad arguments {args:?}\n{USAGE}").into()),
        }
    });
    if let Err(e) = result {
        eprintln!("cpis-bench-tool: {e}");
        std::process::exit(1);
    }
}

fn port(s: &str) -> Result<SocketAddr> {
    let port: u16 = s.parse().map_err(|_| format!("bad port {s:?}"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A rustls client config with the ring provider, trusting only CA, optionally presenting a
/// client certificate; HTTP/1.1 only.
fn tls(ca: &str, identity: Option<(&str, &str)>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        roots.add(cert.map_err(|e| format!("{ca}: {e}"))?)?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("{cert}: {e}"))?
                .collect::<std::result::Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?,
        )?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Sender<B> = SendRequest<B>;

async fn connect<B>(addr: SocketAddr, tls: Arc<ClientConfig>) -> Result<Sender<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(HOST)?.to_owned(), tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn get(sender: &mut Sender<Empty<Bytes>>, path: &str) -> Result<(StatusCode, Bytes)> {
    sender.ready().await?;
    let request = Request::get(path)
        .header(hyper::header::HOST, HOST)
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn enrol(a: &[String]) -> Result<()> {
    let (addr, ca, token, out) = (port(&a[0])?, &a[1], &a[2], Path::new(&a[3]));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let body = serde_json::to_vec(&EnrolRequest {
        token: token.clone(),
        csr_pem: csr,
        name: Some("benchmark load generator".into()),
        agent_version: "cpis-bench-tool".into(),
    })?;
    let mut sender = connect::<Full<Bytes>>(addr, tls(ca, None)?).await?;
    sender.ready().await?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(paths::ENROL)
        .header(hyper::header::HOST, HOST)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "enrol answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        )
        .into());
    }
    let enrolment: EnrolResponse = serde_json::from_slice(&bytes)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("device.pem"), enrolment.client_cert_pem)?;
    std::fs::write(out.join("device-key.pem"), key.serialize_pem())?;
    println!("RESULT enrol device={}", enrolment.device_id);
    Ok(())
}

async fn fetch(a: &[String]) -> Result<()> {
    let addr = port(&a[0])?;
    let config = tls(&a[2], Some((&a[3], &a[4])))?;
    let mut sender = connect(addr, config).await?;
    let (status, body) = get(&mut sender, &a[1]).await?;
    std::fs::write(&a[5], &body)?;
    println!(
        "RESULT fetch status={} body_bytes={}",
        status.as_u16(),
        body.len()
    );
    if status != StatusCode::OK {
        return Err(format!("GET {} answered {status}", a[1]).into());
    }
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn load(a: &[String]) -> Result<()> {
    let addr = port(&a[0])?;
    let path = a[1].clone();
    let config = tls(&a[2], Some((&a[3], &a[4])))?;
    let connections: usize = a[5].parse().map_err(|_| "bad CONNECTIONS")?;
    let seconds: f64 = a[6].parse().map_err(|_| "bad SECONDS")?;
    let label = &a[7];
    let warmup = Duration::from_secs(1);
    let window = Duration::from_secs_f64(seconds);
    let reconnects = Arc::new(AtomicU64::new(0));

    // Open every connection first, so handshakes are not in the measured window.
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect::<Empty<Bytes>>(addr, config.clone()).await?);
    }
    let started = Instant::now();
    let (from, until) = (started + warmup, started + warmup + window);
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let (path, config, reconnects) = (path.clone(), config.clone(), reconnects.clone());
        tasks.spawn(async move {
            let mut times: Vec<u32> = Vec::new();
            let mut length = None;
            let mut all = 0u64;
            loop {
                let t = Instant::now();
                if t >= until {
                    return Ok::<_, Box<dyn Error + Send + Sync>>((times, length, all));
                }
                if sender.is_closed() {
                    // The server closed a kept-alive connection; count it and open another.
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    sender = connect(addr, config.clone()).await?;
                    continue;
                }
                let (status, body) = match get(&mut sender, &path).await {
                    Ok(r) => r,
                    Err(_) if sender.is_closed() => continue,
                    Err(e) => return Err(e),
                };
                let done = Instant::now();
                all += 1;
                if status != StatusCode::OK {
                    return Err(format!("GET {path} answered {status}").into());
                }
                // A signed checkpoint's length varies by a few bytes (varint-encoded time).
                if body.is_empty() {
                    return Err(format!("GET {path} answered an empty body").into());
                }
                let (lo, hi) = length.unwrap_or((body.len(), body.len()));
                length = Some((lo.min(body.len()), hi.max(body.len())));
                if t >= from && done <= until {
                    times.push((done - t).as_micros().min(u32::MAX as u128) as u32);
                }
            }
        });
    }
    let mut times = Vec::new();
    let mut length: Option<(usize, usize)> = None;
    let mut all = 0;
    while let Some(r) = tasks.join_next().await {
        let (t, l, n) = r??;
        all += n;
        times.extend(t);
        length = match (length, l) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        };
    }
    if times.is_empty() {
        return Err("no request completed in the measured window".into());
    }
    times.sort_unstable();
    println!(
        "RESULT {label} polls_per_s={:.0} p50_us={} p99_us={} requests={} body_bytes_min={} body_bytes_max={} connections={connections} seconds={seconds} reconnects={} all_requests={all}",
        times.len() as f64 / window.as_secs_f64(),
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        times.len(),
        length.map_or(0, |l| l.0),
        length.map_or(0, |l| l.1),
        reconnects.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Copies until EOF or error, counting bytes; then closes the write side.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if to.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n += k as u64;
            }
        }
    }
    let _ = to.shutdown().await;
    n
}

async fn relay(a: &[String]) -> Result<()> {
    let target = port(&a[0])?;
    let log = a[2].clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    std::fs::write(&a[1], listener.local_addr()?.port().to_string())?;
    let log_lock = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let (client, _) = listener.accept().await?;
        let (log, log_lock) = (log.clone(), log_lock.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let (up, down) = tokio::join!(pump(cr, sw), pump(sr, cw));
            let _guard = log_lock.lock().await;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("relay log");
            writeln!(f, "{up} {down}").expect("relay log");
        });
    }
}
