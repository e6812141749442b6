//! A revoked device shreds itself at its next contact: trust IT revokes it on the real
//! server, `cpis-agent sync` exits 3 ("not enrolled / wiped") saying so, and the master key,
//! enrolment, flags and outbox are gone, so nothing left on the tablet can be read — but
//! only after every access notice waiting in its outbox has reached the councils (DESIGN.md
//! §2 rule 3). A revoked tablet that cannot deliver them keeps them sealed, answers no
//! lookup, and delivers them at its next contact, even after a restart.

use std::process::Command;
use std::sync::Arc;

use chrono::Utc;
use cpis_agent::{Agent, LookupInput, SystemClock};
use cpis_protocol::LookupResult;
use cpis_sync_server::store::Store as _;

use crate::proxy::Proxy;
use crate::server::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_wipes_itself_on_sync() {
    let now = Utc::now();
    let env = Env::start(now).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = env.enrol_agent(&env.base, dir.path()).await;
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
    assert!(
        stderr.contains("1 access notice(s) were delivered first"),
        "{stderr}"
    );
    // The lookup made before the revocation reached its council, recorded as sent after it.
    let notices = env.mailbox(LEICS).await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    let stored = env
        .handle
        .store()
        .stored_event(notices[0].event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.source, "after_revocation");

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

/// Lookups of flagged children made offline on a tablet revoked meanwhile: the tablet learns
/// of the revocation, loses signal before it can send them (they stay sealed, lookups are
/// refused, a restart keeps it so), and at its next contact every notice lands in its
/// council's mailbox once; only then is the tablet wiped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_offline_tablet_delivers_every_notice_before_it_wipes() {
    let now = Utc::now();
    let env = Env::start(now).await;
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2025-06-01", ""),
        ],
    )
    .await;
    env.upload(NOTTS, &[(nhs(2), "CPP", "2026-02-01", "")])
        .await;
    let proxy = Proxy::start(env.handle.local_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = env.enrol_agent(&proxy.base, dir.path()).await;
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let device = agent.enrolment().device_id;

    // Offline: four lookups, three of them flagged children, wait in the outbox.
    proxy.go_offline();
    let look = |n: u32| {
        agent
            .lookup(LookupInput {
                nhs_number: &nhs(n).to_string(),
                staff_id: Some("P1".into()),
                incident_ref: None,
            })
            .unwrap()
            .result
    };
    assert_eq!(look(0), LookupResult::Flagged);
    assert_eq!(look(1), LookupResult::Flagged);
    assert_eq!(look(2), LookupResult::Flagged);
    assert_eq!(look(3), LookupResult::NotFlagged);
    assert_eq!(agent.outbox_counts().unwrap().0, 4);

    // Trust IT revokes the tablet while it is out of signal.
    assert!(env.handle.store().revoke_device(device, now).await.unwrap());

    // It hears of the revocation, then loses signal before sending anything: the flags go at
    // once, the notices stay sealed, every lookup is refused.
    agent.mark_revoked("this device has been revoked").unwrap();
    let err = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            cpis_agent::AgentError::RevokedPending { pending: 4, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("4 access notice(s) wait"), "{err}");
    assert!(matches!(
        agent.lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            staff_id: Some("P1".into()),
            incident_ref: None,
        }),
        Err(cpis_agent::AgentError::RevokedPending { .. })
    ));
    assert!(
        agent.state().unwrap().data.is_none(),
        "the flags are shredded"
    );
    assert!(
        dir.path().join("keys/master.key").exists(),
        "kept to open the outbox"
    );
    drop(agent);

    // A restart stays revoked: the CLI refuses the lookup (exit 3) and names the notices.
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let state = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["lookup", "--state-dir"])
            .arg(&state)
            .arg(nhs(0).to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("4 access notice(s) wait"), "{stderr}");
    for ods in [LEICS, NOTTS] {
        assert!(env.mailbox(ods).await.is_empty(), "nothing delivered yet");
    }

    // Signal again: the notices are delivered, each once, then the tablet wipes itself.
    proxy.heal();
    let agent = Agent::open(dir.path(), Arc::new(SystemClock)).unwrap();
    let err = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, cpis_agent::AgentError::NotEnrolled(_)),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("4 access notice(s) were delivered first"),
        "{err}"
    );
    let leics = env.mailbox(LEICS).await;
    let notts = env.mailbox(NOTTS).await;
    assert_eq!(leics.len(), 2, "{leics:?}");
    assert_eq!(notts.len(), 1, "{notts:?}");
    let mut subjects: Vec<_> = leics.iter().chain(&notts).map(|n| n.nhs_number).collect();
    subjects.sort();
    assert_eq!(subjects, vec![nhs(0), nhs(1), nhs(2)]);
    let ids = env.handle.store().event_ids().await.unwrap();
    assert_eq!(ids.len(), 4, "every lookup is in the audit log, once");
    assert!(!dir.path().join("keys").exists(), "wiped once delivered");
    assert!(
        !dir.path().join("outbox.db").exists(),
        "wiped once delivered"
    );
    assert!(
        agent
            .lookup(LookupInput {
                nhs_number: &nhs(0).to_string(),
                staff_id: Some("P1".into()),
                incident_ref: None,
            })
            .is_err()
    );
}
