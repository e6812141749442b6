//! The PostgreSQL store: any number of server replicas share one database.
//!
//! Only SQL lives here; the rules (reconciliation, which councils are notified, the repeat
//! rule) are the plain functions in [`crate::reconcile`] and [`crate::ingest`], called the
//! same way as by the SQLite backend.
//!
//! Ordering across replicas: every transaction that takes change-log versions first locks the
//! `head_version` counter row (`SELECT … FOR UPDATE`) and holds it until it commits. Versions
//! are therefore gap-free, and version N+1's transaction cannot commit before N's has: no
//! reader on any replica sees N+1 before N. (A sequence would hand out numbers that commit out
//! of order; an advisory lock would do as well, but the counter row also stores the head.)
//! Notification ids are taken from a second counter row the same way, so a council paging its
//! mailbox by id never passes a notice that commits later with a smaller id.
//!
//! Reads that must agree with a head (snapshots, deltas, the national lookup) run in one
//! `REPEATABLE READ READ ONLY` transaction. Connection failures are `StoreError::Unavailable`
//! (answered 503, retried by clients); nothing is retried here, because every write is
//! idempotent from the caller's side (events by id, uploads as whole lists).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::mailbox::{Notification, NotificationId, OVERDUE_AFTER_DAYS};
use cpis_protocol::{
    AccessEvent, Change, CouncilCode, CouncilInfo, DeviceId, DeviceReport, EventId, FlagKey,
    FlagRecord, KeyRollover, MAX_RECENT_CONTACTS, NhsNumber, Organisation, PlanType, PublicKey,
    RecentContact, RegionId, SignedMessage, SubjectContacts, TrustCode, VersionedChange,
    retained_until,
};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use subtle::ConstantTimeEq as _;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row};
use uuid::Uuid;

use super::codec::{
    OP_CONTACTS, OP_REMOVE, OP_UPSERT, date_text, ms, plan_types_from, plan_types_text,
    setting_from, setting_text, ts,
};
use super::{
    AttemptOutcome, AuditEntry, DeviceRecord, EnrolmentTokenInfo, EventIngest, FleetEntry,
    IngestOutcome, KeyRolloverRecord, LogRetention, MAX_UPLOAD_ATTEMPTS, MailboxStats,
    NationalLookup, NewDevice, NewEnrolmentToken, PageSession, RefusedUpload, RegionChanges,
    RegionHead, RegionRecord, RegionSnapshot, SessionKind, Store, StoreError, StoredEvent,
    StoredReport, TokenRefusal, TrustRecord, UploadAttempt, UploadOutcome, enrolment_token_id,
};
use crate::{ingest, reconcile};

/// The schema, one entry per migration; `schema_migrations` records the applied ones.
const MIGRATIONS: &[&str] = &[
    include_str!("postgres/schema.sql"),
    include_str!("postgres/002-flags-council-checked-by-upload.sql"),
    include_str!("postgres/003-heads-notify.sql"),
];

/// The channel migration 3's triggers notify when a region's head may have moved.
const HEADS_CHANNEL: &str = "cpis_heads";

/// Any number serving the advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK: i64 = 0x4350_4953_4d49_4752; // "CPISMIGR"

/// Rows written per statement when a change list is applied.
const CHUNK: usize = 5_000;

/// How the pool reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// Connections held at most.
    pub max_connections: usize,
    /// How long a request waits for a connection (or for a new one to connect) before the
    /// database counts as unreachable.
    pub wait: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            wait: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL backend of [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// How to open a connection outside the pool (`LISTEN`).
    config: Box<tokio_postgres::Config>,
    /// The URL without any password, for messages.
    shown: String,
}

/// Notifications of head changes ([`PostgresStore::listen_heads`]); dropping it closes the
/// connection.
#[derive(Debug)]
pub struct HeadNotifications {
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
    rx: tokio::sync::mpsc::Receiver<()>,
}

impl HeadNotifications {
    /// The next notification; `None` once the connection is lost.
    pub async fn next(&mut self) -> Option<()> {
        self.rx.recv().await
    }
}

impl Drop for HeadNotifications {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.shown)
            .finish()
    }
}

/// A database URL with its password (if any) replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() || e.code().is_none() {
        // The message of a connection failure is in its source ("Connection refused").
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        return StoreError::Unavailable(message);
    }
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW =>
        {
            StoreError::Unavailable(db_message(&e))
        }
        _ => StoreError::Database(db_message(&e)),
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg(e)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => pg(e),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn conflict(what: String) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(what)
        } else {
            pg(e)
        }
    }
}

// ---- conversions -----------------------------------------------------------------------

fn corrupt(table: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: detail.to_string(),
    }
}

fn text<T>(row: &Row, idx: usize, table: &'static str) -> Result<T, StoreError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s: String = row.try_get(idx)?;
    s.parse().map_err(|e| corrupt(table, format!("{s:?}: {e}")))
}

fn opt_text<T>(row: &Row, idx: usize, table: &'static str) -> Result<Option<T>, StoreError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s: Option<String> = row.try_get(idx)?;
    s.map(|s| s.parse().map_err(|e| corrupt(table, format!("{s:?}: {e}"))))
        .transpose()
}

fn secs(v: i64, table: &'static str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp(v, 0).ok_or_else(|| corrupt(table, format!("time {v} out of range")))
}

fn opt_secs(v: Option<i64>, table: &'static str) -> Result<Option<DateTime<Utc>>, StoreError> {
    v.map(|v| secs(v, table)).transpose()
}

fn millis(v: i64, table: &'static str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(v)
        .ok_or_else(|| corrupt(table, format!("time {v} out of range")))
}

fn nhs(row: &Row, idx: usize, table: &'static str) -> Result<NhsNumber, StoreError> {
    let v: i64 = row.try_get(idx)?;
    NhsNumber::from_u64(v as u64).map_err(|e| corrupt(table, e))
}

fn nhs_value(n: NhsNumber) -> i64 {
    n.as_u64() as i64
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const FLAG_COLS: &str =
    "council, nhs_number, plan_type, start_date, end_date, date_of_birth, local_id";

fn flag_from_row(row: &Row, at: usize) -> Result<FlagRecord, StoreError> {
    Ok(FlagRecord {
        council: text(row, at, "flags")?,
        nhs_number: nhs(row, at + 1, "flags")?,
        plan_type: text(row, at + 2, "flags")?,
        start_date: text(row, at + 3, "flags")?,
        end_date: opt_text(row, at + 4, "flags")?,
        date_of_birth: opt_text(row, at + 5, "flags")?,
        local_id: row.try_get(at + 6)?,
    })
}

const COUNCIL_COLS: &str = "code, name, region, emergency_phone, office_phone";

fn council_from_row(row: &Row, at: usize) -> Result<CouncilInfo, StoreError> {
    Ok(CouncilInfo {
        code: text(row, at, "councils")?,
        name: row.try_get(at + 1)?,
        region: text(row, at + 2, "councils")?,
        emergency_phone: row.try_get(at + 3)?,
        office_phone: row.try_get(at + 4)?,
    })
}

const DEVICE_COLS: &str = "d.id, d.trust, d.region, d.name, d.agent_version, d.cert_expires_at, \
                           d.enrolled_at, d.last_seen, d.revoked_at";

/// How many columns [`DEVICE_COLS`] names.
const DEVICE_COLUMNS: usize = 9;

fn device_from_row(row: &Row) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        id: text(row, 0, "devices")?,
        trust: text(row, 1, "devices")?,
        region: text(row, 2, "devices")?,
        name: row.try_get(3)?,
        agent_version: row.try_get(4)?,
        cert_expires_at: secs(row.try_get(5)?, "devices")?,
        enrolled_at: secs(row.try_get(6)?, "devices")?,
        last_seen: opt_secs(row.try_get(7)?, "devices")?,
        revoked_at: opt_secs(row.try_get(8)?, "devices")?,
    })
}

fn contact_from_row(row: &Row, at: usize) -> Result<RecentContact, StoreError> {
    let setting: String = row.try_get(at + 3)?;
    Ok(RecentContact {
        date: millis(row.try_get(at)?, "contacts")?.date_naive(),
        organisation: Organisation {
            ods: text(row, at + 1, "contacts")?,
            name: row.try_get(at + 2)?,
        },
        setting: setting_from(&setting),
    })
}

// ---- statements shared by several operations ---------------------------------------------

async fn rows<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query(&stmt, params).await?)
}

async fn row_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&stmt, params).await?)
}

async fn exec<C: GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.execute(&stmt, params).await?)
}

/// Fails with `Missing("{what} {key}")` unless `sql` (a `SELECT 1 … = $1`) finds a row.
async fn require<C: GenericClient>(
    c: &C,
    sql: &str,
    key: &str,
    what: &str,
) -> Result<(), StoreError> {
    if row_opt(c, sql, &[&key]).await?.is_none() {
        return Err(StoreError::Missing(format!("{what} {key}")));
    }
    Ok(())
}

/// Locks a counter row until commit and returns its value (see the module doc).
async fn lock_counter<C: GenericClient>(c: &C, key: &str) -> Result<u64, StoreError> {
    let row = rows(
        c,
        "SELECT value FROM meta WHERE key = $1 FOR UPDATE",
        &[&key],
    )
    .await?;
    let v: i64 = row
        .first()
        .ok_or_else(|| corrupt("meta", format!("no {key} row")))?
        .try_get(0)?;
    Ok(v as u64)
}

async fn set_counter<C: GenericClient>(c: &C, key: &str, v: u64) -> Result<(), StoreError> {
    exec(
        c,
        "UPDATE meta SET value = $2 WHERE key = $1",
        &[&key, &(v as i64)],
    )
    .await?;
    Ok(())
}

async fn scope_codes<C: GenericClient>(
    c: &C,
    region: &RegionId,
) -> Result<BTreeSet<String>, StoreError> {
    let found = rows(
        c,
        "SELECT code FROM councils WHERE region = $1 \
         UNION SELECT c.code FROM region_neighbours n JOIN councils c ON c.code = n.council \
         WHERE n.region = $1",
        &[&region.as_str()],
    )
    .await?;
    found
        .iter()
        .map(|r| Ok(r.try_get::<_, String>(0)?))
        .collect()
}

