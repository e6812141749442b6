//! The storage interface of the server: one `Store` trait, one module per backend.
//!
//! Every method is async and returns a `Send` future so that a networked backend
//! (PostgreSQL) can implement the same trait. Only the backend modules touch SQL. The change
//! log is global and gap-free: every add, update, end, remove and purge takes the next
//! version in the same transaction as the flag change it records.

use std::future::Future;

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::api::{UploadCounts, UploadError};
use cpis_protocol::mailbox::{Notification, NotificationId};
use cpis_protocol::{
    AccessEvent, CouncilCode, CouncilInfo, DeviceId, DeviceReport, EventId, FlagRecord,
    KeyRollover, NhsNumber, RecentContact, RegionId, SignedMessage, SubjectContacts, TrustCode,
    VersionedChange,
};
use uuid::Uuid;

mod any;
pub(crate) mod codec;
pub mod postgres;
pub mod sqlite;

pub use any::AnyStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing being created already exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// A thing the operation refers to does not exist.
    #[error("{0} does not exist")]
    Missing(String),
    /// The database file holds a schema newer than this program understands.
    #[error("database schema version {found} is newer than this program supports ({supported})")]
    SchemaTooNew { found: u32, supported: u32 },
    /// Data in the database could not be read back into a domain type.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// The database refused or failed an operation (the backend's own message).
    #[error("database error: {0}")]
    Database(String),
    /// The database cannot be reached now (connection refused or lost, pool exhausted, the
    /// server shutting down, a deadlock broken): answered 503, worth retrying.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database settings are not usable (e.g. a malformed URL).
    #[error("{0}")]
    Config(String),
    #[error("the store's writer has stopped")]
    WriterStopped,
    #[error("store task failed: {0}")]
    Task(String),
    #[error("opening the database: {0}")]
    Io(#[from] std::io::Error),
}

/// A trust, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRecord {
    pub code: TrustCode,
    pub name: String,
}

/// A region, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionRecord {
    pub id: RegionId,
    pub name: String,
    pub epoch: u64,
    pub neighbours: Vec<CouncilCode>,
}

/// What a region carries now: its epoch, version and the directory of its scope councils
/// (its own councils plus its neighbour councils that exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionHead {
    pub region: RegionId,
    pub epoch: u64,
    /// The newest change-log version that touched the region's scope (or the scope's
    /// retention floor when the log holds none).
    pub version: u64,
    /// Deltas can be served from any version at or above this.
    pub floor: u64,
    /// Directory entries of the scope councils, ordered by code.
    pub councils: Vec<CouncilInfo>,
}

/// Everything a region's snapshot carries, read consistently with its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSnapshot {
    pub head: RegionHead,
    /// Every live flag of the scope councils.
    pub flags: Vec<FlagRecord>,
    /// Recent contacts of the subjects those flags are about (those with any), by NHS number.
    pub contacts: Vec<SubjectContacts>,
}

/// A region's changes after a version, read consistently with its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionChanges {
    pub head: RegionHead,
    /// Changes in `(from, head.version]` of the scope councils, in version order. A subject's
    /// contact changes appear once (its latest), carrying its contacts as they stand at the
    /// head.
    pub changes: Vec<VersionedChange>,
}

/// Outcome of an applied upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadOutcome {
    pub counts: UploadCounts,
    /// The global head version after the upload.
    pub version: u64,
}

/// An enrolment token as created by an administrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnrolmentToken {
    pub hash: [u8; 32],
    pub trust: TrustCode,
    pub region: RegionId,
    pub uses: u32,
    pub expires_at: DateTime<Utc>,
}

/// Why a bearer credential (enrolment token, council token, trust admin token) was not
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    /// An enrolment token with no uses left.
    UsedUp,
    Expired,
    /// Revoked by an administrator.
    Revoked,
}

/// An enrolment token as `admin enrolment-token list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentTokenInfo {
    /// [`enrolment_token_id`]: what `admin enrolment-token revoke --token-id` takes.
    pub id: String,
    pub trust: TrustCode,
    pub region: RegionId,
    pub uses_left: u32,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// An enrolment token's public id: the first 16 hex digits of its stored SHA-256 hash, so
