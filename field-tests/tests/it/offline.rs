//! A shift offline: twelve "hours" of lookups (compressed: a few lookups and a failed sync per
//! hour, the link refusing or resetting connections) while councils keep uploading, then the
//! tablet reconnects over a 2G-like link whose first connection is cut part way. Every lookup
//! was answered from the tablet's data; once back, every notice reaches its council exactly
//! once, nothing is left in the outbox, and the data converges to the server's head.

use std::time::{Duration, Instant};

use cpis_field_tests::proxy::{Cut, Faults, Proxy, Reset};
use cpis_protocol::LookupResult;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::common::{self, Field, Notices};

const FLAGS: usize = 8_000;
const HOURS: usize = 12;
const LOOKUPS_PER_HOUR: usize = 3;
/// Sync runs allowed after the link comes back.
const MAX_RECONNECT_ATTEMPTS: usize = 6;
/// The reconnection over 2G must be done within this.
const RECONNECT_BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_offline_then_2g_delivers_every_notice_once() {
    let seed = common::seed("shift-offline");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut field = Field::start(seed, FLAGS).await;
    let proxy = Proxy::start_seeded(field.server.addr(), Faults::none(), seed)
        .await
        .unwrap();
    let url = format!("https://127.0.0.1:{}", proxy.local_addr().port());
    let tablet = field
        .enrol("tablet", &url)
        .await
        .with_timeout(RECONNECT_BOUND);
    tablet.sync().await.unwrap();
    let at_start = field.expected();
    let flagged: Vec<_> = at_start.flagged.iter().copied().collect();

    // The shift: no usable link, lookups all along, councils uploading at the office.
    let mut notices = Notices::default();
    let uploads_before = field.uploads.len();
    let nobody = *cpis_fixtures::test_nhs_numbers()
        .iter()
        .rev()
        .find(|n| !at_start.flagged.contains(n))
        .unwrap();
    let mut failed_syncs = 0;
    let (council, base) = field
        .lists
        .iter()
        .max_by_key(|(_, l)| l.len())
        .map(|(c, l)| (c.clone(), l.clone()))
        .unwrap();
    for hour in 0..HOURS {
        let outage = if hour % 2 == 0 {
            Faults::none().with_refuse(true)
        } else {
            Faults::none().with_reset(Reset::OnAccept)
        };
        proxy.set_faults(outage).await.unwrap();
        for _ in 0..LOOKUPS_PER_HOUR {
            let nhs = if rng.gen_bool(0.6) {
                *flagged.choose(&mut rng).unwrap()
            } else {
                nobody
            };
            let answer = tablet.lookup(&nhs).await.unwrap();
            // Offline, the tablet answers from what it holds.
            let want = if at_start.flagged.contains(&nhs) {
                LookupResult::Flagged
            } else {
                LookupResult::NotFlagged
            };
            assert_eq!(answer.result, want, "hour {hour}: {nhs} (seed {seed})");
            // A miss's online national check could not reach the server.
            assert_eq!(answer.national, None, "hour {hour} (seed {seed})");
            notices.record(&answer);
        }
        let out = tablet.try_sync().await.unwrap();
        assert!(!out.success(), "hour {hour}: a sync got through the outage");
        failed_syncs += 1;
        if hour % 4 == 3 {
            // About 1% of the council's rows gone since the morning.
            let list = base
                .iter()
                .filter(|_| rng.gen_bool(0.99))
                .cloned()
                .collect();
            field.upload(&council, list).await;
        }
    }
    let status = tablet.status().await.unwrap();
    assert_eq!(status.outbox_pending, notices.lookups as u64, "seed {seed}");

    // Back on 2G; the first connection is cut part way through.
    // Within what one sync carries downstream (handshake, checkpoint, delta, events answer).
    let cut_at = rng.gen_range(1_000..6_000);
    proxy
        .set_faults(Faults {
            cut: Some(Cut {
                after_bytes: cut_at,
                every_connection: false,
            }),
            ..Faults::two_g()
        })
        .await
        .unwrap();
    let before = proxy.stats();
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = tablet.try_sync().await.unwrap();
        let pending = tablet.status().await.unwrap().outbox_pending;
        if out.success() && pending == 0 {
            break;
        }
        assert!(
            attempts < MAX_RECONNECT_ATTEMPTS,
            "not converged after {attempts} syncs over 2G ({pending} events pending) \
             (seed {seed}): {}",
            out.stderr.trim()
        );
    }
    let took = started.elapsed();
    let stats = proxy.stats();
    assert!(
        took < RECONNECT_BOUND,
        "reconnecting took {took:?} (seed {seed})"
    );

    let status = tablet.status().await.unwrap();
    assert!(status.version >= Some(field.head), "seed {seed}");
    let expected = field.expected_at(status.version.unwrap()).unwrap();
    assert_eq!(status.subjects, expected.subjects(), "seed {seed}");
    let delivered = notices.check_delivered(&field, "after the shift").await;
    assert_eq!(delivered, notices.owed());
    eprintln!(
        "[shift-offline] {HOURS} hours offline: {} lookups ({} flagged), {failed_syncs} syncs \
         refused or reset, {} uploads meanwhile; back on 2G with the first connection cut at \
         {cut_at} B: {attempts} sync runs, {took:.1?}, {} B down / {} B up; {delivered} \
         notices delivered once each",
        notices.lookups,
        notices.flagged,
        field.uploads.len() - uploads_before,
        stats.bytes_down - before.bytes_down,
        stats.bytes_up - before.bytes_up,
    );

    // Syncing again delivers nothing twice.
    proxy.set_faults(Faults::none()).await.unwrap();
    tablet.sync().await.unwrap();
    assert_eq!(field.pending_notices().await, 0, "seed {seed}");
    proxy.shutdown().await;
}
