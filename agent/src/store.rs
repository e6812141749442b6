//! The encrypted SQLite store: the only module that touches SQL.
//!
//! Two files in the state directory, both WAL with `synchronous=FULL`:
//! * `flags.db`: `flags(key, ver, sealed)` — one row per subject, keyed by the keyed hash of
//!   the NHS number, holding that subject's flags sealed as one record with the row key, the
//!   version it was written at and the snapshot generation bound in as associated data;
//!   `contacts(key, ver, sealed)` — the subject's recent contacts, a sealed side row under
//!   the same key (its own AAD domain); `meta(name, sealed)` — the sealed [`DataState`]
//!   (region, epoch, version, checkpoint times, policy, council directory, sync loop state,
//!   and the rows' integrity record [`RowsDigest`]).
//! * `outbox.db`: `events(seq, sealed, sent)` — access events sealed with their sequence
//!   number bound in; `sent` is 0 while pending and [`SET_ASIDE`] once the server refused the
//!   event for good (kept sealed, never re-sent); stored events are deleted. `kv(name,
//!   sealed)` — the highest tablet clock reading seen, and the next sequence number (sealed,
//!   only ever rises: a number is never reused after its event is deleted). A snapshot reset
//!   never touches this file.
//!
//! **Tamper evidence.** A sealed row cannot be altered, but it could be deleted, duplicated
//! under another key, or replaced by an older sealed copy of itself — and a deleted row would
//! make a flagged child read `not_flagged`. So the state seals a count and a digest of every
//! row of both tables (the XOR of an HMAC per row under a key of its own, over its table, row
//! key, version, generation and sealed bytes), kept up to date in the same transaction as
//! every write, and checked against the rows when the store is opened or changed by another
//! process ([`FlagDb::verify_rows`]). A row from an earlier snapshot does not even open:
//! the generation is part of its associated data. A whole `flags.db` put back from an older
//! copy is consistent in itself, so the outbox file keeps the newest (generation, version)
//! the store reached ([`Outbox::store_mark`]); a store older than that is damaged too.
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
    /// The sealed rows do not match the store's integrity record.
    #[error("the flag store is damaged: {0}")]
    Damaged(String),
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
    /// Count and digest of every sealed row; `None` only in a store written before there was
    /// one (then damaged: its rows cannot be vouched for).
    #[serde(default)]
    pub rows: Option<RowsDigest>,
    /// Why the rows cannot be relied on (a row deleted, duplicated or restored from an older
    /// copy): misses answer `unknown` (`store_damaged`) and the next sync installs a full
    /// snapshot, which clears it.
    #[serde(default)]
    pub damaged: Option<String>,
}

/// The integrity record of the sealed rows: how many there are, and the XOR of their MACs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowsDigest {
    pub count: u64,
    pub digest: [u8; 32],
}

impl RowsDigest {
    /// Adds or removes one row's MAC (XOR is its own inverse; the count says which).
    fn toggle(&mut self, mac: &[u8; 32], added: bool) {
        for (d, m) in self.digest.iter_mut().zip(mac) {
            *d ^= m;
        }
        if added {
            self.count += 1;
        } else {
            self.count = self.count.saturating_sub(1);
        }
    }
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
            rows: Some(RowsDigest::default()),
            damaged: None,
        }
    }
}

const STATE: &str = "state";

/// The two tables of sealed rows, each its own AAD and MAC domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Flags,
    Contacts,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Flags => "flags",
            Table::Contacts => "contacts",
        }
    }

    /// Associated data of a sealed row: table, row key, version and snapshot generation.
    fn aad(self, key: &[u8], ver: u64, generation: u64) -> Vec<u8> {
        let mut aad = Vec::with_capacity(9 + key.len() + 16);
        aad.extend_from_slice(self.name().as_bytes());
        aad.push(0);
        aad.extend_from_slice(key);
        aad.extend_from_slice(&ver.to_le_bytes());
        aad.extend_from_slice(&generation.to_le_bytes());
        aad
    }

    /// The row's contribution to [`RowsDigest`].
    fn mac(self, keys: &Keys, key: &[u8], ver: u64, generation: u64, sealed: &[u8]) -> [u8; 32] {
        keys.row_mac(&[
            self.name().as_bytes(),
            key,
            &ver.to_le_bytes(),
            &generation.to_le_bytes(),
            sealed,
        ])
    }
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

