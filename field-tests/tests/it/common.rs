//! Shared setup of the scenarios: seeds, a real server holding a seeded region of flags from
//! `cpis-fixtures`, and the expectations a tablet is checked against.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cpis_agent::schedule::ScheduleConfig;
use cpis_field_tests::fleet::Counts;

use cpis_field_tests::harness::{CouncilClient, ServerProcess, Tablet};
use cpis_fixtures::{Config, Dataset, Directory};
use cpis_protocol::local::LookupResponse;
use cpis_protocol::{
    CouncilCode, EventId, FlagRecord, LookupResult, NhsNumber, PlanType, RegionId, TrustCode,
};
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;

/// A scenario's seed (from `CPIS_FIELD_SEED` or random), printed so a failure can be replayed.
pub(crate) fn seed(scenario: &str) -> u64 {
    let seed = cpis_field_tests::seed::pick();
    eprintln!(
        "[{scenario}] seed {seed} (replay with {}={seed})",
        cpis_field_tests::seed::SEED_ENV
    );
    seed
}

/// Set to keep each scenario's directory (server data, logs, tablets) for inspection.
const KEEP_ENV: &str = "CPIS_FIELD_KEEP";

/// A running server with one region's flags uploaded.
pub(crate) struct Field {
    pub(crate) dir: TempDir,
    pub(crate) server: ServerProcess,
    pub(crate) region: RegionId,
    pub(crate) trust: TrustCode,
    /// Every trust, region and council the server knows.
    pub(crate) directory: Directory,
    /// The region's own and neighbour councils (whose flags its tablets carry).
    pub(crate) carried: BTreeSet<CouncilCode>,
    /// Every council's current list, as last uploaded.
    pub(crate) lists: BTreeMap<CouncilCode, Vec<FlagRecord>>,
    /// Upload clients of the region's councils that hold flags.
    pub(crate) councils: BTreeMap<CouncilCode, CouncilClient>,
    /// The version after the region's last upload (another region's uploads take global
    /// versions too, but are not this region's head).
    pub(crate) head: u64,
    /// Every upload the server acknowledged, in order.
    pub(crate) uploads: Vec<Published>,
    pub(crate) seed: u64,
}

impl Field {
    /// A server (2 regions, 4 councils) whose first region's own councils hold `flags` flags
    /// in all, generated from `seed` as of today (the server refuses future start dates and
    /// plans ended over 12 months ago, so fixtures must describe today).
    pub(crate) async fn start(seed: u64, flags: usize) -> Field {
        let mut dir = TempDir::new().unwrap();
        if std::env::var_os(KEEP_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("[field] keeping {}", dir.path().display());
        }
        let as_of = chrono::Utc::now().date_naive();
        let config = Config::new(seed, as_of).with_regions(2).with_councils(4);
        let directory = Directory::generate(&config).unwrap();
        let region = directory.regions[0].clone();
        let carried = directory
            .carried_councils(&region.id)
            .into_iter()
            .cloned()
            .collect();
        let dataset = Dataset::generate_region(&config, &region.id, flags).unwrap();
        let server = ServerProcess::init_and_start(
            &dir.path().join("server"),
            "127.0.0.1:0".parse().unwrap(),
            &dataset.directory,
        )
        .await
        .unwrap();
        let mut field = Field {
            dir,
            server,
            region: region.id.clone(),
            trust: region.trust.clone(),
            directory: dataset.directory.clone(),
            carried,
            lists: BTreeMap::new(),
            councils: BTreeMap::new(),
            head: 0,
            uploads: Vec::new(),
            seed,
        };
        for (code, list) in &dataset.flags_by_council {
            if list.is_empty() {
                continue;
            }
            field.upload(code, list.clone()).await;
        }
        field
    }

    /// Uploads a council's full list; returns the version after it.
    pub(crate) async fn upload(&mut self, code: &CouncilCode, list: Vec<FlagRecord>) -> u64 {
        let seed = self.seed;
        let receipt = self
            .council(code)
            .await
            .upload(&list)
            .await
            .unwrap_or_else(|e| panic!("upload for {code} (seed {seed}): {e:#}"));
        self.lists.insert(code.clone(), list);
        if self.carried.contains(code) {
            self.head = self.head.max(receipt.version);
        }
        let c = &receipt.counts;
        self.uploads.push(Published {
            version: receipt.version,
            changes: c.added + c.updated + c.ended + c.removed,
            expected: self.expected(),
        });
        receipt.version
    }

