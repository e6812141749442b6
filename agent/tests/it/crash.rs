//! A crash in the middle of a sync (the agent binary killed with SIGKILL at several points
//! while it downloads and applies a large snapshot or delta from the real server) leaves the
//! old or the new version, never a mix, and leaves no run of the snapshot body readable in
//! `downloads/` (a torn final chunk included); a later sync completes (resuming the
//! download).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::{Agent, LookupInput, SystemClock};
use cpis_protocol::LookupResult;

use crate::plaintext::{all_files, body_needles, find_any};
use crate::server::*;

const BIG: u32 = 40_000;
const SMALL: u32 = 10;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Opens the store and checks it holds exactly one consistent version.
fn check_consistent(
    dir: &Path,
    old: Option<u64>,
    new: u64,
    probe_new: cpis_protocol::NhsNumber,
) -> Option<u64> {
    let agent = Agent::open(dir, Arc::new(SystemClock)).unwrap();
    let st = agent.status().unwrap();
    let probe = agent
        .lookup(LookupInput {
            nhs_number: &probe_new.to_string(),
            ..Default::default()
        })
        .unwrap();
    let old_probe = agent
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            ..Default::default()
        })
        .unwrap();
    match st.version {
        // Versions after `new` only add recent-contact changes (the lookups made by these
        // checks are flagged and reach the server as events): the same flags as `new`.
        v if v.is_some_and(|v| v >= new) => {
            assert_eq!(st.subjects, u64::from(BIG));
            assert_eq!(probe.result, LookupResult::Flagged);
            assert_eq!(old_probe.result, LookupResult::Flagged);
        }
        v if v == old && old.is_some() => {
            assert_eq!(st.subjects, u64::from(SMALL));
            assert_eq!(probe.result, LookupResult::NotFlagged);
            assert_eq!(old_probe.result, LookupResult::Flagged);
        }
        None if old.is_none() => {
            assert_eq!(st.subjects, 0);
            assert_eq!(probe.result, LookupResult::Unknown);
        }
        v => panic!("version {v:?} is neither the old {old:?} nor the new {new}"),
    }
    st.version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_mid_sync_leaves_old_or_new() {
    let now = Utc::now();
    let env = Env::start(now).await;
    let numbers = nhs_range(BIG);
    let small: Vec<_> = numbers[..SMALL as usize]
        .iter()
        .map(|n| (*n, "CPP", "2026-01-10", ""))
        .collect();
    env.upload(LEICS, &small).await;

    let work = tempfile::tempdir().unwrap();
    // An enrolled tablet that never synced, and one holding the small version.
    let empty = work.path().join("empty");
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let agent = cpis_agent::sync::enrol(
        &empty,
        &env.base,
        &env.ca,
        &token,
        None,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    drop(agent);
    let old_dir = work.path().join("old");
    copy_dir(&empty, &old_dir);
    let agent = Agent::open(&old_dir, Arc::new(SystemClock)).unwrap();
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let old_version = agent.status().unwrap().version;
    assert!(old_version.is_some());
    drop(agent);

    let big: Vec<_> = numbers
        .iter()
        .map(|n| (*n, "CPP", "2026-01-10", ""))
        .collect();
    env.upload(LEICS, &big).await;
    let probe = numbers[(BIG / 2) as usize];

    let body_needles = {
        let agent = Agent::open(&empty, Arc::new(SystemClock)).unwrap();
        body_needles(&current_snapshot(&agent).await.1)
    };
    let mut partials = 0;

    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    // Time a full sync from empty to know where to aim.
    let timing = work.path().join("timing");
    copy_dir(&empty, &timing);
    let started = std::time::Instant::now();
    let st = Command::new(bin)
        .args(["sync", "--state-dir"])
        .arg(&timing)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let full = started.elapsed();
    let new_version = Agent::open(&timing, Arc::new(SystemClock))
        .unwrap()
        .status()
        .unwrap()
        .version
        .unwrap();
    check_consistent(&timing, None, new_version, probe);
    eprintln!("a full sync of {BIG} flags took {full:?}");
    assert!(new_version > old_version.unwrap());

    let mut outcomes = Vec::new();
    for (i, frac) in [0.1, 0.3, 0.5, 0.65, 0.8, 0.9, 0.97].iter().enumerate() {
        for (base, old) in [(&empty, None), (&old_dir, old_version)] {
            let dir = work.path().join(format!("run-{i}-{}", old.is_some()));
            copy_dir(base, &dir);
            let mut child = Command::new(bin)
                .args(["sync", "--state-dir"])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Not synchronisation: the kill point, spread over the sync's duration.
            std::thread::sleep(full.mul_f64(*frac));
            let _ = child.kill();
            let _ = child.wait();
            let mut files = Vec::new();
            all_files(&dir, &mut files);
            partials += files
                .iter()
                .filter(|(p, _)| p.contains("downloads"))
                .count();
            if let Some((what, path)) = find_any(&files, &body_needles) {
                panic!("{what} found in plaintext in {path} after a kill");
            }
            let v = check_consistent(&dir, old, new_version, probe);
            outcomes.push(v);
            // A later sync completes from wherever it was left.
            let agent = Agent::open(&dir, Arc::new(SystemClock)).unwrap();
            cpis_agent::sync::sync_once(&agent, &|_, _| {})
                .await
                .unwrap();
            drop(agent);
            assert!(
                check_consistent(&dir, old, new_version, probe).is_some_and(|v| v >= new_version)
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("versions after kill: {outcomes:?}; partial downloads left: {partials}");
}
