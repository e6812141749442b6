//! The encrypted SQLite store: the only module that touches SQL.
//!
//! Two files in the state directory, both WAL with `synchronous=FULL`:
//! * `flags.db`: `flags(key, ver, sealed)` — one row per subject, keyed by the keyed hash of
//!   the NHS number, holding that subject's flags sealed as one record with the row key and
//!   the version it was written at bound in as associated data; `contacts(key, ver, sealed)` —
//!   the subject's recent contacts, a sealed side row under the same key (its own AAD
//!   domain); `meta(name, sealed)` — the sealed [`DataState`] (region, epoch, version,
//!   checkpoint times, policy, council directory, sync loop state).
//! * `outbox.db`: `events(seq, sealed, sent)` — access events sealed with their sequence
//!   number bound in; `sent` is 0 while pending and [`SET_ASIDE`] once the server refused the
//!   event for good (kept sealed, never re-sent); stored events are deleted. `kv(name,
//!   sealed)` — the highest tablet clock reading seen. A snapshot reset never touches this
//!   file.
//!
//! No NHS number, date or council detail is ever written in plaintext.

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use cpis_protocol::{AccessEvent, CouncilInfo, FlagRecord, Policy, RecentContact, RegionId};

use crate::clock::BootStamp;
use crate::keystore::{KeyError, Keys};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// What the tablet holds and when it was last verified; sealed in `flags.db`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataState {
    pub region: RegionId,
    /// Epoch and version of the installed data, if any.
    pub data: Option<(u64, u64)>,
    /// Bumped at every snapshot install.
    pub generation: u64,
    /// Server time of the last verified checkpoint the data reflects (freshness basis).
    pub data_as_of: Option<DateTime<Utc>>,
    /// Tablet wall clock and monotonic clock when `data_as_of` was verified.
    pub verified_local: Option<DateTime<Utc>>,
    pub verified_boot: Option<BootStamp>,
    /// Newest checkpoint server time verified (rollback and freeze protection).
    pub seen_server_time: Option<DateTime<Utc>>,
    pub policy: Policy,
    pub councils: Vec<CouncilInfo>,
    pub last_sync_attempt: Option<DateTime<Utc>>,
    pub last_sync_success: Option<DateTime<Utc>>,
    pub last_sync_error: Option<String>,
    /// Failed attempts in a row (the background loop's backoff), 0 after a success.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// When the background loop plans its next attempt (tablet clock), if running.
    #[serde(default)]
    pub next_sync_at: Option<DateTime<Utc>>,
}

impl DataState {
    /// A freshly enrolled tablet.
    pub fn empty(region: RegionId, policy: Policy) -> Self {
        Self {
            region,
            data: None,
            generation: 0,
            data_as_of: None,
            verified_local: None,
            verified_boot: None,
            seen_server_time: None,
            policy,
            councils: Vec::new(),
            last_sync_attempt: None,
            last_sync_success: None,
            last_sync_error: None,
            consecutive_failures: 0,
            next_sync_at: None,
        }
    }
}

const STATE: &str = "state";

fn flag_aad(key: &[u8], ver: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(5 + key.len() + 8);
    aad.extend_from_slice(b"flag\0");
    aad.extend_from_slice(key);
    aad.extend_from_slice(&ver.to_le_bytes());
    aad
}

fn contacts_aad(key: &[u8], ver: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(9 + key.len() + 8);
    aad.extend_from_slice(b"contacts\0");
    aad.extend_from_slice(key);
    aad.extend_from_slice(&ver.to_le_bytes());
    aad
}

/// `events.sent` of an event the server refused for good: kept sealed, never re-sent.
pub const SET_ASIDE: i64 = 2;

