//! Slow clients cannot starve the fleet: 1,000 connections to the real `cpis-sync-server`,
//! each with TLS done and then either headers never finished (a slow-loris), an anonymous
//! enrolment whose body trickles a byte at a time, or a council upload with a wrong token
//! whose body never comes — reconnecting whenever the server cuts them — while a council
//! uploads a change, a fleet of real tablets syncs to it, and the council lists its mailbox.
//!
//! What must hold (the server runs its defaults: 1,024 request slots, 64 for anonymous
//! requests, 10 s to send headers, 120 s for a request):
//! * every tablet converges to the new head within a bound (their requests never queue behind
//!   the slow ones: those hold only anonymous slots, or none);
//! * every mailbox listing answers 200, and the council's upload is accepted;
//! * `/healthz` answers throughout;
//! * the slow clients were really there: a thousand connections held open at once, the
//!   header timeout cut the slow-loris ones, the trickled enrolments filled the anonymous
//!   pool (the rest of them shed with 503), the wrong-token uploads were answered at once
//!   (401 before their bodies were read, or 503 while the anonymous pool was full) and never
//!   held open waiting for their bodies.
//!
//! The figures (listing latency p50/p99, convergence time, cuts, sheds) are printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpis_agent::schedule::ScheduleConfig;
use cpis_field_tests::fleet::{Fleet, FleetOptions, raise_fd_limit, state_root};
use cpis_field_tests::harness::ServerProcess;
use cpis_fixtures::{Config, Dataset};
use cpis_protocol::CouncilCode;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::common;

/// Slow connections kept open at once.
const SLOW_CLIENTS: usize = 1_000;
/// Tablets syncing through the attack.
const TABLETS: usize = 100;
/// Flags in the region.
const FLAGS: usize = 300;
/// Bound on the tablets' convergence to the new head during the attack.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);
/// Mailbox listings made during the attack.
const LISTINGS: usize = 40;

/// What the slow clients saw, counted across all of them.
#[derive(Debug, Default)]
struct Seen {
    /// TLS handshakes completed (first connections and reconnections).
    connected: AtomicU64,
    /// Slow clients that completed at least one TLS handshake.
    clients: AtomicU64,
    /// Connections open now (at most `SLOW_CLIENTS`).
    open: AtomicU64,
    /// The most connections open at once.
    peak_open: AtomicU64,
    /// Connections the server closed without an answer (the header timeout).
    cut: AtomicU64,
    /// Answers by status: 401 (wrong token, body never read), 408 (request timeout), 503
    /// (anonymous pool full), other.
    s401: AtomicU64,
    s408: AtomicU64,
    s503: AtomicU64,
    other: AtomicU64,
    /// Wrong-token uploads answered at once (401, or 503 while the anonymous pool was full).
    uploads_refused: AtomicU64,
    /// Wrong-token uploads the server held open (cut or 408 instead of an answer): never.
    uploads_held: AtomicU64,
}

