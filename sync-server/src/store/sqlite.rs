//! The SQLite store: one writer thread owning the write connection (batching jobs into one
//! transaction, one savepoint per job), reader connections for everything else, WAL mode,
//! `synchronous=FULL`, schema migrations by `PRAGMA user_version`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::{
    Change, CouncilCode, CouncilInfo, DeviceId, FlagKey, FlagRecord, NhsNumber, PlanType, RegionId,
    TrustCode, VersionedChange, retained_until,
};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use subtle::ConstantTimeEq as _;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::codec::{OP_CONTACTS, OP_REMOVE, OP_UPSERT, date_text, ts};
use super::{
    AuditEntry, DeviceRecord, EnrolmentTokenInfo, EventId, EventIngest, FleetEntry, IngestOutcome,
    KeyRolloverRecord, LogRetention, MailboxStats, NationalLookup, NewDevice, NewEnrolmentToken,
    RefusedUpload, RegionChanges, RegionHead, RegionRecord, RegionSnapshot, Store, StoreError,
    StoredEvent, TokenRefusal, TrustRecord, UploadAttempt, UploadOutcome,
};
use super::{PageSession, SessionKind};
use crate::reconcile;
use cpis_protocol::mailbox::{Notification, NotificationId};
use cpis_protocol::{RecentContact, SubjectContacts};

mod credentials;
mod events;
mod lifecycle;
mod pages;

/// The schema, one entry per migration; `user_version` counts the applied ones.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // Another connection holding a lock longer than the busy timeout: worth retrying.
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        }
    }
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
INSERT INTO meta (key, value) VALUES ('head_version', 0);
CREATE TABLE trusts (
    code TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE regions (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, epoch INTEGER NOT NULL
) STRICT;
CREATE TABLE region_neighbours (
    region TEXT NOT NULL REFERENCES regions(id), council TEXT NOT NULL,
    PRIMARY KEY (region, council)
) STRICT;
CREATE TABLE councils (
    code TEXT PRIMARY KEY, name TEXT NOT NULL, region TEXT NOT NULL REFERENCES regions(id),
    emergency_phone TEXT NOT NULL, office_phone TEXT,
    log_floor INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX councils_region ON councils(region);
CREATE TABLE council_tokens (
    hash BLOB PRIMARY KEY, council TEXT NOT NULL REFERENCES councils(code),
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE flags (
    council TEXT NOT NULL REFERENCES councils(code), nhs_number INTEGER NOT NULL,
    plan_type TEXT NOT NULL, start_date TEXT NOT NULL, end_date TEXT, date_of_birth TEXT,
    local_id TEXT, version INTEGER NOT NULL,
    PRIMARY KEY (council, nhs_number, plan_type)
) STRICT, WITHOUT ROWID;
CREATE INDEX flags_end ON flags(end_date) WHERE end_date IS NOT NULL;
CREATE TABLE changes (
    version INTEGER PRIMARY KEY, council TEXT NOT NULL, nhs_number INTEGER NOT NULL,
    plan_type TEXT NOT NULL, op TEXT NOT NULL, start_date TEXT, end_date TEXT,
    date_of_birth TEXT, local_id TEXT, reason TEXT NOT NULL, recorded_at INTEGER NOT NULL
) STRICT;
CREATE INDEX changes_council ON changes(council, version);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY, council TEXT NOT NULL, received_at INTEGER NOT NULL,
    rows INTEGER NOT NULL, added INTEGER NOT NULL, updated INTEGER NOT NULL,
    ended INTEGER NOT NULL, removed INTEGER NOT NULL, unchanged INTEGER NOT NULL,
    version INTEGER NOT NULL
) STRICT;
CREATE TABLE enrolment_tokens (
    hash BLOB PRIMARY KEY, trust TEXT NOT NULL REFERENCES trusts(code),
    region TEXT NOT NULL REFERENCES regions(id), uses_left INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE devices (
    id TEXT PRIMARY KEY, trust TEXT NOT NULL, region TEXT NOT NULL, name TEXT,
    agent_version TEXT NOT NULL, cert_expires_at INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL, last_seen INTEGER, revoked_at INTEGER
) STRICT;
"#,
    events::MIGRATION,
    lifecycle::MIGRATION,
    pages::MIGRATION,
    credentials::MIGRATION,
    pages::SESSIONS_MIGRATION,
    lifecycle::SEALED_KEY_MIGRATION,
];

/// Where the owners of council and trust admin tokens live: (table, key column, what).
const COUNCIL_OWNER: (&str, &str, &str) = ("councils", "code", "council");
const TRUST_OWNER: (&str, &str, &str) = ("trusts", "code", "trust");

/// Jobs the writer batches into one transaction.
const MAX_BATCH: usize = 64;
/// Reads running at once, each on its own connection; every connection is kept open for the
/// next read. Without the bound, a burst of polls opened (and parsed the schema on) a new
/// connection per read beyond those kept: most of a poll's cost in the profile.
const MAX_READERS: usize = 16;
/// How long a connection waits for another process (e.g. `admin`) holding the write lock.
const BUSY_TIMEOUT_MS: u64 = 10_000;

/// Called with the outcome of the batch's commit.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Runs inside a savepoint; `None` when the job failed (its savepoint is rolled back and it
/// has already answered).
type Job = Box<dyn FnOnce(&Connection) -> Option<Finish> + Send>;

/// The SQLite backend of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    readers: Mutex<Vec<Reader>>,
    /// At most [`MAX_READERS`] reads at once.
    reading: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish queued jobs and stop.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let supported = MIGRATIONS.len() as u32;
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        migrate(&mut conn)?;
        let (tx, rx) = mpsc::channel::<Job>(1024);
        let thread = std::thread::Builder::new()
            .name("cpis-store-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Some(tx),
                thread: Some(thread),
                readers: Mutex::new(Vec::new()),
                reading: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| match f(conn) {
            Ok(v) => Some(Box::new(move |commit: Result<(), StoreError>| {
                let _ = reply.send(commit.map(|()| v));
            }) as Finish),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        });
        let sender = self.inner.writer.clone();
        async move {
            let sender = sender.ok_or(StoreError::WriterStopped)?;
            sender
                .send(job)
                .await
                .map_err(|_| StoreError::WriterStopped)?;
            answer.await.map_err(|_| StoreError::WriterStopped)?
        }
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        self.read_with(move |r| f(&r.conn))
    }

    /// [`SqliteStore::read`] with the reader's own cache of region heads.
    fn read_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let permit = inner
                .reading
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut reader = inner.take_reader()?;
                let result = f(&mut reader);
                inner.put_reader(reader);
                result
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
        }
    }
}