/// it names the token without revealing it.
pub fn enrolment_token_id(hash: &[u8]) -> String {
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A device to record at enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub id: DeviceId,
    pub name: Option<String>,
    pub agent_version: String,
    pub cert_expires_at: DateTime<Utc>,
}

/// A device, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub trust: TrustCode,
    pub region: RegionId,
    pub name: Option<String>,
    pub agent_version: String,
    pub cert_expires_at: DateTime<Utc>,
    pub enrolled_at: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A device's latest report, with the server's time of receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    pub report: DeviceReport,
    /// The server's clock when the report arrived.
    pub received_at: DateTime<Utc>,
}

/// One row of the fleet view: a device and its latest report, if it sent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEntry {
    pub device: DeviceRecord,
    pub report: Option<StoredReport>,
}

/// A feed signing key rollover and its envelope, signed by the previous key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRolloverRecord {
    pub rollover: KeyRollover,
    pub signed: SignedMessage,
    /// The new private key sealed with the data dir's key-wrap key, so every replica can
    /// sign with it (`None` on rollovers recorded before replicas).
    pub sealed_next: Option<Vec<u8>>,
}

/// What the change-log pruning keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Changes recorded before this time may be pruned.
    pub keep_since: DateTime<Utc>,
    /// At most this many of the newest versions are kept.
    pub max_versions: u64,
}

/// How an event reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// `POST /v1/device/events` (the tablet's outbox).
    Upload,
    /// `POST /v1/device/confirm` (an online check; the event carries the server's answer).
    Confirm,
    /// `POST /v1/device/events` from a device already revoked: the outbox it sends before
    /// it wipes itself, so no notice is lost to the revocation (recorded as such).
    AfterRevocation,
}

impl EventSource {
    /// The name stored with the event.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Upload => "upload",
            EventSource::Confirm => "confirm",
            EventSource::AfterRevocation => "after_revocation",
        }
    }
}

/// A validated event to store, with its exact stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestEvent {
    pub event: AccessEvent,
    /// The event as JSON: stored verbatim, and compared when an id is sent again.
    pub body: String,
    /// The tablet's clock was wrong ([`crate::ingest::clock_suspect`]): the receipt time
    /// stands in for `accessed_at` in recent contacts.
    pub clock_suspect: bool,
}

impl IngestEvent {
    /// Prepares an event received at `received_at` (the server's clock) for storage.
    pub fn new(event: AccessEvent, received_at: DateTime<Utc>) -> Result<Self, StoreError> {
        let body = serde_json::to_string(&event).map_err(|e| StoreError::Task(e.to_string()))?;
        let clock_suspect = crate::ingest::clock_suspect(&event, received_at);
        Ok(Self {
            event,
            body,
            clock_suspect,
        })
    }
}

/// An event refused before storage: kept in the audit log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEvent {
    pub event_id: Option<EventId>,
    pub code: String,
    /// What was sent (truncated), for the audit log.
    pub detail: String,
}

/// One device's events to store in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventIngest {
    /// The authenticated caller; every event is its own (checked before).
    pub device: DeviceId,
    pub trust: TrustCode,
    pub source: EventSource,
    /// The server's clock.
    pub received_at: DateTime<Utc>,
    pub events: Vec<IngestEvent>,
    pub refused: Vec<RefusedEvent>,
}

/// What storing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    pub event_id: EventId,
    /// False when the id was already stored (the first write stands).
    pub new: bool,
    /// The id was already stored with different content.
    pub conflict: bool,
    /// Councils whose mailbox got a notification for it (new events only).
    pub notified: Vec<CouncilCode>,
    /// The subject's recent contacts changed.
    pub contacts_changed: bool,
}

/// A stored event (tests and tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event: AccessEvent,
    pub received_at: DateTime<Utc>,
    pub source: String,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// `event_stored`, `event_resent_different`, `event_confirmed` (an online check of an
    /// event already stored), `event_refused`, `notification_queued`,
    /// `notification_acknowledged`.
    pub action: String,
    pub event_id: Option<EventId>,
    pub device: Option<DeviceId>,
    pub council: Option<CouncilCode>,
    pub detail: Option<String>,
}