/// A region head's columns: the epoch, then each council in scope with its newest change.
const HEAD_COLS: &str = "r.epoch, c.code, c.name, c.region, c.emergency_phone, c.office_phone, \
                         c.log_floor, (SELECT max(version) FROM changes WHERE changes.council = c.code)";
/// The councils in region `r`'s scope: its own and its neighbours.
const HEAD_SCOPE: &str =
    "c.region = r.id OR c.code IN (SELECT council FROM region_neighbours n WHERE n.region = r.id)";

/// A region's head in one statement (so one snapshot, even outside a transaction).
async fn region_head<C: GenericClient>(
    c: &C,
    region: &RegionId,
) -> Result<Option<RegionHead>, StoreError> {
    let found = rows(
        c,
        &format!(
            "SELECT {HEAD_COLS} FROM regions r LEFT JOIN councils c ON {HEAD_SCOPE} \
             WHERE r.id = $1 ORDER BY c.code"
        ),
        &[&region.as_str()],
    )
    .await?;
    head_from_rows(region, &found, 0)
}

/// The head in `found` (rows of [`HEAD_COLS`] from column `at`): `None` when the first
/// row's epoch is null or there is no row (no such region).
fn head_from_rows(
    region: &RegionId,
    found: &[Row],
    at: usize,
) -> Result<Option<RegionHead>, StoreError> {
    let Some(epoch) = found
        .first()
        .map(|r| r.try_get::<_, Option<i64>>(at))
        .transpose()?
        .flatten()
    else {
        return Ok(None);
    };
    let mut councils = Vec::with_capacity(found.len());
    let mut floor = 0u64;
    let mut newest = 0u64;
    for row in found {
        // A region without councils: one row, its council columns null.
        if row.try_get::<_, Option<&str>>(at + 1)?.is_none() {
            continue;
        }
        councils.push(council_from_row(row, at + 1)?);
        floor = floor.max(row.try_get::<_, i64>(at + 6)? as u64);
        newest = newest.max(row.try_get::<_, Option<i64>>(at + 7)?.unwrap_or(0) as u64);
    }
    Ok(Some(RegionHead {
        region: region.clone(),
        epoch: epoch as u64,
        version: newest.max(floor),
        floor,
        councils,
    }))
}

async fn council_flags<C: GenericClient>(
    c: &C,
    councils: &[&str],
) -> Result<Vec<FlagRecord>, StoreError> {
    let found = rows(
        c,
        &format!(
            "SELECT {FLAG_COLS} FROM flags WHERE council = ANY($1) \
             ORDER BY council, nhs_number, plan_type"
        ),
        &[&councils],
    )
    .await?;
    found.iter().map(|r| flag_from_row(r, 0)).collect()
}

/// The flag columns of a batch of changes, as arrays for `unnest`.
#[derive(Default)]
struct Columns {
    version: Vec<i64>,
    council: Vec<String>,
    nhs_number: Vec<i64>,
    plan_type: Vec<String>,
    op: Vec<&'static str>,
    start_date: Vec<Option<String>>,
    end_date: Vec<Option<String>>,
    date_of_birth: Vec<Option<String>>,
    local_id: Vec<Option<String>>,
}

/// Applies changes to the flags and records them in the log, each with the next version,
/// in statements of [`CHUNK`] rows. The caller holds the head lock. Returns the new head.
async fn record_changes<C: GenericClient>(
    c: &C,
    head: u64,
    changes: Vec<Change>,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut version = head;
    let mut changes = changes.into_iter().peekable();
    while changes.peek().is_some() {
        let mut cols = Columns::default();
        for change in changes.by_ref().take(CHUNK) {
            version += 1;
            cols.version.push(version as i64);
            match change {
                Change::Upsert(f) => {
                    cols.council.push(f.council.to_string());
                    cols.nhs_number.push(nhs_value(f.nhs_number));
                    cols.plan_type.push(f.plan_type.as_str().to_owned());
                    cols.op.push(OP_UPSERT);
                    cols.start_date.push(Some(date_text(f.start_date)));
                    cols.end_date.push(f.end_date.map(date_text));
                    cols.date_of_birth.push(f.date_of_birth.map(date_text));
                    cols.local_id.push(f.local_id);
                }
                Change::Remove(k) => {
                    cols.council.push(k.council.to_string());
                    cols.nhs_number.push(nhs_value(k.nhs_number));
                    cols.plan_type.push(k.plan_type.as_str().to_owned());
                    cols.op.push(OP_REMOVE);
                    cols.start_date.push(None);
                    cols.end_date.push(None);
                    cols.date_of_birth.push(None);
                    cols.local_id.push(None);
                }
                Change::Contacts(_) => {
                    // Recorded per council by event ingest, never from an upload or purge.
                    return Err(StoreError::Task(
                        "a contacts change cannot be recorded as a flag change".into(),
                    ));
                }
            }
        }
        // Reconcile and purge give at most one change per flag; `DISTINCT ON` only keeps
        // one statement from proposing a row twice, which PostgreSQL refuses.
        let ops = &cols.op;
        if ops.contains(&OP_REMOVE) {
            exec(
            c,
            "DELETE FROM flags f USING unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) \
             AS r(council, nhs_number, plan_type, op) WHERE r.op = 'remove' \
             AND f.council = r.council AND f.nhs_number = r.nhs_number \
             AND f.plan_type = r.plan_type",
            &[&cols.council, &cols.nhs_number, &cols.plan_type, ops],
        )
        .await?;
        }
        exec(
            c,
            &format!(
                "INSERT INTO flags ({FLAG_COLS}, version) \
                 SELECT DISTINCT ON (council, nhs_number, plan_type) council, nhs_number, \
                 plan_type, start_date, end_date, date_of_birth, local_id, version \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::text[]) AS r(version, council, \
                 nhs_number, plan_type, op, start_date, end_date, date_of_birth, local_id) \
                 WHERE op = 'upsert' ORDER BY council, nhs_number, plan_type, version DESC \
                 ON CONFLICT (council, nhs_number, plan_type) DO UPDATE SET \
                 start_date = excluded.start_date, end_date = excluded.end_date, \
                 date_of_birth = excluded.date_of_birth, local_id = excluded.local_id, \
                 version = excluded.version"
            ),
            &[
                &cols.version,
                &cols.council,
                &cols.nhs_number,
                &cols.plan_type,
                ops,
                &cols.start_date,
                &cols.end_date,
                &cols.date_of_birth,
                &cols.local_id,
            ],
        )
        .await?;
        exec(
            c,
            "INSERT INTO changes (version, council, nhs_number, plan_type, op, start_date, \
             end_date, date_of_birth, local_id, reason, recorded_at) \
             SELECT version, council, nhs_number, plan_type, op, start_date, end_date, \
             date_of_birth, local_id, $10, $11 FROM unnest($1::bigint[], $2::text[], \
             $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
             $9::text[]) AS r(version, council, nhs_number, plan_type, op, start_date, \
             end_date, date_of_birth, local_id)",
            &[
                &cols.version,
                &cols.council,
                &cols.nhs_number,
                &cols.plan_type,
                ops,
                &cols.start_date,
                &cols.end_date,
                &cols.date_of_birth,
                &cols.local_id,
                &reason,
                &ts(now),
            ],
        )
        .await?;
    }
    if version != head {
        set_counter(c, "head_version", version).await?;
    }
    Ok(version)
}

fn change_from_row(row: &Row) -> Result<VersionedChange, StoreError> {
    let version: i64 = row.try_get(0)?;
    let council: CouncilCode = text(row, 1, "changes")?;
    let nhs_number = nhs(row, 2, "changes")?;
    let plan_type: PlanType = text(row, 3, "changes")?;
    let op: String = row.try_get(4)?;
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
            start_date: text(row, 5, "changes")?,
            end_date: opt_text(row, 6, "changes")?,
            date_of_birth: opt_text(row, 7, "changes")?,
            local_id: row.try_get(8)?,
        })
    };
    Ok(VersionedChange {
        version: version as u64,
        change,
    })
}

async fn read_device<C: GenericClient>(
    c: &C,
    id: &DeviceId,
) -> Result<Option<DeviceRecord>, StoreError> {
    row_opt(
        c,
        &format!("SELECT {DEVICE_COLS} FROM devices d WHERE d.id = $1"),
        &[&id.to_string()],
    )
    .await?
    .map(|r| device_from_row(&r))
    .transpose()
}

/// An enrolment token's state (`lock`: `FOR UPDATE`, held to commit).
async fn token_state<C: GenericClient>(
    c: &C,
    hash: &[u8; 32],
    now: DateTime<Utc>,
    lock: bool,
) -> Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError> {
    let sql = if lock {
        "SELECT hash, trust, region, uses_left, expires_at, revoked_at FROM enrolment_tokens \
         WHERE hash = $1 FOR UPDATE"
    } else {
        "SELECT hash, trust, region, uses_left, expires_at, revoked_at FROM enrolment_tokens \
         WHERE hash = $1"
    };
    let Some(row) = row_opt(c, sql, &[&&hash[..]]).await? else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let stored: Vec<u8> = row.try_get(0)?;
    if !bool::from(stored.as_slice().ct_eq(&hash[..])) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if row.try_get::<_, Option<i64>>(5)?.is_some() {
        return Ok(Err(TokenRefusal::Revoked));
    }
    if row.try_get::<_, i64>(4)? <= ts(now) {
        return Ok(Err(TokenRefusal::Expired));
    }
    if row.try_get::<_, i64>(3)? <= 0 {
        return Ok(Err(TokenRefusal::UsedUp));
    }
    Ok(Ok((
        text(&row, 1, "enrolment_tokens")?,
        text(&row, 2, "enrolment_tokens")?,
    )))
}

/// Where the owners of council and trust admin tokens live: (table, key column, what).
const COUNCIL_OWNER: (&str, &str, &str) = ("councils", "code", "council");
const TRUST_OWNER: (&str, &str, &str) = ("trusts", "code", "trust");