/// A pooled read connection, with the region heads it last read.
struct Reader {
    conn: Connection,
    /// Region → (the connection's `PRAGMA data_version` when read, the head). The value
    /// changes whenever another connection (the writer, `admin` in another process) commits,
    /// so a head read at the same value is still the head: polls of an unchanged database
    /// skip the head's query (a third of a busy poll path's CPU in the profile).
    heads: HashMap<RegionId, (i64, RegionHead)>,
}

impl Reader {
    /// The region's head as of this connection's read transaction (`conn` is that
    /// transaction, on this reader's connection).
    fn region_head(
        heads: &mut HashMap<RegionId, (i64, RegionHead)>,
        conn: &Connection,
        region: &RegionId,
    ) -> Result<Option<RegionHead>, StoreError> {
        let version: i64 = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if let Some((seen, head)) = heads.get(region)
            && *seen == version
        {
            return Ok(Some(head.clone()));
        }
        let head = region_head(conn, region)?;
        match &head {
            Some(h) => {
                heads.insert(region.clone(), (version, h.clone()));
            }
            None => {
                heads.remove(region);
            }
        }
        Ok(head)
    }
}

impl SqliteStore {
    /// A short read (a few index lookups: the checkpoint poll's device and head, the health
    /// check's head version) answered on
    /// the calling thread when a reader slot is free at once: the profile of a busy poll path
    /// put the hand-off to the blocking pool and back at more than the read itself. When every
    /// slot is taken it waits for one on the blocking pool, as [`SqliteStore::read`] does.
    fn read_short<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Reader) -> Result<T, StoreError> + Clone + Send + 'static,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static {
        let inner = self.inner.clone();
        let fallback = self.clone();
        async move {
            if let Ok(_permit) = inner.reading.clone().try_acquire_owned() {
                let mut reader = inner.take_reader()?;
                // Never wait on the request's thread for a lock another connection holds
                // (readers of a WAL database hardly ever meet one): that read goes to the
                // blocking pool below, with the usual timeout.
                reader.conn.busy_timeout(std::time::Duration::ZERO)?;
                let result = f(&mut reader);
                reader
                    .conn
                    .busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
                inner.put_reader(reader);
                if !matches!(result, Err(StoreError::Unavailable(_))) {
                    return result;
                }
            }
            fallback.read_with(f).await
        }
    }
}

impl Inner {
    fn take_reader(&self) -> Result<Reader, StoreError> {
        if let Some(reader) = self.readers.lock().map_err(poisoned)?.pop() {
            return Ok(reader);
        }
        let conn = Connection::open(&self.path)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
        conn.pragma_update(None, "query_only", "ON")?;
        // One plan per statement: without this, binding a new value re-prepared cached
        // statements whose plan might depend on it (STAT4), on every read.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        Ok(Reader {
            conn,
            heads: HashMap::new(),
        })
    }

    fn put_reader(&self, reader: Reader) {
        if let Ok(mut readers) = self.readers.lock()
            && readers.len() < MAX_READERS
        {
            readers.push(reader);
        }
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> StoreError {
    StoreError::Task("reader pool lock poisoned".into())
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                // Dropping the jobs answers their callers with `WriterStopped`.
                tracing::error!(error = %e, "store writer could not begin a transaction");
                continue;
            }
        };
        let mut finished = Vec::with_capacity(batch.len());
        for job in batch {
            let sp = match tx.savepoint() {
                Ok(sp) => sp,
                Err(e) => {
                    tracing::error!(error = %e, "store writer could not open a savepoint");
                    continue;
                }
            };
            if let Some(finish) = job(&sp) {
                match sp.commit() {
                    Ok(()) => finished.push(finish),
                    Err(e) => finish(Err(e.into())),
                }
            }
        }
        match tx.commit() {
            Ok(()) => finished.into_iter().for_each(|f| f(Ok(()))),
            Err(e) => {
                tracing::error!(error = %e, "store writer could not commit");
                for f in finished {
                    f(Err(StoreError::Task(format!("commit failed: {e}"))));
                }
            }
        }
    }
}

