//! Browser tests: the pages people use, in headless Chromium (Debian's `chromium`, driven
//! through `chromedriver`), against the real binaries.
//!
//! * [`paramedic`]: the page `cpis-agent run` serves on loopback — staff id first, FLAGGED,
//!   NOT FLAGGED and invalid input, by keyboard alone, at 200% zoom and on a portrait
//!   tablet, and the STALE banner once the server has been out of reach longer than its
//!   freshness policy allows;
//! * [`council`]: the sync server's council inbox — sign in with the council's token, see the
//!   notice a tablet's lookup produced, acknowledge it, it is gone;
//! * [`fleet`]: the trust fleet page — sign in with a trust admin token, see the tablet,
//!   revoke it with confirmation, it leaves the active list.
//!
//! Every state is audited with axe-core (zero violations) and photographed; the PNGs are
//! kept in `<target>/browser-artefacts/<flow>/` (or `$CPIS_ARTEFACTS_DIR/<flow>/`). The tools
//! are installed by `field-tests/browser/install.sh`, which the tests run when Chromium,
//! chromedriver or axe-core is missing. The flows run one at a time (a 2-core CI machine
//! runs one Chromium well, three badly); each prints how long it took.

mod council;
mod driver;
mod fleet;
mod paramedic;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cpis_field_tests::harness::{AgentDaemon, ServerProcess, Tablet};
use cpis_fixtures::{Config, Dataset, Directory};
use cpis_protocol::{CouncilCode, FlagRecord, NhsNumber, TrustCode};
use tempfile::TempDir;

/// Flags in the region (enough for a few subjects with several plans, small enough to set
/// up in a second or two).
const FLAGS: usize = 60;
/// Bound on one whole flow, setup included (the binaries are built before it starts).
const FLOW_TIMEOUT: Duration = Duration::from_secs(240);

