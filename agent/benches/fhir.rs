//! FHIR lookup benchmark (harness = false): `GET /cpis/FHIR/R4/CareTeam` against
//! `POST /v1/lookups` on the same agent, same data, same loopback HTTP client, interleaved in
//! one run. Both are the same recorded lookup (access event committed with fsync before the
//! answer); the FHIR one also parses the search and builds the Bundle. Goal: FHIR p99 at most
//! 1.5x the `/v1/lookups` p99.
//!
//! Run: `cargo bench -p cpis-agent --bench fhir` (`CPIS_BENCH_FLAGS` changes the number of
//! flags, default 20,000; `CPIS_BENCH_LOOKUPS` the lookups of each kind, default 2,000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cpis_agent::api::LocalApi;
use cpis_agent::{Agent, Clock, SystemClock};
use cpis_protocol::{KeyProtection, NhsNumber};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = env_or("CPIS_BENCH_FLAGS", 20_000);
    let lookups = env_or("CPIS_BENCH_LOOKUPS", 2_000);
    let region = common::region(n, 2026, Utc::now());
    let tmp = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let agent = Agent::create(
        &tmp.path().join("agent"),
        &region.enrolment,
        &common::no_tls(),
        KeyProtection::File,
        clock,
    )
    .unwrap();
    let vcp = agent.accept_checkpoint(&region.checkpoint).unwrap();
    agent
        .apply_snapshot(&vcp, &region.snapshot, &region.body)
        .unwrap();
    let mut subjects: Vec<NhsNumber> = region.flags.iter().map(|f| f.nhs_number).collect();
    subjects.dedup();
    println!(
        "FHIR benchmark: {} flags, {} subjects, {lookups} lookups of each kind over loopback HTTP/1.1",
        region.flags.len(),
        subjects.len()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let api = LocalApi::bind(Arc::new(agent), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let base = format!("http://{}", api.local_addr());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let v1 = |nhs: NhsNumber| {
            let http = http.clone();
            let url = format!("{base}/v1/lookups");
            async move {
                let t = Instant::now();
                let r = http
                    .post(url)
                    .json(&serde_json::json!({"nhs_number": nhs.to_string(), "staff_id": "B1"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let body = r.bytes().await.unwrap();
                (t.elapsed(), body.len())
            }
        };
        let fhir = |nhs: NhsNumber| {
            let http = http.clone();
            let url = format!(
                "{base}/cpis/FHIR/R4/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number%7C{nhs}"
            );
            async move {
                let t = Instant::now();
                let r = http
                    .get(url)
                    .header("IsUnscheduledAccessEvent", "true")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let body = r.bytes().await.unwrap();
                (t.elapsed(), body.len())
            }
        };
        // Warm up both, then interleave so neither gets a warmer machine.
        for i in 0..50 {
            v1(subjects[i % subjects.len()]).await;
            fhir(subjects[i % subjects.len()]).await;
        }
        let mut t_v1 = Vec::with_capacity(lookups);
        let mut t_fhir = Vec::with_capacity(lookups);
        let (mut b_v1, mut b_fhir) = (0, 0);
        for i in 0..lookups {
            let nhs = subjects[(i * 7919) % subjects.len()];
            let (t, b) = v1(nhs).await;
            t_v1.push(t);
            b_v1 += b;
            let (t, b) = fhir(nhs).await;
            t_fhir.push(t);
            b_fhir += b;
        }
        let (v50, v99) = (pct(&mut t_v1, 0.5), pct(&mut t_v1, 0.99));
        let (f50, f99) = (pct(&mut t_fhir, 0.5), pct(&mut t_fhir, 0.99));
        println!(
            "POST /v1/lookups:            p50 {:>8.1} µs  p99 {:>8.1} µs  {:>5} B an answer",
            us(v50),
            us(v99),
            b_v1 / lookups
        );
        println!(
            "GET /cpis/FHIR/R4/CareTeam:  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>5} B an answer  \
             ratio p50 {:.2}x  p99 {:.2}x",
            us(f50),
            us(f99),
            b_fhir / lookups,
            f50.as_secs_f64() / v50.as_secs_f64(),
            f99.as_secs_f64() / v99.as_secs_f64()
        );
        println!("target: FHIR p99 at most 1.5x the /v1/lookups p99 (same run)");
        println!(
            "RESULT fhir v1_p50_us={:.1} v1_p99_us={:.1} fhir_p50_us={:.1} fhir_p99_us={:.1}",
            us(v50),
            us(v99),
            us(f50),
            us(f99)
        );
        api.shutdown().await.unwrap();
    });
}
