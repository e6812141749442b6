//! Device lifecycle on the wire: the tablet's report for the fleet view, client certificate
//! renewal, and the chain of signed key rollovers that lets tablets follow a new feed signing
//! key without re-enrolling.
//!
//! Conventions: `POST` [`paths::REPORT`] takes a JSON [`DeviceReport`] and answers `204`;
//! `POST` [`paths::RENEW`] takes a JSON [`RenewRequest`] (a CSR for a NEW key pair made on the
//! tablet) and answers a JSON [`RenewResponse`]; `GET` [`paths::KEYS`] answers the postcard
//! bytes of a [`KeyChain`]. All three need the device's client certificate (mutual TLS) and
//! follow the device endpoints' 401/403-wipe rules (see `api::codes`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::signing::{PublicKey, Signable, SignedMessage};
use crate::verify::VerifyError;

/// Device lifecycle endpoints.
pub mod paths {
    /// `POST`: the tablet's state for the fleet view (JSON [`super::DeviceReport`]).
    pub const REPORT: &str = "/v1/device/report";
    /// `POST`: a new client certificate before the current one expires.
    pub const RENEW: &str = "/v1/device/renew";
    /// `GET`: every signed key rollover, oldest first (postcard [`super::KeyChain`]).
    pub const KEYS: &str = "/v1/device/keys";
}

/// What trust IT sees of a tablet: sent by the agent after each sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// Epoch and version of the installed data, if any.
    pub data_epoch: Option<u64>,
    pub data_version: Option<u64>,
    /// Server time of the last verified checkpoint the data reflects.
    pub data_as_of: Option<DateTime<Utc>>,
    /// Access events not yet confirmed stored by the server.
    pub outbox_pending: u64,
    /// Access events the server refused for good, kept aside on the tablet.
    pub outbox_set_aside: u64,
    pub client_cert_expires_at: Option<DateTime<Utc>>,
    /// The tablet's clock when it made the report (the server records its own receipt time).
    pub reported_at: DateTime<Utc>,
    /// How the tablet's device master key is protected; absent from older agents.
    #[serde(default)]
    pub key_protection: Option<KeyProtection>,
}

/// How a tablet's device master key is protected at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyProtection {
    /// Sealed by the tablet's TPM 2.0, with part of it in a TPM NV index the wipe removes:
    /// a copy of the disk opens nothing, on another machine or after a wipe.
    Tpm2,
    /// A 0600 file beside the data: protects nothing against a copy of the disk unless the
    /// tablet also has full-disk encryption.
    File,
}

impl KeyProtection {
    /// The word used on the command line, in JSON and on the pages.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyProtection::Tpm2 => "tpm2",
            KeyProtection::File => "file",
        }
    }

    /// A phrase for people: what protects the key.
    pub fn describe(self) -> &'static str {
        match self {
            KeyProtection::Tpm2 => "sealed by the tablet's TPM 2.0",
            KeyProtection::File => {
                "in a file on the tablet's disk, not sealed by a TPM (safe only with full-disk \
                 encryption)"
            }
        }
    }
}

impl std::fmt::Display for KeyProtection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyProtection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tpm2" => Ok(KeyProtection::Tpm2),
            "file" => Ok(KeyProtection::File),
            other => Err(format!("unknown keystore {other:?}: expected tpm2 or file")),
        }
    }
}

/// A CSR for a new key pair made on the tablet; the private key never leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// The renewed client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    pub client_cert_pem: String,
    pub client_cert_expires_at: DateTime<Utc>,
}

/// `next` replaces `previous` as the feed signing key; signed by `previous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRollover {
    pub previous: PublicKey,
    pub next: PublicKey,
    pub issued_at: DateTime<Utc>,
}

impl Signable for KeyRollover {
    const KIND: crate::signing::MessageKind = crate::signing::MessageKind::KeyRollover;
}

/// Every rollover the server has made, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyChain {
    pub rollovers: Vec<SignedMessage>,
}

impl KeyChain {
    /// Follows the chain from the key a tablet has pinned to the newest key that key (and each
    /// successor in turn) vouched for. Links before the pinned key are skipped; a link that
    /// claims to come from the current key but is not signed by it is a bad signature. Returns
    /// the pinned key itself when the chain holds nothing newer.
    pub fn follow(&self, pinned: &PublicKey) -> Result<PublicKey, VerifyError> {
        let mut current = *pinned;
        for signed in &self.rollovers {
            let claimed: KeyRollover = crate::signing::decode_unverified(signed)?;
            if claimed.previous != current {
                continue;
            }
            let link: KeyRollover = signed.open(current.verifying_key())?;
            current = link.next;
        }
        Ok(current)
    }
}
