//! Online confirmation (DESIGN.md §4): when the server is reachable, a regional miss is
//! checked against every council's live flags nationally.
//!
//! The tablet records the lookup's [`AccessEvent`] in its outbox first, as for any lookup,
//! then sends it here with a short timeout. The server answers from its live national data
//! and stores the event with the answer it gave (result, plan types and councils of the
//! flags it returned, `data_as_of` = the server's time, freshness `fresh`), de-duplicated
//! by event id exactly like `POST /v1/device/events`, and queues a notification for each
//! council whose flag it returned. A `200` therefore means the event is durably stored: the
//! tablet may mark it sent. Without an answer (timeout, offline) the tablet shows its
//! regional answer with its coverage and later uploads the event as it recorded it; if the
//! server had in fact stored the confirmed version, the first write wins.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::contacts::RecentContact;
use crate::events::{AccessEvent, LookupResult};
use crate::ids::EventId;
use crate::local::FlagView;
use crate::nhs::NhsNumber;

/// `POST` (mutual TLS): JSON [`ConfirmRequest`] → [`ConfirmResponse`].
pub const PATH: &str = "/v1/device/confirm";

/// The lookup to confirm: its access event (the NHS number is the event's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmRequest {
    pub event: AccessEvent,
}

/// The national answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmResponse {
    pub nhs_number: NhsNumber,
    /// `flagged` or `not_flagged`, from every council's live flags.
    pub result: LookupResult,
    /// Every council's flags for the subject (live first, then most recent), with who to call.
    pub flags: Vec<FlagView>,
    /// The server's clock when it checked: the answer is as of this time.
    pub checked_at: DateTime<Utc>,
    /// How many councils the national set covers.
    pub councils_covered: u64,
    /// The subject's recent contacts (newest first, at most 25); empty when not flagged.
    pub recent_contacts: Vec<RecentContact>,
    /// The event stored for this check (the request's event id).
    pub event_id: EventId,
}
