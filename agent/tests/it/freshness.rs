//! Freshness transitions under an injected clock, including the tablet clock moved
//! backwards and forwards (DESIGN.md §2 rules 1–2).

use std::time::Duration as StdDuration;

use chrono::Duration;
use cpis_agent::LookupInput;
use cpis_protocol::{Freshness, LookupResult};

use crate::common::*;

const HOUR: StdDuration = StdDuration::from_secs(3600);

struct Case {
    _dir: tempfile::TempDir,
    agent: cpis_agent::Agent,
    clock: std::sync::Arc<cpis_agent::ManualClock>,
    feed: Feed,
    hit: String,
    miss: String,
}

fn case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(31, 300);
    let feed = Feed::new(data.region.clone());
    let (agent, clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 7, t0());
    Case {
        hit: data.flags[0].nhs_number.to_string(),
        miss: unflagged_number(&data.flags).to_string(),
        _dir: dir,
        agent,
        clock,
        feed,
    }
}

impl Case {
    fn look(&self, n: &str) -> cpis_protocol::local::LookupResponse {
        self.agent
            .lookup(LookupInput {
                nhs_number: n,
                ..Default::default()
            })
            .unwrap()
    }

    fn miss(&self) -> (LookupResult, Freshness) {
        let r = self.look(&self.miss);
        (r.result, r.freshness)
    }
}

#[test]
fn fresh_then_stale_then_expired() {
    let c = case();
    assert_eq!(c.miss(), (LookupResult::NotFlagged, Freshness::Fresh));
    c.clock.advance(HOUR * 24);
    assert_eq!(c.miss(), (LookupResult::NotFlagged, Freshness::Fresh));
    c.clock.advance(HOUR * 2);
    assert_eq!(c.miss(), (LookupResult::NotFlagged, Freshness::Stale));
    let r = c.look(&c.miss);
    assert!(r.warnings.iter().any(|w| w.code == "data_stale"));
    c.clock.advance(HOUR * 24 * 6);
    assert_eq!(c.miss(), (LookupResult::Unknown, Freshness::Expired));
    // A match is still shown, with its as-of date.
    let r = c.look(&c.hit);
    assert_eq!(r.result, LookupResult::Flagged);
    assert_eq!(r.freshness, Freshness::Expired);
    assert_eq!(r.data_as_of, Some(t0()));
    assert!(r.warnings.iter().any(|w| w.code == "data_expired"));
    // A newly verified checkpoint at the same head makes the data fresh again.
    let now = cpis_agent::Clock::now(&*c.clock);
    c.agent
        .accept_checkpoint(&c.feed.checkpoint(1, 7, now))
        .unwrap();
    assert_eq!(c.miss(), (LookupResult::NotFlagged, Freshness::Fresh));
}

#[test]
fn clock_moved_backwards_does_not_refresh() {
    let c = case();
    c.clock.advance(HOUR * 30);
    assert_eq!(c.miss().1, Freshness::Stale);
    // Someone sets the tablet clock back ten days: still stale (monotonic clock).
    c.clock.set_wall(t0() - Duration::days(10));
    assert_eq!(c.miss().1, Freshness::Stale);
    // After a reboot the monotonic clock is gone; the high-water mark keeps it stale.
    c.clock.reboot("boot-2");
    assert_eq!(c.miss().1, Freshness::Stale);
    c.clock.without_boot_clock();
    assert_eq!(c.miss().1, Freshness::Stale);
}

#[test]
fn clock_moved_forwards_then_back_stays_expired() {
    let c = case();
    // The clock jumps 9 days ahead: data looks expired (never fresher).
    c.clock.set_wall(t0() + Duration::days(9));
    assert_eq!(c.miss(), (LookupResult::Unknown, Freshness::Expired));
    // Set back to the real time: what was seen stays seen.
    c.clock.set_wall(t0() + Duration::hours(1));
    c.clock.without_boot_clock();
    assert_eq!(c.miss(), (LookupResult::Unknown, Freshness::Expired));
}

#[test]
fn tablet_clock_behind_the_server_still_ages() {
    let c = case();
    // Verification happened at t0 by the tablet's clock; move the wall clock behind the
    // server time and let time pass on the monotonic clock only.
    c.clock.set_wall(t0() - Duration::days(3));
    c.clock.without_boot_clock();
    let r = c.look(&c.miss);
    assert!(r.warnings.iter().any(|w| w.code == "clock_behind"));
    assert_eq!(r.freshness, Freshness::Fresh);
    c.clock
        .set_wall(t0() - Duration::days(3) + Duration::days(8));
    // now − verified_local is 5 days, now − as_of is 5 days: stale, not fresh.
    assert_eq!(c.miss().1, Freshness::Stale);
}

#[test]
fn wipe_age_shreds_the_flags() {
    let c = case();
    c.clock.advance(HOUR * 24 * 31);
    let st = c.agent.status().unwrap();
    assert_eq!(st.subjects, 0);
    assert_eq!(st.version, None);
    assert_eq!(c.miss().0, LookupResult::Unknown);
    assert_eq!(c.look(&c.hit).result, LookupResult::Unknown);
}
