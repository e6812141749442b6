//! Event ingest and mailbox benchmark; prints figures measured in this run:
//! 1. access events stored per second over mutual TLS (HTTP/2, loopback), durable commits
//!    (SQLite WAL, synchronous=FULL), batches of 1 (baseline), 100 and 500 events, from one
//!    tablet at a time and from 16 requests in flight; half the events are flagged (one
//!    notification each, plus recent contacts);
//! 2. council mailbox listing latency (p50/p99) with 100,000 notifications queued: over
//!    HTTPS (bearer token) and at the store, first page and pages at random cursors.
//!
//! Run with `cargo bench -p cpis-sync-server --bench events`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cpis_protocol::api::{EnrolRequest, EnrolResponse, UploadReceipt, paths};
use cpis_protocol::mailbox::{self, NotificationPage};
use cpis_protocol::{
    AccessEvent, CareSetting, CouncilCode, CouncilInfo, EventBatch, EventId, EventUploadAck,
    Freshness, LookupResult, NhsNumber, PlanType,
};
use cpis_sync_server::clock::ManualClock;
use cpis_sync_server::config::{Config, SheddingConfig};
use cpis_sync_server::server::{self, Server};
use cpis_sync_server::store::{NewEnrolmentToken, Store};
use cpis_sync_server::tokens;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

const SEED: u64 = 20_260_602;
/// Longest any one request may take.
const TIMEOUT: Duration = Duration::from_secs(120);
const COUNCIL: &str = "E10000018";
const OTHER: &str = "E10000024";
/// Flagged subjects (the council's flags).
const SUBJECTS: u32 = 1000;
const QUEUED: usize = 100_000;

/// The n-th valid 999-prefixed NHS number.
fn nhs(n: u32) -> NhsNumber {
    let mut k = 0;
    let mut i = 0u32;
    loop {
        let d = format!("{i:06}");
        let mut nine = [9u8, 9, 9, 0, 0, 0, 0, 0, 0];
        for (j, c) in d.bytes().enumerate() {
            nine[3 + j] = c - b'0';
        }
        if let Some(num) = NhsNumber::complete(nine) {
            if k == n {
                return num;
            }
            k += 1;
        }
        i += 1;
    }
}

struct Events {
    numbers: Vec<NhsNumber>,
    enrolment: EnrolResponse,
    now: DateTime<Utc>,
    council: CouncilCode,
}

impl Events {
    /// An event; flagged (by the council) when `flagged`.
    fn make(&self, rng: &mut rand::rngs::StdRng, flagged: bool) -> AccessEvent {
        let subject = self.numbers[rng.gen_range(0..self.numbers.len())];
        AccessEvent {
            event_id: EventId::new(),
            accessed_at: self.now - chrono::Duration::seconds(rng.gen_range(1..86_400)),
            trust: self.enrolment.trust.clone(),
            device: self.enrolment.device_id,
            staff_id: Some(format!("P{:05}", rng.gen_range(0..50_000))),
            nhs_number: if flagged { subject } else { nhs(SUBJECTS + 1) },
            result: if flagged {
                LookupResult::Flagged
            } else {
                LookupResult::NotFlagged
            },
            plan_types: if flagged { vec![PlanType::Cpp] } else { vec![] },
            councils: if flagged {
                vec![self.council.clone()]
            } else {
                vec![]
            },
            data_as_of: Some(self.now - chrono::Duration::hours(2)),
            freshness: Freshness::Fresh,
            setting: CareSetting::Ambulance,
            incident_ref: Some(format!("INC-{}", rng.gen_range(0..1_000_000))),
            unscheduled: true,
        }
    }

    fn batches(
        &self,
        rng: &mut rand::rngs::StdRng,
        count: usize,
        size: usize,
        flagged_share: f64,
    ) -> Vec<Vec<AccessEvent>> {
        (0..count)
            .map(|_| {
                (0..size)
                    .map(|_| {
                        let flagged = rng.gen_bool(flagged_share);
                        self.make(rng, flagged)
                    })
                    .collect()
            })
            .collect()
    }
}

async fn post(device: &reqwest::Client, url: &str, events: Vec<AccessEvent>) {
    let n = events.len();
    let r = device
        .post(url)
        .json(&EventBatch { events })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ack: EventUploadAck = r.json().await.unwrap();
    assert_eq!(ack.stored.len(), n);
}

