//! The freshness rule: how old the data is, judged so that no clock change makes it look
//! fresher than it is (DESIGN.md §2 rule 2).
//!
//! When a signed checkpoint is verified the agent records its server time (`as_of`), the
//! tablet's wall clock (`verified_local`) and, where the platform has one, the monotonic
//! since-boot clock with the boot id. It also keeps the highest wall-clock reading seen since
//! that verification (`high_water`, persisted with every lookup). The age of the data is the
//! **largest** of these plausible ages, never below zero:
//!
//! 1. `now − as_of` — the tablet clock against the server's clock;
//! 2. `now − verified_local` — time passed on the tablet clock since verification (covers a
//!    tablet clock that runs behind the server);
//! 3. `high_water − verified_local` — the furthest the tablet clock has been since
//!    verification (a clock moved back cannot undo time already seen);
//! 4. `boot_now − boot_at_verification`, when both readings come from the same boot — real
//!    elapsed time, whatever anyone does to the wall clock.
//!
//! Freshness is then `policy.freshness(as_of, as_of + age)`: fresh up to the fresh age,
//! stale up to the expiry age, expired after. A clock far ahead makes data look older (it can
//! only err towards `expired`, never towards `fresh`).

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

/// The age of the data under the rule in the module documentation.
pub fn data_age(v: &Verified<'_>, r: &Readings<'_>) -> Duration {
    let mut age = r.now - v.as_of;
    if let Some(local) = v.verified_local {
        age = age.max(r.now - local);
        if let Some(hw) = r.high_water {
            age = age.max(hw - local);
        }
    }
    if let (Some(then), Some(now)) = (v.verified_boot, r.boot)
        && then.boot_id == now.boot_id
        && now.since_boot_ms >= then.since_boot_ms
    {
        {
            let ms = now.since_boot_ms - then.since_boot_ms;
            age = age.max(Duration::milliseconds(
                i64::try_from(ms).unwrap_or(i64::MAX),
            ));
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

    #[test]
    fn clock_back_does_not_refresh() {
        let p = Policy::default();
        let b0 = boot("a", 1);
        let v = Verified {
            as_of: t(0),
            verified_local: Some(t(0)),
            verified_boot: Some(&b0),
        };
        // 30 hours of real time pass, but the wall clock is set back to before verification.
        let b1 = boot("a", 31);
        let r = Readings {
            now: t(-10),
            boot: Some(&b1),
            high_water: Some(t(2)),
        };
        assert_eq!(judge(&p, &v, &r).0, Freshness::Stale);
        // After a reboot the monotonic clock no longer compares; the high-water mark holds.
        let b2 = boot("b", 1);
        let r = Readings {
            now: t(-10),
            boot: Some(&b2),
            high_water: Some(t(30)),
        };
        assert_eq!(judge(&p, &v, &r).0, Freshness::Stale);
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
    fn clock_ahead_only_ages() {
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
}
