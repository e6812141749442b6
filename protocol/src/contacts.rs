//! Recent unscheduled-care contacts of a flagged subject (DOMAIN.md, "Access notifications"):
//! the last 25 times an organisation saw the subject, shown to crews and to councils.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::events::CareSetting;
use crate::ids::TrustCode;
use crate::nhs::NhsNumber;

/// At most this many contacts are kept per subject (the newest).
pub const MAX_RECENT_CONTACTS: usize = 25;

/// An organisation that saw a subject (today: an ambulance trust).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Organisation {
    pub ods: TrustCode,
    pub name: String,
}

/// One contact: when (the access date, UTC), who and where.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecentContact {
    #[serde(with = "crate::dates::date")]
    pub date: NaiveDate,
    pub organisation: Organisation,
    pub setting: CareSetting,
}

/// A subject's recent contacts, newest first, at most [`MAX_RECENT_CONTACTS`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SubjectContacts {
    pub nhs_number: NhsNumber,
    pub contacts: Vec<RecentContact>,
}
