//! The fleet under load: 2,000 real agents in this process (`cpis_field_tests::fleet`)
//! against the real `cpis-sync-server` binary, through the fault proxy (the tablets' network).
//! One fleet (enrolling and converging 2,000 tablets is the costly part), two storms:
//!
//! * (a) Reconnect storm: the network goes (the proxy refuses every connection; every tablet's
//!   poll fails) while a council uploads and crews look children up offline, then it comes
//!   back and every tablet reconnects at once. The server sheds with `503` (saturated) and
//!   `429` (tablets whose ePR app keeps asking for a sync), each with a `Retry-After` the
//!   tablets honour (no attempt starts before it elapsed); `/healthz` answers 200
//!   throughout (latency printed); every tablet converges to the head with its outbox empty
//!   within a bound; and the only errors are the intended ones (shed answers, and refused
//!   connections while the network was down).
//! * (b, c) A revoked tablet in the fleet wipes, council isolation holds under load: a second
//!   outage with lookups of children flagged by four councils; the network returns and,
//!   during the storm, 1% of the tablets are revoked with `admin device revoke` — at their
//!   next contact they shred their state and refuse lookups with `not_enrolled` — while the
//!   rest converge. The councils list their mailboxes concurrently all along: each listing
//!   holds only notices owed to that council, none twice; in the end every notice owed (both
//!   storms' lookups) has arrived exactly once.
//!
//! The server runs with 16 request slots: 2,000 tablets against 16 slots is the pressure of
//! 100,000 tablets against the default 1,024 (about 125 tablets a slot). `CPIS_FLEET_AGENTS`
//! changes the fleet's size (2,000 by default).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cpis_agent::AgentError;
use cpis_field_tests::fleet::{Counts, Fleet, FleetOptions, raise_fd_limit, state_root};
use cpis_field_tests::harness::{ServerProcess, https_client};
use cpis_field_tests::proxy::{Faults, Proxy, ProxyHandle};
use cpis_fixtures::{Config, Dataset};
use cpis_protocol::mailbox::{Notification, NotificationPage};
use cpis_protocol::{
    CouncilCode, EventId, FlagRecord, LookupResult, NhsNumber, RegionId, TrustCode,
};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;

use crate::common::{self, ONE_FLEET, delta, fleet_size, metric_sum, percentile, schedule};

/// Flags in the region: a few hundred, so 2,000 snapshot installs stay cheap.
const FLAGS: usize = 300;
/// Open files wanted: each agent holds two SQLite databases in WAL mode (6 files) and a
/// connection while it syncs (3 through the proxy); the server inherits the limit.
const FDS_WANTED: u64 = 65_536;
/// Open files per agent at the peak: 6 for its two databases, 3 for a sync's connection
/// through the proxy (measured: 12,015 open with 2,000 agents idle).
const FDS_PER_AGENT: u64 = 9;
/// Room the tablets' state directories need (about 200 KB each, with margin).
const FLEET_ROOM: u64 = 2 << 30;

/// Bound on the fleet's first convergence (enrolment done; every tablet's first snapshot).
const FIRST_BOUND: Duration = Duration::from_secs(90);
/// Bound on convergence after the network comes back.
const STORM_BOUND: Duration = Duration::from_secs(90);
/// How long chatty tablets keep asking for syncs after the rest converged, at most.
const CHATTER_BOUND: Duration = Duration::from_secs(30);

/// The server's settings for the scenarios: 16 request slots, 503 `Retry-After` at most
/// 10 s, and a tight per-device rate (a burst of 6, one request every 2 s) so tablets whose
/// ePR app keeps asking for a sync (at most one attempt a second, each at least one
/// request) are told `429`.
const SERVER_ENV: [(&str, &str); 4] = [
    ("CPIS_MAX_CONCURRENT_REQUESTS", "16"),
    ("CPIS_SHED_RETRY_AFTER_MAX_SECS", "10"),
    ("CPIS_DEVICE_BURST", "6"),
    ("CPIS_DEVICE_REQUESTS_PER_MINUTE", "30"),
];

