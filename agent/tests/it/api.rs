//! The local API on loopback: lookups (including the 400 for an invalid number), status,
//! and refusal of a non-loopback listen address.

use std::sync::Arc;

use cpis_agent::api::{ApiError, LocalApi};
use cpis_protocol::LookupResult;
use cpis_protocol::api::ErrorBody;
use cpis_protocol::local::{LookupResponse, StatusResponse};

use crate::common::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_answers_lookups_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(51, 300);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 2, t0());
    let api = LocalApi::bind(Arc::new(agent), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let c = client();
    let f = &data.flags[0];
    let resp = c
        .post(format!("{base}/v1/lookups"))
        .json(&serde_json::json!({"nhs_number": f.nhs_number.spaced().replace(' ', "-"), "staff_id": "P9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r: LookupResponse = resp.json().await.unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
    assert_eq!(r.nhs_number, f.nhs_number.to_string());

    let resp = c
        .post(format!("{base}/v1/lookups"))
        .json(&serde_json::json!({"nhs_number": "9434765918"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: ErrorBody = resp.json().await.unwrap();
    assert_eq!(e.error.code, "nhs_number_check_digit_mismatch");
    assert!(
        e.error.message.contains("expected 9"),
        "{}",
        e.error.message
    );

    let resp = c
        .post(format!("{base}/v1/lookups"))
        .body("not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let s: StatusResponse = c
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s.version, Some(2));
    assert_eq!(s.outbox_pending, 1);
    api.shutdown().await.unwrap();
}

#[tokio::test]
async fn non_loopback_listen_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(52, 50);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    let r = LocalApi::bind(Arc::new(agent), "0.0.0.0:0".parse().unwrap()).await;
    assert!(matches!(r, Err(ApiError::NotLoopback(_))));
}

#[test]
fn cli_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let d = dir.path().to_str().unwrap();
    // Bad input: exit 2 with the reason.
    let o = run(&["lookup", "--state-dir", d, "9434765918"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("check digit"));
    // Not enrolled: exit 3.
    let o = run(&["lookup", "--state-dir", d, "9434765919"]);
    assert_eq!(o.status.code(), Some(3));
    let o = run(&["status", "--state-dir", d]);
    assert_eq!(o.status.code(), Some(3));
    // Enrolled, looked up, wiped: then exit 3.
    let data = fixture(53, 50);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    drop(agent);
    let o = run(&["lookup", "--state-dir", d, "943 476 5919", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: LookupResponse = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r.result, LookupResult::Unknown);
    let o = run(&["lookup", "--state-dir", d, "943-476-5919"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("UNKNOWN"));
    let o = run(&["wipe", "--state-dir", d]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!dir.path().join("keys").exists());
    let o = run(&["status", "--state-dir", d]);
    assert_eq!(o.status.code(), Some(3));
    // Every command has help.
    for cmd in ["enrol", "run", "sync", "lookup", "status", "wipe"] {
        let o = run(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&o.stdout).contains("--state-dir"));
    }
}
