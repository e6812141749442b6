//! Shared setup of the scenarios: seeds, a real server holding a seeded region of flags from
//! `cpis-fixtures`, and the expectations a tablet is checked against.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use cpis_field_tests::harness::{CouncilClient, ServerProcess, Tablet};
use cpis_fixtures::{Config, Dataset};
use cpis_protocol::{CouncilCode, FlagRecord, NhsNumber, RegionId, TrustCode};
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

/// A running server with one region's flags uploaded.
pub(crate) struct Field {
    pub(crate) dir: TempDir,
    pub(crate) server: ServerProcess,
    pub(crate) region: RegionId,
    pub(crate) trust: TrustCode,
    /// Every council's current list, as last uploaded.
    pub(crate) lists: BTreeMap<CouncilCode, Vec<FlagRecord>>,
    /// Upload clients of the region's councils that hold flags.
    pub(crate) councils: BTreeMap<CouncilCode, CouncilClient>,
    /// The version after the last upload.
    pub(crate) head: u64,
    pub(crate) seed: u64,
}

impl Field {
    /// A server (2 regions, 4 councils) whose first region's own councils hold `flags` flags
    /// in all, generated from `seed` as of today (the server refuses future start dates and
    /// plans ended over 12 months ago, so fixtures must describe today).
    pub(crate) async fn start(seed: u64, flags: usize) -> Field {
        let dir = TempDir::new().unwrap();
        let as_of = chrono::Utc::now().date_naive();
        let config = Config::new(seed, as_of).with_regions(2).with_councils(4);
        let directory = cpis_fixtures::Directory::generate(&config).unwrap();
        let region = directory.regions[0].clone();
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
            lists: BTreeMap::new(),
            councils: BTreeMap::new(),
            head: 0,
            seed,
        };
        for (code, list) in &dataset.flags_by_council {
            if list.is_empty() {
                continue;
            }
            let client = field.server.council(code).await.unwrap();
            field.councils.insert(code.clone(), client);
            field.upload(code, list.clone()).await;
        }
        field
    }

    /// Uploads a council's full list; returns the version after it.
    pub(crate) async fn upload(&mut self, code: &CouncilCode, list: Vec<FlagRecord>) -> u64 {
        let receipt = self.councils[code]
            .upload(&list)
            .await
            .unwrap_or_else(|e| panic!("upload for {code} (seed {}): {e:#}", self.seed));
        self.lists.insert(code.clone(), list);
        self.head = self.head.max(receipt.version);
        receipt.version
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

    /// What a tablet holding the current lists must show.
    pub(crate) fn expected(&self) -> Expected {
        Expected::of(self.lists.values().flatten())
    }

    /// `n` flagged NHS numbers of the current lists, chosen with the seed.
    pub(crate) fn sample_flagged(&self, n: usize) -> Vec<NhsNumber> {
        let all: Vec<NhsNumber> = self.expected().flagged.into_iter().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        all.choose_multiple(&mut rng, n).copied().collect()
    }
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
