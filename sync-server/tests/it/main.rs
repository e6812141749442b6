//! Integration tests of the sync server: the real server in-process on 127.0.0.1:0, talked
//! to over HTTPS with the data dir's CA, and the built binary for the CLI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub,
    missing_debug_implementations
)]

mod cli;
mod crash;
mod events;
mod feed;
mod harness;
mod isolation;
mod lifecycle;
mod live;
mod mailbox;
mod packaging;
mod pages;
mod replicas;
mod shed;
mod uploads;
