//! Protocol integration and property tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod codec;
mod columns;
mod nhs;
mod verify;

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::{CouncilCode, CouncilInfo, FlagRecord, NhsNumber, PlanType, RegionId};
use proptest::prelude::*;

/// A fixed instant for deterministic tests.
pub(crate) fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000, 0).unwrap()
}

pub(crate) fn region(s: &str) -> RegionId {
    s.parse().unwrap()
}

pub(crate) fn arb_nhs() -> impl Strategy<Value = NhsNumber> {
    prop::array::uniform9(0u8..10).prop_filter_map("check value 10", NhsNumber::complete)
}

pub(crate) fn arb_date() -> impl Strategy<Value = NaiveDate> {
    (730_000i32..740_000).prop_map(|d| NaiveDate::from_num_days_from_ce_opt(d).unwrap())
}

pub(crate) fn arb_council() -> impl Strategy<Value = CouncilCode> {
    "[A-Z][A-Z0-9]{2,8}".prop_map(|s| s.parse().unwrap())
}

pub(crate) fn arb_flag() -> impl Strategy<Value = FlagRecord> {
    (
        arb_council(),
        arb_nhs(),
        prop::sample::select(PlanType::ALL.to_vec()),
        arb_date(),
        prop::option::of(arb_date()),
        prop::option::of(arb_date()),
        prop::option::of("[A-Za-z0-9-]{0,12}"),
    )
        .prop_map(
            |(council, nhs_number, plan_type, start_date, end_date, date_of_birth, local_id)| {
                FlagRecord {
                    council,
                    nhs_number,
                    plan_type,
                    start_date,
                    end_date,
                    date_of_birth,
                    local_id,
                }
            },
        )
}

pub(crate) fn council_info(code: &str) -> CouncilInfo {
    CouncilInfo {
        code: code.parse().unwrap(),
        name: format!("Council {code}"),
        region: region("EM"),
        emergency_phone: "01632 960001".into(),
        office_phone: Some("01632 960002".into()),
    }
}

pub(crate) fn arb_contacts() -> impl Strategy<Value = cpis_protocol::SubjectContacts> {
    use cpis_protocol::{CareSetting, Organisation, RecentContact};
    let contact = (
        arb_date(),
        "[A-Z][A-Z0-9]{2,4}",
        "[A-Za-z ]{0,20}",
        prop::sample::select(vec![
            CareSetting::Ambulance,
            CareSetting::EmergencyDepartment,
            CareSetting::UrgentTreatmentCentre,
            CareSetting::Other,
        ]),
    )
        .prop_map(|(date, ods, name, setting)| RecentContact {
            date,
            organisation: Organisation {
                ods: ods.parse().unwrap(),
                name,
            },
            setting,
        });
    (arb_nhs(), prop::collection::vec(contact, 0..=25)).prop_map(|(nhs_number, contacts)| {
        cpis_protocol::SubjectContacts {
            nhs_number,
            contacts,
        }
    })
}
