//! SQL behind the council and fleet pages: every council's recent upload attempts (applied
//! and refused, bounded per council) and the trusts' admin tokens (migration 4; checked and
//! revoked in `credentials`).

use chrono::{DateTime, Utc};
use cpis_protocol::CouncilCode;
use cpis_protocol::api::{UploadCounts, UploadError};
use rusqlite::{Connection, Row, params};

use super::{bad, from_ts, require};
use crate::store::codec::ts;
use crate::store::{
    AttemptOutcome, MAX_UPLOAD_ATTEMPTS, PageSession, RefusedUpload, SessionKind, StoreError,
    UploadAttempt,
};

/// Schema of upload attempts and trust admin tokens (migration 4). Applied uploads already
/// recorded are carried over (the newest [`MAX_UPLOAD_ATTEMPTS`] of each council).
pub(super) const MIGRATION: &str = r#"
CREATE TABLE upload_attempts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, council TEXT NOT NULL, received_at INTEGER NOT NULL,
    upload_id TEXT, message TEXT, error_count INTEGER NOT NULL DEFAULT 0, errors TEXT
) STRICT;
CREATE INDEX upload_attempts_council ON upload_attempts(council, seq);
INSERT INTO upload_attempts (council, received_at, upload_id)
    SELECT council, received_at, id FROM (
        SELECT council, received_at, id, row_number() OVER (
            PARTITION BY council ORDER BY received_at DESC, id DESC) AS n
        FROM uploads)
    WHERE n <= 100 ORDER BY received_at, id;
CREATE TABLE trust_admin_tokens (
    hash BLOB PRIMARY KEY, trust TEXT NOT NULL REFERENCES trusts(code),
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX devices_trust ON devices(trust);
"#;

/// Records an attempt (applied: `upload_id`; refused: the refusal) and drops the council's
/// attempts beyond the newest [`MAX_UPLOAD_ATTEMPTS`].
pub(super) fn record_attempt(
    c: &Connection,
    council: &CouncilCode,
    received_at: DateTime<Utc>,
    upload_id: Option<uuid::Uuid>,
    refused: Option<&RefusedUpload>,
) -> Result<(), StoreError> {
    let errors = refused
        .map(|r| serde_json::to_string(&r.errors))
        .transpose()
        .map_err(|e| StoreError::Task(e.to_string()))?;
    c.execute(
        "INSERT INTO upload_attempts (council, received_at, upload_id, message, error_count, \
         errors) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            council.as_str(),
            ts(received_at),
            upload_id.map(|u| u.to_string()),
            refused.map(|r| r.message.as_str()),
            refused.map_or(0, |r| i64::try_from(r.error_count).unwrap_or(i64::MAX)),
            errors
        ],
    )?;
    c.execute(
        "DELETE FROM upload_attempts WHERE council = ?1 AND seq <= (SELECT seq FROM \
         upload_attempts WHERE council = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        params![council.as_str(), MAX_UPLOAD_ATTEMPTS as i64],
    )?;
    Ok(())
}

pub(super) fn record_refusal(
    c: &Connection,
    council: &CouncilCode,
    refused: &RefusedUpload,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    require(
        c,
        "SELECT 1 FROM councils WHERE code = ?1",
        council.as_str(),
        "council",
    )?;
    record_attempt(c, council, now, None, Some(refused))
}

fn attempt_from_row(row: &Row<'_>) -> Result<UploadAttempt, rusqlite::Error> {
    let seq: i64 = row.get(0)?;
    let received_at = from_ts(1, row.get(1)?)?;
    let upload_id: Option<String> = row.get(2)?;
    let outcome = match upload_id {
        Some(id) => {
            let counts = |i: usize| -> Result<u64, rusqlite::Error> {
                Ok(row.get::<_, Option<i64>>(i)?.unwrap_or(0) as u64)
            };
            AttemptOutcome::Applied {
                upload_id: id.parse().map_err(|e| bad(2, e))?,
                counts: UploadCounts {
                    rows: counts(6)?,
                    added: counts(7)?,
                    updated: counts(8)?,
                    ended: counts(9)?,
                    removed: counts(10)?,
                    unchanged: counts(11)?,
                },
                version: counts(12)?,
            }
        }
        None => {
            let errors: Option<String> = row.get(5)?;
            let errors: Vec<UploadError> = match errors {
                Some(text) => serde_json::from_str(&text).map_err(|e| bad(5, e))?,
                None => Vec::new(),
            };
            AttemptOutcome::Refused(RefusedUpload {
                message: row.get::<_, Option<String>>(3)?.unwrap_or_default(),
                error_count: row.get::<_, i64>(4)? as u64,
                errors,
            })
        }
    };
    Ok(UploadAttempt {
        seq: seq as u64,
        received_at,
        outcome,
    })
}

/// The council's newest attempts first.
pub(super) fn attempts(
    c: &Connection,
    council: &CouncilCode,
    limit: u32,
) -> Result<Vec<UploadAttempt>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT a.seq, a.received_at, a.upload_id, a.message, a.error_count, a.errors, \
         u.rows, u.added, u.updated, u.ended, u.removed, u.unchanged, u.version \
         FROM upload_attempts a LEFT JOIN uploads u ON u.id = a.upload_id \
         WHERE a.council = ?1 ORDER BY a.seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![council.as_str(), i64::from(limit)],
        attempt_from_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Page sessions (migration 6), kept in the database so that every server replica sees a
