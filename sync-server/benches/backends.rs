//! SQLite against PostgreSQL, and one replica against three; prints figures measured in this
//! run, each backend through the same real server over HTTPS on loopback:
//! 1. a 200,000-flag region uploaded (one full-list upload per council, first time);
//! 2. that region's snapshot built (the first `GET /v1/device/snapshot`: store read, encode,
//!    compress, sign) and served from the cache (the second);
//! 3. no-change checkpoint polls per second (mutual TLS, HTTP/2, 64 in flight; 3 s after 1 s
//!    unmeasured);
//! 4. access events stored per second (200 batches of 100, 16 in flight, 50% flagged, after
//!    16 unmeasured batches);
//! 5. council mailbox listing, pages of 100 at random cursors, p50/p99;
//!
//! then, on PostgreSQL behind HAProxy (TCP, TLS passed through), polls/s and events/s with
//! one replica and with three (every replica in this one process: the machine's cores are
//! shared either way). PostgreSQL runs in a throw-away cluster (scripts/postgres-start.sh),
//! with `fsync` on as SQLite's `synchronous=FULL`.
//!
//! Run with `cargo bench -p cpis-sync-server --bench backends`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone as _, Utc};
use cpis_fixtures::{Config as FixtureConfig, Dataset, council_csv_bytes};
use cpis_protocol::api::{EnrolRequest, EnrolResponse, UploadReceipt, paths};
use cpis_protocol::mailbox::NotificationPage;
use cpis_protocol::{
    AccessEvent, CareSetting, CouncilCode, EventBatch, EventId, EventUploadAck, Freshness,
    LookupResult, NhsNumber, PlanType, RegionId, TrustCode,
};
use cpis_sync_server::clock::ManualClock;
use cpis_sync_server::config::{Config, SheddingConfig};
use cpis_sync_server::server::{self, Server, ServerHandle};
use cpis_sync_server::store::{NewEnrolmentToken, Store};
use cpis_sync_server::tokens;
use rand::{Rng as _, SeedableRng as _};
use tempfile::TempDir;

const SEED: u64 = 20_261_207;
const FLAGS: usize = 200_000;
const TIMEOUT: Duration = Duration::from_secs(300);

fn scripts() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

fn script(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("bash")
        .arg(scripts().join(name))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_requests: 100_000,
        // One enrolled device stands for a fleet here: the per-device rate limit is off.
        load_shedding: SheddingConfig {
            device_requests_per_minute: 0,
            ..SheddingConfig::default()
        },
        ..Config::default()
    }
}

async fn serve(dir: &Path, clock: &ManualClock) -> ServerHandle {
    let mut c = config();
    c.database_url = Config::load(dir).unwrap().database_url;
    Server::bind(dir, c, Arc::new(clock.clone())).await.unwrap()
}

/// One backend's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    upload_s: f64,
    snapshot_build_ms: f64,
    snapshot_cached_ms: f64,
    polls_per_s: f64,
    events_per_s: f64,
    list_p50_ms: f64,
    list_p99_ms: f64,
}

/// What a run needs after setup: the server's address and credentials.
struct Site {
    base: String,
    ca: String,
    device: reqwest::Client,
    enrolment: EnrolResponse,
    council: CouncilCode,
    council_token: String,
    subjects: Vec<NhsNumber>,
}

async fn enrol(base: &str, ca: &str, token: String) -> (reqwest::Client, EnrolResponse) {
    let http = common::client(ca, None, TIMEOUT);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let enrolment: EnrolResponse = http
        .post(format!("{base}{}", paths::ENROL))
        .json(&EnrolRequest {
            token,
            csr_pem: csr,
            name: None,
            agent_version: "bench".into(),
        })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device = common::client(
        ca,
        Some((&enrolment.client_cert_pem, &key.serialize_pem())),
        TIMEOUT,
    );
    (device, enrolment)
}

