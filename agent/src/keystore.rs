//! Keys: the device master key behind a small [`Keystore`] interface — sealed by the
//! tablet's TPM 2.0 ([`crate::tpm2`], feature `tpm2`) or, where there is none, in a 0600 file
//! ([`FileKeystore`]) — and the per-purpose subkeys derived from it with HKDF-SHA256. Keys
//! live in memory only while the agent runs and are zeroized when dropped.
//!
//! Sealing is XChaCha20-Poly1305 with a random 24-byte nonce: a sealed blob is
//! `nonce || ciphertext || tag`, and every caller binds what the blob is (its row key and
//! version) as associated data, so a blob moved to another row does not open.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

use cpis_protocol::{KeyProtection, NhsNumber};
use zeroize::{Zeroize as _, ZeroizeOnDrop};

/// Length of the master key and of every subkey.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why a key could not be made, read or destroyed, or a blob could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no device key: this tablet is not enrolled, or it was wiped")]
    Missing,
    #[error("the device key file is damaged: {0}")]
    Damaged(String),
    #[error("device key IO on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a sealed record does not open: it was altered, moved or sealed with another key")]
    Unseal,
    #[error("sealing failed")]
    Seal,
    /// The TPM could not be reached or failed a command (the key itself may be fine).
    #[error("TPM 2.0 ({tcti}): {message}")]
    Tpm { tcti: String, message: String },
    /// The TPM answered but cannot unseal this key: the state directory was copied from
    /// another machine, the TPM was cleared, or the tablet was wiped.
    #[error(
        "the device key does not unseal with this machine's TPM 2.0 ({tcti}): {message}. \
         This state directory was copied from another tablet, its TPM was cleared, or the \
         tablet was wiped; nothing in it can be opened here. Enrol afresh"
    )]
    NotThisTpm { tcti: String, message: String },
    /// The state directory's key is sealed by a TPM, and this build has no TPM support.
    #[error(
        "the device key is sealed by a TPM 2.0 and this cpis-agent was built without TPM \
         support (cargo feature `tpm2`)"
    )]
    NoTpmSupport,
}

/// Holds the device master key: [`FileKeystore`], or the TPM 2.0 keystore
/// (`crate::tpm2::Tpm2Keystore`, feature `tpm2`).
pub trait Keystore: Send + Sync + std::fmt::Debug {
    /// Makes and stores a new random master key; fails if one exists.
    fn create(&self) -> Result<MasterKey, KeyError>;
    /// Loads the master key.
    fn load(&self) -> Result<MasterKey, KeyError>;
    /// Destroys the master key so that nothing sealed with it can be opened again, not
    /// even from a copy of the disk taken before.
    fn destroy(&self) -> Result<(), KeyError>;
    /// How this keystore protects the key.
    fn protection(&self) -> KeyProtection;
}

/// The keystore holding a state directory's master key: the TPM's when the directory
/// holds a TPM-sealed key, else the key file.
pub fn existing(state_dir: &Path) -> Result<Box<dyn Keystore>, KeyError> {
    if state_dir.join("keys").join(TPM2_KEY_FILE).exists() {
        return new(state_dir, KeyProtection::Tpm2);
    }
    Ok(Box::new(FileKeystore::in_state_dir(state_dir)))
}

/// A keystore of the given kind for a state directory.
pub fn new(state_dir: &Path, kind: KeyProtection) -> Result<Box<dyn Keystore>, KeyError> {
    match kind {
        KeyProtection::File => Ok(Box::new(FileKeystore::in_state_dir(state_dir))),
        #[cfg(feature = "tpm2")]
        KeyProtection::Tpm2 => Ok(Box::new(crate::tpm2::Tpm2Keystore::in_state_dir(state_dir))),
        #[cfg(not(feature = "tpm2"))]
        KeyProtection::Tpm2 => Err(KeyError::NoTpmSupport),
    }
}

