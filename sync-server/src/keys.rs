//! Feed signing key rollover: which key signs now, rolling over to a new one, and how a
//! running server notices.
//!
//! The database's key chain decides which key is current: the `next` key of the newest
//! rollover, or, before any rollover, the key `init` wrote (`feed-signing-key.pem`). A
//! rollover ([`roll`]) makes a new Ed25519 key, archives it and the current one under
//! `feed-signing-keys/` (old keys are never deleted), signs `KeyRollover {previous, next,
//! issued_at}` with the CURRENT key, stores it in the chain (the commit point: from then on
//! the new key is current, and tablets can follow the chain to it from any key they pinned),
//! and finally replaces `feed-signing-key.pem` with the new key. A crash before the chain
//! commit leaves the old key current (an unused archived key is harmless); after it, the
//! server uses the new key from the archive even if `feed-signing-key.pem` was not replaced.
//!
//! Replicas: each replica serves its own copy of the data dir, so a key archived by a rollover
//! on one replica is not in the others' archives. The rollover therefore also stores the new
//! private key in the database, sealed (ChaCha20-Poly1305) with the data dir's key-wrap key
//! (`key-wrap.key`, made by `init` and copied with the data dir): another replica that finds
//! the chain naming a key it lacks opens it from there and archives it. A copy of the database
//! alone cannot sign.
//!
//! A running server compares its key with the chain at most every [`KEY_RECHECK`] (on the
//! server's clock, at the next device request or enrolment), so within that time after a
//! rollover every checkpoint, delta and snapshot is signed by the new key, enrolment answers
//! the new key, and cached snapshots signed by the old key are dropped.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use cpis_protocol::{KeyRollover, PublicKey, SignedMessage, SigningKey};

use crate::feed::Feed;
use crate::pki::{self, FEED_SIGNING_KEY_FILE, PkiError};
use crate::store::{KeyRolloverRecord, Store, StoreError};

/// How often a running server compares its signing key with the key chain (at most).
pub const KEY_RECHECK: Duration = Duration::seconds(10);

/// Why the current key could not be found or a rollover failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the key chain names {0:?} as the current key, which is not a public key")]
    BadChain(String),
    #[error(
        "the key chain's sealed copy of key {0} does not open with this data dir's key-wrap key \
         (is this data dir a copy of the one the replicas were made from?)"
    )]
    Unseal(String),
}

/// Associated data of a sealed signing key: what it is and whose.
fn sealed_aad(public: &PublicKey) -> String {
    format!("cpis feed signing key {public}")
}

/// Seals `key` with the data dir's key-wrap key: nonce (12 bytes) then ciphertext.
fn seal_for_replicas(dir: &Path, key: &SigningKey) -> Result<Vec<u8>, KeyError> {
    use chacha20poly1305::aead::{Aead as _, AeadCore as _, KeyInit as _, Payload};
    let wrap = pki::key_wrap(dir)?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&wrap.into());
    let nonce = chacha20poly1305::ChaCha20Poly1305::generate_nonce(&mut rand::rngs::OsRng);
    let public = PublicKey::from(key);
    let aad = sealed_aad(&public);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: &key.to_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| KeyError::Unseal(public.to_string()))?;
    let mut out = nonce.to_vec();
    out.extend(sealed);
    Ok(out)
}

/// Opens a key sealed by [`seal_for_replicas`] and checks it is `public`'s.
fn open_from_replicas(
    dir: &Path,
    public: &PublicKey,
    sealed: &[u8],
) -> Result<SigningKey, KeyError> {
    use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
    let wrap = pki::key_wrap(dir)?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&wrap.into());
    if sealed.len() < 12 {
        return Err(KeyError::Unseal(public.to_string()));
    }
    let (nonce, ciphertext) = sealed.split_at(12);
    let aad = sealed_aad(public);
    let bytes = cipher
        .decrypt(
            nonce.into(),
            Payload {
                msg: ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| KeyError::Unseal(public.to_string()))?;
    let secret: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Unseal(public.to_string()))?;
    let key = SigningKey::from_bytes(&secret);
    if PublicKey::from(&key) != *public {
        return Err(KeyError::Unseal(public.to_string()));
    }
    Ok(key)
}

