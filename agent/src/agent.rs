//! The agent's state directory and its operations: open, verify and apply feed messages.
//! Lookups and status live in [`crate::lookup`].
//!
//! Layout of a state directory:
//! * `keys/master.tpm2` — the device master key sealed by the TPM 2.0 (see [`crate::tpm2`]),
//!   or `keys/master.key` (0600) where there is none; behind [`Keystore`];
//! * `keys/device.key.sealed` — the mTLS private key, sealed under the master key (never a
//!   plain file); `keys/device.cert.pem`, `keys/ca.pem` — the certificate and the only CA
//!   trusted for the server; during a certificate renewal also `keys/device.key.next.sealed`,
//!   `keys/device.cert.next.pem` and the commit marker `keys/renew.commit` (see
//!   [`Agent::install_identity`]);
//! * `enrolment.sealed` — device id, trust, region, server URL, pinned signing key, policy;
//! * `flags.db`, `outbox.db` — see [`crate::store`];
//! * `downloads/snapshot.sealed` — an unfinished snapshot download, sealed chunk by chunk;
//!   see [`crate::download`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use cpis_protocol::{
    Change, Checkpoint, DeltaBody, DeltaMeta, DeviceId, FlagRecord, KeyProtection, NhsNumber,
    NhsNumberError, Policy, Position, PublicKey, RecentContact, RegionId, SignedMessage,
    SnapshotBody, SnapshotMeta, TrustCode, VerifyError,
};

use crate::clock::Clock;
use crate::keystore::{KeyError, Keys, Keystore, shred_file, write_private};
use crate::store::{ContactsRow, DataState, FlagDb, Outbox, StoreError};

/// What went wrong in an agent operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("not enrolled: {0}")]
    NotEnrolled(String),
    #[error("already enrolled: {0}")]
    AlreadyEnrolled(String),
    /// Revoked, flags shredded, but access notices still wait in the outbox: the device
    /// wipes itself once they are delivered (every sync tries again).
    #[error(
        "not enrolled: this device was revoked ({reason}); its flags are shredded, and \
         {pending} access notice(s) wait to be sent to the server before it wipes itself{}",
        cause.as_deref().map(|c| format!(" (not sent yet: {c})")).unwrap_or_default()
    )]
    RevokedPending {
        reason: String,
        pending: u64,
        /// Why the last attempt to send them failed.
        cause: Option<String>,
    },
    #[error(transparent)]
    InvalidNhsNumber(#[from] NhsNumberError),
    // Not `#[from]`: that would also make the `VerifyError` the source, and error chains
    // (`{:#}`) would print its message twice.
    #[error("rejected: {0}")]
    Verify(VerifyError),
    /// A checkpoint refused as expired while the tablet clock is well ahead of the server's
    /// time (the likely cause).
    #[error(
        "rejected: {error}: the tablet clock looks {ahead} ahead of the server's time; \
         check the tablet's date and time"
    )]
    ClockAhead { error: VerifyError, ahead: String },
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Key(KeyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

impl From<VerifyError> for AgentError {
    fn from(e: VerifyError) -> Self {
        AgentError::Verify(e)
    }
}

impl From<KeyError> for AgentError {
    fn from(e: KeyError) -> Self {
        match e {
            // A key that does not unseal here opens nothing, for good: as if never enrolled.
            KeyError::Missing | KeyError::NotThisTpm { .. } => {
                AgentError::NotEnrolled(e.to_string())
            }
            e => AgentError::Key(e),
        }
    }
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Key(k) => k.into(),
            e => AgentError::Store(e),
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What enrolment established; sealed in `enrolment.sealed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub device_id: DeviceId,
    pub trust: TrustCode,
    pub region: RegionId,
    /// Base URL of the sync server, e.g. `https://sync.example:8443`.
    pub server: String,
    /// The pinned key that must sign every checkpoint, snapshot and delta.
    pub signing_key: PublicKey,
    pub policy: Policy,
    pub client_cert_expires_at: DateTime<Utc>,
    pub name: Option<String>,
}

/// The device's TLS identity and trust anchor, PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial(..)")
    }
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }
    pub fn enrolment(&self) -> PathBuf {
        self.root.join("enrolment.sealed")
    }
    pub fn flags_db(&self) -> PathBuf {
        self.root.join("flags.db")
    }
    pub fn outbox_db(&self) -> PathBuf {
        self.root.join("outbox.db")
    }
    /// The mTLS private key, sealed under the master key.
    pub fn device_key(&self) -> PathBuf {
        self.keys_dir().join("device.key.sealed")
    }
    /// Where agents before sealed TLS keys kept the private key in plain PEM; moved into
    /// [`StateDir::device_key`] (and shredded) when the state directory is opened.
    pub fn legacy_device_key(&self) -> PathBuf {
        self.keys_dir().join("device.key.pem")
    }
    pub fn device_cert(&self) -> PathBuf {
        self.keys_dir().join("device.cert.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.keys_dir().join("ca.pem")
    }
    /// Partial snapshot downloads, sealed chunk by chunk ([`crate::download`]).
    pub fn downloads(&self) -> PathBuf {
        self.root.join("downloads")
    }
    /// A renewed private key, before it is committed.
    pub fn next_device_key(&self) -> PathBuf {
        self.keys_dir().join("device.key.next.sealed")
    }
    /// A renewed certificate, before it is committed.
    pub fn next_device_cert(&self) -> PathBuf {
        self.keys_dir().join("device.cert.next.pem")
    }
    /// Present while a renewed identity is being moved into place.
    pub fn renew_commit(&self) -> PathBuf {
        self.keys_dir().join("renew.commit")
    }
    /// Present once the server said the device is revoked (the flags are gone; the outbox
    /// waits to be delivered before the wipe). Holds the server's reason.
    pub fn revoked(&self) -> PathBuf {
        self.root.join("revoked")
    }
    /// The keystore holding this directory's master key (TPM 2.0 or file).
    pub fn keystore(&self) -> Result<Box<dyn Keystore>, KeyError> {
        crate::keystore::existing(&self.root)
    }
}