/// A server with one region of flags, the proxy that is the tablets' network, and an
/// enrolled fleet whose loops run.
struct Storm {
    seed: u64,
    dir: TempDir,
    fleet_dir: TempDir,
    _one_fleet_at_a_time: tokio::sync::MutexGuard<'static, ()>,
    server: ServerProcess,
    proxy: ProxyHandle,
    region: RegionId,
    trust: TrustCode,
    carried: BTreeSet<CouncilCode>,
    /// Every carried council's current list and its token.
    lists: BTreeMap<CouncilCode, Vec<FlagRecord>>,
    tokens: BTreeMap<CouncilCode, String>,
    /// The region's version after its last upload.
    head: u64,
    fleet: Fleet,
}

impl Storm {
    async fn start(scenario: &str) -> Storm {
        // Two fleets at once would need twice the open files and share two cores.
        let one_at_a_time = ONE_FLEET.lock().await;
        let seed = common::seed(scenario);
        let (soft, hard) = raise_fd_limit(FDS_WANTED).unwrap();
        let agents = fleet_size();
        eprintln!("[{scenario}] {agents} agents, open files limit {soft} (hard {hard})");
        let need = agents as u64 * FDS_PER_AGENT + 1_000;
        assert!(
            soft >= need,
            "{agents} agents need about {need} open files in this process; the limit is {soft} \
             (hard {hard}): raise it (ulimit -Hn) or set CPIS_FLEET_AGENTS lower"
        );
        let dir = TempDir::new().unwrap();
        let as_of = chrono::Utc::now().date_naive();
        let config = Config::new(seed, as_of).with_regions(2).with_councils(6);
        let directory = cpis_fixtures::Directory::generate(&config).unwrap();
        let region = directory.regions[0].clone();
        let carried: BTreeSet<CouncilCode> = directory
            .carried_councils(&region.id)
            .into_iter()
            .cloned()
            .collect();
        let dataset = Dataset::generate_region(&config, &region.id, FLAGS).unwrap();
        let server = ServerProcess::init_and_start_with_env(
            &dir.path().join("server"),
            "127.0.0.1:0".parse().unwrap(),
            &dataset.directory,
            &SERVER_ENV,
        )
        .await
        .unwrap();
        let proxy = Proxy::start_seeded(server.addr(), Faults::none(), seed)
            .await
            .unwrap();
        let mut storm_lists = BTreeMap::new();
        let mut tokens = BTreeMap::new();
        let mut head = 0;
        for (code, list) in &dataset.flags_by_council {
            if !carried.contains(code) {
                continue;
            }
            let council = server.council(code).await.unwrap();
            if !list.is_empty() {
                head = head.max(council.upload(list).await.unwrap().version);
            }
            tokens.insert(code.clone(), server.council_token(code).await.unwrap());
            storm_lists.insert(code.clone(), list.clone());
        }
        let token = server
            .enrolment_token(&region.trust, &region.id, u32::try_from(agents).unwrap())
            .await
            .unwrap();
        let started = Instant::now();
        let fleet_dir = state_root(FLEET_ROOM).unwrap();
        eprintln!(
            "[{scenario}] tablets' state directories in {}",
            fleet_dir.path().display()
        );
        let fleet = Fleet::enrol(
            fleet_dir.path(),
            &format!("https://127.0.0.1:{}", proxy.local_addr().port()),
            server.ca_pem(),
            &token,
            FleetOptions {
                agents,
                schedule: schedule(),
                seed,
                enrol_parallel: 32,
            },
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "enrolling the fleet (seed {seed}): {e:#}\nserver log:\n{}",
                server.log_tail(20)
            )
        });
        eprintln!(
            "[{scenario}] enrolled {agents} tablets in {:.1} s ({} enrolments shed and retried); \
             region {} with {} flags from {} councils, head {head}",
            started.elapsed().as_secs_f64(),
            fleet.counts().enrol_shed,
            region.id,
            storm_lists.values().map(Vec::len).sum::<usize>(),
            storm_lists.values().filter(|l| !l.is_empty()).count(),
        );
        let mut storm = Storm {
            seed,
            dir,
            fleet_dir,
            _one_fleet_at_a_time: one_at_a_time,
            server,
            proxy,
            region: region.id.clone(),
            trust: region.trust.clone(),
            carried,
            lists: storm_lists,
            tokens,
            head,
            fleet,
        };
        storm.fleet.start();
        let took = storm.converge(&[], FIRST_BOUND).await;
        eprintln!(
            "[{scenario}] first sync of every tablet (snapshot install) in {:.1} s: {}; \
             {} files open in this process",
            took.as_secs_f64(),
            storm.fleet.counts(),
            std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count),
        );
        storm
    }

    /// Waits for the fleet to converge to the head (the revoked ones to wipe).
    async fn converge(&self, revoked: &[usize], bound: Duration) -> Duration {
        let seed = self.seed;
        self.fleet
            .converge(self.head, revoked, bound)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "(seed {seed}) {e:#}\nserver log:\n{}",
                    self.server.log_tail(20)
                )
            })
    }

    /// Changes `n` flags of the council with the most (new start dates on existing flags are
    /// updates; it is the change that matters); returns the new head.
    async fn council_changes(&mut self, rng: &mut ChaCha8Rng, n: usize) -> u64 {
        let (code, mut list) = self
            .lists
            .iter()
            .max_by_key(|(_, l)| l.len())
            .map(|(c, l)| (c.clone(), l.clone()))
            .unwrap();
        let removed = n.min(list.len() / 2);
        list.shuffle(rng);
        list.truncate(list.len() - removed);
        list.sort_by_key(|f| (f.nhs_number, f.plan_type));
        let council = self.server.council(&code).await.unwrap();
        let receipt = council.upload(&list).await.unwrap();
        assert_eq!(receipt.counts.removed, removed as u64, "seed {}", self.seed);
        self.lists.insert(code, list);
        self.head = self.head.max(receipt.version);
        self.head
    }

    /// Every NHS number flagged in the region now.
    fn flagged(&self) -> BTreeSet<NhsNumber> {
        self.lists
            .iter()
            .filter(|(c, _)| self.carried.contains(*c))
            .flat_map(|(_, l)| l.iter().map(|f| f.nhs_number))
            .collect()
    }

    /// The server's `/metrics`, from its own loopback listener (never shed).
    async fn metrics(&self) -> String {
        self.server.metrics().await.unwrap()
    }

    /// Checks a sample of tablets hold exactly the region's flagged subjects.
    fn check_data(&self, rng: &mut ChaCha8Rng, sample: usize, skip: &[usize]) {
        let subjects = self.flagged().len() as u64;
        let members: Vec<_> = self
            .fleet
            .members()
            .iter()
            .filter(|m| !skip.contains(&m.index))
            .collect();
        for m in members.choose_multiple(rng, sample) {
            let st = m.agent().status().unwrap();
            assert_eq!(
                st.subjects, subjects,
                "tablet {} holds the wrong number of subjects (seed {})",
                m.index, self.seed
            );
            assert!(st.version.unwrap_or(0) >= self.head);
        }
    }
}

