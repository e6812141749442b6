//! The live feed at scale, against the real `cpis-sync-server` binary: real agents of region
//! A (`cpis_field_tests::fleet`, each with its own loop holding the waiting checkpoint
//! request) beside 10,000 lightweight waiting tablets of region B (one mutual-TLS connection
//! each, holding `GET /v1/device/checkpoint/wait`, taking the delta when answered). Prints:
//! the server's memory per waiting connection; from a region-A council's upload being
//! accepted to every agent answering the new flag (p50, p99, max), beside the polling schedule
//! the same tablets would otherwise wait for (region B's waiters must not wake); then, for a
//! change in region B, how long until all 10,000 were answered and had taken their delta (the
//! herd one change in a big region sets off); then the server restarts, and how the agents
//! came back (spread out by the server's random `Retry-After` and their own jitter) and the
//! next change reached them. Figures are also printed as `RESULT live_*` lines, which
//! `bench-workspace/benchmarks.sh` writes into BENCHMARKS.md.
//!
//! `CPIS_LIVE_AGENTS` (100) and `CPIS_LIVE_WAITERS` (10,000) change the sizes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpis_agent::schedule::ScheduleConfig;
use cpis_field_tests::fleet::{Fleet, FleetOptions, raise_fd_limit, state_root};
use cpis_field_tests::harness::{ServerProcess, Tablet};
use cpis_fixtures::{Config, Dataset};
use cpis_protocol::api::paths;
use cpis_protocol::{Checkpoint, FlagRecord, LookupResult, PlanType, SignedMessage};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::common::{self, ONE_FLEET, metric_sum, percentile};

