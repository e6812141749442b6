//! kill -9 at seeded random points: the agent part way through syncs (snapshots, deltas and
//! access-event uploads) and the server between and during them, across many rounds of council
//! uploads and lookups. After every kill the tablet holds exactly one version the server
//! published — its subject count and probe lookups match that version — never a mix
//! (DESIGN.md §2 rule 4); syncing always recovers to the head, so no acknowledged upload was
//! lost by a server crash; and in the end every flagged lookup reached each council it showed
//! exactly once (rule 3).

use std::time::Instant;

use cpis_field_tests::harness::Tablet;
use cpis_protocol::{CouncilCode, FlagRecord, LookupResult, NhsNumber};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, Expected, Field, Notices};

const FLAGS: usize = 20_000;
const ROUNDS: usize = 50;
/// Numbers whose flags come and go between versions, to tell versions apart by lookups.
const PROBES: usize = 8;
/// Probes looked up after each kill (all of them at the end).
const PROBES_PER_CHECK: usize = 3;

/// The scenario's state: the server's published versions and the tablet under test.
struct Run {
    field: Field,
    rng: ChaCha8Rng,
    seed: u64,
    /// The council whose list changes, and its original list.
    council: CouncilCode,
    base: Vec<FlagRecord>,
    probes: Vec<NhsNumber>,
    /// What the lookups showed, so what councils are owed.
    notices: Notices,
}

impl Run {
    /// Uploads a new list for the changing council: about 5% of its rows dropped and each
    /// probe present or not at random.
    async fn publish(&mut self) -> u64 {
        let probes = self.probes.clone();
        let keep_probe: Vec<bool> = probes.iter().map(|_| self.rng.gen_bool(0.5)).collect();
        let list: Vec<FlagRecord> = self
            .base
            .iter()
            .filter(|f| match probes.iter().position(|p| *p == f.nhs_number) {
                Some(i) => keep_probe[i],
                None => self.rng.gen_bool(0.95),
            })
            .cloned()
            .collect();
        self.field.upload(&self.council.clone(), list).await
    }

