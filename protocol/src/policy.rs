//! Freshness policy: how old data may be before a miss stops being trustworthy.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Ages, in seconds, that the server sends in every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Data verified within this age is `fresh`.
    pub fresh_secs: u64,
    /// Data older than this is `expired`: a miss is then `unknown`.
    pub expiry_secs: u64,
    /// A tablet without a verified checkpoint for this long shreds its data.
    pub wipe_secs: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            fresh_secs: 24 * 3600,
            expiry_secs: 7 * 24 * 3600,
            wipe_secs: 30 * 24 * 3600,
        }
    }
}

/// How current the data behind an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    Fresh,
    Stale,
    Expired,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Expired => "expired",
        }
    }
}

impl Policy {
    /// Freshness of data last verified at `as_of` (server time), judged at `now`.
    ///
    /// A `now` before `as_of` (a clock that went backwards) counts as age zero only up to
    /// the point of verification: it never makes data fresher than when it was verified.
    pub fn freshness(&self, as_of: DateTime<Utc>, now: DateTime<Utc>) -> Freshness {
        let age = (now - as_of).max(Duration::zero());
        let secs = u64::try_from(age.num_seconds()).unwrap_or(0);
        if secs <= self.fresh_secs {
            Freshness::Fresh
        } else if secs <= self.expiry_secs {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Checks the ages are ordered: fresh ≤ expiry ≤ wipe, and fresh is not zero.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.fresh_secs == 0 {
            return Err("fresh age must be more than zero");
        }
        if self.fresh_secs > self.expiry_secs {
            return Err("fresh age must not exceed expiry age");
        }
        if self.expiry_secs > self.wipe_secs {
            return Err("expiry age must not exceed wipe age");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let p = Policy::default();
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(p.freshness(t0, t0), Freshness::Fresh);
        assert_eq!(p.freshness(t0, t0 + Duration::hours(24)), Freshness::Fresh);
        assert_eq!(p.freshness(t0, t0 + Duration::hours(25)), Freshness::Stale);
        assert_eq!(p.freshness(t0, t0 + Duration::days(7)), Freshness::Stale);
        assert_eq!(p.freshness(t0, t0 + Duration::days(8)), Freshness::Expired);
        assert_eq!(p.freshness(t0, t0 - Duration::days(3)), Freshness::Fresh);
        assert!(p.validate().is_ok());
    }
}