/// `GET /healthz` from a thread of its own (its own runtime, so the fleet's work in this
/// process does not delay its timer more than the shared CPU does), every 20 ms until
/// stopped. Returns (latencies of 200 answers, every other outcome).
struct HealthPoller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Duration>, Vec<String>)>,
}

impl HealthPoller {
    fn start(server: &ServerProcess) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{}/healthz", server.base_url());
        let ca = server.ca_pem().to_owned();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let http = https_client(&ca, None, Duration::from_secs(10)).unwrap();
                let (mut ok, mut bad) = (Vec::new(), Vec::new());
                while !flag.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok.push(t.elapsed()),
                        Ok(r) => bad.push(format!("status {}", r.status())),
                        Err(e) => bad.push(format!("{e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, bad)
            })
        });
        Self { stop, thread }
    }

    fn finish(self) -> (Vec<Duration>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The outage: the proxy refuses every connection; every tablet's loop is asked for a sync
/// (as its poll would) and fails, so all of them are backing off when the network returns.
async fn outage(storm: &Storm) -> Counts {
    storm
        .proxy
        .set_faults(Faults::none().with_refuse(true))
        .await
        .unwrap();
    storm.fleet.network_gone();
    let before = storm.fleet.counts();
    let n = storm.fleet.members().len();
    let mut polls = tokio::task::JoinSet::new();
    for i in 0..n {
        let fleet = &storm.fleet;
        let handle = fleet.sync_handle(i);
        polls.spawn(async move {
            if let Some(h) = handle {
                h.sync_now().await;
            }
        });
    }
    while polls.join_next().await.is_some() {}
    let during = delta(&before, &storm.fleet.counts());
    assert!(
        during.unreachable >= n as u64,
        "every tablet failed to connect during the outage: {during} (seed {})",
        storm.seed
    );
    during
}

/// Notices owed to each council: the events of flagged lookups showing its flags.
type Owed = BTreeMap<CouncilCode, BTreeSet<EventId>>;

fn owe(owed: &mut Owed, answer: &cpis_protocol::local::LookupResponse) {
    for f in &answer.flags {
        owed.entry(f.council.ods.clone())
            .or_default()
            .insert(answer.event_id);
    }
}

/// One fleet of 2,000 (enrolled and converged once, the costly part), two storms: the
/// reconnect storm, then revocations and council isolation under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_of_2000_reconnects_at_once_revoked_tablets_wipe_councils_stay_isolated() {
    let started = Instant::now();
    let mut storm = Storm::start("fleet-storm").await;
    let mut rng = ChaCha8Rng::seed_from_u64(storm.seed);
    let mut owed = Owed::new();
    reconnect_storm(&mut storm, &mut rng, &mut owed).await;
    revocations_and_council_isolation(&mut storm, &mut rng, &mut owed).await;
    storm.fleet.shutdown().await;
    eprintln!(
        "[fleet-storm] whole scenario {:.1} s (seed {})",
        started.elapsed().as_secs_f64(),
        storm.seed
    );
    let _ = (&storm.dir, &storm.fleet_dir, &storm.region, &storm.trust);
}

