//! A fleet of simulated tablets in one process: thousands of real agents (`cpis-agent`'s
//! library), each with its own state directory, enrolment, client certificate, encrypted
//! store and outbox, each driven by the agent's own background loop
//! ([`cpis_agent::background::drive`] and its [`Schedule`](cpis_agent::schedule)), syncing
//! with [`cpis_agent::sync::sync_once`] — the same verification and apply code as the
//! `cpis-agent` binary. Only the process is shared.
//!
//! The fleet's [`Worker`] is the agent's `AgentWorker` less certificate renewal (never due in
//! a test), plus counting: each attempt's outcome is classified (synced, shed with `429` or
//! `503`, shed without `Retry-After`, unreachable, revoked, anything else), and an attempt
//! that starts before a `Retry-After` the server gave the same tablet has elapsed is counted
//! as a violation. A sync whose access-event upload was shed ends as the agent's own loop
//! ends it ([`Outcome::events_not_sent`]): a failed attempt with the server's `Retry-After`,
//! so the notices go out after it rather than at the next poll.
//!
//! Many agents in one process need many file descriptors (each agent holds two SQLite
//! databases in WAL mode, each sync a TLS connection): [`raise_fd_limit`] lifts the soft
//! limit to the hard one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use cpis_agent::background::{LiveFeed, LoopConfig, Outcome, SyncHandle, Worker, drive};
use cpis_agent::net::NetError;
use cpis_agent::schedule::{ScheduleConfig, WatchEnd};
use cpis_agent::{Agent, AgentError, Clock, LookupInput, SystemClock};
use cpis_protocol::DeviceId;
use cpis_protocol::local::LookupResponse;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A directory for the fleet's state directories: on `/dev/shm` when it is a tmpfs with at
/// least `room` bytes free, else under the system's temp dir. Thousands of tablets each
/// fsyncing their own database would measure this machine's one disk, not the server; the
/// tablets' durability is tested elsewhere (the agent's crash tests, the kill -9 scenario).
pub fn state_root(room: u64) -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let roomy = rustix::fs::statvfs(shm)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize) >= room)
        .unwrap_or(false);
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("cpis-fleet-");
        b
    };
    if roomy && let Ok(dir) = builder.tempdir_in(shm) {
        return Ok(dir);
    }
    builder.tempdir().context("creating the fleet's directory")
}

/// Raises this process's soft limit on open files to `want` (or the hard limit, if lower);
/// children started afterwards inherit it. Returns the (soft, hard) limits now in force.
pub fn raise_fd_limit(want: u64) -> anyhow::Result<(u64, u64)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum;
    let soft = now.current.unwrap_or(u64::MAX);
    let target = hard.map_or(want, |h| want.min(h));
    if soft < target {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: hard,
            },
        )
        .context("raising RLIMIT_NOFILE")?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok((
        after.current.unwrap_or(u64::MAX),
        after.maximum.unwrap_or(u64::MAX),
    ))
}

/// How a fleet is made and run.
#[derive(Debug, Clone, Copy)]
pub struct FleetOptions {
    /// Tablets in the fleet.
    pub agents: usize,
    /// Timing of every tablet's background loop (each with its own jitter seed).
    pub schedule: ScheduleConfig,
    /// Seed of the loops' jitter (tablet `i` uses `seed + i`).
    pub seed: u64,
    /// Enrolments in flight at once.
    pub enrol_parallel: usize,
}

