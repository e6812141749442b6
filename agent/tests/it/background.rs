//! Opportunistic sync end to end against the real server in process: an agent `run`
//! (service: local API + background loop) looks up offline, reconnects and delivers every
//! event, each notice landing once in the right council's mailbox; online confirmation of a
//! miss finds another region's flag, and falls back to the regional answer within its bound
//! when the server never answers; rejected events are set aside; recent contacts reach
//! another tablet and are shown offline; revocation under `run`; the device report; kill -9
//! of `cpis-agent sync` mid-upload.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cpis_agent::background::LoopConfig;
use cpis_agent::schedule::ScheduleConfig;
use cpis_agent::service::{RunConfig, Service};
use cpis_agent::{Agent, Clock, LookupInput, SystemClock};
use cpis_protocol::local::{LookupResponse, StatusResponse};
use cpis_protocol::{EventId, LookupResult};
use cpis_sync_server::store::Store as _;

use crate::proxy::Proxy;
use crate::server::*;

fn fast_loop() -> LoopConfig {
    let seed = 0x0bac_c0ff;
    eprintln!("loop seed: {seed:#x}");
    LoopConfig {
        schedule: ScheduleConfig {
            interval: Duration::from_secs(3600),
            interval_jitter: Duration::from_secs(1),
            soon: Duration::from_millis(100),
            min_gap: Duration::from_millis(50),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_millis(800),
            retry_after_max: Duration::from_secs(5),
            // These tests drive the polling loop; the live feed has its own.
            live: false,
            ..ScheduleConfig::default()
        },
        seed,
        housekeeping: Duration::from_secs(3600),
    }
}

