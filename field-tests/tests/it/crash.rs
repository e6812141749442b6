//! kill -9 at seeded random points: the agent part way through syncs (snapshots, deltas and
//! access-event uploads) and the server between and during them, across 1,000 operations of
//! council uploads, syncs and lookups. After every kill the tablet holds exactly one version
//! the server published — its subject count and probe lookups match that version — never a
//! mix (DESIGN.md §2 rule 4); syncing always recovers to the head, so no acknowledged upload
//! was lost by a server crash; and in the end every flagged lookup reached each council it
//! showed exactly once (rule 3).
//!
//! What counts as one operation (the run goes on, round after round, until there have been
//! [`OPERATIONS`]): an acknowledged council upload; a `cpis-agent sync` started (killed part
//! way or not); a `cpis-agent lookup`; a server start after a kill; a tablet reset to
//! never-synced. `status` calls that check the tablet between them are not counted.

use std::time::Instant;

use cpis_field_tests::harness::Tablet;
use cpis_protocol::{CouncilCode, FlagRecord, LookupResult, NhsNumber};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, Expected, Field, Notices};

const FLAGS: usize = 20_000;
/// Operations to run (see the module documentation for what counts).
const OPERATIONS: usize = 1_000;
/// Numbers whose flags come and go between versions, to tell versions apart by lookups.
const PROBES: usize = 8;
/// Probes looked up after each kill (all of them at the end).
const PROBES_PER_CHECK: usize = 3;
/// Probes looked up before each killed sync, so that it has access events to upload.
const PROBES_BEFORE_SYNC: usize = 2;

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

    // How long a full snapshot sync and a delta sync take, to aim the kills.
    let timing = pristine.copy_to(&run.field.path("timing")).unwrap();
    let t = Instant::now();
    timing.sync().await.unwrap();
    let full = t.elapsed();
    run.publish().await;
    let t = Instant::now();
    let delta_sync = timing.sync().await.unwrap();
    let delta = t.elapsed();
    assert_eq!(delta_sync.action, "delta", "seed {seed}");
    eprintln!(
        "[kill-9] a full snapshot sync of ~{FLAGS} flags takes {full:?}, a delta sync {delta:?}"
    );

    let tablet = pristine.copy_to(&run.field.path("tablet")).unwrap();
    let mut tally = Tally {
        uploads: 2,
        ..Tally::default()
    };
    let mut round = 0;
    while tally.operations(&run.notices) < OPERATIONS {
        let when = format!("round {round}");
        if run.rng.gen_bool(0.5) {
            tally.restart(&mut run).await;
            run.publish().await;
            tally.uploads += 1;
        }
        if run.rng.gen_bool(0.2) {
            // Back to a never-synced tablet: the next sync is a full snapshot. Its outbox is
            // delivered first (replacing the state directory would drop it).
            tally.restart(&mut run).await;
            tablet.sync().await.unwrap();
            tally.syncs += 1;
            let pending = tablet.status().await.unwrap().outbox_pending;
            assert_eq!(
                pending, 0,
                "{when}: events left after a clean sync (seed {seed})"
            );
            tablet.reset_from(&pristine).unwrap();
            tally.resets += 1;
        }
        // Lookups first, so that the sync has access events to upload when it is killed.
        let before = run.check(&tablet, PROBES_BEFORE_SYNC, &when).await;
        let pending_before = tablet.status().await.unwrap().outbox_pending;
        // Aimed across the sync this tablet is about to make: a snapshot when it holds
        // nothing, else a delta (or nothing new); the server's kill across a full sync.
        let span = if before.is_none() { full } else { delta };
        let agent_kill = span.mul_f64(run.rng.gen_range(0.0..1.2));
        let server_kill = run
            .rng
            .gen_bool(0.3)
            .then(|| full.mul_f64(run.rng.gen_range(0.0..1.2)));

        tally.restart(&mut run).await;
        let mut sync = tablet.spawn_sync().unwrap();
        tally.syncs += 1;
        let t0 = tokio::time::Instant::now();
        let mut events = vec![(agent_kill, "agent")];
        if let Some(at) = server_kill {
            events.push((at, "server"));
        }
        events.sort();
        let mut killed_mid_sync = false;
        for (at, what) in events {
            // The kill points themselves, not synchronisation.
            tokio::time::sleep_until(t0 + at).await;
            if what == "agent" {
                if sync.kill9().await.unwrap() {
                    tally.agent_kills += 1;
                    if before.is_none() {
                        tally.snapshot_kills += 1;
                    }
                    killed_mid_sync = true;
                }
            } else {
                run.field.server.kill9().await.unwrap();
                tally.server_kills += 1;
            }
        }
        let pending_after = tablet.status().await.unwrap().outbox_pending;
        let after = run.check(&tablet, PROBES_PER_CHECK, &when).await;
        if killed_mid_sync {
            // Where the kill landed, as far as the tablet shows it: before the feed was
            // applied, after it with the events not (all) acknowledged, or after both.
            let phase = match (before == after, pending_after) {
                (true, _) if pending_before > 0 && pending_after < pending_before => 'e',
                (true, _) => 'f',
                (false, p) if p > 0 => 'u',
                (false, _) => 'd',
            };
            tally.phases.push(phase);
        }
        tally.outcomes.push(match (before, after) {
            (_, None) => 'n',
            (b, a) if b == a => 'o',
            _ => 'N',
        });
        // The server comes back on the same data dir; recovery is checked now and then.
        tally.restart(&mut run).await;
        if round % 6 == 5 {
            let synced = tablet.sync().await.unwrap_or_else(|e| {
                panic!("{when}: a clean sync after the kills failed (seed {seed}): {e:#}")
            });
            tally.syncs += 1;
            assert!(
                synced.version >= Some(run.field.head),
                "{when}: synced to {:?}, below the last upload {} (seed {seed})",
                synced.version,
                run.field.head
            );
            run.check(&tablet, PROBES_PER_CHECK, &format!("{when}, recovered"))
                .await;
        }
        round += 1;
    }

    // In the end: every acknowledged upload survived the server's kills and the tablet
    // reaches the head.
    tally.restart(&mut run).await;
    let synced = tablet.sync().await.unwrap();
    assert!(synced.version >= Some(run.field.head), "seed {seed}");
    run.check(&tablet, PROBES, "at the end").await;
    // The end-of-run lookups go out with one more sync; then every notice is there, once.
    tablet.sync().await.unwrap();
    tally.syncs += 2;
    let status = tablet.status().await.unwrap();
    assert_eq!(status.outbox_pending, 0, "seed {seed}");
    let delivered = run.notices.check_delivered(&run.field, "at the end").await;
    assert_eq!(delivered, run.notices.owed());
    let count = |c: char| tally.phases.iter().filter(|p| **p == c).count();
    eprintln!(
        "[kill-9] {} operations in {round} rounds, {:?}: {} council uploads ({} acknowledged \
         in all), {} tablet syncs, {} lookups ({} flagged), {} server starts after a kill, {} \
         tablet resets; {} agent kills mid-sync ({} taking a snapshot, the others a delta or \
         nothing new; the tablet then showed: {} no change yet, {} a new version with events \
         still pending, {} a new version and no events pending, {} events acknowledged with \
         no new version), {} server kills; after each kill the tablet held [o]ld / [N]ew / \
         [n]o version: {}; {delivered} notices delivered once each; {} server starts retried \
         for a port held by another process",
        tally.operations(&run.notices),
        started.elapsed(),
        tally.uploads,
        run.field.uploads.len(),
        tally.syncs,
        run.notices.lookups,
        run.notices.flagged,
        tally.restarts,
        tally.resets,
        tally.agent_kills,
        tally.snapshot_kills,
        count('f'),
        count('u'),
        count('d'),
        count('e'),
        tally.server_kills,
        tally.outcomes.iter().collect::<String>(),
        run.field.server.port_busy(),
    );
    assert!(
        tally.agent_kills > 0,
        "no kill landed mid-sync (seed {seed})"
    );
}

