//! The local API on loopback: lookups (including the 400 for an invalid number), status,
//! refusal of a non-loopback listen address, of cross-site POSTs and of requests without the
//! local API token when it is required; `enrol`'s token sources on the command line.

use std::sync::Arc;

use cpis_agent::api::{ApiError, ApiOptions, LocalApi};
use cpis_agent::local_token::{LocalAuth, LocalToken};
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
    // The two lookups' notices were never sent: the wipe says it destroyed them.
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("2 access notice(s) not yet sent"), "{said}");
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

/// `POST` with extra headers, answering the status and the error code (if any).
async fn post(
    c: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut r = c.post(url).json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let code = resp.json::<ErrorBody>().await.ok().map(|e| e.error.code);
    (status, code)
}

async fn outbox_pending(c: &reqwest::Client, base: &str, token: Option<&str>) -> u64 {
    let mut r = c.get(format!("{base}/v1/status"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let s: StatusResponse = r.send().await.unwrap().json().await.unwrap();
    s.outbox_pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused_and_record_nothing() {
    let env = crate::server::Env::start(chrono::Utc::now()).await;
    env.upload(
        crate::server::LEICS,
        &[(crate::server::nhs(0), "CPP", "2026-01-10", "")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token = env.enrolment_token(1, chrono::Duration::hours(1)).await;
    let agent = cpis_agent::sync::enrol(
        dir.path(),
        &env.base,
        &env.ca,
        &token,
        None,
        Arc::new(cpis_agent::SystemClock),
    )
    .await
    .unwrap();
    let api = LocalApi::bind(Arc::new(agent), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let own = base.clone();
    let c = client();
    let lookup =
        serde_json::json!({"nhs_number": crate::server::nhs(0).to_string(), "staff_id": "P1"});
    let cross: [&[(&str, &str)]; 6] = [
        &[("sec-fetch-site", "cross-site")],
        &[("sec-fetch-site", "same-site")],
        &[("origin", "http://evil.example")],
        &[("origin", "null")],
        &[("origin", "http://127.0.0.1:1")],
        &[("origin", own.as_str()), ("sec-fetch-site", "cross-site")],
    ];
    for headers in cross {
        for path in ["/v1/lookups", "/v1/sync"] {
            let (status, code) = post(&c, &format!("{base}{path}"), lookup.clone(), headers).await;
            assert_eq!(status, 403, "{path} {headers:?}");
            assert_eq!(code.as_deref(), Some("cross_site_request"), "{path}");
        }
    }
    // Nothing was recorded, and nothing was synced.
    let s: StatusResponse = c
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s.outbox_pending, 0);
    assert_eq!(s.version, None, "a cross-site POST /v1/sync must not sync");

    // The listener's own origin, a navigation (`none`), and a program (no header) pass.
    let own_origin: [&[(&str, &str)]; 3] = [
        &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        &[("sec-fetch-site", "none")],
        &[],
    ];
    let (status, code) = post(&c, &format!("{base}/v1/sync"), lookup.clone(), &[]).await;
    assert_eq!((status, code), (200, None));
    for (i, headers) in own_origin.into_iter().enumerate() {
        let (status, _) = post(&c, &format!("{base}/v1/lookups"), lookup.clone(), headers).await;
        assert_eq!(status, 200, "{headers:?}");
        assert_eq!(outbox_pending(&c, &base, None).await, i as u64 + 1);
    }
    let (status, _) = post(
        &c,
        &format!("{base}/v1/sync"),
        serde_json::json!({}),
        &[("origin", own.as_str())],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        outbox_pending(&c, &base, None).await,
        0,
        "the events were sent"
    );
    api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_token_gates_v1_when_required_and_a_wrong_one_always() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(54, 50);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 2, t0());
    let agent = Arc::new(agent);
    let token = LocalToken::load_or_create(dir.path()).unwrap();
    let wrong = LocalToken::generate();
    let c = client();
    let n = data.flags[0].nhs_number.to_string();
    let body = serde_json::json!({"nhs_number": n, "staff_id": "P1"});

    let api = LocalApi::bind_with(
        agent.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ApiOptions {
            auth: LocalAuth::Required(token.clone()),
            ..ApiOptions::default()
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", api.local_addr());
    for (auth, code) in [
        (None, "local_token_required"),
        (
            Some(format!("Bearer {}", wrong.as_str())),
            "local_token_invalid",
        ),
        (
            Some(format!("Basic {}", token.as_str())),
            "local_token_invalid",
        ),
    ] {
        for (method, path) in [
            (reqwest::Method::GET, "/v1/status"),
            (reqwest::Method::POST, "/v1/lookups"),
            (reqwest::Method::POST, "/v1/sync"),
        ] {
            let mut r = c.request(method, format!("{base}{path}")).json(&body);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{path} {auth:?}");
            assert!(resp.headers().contains_key("www-authenticate"));
            let e: ErrorBody = resp.json().await.unwrap();
            assert_eq!(e.error.code, code, "{path}");
        }
    }
    assert_eq!(outbox_pending(&c, &base, Some(token.as_str())).await, 0);
    let resp = c
        .post(format!("{base}/v1/lookups"))
        .bearer_auth(token.as_str())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r: LookupResponse = resp.json().await.unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
    assert_eq!(outbox_pending(&c, &base, Some(token.as_str())).await, 1);
    // The paramedic page has its own staff id and CSRF checks, not the token.
    let page = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    api.shutdown().await.unwrap();

    // Not required: no header passes, a wrong token does not.
    let api = LocalApi::bind_with(
        agent,
        "127.0.0.1:0".parse().unwrap(),
        ApiOptions {
            auth: LocalAuth::Checked(token.clone()),
            ..ApiOptions::default()
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", api.local_addr());
    let (status, _) = post(&c, &format!("{base}/v1/lookups"), body.clone(), &[]).await;
    assert_eq!(status, 200);
    let bad = format!("Bearer {}", wrong.as_str());
    let (status, code) = post(
        &c,
        &format!("{base}/v1/lookups"),
        body.clone(),
        &[("authorization", bad.as_str())],
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (401, Some("local_token_invalid"))
    );
    assert_eq!(outbox_pending(&c, &base, None).await, 2);
    api.shutdown().await.unwrap();

    // A wipe shreds the token with the rest.
    let path = cpis_agent::local_token::path(dir.path());
    assert!(path.exists());
    cpis_agent::Agent::wipe(dir.path()).unwrap();
    assert!(!path.exists());
}

/// Kills the child process when dropped (a failing test leaves no agent running).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_enrol_takes_the_token_from_one_source_and_run_requires_the_local_token() {
    let env = crate::server::Env::start(chrono::Utc::now()).await;
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &env.ca).unwrap();
    let good = dir.path().join("token");
    std::fs::write(
        &good,
        format!(
            "{}\n",
            env.enrolment_token(1, chrono::Duration::hours(1)).await
        ),
    )
    .unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let enrol = |extra: Vec<String>, env_token: Option<&str>| {
        let mut cmd = std::process::Command::new(bin);
        // A key file: these tests must not touch a real TPM of the machine running them.
        cmd.args([
            "enrol",
            "--keystore",
            "file",
            "--server",
            &env.base,
            "--state-dir",
        ])
        .arg(&state)
        .arg("--ca")
        .arg(&ca)
        .args(extra)
        .env_remove("CPIS_ENROLMENT_TOKEN");
        if let Some(t) = env_token {
            cmd.env("CPIS_ENROLMENT_TOKEN", t);
        }
        cmd
    };
    let run = |mut cmd: std::process::Command| async move {
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    };
    let file = |p: &std::path::Path| vec!["--token-file".to_owned(), p.display().to_string()];
    let flag = vec!["--token".to_owned(), "cpis_et_x".to_owned()];
    for (extra, env_token, says) in [
        (
            vec![],
            None,
            vec!["--token-file", "CPIS_ENROLMENT_TOKEN", "--token TOKEN"],
        ),
        (
            flag.clone(),
            Some("cpis_et_y"),
            vec!["by --token and by CPIS_ENROLMENT_TOKEN"],
        ),
        (
            [flag.clone(), file(&good)].concat(),
            None,
            vec!["by --token and by --token-file"],
        ),
        (
            file(&good),
            Some("cpis_et_y"),
            vec!["by CPIS_ENROLMENT_TOKEN and by --token-file"],
        ),
        (file(&empty), None, vec!["empty", empty.to_str().unwrap()]),
    ] {
        let o = run(enrol(extra.clone(), env_token)).await;
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        for s in says {
            assert!(stderr.contains(s), "{extra:?}: {stderr}");
        }
        assert!(
            !state.exists(),
            "nothing is written before the token is known"
        );
    }
    // The environment alone is one source: the (unknown) token reaches the server.
    let o = run(enrol(vec![], Some("cpis_et_unknown"))).await;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("exactly one"), "{stderr}");
    assert!(stderr.contains("token"), "{stderr}");
    assert!(!state.exists());
    let o = run(enrol(file(&good), None)).await;
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("api.token"), "{stdout}");
    let token_path = cpis_agent::local_token::path(&state);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let token = LocalToken::load(&token_path).unwrap();

    // `run --require-token` keeps that token and asks for it on /v1/*.
    let mut child = Child(
        std::process::Command::new(bin)
            .args([
                "run",
                "--no-confirm",
                "--require-token",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(&state)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the start-up line, then keeps draining so the agent never writes to a closed pipe.
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = tokio::task::spawn_blocking(move || {
        rx.iter()
            .find(|l| l.contains("local API on http://"))
            .expect("run did not start")
    })
    .await
    .unwrap();
    assert!(line.contains("(required)"), "{line}");
    let addr = line
        .split("local API on http://")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    let c = client();
    let resp = c
        .get(format!("http://{addr}/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .get(format!("http://{addr}/v1/status"))
        .bearer_auth(token.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(child);
}
