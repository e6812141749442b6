//! When the background loop syncs: a state machine without IO. It takes what happened (a
//! timer fired, a lookup left events in the outbox, a manual request, the server answered
//! again, an attempt succeeded or failed with an optional `Retry-After`, the device was
//! revoked) and the current instant, and answers what to do next (sleep until an instant,
//! start an attempt, wipe). The driver in [`crate::background`] does the waiting and the
//! network.
//!
//! Rules:
//! * after a success, the next attempt is one `interval` later plus a random jitter of up to
//!   `interval_jitter` (so a fleet does not poll in step);
//! * a lookup that leaves events pending brings the attempt forward to `soon` from now, but
//!   never ahead of a backoff or a server's `Retry-After`;
//! * a manual request (`POST /v1/sync`) starts now unless the server asked to wait
//!   (`Retry-After`); the server answering again (online confirmation) ends a backoff;
//! * each failure waits a full-jitter delay: uniform in `[min_gap, ceiling]`, where the
//!   ceiling doubles from `backoff_min` up to the cap `backoff_max` (the exponential sequence
//!   is `backon`'s; the jitter is drawn here from a seeded generator so tests are
//!   reproducible); a `Retry-After` (capped at `retry_after_max`) is a floor on that wait;
//! * a trigger that arrives during an attempt runs one more attempt after it (once);
//! * two attempts never start less than `min_gap` apart: the loop cannot spin;
//! * a revoked device wipes, and never attempts again.
//!
//! The live feed: after a successful attempt, while nothing else is due, the driver holds
//! one waiting checkpoint request ([`Schedule::should_watch`]). The region's head moving
//! brings the attempt forward to now (never ahead of a backoff or `Retry-After`); a wait that
//! ends unchanged is held again at once; one cut or refused (a proxy's idle cut-off, the
//! server restarting) is held again after a full-jitter delay whose ceiling doubles from
//! `watch_retry_first` to `watch_retry_max` (at least the server's `Retry-After`), so a fleet
//! whose server restarts comes back spread out; a server without the live feed, a failed
//! attempt, or a wait that keeps ending sooner than `watch_min_hold` stops waiting until the
//! next successful attempt: the tablet polls as before. An attempt the live feed brought
//! forward runs in step with the rest of the region's fleet (they all heard of the change
//! at once), so if it fails (the server restarting under them), its first retry is spread
//! like a cut wait's, over up to `watch_retry_first` rather than `backoff_min`.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

/// Timing of the background loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Time between syncs while all is well.
    pub interval: Duration,
    /// Up to this much is added at random to each interval.
    pub interval_jitter: Duration,
    /// Delay after a lookup leaves events pending.
    pub soon: Duration,
    /// Least time between the starts of two attempts.
    pub min_gap: Duration,
    /// First backoff ceiling after a failure.
    pub backoff_min: Duration,
    /// Cap of the backoff ceiling.
    pub backoff_max: Duration,
    /// Longest `Retry-After` honoured (a longer one is cut to this).
    pub retry_after_max: Duration,
    /// Hold a waiting checkpoint request while connected (the live feed).
    pub live: bool,
    /// First ceiling of the delay before holding a cut waiting request again.
    pub watch_retry_first: Duration,
    /// Cap of that ceiling.
    pub watch_retry_max: Duration,
    /// A wait that ends unchanged sooner than this counts as cut (no spinning).
    pub watch_min_hold: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15 * 60),
            interval_jitter: Duration::from_secs(3 * 60),
            soon: Duration::from_secs(5),
            min_gap: Duration::from_secs(1),
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(15 * 60),
            retry_after_max: Duration::from_secs(3600),
            live: true,
            watch_retry_first: Duration::from_secs(15),
            watch_retry_max: Duration::from_secs(300),
            watch_min_hold: Duration::from_secs(2),
        }
    }
}

/// Something that happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The planned wake-up time came.
    TimerFired,
    /// A lookup left events pending in the outbox.
    EventsPending,
    /// Someone asked for a sync now (`POST /v1/sync`).
    ManualRequest,
    /// The server answered something else (e.g. an online confirmation): it is reachable.
    ServerReachable,
    /// The attempt completed.
    Succeeded,
    /// The attempt failed; the server may have said how long to wait.
    Failed { retry_after: Option<Duration> },
    /// The server says the device is revoked.
    Revoked,
    /// The waiting checkpoint request ended.
    Watched(WatchEnd),
}

