//! Load shedding: what the server answers when a fleet asks more than it can serve.
//!
//! Two limits guard every API route (not `/healthz` or `/metrics`, which stay outside so the
//! server reports healthy and can be measured while it sheds):
//!
//! * **Per device, `429 rate_limited`.** Each client-certificate device id has a token bucket
//!   of `device_burst` requests refilled at `device_requests_per_minute`. A device that polls
//!   faster than that is told to wait with `Retry-After` = the time until its bucket holds a
//!   request again (at least 1 s). The buckets live in one map bounded by
//!   `max_tracked_devices`: when it is full, buckets that have refilled (the same as no
//!   bucket) are dropped, and if that frees nothing the map starts over. Forgetting only ever
//!   makes the limiter more lenient, never stricter. Requests without a client certificate
//!   (councils, enrolment) are not counted here.
//! * **Whole server, `503 overloaded`.** At most `max_concurrent_requests` requests are
//!   handled at once; a request arriving when all are taken is answered at once (it never
//!   queues). Its `Retry-After` spreads the retries: the server counts, per one-second
//!   window, the requests it admitted and the ones it shed. `shed / admitted` is how many
//!   seconds of the server's present throughput the turned-away requests need, so the spread
//!   is `ceil(shed / admitted)` seconds (from the window just ended, or the current one if
//!   larger), between 1 and `retry_after_max_secs`, and each 503 carries a uniformly random
//!   whole number of seconds in `1..=spread`. A short burst gets `Retry-After: 1`; 20,000
//!   tablets hitting a server that admits 1,000 a second are spread over about 20 s.
//! * **A sync begun is finished.** A sync is several requests (checkpoint, delta or snapshot,
//!   events, report); shedding one part way wastes what was already done and brings the
//!   whole sync back later. So a device that had a request admitted in the last
//!   [`SESSION`] (5 s) is not shed at once when the slots are full: it waits up to
//!   [`SESSION_WAIT`] (2 s) for a slot (slots freed go to waiting requests first), and only
//!   then gets the 503. Waiting requests hold no slot; there are at most as many as devices
//!   served in the last 5 s. New devices are turned away at once.
//!
//! * **Anonymous requests apart.** A request with no credential the server knows (no client
//!   certificate, no valid council or trust admin bearer token, no live page session: sign-in
//!   pages, enrolment, bad tokens; see `http::Credentialed`) takes a slot of its own small pool,
//!   `anonymous_concurrent_requests`, never one of `max_concurrent_requests`. A thousand
//!   slow or hostile anonymous clients fill only that pool (then get 503 at once); tablets and
//!   signed-in councils are served as before.
//! * **Online confirmation per device, `429 rate_limited`.** `/v1/device/confirm` asks the
//!   national set about one NHS number: a stolen certificate must not make it an oracle. Each
//!   device has a second bucket for it alone, `confirm_burst` refilled at
//!   `confirm_per_device_per_minute` (default 4 a minute); beyond it 429 with `Retry-After`,
//!   counted in `cpis_online_confirmations_refused_total`. The agent then answers from its
//!   own data, naming the region it covers.
//!
//! All are counted in `cpis_shed_requests_total{reason="rate_limited"|"overloaded"|
//! "anonymous_overloaded"|"confirm_rate_limited"}`; `cpis_requests_in_flight` and
//! `cpis_anonymous_requests_in_flight` are the requests holding a slot of each pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cpis_protocol::DeviceId;
use rand::Rng as _;
use tokio::sync::Semaphore;

use crate::config::{Config, SheddingConfig};
use crate::http::{ApiError, Credentialed};
use crate::metrics::{Metrics, ShedLabels};
use crate::tls::ClientIdentity;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long after a device's request was admitted its next ones count as the same sync.
pub const SESSION: Duration = Duration::from_secs(5);
/// How long a request of a sync under way may wait for a slot before it is shed.
pub const SESSION_WAIT: Duration = Duration::from_secs(2);