/// A checkpoint whose signature and position checks passed. Only
/// [`Agent::accept_checkpoint`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedCheckpoint(Checkpoint);

impl VerifiedCheckpoint {
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.0
    }
}

/// An open state directory.
#[derive(Debug)]
pub struct Agent {
    pub(crate) dir: StateDir,
    pub(crate) keys: Keys,
    /// How the master key is protected (reported in the status and to the fleet view).
    key_protection: KeyProtection,
    /// The enrolment; the pinned signing key and certificate expiry change over its life.
    enrolment: Mutex<Enrolment>,
    /// Set when the device has crypto-shredded itself: nothing is answered from then on.
    shredded: AtomicBool,
    /// The server's reason, once it said the device is revoked: no lookup is answered, and
    /// syncs only deliver the outbox, then wipe.
    revoked: Mutex<Option<String>>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) flags: Mutex<FlagDb>,
    pub(crate) outbox: Mutex<Outbox>,
    /// The sealed state, cached with the `data_version` it was read at.
    cache: Mutex<Option<(i64, Arc<DataState>)>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const ENROLMENT_AAD: &[u8] = b"meta\0enrolment";
const DEVICE_KEY_AAD: &[u8] = b"meta\0device-key";

impl Agent {
    /// Writes a new state directory after a successful enrolment.
    pub fn create(
        dir: &Path,
        enrolment: &Enrolment,
        tls: &TlsMaterial,
        keystore: KeyProtection,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AgentError> {
        let sd = StateDir::new(dir);
        if sd.enrolment().exists() {
            return Err(AgentError::AlreadyEnrolled(format!(
                "{} already holds an enrolled device; run `cpis-agent wipe` first",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let keys = crate::keystore::new(dir, keystore)?.create()?.derive();
        write_sealed_key(&keys, &sd.device_key(), &tls.key_pem)?;
        write_private(&sd.device_cert(), tls.cert_pem.as_bytes())
            .map_err(io_err(&sd.device_cert()))?;
        write_private(&sd.ca(), tls.ca_pem.as_bytes()).map_err(io_err(&sd.ca()))?;
        {
            let flags = FlagDb::open(&sd.flags_db())?;
            flags.write_state(
                &keys,
                &DataState::empty(enrolment.region.clone(), enrolment.policy),
            )?;
            Outbox::open(&sd.outbox_db())?;
        }
        let plain = serde_json::to_vec(enrolment)
            .map_err(|e| AgentError::Store(StoreError::Corrupt(e.to_string())))?;
        let sealed = keys.meta.seal(&plain, ENROLMENT_AAD)?;
        // Written last: its presence means the enrolment is complete.
        write_private(&sd.enrolment(), &sealed).map_err(io_err(&sd.enrolment()))?;
        Self::open(dir, clock)
    }

    /// Opens an enrolled state directory.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, AgentError> {
        let sd = StateDir::new(dir);
        let sealed = match std::fs::read(sd.enrolment()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AgentError::NotEnrolled(format!(
                    "{} holds no enrolled device (enrol with `cpis-agent enrol`)",
                    dir.display()
                )));
            }
            Err(e) => return Err(io_err(&sd.enrolment())(e)),
        };
        let keystore = sd.keystore()?;
        let keys = keystore.load()?.derive();
        seal_legacy_device_keys(&sd, &keys)?;
        recover_identity(&sd)?;
        let plain = keys.meta.open(&sealed, ENROLMENT_AAD)?;
        let enrolment: Enrolment = serde_json::from_slice(&plain)
            .map_err(|e| AgentError::Store(StoreError::Corrupt(e.to_string())))?;
        let flags = FlagDb::open(&sd.flags_db())?;
        let outbox = Outbox::open(&sd.outbox_db())?;
        let revoked = match std::fs::read_to_string(sd.revoked()) {
            Ok(reason) => Some(reason),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&sd.revoked())(e)),
        };
        Ok(Self {
            dir: sd,
            keys,
            key_protection: keystore.protection(),
            enrolment: Mutex::new(enrolment),
            shredded: AtomicBool::new(false),
            revoked: Mutex::new(revoked),
            clock,
            flags: Mutex::new(flags),
            outbox: Mutex::new(outbox),
            cache: Mutex::new(None),
        })
    }