/// Sends the batches with `in_flight` requests at a time; returns events per second.
async fn ingest(
    device: &reqwest::Client,
    url: &str,
    batches: Vec<Vec<AccessEvent>>,
    in_flight: usize,
) -> (usize, Duration) {
    let total: usize = batches.iter().map(Vec::len).sum();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (device, url, queue) = (device.clone(), url.to_owned(), queue.clone());
        tasks.spawn(async move {
            loop {
                let Some(batch) = queue.lock().unwrap().pop() else {
                    return;
                };
                post(&device, &url, batch).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (total, started.elapsed())
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    (at(0.50), at(0.99), at(1.0))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let now: DateTime<Utc> = "2026-06-01T12:00:00Z".parse().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    println!("cpis-sync-server event benchmark (seed {SEED})");

    let dir = tempfile::TempDir::new().unwrap();
    server::init(dir.path(), &["localhost".into()]).unwrap();
    let clock = ManualClock::new(now);
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrent_requests: 100_000,
        // One enrolled device stands for a fleet here: the per-device rate limit (429) is off.
        load_shedding: SheddingConfig {
            device_requests_per_minute: 0,
            ..SheddingConfig::default()
        },
        ..Config::default()
    };
    let handle = Server::bind(dir.path(), config, Arc::new(clock.clone()))
        .await
        .unwrap();
    let store = handle.store().clone();
    let ca = std::fs::read_to_string(cpis_sync_server::pki::Pki::ca_cert_path(dir.path())).unwrap();
    let base = format!("https://localhost:{}", handle.local_addr().port());
    store
        .add_trust("RX9".parse().unwrap(), "East Midlands Ambulance".into())
        .await
        .unwrap();
    store
        .add_region("EM".parse().unwrap(), "East Midlands".into(), vec![])
        .await
        .unwrap();
    for code in [COUNCIL, OTHER] {
        store
            .add_council(CouncilInfo {
                code: code.parse().unwrap(),
                name: format!("Council {code}"),
                region: "EM".parse().unwrap(),
                emergency_phone: "0116 000 0000".into(),
                office_phone: None,
            })
            .await
            .unwrap();
    }
    let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
    store
        .add_council_token(COUNCIL.parse().unwrap(), hash, now, None)
        .await
        .unwrap();
    let numbers: Vec<NhsNumber> = (0..SUBJECTS).map(nhs).collect();
    let mut csv = String::from("nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n");
    for n in &numbers {
        csv.push_str(&format!("{n},CPP,2025-01-01,,,\n"));
    }
    let http = common::client(&ca, None, TIMEOUT);
    let r = http
        .post(format!("{base}/v1/councils/{COUNCIL}/uploads"))
        .bearer_auth(&token)
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _: UploadReceipt = r.json().await.unwrap();

    let (et, et_hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
    store
        .add_enrolment_token(
            NewEnrolmentToken {
                hash: et_hash,
                trust: "RX9".parse().unwrap(),
                region: "EM".parse().unwrap(),
                uses: 1,
                expires_at: now + chrono::Duration::hours(1),
            },
            now,
        )
        .await
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let enrolment: EnrolResponse = http
        .post(format!("{base}{}", paths::ENROL))
        .json(&EnrolRequest {
            token: et,
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
        &ca,
        Some((&enrolment.client_cert_pem, &key.serialize_pem())),
        TIMEOUT,
    );
    let events = Events {
        numbers,
        enrolment,
        now,
        council: COUNCIL.parse().unwrap(),
    };
    let url = format!("{base}{}", paths::EVENTS);

    // ---- 1. ingest -----------------------------------------------------------------------
    println!(
        "\n1. event ingest, mutual TLS, HTTP/2, loopback; durable commit before each answer; 50% flagged"
    );
    println!("   batch  in flight  events   time       events/s");
    for (size, count, in_flight) in [
        (1, 1_000, 1),
        (1, 4_000, 16),
        (100, 100, 1),
        (100, 400, 16),
        (500, 40, 1),
        (500, 80, 16),
    ] {
        let batches = events.batches(&mut rng, count, size, 0.5);
        let (n, time) = ingest(&device, &url, batches, in_flight).await;
        println!(
            "   {size:>5}  {in_flight:>9}  {n:>6}   {:>6.2} s   {:>9.0}",
            time.as_secs_f64(),
            n as f64 / time.as_secs_f64()
        );
        println!(
            "RESULT ingest_b{size}_f{in_flight} events_per_s={:.0} events={n} seconds={:.3}",
            n as f64 / time.as_secs_f64(),
            time.as_secs_f64()
        );
    }

    // ---- 2. mailbox with 100k queued ------------------------------------------------------
    let pending = store
        .mailbox_stats(now - chrono::Duration::days(5))
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.council.as_str() == COUNCIL)
        .unwrap()
        .pending as usize;
    let more = QUEUED.saturating_sub(pending).div_ceil(500);
    let batches = events.batches(&mut rng, more, 500, 1.0);
    let (n, time) = ingest(&device, &url, batches, 16).await;
    println!(
        "\n   (filling the mailbox: {n} flagged events in {:.2} s = {:.0} events/s)",
        time.as_secs_f64(),
        n as f64 / time.as_secs_f64()
    );
    let council: CouncilCode = COUNCIL.parse().unwrap();
    let queued = store
        .mailbox_stats(now - chrono::Duration::days(5))
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.council == council)
        .unwrap()
        .pending;
    println!(
        "\n2. mailbox listing with {queued} notifications queued for one council ({SUBJECTS} subjects, 25 contacts each)"
    );

    // Walk the whole mailbox once, keeping every cursor.
    let list_url = format!("{base}{}", mailbox::notifications_path(COUNCIL));
    let mut cursors = Vec::new();
    let mut after: Option<String> = None;
    let walk = Instant::now();
    let mut walked = 0usize;
    loop {
        let url = match &after {
            Some(a) => format!("{list_url}?limit=1000&after={a}"),
            None => format!("{list_url}?limit=1000"),
        };
        let page: NotificationPage = http
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        walked += page.notifications.len();
        match page.next {
            Some(n) => {
                cursors.push(n.clone());
                after = Some(n);
            }
            None => break,
        }
    }
    let walk = walk.elapsed();
    assert_eq!(walked as u64, queued);
    println!(
        "   whole mailbox in pages of 1000: {:.2} s ({} pages, {:.1} ms/page)",
        walk.as_secs_f64(),
        cursors.len() + 1,
        walk.as_secs_f64() * 1000.0 / (cursors.len() + 1) as f64
    );
    println!("   HTTPS, bearer token          requests   p50       p99       max");
    for (what, limit, random) in [
        ("first page, limit 100 ", 100u32, false),
        ("random page, limit 100", 100, true),
        ("first page, limit 1000", 1000, false),
        ("random page, limit 1000", 1000, true),
    ] {
        let mut times = Vec::new();
        for _ in 0..200 {
            let url = if random {
                let c = cursors.choose(&mut rng).unwrap();
                format!("{list_url}?limit={limit}&after={c}")
            } else {
                format!("{list_url}?limit={limit}")
            };
            let t = Instant::now();
            let r = http.get(url).bearer_auth(&token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            times.push(t.elapsed());
        }
        let (p50, p99, max) = percentiles(times);
        println!(
            "   {what:<28} {:>8}   {p50:>5.2} ms  {p99:>5.2} ms  {max:>5.2} ms",
            200
        );
        println!(
            "RESULT mailbox_{}_{limit} p50_ms={p50:.3} p99_ms={p99:.3} queued={queued}",
            if random { "random" } else { "first" }
        );
    }
    let mut times = Vec::new();
    for _ in 0..200 {
        let after = rng.gen_range(0..queued);
        let t = Instant::now();
        let page = store
            .list_notifications(council.clone(), after, 100, now)
            .await
            .unwrap();
        times.push(t.elapsed());
        assert!(!page.is_empty());
    }
    let (p50, p99, max) = percentiles(times);
    println!(
        "   store only, limit 100            200   {p50:>5.2} ms  {p99:>5.2} ms  {max:>5.2} ms"
    );
    println!("RESULT mailbox_store_100 p50_ms={p50:.3} p99_ms={p99:.3} queued={queued}");
    handle.shutdown();
    handle.join().await.unwrap();
}