/// The shedding state shared by every route (one per server).
#[derive(Debug)]
pub struct Shedder {
    permits: Arc<Semaphore>,
    /// The pool of requests without a known credential.
    anonymous: Arc<Semaphore>,
    /// Online confirmations per device (`None`: no limit).
    confirms: Option<Mutex<DeviceLimiter>>,
    /// When each device last had a request admitted (bounded like the rate limiter).
    sessions: Mutex<HashMap<DeviceId, Instant>>,
    max_sessions: usize,
    window: Mutex<Window>,
    retry_after_max: u64,
    devices: Option<Mutex<DeviceLimiter>>,
    metrics: Arc<Metrics>,
}

impl Shedder {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let s = &config.load_shedding;
        Self {
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            anonymous: Arc::new(Semaphore::new(s.anonymous_concurrent_requests.max(1))),
            confirms: DeviceLimiter::with_rate(
                s.confirm_per_device_per_minute,
                s.confirm_burst,
                s.max_tracked_devices,
            )
            .map(Mutex::new),
            sessions: Mutex::new(HashMap::new()),
            max_sessions: s.max_tracked_devices.max(1),
            window: Mutex::new(Window::new(Instant::now())),
            retry_after_max: s.retry_after_max_secs.max(1),
            devices: DeviceLimiter::new(s).map(Mutex::new),
            metrics,
        }
    }

    /// Takes one request of `device` from its bucket; `Err(wait)` when it has none.
    pub fn check_device(&self, device: DeviceId, now: Instant) -> Result<(), Duration> {
        match &self.devices {
            None => Ok(()),
            Some(d) => lock(d).take(device, now),
        }
    }

    /// Takes one online confirmation of `device` from its bucket; `Err(wait)` when it has
    /// none.
    pub fn check_confirm(&self, device: DeviceId, now: Instant) -> Result<(), Duration> {
        match &self.confirms {
            None => Ok(()),
            Some(d) => lock(d).take(device, now),
        }
    }

    /// The `Retry-After` of a request shed for overload at `now`.
    fn shed_retry_after(&self, now: Instant) -> Duration {
        let spread = {
            let mut w = lock(&self.window);
            w.roll(now);
            w.shed += 1;
            w.spread(self.retry_after_max)
        };
        Duration::from_secs(rand::thread_rng().gen_range(1..=spread))
    }

    fn admitted(&self, now: Instant, device: Option<DeviceId>) {
        {
            let mut w = lock(&self.window);
            w.roll(now);
            w.admitted += 1;
        }
        if let Some(d) = device {
            let mut sessions = lock(&self.sessions);
            if sessions.len() >= self.max_sessions && !sessions.contains_key(&d) {
                sessions.retain(|_, at| now.saturating_duration_since(*at) < SESSION);
                if sessions.len() >= self.max_sessions {
                    sessions.clear();
                }
            }
            sessions.insert(d, now);
        }
    }

    /// True when `device` had a request admitted within [`SESSION`] before `now`.
    fn in_session(&self, device: DeviceId, now: Instant) -> bool {
        lock(&self.sessions)
            .get(&device)
            .is_some_and(|at| now.saturating_duration_since(*at) < SESSION)
    }

    fn count(&self, reason: &'static str) {
        self.metrics
            .shed_requests
            .get_or_create(&ShedLabels { reason })
            .inc();
    }
}

/// The middleware of every shed route (`axum::middleware::from_fn_with_state`).
pub async fn layer(State(shed): State<Arc<Shedder>>, req: Request, next: Next) -> Response {
    let now = Instant::now();
    let device = match req.extensions().get::<ClientIdentity>().copied() {
        Some(ClientIdentity(Some(device))) => Some(device),
        _ => None,
    };
    if let Some(device) = device
        && let Err(wait) = shed.check_device(device, now)
    {
        shed.count("rate_limited");
        return ApiError::rate_limited(wait).into_response();
    }
    if let Some(device) = device
        && req.uri().path() == cpis_protocol::confirm::PATH
        && let Err(wait) = shed.check_confirm(device, now)
    {
        shed.count("confirm_rate_limited");
        shed.metrics.confirmations_refused.inc();
        tracing::warn!(%device, "online confirmation refused: over the device's rate");
        return ApiError::rate_limited(wait).into_response();
    }
    if req.extensions().get::<Credentialed>().is_none() {
        // No credential the server knows: the anonymous pool only, never a device's slot.
        let Ok(permit) = shed.anonymous.clone().try_acquire_owned() else {
            shed.count("anonymous_overloaded");
            return ApiError::overloaded(shed.shed_retry_after(Instant::now())).into_response();
        };
        shed.metrics.anonymous_in_flight.inc();
        let response = next.run(req).await;
        shed.metrics.anonymous_in_flight.dec();
        drop(permit);
        return response;
    }
    let permit = match shed.permits.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        // A sync under way waits a little for a slot rather than being cut part way.
        Err(_) if device.is_some_and(|d| shed.in_session(d, now)) => {
            tokio::time::timeout(SESSION_WAIT, shed.permits.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
        }
        Err(_) => None,
    };
    let Some(permit) = permit else {
        shed.count("overloaded");
        return ApiError::overloaded(shed.shed_retry_after(Instant::now())).into_response();
    };
    shed.admitted(Instant::now(), device);
    shed.metrics.requests_in_flight.inc();
    let response = next.run(req).await;
    shed.metrics.requests_in_flight.dec();
    drop(permit);
    response
}