/// One flow at a time in this test process.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a flow with the lock held and a time bound; prints its time.
async fn run_flow<F, Fut>(name: &str, flow: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let _one = ONE_AT_A_TIME.lock().await;
    if let Err(e) = driver::ensure_tools().await {
        panic!("[{name}] the browser tools could not be installed: {e:#}");
    }
    // The binaries are built (on a clean checkout, minutes) before the flow's clock starts.
    match tokio::task::spawn_blocking(cpis_field_tests::harness::bins).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("[{name}] the binaries could not be built: {e:#}"),
        Err(e) => panic!("[{name}] building the binaries failed: {e}"),
    }
    let started = Instant::now();
    match tokio::time::timeout(FLOW_TIMEOUT, flow()).await {
        Ok(Ok(())) => eprintln!(
            "[{name}] flow passed in {:.1} s (screenshots in {})",
            started.elapsed().as_secs_f64(),
            driver::artefacts_root().join(name).display()
        ),
        Ok(Err(e)) => panic!(
            "[{name}] failed after {:.1} s: {e:?}",
            started.elapsed().as_secs_f64()
        ),
        Err(_) => panic!("[{name}] did not finish within {FLOW_TIMEOUT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paramedic_page() {
    run_flow("paramedic", paramedic::run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn council_inbox() {
    run_flow("council", council::run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_revoke() {
    run_flow("fleet", fleet::run).await;
}

/// A real server holding one region's flags, and one enrolled tablet of that region running
/// `cpis-agent run` (its page and API on a loopback port).
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) dir: TempDir,
    pub(crate) server: ServerProcess,
    pub(crate) directory: Directory,
    pub(crate) trust: TrustCode,
    /// Councils whose flags the region's tablets carry.
    pub(crate) carried: BTreeSet<CouncilCode>,
    /// Every council's uploaded list.
    pub(crate) lists: BTreeMap<CouncilCode, Vec<FlagRecord>>,
    pub(crate) agent: AgentDaemon,
    pub(crate) seed: u64,
}

/// Freshness policy for a world, in seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Freshness {
    pub(crate) fresh_secs: u64,
    pub(crate) expiry_secs: u64,
}

impl World {
    /// Server (2 regions, 4 councils, [`FLAGS`] flags in the first region), uploads, a tablet
    /// enrolled and synced, `cpis-agent run` started. With `policy`, the server's
    /// `server.toml` gets that freshness policy before it serves.
    pub(crate) async fn start(flow: &str, policy: Option<Freshness>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let seed = cpis_field_tests::seed::pick();
        eprintln!(
            "[{flow}] seed {seed} (replay with {}={seed})",
            cpis_field_tests::seed::SEED_ENV
        );
        let dir = TempDir::new()?;
        let config = Config::new(seed, chrono::Utc::now().date_naive())
            .with_regions(2)
            .with_councils(4);
        let directory = Directory::generate(&config)?;
        let region = directory.regions[0].clone();
        let carried = directory
            .carried_councils(&region.id)
            .into_iter()
            .cloned()
            .collect();
        let dataset = Dataset::generate_region(&config, &region.id, FLAGS)?;
        let data_dir = dir.path().join("server");
        let mut server =
            ServerProcess::init_and_start(&data_dir, "127.0.0.1:0".parse()?, &dataset.directory)
                .await?;
        if let Some(p) = policy {
            server.stop().await?;
            set_policy(&data_dir, p)?;
            server.start().await?;
        }
        let mut lists = BTreeMap::new();
        for (code, list) in &dataset.flags_by_council {
            if list.is_empty() {
                continue;
            }
            server
                .council(code)
                .await?
                .upload(list)
                .await
                .with_context(|| format!("uploading {code}'s flags (seed {seed})"))?;
            lists.insert(code.clone(), list.clone());
        }
        let token = server.enrolment_token(&region.trust, &region.id, 1).await?;
        let tablet = Tablet::enrol(
            &dir.path().join("tablet"),
            &server.base_url(),
            &server.ca_path(),
            &token,
        )
        .await?;
        tablet.sync().await?;
        let agent = tablet.run_api("127.0.0.1:0".parse()?).await?;
        eprintln!(
            "[{flow}] server {} and tablet page {} ready in {:.1} s",
            server.base_url(),
            agent.base_url(),
            started.elapsed().as_secs_f64()
        );
        Ok(Self {
            dir,
            server,
            directory: dataset.directory,
            trust: region.trust,
            carried,
            lists,
            agent,
            seed,
        })
    }

    /// Active (not ended) flags the region's tablets carry, by NHS number.
    pub(crate) fn carried_flags(&self) -> BTreeMap<NhsNumber, Vec<&FlagRecord>> {
        let today = chrono::Utc::now().date_naive();
        let mut by = BTreeMap::<NhsNumber, Vec<&FlagRecord>>::new();
        for (code, list) in &self.lists {
            if !self.carried.contains(code) {
                continue;
            }
            for f in list.iter().filter(|f| !f.is_ended(today)) {
                by.entry(f.nhs_number).or_default().push(f);
            }
        }
        by
    }

    /// A flagged NHS number chosen with the seed, preferring one with more than one plan.
    pub(crate) fn flagged(&self) -> (NhsNumber, Vec<FlagRecord>) {
        let all = self.carried_flags();
        let max = all.values().map(Vec::len).max().unwrap_or(0);
        let best: Vec<_> = all.iter().filter(|(_, f)| f.len() == max).collect();
        let (n, flags) = best[(self.seed % best.len().max(1) as u64) as usize];
        (*n, flags.iter().map(|f| (*f).clone()).collect())
    }

    /// A valid NHS number no council has flagged.
    pub(crate) fn not_flagged(&self) -> NhsNumber {
        let flagged: BTreeSet<NhsNumber> = self
            .lists
            .values()
            .flatten()
            .map(|f| f.nhs_number)
            .collect();
        *cpis_fixtures::test_nhs_numbers()
            .iter()
            .rev()
            .find(|n| !flagged.contains(n))
            .unwrap_or_else(|| unreachable!("the test number pool is larger than {FLAGS}"))
    }

    /// A council's name.
    pub(crate) fn council_name(&self, code: &CouncilCode) -> &str {
        self.directory
            .councils
            .iter()
            .find(|c| &c.code == code)
            .map_or("?", |c| c.name.as_str())
    }
}

/// Writes the freshness policy into the server's `server.toml` (the file `init` wrote).
fn set_policy(data_dir: &Path, p: Freshness) -> anyhow::Result<()> {
    let path = data_dir.join("server.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut seen = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("fresh_secs") {
                seen += 1;
                format!("fresh_secs = {}", p.fresh_secs)
            } else if l.trim_start().starts_with("expiry_secs") {
                seen += 1;
                format!("expiry_secs = {}", p.expiry_secs)
            } else {
                l.to_owned()
            }
        })
        .collect();
    anyhow::ensure!(
        seen == 2,
        "{} has no fresh_secs and expiry_secs lines to set",
        path.display()
    );
    std::fs::write(&path, out.join("\n") + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// `9991234567` as crews write it: `999 123 4567`.
pub(crate) fn spaced(n: &NhsNumber) -> String {
    let s = n.to_string();
    format!("{} {} {}", &s[..3], &s[3..6], &s[6..])
}

/// Only the digits of a text.
pub(crate) fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Lower case, hyphens as spaces, runs of white space as one (to compare wording).
pub(crate) fn words(s: &str) -> String {
    s.to_lowercase()
        .replace('-', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
