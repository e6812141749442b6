//! The background loop of `cpis-agent run`: waits and attempts as [`crate::schedule`]
//! decides. Triggers arrive through a [`SyncHandle`] (lookups leaving events, `POST /v1/sync`,
//! the server answering an online check); an attempt is a sync (feed, outbox, report) then a
//! certificate renewal when due; a revoked device delivers its outbox, is wiped and the loop
//! ends (until the outbox is delivered, attempts fail and back off as usual). The wipe-age
//! self-shred is checked at every wake-up and at least every `housekeeping` interval. The
//! loop stops at once when its cancellation token is cancelled.
//!
//! While the schedule says so ([`Schedule::should_watch`]: after a successful attempt), the
//! loop also holds the live feed's waiting checkpoint request ([`Worker::watch`]); how it
//! ends goes back to the schedule, which brings the next attempt forward when the region's
//! head moved.
//!
//! The driver ([`drive`]) is generic over a [`Worker`], so the loop is tested with paused
//! tokio time and a worker that fails on demand, without a network.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use cpis_protocol::local::SyncResponse;

use crate::agent::{Agent, AgentError};
use crate::net::NetError;
use crate::schedule::{Action, Input, Schedule, ScheduleConfig, WatchEnd};

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Synced(SyncResponse),
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The device was revoked and its data shredded; the message says so, for people.
    Revoked(String),
}

/// What the loop does; the production one is [`AgentWorker`].
pub trait Worker: Send {
    /// One attempt.
    fn attempt(&mut self) -> impl Future<Output = Outcome> + Send;
    /// Holds the live feed's waiting checkpoint request until the region's head moves past
    /// the data held, or the server answers it unchanged, or it fails.
    fn watch(&mut self) -> impl Future<Output = WatchEnd> + Send + 'static;
    /// Crypto-shred the device (revoked).
    fn wipe(&mut self);
    /// Periodic checks (the wipe age).
    fn housekeeping(&mut self);
    /// The schedule changed: record it for `status`.
    fn observe(&mut self, failures: u32, last_error: Option<&str>, next: Option<Instant>);
}

/// Triggers and manual requests for the loop.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    tx: mpsc::Sender<Request>,
}

#[derive(Debug)]
enum Request {
    Trigger(Input),
    Manual(oneshot::Sender<Outcome>),
}

impl SyncHandle {
    /// A handle and the receiving end for [`drive`].
    pub fn channel() -> (SyncHandle, Requests) {
        let (tx, rx) = mpsc::channel(64);
        (SyncHandle { tx }, Requests(rx))
    }

    /// A lookup left events in the outbox: sync soon. Never waits.
    pub fn events_pending(&self) {
        let _ = self.tx.try_send(Request::Trigger(Input::EventsPending));
    }

    /// The server answered something else: end a backoff. Never waits.
    pub fn server_reachable(&self) {
        let _ = self.tx.try_send(Request::Trigger(Input::ServerReachable));
    }

    /// Asks for an attempt now and waits for the outcome of the next one to start.
    /// `None` when the loop has stopped.
    pub async fn sync_now(&self) -> Option<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request::Manual(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// The receiving end of a [`SyncHandle`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Request>);

/// Timing of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    pub schedule: ScheduleConfig,
    /// Seed of the jitter.
    pub seed: u64,
    /// Wipe-age check at least this often.
    pub housekeeping: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            schedule: ScheduleConfig::default(),
            seed: rand::random(),
            housekeeping: Duration::from_secs(3600),
        }
    }
}

/// A waiting checkpoint request being held.
type HeldWait = Pin<Box<dyn Future<Output = WatchEnd> + Send>>;