/// Flags in the region.
const FLAGS: usize = 300;
/// Handshakes of the lightweight waiters in flight at once while they connect.
const CONNECTING: usize = 64;
/// Bound on every tablet holding a change (a failure, not a figure: the goal is 5 s).
const BOUND: Duration = Duration::from_secs(120);

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// Takes the delta from `held` as a tablet would (the body is not applied), honouring a shed
/// answer's `Retry-After`.
async fn take_delta(http: &reqwest::Client, base: &str, held: (u64, u64)) {
    let url = format!("{base}{}?from={}&epoch={}", paths::DELTA, held.1, held.0);
    loop {
        match http.get(&url).send().await {
            Ok(r) if r.status() == 429 || r.status() == 503 => {
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            Ok(r) => {
                let _ = r.bytes().await;
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// One lightweight waiting tablet: holds the waiting request, again and again; when the head
/// moved, takes the delta (as a tablet would) and records when it was done.
async fn waiter(
    http: reqwest::Client,
    base: String,
    key: cpis_protocol::PublicKey,
    mut held: (u64, u64),
    done: Arc<Mutex<Vec<Instant>>>,
    stop: CancellationToken,
) {
    loop {
        let url = format!(
            "{base}{}?epoch={}&after={}&wait=25",
            paths::CHECKPOINT_WAIT,
            held.0,
            held.1
        );
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            r = http.get(&url).send() => r,
        };
        let Ok(r) = answer else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if r.status() != 200 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let Ok(bytes) = r.bytes().await else { continue };
        let cp: Checkpoint = SignedMessage::from_bytes(&bytes)
            .unwrap()
            .open(key.verifying_key())
            .unwrap();
        if (cp.epoch, cp.head_version) != held {
            take_delta(&http, &base, held).await;
            done.lock().unwrap().push(Instant::now());
            held = (cp.epoch, cp.head_version);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_flag_reaches_every_connected_tablet_within_seconds_with_10000_waiting() {
    let _one_fleet_at_a_time = ONE_FLEET.lock().await;
    let seed = common::seed("live");
    let agents = size("CPIS_LIVE_AGENTS", 100);
    let waiters = size("CPIS_LIVE_WAITERS", 10_000);
    let (soft, hard) = raise_fd_limit(65_536).unwrap();
    let need = (waiters + agents * 9 + 1_000) as u64;
    assert!(
        soft >= need,
        "{waiters} waiting connections and {agents} agents need about {need} open files in this \
         process and in the server; the limit is {soft} (hard {hard}): raise it, or set \
         CPIS_LIVE_WAITERS lower"
    );
    // Region A: the real agents. Region B: the lightweight waiters (so each region's change
    // is measured on its own, with the other region's tablets held on the same server).
    let dir = tempfile::TempDir::new().unwrap();
    let as_of = chrono::Utc::now().date_naive();
    let config = Config::new(seed, as_of).with_regions(2).with_councils(10);
    let directory = cpis_fixtures::Directory::generate(&config).unwrap();
    let (a, b) = (directory.regions[0].clone(), directory.regions[1].clone());
    let dataset = Dataset::generate_region(&config, &a.id, FLAGS).unwrap();
    let carried_by_a: BTreeSet<_> = directory.carried_councils(&a.id).into_iter().collect();
    let b_data = Dataset::generate_region(&config, &b.id, 20).unwrap();
    let (b_code, b_list) = b_data
        .flags_by_council
        .iter()
        .find(|(c, l)| !carried_by_a.contains(c) && !l.is_empty())
        .map(|(c, l)| (c.clone(), l.clone()))
        .unwrap();
    let server = ServerProcess::init_and_start_with_env(
        &dir.path().join("server"),
        "127.0.0.1:0".parse().unwrap(),
        &dataset.directory,
        // The lightweight waiters share one client certificate: the per-device rate limit
        // (meant for one misbehaving tablet) would hold 10,000 tablets' deltas to one's rate.
        &[("CPIS_DEVICE_REQUESTS_PER_MINUTE", "0")],
    )
    .await
    .unwrap();
    // Region A's councils' lists; the change later goes to one that region B does not carry
    // (a neighbour council's upload moves both regions' heads).
    let carried_by_b: BTreeSet<_> = directory.carried_councils(&b.id).into_iter().collect();
    let mut head = 0;
    for (c, l) in dataset
        .flags_by_council
        .iter()
        .filter(|(_, l)| !l.is_empty())
    {
        head = server
            .council(c)
            .await
            .unwrap()
            .upload(l)
            .await
            .unwrap()
            .version;
    }
    let (code, list) = dataset
        .flags_by_council
        .iter()
        .filter(|(c, l)| !carried_by_b.contains(c) && !l.is_empty())
        .max_by_key(|(_, l)| l.len())
        .map(|(c, l)| (c.clone(), l.clone()))
        .expect("region A has a council with flags that region B does not carry");
    let council = server.council(&code).await.unwrap();
    let b_council = server.council(&b_code).await.unwrap();
    b_council.upload(&b_list).await.unwrap();
    let token = server
        .enrolment_token(&a.trust, &a.id, u32::try_from(agents).unwrap())
        .await
        .unwrap();

    // The real agents, each holding the live feed (its next poll an hour away).
    let fleet_dir = state_root(1 << 30).unwrap();
    let mut fleet = Fleet::enrol(
        fleet_dir.path(),
        &server.base_url(),
        server.ca_pem(),
        &token,
        FleetOptions {
            agents,
            schedule: ScheduleConfig {
                live: true,
                ..common::schedule()
            },
            seed,
            enrol_parallel: 16,
        },
    )
    .await
    .unwrap();
    fleet.start();
    fleet
        .converge(head, &[], Duration::from_secs(120))
        .await
        .unwrap();

    // The lightweight waiters: one tablet of region B enrolled and synced; its identity on
    // one connection per waiter.
    let b_token = server.enrolment_token(&b.trust, &b.id, 1).await.unwrap();
    let light = Tablet::enrol(
        &fleet_dir.path().join("light"),
        &server.base_url(),
        &server.ca_path(),
        &b_token,
    )
    .await
    .unwrap();
    light.sync().await.unwrap();
    let key = *light.signing_key().unwrap();
    let b_held = {
        let s = light.status().await.unwrap();
        (s.epoch.unwrap(), s.version.unwrap())
    };
    let pid = server.pid().unwrap();
    let rss_before = rss(pid);
    let done = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let mut held = JoinSet::new();
    let started = Instant::now();
    // One TLS configuration, one client (so one connection) per waiter, as tablets have.
    let (cert, key_pem) = cpis_agent::agent::device_identity(light.state_dir()).unwrap();
    let tls = cpis_agent::net::tls_config(server.ca_pem(), Some((&cert, &key_pem))).unwrap();
    for i in 0..waiters {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let (base, done, stop) = (server.base_url(), done.clone(), stop.clone());
        held.spawn(waiter(http, base, key, b_held, done, stop));
        // Let the handshakes through a few at a time.
        if i % CONNECTING == CONNECTING - 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let held_now = loop {
        let m = server.metrics().await.unwrap();
        let n = metric_sum(&m, "cpis_live_waiting", "") as usize;
        if n >= waiters + agents || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        held_now >= waiters + agents,
        "only {held_now} of {} waiting requests held after {:?}",
        waiters + agents,
        started.elapsed()
    );
    let rss_held = rss(pid);
    let per_connection = rss_held.saturating_sub(rss_before) as f64 / waiters as f64;
    eprintln!(
        "[live] {held_now} waiting requests held ({waiters} lightweight + {agents} agents) after \
         {:.1} s; server RSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per waiting connection",
        started.elapsed().as_secs_f64(),
        rss_before as f64 / 1048576.0,
        rss_held as f64 / 1048576.0,
        per_connection / 1024.0,
    );

    // 1. A council of region A puts a new child on a plan: the agents hear of it.
    let mut changed: Vec<FlagRecord> = list.clone();
    let mut new_flag = list[0].clone();
    let flagged: BTreeSet<_> = dataset.flags().map(|f| f.nhs_number).collect();
    new_flag.nhs_number = *cpis_fixtures::test_nhs_numbers()
        .iter()
        .find(|n| !flagged.contains(n))
        .unwrap();
    new_flag.plan_type = PlanType::Cpp;
    changed.push(new_flag.clone());
    changed.sort_by_key(|f| (f.nhs_number, f.plan_type));
    let uploaded = Instant::now();
    let new_head = council.upload(&changed).await.unwrap().version;
    assert!(new_head > head);
    let mut latencies = vec![None; agents];
    loop {
        let now = uploaded.elapsed();
        for (i, m) in fleet.members().iter().enumerate() {
            if latencies[i].is_none() && m.version() >= new_head {
                latencies[i] = Some(now);
            }
        }
        if latencies.iter().all(Option::is_some) {
            break;
        }
        assert!(
            now < BOUND,
            "after {now:?}: {} of {agents} agents have the new head\nserver log:\n{}",
            latencies.iter().filter(|l| l.is_some()).count(),
            server.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each agent answers the new flag (the lookup behind `POST /v1/lookups`).
    for i in 0..agents {
        let answer = fleet.lookup(i, &new_flag.nhs_number.to_string()).unwrap();
        assert_eq!(answer.result, LookupResult::Flagged, "tablet {i}");
    }
    let mut sorted: Vec<Duration> = latencies.into_iter().flatten().collect();
    sorted.sort();
    let poll = ScheduleConfig::default();
    eprintln!(
        "[live] upload accepted -> every agent holding the new flag ({agents} agents; {waiters} \
         more waiting in another region): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (goal p99 \
         <= 5 s); baseline, the same tablets polling on the default schedule: their next poll \
         {}-{} s away",
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.99)),
        ms(*sorted.last().unwrap()),
        poll.interval.as_secs(),
        (poll.interval + poll.interval_jitter).as_secs(),
    );
    assert!(
        done.lock().unwrap().is_empty(),
        "region B's waiters were woken by region A's change"
    );

    // 2. A council of region B changes its list: all 10,000 waiters wake at once and take
    // their deltas (the herd one change in a big region sets off).
    let mut b_changed = b_list.clone();
    b_changed.pop();
    let uploaded = Instant::now();
    b_council.upload(&b_changed).await.unwrap();
    loop {
        let n = done.lock().unwrap().len();
        if n >= waiters {
            break;
        }
        assert!(
            uploaded.elapsed() < BOUND,
            "after {:?}: {n} of {waiters} waiters answered and their delta taken\nserver log:\n{}",
            uploaded.elapsed(),
            server.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut herd: Vec<Duration> = done
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.saturating_duration_since(uploaded))
        .collect();
    herd.sort();
    let m = server.metrics().await.unwrap();
    eprintln!(
        "[live] a change in the waiters' region: {waiters} answered and their deltas taken, \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; requests shed {:.0} (overloaded), waiting \
         answers changed {:.0} unchanged {:.0} full {:.0}",
        ms(percentile(&herd, 0.5)),
        ms(percentile(&herd, 0.99)),
        ms(*herd.last().unwrap()),
        metric_sum(&m, "cpis_shed_requests_total", "overloaded"),
        metric_sum(&m, "cpis_live_answers_total", "outcome=\"changed\""),
        metric_sum(&m, "cpis_live_answers_total", "outcome=\"unchanged\""),
        metric_sum(&m, "cpis_live_answers_total", "outcome=\"full\""),
    );
    println!(
        "RESULT live_memory kib_per_waiting={:.1} held={held_now} rss_before_mib={:.1} \
         rss_held_mib={:.1}",
        per_connection / 1024.0,
        rss_before as f64 / 1048576.0,
        rss_held as f64 / 1048576.0
    );
    println!(
        "RESULT live_latency agents={agents} waiting={waiters} p50_ms={:.0} p99_ms={:.0} \
         max_ms={:.0} poll_min_s={} poll_max_s={}",
        ms(percentile(&sorted, 0.5)),
        ms(percentile(&sorted, 0.99)),
        ms(*sorted.last().unwrap()),
        poll.interval.as_secs(),
        (poll.interval + poll.interval_jitter).as_secs(),
    );
    println!(
        "RESULT live_herd waiters={waiters} p50_ms={:.0} p99_ms={:.0} max_ms={:.0} shed={:.0}",
        ms(percentile(&herd, 0.5)),
        ms(percentile(&herd, 0.99)),
        ms(*herd.last().unwrap()),
        metric_sum(&m, "cpis_shed_requests_total", "overloaded"),
    );
    stop.cancel();
    while held.join_next().await.is_some() {}

    // 3. The server restarts (SIGTERM, then serve again): the waiting agents are answered
    // 503 with a random Retry-After, come back spread out, and hear of the next change.
    let mut server = server;
    let stopping = Instant::now();
    server.stop().await.unwrap();
    let stopped = stopping.elapsed();
    server.start().await.unwrap();
    let restarted = Instant::now();
    eprintln!(
        "[live] restart: stopped in {} ms, serving again {} ms later",
        stopped.as_millis(),
        (restarted - stopping - stopped).as_millis()
    );
    let mut samples: Vec<(Duration, usize)> = Vec::new();
    loop {
        let n = metric_sum(&server.metrics().await.unwrap(), "cpis_live_waiting", "") as usize;
        samples.push((restarted.elapsed(), n));
        if n >= agents {
            break;
        }
        assert!(
            restarted.elapsed() < BOUND,
            "after a restart only {n} of {agents} agents hold a waiting request again after \
             {:?}\nserver log:\n{}",
            restarted.elapsed(),
            server.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[live] agents waiting after the restart (s: count): {}",
        samples
            .iter()
            .step_by(5)
            .map(|(t, n)| format!("{:.1}: {n}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let when = |share: f64| {
        samples
            .iter()
            .find(|(_, n)| *n as f64 >= share * agents as f64)
            .map_or(Duration::ZERO, |(t, _)| *t)
    };
    // The most that came back within any one second.
    let busiest = samples
        .iter()
        .map(|(t, n)| {
            let before = samples
                .iter()
                .rev()
                .find(|(u, _)| *u + Duration::from_secs(1) <= *t)
                .map_or(0, |(_, m)| *m);
            n.saturating_sub(before)
        })
        .max()
        .unwrap_or(0);
    let mut again = changed.clone();
    let mut second = new_flag.clone();
    second.nhs_number = *cpis_fixtures::test_nhs_numbers()
        .iter()
        .find(|n| !flagged.contains(n) && **n != new_flag.nhs_number)
        .unwrap();
    again.push(second.clone());
    again.sort_by_key(|f| (f.nhs_number, f.plan_type));
    let uploaded = Instant::now();
    let third_head = council.upload(&again).await.unwrap().version;
    fleet
        .converge(third_head, &[], BOUND)
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e:#}\n{}", server.log_tail(20)));
    let after_restart = uploaded.elapsed();
    eprintln!(
        "[live] server restarted: agents holding again, half after {:.1} s, all after {:.1} s, \
         at most {busiest} of {agents} in any one second; the next change reached every \
         agent in {:.0} ms",
        when(0.5).as_secs_f64(),
        when(1.0).as_secs_f64(),
        ms(after_restart),
    );
    println!(
        "RESULT live_restart agents={agents} half_s={:.1} all_s={:.1} busiest_second={busiest} \
         next_change_ms={:.0}",
        when(0.5).as_secs_f64(),
        when(1.0).as_secs_f64(),
        ms(after_restart),
    );
    // Spread out, not in step: answered 503 with a random Retry-After (1-30 s), cut (a full
    // jitter of up to 15 s), or, for agents whose sync the restart broke, a first retry spread
    // over up to 15 s too. Before that last rule, release runs saw 56-81 of 100 back within
    // one second; uniform over 15 s, about 7 a second. Release runs since: at most 16; but one
    // debug CI run (2026-12-07, d7e6f1c) saw 46, about 4 s after the restart, cause not yet
    // found (open in issue 16), so the bound is 50: it still catches the clump of 56-81.
    assert!(
        busiest * 100 <= agents * 50,
        "after a restart {busiest} of {agents} agents came back within one second: in step"
    );
    fleet.shutdown().await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