/// (a) The reconnect storm.
async fn reconnect_storm(storm: &mut Storm, rng: &mut ChaCha8Rng, owed: &mut Owed) {
    let seed = storm.seed;
    let n = storm.fleet.members().len();

    // The network goes. Councils upload meanwhile; crews look children up offline.
    let during = outage(storm).await;
    let head = storm.council_changes(rng, 20).await;
    let flagged: Vec<NhsNumber> = storm.flagged().into_iter().collect();
    let mut lookups = 0;
    for i in (0..n).step_by(10) {
        let nhs = flagged.choose(rng).unwrap().to_string();
        let answer = storm.fleet.lookup(i, &nhs).unwrap();
        assert_eq!(answer.result, LookupResult::Flagged, "seed {seed}");
        owe(owed, &answer);
        lookups += 1;
    }
    eprintln!("[fleet-storm] outage: {during}; new head {head}; {lookups} lookups offline");

    // The network comes back: every tablet reconnects at once.
    let health = HealthPoller::start(&storm.server);
    let before = storm.fleet.counts();
    let metrics_before = storm.metrics().await;
    storm.proxy.set_faults(Faults::none()).await.unwrap();
    let started = Instant::now();
    storm.fleet.network_back();
    // Some crews' ePR apps ask for a sync over and over while it happens (POST /v1/sync):
    // the tablet's loop never starts two attempts less than a second apart, nor before a
    // Retry-After, but each attempt that gets through spends several requests.
    let chatty: Vec<usize> = (0..n).step_by(100).collect();
    let chatter_stop = Arc::new(AtomicBool::new(false));
    let mut chatter = tokio::task::JoinSet::new();
    for &i in &chatty {
        let handle = storm.fleet.sync_handle(i).unwrap();
        let stop = chatter_stop.clone();
        chatter.spawn(async move {
            let mut asked = 0u32;
            while !stop.load(Ordering::Relaxed) {
                handle.sync_now().await;
                asked += 1;
            }
            asked
        });
    }
    let calm: Vec<usize> = (0..n).filter(|i| !chatty.contains(i)).collect();
    storm
        .fleet
        .converge_some(head, &calm, &[], STORM_BOUND)
        .await
        .unwrap_or_else(|e| panic!("(seed {seed}) {e:#}\n{}", storm.server.log_tail(20)));
    let calm_at = started.elapsed();
    // The chatty tablets keep asking, the server no longer saturated, until each has been
    // told 429 about once (at most 30 s more).
    let chatter_until = Instant::now() + CHATTER_BOUND;
    while storm.fleet.counts().shed_429 - before.shed_429 < chatty.len() as u64
        && Instant::now() < chatter_until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    chatter_stop.store(true, Ordering::Relaxed);
    let mut asked = 0;
    while let Some(a) = chatter.join_next().await {
        asked += a.unwrap();
    }
    storm.converge(&[], STORM_BOUND).await;
    let all_at = started.elapsed();
    let (ok, bad) = health.finish();
    let after = storm.fleet.counts();
    let storm_counts = delta(&before, &after);
    let metrics = storm.metrics().await;

    // Figures.
    let mut lat = ok.clone();
    lat.sort();
    let requests = metric_sum(&metrics, "cpis_http_requests_total", "/v1/device")
        - metric_sum(&metrics_before, "cpis_http_requests_total", "/v1/device");
    let served_503 = metric_sum(&metrics, "cpis_shed_requests_total", "overloaded")
        - metric_sum(&metrics_before, "cpis_shed_requests_total", "overloaded");
    let served_429 = metric_sum(&metrics, "cpis_shed_requests_total", "rate_limited")
        - metric_sum(&metrics_before, "cpis_shed_requests_total", "rate_limited");
    eprintln!(
        "[fleet-storm] {} tablets converged to version {head} (data and outbox) {:.1} s \
         after the network came back; the {} chatty ones, whose apps asked for {asked} syncs \
         until told 429, by {:.1} s",
        calm.len(),
        calm_at.as_secs_f64(),
        chatty.len(),
        all_at.as_secs_f64(),
    );
    eprintln!("[fleet-storm] fleet: {storm_counts}");
    eprintln!(
        "[fleet-storm] server: {requests} device requests, {served_503} shed 503, \
         {served_429} shed 429; healthz {} answers, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, \
         {} not 200",
        ok.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        bad.len()
    );

    // The server shed with both answers, always with Retry-After, and the tablets waited.
    assert!(
        storm_counts.shed_503 > 0,
        "no 503 seen: {storm_counts} (seed {seed})"
    );
    assert!(
        storm_counts.shed_429 > 0,
        "no 429 seen: {storm_counts} (seed {seed})"
    );
    assert_eq!(storm_counts.shed_without_retry_after, 0, "seed {seed}");
    assert_eq!(storm_counts.retry_after_early, 0, "seed {seed}");
    assert!(served_503 >= storm_counts.shed_503 as f64, "seed {seed}");
    assert!(served_429 >= storm_counts.shed_429 as f64, "seed {seed}");
    // Healthy throughout.
    assert!(bad.is_empty(), "healthz: {bad:?} (seed {seed})");
    assert!(ok.len() > 10, "seed {seed}");
    // The only errors were the intended ones.
    assert_eq!(
        storm_counts.unreachable_since_back, 0,
        "{storm_counts}: {:?} (seed {seed})",
        after.unreachable_errors
    );
    assert_eq!(
        after.other, 0,
        "unexpected errors: {:?} (seed {seed})",
        after.other_errors
    );
    assert_eq!(after.revoked, 0, "seed {seed}");
    // Converged for real: a sample of tablets holds exactly the region's flags.
    storm.check_data(rng, 50, &[]);
}

