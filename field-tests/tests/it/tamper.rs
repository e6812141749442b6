//! Tamper: a man-in-the-middle the tablet trusts at the TLS level (so only the signatures
//! protect the data) flips bits, truncates and extends bodies, alters signatures, serves
//! another region's checkpoint, delta and snapshot, and replays an older checkpoint and
//! snapshot. Each is rejected by the real agent for its own reason (digest, truncated,
//! oversize, bad signature, wrong region, rollback), which keeps its previous data
//! (DESIGN.md §2 rules 4 and 5); with the tampering stopped it syncs normally.

use std::collections::BTreeSet;

use cpis_field_tests::harness::Tablet;
use cpis_field_tests::tamper::{Action, Rule, TamperProxy, Target};
use cpis_protocol::{FlagRecord, LookupResult, NhsNumber};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, Field};

const FLAGS: usize = 5_000;

/// A tablet enrolled through its own tamper proxy (trusting the server's CA and the proxy's).
async fn tablet_behind(field: &Field, name: &str, mitm: &TamperProxy, token: &str) -> Tablet {
    let ca = field.path(&format!("{name}-ca.pem"));
    std::fs::write(&ca, format!("{}\n{}", field.server.ca_pem(), mitm.ca_pem())).unwrap();
    let tablet = Tablet::enrol(&field.path(name), &mitm.base_url(), &ca, token)
        .await
        .unwrap();
    mitm.set_identity_from(tablet.state_dir()).unwrap();
    tablet
}