    /// Checks the tablet holds exactly one published version (or none yet); returns it.
    async fn check(&mut self, tablet: &Tablet, probes: usize, when: &str) -> Option<u64> {
        let seed = self.seed;
        let status = tablet
            .status()
            .await
            .unwrap_or_else(|e| panic!("status {when} (seed {seed}): {e:#}"));
        let Some(v) = status.version else {
            assert_eq!(
                status.subjects, 0,
                "no version but subjects {when} (seed {seed})"
            );
            return None;
        };
        let expected = self
            .field
            .expected_at(v)
            .unwrap_or_else(|e| panic!("{when}: the tablet holds a torn state: {e} (seed {seed})"))
            .clone();
        assert_eq!(
            status.subjects,
            expected.subjects(),
            "{when}: subjects at version {v} (seed {seed})"
        );
        let mut chosen = self.probes.clone();
        chosen.shuffle(&mut self.rng);
        for nhs in chosen.into_iter().take(probes) {
            // The tablet's own data: a miss would otherwise be checked online against the
            // server's current flags.
            let answer = tablet.lookup_offline(&nhs).await.unwrap();
            self.notices.record(&answer);
            let want = if expected.flagged.contains(&nhs) {
                LookupResult::Flagged
            } else {
                LookupResult::NotFlagged
            };
            assert_eq!(
                answer.result, want,
                "{when}: {nhs} at version {v} (seed {seed})"
            );
        }
        Some(v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_agent_and_server_at_random_points_never_tears_the_data() {
    let seed = common::seed("kill-9");
    let field = Field::start(seed, FLAGS).await;
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (council, base) = field
        .lists
        .iter()
        .max_by_key(|(_, l)| l.len())
        .map(|(c, l)| (c.clone(), l.clone()))
        .unwrap();
    // Probes: numbers of the changing council that no other council flags.
    let others = Expected::of(
        field
            .lists
            .iter()
            .filter(|(c, _)| **c != council)
            .flat_map(|(_, l)| l),
    );
    let mut candidates: Vec<NhsNumber> = base
        .iter()
        .map(|f| f.nhs_number)
        .filter(|n| !others.flagged.contains(n))
        .collect();
    candidates.sort();
    candidates.dedup();
    let probes: Vec<NhsNumber> = candidates
        .choose_multiple(&mut rng, PROBES)
        .copied()
        .collect();
    let url = field.server.base_url();
    let pristine = field.enrol("pristine", &url).await;
    let mut run = Run {
        field,
        rng,
        seed,
        council,
        base,
        probes,
        notices: Notices::default(),
    };
    run.publish().await;

    // How long a full snapshot sync takes, to aim the kills.
    let timing = pristine.copy_to(&run.field.path("timing")).unwrap();
    let t = Instant::now();
    timing.sync().await.unwrap();
    let full = t.elapsed();
    eprintln!("[kill-9] a full snapshot sync of ~{FLAGS} flags takes {full:?}");

    let tablet = pristine.copy_to(&run.field.path("tablet")).unwrap();
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        let when = format!("round {round}");
        if run.rng.gen_bool(0.5) {
            run.field.server.start().await.unwrap();
            run.publish().await;
            tally.uploads += 1;
        }
        if run.rng.gen_bool(0.2) {
            // Back to a never-synced tablet: the next sync is a full snapshot. Its outbox is
            // delivered first (replacing the state directory would drop it).
            run.field.server.start().await.unwrap();
            tablet.sync().await.unwrap();
            let pending = tablet.status().await.unwrap().outbox_pending;
            assert_eq!(
                pending, 0,
                "{when}: events left after a clean sync (seed {seed})"
            );
            tablet.reset_from(&pristine).unwrap();
            tally.resets += 1;
        }
        let agent_kill = full.mul_f64(run.rng.gen_range(0.0..1.2));
        let server_kill = run
            .rng
            .gen_bool(0.3)
            .then(|| full.mul_f64(run.rng.gen_range(0.0..1.2)));
        let before = run.check(&tablet, 0, &when).await;

        let mut sync = tablet.spawn_sync().unwrap();
        let t0 = tokio::time::Instant::now();
        let mut events = vec![(agent_kill, "agent")];
        if let Some(at) = server_kill {
            events.push((at, "server"));
        }
        events.sort();
        for (at, what) in events {
            // The kill points themselves, not synchronisation.
            tokio::time::sleep_until(t0 + at).await;
            if what == "agent" {
                if sync.kill9().await.unwrap() {
                    tally.agent_kills += 1;
                }
            } else {
                run.field.server.kill9().await.unwrap();
                tally.server_kills += 1;
            }
        }
        let after = run.check(&tablet, PROBES_PER_CHECK, &when).await;
        tally.outcomes.push(match (before, after) {
            (_, None) => 'n',
            (b, a) if b == a => 'o',
            _ => 'N',
        });
        // The server comes back on the same data dir; recovery is checked now and then.
        run.field.server.start().await.unwrap();
        if round % 6 == 5 {
            let synced = tablet.sync().await.unwrap_or_else(|e| {
                panic!("{when}: a clean sync after the kills failed (seed {seed}): {e:#}")
            });
            assert!(
                synced.version >= Some(run.field.head),
                "{when}: synced to {:?}, below the last upload {} (seed {seed})",
                synced.version,
                run.field.head
            );
            run.check(&tablet, PROBES_PER_CHECK, &format!("{when}, recovered"))
                .await;
        }
    }

    // In the end: every acknowledged upload survived the server's kills and the tablet
    // reaches the head.
    run.field.server.start().await.unwrap();
    let synced = tablet.sync().await.unwrap();
    assert!(synced.version >= Some(run.field.head), "seed {seed}");
    run.check(&tablet, PROBES, "at the end").await;
    // The end-of-run lookups go out with one more sync; then every notice is there, once.
    tablet.sync().await.unwrap();
    let status = tablet.status().await.unwrap();
    assert_eq!(status.outbox_pending, 0, "seed {seed}");
    let delivered = run.notices.check_delivered(&run.field, "at the end").await;
    assert_eq!(delivered, run.notices.owed());
    eprintln!(
        "[kill-9] {ROUNDS} rounds in {:?}: {} uploads ({} acknowledged in all), {} tablet resets, \
         {} agent kills mid-sync, {} server kills ({} starts); after each kill the tablet held \
         [o]ld / [N]ew / [n]o version: {}; {} lookups ({} flagged), {delivered} notices \
         delivered once each",
        started.elapsed(),
        tally.uploads,
        run.field.uploads.len(),
        tally.resets,
        tally.agent_kills,
        tally.server_kills,
        run.field.server.starts(),
        tally.outcomes.iter().collect::<String>(),
        run.notices.lookups,
        run.notices.flagged,
    );
    assert!(
        tally.agent_kills > 0,
        "no kill landed mid-sync (seed {seed})"
    );
}

#[derive(Debug, Default)]
struct Tally {
    uploads: usize,
    resets: usize,
    agent_kills: usize,
    server_kills: usize,
    outcomes: Vec<char>,
}