/// A council's mailbox in numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxStats {
    pub council: CouncilCode,
    pub name: String,
    /// Unacknowledged notifications.
    pub pending: u64,
    /// Unacknowledged notifications queued before the overdue cut-off.
    pub overdue: u64,
    /// When the oldest unacknowledged notification was queued.
    pub oldest_pending: Option<DateTime<Utc>>,
}

/// A subject as the national set holds it, for online confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NationalLookup {
    /// Every council's flags for the subject, with the council's directory entry.
    pub flags: Vec<(FlagRecord, CouncilInfo)>,
    /// Councils in the directory.
    pub councils_covered: u64,
    /// The subject's recent contacts, newest first.
    pub contacts: Vec<RecentContact>,
}

/// Upload attempts kept per council for the uploads page (applied ones also stay in the
/// upload receipts, which are not pruned).
pub const MAX_UPLOAD_ATTEMPTS: usize = 100;
/// Errors kept of one refused upload (its error count is kept in full).
pub const MAX_KEPT_UPLOAD_ERRORS: usize = 100;

/// An upload the server refused, as the council's uploads page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedUpload {
    /// The refusal in words, as answered to the council.
    pub message: String,
    /// How many errors the upload had.
    pub error_count: u64,
    /// The first [`MAX_KEPT_UPLOAD_ERRORS`] row/field errors (none for a refusal of the whole
    /// body, e.g. too large).
    pub errors: Vec<UploadError>,
}

/// What became of an upload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Applied: the receipt the council got.
    Applied {
        upload_id: Uuid,
        counts: UploadCounts,
        version: u64,
    },
    /// Refused: nothing was applied.
    Refused(RefusedUpload),
}

/// One of a council's upload attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadAttempt {
    /// Increases with every attempt recorded (any council).
    pub seq: u64,
    /// The server's clock.
    pub received_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
}

/// Which pages a session signs in to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// The council inbox pages (`who`: the council code).
    Council,
    /// The trust fleet pages (`who`: the trust code).
    Fleet,
}

impl SessionKind {
    /// The name stored with the session.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Council => "council",
            SessionKind::Fleet => "fleet",
        }
    }
}

/// A page session as stored, under the SHA-256 of its cookie value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSession {
    /// Who signed in (a council or trust code).
    pub who: String,
    /// Every POST of the session carries it.
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
    /// A message for the session's next page, shown once.
    pub flash: Option<String>,
}

