//! What the proxy does to traffic: the fault description ([`Faults`]) and the link presets
//! (2G, 3G). Plain values, changed at runtime with `ProxyHandle::set_faults`.

use std::time::Duration;

/// The faults a proxy applies. Every field is independent; combine them freely. The default
/// is a clean link (forward everything at once).
///
/// Byte counts (`after_bytes`) are per connection and count bytes delivered *downstream*
/// (upstream server → client), which is where snapshots and deltas flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Client → upstream (requests, uploads).
    pub up: LinkFaults,
    /// Upstream → client (answers, snapshot bodies).
    pub down: LinkFaults,
    /// Stop forwarding, both ways, for a while once a connection has delivered some bytes
    /// downstream; the connection stays open.
    pub stall: Option<Stall>,
    /// Close both sides once a connection has delivered some bytes downstream.
    pub cut: Option<Cut>,
    /// Reset (RST, via `SO_LINGER` 0) connections from the client.
    pub reset: Option<Reset>,
    /// Accept connections but forward nothing either way and answer nothing, until turned off
    /// (then everything held goes through, as TCP retransmission would do on a real link).
    /// Applies to connections already open too.
    pub blackhole: bool,
    /// Stop listening: new connections are refused (`ECONNREFUSED`). Open connections carry on.
    pub refuse: bool,
}

/// Latency and bandwidth of one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkFaults {
    /// Added one-way delay for each chunk of data.
    pub latency: Option<Latency>,
    /// Bandwidth cap (token bucket), per connection.
    pub bandwidth: Option<Bandwidth>,
}

/// One-way delay added to each chunk: `fixed` plus a uniformly random amount in
/// `0..=jitter` (from the proxy's seed). Chunks stay in order and are pipelined (a chunk's
/// delay runs while the next one is read), like a real link's propagation delay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub fixed: Duration,
    pub jitter: Duration,
}

impl Latency {
    /// A delay between `min` and `max`.
    pub fn between(min: Duration, max: Duration) -> Self {
        Self {
            fixed: min,
            jitter: max.saturating_sub(min),
        }
    }

    /// A fixed delay.
    pub fn fixed(d: Duration) -> Self {
        Self {
            fixed: d,
            jitter: Duration::ZERO,
        }
    }
}

/// A bandwidth cap: a token bucket refilled at `bytes_per_sec`, holding at most
/// [`Bandwidth::burst`] bytes (50 ms worth, at least 512 bytes). It starts full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bandwidth {
    pub bytes_per_sec: u64,
}

impl Bandwidth {
    /// A cap in kilobits per second (1 kbit = 1000 bits).
    pub fn kbit(kbit_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: (kbit_per_sec * 1000 / 8).max(1),
        }
    }

    /// The bucket's size: the most that can pass at once after a quiet spell.
    pub fn burst(&self) -> u64 {
        (self.bytes_per_sec / 20).max(512)
    }
}

/// Forwarding stops (both ways) for `duration` once `after_bytes` have been delivered
/// downstream on a connection; once per connection for each `set_faults`. A connection that
/// has already passed `after_bytes` when the fault is set stalls at its next downstream data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub after_bytes: u64,
    pub duration: Duration,
}

/// Once exactly `after_bytes` have been delivered downstream, the client gets a clean EOF
/// (FIN) and the upstream connection is closed. With `every_connection` false only the first
/// connection to reach the mark (after each `set_faults`) is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub after_bytes: u64,
    pub every_connection: bool,
}

/// How connections are reset (the client sees `ECONNRESET`). Applies to every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// Right after accepting, before anything is forwarded.
    OnAccept,
    /// Once this many bytes have been delivered downstream.
    AfterBytes(u64),
}

impl Faults {
    /// A clean link.
    pub fn none() -> Self {
        Self::default()
    }

    /// A 2G (GPRS/EDGE-like) link: 50 kbit/s each way, round trip 300–1000 ms (each
    /// direction 150–500 ms per chunk).
    pub fn two_g() -> Self {
        Self::link(
            50,
            Latency::between(Duration::from_millis(150), Duration::from_millis(500)),
        )
    }

    /// A 3G (UMTS/HSPA-like) link: 750 kbit/s each way, round trip 100–200 ms (each
    /// direction 50–100 ms per chunk).
    pub fn three_g() -> Self {
        Self::link(
            750,
            Latency::between(Duration::from_millis(50), Duration::from_millis(100)),
        )
    }

    /// A symmetric link of `kbit_per_sec` with one-way `latency`.
    pub fn link(kbit_per_sec: u64, latency: Latency) -> Self {
        let dir = LinkFaults {
            latency: Some(latency),
            bandwidth: Some(Bandwidth::kbit(kbit_per_sec)),
        };
        Self {
            up: dir,
            down: dir,
            ..Self::default()
        }
    }

    /// These faults, with every connection cut after `after_bytes` downstream.
    pub fn with_cut_every_connection(mut self, after_bytes: u64) -> Self {
        self.cut = Some(Cut {
            after_bytes,
            every_connection: true,
        });
        self
    }

    /// These faults, with a stall of `duration` after `after_bytes` downstream.
    pub fn with_stall(mut self, after_bytes: u64, duration: Duration) -> Self {
        self.stall = Some(Stall {
            after_bytes,
            duration,
        });
        self
    }

    /// These faults, with the given reset.
    pub fn with_reset(mut self, reset: Reset) -> Self {
        self.reset = Some(reset);
        self
    }

    /// These faults, blackholed or not.
    pub fn with_blackhole(mut self, on: bool) -> Self {
        self.blackhole = on;
        self
    }

    /// These faults, refusing connections or not.
    pub fn with_refuse(mut self, on: bool) -> Self {
        self.refuse = on;
        self
    }

    /// The faults for one direction.
    pub fn dir(&self, dir: Direction) -> &LinkFaults {
        match dir {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }
}

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_documented_figures() {
        let g2 = Faults::two_g();
        assert_eq!(
            g2.down.bandwidth,
            Some(Bandwidth {
                bytes_per_sec: 6250
            })
        );
        let l = g2.down.latency.unwrap_or_default();
        // Round trip = twice the one-way delay: 300–1000 ms.
        assert_eq!(2 * l.fixed, Duration::from_millis(300));
        assert_eq!(2 * (l.fixed + l.jitter), Duration::from_millis(1000));
        let g3 = Faults::three_g();
        assert_eq!(g3.up.bandwidth, Some(Bandwidth::kbit(750)));
        assert_eq!(Bandwidth::kbit(750).bytes_per_sec, 93_750);
        assert_eq!(Bandwidth::kbit(750).burst(), 4_687);
        assert_eq!(Bandwidth::kbit(50).burst(), 512);
    }
}
