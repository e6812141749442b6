//! CP-IS Edge central sync server: council uploads in, signed regional feeds out.
//!
//! Module map: [`config`] (server.toml + env), [`store`] (the `Store` trait and its SQLite
//! backend; the only module that touches SQL), [`upload`] (CSV validation), [`reconcile`]
//! (diff of a council's flags), [`feed`] (signed checkpoints, deltas, cached snapshots),
//! [`http`] (routes, auth, errors), [`metrics`], [`server`] (init, bind/shutdown),
//! [`pki`] (keys and certificates), [`tls`] (HTTPS serving with client identities),
//! [`ingest`] (checks on devices' access events), [`keys`] (feed signing key rollover),
//! [`fleet`] (the fleet view of `admin device list`), [`shed`] (load shedding: 429/503 with
//! `Retry-After`).
pub mod clock;
pub mod config;
pub mod feed;
pub mod fleet;
pub mod http;
pub mod ingest;
pub mod keys;
pub mod live;
pub mod metrics;
pub mod pki;
pub mod reconcile;
pub mod server;
pub mod shed;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod upload;

pub use server::{Server, ServerError, ServerHandle};
