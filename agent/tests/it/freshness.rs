//! Freshness transitions under an injected clock, including the tablet clock moved
//! backwards and forwards (DESIGN.md §2 rules 1–2): within a boot the age is the real time
//! since verification (the boot clock), whatever the wall clock says; after a reboot, or
//! without a boot clock, the conservative rule (largest of the wall-clock ages and the
//! high-water mark).

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

fn age(r: &cpis_protocol::local::LookupResponse) -> u64 {
    r.data_age_secs.unwrap()
}

fn warned<'a>(r: &'a cpis_protocol::local::LookupResponse, code: &str) -> Option<&'a str> {
    r.warnings
        .iter()
        .find(|w| w.code == code)
        .map(|w| w.message.as_str())
}

#[test]
fn clock_30_days_ahead_in_the_same_boot_ages_by_real_time_and_does_not_wipe() {
    let c = case();
    let subjects = c.agent.status().unwrap().subjects;
    c.clock.advance(HOUR * 2);
    // The wall clock jumps 30 days ahead (past the wipe age by the wall clock): the boot
    // clock knows two hours have passed. Fresh, two hours old, nothing wiped.
    c.clock
        .set_wall(t0() + Duration::days(30) + Duration::hours(2));
    let r = c.look(&c.hit);
    assert_eq!(
        (r.result, r.freshness, age(&r)),
        (LookupResult::Flagged, Freshness::Fresh, 2 * 3600)
    );
    assert_eq!(
        warned(&r, "clock_ahead"),
        Some("The tablet clock is 30 days ahead; check the tablet's date and time.")
    );
    assert!(warned(&r, "clock_behind").is_none());
    assert_eq!(c.miss(), (LookupResult::NotFlagged, Freshness::Fresh));
    let st = c.agent.status().unwrap();
    assert_eq!((st.subjects, st.freshness), (subjects, Freshness::Fresh));
    assert!(st.warnings.iter().any(|w| w.code == "clock_ahead"));
    // A day of real time later: stale by real time (26 hours), not expired.
    c.clock.advance(HOUR * 24);
    let r = c.look(&c.miss);
    assert_eq!(
        (r.result, r.freshness, age(&r)),
        (LookupResult::NotFlagged, Freshness::Stale, 26 * 3600)
    );
    // The clock set right again within the boot: the same, and no clock warning.
    c.clock.set_wall(t0() + Duration::hours(26));
    let r = c.look(&c.miss);
    assert_eq!((r.freshness, age(&r)), (Freshness::Stale, 26 * 3600));
    assert!(warned(&r, "clock_ahead").is_none() && warned(&r, "clock_behind").is_none());
    // A reboot after that: the high-water mark holds the true time the lookups saw, not the
    // jumped wall clock, so the data is 26 hours old, not 30 days (no wipe).
    c.clock.reboot("boot-2");
    let r = c.look(&c.hit);
    assert_eq!(
        (r.result, r.freshness, age(&r)),
        (LookupResult::Flagged, Freshness::Stale, 26 * 3600)
    );
    assert_eq!(c.agent.status().unwrap().subjects, subjects);
}

#[test]
fn clock_ahead_after_a_reboot_is_judged_conservatively() {
    let c = case();
    c.clock.advance(HOUR);
    // Rebooted, and the clock 9 days ahead: no boot clock to compare, so the data counts
    // as 9 days old (never fresher than the truth): expired, a miss unknown.
    c.clock.reboot("boot-2");
    c.clock.set_wall(t0() + Duration::days(9));
    let r = c.look(&c.miss);
    assert_eq!(
        (r.result, r.freshness, age(&r)),
        (LookupResult::Unknown, Freshness::Expired, 9 * 86_400)
    );
    // Set back to the real time, still in that boot: what was seen stays seen.
    c.clock.set_wall(t0() + Duration::hours(2));
    assert_eq!(c.miss(), (LookupResult::Unknown, Freshness::Expired));
    // Past the wipe age after a reboot: the flags are shredded.
    c.clock.reboot("boot-3");
    c.clock.set_wall(t0() + Duration::days(31));
    assert_eq!(c.look(&c.hit).result, LookupResult::Unknown);
    assert_eq!(c.agent.status().unwrap().subjects, 0);
}

#[test]
fn clock_2_days_back_in_the_same_boot_ages_by_real_time() {
    let c = case();
    // Just after verification, the clock set 2 days back: zero, never negative.
    c.clock.set_wall(t0() - Duration::days(2));
    let r = c.look(&c.miss);
    assert_eq!((r.freshness, age(&r)), (Freshness::Fresh, 0));
    assert!(warned(&r, "clock_behind").is_some());
    // 30 real hours later: stale at exactly 30 hours, never fresher.
    c.clock.advance(HOUR * 30);
    let r = c.look(&c.miss);
    assert_eq!(
        (r.result, r.freshness, age(&r)),
        (LookupResult::NotFlagged, Freshness::Stale, 30 * 3600)
    );
    assert!(warned(&r, "clock_behind").is_some());
    assert!(warned(&r, "clock_ahead").is_none());
    // A reboot with the clock still back: the high-water mark (the true time of the lookup
    // above) keeps it stale at 30 hours.
    c.clock.reboot("boot-2");
    let r = c.look(&c.miss);
    assert_eq!((r.freshness, age(&r)), (Freshness::Stale, 30 * 3600));
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
