//! A link that cuts every transfer part way: the snapshot still completes by resuming
//! (HTTP Range), and the bytes carried stay close to one snapshot, not attempts × snapshot.

use std::time::Instant;

use cpis_field_tests::proxy::{Faults, Proxy};
use cpis_protocol::LookupResult;

use crate::common::{self, Field};

/// Flags in the region: a snapshot body of a few hundred KiB.
const FLAGS: usize = 30_000;
/// Every connection is cut after this many bytes downstream (handshake and headers included).
const CUT: u64 = 96 * 1024;
/// Bound on `cpis-agent sync` runs before the snapshot must be in.
const MAX_ATTEMPTS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_cuts_every_transfer_still_completes_the_snapshot() {
    let seed = common::seed("cut-resume");
    let field = Field::start(seed, FLAGS).await;
    let proxy = Proxy::start_seeded(field.server.addr(), Faults::none(), seed)
        .await
        .unwrap();
    let url = format!("https://127.0.0.1:{}", proxy.local_addr().port());
    // Enrolled over a clean link; every later transfer goes through the cutting proxy.
    let tablet = field.enrol("tablet", &url).await;
    let meta = tablet.snapshot_meta(&url).await.unwrap();
    let body = meta.body.len;
    assert!(
        CUT < body,
        "the cut ({CUT} B) must fall inside the snapshot body ({body} B)"
    );

    proxy
        .set_faults(Faults::none().with_cut_every_connection(CUT))
        .await
        .unwrap();
    let before = proxy.stats();
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = tablet.try_sync().await.unwrap();
        if out.success() {
            break;
        }
        assert!(
            attempts < MAX_ATTEMPTS,
            "no complete sync after {attempts} attempts (seed {seed}); last: {}",
            out.stderr.trim()
        );
    }
    let took = started.elapsed();
    let after = proxy.stats();
    let carried = after.bytes_down - before.bytes_down;
    let ratio = carried as f64 / body as f64;
    eprintln!(
        "[cut-resume] {FLAGS} flags, snapshot body {body} B, cut every connection at {CUT} B: \
         {attempts} sync runs, {} cuts, {carried} B downstream ({ratio:.2}x the body), {took:?}",
        after.cuts - before.cuts
    );

    // The snapshot is in and whole.
    let status = tablet.status().await.unwrap();
    // The server may add versions of its own (recent contacts), never below the last upload.
    assert!(status.version >= Some(field.head), "seed {seed}");
    assert!(status.version >= Some(meta.version));
    assert_eq!(status.subjects, field.expected().subjects(), "seed {seed}");
    for nhs in field.sample_flagged(5) {
        let answer = tablet.lookup(&nhs).await.unwrap();
        assert_eq!(answer.result, LookupResult::Flagged, "{nhs} (seed {seed})");
    }
    // It took several transfers, each resuming where the last was cut.
    assert!(attempts >= 2, "the cut never hit (seed {seed})");
    assert!(after.cuts - before.cuts >= attempts as u64 - 1);
    assert!(
        ratio < 1.6,
        "{carried} B carried for a {body} B body over {attempts} runs: downloads restart \
         instead of resuming (seed {seed})"
    );
    proxy.shutdown().await;
}
