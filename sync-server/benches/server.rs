//! Server benchmark; prints figures measured in this run:
//! 1. reconcile a 20k-row council file (HTTPS upload end to end, and its parts);
//! 2. build, compress and sign a 200k-flag region snapshot, bytes per flag against gzip of
//!    the same flags as CSV;
//! 3. no-change checkpoint polls per second on loopback (HTTPS, mutual TLS).
//!
//! Run with `cargo bench -p cpis-sync-server --bench server`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, TimeZone as _, Utc};
use cpis_fixtures::{Config as FixtureConfig, Dataset, Directory, council_csv_bytes};
use cpis_protocol::api::{EnrolRequest, EnrolResponse, UploadReceipt, paths};
use cpis_protocol::{BODY_FORMAT, COLUMNS_FORMAT, FlagRecord, SigningKey};
use cpis_sync_server::clock::ManualClock;
use cpis_sync_server::config::{Config, SheddingConfig};
use cpis_sync_server::feed::build_snapshot;
use cpis_sync_server::server::{self, Server};
use cpis_sync_server::store::{NewEnrolmentToken, RegionHead, RegionSnapshot, Store};
use cpis_sync_server::tokens;
use cpis_sync_server::upload::{self, UploadOptions};

const SEED: u64 = 20_260_601;
/// Longest any one request may take.
const TIMEOUT: Duration = Duration::from_secs(60);

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
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
    println!("cpis-sync-server benchmark (seed {SEED}, as of {as_of})");

    // ---- 1. a 20k-row council file -------------------------------------------------------
    let fixture = FixtureConfig::new(SEED, as_of);
    let directory = Directory::generate(&fixture).unwrap();
    let council = directory.councils[0].clone();
    let region = directory.region(&council.region).unwrap().clone();
    let data = Dataset::generate_council(&fixture, &council.code, 20_000).unwrap();
    let flags: Vec<FlagRecord> = data.flags_by_council[&council.code].clone();
    let csv_body = council_csv_bytes(&flags);

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
        .add_trust(region.trust.clone(), "Trust".into())
        .await
        .unwrap();
    store
        .add_region(region.id.clone(), region.name.clone(), vec![])
        .await
        .unwrap();
    store.add_council(council.info()).await.unwrap();
    let (token, hash) = tokens::new_secret(tokens::COUNCIL_PREFIX);
    store
        .add_council_token(council.code.clone(), hash, now, None)
        .await
        .unwrap();

    let t = Instant::now();
    let parsed = upload::parse(&council.code, &csv_body, as_of, UploadOptions::default()).unwrap();
    let parse_time = t.elapsed();
    assert_eq!(parsed.len(), 20_000);

    let http = common::client(&ca, None, TIMEOUT);
    let url = format!("{base}/v1/councils/{}/uploads", council.code);
    let upload = |body: Vec<u8>| {
        let http = http.clone();
        let url = url.clone();
        let token = token.clone();
        async move {
            let t = Instant::now();
            let r = http
                .post(url)
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let receipt: UploadReceipt = r.json().await.unwrap();
            (t.elapsed(), receipt)
        }
    };
    let (first, r1) = upload(csv_body.clone()).await;
    let (same, r2) = upload(csv_body.clone()).await;
    // A typical day: 1% of plans end, 1% are new, 0.5% vanish.
    let mut next = flags.clone();
    for f in next.iter_mut().take(200) {
        if f.end_date.is_none() {
            f.end_date = Some(as_of);
        }
    }
    next.truncate(next.len() - 100);
    let mut seen: std::collections::HashSet<_> = next.iter().map(FlagRecord::key).collect();
    for f in flags.iter().skip(1000).take(200) {
        let mut new = f.clone();
        new.plan_type = match f.plan_type {
            cpis_protocol::PlanType::Cpp => cpis_protocol::PlanType::Lac,
            _ => cpis_protocol::PlanType::Cpp,
        };
        new.end_date = None;
        if seen.insert(new.key()) {
            next.push(new);
        }
    }
    next.sort();
    let (day2, r3) = upload(council_csv_bytes(&next)).await;
    println!(
        "\n1. council upload, 20,000 rows ({} KiB CSV)",
        csv_body.len() / 1024
    );
    println!(
        "   parse + validate whole file:          {}",
        ms(parse_time)
    );
    println!(
        "   HTTPS upload, first (20k added):       {}  (version {})",
        ms(first),
        r1.version
    );
    println!(
        "   HTTPS upload, same file (unchanged):   {}  (unchanged {}, version {})",
        ms(same),
        r2.counts.unchanged,
        r2.version
    );
    println!(
        "   HTTPS upload, next day (+{} ~{} -{}):  {}",
        r3.counts.added,
        r3.counts.ended + r3.counts.updated,
        r3.counts.removed,
        ms(day2)
    );
    let ms_f = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "RESULT upload rows={} csv_bytes={} parse_ms={:.1} first_ms={:.1} same_ms={:.1} next_ms={:.1}",
        parsed.len(),
        csv_body.len(),
        ms_f(parse_time),
        ms_f(first),
        ms_f(same),
        ms_f(day2)
    );

    // ---- 3. no-change checkpoint polls -----------------------------------------------------
    let (et, et_hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
    store
        .add_enrolment_token(
            NewEnrolmentToken {
                hash: et_hash,
                trust: region.trust.clone(),
                region: region.id.clone(),
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
    let key_pem = key.serialize_pem();
    let polls = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs(3);
    let connections = 4;
    let per_connection = 16;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let device = common::client(&ca, Some((&enrolment.client_cert_pem, &key_pem)), TIMEOUT);
        for _ in 0..per_connection {
            let device = device.clone();
            let url = format!("{base}{}", paths::CHECKPOINT);
            let polls = polls.clone();
            tasks.spawn(async move {
                while started.elapsed() < duration {
                    let r = device.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let elapsed = started.elapsed();
    let n = polls.load(Ordering::Relaxed);
    println!(
        "\n3. no-change checkpoint polls (mutual TLS, HTTP/2, {} connections x {} in flight, loopback)",
        connections, per_connection
    );
    println!(
        "   {n} polls in {:.2} s = {:.0} polls/s (device lookup + region head + Ed25519 signature each)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "RESULT polls_h2 polls_per_s={:.0} connections={connections} in_flight={per_connection}",
        n as f64 / elapsed.as_secs_f64()
    );
    handle.shutdown();
    handle.join().await.unwrap();

    // ---- 2. a 200k-flag region snapshot ----------------------------------------------------
    let region_data = Dataset::generate_region(&fixture, &region.id, 200_000).unwrap();
    let mut region_flags: Vec<FlagRecord> = region_data.flags().cloned().collect();
    region_flags.sort();
    let councils: Vec<_> = region_data
        .directory
        .councils
        .iter()
        .filter(|c| c.region == region.id)
        .map(|c| c.info())
        .collect();
    let head = RegionHead {
        region: region.id.clone(),
        epoch: 1,
        version: 200_000,
        floor: 0,
        councils,
    };
    let signing = SigningKey::from_bytes(&[7; 32]);
    let mut csv_all = Vec::new();
    for flags in region_data.flags_by_council.values() {
        csv_all.extend_from_slice(&council_csv_bytes(flags));
    }
    let t = Instant::now();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&csv_all).unwrap();
    let gzipped = gz.finish().unwrap();
    let gzip_time = t.elapsed();
    let count = region_flags.len() as f64;
    println!(
        "\n2. region snapshot, {} flags in {} councils",
        region_flags.len(),
        head.councils.len()
    );
    println!(
        "   CSV {:.1} B/flag; gzip -6 of the CSV: {:.2} B/flag ({})",
        csv_all.len() as f64 / count,
        gzipped.len() as f64 / count,
        ms(gzip_time)
    );
    println!(
        "RESULT snapshot_gzip flags={} csv_bytes={} gzip_bytes={} gzip_ms={:.1}",
        region_flags.len(),
        csv_all.len(),
        gzipped.len(),
        gzip_time.as_secs_f64() * 1000.0
    );
    // Rows: what tablets from before the columnar body get (RESULT snapshot_zstdN); columns:
    // what tablets of this version get (RESULT snapshot_columns_zstdN).
    for (format, what, result) in [
        (BODY_FORMAT, "rows", "snapshot_zstd"),
        (COLUMNS_FORMAT, "columns", "snapshot_columns_zstd"),
    ] {
        for level in [3, 9, 19] {
            let t = Instant::now();
            let snapshot = RegionSnapshot {
                head: head.clone(),
                flags: region_flags.clone(),
                contacts: vec![],
            };
            let built = build_snapshot(&signing, level, format, snapshot, now).unwrap();
            let time = t.elapsed();
            let per = built.body.len() as f64 / count;
            println!(
                "   {what:>7}, zstd {level:>2} + sign: {:>9}  {:.2} B/flag ({} bytes; {:.2}x smaller than gzip CSV)",
                ms(time),
                per,
                built.body.len(),
                gzipped.len() as f64 / built.body.len() as f64
            );
            println!(
                "RESULT {result}{level} bytes={} ms={:.1}",
                built.body.len(),
                time.as_secs_f64() * 1000.0
            );
        }
    }
    println!("   (the server's default zstd level is 9; see server.toml zstd_level)");
}
