//! The council mailbox (DESIGN.md §6): access notifications listed with an opaque cursor,
//! acknowledged by id, overdue when unacknowledged for 5 days.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::contacts::{Organisation, RecentContact};
use crate::events::CareSetting;
use crate::ids::{DeviceId, EventId, IdError, PlanType};
use crate::nhs::NhsNumber;

/// Notifications unacknowledged for longer than this are reported as overdue.
pub const OVERDUE_AFTER_DAYS: i64 = 5;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size (and most ids in one acknowledgement).
pub const MAX_LIMIT: u32 = 1000;

/// `GET` this path with the council's ODS code: `/v1/councils/{ods}/notifications`.
pub fn notifications_path(ods: &str) -> String {
    format!("/v1/councils/{ods}/notifications")
}

/// `POST` this path to acknowledge: `/v1/councils/{ods}/notifications/ack`.
pub fn ack_path(ods: &str) -> String {
    format!("/v1/councils/{ods}/notifications/ack")
}

/// A notification's id: a positive integer, unique across all mailboxes, increasing in the
/// order notifications were queued.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct NotificationId(u64);

impl NotificationId {
    /// The id as an integer.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for NotificationId {
    type Error = IdError;
    fn try_from(v: u64) -> Result<Self, IdError> {
        if v == 0 || v > i64::MAX as u64 {
            return Err(IdError {
                kind: "notification id",
                value: v.to_string(),
                reason: format!("must be between 1 and {}", i64::MAX),
            });
        }
        Ok(Self(v))
    }
}

impl From<NotificationId> for u64 {
    fn from(v: NotificationId) -> u64 {
        v.0
    }
}

impl FromStr for NotificationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let v: u64 = s.trim().parse().map_err(|_| IdError {
            kind: "notification id",
            value: s.to_owned(),
            reason: "must be a positive integer".to_owned(),
        })?;
        Self::try_from(v)
    }
}

impl fmt::Display for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NotificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NotificationId({})", self.0)
    }
}

/// One access notification: a flagged record of the council's was looked up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub id: NotificationId,
    pub event_id: EventId,
    pub nhs_number: NhsNumber,
    /// The plan types of this council's flags that were shown.
    pub plan_types: Vec<PlanType>,
    /// When the lookup happened (the tablet's clock).
    pub accessed_at: DateTime<Utc>,
    /// When the server stored the event (the server's clock).
    pub received_at: DateTime<Utc>,
    /// Who looked the subject up.
    pub organisation: Organisation,
    pub device_id: DeviceId,
    pub staff_id: Option<String>,
    pub setting: CareSetting,
    /// Server time of the data the answer relied on.
    pub data_as_of: Option<DateTime<Utc>>,
    pub incident_ref: Option<String>,
    /// The subject's most recent contacts (newest first, at most 25) as the server holds
    /// them when the page is listed.
    pub recent_contacts: Vec<RecentContact>,
    /// Unacknowledged for more than [`OVERDUE_AFTER_DAYS`] since it was queued.
    pub overdue: bool,
    /// The tablet's clock was wrong when it recorded the lookup (`accessed_at` before 2024,
    /// or more than a day ahead of the server): `accessed_at` is what the tablet said and
    /// cannot be relied on; `received_at` (the server's clock) bounds when it happened.
    /// Added after the first release: absent means `false`.
    #[serde(default)]
    pub clock_suspect: bool,
}

/// `GET /v1/councils/{ods}/notifications` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationPage {
    /// Unacknowledged notifications in the order they were queued.
    pub notifications: Vec<Notification>,
    /// Opaque cursor for the next page (`?after=`); `None` when this page reached the end.
    pub next: Option<String>,
}

/// `POST /v1/councils/{ods}/notifications/ack` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRequest {
    pub ids: Vec<NotificationId>,
}

/// `POST /v1/councils/{ods}/notifications/ack` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResponse {
    /// How many of the ids left the council's mailbox with this request. Ids of other
    /// councils, unknown ids and ids already acknowledged are not counted.
    pub acknowledged: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_ids_are_positive_integers() {
        let id: NotificationId = "42".parse().unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "42");
        assert_eq!(serde_json::from_str::<NotificationId>("42").unwrap(), id);
        assert!(serde_json::from_str::<NotificationId>("0").is_err());
        assert!("x".parse::<NotificationId>().is_err());
    }
}
