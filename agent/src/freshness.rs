//! The freshness rule: how old the data is, judged so that no clock change makes it look
//! fresher than it is (DESIGN.md §2 rule 2), and so that a wall clock changed while the
//! tablet runs does not make it look older than it is either.
//!
//! When a signed checkpoint is verified the agent records its server time (`as_of`), the
//! tablet's wall clock (`verified_local`) and, where the platform has one, the monotonic
//! since-boot clock with the boot id (`verified_boot`). It also keeps a high-water mark: the
//! best estimate of the true wall time ([`true_now`]) at the latest lookup since that
//! verification, persisted with every lookup.
//!
//! **Same boot** (the boot id now equals the one at verification and the since-boot clock has
//! not gone backwards): the real time since verification is known, so
//!
//! > age = (`boot_now − boot_at_verification`) + max(0, `verified_local − as_of`)
//!
//! The first term is real elapsed time: on Linux it is read from `/proc/uptime`, which counts
//! time spent suspended and which no user can set — changing the tablet's date moves neither.
//! The second term is how old the checkpoint already was at verification by the tablet's own
//! clock (about zero for a checkpoint fetched live; a checkpoint is refused if older than one
//! already seen, or past its 24-hour lifetime). A tablet clock that was ahead at verification
//! only adds to it. The current wall clock and the high-water mark are not used: a wall-clock
//! change within a boot cannot move the age either way — 30 days ahead does not expire or wipe
//! data synced a minute ago, 2 days back does not make it fresher.
//!
//! **After a reboot, or without a boot clock**, real elapsed time is not known and the rule is
//! the conservative one: the **largest** of
//!
//! 1. `now − as_of` — the tablet clock against the server's clock;
//! 2. `now − verified_local` — time passed on the tablet clock since verification (covers a
//!    tablet clock that runs behind the server);
//! 3. `high_water − verified_local` — the furthest the (estimated true) clock had been since
//!    verification, so a clock moved back across a reboot cannot undo time already seen.
//!
//! A clock moved ahead across a reboot makes the data look older (it errs towards `expired`,
//! never towards `fresh`). Because the high-water mark records the estimate of the true time
//! rather than the wall clock, a jump made before the reboot, in a boot that could measure
//! it, does not follow the data across the reboot. Not counted: time between the last lookup
//! (or verification) and a reboot when the clock is also set back.
//!
//! Never below zero. Freshness is then `policy.freshness(as_of, as_of + age)`: fresh up to the
//! fresh age, stale up to the expiry age, expired after.

use chrono::{DateTime, Duration, Utc};

use cpis_protocol::{Freshness, Policy};

use crate::clock::BootStamp;

/// What was recorded when the data was last verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    pub as_of: DateTime<Utc>,
    pub verified_local: Option<DateTime<Utc>>,
    pub verified_boot: Option<&'a BootStamp>,
}

/// The clock readings now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readings<'a> {
    pub now: DateTime<Utc>,
    pub boot: Option<&'a BootStamp>,
    pub high_water: Option<DateTime<Utc>>,
}

/// Real time elapsed between two readings of the monotonic clock, when they come from the
/// same boot and the later one is not behind the earlier.
pub fn boot_elapsed(then: Option<&BootStamp>, now: Option<&BootStamp>) -> Option<Duration> {
    let (then, now) = (then?, now?);
    if then.boot_id != now.boot_id || now.since_boot_ms < then.since_boot_ms {
        return None;
    }
    let ms = now.since_boot_ms - then.since_boot_ms;
    Some(Duration::milliseconds(
        i64::try_from(ms).unwrap_or(i64::MAX),
    ))
}

/// The best estimate of the true wall time now: the wall clock at verification plus the real
/// time elapsed since, when the same boot measured it; otherwise the wall clock. This is what
/// the high-water mark records, so that a wall clock moved within a boot does not poison it.
pub fn true_now(
    verified_local: Option<DateTime<Utc>>,
    verified_boot: Option<&BootStamp>,
    now: DateTime<Utc>,
    boot: Option<&BootStamp>,
) -> DateTime<Utc> {
    match (verified_local, boot_elapsed(verified_boot, boot)) {
        (Some(local), Some(elapsed)) => local.checked_add_signed(elapsed).unwrap_or(now),
        _ => now,
    }
}

