//! A sync with the tablet clock far ahead, against the real server: the checkpoint is
//! refused as expired (freeze protection judges its 24-hour lifetime by the tablet's clock)
//! with an error that names the likely cause, yet the pending access events still go to the
//! server over the same authenticated connection — notices do not wait on trust in the feed.
//! The data stays as it was, judged by real elapsed time (the boot clock), not wiped.

use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::{LookupInput, ManualClock};
use cpis_protocol::{Freshness, LookupResult};

use crate::server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_far_ahead_refuses_the_feed_but_still_sends_the_notices() {
    let now = Utc::now();
    let env = Env::start(now).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let clock = Arc::new(ManualClock::new(now));
    let agent =
        cpis_agent::sync::enrol(dir.path(), &env.base, &env.ca, &token, None, clock.clone())
            .await
            .unwrap();
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let subjects = agent.status().unwrap().subjects;
    assert!(subjects > 0);

    // Two real minutes later the tablet clock jumps 30 days ahead; two lookups are made.
    clock.advance(std::time::Duration::from_secs(120));
    clock.set_wall(now + Duration::days(30) + Duration::minutes(2));
    let ask = |n: u32| {
        agent
            .lookup(LookupInput {
                nhs_number: &nhs(n).to_string(),
                staff_id: Some("P1".into()),
                incident_ref: None,
            })
            .unwrap()
    };
    let hit = ask(0);
    let miss = ask(1);
    assert_eq!(
        (hit.result, hit.freshness, hit.data_age_secs),
        (LookupResult::Flagged, Freshness::Fresh, Some(120))
    );
    assert_eq!(miss.result, LookupResult::NotFlagged);
    assert!(hit.warnings.iter().any(|w| w.code == "clock_ahead"));
    assert_eq!(agent.outbox_counts().unwrap(), (2, 0));

    // The sync: the feed is refused, the error names the clock, the events are stored.
    let err = cpis_agent::sync::sync_feed_and_events(&agent, &|_, _| {})
        .await
        .unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(err));
    eprintln!("sync 30 days ahead: {text}");
    assert!(text.contains("checkpoint expired at"), "{text}");
    assert!(
        text.contains("the tablet clock looks 30 days ahead of the server's time"),
        "{text}"
    );
    assert_eq!(
        text.matches("the checkpoint expired at").count(),
        1,
        "printed once: {text}"
    );
    assert_eq!(agent.outbox_counts().unwrap(), (0, 0), "outbox emptied");
    let notices = env.mailbox(LEICS).await;
    assert!(
        notices.iter().any(|n| n.event_id == hit.event_id),
        "the flagged lookup's notice is at the council: {notices:?}"
    );
    // The data is as it was: same version, still fresh by real time.
    let st = agent.status().unwrap();
    assert_eq!(
        (st.version, st.subjects, st.freshness),
        (synced.version, subjects, Freshness::Fresh)
    );
    assert!(st.last_sync_error.unwrap().contains("checkpoint expired"));

    // The clock set right: the sync works and has nothing left to send.
    clock.set_wall(now + Duration::minutes(2));
    let again = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(again.events_sent, 0);
}
