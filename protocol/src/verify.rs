//! Checks a signed feed message against what the tablet already holds (DESIGN.md §2 rule 5).

use std::fmt;

use chrono::{DateTime, Utc};

use crate::feed::{Checkpoint, DeltaMeta, SnapshotMeta};
use crate::ids::RegionId;

/// Why a signed message or body was rejected. One variant for each rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("bad signature: not signed by the pinned server key")]
    BadSignature,
    #[error("wrong message kind: expected {expected}, found {found}")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("wrong region: this tablet holds {expected}, the message is for {found}")]
    WrongRegion { expected: RegionId, found: RegionId },
    #[error("wrong epoch: expected epoch {expected}, the message has epoch {found}")]
    WrongEpoch { expected: u64, found: u64 },
    #[error(
        "rollback: {what} {offered} is older than {held}, which this tablet has already verified"
    )]
    Rollback {
        what: &'static str,
        held: String,
        offered: String,
    },
    #[error("base mismatch: the delta starts at version {base}, this tablet holds version {held}")]
    BaseMismatch { held: u64, base: u64 },
    #[error("oversize body: {received} bytes received, {declared} declared")]
    OversizeBody { declared: u64, received: u64 },
    #[error("truncated body: {received} bytes received, {declared} declared")]
    TruncatedBody { declared: u64, received: u64 },
    #[error("digest mismatch: the body is not the one that was signed")]
    DigestMismatch,
    #[error("expired: the checkpoint expired at {expires_at}, it is now {now}")]
    Expired {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
}

impl VerifyError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::WrongKind { .. } => "wrong_kind",
            Self::Malformed(_) => "malformed",
            Self::WrongRegion { .. } => "wrong_region",
            Self::WrongEpoch { .. } => "wrong_epoch",
            Self::Rollback { .. } => "rollback",
            Self::BaseMismatch { .. } => "base_mismatch",
            Self::OversizeBody { .. } => "oversize_body",
            Self::TruncatedBody { .. } => "truncated_body",
            Self::DigestMismatch => "digest_mismatch",
            Self::Expired { .. } => "expired",
        }
    }
}

/// What a tablet holds: the region it belongs to and the newest data it has verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub region: RegionId,
    /// Epoch and version of the installed data, if any.
    pub data: Option<(u64, u64)>,
    /// Server time of the newest verified checkpoint, if any.
    pub server_time: Option<DateTime<Utc>>,
}

impl Position {
    /// A freshly enrolled tablet with no data.
    pub fn empty(region: RegionId) -> Self {
        Self {
            region,
            data: None,
            server_time: None,
        }
    }
}

fn rollback(
    what: &'static str,
    held: impl fmt::Display,
    offered: impl fmt::Display,
) -> VerifyError {
    VerifyError::Rollback {
        what,
        held: held.to_string(),
        offered: offered.to_string(),
    }
}

fn same_region(pos: &Position, found: &RegionId) -> Result<(), VerifyError> {
    if &pos.region != found {
        return Err(VerifyError::WrongRegion {
            expected: pos.region.clone(),
            found: found.clone(),
        });
    }
    Ok(())
}

impl Checkpoint {
    /// Accepts a verified-signature checkpoint only if it is for this region, not older than
    /// what the tablet holds (epoch, version, server time), and not expired at `now` nor at the
    /// newest server time already seen.
    pub fn check(&self, pos: &Position, now: DateTime<Utc>) -> Result<(), VerifyError> {
        same_region(pos, &self.region)?;
        if let Some(seen) = pos.server_time
            && self.server_time < seen
        {
            return Err(rollback("server time", seen, self.server_time));
        }
        let reference = pos.server_time.map_or(now, |seen| seen.max(now));
        if self.expires_at <= reference {
            return Err(VerifyError::Expired {
                expires_at: self.expires_at,
                now: reference,
            });
        }
        if let Some((epoch, version)) = pos.data {
            if self.epoch < epoch {
                return Err(rollback("epoch", epoch, self.epoch));
            }
            if self.epoch == epoch && self.head_version < version {
                return Err(rollback("version", version, self.head_version));
            }
        }
        Ok(())
    }
}

impl SnapshotMeta {
    /// Accepts a snapshot for this region in the checkpoint's epoch, not older than held data.
    ///
    /// A snapshot may be newer than the checkpoint's head: the region can change between the
    /// two requests. That is newer signed data, not a fault; freshness stays anchored at the
    /// checkpoint's server time, so nothing is overstated.
    pub fn check(&self, pos: &Position, checkpoint: &Checkpoint) -> Result<(), VerifyError> {
        same_region(pos, &self.region)?;
        if self.epoch != checkpoint.epoch {
            return Err(VerifyError::WrongEpoch {
                expected: checkpoint.epoch,
                found: self.epoch,
            });
        }
        if let Some((epoch, version)) = pos.data
            && self.epoch == epoch
            && self.version < version
        {
            return Err(rollback("version", version, self.version));
        }
        Ok(())
    }
}

impl DeltaMeta {
    /// Accepts a delta only if it starts exactly at the held version, in the held epoch, and
    /// moves forward. Like a snapshot, it may reach past the checkpoint's head when the region
    /// changed between the two requests.
    pub fn check(&self, pos: &Position, checkpoint: &Checkpoint) -> Result<(), VerifyError> {
        same_region(pos, &self.region)?;
        let Some((epoch, version)) = pos.data else {
            return Err(VerifyError::Malformed(
                "a delta cannot apply to a tablet that holds no data".into(),
            ));
        };
        if self.epoch != epoch || self.epoch != checkpoint.epoch {
            return Err(VerifyError::WrongEpoch {
                expected: epoch,
                found: self.epoch,
            });
        }
        if self.from_version != version {
            return Err(VerifyError::BaseMismatch {
                held: version,
                base: self.from_version,
            });
        }
        if self.to_version <= self.from_version {
            return Err(rollback("version", self.from_version, self.to_version));
        }
        Ok(())
    }
}