/// A bearer credential of `table` (owner column `owner`): who it belongs to, or why not.
async fn bearer<C: GenericClient, T>(
    c: &C,
    table: &'static str,
    owner: &'static str,
    hash: &[u8; 32],
    now: DateTime<Utc>,
) -> Result<Result<T, TokenRefusal>, StoreError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let Some(row) = row_opt(
        c,
        &format!("SELECT hash, {owner}, expires_at, revoked_at FROM {table} WHERE hash = $1"),
        &[&&hash[..]],
    )
    .await?
    else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let stored: Vec<u8> = row.try_get(0)?;
    if !bool::from(stored.as_slice().ct_eq(&hash[..])) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if row.try_get::<_, Option<i64>>(3)?.is_some() {
        return Ok(Err(TokenRefusal::Revoked));
    }
    if row
        .try_get::<_, Option<i64>>(2)?
        .is_some_and(|e| e <= ts(now))
    {
        return Ok(Err(TokenRefusal::Expired));
    }
    Ok(Ok(text(&row, 1, table)?))
}

#[allow(clippy::too_many_arguments)]
async fn add_bearer<C: GenericClient>(
    c: &C,
    table: &'static str,
    owner: &'static str,
    (owner_table, owner_key, what): (&'static str, &'static str, &'static str),
    owner_value: &str,
    hash: &[u8; 32],
    now: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    require(
        c,
        &format!("SELECT 1 FROM {owner_table} WHERE {owner_key} = $1"),
        owner_value,
        what,
    )
    .await?;
    exec(
        c,
        &format!(
            "INSERT INTO {table} (hash, {owner}, created_at, expires_at) VALUES ($1, $2, $3, $4)"
        ),
        &[&&hash[..], &owner_value, &ts(now), &expires_at.map(ts)],
    )
    .await?;
    Ok(())
}

async fn revoke_bearers<C: GenericClient>(
    c: &C,
    table: &'static str,
    owner: &'static str,
    (owner_table, owner_key, what): (&'static str, &'static str, &'static str),
    owner_value: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    require(
        c,
        &format!("SELECT 1 FROM {owner_table} WHERE {owner_key} = $1"),
        owner_value,
        what,
    )
    .await?;
    exec(
        c,
        &format!("UPDATE {table} SET revoked_at = $2 WHERE {owner} = $1 AND revoked_at IS NULL"),
        &[&owner_value, &ts(now)],
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn audit<C: GenericClient>(
    c: &C,
    at: DateTime<Utc>,
    action: &str,
    event_id: Option<&EventId>,
    device: Option<&str>,
    council: Option<&CouncilCode>,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO audit_log (at, action, event_id, device, council, detail) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &ms(at),
            &action,
            &event_id.map(ToString::to_string),
            &device,
            &council.map(CouncilCode::as_str),
            &detail,
        ],
    )
    .await?;
    Ok(())
}

async fn contacts<C: GenericClient>(
    c: &C,
    nhs_number: NhsNumber,
) -> Result<Vec<RecentContact>, StoreError> {
    let found = rows(
        c,
        "SELECT accessed_at, trust, trust_name, setting FROM contacts WHERE nhs_number = $1 \
         ORDER BY accessed_at DESC, event_id DESC LIMIT $2",
        &[&nhs_value(nhs_number), &(MAX_RECENT_CONTACTS as i64)],
    )
    .await?;
    found.iter().map(|r| contact_from_row(r, 0)).collect()
}

/// The recent contacts of several subjects in one statement, newest first, at most
/// `MAX_RECENT_CONTACTS` each (a mailbox page, a delta).
async fn contacts_of<C: GenericClient>(
    c: &C,
    subjects: &[NhsNumber],
) -> Result<HashMap<NhsNumber, Vec<RecentContact>>, StoreError> {
    let mut out: HashMap<NhsNumber, Vec<RecentContact>> = HashMap::new();
    if subjects.is_empty() {
        return Ok(out);
    }
    let values: Vec<i64> = subjects.iter().map(|n| nhs_value(*n)).collect();
    let found = rows(
        c,
        "SELECT nhs_number, accessed_at, trust, trust_name, setting FROM (SELECT *, \
         row_number() OVER (PARTITION BY nhs_number ORDER BY accessed_at DESC, event_id DESC) \
         AS n FROM contacts WHERE nhs_number = ANY($1)) recent WHERE n <= $2 \
         ORDER BY nhs_number, accessed_at DESC, event_id DESC",
        &[&values, &(MAX_RECENT_CONTACTS as i64)],
    )
    .await?;
    for r in &found {
        out.entry(nhs(r, 0, "contacts")?)
            .or_default()
            .push(contact_from_row(r, 1)?);
    }
    Ok(out)
}

async fn record_attempt<C: GenericClient>(
    c: &C,
    council: &CouncilCode,
    received_at: DateTime<Utc>,
    upload_id: Option<Uuid>,
    refused: Option<&RefusedUpload>,
) -> Result<(), StoreError> {
    let errors = refused
        .map(|r| serde_json::to_string(&r.errors))
        .transpose()
        .map_err(|e| StoreError::Task(e.to_string()))?;
    exec(
        c,
        "INSERT INTO upload_attempts (council, received_at, upload_id, message, error_count, \
         errors) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &council.as_str(),
            &ts(received_at),
            &upload_id.map(|u| u.to_string()),
            &refused.map(|r| r.message.as_str()),
            &refused.map_or(0, |r| count(r.error_count)),
            &errors,
        ],
    )
    .await?;
    exec(
        c,
        "DELETE FROM upload_attempts WHERE council = $1 AND seq <= (SELECT seq FROM \
         upload_attempts WHERE council = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
        &[&council.as_str(), &(MAX_UPLOAD_ATTEMPTS as i64)],
    )
    .await?;
    Ok(())
}

async fn fleet<C: GenericClient>(
    c: &C,
    trust: Option<&TrustCode>,
) -> Result<Vec<FleetEntry>, StoreError> {
    let found = rows(
        c,
        &format!(
            "SELECT {DEVICE_COLS}, r.body, r.received_at FROM devices d \
             LEFT JOIN device_reports r ON r.device = d.id \
             WHERE $1::text IS NULL OR d.trust = $1 ORDER BY d.enrolled_at DESC, d.id DESC"
        ),
        &[&trust.map(TrustCode::as_str)],
    )
    .await?;
    found
        .iter()
        .map(|row| {
            let device = device_from_row(row)?;
            let body: Option<String> = row.try_get(9)?;
            let received: Option<i64> = row.try_get(10)?;
            let report = match (body, received) {
                (Some(body), Some(received)) => Some(StoredReport {
                    report: serde_json::from_str(&body)
                        .map_err(|e| corrupt("device_reports", e))?,
                    received_at: secs(received, "device_reports")?,
                }),
                _ => None,
            };
            Ok(FleetEntry { device, report })
        })
        .collect()
}

/// Creates an empty database `name` through `admin_url` (a URL of the same cluster, whose
/// user may create databases) and returns the URL of the new one: throw-away databases for
/// tests, benchmarks and the demo. `name` is lower-case letters, digits and `_`.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, StoreError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(StoreError::Config(format!(
            "{name:?} is not a database name of lower-case letters, digits and _"
        )));
    }
    let config: tokio_postgres::Config = admin_url.parse().map_err(|e| {
        StoreError::Config(format!(
            "{} is not a PostgreSQL URL: {e}",
            redact_url(admin_url)
        ))
    })?;
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    drop(client);
    let _ = task.await;
    let base = admin_url
        .split_once('?')
        .map_or(admin_url, |(base, _)| base);
    let Some((server, _)) = base.rsplit_once('/') else {
        return Err(StoreError::Config(format!(
            "{} names no database",
            redact_url(admin_url)
        )));
    };
    Ok(format!("{server}/{name}"))
}