// ---- conversions -----------------------------------------------------------------------

fn bad<E: std::error::Error + Send + Sync + 'static>(idx: usize, e: E) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

fn parse_col<T>(row: &Row<'_>, idx: usize) -> Result<T, rusqlite::Error>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let s: String = row.get(idx)?;
    s.parse().map_err(|e| bad(idx, e))
}

fn opt_date(row: &Row<'_>, idx: usize) -> Result<Option<NaiveDate>, rusqlite::Error> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| s.parse().map_err(|e| bad(idx, e))).transpose()
}

fn from_ts(idx: usize, secs: i64) -> Result<DateTime<Utc>, rusqlite::Error> {
    DateTime::from_timestamp(secs, 0)
        .ok_or_else(|| rusqlite::Error::IntegralValueOutOfRange(idx, secs))
}

fn opt_ts(row: &Row<'_>, idx: usize) -> Result<Option<DateTime<Utc>>, rusqlite::Error> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|s| from_ts(idx, s)).transpose()
}

fn nhs(row: &Row<'_>, idx: usize) -> Result<NhsNumber, rusqlite::Error> {
    let v: i64 = row.get(idx)?;
    NhsNumber::from_u64(v as u64).map_err(|e| bad(idx, e))
}

const FLAG_COLS: &str =
    "council, nhs_number, plan_type, start_date, end_date, date_of_birth, local_id";

fn flag_from_row(row: &Row<'_>) -> Result<FlagRecord, rusqlite::Error> {
    Ok(FlagRecord {
        council: parse_col(row, 0)?,
        nhs_number: nhs(row, 1)?,
        plan_type: parse_col::<PlanType>(row, 2)?,
        start_date: parse_col(row, 3)?,
        end_date: opt_date(row, 4)?,
        date_of_birth: opt_date(row, 5)?,
        local_id: row.get(6)?,
    })
}

const DEVICE_COLS: &str = "id, trust, region, name, agent_version, cert_expires_at, \
                           enrolled_at, last_seen, revoked_at";

fn device_from_row(row: &Row<'_>) -> Result<DeviceRecord, rusqlite::Error> {
    Ok(DeviceRecord {
        id: parse_col(row, 0)?,
        trust: parse_col(row, 1)?,
        region: parse_col(row, 2)?,
        name: row.get(3)?,
        agent_version: row.get(4)?,
        cert_expires_at: from_ts(5, row.get(5)?)?,
        enrolled_at: from_ts(6, row.get(6)?)?,
        last_seen: opt_ts(row, 7)?,
        revoked_at: opt_ts(row, 8)?,
    })
}

fn council_from_row(row: &Row<'_>) -> Result<CouncilInfo, rusqlite::Error> {
    Ok(CouncilInfo {
        code: parse_col(row, 0)?,
        name: row.get(1)?,
        region: parse_col(row, 2)?,
        emergency_phone: row.get(3)?,
        office_phone: row.get(4)?,
    })
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation
    )
}

// ---- queries shared by several operations ------------------------------------------------

/// Fails with `StoreError::Missing("{what} {key}")` unless `sql` (a `SELECT 1 … = ?1`) finds
/// a row for `key`.
fn require(conn: &Connection, sql: &str, key: &str, what: &str) -> Result<(), StoreError> {
    let found: Option<i64> = conn.query_row(sql, [key], |r| r.get(0)).optional()?;
    if found.is_none() {
        return Err(StoreError::Missing(format!("{what} {key}")));
    }
    Ok(())
}

fn head_version(conn: &Connection) -> Result<u64, StoreError> {
    let v: i64 = conn.query_row(
        "SELECT value FROM meta WHERE key = 'head_version'",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

fn set_head_version(conn: &Connection, v: u64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'head_version'",
        [v as i64],
    )?;
    Ok(())
}

/// Codes of the councils in a region's scope (its own plus existing neighbours).
fn scope_codes(conn: &Connection, region: &RegionId) -> Result<BTreeSet<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT code FROM councils WHERE region = ?1 \
         UNION SELECT c.code FROM region_neighbours n JOIN councils c ON c.code = n.council \
         WHERE n.region = ?1",
    )?;
    let rows = stmt.query_map([region.as_str()], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn region_head(conn: &Connection, region: &RegionId) -> Result<Option<RegionHead>, StoreError> {
    let epoch: Option<i64> = conn
        .prepare_cached("SELECT epoch FROM regions WHERE id = ?1")?
        .query_row([region.as_str()], |r| r.get(0))
        .optional()?;
    let Some(epoch) = epoch else {
        return Ok(None);
    };
    // Each council with its newest change: one statement, not one more per council.
    let mut stmt = conn.prepare_cached(
        "SELECT code, name, region, emergency_phone, office_phone, log_floor, \
         (SELECT max(version) FROM changes WHERE council = councils.code) FROM councils \
         WHERE region = ?1 OR code IN (SELECT council FROM region_neighbours WHERE region = ?1) \
         ORDER BY code",
    )?;
    let mut councils = Vec::new();
    let mut floor = 0u64;
    let mut newest = 0u64;
    let mut rows = stmt.query([region.as_str()])?;
    while let Some(row) = rows.next()? {
        councils.push(council_from_row(row)?);
        floor = floor.max(row.get::<_, i64>(5)? as u64);
        newest = newest.max(row.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64);
    }
    let version = floor.max(newest);
    Ok(Some(RegionHead {
        region: region.clone(),
        epoch: epoch as u64,
        version,
        floor,
        councils,
    }))
}

fn bump_epoch(conn: &Connection, region: &str) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE regions SET epoch = epoch + 1 WHERE id = ?1",
        [region],
    )?;
    Ok(())
}

