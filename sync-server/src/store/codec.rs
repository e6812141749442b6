//! How domain values are written into database columns, shared by both backends so a value
//! reads back the same whichever database holds it.

use chrono::NaiveDate;
use cpis_protocol::{CareSetting, PlanType};

/// The change-log op of a subject's recent-contacts change.
pub(crate) const OP_CONTACTS: &str = "contacts";
/// The change-log op of an added or changed flag.
pub(crate) const OP_UPSERT: &str = "upsert";
/// The change-log op of a removed flag.
pub(crate) const OP_REMOVE: &str = "remove";

/// A date as stored (ISO 8601).
pub(crate) fn date_text(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

/// A care setting as stored.
pub(crate) fn setting_text(s: CareSetting) -> &'static str {
    match s {
        CareSetting::Ambulance => "ambulance",
        CareSetting::EmergencyDepartment => "emergency_department",
        CareSetting::UrgentTreatmentCentre => "urgent_treatment_centre",
        CareSetting::Other => "other",
    }
}

/// A stored care setting (anything unknown reads as `Other`).
pub(crate) fn setting_from(s: &str) -> CareSetting {
    match s {
        "ambulance" => CareSetting::Ambulance,
        "emergency_department" => CareSetting::EmergencyDepartment,
        "urgent_treatment_centre" => CareSetting::UrgentTreatmentCentre,
        _ => CareSetting::Other,
    }
}

/// Plan types as stored: comma-separated codes.
pub(crate) fn plan_types_text(types: &[PlanType]) -> String {
    types
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Stored plan types.
pub(crate) fn plan_types_from(
    s: &str,
) -> Result<Vec<PlanType>, <PlanType as std::str::FromStr>::Err> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::parse)
        .collect()
}

/// Milliseconds since the epoch (event, notification, contact and audit times).
pub(crate) fn ms(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// Whole seconds since the epoch (every other time).
pub(crate) fn ts(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp()
}