/// How far the wall clock is from the true time, when the same boot measured the time since
/// verification: positive when ahead, negative when behind, zero within the bounds. The true
/// time is taken as lying between the server's time (`as_of`) and the tablet's clock at
/// verification (`verified_local`), each plus the real time elapsed since, so a clock set
/// right after a verification made on a wrong clock (or after a slow download) does not warn.
/// `None` after a reboot or without a boot clock.
pub fn clock_offset(
    as_of: Option<DateTime<Utc>>,
    verified_local: Option<DateTime<Utc>>,
    verified_boot: Option<&BootStamp>,
    now: DateTime<Utc>,
    boot: Option<&BootStamp>,
) -> Option<Duration> {
    let local = verified_local?;
    let elapsed = boot_elapsed(verified_boot, boot)?;
    let server = as_of.unwrap_or(local);
    let lo = local.min(server).checked_add_signed(elapsed)?;
    let hi = local.max(server).checked_add_signed(elapsed)?;
    Some(if now > hi {
        now - hi
    } else if now < lo {
        now - lo
    } else {
        Duration::zero()
    })
}

/// The age of the data under the rule in the module documentation.
pub fn data_age(v: &Verified<'_>, r: &Readings<'_>) -> Duration {
    if let (Some(local), Some(elapsed)) = (v.verified_local, boot_elapsed(v.verified_boot, r.boot))
    {
        let lag = (local - v.as_of).max(Duration::zero());
        return (elapsed + lag).max(Duration::zero());
    }
    let mut age = r.now - v.as_of;
    if let Some(local) = v.verified_local {
        age = age.max(r.now - local);
        if let Some(hw) = r.high_water {
            age = age.max(hw - local);
        }
    }
    age.max(Duration::zero())
}