/// The three kinds of slow client, by index.
fn request_head(i: usize, council: &CouncilCode) -> String {
    match i % 3 {
        // Headers never finished.
        0 => "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".to_owned(),
        // An anonymous enrolment whose body trickles.
        1 => "POST /v1/enrol HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
              Content-Length: 60000\r\n\r\n{\"token\":\""
            .to_owned(),
        // An upload with a wrong token, whose body never comes.
        _ => format!(
            "POST /v1/councils/{council}/uploads HTTP/1.1\r\nHost: localhost\r\n\
             Authorization: Bearer cpis_ct_not-this-councils-token\r\n\
             Content-Type: text/csv\r\nContent-Length: 30000000\r\n\r\n"
        ),
    }
}

/// One slow client: connects, sends its head, then a byte every 500 ms, until the server
/// answers or cuts it (then, 2 s later, it connects again), until `stop`.
async fn slow_client(
    i: usize,
    addr: std::net::SocketAddr,
    tls: TlsConnector,
    council: CouncilCode,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let Ok(tcp) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(mut conn) = tls
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        seen.connected.fetch_add(1, Ordering::Relaxed);
        if std::mem::take(&mut first) {
            seen.clients.fetch_add(1, Ordering::Relaxed);
        }
        let open = seen.open.fetch_add(1, Ordering::Relaxed) + 1;
        seen.peak_open.fetch_max(open, Ordering::Relaxed);
        let mut answered = Vec::new();
        if conn
            .write_all(request_head(i, &council).as_bytes())
            .await
            .is_ok()
        {
            let mut buf = [0u8; 1024];
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::select! {
                    read = conn.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            answered.extend_from_slice(&buf[..n]);
                            if answered.windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    },
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        if conn.write_all(b"a").await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        seen.open.fetch_sub(1, Ordering::Relaxed);
        drop(conn);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let status = String::from_utf8_lossy(&answered)
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok());
        let counter = match status {
            None => &seen.cut,
            Some(401) => &seen.s401,
            Some(408) => &seen.s408,
            Some(503) => &seen.s503,
            Some(_) => &seen.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if i % 3 == 2 {
            let refused = matches!(status, Some(401 | 503));
            let kind = if refused {
                &seen.uploads_refused
            } else {
                &seen.uploads_held
            };
            kind.fetch_add(1, Ordering::Relaxed);
        }
        // Back again after a pause (bounded load: the handshakes are not what is tested).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_clients_never_starve_tablets_or_councils() {
    let seed = common::seed("slow clients");
    let (soft, hard) = raise_fd_limit(65_536).unwrap();
    let need = (SLOW_CLIENTS as u64) * 2 + (TABLETS as u64) * 9 + 1_000;
    assert!(
        soft >= need,
        "the scenario needs about {need} open files; the limit is {soft} (hard {hard})"
    );
    let dir = tempfile::TempDir::new().unwrap();
    let as_of = chrono::Utc::now().date_naive();
    let config = Config::new(seed, as_of).with_regions(2).with_councils(6);
    let directory = cpis_fixtures::Directory::generate(&config).unwrap();
    let region = directory.regions[0].clone();
    let dataset = Dataset::generate_region(&config, &region.id, FLAGS).unwrap();
    let mut server = ServerProcess::init_and_start(
        &dir.path().join("server"),
        "127.0.0.1:0".parse().unwrap(),
        &dataset.directory,
    )
    .await
    .unwrap();
    // The region's councils upload; the largest one will upload a change mid-attack.
    let carried = directory.carried_councils(&region.id);
    let mut head = 0;
    let mut biggest: Option<(CouncilCode, Vec<cpis_protocol::FlagRecord>)> = None;
    for (code, list) in &dataset.flags_by_council {
        if !carried.contains(&code) || list.is_empty() {
            continue;
        }
        let council = server.council(code).await.unwrap();
        head = head.max(council.upload(list).await.unwrap().version);
        if biggest.as_ref().is_none_or(|(_, l)| l.len() < list.len()) {
            biggest = Some((code.clone(), list.clone()));
        }
    }
    let (code, mut list) = biggest.expect("a council with flags");
    let council = server.council(&code).await.unwrap();

    // The fleet, enrolled and synced before the attack.
    let token = server
        .enrolment_token(&region.trust, &region.id, u32::try_from(TABLETS).unwrap())
        .await
        .unwrap();
    let fleet_dir = state_root(256 << 20).unwrap();
    let mut fleet = Fleet::enrol(
        fleet_dir.path(),
        &server.base_url(),
        server.ca_pem(),
        &token,
        FleetOptions {
            agents: TABLETS,
            schedule: ScheduleConfig {
                interval: Duration::from_secs(5),
                interval_jitter: Duration::from_secs(2),
                soon: Duration::from_secs(1),
                min_gap: Duration::from_secs(1),
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(5),
                retry_after_max: Duration::from_secs(10),
                live: false,
                ..ScheduleConfig::default()
            },
            seed,
            enrol_parallel: 16,
        },
    )
    .await
    .unwrap();
    fleet.start();
    fleet
        .converge(head, &[], CONVERGE_BOUND)
        .await
        .unwrap_or_else(|e| panic!("(seed {seed}) first sync: {e:#}"));

    // The baseline, measured in this run before the attack.
    let list_mailbox = || async {
        let mut took = Vec::new();
        for _ in 0..LISTINGS {
            let t = Instant::now();
            council.notifications_page(None, 100).await.unwrap();
            took.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        took.sort();
        took
    };
    let baseline = list_mailbox().await;

    // The attack: 1,000 slow connections, reconnecting when cut.
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls_config));
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = JoinSet::new();
    let addr = server.addr();
    for i in 0..SLOW_CLIENTS {
        attackers.spawn(slow_client(
            i,
            addr,
            connector.clone(),
            code.clone(),
            seen.clone(),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    while seen.clients.load(Ordering::Relaxed) < SLOW_CLIENTS as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {} of {SLOW_CLIENTS} slow clients connected",
            seen.clients.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[slow clients] all {SLOW_CLIENTS} slow clients connected (TLS done) after {:.1} s; {} \
         connections open",
        started.elapsed().as_secs_f64(),
        seen.open.load(Ordering::Relaxed)
    );

    // Under attack: a change is uploaded, the tablets converge, the council lists.
    list.truncate(list.len() - list.len() / 4);
    let receipt = council.upload(&list).await.unwrap();
    head = head.max(receipt.version);
    let attack_began = Instant::now();
    let listing = list_mailbox();
    let health = async {
        let mut took = Vec::new();
        for _ in 0..20 {
            took.push(server.healthz().await.unwrap());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        took
    };
    let (converged, listings, mut healthz) =
        tokio::join!(fleet.converge(head, &[], CONVERGE_BOUND), listing, health);
    let converged = converged.unwrap_or_else(|e| {
        panic!(
            "(seed {seed}) tablets under attack: {e:#}\nserver log:\n{}",
            server.log_tail(20)
        )
    });
    // Past the 10 s header timeout: the slow-loris connections must have been cut.
    let cut_by = Duration::from_secs(15);
    if attack_began.elapsed() < cut_by {
        tokio::time::sleep(cut_by - attack_began.elapsed()).await;
    }
    let metrics = server.metrics().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    attackers.shutdown().await;

    healthz.sort();
    let counts = fleet.counts();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    eprintln!(
        "[slow clients] under {SLOW_CLIENTS} slow connections (peak {} open, {} handshakes): \
         {TABLETS} tablets converged to the new head in {:.1} s ({counts}); mailbox listing \
         p50 {:.1} ms, p99 {:.1} ms over {LISTINGS} (before the attack p50 {:.1} ms, p99 \
         {:.1} ms: {:.2}x at p50); healthz p50 {:.1} ms, p99 {:.1} ms; the \
         slow clients saw {} cut by the header timeout, {} x 401 (wrong token, body never \
         read), {} x 503 (anonymous pool full), {} x 408, {} other; wrong-token uploads {} \
         answered at once, {} held; server: {} anonymous requests shed, {} request timeouts",
        load(&seen.peak_open),
        load(&seen.connected),
        converged.as_secs_f64(),
        percentile(&listings, 0.5).as_secs_f64() * 1e3,
        percentile(&listings, 0.99).as_secs_f64() * 1e3,
        percentile(&baseline, 0.5).as_secs_f64() * 1e3,
        percentile(&baseline, 0.99).as_secs_f64() * 1e3,
        percentile(&listings, 0.5).as_secs_f64() / percentile(&baseline, 0.5).as_secs_f64(),
        percentile(&healthz, 0.5).as_secs_f64() * 1e3,
        percentile(&healthz, 0.99).as_secs_f64() * 1e3,
        load(&seen.cut),
        load(&seen.s401),
        load(&seen.s503),
        load(&seen.s408),
        load(&seen.other),
        load(&seen.uploads_refused),
        load(&seen.uploads_held),
        metric("cpis_shed_requests_total{reason=\"anonymous_overloaded\"}"),
        metric("cpis_request_timeouts_total"),
    );
    assert_eq!(load(&seen.clients), SLOW_CLIENTS as u64);
    assert!(
        load(&seen.cut) > 0,
        "the header timeout cut the slow-loris connections"
    );
    assert!(
        load(&seen.uploads_refused) > 0 && load(&seen.uploads_held) == 0,
        "wrong-token uploads are answered at once (401 or 503), never held for their bodies"
    );
    assert!(
        load(&seen.s503) > 0,
        "the trickled enrolments filled the anonymous pool"
    );
    assert_eq!(load(&seen.other), 0, "no other answer to a slow client");
    assert!(metric("cpis_shed_requests_total{reason=\"overloaded\"}") == 0.0);
    fleet.shutdown().await;
    server.stop().await.unwrap();
}