    /// The enrolment as it stands (pinned key and certificate expiry may have moved on).
    pub fn enrolment(&self) -> Enrolment {
        lock(&self.enrolment).clone()
    }

    /// How the device master key is protected.
    pub fn key_protection(&self) -> KeyProtection {
        self.key_protection
    }

    /// The mTLS private key (PEM), opened from its sealed file.
    pub fn device_key_pem(&self) -> Result<String, AgentError> {
        self.check_not_shredded()?;
        read_sealed_key(&self.keys, &self.dir.device_key())
    }

    /// The key that must sign every checkpoint, snapshot and delta.
    pub fn pinned_key(&self) -> PublicKey {
        lock(&self.enrolment).signing_key
    }

    /// Refuses lookups and status once the device has shredded itself, or was revoked and
    /// waits only to deliver its outbox.
    pub fn check_live(&self) -> Result<(), AgentError> {
        self.check_not_shredded()?;
        if let Some(reason) = self.revoked_reason() {
            return Err(AgentError::RevokedPending {
                reason,
                pending: self.outbox_counts()?.0,
                cause: None,
            });
        }
        Ok(())
    }

    /// Refuses everything once the device has shredded itself (a revoked device that still
    /// holds undelivered notices may sync: it only sends them).
    pub fn check_not_shredded(&self) -> Result<(), AgentError> {
        if self.shredded.load(Ordering::SeqCst) {
            return Err(AgentError::NotEnrolled(
                "this device's data has been shredded (revoked or wiped); enrol it again".into(),
            ));
        }
        Ok(())
    }

    /// The server's reason, once it said this device is revoked.
    pub fn revoked_reason(&self) -> Option<String> {
        lock(&self.revoked).clone()
    }

    /// The server said this device is revoked: records it durably (a restart stays
    /// revoked), shreds the flags and any partial download at once, and keeps only what
    /// delivering the outbox needs (keys, certificate, outbox). See
    /// [`crate::lifecycle::retire`].
    pub fn mark_revoked(&self, reason: &str) -> Result<(), AgentError> {
        if lock(&self.revoked).is_none() {
            let p = self.dir.revoked();
            write_private(&p, reason.as_bytes()).map_err(io_err(&p))?;
            *lock(&self.revoked) = Some(reason.to_owned());
        }
        // Once is enough: every later sync of a revoked device comes back here.
        if self.state()?.data.is_some() {
            self.drop_flags()?;
        }
        let dl = self.dir.downloads();
        if dl.exists() {
            std::fs::remove_dir_all(&dl).map_err(io_err(&dl))?;
        }
        Ok(())
    }

    /// Deletes every flag and the data position (the outbox is untouched).
    pub(crate) fn drop_flags(&self) -> Result<(), AgentError> {
        let mut db = lock(&self.flags);
        self.drop_flags_in(&mut db)
    }

