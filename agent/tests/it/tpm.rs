//! The TPM 2.0 keystore against a real software TPM (swtpm): the master key is sealed to the
//! tablet's TPM, so a byte-for-byte copy of the state directory opens nothing on another
//! machine, and after a wipe a copy taken before it opens nothing even with the same TPM
//! (part of the key lived in an NV index the wipe undefined). The TLS private key is never
//! a plain file; a deleted sealed row still answers `unknown`; the fleet view and the
//! status report the key protection; with no TPM the enrolment falls back to a key file with
//! a warning, and `--keystore tpm2` without one fails before the token is spent.

use std::path::Path;
use std::process::{Command, Output};

use chrono::Utc;
use cpis_protocol::KeyProtection;
use cpis_sync_server::store::Store as _;

use crate::server::*;
use crate::swtpm::Swtpm;

/// Runs the agent's command line with `CPIS_TPM2_TCTI` set to `tcti`.
async fn cli(tcti: &str, args: Vec<String>) -> Output {
    let tcti = tcti.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cpis-agent"))
            .args(&args)
            .env("CPIS_TPM2_TCTI", tcti)
            .env_remove("CPIS_ENROLMENT_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(parts: &[&str], dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
    v.push("--state-dir".into());
    v.push(dir.display().to_string());
    v
}

async fn enrol(env: &Env, tcti: &str, dir: &Path, keystore: Option<&str>) -> Output {
    let token = env.enrolment_token(1, chrono::Duration::hours(1)).await;
    enrol_with(env, tcti, dir, keystore, &token).await
}

async fn enrol_with(
    env: &Env,
    tcti: &str,
    dir: &Path,
    keystore: Option<&str>,
    token: &str,
) -> Output {
    let ca = dir.with_extension("ca.pem");
    std::fs::write(&ca, &env.ca).unwrap();
    let mut a = args(&["enrol", "--server", &env.base, "--token", token], dir);
    a.extend(["--ca".to_string(), ca.display().to_string()]);
    if let Some(k) = keystore {
        a.extend(["--keystore".to_string(), k.to_string()]);
    }
    cli(tcti, a).await
}

/// A lookup from the tablet's data only (no national check: these tests are about what the
/// tablet itself can open).
async fn lookup(tcti: &str, dir: &Path, n: u32) -> Output {
    let mut a = args(&["lookup", "--json", "--offline"], dir);
    a.push(nhs(n).to_string());
    cli(tcti, a).await
}

fn result_of(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["result"].as_str().unwrap().to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file under `dir`, read whole.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            out.extend(all_bytes(&entry.path()));
        } else {
            out.push((
                entry.path().display().to_string(),
                std::fs::read(entry.path()).unwrap(),
            ));
        }
    }
    out
}