    /// What a tablet at version `v` must hold. The server also makes versions of its own
    /// (recent-contact changes after lookups, purges), which do not change flags: a tablet at
    /// `v` must hold the flags of the last upload at or before `v`, and `v` must not fall
    /// inside an upload's block of changes (that would be a half-applied upload).
    pub(crate) fn expected_at(&self, v: u64) -> Result<&Expected, String> {
        if let Some(u) = self
            .uploads
            .iter()
            .find(|u| u.changes > 0 && u.version - u.changes < v && v < u.version)
        {
            return Err(format!(
                "version {v} lies inside the upload of versions {}..={}",
                u.version - u.changes + 1,
                u.version
            ));
        }
        self.uploads
            .iter()
            .rev()
            .find(|u| u.version <= v)
            .map(|u| &u.expected)
            .ok_or_else(|| format!("version {v} is older than every upload"))
    }

    /// A scratch path inside the scenario's directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new enrolment token for one tablet of the region.
    pub(crate) async fn enrolment_token(&self) -> String {
        self.server
            .enrolment_token(&self.trust, &self.region, 1)
            .await
            .unwrap()
    }

    /// Enrols a tablet at `server_url` (the server or a proxy in front of it).
    pub(crate) async fn enrol(&self, name: &str, server_url: &str) -> Tablet {
        let token = self.enrolment_token().await;
        Tablet::enrol(&self.path(name), server_url, &self.server.ca_path(), &token)
            .await
            .unwrap()
    }

    /// What a tablet of the region holding the current lists must show.
    pub(crate) fn expected(&self) -> Expected {
        Expected::of(
            self.lists
                .iter()
                .filter(|(c, _)| self.carried.contains(*c))
                .flat_map(|(_, l)| l),
        )
    }

    /// A council's upload client (made on first use).
    pub(crate) async fn council(&mut self, code: &CouncilCode) -> &CouncilClient {
        if !self.councils.contains_key(code) {
            let client = self.server.council(code).await.unwrap();
            self.councils.insert(code.clone(), client);
        }
        &self.councils[code]
    }

    /// Notifications waiting in the councils' mailboxes.
    pub(crate) async fn pending_notices(&self) -> usize {
        let mut n = 0;
        for council in self.councils.values() {
            n += council.notifications().await.unwrap().len();
        }
        n
    }

    /// `n` flagged NHS numbers of the current lists, chosen with the seed.
    pub(crate) fn sample_flagged(&self, n: usize) -> Vec<NhsNumber> {
        let all: Vec<NhsNumber> = self.expected().flagged.into_iter().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        all.choose_multiple(&mut rng, n).copied().collect()
    }
}

/// An acknowledged upload: the version after it, how many changes it made (the versions
/// just before and including `version`), and what the region then held.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) version: u64,
    pub(crate) changes: u64,
    pub(crate) expected: Expected,
}

/// What a tablet at one version must answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expected {
    /// Every NHS number with at least one flag.
    pub(crate) flagged: BTreeSet<NhsNumber>,
}

impl Expected {
    pub(crate) fn of<'a>(flags: impl IntoIterator<Item = &'a FlagRecord>) -> Self {
        Self {
            flagged: flags.into_iter().map(|f| f.nhs_number).collect(),
        }
    }

    /// Subjects (distinct NHS numbers) held, as `status` counts them.
    pub(crate) fn subjects(&self) -> u64 {
        self.flagged.len() as u64
    }
}

/// The notices councils are owed: one per (flagged lookup, council whose flags it showed),
/// with that council's plan types among those shown.
#[derive(Debug, Default)]
pub(crate) struct Notices {
    expected: BTreeMap<CouncilCode, BTreeMap<EventId, BTreeSet<PlanType>>>,
    pub(crate) lookups: usize,
    pub(crate) flagged: usize,
}