/// sign-in and a sign-out; keyed by the SHA-256 of the cookie's value.
pub(super) const SESSIONS_MIGRATION: &str = r#"
CREATE TABLE page_sessions (
    id_hash BLOB PRIMARY KEY, kind TEXT NOT NULL, who TEXT NOT NULL, csrf TEXT NOT NULL,
    expires_at INTEGER NOT NULL, flash TEXT
) STRICT;
CREATE INDEX page_sessions_expiry ON page_sessions(expires_at);
"#;

pub(super) fn create_session(
    c: &Connection,
    id_hash: &[u8; 32],
    kind: SessionKind,
    session: &PageSession,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO page_sessions (id_hash, kind, who, csrf, expires_at, flash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            &id_hash[..],
            kind.as_str(),
            session.who,
            session.csrf,
            ts(session.expires_at),
            session.flash
        ],
    )?;
    Ok(())
}

pub(super) fn session(
    c: &Connection,
    id_hash: &[u8; 32],
    kind: SessionKind,
    now: DateTime<Utc>,
) -> Result<Option<PageSession>, StoreError> {
    use rusqlite::OptionalExtension as _;
    Ok(c.query_row(
        "SELECT who, csrf, expires_at, flash FROM page_sessions \
         WHERE id_hash = ?1 AND kind = ?2 AND expires_at > ?3",
        params![&id_hash[..], kind.as_str(), ts(now)],
        |r| {
            Ok(PageSession {
                who: r.get(0)?,
                csrf: r.get(1)?,
                expires_at: from_ts(2, r.get(2)?)?,
                flash: r.get(3)?,
            })
        },
    )
    .optional()?)
}

pub(super) fn set_flash(
    c: &Connection,
    id_hash: &[u8; 32],
    flash: Option<String>,
) -> Result<Option<String>, StoreError> {
    use rusqlite::OptionalExtension as _;
    let before: Option<Option<String>> = c
        .query_row(
            "SELECT flash FROM page_sessions WHERE id_hash = ?1",
            [&id_hash[..]],
            |r| r.get(0),
        )
        .optional()?;
    let Some(before) = before else {
        return Ok(None);
    };
    c.execute(
        "UPDATE page_sessions SET flash = ?2 WHERE id_hash = ?1",
        params![&id_hash[..], flash],
    )?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::sqlite::{MIGRATIONS, migrate};

    /// A database at the schema before this migration gets the uploads it already holds as
    /// applied attempts (the newest 100 per council), in order.
    #[test]
    fn the_migration_carries_recorded_uploads_over() {
        let mut c = Connection::open_in_memory().unwrap();
        let before = MIGRATIONS.iter().position(|m| *m == MIGRATION).unwrap();
        for sql in &MIGRATIONS[..before] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", before as u32)
            .unwrap();
        for i in 0..105i64 {
            c.execute(
                "INSERT INTO uploads (id, council, received_at, rows, added, updated, ended, \
                 removed, unchanged, version) VALUES (?1, 'E1000001', ?2, 1, 1, 0, 0, 0, 0, ?2)",
                params![uuid::Uuid::now_v7().to_string(), 1_000 + i],
            )
            .unwrap();
        }
        c.execute(
            "INSERT INTO uploads (id, council, received_at, rows, added, updated, ended, \
             removed, unchanged, version) VALUES (?1, 'E1000002', 5, 2, 2, 0, 0, 0, 0, 7)",
            params![uuid::Uuid::now_v7().to_string()],
        )
        .unwrap();
        migrate(&mut c).unwrap();
        let e1 = attempts(&c, &"E1000001".parse().unwrap(), 1000).unwrap();
        assert_eq!(e1.len(), MAX_UPLOAD_ATTEMPTS);
        assert_eq!(e1[0].received_at.timestamp(), 1_104, "newest first");
        assert_eq!(e1[99].received_at.timestamp(), 1_005);
        let e2 = attempts(&c, &"E1000002".parse().unwrap(), 10).unwrap();
        assert!(matches!(
            e2[0].outcome,
            AttemptOutcome::Applied {
                counts: UploadCounts { rows: 2, .. },
                version: 7,
                ..
            }
        ));
    }

    #[test]
    fn refusals_keep_their_errors_and_each_council_its_newest_attempts() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let council: CouncilCode = "E1000001".parse().unwrap();
        let now = DateTime::from_timestamp(1_000, 0).unwrap();
        let refused = RefusedUpload {
            message: "the upload has 1 error(s)".into(),
            error_count: 3,
            errors: vec![UploadError {
                line: 2,
                column: "plan_type".into(),
                code: "bad_plan_type".into(),
                message: "no".into(),
            }],
        };
        for _ in 0..MAX_UPLOAD_ATTEMPTS + 3 {
            record_attempt(&c, &council, now, None, Some(&refused)).unwrap();
        }
        record_attempt(&c, &"E1000002".parse().unwrap(), now, None, Some(&refused)).unwrap();
        let kept = attempts(&c, &council, 1000).unwrap();
        assert_eq!(kept.len(), MAX_UPLOAD_ATTEMPTS);
        assert_eq!(kept[0].outcome, AttemptOutcome::Refused(refused));
        assert!(kept.windows(2).all(|w| w[0].seq > w[1].seq));
        assert_eq!(
            attempts(&c, &"E1000002".parse().unwrap(), 10)
                .unwrap()
                .len(),
            1
        );
    }
}
