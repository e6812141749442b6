//! Load shedding over real HTTPS: a device over its rate gets `429 rate_limited`, a saturated
//! server `503 overloaded`, each with `Retry-After`; `/healthz` and `/metrics` keep answering.
//! Requests without a known credential have a pool of their own and can never take a
//! tablet's or a council's slot; an upload is authenticated before its body is read; slow
//! requests end with `408` and slow headers with a closed connection; online confirmation
//! has its own per-device limit.

use std::sync::Arc;
use std::time::Duration;

use cpis_protocol::api::{ErrorBody, codes, paths};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::harness::{EM, Env, LEICS, metric};

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

/// A TLS connection (HTTP/1.1) to the server, with no client certificate.
async fn connect(env: &Env) -> TlsStream<TcpStream> {
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
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A council upload (with the council's valid token) that has sent its headers and part of
/// its body: it holds one request slot until dropped (or the request timeout).
async fn hold_a_slot(env: &Env) -> TlsStream<TcpStream> {
    let token = env.council_token(LEICS).await;
    send_partial_upload(env, Some(&token)).await
}

/// An upload's headers and the first line of a 100,000-byte body, then nothing.
async fn send_partial_upload(env: &Env, token: Option<&str>) -> TlsStream<TcpStream> {
    let mut tls = connect(env).await;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST /v1/councils/{LEICS}/uploads HTTP/1.1\r\nHost: localhost\r\n{auth}\
         Content-Type: text/csv\r\nContent-Length: 100000\r\n\r\n\
         nhs_number,plan_type,start_date,end_date,date_of_birth,local_id\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// An enrolment (no credential) whose JSON body never finishes: it holds an anonymous slot.
async fn hold_an_anonymous_slot(env: &Env) -> TlsStream<TcpStream> {
    let mut tls = connect(env).await;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 5000\r\n\r\n{{\"token\":",
        paths::ENROL
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

/// The status of the first response read from `tls` within `within`; `None` when the server
/// closed the connection without answering.
async fn read_status(tls: &mut TlsStream<TcpStream>, within: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(within, async {
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer and no close within {within:?}");
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .map(|code| code.parse().unwrap())
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
    // A signed-in council is shed too (its requests share the tablets' slots).
    let token = env.council_token(LEICS).await;
    let council = env
        .client()
        .get(env.url("/v1/councils/E10000018/notifications"))
        .bearer_auth(&token)
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

#[tokio::test]
async fn anonymous_requests_have_their_own_pool_and_never_take_a_tablets_or_councils_slot() {
    let env = Env::start_with(|c| {
        c.max_concurrent_requests = 2;
        c.load_shedding.anonymous_concurrent_requests = 2;
    })
    .await;
    env.seed().await;
    let d = env.enrol(EM).await;
    let token = env.council_token(LEICS).await;
    // A council signed in to its inbox page before the pool fills.
    let mut inbox = crate::pages::Browser::new(&env);
    assert_eq!(inbox.sign_in("/council", &token).await.status, 303);
    // Two enrolments whose bodies never come hold the whole anonymous pool.
    let held = vec![
        hold_an_anonymous_slot(&env).await,
        hold_an_anonymous_slot(&env).await,
    ];
    for _ in 0..500 {
        if metric(&env.metrics().await, "cpis_anonymous_requests_in_flight") == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // More anonymous requests (the sign-in page, a bad token) are shed at once ...
    let page = env.client().get(env.url("/council")).send().await.unwrap();
    assert_eq!(page.status(), 503);
    assert!(retry_after(&page) >= 1);
    let bad = env
        .client()
        .get(env.url("/v1/councils/E10000018/notifications"))
        .bearer_auth("cpis_ct_not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 503);
    // ... while the tablet and the council are served as usual.
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listing = env
        .client()
        .get(env.url("/v1/councils/E10000018/notifications"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status(), 200);
    // A signed-in page session counts as a known credential too.
    assert_eq!(inbox.get("/council/inbox").await.status, 200);
    let m = env.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cpis_shed_requests_total{reason=\"anonymous_overloaded\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(metric(&m, "cpis_requests_in_flight"), Some(0.0), "{m}");
    drop(held);
    env.stop().await;
}

#[tokio::test]
async fn an_upload_without_a_valid_token_is_refused_before_its_body_is_read() {
    let env = Env::start().await;
    env.seed().await;
    // Headers promise 100,000 bytes that never come: the answer comes at once all the same.
    let mut anonymous = send_partial_upload(&env, None).await;
    assert_eq!(
        read_status(&mut anonymous, Duration::from_secs(5)).await,
        Some(401)
    );
    let mut bad = send_partial_upload(&env, Some("cpis_ct_wrong")).await;
    assert_eq!(
        read_status(&mut bad, Duration::from_secs(5)).await,
        Some(401)
    );
    env.stop().await;
}

#[tokio::test]
async fn a_trickled_body_ends_with_408_and_gives_its_slot_back() {
    let env = Env::start_with(|c| {
        c.max_concurrent_requests = 1;
        c.request_timeout_secs = 1;
    })
    .await;
    env.seed().await;
    let mut held = hold_a_slot(&env).await;
    until_in_flight(&env, 1.0).await;
    assert_eq!(
        read_status(&mut held, Duration::from_secs(10)).await,
        Some(408)
    );
    until_in_flight(&env, 0.0).await;
    let d = env.enrol(EM).await;
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        metric(&env.metrics().await, "cpis_request_timeouts_total"),
        Some(1.0)
    );
    env.stop().await;
}

#[tokio::test]
async fn headers_never_finished_are_cut_off_by_the_header_timeout() {
    let env = Env::start_with(|c| c.header_read_timeout_secs = 1).await;
    let mut tls = connect(&env).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Closed (hyper may answer 408 first) well before the default 10 s.
    let status = read_status(&mut tls, Duration::from_secs(5)).await;
    assert!(matches!(status, None | Some(408)), "{status:?}");
    env.stop().await;
}

#[tokio::test]
async fn online_confirmation_has_its_own_small_per_device_limit() {
    let env = Env::start_with(|c| {
        c.load_shedding.confirm_per_device_per_minute = 2;
        c.load_shedding.confirm_burst = 2;
    })
    .await;
    env.seed().await;
    let d = env.enrol(EM).await;
    let other = env.enrol(EM).await;
    let confirm = |dev: &crate::harness::Device| {
        let event = dev.event(0, crate::harness::t0(), &[], &[]);
        dev.client
            .post(env.url(cpis_protocol::confirm::PATH))
            .json(&cpis_protocol::confirm::ConfirmRequest { event })
            .send()
    };
    for i in 0..2 {
        assert_eq!(confirm(&d).await.unwrap().status(), 200, "confirmation {i}");
    }
    let r = confirm(&d).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!((29..=30).contains(&retry_after(&r)), "one back every 30 s");
    assert_eq!(error_code(r).await, codes::RATE_LIMITED);
    // Its other requests, and other tablets' confirmations, are not held back by it.
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(confirm(&other).await.unwrap().status(), 200);
    let m = env.metrics().await;
    assert_eq!(
        metric(&m, "cpis_online_confirmations_refused_total"),
        Some(1.0),
        "{m}"
    );
    env.stop().await;
}