impl PostgresStore {
    /// A store on the database at `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DB`). Nothing
    /// is connected yet: see [`PostgresStore::migrate`].
    pub fn new(url: &str, options: PoolOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Config(format!(
                "{} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB): {e}",
                redact_url(url)
            ))
        })?;
        if config.get_dbname().is_none() {
            return Err(StoreError::Config(format!(
                "{} names no database (postgres://USER@HOST:PORT/DB)",
                redact_url(url)
            )));
        }
        config
            .connect_timeout(options.wait)
            .application_name("cpis-sync-server");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.wait))
            .create_timeout(Some(options.wait))
            .recycle_timeout(Some(options.wait))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Self {
            pool,
            config: Box::new(config),
            shown: redact_url(url),
        })
    }

    /// Listens for head changes committed by any replica or admin command (migration 3's
    /// triggers), on a connection of its own. The receiver gets a message per notification
    /// (coalesced while unread) and ends when the connection is lost: listen again.
    pub async fn listen_heads(&self) -> Result<HeadNotifications, StoreError> {
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let shown = self.shown.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                        // Full: a wake-up is already pending, which is all a hint says.
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(database = %shown, %error, "listening for head changes: connection lost");
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {HEADS_CHANNEL}"))
            .await?;
        Ok(HeadNotifications {
            _client: client,
            task,
            rx,
        })
    }

    /// Connects to the database at `url` and brings its schema up to date.
    pub async fn open(url: &str, options: PoolOptions) -> Result<Self, StoreError> {
        let store = Self::new(url, options)?;
        store.migrate().await?;
        Ok(store)
    }

    /// The database URL, without any password.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Applies the migrations this program knows and the database lacks, one replica at a
    /// time (a transaction-level advisory lock).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let current: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let supported = MIGRATIONS.len() as u32;
        if current as u32 > supported {
            return Err(StoreError::SchemaTooNew {
                found: current as u32,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&(i as i32 + 1), &ts(Utc::now())],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Fails unless the database answers and holds no CP-IS schema yet (`init`): a second
    /// `init` on one database would give it two sets of keys.
    pub async fn refuse_initialised(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let found: Option<String> = client
            .query_one("SELECT to_regclass('schema_migrations')::text", &[])
            .await?
            .try_get(0)?;
        if found.is_some() {
            return Err(StoreError::Conflict(format!(
                "a CP-IS schema in {} (made by an earlier init: give each further replica a \
                 copy of that data dir, `cp -a`, instead of running init again)",
                self.shown
            )));
        }
        Ok(())
    }

    /// Answers when the database answers (health checks).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Opens a `REPEATABLE READ READ ONLY` transaction on `$client` as `$tx`.
macro_rules! consistent_read {
    ($client:ident, $tx:ident) => {
        let mut $client = $client;
        let $tx = $client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
    };
}

impl Store for PostgresStore {
    async fn add_trust(&self, code: TrustCode, name: String) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO trusts (code, name, created_at) VALUES ($1, $2, $3)",
            &[&code.as_str(), &name, &ts(Utc::now())],
        )
        .await
        .map_err(conflict(format!("trust {code}")))?;
        Ok(())
    }

    async fn add_region(
        &self,
        id: RegionId,
        name: String,
        neighbours: Vec<CouncilCode>,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "INSERT INTO regions (id, name, epoch) VALUES ($1, $2, 1)",
            &[&id.as_str(), &name],
        )
        .await
        .map_err(conflict(format!("region {id}")))?;
        for n in &neighbours {
            exec(
                &tx,
                "INSERT INTO region_neighbours (region, council) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&id.as_str(), &n.as_str()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_region_neighbours(
        &self,
        id: RegionId,
        neighbours: Vec<CouncilCode>,
    ) -> Result<RegionRecord, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let Some(row) = row_opt(
            &tx,
            "SELECT name FROM regions WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await?
        else {
            return Err(StoreError::Missing(format!("region {id}")));
        };
        let name: String = row.try_get(0)?;
        let before = scope_codes(&tx, &id).await?;
        exec(
            &tx,
            "DELETE FROM region_neighbours WHERE region = $1",
            &[&id.as_str()],
        )
        .await?;
        for n in &neighbours {
            exec(
                &tx,
                "INSERT INTO region_neighbours (region, council) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&id.as_str(), &n.as_str()],
            )
            .await?;
        }
        if scope_codes(&tx, &id).await? != before {
            exec(
                &tx,
                "UPDATE regions SET epoch = epoch + 1 WHERE id = $1",
                &[&id.as_str()],
            )
            .await?;
        }
        let epoch: i64 = tx
            .query_one("SELECT epoch FROM regions WHERE id = $1", &[&id.as_str()])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        let mut neighbours = neighbours;
        neighbours.sort();
        neighbours.dedup();
        Ok(RegionRecord {
            id,
            name,
            epoch: epoch as u64,
            neighbours,
        })
    }

    async fn regions(&self) -> Result<Vec<RegionRecord>, StoreError> {
        let c = self.client().await?;
        let found = rows(&c, "SELECT id, name, epoch FROM regions ORDER BY id", &[]).await?;
        let neighbours = rows(
            &c,
            "SELECT region, council FROM region_neighbours ORDER BY region, council",
            &[],
        )
        .await?;
        let mut by_region: HashMap<String, Vec<CouncilCode>> = HashMap::new();
        for n in &neighbours {
            by_region
                .entry(n.try_get(0)?)
                .or_default()
                .push(text(n, 1, "region_neighbours")?);
        }
        found
            .iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                Ok(RegionRecord {
                    neighbours: by_region.remove(&id).unwrap_or_default(),
                    id: id.parse().map_err(|e| corrupt("regions", e))?,
                    name: r.try_get(1)?,
                    epoch: r.try_get::<_, i64>(2)? as u64,
                })
            })
            .collect()
    }

    async fn add_council(&self, info: CouncilInfo) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        require(
            &tx,
            "SELECT 1 FROM regions WHERE id = $1",
            info.region.as_str(),
            "region",
        )
        .await?;
        tx.execute(
            &format!("INSERT INTO councils ({COUNCIL_COLS}) VALUES ($1, $2, $3, $4, $5)"),
            &[
                &info.code.as_str(),
                &info.name,
                &info.region.as_str(),
                &info.emergency_phone,
                &info.office_phone,
            ],
        )
        .await
        .map_err(conflict(format!("council {}", info.code)))?;
        // Every region whose scope now holds the council sees a new council set.
        exec(
            &tx,
            "UPDATE regions SET epoch = epoch + 1 WHERE id = $1 \
             OR id IN (SELECT region FROM region_neighbours WHERE council = $2)",
            &[&info.region.as_str(), &info.code.as_str()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn add_council_token(
        &self,
        council: CouncilCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        add_bearer(
            &c,
            "council_tokens",
            "council",
            COUNCIL_OWNER,
            council.as_str(),
            &hash,
            now,
            expires_at,
        )
        .await
    }

    async fn council_for_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<CouncilCode, TokenRefusal>, StoreError> {
        let c = self.client().await?;
        bearer(&c, "council_tokens", "council", &hash, now).await
    }

    async fn revoke_council_tokens(
        &self,
        council: CouncilCode,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let c = self.client().await?;
        revoke_bearers(
            &c,
            "council_tokens",
            "council",
            COUNCIL_OWNER,
            council.as_str(),
            now,
        )
        .await
    }

    async fn apply_upload(
        &self,
        council: CouncilCode,
        upload_id: Uuid,
        rows_in: Vec<FlagRecord>,
        now: DateTime<Utc>,
    ) -> Result<UploadOutcome, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let head = lock_counter(&tx, "head_version").await?;
        require(
            &tx,
            "SELECT 1 FROM councils WHERE code = $1",
            council.as_str(),
            "council",
        )
        .await?;
        let current = council_flags(&tx, &[council.as_str()]).await?;
        let (changes, counts) = reconcile::diff(current, rows_in);
        let version = record_changes(&tx, head, changes, "upload", now).await?;
        exec(
            &tx,
            "INSERT INTO uploads (id, council, received_at, rows, added, updated, ended, \
             removed, unchanged, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &upload_id.to_string(),
                &council.as_str(),
                &ts(now),
                &count(counts.rows),
                &count(counts.added),
                &count(counts.updated),
                &count(counts.ended),
                &count(counts.removed),
                &count(counts.unchanged),
                &(version as i64),
            ],
        )
        .await?;
        record_attempt(&tx, &council, now, Some(upload_id), None).await?;
        tx.commit().await?;
        Ok(UploadOutcome { counts, version })
    }

    async fn purge_expired(&self, today: NaiveDate, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let head = lock_counter(&tx, "head_version").await?;
        let found = rows(
            &tx,
            &format!(
                "SELECT {FLAG_COLS} FROM flags WHERE end_date IS NOT NULL AND end_date < $1 \
                 ORDER BY council, nhs_number, plan_type"
            ),
            &[&date_text(today)],
        )
        .await?;
        let mut removals = Vec::new();
        for row in &found {
            let f = flag_from_row(row, 0)?;
            if f.end_date.is_some_and(|end| retained_until(end) < today) {
                removals.push(Change::Remove(f.key()));
            }
        }
        let n = removals.len() as u64;
        if n > 0 {
            record_changes(&tx, head, removals, "purge", now).await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn prune_change_log(&self, retention: LogRetention) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let head = lock_counter(&tx, "head_version").await?;
        let by_count = head.saturating_sub(retention.max_versions);
        let by_time: Option<i64> = tx
            .query_one(
                "SELECT max(version) FROM changes WHERE recorded_at < $1",
                &[&ts(retention.keep_since)],
            )
            .await?
            .try_get(0)?;
        let cut = by_count.max(by_time.unwrap_or(0) as u64) as i64;
        exec(
            &tx,
            "UPDATE councils SET log_floor = greatest(log_floor, coalesce((SELECT \
             max(version) FROM changes WHERE changes.council = councils.code \
             AND version <= $1), 0))",
            &[&cut],
        )
        .await?;
        let n = exec(&tx, "DELETE FROM changes WHERE version <= $1", &[&cut]).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn head_version(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let v: i64 = c
            .query_one("SELECT value FROM meta WHERE key = 'head_version'", &[])
            .await?
            .try_get(0)?;
        Ok(v as u64)
    }

    async fn region_head(&self, region: RegionId) -> Result<Option<RegionHead>, StoreError> {
        region_head(&self.client().await?, &region).await
    }

    async fn region_snapshot(
        &self,
        region: RegionId,
    ) -> Result<Option<RegionSnapshot>, StoreError> {
        let c = self.client().await?;
        consistent_read!(c, tx);
        let Some(head) = region_head(&tx, &region).await? else {
            return Ok(None);
        };
        let scope: Vec<&str> = head.councils.iter().map(|c| c.code.as_str()).collect();
        let flags = council_flags(&tx, &scope).await?;
        let found = rows(
            &tx,
            "SELECT nhs_number, accessed_at, trust, trust_name, setting FROM contacts \
             WHERE nhs_number IN (SELECT nhs_number FROM flags WHERE council = ANY($1)) \
             ORDER BY nhs_number, accessed_at DESC, event_id DESC",
            &[&scope],
        )
        .await?;
        tx.commit().await?;
        let mut contacts: BTreeMap<NhsNumber, Vec<RecentContact>> = BTreeMap::new();
        for r in &found {
            contacts
                .entry(nhs(r, 0, "contacts")?)
                .or_default()
                .push(contact_from_row(r, 1)?);
        }
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
    }

    async fn region_changes(
        &self,
        region: RegionId,
        from: u64,
    ) -> Result<Option<RegionChanges>, StoreError> {
        let c = self.client().await?;
        consistent_read!(c, tx);
        let Some(head) = region_head(&tx, &region).await? else {
            return Ok(None);
        };
        let mut changes: Vec<VersionedChange> = Vec::new();
        if from >= head.floor && from < head.version {
            let scope: Vec<&str> = head.councils.iter().map(|c| c.code.as_str()).collect();
            let found = rows(
                &tx,
                "SELECT version, council, nhs_number, plan_type, op, start_date, end_date, \
                 date_of_birth, local_id FROM changes WHERE version > $1 AND version <= $2 \
                 AND council = ANY($3) ORDER BY version",
                &[&(from as i64), &(head.version as i64), &scope],
            )
            .await?;
            // A subject's contact changes collapse into its latest one.
            let mut latest_contacts: HashMap<NhsNumber, usize> = HashMap::new();
            let mut superseded = BTreeSet::new();
            for row in &found {
                let op: String = row.try_get(4)?;
                if op == OP_CONTACTS {
                    let nhs_number = nhs(row, 2, "changes")?;
                    if let Some(earlier) = latest_contacts.insert(nhs_number, changes.len()) {
                        superseded.insert(earlier);
                    }
                    changes.push(VersionedChange {
                        version: row.try_get::<_, i64>(0)? as u64,
                        change: Change::Contacts(SubjectContacts {
                            nhs_number,
                            contacts: Vec::new(),
                        }),
                    });
                } else {
                    changes.push(change_from_row(row)?);
                }
            }
            let subjects: Vec<NhsNumber> = latest_contacts.keys().copied().collect();
            let mut current = contacts_of(&tx, &subjects).await?;
            let mut kept = Vec::with_capacity(changes.len() - superseded.len());
            for (i, mut vc) in changes.into_iter().enumerate() {
                if superseded.contains(&i) {
                    continue;
                }
                if let Change::Contacts(sc) = &mut vc.change {
                    sc.contacts = current.remove(&sc.nhs_number).unwrap_or_default();
                }
                kept.push(vc);
            }
            changes = kept;
        }
        tx.commit().await?;
        Ok(Some(RegionChanges { head, changes }))
    }

    async fn council_flags(&self, council: CouncilCode) -> Result<Vec<FlagRecord>, StoreError> {
        let c = self.client().await?;
        council_flags(&c, &[council.as_str()]).await
    }

    async fn add_enrolment_token(
        &self,
        token: NewEnrolmentToken,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        require(
            &c,
            "SELECT 1 FROM trusts WHERE code = $1",
            token.trust.as_str(),
            "trust",
        )
        .await?;
        require(
            &c,
            "SELECT 1 FROM regions WHERE id = $1",
            token.region.as_str(),
            "region",
        )
        .await?;
        exec(
            &c,
            "INSERT INTO enrolment_tokens (hash, trust, region, uses_left, expires_at, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &&token.hash[..],
                &token.trust.as_str(),
                &token.region.as_str(),
                &i64::from(token.uses),
                &ts(token.expires_at),
                &ts(now),
            ],
        )
        .await?;
        Ok(())
    }

    async fn check_enrolment_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError> {
        let c = self.client().await?;
        token_state(&c, &hash, now, false).await
    }

    async fn enrolment_tokens(&self) -> Result<Vec<EnrolmentTokenInfo>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT hash, trust, region, uses_left, expires_at, created_at, revoked_at \
             FROM enrolment_tokens ORDER BY created_at DESC, seq DESC",
            &[],
        )
        .await?;
        found
            .iter()
            .map(|r| {
                let hash: Vec<u8> = r.try_get(0)?;
                Ok(EnrolmentTokenInfo {
                    id: enrolment_token_id(&hash),
                    trust: text(r, 1, "enrolment_tokens")?,
                    region: text(r, 2, "enrolment_tokens")?,
                    uses_left: u32::try_from(r.try_get::<_, i64>(3)?.max(0)).unwrap_or(u32::MAX),
                    expires_at: secs(r.try_get(4)?, "enrolment_tokens")?,
                    created_at: secs(r.try_get(5)?, "enrolment_tokens")?,
                    revoked_at: opt_secs(r.try_get(6)?, "enrolment_tokens")?,
                })
            })
            .collect()
    }

    async fn revoke_enrolment_token(
        &self,
        id: String,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let hashes = rows(&c, "SELECT hash FROM enrolment_tokens", &[]).await?;
        let mut found = None;
        for r in &hashes {
            let h: Vec<u8> = r.try_get(0)?;
            if enrolment_token_id(&h) == id {
                found = Some(h);
                break;
            }
        }
        let Some(hash) = found else {
            return Err(StoreError::Missing(format!("enrolment token {id}")));
        };
        let n = exec(
            &c,
            "UPDATE enrolment_tokens SET revoked_at = $2 WHERE hash = $1 \
             AND revoked_at IS NULL",
            &[&hash, &ts(now)],
        )
        .await?;
        Ok(n == 1)
    }

    async fn enrol_device(
        &self,
        hash: [u8; 32],
        device: NewDevice,
        now: DateTime<Utc>,
    ) -> Result<Result<DeviceRecord, TokenRefusal>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // The row lock makes one use one use, however many replicas race for it.
        let (trust, region) = match token_state(&tx, &hash, now, true).await? {
            Ok(v) => v,
            Err(refusal) => return Ok(Err(refusal)),
        };
        exec(
            &tx,
            "UPDATE enrolment_tokens SET uses_left = uses_left - 1 WHERE hash = $1",
            &[&&hash[..]],
        )
        .await?;
        tx.execute(
            "INSERT INTO devices (id, trust, region, name, agent_version, cert_expires_at, \
             enrolled_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &device.id.to_string(),
                &trust.as_str(),
                &region.as_str(),
                &device.name,
                &device.agent_version,
                &ts(device.cert_expires_at),
                &ts(now),
            ],
        )
        .await
        .map_err(conflict(format!("device {}", device.id)))?;
        let record = read_device(&tx, &device.id)
            .await?
            .ok_or_else(|| StoreError::Missing(format!("device {}", device.id)))?;
        tx.commit().await?;
        Ok(Ok(record))
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let c = self.client().await?;
        read_device(&c, &id).await
    }

    async fn device_and_head(
        &self,
        id: DeviceId,
    ) -> Result<Option<(DeviceRecord, Option<RegionHead>)>, StoreError> {
        // One statement: a poll costs one round trip.
        let c = self.client().await?;
        let found = rows(
            &c,
            &format!(
                "SELECT {DEVICE_COLS}, {HEAD_COLS} FROM devices d \
                 LEFT JOIN regions r ON r.id = d.region LEFT JOIN councils c ON {HEAD_SCOPE} \
                 WHERE d.id = $1 ORDER BY c.code"
            ),
            &[&id.to_string()],
        )
        .await?;
        let Some(first) = found.first() else {
            return Ok(None);
        };
        let device = device_from_row(first)?;
        let head = head_from_rows(&device.region, &found, DEVICE_COLUMNS)?;
        Ok(Some((device, head)))
    }

    async fn touch_device(&self, id: DeviceId, now: DateTime<Utc>) -> Result<(), StoreError> {
        let c = self.client().await?;
        exec(
            &c,
            "UPDATE devices SET last_seen = $2 WHERE id = $1",
            &[&id.to_string(), &ts(now)],
        )
        .await?;
        Ok(())
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            &format!("SELECT {DEVICE_COLS} FROM devices d ORDER BY d.enrolled_at DESC, d.id DESC"),
            &[],
        )
        .await?;
        found.iter().map(device_from_row).collect()
    }

    async fn revoke_device(&self, id: DeviceId, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let c = self.client().await?;
        if read_device(&c, &id).await?.is_none() {
            return Err(StoreError::Missing(format!("device {id}")));
        }
        let n = exec(
            &c,
            "UPDATE devices SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&id.to_string(), &ts(now)],
        )
        .await?;
        Ok(n > 0)
    }

    async fn trusts(&self) -> Result<Vec<TrustRecord>, StoreError> {
        let c = self.client().await?;
        let found = rows(&c, "SELECT code, name FROM trusts ORDER BY code", &[]).await?;
        found
            .iter()
            .map(|r| {
                Ok(TrustRecord {
                    code: text(r, 0, "trusts")?,
                    name: r.try_get(1)?,
                })
            })
            .collect()
    }

    async fn councils(&self) -> Result<Vec<CouncilInfo>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            &format!("SELECT {COUNCIL_COLS} FROM councils ORDER BY code"),
            &[],
        )
        .await?;
        found.iter().map(|r| council_from_row(r, 0)).collect()
    }

    async fn ingest_events(&self, ingest: EventIngest) -> Result<Vec<IngestOutcome>, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let outcomes = ingest_events(&tx, &ingest).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn national_lookup(&self, nhs_number: NhsNumber) -> Result<NationalLookup, StoreError> {
        let c = self.client().await?;
        consistent_read!(c, tx);
        let found = rows(
            &tx,
            "SELECT f.council, f.nhs_number, f.plan_type, f.start_date, f.end_date, \
             f.date_of_birth, f.local_id, c.code, c.name, c.region, c.emergency_phone, \
             c.office_phone FROM flags f JOIN councils c ON c.code = f.council \
             WHERE f.nhs_number = $1 ORDER BY f.council, f.plan_type",
            &[&nhs_value(nhs_number)],
        )
        .await?;
        let flags = found
            .iter()
            .map(|r| Ok((flag_from_row(r, 0)?, council_from_row(r, 7)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let covered: i64 = tx
            .query_one("SELECT count(*) FROM councils", &[])
            .await?
            .try_get(0)?;
        let contacts = contacts(&tx, nhs_number).await?;
        tx.commit().await?;
        Ok(NationalLookup {
            flags,
            councils_covered: covered as u64,
            contacts,
        })
    }

    async fn purge_orphan_contacts(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        exec(
            &c,
            "DELETE FROM contacts WHERE NOT EXISTS \
             (SELECT 1 FROM flags WHERE flags.nhs_number = contacts.nhs_number)",
            &[],
        )
        .await
    }

    async fn recent_contacts(
        &self,
        nhs_number: NhsNumber,
    ) -> Result<Vec<RecentContact>, StoreError> {
        let c = self.client().await?;
        contacts(&c, nhs_number).await
    }

    async fn list_notifications(
        &self,
        council: CouncilCode,
        after: u64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Notification>, StoreError> {
        let c = self.client().await?;
        consistent_read!(c, tx);
        let overdue_before = ms(now - chrono::Duration::days(OVERDUE_AFTER_DAYS));
        let found = rows(
            &tx,
            "SELECT n.id, n.plan_types, n.created_at, e.body, e.received_at, e.trust_name, \
             e.clock_suspect FROM notifications n JOIN events e ON e.event_id = n.event_id \
             WHERE n.council = $1 AND n.acked_at IS NULL AND n.id > $2 ORDER BY n.id LIMIT $3",
            &[
                &council.as_str(),
                &i64::try_from(after).unwrap_or(i64::MAX),
                &i64::from(limit),
            ],
        )
        .await?;
        let mut page = Vec::with_capacity(found.len());
        for r in &found {
            let id: i64 = r.try_get(0)?;
            let id =
                NotificationId::try_from(id as u64).map_err(|e| corrupt("notifications", e))?;
            let types: String = r.try_get(1)?;
            let created_at: i64 = r.try_get(2)?;
            let body: String = r.try_get(3)?;
            let e: AccessEvent = serde_json::from_str(&body).map_err(|e| corrupt("events", e))?;
            page.push(Notification {
                id,
                event_id: e.event_id,
                nhs_number: e.nhs_number,
                plan_types: plan_types_from(&types).map_err(|e| corrupt("notifications", e))?,
                accessed_at: e.accessed_at,
                received_at: millis(r.try_get(4)?, "events")?,
                organisation: Organisation {
                    ods: e.trust,
                    name: r.try_get(5)?,
                },
                device_id: e.device,
                staff_id: e.staff_id,
                setting: e.setting,
                data_as_of: e.data_as_of,
                incident_ref: e.incident_ref,
                recent_contacts: Vec::new(),
                overdue: created_at < overdue_before,
                clock_suspect: r.try_get(6)?,
            });
        }
        let subjects: Vec<NhsNumber> = page.iter().map(|n| n.nhs_number).collect();
        let contacts = contacts_of(&tx, &subjects).await?;
        for n in &mut page {
            if let Some(list) = contacts.get(&n.nhs_number) {
                n.recent_contacts.clone_from(list);
            }
        }
        tx.commit().await?;
        Ok(page)
    }

    async fn acknowledge_notifications(
        &self,
        council: CouncilCode,
        ids: Vec<NotificationId>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let mut n = 0u64;
        for id in &ids {
            let acked = row_opt(
                &tx,
                "UPDATE notifications SET acked_at = $1 WHERE id = $2 AND council = $3 \
                 AND acked_at IS NULL RETURNING event_id",
                &[&ms(now), &(id.get() as i64), &council.as_str()],
            )
            .await?;
            if let Some(row) = acked {
                n += 1;
                let event: String = row.try_get(0)?;
                let event_id = event.parse::<EventId>().ok();
                audit(
                    &tx,
                    now,
                    "notification_acknowledged",
                    event_id.as_ref(),
                    None,
                    Some(&council),
                    Some(&id.to_string()),
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn mailbox_stats(
        &self,
        overdue_before: DateTime<Utc>,
    ) -> Result<Vec<MailboxStats>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT c.code, c.name, count(n.id), count(n.id) FILTER \
             (WHERE n.created_at < $1), min(n.created_at) FROM councils c \
             LEFT JOIN notifications n ON n.council = c.code AND n.acked_at IS NULL \
             GROUP BY c.code, c.name ORDER BY c.code",
            &[&ms(overdue_before)],
        )
        .await?;
        found
            .iter()
            .map(|r| {
                Ok(MailboxStats {
                    council: text(r, 0, "councils")?,
                    name: r.try_get(1)?,
                    pending: r.try_get::<_, i64>(2)? as u64,
                    overdue: r.try_get::<_, i64>(3)? as u64,
                    oldest_pending: r
                        .try_get::<_, Option<i64>>(4)?
                        .map(|v| millis(v, "notifications"))
                        .transpose()?,
                })
            })
            .collect()
    }

    async fn stored_event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        let c = self.client().await?;
        let Some(r) = row_opt(
            &c,
            "SELECT body, received_at, source FROM events WHERE event_id = $1",
            &[&id.to_string()],
        )
        .await?
        else {
            return Ok(None);
        };
        let body: String = r.try_get(0)?;
        Ok(Some(StoredEvent {
            event: serde_json::from_str(&body).map_err(|e| corrupt("events", e))?,
            received_at: millis(r.try_get(1)?, "events")?,
            source: r.try_get(2)?,
        }))
    }

    async fn event_ids(&self) -> Result<Vec<EventId>, StoreError> {
        let c = self.client().await?;
        let found = rows(&c, "SELECT event_id FROM events ORDER BY event_id", &[]).await?;
        found.iter().map(|r| text(r, 0, "events")).collect()
    }

    async fn audit_entries(&self, event_id: EventId) -> Result<Vec<AuditEntry>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT at, action, event_id, device, council, detail FROM audit_log \
             WHERE event_id = $1 ORDER BY id",
            &[&event_id.to_string()],
        )
        .await?;
        found
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    at: millis(r.try_get(0)?, "audit_log")?,
                    action: r.try_get(1)?,
                    event_id: opt_text(r, 2, "audit_log")?,
                    device: opt_text(r, 3, "audit_log")?,
                    council: opt_text(r, 4, "audit_log")?,
                    detail: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn record_device_report(
        &self,
        id: DeviceId,
        report: DeviceReport,
        received_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        if read_device(&tx, &id).await?.is_none() {
            return Err(StoreError::Missing(format!("device {id}")));
        }
        let body = serde_json::to_string(&report).map_err(|e| StoreError::Task(e.to_string()))?;
        exec(
            &tx,
            "INSERT INTO device_reports (device, body, received_at) VALUES ($1, $2, $3) \
             ON CONFLICT (device) DO UPDATE SET body = excluded.body, \
             received_at = excluded.received_at",
            &[&id.to_string(), &body, &ts(received_at)],
        )
        .await?;
        // The agent's version as last reported is what the fleet view shows.
        let version: String = report.agent_version.chars().take(100).collect();
        exec(
            &tx,
            "UPDATE devices SET agent_version = $2 WHERE id = $1",
            &[&id.to_string(), &version],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn renew_device_certificate(
        &self,
        id: DeviceId,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        let n = exec(
            &c,
            "UPDATE devices SET cert_expires_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&id.to_string(), &ts(expires_at)],
        )
        .await?;
        if n == 0 {
            return Err(StoreError::Missing(format!("active device {id}")));
        }
        Ok(())
    }

    async fn fleet(&self) -> Result<Vec<FleetEntry>, StoreError> {
        let c = self.client().await?;
        fleet(&c, None).await
    }

    async fn add_key_rollover(&self, record: KeyRolloverRecord) -> Result<(), StoreError> {
        let c = self.client().await?;
        let r = &record.rollover;
        c.execute(
            "INSERT INTO key_rollovers (previous, next, issued_at, signed, sealed_next) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &r.previous.to_string(),
                &r.next.to_string(),
                &ts(r.issued_at),
                &record.signed.to_bytes(),
                &record.sealed_next,
            ],
        )
        .await
        .map_err(conflict(format!("a rollover to key {}", r.next)))?;
        Ok(())
    }

    async fn key_rollovers(&self) -> Result<Vec<KeyRolloverRecord>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT previous, signed, sealed_next FROM key_rollovers ORDER BY seq",
            &[],
        )
        .await?;
        found
            .iter()
            .map(|row| {
                let previous: PublicKey = text(row, 0, "key_rollovers")?;
                let bytes: Vec<u8> = row.try_get(1)?;
                let signed =
                    SignedMessage::from_bytes(&bytes).map_err(|e| corrupt("key_rollovers", e))?;
                // Checked again on the way out: a row its previous key did not sign is
                // corrupt.
                let rollover: KeyRollover = signed
                    .open(previous.verifying_key())
                    .map_err(|e| corrupt("key_rollovers", e))?;
                Ok(KeyRolloverRecord {
                    rollover,
                    signed,
                    sealed_next: row.try_get(2)?,
                })
            })
            .collect()
    }

    async fn current_signing_key(&self) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        row_opt(
            &c,
            "SELECT next FROM key_rollovers ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| Ok(r.try_get(0)?))
        .transpose()
    }

    async fn record_refused_upload(
        &self,
        council: CouncilCode,
        refused: RefusedUpload,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        require(
            &tx,
            "SELECT 1 FROM councils WHERE code = $1",
            council.as_str(),
            "council",
        )
        .await?;
        record_attempt(&tx, &council, now, None, Some(&refused)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn upload_attempts(
        &self,
        council: CouncilCode,
        limit: u32,
    ) -> Result<Vec<UploadAttempt>, StoreError> {
        let c = self.client().await?;
        let found = rows(
            &c,
            "SELECT a.seq, a.received_at, a.upload_id, a.message, a.error_count, a.errors, \
             u.rows, u.added, u.updated, u.ended, u.removed, u.unchanged, u.version \
             FROM upload_attempts a LEFT JOIN uploads u ON u.id = a.upload_id \
             WHERE a.council = $1 ORDER BY a.seq DESC LIMIT $2",
            &[&council.as_str(), &i64::from(limit)],
        )
        .await?;
        found.iter().map(attempt_from_row).collect()
    }

    async fn add_trust_admin_token(
        &self,
        trust: TrustCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        add_bearer(
            &c,
            "trust_admin_tokens",
            "trust",
            TRUST_OWNER,
            trust.as_str(),
            &hash,
            now,
            expires_at,
        )
        .await
    }

    async fn trust_for_admin_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<TrustCode, TokenRefusal>, StoreError> {
        let c = self.client().await?;
        bearer(&c, "trust_admin_tokens", "trust", &hash, now).await
    }

    async fn revoke_trust_admin_tokens(
        &self,
        trust: TrustCode,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let c = self.client().await?;
        revoke_bearers(
            &c,
            "trust_admin_tokens",
            "trust",
            TRUST_OWNER,
            trust.as_str(),
            now,
        )
        .await
    }

    async fn trust_fleet(&self, trust: TrustCode) -> Result<Vec<FleetEntry>, StoreError> {
        let c = self.client().await?;
        fleet(&c, Some(&trust)).await
    }

    async fn create_page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        session: PageSession,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        exec(
            &c,
            "INSERT INTO page_sessions (id_hash, kind, who, csrf, expires_at, flash) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &&id_hash[..],
                &kind.as_str(),
                &session.who,
                &session.csrf,
                &ts(session.expires_at),
                &session.flash,
            ],
        )
        .await?;
        Ok(())
    }

    async fn page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        now: DateTime<Utc>,
    ) -> Result<Option<PageSession>, StoreError> {
        let c = self.client().await?;
        let Some(r) = row_opt(
            &c,
            "SELECT who, csrf, expires_at, flash FROM page_sessions \
             WHERE id_hash = $1 AND kind = $2 AND expires_at > $3",
            &[&&id_hash[..], &kind.as_str(), &ts(now)],
        )
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(PageSession {
            who: r.try_get(0)?,
            csrf: r.try_get(1)?,
            expires_at: secs(r.try_get(2)?, "page_sessions")?,
            flash: r.try_get(3)?,
        }))
    }

    async fn set_page_session_flash(
        &self,
        id_hash: [u8; 32],
        flash: Option<String>,
    ) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        // Returns the message it replaces (taking a message is setting none).
        let r = row_opt(
            &c,
            "UPDATE page_sessions s SET flash = $2 FROM (SELECT id_hash, flash \
             FROM page_sessions WHERE id_hash = $1 FOR UPDATE) old \
             WHERE s.id_hash = old.id_hash RETURNING old.flash",
            &[&&id_hash[..], &flash],
        )
        .await?;
        Ok(match r {
            Some(r) => r.try_get(0)?,
            None => None,
        })
    }

    async fn end_page_session(&self, id_hash: [u8; 32]) -> Result<(), StoreError> {
        let c = self.client().await?;
        exec(
            &c,
            "DELETE FROM page_sessions WHERE id_hash = $1",
            &[&&id_hash[..]],
        )
        .await?;
        Ok(())
    }

    async fn purge_page_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let c = self.client().await?;
        exec(
            &c,
            "DELETE FROM page_sessions WHERE expires_at <= $1",
            &[&ts(now)],
        )
        .await
    }

    fn check_database(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.ping()
    }
}