/// Runs the loop until `cancel` is cancelled or the device is wiped.
pub async fn drive<W: Worker>(
    cfg: LoopConfig,
    mut worker: W,
    Requests(mut rx): Requests,
    cancel: CancellationToken,
) {
    let mut sched = Schedule::new(cfg.schedule, cfg.seed, Instant::now());
    let mut waiting: Vec<oneshot::Sender<Outcome>> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut next_housekeeping = Instant::now();
    let mut rx_open = true;
    // The waiting request held, and when it started.
    let mut watching: Option<(Instant, HeldWait)> = None;
    loop {
        if Instant::now() >= next_housekeeping {
            worker.housekeeping();
            next_housekeeping = Instant::now() + cfg.housekeeping;
        }
        match sched.next(Instant::now()) {
            Action::Stop => return,
            Action::Wipe => {
                worker.wipe();
                worker.observe(sched.consecutive_failures(), last_error.as_deref(), None);
            }
            Action::WaitForAttempt => return, // not reached: attempts run inline below
            Action::SleepUntil(at) => {
                worker.observe(
                    sched.consecutive_failures(),
                    last_error.as_deref(),
                    Some(at),
                );
                let now = Instant::now();
                if watching.is_none() && sched.should_watch(now) {
                    watching = Some((now, Box::pin(worker.watch())));
                }
                let mut wake = at.min(next_housekeeping);
                if watching.is_none()
                    && let Some(resume) = sched.watch_resumes_at()
                {
                    wake = wake.min(resume);
                }
                let held = async {
                    match watching.as_mut() {
                        Some((_, w)) => w.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    end = held => {
                        let started = watching.take().map_or(Instant::now(), |(s, _)| s);
                        let end = match end {
                            WatchEnd::Unchanged { .. } => WatchEnd::Unchanged { held: started.elapsed() },
                            other => other,
                        };
                        sched.on(Input::Watched(end), Instant::now());
                    }
                    () = tokio::time::sleep_until(wake) => sched.on(Input::TimerFired, Instant::now()),
                    req = rx.recv(), if rx_open => match req {
                        Some(Request::Trigger(i)) => sched.on(i, Instant::now()),
                        Some(Request::Manual(reply)) => {
                            waiting.push(reply);
                            sched.on(Input::ManualRequest, Instant::now());
                        }
                        None => rx_open = false,
                    },
                }
            }
            Action::StartAttempt => {
                // The attempt reads the checkpoint itself.
                watching = None;
                let current = std::mem::take(&mut waiting);
                let outcome = {
                    let attempt = worker.attempt();
                    tokio::pin!(attempt);
                    loop {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            o = &mut attempt => break o,
                            req = rx.recv(), if rx_open => match req {
                                Some(Request::Trigger(i)) => sched.on(i, Instant::now()),
                                Some(Request::Manual(reply)) => {
                                    waiting.push(reply);
                                    sched.on(Input::ManualRequest, Instant::now());
                                }
                                None => rx_open = false,
                            },
                        }
                    }
                };
                let input = match &outcome {
                    Outcome::Synced(_) => {
                        last_error = None;
                        Input::Succeeded
                    }
                    Outcome::Failed { error, retry_after } => {
                        last_error = Some(error.clone());
                        Input::Failed {
                            retry_after: *retry_after,
                        }
                    }
                    Outcome::Revoked(e) => {
                        last_error = Some(e.clone());
                        Input::Revoked
                    }
                };
                sched.on(input, Instant::now());
                for w in current {
                    let _ = w.send(outcome.clone());
                }
                if matches!(outcome, Outcome::Revoked(_)) {
                    for w in waiting.drain(..) {
                        let _ = w.send(outcome.clone());
                    }
                }
            }
        }
    }
}

/// How long the tablet asks the server to hold its waiting checkpoint request: under the
/// client's 30 s read timeout and the idle cut-off of most proxies.
pub const LIVE_WAIT: Duration = Duration::from_secs(25);

/// The production worker: syncs the agent, renews its certificate when due, holds the
/// live feed's waiting request.
#[derive(Debug)]
pub struct AgentWorker {
    agent: Arc<Agent>,
    live: LiveFeed,
}

impl AgentWorker {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            live: LiveFeed::new(agent.clone()),
            agent,
        }
    }
}

/// One agent's waiting checkpoint requests (what [`AgentWorker`] does for
/// [`Worker::watch`]), with one client kept between them: one TLS connection, not a
/// handshake per wait.
#[derive(Debug)]
pub struct LiveFeed {
    agent: Arc<Agent>,
    client: Option<crate::net::DeviceClient>,
}