/// Counters over the whole fleet, from every attempt of every tablet's loop.
#[derive(Debug, Default)]
pub struct Stats {
    attempts: AtomicU64,
    synced: AtomicU64,
    shed_429: AtomicU64,
    shed_503: AtomicU64,
    shed_without_retry_after: AtomicU64,
    retry_after_max: AtomicU64,
    retry_after_early: AtomicU64,
    events_left: AtomicU64,
    unreachable: AtomicU64,
    unreachable_since_back: AtomicU64,
    /// When the network last came back ([`Fleet::network_back`]); `None` while it is gone.
    network_back_at: Mutex<Option<Instant>>,
    revoked: AtomicU64,
    enrol_shed: AtomicU64,
    other: AtomicU64,
    other_errors: Mutex<Vec<String>>,
    unreachable_errors: Mutex<Vec<String>>,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sync attempts started by the loops.
    pub attempts: u64,
    /// Attempts that synced (feed verified and applied or already current, events sent).
    pub synced: u64,
    /// Attempts ended by a `429` (this tablet over its rate).
    pub shed_429: u64,
    /// Attempts ended by a `503` (the server saturated).
    pub shed_503: u64,
    /// Shed answers that carried no `Retry-After` (must stay 0).
    pub shed_without_retry_after: u64,
    /// The largest `Retry-After` seen, in seconds.
    pub retry_after_max: u64,
    /// Attempts that started before the tablet's last `Retry-After` had elapsed (must stay 0).
    pub retry_after_early: u64,
    /// Syncs after which access events were still in the outbox (their upload was shed).
    pub events_left: u64,
    /// Attempts that could not connect (the outage).
    pub unreachable: u64,
    /// Of those, attempts begun after the network came back (must stay 0: an attempt begun
    /// during the outage may fail a moment after the network returns, and that is no fault).
    pub unreachable_since_back: u64,
    /// Attempts answered "revoked" (the tablet then wiped itself).
    pub revoked: u64,
    /// Enrolments shed (retried after their `Retry-After`).
    pub enrol_shed: u64,
    /// Attempts that failed any other way.
    pub other: u64,
    /// The first few of those, as the agent said them.
    pub other_errors: Vec<String>,
    /// The first few connection failures, as the agent said them.
    pub unreachable_errors: Vec<String>,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} attempts: {} synced, {} shed 429, {} shed 503 (Retry-After max {} s, {} without, \
             {} retried early), {} with events left, {} unreachable ({} begun after the network came \
             back), {} revoked, {} other",
            self.attempts,
            self.synced,
            self.shed_429,
            self.shed_503,
            self.retry_after_max,
            self.shed_without_retry_after,
            self.retry_after_early,
            self.events_left,
            self.unreachable,
            self.unreachable_since_back,
            self.revoked,
            self.other,
        )
    }
}

impl Stats {
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            attempts: g(&self.attempts),
            synced: g(&self.synced),
            shed_429: g(&self.shed_429),
            shed_503: g(&self.shed_503),
            shed_without_retry_after: g(&self.shed_without_retry_after),
            retry_after_max: g(&self.retry_after_max),
            retry_after_early: g(&self.retry_after_early),
            events_left: g(&self.events_left),
            unreachable: g(&self.unreachable),
            unreachable_since_back: g(&self.unreachable_since_back),
            revoked: g(&self.revoked),
            enrol_shed: g(&self.enrol_shed),
            other: g(&self.other),
            other_errors: self
                .other_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            unreachable_errors: self
                .unreachable_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn sample(list: &Mutex<Vec<String>>, what: String) {
        let mut v = list.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 20 {
            v.push(what);
        }
    }

    fn other(&self, what: String) {
        Self::add(&self.other);
        Self::sample(&self.other_errors, what);
    }
}

/// What one tablet's loop has done so far.
#[derive(Debug, Default)]
struct Progress {
    /// The version of the last successful sync (0 before any).
    version: AtomicU64,
    /// Set once the server said "revoked" and the tablet wiped itself.
    revoked: AtomicBool,
    /// No attempt may start before this (the last `Retry-After`).
    not_before: Mutex<Option<Instant>>,
}

/// One tablet of the fleet.
#[derive(Debug)]
pub struct Member {
    pub index: usize,
    pub device: DeviceId,
    pub dir: PathBuf,
    agent: Arc<Agent>,
    progress: Arc<Progress>,
    handle: Option<SyncHandle>,
}

impl Member {
    /// The agent (its state directory opened once, shared with its loop).
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// The version of its last successful sync (0 before any).
    pub fn version(&self) -> u64 {
        self.progress.version.load(Ordering::Relaxed)
    }

    /// True once the server said it is revoked (and it wiped itself).
    pub fn revoked(&self) -> bool {
        self.progress.revoked.load(Ordering::Relaxed)
    }
}

/// The fleet: its tablets, their loops and the counters.
#[derive(Debug)]
pub struct Fleet {
    members: Vec<Member>,
    stats: Arc<Stats>,
    options: FleetOptions,
    cancel: CancellationToken,
    loops: JoinSet<()>,
}

fn is_shed(e: &AgentError) -> Option<(u16, Option<Duration>)> {
    match e {
        AgentError::Net(n @ NetError::Server { status, .. })
            if *status == 429 || *status == 503 =>
        {
            Some((*status, n.retry_after()))
        }
        _ => None,
    }
}

