//! The signed regional feed (DESIGN.md §4): checkpoints, deltas from the change log, and
//! snapshots built once per (region, epoch, version, body format) and kept in a
//! memory-bounded LRU cache.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use chrono::{DateTime, Duration, Utc};
use cpis_protocol::{
    Checkpoint, DeltaBody, DeltaMeta, Policy, PublicKey, RegionId, SignedMessage, SigningKey,
    SnapshotBody, SnapshotMeta, encode_body, encode_snapshot,
};

use crate::metrics::Metrics;
use crate::store::{RegionChanges, RegionHead, RegionSnapshot, Store, StoreError};

/// Why a feed message could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding a feed body: {0}")]
    Encode(String),
    #[error("snapshot build task failed: {0}")]
    Task(String),
}

/// A built snapshot: its signed metadata and compressed body.
#[derive(Debug)]
pub struct BuiltSnapshot {
    pub meta: SnapshotMeta,
    /// The signed metadata envelope (the body of `GET /v1/device/snapshot`).
    pub signed: Bytes,
    /// The same envelope for the `x-cpis-signed` header.
    pub header: String,
    pub body: Bytes,
}

/// A built delta.
#[derive(Debug, Clone)]
pub struct BuiltDelta {
    pub meta: DeltaMeta,
    pub header: String,
    pub body: Bytes,
}

/// (region, epoch, version, body format).
type CacheKey = (RegionId, u64, u64, u16);

/// How long a signed checkpoint is answered again for the same head: polls within it cost no
/// signature (the profile of a busy poll path put signing at a tenth of its time). Its
/// `server_time` is then up to this old, and still true: the head has not moved since.
const CHECKPOINT_REUSE: Duration = Duration::seconds(1);

/// The last checkpoint signed for a region.
#[derive(Debug)]
struct SignedCheckpoint {
    epoch: u64,
    version: u64,
    at: DateTime<Utc>,
    /// The key that signed it: a poll that signed with the old key just as the key rolled
    /// over may store its checkpoint after [`Feed::set_key`] cleared the map, so a hit is
    /// only taken when this is the key signing now.
    signer: PublicKey,
    bytes: Bytes,
}

/// How many bytes of built deltas are kept: a fleet at one version asks for the same delta
/// (region, epoch, from, to) when the region moves, and each answer was built anew before.
const DELTA_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// (region, epoch, from, to).
type DeltaKey = (RegionId, u64, u64, u64);

#[derive(Debug, Default)]
struct DeltaCache {
    /// Each with the key that signed it and when it was last used.
    entries: std::collections::HashMap<DeltaKey, (Arc<BuiltDelta>, PublicKey, u64)>,
    bytes: usize,
    tick: u64,
}

#[derive(Debug, Default)]
struct Cache {
    entries: Vec<(CacheKey, Arc<BuiltSnapshot>, u64)>,
    tick: u64,
}

/// Signs feed messages and caches snapshots. The signing key can be replaced while serving
/// ([`Feed::set_key`], after a rollover); every snapshot signed by the previous key is then
/// dropped from the cache, so nothing signed by a retired key is served again.
#[derive(Debug)]
pub struct Feed {
    key: RwLock<SigningKey>,
    /// When the current key was last compared with the store's key chain.
    key_checked: Mutex<Option<DateTime<Utc>>>,
    policy: Policy,
    checkpoint_ttl: Duration,
    zstd_level: i32,
    cache_bytes: usize,
    cache: Mutex<Cache>,
    build: tokio::sync::Mutex<()>,
    checkpoints: Mutex<std::collections::HashMap<RegionId, SignedCheckpoint>>,
    deltas: Mutex<DeltaCache>,
}

impl Feed {
    pub fn new(
        key: SigningKey,
        policy: Policy,
        checkpoint_ttl: Duration,
        zstd_level: i32,
        cache_bytes: usize,
    ) -> Self {
        Self {
            key: RwLock::new(key),
            key_checked: Mutex::new(None),
            policy,
            checkpoint_ttl,
            zstd_level,
            cache_bytes,
            cache: Mutex::new(Cache::default()),
            build: tokio::sync::Mutex::new(()),
            checkpoints: Mutex::new(std::collections::HashMap::new()),
            deltas: Mutex::new(DeltaCache::default()),
        }
    }

