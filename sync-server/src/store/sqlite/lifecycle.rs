//! SQL of the device lifecycle: each device's latest report (the fleet view), certificate
//! renewals, and the chain of signed feed signing key rollovers.

use chrono::{DateTime, Utc};
use cpis_protocol::{DeviceId, DeviceReport, KeyRollover, PublicKey, SignedMessage, TrustCode};
use rusqlite::{Connection, OptionalExtension, params};

use super::{DEVICE_COLS, bad, device_from_row, read_device};
use crate::store::codec::ts;
use crate::store::{FleetEntry, KeyRolloverRecord, StoreError, StoredReport};

/// Schema of device reports and key rollovers, and the clock-suspect mark on events
/// (migration 3).
pub(super) const MIGRATION: &str = r#"
CREATE TABLE device_reports (
    device TEXT PRIMARY KEY REFERENCES devices(id), body TEXT NOT NULL,
    received_at INTEGER NOT NULL
) STRICT;
CREATE TABLE key_rollovers (
    seq INTEGER PRIMARY KEY, previous TEXT NOT NULL, next TEXT NOT NULL UNIQUE,
    issued_at INTEGER NOT NULL, signed BLOB NOT NULL
) STRICT;
ALTER TABLE events ADD COLUMN clock_suspect INTEGER NOT NULL DEFAULT 0;
"#;

/// The sealed new key of a rollover, for replicas (migration 7).
pub(super) const SEALED_KEY_MIGRATION: &str = r#"
ALTER TABLE key_rollovers ADD COLUMN sealed_next BLOB;
"#;

pub(super) fn record_report(
    c: &Connection,
    id: &DeviceId,
    report: &DeviceReport,
    received_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if read_device(c, id)?.is_none() {
        return Err(StoreError::Missing(format!("device {id}")));
    }
    let body = serde_json::to_string(report).map_err(|e| StoreError::Task(e.to_string()))?;
    c.execute(
        "INSERT INTO device_reports (device, body, received_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (device) DO UPDATE SET body = excluded.body, \
         received_at = excluded.received_at",
        params![id.to_string(), body, ts(received_at)],
    )?;
    // The agent's version as last reported is what the fleet view shows.
    c.execute(
        "UPDATE devices SET agent_version = ?2 WHERE id = ?1",
        params![
            id.to_string(),
            report.agent_version.chars().take(100).collect::<String>()
        ],
    )?;
    Ok(())
}

pub(super) fn renew(
    c: &Connection,
    id: &DeviceId,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE devices SET cert_expires_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id.to_string(), ts(expires_at)],
    )?;
    if n == 0 {
        return Err(StoreError::Missing(format!("active device {id}")));
    }
    Ok(())
}

/// Every device (or one trust's) with its latest report, newest enrolment first.
pub(super) fn fleet(
    c: &Connection,
    trust: Option<&TrustCode>,
) -> Result<Vec<FleetEntry>, StoreError> {
    let cols: Vec<String> = DEVICE_COLS
        .split(',')
        .map(|col| format!("d.{}", col.trim()))
        .collect();
    let mut stmt = c.prepare(&format!(
        "SELECT {}, r.body, r.received_at FROM devices d \
         LEFT JOIN device_reports r ON r.device = d.id WHERE ?1 IS NULL OR d.trust = ?1 \
         ORDER BY d.enrolled_at DESC, d.id DESC",
        cols.join(", ")
    ))?;
    let rows = stmt.query_map([trust.map(TrustCode::as_str)], |row| {
        let device = device_from_row(row)?;
        let body: Option<String> = row.get(9)?;
        let received: Option<i64> = row.get(10)?;
        let report = match (body, received) {
            (Some(body), Some(received)) => Some(StoredReport {
                report: serde_json::from_str(&body).map_err(|e| bad(9, e))?,
                received_at: super::from_ts(10, received)?,
            }),
            _ => None,
        };
        Ok(FleetEntry { device, report })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn add_rollover(c: &Connection, record: &KeyRolloverRecord) -> Result<(), StoreError> {
    let r = &record.rollover;
    c.execute(
        "INSERT INTO key_rollovers (previous, next, issued_at, signed, sealed_next) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            r.previous.to_string(),
            r.next.to_string(),
            ts(r.issued_at),
            record.signed.to_bytes(),
            record.sealed_next
        ],
    )
    .map_err(|e| {
        if super::is_constraint(&e) {
            StoreError::Conflict(format!("a rollover to key {}", r.next))
        } else {
            StoreError::from(e)
        }
    })?;
    Ok(())
}

pub(super) fn rollovers(c: &Connection) -> Result<Vec<KeyRolloverRecord>, StoreError> {
    let mut stmt =
        c.prepare("SELECT previous, signed, sealed_next FROM key_rollovers ORDER BY seq")?;
    let rows = stmt.query_map([], |row| {
        let previous: PublicKey = super::parse_col(row, 0)?;
        let bytes: Vec<u8> = row.get(1)?;
        let signed = SignedMessage::from_bytes(&bytes).map_err(|e| bad(1, e))?;
        // Checked again on the way out: a row that its previous key did not sign is corrupt.
        let rollover: KeyRollover = signed
            .open(previous.verifying_key())
            .map_err(|e| bad(1, e))?;
        Ok(KeyRolloverRecord {
            rollover,
            signed,
            sealed_next: row.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn current_key(c: &Connection) -> Result<Option<String>, StoreError> {
    Ok(c.query_row(
        "SELECT next FROM key_rollovers ORDER BY seq DESC LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()?)
}