fn attempt_from_row(row: &Row) -> Result<UploadAttempt, StoreError> {
    let seq: i64 = row.try_get(0)?;
    let received_at = secs(row.try_get(1)?, "upload_attempts")?;
    let upload_id: Option<String> = row.try_get(2)?;
    let outcome = match upload_id {
        Some(id) => {
            let n = |i: usize| -> Result<u64, StoreError> {
                Ok(row.try_get::<_, Option<i64>>(i)?.unwrap_or(0) as u64)
            };
            AttemptOutcome::Applied {
                upload_id: id.parse().map_err(|e| corrupt("upload_attempts", e))?,
                counts: cpis_protocol::api::UploadCounts {
                    rows: n(6)?,
                    added: n(7)?,
                    updated: n(8)?,
                    ended: n(9)?,
                    removed: n(10)?,
                    unchanged: n(11)?,
                },
                version: n(12)?,
            }
        }
        None => {
            let errors: Option<String> = row.try_get(5)?;
            AttemptOutcome::Refused(RefusedUpload {
                message: row.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
                error_count: row.try_get::<_, i64>(4)? as u64,
                errors: match errors {
                    Some(text) => {
                        serde_json::from_str(&text).map_err(|e| corrupt("upload_attempts", e))?
                    }
                    None => Vec::new(),
                },
            })
        }
    };
    Ok(UploadAttempt {
        seq: seq as u64,
        received_at,
        outcome,
    })
}

