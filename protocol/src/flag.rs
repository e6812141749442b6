//! The flag record and the council directory entry carried in feeds.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::ids::{CouncilCode, PlanType, RegionId};
use crate::nhs::NhsNumber;

/// What identifies a flag: one council's plan of one type for one subject.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FlagKey {
    pub council: CouncilCode,
    pub nhs_number: NhsNumber,
    pub plan_type: PlanType,
}

/// One flag: a council's plan for a subject, with its dates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FlagRecord {
    pub council: CouncilCode,
    pub nhs_number: NhsNumber,
    pub plan_type: PlanType,
    #[serde(with = "crate::dates::date")]
    pub start_date: NaiveDate,
    #[serde(with = "crate::dates::opt_date")]
    pub end_date: Option<NaiveDate>,
    #[serde(with = "crate::dates::opt_date")]
    pub date_of_birth: Option<NaiveDate>,
    pub local_id: Option<String>,
}

impl FlagRecord {
    /// The flag's identity.
    pub fn key(&self) -> FlagKey {
        FlagKey {
            council: self.council.clone(),
            nhs_number: self.nhs_number,
            plan_type: self.plan_type,
        }
    }

    /// True when the plan has ended on or before `today`.
    pub fn is_ended(&self, today: NaiveDate) -> bool {
        self.end_date.is_some_and(|end| end <= today)
    }
}

/// How far back a plan's end date may lie and still be carried: 12 months.
pub const RETENTION_MONTHS: u32 = 12;

/// The last day a flag ended on `end` is still shown (12 months after its end date).
pub fn retained_until(end: NaiveDate) -> NaiveDate {
    end.checked_add_months(chrono::Months::new(RETENTION_MONTHS))
        .unwrap_or(NaiveDate::MAX)
}

/// A council as crews need to see it: who to call.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CouncilInfo {
    pub code: CouncilCode,
    pub name: String,
    pub region: RegionId,
    /// Out-of-hours number; always present.
    pub emergency_phone: String,
    pub office_phone: Option<String>,
}