    /// The key signing feed messages now.
    pub fn signing_key(&self) -> SigningKey {
        match self.key.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The public half of [`Feed::signing_key`] (what enrolment pins).
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.signing_key())
    }

    /// Signs with `key` from now on; when it is a new key, drops every cached snapshot (they
    /// were signed by the old one). Returns whether the key changed.
    pub fn set_key(&self, key: SigningKey) -> bool {
        let mut current = match self.key.write() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.verifying_key() == key.verifying_key() {
            return false;
        }
        *current = key;
        drop(current);
        if let Ok(mut cache) = self.cache.lock() {
            cache.entries.clear();
        }
        if let Ok(mut signed) = self.checkpoints.lock() {
            signed.clear();
        }
        if let Ok(mut deltas) = self.deltas.lock() {
            *deltas = DeltaCache::default();
        }
        true
    }

    /// True (and the check time recorded) when the key was last compared with the key chain
    /// `interval` or more before `now`, or never, or the clock went back.
    pub fn key_check_due(&self, now: DateTime<Utc>, interval: Duration) -> bool {
        let Ok(mut checked) = self.key_checked.lock() else {
            return true;
        };
        let due = checked.is_none_or(|t| now < t || now - t >= interval);
        if due {
            *checked = Some(now);
        }
        due
    }

    /// The policy sent to devices.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// A signed checkpoint of the region's head at `now`.
    pub fn checkpoint(&self, head: &RegionHead, now: DateTime<Utc>) -> Bytes {
        self.checkpoint_of(&head.region, head.epoch, head.version, now)
    }

    /// The signed checkpoint (envelope bytes) saying the region was at `epoch`, `version`
    /// when read at `at`: the one signed for the same head less than [`CHECKPOINT_REUSE`]
    /// before `at` if there is one, else signed now and kept for the next.
    pub fn checkpoint_of(
        &self,
        region: &RegionId,
        epoch: u64,
        version: u64,
        at: DateTime<Utc>,
    ) -> Bytes {
        let key = self.signing_key();
        let signer = PublicKey::from(&key);
        if let Ok(signed) = self.checkpoints.lock()
            && let Some(last) = signed.get(region)
            && (last.epoch, last.version) == (epoch, version)
            && last.signer == signer
            && last.at <= at
            && at - last.at < CHECKPOINT_REUSE
        {
            return last.bytes.clone();
        }
        let checkpoint = Checkpoint {
            region: region.clone(),
            epoch,
            head_version: version,
            server_time: at,
            expires_at: at + self.checkpoint_ttl,
            policy: self.policy,
        };
        let bytes = Bytes::from(SignedMessage::sign(&key, &checkpoint).to_bytes());
        self.remember(
            region,
            SignedCheckpoint {
                epoch,
                version,
                at,
                signer,
                bytes: bytes.clone(),
            },
        );
        bytes
    }

    /// Keeps a signed checkpoint for the next polls of its region. Two polls signing at once:
    /// keep the later, so that a tablet answered with it is never answered with the earlier
    /// one afterwards (tablets refuse a checkpoint older than one they have seen).
    fn remember(&self, region: &RegionId, checkpoint: SignedCheckpoint) {
        if let Ok(mut signed) = self.checkpoints.lock() {
            let newer = signed.get(region).is_none_or(|last| {
                (last.epoch, last.version, &last.signer)
                    != (checkpoint.epoch, checkpoint.version, &checkpoint.signer)
                    || last.at < checkpoint.at
            });
            if newer {
                signed.insert(region.clone(), checkpoint);
            }
        }
    }

    /// The delta of `region` in `epoch` from `from` to `to`, if one was built and signed by the
    /// key signing now.
    pub fn cached_delta(
        &self,
        region: &RegionId,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Option<Arc<BuiltDelta>> {
        let signer = self.public_key();
        let mut cache = self.deltas.lock().ok()?;
        cache.tick += 1;
        let tick = cache.tick;
        let (built, by, used) = cache.entries.get_mut(&(region.clone(), epoch, from, to))?;
        if *by != signer {
            return None;
        }
        *used = tick;
        Some(built.clone())
    }

    /// Builds and signs the delta of `changes` from `from` to the region's head, and keeps it
    /// for the next tablet at the same version.
    pub fn build_delta(
        &self,
        changes: RegionChanges,
        from: u64,
        now: DateTime<Utc>,
    ) -> Result<Arc<BuiltDelta>, FeedError> {
        let key = self.signing_key();
        let change_count = changes.changes.len() as u64;
        let body = DeltaBody {
            councils: changes.head.councils,
            changes: changes.changes,
        };
        let (bytes, info) = encode_body(&body, self.zstd_level).map_err(FeedError::Encode)?;
        let meta = DeltaMeta {
            region: changes.head.region,
            epoch: changes.head.epoch,
            from_version: from,
            to_version: changes.head.version,
            server_time: now,
            change_count,
            body: info,
        };
        let signed = SignedMessage::sign(&key, &meta);
        let built = Arc::new(BuiltDelta {
            meta,
            header: signed.to_header(),
            body: Bytes::from(bytes),
        });
        self.keep_delta(built.clone(), PublicKey::from(&key));
        Ok(built)
    }

    fn keep_delta(&self, built: Arc<BuiltDelta>, signer: PublicKey) {
        let size = built.body.len() + built.header.len();
        if size > DELTA_CACHE_BYTES / 4 {
            return;
        }
        let Ok(mut cache) = self.deltas.lock() else {
            return;
        };
        cache.tick += 1;
        let tick = cache.tick;
        let m = &built.meta;
        let key = (m.region.clone(), m.epoch, m.from_version, m.to_version);
        if let Some((old, _, _)) = cache.entries.insert(key, (built, signer, tick)) {
            cache.bytes -= old.body.len() + old.header.len();
        }
        cache.bytes += size;
        // Least recently used first, never the one just kept.
        while cache.bytes > DELTA_CACHE_BYTES {
            let Some(oldest) = cache
                .entries
                .iter()
                .filter(|(_, (_, _, used))| *used != tick)
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((gone, _, _)) = cache.entries.remove(&oldest) {
                cache.bytes -= gone.body.len() + gone.header.len();
            }
        }
    }

    /// A cached snapshot in body `format`, if present.
    pub fn cached(
        &self,
        region: &RegionId,
        epoch: u64,
        version: u64,
        format: u16,
    ) -> Option<Arc<BuiltSnapshot>> {
        let mut cache = self.cache.lock().ok()?;
        cache.tick += 1;
        let tick = cache.tick;
        cache
            .entries
            .iter_mut()
            .find(|(k, _, _)| k.0 == *region && (k.1, k.2, k.3) == (epoch, version, format))
            .map(|(_, s, used)| {
                *used = tick;
                s.clone()
            })
    }

    fn insert(&self, snapshot: Arc<BuiltSnapshot>) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        cache.tick += 1;
        let tick = cache.tick;
        let key = (
            snapshot.meta.region.clone(),
            snapshot.meta.epoch,
            snapshot.meta.version,
            snapshot.meta.body.format,
        );
        cache.entries.retain(|(k, _, _)| *k != key);
        cache.entries.push((key, snapshot, tick));
        // Evict least recently used entries beyond the bound, always keeping the newest.
        loop {
            let total: usize = cache.entries.iter().map(|(_, s, _)| s.body.len()).sum();
            if total <= self.cache_bytes || cache.entries.len() <= 1 {
                break;
            }
            let Some(oldest) = cache
                .entries
                .iter()
                .enumerate()
                .filter(|(_, (_, _, used))| *used != tick)
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(i, _)| i)
            else {
                break;
            };
            cache.entries.remove(oldest);
        }
    }

    /// The snapshot of the region's current head in body `format`, built (once) if not
    /// cached. `None` for an unknown region.
    pub async fn current_snapshot<S: Store>(
        &self,
        store: &S,
        region: &RegionId,
        format: u16,
        now: DateTime<Utc>,
        metrics: &Metrics,
    ) -> Result<Option<Arc<BuiltSnapshot>>, FeedError> {
        let Some(head) = store.region_head(region.clone()).await? else {
            return Ok(None);
        };
        if let Some(hit) = self.cached(region, head.epoch, head.version, format) {
            metrics.snapshot_cache_hits.inc();
            return Ok(Some(hit));
        }
        // One build at a time: a crowd of tablets asking at once waits for the first build.
        let _building = self.build.lock().await;
        if let Some(hit) = self.cached(region, head.epoch, head.version, format) {
            metrics.snapshot_cache_hits.inc();
            return Ok(Some(hit));
        }
        let Some(snapshot) = store.region_snapshot(region.clone()).await? else {
            return Ok(None);
        };
        if let Some(hit) = self.cached(region, snapshot.head.epoch, snapshot.head.version, format) {
            return Ok(Some(hit));
        }
        let started = Instant::now();
        let key = self.signing_key();
        let signer = key.verifying_key();
        let level = self.zstd_level;
        let built =
            tokio::task::spawn_blocking(move || build_snapshot(&key, level, format, snapshot, now))
                .await
                .map_err(|e| FeedError::Task(e.to_string()))??;
        metrics
            .snapshot_build_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            region = %built.meta.region,
            epoch = built.meta.epoch,
            version = built.meta.version,
            flags = built.meta.flag_count,
            format,
            bytes = built.body.len(),
            ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        let built = Arc::new(built);
        // A rollover during the build: serve this one but never cache what the old key signed.
        if self.signing_key().verifying_key() == signer {
            self.insert(built.clone());
        }
        Ok(Some(built))
    }
}