impl LiveFeed {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            agent,
            client: None,
        }
    }

    /// Forgets the client: call at each attempt, which may renew the device's identity.
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// Holds one waiting request (see [`Worker::watch`]).
    pub fn watch(&mut self) -> impl Future<Output = WatchEnd> + Send + 'static {
        let agent = self.agent.clone();
        let client = match self.client.clone() {
            Some(c) => Ok(c),
            None => crate::sync::device_client(&agent),
        };
        if let Ok(c) = &client {
            self.client = Some(c.clone());
        }
        async move {
            match client {
                Ok(client) => watch_once(agent, client).await,
                Err(_) => WatchEnd::Unavailable,
            }
        }
    }
}

/// One waiting checkpoint request: what the tablet holds against the checkpoint the server
/// answers with, verified (and recorded: an unchanged head verified now keeps the data fresh).
async fn watch_once(agent: Arc<Agent>, client: crate::net::DeviceClient) -> WatchEnd {
    let held = match agent.state() {
        Ok(st) => st.data,
        Err(_) => return WatchEnd::Unavailable,
    };
    // Nothing installed yet: the attempts take the snapshot; nothing to wait on.
    let Some((epoch, version)) = held else {
        return WatchEnd::Unavailable;
    };
    match client.wait_for_head(epoch, version, LIVE_WAIT).await {
        Ok(signed) => {
            let verified =
                tokio::task::spawn_blocking(move || agent.accept_checkpoint(&signed)).await;
            match verified {
                Ok(Ok(cp)) => {
                    let cp = cp.checkpoint();
                    if (cp.epoch, cp.head_version) == (epoch, version) {
                        WatchEnd::Unchanged {
                            held: Duration::ZERO,
                        }
                    } else {
                        WatchEnd::Moved
                    }
                }
                // Not verified (a key rollover, a clock problem): the attempt deals with it
                // and says why.
                Ok(Err(e)) => {
                    tracing::warn!("live feed answer not accepted ({e}); syncing");
                    WatchEnd::Moved
                }
                Err(e) => {
                    tracing::warn!("live feed answer not checked: {e}");
                    WatchEnd::Failed { retry_after: None }
                }
            }
        }
        Err(NetError::Server { status: 404, .. }) => WatchEnd::Unavailable,
        // The attempt hears it too, and retires the device.
        Err(NetError::Revoked(_)) => WatchEnd::Moved,
        Err(e) => WatchEnd::Failed {
            retry_after: e.retry_after(),
        },
    }
}

impl Outcome {
    /// A failed attempt, with the server's `Retry-After` when it gave one.
    pub fn failed(e: &AgentError) -> Outcome {
        let retry_after = match e {
            AgentError::Net(n) => n.retry_after(),
            _ => None,
        };
        Outcome::Failed {
            error: e.to_string(),
            retry_after,
        }
    }

    /// The feed synced but access events are still waiting (`e`: why): a failed attempt, so
    /// the loop retries soon — after the server's `Retry-After` if it shed the upload.
    pub fn events_not_sent(e: &AgentError) -> Outcome {
        let retry_after = match e {
            AgentError::Net(n) => n.retry_after(),
            _ => None,
        };
        Outcome::Failed {
            error: format!("data synced; access events not sent: {e}"),
            retry_after,
        }
    }
}