/// The key protection the newest enrolled tablet reported to the fleet view.
async fn reported(env: &Env) -> Option<KeyProtection> {
    let fleet = env
        .handle
        .store()
        .trust_fleet("ZA1".parse().unwrap())
        .await
        .unwrap();
    let report = fleet[0].report.as_ref().expect("a report after the sync");
    report.report.key_protection
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_disk_opens_nothing_on_another_tpm_nor_after_a_wipe_on_the_same_one() {
    let env = Env::start(Utc::now()).await;
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(1), "LAC", "2025-06-01", ""),
        ],
    )
    .await;
    let tpm = Swtpm::start();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tablet");

    // Enrol with the TPM, sync, look up.
    let out = enrol(&env, &tpm.tcti, &dir, Some("tpm2")).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("sealed by the tablet's TPM 2.0 (tpm2)"),
        "{said}"
    );
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert!(dir.join("keys/master.tpm2").exists());
    assert!(!dir.join("keys/master.key").exists());
    let out = cli(&tpm.tcti, args(&["sync"], &dir)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(result_of(&lookup(&tpm.tcti, &dir, 0).await), "flagged");
    assert_eq!(result_of(&lookup(&tpm.tcti, &dir, 2).await), "not_flagged");
    // Neither key is anywhere on the disk in the clear: no PEM private key, no key file.
    for (path, bytes) in all_bytes(&dir) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "{path} holds a plain private key"
        );
    }
    assert!(!dir.join("keys/device.key.pem").exists());

    // The status and the fleet view say the keys are TPM-sealed.
    let out = cli(&tpm.tcti, args(&["status", "--json"], &dir)).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["key_protection"], "tpm2", "{status}");
    assert_eq!(reported(&env).await, Some(KeyProtection::Tpm2));

    // Copies of the whole disk, taken now.
    let foreign = root.path().join("copy-on-another-machine");
    let before_wipe = root.path().join("copy-before-wipe");
    let tampered = root.path().join("copy-with-a-row-deleted");
    for copy in [&foreign, &before_wipe, &tampered] {
        copy_dir(&dir, copy);
    }

    // On another machine (another TPM) the copy opens nothing: not enrolled, with the reason.
    let other_tpm = Swtpm::start();
    let out = lookup(&other_tpm.tcti, &foreign, 0).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not unseal with this machine's TPM 2.0"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let out = cli(&other_tpm.tcti, args(&["status"], &foreign)).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    // With the same TPM a copy does open (it is the same tablet) — and a sealed row deleted
    // from it makes a miss `unknown`, never `not_flagged`.
    let deleted = rusqlite::Connection::open(tampered.join("flags.db"))
        .unwrap()
        .execute(
            "DELETE FROM flags WHERE key = (SELECT key FROM flags ORDER BY key LIMIT 1)",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    let results = [
        result_of(&lookup(&tpm.tcti, &tampered, 0).await),
        result_of(&lookup(&tpm.tcti, &tampered, 1).await),
        result_of(&lookup(&tpm.tcti, &tampered, 2).await),
    ];
    assert!(results.contains(&"flagged".to_owned()), "{results:?}");
    assert!(!results.contains(&"not_flagged".to_owned()), "{results:?}");
    assert_eq!(results[2], "unknown", "{results:?}");
    let out = cli(&tpm.tcti, args(&["status", "--json"], &tampered)).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"store_damaged"), "{status}");

    // The wipe undefines the NV index: the copy taken before it no longer opens, even on
    // the same TPM.
    let out = cli(&tpm.tcti, args(&["wipe"], &dir)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!dir.join("keys").exists());
    let out = lookup(&tpm.tcti, &before_wipe, 0).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("NV index") && stderr(&out).contains("is not defined"),
        "{}",
        stderr(&out)
    );
    let out = cli(&tpm.tcti, args(&["status", "--json"], &before_wipe)).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    // Failed unseals leave nothing loaded in the TPM (it has room for only a few objects and
    // sessions): after many, the same TPM still enrols and answers a new tablet.
    for _ in 0..6 {
        let out = lookup(&tpm.tcti, &before_wipe, 0).await;
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        let out = lookup(&tpm.tcti, &foreign, 0).await;
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    }
    let again = root.path().join("enrolled-again");
    let out = enrol(&env, &tpm.tcti, &again, Some("tpm2")).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(&tpm.tcti, args(&["sync"], &again)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(result_of(&lookup(&tpm.tcti, &again, 0).await), "flagged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tpm_the_default_is_a_key_file_with_a_warning_and_tpm2_fails_cleanly() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let root = tempfile::tempdir().unwrap();
    // Nothing listens here: a TPM that does not answer.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "swtpm:host=127.0.0.1,port={}",
            l.local_addr().unwrap().port()
        )
    };

    // Asked for tpm2 without one: exit 1, nothing written, and the token is not spent.
    let token = env.enrolment_token(1, chrono::Duration::hours(1)).await;
    let dir = root.path().join("asked-tpm2");
    let out = enrol_with(&env, &dead, &dir, Some("tpm2"), &token).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing was enrolled"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&dead), "{}", stderr(&out));
    assert!(!dir.join("enrolment.sealed").exists());

    // The default falls back to a key file, and says what that does not protect against.
    let out = enrol_with(&env, &dead, &dir, None, &token).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let warning = stderr(&out);
    assert!(
        warning.contains("warning: no TPM 2.0 could be used"),
        "{warning}"
    );
    assert!(warning.contains("full-disk encryption"), "{warning}");
    assert!(dir.join("keys/master.key").exists());
    assert!(!dir.join("keys/master.tpm2").exists());
    let out = cli(&dead, args(&["sync"], &dir)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(result_of(&lookup(&dead, &dir, 0).await), "flagged");
    let out = cli(&dead, args(&["status", "--json"], &dir)).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["key_protection"], "file", "{status}");
    assert_eq!(reported(&env).await, Some(KeyProtection::File));

    // With a TPM answering, the default is tpm2.
    let tpm = Swtpm::start();
    let dir = root.path().join("default-with-tpm");
    let out = enrol(&env, &tpm.tcti, &dir, None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert!(dir.join("keys/master.tpm2").exists());

    // A bad value is refused by the parser (exit 2) and names the choices.
    let out = enrol(&env, &tpm.tcti, &root.path().join("bad"), Some("hsm")).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("expected tpm2 or file"),
        "{}",
        stderr(&out)
    );
}