/// How a waiting checkpoint request (the live feed) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The region's head moved past the data held (or the answer did not verify): sync.
    Moved,
    /// Held for `held`, the head unchanged: wait again.
    Unchanged { held: Duration },
    /// The server has no live feed (or nothing is installed to wait on): poll until the next
    /// successful attempt.
    Unavailable,
    /// Cut, refused (the server stopping, or holding as many as it may) or unreachable: wait
    /// again later, at least after `retry_after`.
    Failed { retry_after: Option<Duration> },
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until this instant (or until another input).
    SleepUntil(Instant),
    /// Start an attempt now; report [`Input::Succeeded`] or [`Input::Failed`] after.
    StartAttempt,
    /// An attempt is running: wait for its outcome.
    WaitForAttempt,
    /// Crypto-shred the device; nothing else will ever be done.
    Wipe,
    /// Wiped: stop.
    Stop,
}

/// The loop's decisions.
#[derive(Debug)]
pub struct Schedule {
    cfg: ScheduleConfig,
    rng: ChaCha8Rng,
    backoff: ExponentialBackoff,
    /// When the next attempt is due.
    due: Instant,
    /// No attempt before this (backoff after a failure).
    backoff_until: Instant,
    /// No attempt before this (the server's `Retry-After`), manual requests included.
    retry_until: Instant,
    last_start: Option<Instant>,
    failures: u32,
    in_flight: bool,
    again: bool,
    revoked: bool,
    wiped: bool,
    /// The live feed may be held (the last attempt succeeded, the server has it).
    watch_ok: bool,
    /// No waiting request before this.
    watch_resume: Instant,
    /// Waiting requests cut in a row.
    watch_failures: u32,
    /// The attempt due (or running) was brought forward by the live feed: in step with the
    /// region's fleet.
    in_step: bool,
}