    /// [`Self::drop_flags`] with the flag database already locked.
    pub(crate) fn drop_flags_in(&self, db: &mut FlagDb) -> Result<(), AgentError> {
        let st = self.state_in(db)?;
        let mut new = (*st).clone();
        new.data = None;
        new.data_as_of = None;
        new.councils.clear();
        // A new generation: a copy of the store from before the shred is then older.
        new.generation += 1;
        db.clear_flags(&self.keys, &mut new)?;
        self.raise_store_mark(&new);
        self.remember(db, new)
    }

    /// Whether this device has crypto-shredded itself.
    pub fn is_shredded(&self) -> bool {
        self.shredded.load(Ordering::SeqCst)
    }

    /// Crypto-shreds this device (revocation): from now on every operation answers
    /// "not enrolled", then the key and the files are destroyed.
    pub fn shred(&self) -> Result<(), AgentError> {
        self.shredded.store(true, Ordering::SeqCst);
        *lock(&self.cache) = None;
        Agent::wipe(&self.dir.root)
    }

    fn persist_enrolment(&self, e: &Enrolment) -> Result<(), AgentError> {
        let plain = serde_json::to_vec(e)
            .map_err(|e| AgentError::Store(StoreError::Corrupt(e.to_string())))?;
        let sealed = self.keys.meta.seal(&plain, ENROLMENT_AAD)?;
        // Written to a temporary file, fsync'd and renamed into place.
        write_private(&self.dir.enrolment(), &sealed).map_err(io_err(&self.dir.enrolment()))
    }

    /// Pins a new feed signing key (after following a verified rollover chain), durably.
    pub fn pin_signing_key(&self, key: PublicKey) -> Result<(), AgentError> {
        self.check_live()?;
        let mut e = lock(&self.enrolment);
        let mut next = e.clone();
        next.signing_key = key;
        self.persist_enrolment(&next)?;
        *e = next;
        Ok(())
    }

    /// Follows a key-rollover chain from the pinned key; pins the newest key it vouches for.
    /// Returns the new key when it changed. A chain that does not verify changes nothing.
    pub fn follow_rollover(
        &self,
        chain: &cpis_protocol::lifecycle::KeyChain,
    ) -> Result<Option<PublicKey>, AgentError> {
        let pinned = self.pinned_key();
        let next = chain.follow(&pinned)?;
        if next == pinned {
            return Ok(None);
        }
        self.pin_signing_key(next)?;
        Ok(Some(next))
    }

