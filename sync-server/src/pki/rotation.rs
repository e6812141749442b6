//! Replacing keys and certificates while the server runs: the archive of feed signing keys
//! (`feed-signing-keys/<public key hex>.pem`, never deleted), installing a new current feed
//! signing key, re-issuing the server certificate from the existing TLS CA, the rustls
//! certificate resolver that picks a re-issued certificate up without a restart, and the
//! expiries `admin tls status` shows.
//!
//! Every file is replaced atomically (written to a temporary name, synced, renamed over the
//! old one, directory synced), so a reader sees the old file or the new one, never half.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cpis_protocol::PublicKey;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rcgen::Issuer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{
    DEVICE_CA_CERT_FILE, FEED_SIGNING_KEY_FILE, PkiError, SERVER_CERT_FILE, SERVER_KEY_FILE,
    TLS_CA_CERT_FILE, TLS_CA_KEY_FILE, bad, cert_chain, cert_der_expiry, check_issued_by,
    check_key_matches, generate, new_key, read_file, read_key_file, read_key_pair, server_names,
    server_params, single_cert, sync_dir, write_new,
};

/// Folder of every feed signing key the server has used or will use, by public key.
pub const SIGNING_KEY_ARCHIVE_DIR: &str = "feed-signing-keys";

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_owned();
    move |source| PkiError::Io {
        action,
        path,
        source,
    }
}

/// Replaces `path` atomically with `contents` (a key `0600` from the start).
fn replace_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    if let Err(e) = write_new(&tmp, contents, secret) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("renaming into place", path)(e));
    }
    sync_dir(dir)
}

fn signing_key_pem(key: &SigningKey, path: &Path) -> Result<String, PkiError> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| bad(path, format!("encoding the feed signing key: {e}")))
}

/// Reads an Ed25519 PKCS#8 key file (refused if others can read it).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, PkiError> {
    let pem = read_key_file(path)?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| bad(path, format!("not an Ed25519 PKCS#8 private key: {e}")))
}

/// Where the archive keeps the key with this public key.
pub fn archived_signing_key_path(dir: &Path, public: &PublicKey) -> PathBuf {
    dir.join(SIGNING_KEY_ARCHIVE_DIR)
        .join(format!("{public}.pem"))
}

/// Writes `key` into the archive unless it is there already; returns its path.
pub fn archive_signing_key(dir: &Path, key: &SigningKey) -> Result<PathBuf, PkiError> {
    let archive = dir.join(SIGNING_KEY_ARCHIVE_DIR);
    if !archive.exists() {
        fs::create_dir_all(&archive).map_err(io_err("creating", &archive))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&archive, fs::Permissions::from_mode(0o700))
            .map_err(io_err("securing", &archive))?;
    }
    let path = archived_signing_key_path(dir, &PublicKey::from(key));
    if path.exists() {
        let existing = read_signing_key(&path)?;
        if existing.verifying_key() != key.verifying_key() {
            return Err(bad(&path, "holds another key than its name says"));
        }
        return Ok(path);
    }
    replace_file(&path, signing_key_pem(key, &path)?.as_bytes(), true)?;
    Ok(path)
}

/// The archived key with this public key.
pub fn load_archived_signing_key(dir: &Path, public: &PublicKey) -> Result<SigningKey, PkiError> {
    let path = archived_signing_key_path(dir, public);
    let key = read_signing_key(&path)?;
    if PublicKey::from(&key) != *public {
        return Err(bad(&path, "holds another key than its name says"));
    }
    Ok(key)
}

/// Makes `key` the data dir's `feed-signing-key.pem` (atomically). The database's key chain,
/// not this file, decides which key signs; the file is what `init` wrote and what a server
/// loads first.
pub fn install_signing_key(dir: &Path, key: &SigningKey) -> Result<(), PkiError> {
    let path = dir.join(FEED_SIGNING_KEY_FILE);
    replace_file(&path, signing_key_pem(key, &path)?.as_bytes(), true)
}