impl Worker for AgentWorker {
    fn watch(&mut self) -> impl Future<Output = WatchEnd> + Send + 'static {
        self.live.watch()
    }

    fn attempt(&mut self) -> impl Future<Output = Outcome> + Send {
        self.live.reset();
        let agent = self.agent.clone();
        async move {
            let r = crate::sync::sync_feed_and_events(&agent, &|_, _| {}).await;
            let synced = match r {
                // Notices left in the outbox: retry soon (after the server's Retry-After
                // if it shed the upload), not at the next poll.
                Ok(crate::sync::Synced {
                    events_error: Some(e),
                    ..
                }) => return Outcome::events_not_sent(&e),
                Ok(s) => s.response,
                // Retired: the outbox was delivered and the device wiped.
                Err(AgentError::NotEnrolled(msg)) => return Outcome::Revoked(msg),
                Err(e) => return Outcome::failed(&e),
            };
            // A renewal that fails keeps the old identity and is retried with the backoff.
            let client = match crate::sync::device_client(&agent) {
                Ok(client) => client,
                Err(e) => return Outcome::failed(&e),
            };
            match crate::lifecycle::renew_if_due(&agent, &client).await {
                Ok(_) => Outcome::Synced(synced),
                Err(AgentError::Net(NetError::Revoked(msg))) => {
                    match crate::lifecycle::retire(&agent, &client, &msg).await {
                        AgentError::NotEnrolled(msg) => Outcome::Revoked(msg),
                        e => Outcome::failed(&e),
                    }
                }
                Err(e) => Outcome::failed(&AgentError::Net(NetError::Protocol(format!(
                    "client certificate renewal failed: {e}"
                )))),
            }
        }
    }

    fn wipe(&mut self) {
        if !self.agent.is_shredded()
            && let Err(e) = self.agent.shred()
        {
            tracing::error!("wiping the revoked device failed: {e}");
        }
    }

    fn housekeeping(&mut self) {
        match self.agent.shred_if_too_old() {
            Ok(true) => {
                tracing::warn!("no verified checkpoint within the wipe age: flags shredded")
            }
            Ok(false) | Err(AgentError::NotEnrolled(_)) => {}
            Err(e) => tracing::warn!("wipe-age check failed: {e}"),
        }
    }

    fn observe(&mut self, failures: u32, last_error: Option<&str>, next: Option<Instant>) {
        if self.agent.is_shredded() {
            return;
        }
        let next_wall: Option<DateTime<Utc>> = next.map(|at| {
            let d = at.saturating_duration_since(Instant::now());
            self.agent.clock().now() + chrono::Duration::from_std(d).unwrap_or_default()
        });
        if let Err(e) = self
            .agent
            .record_loop(failures, last_error.map(str::to_owned), next_wall)
        {
            tracing::warn!("recording the sync loop state failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log {
        attempts: Vec<Instant>,
        watches: Vec<Instant>,
        /// How the next waiting requests end, and after how long.
        watch_script: std::collections::VecDeque<(Duration, WatchEnd)>,
        wiped: bool,
        housekeeping: u32,
        last_failures: u32,
    }

    struct Fake {
        log: Arc<Mutex<Log>>,
        /// Outcomes to give, in order; then success.
        script: Vec<Outcome>,
    }

    fn ok() -> Outcome {
        Outcome::Synced(SyncResponse {
            action: "up_to_date".into(),
            epoch: None,
            version: None,
            data_as_of: None,
            events_sent: 0,
        })
    }

    fn fail(retry_after: Option<u64>) -> Outcome {
        Outcome::Failed {
            error: "cannot reach the server".into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    impl Worker for Fake {
        fn attempt(&mut self) -> impl Future<Output = Outcome> + Send {
            self.log.lock().unwrap().attempts.push(Instant::now());
            let o = if self.script.is_empty() {
                ok()
            } else {
                self.script.remove(0)
            };
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                o
            }
        }
        fn watch(&mut self) -> impl Future<Output = WatchEnd> + Send + 'static {
            let mut l = self.log.lock().unwrap();
            l.watches.push(Instant::now());
            let end = l.watch_script.pop_front();
            async move {
                match end {
                    Some((after, end)) => {
                        tokio::time::sleep(after).await;
                        end
                    }
                    // Nothing scripted: a server that holds the request for good.
                    None => std::future::pending().await,
                }
            }
        }
        fn wipe(&mut self) {
            self.log.lock().unwrap().wiped = true;
        }
        fn housekeeping(&mut self) {
            self.log.lock().unwrap().housekeeping += 1;
        }
        fn observe(&mut self, failures: u32, _: Option<&str>, _: Option<Instant>) {
            self.log.lock().unwrap().last_failures = failures;
        }
    }

    fn start(
        script: Vec<Outcome>,
    ) -> (
        Arc<Mutex<Log>>,
        SyncHandle,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let seed = 0xb0_0b5;
        eprintln!("background test seed: {seed:#x}");
        let log = Arc::new(Mutex::new(Log::default()));
        let (handle, rx) = SyncHandle::channel();
        let cancel = CancellationToken::new();
        let cfg = LoopConfig {
            schedule: ScheduleConfig::default(),
            seed,
            housekeeping: Duration::from_secs(3600),
        };
        let task = tokio::spawn(drive(
            cfg,
            Fake {
                log: log.clone(),
                script,
            },
            rx,
            cancel.clone(),
        ));
        (log, handle, cancel, task)
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_retried_with_bounded_attempts_then_recovers() {
        // Down for 40 failures, then up: over many virtual hours the loop never spins.
        let (log, _h, cancel, task) = start((0..40).map(|_| fail(None)).collect());
        tokio::time::sleep(Duration::from_secs(12 * 3600)).await;
        {
            let l = log.lock().unwrap();
            let n = l.attempts.len();
            // 41 attempts to get through, then one every 15-18 minutes.
            assert!(n > 41 && n < 41 + 12 * 4 + 2, "{n} attempts");
            for w in l.attempts.windows(2) {
                assert!(w[1] - w[0] >= Duration::from_secs(1));
                assert!(w[1] - w[0] <= Duration::from_secs(18 * 60 + 1));
            }
            assert_eq!(l.last_failures, 0);
            assert!(l.housekeeping >= 12);
        }
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let (log, h, cancel, task) = start(vec![fail(Some(300))]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        // A manual request does not jump a server's Retry-After.
        h.events_pending();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(log.lock().unwrap().attempts.len(), 1);
        tokio::time::sleep(Duration::from_secs(200)).await;
        {
            let l = log.lock().unwrap();
            assert_eq!(l.attempts.len(), 2);
            assert!(l.attempts[1] - l.attempts[0] >= Duration::from_secs(300));
        }
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn manual_request_answers_with_the_next_attempt_and_lookups_sync_soon() {
        let (log, h, cancel, task) = start(vec![]);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(log.lock().unwrap().attempts.len(), 1);
        assert_eq!(h.sync_now().await, Some(ok()));
        assert_eq!(log.lock().unwrap().attempts.len(), 2);
        h.events_pending();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(log.lock().unwrap().attempts.len(), 2);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(log.lock().unwrap().attempts.len(), 3);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn revoked_wipes_and_ends_the_loop() {
        let (log, h, _cancel, task) = start(vec![Outcome::Revoked("device_revoked".into())]);
        task.await.unwrap();
        assert!(log.lock().unwrap().wiped);
        assert_eq!(h.sync_now().await, None, "nobody answers once wiped");
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_mid_attempt() {
        let (log, _h, cancel, task) = start(vec![]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(log.lock().unwrap().attempts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_head_syncs_at_once_and_the_wait_is_held_again() {
        let (log, _h, cancel, task) = start(vec![]);
        log.lock()
            .unwrap()
            .watch_script
            .push_back((Duration::from_secs(30), WatchEnd::Moved));
        tokio::time::sleep(Duration::from_secs(120)).await;
        {
            let l = log.lock().unwrap();
            assert_eq!(
                l.attempts.len(),
                2,
                "the start, then the move (not 15 min later)"
            );
            let gap = l.attempts[1] - l.attempts[0];
            assert!(
                gap >= Duration::from_secs(30) && gap <= Duration::from_secs(31),
                "{gap:?}"
            );
            assert_eq!(
                l.watches.len(),
                2,
                "held after each success, never during an attempt"
            );
            assert!(l.watches[0] > l.attempts[0] && l.watches[1] > l.attempts[1]);
        }
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_wait_is_held_again_after_a_jittered_delay_without_syncing() {
        let (log, _h, cancel, task) = start(vec![]);
        log.lock().unwrap().watch_script.push_back((
            Duration::from_secs(5),
            WatchEnd::Failed { retry_after: None },
        ));
        tokio::time::sleep(Duration::from_secs(120)).await;
        {
            let l = log.lock().unwrap();
            assert_eq!(l.attempts.len(), 1);
            assert_eq!(l.watches.len(), 2);
            let again = l.watches[1] - l.watches[0];
            assert!(
                again >= Duration::from_secs(6) && again <= Duration::from_secs(20),
                "{again:?}"
            );
        }
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_is_held_until_an_attempt_succeeds() {
        let (log, _h, cancel, task) = start(vec![fail(None), fail(None)]);
        tokio::time::sleep(Duration::from_secs(60)).await;
        {
            let l = log.lock().unwrap();
            assert_eq!(l.attempts.len(), 3);
            assert_eq!(l.watches.len(), 1);
            assert!(l.watches[0] > l.attempts[2]);
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