/// The plan types each council holds, or held within the change log, for each subject, for
/// the (subject, council) pairs given; a pair that holds none is absent.
async fn held_plan_types<C: GenericClient>(
    c: &C,
    pairs: &BTreeSet<(i64, String)>,
) -> Result<HashMap<(i64, String), BTreeSet<PlanType>>, StoreError> {
    let mut held: HashMap<(i64, String), BTreeSet<PlanType>> = HashMap::new();
    if pairs.is_empty() {
        return Ok(held);
    }
    let subjects: Vec<i64> = pairs.iter().map(|(n, _)| *n).collect();
    let councils: Vec<&str> = pairs.iter().map(|(_, c)| c.as_str()).collect();
    let found = rows(
        c,
        "SELECT q.nhs_number, q.council, h.plan_type \
         FROM unnest($1::bigint[], $2::text[]) AS q(nhs_number, council), LATERAL (\
         SELECT plan_type FROM flags f WHERE f.nhs_number = q.nhs_number AND f.council = q.council \
         UNION SELECT plan_type FROM changes g WHERE g.nhs_number = q.nhs_number \
         AND g.council = q.council AND g.op IN ('upsert', 'remove')) h",
        &[&subjects, &councils],
    )
    .await?;
    for r in &found {
        held.entry((r.try_get(0)?, r.try_get(1)?))
            .or_default()
            .insert(text(r, 2, "flags")?);
    }
    Ok(held)
}

