//! A 2G-like link (50 kbit/s, 300–1000 ms round trips): a tablet enrols and takes its first
//! snapshot of a ~5k-flag region within a bounded time.

use std::time::{Duration, Instant};

use cpis_field_tests::harness::Tablet;
use cpis_field_tests::proxy::{Faults, Proxy};
use cpis_protocol::LookupResult;

use crate::common::{self, Field};

const FLAGS: usize = 5_000;
/// Enrolment plus the first snapshot must be done within this.
const BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_and_first_snapshot_over_2g() {
    let seed = common::seed("2g");
    let field = Field::start(seed, FLAGS).await;
    let proxy = Proxy::start_seeded(field.server.addr(), Faults::two_g(), seed)
        .await
        .unwrap();
    let url = format!("https://127.0.0.1:{}", proxy.local_addr().port());
    let token = field.enrolment_token().await;

    let started = Instant::now();
    let tablet = Tablet::enrol_with_timeout(
        &field.path("tablet"),
        &url,
        &field.server.ca_path(),
        &token,
        BOUND,
    )
    .await
    .unwrap()
    .with_timeout(BOUND);
    let enrolled = started.elapsed();
    let after_enrol = proxy.stats();
    let sync = tablet.sync().await.unwrap();
    let took = started.elapsed();
    let stats = proxy.stats();
    eprintln!(
        "[2g] {FLAGS} flags over 2G (50 kbit/s, RTT 300-1000 ms): enrol {enrolled:.1?} \
         ({} B down, {} B up), first snapshot {:.1?} ({} B down, {} B up), total {took:.1?}",
        after_enrol.bytes_down,
        after_enrol.bytes_up,
        took - enrolled,
        stats.bytes_down - after_enrol.bytes_down,
        stats.bytes_up - after_enrol.bytes_up,
    );
    assert_eq!(sync.action, "snapshot");
    assert!(sync.version >= Some(field.head), "seed {seed}");
    assert!(took < BOUND, "took {took:?} (seed {seed})");
    // At 50 kbit/s the bytes alone take this long: the link really was slow.
    let floor = Duration::from_secs_f64(stats.bytes_down as f64 / 6_250.0 * 0.9);
    assert!(took >= floor, "{took:?} < {floor:?}");

    // The data is installed: flagged numbers answer flagged, and the lookup is recorded.
    for nhs in field.sample_flagged(3) {
        let answer = tablet.lookup(&nhs).await.unwrap();
        assert_eq!(answer.result, LookupResult::Flagged, "{nhs} (seed {seed})");
    }
    let status = tablet.status().await.unwrap();
    assert_eq!(status.subjects, field.expected().subjects());
    assert_eq!(status.outbox_pending, 3);
    proxy.shutdown().await;
}