/// Room for one flag in an encoded row (most take 30 to 45 bytes).
const ROW_BYTES_PER_FLAG: usize = 48;

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

    /// The sealed row of one subject, opened (`generation`: the installed snapshot's).
    pub fn subject(
        &self,
        keys: &Keys,
        key: &[u8; 32],
        generation: u64,
    ) -> Result<Option<SubjectRow>, StoreError> {
        let Some((ver, plain)) = self.open_row(keys, Table::Flags, key, generation)? else {
            return Ok(None);
        };
        let flags: Vec<FlagRecord> =
            postcard::from_bytes(&plain).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((ver, flags)))
    }

    /// A subject's recent contacts (newest first), empty when none are held.
    pub fn contacts(
        &self,
        keys: &Keys,
        key: &[u8; 32],
        generation: u64,
    ) -> Result<Vec<RecentContact>, StoreError> {
        let Some((_, plain)) = self.open_row(keys, Table::Contacts, key, generation)? else {
            return Ok(Vec::new());
        };
        postcard::from_bytes(&plain).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn open_row(
        &self,
        keys: &Keys,
        table: Table,
        key: &[u8; 32],
        generation: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let Some((ver, sealed)) = read_row(&self.conn, table, key)? else {
            return Ok(None);
        };
        let plain = keys
            .snapshot
            .open(&sealed, &table.aad(key, ver, generation))?;
        Ok(Some((ver, plain)))
    }

    pub fn subject_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM flags", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The integrity record of the rows as they are now (every row read and MACed): what
    /// the sealed [`DataState::rows`] must equal.
    pub fn verify_rows(&self, keys: &Keys, generation: u64) -> Result<RowsDigest, StoreError> {
        let mut d = RowsDigest::default();
        for table in [Table::Flags, Table::Contacts] {
            let mut stmt = self
                .conn
                .prepare(&format!("SELECT key, ver, sealed FROM {}", table.name()))?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let key: Vec<u8> = r.get(0)?;
                let ver = row_version(r.get(1)?)?;
                let sealed: Vec<u8> = r.get(2)?;
                d.toggle(&table.mac(keys, &key, ver, generation, &sealed), true);
            }
        }
        Ok(d)
    }

    /// Rows in both tables now (a cheap check after each write).
    fn row_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT (SELECT count(*) FROM flags) + (SELECT count(*) FROM contacts)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Replaces every row and the state in one transaction; `state.rows` is set to the new
    /// rows' integrity record (and `state.damaged` cleared: every row is new).
    pub fn replace_all(
        &mut self,
        keys: &Keys,
        ver: u64,
        subjects: Vec<([u8; 32], Vec<FlagRecord>)>,
        contacts: &[ContactsRow],
        state: &mut DataState,
    ) -> Result<(), StoreError> {
        let generation = state.generation;
        let mut digest = RowsDigest::default();
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM flags", [])?;
        tx.execute("DELETE FROM contacts", [])?;
        // Both tables were just emptied: rows go in without looking for an old one. Encoding,
        // sealing and MACing run on every core; this thread writes the rows in key order.
        let table = Table::Flags;
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO {} (key, ver, sealed) VALUES (?1, ?2, ?3)",
            table.name()
        ))?;
        crate::par::for_each_in_order(
            subjects,
            |(key, flags)| {
                let sealed = keys.snapshot.seal_written(
                    ROW_BYTES_PER_FLAG * flags.len(),
                    &table.aad(&key, ver, generation),
                    |buf| {
                        postcard::to_extend(&flags, buf)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))
                    },
                )??;
                let mac = table.mac(keys, &key, ver, generation, &sealed);
                Ok::<_, StoreError>((key, sealed, mac))
            },
            |(key, sealed, mac)| {
                insert.execute(params![&key[..], to_i64(ver), &sealed])?;
                digest.toggle(&mac, true);
                Ok(())
            },
        )?;
        drop(insert);
        write_contacts(&tx, keys, ver, generation, contacts, &mut digest)?;
        state.rows = Some(digest);
        state.damaged = None;
        write_state(&tx, keys, state)?;
        tx.commit()?;
        self.check_count(digest)
    }

    /// Writes (or deletes, when empty) the given subjects' rows and the state in one
    /// transaction, keeping `state.rows` up to date.
    pub fn update_subjects(
        &mut self,
        keys: &Keys,
        ver: u64,
        subjects: &[([u8; 32], Vec<FlagRecord>)],
        contacts: &[ContactsRow],
        state: &mut DataState,
    ) -> Result<(), StoreError> {
        let generation = state.generation;
        let mut digest = state.rows.unwrap_or_default();
        let tx = self.conn.transaction()?;
        write_contacts(&tx, keys, ver, generation, contacts, &mut digest)?;
        for (key, flags) in subjects {
            if flags.is_empty() {
                delete_row(&tx, keys, Table::Flags, key, generation, &mut digest)?;
            } else {
                let plain =
                    postcard::to_stdvec(flags).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                put_row(
                    &tx,
                    keys,
                    Table::Flags,
                    key,
                    ver,
                    generation,
                    &plain,
                    &mut digest,
                )?;
            }
        }
        state.rows = Some(digest);
        write_state(&tx, keys, state)?;
        tx.commit()?;
        self.check_count(digest)
    }

    /// Deletes every flag row (self-shred after the wipe age), keeping the state.
    pub fn clear_flags(&mut self, keys: &Keys, state: &mut DataState) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM flags", [])?;
        tx.execute("DELETE FROM contacts", [])?;
        state.rows = Some(RowsDigest::default());
        state.damaged = None;
        write_state(&tx, keys, state)?;
        tx.commit()?;
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
        Ok(())
    }

    /// After a write: the rows on disk are as many as the record says.
    fn check_count(&self, digest: RowsDigest) -> Result<(), StoreError> {
        let n = self.row_count()?;
        if n != digest.count {
            return Err(StoreError::Damaged(format!(
                "{n} sealed rows after the write, the integrity record says {}",
                digest.count
            )));
        }
        Ok(())
    }
}

