//! CP-IS Edge tablet agent: holds a region's flags encrypted at rest, answers lookups
//! offline with an honest tri-state result and freshness, records every lookup in a durable
//! encrypted outbox, and syncs signed snapshots and deltas, verifying everything first.
//!
//! Code map: [`keystore`] (master key, subkeys, sealing), [`store`] (the only SQL),
//! [`agent`] (state directory; verify and apply), [`lookup`] (answers and status),
//! [`freshness`] (the age rule), [`plan`] (sync decisions without IO), [`net`] (TLS client),
//! [`download`] (partial snapshot downloads, sealed), [`sync`] (the driver and enrolment),
//! [`schedule`] (when the background loop syncs, without IO), [`background`] (the loop of
//! `run`), [`confirm`] (online national check of a miss), [`lifecycle`] (report, certificate
//! renewal, key rollover), [`local_token`] (the local API token and the enrolment token's
//! source), [`service`] (`run`: API and loop under one token), [`api`] (local HTTP API), [`page`] (the
//! paramedic page on the same listener), [`clock`] (time sources).

pub mod agent;
pub mod api;
pub mod background;
pub mod clock;
pub mod confirm;
pub mod download;
pub mod fhir;
pub mod freshness;
pub mod keystore;
pub mod lifecycle;
pub mod local_token;
pub mod lookup;
pub mod net;
pub mod page;
mod par;
pub mod plan;
pub mod schedule;
pub mod service;
pub mod store;
pub mod sync;
#[cfg(feature = "tpm2")]
pub mod tpm2;

pub use agent::{Agent, AgentError, Enrolment, StateDir, TlsMaterial, VerifiedCheckpoint};
pub use clock::{Clock, ManualClock, SystemClock};
pub use lookup::LookupInput;
