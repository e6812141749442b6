//! HTTP wire types and paths shared by the server, the agent and their clients
//! (DESIGN.md §6): error bodies, council uploads, enrolment.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{DeviceId, RegionId, TrustCode};
use crate::policy::Policy;
use crate::signing::PublicKey;

/// Device endpoints and the header that carries signed metadata.
pub mod paths {
    /// `POST`: exchange an enrolment token and a CSR for a device certificate.
    pub const ENROL: &str = "/v1/enrol";
    /// `GET`: the region's signed checkpoint (body: signed envelope bytes).
    pub const CHECKPOINT: &str = "/v1/device/checkpoint";
    /// `GET ?epoch=E&after=V&wait=S` ([`super::WaitQuery`]): the live feed. The region's signed
    /// checkpoint (as [`CHECKPOINT`]), answered as soon as the region's head passes epoch E,
    /// version V, else after S seconds (the server may hold it for less) with the head
    /// unchanged. `404` from a server without it or with it off, `503` when it holds as many
    /// as it may: poll instead.
    pub const CHECKPOINT_WAIT: &str = "/v1/device/checkpoint/wait";
    /// `GET ?from=V`: a delta from V to head (signed metadata in [`SIGNED_HEADER`]).
    pub const DELTA: &str = "/v1/device/delta";
    /// `GET [?format=F]` ([`super::SnapshotQuery`]): the current snapshot's signed metadata
    /// (body: signed envelope bytes).
    pub const SNAPSHOT: &str = "/v1/device/snapshot";
    /// `GET /v1/device/snapshots/{epoch}/{version}[?format=F]`: a snapshot body; HTTP Range
    /// supported; signed metadata in [`SIGNED_HEADER`].
    pub const SNAPSHOT_BODY_PREFIX: &str = "/v1/device/snapshots";
    /// `POST`: a batch of access events (JSON [`crate::EventBatch`]).
    pub const EVENTS: &str = "/v1/device/events";
    /// Header carrying a base64url signed envelope alongside a body.
    pub const SIGNED_HEADER: &str = "x-cpis-signed";
    /// Media type of signed envelopes and feed bodies.
    pub const OCTET: &str = "application/octet-stream";
}

/// The query of [`paths::CHECKPOINT_WAIT`]: what the tablet holds, and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitQuery {
    /// The epoch of the data the tablet holds.
    pub epoch: u64,
    /// The version of the data the tablet holds.
    pub after: u64,
    /// Seconds the tablet waits at most.
    pub wait: u64,
}

/// The query of [`paths::SNAPSHOT`] and of a snapshot body: the body format the tablet reads.
/// Without it the body is in [`crate::BODY_FORMAT`] (rows), which tablets from before the
/// columnar format ([`crate::COLUMNS_FORMAT`]) read; the format is in the signed metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotQuery {
    pub format: Option<u16>,
}

/// Error codes in `{error:{code}}` bodies that clients act on.
///
/// Device endpoints: a request without a valid client certificate gets `401`
/// [`CLIENT_CERT_REQUIRED`]; a revoked device gets `403` [`DEVICE_REVOKED`] with `wipe: true`.
/// `GET` [`paths::DELTA`]`?from=V` answers `200` with the compressed delta body and its signed
/// metadata in [`paths::SIGNED_HEADER`], `204` when V is already the head, `410`
/// [`DELTA_GONE`] when V is older than the change-log retention horizon or from another
/// epoch (take a snapshot), `400` when V is ahead of the head. A snapshot body for a version no
/// longer cached answers `410` [`SNAPSHOT_GONE`] (fetch the snapshot metadata again).
/// Enrolment: `401` [`TOKEN_UNKNOWN`] or [`ENROLMENT_TOKEN_REVOKED`], `403` [`TOKEN_USED_UP`]
/// or [`TOKEN_EXPIRED`], `400` [`BAD_CSR`]. Council and trust admin tokens: `401`
/// [`UNAUTHORISED`] (missing or unknown), [`BEARER_REVOKED`] or [`BEARER_EXPIRED`].
pub mod codes {
    pub const CLIENT_CERT_REQUIRED: &str = "client_certificate_required";
    pub const DEVICE_REVOKED: &str = "device_revoked";
    pub const DELTA_GONE: &str = "delta_gone";
    pub const SNAPSHOT_GONE: &str = "snapshot_gone";
    pub const TOKEN_UNKNOWN: &str = "enrolment_token_unknown";
    pub const TOKEN_USED_UP: &str = "enrolment_token_used_up";
    pub const TOKEN_EXPIRED: &str = "enrolment_token_expired";
    pub const ENROLMENT_TOKEN_REVOKED: &str = "enrolment_token_revoked";
    /// `401`: a council or trust admin token revoked by an administrator.
    pub const BEARER_REVOKED: &str = "token_revoked";
    /// `401`: a council or trust admin token past the expiry it was issued with.
    pub const BEARER_EXPIRED: &str = "token_expired";
    pub const BAD_CSR: &str = "bad_csr";
    pub const UNAUTHORISED: &str = "unauthorised";
    pub const FORBIDDEN: &str = "forbidden";
    pub const INVALID_UPLOAD: &str = "invalid_upload";
    pub const TOO_LARGE: &str = "payload_too_large";
    pub const OVERLOADED: &str = "overloaded";
    /// `429`: one device asks more often than the server's per-device rate (`Retry-After`).
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const NOT_FOUND: &str = "not_found";
    /// `408`: the request (its body included) was not complete within the server's limit.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// `503`: the server cannot reach its database just now (`Retry-After`); nothing was
    /// changed, send the request again.
    pub const DATABASE_UNAVAILABLE: &str = "database_unavailable";
}

/// The CSV columns of a council upload, in order.
pub const UPLOAD_COLUMNS: [&str; 6] = [
    "nhs_number",
    "plan_type",
    "start_date",
    "end_date",
    "date_of_birth",
    "local_id",
];

/// `{error:{code, message}}`, everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    /// Set on a revoked device's 403: the tablet must crypto-shred its data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wipe: bool,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                wipe: false,
            },
        }
    }
}

/// One problem with one cell (or row) of an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadError {
    /// 1-based line in the file (the header is line 1).
    pub line: u64,
    /// Column name, or empty when the problem is the whole row.
    pub column: String,
    pub code: String,
    pub message: String,
}

/// `422` body: nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRejection {
    pub error: ErrorDetail,
    pub errors: Vec<UploadError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UploadCounts {
    pub rows: u64,
    pub added: u64,
    pub updated: u64,
    pub ended: u64,
    pub removed: u64,
    pub unchanged: u64,
}

/// `200` body of an accepted upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReceipt {
    pub upload_id: Uuid,
    /// `success` when every row was applied.
    pub result: String,
    pub counts: UploadCounts,
    /// The change-log version after this upload.
    pub version: u64,
}

/// `POST /v1/enrol` request: the token and a CSR for a key made on the tablet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub token: String,
    /// PEM certificate signing request for the device's own key pair.
    pub csr_pem: String,
    pub name: Option<String>,
    pub agent_version: String,
}

/// `POST /v1/enrol` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolResponse {
    pub device_id: DeviceId,
    pub trust: TrustCode,
    pub region: RegionId,
    /// PEM client certificate for the device's key, issued by the device CA.
    pub client_cert_pem: String,
    pub client_cert_expires_at: DateTime<Utc>,
    /// The key that signs every checkpoint, snapshot and delta; pinned by the tablet.
    pub signing_public_key: PublicKey,
    pub policy: Policy,
}
