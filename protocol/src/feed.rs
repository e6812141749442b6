//! The feed messages of DESIGN.md §4: checkpoint, snapshot and delta, and their bodies.
//!
//! Metadata is small and signed; bodies are `zstd(postcard(body))` and are bound to their
//! metadata by declared length, raw length and SHA-256 digest.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::contacts::SubjectContacts;
use crate::flag::{CouncilInfo, FlagKey, FlagRecord};
use crate::ids::RegionId;
use crate::policy::Policy;
use crate::verify::VerifyError;

/// The version of the row body encoding (`zstd(postcard(body))`); bumped when a body type
/// changes shape.
///
/// 2: snapshots carry each held subject's recent contacts; deltas carry
/// [`Change::Contacts`]. Deltas are always in this format; snapshots in it only for tablets
/// that do not ask for [`COLUMNS_FORMAT`].
pub const BODY_FORMAT: u16 = 2;

pub use crate::columns::COLUMNS_FORMAT;

/// The snapshot body formats a tablet of this version reads, newest first.
pub const SNAPSHOT_FORMATS: [u16; 2] = [COLUMNS_FORMAT, BODY_FORMAT];

/// A region's head, signed: polled often, costs one small message when nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub region: RegionId,
    /// Changes whenever the region's council set changes.
    pub epoch: u64,
    /// The highest change-log version reflected in the region.
    pub head_version: u64,
    /// The server's clock when it signed this; freshness is measured from it.
    pub server_time: DateTime<Utc>,
    /// After this the checkpoint must not be accepted (defeats freeze attacks).
    pub expires_at: DateTime<Utc>,
    pub policy: Policy,
}

/// What binds a body to its signed metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyInfo {
    pub format: u16,
    /// Length of the body as sent (compressed), in bytes.
    pub len: u64,
    /// Length after decompression, in bytes.
    pub raw_len: u64,
    /// SHA-256 of the body as sent.
    pub sha256: [u8; 32],
}

/// Signed description of a full snapshot of a region at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub region: RegionId,
    pub epoch: u64,
    pub version: u64,
    pub server_time: DateTime<Utc>,
    pub flag_count: u64,
    pub body: BodyInfo,
}

/// Signed description of the changes to a region between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaMeta {
    pub region: RegionId,
    pub epoch: u64,
    pub from_version: u64,
    pub to_version: u64,
    pub server_time: DateTime<Utc>,
    pub change_count: u64,
    pub body: BodyInfo,
}

/// Every live flag of a region's councils, and the councils' directory entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub councils: Vec<CouncilInfo>,
    pub flags: Vec<FlagRecord>,
    /// The recent contacts of subjects with flags in the snapshot (those that have any), in
    /// NHS number order, each list newest first.
    pub contacts: Vec<SubjectContacts>,
}

/// One change to a flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Added, updated or ended: the flag as it now stands.
    Upsert(FlagRecord),
    /// Removed by its council, or purged past retention.
    Remove(FlagKey),
    /// A held subject's recent contacts as they now stand (replacing the previous list).
    Contacts(SubjectContacts),
}

/// A change with its global change-log version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedChange {
    pub version: u64,
    pub change: Change,
}

/// The region's changes after `from_version` up to `to_version`, in version order, and the
/// region's council directory as it stands at `to_version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBody {
    pub councils: Vec<CouncilInfo>,
    pub changes: Vec<VersionedChange>,
}

/// Encodes a body (`zstd(postcard(body))`) and describes it for signed metadata.
pub fn encode_body<T: Serialize>(body: &T, zstd_level: i32) -> Result<(Vec<u8>, BodyInfo), String> {
    let raw = postcard::to_stdvec(body).map_err(|e| format!("encoding body: {e}"))?;
    compress(&raw, zstd_level, BODY_FORMAT)
}