async fn enrol_via(env: &Env, base: &str, dir: &std::path::Path, clock: Arc<dyn Clock>) -> Agent {
    let token = env.enrolment_token(1, chrono::Duration::hours(1)).await;
    cpis_agent::sync::enrol(dir, base, &env.ca, &token, None, clock)
        .await
        .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn api_lookup(svc: &Service, n: &str) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!("http://{}/v1/lookups", svc.local_addr()))
        .json(&serde_json::json!({"nhs_number": n, "staff_id": "P1"}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn api_status(svc: &Service) -> StatusResponse {
    http()
        .get(format!("http://{}/v1/status", svc.local_addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (bounded) until the status satisfies `done`, polling the API.
async fn until(
    svc: &Service,
    what: &str,
    done: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = api_status(svc).await;
        if done(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn once_each(ids: &[EventId]) -> BTreeMap<EventId, usize> {
    let mut m = BTreeMap::new();
    for i in ids {
        *m.entry(*i).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_lookups_are_delivered_by_the_loop_after_reconnect_with_one_notice_each() {
    let env = Env::start(Utc::now()).await;
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
    let agent = Arc::new(enrol_via(&env, &proxy.base, dir.path(), Arc::new(SystemClock)).await);
    let bound = Duration::from_millis(1500);
    let svc = Service::start(
        agent.clone(),
        RunConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            sync: fast_loop(),
            confirm_bound: Some(bound),
        },
    )
    .await
    .unwrap();
    // The loop syncs at start, then plans the next attempt (shown in status).
    until(&svc, "the first sync and the next planned", |s| {
        s.version.is_some() && s.next_sync_at.is_some() && s.last_sync_success.is_some()
    })
    .await;

    proxy.go_offline();
    let mut flagged: BTreeMap<&str, Vec<EventId>> = BTreeMap::new();
    let mut all = Vec::new();
    for i in 0..24u32 {
        let n = nhs(i % 6);
        let started = std::time::Instant::now();
        let (code, body) = api_lookup(&svc, &n.to_string()).await;
        assert_eq!(code, 200, "{body}");
        let r: LookupResponse = serde_json::from_value(body).unwrap();
        all.push(r.event_id);
        match i % 6 {
            0 | 1 => {
                assert_eq!(r.result, LookupResult::Flagged);
                flagged.entry(LEICS).or_default().push(r.event_id);
            }
            2 => {
                assert_eq!(r.result, LookupResult::Flagged);
                flagged.entry(NOTTS).or_default().push(r.event_id);
            }
            _ => {
                // A miss offline: the regional answer, naming what it covered, within the bound.
                assert!(started.elapsed() < bound + Duration::from_millis(500));
                assert_eq!(r.result, LookupResult::NotFlagged);
                assert!(r.national.is_none());
                let w = r
                    .warnings
                    .iter()
                    .find(|w| w.code == "national_check_unavailable")
                    .expect("the answer says the national check did not answer");
                assert!(w.message.contains("region EM"), "{}", w.message);
                assert!(w.message.contains(LEICS) && w.message.contains(NOTTS));
            }
        }
    }
    // The lookups triggered attempts, which fail and back off.
    let s = until(&svc, "a failed attempt", |s| {
        s.consecutive_failures > 0 && s.next_sync_at.is_some()
    })
    .await;
    assert_eq!(s.outbox_pending, 24);
    assert!(s.last_sync_error.is_some());

    proxy.heal();
    // Delivered, and the loop's failures reset (recorded just after the attempt).
    let s = until(&svc, "the outbox to drain", |s| {
        s.outbox_pending == 0 && s.consecutive_failures == 0
    })
    .await;
    assert_eq!(s.outbox_set_aside, 0);
    assert!(s.last_sync_error.is_none());
    for id in &all {
        assert!(
            env.handle
                .store()
                .stored_event(*id)
                .await
                .unwrap()
                .is_some(),
            "event {id} not on the server"
        );
    }
    for ods in [LEICS, NOTTS] {
        let notices: Vec<EventId> = env.mailbox(ods).await.iter().map(|n| n.event_id).collect();
        let counts = once_each(&notices);
        assert!(counts.values().all(|c| *c == 1), "{ods}: {counts:?}");
        let want: BTreeSet<EventId> = flagged[ods].iter().copied().collect();
        let got: BTreeSet<EventId> = counts.keys().copied().collect();
        assert_eq!(got, want, "{ods} got exactly its flagged lookups");
    }
    // The device reported to the fleet view after its sync.
    let fleet = env.handle.store().fleet().await.unwrap();
    let me = fleet
        .iter()
        .find(|f| f.device.id == agent.enrolment().device_id)
        .unwrap();
    let report = me.report.as_ref().expect("a device report was stored");
    assert_eq!(report.report.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(report.report.data_version.is_some());
    svc.shutdown().await.unwrap();
}

/// The live feed end to end: a running tablet whose next poll is an hour away has a
/// council's new flag within seconds of the upload, through its waiting request; and the
/// same tablet with `--no-live` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tablet_has_a_new_flag_within_seconds_through_the_live_feed() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let mut heads = Vec::new();
    for live in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let agent = Arc::new(enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await);
        let mut sync = fast_loop();
        sync.schedule.live = live;
        let svc = Service::start(
            agent,
            RunConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                sync,
                // No online check: only the tablet's own data answers.
                confirm_bound: None,
            },
        )
        .await
        .unwrap();
        until(&svc, "the first sync", |s| s.version.is_some()).await;
        heads.push((svc, dir));
    }
    // Let the waiting request be held, then a council adds a flag.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = api_status(&heads[0].0).await.version.unwrap();
    let started = std::time::Instant::now();
    env.upload(
        LEICS,
        &[
            (nhs(0), "CPP", "2026-01-10", ""),
            (nhs(5), "LAC", "2026-03-01", ""),
        ],
    )
    .await;
    let (live, _) = &heads[0];
    let s = until(live, "the live tablet to take the new head", |s| {
        s.version.is_some_and(|v| v > before)
    })
    .await;
    let took = started.elapsed();
    eprintln!(
        "upload accepted -> live tablet at version {:?}: {took:?}",
        s.version
    );
    let (code, body) = api_lookup(live, &nhs(5).to_string()).await;
    assert_eq!(code, 200, "{body}");
    let r: LookupResponse = serde_json::from_value(body).unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
    // The tablet without the live feed still holds the old head (its next poll is an hour
    // away), which is what the waiting request saved.
    let (polling, _) = &heads[1];
    assert_eq!(api_status(polling).await.version, Some(before));
    for (svc, _) in heads {
        svc.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_confirmation_finds_another_regions_flag_and_records_the_access() {
    let mut env = Env::start(Utc::now()).await;
    with_another_region(&mut env).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await);
    let svc = Service::start(
        agent.clone(),
        RunConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            sync: fast_loop(),
            confirm_bound: Some(Duration::from_secs(10)),
        },
    )
    .await
    .unwrap();
    until(&svc, "the first sync", |s| s.version.is_some()).await;

    let (code, body) = api_lookup(&svc, &nhs(7).to_string()).await;
    assert_eq!(code, 200, "{body}");
    let r: LookupResponse = serde_json::from_value(body).unwrap();
    assert_eq!(r.result, LookupResult::Flagged, "{r:?}");
    let national = r.national.as_ref().unwrap();
    assert_eq!(national.result, LookupResult::Flagged);
    assert_eq!(national.councils_covered, 3);
    assert_eq!(r.flags.len(), 1);
    assert_eq!(r.flags[0].council.ods.as_str(), LANCS);
    assert_eq!(r.flags[0].council.emergency_phone, "01772 000 000");
    assert!(r.warnings.iter().any(|w| w.code == "national_match"));
    // A national miss says so.
    let (_, body) = api_lookup(&svc, &nhs(9).to_string()).await;
    let miss: LookupResponse = serde_json::from_value(body).unwrap();
    assert_eq!(miss.result, LookupResult::NotFlagged);
    assert_eq!(
        miss.national.as_ref().unwrap().result,
        LookupResult::NotFlagged
    );
    assert!(miss.warnings.iter().any(|w| w.code == "national_miss"));

    // The outbox copy is uploaded as usual; Lancashire is told once.
    until(&svc, "the outbox to drain", |s| s.outbox_pending == 0).await;
    let notices = env.mailbox(LANCS).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].event_id, r.event_id);
    assert!(env.mailbox(LEICS).await.is_empty());
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_that_never_answers_falls_back_to_the_regional_answer_within_the_bound() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let proxy = Proxy::start(env.handle.local_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = enrol_via(&env, &proxy.base, dir.path(), Arc::new(SystemClock)).await;
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    // The server's address now accepts connections and never answers.
    proxy.blackhole();
    let (local, event) = agent
        .lookup_recorded(LookupInput {
            nhs_number: &nhs(5).to_string(),
            staff_id: None,
            incident_ref: None,
        })
        .unwrap();
    let bound = Duration::from_millis(400);
    let started = std::time::Instant::now();
    let (r, checked) = cpis_agent::confirm::confirm_miss(&agent, local, &event, bound).await;
    let took = started.elapsed();
    assert!(
        took >= bound && took < bound + Duration::from_millis(400),
        "{took:?}"
    );
    assert_eq!(checked, cpis_agent::confirm::Checked::NoAnswer);
    assert_eq!(r.result, LookupResult::NotFlagged);
    assert!(r.national.is_none());
    assert!(
        r.warnings
            .iter()
            .any(|w| w.code == "national_check_unavailable" && w.message.contains(LEICS))
    );
    // The event is in the outbox, durably, as recorded.
    assert_eq!(agent.pending_events(10).unwrap()[0].event_id, r.event_id);

    // The command line, bounded the same way.
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let state = dir.path().to_owned();
    drop(agent);
    let n = nhs(6).to_string();
    let (out, took) = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(bin)
            .args(["lookup", "--confirm-timeout-ms", "500", "--state-dir"])
            .arg(&state)
            .arg(&n)
            .output()
            .unwrap();
        (out, started.elapsed())
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("NOT FLAGGED"), "{stdout}");
    assert!(stdout.contains("did not answer within 0.5 s"), "{stdout}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_is_set_aside_and_the_queue_drains() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await;
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let look = |n: u32| {
        agent
            .lookup(LookupInput {
                nhs_number: &nhs(n).to_string(),
                staff_id: None,
                incident_ref: None,
            })
            .unwrap()
    };
    // A staff id beyond the server's limit: the server refuses that event for good.
    let bad = agent
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            staff_id: Some("X".repeat(300)),
            incident_ref: None,
        })
        .unwrap()
        .event_id;
    let good: Vec<EventId> = (0..3).map(|i| look(i).event_id).collect();
    let r = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.events_sent, 3);
    let s = agent.status().unwrap();
    assert_eq!((s.outbox_pending, s.outbox_set_aside), (0, 1));
    assert!(s.warnings.iter().any(|w| w.code == "outbox_set_aside"));
    assert!(
        env.handle
            .store()
            .stored_event(bad)
            .await
            .unwrap()
            .is_none()
    );
    for id in &good {
        assert!(
            env.handle
                .store()
                .stored_event(*id)
                .await
                .unwrap()
                .is_some()
        );
    }
    // Never re-sent; later events still go.
    look(1);
    let r = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.events_sent, 1);
    let w = look(2).warnings;
    assert!(w.iter().any(|w| w.code == "outbox_set_aside"), "{w:?}");
    assert_eq!(agent.outbox_counts().unwrap(), (1, 1));
}

/// The server sheds the access-event upload of a sync whose feed went through (here with
/// `429` from the per-device rate limit): the loop's attempt counts as failed with the
/// server's `Retry-After`, so the notice goes out after it rather than at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_event_upload_is_retried_after_its_retry_after() {
    use cpis_agent::background::{AgentWorker, Outcome, Worker as _};
    // A first sync makes 4 device requests (checkpoint, snapshot meta, snapshot body,
    // report); the attempt's checkpoint is the 5th and its event upload the 6th.
    let env = Env::start_with(Utc::now(), |c| {
        c.load_shedding.device_requests_per_minute = 1;
        c.load_shedding.device_burst = 5;
    })
    .await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await);
    let first = cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(first.action, "snapshot");
    agent
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            staff_id: Some("P1".into()),
            incident_ref: None,
        })
        .unwrap();
    let outcome = AgentWorker::new(agent.clone()).attempt().await;
    match outcome {
        Outcome::Failed { error, retry_after } => {
            assert!(
                error.contains("data synced; access events not sent"),
                "{error}"
            );
            let wait = retry_after.expect("the server's Retry-After");
            assert!(wait >= Duration::from_secs(30), "{wait:?}");
        }
        other => panic!("expected a failed attempt with Retry-After, got {other:?}"),
    }
    // Nothing lost: the notice waits in the outbox; the data is in.
    assert_eq!(agent.outbox_counts().unwrap(), (1, 0));
    assert_eq!(agent.status().unwrap().version, first.version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_contacts_from_another_tablet_are_shown_offline() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = enrol_via(&env, &env.base, da.path(), Arc::new(SystemClock)).await;
    let b = enrol_via(&env, &env.base, db.path(), Arc::new(SystemClock)).await;
    for t in [&a, &b] {
        cpis_agent::sync::sync_once(t, &|_, _| {}).await.unwrap();
    }
    let before = b
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            ..Default::default()
        })
        .unwrap();
    assert!(before.recent_contacts.is_empty());
    // Tablet A sees the child; its event reaches the server.
    a.lookup(LookupInput {
        nhs_number: &nhs(0).to_string(),
        ..Default::default()
    })
    .unwrap();
    cpis_agent::sync::sync_once(&a, &|_, _| {}).await.unwrap();
    // Tablet B syncs (a delta carrying the contacts), then answers offline.
    let r = cpis_agent::sync::sync_once(&b, &|_, _| {}).await.unwrap();
    assert_eq!(r.action, "delta");
    drop(b);
    env.handle.shutdown();
    let b = Agent::open(db.path(), Arc::new(SystemClock)).unwrap();
    let r = b
        .lookup(LookupInput {
            nhs_number: &nhs(0).to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
    // B's own earlier lookup also went nowhere yet; A's is the one the server recorded.
    assert!(!r.recent_contacts.is_empty(), "{r:?}");
    let c = &r.recent_contacts[0];
    assert_eq!(c.organisation.ods.as_str(), "ZA1");
    assert_eq!(c.date, Utc::now().date_naive());
    // And in the text answer.
    drop(b);
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let out = std::process::Command::new(bin)
        .args(["lookup", "--offline", "--state-dir"])
        .arg(db.path())
        .arg(nhs(0).to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Recent contacts"), "{stdout}");
    assert!(
        stdout.contains("Test Ambulance Trust (ZA1), ambulance"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_under_run_shreds_itself_and_answers_not_enrolled() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await);
    let svc = Service::start(
        agent.clone(),
        RunConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            sync: fast_loop(),
            confirm_bound: None,
        },
    )
    .await
    .unwrap();
    until(&svc, "the first sync", |s| s.version.is_some()).await;
    let (code, _) = api_lookup(&svc, &nhs(0).to_string()).await;
    assert_eq!(code, 200);
    env.handle
        .store()
        .revoke_device(agent.enrolment().device_id, env.now())
        .await
        .unwrap();
    let r = http()
        .post(format!("http://{}/v1/sync", svc.local_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let (code, body) = api_lookup(&svc, &nhs(0).to_string()).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_enrolled");
    assert!(body.get("result").is_none(), "no data after a wipe: {body}");
    assert!(!dir.path().join("keys/master.key").exists());
    assert!(!dir.path().join("flags.db").exists());
    let r = http()
        .get(format!("http://{}/v1/status", svc.local_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_then_sync_again_stores_each_event_and_notice_once() {
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = enrol_via(&env, &env.base, dir.path(), Arc::new(SystemClock)).await;
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut flagged = BTreeSet::new();
    for i in 0..1600u32 {
        let r = agent
            .lookup(LookupInput {
                nhs_number: &nhs(i % 4).to_string(),
                ..Default::default()
            })
            .unwrap();
        if i % 4 == 0 {
            flagged.insert(r.event_id);
        }
        ids.push(r.event_id);
    }
    drop(agent);
    let bin = env!("CARGO_BIN_EXE_cpis-agent");
    let mut child = std::process::Command::new(bin)
        .args(["sync", "--state-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the server holds some, not all, of the events (or whenever it ends).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut mid = false;
    loop {
        let mut stored = 0;
        for id in ids.iter().step_by(100) {
            if env
                .handle
                .store()
                .stored_event(*id)
                .await
                .unwrap()
                .is_some()
            {
                stored += 1;
            }
        }
        if stored > 0 {
            mid = stored < ids.len().div_ceil(100);
            break;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    eprintln!("killed mid-upload: {mid}");

    let agent = Agent::open(dir.path(), Arc::new(SystemClock)).unwrap();
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(agent.outbox_counts().unwrap(), (0, 0));
    for id in &ids {
        assert!(
            env.handle
                .store()
                .stored_event(*id)
                .await
                .unwrap()
                .is_some()
        );
    }
    let notices: Vec<EventId> = env
        .mailbox(LEICS)
        .await
        .iter()
        .map(|n| n.event_id)
        .collect();
    let counts = once_each(&notices);
    assert!(counts.values().all(|c| *c == 1));
    assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), flagged);
}
