//! No plaintext at rest: after installing fixture data, applying a delta and doing lookups,
//! and after a snapshot download from the real server cut off half way (the partial body
//! left in `downloads/`), no file under the state directory (including WAL and SHM files)
//! holds any NHS number (as ASCII digits or as a big- or little-endian u64), any flag date,
//! any council name, code or phone number — or, for the interrupted download, any run of the
//! compressed body as it came over the wire.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{Duration, Utc};
use cpis_agent::{AgentError, LookupInput, ManualClock};
use cpis_protocol::{Change, DeltaBody, LookupResult, VersionedChange};

use crate::common::*;
use crate::proxy::Proxy;
use crate::server::{Env, LEICS, NOTTS, current_snapshot, random_rows};

pub(crate) fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

/// The first needle found in any file, as (what, path). Needles are grouped by length and
/// each file is slid over once per length, so thousands of needles stay fast.
pub(crate) fn find_any(
    files: &[(String, Vec<u8>)],
    needles: &[(String, Vec<u8>)],
) -> Option<(String, String)> {
    let mut by_len: BTreeMap<usize, HashSet<&[u8]>> = BTreeMap::new();
    for (_, n) in needles.iter().filter(|(_, n)| !n.is_empty()) {
        by_len.entry(n.len()).or_default().insert(n);
    }
    for (path, bytes) in files {
        for (len, set) in &by_len {
            if let Some(w) = bytes.windows(*len).find(|w| set.contains(w)) {
                let what = needles.iter().find(|(_, n)| n == w).unwrap().0.clone();
                return Some((what, path.clone()));
            }
        }
    }
    None
}

/// Needles for a run of `body[..len]` anywhere: every 24-byte window at a multiple of 256
/// (any copied run of at least 280 bytes contains one).
pub(crate) fn body_needles(body: &[u8]) -> Vec<(String, Vec<u8>)> {
    (0..body.len().saturating_sub(24))
        .step_by(256)
        .map(|at| {
            (
                format!("compressed body bytes {at}..{}", at + 24),
                body[at..at + 24].to_vec(),
            )
        })
        .collect()
}