/// Encodes a snapshot body in `format` ([`COLUMNS_FORMAT`] or [`BODY_FORMAT`]) and describes
/// it for signed metadata.
pub fn encode_snapshot(
    body: &SnapshotBody,
    zstd_level: i32,
    format: u16,
) -> Result<(Vec<u8>, BodyInfo), String> {
    match format {
        COLUMNS_FORMAT => compress(&crate::columns::encode(body)?, zstd_level, format),
        BODY_FORMAT => encode_body(body, zstd_level),
        other => Err(format!(
            "snapshot body format {other} is not one this version writes ({SNAPSHOT_FORMATS:?})"
        )),
    }
}

fn compress(raw: &[u8], zstd_level: i32, format: u16) -> Result<(Vec<u8>, BodyInfo), String> {
    let compressed =
        zstd::bulk::compress(raw, zstd_level).map_err(|e| format!("compressing body: {e}"))?;
    let info = BodyInfo {
        format,
        len: compressed.len() as u64,
        raw_len: raw.len() as u64,
        sha256: Sha256::digest(&compressed).into(),
    };
    Ok((compressed, info))
}

impl BodyInfo {
    /// Checks a running count of received bytes: more than declared is endless data.
    pub fn check_received(&self, received: u64) -> Result<(), VerifyError> {
        if received > self.len {
            return Err(VerifyError::OversizeBody {
                declared: self.len,
                received,
            });
        }
        Ok(())
    }

    /// Checks a complete body's size, then its digest.
    pub fn verify(&self, body: &[u8]) -> Result<(), VerifyError> {
        let received = body.len() as u64;
        self.check_received(received)?;
        if received < self.len {
            return Err(VerifyError::TruncatedBody {
                declared: self.len,
                received,
            });
        }
        let digest: [u8; 32] = Sha256::digest(body).into();
        if digest != self.sha256 {
            return Err(VerifyError::DigestMismatch);
        }
        Ok(())
    }

    /// Verifies size and digest, then decompresses (never past `raw_len`) and decodes a row
    /// body ([`BODY_FORMAT`]).
    pub fn open<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, VerifyError> {
        self.expect_format(&[BODY_FORMAT])?;
        postcard::from_bytes(&self.decompress(body)?)
            .map_err(|e| VerifyError::Malformed(format!("decoding body: {e}")))
    }

    /// [`BodyInfo::open`] for a snapshot body, in any of [`SNAPSHOT_FORMATS`].
    pub fn open_snapshot(&self, body: &[u8]) -> Result<SnapshotBody, VerifyError> {
        self.expect_format(&SNAPSHOT_FORMATS)?;
        let raw = self.decompress(body)?;
        if self.format == COLUMNS_FORMAT {
            crate::columns::decode(&raw)
                .map_err(|e| VerifyError::Malformed(format!("decoding snapshot columns: {e}")))
        } else {
            postcard::from_bytes(&raw)
                .map_err(|e| VerifyError::Malformed(format!("decoding body: {e}")))
        }
    }

    fn expect_format(&self, formats: &[u16]) -> Result<(), VerifyError> {
        if formats.contains(&self.format) {
            return Ok(());
        }
        Err(VerifyError::Malformed(format!(
            "body format {} is not supported (this version reads {formats:?})",
            self.format
        )))
    }

    /// Verifies size and digest, then decompresses, never past `raw_len`.
    fn decompress(&self, body: &[u8]) -> Result<Vec<u8>, VerifyError> {
        self.verify(body)?;
        let cap = usize::try_from(self.raw_len)
            .map_err(|_| VerifyError::Malformed("raw length too large".into()))?;
        let raw = zstd::bulk::decompress(body, cap)
            .map_err(|e| VerifyError::Malformed(format!("decompressing body: {e}")))?;
        if raw.len() as u64 != self.raw_len {
            return Err(VerifyError::Malformed(format!(
                "body decompressed to {} bytes, declared {}",
                raw.len(),
                self.raw_len
            )));
        }
        Ok(raw)
    }
}
