//! Integration tests of the tablet agent: one binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod background;

mod apply;
mod clock_sync;
mod common;
mod crash;
mod deps;
mod fhir;
mod freshness;
mod integrity;
mod lifecycle;
mod lookup;
mod net;
mod page;
mod plaintext;
mod proxy;
mod resume;
mod revoke;
mod rollover;
mod server;
#[cfg(feature = "tpm2")]
mod swtpm;
#[cfg(feature = "tpm2")]
mod tpm;