/// The keystore an enrolment uses: `requested`, or `tpm2` when a TPM answers and `file`
/// otherwise. Returns the kind and, for `file`, the warning to show (why there is no TPM,
/// and what a key file does not protect against). A requested `tpm2` without a TPM fails.
pub fn choose(
    requested: Option<KeyProtection>,
) -> Result<(KeyProtection, Option<String>), KeyError> {
    const FILE_WARNING: &str = "the device master key will be kept in a file (keys/master.key). \
        Without full-disk encryption a copy of this disk opens every flag; enrol tablets with \
        --keystore tpm2 (see PROVISIONING.md)";
    match requested {
        Some(KeyProtection::File) => Ok((KeyProtection::File, Some(FILE_WARNING.to_owned()))),
        Some(KeyProtection::Tpm2) => {
            probe_tpm()?;
            Ok((KeyProtection::Tpm2, None))
        }
        None => match probe_tpm() {
            Ok(()) => Ok((KeyProtection::Tpm2, None)),
            Err(why) => Ok((
                KeyProtection::File,
                Some(format!("no TPM 2.0 could be used ({why}); {FILE_WARNING}")),
            )),
        },
    }
}

fn probe_tpm() -> Result<(), KeyError> {
    #[cfg(feature = "tpm2")]
    return crate::tpm2::probe(&crate::tpm2::tcti());
    #[cfg(not(feature = "tpm2"))]
    Err(KeyError::Tpm {
        tcti: "none".into(),
        message: "this cpis-agent was built without TPM support (cargo feature `tpm2`)".into(),
    })
}

/// Name of the TPM-sealed key record under `STATE_DIR/keys/`.
pub(crate) const TPM2_KEY_FILE: &str = "master.tpm2";

/// The device master key. Never leaves the process except through its keystore; zeroized
/// when dropped.
#[derive(ZeroizeOnDrop)]
pub struct MasterKey([u8; KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// The key made of two secrets that must both be present to rebuild it (HKDF-SHA256,
    /// `salt` as salt); `label` names the construction.
    #[cfg_attr(not(feature = "tpm2"), allow(dead_code))]
    pub(crate) fn combine(secret: &[u8], salt: &[u8], label: &[u8]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(salt), secret);
        let mut k = [0u8; KEY_LEN];
        // A 32-byte output is always within HKDF-SHA256's limit.
        let _ = hk.expand(label, &mut k);
        Self(k)
    }

    /// Derives the per-purpose subkeys.
    pub fn derive(&self) -> Keys {
        let hk = Hkdf::<Sha256>::new(Some(b"cpis-edge-agent/v1"), &self.0);
        let sub = |info: &[u8]| {
            let mut out = [0u8; KEY_LEN];
            // A 32-byte output is always within HKDF-SHA256's limit.
            let _ = hk.expand(info, &mut out);
            out
        };
        let sealer = |info: &[u8]| {
            let mut k = sub(info);
            let s = Sealer::new(&k);
            k.zeroize();
            s
        };
        Keys {
            lookup: sub(b"lookup-hash"),
            integrity: sub(b"row-integrity"),
            snapshot: sealer(b"snapshot-seal"),
            outbox: sealer(b"outbox-seal"),
            meta: sealer(b"meta-seal"),
            download: sealer(b"download-seal"),
        }
    }
}

/// The master key in a file of its own (mode 0600) under `STATE_DIR/keys/`.
#[derive(Debug, Clone)]
pub struct FileKeystore {
    path: PathBuf,
}

impl FileKeystore {
    /// The keystore of a state directory.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("keys").join("master.key"),
        }
    }

    fn io(&self, source: std::io::Error) -> KeyError {
        KeyError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Writes `bytes` to a new file with mode 0600, fsyncs it and its directory.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    set_dir_private(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn set_dir_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Overwrites a file with zeros, fsyncs, then deletes it. Missing files are fine.
pub(crate) fn shred_file(path: &Path) -> std::io::Result<()> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    fs::remove_file(path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Keystore for FileKeystore {
    fn protection(&self) -> KeyProtection {
        KeyProtection::File
    }

    fn create(&self) -> Result<MasterKey, KeyError> {
        if self.path.exists() {
            return Err(KeyError::Damaged(format!(
                "{} already exists; wipe the tablet before enrolling again",
                self.path.display()
            )));
        }
        let key = MasterKey::generate();
        write_private(&self.path, &key.0).map_err(|e| self.io(e))?;
        Ok(key)
    }

    fn load(&self) -> Result<MasterKey, KeyError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(KeyError::Missing),
            Err(e) => return Err(self.io(e)),
        };
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
            KeyError::Damaged(format!("expected {KEY_LEN} bytes, found {}", b.len()))
        })?;
        let key = MasterKey(arr);
        if key.0 == [0u8; KEY_LEN] {
            return Err(KeyError::Missing);
        }
        Ok(key)
    }

    fn destroy(&self) -> Result<(), KeyError> {
        shred_file(&self.path).map_err(|e| self.io(e))
    }
}

