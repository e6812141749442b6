//! The fleet view of `admin device list`: each device's latest report judged against the
//! policy at the server's time, sorted with the stalest data first and revoked devices last.
//! Pure logic, no IO.

use chrono::{DateTime, Duration, Utc};
use cpis_protocol::Policy;

use crate::store::FleetEntry;

/// How a device's data stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DataStatus {
    /// The agent has not sent a report (or has no data).
    NoReport,
    /// Older than the policy's wipe age: the tablet has erased its data by itself.
    PastWipeAge,
    /// Older than the expiry age: lookups answer `unknown`.
    Expired,
    /// Older than the fresh age.
    Stale,
    Ok,
    Revoked,
}

impl DataStatus {
    /// The word shown in the table and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DataStatus::NoReport => "no-report",
            DataStatus::PastWipeAge => "WIPE-AGE",
            DataStatus::Expired => "EXPIRED",
            DataStatus::Stale => "stale",
            DataStatus::Ok => "ok",
            DataStatus::Revoked => "revoked",
        }
    }
}

/// One device in the fleet view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRow {
    pub entry: FleetEntry,
    /// Server time now minus the server time of the device's data.
    pub data_age: Option<Duration>,
    pub status: DataStatus,
    /// The later of the last authenticated request and the last report.
    pub last_seen: Option<DateTime<Utc>>,
}

/// Judges and sorts the fleet: revoked last; otherwise devices without data first, then
/// the oldest data first; ties by device id.
pub fn view(entries: Vec<FleetEntry>, policy: &Policy, now: DateTime<Utc>) -> Vec<FleetRow> {
    let secs = |s: u64| Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000));
    let mut rows: Vec<FleetRow> = entries
        .into_iter()
        .map(|entry| {
            let data_as_of = entry.report.as_ref().and_then(|r| r.report.data_as_of);
            let data_age = data_as_of.map(|t| now - t);
            let status = if entry.device.revoked_at.is_some() {
                DataStatus::Revoked
            } else {
                match data_age {
                    None => DataStatus::NoReport,
                    Some(age) if age > secs(policy.wipe_secs) => DataStatus::PastWipeAge,
                    Some(age) if age > secs(policy.expiry_secs) => DataStatus::Expired,
                    Some(age) if age > secs(policy.fresh_secs) => DataStatus::Stale,
                    Some(_) => DataStatus::Ok,
                }
            };
            let last_seen = entry
                .device
                .last_seen
                .into_iter()
                .chain(entry.report.as_ref().map(|r| r.received_at))
                .max();
            FleetRow {
                entry,
                data_age,
                status,
                last_seen,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        let revoked = |r: &FleetRow| r.entry.device.revoked_at.is_some();
        let as_of = |r: &FleetRow| r.entry.report.as_ref().and_then(|r| r.report.data_as_of);
        revoked(a)
            .cmp(&revoked(b))
            .then_with(|| as_of(a).cmp(&as_of(b)))
            .then_with(|| {
                a.entry
                    .device
                    .id
                    .to_string()
                    .cmp(&b.entry.device.id.to_string())
            })
    });
    rows
}

/// A duration as a short age: `45s`, `12m`, `3h 05m`, `4d 02h`.
pub fn format_age(d: Duration) -> String {
    let s = d.num_seconds();
    if s < 0 {
        return format!("-{}", format_age(-d));
    }
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Text a device sent (its name, its agent version) made safe to print on a terminal or in
/// a tab-separated table: every control character (escape sequences, tabs, newlines,
/// carriage returns, C1 controls) is shown as `\u{..}` instead of acting on the terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn control_characters_in_device_text_are_shown_not_obeyed() {
        assert_eq!(printable("Tablet 7"), "Tablet 7");
        assert_eq!(
            printable("evil\u{1b}]0;pwned\u{7}\u{1b}[2J\tx\ny\r\u{9b}"),
            "evil\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{9}x\\u{a}y\\u{d}\\u{9b}"
        );
        assert_eq!(printable("Ambulance – Café"), "Ambulance – Café");
    }
    use crate::store::{DeviceRecord, StoredReport};
    use cpis_protocol::{DeviceId, DeviceReport};

    fn now() -> DateTime<Utc> {
        "2025-06-01T12:00:00Z".parse().unwrap()
    }

    fn entry(age_hours: Option<i64>, revoked: bool) -> FleetEntry {
        FleetEntry {
            device: DeviceRecord {
                id: DeviceId::new(),
                trust: "RX9".parse().unwrap(),
                region: "EM".parse().unwrap(),
                name: None,
                agent_version: "1".into(),
                cert_expires_at: now(),
                enrolled_at: now(),
                last_seen: None,
                revoked_at: revoked.then(now),
            },
            report: age_hours.map(|h| StoredReport {
                report: DeviceReport {
                    agent_version: "1".into(),
                    data_epoch: Some(1),
                    data_version: Some(1),
                    data_as_of: Some(now() - Duration::hours(h)),
                    outbox_pending: 0,
                    outbox_set_aside: 0,
                    client_cert_expires_at: None,
                    reported_at: now(),
                    key_protection: None,
                },
                received_at: now() - Duration::minutes(1),
            }),
        }
    }

    #[test]
    fn stalest_first_revoked_last_and_judged_by_the_policy() {
        let policy = Policy::default();
        let rows = view(
            vec![
                entry(Some(1), false),
                entry(Some(1), true),
                entry(Some(24 * 8), false),
                entry(None, false),
                entry(Some(24 * 31), false),
                entry(Some(30), false),
            ],
            &policy,
            now(),
        );
        let statuses: Vec<DataStatus> = rows.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            vec![
                DataStatus::NoReport,
                DataStatus::PastWipeAge,
                DataStatus::Expired,
                DataStatus::Stale,
                DataStatus::Ok,
                DataStatus::Revoked,
            ]
        );
        assert_eq!(rows[4].data_age, Some(Duration::hours(1)));
        assert_eq!(rows[4].last_seen, Some(now() - Duration::minutes(1)));
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(format_age(Duration::seconds(5)), "5s");
        assert_eq!(format_age(Duration::minutes(90)), "1h 30m");
        assert_eq!(format_age(Duration::hours(50)), "2d 02h");
    }
}
