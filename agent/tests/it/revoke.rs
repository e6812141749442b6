//! A revoked device shreds itself at its next contact: trust IT revokes it on the real
//! server, `cpis-agent sync` exits 3 ("not enrolled / wiped") saying so, and the master key,
//! enrolment, flags and outbox are gone, so nothing left on the tablet can be read.

use std::process::Command;
use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::{Agent, LookupInput, SystemClock};
use cpis_protocol::LookupResult;
use cpis_sync_server::store::Store as _;

use crate::server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_wipes_itself_on_sync() {
    let now = Utc::now();
    let env = Env::start(now).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let agent = cpis_agent::sync::enrol(
        dir.path(),
        &env.base,
        &env.ca,
        &token,
        None,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let hit = agent
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            staff_id: Some("P1".into()),
            incident_ref: None,
        })
        .unwrap();
    assert_eq!(hit.result, LookupResult::Flagged);
    let device = agent.enrolment().device_id;
    drop(agent);
    let key = dir.path().join("keys/master.key");
    assert!(key.exists());

    assert!(env.handle.store().revoke_device(device, now).await.unwrap());

    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let state = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["sync", "--state-dir"])
            .arg(&state)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");
    assert!(stderr.contains("shredded"), "{stderr}");

    assert!(!key.exists(), "the master key is destroyed");
    for gone in [
        "enrolment.sealed",
        "flags.db",
        "flags.db-wal",
        "outbox.db",
        "outbox.db-wal",
        "keys",
        "downloads",
    ] {
        assert!(!dir.path().join(gone).exists(), "{gone} is left behind");
    }
    // The tablet now says it is not enrolled, to the library and on the command line.
    assert!(matches!(
        Agent::open(dir.path(), Arc::new(SystemClock)),
        Err(cpis_agent::AgentError::NotEnrolled(_))
    ));
    let state = dir.path().to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["lookup", "--state-dir"])
            .arg(&state)
            .arg("9434765919")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.status.code(), Some(3));
}