    /// Replaces the device's key and certificate after a renewal: both new files are written
    /// and fsync'd beside the old ones, a commit marker is written, then both are renamed into
    /// place and the marker removed. A crash before the marker keeps the old identity; after
    /// it, [`Agent::open`] finishes the move. The new expiry is then recorded.
    pub fn install_identity(
        &self,
        key_pem: &str,
        cert_pem: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), AgentError> {
        self.check_live()?;
        let sd = &self.dir;
        write_sealed_key(&self.keys, &sd.next_device_key(), key_pem)?;
        write_private(&sd.next_device_cert(), cert_pem.as_bytes())
            .map_err(io_err(&sd.next_device_cert()))?;
        write_private(&sd.renew_commit(), b"commit\n").map_err(io_err(&sd.renew_commit()))?;
        recover_identity(sd)?;
        let mut e = lock(&self.enrolment);
        let mut next = e.clone();
        next.client_cert_expires_at = expires_at;
        self.persist_enrolment(&next)?;
        *e = next;
        Ok(())
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.dir
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The sealed state, from the cache unless another process committed since. When it is
    /// read afresh (the first time, and whenever another process changed the file) the rows
    /// are checked against its integrity record; a mismatch marks the store damaged
    /// (durably): see [`Self::mark_damaged`].
    pub(crate) fn state_in(&self, db: &FlagDb) -> Result<Arc<DataState>, AgentError> {
        self.check_not_shredded()?;
        let dv = db.data_version()?;
        {
            let cache = lock(&self.cache);
            if let Some((v, st)) = cache.as_ref()
                && *v == dv
            {
                return Ok(st.clone());
            }
        }
        let mut st = db.read_state(&self.keys)?.unwrap_or_else(|| {
            let e = lock(&self.enrolment);
            DataState::empty(e.region.clone(), e.policy)
        });
        if let Some((_, version)) = st.data
            && st.damaged.is_none()
        {
            let found = db.verify_rows(&self.keys, st.generation)?;
            let mark = lock(&self.outbox).store_mark(&self.keys)?;
            let why = match st.rows {
                _ if mark.is_some_and(|m| (st.generation, version) < m) => Some(
                    "the flag store is older than this tablet's last install (put back from a copy)"
                        .to_owned(),
                ),
                None => Some("the store was written without an integrity record".to_owned()),
                Some(rec) if rec.count != found.count => Some(format!(
                    "{} sealed rows where the integrity record says {}",
                    found.count, rec.count
                )),
                Some(rec) if rec != found => {
                    Some("a sealed row was replaced (by an older copy or another row)".to_owned())
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                tracing::error!(
                    "flag store damaged: {why}; misses answer unknown until a full snapshot"
                );
                st.damaged = Some(why);
                db.write_state(&self.keys, &st)?;
            }
        }
        let st = Arc::new(st);
        *lock(&self.cache) = Some((db.data_version()?, st.clone()));
        Ok(st)
    }

    /// Records in the outbox file how far the flag store has come (after its commit). A
    /// failure is logged, not returned: the flag store is already committed.
    fn raise_store_mark(&self, st: &DataState) {
        let mark = (st.generation, st.data.map_or(0, |d| d.1));
        if let Err(e) = lock(&self.outbox).raise_store_mark(&self.keys, mark) {
            tracing::warn!("recording the flag store's mark in the outbox failed: {e}");
        }
    }

    /// A sealed row that does not open (a copy from another snapshot generation or version)
    /// was found by a read: the store is damaged, durably.
    pub(crate) fn mark_damaged(
        &self,
        db: &FlagDb,
        why: String,
    ) -> Result<Arc<DataState>, AgentError> {
        let mut st = (*self.state_in(db)?).clone();
        if st.damaged.is_none() {
            tracing::error!(
                "flag store damaged: {why}; misses answer unknown until a full snapshot"
            );
            st.damaged = Some(why);
            db.write_state(&self.keys, &st)?;
        }
        let st = Arc::new(st);
        *lock(&self.cache) = Some((db.data_version()?, st.clone()));
        Ok(st)
    }

    pub(crate) fn remember(&self, db: &FlagDb, st: DataState) -> Result<(), AgentError> {
        let dv = db.data_version()?;
        *lock(&self.cache) = Some((dv, Arc::new(st)));
        Ok(())
    }

    /// The current sealed state.
    pub fn state(&self) -> Result<Arc<DataState>, AgentError> {
        let db = lock(&self.flags);
        self.state_in(&db)
    }

    /// What the tablet holds, for the protocol's checks.
    pub fn position(&self) -> Result<Position, AgentError> {
        Ok(position_of(&*self.state()?))
    }

    fn mark_verified(&self, st: &mut DataState, as_of: DateTime<Utc>) -> Result<(), AgentError> {
        st.data_as_of = Some(st.data_as_of.map_or(as_of, |old| old.max(as_of)));
        let now = self.clock.now();
        st.verified_local = Some(now);
        st.verified_boot = self.clock.boot();
        // A fresh verification starts a fresh clock high-water mark, at the best estimate of
        // the true time (here the wall clock, the reference of this verification).
        let estimate = crate::freshness::true_now(
            st.verified_local,
            st.verified_boot.as_ref(),
            now,
            st.verified_boot.as_ref(),
        );
        lock(&self.outbox).set_high_water(&self.keys, estimate)?;
        Ok(())
    }

    /// Verifies a signed checkpoint (signature, region, rollback, expiry) and records its
    /// server time. When the data is already at (or past) its head, the data is now as of its
    /// time.
    pub fn accept_checkpoint(
        &self,
        signed: &SignedMessage,
    ) -> Result<VerifiedCheckpoint, AgentError> {
        let cp: Checkpoint = signed.open(self.pinned_key().verifying_key())?;
        cp.policy
            .validate()
            .map_err(|e| VerifyError::Malformed(format!("checkpoint policy: {e}")))?;
        let db = lock(&self.flags);
        let mut st = (*self.state_in(&db)?).clone();
        cp.check(&position_of(&st), self.clock.now())?;
        st.seen_server_time = Some(cp.server_time);
        st.policy = cp.policy;
        // Data at (or, if fetched after a later change, past) the head is as of this checkpoint.
        if st
            .data
            .is_some_and(|(epoch, version)| epoch == cp.epoch && version >= cp.head_version)
        {
            self.mark_verified(&mut st, cp.server_time)?;
        }
        db.write_state(&self.keys, &st)?;
        self.remember(&db, st)?;
        Ok(VerifiedCheckpoint(cp))
    }

    /// Verifies signed snapshot metadata against the verified checkpoint.
    pub fn check_snapshot_meta(
        &self,
        cp: &VerifiedCheckpoint,
        signed: &SignedMessage,
    ) -> Result<SnapshotMeta, AgentError> {
        let meta: SnapshotMeta = signed.open(self.pinned_key().verifying_key())?;
        meta.check(&self.position()?, &cp.0)?;
        Ok(meta)
    }

    /// Verifies a snapshot completely (signature, position, size, digest, decoding, content)
    /// and installs it in one transaction. On any error the previous data stays.
    pub fn apply_snapshot(
        &self,
        cp: &VerifiedCheckpoint,
        signed: &SignedMessage,
        body: &[u8],
    ) -> Result<SnapshotMeta, AgentError> {
        let meta = self.check_snapshot_meta(cp, signed)?;
        let snap: SnapshotBody = meta.body.open_snapshot(body)?;
        if snap.flags.len() as u64 != meta.flag_count {
            return Err(VerifyError::Malformed(format!(
                "snapshot holds {} flags, its metadata declares {}",
                snap.flags.len(),
                meta.flag_count
            ))
            .into());
        }
        let known: std::collections::BTreeSet<_> = snap.councils.iter().map(|c| &c.code).collect();
        if let Some(f) = snap.flags.iter().find(|f| !known.contains(&f.council)) {
            return Err(VerifyError::Malformed(format!(
                "a flag names council {} which is not in the snapshot's directory",
                f.council
            ))
            .into());
        }
        drop(known);
        // Group by subject (a stable sort keeps each subject's flags in the snapshot's order).
        let mut flags = snap.flags;
        flags.sort_by_key(|f| f.nhs_number);
        let mut subjects: Vec<(NhsNumber, Vec<FlagRecord>)> = Vec::new();
        for f in flags {
            match subjects.last_mut() {
                Some((n, fs)) if *n == f.nhs_number => fs.push(f),
                _ => subjects.push((f.nhs_number, vec![f])),
            }
        }
        let mut contacts: Vec<ContactsRow> = Vec::with_capacity(snap.contacts.len());
        for sc in snap.contacts {
            if subjects
                .binary_search_by_key(&sc.nhs_number, |(n, _)| *n)
                .is_err()
            {
                return Err(VerifyError::Malformed(
                    "the snapshot carries contacts of a subject it holds no flag for".into(),
                )
                .into());
            }
            contacts.push((self.keys.subject_key(sc.nhs_number), sc.contacts));
        }
        // Subject keys are HMACs: computed on every core.
        let keys = crate::par::map(&subjects, |(n, _)| self.keys.subject_key(*n));
        let mut rows: Vec<([u8; 32], Vec<FlagRecord>)> = keys
            .into_iter()
            .zip(subjects.into_iter().map(|(_, fs)| fs))
            .collect();
        rows.sort_unstable_by_key(|r| r.0);

        let mut db = lock(&self.flags);
        let mut st = (*self.state_in(&db)?).clone();
        // Re-check against the state under the lock (another writer may have moved on).
        meta.check(&position_of(&st), &cp.0)?;
        st.data = Some((meta.epoch, meta.version));
        st.generation += 1;
        st.councils = snap.councils;
        let as_of = if meta.version == cp.0.head_version {
            cp.0.server_time
        } else {
            meta.server_time.min(cp.0.server_time)
        };
        // A new epoch or snapshot replaces the basis of freshness outright.
        st.data_as_of = None;
        self.mark_verified(&mut st, as_of)?;
        db.replace_all(&self.keys, meta.version, rows, &contacts, &mut st)?;
        self.raise_store_mark(&st);
        self.remember(&db, st)?;
        Ok(meta)
    }

    /// Verifies a delta completely and applies it in one transaction. On any error the
    /// previous data stays.
    pub fn apply_delta(
        &self,
        cp: &VerifiedCheckpoint,
        signed: &SignedMessage,
        body: &[u8],
    ) -> Result<DeltaMeta, AgentError> {
        let meta: DeltaMeta = signed.open(self.pinned_key().verifying_key())?;
        meta.check(&self.position()?, &cp.0)?;
        let delta: DeltaBody = meta.body.open(body)?;
        if delta.changes.len() as u64 != meta.change_count {
            return Err(VerifyError::Malformed(format!(
                "delta holds {} changes, its metadata declares {}",
                delta.changes.len(),
                meta.change_count
            ))
            .into());
        }
        let known: std::collections::BTreeSet<_> = delta.councils.iter().map(|c| &c.code).collect();
        let mut last = meta.from_version;
        let mut by_subject: BTreeMap<NhsNumber, Vec<&Change>> = BTreeMap::new();
        // Several contact changes of one subject in one delta collapse into the last.
        let mut contact_changes: BTreeMap<NhsNumber, &Vec<RecentContact>> = BTreeMap::new();
        for vc in &delta.changes {
            if vc.version <= last || vc.version > meta.to_version {
                return Err(VerifyError::Malformed(format!(
                    "change version {} is out of order or outside {}..={}",
                    vc.version, meta.from_version, meta.to_version
                ))
                .into());
            }
            last = vc.version;
            let nhs = match &vc.change {
                Change::Contacts(sc) => {
                    contact_changes.insert(sc.nhs_number, &sc.contacts);
                    continue;
                }
                Change::Upsert(f) => {
                    if !known.contains(&f.council) {
                        return Err(VerifyError::Malformed(format!(
                            "a change names council {} which is not in the delta's directory",
                            f.council
                        ))
                        .into());
                    }
                    f.nhs_number
                }
                Change::Remove(k) => k.nhs_number,
            };
            by_subject.entry(nhs).or_default().push(&vc.change);
        }

        let mut db = lock(&self.flags);
        let mut st = (*self.state_in(&db)?).clone();
        meta.check(&position_of(&st), &cp.0)?;
        let mut rows = Vec::with_capacity(by_subject.len());
        for (nhs, changes) in by_subject {
            let key = self.keys.subject_key(nhs);
            let mut flags = db
                .subject(&self.keys, &key, st.generation)?
                .map(|r| r.1)
                .unwrap_or_default();
            for ch in changes {
                match ch {
                    Change::Upsert(f) => {
                        flags.retain(|g| g.key() != f.key());
                        flags.push(f.clone());
                    }
                    Change::Remove(k) => flags.retain(|g| &g.key() != k),
                    Change::Contacts(_) => {}
                }
            }
            flags.sort();
            rows.push((key, flags));
        }
        let contacts: Vec<ContactsRow> = contact_changes
            .into_iter()
            .map(|(n, cs)| (self.keys.subject_key(n), cs.clone()))
            .collect();
        st.data = Some((meta.epoch, meta.to_version));
        st.councils = delta.councils;
        let as_of = if meta.to_version == cp.0.head_version {
            cp.0.server_time
        } else {
            meta.server_time.min(cp.0.server_time)
        };
        self.mark_verified(&mut st, as_of)?;
        db.update_subjects(&self.keys, meta.to_version, &rows, &contacts, &mut st)?;
        self.raise_store_mark(&st);
        self.remember(&db, st)?;
        Ok(meta)
    }

    /// Records the outcome of a sync attempt for `status`.
    pub fn record_sync(&self, outcome: Result<(), String>) -> Result<(), AgentError> {
        let db = lock(&self.flags);
        let mut st = (*self.state_in(&db)?).clone();
        let now = self.clock.now();
        st.last_sync_attempt = Some(now);
        match outcome {
            Ok(()) => {
                st.last_sync_success = Some(now);
                st.last_sync_error = None;
            }
            Err(e) => st.last_sync_error = Some(e),
        }
        db.write_state(&self.keys, &st)?;
        self.remember(&db, st)?;
        Ok(())
    }

    /// Records the background loop's state for `status`: failures in a row, the last
    /// error (when the attempt failed after the sync itself, e.g. a renewal), the next
    /// planned attempt.
    pub fn record_loop(
        &self,
        consecutive_failures: u32,
        error: Option<String>,
        next_sync_at: Option<DateTime<Utc>>,
    ) -> Result<(), AgentError> {
        let db = lock(&self.flags);
        let mut st = (*self.state_in(&db)?).clone();
        st.consecutive_failures = consecutive_failures;
        st.next_sync_at = next_sync_at;
        if error.is_some() {
            st.last_sync_error = error;
        }
        db.write_state(&self.keys, &st)?;
        self.remember(&db, st)?;
        Ok(())
    }

    /// Destroys the master key (overwrite, fsync, delete), then every file of the state
    /// directory. Without the key nothing left behind can be read.
    pub fn wipe(dir: &Path) -> Result<(), AgentError> {
        let sd = StateDir::new(dir);
        sd.keystore()?.destroy()?;
        for p in [
            sd.device_key(),
            sd.legacy_device_key(),
            sd.device_cert(),
            sd.next_device_key(),
            sd.next_device_cert(),
            sd.ca(),
            sd.enrolment(),
            sd.revoked(),
            crate::local_token::path(dir),
        ] {
            shred_file(&p).map_err(io_err(&p))?;
        }
        for db in [sd.flags_db(), sd.outbox_db()] {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = db.clone().into_os_string();
                p.push(suffix);
                let p = PathBuf::from(p);
                shred_file(&p).map_err(io_err(&p))?;
            }
        }
        let dl = sd.downloads();
        if dl.exists() {
            std::fs::remove_dir_all(&dl).map_err(io_err(&dl))?;
        }
        let kd = sd.keys_dir();
        if kd.exists() {
            std::fs::remove_dir_all(&kd).map_err(io_err(&kd))?;
        }
        Ok(())
    }
}

/// The device's mutual-TLS identity in a state directory: its certificate and private key
/// (PEM), the key opened with the master key. For tools that act as the tablet; opens
/// neither database.
pub fn device_identity(dir: &Path) -> Result<(String, String), AgentError> {
    let sd = StateDir::new(dir);
    let keys = sd.keystore()?.load()?.derive();
    let cert_path = sd.device_cert();
    let cert = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    Ok((cert, read_sealed_key(&keys, &sd.device_key())?))
}

fn read_sealed_key(keys: &Keys, path: &Path) -> Result<String, AgentError> {
    let sealed = std::fs::read(path).map_err(io_err(path))?;
    let pem = keys.meta.open(&sealed, DEVICE_KEY_AAD)?;
    String::from_utf8(pem)
        .map_err(|_| AgentError::Store(StoreError::Corrupt("the device key is not PEM".into())))
}

/// Writes a private key (PEM) sealed under the master key.
fn write_sealed_key(keys: &Keys, path: &Path, pem: &str) -> Result<(), AgentError> {
    let sealed = keys.meta.seal(pem.as_bytes(), DEVICE_KEY_AAD)?;
    write_private(path, &sealed).map_err(io_err(path))
}

/// A state directory enrolled before TLS keys were sealed holds its private keys (the
/// current one, and a renewed one mid-renewal) in plain PEM: seal each under the master key,
/// then shred the plain file.
fn seal_legacy_device_keys(sd: &StateDir, keys: &Keys) -> Result<(), AgentError> {
    for (legacy, sealed) in [
        (sd.legacy_device_key(), sd.device_key()),
        (
            sd.keys_dir().join("device.key.next.pem"),
            sd.next_device_key(),
        ),
    ] {
        let pem = match std::fs::read_to_string(&legacy) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&legacy)(e)),
        };
        write_sealed_key(keys, &sealed, &pem)?;
        shred_file(&legacy).map_err(io_err(&legacy))?;
    }
    Ok(())
}

