//! Access events: made on the tablet at each lookup, uploaded in batches, acknowledged.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{CouncilCode, DeviceId, EventId, PlanType, TrustCode};
use crate::nhs::NhsNumber;
use crate::policy::Freshness;

/// The tri-state answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupResult {
    Flagged,
    NotFlagged,
    /// The data is too old (or absent) to rely on a miss.
    Unknown,
}

impl LookupResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Flagged => "flagged",
            LookupResult::NotFlagged => "not_flagged",
            LookupResult::Unknown => "unknown",
        }
    }
}

/// Where the subject was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CareSetting {
    Ambulance,
    EmergencyDepartment,
    UrgentTreatmentCentre,
    Other,
}

/// One lookup, as recorded durably on the tablet before its answer is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    pub event_id: EventId,
    /// The tablet's clock when the lookup happened.
    pub accessed_at: DateTime<Utc>,
    pub trust: TrustCode,
    pub device: DeviceId,
    pub staff_id: Option<String>,
    pub nhs_number: NhsNumber,
    pub result: LookupResult,
    pub plan_types: Vec<PlanType>,
    pub councils: Vec<CouncilCode>,
    /// Server time of the checkpoint the answer relied on.
    pub data_as_of: Option<DateTime<Utc>>,
    pub freshness: Freshness,
    pub setting: CareSetting,
    pub incident_ref: Option<String>,
    /// Unscheduled care (the default, and all ambulance care): a flagged lookup notifies
    /// each owning council. `false` (scheduled care, e.g. an ePR's FHIR search with
    /// `IsUnscheduledAccessEvent: false`): recorded in the audit trail, no council notice,
    /// as in the national service. Left out of the JSON when `true`, so events from agents
    /// before this field read, and compare, as they always did.
    #[serde(
        default = "unscheduled_default",
        skip_serializing_if = "is_unscheduled"
    )]
    pub unscheduled: bool,
}

fn unscheduled_default() -> bool {
    true
}

fn is_unscheduled(unscheduled: &bool) -> bool {
    *unscheduled
}

/// A batch of events sent by a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<AccessEvent>,
}

/// An event the server will never store (malformed, or not the device's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedEvent {
    pub event_id: EventId,
    pub code: String,
    pub message: String,
}

/// The server's answer to a batch: the ids durably stored (including ones it already had),
/// and the ones rejected for good. Only `stored` ids may be marked sent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EventUploadAck {
    pub stored: Vec<EventId>,
    pub rejected: Vec<RejectedEvent>,
}
