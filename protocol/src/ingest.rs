//! Event upload limits and the codes of events the server rejects for good
//! (`POST /v1/device/events`, JSON [`crate::EventBatch`] → [`crate::EventUploadAck`]).
//!
//! A batch is answered `200` only after every stored event is durably committed; `stored`
//! lists every event id sent that the server holds (including ids it already had: uploads
//! are idempotent by event id, and the first stored version of an id stands). `rejected`
//! events will never be stored: set them aside and report them; they must not block the
//! queue. A batch with more than [`MAX_BATCH_EVENTS`] events, or a body above the server's
//! limit (1 MiB by default), is refused whole with `413`; a body that is not a JSON batch, or
//! an event whose `event_id` cannot be read, with `400`.

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 500;
/// Longest `staff_id` and `incident_ref`, in characters.
pub const MAX_TEXT_CHARS: usize = 256;
/// How far ahead of the server's clock an event's times may be, in seconds.
pub const MAX_CLOCK_AHEAD_SECS: i64 = 24 * 3600;
/// Events accessed before this date (UTC) are implausible (tablet clock unset).
pub const EARLIEST_ACCESS: &str = "2024-01-01T00:00:00Z";

/// `RejectedEvent::code` values.
pub mod codes {
    /// The event's `device` or `trust` is not the caller's own.
    pub const NOT_OWN_EVENT: &str = "not_own_event";
    /// The event could not be read (unknown field value, wrong type) or breaks a limit.
    pub const MALFORMED_EVENT: &str = "malformed_event";
    /// `accessed_at` or `data_as_of` is impossible (before 2024, or more than a day ahead of
    /// the server's clock). No longer sent by the server: such events are stored and their
    /// notifications carry `clock_suspect: true` (a lookup must reach the council even from
    /// a tablet with a wrong clock). Kept so older agents' code still compiles.
    pub const IMPLAUSIBLE_TIME: &str = "implausible_time";
}