#[test]
fn nothing_readable_in_the_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(41, 1_500);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 4, t0());
    let cp = agent
        .accept_checkpoint(&feed.checkpoint(1, 5, t0()))
        .unwrap();
    let body = DeltaBody {
        councils: data.councils.clone(),
        changes: vec![VersionedChange {
            version: 5,
            change: Change::Remove(data.flags[3].key()),
        }],
    };
    let (meta, bytes) = feed.delta(1, 4, 5, t0(), &body);
    agent.apply_delta(&cp, &meta, &bytes).unwrap();
    for f in data.flags.iter().step_by(10) {
        agent
            .lookup(LookupInput {
                nhs_number: &f.nhs_number.to_string(),
                staff_id: Some("STAFF42".into()),
                incident_ref: Some("INCIDENT-77".into()),
            })
            .unwrap();
    }
    // Keep the agent open so the WAL and SHM files are still there.
    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    assert!(
        files.iter().any(|(p, _)| p.ends_with("-wal")),
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );

    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for f in &data.flags {
        let n = f.nhs_number;
        needles.push((format!("nhs {n}"), n.to_ascii().to_vec()));
        needles.push((format!("nhs {n} be"), n.as_u64().to_be_bytes().to_vec()));
        needles.push((format!("nhs {n} le"), n.as_u64().to_le_bytes().to_vec()));
        for d in [Some(f.start_date), f.end_date, f.date_of_birth]
            .into_iter()
            .flatten()
        {
            needles.push((format!("date {d}"), d.to_string().into_bytes()));
            needles.push((
                format!("date {d} compact"),
                d.format("%Y%m%d").to_string().into_bytes(),
            ));
        }
        if let Some(l) = &f.local_id
            && l.len() >= 5
        {
            needles.push((format!("local id {l}"), l.clone().into_bytes()));
        }
    }
    for c in &data.councils {
        needles.push((format!("council {}", c.name), c.name.clone().into_bytes()));
        needles.push((
            format!("code {}", c.code),
            c.code.as_str().as_bytes().to_vec(),
        ));
        needles.push((
            format!("phone {}", c.emergency_phone),
            c.emergency_phone.clone().into_bytes(),
        ));
    }
    needles.push(("staff".into(), b"STAFF42".to_vec()));
    needles.push(("incident".into(), b"INCIDENT-77".to_vec()));
    needles.sort();
    needles.dedup();
    if let Some((what, path)) = find_any(&files, &needles) {
        panic!("{what} found in plaintext in {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_download_leaves_nothing_readable() {
    let now = Utc::now();
    let env = Env::start(now).await;
    // Enough rows that half the (columnar, about 4 B a flag) body is well past the TLS
    // handshake and the requests before it.
    let rows = random_rows(5, 20_000, now.date_naive());
    let (leics, notts) = rows.split_at(rows.len() / 2);
    for (ods, part) in [(LEICS, leics), (NOTTS, notts)] {
        let refs: Vec<_> = part
            .iter()
            .map(|(n, p, s, e)| (*n, *p, s.as_str(), e.as_str()))
            .collect();
        env.upload(ods, &refs).await;
    }

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
    let (meta, body) = current_snapshot(&agent).await;

    // The network drops half way through the body.
    proxy.cut_after(meta.body.len / 2);
    let got = Mutex::new(0u64);
    let r = cpis_agent::sync::sync_once(&agent, &|done, _| *got.lock().unwrap() = done).await;
    assert!(matches!(r, Err(AgentError::Net(_))), "{r:?}");
    assert!(proxy.cuts() > 0);
    let held = *got.lock().unwrap();
    assert!(held > meta.body.len / 4 && held < meta.body.len, "{held}");
    // A lookup meanwhile is recorded (and, with no data yet, unknown).
    let answer = agent
        .lookup(LookupInput {
            nhs_number: &rows[0].0.to_string(),
            staff_id: Some("STAFF42".into()),
            incident_ref: Some("INCIDENT-77".into()),
        })
        .unwrap();
    assert_eq!(answer.result, LookupResult::Unknown);

    let mut files = Vec::new();
    all_files(dir.path(), &mut files);
    let partial = files
        .iter()
        .find(|(p, _)| p.contains("downloads"))
        .expect("the partial download is kept for resuming");
    assert!(
        partial.1.len() as u64 >= held,
        "{} < {held}",
        partial.1.len()
    );

    let mut needles = body_needles(&body[..held as usize]);
    for (n, _, start, end) in &rows {
        needles.push((format!("nhs {n}"), n.to_ascii().to_vec()));
        needles.push((format!("nhs {n} be"), n.as_u64().to_be_bytes().to_vec()));
        needles.push((format!("nhs {n} le"), n.as_u64().to_le_bytes().to_vec()));
        for d in [start, end].into_iter().filter(|d| !d.is_empty()) {
            needles.push((format!("date {d}"), d.clone().into_bytes()));
            needles.push((format!("date {d} compact"), d.replace('-', "").into_bytes()));
        }
    }
    for (what, s) in [
        ("council code", LEICS),
        ("council code", NOTTS),
        ("council name", "Leicestershire Test Council"),
        ("council name", "Nottinghamshire Test Council"),
        ("phone", "0116 496 0000"),
        ("phone", "0116 496 0001"),
        ("staff", "STAFF42"),
        ("incident", "INCIDENT-77"),
    ] {
        needles.push((format!("{what} {s}"), s.as_bytes().to_vec()));
    }
    needles.sort();
    needles.dedup();
    if let Some((what, path)) = find_any(&files, &needles) {
        panic!("{what} found in plaintext in {path}");
    }
}
