//! Keystore benchmark (harness = false; needs the `tpm2` feature): the TPM 2.0 keystore
//! against the key file, measured in the same run on the same data.
//!
//! * agent start: `Agent::open` (the key unsealed — for tpm2 a primary key, a load, a salted
//!   session, an unseal and an NV read on the TPM);
//! * start and first lookup (`Agent::open` + one audited lookup, which also runs the rows'
//!   integrity check on its first read of the store);
//! * the command line: `cpis-agent lookup --offline --json` as a new process, start to exit;
//! * lookups once running (audited, event committed with fsync): the key stays in memory, so
//!   these must not get slower.
//!
//! The TPM is Debian's swtpm, started by `scripts/swtpm-start.sh` (a software TPM answers in
//! microseconds where a discrete TPM takes milliseconds: the tpm2 start figures here are a
//! floor). Run: `cargo bench -p cpis-agent --features tpm2 --bench keystore`
//! (`CPIS_BENCH_FLAGS` changes the number of flags, default 20,000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../tests/it/swtpm.rs"]
mod swtpm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cpis_agent::{Agent, Clock, LookupInput, SystemClock};
use cpis_protocol::{KeyProtection, NhsNumber};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // The TCTI is read from the environment: start a software TPM and run again with it set.
    let Some(tcti) = std::env::var_os("CPIS_TPM2_TCTI") else {
        let tpm = swtpm::Swtpm::start();
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("CPIS_TPM2_TCTI", &tpm.tcti)
            .status()
            .unwrap();
        drop(tpm);
        std::process::exit(status.code().unwrap_or(1));
    };
    let n: usize = std::env::var("CPIS_BENCH_FLAGS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    println!(
        "keystore benchmark: {n} flags; TPM: swtpm at {}",
        tcti.to_string_lossy()
    );
    // The data is as of now: the command line judges it by the system clock.
    let common::Region {
        flags,
        councils,
        snapshot,
        body: bytes,
        checkpoint,
        enrolment,
    } = common::region(n, 2026, Utc::now());
    let tls = common::no_tls();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let tmp = tempfile::tempdir().unwrap();
    let kinds = [KeyProtection::File, KeyProtection::Tpm2];
    let dirs: Vec<PathBuf> = kinds.iter().map(|k| tmp.path().join(k.as_str())).collect();
    for (kind, dir) in kinds.iter().zip(&dirs) {
        let t = Instant::now();
        let agent = Agent::create(dir, &enrolment, &tls, *kind, clock.clone()).unwrap();
        let created = t.elapsed();
        let vcp = agent.accept_checkpoint(&checkpoint).unwrap();
        agent.apply_snapshot(&vcp, &snapshot, &bytes).unwrap();
        assert_eq!(agent.key_protection(), *kind);
        println!(
            "{kind}: new master key made and stored in {:.2} ms; {} flags of {} councils installed",
            ms(created),
            flags.len(),
            councils.len()
        );
    }
    let mut subjects: Vec<NhsNumber> = flags.iter().map(|f| f.nhs_number).collect();
    subjects.dedup();
    let lookup = |agent: &Agent, i: usize| {
        let nhs = subjects[(i * 7919) % subjects.len()].to_string();
        agent
            .lookup(LookupInput {
                nhs_number: &nhs,
                staff_id: Some("B1".into()),
                incident_ref: None,
            })
            .unwrap()
    };

    // Start, and start + first lookup, interleaved so neither kind gets a warmer machine.
    let rounds = 20;
    let mut open = [Vec::new(), Vec::new()];
    let mut first = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (k, dir) in dirs.iter().enumerate() {
            let t = Instant::now();
            let agent = Agent::open(dir, clock.clone()).unwrap();
            let opened = t.elapsed();
            let answer = lookup(&agent, round);
            let both = t.elapsed();
            assert_eq!(answer.result, cpis_protocol::LookupResult::Flagged);
            open[k].push(opened);
            first[k].push(both);
        }
    }
    // The command line, a new process each time.
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let mut cli = [Vec::new(), Vec::new()];
    for subject in subjects.iter().take(10) {
        for (k, dir) in dirs.iter().enumerate() {
            cli[k].push(run_cli(bin, dir, &subject.to_string()));
        }
    }
    // Running: the key is in memory.
    let mut running = [Vec::new(), Vec::new()];
    let agents: Vec<Agent> = dirs
        .iter()
        .map(|d| Agent::open(d, clock.clone()).unwrap())
        .collect();
    for i in 0..500 {
        for (k, agent) in agents.iter().enumerate() {
            let t = Instant::now();
            lookup(agent, i);
            running[k].push(t.elapsed());
        }
    }

    let row = |what: &str, v: &[Vec<Duration>; 2]| {
        let (f, t) = (p50(v[0].clone()), p50(v[1].clone()));
        println!(
            "{what:<44} file {:>8.2} ms   tpm2 {:>8.2} ms   tpm2/file {:>5.2}x",
            ms(f),
            ms(t),
            t.as_secs_f64() / f.as_secs_f64()
        );
    };
    println!("p50 over {rounds} starts (10 for the command line, 500 running lookups):");
    row("agent start (key unsealed)", &open);
    row("start + first lookup (+ integrity check)", &first);
    row("`cpis-agent lookup --offline` (new process)", &cli);
    row("audited lookup while running (key in memory)", &running);
}

fn run_cli(bin: &str, dir: &Path, nhs: &str) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin)
        .args(["lookup", "--offline", "--json", "--state-dir"])
        .arg(dir)
        .arg(nhs)
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}