fn row_version(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("negative version".into()))
}

fn read_row(
    conn: &Connection,
    table: Table,
    key: &[u8],
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT ver, sealed FROM {} WHERE key = ?1",
        table.name()
    ))?;
    let row: Option<(i64, Vec<u8>)> = stmt
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(v, sealed)| Ok((row_version(v)?, sealed)))
        .transpose()
}

/// Removes a row's MAC from `digest` when it exists, then the row.
fn delete_row(
    conn: &Connection,
    keys: &Keys,
    table: Table,
    key: &[u8; 32],
    generation: u64,
    digest: &mut RowsDigest,
) -> Result<(), StoreError> {
    if let Some((old_ver, old)) = read_row(conn, table, key)? {
        digest.toggle(&table.mac(keys, key, old_ver, generation, &old), false);
        conn.prepare_cached(&format!("DELETE FROM {} WHERE key = ?1", table.name()))?
            .execute([&key[..]])?;
    }
    Ok(())
}

/// Seals `plain` as the row `key` at `ver` (replacing any), keeping `digest` up to date.
#[allow(clippy::too_many_arguments)]
fn put_row(
    conn: &Connection,
    keys: &Keys,
    table: Table,
    key: &[u8; 32],
    ver: u64,
    generation: u64,
    plain: &[u8],
    digest: &mut RowsDigest,
) -> Result<(), StoreError> {
    delete_row(conn, keys, table, key, generation, digest)?;
    insert_row(conn, keys, table, key, ver, generation, plain, digest)
}

/// Seals `plain` as the new row `key` at `ver` (there is none), adding it to `digest`.
#[allow(clippy::too_many_arguments)]
fn insert_row(
    conn: &Connection,
    keys: &Keys,
    table: Table,
    key: &[u8; 32],
    ver: u64,
    generation: u64,
    plain: &[u8],
    digest: &mut RowsDigest,
) -> Result<(), StoreError> {
    let sealed = keys
        .snapshot
        .seal(plain, &table.aad(key, ver, generation))?;
    conn.prepare_cached(&format!(
        "INSERT INTO {} (key, ver, sealed) VALUES (?1, ?2, ?3)",
        table.name()
    ))?
    .execute(params![&key[..], to_i64(ver), &sealed])?;
    digest.toggle(&table.mac(keys, key, ver, generation, &sealed), true);
    Ok(())
}