fn backoff(cfg: &ScheduleConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.backoff_min)
        .with_max_delay(cfg.backoff_max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

impl Schedule {
    /// A schedule whose first attempt is due at `now` (a starting agent syncs at once).
    /// `seed` drives the jitter; print it when a test fails.
    pub fn new(cfg: ScheduleConfig, seed: u64, now: Instant) -> Self {
        Self {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            backoff: backoff(&cfg),
            due: now,
            backoff_until: now,
            retry_until: now,
            last_start: None,
            failures: 0,
            in_flight: false,
            again: false,
            revoked: false,
            wiped: false,
            watch_ok: false,
            watch_resume: now,
            watch_failures: 0,
            in_step: false,
        }
    }

    /// Whether the driver should hold a waiting checkpoint request at `now`.
    pub fn should_watch(&self, now: Instant) -> bool {
        self.cfg.live
            && self.watch_ok
            && !self.in_flight
            && !self.revoked
            && now >= self.watch_resume
    }

    /// When a waiting request is due again after a cut (`None`: not waiting for one).
    pub fn watch_resumes_at(&self) -> Option<Instant> {
        (self.cfg.live && self.watch_ok && !self.in_flight && !self.revoked)
            .then_some(self.watch_resume)
    }

    fn watch_cut(&mut self, now: Instant, retry_after: Option<Duration>) {
        self.watch_failures = self.watch_failures.saturating_add(1);
        let doublings = self.watch_failures.saturating_sub(1).min(16);
        let ceiling = self
            .cfg
            .watch_retry_first
            .saturating_mul(1 << doublings)
            .min(self.cfg.watch_retry_max);
        let spread = ceiling.saturating_sub(self.cfg.min_gap);
        let mut wait = self.cfg.min_gap + self.jitter(spread);
        if let Some(ra) = retry_after {
            wait = wait.max(ra.min(self.cfg.retry_after_max));
        }
        self.watch_resume = now + wait;
    }

    /// Failed attempts in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// When the next attempt is planned (`None` while one runs, or once revoked).
    pub fn next_attempt_at(&self) -> Option<Instant> {
        (!self.in_flight && !self.revoked).then(|| self.earliest(self.due))
    }

    fn earliest(&self, t: Instant) -> Instant {
        let gap = self.last_start.map_or(t, |s| s + self.cfg.min_gap);
        t.max(gap)
    }

    fn jitter(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_millis(self.rng.gen_range(0..=max.as_millis() as u64))
    }

    /// Takes what happened at `now`.
    pub fn on(&mut self, input: Input, now: Instant) {
        match input {
            Input::TimerFired => {}
            Input::EventsPending => {
                if self.in_flight {
                    self.again = true;
                } else {
                    let at = (now + self.cfg.soon)
                        .max(self.backoff_until)
                        .max(self.retry_until);
                    self.due = self.due.min(at);
                }
            }
            Input::ManualRequest => {
                if self.in_flight {
                    self.again = true;
                } else {
                    self.due = self.due.min(now.max(self.retry_until));
                }
            }
            Input::ServerReachable => {
                if self.failures > 0 && !self.in_flight {
                    self.backoff_until = now;
                    self.due = self.due.min(now.max(self.retry_until));
                }
            }
            Input::Watched(end) => match end {
                WatchEnd::Moved => {
                    self.watch_failures = 0;
                    self.in_step = true;
                    if self.in_flight {
                        self.again = true;
                    } else {
                        let at = now.max(self.backoff_until).max(self.retry_until);
                        self.due = self.due.min(at);
                    }
                }
                WatchEnd::Unchanged { held } if held >= self.cfg.watch_min_hold => {
                    self.watch_failures = 0;
                }
                WatchEnd::Unchanged { .. } => {
                    // Answered at once, again and again: a server or proxy that does not
                    // hold; after a few, poll until the next success.
                    self.watch_cut(now, None);
                    if self.watch_failures >= 3 {
                        self.watch_ok = false;
                    }
                }
                WatchEnd::Unavailable => self.watch_ok = false,
                WatchEnd::Failed { retry_after } => self.watch_cut(now, retry_after),
            },
            Input::Succeeded => {
                self.in_step = false;
                self.watch_ok = true;
                self.in_flight = false;
                self.failures = 0;
                self.backoff = backoff(&self.cfg);
                self.backoff_until = now;
                self.retry_until = now;
                self.due = if std::mem::take(&mut self.again) {
                    now
                } else {
                    let j = self.jitter(self.cfg.interval_jitter);
                    now + self.cfg.interval + j
                };
            }
            Input::Failed { retry_after } => {
                self.watch_ok = false;
                self.in_flight = false;
                self.again = false;
                self.failures = self.failures.saturating_add(1);
                let mut ceiling = self.backoff.next().unwrap_or(self.cfg.backoff_max);
                if std::mem::take(&mut self.in_step) {
                    // The whole region failed together: spread the first retry wide.
                    ceiling = ceiling.max(self.cfg.watch_retry_first);
                }
                let spread = ceiling.saturating_sub(self.cfg.min_gap);
                let mut wait = self.cfg.min_gap + self.jitter(spread);
                if let Some(ra) = retry_after {
                    let ra = ra.min(self.cfg.retry_after_max);
                    self.retry_until = now + ra;
                    wait = wait.max(ra);
                }
                self.backoff_until = now + wait;
                self.due = self.backoff_until;
            }
            Input::Revoked => {
                self.in_flight = false;
                self.revoked = true;
            }
        }
    }

    /// What to do at `now`.
    pub fn next(&mut self, now: Instant) -> Action {
        if self.revoked {
            if self.wiped {
                return Action::Stop;
            }
            self.wiped = true;
            return Action::Wipe;
        }
        if self.in_flight {
            return Action::WaitForAttempt;
        }
        let at = self.earliest(self.due);
        if now >= at {
            self.in_flight = true;
            self.last_start = Some(now);
            Action::StartAttempt
        } else {
            Action::SleepUntil(at)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cfg() -> ScheduleConfig {
        ScheduleConfig::default()
    }

    fn seed() -> u64 {
        let s = 0x5eed_2026;
        eprintln!("schedule test seed: {s:#x}");
        s
    }

    /// Runs an attempt that ends with `input`, returns the next planned wake-up.
    fn attempt(s: &mut Schedule, input: Input) -> Instant {
        let now = Instant::now();
        assert_eq!(s.next(now), Action::StartAttempt);
        s.on(input, now);
        match s.next(now) {
            Action::SleepUntil(t) => t,
            other => panic!("expected a sleep, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_attempt_is_immediate_then_interval_with_jitter() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        let t = attempt(&mut s, Input::Succeeded);
        let wait = t - Instant::now();
        assert!(
            wait >= c.interval && wait <= c.interval + c.interval_jitter,
            "{wait:?}"
        );
        tokio::time::advance(wait).await;
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
    }

    #[tokio::test(start_paused = true)]
    async fn events_pending_bring_the_attempt_forward_to_soon() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        attempt(&mut s, Input::Succeeded);
        tokio::time::advance(Duration::from_secs(60)).await;
        s.on(Input::EventsPending, Instant::now());
        assert_eq!(
            s.next(Instant::now()),
            Action::SleepUntil(Instant::now() + c.soon)
        );
        tokio::time::advance(c.soon).await;
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_with_full_jitter_up_to_the_cap_and_resets_on_success() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        let mut waits = Vec::new();
        for _ in 0..30 {
            let t = attempt(&mut s, Input::Failed { retry_after: None });
            let w = t - Instant::now();
            assert!(w >= c.min_gap && w <= c.backoff_max, "{w:?}");
            waits.push(w);
            tokio::time::advance(w).await;
        }
        assert_eq!(s.consecutive_failures(), 30);
        // Ceilings 2, 4, 8 s...: the first waits are short; later ones use the whole range
        // up to the cap (full jitter: spread out, not all at the cap).
        assert!(waits[0] <= Duration::from_secs(2));
        assert!(waits[1] <= Duration::from_secs(4));
        let late = &waits[15..];
        assert!(
            late.iter().any(|w| *w > Duration::from_secs(5 * 60)),
            "{late:?}"
        );
        assert!(
            late.iter().any(|w| *w < Duration::from_secs(10 * 60)),
            "{late:?}"
        );
        // Over the 30 failures, the loop made 30 attempts, no more: it cannot spin.
        let t = attempt(&mut s, Input::Succeeded);
        assert_eq!(s.consecutive_failures(), 0);
        assert!(t - Instant::now() >= c.interval);
        // The next failure starts from the smallest ceiling again.
        tokio::time::advance(t - Instant::now()).await;
        let t = attempt(&mut s, Input::Failed { retry_after: None });
        assert!(t - Instant::now() <= c.backoff_min);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_even_for_manual_requests_and_is_capped() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        let t = attempt(
            &mut s,
            Input::Failed {
                retry_after: Some(Duration::from_secs(120)),
            },
        );
        assert!(t - Instant::now() >= Duration::from_secs(120));
        tokio::time::advance(Duration::from_secs(10)).await;
        s.on(Input::ManualRequest, Instant::now());
        s.on(Input::EventsPending, Instant::now());
        s.on(Input::ServerReachable, Instant::now());
        match s.next(Instant::now()) {
            Action::SleepUntil(at) => assert!(at - Instant::now() >= Duration::from_secs(110)),
            other => panic!("{other:?}"),
        }
        // A huge Retry-After is cut to the cap.
        tokio::time::advance(t - Instant::now()).await;
        let t = attempt(
            &mut s,
            Input::Failed {
                retry_after: Some(Duration::from_secs(86400 * 30)),
            },
        );
        assert_eq!(t - Instant::now(), c.retry_after_max);
    }

    #[tokio::test(start_paused = true)]
    async fn manual_request_and_server_reachable_end_a_backoff() {
        let c = ScheduleConfig {
            backoff_min: Duration::from_secs(600),
            ..cfg()
        };
        let mut s = Schedule::new(c, seed(), Instant::now());
        let start = Instant::now();
        attempt(&mut s, Input::Failed { retry_after: None });
        attempt_at_least_gap(&mut s);
        // Manual request: now (after the minimum gap).
        let mut s2 = Schedule::new(c, seed(), start);
        attempt(&mut s2, Input::Failed { retry_after: None });
        tokio::time::advance(Duration::from_secs(2)).await;
        s2.on(Input::ManualRequest, Instant::now());
        assert_eq!(s2.next(Instant::now()), Action::StartAttempt);
        // Events pending during a backoff do not shorten it.
        s2.on(Input::Failed { retry_after: None }, Instant::now());
        let before = s2.next_attempt_at().unwrap();
        s2.on(Input::EventsPending, Instant::now());
        assert_eq!(s2.next_attempt_at().unwrap(), before);
    }

    fn attempt_at_least_gap(s: &mut Schedule) {
        // The server answered (online confirmation) right after a failure: the next attempt
        // is as soon as the minimum gap allows, not after the backoff.
        let now = Instant::now();
        s.on(Input::ServerReachable, now);
        assert_eq!(s.next(now), Action::SleepUntil(now + s.cfg.min_gap));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trigger_during_an_attempt_runs_one_more_after_it() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
        assert_eq!(s.next(Instant::now()), Action::WaitForAttempt);
        s.on(Input::EventsPending, Instant::now());
        s.on(Input::ManualRequest, Instant::now());
        tokio::time::advance(Duration::from_millis(300)).await;
        s.on(Input::Succeeded, Instant::now());
        // Once, and not sooner than the minimum gap after the previous start.
        let now = Instant::now();
        assert_eq!(
            s.next(now),
            Action::SleepUntil(now + c.min_gap - Duration::from_millis(300))
        );
        tokio::time::advance(c.min_gap).await;
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
        s.on(Input::Succeeded, Instant::now());
        assert!(s.next_attempt_at().unwrap() - Instant::now() >= c.interval);
    }

    #[tokio::test(start_paused = true)]
    async fn revoked_wipes_once_then_stops() {
        let mut s = Schedule::new(cfg(), seed(), Instant::now());
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
        s.on(Input::Revoked, Instant::now());
        assert_eq!(s.next(Instant::now()), Action::Wipe);
        assert_eq!(s.next(Instant::now()), Action::Stop);
        s.on(Input::ManualRequest, Instant::now());
        assert_eq!(s.next(Instant::now()), Action::Stop);
        assert_eq!(s.next_attempt_at(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn same_seed_same_schedule() {
        let run = |seed| {
            let mut s = Schedule::new(cfg(), seed, Instant::now());
            (0..10)
                .map(|_| {
                    let now = Instant::now();
                    s.next(now);
                    s.on(Input::Failed { retry_after: None }, now);
                    s.next_attempt_at().unwrap() - now
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(seed()), run(seed()));
        assert_ne!(run(seed()), run(seed() + 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_live_feed_is_held_only_after_a_success_and_a_move_syncs_now() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        assert!(
            !s.should_watch(Instant::now()),
            "nothing held before a sync"
        );
        attempt(&mut s, Input::Succeeded);
        assert!(s.should_watch(Instant::now()));
        tokio::time::advance(Duration::from_secs(40)).await;
        s.on(
            Input::Watched(WatchEnd::Unchanged {
                held: Duration::from_secs(25),
            }),
            Instant::now(),
        );
        assert!(s.should_watch(Instant::now()), "held again at once");
        assert!(matches!(s.next(Instant::now()), Action::SleepUntil(_)));
        s.on(Input::Watched(WatchEnd::Moved), Instant::now());
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
        assert!(!s.should_watch(Instant::now()), "not while an attempt runs");
        // A failed attempt stops the live feed until the next success.
        s.on(Input::Failed { retry_after: None }, Instant::now());
        assert!(!s.should_watch(Instant::now()));
        assert_eq!(s.watch_resumes_at(), None);
        tokio::time::advance(c.backoff_max).await;
        attempt(&mut s, Input::Succeeded);
        assert!(s.should_watch(Instant::now()));
        // A server without the live feed: poll until the next success.
        s.on(Input::Watched(WatchEnd::Unavailable), Instant::now());
        assert!(!s.should_watch(Instant::now()));
        let off = cfg();
        let mut s = Schedule::new(
            ScheduleConfig { live: false, ..off },
            seed(),
            Instant::now(),
        );
        attempt(&mut s, Input::Succeeded);
        assert!(!s.should_watch(Instant::now()), "--no-live");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_the_live_feed_brought_forward_retries_spread_wide() {
        let c = cfg();
        // Many tablets woken by the same change, whose attempts then fail together.
        let mut woken = Vec::new();
        for i in 0..200u64 {
            let mut s = Schedule::new(c, seed() + i, Instant::now());
            attempt(&mut s, Input::Succeeded);
            tokio::time::advance(Duration::from_secs(60)).await;
            s.on(Input::Watched(WatchEnd::Moved), Instant::now());
            woken.push(attempt(&mut s, Input::Failed { retry_after: None }) - Instant::now());
        }
        assert!(
            woken
                .iter()
                .all(|w| *w >= c.min_gap && *w <= c.watch_retry_first),
            "{woken:?}"
        );
        // Spread over the whole window, not bunched in its first seconds.
        let late = woken
            .iter()
            .filter(|w| **w > Duration::from_secs(8))
            .count();
        let early = woken
            .iter()
            .filter(|w| **w < Duration::from_secs(4))
            .count();
        assert!(late > 50 && early > 20, "{late} late, {early} early");
        // Not woken by the feed (a timer, a lookup), the first retry stays short; and the
        // retry after a success is short again.
        let mut s = Schedule::new(c, seed(), Instant::now());
        attempt(&mut s, Input::Succeeded);
        tokio::time::advance(Duration::from_secs(60)).await;
        s.on(Input::Watched(WatchEnd::Moved), Instant::now());
        attempt(&mut s, Input::Succeeded);
        tokio::time::advance(c.interval + c.interval_jitter).await;
        let t = attempt(&mut s, Input::Failed { retry_after: None });
        assert!(t - Instant::now() <= c.backoff_min);
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_waits_for_a_backoff_or_retry_after() {
        let mut s = Schedule::new(cfg(), seed(), Instant::now());
        attempt(&mut s, Input::Succeeded);
        let planned = s.next_attempt_at().unwrap();
        // A manual request during the attempt ran; the server then asked to wait.
        tokio::time::advance(Duration::from_secs(60)).await;
        s.on(Input::ManualRequest, Instant::now());
        assert_eq!(s.next(Instant::now()), Action::StartAttempt);
        s.on(
            Input::Failed {
                retry_after: Some(Duration::from_secs(120)),
            },
            Instant::now(),
        );
        s.on(Input::Watched(WatchEnd::Moved), Instant::now());
        let at = s.next_attempt_at().unwrap();
        assert!(
            at >= Instant::now() + Duration::from_secs(120),
            "Retry-After stands"
        );
        assert!(at < planned);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_wait_is_held_again_after_a_growing_full_jitter_delay() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        attempt(&mut s, Input::Succeeded);
        let mut ceilings = Vec::new();
        for n in 0..8u32 {
            let now = Instant::now();
            s.on(Input::Watched(WatchEnd::Failed { retry_after: None }), now);
            assert!(!s.should_watch(now));
            let resume = s.watch_resumes_at().unwrap();
            let ceiling = (c.watch_retry_first * 2u32.pow(n)).min(c.watch_retry_max);
            assert!(resume >= now + c.min_gap && resume <= now + ceiling, "{n}");
            ceilings.push(ceiling);
            tokio::time::advance(resume - now).await;
            assert!(s.should_watch(Instant::now()));
        }
        assert_eq!(*ceilings.last().unwrap(), c.watch_retry_max);
        // The server's Retry-After is a floor.
        let now = Instant::now();
        s.on(
            Input::Watched(WatchEnd::Failed {
                retry_after: Some(Duration::from_secs(600)),
            }),
            now,
        );
        assert!(s.watch_resumes_at().unwrap() >= now + Duration::from_secs(600));
        // Held and answered normally: the delay starts again from the first ceiling.
        tokio::time::advance(Duration::from_secs(600)).await;
        s.on(
            Input::Watched(WatchEnd::Unchanged {
                held: Duration::from_secs(25),
            }),
            Instant::now(),
        );
        s.on(
            Input::Watched(WatchEnd::Failed { retry_after: None }),
            Instant::now(),
        );
        assert!(s.watch_resumes_at().unwrap() <= Instant::now() + c.watch_retry_first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fleet_cut_at_once_comes_back_spread_out() {
        // 200 tablets whose server restarted: their waits all fail at the same instant.
        let now = Instant::now();
        let resumes: Vec<Duration> = (0..200u64)
            .map(|tablet| {
                let mut s = Schedule::new(cfg(), seed() + tablet, now);
                assert_eq!(s.next(now), Action::StartAttempt);
                s.on(Input::Succeeded, now);
                s.on(Input::Watched(WatchEnd::Failed { retry_after: None }), now);
                s.watch_resumes_at().unwrap() - now
            })
            .collect();
        // Spread over the first ceiling: no second holds more than a tenth of the fleet.
        let mut per_second = std::collections::BTreeMap::new();
        for r in &resumes {
            *per_second.entry(r.as_secs()).or_insert(0) += 1;
        }
        assert!(per_second.len() >= 10, "{per_second:?}");
        assert!(per_second.values().all(|n| *n <= 30), "{per_second:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_answers_waits_at_once_is_not_spun_on() {
        let c = cfg();
        let mut s = Schedule::new(c, seed(), Instant::now());
        attempt(&mut s, Input::Succeeded);
        for _ in 0..3 {
            let resume = s.watch_resumes_at().unwrap();
            tokio::time::advance(resume.saturating_duration_since(Instant::now())).await;
            assert!(s.should_watch(Instant::now()));
            s.on(
                Input::Watched(WatchEnd::Unchanged {
                    held: Duration::from_millis(5),
                }),
                Instant::now(),
            );
            assert!(!s.should_watch(Instant::now()), "never again at once");
        }
        assert_eq!(s.watch_resumes_at(), None, "three in a row: poll instead");
    }
}