impl Fleet {
    /// Enrols `options.agents` tablets under `root` (one state directory each,
    /// `root/tablet-NNNNN`) with one enrolment `token` good for all of them, at most
    /// `enrol_parallel` at a time; an enrolment shed by the server is retried after its
    /// `Retry-After`. The loops are not started (see [`Fleet::start`]).
    pub async fn enrol(
        root: &Path,
        server: &str,
        ca_pem: &str,
        token: &str,
        options: FleetOptions,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let stats = Arc::new(Stats::default());
        let gate = Arc::new(Semaphore::new(options.enrol_parallel.max(1)));
        let mut tasks = JoinSet::new();
        for index in 0..options.agents {
            let dir = root.join(format!("tablet-{index:05}"));
            let (server, ca, token) = (server.to_owned(), ca_pem.to_owned(), token.to_owned());
            let (gate, stats) = (gate.clone(), stats.clone());
            tasks.spawn(async move {
                let _slot = gate.acquire_owned().await?;
                let clock: Arc<dyn Clock> = Arc::new(SystemClock);
                for _ in 0..50 {
                    let name = Some(format!("fleet tablet {index}"));
                    match cpis_agent::sync::enrol(&dir, &server, &ca, &token, name, clock.clone())
                        .await
                    {
                        Ok(agent) => return anyhow::Ok((index, dir, agent)),
                        Err(e) => match is_shed(&e) {
                            Some((_, wait)) => {
                                Stats::add(&stats.enrol_shed);
                                tokio::time::sleep(wait.unwrap_or(Duration::from_secs(1))).await;
                            }
                            None => {
                                return Err(anyhow!(e))
                                    .with_context(|| format!("enrolling tablet {index}"));
                            }
                        },
                    }
                }
                bail!("tablet {index}: enrolment shed 50 times")
            });
        }
        let mut members = Vec::with_capacity(options.agents);
        while let Some(joined) = tasks.join_next().await {
            let (index, dir, agent) = joined.context("an enrolment task panicked")??;
            members.push(Member {
                index,
                device: agent.enrolment().device_id,
                dir,
                agent: Arc::new(agent),
                progress: Arc::default(),
                handle: None,
            });
        }
        members.sort_by_key(|m| m.index);
        Ok(Fleet {
            members,
            stats,
            options,
            cancel: CancellationToken::new(),
            loops: JoinSet::new(),
        })
    }

    /// Starts every tablet's background loop (each syncs at once, as `cpis-agent run` does).
    pub fn start(&mut self) {
        for m in &mut self.members {
            let (handle, requests) = SyncHandle::channel();
            let worker = FleetWorker {
                live: LiveFeed::new(m.agent.clone()),
                agent: m.agent.clone(),
                progress: m.progress.clone(),
                stats: self.stats.clone(),
            };
            let cfg = LoopConfig {
                schedule: self.options.schedule,
                seed: self.options.seed.wrapping_add(m.index as u64),
                housekeeping: Duration::from_secs(3600),
            };
            self.loops
                .spawn(drive(cfg, worker, requests, self.cancel.child_token()));
            m.handle = Some(handle);
        }
    }

