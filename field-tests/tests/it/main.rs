//! Field tests: the proxy's faults against tiny loopback servers, then scenarios with the
//! real `cpis-sync-server` and `cpis-agent` binaries (see README.md for the list).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod clock;
mod common;
mod crash;
mod demo;
mod live;
mod offline;
mod proxy;
mod replicas;
mod resume;
mod servers;
mod slow_clients;
mod slow_link;
mod storm;
mod tamper;