/// Audit entries of one ingest's first pass, written together in the order pushed.
#[derive(Default)]
struct AuditRows {
    actions: Vec<&'static str>,
    events: Vec<Option<String>>,
    details: Vec<Option<String>>,
}

impl AuditRows {
    fn push(&mut self, action: &'static str, event: Option<&EventId>, detail: Option<String>) {
        self.actions.push(action);
        self.events.push(event.map(ToString::to_string));
        self.details.push(detail);
    }

    async fn write<C: GenericClient>(
        &self,
        c: &C,
        at: DateTime<Utc>,
        device: &str,
    ) -> Result<(), StoreError> {
        if self.actions.is_empty() {
            return Ok(());
        }
        exec(
            c,
            "INSERT INTO audit_log (at, action, event_id, device, detail) \
             SELECT $1, action, event_id, $2, detail FROM unnest($3::text[], $4::text[], \
             $5::text[]) WITH ORDINALITY AS q(action, event_id, detail, n) ORDER BY n",
            &[&ms(at), &device, &self.actions, &self.events, &self.details],
        )
        .await?;
        Ok(())
    }
}

/// A notification decided in the first pass of [`ingest_events`], queued in the second.
struct Queued {
    event_id: EventId,
    council: CouncilCode,
    plan_types: String,
}

/// Stores a batch in the caller's transaction. See [`Store::ingest_events`].
///
/// Set-based, in two passes, so that a batch costs a dozen statements whatever its size and
/// concurrent batches overlap. The first pass takes no counter lock: it stores the events
/// (one statement; an id already stored, or repeated within the batch, counts as sent again
/// from its second occurrence on), reads the stored bodies of repeats, reads the plan types
/// held by every (subject, council) pair a flagged event names, writes the audit entries,
/// and updates recent contacts. The second takes the `notification_id` lock, then the
/// `head_version` lock (always in that order, never the other), and writes the
/// notifications, their audit entries and the contacts changes. The locks are held only for
/// that second pass and the commit. The outcomes are those of storing the events one by one
/// in batch order, as the SQLite backend does.
async fn ingest_events<C: GenericClient>(
    c: &C,
    ingest: &EventIngest,
) -> Result<Vec<IngestOutcome>, StoreError> {
    let at = ingest.received_at;
    let device = ingest.device.to_string();
    let trust_name: String = match row_opt(
        c,
        "SELECT name FROM trusts WHERE code = $1",
        &[&ingest.trust.as_str()],
    )
    .await?
    {
        Some(r) => r.try_get(0)?,
        None => ingest.trust.to_string(),
    };
    let mut audits = AuditRows::default();
    for r in &ingest.refused {
        audits.push(
            "event_refused",
            r.event_id.as_ref(),
            Some(format!("{}: {}", r.code, r.detail)),
        );
    }
    let ids: Vec<String> = ingest
        .events
        .iter()
        .map(|ie| ie.event.event_id.to_string())
        .collect();
    let mut fresh = store_events(c, ingest, &ids, &device, &trust_name).await?;
    // An id is new at its first occurrence only (`remove` returns true once).
    let new: Vec<bool> = ids.iter().map(|id| fresh.remove(id)).collect();
    let repeats: Vec<&str> = ids
        .iter()
        .zip(&new)
        .filter(|(_, new)| !**new)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut stored: HashMap<String, String> = HashMap::new();
    if !repeats.is_empty() {
        for r in rows(
            c,
            "SELECT event_id, body FROM events WHERE event_id = ANY($1)",
            &[&repeats],
        )
        .await?
        {
            stored.insert(r.try_get(0)?, r.try_get(1)?);
        }
    }
    let mut outcomes = Vec::with_capacity(ingest.events.len());
    for ((ie, id), new) in ingest.events.iter().zip(&ids).zip(new) {
        let e = &ie.event;
        let mut outcome = IngestOutcome {
            event_id: e.event_id,
            new,
            conflict: false,
            notified: Vec::new(),
            contacts_changed: false,
        };
        if new {
            audits.push(
                "event_stored",
                Some(&e.event_id),
                Some(ingest.source.as_str().to_owned()),
            );
        } else {
            let before = stored
                .get(id)
                .ok_or_else(|| corrupt("events", format!("event {id} vanished")))?;
            let repeat = ingest::repeated(before, &ie.body, ingest.source);
            outcome.conflict = repeat.conflict;
            if repeat.audit == Some("event_resent_different") {
                tracing::warn!(
                    event = %e.event_id, device = %ingest.device,
                    "event id sent again with different content; the first stored version stands"
                );
            }
            if let Some(action) = repeat.audit {
                audits.push(action, Some(&e.event_id), Some(ie.body.clone()));
            }
            if !repeat.notify {
                outcomes.push((outcome, false));
                continue;
            }
        }
        outcomes.push((outcome, true));
    }
    // Who each notifying event would tell, and what they held for its subject.
    let pairs: BTreeSet<(i64, String)> = ingest
        .events
        .iter()
        .zip(&outcomes)
        .filter(|(_, (_, notifies))| *notifies)
        .flat_map(|(ie, _)| {
            let nhs = nhs_value(ie.event.nhs_number);
            ingest::councils_to_notify(&ie.event)
                .into_iter()
                .map(move |council| (nhs, council.to_string()))
        })
        .collect();
    let held = held_plan_types(c, &pairs).await?;
    let none = BTreeSet::new();
    let mut queued: Vec<Queued> = Vec::new();
    let mut contacts: Vec<NewContact<'_>> = Vec::new();
    for (i, (ie, (outcome, notifies))) in ingest.events.iter().zip(&mut outcomes).enumerate() {
        if !*notifies {
            continue;
        }
        let e = &ie.event;
        let nhs = nhs_value(e.nhs_number);
        for council in ingest::councils_to_notify(e) {
            let held = held.get(&(nhs, council.to_string())).unwrap_or(&none);
            let Some(types) = ingest::notified_plan_types(&e.plan_types, held) else {
                tracing::warn!(
                    event = %e.event_id, %council,
                    "flagged event names a council that holds no flag for the subject; \
                     no notification"
                );
                continue;
            };
            queued.push(Queued {
                event_id: e.event_id,
                council: council.clone(),
                plan_types: plan_types_text(&types),
            });
            outcome.notified.push(council.clone());
        }
        if !outcome.notified.is_empty() {
            contacts.push(NewContact {
                at: i,
                nhs_number: nhs,
                event_id: &ids[i],
                accessed_at: ms(ingest::contact_time(e, ie.clock_suspect, at)),
                setting: setting_text(e.setting),
            });
        }
    }
    audits.write(c, at, &device).await?;
    let mut outcomes: Vec<IngestOutcome> = outcomes.into_iter().map(|(o, _)| o).collect();
    let kept = add_contacts(c, &contacts, ingest.trust.as_str(), &trust_name).await?;
    // Subjects whose recent contacts changed, in the order they changed.
    let mut changed: Vec<NhsNumber> = Vec::new();
    for place in kept {
        outcomes[place].contacts_changed = true;
        changed.push(ingest.events[place].event.nhs_number);
    }
    queue_notifications(c, &queued, at, &device).await?;
    record_contacts_changes(c, &changed, at).await?;
    Ok(outcomes)
}

