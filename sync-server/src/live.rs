//! The live feed: a connected tablet holds one waiting checkpoint request
//! (`GET /v1/device/checkpoint/wait`), answered as soon as its region's head passes the one
//! it holds, or after `live_wait_max_secs` with the head unchanged; the tablet then syncs as
//! always (checkpoint, delta, every signature checked).
//!
//! One task per replica ([`watch_heads`]) reads every region's head (epoch, version) and
//! publishes them in a `watch` channel; a waiting request compares in memory, so a change
//! costs one read of the heads however many tablets wait. The task re-reads:
//! * when a write in this process commits ([`Heads::hint`]: an upload, events that changed
//!   recent contacts, the retention purge);
//! * when PostgreSQL says a write committed anywhere (`LISTEN cpis_heads`, notified by
//!   triggers: another replica, an `admin` command);
//! * every `live_recheck_millis` whatever happens;
//!
//! and never more than ten times a second (hints within 100 ms share one read).
//!
//! Hints only make it sooner: the heads read are the truth. The answer is a checkpoint of the
//! head read, signed now, as a poll's is, provided the heads were read within twice the re-read
//! interval (so an answer is never staler than that); otherwise (the database away, the
//! server starting) it is read from the store like a poll, which answers `503` when the
//! database does not. Waiting requests sit outside the shedder and the request deadline (they
//! cost memory, not work) and are capped on their own (`live_max_waiting`). When the server
//! stops, they are answered `503` with a random `Retry-After`, so tablets come back spread
//! out rather than in step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cpis_protocol::RegionId;
use rand::Rng as _;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::http::App;
use crate::metrics::Metrics;
use crate::store::{AnyStore, Store, StoreError};

/// Reads of the heads are at least this far apart (see [`watch_heads`]).
const HINTS_SHARE_A_READ: Duration = Duration::from_millis(100);

/// The longest `Retry-After` given to waiting tablets sent away.
const CLOSING_RETRY_MAX_SECS: u64 = 30;

/// Every region's head as last read.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// When the heads were read (`None` until the first read).
    pub read_at: Option<DateTime<Utc>>,
    /// (epoch, version) of each region.
    pub heads: HashMap<RegionId, (u64, u64)>,
}

/// The heads waiting requests watch, and what wakes their reader.
#[derive(Debug)]
pub struct Heads {
    tx: watch::Sender<Arc<Published>>,
    hint: Notify,
    closing: CancellationToken,
    slots: Arc<Semaphore>,
    /// Heads read longer ago than this are not answered from.
    recent: chrono::Duration,
}

impl Heads {
    /// Heads not read yet, re-read every `recheck`; `closing` is the server's shutdown; at
    /// most `max_waiting` held.
    pub fn new(closing: CancellationToken, recheck: Duration, max_waiting: usize) -> Self {
        let recent = (recheck * 2).max(Duration::from_secs(2));
        Self {
            tx: watch::Sender::new(Arc::new(Published::default())),
            hint: Notify::new(),
            closing,
            slots: Arc::new(Semaphore::new(max_waiting.min(Semaphore::MAX_PERMITS))),
            recent: chrono::Duration::from_std(recent).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Whether `published` was read recently enough at `now` to answer from.
    pub(crate) fn is_recent(&self, published: &Published, now: DateTime<Utc>) -> bool {
        published
            .read_at
            .is_some_and(|t| now.signed_duration_since(t) <= self.recent)
    }

    /// A write that may have moved a head committed in this process: re-read soon.
    pub fn hint(&self) {
        self.hint.notify_one();
    }

    /// Watches the heads.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    /// Cancelled when the server stops.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// A slot for one more waiting request, counted in `metrics` while it lives; `None`
    /// when `live_max_waiting` are held.
    pub(crate) fn enter<'a>(&self, metrics: &'a Metrics) -> Option<Slot<'a>> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        metrics.live_waiting.inc();
        Some(Slot {
            _permit: permit,
            metrics,
        })
    }

    /// Reads every region's head and publishes them; waiting requests whose region moved
    /// wake. `now` is the time of the read.
    pub async fn read<S: Store>(&self, store: &S, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut heads = HashMap::new();
        for region in store.regions().await? {
            if let Some(head) = store.region_head(region.id.clone()).await? {
                heads.insert(region.id, (head.epoch, head.version));
            }
        }
        // Waiting requests wake only when a head moved; the time of the read is kept either
        // way (answers are made only from a recent read).
        self.tx.send_if_modified(|p| {
            let moved = p.heads != heads;
            *p = Arc::new(Published {
                read_at: Some(now),
                heads,
            });
            moved
        });
        Ok(())
    }
}

/// One held waiting request: counted while it lives.
pub(crate) struct Slot<'a> {
    _permit: OwnedSemaphorePermit,
    metrics: &'a Metrics,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.metrics.live_waiting.dec();
    }
}

/// A `Retry-After` for waiting tablets sent away (the server stopping, or full): random,
/// so they come back spread out, not in step.
pub(crate) fn spread_retry() -> Duration {
    Duration::from_secs(rand::thread_rng().gen_range(1..=CLOSING_RETRY_MAX_SECS))
}

/// The re-read interval of `live_recheck_millis`.
pub fn recheck(millis: u64) -> Duration {
    Duration::from_millis(millis.max(10))
}

/// Keeps [`Heads`] current until `shutdown` (see the module doc).
pub async fn watch_heads(app: Arc<App<AnyStore>>, shutdown: CancellationToken) {
    let recheck = recheck(app.config.live_recheck_millis);
    let mut listening = None;
    let mut last_read = tokio::time::Instant::now();
    loop {
        // Hints closer together than this share one read: a busy ingest (every batch that
        // changes recent contacts hints) costs at most ten reads a second, not one a batch.
        tokio::time::sleep_until(last_read + HINTS_SHARE_A_READ).await;
        last_read = tokio::time::Instant::now();
        if app.database.is_ready() {
            // Listening before reading: a change committed in between is not missed.
            if listening.is_none()
                && let AnyStore::Postgres(pg) = &app.store
            {
                match pg.listen_heads().await {
                    Ok(l) => listening = Some(l),
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for head changes; re-reading on the timer only")
                    }
                }
            }
            if let Err(error) = app.live.read(&app.store, app.clock.now()).await {
                tracing::warn!(%error, "reading the region heads for waiting tablets failed; retrying");
            }
        }
        let notified = async {
            match listening.as_mut() {
                Some(l) => l.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = app.live.hint.notified() => {}
            () = tokio::time::sleep(recheck) => {}
            n = notified => if n.is_none() { listening = None },
        }
    }
}
