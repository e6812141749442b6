//! Load shedding over real HTTPS: a device over its rate gets `429 rate_limited`, a saturated
//! server `503 overloaded`, each with `Retry-After`; `/healthz` and `/metrics` keep answering.

use std::sync::Arc;
use std::time::Duration;

use cpis_protocol::api::{ErrorBody, codes, paths};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::harness::{EM, Env, metric};

/// The `Retry-After` seconds of an answer (panics if absent or not a number).
fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get(reqwest::header::RETRY_AFTER)
        .unwrap_or_else(|| panic!("{} without Retry-After", r.status()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn error_code(r: reqwest::Response) -> String {
    r.json::<ErrorBody>().await.unwrap().error.code
}

#[tokio::test]
async fn a_device_over_its_rate_gets_429_with_retry_after_and_others_are_not_affected() {
    let env = Env::start_with(|c| {
        c.load_shedding.device_requests_per_minute = 2; // one every 30 s
        c.load_shedding.device_burst = 3;
    })
    .await;
    env.seed().await;
    let chatty = env.enrol(EM).await;
    let calm = env.enrol(EM).await;
    let get = |d: &crate::harness::Device| d.client.get(env.url(paths::CHECKPOINT)).send();
    for i in 0..3 {
        let r = get(&chatty).await.unwrap();
        assert_eq!(r.status(), 200, "request {i} of the burst");
    }
    let r = get(&chatty).await.unwrap();
    assert_eq!(r.status(), 429);
    let wait = retry_after(&r);
    assert!(
        (29..=30).contains(&wait),
        "Retry-After {wait}: the time until one request is back"
    );
    assert_eq!(error_code(r).await, codes::RATE_LIMITED);
    // Every device endpoint counts against the same bucket.
    let r = chatty
        .client
        .get(env.url(&format!("{}?from=0", paths::DELTA)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    // Another tablet, a council and the health check are not limited by it.
    assert_eq!(get(&calm).await.unwrap().status(), 200);
    let health = env.client().get(env.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let m = env.metrics().await;
    assert_eq!(
        metric(&m, "cpis_shed_requests_total{reason=\"rate_limited\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "cpis_shed_requests_total{reason=\"overloaded\"}"),
        None
    );
    env.stop().await;
}

#[tokio::test]
async fn the_per_device_limit_can_be_turned_off() {
    let env = Env::start_with(|c| {
        c.load_shedding.device_requests_per_minute = 0;
        c.load_shedding.device_burst = 1;
    })
    .await;
    env.seed().await;
    let d = env.enrol(EM).await;
    for _ in 0..20 {
        let r = d
            .client
            .get(env.url(paths::CHECKPOINT))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    env.stop().await;
}

/// A TLS connection (HTTP/1.1) that has sent a request's headers and part of its body: it
/// holds one request slot until dropped.
async fn hold_a_slot(env: &Env) -> TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(env.ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let port = env.handle.as_ref().unwrap().local_addr().port();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let head = "POST /v1/councils/E10000018/uploads HTTP/1.1\r\nHost: localhost\r\n\
                Content-Type: text/csv\r\nContent-Length: 100000\r\n\r\n\
                nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// Polls `/metrics` (never shed) until `cpis_requests_in_flight` is `n`; bounded.
async fn until_in_flight(env: &Env, n: f64) {
    for _ in 0..500 {
        if metric(&env.metrics().await, "cpis_requests_in_flight") == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} requests never in flight:\n{}", env.metrics().await);
}

#[tokio::test]
async fn a_saturated_server_answers_503_with_retry_after_while_healthz_and_metrics_answer() {
    let env = Env::start_with(|c| {
        c.max_concurrent_requests = 2;
        c.load_shedding.retry_after_max_secs = 30;
    })
    .await;
    env.seed().await;
    // A tablet the server has not served yet (one it is serving would wait for a slot: see
    // the next test).
    let d = env.enrol(EM).await;
    // Two uploads whose bodies never finish hold both slots.
    let held = vec![hold_a_slot(&env).await, hold_a_slot(&env).await];
    until_in_flight(&env, 2.0).await;

    let mut waits = Vec::new();
    for _ in 0..40 {
        let r = d
            .client
            .get(env.url(paths::CHECKPOINT))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        waits.push(retry_after(&r));
        assert_eq!(error_code(r).await, codes::OVERLOADED);
    }
    // Councils and enrolment are shed too; unknown paths as well (nothing is served).
    let council = env
        .client()
        .get(env.url("/v1/councils/E10000018/notifications"))
        .send()
        .await
        .unwrap();
    assert_eq!(council.status(), 503);
    assert!(retry_after(&council) >= 1);
    // Health and metrics stay outside the shedding.
    for _ in 0..5 {
        let h = env.client().get(env.url("/healthz")).send().await.unwrap();
        assert_eq!(h.status(), 200);
    }
    let m = env.metrics().await;
    assert_eq!(
        metric(&m, "cpis_shed_requests_total{reason=\"overloaded\"}"),
        Some(41.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "cpis_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"}"
        ),
        Some(5.0),
        "{m}"
    );
    // 40 turned away while 1 was admitted this second (the enrolment and first checkpoint may
    // fall in the window too): the retries are spread over several seconds, within the cap.
    eprintln!("Retry-After of 40 shed requests: {waits:?}");
    assert!(waits.iter().all(|w| (1..=30).contains(w)), "{waits:?}");
    assert!(
        waits.iter().any(|w| *w > 1),
        "a burst this much larger than what was admitted is spread: {waits:?}"
    );

    // The slots come back when the held requests end.
    drop(held);
    until_in_flight(&env, 0.0).await;
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn a_sync_under_way_waits_for_a_slot_while_new_devices_are_shed() {
    let env = Env::start_with(|c| c.max_concurrent_requests = 2).await;
    env.seed().await;
    let syncing = env.enrol(EM).await;
    let newcomer = env.enrol(EM).await;
    // The first request of a sync is admitted.
    let get = |d: &crate::harness::Device| d.client.get(env.url(paths::CHECKPOINT)).send();
    assert_eq!(get(&syncing).await.unwrap().status(), 200);
    let mut held = vec![hold_a_slot(&env).await, hold_a_slot(&env).await];
    until_in_flight(&env, 2.0).await;

    // A device the server is not serving yet is turned away at once.
    let r = get(&newcomer).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(retry_after(&r) >= 1);

    // The next request of the sync under way waits for a slot (freed 300 ms later) instead.
    let next = tokio::spawn({
        let client = syncing.client.clone();
        let url = env.url(&format!("{}?from=0", paths::DELTA));
        async move { client.get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held.pop());
    assert!(next.await.unwrap().is_success());
    drop(held);
    until_in_flight(&env, 0.0).await;
    env.stop().await;
}