/// Issues a new server key and certificate (SANs = hostnames plus localhost and 127.0.0.1)
/// from the existing TLS CA, so tablets keep trusting it, and replaces
/// `tls-server-key.pem` then `tls-server.pem` atomically. A running server picks them up at
/// its next TLS handshake ([`ReloadingServerCert`]). Returns the new certificate's expiry.
pub fn rotate_server_certificate(
    dir: &Path,
    hostnames: &[String],
) -> Result<DateTime<Utc>, PkiError> {
    let sans = server_names(hostnames)?;
    let ca_path = dir.join(TLS_CA_CERT_FILE);
    let ca_cert = single_cert(&ca_path, &read_file(&ca_path)?)?;
    let ca_key = read_key_pair(&dir.join(TLS_CA_KEY_FILE))?;
    check_key_matches(&ca_path, &ca_cert, &ca_key)?;
    let ca = Issuer::from_ca_cert_der(&ca_cert, ca_key)
        .map_err(|e| bad(&ca_path, format!("not a usable CA certificate: {e}")))?;
    let key = new_key("the server key")?;
    let cert = server_params(sans, Utc::now())
        .signed_by(&key, &ca)
        .map_err(generate("the server certificate"))?;
    let expires_at =
        cert_der_expiry(cert.der()).map_err(|e| bad(&dir.join(SERVER_CERT_FILE), e))?;
    replace_file(
        &dir.join(SERVER_KEY_FILE),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    replace_file(&dir.join(SERVER_CERT_FILE), cert.pem().as_bytes(), false)?;
    Ok(expires_at)
}

/// Which versions of the server certificate and key files are on disk (inode, size and
/// modification time of each): a rename changes the inode.
type Stamp = [(u64, u64, i64, i64); 2];

fn stamp(dir: &Path) -> Option<Stamp> {
    let one = |name: &str| {
        fs::metadata(dir.join(name))
            .ok()
            .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
    };
    Some([one(SERVER_CERT_FILE)?, one(SERVER_KEY_FILE)?])
}

/// Loads the server certificate and key, checking they match and that the TLS CA issued the
/// certificate.
fn load_certified_key(
    dir: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(Arc<CertifiedKey>, DateTime<Utc>), PkiError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let chain = cert_chain(&cert_path, &read_file(&cert_path)?)?;
    let key = read_key_pair(&dir.join(SERVER_KEY_FILE))?;
    check_key_matches(&cert_path, &chain[0], &key)?;
    let ca_path = dir.join(TLS_CA_CERT_FILE);
    let ca = single_cert(&ca_path, &read_file(&ca_path)?)?;
    check_issued_by(&cert_path, &chain[0], &ca_path, &ca)?;
    let expires_at = cert_der_expiry(&chain[0]).map_err(|e| bad(&cert_path, e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider.key_provider.load_private_key(der)?;
    Ok((Arc::new(CertifiedKey::new(chain, signing)), expires_at))
}

/// A rustls certificate resolver that serves `tls-server.pem` and reloads it when the file
/// (or its key) is replaced: each TLS handshake compares the two files' inode, size and
/// modification time (one `stat` each) with those it last loaded. A replacement that does
/// not load (a key that does not match, not issued by the TLS CA) is logged and the previous
/// certificate stays in use.
#[derive(Debug)]
pub struct ReloadingServerCert {
    dir: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: Mutex<(Option<Stamp>, Arc<CertifiedKey>)>,
}

impl ReloadingServerCert {
    /// Loads the data dir's server certificate now.
    pub fn new(
        dir: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, PkiError> {
        let before = stamp(dir);
        let (key, _) = load_certified_key(dir, &provider)?;
        Ok(Self {
            dir: dir.to_owned(),
            provider,
            current: Mutex::new((before, key)),
        })
    }

    /// The certificate to present, reloaded first if the files changed.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        let now = stamp(&self.dir);
        if now.is_some() && now != current.0 {
            current.0 = now;
            match load_certified_key(&self.dir, &self.provider) {
                Ok((key, expires_at)) => {
                    tracing::info!(dir = %self.dir.display(), %expires_at, "loaded a new server certificate");
                    current.1 = key;
                }
                Err(error) => {
                    tracing::warn!(%error, "the server certificate files changed but do not load; still serving the previous certificate");
                }
            }
        }
        Some(current.1.clone())
    }
}

impl ResolvesServerCert for ReloadingServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// One certificate of the data dir, for `admin tls status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertStatus {
    /// The file name inside the data dir.
    pub file: &'static str,
    /// What it is for.
    pub role: &'static str,
    /// Subject common name and, for the server certificate, its DNS names and addresses.
    pub names: Vec<String>,
    pub expires_at: DateTime<Utc>,
}

/// The TLS CA, server certificate and device CA with their expiries.
pub fn certificate_status(dir: &Path) -> Result<Vec<CertStatus>, PkiError> {
    let files = [
        (TLS_CA_CERT_FILE, "TLS CA (tablets trust it)"),
        (SERVER_CERT_FILE, "server certificate"),
        (
            DEVICE_CA_CERT_FILE,
            "device CA (issues client certificates)",
        ),
    ];
    let mut out = Vec::new();
    for (file, role) in files {
        let path = dir.join(file);
        let chain = cert_chain(&path, &read_file(&path)?)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| bad(&path, format!("cannot parse the certificate: {e}")))?;
        let mut names: Vec<String> = parsed
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(|s| format!("CN={s}")))
            .collect();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => {
                        let text = match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .unwrap_or_default(),
                            16 => <[u8; 16]>::try_from(*ip)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .unwrap_or_default(),
                            _ => hex::encode(ip),
                        };
                        names.push(text);
                    }
                    _ => {}
                }
            }
        }
        out.push(CertStatus {
            file,
            role,
            names,
            expires_at: cert_der_expiry(&chain[0]).map_err(|e| bad(&path, e))?,
        });
    }
    Ok(out)
}