/// What the run did; [`Tally::operations`] is what counts towards [`OPERATIONS`].
#[derive(Debug, Default)]
struct Tally {
    uploads: usize,
    syncs: usize,
    restarts: usize,
    resets: usize,
    agent_kills: usize,
    /// Agent kills during a sync that had to take a full snapshot (the others: deltas).
    snapshot_kills: usize,
    server_kills: usize,
    outcomes: Vec<char>,
    /// Where each agent kill landed, as the tablet shows it: `f` no change yet, `u` a new
    /// version with events still pending, `d` a new version and no events pending, `e`
    /// events acknowledged with no new version.
    phases: Vec<char>,
}

impl Tally {
    /// Uploads, syncs, lookups, server starts after a kill and tablet resets so far.
    fn operations(&self, notices: &Notices) -> usize {
        self.uploads + self.syncs + notices.lookups + self.restarts + self.resets
    }

    /// Starts the server if a kill stopped it (counted as an operation). The harness
    /// waits out a port held for a moment by another process's outgoing connection
    /// ([`ServerProcess::start`](cpis_field_tests::harness::ServerProcess::start)); any other
    /// failure to start fails the test.
    async fn restart(&mut self, run: &mut Run) {
        let seed = run.seed;
        if !run.field.server.is_running().unwrap() {
            match run.field.server.start().await {
                Ok(()) => self.restarts += 1,
                Err(e) => panic!("starting the server after a kill (seed {seed}): {e:#}"),
            }
        }
    }
}
