//! Signing-key rollover end to end: trust IT rolls the real server's feed signing key over
//! (the code path behind `admin signing-key roll`, on its own connection to the database of
//! the running server), and an enrolled tablet follows the chain to the new key at its next
//! sync, without re-enrolling, and installs the new data. A tablet whose pinned key is not in
//! the chain refuses the new feed with a bad signature and keeps the data it had.

use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::net::NetError;
use cpis_agent::{Agent, AgentError, Clock, LookupInput, ManualClock};
use cpis_protocol::{LookupResult, PublicKey, SigningKey, VerifyError};

use crate::server::*;

fn lookup(agent: &Agent, n: u32) -> LookupResult {
    agent
        .lookup(LookupInput {
            nhs_number: &nhs(n).to_string(),
            staff_id: Some("P1".into()),
            incident_ref: None,
        })
        .unwrap()
        .result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_signing_key_is_followed_without_re_enrolling() {
    // TLS checks certificates against the system clock, so both clocks start at real now.
    let now = Utc::now();
    let env = Env::start(now).await;
    let data_dir = env._dir.path().to_owned();
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;

    // Two tablets enrolled and synced under the key `init` made (K1).
    let clock = Arc::new(ManualClock::new(now));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let token = env.enrolment_token(2, Duration::hours(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = cpis_agent::sync::enrol(
        dir.path(),
        &env.base,
        &env.ca,
        &token,
        None,
        dyn_clock.clone(),
    )
    .await
    .unwrap();
    let stray_dir = tempfile::tempdir().unwrap();
    let stray = cpis_agent::sync::enrol(
        stray_dir.path(),
        &env.base,
        &env.ca,
        &token,
        None,
        dyn_clock.clone(),
    )
    .await
    .unwrap();
    let k1 = agent.pinned_key();
    assert_eq!(stray.pinned_key(), k1);
    for a in [&agent, &stray] {
        cpis_agent::sync::sync_once(a, &|_, _| {}).await.unwrap();
        assert_eq!(lookup(a, 0), LookupResult::Flagged);
        assert_eq!(lookup(a, 1), LookupResult::NotFlagged);
    }
    let before = agent.state().unwrap().data.unwrap();
    // The stray tablet pins a key the server never used (through the agent's own pinning
    // API, as if enrolled against another server's key); it keeps the data it has.
    let unrelated = PublicKey::from(&SigningKey::from_bytes(&[42u8; 32]));
    stray.pin_signing_key(unrelated).unwrap();
    assert_eq!(stray.state().unwrap().data, Some(before));

    // Trust IT rolls the key over while the server runs: what `admin signing-key roll` does,
    // on its own connection to the server's database.
    let admin_store = cpis_sync_server::server::open_store(
        &data_dir,
        &cpis_sync_server::config::Config::load(&data_dir).unwrap(),
    )
    .unwrap();
    let rolled = cpis_sync_server::keys::roll(&data_dir, &admin_store, env.now())
        .await
        .unwrap();
    drop(admin_store);
    assert_eq!(rolled.previous, k1);
    assert_ne!(rolled.next, k1);
    // Past the running server's recheck, on its clock (and the tablets' clock along with it).
    let step = cpis_sync_server::keys::KEY_RECHECK + Duration::seconds(1);
    env.clock.advance(step);
    clock.advance(step.to_std().unwrap());

    // New data, signed (like every checkpoint from now on) by the new key.
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2026-02-01", ""),
        ],
    )
    .await;

    // The enrolled tablet syncs as usual: it follows the chain, pins K2 and installs the data.
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let after = agent.state().unwrap().data.unwrap();
    assert!(after > before, "{after:?} after {before:?}");
    assert_eq!(
        (synced.epoch, synced.version),
        (Some(after.0), Some(after.1))
    );
    assert_eq!(agent.pinned_key(), rolled.next);
    assert_eq!(lookup(&agent, 0), LookupResult::Flagged);
    assert_eq!(lookup(&agent, 1), LookupResult::Flagged);
    // The new key is pinned durably: a reopened state directory holds it and syncs with it
    // (the lookups above went up as access events, so the feed may have moved on again).
    drop(agent);
    let agent = Agent::open(dir.path(), dyn_clock.clone()).unwrap();
    assert_eq!(agent.pinned_key(), rolled.next);
    assert_eq!(agent.enrolment().signing_key, rolled.next);
    let again = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert!(again.version >= Some(after.1), "{again:?}");
    assert_eq!(agent.pinned_key(), rolled.next);
    assert_eq!(lookup(&agent, 1), LookupResult::Flagged);

    // The stray tablet: the chain does not lead from its key, so the feed is refused with a
    // bad signature, and its key and data stay as they were.
    let err = cpis_agent::sync::sync_once(&stray, &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Verify(VerifyError::BadSignature)
                | AgentError::Net(NetError::Verify(VerifyError::BadSignature))
        ),
        "{err:?}"
    );
    assert_eq!(stray.pinned_key(), unrelated);
    assert_eq!(stray.state().unwrap().data, Some(before));
    assert_eq!(lookup(&stray, 0), LookupResult::Flagged);
    assert_eq!(lookup(&stray, 1), LookupResult::NotFlagged);
}