/// Freshness and age in seconds.
pub fn judge(policy: &Policy, v: &Verified<'_>, r: &Readings<'_>) -> (Freshness, u64) {
    let age = data_age(v, r);
    let secs = u64::try_from(age.num_seconds()).unwrap_or(0);
    (policy.freshness(v.as_of, v.as_of + age), secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000, 0).unwrap() + Duration::hours(h)
    }

    fn boot(id: &str, h: u64) -> BootStamp {
        BootStamp {
            boot_id: id.into(),
            since_boot_ms: h * 3_600_000,
        }
    }

    fn verified_at(local: i64, b: &BootStamp) -> Verified<'_> {
        Verified {
            as_of: t(0),
            verified_local: Some(t(local)),
            verified_boot: Some(b),
        }
    }

    #[test]
    fn clock_30_days_ahead_in_the_same_boot_ages_by_real_time() {
        let p = Policy::default();
        let b0 = boot("a", 1);
        let v = verified_at(0, &b0);
        // Two real hours later the wall clock is 30 days ahead (and the high-water mark with
        // it, as an older agent would have written): the age is the two hours.
        let b1 = boot("a", 3);
        let r = Readings {
            now: t(30 * 24 + 2),
            boot: Some(&b1),
            high_water: Some(t(30 * 24 + 2)),
        };
        assert_eq!(data_age(&v, &r), Duration::hours(2));
        assert_eq!(judge(&p, &v, &r), (Freshness::Fresh, 7200));
        // 30 real hours: stale by real time, whatever the wall clock says.
        let b2 = boot("a", 31);
        let r = Readings {
            boot: Some(&b2),
            ..r
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Stale, 30 * 3600));
    }

    #[test]
    fn clock_back_in_the_same_boot_ages_by_real_time() {
        let p = Policy::default();
        let b0 = boot("a", 1);
        let v = verified_at(0, &b0);
        // 30 hours of real time pass, but the wall clock is set 2 days back, before
        // verification: stale at exactly 30 hours, never negative, never fresher.
        let b1 = boot("a", 31);
        let r = Readings {
            now: t(30 - 48),
            boot: Some(&b1),
            high_water: Some(t(2)),
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Stale, 30 * 3600));
        // Just after verification, clock set back: zero, not negative.
        let b2 = boot("a", 1);
        let r = Readings {
            now: t(-48),
            boot: Some(&b2),
            high_water: None,
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Fresh, 0));
    }

    #[test]
    fn an_old_checkpoint_counts_its_age_at_verification() {
        let p = Policy::default();
        // Verified 20 hours after the server signed it (by the tablet's clock), then 5 real
        // hours: 25 hours old, stale.
        let b0 = boot("a", 1);
        let v = verified_at(20, &b0);
        let b1 = boot("a", 6);
        let r = Readings {
            now: t(-100),
            boot: Some(&b1),
            high_water: None,
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Stale, 25 * 3600));
    }

    #[test]
    fn after_a_reboot_the_clock_moved_back_is_held_by_the_high_water_mark() {
        let p = Policy::default();
        let b0 = boot("a", 1);
        let v = verified_at(0, &b0);
        let b2 = boot("b", 1);
        let r = Readings {
            now: t(-10),
            boot: Some(&b2),
            high_water: Some(t(30)),
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Stale, 30 * 3600));
        let r = Readings {
            high_water: Some(t(8 * 24)),
            ..r
        };
        assert_eq!(judge(&p, &v, &r).0, Freshness::Expired);
        // The since-boot clock behind the verification's (another boot under the same id):
        // not comparable either.
        let b3 = boot("a", 0);
        let r = Readings {
            boot: Some(&b3),
            high_water: Some(t(30)),
            ..r
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Stale, 30 * 3600));
    }

    #[test]
    fn after_a_reboot_the_clock_moved_ahead_is_conservative() {
        let p = Policy::default();
        let b0 = boot("a", 1);
        let v = verified_at(0, &b0);
        let b2 = boot("b", 1);
        let r = Readings {
            now: t(8 * 24),
            boot: Some(&b2),
            high_water: Some(t(2)),
        };
        assert_eq!(judge(&p, &v, &r), (Freshness::Expired, 8 * 24 * 3600));
    }

    #[test]
    fn tablet_clock_behind_server_still_ages() {
        let p = Policy::default();
        // The tablet runs 3 days behind the server.
        let v = Verified {
            as_of: t(0),
            verified_local: Some(t(-72)),
            verified_boot: None,
        };
        let r = Readings {
            now: t(-72 + 8 * 24),
            boot: None,
            high_water: None,
        };
        assert_eq!(judge(&p, &v, &r).0, Freshness::Expired);
    }

    #[test]
    fn without_a_boot_clock_a_clock_ahead_only_ages() {
        let p = Policy::default();
        let v = Verified {
            as_of: t(0),
            verified_local: Some(t(0)),
            verified_boot: None,
        };
        let r = Readings {
            now: t(24 * 365),
            boot: None,
            high_water: None,
        };
        assert_eq!(judge(&p, &v, &r).0, Freshness::Expired);
    }

    #[test]
    fn the_true_time_follows_the_boot_clock_not_the_wall_clock() {
        let b0 = boot("a", 1);
        let b1 = boot("a", 3);
        let jumped = t(30 * 24);
        assert_eq!(true_now(Some(t(0)), Some(&b0), jumped, Some(&b1)), t(2));
        // After a reboot, or with no boot clock, only the wall clock is left.
        let b2 = boot("b", 3);
        assert_eq!(true_now(Some(t(0)), Some(&b0), jumped, Some(&b2)), jumped);
        assert_eq!(true_now(Some(t(0)), None, jumped, Some(&b1)), jumped);
        assert_eq!(true_now(None, Some(&b0), jumped, Some(&b1)), jumped);
    }

    #[test]
    fn the_clock_offset_is_measured_against_server_and_tablet_time() {
        let b0 = boot("a", 1);
        let b1 = boot("a", 3);
        let off = |as_of: i64, local: i64, now: i64| {
            clock_offset(Some(t(as_of)), Some(t(local)), Some(&b0), t(now), Some(&b1))
        };
        assert_eq!(off(0, 0, 30 * 24 + 2), Some(Duration::days(30)));
        assert_eq!(off(0, 0, 2 - 48), Some(Duration::days(-2)));
        assert_eq!(off(0, 0, 2), Some(Duration::zero()));
        // Verified on a clock 2 days behind, then set right: not "ahead".
        assert_eq!(off(0, -48, 2), Some(Duration::zero()));
        // After a reboot: unknown.
        let b2 = boot("b", 3);
        assert_eq!(
            clock_offset(Some(t(0)), Some(t(0)), Some(&b0), t(900), Some(&b2)),
            None
        );
    }
}
