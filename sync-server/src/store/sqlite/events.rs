//! SQL of access events, the audit log, council mailboxes and recent contacts.
//!
//! Events are keyed by event id (`INSERT OR IGNORE`: the first write stands); notifications
//! are unique on (event, council); the audit log refuses updates and deletes (triggers).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use cpis_protocol::mailbox::{Notification, NotificationId, OVERDUE_AFTER_DAYS};
use cpis_protocol::{
    AccessEvent, CareSetting, CouncilCode, CouncilInfo, EventId, FlagRecord, MAX_RECENT_CONTACTS,
    NhsNumber, Organisation, PlanType, RecentContact,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::collections::BTreeMap;

use super::{bad, head_version, nhs, opt_date, parse_col, set_head_version};
use crate::ingest;
use crate::store::codec::{self, OP_CONTACTS, ms, plan_types_text, setting_text, ts};
use crate::store::{
    AuditEntry, EventIngest, IngestOutcome, MailboxStats, NationalLookup, StoreError, StoredEvent,
};

/// Schema of events, notifications, contacts and the audit log (migration 2).
pub(super) const MIGRATION: &str = r#"
CREATE INDEX flags_nhs ON flags(nhs_number);
CREATE INDEX changes_nhs ON changes(nhs_number, council);
CREATE TABLE events (
    event_id TEXT PRIMARY KEY, device TEXT NOT NULL, trust TEXT NOT NULL,
    trust_name TEXT NOT NULL, nhs_number INTEGER NOT NULL, result TEXT NOT NULL,
    accessed_at INTEGER NOT NULL, received_at INTEGER NOT NULL, source TEXT NOT NULL,
    body TEXT NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX events_device ON events(device);
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY, event_id TEXT NOT NULL REFERENCES events(event_id),
    council TEXT NOT NULL REFERENCES councils(code), plan_types TEXT NOT NULL,
    created_at INTEGER NOT NULL, acked_at INTEGER,
    UNIQUE (event_id, council)
) STRICT;
CREATE INDEX notifications_pending ON notifications(council, id) WHERE acked_at IS NULL;
CREATE TABLE contacts (
    nhs_number INTEGER NOT NULL, event_id TEXT NOT NULL, accessed_at INTEGER NOT NULL,
    trust TEXT NOT NULL, trust_name TEXT NOT NULL, setting TEXT NOT NULL,
    PRIMARY KEY (nhs_number, event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX contacts_recent ON contacts(nhs_number, accessed_at DESC, event_id DESC);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY, at INTEGER NOT NULL, action TEXT NOT NULL, event_id TEXT,
    device TEXT, council TEXT, detail TEXT
) STRICT;
CREATE INDEX audit_event ON audit_log(event_id) WHERE event_id IS NOT NULL;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#;

fn from_ms(idx: usize, v: i64) -> Result<DateTime<Utc>, rusqlite::Error> {
    DateTime::from_timestamp_millis(v).ok_or(rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

fn setting_from(row: &Row<'_>, idx: usize) -> Result<CareSetting, rusqlite::Error> {
    let s: String = row.get(idx)?;
    Ok(codec::setting_from(&s))
}

fn plan_types_from(row: &Row<'_>, idx: usize) -> Result<Vec<PlanType>, rusqlite::Error> {
    let s: String = row.get(idx)?;
    codec::plan_types_from(&s).map_err(|e| bad(idx, e))
}

fn event_from(idx: usize, body: &str) -> Result<AccessEvent, rusqlite::Error> {
    serde_json::from_str(body).map_err(|e| bad(idx, e))
}

#[allow(clippy::too_many_arguments)]
fn audit(
    conn: &Connection,
    at: DateTime<Utc>,
    action: &str,
    event_id: Option<&EventId>,
    device: Option<String>,
    council: Option<&CouncilCode>,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit_log (at, action, event_id, device, council, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    stmt.execute(params![
        ms(at),
        action,
        event_id.map(ToString::to_string),
        device,
        council.map(CouncilCode::as_str),
        detail
    ])?;
    Ok(())
}

/// The plan types a council holds, or held within the change log, for a subject: a council
/// is only notified of a subject it has (or recently had) a flag for.
fn held_plan_types(
    conn: &Connection,
    council: &CouncilCode,
    nhs_number: NhsNumber,
) -> Result<BTreeSet<PlanType>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT plan_type FROM flags WHERE nhs_number = ?1 AND council = ?2 \
         UNION SELECT plan_type FROM changes WHERE nhs_number = ?1 AND council = ?2 \
         AND op IN ('upsert', 'remove')",
    )?;
    let rows = stmt.query_map(params![nhs_number.as_u64() as i64, council.as_str()], |r| {
        parse_col::<PlanType>(r, 0)
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Stores a batch (inside the writer's transaction). See [`crate::store::Store::ingest_events`].
pub(super) fn ingest(
    conn: &Connection,
    ingest: &EventIngest,
) -> Result<Vec<IngestOutcome>, StoreError> {
    let at = ingest.received_at;
    let device = ingest.device.to_string();
    let trust_name: String = conn
        .query_row(
            "SELECT name FROM trusts WHERE code = ?1",
            [ingest.trust.as_str()],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or_else(|| ingest.trust.to_string());
    for r in &ingest.refused {
        audit(
            conn,
            at,
            "event_refused",
            r.event_id.as_ref(),
            Some(device.clone()),
            None,
            Some(&format!("{}: {}", r.code, r.detail)),
        )?;
    }
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO events (event_id, device, trust, trust_name, nhs_number, result, \
         accessed_at, received_at, source, body, clock_suspect) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let mut stored_body = conn.prepare_cached("SELECT body FROM events WHERE event_id = ?1")?;
    let mut notify = conn.prepare_cached(
        "INSERT OR IGNORE INTO notifications (event_id, council, plan_types, created_at) \
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut contact = conn.prepare_cached(
        "INSERT OR IGNORE INTO contacts (nhs_number, event_id, accessed_at, trust, trust_name, \
         setting) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut prune = conn.prepare_cached(
        "DELETE FROM contacts WHERE nhs_number = ?1 AND event_id NOT IN (SELECT event_id \
         FROM contacts WHERE nhs_number = ?1 ORDER BY accessed_at DESC, event_id DESC \
         LIMIT ?2)",
    )?;
    let mut kept =
        conn.prepare_cached("SELECT 1 FROM contacts WHERE nhs_number = ?1 AND event_id = ?2")?;
    let mut outcomes = Vec::with_capacity(ingest.events.len());
    for ie in &ingest.events {
        let e = &ie.event;
        let id = e.event_id.to_string();
        let nhs_value = e.nhs_number.as_u64() as i64;
        let inserted = insert.execute(params![
            id,
            device,
            ingest.trust.as_str(),
            trust_name,
            nhs_value,
            e.result.as_str(),
            ms(e.accessed_at),
            ms(at),
            ingest.source.as_str(),
            ie.body,
            ie.clock_suspect
        ])?;
        let new = inserted > 0;
        let mut conflict = false;
        if new {
            audit(
                conn,
                at,
                "event_stored",
                Some(&e.event_id),
                Some(device.clone()),
                None,
                Some(ingest.source.as_str()),
            )?;
        } else {
            let before: String = stored_body.query_row([&id], |r| r.get(0))?;
            let repeat = ingest::repeated(&before, &ie.body, ingest.source);
            conflict = repeat.conflict;
            if repeat.audit == Some("event_resent_different") {
                tracing::warn!(
                    event = %e.event_id, device = %ingest.device,
                    "event id sent again with different content; the first stored version stands"
                );
            }
            if let Some(action) = repeat.audit {
                audit(
                    conn,
                    at,
                    action,
                    Some(&e.event_id),
                    Some(device.clone()),
                    None,
                    Some(&ie.body),
                )?;
            }
            if !repeat.notify {
                outcomes.push(IngestOutcome {
                    event_id: e.event_id,
                    new,
                    conflict,
                    notified: Vec::new(),
                    contacts_changed: false,
                });
                continue;
            }
        }
        let mut notified = Vec::new();
        for council in ingest::councils_to_notify(e) {
            let held = held_plan_types(conn, council, e.nhs_number)?;
            let Some(types) = ingest::notified_plan_types(&e.plan_types, &held) else {
                tracing::warn!(
                    event = %e.event_id, %council,
                    "flagged event names a council that holds no flag for the subject; \
                     no notification"
                );
                continue;
            };
            let n = notify.execute(params![
                id,
                council.as_str(),
                plan_types_text(&types),
                ms(at)
            ])?;
            if n > 0 {
                audit(
                    conn,
                    at,
                    "notification_queued",
                    Some(&e.event_id),
                    Some(device.clone()),
                    Some(council),
                    None,
                )?;
            }
            notified.push(council.clone());
        }
        let mut contacts_changed = false;
        if !notified.is_empty() {
            let when = ingest::contact_time(e, ie.clock_suspect, at);
            let added = contact.execute(params![
                nhs_value,
                id,
                ms(when),
                ingest.trust.as_str(),
                trust_name,
                setting_text(e.setting)
            ])?;
            if added > 0 {
                prune.execute(params![nhs_value, MAX_RECENT_CONTACTS as i64])?;
                contacts_changed = kept
                    .query_row(params![nhs_value, id], |_| Ok(()))
                    .optional()?
                    .is_some();
                if contacts_changed {
                    record_contacts_change(conn, e.nhs_number, at)?;
                }
            }
        }
        outcomes.push(IngestOutcome {
            event_id: e.event_id,
            new,
            conflict,
            notified,
            contacts_changed,
        });
    }
    Ok(outcomes)
}

/// Records that a subject's contacts changed: one change-log entry (the next version) per
/// council holding a flag for it, so every region holding the subject carries the change.
fn record_contacts_change(
    conn: &Connection,
    nhs_number: NhsNumber,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut holders = conn.prepare_cached(
        "SELECT DISTINCT council FROM flags WHERE nhs_number = ?1 ORDER BY council",
    )?;
    let councils = holders
        .query_map([nhs_number.as_u64() as i64], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if councils.is_empty() {
        return Ok(());
    }
    let mut log = conn.prepare_cached(
        "INSERT INTO changes (version, council, nhs_number, plan_type, op, reason, recorded_at) \
         VALUES (?1, ?2, ?3, '', ?4, 'contacts', ?5)",
    )?;
    let mut version = head_version(conn)?;
    for council in councils {
        version += 1;
        log.execute(params![
            version as i64,
            council,
            nhs_number.as_u64() as i64,
            OP_CONTACTS,
            ts(now)
        ])?;
    }
    set_head_version(conn, version)?;
    Ok(())
}

/// Adds the recent contacts of one council's flagged subjects to `out` (snapshots).
pub(super) fn council_subject_contacts(
    conn: &Connection,
    council: &str,
    out: &mut BTreeMap<NhsNumber, Vec<RecentContact>>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT nhs_number, accessed_at, trust, trust_name, setting FROM contacts \
         WHERE nhs_number IN (SELECT nhs_number FROM flags WHERE council = ?1) \
         ORDER BY nhs_number, accessed_at DESC, event_id DESC",
    )?;
    let mut rows = stmt.query([council])?;
    let mut read: BTreeMap<NhsNumber, Vec<RecentContact>> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let subject = nhs(r, 0)?;
        // A subject already read through another council of the region is the same list.
        if !out.contains_key(&subject) {
            read.entry(subject)
                .or_default()
                .push(contact_from_row(r, 1)?);
        }
    }
    out.extend(read);
    Ok(())
}

fn contact_from_row(r: &Row<'_>, at: usize) -> Result<RecentContact, rusqlite::Error> {
    Ok(RecentContact {
        date: from_ms(at, r.get(at)?)?.date_naive(),
        organisation: Organisation {
            ods: parse_col(r, at + 1)?,
            name: r.get(at + 2)?,
        },
        setting: setting_from(r, at + 3)?,
    })
}

/// A subject's recent contacts, newest first.
pub(super) fn contacts(
    conn: &Connection,
    nhs_number: NhsNumber,
) -> Result<Vec<RecentContact>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT accessed_at, trust, trust_name, setting FROM contacts WHERE nhs_number = ?1 \
         ORDER BY accessed_at DESC, event_id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![nhs_number.as_u64() as i64, MAX_RECENT_CONTACTS as i64],
        |r| contact_from_row(r, 0),
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every council's flags for a subject.
pub(super) fn national_lookup(
    conn: &Connection,
    nhs_number: NhsNumber,
) -> Result<NationalLookup, StoreError> {
    let tx = conn.unchecked_transaction()?;
    let mut stmt = tx.prepare_cached(
        "SELECT f.council, f.nhs_number, f.plan_type, f.start_date, f.end_date, \
         f.date_of_birth, f.local_id, c.code, c.name, c.region, c.emergency_phone, \
         c.office_phone FROM flags f JOIN councils c ON c.code = f.council \
         WHERE f.nhs_number = ?1 ORDER BY f.council, f.plan_type",
    )?;
    let rows = stmt.query_map([nhs_number.as_u64() as i64], |r| {
        let flag = FlagRecord {
            council: parse_col(r, 0)?,
            nhs_number: nhs(r, 1)?,
            plan_type: parse_col(r, 2)?,
            start_date: parse_col(r, 3)?,
            end_date: opt_date(r, 4)?,
            date_of_birth: opt_date(r, 5)?,
            local_id: r.get(6)?,
        };
        let council = CouncilInfo {
            code: parse_col(r, 7)?,
            name: r.get(8)?,
            region: parse_col(r, 9)?,
            emergency_phone: r.get(10)?,
            office_phone: r.get(11)?,
        };
        Ok((flag, council))
    })?;
    let flags = rows.collect::<Result<Vec<_>, _>>()?;
    drop(stmt);
    let councils_covered: i64 = tx.query_row("SELECT count(*) FROM councils", [], |r| r.get(0))?;
    let contacts = contacts(&tx, nhs_number)?;
    tx.finish()?;
    Ok(NationalLookup {
        flags,
        councils_covered: councils_covered as u64,
        contacts,
    })
}

/// A page of a council's mailbox.
pub(super) fn list(
    conn: &Connection,
    council: &CouncilCode,
    after: u64,
    limit: u32,
    now: DateTime<Utc>,
) -> Result<Vec<Notification>, StoreError> {
    let tx = conn.unchecked_transaction()?;
    let overdue_before = ms(now - chrono::Duration::days(OVERDUE_AFTER_DAYS));
    let mut stmt = tx.prepare_cached(
        "SELECT n.id, n.plan_types, n.created_at, e.body, e.received_at, e.trust_name, \
         e.clock_suspect \
         FROM notifications n JOIN events e ON e.event_id = n.event_id \
         WHERE n.council = ?1 AND n.acked_at IS NULL AND n.id > ?2 ORDER BY n.id LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            council.as_str(),
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::from(limit)
        ],
        |r| {
            let id: i64 = r.get(0)?;
            let id = NotificationId::try_from(id as u64).map_err(|e| bad(0, e))?;
            let created_at: i64 = r.get(2)?;
            let body: String = r.get(3)?;
            let e = event_from(3, &body)?;
            Ok(Notification {
                id,
                event_id: e.event_id,
                nhs_number: e.nhs_number,
                plan_types: plan_types_from(r, 1)?,
                accessed_at: e.accessed_at,
                received_at: from_ms(4, r.get(4)?)?,
                organisation: Organisation {
                    ods: e.trust,
                    name: r.get(5)?,
                },
                device_id: e.device,
                staff_id: e.staff_id,
                setting: e.setting,
                data_as_of: e.data_as_of,
                incident_ref: e.incident_ref,
                recent_contacts: Vec::new(),
                overdue: created_at < overdue_before,
                clock_suspect: r.get(6)?,
            })
        },
    )?;
    let mut page = rows.collect::<Result<Vec<_>, _>>()?;
    drop(stmt);
    let mut cache: HashMap<NhsNumber, Vec<RecentContact>> = HashMap::new();
    for n in &mut page {
        let contacts = match cache.entry(n.nhs_number) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(contacts(&tx, n.nhs_number)?),
        };
        n.recent_contacts.clone_from(contacts);
    }
    tx.finish()?;
    Ok(page)
}

/// Acknowledges the council's own notifications among `ids`.
pub(super) fn acknowledge(
    conn: &Connection,
    council: &CouncilCode,
    ids: &[NotificationId],
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE notifications SET acked_at = ?1 WHERE id = ?2 AND council = ?3 \
         AND acked_at IS NULL RETURNING event_id",
    )?;
    let mut n = 0u64;
    for id in ids {
        let event: Option<String> = stmt
            .query_row(params![ms(now), id.get() as i64, council.as_str()], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(event) = event {
            n += 1;
            let event_id = event.parse::<EventId>().ok();
            audit(
                conn,
                now,
                "notification_acknowledged",
                event_id.as_ref(),
                None,
                Some(council),
                Some(&id.to_string()),
            )?;
        }
    }
    Ok(n)
}

/// Pending and overdue counts of every council's mailbox.
pub(super) fn stats(
    conn: &Connection,
    overdue_before: DateTime<Utc>,
) -> Result<Vec<MailboxStats>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.code, c.name, count(n.id), coalesce(sum(n.created_at < ?1), 0), \
         min(n.created_at) FROM councils c LEFT JOIN notifications n \
         ON n.council = c.code AND n.acked_at IS NULL GROUP BY c.code ORDER BY c.code",
    )?;
    let rows = stmt.query_map([ms(overdue_before)], |r| {
        let oldest: Option<i64> = r.get(4)?;
        Ok(MailboxStats {
            council: parse_col(r, 0)?,
            name: r.get(1)?,
            pending: r.get::<_, i64>(2)? as u64,
            overdue: r.get::<_, i64>(3)? as u64,
            oldest_pending: oldest.map(|v| from_ms(4, v)).transpose()?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One stored event.
pub(super) fn stored_event(
    conn: &Connection,
    id: &EventId,
) -> Result<Option<StoredEvent>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT body, received_at, source FROM events WHERE event_id = ?1",
            [id.to_string()],
            |r| {
                Ok(StoredEvent {
                    event: event_from(0, &r.get::<_, String>(0)?)?,
                    received_at: from_ms(1, r.get(1)?)?,
                    source: r.get(2)?,
                })
            },
        )
        .optional()?)
}

/// Every stored event id.
pub(super) fn event_ids(conn: &Connection) -> Result<Vec<EventId>, StoreError> {
    let mut stmt = conn.prepare("SELECT event_id FROM events ORDER BY event_id")?;
    let rows = stmt.query_map([], |r| parse_col::<EventId>(r, 0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The audit entries of one event.
pub(super) fn audit_entries(
    conn: &Connection,
    id: &EventId,
) -> Result<Vec<AuditEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT at, action, event_id, device, council, detail FROM audit_log \
         WHERE event_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([id.to_string()], |r| {
        let opt = |idx: usize| -> Result<Option<String>, rusqlite::Error> { r.get(idx) };
        Ok(AuditEntry {
            at: from_ms(0, r.get(0)?)?,
            action: r.get(1)?,
            event_id: opt(2)?
                .map(|s| s.parse().map_err(|e| bad(2, e)))
                .transpose()?,
            device: opt(3)?
                .map(|s| s.parse().map_err(|e| bad(3, e)))
                .transpose()?,
            council: opt(4)?
                .map(|s| s.parse().map_err(|e| bad(4, e)))
                .transpose()?,
            detail: opt(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes the contacts of subjects no council flags any more.
pub(super) fn purge_orphan_contacts(conn: &Connection) -> Result<u64, StoreError> {
    let n = conn.execute(
        "DELETE FROM contacts WHERE NOT EXISTS \
         (SELECT 1 FROM flags WHERE flags.nhs_number = contacts.nhs_number)",
        [],
    )?;
    Ok(n as u64)
}
