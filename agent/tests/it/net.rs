//! End to end against the real sync server: enrolment (and its clear errors), snapshot,
//! lookups, event upload, delta.

use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::net::NetError;
use cpis_agent::{Agent, AgentError, Clock, LookupInput, ManualClock};
use cpis_protocol::{Freshness, LookupResult};

use crate::server::*;

fn clock_at(now: chrono::DateTime<Utc>) -> Arc<dyn Clock> {
    Arc::new(ManualClock::new(now))
}

fn net_err<T: std::fmt::Debug>(r: Result<T, AgentError>) -> NetError {
    match r {
        Err(AgentError::Net(e)) => e,
        other => panic!("expected a network error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_errors_are_clear() {
    let now = Utc::now();
    let env = Env::start(now).await;
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("state");
    let enrol = |ca: String, token: String| {
        let sd = sd.clone();
        let base = env.base.clone();
        async move { cpis_agent::sync::enrol(&sd, &base, &ca, &token, None, clock_at(now)).await }
    };
    // Unknown token.
    let e = net_err(enrol(env.ca.clone(), "cpis_et_nonsense".into()).await);
    assert!(matches!(e, NetError::TokenUnknown(_)), "{e}");
    // Expired token.
    let expired = env.enrolment_token(1, Duration::hours(-1)).await;
    let e = net_err(enrol(env.ca.clone(), expired).await);
    assert!(matches!(e, NetError::TokenExpired(_)), "{e}");
    // Another CA than the one that issued the server's certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = params.self_signed(&key).unwrap().pem();
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let e = net_err(enrol(other_ca, token.clone()).await);
    assert!(matches!(e, NetError::Tls { .. }), "{e}");
    // Nothing was written by the failures.
    assert!(!sd.join("enrolment.sealed").exists());
    // Unreachable server.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = net_err(
        cpis_agent::sync::enrol(
            &sd,
            &format!("https://127.0.0.1:{port}"),
            &env.ca,
            &token,
            None,
            clock_at(now),
        )
        .await,
    );
    assert!(matches!(e, NetError::Unreachable { .. }), "{e}");
    // The good token works once, then is used up.
    cpis_agent::sync::enrol(
        &sd,
        &env.base,
        &env.ca,
        &token,
        Some("t1".into()),
        clock_at(now),
    )
    .await
    .unwrap();
    let sd2 = dir.path().join("state2");
    let e = net_err(
        cpis_agent::sync::enrol(&sd2, &env.base, &env.ca, &token, None, clock_at(now)).await,
    );
    assert!(matches!(e, NetError::TokenUsedUp(_)), "{e}");
    // Enrolling over an enrolled directory is refused.
    let again = env.enrolment_token(1, Duration::hours(1)).await;
    assert!(matches!(
        cpis_agent::sync::enrol(&sd, &env.base, &env.ca, &again, None, clock_at(now)).await,
        Err(AgentError::AlreadyEnrolled(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_sync_lookup_delta_and_events() {
    let now = Utc::now();
    let env = Env::start(now).await;
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2025-03-01", "2026-02-01"),
        ],
    )
    .await;
    env.upload(NOTTS, &[(nhs(2), "UCPP", "2026-05-05", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(now));
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let agent: Agent =
        cpis_agent::sync::enrol(dir.path(), &env.base, &env.ca, &token, None, clock.clone())
            .await
            .unwrap();
    assert_eq!(agent.enrolment().region.as_str(), REGION);

    let r = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.action, "snapshot");
    let look = |n: cpis_protocol::NhsNumber| {
        agent
            .lookup(LookupInput {
                nhs_number: &n.spaced(),
                staff_id: Some("P1".into()),
                incident_ref: None,
            })
            .unwrap()
    };
    let hit = look(nhs(0));
    assert_eq!(hit.result, LookupResult::Flagged);
    assert_eq!(hit.freshness, Freshness::Fresh);
    assert_eq!(hit.flags[0].council.name, "Leicestershire Test Council");
    assert_eq!(hit.flags[0].council.emergency_phone, "0116 496 0000");
    assert_eq!(
        look(nhs(2)).flags[0].plan_type,
        cpis_protocol::PlanType::Ucpp
    );
    assert_eq!(look(nhs(7)).result, LookupResult::NotFlagged);
    assert_eq!(hit.coverage.councils.len(), 2);

    // Nothing changed: one checkpoint, and the three events are delivered.
    let r = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.action, "up_to_date");
    // Events the server stored leave the outbox; the rest stay (never dropped).
    assert_eq!(agent.status().unwrap().outbox_pending, 3 - r.events_sent);

    // A council adds a flag: the next sync takes a delta.
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2025-03-01", "2026-02-01"),
            (nhs(7), "CPP", "2026-06-01", ""),
        ],
    )
    .await;
    let r = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.action, "delta");
    assert_eq!(look(nhs(7)).result, LookupResult::Flagged);
    let st = agent.status().unwrap();
    assert_eq!(st.subjects, 4);
    assert!(st.last_sync_success.is_some());
    assert_eq!(st.freshness, Freshness::Fresh);
}