/// Inserts the batch's events in one statement, skipping ids already stored; returns the
/// ids inserted.
async fn store_events<C: GenericClient>(
    c: &C,
    ingest: &EventIngest,
    ids: &[String],
    device: &str,
    trust_name: &str,
) -> Result<HashSet<String>, StoreError> {
    let mut subjects = Vec::with_capacity(ids.len());
    let mut results = Vec::with_capacity(ids.len());
    let mut accessed = Vec::with_capacity(ids.len());
    let mut bodies = Vec::with_capacity(ids.len());
    let mut suspect = Vec::with_capacity(ids.len());
    for ie in &ingest.events {
        subjects.push(nhs_value(ie.event.nhs_number));
        results.push(ie.event.result.as_str());
        accessed.push(ms(ie.event.accessed_at));
        bodies.push(ie.body.as_str());
        suspect.push(ie.clock_suspect);
    }
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let inserted = rows(
        c,
        "INSERT INTO events (event_id, device, trust, trust_name, nhs_number, result, \
         accessed_at, received_at, source, body, clock_suspect) \
         SELECT event_id, $1, $2, $3, nhs_number, result, accessed_at, $4, $5, body, \
         clock_suspect FROM unnest($6::text[], $7::bigint[], $8::text[], $9::bigint[], \
         $10::text[], $11::bool[]) WITH ORDINALITY \
         AS q(event_id, nhs_number, result, accessed_at, body, clock_suspect, n) ORDER BY n \
         ON CONFLICT DO NOTHING RETURNING event_id",
        &[
            &device,
            &ingest.trust.as_str(),
            &trust_name,
            &ms(ingest.received_at),
            &ingest.source.as_str(),
            &ids,
            &subjects,
            &results,
            &accessed,
            &bodies,
            &suspect,
        ],
    )
    .await?;
    inserted.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// A notified access to record as its subject's recent contact.
struct NewContact<'a> {
    /// The event's place in the batch.
    at: usize,
    nhs_number: i64,
    event_id: &'a str,
    accessed_at: i64,
    setting: &'static str,
}

/// Adds the contacts (each not already recorded) and keeps the newest
/// `MAX_RECENT_CONTACTS` of each subject. Returns the batch places of the events whose
/// contact was added and is still kept right after its own addition, in batch order: what
/// adding them one by one, trimming after each, would report.
async fn add_contacts<C: GenericClient>(
    c: &C,
    contacts: &[NewContact<'_>],
    trust: &str,
    trust_name: &str,
) -> Result<Vec<usize>, StoreError> {
    if contacts.is_empty() {
        return Ok(Vec::new());
    }
    let subjects: Vec<i64> = contacts
        .iter()
        .map(|n| n.nhs_number)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Each subject's kept contacts before this batch, newest first.
    let mut recent: HashMap<i64, Vec<(i64, String)>> = HashMap::new();
    for r in rows(
        c,
        "SELECT nhs_number, accessed_at, event_id FROM (SELECT nhs_number, accessed_at, \
         event_id, row_number() OVER (PARTITION BY nhs_number \
         ORDER BY accessed_at DESC, event_id DESC) AS n FROM contacts \
         WHERE nhs_number = ANY($1)) recent WHERE n <= $2",
        &[&subjects, &(MAX_RECENT_CONTACTS as i64)],
    )
    .await?
    {
        recent
            .entry(r.try_get(0)?)
            .or_default()
            .push((r.try_get(1)?, r.try_get(2)?));
    }
    let nhs_col: Vec<i64> = contacts.iter().map(|n| n.nhs_number).collect();
    let id_col: Vec<&str> = contacts.iter().map(|n| n.event_id).collect();
    let at_col: Vec<i64> = contacts.iter().map(|n| n.accessed_at).collect();
    let setting_col: Vec<&str> = contacts.iter().map(|n| n.setting).collect();
    let mut added: HashSet<(i64, String)> = rows(
        c,
        "INSERT INTO contacts (nhs_number, event_id, accessed_at, trust, trust_name, setting) \
         SELECT nhs_number, event_id, accessed_at, $1, $2, setting FROM unnest($3::bigint[], \
         $4::text[], $5::bigint[], $6::text[]) WITH ORDINALITY \
         AS q(nhs_number, event_id, accessed_at, setting, n) ORDER BY n \
         ON CONFLICT DO NOTHING RETURNING nhs_number, event_id",
        &[
            &trust,
            &trust_name,
            &nhs_col,
            &id_col,
            &at_col,
            &setting_col,
        ],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect::<Result<_, StoreError>>()?;
    if added.is_empty() {
        return Ok(Vec::new());
    }
    let mut kept = Vec::new();
    for n in contacts {
        // Added at its first occurrence only.
        if !added.remove(&(n.nhs_number, n.event_id.to_owned())) {
            continue;
        }
        let list = recent.entry(n.nhs_number).or_default();
        list.push((n.accessed_at, n.event_id.to_owned()));
        // Newest first, as `contacts_recent` orders them (event ids compare as "C" text).
        list.sort_by(|a, b| b.cmp(a));
        list.truncate(MAX_RECENT_CONTACTS);
        if list.iter().any(|(_, id)| id == n.event_id) {
            kept.push(n.at);
        }
    }
    exec(
        c,
        "DELETE FROM contacts c USING (SELECT nhs_number, event_id, row_number() OVER \
         (PARTITION BY nhs_number ORDER BY accessed_at DESC, event_id DESC) AS n \
         FROM contacts WHERE nhs_number = ANY($1)) ranked \
         WHERE c.nhs_number = ranked.nhs_number AND c.event_id = ranked.event_id \
         AND ranked.n > $2",
        &[&subjects, &(MAX_RECENT_CONTACTS as i64)],
    )
    .await?;
    Ok(kept)
}

/// Queues the notifications (one not already queued for its event and council), with ids
/// taken under the `notification_id` lock, and audits each one queued.
async fn queue_notifications<C: GenericClient>(
    c: &C,
    queued: &[Queued],
    at: DateTime<Utc>,
    device: &str,
) -> Result<(), StoreError> {
    if queued.is_empty() {
        return Ok(());
    }
    let last = lock_counter(c, "notification_id").await?;
    let ids: Vec<i64> = (1..=queued.len() as u64)
        .map(|i| (last + i) as i64)
        .collect();
    let events: Vec<String> = queued.iter().map(|q| q.event_id.to_string()).collect();
    let councils: Vec<&str> = queued.iter().map(|q| q.council.as_str()).collect();
    let types: Vec<&str> = queued.iter().map(|q| q.plan_types.as_str()).collect();
    // Ids of rows already queued (the same event sent again) are skipped: ids only need to
    // grow in commit order, not to be gap-free.
    let inserted = rows(
        c,
        "INSERT INTO notifications (id, event_id, council, plan_types, created_at) \
         SELECT id, event_id, council, plan_types, $5 FROM unnest($1::bigint[], $2::text[], \
         $3::text[], $4::text[]) AS q(id, event_id, council, plan_types) ORDER BY id \
         ON CONFLICT DO NOTHING RETURNING event_id, council",
        &[&ids, &events, &councils, &types, &ms(at)],
    )
    .await?;
    set_counter(c, "notification_id", last + queued.len() as u64).await?;
    if inserted.is_empty() {
        return Ok(());
    }
    let mut audited_events = Vec::with_capacity(inserted.len());
    let mut audited_councils = Vec::with_capacity(inserted.len());
    for r in &inserted {
        audited_events.push(r.try_get::<_, String>(0)?);
        audited_councils.push(r.try_get::<_, String>(1)?);
    }
    exec(
        c,
        "INSERT INTO audit_log (at, action, event_id, device, council) \
         SELECT $1, 'notification_queued', event_id, $2, council \
         FROM unnest($3::text[], $4::text[]) AS q(event_id, council)",
        &[&ms(at), &device, &audited_events, &audited_councils],
    )
    .await?;
    Ok(())
}

/// Records that these subjects' contacts changed: one change-log entry (the next version) per
/// council holding a flag for each, in the order given, under the `head_version` lock.
async fn record_contacts_changes<C: GenericClient>(
    c: &C,
    subjects: &[NhsNumber],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if subjects.is_empty() {
        return Ok(());
    }
    // The lock first: an upload changing who flags these subjects holds it too, so the
    // holders read next are those of every upload committed before this one's versions.
    let head = lock_counter(c, "head_version").await?;
    let values: Vec<i64> = subjects.iter().map(|n| nhs_value(*n)).collect();
    let holders = rows(
        c,
        "SELECT DISTINCT nhs_number, council FROM flags WHERE nhs_number = ANY($1) \
         ORDER BY nhs_number, council",
        &[&values],
    )
    .await?;
    let mut by_subject: HashMap<i64, Vec<String>> = HashMap::new();
    for h in &holders {
        by_subject
            .entry(h.try_get(0)?)
            .or_default()
            .push(h.try_get(1)?);
    }
    let mut nhs_col = Vec::new();
    let mut council_col = Vec::new();
    for v in &values {
        for council in by_subject.get(v).into_iter().flatten() {
            nhs_col.push(*v);
            council_col.push(council.clone());
        }
    }
    if nhs_col.is_empty() {
        return Ok(());
    }
    let versions: Vec<i64> = (1..=nhs_col.len() as u64)
        .map(|i| (head + i) as i64)
        .collect();
    exec(
        c,
        "INSERT INTO changes (version, council, nhs_number, plan_type, op, reason, recorded_at) \
         SELECT version, council, nhs_number, '', $4, 'contacts', $5 FROM unnest($1::bigint[], \
         $2::text[], $3::bigint[]) AS q(version, council, nhs_number)",
        &[&versions, &council_col, &nhs_col, &OP_CONTACTS, &ts(now)],
    )
    .await?;
    set_counter(c, "head_version", head + nhs_col.len() as u64).await?;
    Ok(())
}
