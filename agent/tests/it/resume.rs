//! HTTP Range resume on its own, against the real sync server: a loopback proxy cuts the
//! connection part way through a snapshot body; the next sync asks only for the remainder
//! (the proxy counts the bytes, the server counts a `206`), and the installed data verifies
//! and answers lookups.

use std::sync::{Arc, Mutex};

use chrono::{Duration, Utc};
use cpis_agent::{AgentError, LookupInput, ManualClock};
use cpis_protocol::LookupResult;

use crate::proxy::Proxy;
use crate::server::*;

const FLAGS: u32 = 30_000;
const BODY_ROUTE: &str = r#"route="/v1/device/snapshots/{epoch}/{version}""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_snapshot_resumes_from_where_it_stopped() {
    let now = Utc::now();
    let env = Env::start(now).await;
    let rows = random_rows(9, FLAGS as usize + 1, now.date_naive());
    let (unflagged, rows) = rows.split_last().unwrap();
    let numbers: Vec<_> = rows.iter().map(|r| r.0).collect();
    let rows: Vec<_> = rows
        .iter()
        .map(|(n, p, s, e)| (*n, *p, s.as_str(), e.as_str()))
        .collect();
    env.upload(LEICS, &rows).await;

    let proxy = Proxy::start(env.handle.local_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let agent = cpis_agent::sync::enrol(
        dir.path(),
        &proxy.base,
        &env.ca,
        &token,
        None,
        Arc::new(ManualClock::new(now)),
    )
    .await
    .unwrap();
    let (meta, _) = current_snapshot(&agent).await;
    let total = meta.body.len;
    // Big enough to cut with tens of KiB on either side (columns: about 4 B a flag here).
    assert!(
        total > 100_000,
        "the body is big enough to cut: {total} bytes"
    );
    let whole = || {
        metric(
            &env,
            "cpis_http_requests_total",
            &[BODY_ROUTE, r#"status="200""#],
        )
    };
    let ranged = || {
        metric(
            &env,
            "cpis_http_requests_total",
            &[BODY_ROUTE, r#"status="206""#],
        )
    };
    // (Fetching the body above was one whole-body request.)
    let (whole0, ranged0) = (whole().await, ranged().await);

    // First attempt: the connection drops after ~40% of the body's size has passed.
    let progress = Mutex::new(Vec::<u64>::new());
    let record = |done: u64, all: u64| {
        assert_eq!(all, total);
        progress.lock().unwrap().push(done);
    };
    proxy.cut_after(total * 2 / 5);
    let r = cpis_agent::sync::sync_once(&agent, &record).await;
    assert!(matches!(r, Err(AgentError::Net(_))), "{r:?}");
    assert!(proxy.cuts() > 0);
    let first = std::mem::take(&mut *progress.lock().unwrap());
    assert_eq!(
        first.first(),
        Some(&0),
        "the first attempt starts from zero"
    );
    let held = *first.last().unwrap();
    assert!(held > total / 4 && held < total / 2, "{held} of {total}");
    assert_eq!(agent.status().unwrap().version, None, "nothing installed");
    assert!(dir.path().join("downloads/snapshot.sealed").exists());
    assert_eq!(whole().await, whole0 + 1);

    // Second attempt: the network is back. It resumes at the byte the first one kept.
    proxy.heal();
    let before = proxy.served();
    let r = cpis_agent::sync::sync_once(&agent, &record).await.unwrap();
    assert_eq!(r.action, "snapshot");
    let second = std::mem::take(&mut *progress.lock().unwrap());
    assert_eq!(second.first(), Some(&held), "resumed from the bytes held");
    assert_eq!(second.last(), Some(&total));
    // Only the remainder crossed the network: the body's missing part plus TLS, headers,
    // the checkpoint and the signed metadata (a few KiB).
    let sent = proxy.served() - before;
    let remainder = total - held;
    eprintln!(
        "body {total} B, cut after {held} B; the resumed attempt moved {sent} B for {remainder} B"
    );
    assert!(
        sent >= remainder && sent < remainder + 16 * 1024,
        "second attempt moved {sent} bytes for a remainder of {remainder} (body {total})"
    );
    assert_eq!(
        ranged().await,
        ranged0 + 1,
        "the second body request was a Range request"
    );
    assert_eq!(whole().await, whole0 + 1, "no second whole-body request");

    // The installed data verified (a resumed body with a wrong byte would fail its digest)
    // and answers.
    let st = agent.status().unwrap();
    assert_eq!(st.version, Some(meta.version));
    assert_eq!(st.subjects, u64::from(FLAGS));
    assert!(!dir.path().join("downloads").exists());
    for n in [
        numbers[0],
        numbers[numbers.len() / 2],
        *numbers.last().unwrap(),
    ] {
        let a = agent
            .lookup(LookupInput {
                nhs_number: &n.to_string(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(a.result, LookupResult::Flagged, "{n}");
    }
    let miss = agent
        .lookup(LookupInput {
            nhs_number: &unflagged.0.to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(miss.result, LookupResult::NotFlagged);
}