/// The last line the agent printed on stderr (its error).
fn reason(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .chars()
        .take(160)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_answers_are_rejected_and_the_previous_data_kept() {
    let seed = common::seed("tamper");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut field = Field::start(seed, FLAGS).await;

    // Region B gets flags of its own (copies of some of A's subjects).
    let region_b = field.directory.regions[1].clone();
    let council_b = region_b.councils[0].clone();
    let mut seen = BTreeSet::new();
    let list_b: Vec<FlagRecord> = field
        .lists
        .values()
        .flatten()
        .filter(|f| seen.insert((f.nhs_number, f.plan_type)))
        .take(300)
        .map(|f| FlagRecord {
            council: council_b.clone(),
            ..f.clone()
        })
        .collect();
    field.upload(&council_b, list_b.clone()).await;

    let url = field.server.base_url();
    let mitm_a = TamperProxy::start(&url, field.server.ca_pem(), seed)
        .await
        .unwrap();
    let mitm_b = TamperProxy::start(&url, field.server.ca_pem(), seed ^ 1)
        .await
        .unwrap();
    let token_a = field.enrolment_token().await;
    let tablet_a = tablet_behind(&field, "a", &mitm_a, &token_a).await;
    let token_b = field
        .server
        .enrolment_token(&region_b.trust, &region_b.id, 1)
        .await
        .unwrap();
    let tablet_b = tablet_behind(&field, "b", &mitm_b, &token_b).await;

    // Both take their first snapshot; keep what the proxies saw for replays.
    tablet_a.sync().await.unwrap();
    tablet_b.sync().await.unwrap();
    let a1_checkpoint = mitm_a.recorded(Target::Checkpoint).unwrap();
    let a1_meta = mitm_a.recorded(Target::SnapshotMeta).unwrap();
    let a1_body = mitm_a.recorded(Target::SnapshotBody).unwrap();
    let b_meta = mitm_b.recorded(Target::SnapshotMeta).unwrap();
    let b_body = mitm_b.recorded(Target::SnapshotBody).unwrap();
    let a1 = tablet_a.status().await.unwrap();

    // The councils change: A's biggest council drops a probe subject and ~5% of its rows; B
    // drops some rows, and tablet B takes the delta (recorded for the replay to A).
    let (council_a, list_a) = field
        .lists
        .iter()
        .filter(|(c, _)| field.carried.contains(*c))
        .max_by_key(|(_, l)| l.len())
        .map(|(c, l)| (c.clone(), l.clone()))
        .unwrap();
    let elsewhere: BTreeSet<NhsNumber> = field
        .lists
        .iter()
        .filter(|(c, _)| field.carried.contains(*c) && **c != council_a)
        .flat_map(|(_, l)| l.iter().map(|f| f.nhs_number))
        .collect();
    let candidates: Vec<NhsNumber> = list_a
        .iter()
        .map(|f| f.nhs_number)
        .filter(|n| !elsewhere.contains(n))
        .collect();
    let probe = *candidates.choose(&mut rng).unwrap();
    let list_a2: Vec<FlagRecord> = list_a
        .iter()
        .filter(|f| f.nhs_number != probe && rng.gen_bool(0.95))
        .cloned()
        .collect();
    field.upload(&council_a, list_a2).await;
    let list_b2 = list_b
        .iter()
        .filter(|_| rng.gen_bool(0.9))
        .cloned()
        .collect();
    field.upload(&council_b, list_b2).await;
    assert_eq!(tablet_b.sync().await.unwrap().action, "delta");
    let b_checkpoint = mitm_b.recorded(Target::Checkpoint).unwrap();
    let b_delta = mitm_b.recorded(Target::Delta).unwrap();

    let gone = || Rule::new(Target::Delta, Action::Status(410));
    let mut cases: Vec<(&str, &str, Vec<Rule>)> = vec![
        (
            "a bit flipped in a delta",
            "digest",
            vec![Rule::new(Target::Delta, Action::FlipBodyBit)],
        ),
        (
            "a delta cut short",
            "truncated",
            vec![Rule::new(Target::Delta, Action::Truncate(0.5))],
        ),
        (
            "a delta longer than signed",
            "oversize",
            vec![Rule::new(Target::Delta, Action::Extend(4096))],
        ),
        (
            "a delta's signature altered",
            "bad signature",
            vec![Rule::new(Target::Delta, Action::FlipSignature)],
        ),
        (
            "another region's delta",
            "wrong region",
            vec![Rule::new(Target::Delta, Action::Replace(b_delta))],
        ),
        (
            "another region's checkpoint",
            "wrong region",
            vec![Rule::new(Target::Checkpoint, Action::Replace(b_checkpoint))],
        ),
        (
            "a checkpoint's signature altered",
            "bad signature",
            vec![Rule::new(Target::Checkpoint, Action::FlipSignature)],
        ),
        (
            "a bit flipped in a snapshot",
            "digest",
            vec![gone(), Rule::new(Target::SnapshotBody, Action::FlipBodyBit)],
        ),
        (
            "a snapshot cut short",
            "truncated",
            vec![
                gone(),
                Rule::new(Target::SnapshotBody, Action::Truncate(0.5)),
            ],
        ),
        (
            "a snapshot longer than signed",
            "oversize",
            vec![
                gone(),
                Rule::new(Target::SnapshotBody, Action::Extend(4096)),
            ],
        ),
        (
            "a snapshot's signature altered",
            "bad signature",
            vec![
                gone(),
                Rule::new(Target::SnapshotMeta, Action::FlipSignature),
            ],
        ),
        (
            "another region's snapshot",
            "wrong region",
            vec![
                gone(),
                Rule::new(Target::SnapshotMeta, Action::Replace(b_meta)),
                Rule::new(Target::SnapshotBody, Action::Replace(b_body)),
            ],
        ),
    ];
    let mut reasons = Vec::new();
    let mut check_rejected =
        async |tablet: &Tablet, cases: &mut Vec<(&str, &str, Vec<Rule>)>, held| {
            for (name, because, rules) in cases.drain(..) {
                mitm_a.set_rules(rules);
                let out = tablet.try_sync().await.unwrap();
                assert!(!out.success(), "{name}: accepted (seed {seed})");
                assert!(
                    out.stderr.contains(because),
                    "{name}: rejected, but not for {because:?}: {} (seed {seed})",
                    out.stderr.trim()
                );
                let st = tablet.status().await.unwrap();
                assert_eq!(st.version, held, "{name}: the data changed (seed {seed})");
                reasons.push(format!("{name}: {}", reason(&out.stderr)));
            }
            mitm_a.set_rules(Vec::new());
        };
    check_rejected(&tablet_a, &mut cases, a1.version).await;
    // The first data was kept whole: same subjects, and the probe still answers flagged.
    let st = tablet_a.status().await.unwrap();
    assert_eq!(st.subjects, a1.subjects, "seed {seed}");
    let answer = tablet_a.lookup_offline(&probe).await.unwrap();
    assert_eq!(
        answer.result,
        LookupResult::Flagged,
        "{probe} (seed {seed})"
    );

    // Without tampering the tablet moves on (the probe's flag is gone).
    let synced = tablet_a.sync().await.unwrap();
    assert!(synced.version >= Some(field.head), "seed {seed}");
    let answer = tablet_a.lookup_offline(&probe).await.unwrap();
    assert_eq!(
        answer.result,
        LookupResult::NotFlagged,
        "{probe} (seed {seed})"
    );
    let a2 = tablet_a.status().await.unwrap();
    assert_eq!(
        a2.subjects,
        field.expected_at(a2.version.unwrap()).unwrap().subjects()
    );

    // Replays of the older checkpoint and snapshot, once the server has moved on again.
    let list_a3: Vec<FlagRecord> = list_a
        .iter()
        .filter(|_| rng.gen_bool(0.95))
        .cloned()
        .collect();
    field.upload(&council_a, list_a3).await;
    let mut replays: Vec<(&str, &str, Vec<Rule>)> = vec![
        (
            "an older checkpoint replayed",
            "rollback",
            vec![Rule::new(
                Target::Checkpoint,
                Action::Replace(a1_checkpoint),
            )],
        ),
        (
            "an older snapshot replayed",
            "rollback",
            vec![
                gone(),
                Rule::new(Target::SnapshotMeta, Action::Replace(a1_meta)),
                Rule::new(Target::SnapshotBody, Action::Replace(a1_body)),
            ],
        ),
    ];
    check_rejected(&tablet_a, &mut replays, a2.version).await;
    assert_eq!(tablet_a.status().await.unwrap().subjects, a2.subjects);
    let synced = tablet_a.sync().await.unwrap();
    assert!(synced.version >= Some(field.head), "seed {seed}");

    eprintln!(
        "[tamper] {} tampered answers, every one rejected with the data kept:\n  {}",
        mitm_a.stats().tampered,
        reasons.join("\n  ")
    );
    mitm_a.shutdown().await;
    mitm_b.shutdown().await;
}
