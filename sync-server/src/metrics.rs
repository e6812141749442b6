//! Prometheus metrics, served as text at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) route: String,
    pub(crate) method: String,
    pub(crate) status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UploadLabels {
    pub(crate) result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabels {
    /// `stored` (new), `duplicate`, `rejected`.
    pub(crate) outcome: &'static str,
    /// `upload` or `confirm`.
    pub(crate) source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CouncilLabels {
    pub(crate) council: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ShedLabels {
    /// `overloaded` (503) or `rate_limited` (429).
    pub(crate) reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConfirmLabels {
    pub(crate) result: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) uploads: Family<UploadLabels, Counter>,
    pub(crate) upload_changes: Counter,
    pub(crate) head_version: Gauge,
    pub(crate) snapshot_build_seconds: Histogram,
    pub(crate) snapshot_cache_hits: Counter,
    pub(crate) purged_flags: Counter,
    pub(crate) events: Family<EventLabels, Counter>,
    pub(crate) event_delay_seconds: Histogram,
    pub(crate) notifications_queued: Counter,
    pub(crate) notifications_acknowledged: Counter,
    pub(crate) mailbox_pending: Family<CouncilLabels, Gauge>,
    pub(crate) mailbox_overdue: Family<CouncilLabels, Gauge>,
    pub(crate) confirmations: Family<ConfirmLabels, Counter>,
    pub(crate) shed_requests: Family<ShedLabels, Counter>,
    pub(crate) requests_in_flight: Gauge,
    pub(crate) anonymous_in_flight: Gauge,
    pub(crate) confirmations_refused: Counter,
    pub(crate) request_timeouts: Counter,
    pub(crate) live_waiting: Gauge,
    pub(crate) live_answers: Family<LiveLabels, Counter>,
}

/// How a waiting checkpoint request ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LiveLabels {
    /// `changed` (its region's head moved), `unchanged` (held for the whole wait),
    /// `closing` (the server stopping), `full` (refused: `live_max_waiting` held).
    pub(crate) outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cpis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let uploads = Family::<UploadLabels, Counter>::default();
        registry.register(
            "council_uploads",
            "Council uploads by result (accepted, rejected)",
            uploads.clone(),
        );
        let upload_changes = Counter::default();
        registry.register(
            "upload_changes",
            "Flag changes applied from council uploads",
            upload_changes.clone(),
        );
        let head_version = Gauge::default();
        registry.register(
            "head_version",
            "Global change-log head version",
            head_version.clone(),
        );
        let snapshot_build_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "snapshot_build_seconds",
            "Time to build, compress and sign a region snapshot",
            snapshot_build_seconds.clone(),
        );
        let snapshot_cache_hits = Counter::default();
        registry.register(
            "snapshot_cache_hits",
            "Snapshot requests served from the cache",
            snapshot_cache_hits.clone(),
        );
        let purged_flags = Counter::default();
        registry.register(
            "purged_flags",
            "Flags purged 12 months after their end date",
            purged_flags.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "access_events",
            "Access events received, by outcome (stored, duplicate, rejected) and source",
            events.clone(),
        );
        // 1 s .. ~48 days: tablets can be offline for a long time.
        let event_delay_seconds = Histogram::new(exponential_buckets(1.0, 4.0, 13));
        registry.register(
            "event_delay_seconds",
            "Delay between a lookup on the tablet (its clock) and the server storing its event",
            event_delay_seconds.clone(),
        );
        let notifications_queued = Counter::default();
        registry.register(
            "notifications_queued",
            "Access notifications queued in council mailboxes",
            notifications_queued.clone(),
        );
        let notifications_acknowledged = Counter::default();
        registry.register(
            "notifications_acknowledged",
            "Access notifications acknowledged by councils",
            notifications_acknowledged.clone(),
        );
        let mailbox_pending = Family::<CouncilLabels, Gauge>::default();
        registry.register(
            "mailbox_pending",
            "Unacknowledged notifications per council mailbox",
            mailbox_pending.clone(),
        );
        let mailbox_overdue = Family::<CouncilLabels, Gauge>::default();
        registry.register(
            "mailbox_overdue",
            "Notifications unacknowledged for more than 5 days, per council mailbox",
            mailbox_overdue.clone(),
        );
        let confirmations = Family::<ConfirmLabels, Counter>::default();
        registry.register(
            "online_confirmations",
            "Online confirmations answered, by national result",
            confirmations.clone(),
        );
        let shed_requests = Family::<ShedLabels, Counter>::default();
        registry.register(
            "shed_requests",
            "Requests answered 503 overloaded (server saturated) or 429 rate_limited (one \
             device over its rate), each with Retry-After",
            shed_requests.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "API requests being handled (at most max_concurrent_requests)",
            requests_in_flight.clone(),
        );
        let anonymous_in_flight = Gauge::default();
        registry.register(
            "anonymous_requests_in_flight",
            "Requests without a known credential being handled (at most \
             anonymous_concurrent_requests)",
            anonymous_in_flight.clone(),
        );
        let confirmations_refused = Counter::default();
        registry.register(
            "online_confirmations_refused",
            "Online confirmations refused 429 because one device asked more often than \
             confirm_per_device_per_minute",
            confirmations_refused.clone(),
        );
        let request_timeouts = Counter::default();
        registry.register(
            "request_timeouts",
            "Requests answered 408 because they were not complete within request_timeout_secs",
            request_timeouts.clone(),
        );
        let live_waiting = Gauge::default();
        registry.register(
            "live_waiting",
            "Waiting checkpoint requests held (the live feed; at most live_max_waiting)",
            live_waiting.clone(),
        );
        let live_answers = Family::<LiveLabels, Counter>::default();
        registry.register(
            "live_answers",
            "Waiting checkpoint requests ended, by outcome",
            live_answers.clone(),
        );
        Self {
            registry,
            live_waiting,
            live_answers,
            anonymous_in_flight,
            confirmations_refused,
            request_timeouts,
            requests,
            uploads,
            upload_changes,
            head_version,
            snapshot_build_seconds,
            snapshot_cache_hits,
            purged_flags,
            events,
            event_delay_seconds,
            notifications_queued,
            notifications_acknowledged,
            mailbox_pending,
            mailbox_overdue,
            confirmations,
            shed_requests,
            requests_in_flight,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