/// Admitted and shed requests per one-second window.
#[derive(Debug)]
struct Window {
    started: Instant,
    admitted: u64,
    shed: u64,
    /// The spread (seconds) computed from the last window that ended.
    previous: u64,
}

const WINDOW: Duration = Duration::from_secs(1);

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            admitted: 0,
            shed: 0,
            previous: 1,
        }
    }

    fn ratio(admitted: u64, shed: u64) -> u64 {
        shed.div_ceil(admitted.max(1)).max(1)
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < WINDOW {
            return;
        }
        // A window with no traffic after it (more than one window ago) says nothing now.
        self.previous = if elapsed < 2 * WINDOW {
            Self::ratio(self.admitted, self.shed)
        } else {
            1
        };
        self.started = now;
        self.admitted = 0;
        self.shed = 0;
    }

    /// Seconds over which to spread retries, in `1..=max`.
    fn spread(&self, max: u64) -> u64 {
        self.previous
            .max(Self::ratio(self.admitted, self.shed))
            .clamp(1, max)
    }
}

/// Token buckets per device, in a map of bounded size.
#[derive(Debug)]
struct DeviceLimiter {
    /// Requests a device may make at once.
    burst: f64,
    /// Requests a device regains per second.
    per_sec: f64,
    max_devices: usize,
    buckets: HashMap<DeviceId, Bucket>,
    /// When the map last had to start over (logged at most once a minute).
    last_reset_log: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl DeviceLimiter {
    /// `None` when the per-device limit is off (`device_requests_per_minute = 0`).
    fn new(s: &SheddingConfig) -> Option<Self> {
        Self::with_rate(
            s.device_requests_per_minute,
            s.device_burst,
            s.max_tracked_devices,
        )
    }

    /// Buckets of `burst` refilled at `per_minute`; `None` when `per_minute` is 0 (no limit).
    fn with_rate(per_minute: u32, burst: u32, max_devices: usize) -> Option<Self> {
        if per_minute == 0 {
            return None;
        }
        Some(Self {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute) / 60.0,
            max_devices: max_devices.max(1),
            buckets: HashMap::new(),
            last_reset_log: None,
        })
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + secs * self.per_sec).min(self.burst)
    }

    fn take(&mut self, device: DeviceId, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(&device) && self.buckets.len() >= self.max_devices {
            self.make_room(now);
        }
        let tokens = match self.buckets.get(&device) {
            Some(b) => self.refilled(b, now),
            None => self.burst,
        };
        if tokens >= 1.0 {
            self.buckets.insert(
                device,
                Bucket {
                    tokens: tokens - 1.0,
                    at: now,
                },
            );
            Ok(())
        } else {
            self.buckets.insert(device, Bucket { tokens, at: now });
            let wait = Duration::from_secs_f64((1.0 - tokens) / self.per_sec);
            Err(wait.max(Duration::from_secs(1)))
        }
    }

    /// Drops the buckets that are full again; if none is, forgets every bucket.
    fn make_room(&mut self, now: Instant) {
        let burst = self.burst;
        let per_sec = self.per_sec;
        self.buckets.retain(|_, b| {
            let secs = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + secs * per_sec < burst
        });
        if self.buckets.len() >= self.max_devices {
            self.buckets.clear();
            if self
                .last_reset_log
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60))
            {
                self.last_reset_log = Some(now);
                tracing::warn!(
                    max = self.max_devices,
                    "more devices polling within one refill period than max_tracked_devices; \
                     the per-device rate limiter started over"
                );
            }
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limiter(per_minute: u32, burst: u32, max: usize) -> DeviceLimiter {
        DeviceLimiter::new(&SheddingConfig {
            device_requests_per_minute: per_minute,
            device_burst: burst,
            max_tracked_devices: max,
            ..SheddingConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_device_gets_its_burst_then_waits_for_the_refill() {
        let mut l = limiter(60, 3, 10);
        let (d, other) = (DeviceId::new(), DeviceId::new());
        let t = Instant::now();
        for _ in 0..3 {
            l.take(d, t).unwrap();
        }
        // One a second: the 4th waits a second, another device is not affected.
        assert_eq!(l.take(d, t).unwrap_err(), Duration::from_secs(1));
        l.take(other, t).unwrap();
        l.take(d, t + Duration::from_millis(1000)).unwrap();
        assert!(l.take(d, t + Duration::from_millis(1000)).is_err());
        // After a long pause the bucket is full again, never fuller.
        let later = t + Duration::from_secs(3600);
        for _ in 0..3 {
            l.take(d, later).unwrap();
        }
        assert!(l.take(d, later).is_err());
    }

    #[test]
    fn the_wait_is_the_time_until_one_request_is_back() {
        let mut l = limiter(6, 1, 10); // one every 10 s
        let d = DeviceId::new();
        let t = Instant::now();
        l.take(d, t).unwrap();
        assert_eq!(l.take(d, t).unwrap_err(), Duration::from_secs(10));
        let wait = l.take(d, t + Duration::from_secs(4)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
    }

    #[test]
    fn memory_is_bounded_and_drained_devices_are_kept_over_idle_ones() {
        let mut l = limiter(60, 2, 4);
        let t = Instant::now();
        // Three devices make one request each at t: full again (2 of 2) from t + 1 s.
        for _ in 0..3 {
            l.take(DeviceId::new(), t).unwrap();
        }
        // A busy device drains its bucket at t + 1.5 s: not full again before t + 3.5 s.
        let busy = DeviceId::new();
        let t2 = t + Duration::from_millis(1500);
        l.take(busy, t2).unwrap();
        l.take(busy, t2).unwrap();
        assert_eq!(l.tracked(), 4);
        // Full map, a new device at t + 2 s: the refilled buckets go, the busy one stays.
        let t3 = t + Duration::from_secs(2);
        l.take(DeviceId::new(), t3).unwrap();
        assert_eq!(l.tracked(), 2);
        assert!(
            l.take(busy, t3).is_err(),
            "the busy device is still limited"
        );
        // 1,000 new devices never grow the map past its bound.
        for i in 0..1000u64 {
            l.take(DeviceId::new(), t3 + Duration::from_millis(i))
                .unwrap();
            assert!(l.tracked() <= 4);
        }
    }

    #[test]
    fn the_spread_follows_how_many_were_turned_away_per_admitted_request() {
        let t = Instant::now();
        let mut w = Window::new(t);
        assert_eq!(w.spread(60), 1);
        w.admitted = 100;
        w.shed = 50;
        assert_eq!(w.spread(60), 1);
        w.shed = 2_000;
        assert_eq!(w.spread(60), 20);
        w.shed = 100_000;
        assert_eq!(w.spread(60), 60, "capped");
        // The window ends: its ratio carries into the next one, which starts empty.
        w.shed = 1_000;
        w.roll(t + Duration::from_millis(1200));
        assert_eq!((w.admitted, w.shed), (0, 0));
        assert_eq!(w.spread(60), 10);
        // A quiet spell afterwards forgets it.
        w.roll(t + Duration::from_secs(10));
        assert_eq!(w.spread(60), 1);
        // Nothing admitted while shedding: everything turned away counts.
        w.shed = 7;
        assert_eq!(w.spread(60), 7);
    }
}