/// The server's storage: [`SqliteStore`] (one server, a file in the data dir) or
/// [`PostgresStore`] (any number of replicas on one database); [`AnyStore`] is either.
pub trait Store: Send + Sync + 'static {
    /// Adds a trust. `Conflict` if the code exists.
    fn add_trust(
        &self,
        code: TrustCode,
        name: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds a region with its neighbour councils (which need not exist yet).
    fn add_region(
        &self,
        id: RegionId,
        name: String,
        neighbours: Vec<CouncilCode>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces a region's neighbour councils; bumps its epoch when its scope changes.
    fn set_region_neighbours(
        &self,
        id: RegionId,
        neighbours: Vec<CouncilCode>,
    ) -> impl Future<Output = Result<RegionRecord, StoreError>> + Send;

    /// Lists regions.
    fn regions(&self) -> impl Future<Output = Result<Vec<RegionRecord>, StoreError>> + Send;

    /// Adds a council to its region's directory; bumps the epoch of every region whose
    /// scope now includes it.
    fn add_council(&self, info: CouncilInfo)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a council bearer token (by its SHA-256 hash), valid until `expires_at` (or
    /// until revoked). `Missing` for an unknown council.
    fn add_council_token(
        &self,
        council: CouncilCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The council a token hash belongs to at `now`, or why it is refused.
    fn council_for_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<CouncilCode, TokenRefusal>, StoreError>> + Send;

    /// Revokes every token of a council; returns how many were live. `Missing` for an
    /// unknown council.
    fn revoke_council_tokens(
        &self,
        council: CouncilCode,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Validates the whole upload elsewhere; this reconciles it against the council's
    /// current flags and applies the changes, all in one transaction.
    fn apply_upload(
        &self,
        council: CouncilCode,
        upload_id: Uuid,
        rows: Vec<FlagRecord>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<UploadOutcome, StoreError>> + Send;

    /// Removes (as changes) every flag whose retention ended before `today`; returns how
    /// many were purged.
    fn purge_expired(
        &self,
        today: NaiveDate,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Drops change-log entries outside the retention; returns how many were dropped.
    fn prune_change_log(
        &self,
        retention: LogRetention,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The global head version of the change log.
    fn head_version(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A region's current epoch, version and directory; `None` for an unknown region.
    fn region_head(
        &self,
        region: RegionId,
    ) -> impl Future<Output = Result<Option<RegionHead>, StoreError>> + Send;

    /// Every live flag of the region's scope and its subjects' recent contacts, read
    /// consistently with its head.
    fn region_snapshot(
        &self,
        region: RegionId,
    ) -> impl Future<Output = Result<Option<RegionSnapshot>, StoreError>> + Send;

    /// The region's changes after `from`, read consistently with its head.
    fn region_changes(
        &self,
        region: RegionId,
        from: u64,
    ) -> impl Future<Output = Result<Option<RegionChanges>, StoreError>> + Send;

    /// One council's current flags (tests and tools).
    fn council_flags(
        &self,
        council: CouncilCode,
    ) -> impl Future<Output = Result<Vec<FlagRecord>, StoreError>> + Send;

    /// Records a new enrolment token.
    fn add_enrolment_token(
        &self,
        token: NewEnrolmentToken,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Checks a token without using it (for an early, precise refusal).
    fn check_enrolment_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError>> + Send;

    /// Every enrolment token, newest first.
    fn enrolment_tokens(
        &self,
    ) -> impl Future<Output = Result<Vec<EnrolmentTokenInfo>, StoreError>> + Send;

    /// Revokes the enrolment token with this [`enrolment_token_id`]; `false` when it was
    /// already revoked, `Missing` when there is none.
    fn revoke_enrolment_token(
        &self,
        id: String,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Atomically uses one use of the token and records the device.
    fn enrol_device(
        &self,
        hash: [u8; 32],
        device: NewDevice,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<DeviceRecord, TokenRefusal>, StoreError>> + Send;

    /// A device by id.
    fn device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<DeviceRecord>, StoreError>> + Send;

    /// A device by id and the head of its region, read together: what a checkpoint poll
    /// needs, in one read.
    fn device_and_head(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<(DeviceRecord, Option<RegionHead>)>, StoreError>> + Send;

    /// Records that a device was seen.
    fn touch_device(
        &self,
        id: DeviceId,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every device, newest enrolment first.
    fn devices(&self) -> impl Future<Output = Result<Vec<DeviceRecord>, StoreError>> + Send;

    /// Revokes a device; `false` when it was already revoked.
    fn revoke_device(
        &self,
        id: DeviceId,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Lists trusts.
    fn trusts(&self) -> impl Future<Output = Result<Vec<TrustRecord>, StoreError>> + Send;

    /// Lists councils.
    fn councils(&self) -> impl Future<Output = Result<Vec<CouncilInfo>, StoreError>> + Send;

    /// Stores a device's events durably, de-duplicated by event id (a re-sent id changes
    /// nothing), each in the audit log; queues one notification per owning council for each
    /// new flagged event and updates the subject's recent contacts. A contacts change is
    /// recorded in the change log (op `contacts`, one entry per council holding a flag for
    /// the subject), so regions holding the subject carry it in deltas. Answers after commit.
    fn ingest_events(
        &self,
        ingest: EventIngest,
    ) -> impl Future<Output = Result<Vec<IngestOutcome>, StoreError>> + Send;

    /// Every council's flags for a subject, the directory size and the subject's contacts.
    fn national_lookup(
        &self,
        nhs_number: NhsNumber,
    ) -> impl Future<Output = Result<NationalLookup, StoreError>> + Send;

    /// Deletes the recent contacts of subjects no council flags any more; returns how many.
    fn purge_orphan_contacts(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A subject's recent contacts, newest first (at most 25).
    fn recent_contacts(
        &self,
        nhs_number: NhsNumber,
    ) -> impl Future<Output = Result<Vec<RecentContact>, StoreError>> + Send;

    /// Up to `limit` of the council's unacknowledged notifications queued after `after`, in
    /// queue order; `overdue` is judged at `now`.
    fn list_notifications(
        &self,
        council: CouncilCode,
        after: u64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Notification>, StoreError>> + Send;

    /// Acknowledges those of `ids` that are in the council's mailbox; returns how many left it.
    fn acknowledge_notifications(
        &self,
        council: CouncilCode,
        ids: Vec<NotificationId>,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every council's mailbox: pending, and overdue (queued before `overdue_before`).
    fn mailbox_stats(
        &self,
        overdue_before: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<MailboxStats>, StoreError>> + Send;

    /// A stored event (tests and tools).
    fn stored_event(
        &self,
        id: EventId,
    ) -> impl Future<Output = Result<Option<StoredEvent>, StoreError>> + Send;

    /// Every stored event id, in id order (tests and tools).
    fn event_ids(&self) -> impl Future<Output = Result<Vec<EventId>, StoreError>> + Send;

    /// The audit log entries of one event, oldest first (tests and tools).
    fn audit_entries(
        &self,
        event_id: EventId,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send;

    /// Records a device's report (replacing its previous one) with the server's receipt
    /// time; the device's agent version becomes the reported one.
    fn record_device_report(
        &self,
        id: DeviceId,
        report: DeviceReport,
        received_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a renewed client certificate's expiry; `Missing` for an unknown or revoked
    /// device.
    fn renew_device_certificate(
        &self,
        id: DeviceId,
        expires_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every device with its latest report, newest enrolment first.
    fn fleet(&self) -> impl Future<Output = Result<Vec<FleetEntry>, StoreError>> + Send;

    /// Appends a key rollover to the chain (already signed by `rollover.previous`). From
    /// then on `rollover.next` is the current feed signing key. `Conflict` if that key was
    /// already rolled to.
    fn add_key_rollover(
        &self,
        record: KeyRolloverRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every key rollover, oldest first.
    fn key_rollovers(
        &self,
    ) -> impl Future<Output = Result<Vec<KeyRolloverRecord>, StoreError>> + Send;

    /// The current feed signing key as the chain names it (hex public key of the newest
    /// rollover's `next`); `None` when there has been no rollover (the key made by `init`).
    fn current_signing_key(
        &self,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Records an upload the server refused (nothing applied), keeping the council's newest
    /// [`MAX_UPLOAD_ATTEMPTS`] attempts. Applied uploads are recorded by `apply_upload`.
    fn record_refused_upload(
        &self,
        council: CouncilCode,
        refused: RefusedUpload,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The council's newest upload attempts (applied and refused), newest first.
    fn upload_attempts(
        &self,
        council: CouncilCode,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<UploadAttempt>, StoreError>> + Send;

    /// Records a trust admin token (by its SHA-256 hash), valid until `expires_at` (or until
    /// revoked). `Missing` for an unknown trust.
    fn add_trust_admin_token(
        &self,
        trust: TrustCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The trust an admin token hash belongs to at `now`, or why it is refused.
    fn trust_for_admin_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Result<TrustCode, TokenRefusal>, StoreError>> + Send;

    /// Revokes every admin token of a trust; returns how many were live. `Missing` for an
    /// unknown trust.
    fn revoke_trust_admin_tokens(
        &self,
        trust: TrustCode,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// One trust's devices with their latest reports, newest enrolment first.
    fn trust_fleet(
        &self,
        trust: TrustCode,
    ) -> impl Future<Output = Result<Vec<FleetEntry>, StoreError>> + Send;

    /// Starts a page session (`id_hash`: the SHA-256 of its cookie value).
    fn create_page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        session: PageSession,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The live session of this kind with this id hash (`None` once expired or ended).
    fn page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<PageSession>, StoreError>> + Send;

    /// Sets (or, with `None`, takes) the message for the session's next page; returns the
    /// message it replaces.
    fn set_page_session_flash(
        &self,
        id_hash: [u8; 32],
        flash: Option<String>,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Ends a session (on every replica: the row is gone).
    fn end_page_session(
        &self,
        id_hash: [u8; 32],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes expired sessions; returns how many.
    fn purge_page_sessions(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Answers when the database answers (`/healthz`).
    fn check_database(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