/// Seeds the directory, uploads the region (timed) and enrols one device.
async fn setup<S: Store>(
    store: &S,
    base: &str,
    ca: &str,
    data: &Dataset,
    region: &RegionId,
    trust: &TrustCode,
    now: DateTime<Utc>,
) -> (Site, f64) {
    store
        .add_trust(trust.clone(), "Trust".into())
        .await
        .unwrap();
    store
        .add_region(region.clone(), "Region".into(), vec![])
        .await
        .unwrap();
    let mut uploads = Vec::new();
    for c in data
        .directory
        .councils
        .iter()
        .filter(|c| &c.region == region)
    {
        store.add_council(c.info()).await.unwrap();
        let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
        store
            .add_council_token(c.code.clone(), hash, now, None)
            .await
            .unwrap();
        let flags = data
            .flags_by_council
            .get(&c.code)
            .cloned()
            .unwrap_or_default();
        uploads.push((c.code.clone(), token, flags));
    }
    let http = common::client(ca, None, TIMEOUT);
    let started = Instant::now();
    for (code, token, flags) in &uploads {
        let r = http
            .post(format!(
                "{base}/v1/councils/{code}/uploads?allow_empty=true"
            ))
            .bearer_auth(token)
            .body(council_csv_bytes(flags))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let _: UploadReceipt = r.json().await.unwrap();
    }
    let upload_s = started.elapsed().as_secs_f64();
    let (et, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
    store
        .add_enrolment_token(
            NewEnrolmentToken {
                hash,
                trust: trust.clone(),
                region: region.clone(),
                uses: 1,
                expires_at: now + chrono::Duration::hours(1),
            },
            now,
        )
        .await
        .unwrap();
    let (device, enrolment) = enrol(base, ca, et).await;
    // The council with the most flags receives the notices.
    let (council, council_token, flags) =
        uploads.into_iter().max_by_key(|(_, _, f)| f.len()).unwrap();
    let site = Site {
        base: base.to_owned(),
        ca: ca.to_owned(),
        device,
        enrolment,
        council,
        council_token,
        subjects: flags.iter().map(|f| f.nhs_number).take(5_000).collect(),
    };
    (site, upload_s)
}

async fn snapshot_ms(site: &Site) -> f64 {
    let t = Instant::now();
    let r = site
        .device
        .get(format!("{}{}", site.base, paths::SNAPSHOT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    t.elapsed().as_secs_f64() * 1000.0
}

async fn polls_per_s(device: &reqwest::Client, base: &str) -> f64 {
    // One unmeasured second warms the connections and the database pool.
    polls_for(device, base, Duration::from_secs(1)).await;
    polls_for(device, base, Duration::from_secs(3)).await
}

async fn polls_for(device: &reqwest::Client, base: &str, duration: Duration) -> f64 {
    let polls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (device, polls) = (device.clone(), polls.clone());
        let url = format!("{base}{}", paths::CHECKPOINT);
        tasks.spawn(async move {
            while started.elapsed() < duration {
                let r = device.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                polls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    polls.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn event(site: &Site, rng: &mut rand::rngs::StdRng, now: DateTime<Utc>) -> AccessEvent {
    let flagged = rng.gen_bool(0.5);
    let subject = site.subjects[rng.gen_range(0..site.subjects.len())];
    AccessEvent {
        event_id: EventId::new(),
        accessed_at: now - chrono::Duration::seconds(rng.gen_range(1..86_400)),
        trust: site.enrolment.trust.clone(),
        device: site.enrolment.device_id,
        staff_id: Some(format!("P{:05}", rng.gen_range(0..50_000))),
        nhs_number: subject,
        result: if flagged {
            LookupResult::Flagged
        } else {
            LookupResult::NotFlagged
        },
        plan_types: if flagged { vec![PlanType::Cpp] } else { vec![] },
        councils: if flagged {
            vec![site.council.clone()]
        } else {
            vec![]
        },
        data_as_of: Some(now - chrono::Duration::hours(2)),
        freshness: Freshness::Fresh,
        setting: CareSetting::Ambulance,
        incident_ref: None,
        unscheduled: true,
    }
}

/// Sends `batches` batches of 100 events, 16 in flight, after 16 unmeasured ones (so the
/// connections, the database pool and its prepared statements are warm on either backend);
/// returns events per second.
async fn events_per_s(
    site: &Site,
    base: &str,
    batches: usize,
    rng: &mut rand::rngs::StdRng,
    now: DateTime<Utc>,
) -> f64 {
    send_batches(site, base, 16, rng, now).await;
    send_batches(site, base, batches, rng, now).await
}

async fn send_batches(
    site: &Site,
    base: &str,
    batches: usize,
    rng: &mut rand::rngs::StdRng,
    now: DateTime<Utc>,
) -> f64 {
    let all: Vec<Vec<AccessEvent>> = (0..batches)
        .map(|_| (0..100).map(|_| event(site, rng, now)).collect())
        .collect();
    let total: usize = all.iter().map(Vec::len).sum();
    let queue = Arc::new(std::sync::Mutex::new(all));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (device, queue) = (site.device.clone(), queue.clone());
        let url = format!("{base}{}", paths::EVENTS);
        tasks.spawn(async move {
            loop {
                let Some(events) = queue.lock().unwrap().pop() else {
                    return;
                };
                let n = events.len();
                let r = device
                    .post(&url)
                    .json(&EventBatch { events })
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let ack: EventUploadAck = r.json().await.unwrap();
                assert_eq!(ack.stored.len(), n);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Pages of 100 of the council's mailbox at random cursors: (p50, p99) in ms.
async fn listing(site: &Site, rng: &mut rand::rngs::StdRng) -> (f64, f64) {
    let http = common::client(&site.ca, None, TIMEOUT);
    let url = format!("{}/v1/councils/{}/notifications", site.base, site.council);
    // The cursors are opaque: page through once to collect them.
    let mut cursors: Vec<Option<String>> = vec![None];
    loop {
        let page_url = match cursors.last().unwrap() {
            Some(c) => format!("{url}?limit=100&after={c}"),
            None => format!("{url}?limit=100"),
        };
        let page: NotificationPage = http
            .get(page_url)
            .bearer_auth(&site.council_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match page.next {
            Some(next) => cursors.push(Some(next)),
            None => break,
        }
    }
    let mut times = Vec::new();
    for _ in 0..200 {
        let cursor = &cursors[rng.gen_range(0..cursors.len())];
        let page_url = match cursor {
            Some(c) => format!("{url}?limit=100&after={c}"),
            None => format!("{url}?limit=100"),
        };
        let t = Instant::now();
        let r = http
            .get(page_url)
            .bearer_auth(&site.council_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

async fn measure<S: Store>(
    store: &S,
    base: &str,
    ca: &str,
    data: &Dataset,
    region: &RegionId,
    trust: &TrustCode,
    now: DateTime<Utc>,
) -> (Figures, Site) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut f = Figures::default();
    let site;
    (site, f.upload_s) = setup(store, base, ca, data, region, trust, now).await;
    f.snapshot_build_ms = snapshot_ms(&site).await;
    f.snapshot_cached_ms = snapshot_ms(&site).await;
    f.polls_per_s = polls_per_s(&site.device, base).await;
    f.events_per_s = events_per_s(&site, base, 200, &mut rng, now).await;
    (f.list_p50_ms, f.list_p99_ms) = listing(&site, &mut rng).await;
    (f, site)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let as_of = NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
    let now = Utc.from_utc_datetime(&as_of.and_hms_opt(12, 0, 0).unwrap());
    println!("cpis-sync-server backends benchmark (seed {SEED}, {FLAGS} flags)");
    let fixture = FixtureConfig::new(SEED, as_of);
    let directory = cpis_fixtures::Directory::generate(&fixture).unwrap();
    let region = directory.regions[0].clone();
    let data = Dataset::generate_region(&fixture, &region.id, FLAGS).unwrap();
    let hostnames = ["localhost".to_owned()];

    // SQLite.
    let sqlite_dir = TempDir::new().unwrap();
    server::init(sqlite_dir.path(), &hostnames).unwrap();
    let clock = ManualClock::new(now);
    let handle = serve(sqlite_dir.path(), &clock).await;
    let ca = std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(sqlite_dir.path()))
        .unwrap();
    let base = format!("https://localhost:{}", handle.local_addr().port());
    let (sqlite, _) = measure(
        handle.store(),
        &base,
        &ca,
        &data,
        &region.id,
        &region.trust,
        now,
    )
    .await;
    handle.shutdown();
    handle.join().await.unwrap();

    // PostgreSQL: one replica, direct.
    let cluster = TempDir::new().unwrap();
    let admin_url = script("postgres-start.sh", &[cluster.path().to_str().unwrap()]);
    let _stop = Defer(Box::new({
        let dir = cluster.path().to_owned();
        move || {
            let _ = std::process::Command::new("bash")
                .arg(scripts().join("postgres-stop.sh"))
                .arg(&dir)
                .args(["--remove", "--mode", "immediate"])
                .output();
        }
    }));
    let url = cpis_sync_server::store::postgres::create_database(&admin_url, "cpis_bench")
        .await
        .unwrap();
    let pg_dir = TempDir::new().unwrap();
    server::init_with(pg_dir.path(), &hostnames, Some(&url))
        .await
        .unwrap();
    let handle = serve(pg_dir.path(), &clock).await;
    let ca =
        std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(pg_dir.path())).unwrap();
    let base = format!("https://localhost:{}", handle.local_addr().port());
    let (pg, site) = measure(
        handle.store(),
        &base,
        &ca,
        &data,
        &region.id,
        &region.trust,
        now,
    )
    .await;

    println!("\n1-5. per request, the same server on each backend (loopback, HTTPS)");
    println!("   measure                                   SQLite      PostgreSQL  PG / SQLite");
    let rows = [
        (
            "upload",
            "200k-flag region upload (s)",
            sqlite.upload_s,
            pg.upload_s,
            false,
        ),
        (
            "snapshot_build",
            "snapshot build, first GET (ms)",
            sqlite.snapshot_build_ms,
            pg.snapshot_build_ms,
            false,
        ),
        (
            "snapshot_cached",
            "snapshot from cache (ms)",
            sqlite.snapshot_cached_ms,
            pg.snapshot_cached_ms,
            false,
        ),
        (
            "polls",
            "checkpoint polls/s",
            sqlite.polls_per_s,
            pg.polls_per_s,
            true,
        ),
        (
            "events",
            "events stored/s",
            sqlite.events_per_s,
            pg.events_per_s,
            true,
        ),
        (
            "list_p50",
            "mailbox page of 100, p50 (ms)",
            sqlite.list_p50_ms,
            pg.list_p50_ms,
            false,
        ),
        (
            "list_p99",
            "mailbox page of 100, p99 (ms)",
            sqlite.list_p99_ms,
            pg.list_p99_ms,
            false,
        ),
    ];
    for (key, name, s, p, higher_better) in rows {
        // The ratio is always how many times slower PostgreSQL is (above 1: slower).
        let slower = if higher_better { s / p } else { p / s };
        println!("   {name:<42} {s:>10.1}  {p:>10.1}  {slower:>5.2}x");
        // Read by bench-workspace/benchmarks.sh.
        println!("RESULT backend_{key} sqlite={s:.2} postgres={p:.2} pg_slower_x={slower:.2}");
    }

    // One replica against three, behind HAProxy.
    let mut copies = Vec::new();
    let mut handles = vec![handle];
    for _ in 0..2 {
        let copy = TempDir::new().unwrap();
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", pg_dir.path().display()))
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(out.success());
        handles.push(serve(copy.path(), &clock).await);
        copies.push(copy);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + 1);
    println!("\n6. PostgreSQL behind HAProxy (TCP, TLS passed through), replicas in this process");
    println!("   replicas  polls/s   events/s");
    let mut one = (0.0, 0.0);
    for n in [1usize, 3] {
        let hap = TempDir::new().unwrap();
        let mut args = vec![hap.path().to_str().unwrap().to_owned()];
        args.extend(
            handles[..n]
                .iter()
                .map(|h| format!("127.0.0.1:{}", h.local_addr().port())),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let frontend = script("haproxy-start.sh", &args);
        let port = frontend.rsplit(':').next().unwrap();
        let base = format!("https://localhost:{port}");
        let polls = polls_per_s(&site.device, &base).await;
        let events = events_per_s(&site, &base, 200, &mut rng, now).await;
        script("haproxy-stop.sh", &[hap.path().to_str().unwrap()]);
        if n == 1 {
            one = (polls, events);
        }
        println!(
            "   {n:>8}  {polls:>7.0}  {events:>9.0}   ({:.2}x, {:.2}x of one replica)",
            polls / one.0,
            events / one.1
        );
        println!("RESULT replicas_{n} polls_per_s={polls:.0} events_per_s={events:.0}");
    }
    for h in handles {
        h.shutdown();
        h.join().await.unwrap();
    }
}

/// Runs its closure when dropped (stops the cluster however the run ends).
struct Defer(Box<dyn FnMut()>);

impl Drop for Defer {
    fn drop(&mut self) {
        (self.0)();
    }
}