/// Finishes or abandons a certificate renewal interrupted by a crash: with the commit
/// marker, the new key and certificate are moved into place; without it they are removed.
fn recover_identity(sd: &StateDir) -> Result<(), AgentError> {
    let sync_dir = |d: &Path| -> Result<(), AgentError> {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(io_err(d))
    };
    if sd.renew_commit().exists() {
        for (next, cur) in [
            (sd.next_device_key(), sd.device_key()),
            (sd.next_device_cert(), sd.device_cert()),
        ] {
            if next.exists() {
                std::fs::rename(&next, &cur).map_err(io_err(&next))?;
            }
        }
        sync_dir(&sd.keys_dir())?;
        std::fs::remove_file(sd.renew_commit()).map_err(io_err(&sd.renew_commit()))?;
        sync_dir(&sd.keys_dir())?;
    } else {
        for next in [sd.next_device_key(), sd.next_device_cert()] {
            shred_file(&next).map_err(io_err(&next))?;
        }
    }
    Ok(())
}

/// What the tablet holds for the protocol; a damaged store holds nothing it can build on (the
/// next sync takes a full snapshot).
pub(crate) fn position_of(st: &DataState) -> Position {
    Position {
        region: st.region.clone(),
        data: if st.damaged.is_some() { None } else { st.data },
        server_time: st.seen_server_time,
    }
}
