//! Tamper-evident rows: a sealed row deleted from `flags.db` (while the agent is stopped or
//! while it runs), or an older sealed copy of a row put back, is detected — a miss answers
//! `unknown` with `store_damaged`, never `not_flagged`; status says so; the next sync installs
//! a full snapshot and the answers are right again. The outbox never reuses a sequence number.

use std::sync::Arc;

use chrono::Utc;
use cpis_agent::{Agent, LookupInput, SystemClock};
use cpis_protocol::LookupResult;
use cpis_protocol::local::LookupResponse;

use crate::server::*;

fn look(agent: &Agent, n: u32) -> LookupResponse {
    agent
        .lookup(LookupInput {
            nhs_number: &nhs(n).to_string(),
            staff_id: Some("P1".into()),
            incident_ref: None,
        })
        .unwrap()
}

fn damaged(r: &LookupResponse) -> bool {
    r.warnings.iter().any(|w| w.code == "store_damaged")
}

/// A server with subjects 0 and 1 flagged by LEICS, and a tablet synced to it.
async fn synced() -> (Env, tempfile::TempDir, Agent) {
    let env = Env::start(Utc::now()).await;
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2025-06-01", ""),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = env.enrol_agent(&env.base, dir.path()).await;
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(look(&agent, 0).result, LookupResult::Flagged);
    assert_eq!(look(&agent, 1).result, LookupResult::Flagged);
    (env, dir, agent)
}

fn flags_db(dir: &tempfile::TempDir) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.path().join("flags.db")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_makes_misses_unknown_until_a_full_snapshot() {
    let (_env, dir, agent) = synced().await;
    drop(agent);
    // Someone with the disk deletes one subject's sealed row (which one, they cannot tell).
    let deleted = flags_db(&dir)
        .execute(
            "DELETE FROM flags WHERE key = (SELECT key FROM flags ORDER BY key LIMIT 1)",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 1);

    let agent = Agent::open(dir.path(), Arc::new(SystemClock)).unwrap();
    let answers = [look(&agent, 0), look(&agent, 1)];
    // One subject still shows its flag (a real one); the other is never "not flagged".
    let results: Vec<_> = answers.iter().map(|a| a.result).collect();
    assert!(results.contains(&LookupResult::Flagged), "{results:?}");
    assert!(results.contains(&LookupResult::Unknown), "{results:?}");
    assert!(!results.contains(&LookupResult::NotFlagged), "{results:?}");
    assert!(answers.iter().all(damaged), "{answers:?}");
    // A subject no council flags is unknown too: the store cannot vouch for a miss.
    let other = look(&agent, 7);
    assert_eq!(other.result, LookupResult::Unknown);
    assert!(damaged(&other));
    let status = agent.status().unwrap();
    assert!(
        status.warnings.iter().any(|w| w.code == "store_damaged"),
        "{:?}",
        status.warnings
    );
    // The damage is recorded: a restart still knows it.
    drop(agent);
    let agent = Agent::open(dir.path(), Arc::new(SystemClock)).unwrap();
    assert_eq!(look(&agent, 7).result, LookupResult::Unknown);

    // The next sync takes a full snapshot; then every answer is right again.
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.action, "snapshot");
    assert_eq!(look(&agent, 0).result, LookupResult::Flagged);
    assert_eq!(look(&agent, 1).result, LookupResult::Flagged);
    let miss = look(&agent, 7);
    assert_eq!(miss.result, LookupResult::NotFlagged);
    assert!(!damaged(&miss));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_while_the_agent_runs_is_caught_at_the_next_lookup() {
    let (_env, dir, agent) = synced().await;
    flags_db(&dir).execute("DELETE FROM flags", []).unwrap();
    for n in [0, 1, 7] {
        let r = look(&agent, n);
        assert_eq!(r.result, LookupResult::Unknown, "subject {n}");
        assert!(damaged(&r));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_of_a_row_put_back_is_detected() {
    let (env, dir, agent) = synced().await;
    // Every row as it is now.
    let old: Vec<(Vec<u8>, i64, Vec<u8>)> = {
        let c = flags_db(&dir);
        let mut stmt = c.prepare("SELECT key, ver, sealed FROM flags").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // The council ends subject 1's plan and adds subject 2; the tablet applies the delta.
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(2), "CPP", "2026-02-01", ""),
        ],
    )
    .await;
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.action, "delta");
    assert_eq!(look(&agent, 1).result, LookupResult::NotFlagged);
    drop(agent);
    // Put the old rows back over the new ones (each a genuine sealed row of this tablet).
    {
        let c = flags_db(&dir);
        for (key, ver, sealed) in &old {
            c.execute(
                "INSERT INTO flags (key, ver, sealed) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(key) DO UPDATE SET ver = excluded.ver, sealed = excluded.sealed",
                rusqlite::params![key, ver, sealed],
            )
            .unwrap();
        }
    }
    let agent = Agent::open(dir.path(), Arc::new(SystemClock)).unwrap();
    let miss = look(&agent, 7);
    assert_eq!(miss.result, LookupResult::Unknown);
    assert!(damaged(&miss), "{miss:?}");
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.action, "snapshot");
    assert_eq!(look(&agent, 1).result, LookupResult::NotFlagged);
    assert_eq!(look(&agent, 2).result, LookupResult::Flagged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_never_reuses_a_sequence_number() {
    let (_env, dir, agent) = synced().await;
    let seqs = || -> Vec<i64> {
        let c = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
        let mut stmt = c.prepare("SELECT seq FROM events ORDER BY seq").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    look(&agent, 0);
    look(&agent, 1);
    let first = seqs();
    assert_eq!(
        first.len(),
        2 + 2,
        "the two lookups of setup are still pending"
    );
    // The events are delivered and deleted; the next one takes a number never used before.
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert!(seqs().is_empty());
    look(&agent, 0);
    let after = seqs();
    assert_eq!(after.len(), 1);
    assert!(
        after[0] > *first.last().unwrap(),
        "{after:?} after {first:?}"
    );
}

/// Copies `flags.db` (with its `-wal` and `-shm`) from `from` to `to`.
fn copy_flag_store(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("flags.db{suffix}");
        let _ = std::fs::remove_file(to.join(&name));
        if from.join(&name).exists() {
            std::fs::copy(from.join(&name), to.join(&name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_flag_store_put_back_from_an_older_copy_is_detected() {
    let (env, dir, agent) = synced().await;
    drop(agent);
    let copy = tempfile::tempdir().unwrap();
    copy_flag_store(dir.path(), copy.path());
    // Subject 1's plan ends and subject 2 is flagged; the tablet applies the delta.
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(2), "CPP", "2026-02-01", ""),
        ],
    )
    .await;
    let agent = Agent::open(dir.path(), std::sync::Arc::new(SystemClock)).unwrap();
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.action, "delta");
    assert_eq!(look(&agent, 2).result, LookupResult::Flagged);
    drop(agent);
    // The older store, consistent in itself, is put back: subject 2 would read "not flagged".
    copy_flag_store(copy.path(), dir.path());
    let agent = Agent::open(dir.path(), std::sync::Arc::new(SystemClock)).unwrap();
    let r = look(&agent, 2);
    assert_eq!(r.result, LookupResult::Unknown, "{r:?}");
    assert!(damaged(&r));
    let synced = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(synced.action, "snapshot");
    assert_eq!(look(&agent, 2).result, LookupResult::Flagged);
}