/// The key that signs now (see the module doc).
pub async fn current_key<S: Store>(dir: &Path, store: &S) -> Result<SigningKey, KeyError> {
    let file_key = pki::read_signing_key(&dir.join(FEED_SIGNING_KEY_FILE))?;
    let Some(hex) = store.current_signing_key().await? else {
        return Ok(file_key);
    };
    let public: PublicKey = hex.parse().map_err(|_| KeyError::BadChain(hex.clone()))?;
    if PublicKey::from(&file_key) == public {
        return Ok(file_key);
    }
    let archived = match pki::load_archived_signing_key(dir, &public) {
        Ok(key) => return Ok(key),
        Err(e) => e,
    };
    // Rolled over on another replica: open the chain's sealed copy and archive it here.
    let sealed = store
        .key_rollovers()
        .await?
        .into_iter()
        .rev()
        .find(|r| r.rollover.next == public)
        .and_then(|r| r.sealed_next);
    let Some(sealed) = sealed else {
        return Err(archived.into());
    };
    let key = open_from_replicas(dir, &public, &sealed)?;
    pki::archive_signing_key(dir, &key)?;
    tracing::info!(key = %public, "took the rolled-over signing key from the key chain");
    Ok(key)
}

/// What [`roll`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rolled {
    pub previous: PublicKey,
    pub next: PublicKey,
    /// Where the previous key is archived.
    pub previous_archived: PathBuf,
    pub issued_at: DateTime<Utc>,
}

/// Rolls the feed signing key over to a new one (see the module doc).
pub async fn roll<S: Store>(dir: &Path, store: &S, now: DateTime<Utc>) -> Result<Rolled, KeyError> {
    let current = current_key(dir, store).await?;
    let previous_archived = pki::archive_signing_key(dir, &current)?;
    let next = SigningKey::generate(&mut rand::rngs::OsRng);
    pki::archive_signing_key(dir, &next)?;
    let rollover = KeyRollover {
        previous: PublicKey::from(&current),
        next: PublicKey::from(&next),
        issued_at: now,
    };
    let signed = SignedMessage::sign(&current, &rollover);
    let sealed_next = Some(seal_for_replicas(dir, &next)?);
    store
        .add_key_rollover(KeyRolloverRecord {
            rollover: rollover.clone(),
            signed,
            sealed_next,
        })
        .await?;
    pki::install_signing_key(dir, &next)?;
    tracing::info!(previous = %rollover.previous, next = %rollover.next, "rolled the feed signing key over");
    Ok(Rolled {
        previous: rollover.previous,
        next: rollover.next,
        previous_archived,
        issued_at: now,
    })
}

/// Brings `feed`'s signing key in line with the key chain, at most every [`KEY_RECHECK`].
/// A key that cannot be loaded is logged and the feed keeps its key.
pub async fn refresh<S: Store>(feed: &Feed, dir: &Path, store: &S, now: DateTime<Utc>) {
    if !feed.key_check_due(now, KEY_RECHECK) {
        return;
    }
    let current = match store.current_signing_key().await {
        Ok(Some(hex)) => hex,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(%error, "reading the key chain failed; signing with the same key");
            return;
        }
    };
    if feed.public_key().to_string() == current {
        return;
    }
    match current_key(dir, store).await {
        Ok(key) => {
            let public = PublicKey::from(&key);
            if feed.set_key(key) {
                tracing::info!(key = %public, "now signing the feed with the rolled-over key");
            }
        }
        Err(error) => {
            tracing::error!(%error, "the key chain names a new signing key that cannot be loaded; signing with the previous key");
        }
    }
}