    /// The tablets, in enrolment order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        self.stats.counts()
    }

    /// The network is gone (the caller cut it): attempts begun from now on may fail to connect.
    pub fn network_gone(&self) {
        *self
            .stats
            .network_back_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The network is back: every loop ends its backoff and syncs as soon as its schedule
    /// allows (never before a server's `Retry-After`).
    pub fn network_back(&self) {
        *self
            .stats
            .network_back_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        for m in &self.members {
            if let Some(h) = &m.handle {
                h.server_reachable();
            }
        }
    }

    /// A lookup on tablet `i` (recorded in its outbox before the answer, as always), then
    /// the trigger a lookup gives the loop (sync soon).
    pub fn lookup(&self, i: usize, nhs: &str) -> Result<LookupResponse, AgentError> {
        let m = &self.members[i];
        let answer = m.agent.lookup(LookupInput {
            nhs_number: nhs,
            staff_id: Some(format!("FLEET{i:05}")),
            incident_ref: None,
        })?;
        if let Some(h) = &m.handle {
            h.events_pending();
        }
        Ok(answer)
    }

    /// Asks tablet `i`'s loop for a sync now and waits for the outcome of that attempt
    /// (`None` once its loop has ended, e.g. after a wipe).
    pub async fn sync_now(&self, i: usize) -> Option<Outcome> {
        self.members[i].handle.as_ref()?.sync_now().await
    }

    /// Tablet `i`'s loop handle (`None` before [`Fleet::start`]).
    pub fn sync_handle(&self, i: usize) -> Option<SyncHandle> {
        self.members[i].handle.clone()
    }

    /// Waits until every tablet that is not in `revoked` has synced to at least `version`
    /// and has an empty outbox, and every tablet in `revoked` has wiped itself; at most
    /// `bound`. Returns how long it took, or which tablets had not got there.
    pub async fn converge(
        &self,
        version: u64,
        revoked: &[usize],
        bound: Duration,
    ) -> anyhow::Result<Duration> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.converge_some(version, &all, revoked, bound).await
    }

    /// [`Fleet::converge`] for the tablets in `which` only.
    pub async fn converge_some(
        &self,
        version: u64,
        which: &[usize],
        revoked: &[usize],
        bound: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let mut behind = Vec::new();
            for &i in which {
                let m = &self.members[i];
                let done = if revoked.contains(&i) {
                    m.revoked()
                } else {
                    m.version() >= version
                        && !m.revoked()
                        && m.agent
                            .outbox_counts()
                            .map(|(p, _)| p == 0)
                            .unwrap_or(false)
                };
                if !done {
                    behind.push(i);
                }
            }
            if behind.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= bound {
                let show: Vec<String> = behind
                    .iter()
                    .take(10)
                    .map(|&i| {
                        let m = &self.members[i];
                        format!(
                            "tablet {i} at version {} (revoked: {}, outbox {:?})",
                            m.version(),
                            m.revoked(),
                            m.agent.outbox_counts().ok()
                        )
                    })
                    .collect();
                bail!(
                    "{} tablets had not converged to version {version} within {bound:?}: {} …; {}",
                    behind.len(),
                    show.join("; "),
                    self.counts()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every loop (at once, mid-attempt if need be) and waits for them.
    pub async fn shutdown(&mut self) {
        self.cancel.cancel();
        while self.loops.join_next().await.is_some() {}
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The loop's worker for one tablet.
struct FleetWorker {
    /// The live feed's waiting requests, as the agent holds them (when the schedule has
    /// `live` on).
    live: LiveFeed,
    agent: Arc<Agent>,
    progress: Arc<Progress>,
    stats: Arc<Stats>,
}

impl FleetWorker {
    fn shed(stats: &Stats, progress: &Progress, status: u16, wait: Option<Duration>) {
        Stats::add(if status == 429 {
            &stats.shed_429
        } else {
            &stats.shed_503
        });
        match wait {
            Some(w) => {
                stats
                    .retry_after_max
                    .fetch_max(w.as_secs(), Ordering::Relaxed);
                *progress
                    .not_before
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + w);
            }
            None => Stats::add(&stats.shed_without_retry_after),
        }
    }
}

impl Worker for FleetWorker {
    fn watch(&mut self) -> impl Future<Output = WatchEnd> + Send + 'static {
        self.live.watch()
    }

    fn attempt(&mut self) -> impl Future<Output = Outcome> + Send {
        self.live.reset();
        let (agent, progress, stats) = (
            self.agent.clone(),
            self.progress.clone(),
            self.stats.clone(),
        );
        async move {
            let started = Instant::now();
            Stats::add(&stats.attempts);
            let not_before = *progress
                .not_before
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if not_before.is_some_and(|t| Instant::now() < t) {
                Stats::add(&stats.retry_after_early);
            }
            let synced = match cpis_agent::sync::sync_feed_and_events(&agent, &|_, _| {}).await {
                Ok(s) => s,
                Err(AgentError::NotEnrolled(msg) | AgentError::Net(NetError::Revoked(msg))) => {
                    Stats::add(&stats.revoked);
                    progress.revoked.store(true, Ordering::Relaxed);
                    return Outcome::Revoked(msg);
                }
                Err(e) => {
                    match (&e, is_shed(&e)) {
                        (_, Some((status, wait))) => Self::shed(&stats, &progress, status, wait),
                        (AgentError::Net(NetError::Unreachable { .. }), None) => {
                            Stats::add(&stats.unreachable);
                            let back = *stats
                                .network_back_at
                                .lock()
                                .unwrap_or_else(|p| p.into_inner());
                            if back.is_some_and(|t| started >= t) {
                                Stats::add(&stats.unreachable_since_back);
                            }
                            Stats::sample(&stats.unreachable_errors, e.to_string());
                        }
                        _ => stats.other(e.to_string()),
                    }
                    return Outcome::failed(&e);
                }
            };
            if let Some(v) = synced.response.version {
                progress.version.fetch_max(v, Ordering::Relaxed);
            }
            // The feed is in but access events were not all sent: the agent reports a failed
            // attempt (with the server's Retry-After when it shed the upload).
            if let Some(e) = &synced.events_error {
                Stats::add(&stats.events_left);
                match is_shed(e) {
                    Some((status, wait)) => Self::shed(&stats, &progress, status, wait),
                    None => stats.other(format!("uploading events: {e}")),
                }
                return Outcome::events_not_sent(e);
            }
            Stats::add(&stats.synced);
            Outcome::Synced(synced.response)
        }
    }

    fn wipe(&mut self) {
        if !self.agent.is_shredded()
            && let Err(e) = self.agent.shred()
        {
            self.stats.other(format!("wiping a revoked tablet: {e}"));
        }
    }

    fn housekeeping(&mut self) {
        if let Err(e) = self.agent.shred_if_too_old()
            && !matches!(e, AgentError::NotEnrolled(_))
        {
            self.stats.other(format!("wipe-age check: {e}"));
        }
    }

    fn observe(&mut self, _failures: u32, _last_error: Option<&str>, _next: Option<Instant>) {}
}