fn council_flags(conn: &Connection, council: &str) -> Result<Vec<FlagRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {FLAG_COLS} FROM flags WHERE council = ?1 ORDER BY nhs_number, plan_type"
    ))?;
    let rows = stmt.query_map([council], flag_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Applies changes to the flags table and records them in the log, each with the next
/// version. Returns the new head.
fn record_changes(
    conn: &Connection,
    changes: Vec<Change>,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut version = head_version(conn)?;
    let mut upsert = conn.prepare_cached(&format!(
        "INSERT INTO flags ({FLAG_COLS}, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (council, nhs_number, plan_type) DO UPDATE SET \
         start_date = excluded.start_date, end_date = excluded.end_date, \
         date_of_birth = excluded.date_of_birth, local_id = excluded.local_id, \
         version = excluded.version"
    ))?;
    let mut delete = conn.prepare_cached(
        "DELETE FROM flags WHERE council = ?1 AND nhs_number = ?2 AND plan_type = ?3",
    )?;
    let mut log = conn.prepare_cached(
        "INSERT INTO changes (version, council, nhs_number, plan_type, op, start_date, \
         end_date, date_of_birth, local_id, reason, recorded_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for change in changes {
        version += 1;
        match change {
            Change::Upsert(f) => {
                let start = date_text(f.start_date);
                let end = f.end_date.map(date_text);
                let dob = f.date_of_birth.map(date_text);
                upsert.execute(params![
                    f.council.as_str(),
                    f.nhs_number.as_u64() as i64,
                    f.plan_type.as_str(),
                    start,
                    end,
                    dob,
                    f.local_id,
                    version as i64
                ])?;
                log.execute(params![
                    version as i64,
                    f.council.as_str(),
                    f.nhs_number.as_u64() as i64,
                    f.plan_type.as_str(),
                    OP_UPSERT,
                    start,
                    end,
                    dob,
                    f.local_id,
                    reason,
                    ts(now)
                ])?;
            }
            Change::Remove(k) => {
                delete.execute(params![
                    k.council.as_str(),
                    k.nhs_number.as_u64() as i64,
                    k.plan_type.as_str()
                ])?;
                log.execute(params![
                    version as i64,
                    k.council.as_str(),
                    k.nhs_number.as_u64() as i64,
                    k.plan_type.as_str(),
                    OP_REMOVE,
                    None::<String>,
                    None::<String>,
                    None::<String>,
                    None::<String>,
                    reason,
                    ts(now)
                ])?;
            }
            Change::Contacts(_) => {
                // Recorded per council by event ingest, never from an upload or purge.
                return Err(StoreError::Task(
                    "a contacts change cannot be recorded as a flag change".into(),
                ));
            }
        }
    }
    set_head_version(conn, version)?;
    Ok(version)
}

fn change_from_row(row: &Row<'_>) -> Result<VersionedChange, rusqlite::Error> {
    let version: i64 = row.get(0)?;
    let council: CouncilCode = parse_col(row, 1)?;
    let nhs_number = nhs(row, 2)?;
    let plan_type: PlanType = parse_col(row, 3)?;
    let op: String = row.get(4)?;
    let change = if op == OP_REMOVE {
        Change::Remove(FlagKey {
            council,
            nhs_number,
            plan_type,
        })
    } else {
        Change::Upsert(FlagRecord {
            council,
            nhs_number,
            plan_type,
            start_date: parse_col(row, 5)?,
            end_date: opt_date(row, 6)?,
            date_of_birth: opt_date(row, 7)?,
            local_id: row.get(8)?,
        })
    };
    Ok(VersionedChange {
        version: version as u64,
        change,
    })
}

fn read_device(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"))?
        .query_row([id.to_string()], device_from_row)
        .optional()?)
}

