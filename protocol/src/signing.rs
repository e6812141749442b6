//! Ed25519 signing of feed metadata with a deterministic encoding and domain separation.
//!
//! What is signed is `DOMAIN || kind || payload`, where `payload` is the postcard encoding of
//! the message. The envelope travels as postcard bytes, or base64url in an HTTP header.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::feed::{Checkpoint, DeltaMeta, SnapshotMeta};
use crate::verify::VerifyError;

/// Prefix of every signed byte string, so a signature can never be reused across protocols.
const DOMAIN: &[u8] = b"CPIS-EDGE/v1\0";

/// The kind of a signed message, bound into the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    Checkpoint,
    SnapshotMeta,
    DeltaMeta,
    /// A new feed signing key, vouched for by the key before it.
    KeyRollover,
}

impl MessageKind {
    fn tag(self) -> u8 {
        match self {
            MessageKind::Checkpoint => 1,
            MessageKind::SnapshotMeta => 2,
            MessageKind::DeltaMeta => 3,
            MessageKind::KeyRollover => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MessageKind::Checkpoint => "checkpoint",
            MessageKind::SnapshotMeta => "snapshot metadata",
            MessageKind::DeltaMeta => "delta metadata",
            MessageKind::KeyRollover => "key rollover",
        }
    }
}

/// A message type that can be signed.
pub trait Signable: Serialize + DeserializeOwned {
    const KIND: MessageKind;
}

impl Signable for Checkpoint {
    const KIND: MessageKind = MessageKind::Checkpoint;
}
impl Signable for SnapshotMeta {
    const KIND: MessageKind = MessageKind::SnapshotMeta;
}
impl Signable for DeltaMeta {
    const KIND: MessageKind = MessageKind::DeltaMeta;
}

/// A signed message: kind, encoded payload and signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMessage {
    pub kind: MessageKind,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

fn signed_bytes(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + 1 + payload.len());
    out.extend_from_slice(DOMAIN);
    out.push(kind.tag());
    out.extend_from_slice(payload);
    out
}

/// The deterministic encoding of a message (what is signed).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Encoding plain structs of owned data into a Vec cannot fail.
    postcard::to_stdvec(msg).unwrap_or_default()
}

impl SignedMessage {
    /// Signs a message with the server's key.
    pub fn sign<T: Signable>(key: &SigningKey, msg: &T) -> Self {
        let payload = encode(msg);
        let signature = key.sign(&signed_bytes(T::KIND, &payload));
        Self {
            kind: T::KIND,
            payload,
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Checks kind and signature against the pinned key, then decodes the message.
    pub fn open<T: Signable>(&self, key: &VerifyingKey) -> Result<T, VerifyError> {
        if self.kind != T::KIND {
            return Err(VerifyError::WrongKind {
                expected: T::KIND.name(),
                found: self.kind.name(),
            });
        }
        let sig = Signature::from_slice(&self.signature).map_err(|_| VerifyError::BadSignature)?;
        key.verify_strict(&signed_bytes(self.kind, &self.payload), &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        let (msg, rest) = postcard::take_from_bytes::<T>(&self.payload)
            .map_err(|e| VerifyError::Malformed(format!("decoding {}: {e}", self.kind.name())))?;
        if !rest.is_empty() {
            return Err(VerifyError::Malformed(format!(
                "{} trailing bytes after {}",
                rest.len(),
                self.kind.name()
            )));
        }
        Ok(msg)
    }

    /// The envelope as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Reads an envelope from bytes; trailing bytes are rejected.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VerifyError> {
        let (msg, rest) = postcard::take_from_bytes::<Self>(bytes)
            .map_err(|e| VerifyError::Malformed(format!("decoding signed envelope: {e}")))?;
        if !rest.is_empty() {
            return Err(VerifyError::Malformed(format!(
                "{} trailing bytes after signed envelope",
                rest.len()
            )));
        }
        Ok(msg)
    }

    /// The envelope for an HTTP header (base64url, no padding).
    pub fn to_header(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.to_bytes())
    }

    /// Reads an envelope from an HTTP header value.
    pub fn from_header(value: &str) -> Result<Self, VerifyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(value.trim())
            .map_err(|e| VerifyError::Malformed(format!("signed header is not base64url: {e}")))?;
        Self::from_bytes(&bytes)
    }
}

/// Decodes a signed message's payload WITHOUT checking the signature: only for choosing which
/// key to verify it with (e.g. walking a key chain); never trust what it returns.
pub(crate) fn decode_unverified<T: Signable>(msg: &SignedMessage) -> Result<T, VerifyError> {
    if msg.kind != T::KIND {
        return Err(VerifyError::WrongKind {
            expected: T::KIND.name(),
            found: msg.kind.name(),
        });
    }
    postcard::from_bytes(&msg.payload)
        .map_err(|e| VerifyError::Malformed(format!("decoding {}: {e}", msg.kind.name())))
}

/// The server's public signing key, as pinned on tablets (64 hex digits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub VerifyingKey);

impl PublicKey {
    pub fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }
}

impl From<&SigningKey> for PublicKey {
    fn from(k: &SigningKey) -> Self {
        Self(k.verifying_key())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = VerifyError;
    fn from_str(s: &str) -> Result<Self, VerifyError> {
        let bytes = hex::decode(s.trim())
            .map_err(|e| VerifyError::Malformed(format!("public key is not hex: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| VerifyError::Malformed("public key must be 32 bytes".into()))?;
        VerifyingKey::from_bytes(&arr)
            .map(Self)
            .map_err(|e| VerifyError::Malformed(format!("public key is not a valid point: {e}")))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
