//! The agent's local API documents (DESIGN.md §6, "Agent local API"): what an ePR app sends
//! to and receives from `cpis-agent` on loopback, and what `cpis-agent … --json` prints.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::contacts::RecentContact;
use crate::events::LookupResult;
use crate::ids::{CouncilCode, DeviceId, EventId, PlanType, RegionId, TrustCode};
use crate::policy::{Freshness, Policy};

/// `POST /v1/lookups` request. `nhs_number` is text so that any of the three accepted forms
/// (and invalid input, which gets a `400` with the reason) can be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    pub nhs_number: String,
    #[serde(default)]
    pub staff_id: Option<String>,
    #[serde(default)]
    pub incident_ref: Option<String>,
}

/// A council as shown with a flag: who to call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouncilContact {
    pub ods: CouncilCode,
    pub name: String,
    pub emergency_phone: String,
    pub office_phone: Option<String>,
}

/// One matched flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagView {
    pub plan_type: PlanType,
    pub start_date: NaiveDate,
    /// Set when the plan has ended (it stays visible for 12 months after).
    pub end_date: Option<NaiveDate>,
    /// True when `end_date` is on or before today.
    pub ended: bool,
    pub council: CouncilContact,
}

/// A council the data covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveredCouncil {
    pub ods: CouncilCode,
    pub name: String,
}

/// Which data an answer covered: the region and its councils (including neighbours carried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub region: RegionId,
    pub councils: Vec<CoveredCouncil>,
}

/// Something the user must know about an answer (stale data, no data, outbox backlog, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    pub code: String,
    pub message: String,
}

/// `POST /v1/lookups` answer (and `cpis-agent lookup --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    /// The number looked up, ten digits.
    pub nhs_number: String,
    pub result: LookupResult,
    pub flags: Vec<FlagView>,
    pub freshness: Freshness,
    /// Server time of the last verified checkpoint the data reflects; `None` with no data.
    pub data_as_of: Option<DateTime<Utc>>,
    /// Age of the data in seconds as the agent judges it (see the agent's freshness rule).
    pub data_age_secs: Option<u64>,
    pub region: RegionId,
    pub coverage: Coverage,
    pub warnings: Vec<Warning>,
    /// The access event recorded (durably) for this lookup.
    pub event_id: EventId,
    /// The subject's recent unscheduled-care contacts (newest first, at most 25): from the
    /// tablet's own data (offline), or from the national check when it answered.
    #[serde(default)]
    pub recent_contacts: Vec<RecentContact>,
    /// The online national check of a regional miss, when the server answered within the
    /// agent's bound; `None` when it was not asked or did not answer in time (the answer is
    /// then the regional one, with its `coverage`).
    #[serde(default)]
    pub national: Option<NationalCheck>,
}

/// What the online national check answered (see `cpis_protocol::confirm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NationalCheck {
    /// `flagged` or `not_flagged`, from every council's live flags.
    pub result: LookupResult,
    /// The server's clock when it checked.
    pub checked_at: DateTime<Utc>,
    /// How many councils the national set covers.
    pub councils_covered: u64,
}

/// `GET /v1/status` answer (and `cpis-agent status --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub device: DeviceId,
    pub trust: TrustCode,
    pub region: RegionId,
    pub server: String,
    pub epoch: Option<u64>,
    pub version: Option<u64>,
    pub data_as_of: Option<DateTime<Utc>>,
    pub data_age_secs: Option<u64>,
    pub freshness: Freshness,
    pub policy: Policy,
    /// Number of subjects (NHS numbers) with at least one flag held.
    pub subjects: u64,
    pub councils: Vec<CoveredCouncil>,
    pub last_sync_attempt: Option<DateTime<Utc>>,
    pub last_sync_success: Option<DateTime<Utc>>,
    pub last_sync_error: Option<String>,
    pub outbox_pending: u64,
    /// Access events the server refused for good, kept sealed aside (never re-sent).
    #[serde(default)]
    pub outbox_set_aside: u64,
    /// Failed sync attempts in a row (the background loop backs off after each).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// When the background loop plans its next attempt (tablet clock), while `run` is up.
    #[serde(default)]
    pub next_sync_at: Option<DateTime<Utc>>,
    pub client_cert_expires_at: DateTime<Utc>,
    /// How the device master key is protected (`tpm2` or `file`).
    pub key_protection: crate::KeyProtection,
    pub warnings: Vec<Warning>,
}

/// `POST /v1/sync` answer: what one sync did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// `up_to_date`, `delta` or `snapshot`.
    pub action: String,
    pub epoch: Option<u64>,
    pub version: Option<u64>,
    pub data_as_of: Option<DateTime<Utc>>,
    pub events_sent: u64,
}