/// Seals and opens blobs with one subkey.
#[derive(Clone)]
pub struct Sealer(XChaCha20Poly1305);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        Self(XChaCha20Poly1305::new(key.into()))
    }

    /// `nonce || ciphertext+tag`, with `aad` bound in.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| KeyError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// [`Sealer::seal`] of what `write` appends to the buffer it is given, sealed where it
    /// lies: one allocation for the whole blob (the snapshot install seals 200,000 rows).
    pub fn seal_written<E>(
        &self,
        capacity: usize,
        aad: &[u8],
        write: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<Result<Vec<u8>, KeyError>, E> {
        let mut buf = Vec::with_capacity(NONCE_LEN + capacity + TAG_LEN);
        buf.resize(NONCE_LEN, 0);
        let mut buf = write(buf)?;
        let (nonce, plaintext) = buf.split_at_mut(NONCE_LEN);
        rand::thread_rng().fill_bytes(nonce);
        let sealed = self
            .0
            .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, plaintext)
            .map(|tag| {
                buf.extend_from_slice(&tag);
                buf
            })
            .map_err(|_| KeyError::Seal);
        Ok(sealed)
    }

    /// Opens a blob sealed with the same key and `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Unseal);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| KeyError::Unseal)
    }
}

/// The subkeys, one per purpose. The raw ones are zeroized when dropped (the sealers'
/// ciphers zeroize their own keys).
#[derive(Clone, ZeroizeOnDrop)]
pub struct Keys {
    lookup: [u8; KEY_LEN],
    /// Per-row MACs of the store's integrity record ([`crate::store::RowsDigest`]).
    integrity: [u8; KEY_LEN],
    /// Flag rows.
    #[zeroize(skip)]
    pub snapshot: Sealer,
    /// Outbox events.
    #[zeroize(skip)]
    pub outbox: Sealer,
    /// Metadata: position, policy, council directory, enrolment, the TLS private key.
    #[zeroize(skip)]
    pub meta: Sealer,
    /// Partial snapshot downloads ([`crate::download`]).
    #[zeroize(skip)]
    pub download: Sealer,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// The row key of a subject: HMAC-SHA256 of the ten ASCII digits under the lookup key.
    pub fn subject_key(&self, nhs: NhsNumber) -> [u8; 32] {
        // HMAC accepts keys of any length.
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.lookup) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        mac.update(&nhs.to_ascii());
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of `parts` (each length-prefixed) under the integrity key: one sealed
    /// row's contribution to the store's integrity record. Without the key nobody can
    /// compute it, so no set of rows can be forged to match a record.
    pub fn row_mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.integrity) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    // `new_from_slice` only fails for key lengths HMAC rejects, and it rejects none.
    panic!("HMAC rejected a 32-byte key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_aad() {
        let keys = MasterKey::generate().derive();
        let blob = keys.snapshot.seal(b"hello", b"row-1").unwrap();
        assert_eq!(keys.snapshot.open(&blob, b"row-1").unwrap(), b"hello");
        assert!(keys.snapshot.open(&blob, b"row-2").is_err());
        assert!(keys.outbox.open(&blob, b"row-1").is_err());
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(keys.snapshot.open(&bad, b"row-1").is_err());
    }

    #[test]
    fn file_keystore_round_trip_and_destroy() {
        let dir = tempfile::tempdir().unwrap();
        let ks = FileKeystore::in_state_dir(dir.path());
        assert!(matches!(ks.load(), Err(KeyError::Missing)));
        let k = ks.create().unwrap();
        let n: NhsNumber = "9434765919".parse().unwrap();
        assert_eq!(
            ks.load().unwrap().derive().subject_key(n),
            k.derive().subject_key(n)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join("keys/master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        ks.destroy().unwrap();
        assert!(matches!(ks.load(), Err(KeyError::Missing)));
    }
}