/// Builds, compresses and signs a snapshot of a region's state, its body in `format`
/// ([`cpis_protocol::COLUMNS_FORMAT`], or [`cpis_protocol::BODY_FORMAT`] for tablets that do
/// not ask for it).
pub fn build_snapshot(
    key: &SigningKey,
    zstd_level: i32,
    format: u16,
    snapshot: RegionSnapshot,
    now: DateTime<Utc>,
) -> Result<BuiltSnapshot, FeedError> {
    let RegionSnapshot {
        head,
        flags,
        contacts,
    } = snapshot;
    let flag_count = flags.len() as u64;
    let body = SnapshotBody {
        councils: head.councils.clone(),
        flags,
        contacts,
    };
    let (bytes, info) = encode_snapshot(&body, zstd_level, format).map_err(FeedError::Encode)?;
    let meta = SnapshotMeta {
        region: head.region.clone(),
        epoch: head.epoch,
        version: head.version,
        server_time: now,
        flag_count,
        body: info,
    };
    let signed = SignedMessage::sign(key, &meta);
    Ok(BuiltSnapshot {
        meta,
        signed: Bytes::from(signed.to_bytes()),
        header: signed.to_header(),
        body: Bytes::from(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(key: &SigningKey) -> Feed {
        Feed::new(
            key.clone(),
            Policy::default(),
            Duration::hours(24),
            3,
            1 << 20,
        )
    }

    fn signer_of(bytes: &[u8], old: &SigningKey, new: &SigningKey) -> &'static str {
        let msg = SignedMessage::from_bytes(bytes).expect("an envelope");
        if msg.open::<Checkpoint>(&new.verifying_key()).is_ok() {
            "new"
        } else if msg.open::<Checkpoint>(&old.verifying_key()).is_ok() {
            "old"
        } else {
            "neither"
        }
    }

    #[test]
    fn a_checkpoint_the_old_key_signed_during_a_rollover_is_never_answered_again() {
        let old = SigningKey::from_bytes(&[7; 32]);
        let new = SigningKey::from_bytes(&[8; 32]);
        let feed = feed(&old);
        let region: RegionId = "Y56".parse().expect("a region");
        let at = Utc::now();
        let first = feed.checkpoint_of(&region, 1, 5, at);
        assert_eq!(signer_of(&first, &old, &new), "old");

        // A poll signed with the old key, the key rolled over, then that poll kept its
        // checkpoint: the order a race between a poll and `set_key` can take.
        let raced = SignedCheckpoint {
            epoch: 1,
            version: 5,
            at,
            signer: PublicKey::from(&old),
            bytes: first.clone(),
        };
        assert!(feed.set_key(new.clone()));
        feed.remember(&region, raced);

        let next = feed.checkpoint_of(&region, 1, 5, at);
        assert_eq!(signer_of(&next, &old, &new), "new");
        // And the new key's checkpoint is the one reused from then on.
        assert_eq!(feed.checkpoint_of(&region, 1, 5, at), next);
    }
}
