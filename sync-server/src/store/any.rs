//! Either backend behind one type, chosen at start from the data dir's configuration: the
//! server and the tools hold an [`AnyStore`] and never ask which it is.

use chrono::{DateTime, NaiveDate, Utc};
use cpis_protocol::mailbox::{Notification, NotificationId};
use cpis_protocol::{
    CouncilCode, CouncilInfo, DeviceId, DeviceReport, EventId, FlagRecord, NhsNumber,
    RecentContact, RegionId, TrustCode,
};
use uuid::Uuid;

use super::{
    AuditEntry, DeviceRecord, EnrolmentTokenInfo, EventIngest, FleetEntry, IngestOutcome,
    KeyRolloverRecord, LogRetention, MailboxStats, NationalLookup, NewDevice, NewEnrolmentToken,
    PageSession, PostgresStore, RefusedUpload, RegionChanges, RegionHead, RegionRecord,
    RegionSnapshot, SessionKind, SqliteStore, Store, StoreError, StoredEvent, TokenRefusal,
    TrustRecord, UploadAttempt, UploadOutcome,
};

/// The store of a data dir: SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Which backend, for messages (`sqlite` or `postgresql`).
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgresql",
        }
    }
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn add_trust(&self, code: TrustCode, name: String) -> Result<(), StoreError> {
        each!(self, s => s.add_trust(code, name))
    }

    async fn add_region(
        &self,
        id: RegionId,
        name: String,
        neighbours: Vec<CouncilCode>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_region(id, name, neighbours))
    }

    async fn set_region_neighbours(
        &self,
        id: RegionId,
        neighbours: Vec<CouncilCode>,
    ) -> Result<RegionRecord, StoreError> {
        each!(self, s => s.set_region_neighbours(id, neighbours))
    }

    async fn regions(&self) -> Result<Vec<RegionRecord>, StoreError> {
        each!(self, s => s.regions())
    }

    async fn add_council(&self, info: CouncilInfo) -> Result<(), StoreError> {
        each!(self, s => s.add_council(info))
    }

    async fn add_council_token(
        &self,
        council: CouncilCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_council_token(council, hash, now, expires_at))
    }

    async fn council_for_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<CouncilCode, TokenRefusal>, StoreError> {
        each!(self, s => s.council_for_token(hash, now))
    }

    async fn revoke_council_tokens(
        &self,
        council: CouncilCode,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        each!(self, s => s.revoke_council_tokens(council, now))
    }

    async fn apply_upload(
        &self,
        council: CouncilCode,
        upload_id: Uuid,
        rows: Vec<FlagRecord>,
        now: DateTime<Utc>,
    ) -> Result<UploadOutcome, StoreError> {
        each!(self, s => s.apply_upload(council, upload_id, rows, now))
    }

    async fn purge_expired(&self, today: NaiveDate, now: DateTime<Utc>) -> Result<u64, StoreError> {
        each!(self, s => s.purge_expired(today, now))
    }

    async fn prune_change_log(&self, retention: LogRetention) -> Result<u64, StoreError> {
        each!(self, s => s.prune_change_log(retention))
    }

    async fn head_version(&self) -> Result<u64, StoreError> {
        each!(self, s => s.head_version())
    }

    async fn region_head(&self, region: RegionId) -> Result<Option<RegionHead>, StoreError> {
        each!(self, s => s.region_head(region))
    }

    async fn region_snapshot(
        &self,
        region: RegionId,
    ) -> Result<Option<RegionSnapshot>, StoreError> {
        each!(self, s => s.region_snapshot(region))
    }

    async fn region_changes(
        &self,
        region: RegionId,
        from: u64,
    ) -> Result<Option<RegionChanges>, StoreError> {
        each!(self, s => s.region_changes(region, from))
    }

    async fn council_flags(&self, council: CouncilCode) -> Result<Vec<FlagRecord>, StoreError> {
        each!(self, s => s.council_flags(council))
    }

    async fn add_enrolment_token(
        &self,
        token: NewEnrolmentToken,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_enrolment_token(token, now))
    }

    async fn check_enrolment_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<(TrustCode, RegionId), TokenRefusal>, StoreError> {
        each!(self, s => s.check_enrolment_token(hash, now))
    }

    async fn enrolment_tokens(&self) -> Result<Vec<EnrolmentTokenInfo>, StoreError> {
        each!(self, s => s.enrolment_tokens())
    }

    async fn revoke_enrolment_token(
        &self,
        id: String,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.revoke_enrolment_token(id, now))
    }

    async fn enrol_device(
        &self,
        hash: [u8; 32],
        device: NewDevice,
        now: DateTime<Utc>,
    ) -> Result<Result<DeviceRecord, TokenRefusal>, StoreError> {
        each!(self, s => s.enrol_device(hash, device, now))
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        each!(self, s => s.device(id))
    }

    async fn device_and_head(
        &self,
        id: DeviceId,
    ) -> Result<Option<(DeviceRecord, Option<RegionHead>)>, StoreError> {
        each!(self, s => s.device_and_head(id))
    }

    async fn touch_device(&self, id: DeviceId, now: DateTime<Utc>) -> Result<(), StoreError> {
        each!(self, s => s.touch_device(id, now))
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        each!(self, s => s.devices())
    }

    async fn revoke_device(&self, id: DeviceId, now: DateTime<Utc>) -> Result<bool, StoreError> {
        each!(self, s => s.revoke_device(id, now))
    }

    async fn trusts(&self) -> Result<Vec<TrustRecord>, StoreError> {
        each!(self, s => s.trusts())
    }

    async fn councils(&self) -> Result<Vec<CouncilInfo>, StoreError> {
        each!(self, s => s.councils())
    }

    async fn ingest_events(&self, ingest: EventIngest) -> Result<Vec<IngestOutcome>, StoreError> {
        each!(self, s => s.ingest_events(ingest))
    }

    async fn national_lookup(&self, nhs_number: NhsNumber) -> Result<NationalLookup, StoreError> {
        each!(self, s => s.national_lookup(nhs_number))
    }

    async fn purge_orphan_contacts(&self) -> Result<u64, StoreError> {
        each!(self, s => s.purge_orphan_contacts())
    }

    async fn recent_contacts(
        &self,
        nhs_number: NhsNumber,
    ) -> Result<Vec<RecentContact>, StoreError> {
        each!(self, s => s.recent_contacts(nhs_number))
    }

    async fn list_notifications(
        &self,
        council: CouncilCode,
        after: u64,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Notification>, StoreError> {
        each!(self, s => s.list_notifications(council, after, limit, now))
    }

    async fn acknowledge_notifications(
        &self,
        council: CouncilCode,
        ids: Vec<NotificationId>,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        each!(self, s => s.acknowledge_notifications(council, ids, now))
    }

    async fn mailbox_stats(
        &self,
        overdue_before: DateTime<Utc>,
    ) -> Result<Vec<MailboxStats>, StoreError> {
        each!(self, s => s.mailbox_stats(overdue_before))
    }

    async fn stored_event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        each!(self, s => s.stored_event(id))
    }

    async fn event_ids(&self) -> Result<Vec<EventId>, StoreError> {
        each!(self, s => s.event_ids())
    }

    async fn audit_entries(&self, event_id: EventId) -> Result<Vec<AuditEntry>, StoreError> {
        each!(self, s => s.audit_entries(event_id))
    }

    async fn record_device_report(
        &self,
        id: DeviceId,
        report: DeviceReport,
        received_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.record_device_report(id, report, received_at))
    }

    async fn renew_device_certificate(
        &self,
        id: DeviceId,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.renew_device_certificate(id, expires_at))
    }

    async fn fleet(&self) -> Result<Vec<FleetEntry>, StoreError> {
        each!(self, s => s.fleet())
    }

    async fn add_key_rollover(&self, record: KeyRolloverRecord) -> Result<(), StoreError> {
        each!(self, s => s.add_key_rollover(record))
    }

    async fn key_rollovers(&self) -> Result<Vec<KeyRolloverRecord>, StoreError> {
        each!(self, s => s.key_rollovers())
    }

    async fn current_signing_key(&self) -> Result<Option<String>, StoreError> {
        each!(self, s => s.current_signing_key())
    }

    async fn record_refused_upload(
        &self,
        council: CouncilCode,
        refused: RefusedUpload,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.record_refused_upload(council, refused, now))
    }

    async fn upload_attempts(
        &self,
        council: CouncilCode,
        limit: u32,
    ) -> Result<Vec<UploadAttempt>, StoreError> {
        each!(self, s => s.upload_attempts(council, limit))
    }

    async fn add_trust_admin_token(
        &self,
        trust: TrustCode,
        hash: [u8; 32],
        now: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.add_trust_admin_token(trust, hash, now, expires_at))
    }

    async fn trust_for_admin_token(
        &self,
        hash: [u8; 32],
        now: DateTime<Utc>,
    ) -> Result<Result<TrustCode, TokenRefusal>, StoreError> {
        each!(self, s => s.trust_for_admin_token(hash, now))
    }

    async fn revoke_trust_admin_tokens(
        &self,
        trust: TrustCode,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        each!(self, s => s.revoke_trust_admin_tokens(trust, now))
    }

    async fn trust_fleet(&self, trust: TrustCode) -> Result<Vec<FleetEntry>, StoreError> {
        each!(self, s => s.trust_fleet(trust))
    }

    async fn create_page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        session: PageSession,
    ) -> Result<(), StoreError> {
        each!(self, s => s.create_page_session(id_hash, kind, session))
    }

    async fn page_session(
        &self,
        id_hash: [u8; 32],
        kind: SessionKind,
        now: DateTime<Utc>,
    ) -> Result<Option<PageSession>, StoreError> {
        each!(self, s => s.page_session(id_hash, kind, now))
    }

    async fn set_page_session_flash(
        &self,
        id_hash: [u8; 32],
        flash: Option<String>,
    ) -> Result<Option<String>, StoreError> {
        each!(self, s => s.set_page_session_flash(id_hash, flash))
    }

    async fn end_page_session(&self, id_hash: [u8; 32]) -> Result<(), StoreError> {
        each!(self, s => s.end_page_session(id_hash))
    }

    async fn purge_page_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        each!(self, s => s.purge_page_sessions(now))
    }

    async fn check_database(&self) -> Result<(), StoreError> {
        each!(self, s => s.check_database())
    }
}