fn token_state(
    conn: &Connection,
    hash: &[u8; 32],
    now: DateTime<Utc>,
) -> Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError> {
    let row = conn
        .query_row(
            "SELECT hash, trust, region, uses_left, expires_at, revoked_at FROM enrolment_tokens \
             WHERE hash = ?1",
            [&hash[..]],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    parse_col::<TrustCode>(r, 1)?,
                    parse_col::<RegionId>(r, 2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((stored, trust, region, uses_left, expires_at, revoked_at)) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    if !bool::from(stored.as_slice().ct_eq(&hash[..])) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if revoked_at.is_some() {
        return Ok(Err(TokenRefusal::Revoked));
    }
    if expires_at <= ts(now) {
        return Ok(Err(TokenRefusal::Expired));
    }
    if uses_left <= 0 {
        return Ok(Err(TokenRefusal::UsedUp));
    }
    Ok(Ok((trust, region)))
}

fn map_conflict(what: String) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| {
        if is_constraint(&e) {
            StoreError::Conflict(what)
        } else {
            StoreError::from(e)
        }
    }
}

impl Store for SqliteStore {
    fn add_trust(
        &self,
        code: TrustCode,
        name: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            c.execute(
                "INSERT INTO trusts (code, name, created_at) VALUES (?1, ?2, ?3)",
                params![code.as_str(), name, ts(Utc::now())],
            )
            .map_err(map_conflict(format!("trust {code}")))?;
            Ok(())
        })
    }

    fn add_region(
        &self,
        id: RegionId,
        name: String,
        neighbours: Vec<CouncilCode>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            c.execute(
                "INSERT INTO regions (id, name, epoch) VALUES (?1, ?2, 1)",
                params![id.as_str(), name],
            )
            .map_err(map_conflict(format!("region {id}")))?;
            for n in neighbours {
                c.execute(
                    "INSERT OR IGNORE INTO region_neighbours (region, council) VALUES (?1, ?2)",
                    params![id.as_str(), n.as_str()],
                )?;
            }
            Ok(())
        })
    }

    fn set_region_neighbours(
        &self,
        id: RegionId,
        neighbours: Vec<CouncilCode>,
    ) -> impl Future<Output = Result<RegionRecord, StoreError>> + Send {
        self.write(move |c| {
            let name: Option<String> = c
                .query_row(
                    "SELECT name FROM regions WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(name) = name else {
                return Err(StoreError::Missing(format!("region {id}")));
            };
            let before = scope_codes(c, &id)?;
            c.execute(
                "DELETE FROM region_neighbours WHERE region = ?1",
                [id.as_str()],
            )?;
            for n in &neighbours {
                c.execute(
                    "INSERT OR IGNORE INTO region_neighbours (region, council) VALUES (?1, ?2)",
                    params![id.as_str(), n.as_str()],
                )?;
            }
            if scope_codes(c, &id)? != before {
                bump_epoch(c, id.as_str())?;
            }
            let epoch: i64 = c.query_row(
                "SELECT epoch FROM regions WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )?;
            let mut neighbours = neighbours;
            neighbours.sort();
            neighbours.dedup();
            Ok(RegionRecord {
                id,
                name,
                epoch: epoch as u64,
                neighbours,
            })
        })
    }

    fn regions(&self) -> impl Future<Output = Result<Vec<RegionRecord>, StoreError>> + Send {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT id, name, epoch FROM regions ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(RegionRecord {
                    id: parse_col(r, 0)?,
                    name: r.get(1)?,
                    epoch: r.get::<_, i64>(2)? as u64,
                    neighbours: Vec::new(),
                })
            })?;
            let mut regions: Vec<RegionRecord> = rows.collect::<Result<_, _>>()?;
            let mut n = c.prepare(
                "SELECT council FROM region_neighbours WHERE region = ?1 ORDER BY council",
            )?;
            for r in &mut regions {
                let codes = n.query_map([r.id.as_str()], |row| parse_col(row, 0))?;
                r.neighbours = codes.collect::<Result<_, _>>()?;
            }
            Ok(regions)
        })
    }

    fn add_council(
        &self,
        info: CouncilInfo,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            require(
                c,
                "SELECT 1 FROM regions WHERE id = ?1",
                info.region.as_str(),
                "region",
            )?;
            c.execute(
                "INSERT INTO councils (code, name, region, emergency_phone, office_phone) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    info.code.as_str(),
                    info.name,
                    info.region.as_str(),
                    info.emergency_phone,
                    info.office_phone
                ],
            )
            .map_err(map_conflict(format!("council {}", info.code)))?;
            // Every region whose scope now holds the council sees a new council set.
            c.execute(
                "UPDATE regions SET epoch = epoch + 1 WHERE id = ?1 \
                 OR id IN (SELECT region FROM region_neighbours WHERE council = ?2)",
                params![info.region.as_str(), info.code.as_str()],
            )?;
            Ok(())
        })
    }

    fn add_council_token(
        &self,
        council: CouncilCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            credentials::add_bearer(
                c,
                "council_tokens",
                "council",
                COUNCIL_OWNER,
                council.as_str(),
                &hash,
                now,
                expires_at,
            )
        })
    }

    fn council_for_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<CouncilCode, TokenRefusal>, StoreError>> + Send {
        self.read(move |c| credentials::bearer(c, "council_tokens", "council", &hash, now))
    }

    fn revoke_council_tokens(
        &self,
        council: CouncilCode,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| {
            credentials::revoke_bearers(
                c,
                "council_tokens",
                "council",
                COUNCIL_OWNER,
                council.as_str(),
                now,
            )
        })
    }

    fn apply_upload(
        &self,
        council: CouncilCode,
        upload_id: Uuid,
        rows: Vec<FlagRecord>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<UploadOutcome, StoreError>> + Send {
        self.write(move |c| {
            require(
                c,
                "SELECT 1 FROM councils WHERE code = ?1",
                council.as_str(),
                "council",
            )?;
            let current = council_flags(c, council.as_str())?;
            let (changes, counts) = reconcile::diff(current, rows);
            let version = record_changes(c, changes, "upload", now)?;
            c.execute(
                "INSERT INTO uploads (id, council, received_at, rows, added, updated, ended, \
                 removed, unchanged, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    upload_id.to_string(),
                    council.as_str(),
                    ts(now),
                    counts.rows as i64,
                    counts.added as i64,
                    counts.updated as i64,
                    counts.ended as i64,
                    counts.removed as i64,
                    counts.unchanged as i64,
                    version as i64
                ],
            )?;
            pages::record_attempt(c, &council, now, Some(upload_id), None)?;
            Ok(UploadOutcome { counts, version })
        })
    }

    fn purge_expired(
        &self,
        today: NaiveDate,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {FLAG_COLS} FROM flags WHERE end_date IS NOT NULL AND end_date < ?1 \
                 ORDER BY council, nhs_number, plan_type"
            ))?;
            let rows = stmt.query_map([date_text(today)], flag_from_row)?;
            let mut removals = Vec::new();
            for f in rows {
                let f = f?;
                if f.end_date.is_some_and(|end| retained_until(end) < today) {
                    removals.push(Change::Remove(f.key()));
                }
            }
            drop(stmt);
            let n = removals.len() as u64;
            if n > 0 {
                record_changes(c, removals, "purge", now)?;
            }
            Ok(n)
        })
    }

    fn prune_change_log(
        &self,
        retention: LogRetention,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| {
            let head = head_version(c)?;
            let by_count = head.saturating_sub(retention.max_versions);
            let by_time: Option<i64> = c.query_row(
                "SELECT max(version) FROM changes WHERE recorded_at < ?1",
                [ts(retention.keep_since)],
                |r| r.get(0),
            )?;
            let cut = by_count.max(by_time.unwrap_or(0) as u64) as i64;
            c.execute(
                "UPDATE councils SET log_floor = max(log_floor, coalesce((SELECT max(version) \
                 FROM changes WHERE changes.council = councils.code AND version <= ?1), 0))",
                [cut],
            )?;
            let n = c.execute("DELETE FROM changes WHERE version <= ?1", [cut])?;
            Ok(n as u64)
        })
    }

    fn head_version(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        // What `/healthz` reads: one row, on the request's thread when a slot is free.
        self.read_short(|r| head_version(&r.conn))
    }

    fn region_head(
        &self,
        region: RegionId,
    ) -> impl Future<Output = Result<Option<RegionHead>, StoreError>> + Send {
        // One read transaction: the epoch, the councils and their versions of one moment.
        self.read_with(move |r| {
            let tx = r.conn.unchecked_transaction()?;
            Reader::region_head(&mut r.heads, &tx, &region)
        })
    }

    fn region_snapshot(
        &self,
        region: RegionId,
    ) -> impl Future<Output = Result<Option<RegionSnapshot>, StoreError>> + Send {
        self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let Some(head) = region_head(&tx, &region)? else {
                return Ok(None);
            };
            let mut flags = Vec::new();
            let mut contacts = std::collections::BTreeMap::new();
            for council in &head.councils {
                flags.extend(council_flags(&tx, council.code.as_str())?);
                events::council_subject_contacts(&tx, council.code.as_str(), &mut contacts)?;
            }
            tx.finish()?;
            Ok(Some(RegionSnapshot {
                head,
                flags,
                contacts: contacts
                    .into_iter()
                    .map(|(nhs_number, contacts)| SubjectContacts {
                        nhs_number,
                        contacts,
                    })
                    .collect(),
            }))
        })
    }

    fn region_changes(
        &self,
        region: RegionId,
        from: u64,
    ) -> impl Future<Output = Result<Option<RegionChanges>, StoreError>> + Send {
        self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let Some(head) = region_head(&tx, &region)? else {
                return Ok(None);
            };
            let mut changes: Vec<VersionedChange> = Vec::new();
            if from >= head.floor && from < head.version {
                let scope: BTreeSet<&str> = head.councils.iter().map(|c| c.code.as_str()).collect();
                let mut stmt = tx.prepare_cached(
                    "SELECT version, council, nhs_number, plan_type, op, start_date, end_date, \
                     date_of_birth, local_id FROM changes WHERE version > ?1 AND version <= ?2 \
                     ORDER BY version",
                )?;
                let mut rows = stmt.query(params![from as i64, head.version as i64])?;
                // A subject's contact changes collapse into its latest one.
                let mut latest_contacts: std::collections::HashMap<NhsNumber, usize> =
                    std::collections::HashMap::new();
                let mut superseded = BTreeSet::new();
                while let Some(row) = rows.next()? {
                    let council: String = row.get(1)?;
                    if !scope.contains(council.as_str()) {
                        continue;
                    }
                    let op: String = row.get(4)?;
                    if op == OP_CONTACTS {
                        let nhs_number = nhs(row, 2)?;
                        if let Some(earlier) = latest_contacts.insert(nhs_number, changes.len()) {
                            superseded.insert(earlier);
                        }
                        changes.push(VersionedChange {
                            version: row.get::<_, i64>(0)? as u64,
                            change: Change::Contacts(SubjectContacts {
                                nhs_number,
                                contacts: Vec::new(),
                            }),
                        });
                    } else {
                        changes.push(change_from_row(row)?);
                    }
                }
                drop(rows);
                drop(stmt);
                let mut kept = Vec::with_capacity(changes.len() - superseded.len());
                for (i, mut vc) in changes.into_iter().enumerate() {
                    if superseded.contains(&i) {
                        continue;
                    }
                    if let Change::Contacts(sc) = &mut vc.change {
                        sc.contacts = events::contacts(&tx, sc.nhs_number)?;
                    }
                    kept.push(vc);
                }
                changes = kept;
            }
            tx.finish()?;
            Ok(Some(RegionChanges { head, changes }))
        })
    }

    fn council_flags(
        &self,
        council: CouncilCode,
    ) -> impl Future<Output = Result<Vec<FlagRecord>, StoreError>> + Send {
        self.read(move |c| council_flags(c, council.as_str()))
    }

    fn add_enrolment_token(
        &self,
        token: NewEnrolmentToken,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            require(
                c,
                "SELECT 1 FROM trusts WHERE code = ?1",
                token.trust.as_str(),
                "trust",
            )?;
            require(
                c,
                "SELECT 1 FROM regions WHERE id = ?1",
                token.region.as_str(),
                "region",
            )?;
            c.execute(
                "INSERT INTO enrolment_tokens (hash, trust, region, uses_left, expires_at, \
                 created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &token.hash[..],
                    token.trust.as_str(),
                    token.region.as_str(),
                    i64::from(token.uses),
                    ts(token.expires_at),
                    ts(now)
                ],
            )?;
            Ok(())
        })
    }

    fn check_enrolment_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError>> + Send
    {
        self.read(move |c| token_state(c, &hash, now))
    }

    fn enrolment_tokens(
        &self,
    ) -> impl Future<Output = Result<Vec<EnrolmentTokenInfo>, StoreError>> + Send {
        self.read(credentials::enrolment_tokens)
    }

    fn revoke_enrolment_token(
        &self,
        id: String,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.write(move |c| credentials::revoke_enrolment_token(c, &id, now))
    }

    fn enrol_device(
        &self,
        hash: [u8; 32],
        device: NewDevice,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<DeviceRecord, TokenRefusal>, StoreError>> + Send {
        self.write(move |c| {
            let (trust, region) = match token_state(c, &hash, now)? {
                Ok(v) => v,
                Err(refusal) => return Ok(Err(refusal)),
            };
            c.execute(
                "UPDATE enrolment_tokens SET uses_left = uses_left - 1 WHERE hash = ?1",
                [&hash[..]],
            )?;
            c.execute(
                &format!("INSERT INTO devices ({DEVICE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, NULL)"),
                params![
                    device.id.to_string(),
                    trust.as_str(),
                    region.as_str(),
                    device.name,
                    device.agent_version,
                    ts(device.cert_expires_at),
                    ts(now)
                ],
            )?;
            read_device(c, &device.id)?
                .map(Ok)
                .ok_or_else(|| StoreError::Missing(format!("device {}", device.id)))
        })
    }

    fn device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<DeviceRecord>, StoreError>> + Send {
        self.read(move |c| read_device(c, &id))
    }

    fn device_and_head(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<(DeviceRecord, Option<RegionHead>)>, StoreError>> + Send
    {
        self.read_short(move |r| {
            let tx = r.conn.unchecked_transaction()?;
            let Some(device) = read_device(&tx, &id)? else {
                return Ok(None);
            };
            let head = Reader::region_head(&mut r.heads, &tx, &device.region)?;
            Ok(Some((device, head)))
        })
    }

    fn touch_device(
        &self,
        id: DeviceId,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            c.execute(
                "UPDATE devices SET last_seen = ?2 WHERE id = ?1",
                params![id.to_string(), ts(now)],
            )?;
            Ok(())
        })
    }

    fn devices(&self) -> impl Future<Output = Result<Vec<DeviceRecord>, StoreError>> + Send {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {DEVICE_COLS} FROM devices ORDER BY enrolled_at DESC, id DESC"
            ))?;
            let rows = stmt.query_map([], device_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn revoke_device(
        &self,
        id: DeviceId,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.write(move |c| {
            if read_device(c, &id)?.is_none() {
                return Err(StoreError::Missing(format!("device {id}")));
            }
            let n = c.execute(
                "UPDATE devices SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id.to_string(), ts(now)],
            )?;
            Ok(n > 0)
        })
    }

    fn trusts(&self) -> impl Future<Output = Result<Vec<TrustRecord>, StoreError>> + Send {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT code, name FROM trusts ORDER BY code")?;
            let rows = stmt.query_map([], |r| {
                Ok(TrustRecord {
                    code: parse_col(r, 0)?,
                    name: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn councils(&self) -> impl Future<Output = Result<Vec<CouncilInfo>, StoreError>> + Send {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT code, name, region, emergency_phone, office_phone FROM councils \
                 ORDER BY code",
            )?;
            let rows = stmt.query_map([], council_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn ingest_events(
        &self,
        ingest: EventIngest,
    ) -> impl Future<Output = Result<Vec<IngestOutcome>, StoreError>> + Send {
        self.write(move |c| events::ingest(c, &ingest))
    }

    fn national_lookup(
        &self,
        nhs_number: NhsNumber,
    ) -> impl Future<Output = Result<NationalLookup, StoreError>> + Send {
        self.read(move |c| events::national_lookup(c, nhs_number))
    }

    fn purge_orphan_contacts(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(events::purge_orphan_contacts)
    }

    fn recent_contacts(
        &self,
        nhs_number: NhsNumber,
    ) -> impl Future<Output = Result<Vec<RecentContact>, StoreError>> + Send {
        self.read(move |c| events::contacts(c, nhs_number))
    }

    fn list_notifications(
        &self,
        council: CouncilCode,
        after: u64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Notification>, StoreError>> + Send {
        self.read(move |c| events::list(c, &council, after, limit, now))
    }

    fn acknowledge_notifications(
        &self,
        council: CouncilCode,
        ids: Vec<NotificationId>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| events::acknowledge(c, &council, &ids, now))
    }

    fn mailbox_stats(
        &self,
        overdue_before: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<MailboxStats>, StoreError>> + Send {
        self.read(move |c| events::stats(c, overdue_before))
    }

    fn stored_event(
        &self,
        id: EventId,
    ) -> impl Future<Output = Result<Option<StoredEvent>, StoreError>> + Send {
        self.read(move |c| events::stored_event(c, &id))
    }

    fn event_ids(&self) -> impl Future<Output = Result<Vec<EventId>, StoreError>> + Send {
        self.read(events::event_ids)
    }

    fn audit_entries(
        &self,
        event_id: EventId,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send {
        self.read(move |c| events::audit_entries(c, &event_id))
    }

    fn record_device_report(
        &self,
        id: DeviceId,
        report: cpis_protocol::DeviceReport,
        received_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| lifecycle::record_report(c, &id, &report, received_at))
    }

    fn renew_device_certificate(
        &self,
        id: DeviceId,
        expires_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| lifecycle::renew(c, &id, expires_at))
    }

    fn fleet(&self) -> impl Future<Output = Result<Vec<FleetEntry>, StoreError>> + Send {
        self.read(|c| lifecycle::fleet(c, None))
    }

    fn add_key_rollover(
        &self,
        record: KeyRolloverRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| lifecycle::add_rollover(c, &record))
    }

    fn key_rollovers(
        &self,
    ) -> impl Future<Output = Result<Vec<KeyRolloverRecord>, StoreError>> + Send {
        self.read(lifecycle::rollovers)
    }

    fn current_signing_key(
        &self,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        self.read(lifecycle::current_key)
    }
    fn record_refused_upload(
        &self,
        council: CouncilCode,
        refused: RefusedUpload,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| pages::record_refusal(c, &council, &refused, now))
    }

    fn upload_attempts(
        &self,
        council: CouncilCode,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<UploadAttempt>, StoreError>> + Send {
        self.read(move |c| pages::attempts(c, &council, limit))
    }

    fn add_trust_admin_token(
        &self,
        trust: TrustCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            credentials::add_bearer(
                c,
                "trust_admin_tokens",
                "trust",
                TRUST_OWNER,
                trust.as_str(),
                &hash,
                now,
                expires_at,
            )
        })
    }

    fn trust_for_admin_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<TrustCode, TokenRefusal>, StoreError>> + Send {
        self.read(move |c| credentials::bearer(c, "trust_admin_tokens", "trust", &hash, now))
    }

    fn revoke_trust_admin_tokens(
        &self,
        trust: TrustCode,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| {
            credentials::revoke_bearers(
                c,
                "trust_admin_tokens",
                "trust",
                TRUST_OWNER,
                trust.as_str(),
                now,
            )
        })
    }

    fn trust_fleet(
        &self,
        trust: TrustCode,
    ) -> impl Future<Output = Result<Vec<FleetEntry>, StoreError>> + Send {
        self.read(move |c| lifecycle::fleet(c, Some(&trust)))
    }

    fn create_page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        session: PageSession,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| pages::create_session(c, &id_hash, kind, &session))
    }

    fn page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<PageSession>, StoreError>> + Send {
        self.read(move |c| pages::session(c, &id_hash, kind, now))
    }

    fn set_page_session_flash(
        &self,
        id_hash: [u8; 32],
        flash: Option<String>,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send {
        self.write(move |c| pages::set_flash(c, &id_hash, flash))
    }

    fn end_page_session(
        &self,
        id_hash: [u8; 32],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(move |c| {
            c.execute(
                "DELETE FROM page_sessions WHERE id_hash = ?1",
                [&id_hash[..]],
            )?;
            Ok(())
        })
    }

    fn purge_page_sessions(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.write(move |c| {
            let n = c.execute(
                "DELETE FROM page_sessions WHERE expires_at <= ?1",
                [ts(now)],
            )?;
            Ok(n as u64)
        })
    }

    fn check_database(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.read(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
    }
}
