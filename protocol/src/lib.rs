//! CP-IS Edge protocol: domain types, the NHS number, wire messages and signing.
//!
//! This crate does no IO. It is the only place wire formats are defined: the server, the
//! agent and the tools encode and decode through it.

pub mod api;
mod columns;
pub mod confirm;
pub mod contacts;
pub mod dates;
pub mod events;
pub mod feed;
pub mod flag;
pub mod ids;
pub mod ingest;
pub mod lifecycle;
pub mod local;
pub mod mailbox;
pub mod nhs;
pub mod policy;
pub mod signing;
pub mod verify;

pub use contacts::{MAX_RECENT_CONTACTS, Organisation, RecentContact, SubjectContacts};
pub use events::{
    AccessEvent, CareSetting, EventBatch, EventUploadAck, LookupResult, RejectedEvent,
};
pub use feed::{
    BODY_FORMAT, BodyInfo, COLUMNS_FORMAT, Change, Checkpoint, DeltaBody, DeltaMeta,
    SNAPSHOT_FORMATS, SnapshotBody, SnapshotMeta, VersionedChange, encode_body, encode_snapshot,
};
pub use flag::{CouncilInfo, FlagKey, FlagRecord, retained_until};
pub use ids::{CouncilCode, DeviceId, EventId, IdError, PlanType, RegionId, TrustCode};
pub use lifecycle::{
    DeviceReport, KeyChain, KeyProtection, KeyRollover, RenewRequest, RenewResponse,
};
pub use nhs::{NhsNumber, NhsNumberError};
pub use policy::{Freshness, Policy};
pub use signing::{MessageKind, PublicKey, Signable, SignedMessage};
pub use verify::{Position, VerifyError};

/// Re-exported so users of the protocol name the same key types.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