impl Notices {
    /// Records what a lookup showed.
    pub(crate) fn record(&mut self, answer: &LookupResponse) {
        self.lookups += 1;
        if answer.result != LookupResult::Flagged {
            return;
        }
        self.flagged += 1;
        for f in &answer.flags {
            self.expected
                .entry(f.council.ods.clone())
                .or_default()
                .entry(answer.event_id)
                .or_default()
                .insert(f.plan_type);
        }
    }

    /// Notices owed in all.
    pub(crate) fn owed(&self) -> usize {
        self.expected.values().map(BTreeMap::len).sum()
    }

    /// Every council's mailbox holds exactly the notices owed, each once, with the right plan
    /// types; then they are acknowledged (and the mailbox is empty). Returns how many.
    pub(crate) async fn check_delivered(&self, field: &Field, when: &str) -> usize {
        let seed = field.seed;
        let mut total = 0;
        for (code, council) in &field.councils {
            let got = council.notifications().await.unwrap();
            let mut seen: BTreeMap<EventId, BTreeSet<PlanType>> = BTreeMap::new();
            for n in &got {
                let plans = n.plan_types.iter().copied().collect();
                assert!(
                    seen.insert(n.event_id, plans).is_none(),
                    "{when}: council {code} got event {} twice (seed {seed})",
                    n.event_id
                );
            }
            let empty = BTreeMap::new();
            let want = self.expected.get(code).unwrap_or(&empty);
            let missing: Vec<_> = want.keys().filter(|e| !seen.contains_key(e)).collect();
            let extra: Vec<_> = seen.keys().filter(|e| !want.contains_key(e)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{when}: council {code}: {} notices missing {missing:?}, {} unexpected \
                 {extra:?} (seed {seed})",
                missing.len(),
                extra.len()
            );
            assert_eq!(
                &seen, want,
                "{when}: council {code} plan types (seed {seed})"
            );
            let ids: Vec<_> = got.iter().map(|n| n.id).collect();
            assert_eq!(council.ack(&ids).await.unwrap(), ids.len() as u64);
            assert!(council.notifications().await.unwrap().is_empty());
            total += got.len();
        }
        total
    }
}

// ---- fleets (the storm and the replicas scenario) -------------------------------------

/// One big fleet at a time: two at once would need twice the open files and share two cores.
pub(crate) static ONE_FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn fleet_size() -> usize {
    std::env::var("CPIS_FLEET_AGENTS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(2_000)
}

/// The loops' timing: no periodic poll within a test (the interval is an hour); a failure
/// backs off 2–30 s with full jitter, so during the outage every tablet keeps failing.
pub(crate) fn schedule() -> ScheduleConfig {
    ScheduleConfig {
        interval: Duration::from_secs(3600),
        interval_jitter: Duration::from_secs(60),
        soon: Duration::from_secs(1),
        min_gap: Duration::from_secs(1),
        backoff_min: Duration::from_secs(2),
        backoff_max: Duration::from_secs(30),
        retry_after_max: Duration::from_secs(60),
        // The scenarios measure the polling loop's recovery; the live feed has its own.
        live: false,
        ..ScheduleConfig::default()
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sum of the samples of `name` whose labels contain `with`.
pub(crate) fn metric_sum(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// What changed in the fleet's counters between two moments.
pub(crate) fn delta(before: &Counts, after: &Counts) -> Counts {
    Counts {
        attempts: after.attempts - before.attempts,
        synced: after.synced - before.synced,
        shed_429: after.shed_429 - before.shed_429,
        shed_503: after.shed_503 - before.shed_503,
        shed_without_retry_after: after.shed_without_retry_after - before.shed_without_retry_after,
        retry_after_max: after.retry_after_max,
        retry_after_early: after.retry_after_early - before.retry_after_early,
        events_left: after.events_left - before.events_left,
        unreachable: after.unreachable - before.unreachable,
        unreachable_since_back: after.unreachable_since_back - before.unreachable_since_back,
        revoked: after.revoked - before.revoked,
        enrol_shed: after.enrol_shed - before.enrol_shed,
        other: after.other - before.other,
        other_errors: after.other_errors.clone(),
        unreachable_errors: after.unreachable_errors.clone(),
    }
}
