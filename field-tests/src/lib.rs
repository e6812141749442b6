//! CP-IS Edge field tests: the real `cpis-sync-server` and `cpis-agent` binaries on loopback,
//! through a fault-injecting TCP proxy ([`proxy`]), driven by a harness that starts, kills
//! and restarts them ([`harness`]), and an HTTP-level man-in-the-middle that alters or
//! replays signed answers ([`tamper`]), and a fleet of thousands of agents in one process
//! ([`fleet`]). The scenarios themselves are the integration tests in
//! `tests/it`; README.md lists them with their figures.

pub mod demo;
pub mod fleet;
pub mod harness;
pub mod proxy;
pub mod seed;
pub mod tamper;