/// Every notice in a council's mailbox, listed as a council would under load: `503`/`429`
/// are waited out per `Retry-After` (counted). Returns (notices, sheds).
async fn list_mailbox(
    http: &reqwest::Client,
    base: &str,
    ods: &CouncilCode,
    token: &str,
) -> anyhow::Result<(Vec<Notification>, u32)> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    let mut shed = 0;
    for _ in 0..1_000 {
        let mut url = format!("{base}/v1/councils/{ods}/notifications?limit=1000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let r = http.get(&url).bearer_auth(token).send().await?;
        let status = r.status().as_u16();
        if status == 503 || status == 429 {
            shed += 1;
            let wait: u64 = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{status} without Retry-After"))?;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if status != 200 {
            anyhow::bail!("listing {ods}'s mailbox: {status}: {}", r.text().await?);
        }
        let page: NotificationPage = r.json().await?;
        all.extend(page.notifications);
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok((all, shed)),
        }
    }
    anyhow::bail!("{ods}'s mailbox did not end within 1,000 pages")
}

/// (b) and (c): a second outage and storm; tablets revoked during it wipe, the rest
/// converge; councils list their mailboxes all along and see only their own notices; in the
/// end every notice owed (of both storms' lookups) arrives exactly once.
async fn revocations_and_council_isolation(
    storm: &mut Storm,
    rng: &mut ChaCha8Rng,
    owed: &mut Owed,
) {
    let seed = storm.seed;
    let n = storm.fleet.members().len();
    let by_council: BTreeMap<CouncilCode, BTreeSet<NhsNumber>> = storm
        .lists
        .iter()
        .map(|(c, l)| (c.clone(), l.iter().map(|f| f.nhs_number).collect()))
        .collect();
    let councils_with_flags: Vec<CouncilCode> = by_council
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(c, _)| c.clone())
        .collect();
    assert!(councils_with_flags.len() >= 2, "seed {seed}");

    // The network goes; crews keep working offline: lookups of children flagged by every
    // council, on tablets across the fleet.
    outage(storm).await;
    let mut lookups = 0;
    let revoke: Vec<usize> = {
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(rng);
        let mut r: Vec<usize> = all.into_iter().take((n / 100).max(5)).collect();
        r.sort_unstable();
        r
    };
    for i in (0..n).step_by(4) {
        if revoke.contains(&i) {
            continue;
        }
        let council = &councils_with_flags[rng.gen_range(0..councils_with_flags.len())];
        let candidates: Vec<NhsNumber> = by_council[council].iter().copied().collect();
        let nhs = *candidates.choose(rng).unwrap();
        let answer = storm.fleet.lookup(i, &nhs.to_string()).unwrap();
        assert_eq!(answer.result, LookupResult::Flagged, "seed {seed}");
        lookups += 1;
        owe(owed, &answer);
    }
    let owed_total: usize = owed.values().map(BTreeSet::len).sum();
    eprintln!(
        "[fleet-storm] second outage: {lookups} lookups offline on as many tablets; with the \
         first storm's, {owed_total} notices owed to {} councils",
        owed.len()
    );

    // From now on, councils list their mailboxes all along, concurrently, as councils would.
    // Every notice a council may see is known now (the lookups were made offline): each
    // listing must hold only notices owed to that council (about its own flags), each once.
    let listing_stop = Arc::new(AtomicBool::new(false));
    let mut listers = tokio::task::JoinSet::new();
    for code in &councils_with_flags {
        let http = storm.server.http().clone();
        let base = storm.server.base_url();
        let token = storm.tokens[code].clone();
        let own = owed.get(code).cloned().unwrap_or_default();
        let (code, stop) = (code.clone(), listing_stop.clone());
        listers.spawn(async move {
            let (mut lists, mut sheds, mut most) = (0u32, 0u32, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let (got, shed) = list_mailbox(&http, &base, &code, &token).await.unwrap();
                sheds += shed;
                lists += 1;
                let mut ids = BTreeSet::new();
                for n in &got {
                    // Isolation: only notices about this council's own flags.
                    assert!(
                        own.contains(&n.event_id),
                        "council {code} was shown a notice not owed to it: event {} about {}",
                        n.event_id,
                        n.nhs_number
                    );
                    assert!(ids.insert(n.event_id), "{code}: event {} twice", n.event_id);
                }
                most = most.max(got.len());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (code, lists, sheds, most)
        });
    }

    // The network comes back; mid-storm, trust IT revokes some tablets.
    let before = storm.fleet.counts();
    storm.proxy.set_faults(Faults::none()).await.unwrap();
    let started = Instant::now();
    storm.fleet.network_back();
    let mut revoked_at = Vec::new();
    for &i in &revoke {
        let device = storm.fleet.members()[i].device.to_string();
        storm
            .server
            .admin(&["device", "revoke", "--device", &device])
            .await
            .unwrap();
        revoked_at.push(started.elapsed());
    }
    eprintln!(
        "[fleet-storm] revoked {} tablets between {:.1} s and {:.1} s into the storm",
        revoke.len(),
        revoked_at.first().unwrap().as_secs_f64(),
        revoked_at.last().unwrap().as_secs_f64()
    );
    // A revoked tablet that synced before its revocation learns it at its next contact:
    // ask each for a sync (its crew opening the app).
    let mut contacts = tokio::task::JoinSet::new();
    for &i in &revoke {
        if let Some(h) = storm.fleet.sync_handle(i) {
            contacts.spawn(async move { h.sync_now().await });
        }
    }
    while contacts.join_next().await.is_some() {}
    let took = storm.converge(&revoke, STORM_BOUND).await;
    let after = storm.fleet.counts();
    let storm_counts = delta(&before, &after);
    eprintln!(
        "[fleet-storm] {} tablets converged and {} wiped in {:.1} s: {storm_counts}",
        n - revoke.len(),
        revoke.len(),
        took.as_secs_f64()
    );

    // Revoked tablets: shredded, and they refuse lookups with not_enrolled.
    for &i in &revoke {
        let m = &storm.fleet.members()[i];
        assert!(
            m.revoked() && m.agent().is_shredded(),
            "tablet {i} (seed {seed})"
        );
        assert!(
            !m.dir.join("keys").exists() && !m.dir.join("flags.db").exists(),
            "tablet {i}'s keys and flags are gone (seed {seed})"
        );
        let nhs = storm.flagged().into_iter().next().unwrap().to_string();
        match storm.fleet.lookup(i, &nhs) {
            Err(AgentError::NotEnrolled(_)) => {}
            other => panic!("tablet {i}: a lookup after the wipe gave {other:?} (seed {seed})"),
        }
        assert!(matches!(
            cpis_agent::Agent::open(&m.dir, Arc::new(cpis_agent::SystemClock)),
            Err(AgentError::NotEnrolled(_))
        ));
    }
    assert_eq!(storm_counts.revoked as usize, revoke.len(), "seed {seed}");
    // The others converged (checked above) with the only errors the intended ones.
    assert_eq!(after.other, 0, "{:?} (seed {seed})", after.other_errors);
    assert_eq!(
        storm_counts.unreachable_since_back, 0,
        "{:?} (seed {seed})",
        after.unreachable_errors
    );
    assert_eq!(storm_counts.shed_without_retry_after, 0, "seed {seed}");
    assert_eq!(storm_counts.retry_after_early, 0, "seed {seed}");
    storm.check_data(rng, 30, &revoke);

    // Every notice owed arrived exactly once, to its own council only.
    listing_stop.store(true, Ordering::Relaxed);
    while let Some(joined) = listers.join_next().await {
        let (code, lists, sheds, most) = joined.unwrap();
        eprintln!(
            "[fleet-storm] council {code}: listed its mailbox {lists} times during the \
             storm ({sheds} listings shed and retried), up to {most} notices"
        );
    }
    let http = storm.server.http().clone();
    let mut delivered = 0;
    for code in &councils_with_flags {
        let (got, _) = list_mailbox(&http, &storm.server.base_url(), code, &storm.tokens[code])
            .await
            .unwrap();
        let seen: BTreeSet<EventId> = got.iter().map(|n| n.event_id).collect();
        assert_eq!(
            seen.len(),
            got.len(),
            "{code}: a notice twice (seed {seed})"
        );
        let want = owed.get(code).cloned().unwrap_or_default();
        assert_eq!(
            seen, want,
            "council {code}: notices differ from those owed (seed {seed})"
        );
        delivered += got.len();
    }
    assert_eq!(delivered, owed_total, "seed {seed}");
    eprintln!("[fleet-storm] {delivered} notices delivered, each once, each to its own council");
}
