//! No plaintext at rest: after installing fixture data, applying a delta and doing lookups,
//! no file under the state directory (including WAL and SHM files) holds any NHS number (as
//! ASCII digits or as a big- or little-endian u64), any flag date, or any council name,
//! code or phone number.

use std::path::Path;

use cpis_agent::LookupInput;
use cpis_protocol::{Change, DeltaBody, VersionedChange};

use crate::common::*;

fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
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
    for (path, bytes) in &files {
        for (what, needle) in &needles {
            assert!(
                !contains(bytes, needle),
                "{what} found in plaintext in {path}"
            );
        }
    }
}