fn write_contacts(
    conn: &Connection,
    keys: &Keys,
    ver: u64,
    generation: u64,
    rows: &[ContactsRow],
    digest: &mut RowsDigest,
) -> Result<(), StoreError> {
    for (key, contacts) in rows {
        if contacts.is_empty() {
            delete_row(conn, keys, Table::Contacts, key, generation, digest)?;
        } else {
            let plain =
                postcard::to_stdvec(contacts).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            put_row(
                conn,
                keys,
                Table::Contacts,
                key,
                ver,
                generation,
                &plain,
                digest,
            )?;
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

const NEXT_SEQ: &str = "next_seq";

/// Takes the outbox's next sequence number: above every number ever used, even those of
/// events deleted since (a sealed counter that only rises), so a number — which each event's
/// seal binds — is never given to two events.
fn next_seq(conn: &Connection, keys: &Keys) -> Result<i64, StoreError> {
    let after_rows: i64 =
        conn.query_row("SELECT coalesce(max(seq), 0) + 1 FROM events", [], |r| {
            r.get(0)
        })?;
    let counted: i64 = read_kv(conn, keys, NEXT_SEQ)?.unwrap_or(1);
    let seq = after_rows.max(counted);
    write_kv(conn, keys, NEXT_SEQ, &(seq + 1))?;
    Ok(seq)
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
        let seq = next_seq(&tx, keys)?;
        let plain = serde_json::to_vec(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sealed = keys.outbox.seal(&plain, &event_aad(seq))?;
        tx.prepare_cached("INSERT INTO events (seq, sealed, sent) VALUES (?1, ?2, 0)")?
            .execute(params![seq, sealed])?;
        write_kv(&tx, keys, HIGH_WATER, &high_water)?;
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
        read_kv(&self.conn, keys, HIGH_WATER)
    }

    pub fn set_high_water(&mut self, keys: &Keys, t: DateTime<Utc>) -> Result<(), StoreError> {
        write_kv(&self.conn, keys, HIGH_WATER, &t)
    }

    /// The newest (generation, version) the flag store has reached, recorded here, in the
    /// other file, so that a `flags.db` put back from an older copy is seen to be older.
    pub fn store_mark(&self, keys: &Keys) -> Result<Option<(u64, u64)>, StoreError> {
        read_kv(&self.conn, keys, STORE_MARK)
    }

    /// Raises the mark to `mark` (never lowers it), committed (fsync).
    pub fn raise_store_mark(&mut self, keys: &Keys, mark: (u64, u64)) -> Result<(), StoreError> {
        if self.store_mark(keys)?.is_some_and(|m| m >= mark) {
            return Ok(());
        }
        write_kv(&self.conn, keys, STORE_MARK, &mark)
    }
}

/// A sealed value of the outbox's `kv` table (AAD `kv\0` + its name).
fn read_kv<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    keys: &Keys,
    name: &str,
) -> Result<Option<T>, StoreError> {
    let sealed: Option<Vec<u8>> = conn
        .prepare_cached("SELECT sealed FROM kv WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    let plain = keys.meta.open(&sealed, &kv_aad(name))?;
    serde_json::from_slice(&plain)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Seals and writes a value of the outbox's `kv` table.
fn write_kv<T: Serialize>(
    conn: &Connection,
    keys: &Keys,
    name: &str,
    value: &T,
) -> Result<(), StoreError> {
    let plain = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let sealed = keys.meta.seal(&plain, &kv_aad(name))?;
    conn.prepare_cached(
        "INSERT INTO kv (name, sealed) VALUES (?1, ?2) \
         ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed",
    )?
    .execute(params![name, sealed])?;
    Ok(())
}

fn kv_aad(name: &str) -> Vec<u8> {
    let mut aad = b"kv\0".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

const STORE_MARK: &str = "flag_store_mark";