fn event_aad(seq: i64) -> Vec<u8> {
    let mut aad = b"event\0".to_vec();
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Freed pages are zeroed, so nothing (even sealed) lingers after deletes.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The flags database. One writer: the agent holds it behind a lock.
#[derive(Debug)]
pub struct FlagDb {
    conn: Connection,
}

/// A subject's row: the version it was written at, and its flags.
pub type SubjectRow = (u64, Vec<FlagRecord>);

/// A subject's recent contacts to write: row key and list (empty deletes the row).
pub type ContactsRow = ([u8; 32], Vec<RecentContact>);

impl FlagDb {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_conn(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS flags (key BLOB PRIMARY KEY, ver INTEGER NOT NULL, \
             sealed BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS contacts (key BLOB PRIMARY KEY, ver INTEGER NOT NULL, \
             sealed BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, sealed BLOB NOT NULL);",
        )?;
        Ok(Self { conn })
    }

    /// Changes whenever another connection commits to this file.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    pub fn read_state(&self, keys: &Keys) -> Result<Option<DataState>, StoreError> {
        read_state(&self.conn, keys)
    }

    pub fn write_state(&self, keys: &Keys, state: &DataState) -> Result<(), StoreError> {
        write_state(&self.conn, keys, state)
    }

    /// The sealed row of one subject, opened.
    pub fn subject(&self, keys: &Keys, key: &[u8; 32]) -> Result<Option<SubjectRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT ver, sealed FROM flags WHERE key = ?1")?;
        let row: Option<(i64, Vec<u8>)> = stmt
            .query_row([&key[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((ver, sealed)) = row else {
            return Ok(None);
        };
        let ver = u64::try_from(ver).map_err(|_| StoreError::Corrupt("negative version".into()))?;
        let plain = keys.snapshot.open(&sealed, &flag_aad(key, ver))?;
        let flags: Vec<FlagRecord> =
            postcard::from_bytes(&plain).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((ver, flags)))
    }

    /// A subject's recent contacts (newest first), empty when none are held.
    pub fn contacts(&self, keys: &Keys, key: &[u8; 32]) -> Result<Vec<RecentContact>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT ver, sealed FROM contacts WHERE key = ?1")?;
        let row: Option<(i64, Vec<u8>)> = stmt
            .query_row([&key[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((ver, sealed)) = row else {
            return Ok(Vec::new());
        };
        let ver = u64::try_from(ver).map_err(|_| StoreError::Corrupt("negative version".into()))?;
        let plain = keys.snapshot.open(&sealed, &contacts_aad(key, ver))?;
        postcard::from_bytes(&plain).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub fn subject_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM flags", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Replaces every row and the state in one transaction.
    pub fn replace_all<'a>(
        &mut self,
        keys: &Keys,
        ver: u64,
        subjects: impl IntoIterator<Item = ([u8; 32], &'a [FlagRecord])>,
        contacts: &[ContactsRow],
        state: &DataState,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM flags", [])?;
        tx.execute("DELETE FROM contacts", [])?;
        {
            let mut ins = tx.prepare("INSERT INTO flags (key, ver, sealed) VALUES (?1, ?2, ?3)")?;
            for (key, flags) in subjects {
                let sealed = seal_row(keys, &key, ver, flags)?;
                ins.execute(params![&key[..], to_i64(ver), sealed])?;
            }
        }
        write_contacts(&tx, keys, ver, contacts)?;
        write_state(&tx, keys, state)?;
        tx.commit()?;
        Ok(())
    }

    /// Writes (or deletes, when empty) the given subjects' rows and the state in one
    /// transaction.
    pub fn update_subjects(
        &mut self,
        keys: &Keys,
        ver: u64,
        subjects: &[([u8; 32], Vec<FlagRecord>)],
        contacts: &[ContactsRow],
        state: &DataState,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        write_contacts(&tx, keys, ver, contacts)?;
        {
            let mut up = tx.prepare(
                "INSERT INTO flags (key, ver, sealed) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(key) DO UPDATE SET ver = excluded.ver, sealed = excluded.sealed",
            )?;
            let mut del = tx.prepare("DELETE FROM flags WHERE key = ?1")?;
            for (key, flags) in subjects {
                if flags.is_empty() {
                    del.execute([&key[..]])?;
                } else {
                    let sealed = seal_row(keys, key, ver, flags)?;
                    up.execute(params![&key[..], to_i64(ver), sealed])?;
                }
            }
        }
        write_state(&tx, keys, state)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes every flag row (self-shred after the wipe age), keeping the state.
    pub fn clear_flags(&mut self, keys: &Keys, state: &DataState) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM flags", [])?;
        tx.execute("DELETE FROM contacts", [])?;
        write_state(&tx, keys, state)?;
        tx.commit()?;
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
        Ok(())
    }
}

fn seal_row(
    keys: &Keys,
    key: &[u8; 32],
    ver: u64,
    flags: &[FlagRecord],
) -> Result<Vec<u8>, StoreError> {
    let plain = postcard::to_stdvec(flags).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(keys.snapshot.seal(&plain, &flag_aad(key, ver))?)
}

fn write_contacts(
    conn: &Connection,
    keys: &Keys,
    ver: u64,
    rows: &[ContactsRow],
) -> Result<(), StoreError> {
    let mut up = conn.prepare_cached(
        "INSERT INTO contacts (key, ver, sealed) VALUES (?1, ?2, ?3) \
         ON CONFLICT(key) DO UPDATE SET ver = excluded.ver, sealed = excluded.sealed",
    )?;
    let mut del = conn.prepare_cached("DELETE FROM contacts WHERE key = ?1")?;
    for (key, contacts) in rows {
        if contacts.is_empty() {
            del.execute([&key[..]])?;
        } else {
            let plain =
                postcard::to_stdvec(contacts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let sealed = keys.snapshot.seal(&plain, &contacts_aad(key, ver))?;
            up.execute(params![&key[..], to_i64(ver), sealed])?;
        }
    }
    Ok(())
}

fn read_state(conn: &Connection, keys: &Keys) -> Result<Option<DataState>, StoreError> {
    let sealed: Option<Vec<u8>> = conn
        .query_row("SELECT sealed FROM meta WHERE name = ?1", [STATE], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    let plain = keys.meta.open(&sealed, b"meta\0state")?;
    serde_json::from_slice(&plain)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn write_state(conn: &Connection, keys: &Keys, state: &DataState) -> Result<(), StoreError> {
    let plain = serde_json::to_vec(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let sealed = keys.meta.seal(&plain, b"meta\0state")?;
    conn.execute(
        "INSERT INTO meta (name, sealed) VALUES (?1, ?2) \
         ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
        params![STATE, sealed],
    )?;
    Ok(())
}

/// The outbox database: access events, durable before an answer is shown.
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
}

const HIGH_WATER: &str = "clock_high_water";

impl Outbox {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = open_conn(path)?;
        // Checkpoints (which fsync the database file) are kept off the lookup path: they run
        // when the outbox is opened and after events are sent, not every 1000 pages.
        conn.pragma_update(None, "wal_autocheckpoint", 20_000)?;
        conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, sealed BLOB NOT NULL, \
             sent INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS events_pending ON events (sent, seq);
             CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, sealed BLOB NOT NULL);",
        )?;
        Ok(Self { conn })
    }

    /// Seals and commits (fsync) one event, with the tablet clock's high-water mark.
    pub fn append(
        &mut self,
        keys: &Keys,
        event: &AccessEvent,
        high_water: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let seq: i64 = tx.query_row("SELECT coalesce(max(seq), 0) + 1 FROM events", [], |r| {
            r.get(0)
        })?;
        let plain = serde_json::to_vec(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sealed = keys.outbox.seal(&plain, &event_aad(seq))?;
        tx.prepare_cached("INSERT INTO events (seq, sealed, sent) VALUES (?1, ?2, 0)")?
            .execute(params![seq, sealed])?;
        write_high_water(&tx, keys, high_water)?;
        tx.commit()?;
        Ok(())
    }

    pub fn pending_count(&self) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn
                .query_row("SELECT count(*) FROM events WHERE sent = 0", [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Up to `limit` unsent events, oldest first, with their sequence numbers.
    pub fn pending(
        &self,
        keys: &Keys,
        limit: usize,
    ) -> Result<Vec<(i64, AccessEvent)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, sealed FROM events WHERE sent = 0 ORDER BY seq LIMIT ?1")?;
        let rows = stmt.query_map([to_i64(limit as u64)], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, sealed) = row?;
            let plain = keys.outbox.open(&sealed, &event_aad(seq))?;
            let ev =
                serde_json::from_slice(&plain).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((seq, ev));
        }
        Ok(out)
    }

    /// Deletes events the server has durably stored (or rejected for good).
    pub fn remove(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare("DELETE FROM events WHERE seq = ?1")?;
            for s in seqs {
                del.execute([s])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Sets events aside that the server refused for good: they stay sealed in the outbox,
    /// are counted, and are never sent again.
    pub fn set_aside(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut up = tx.prepare("UPDATE events SET sent = ?2 WHERE seq = ?1")?;
            for s in seqs {
                up.execute(params![s, SET_ASIDE])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How many events are set aside.
    pub fn set_aside_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM events WHERE sent = ?1",
            [SET_ASIDE],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Moves the WAL into the database file (after events were sent).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    /// The highest tablet clock reading recorded.
    pub fn high_water(&self, keys: &Keys) -> Result<Option<DateTime<Utc>>, StoreError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT sealed FROM kv WHERE name = ?1", [HIGH_WATER], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let plain = keys.meta.open(&sealed, b"kv\0clock_high_water")?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub fn set_high_water(&mut self, keys: &Keys, t: DateTime<Utc>) -> Result<(), StoreError> {
        write_high_water(&self.conn, keys, t)
    }
}

fn write_high_water(conn: &Connection, keys: &Keys, t: DateTime<Utc>) -> Result<(), StoreError> {
    let plain = serde_json::to_vec(&t).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let sealed = keys.meta.seal(&plain, b"kv\0clock_high_water")?;
    conn.prepare_cached(
        "INSERT INTO kv (name, sealed) VALUES (?1, ?2) \
         ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
    )?
    .execute(params![HIGH_WATER, sealed])?;
    Ok(())
}
