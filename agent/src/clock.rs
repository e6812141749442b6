//! Time sources: the tablet's wall clock and a boot-relative monotonic reading, behind a
//! trait so tests can move the clock backwards and forwards.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A reading of the monotonic clock since boot, with the boot it belongs to. Two readings
/// can only be compared when their `boot_id`s are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStamp {
    pub boot_id: String,
    pub since_boot_ms: u64,
}

/// Where the agent gets the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The tablet's wall clock (may be wrong, or moved by the user).
    fn now(&self) -> DateTime<Utc>;
    /// Monotonic time since boot (including suspend), when the platform provides it.
    fn boot(&self) -> Option<BootStamp>;
}

/// The real clocks: `SystemTime`, and on Linux `/proc/uptime` with the kernel's boot id.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn boot(&self) -> Option<BootStamp> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
        let secs: f64 = uptime.split_whitespace().next()?.parse().ok()?;
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Some(BootStamp {
            boot_id: boot_id.trim().to_owned(),
            since_boot_ms: (secs * 1000.0) as u64,
        })
    }
}

/// A clock for tests: the wall clock and the monotonic clock move only when told to.
#[derive(Debug)]
pub struct ManualClock {
    inner: Mutex<(DateTime<Utc>, Option<BootStamp>)>,
}

impl ManualClock {
    /// Starts at `now`, in boot `"boot-1"` at 1000 s since boot.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            inner: Mutex::new((
                now,
                Some(BootStamp {
                    boot_id: "boot-1".into(),
                    since_boot_ms: 1_000_000,
                }),
            )),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut (DateTime<Utc>, Option<BootStamp>)) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Real time passes: both clocks advance.
    pub fn advance(&self, d: Duration) {
        self.with(|(now, boot)| {
            *now += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
            if let Some(b) = boot {
                b.since_boot_ms += d.as_millis() as u64;
            }
        });
    }

    /// Someone sets the wall clock; the monotonic clock does not move.
    pub fn set_wall(&self, t: DateTime<Utc>) {
        self.with(|(now, _)| *now = t);
    }

    /// The tablet reboots: a new boot id, monotonic time restarts near zero.
    pub fn reboot(&self, boot_id: &str) {
        self.with(|(_, boot)| {
            *boot = Some(BootStamp {
                boot_id: boot_id.into(),
                since_boot_ms: 5_000,
            });
        });
    }

    /// A platform without a monotonic boot clock.
    pub fn without_boot_clock(&self) {
        self.with(|(_, boot)| *boot = None);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.with(|(now, _)| *now)
    }

    fn boot(&self) -> Option<BootStamp> {
        self.with(|(_, boot)| boot.clone())
    }
}
