//! The server's keys and certificates in the data dir: the Ed25519 feed signing key, the private
//! TLS CA with the server certificate it signs, and the device CA that issues tablets' client
//! certificates at enrolment.
//!
//! Files (private keys are written `0600` and refused on load if others can read them):
//!
//! | file                   | what                                                           |
//! |------------------------|----------------------------------------------------------------|
//! | `feed-signing-key.pem` | Ed25519 key that signs snapshots, deltas and checkpoints       |
//! | `tls-ca.pem`           | TLS CA certificate; tablets trust it (`cpis-agent enrol --ca`) |
//! | `tls-ca-key.pem`       | TLS CA private key (only needed to re-issue the server cert)   |
//! | `tls-server.pem`       | server certificate (leaf), signed by the TLS CA                |
//! | `tls-server-key.pem`   | server private key                                             |
//! | `device-ca.pem`        | device CA certificate; the server trusts it for client auth    |
//! | `device-ca-key.pem`    | device CA private key; signs tablets' client certificates      |
//! | `feed-signing-keys/`   | every feed signing key used since the first rollover, by public key |
//!
//! `admin signing-key roll` and `admin tls rotate-server-cert` replace keys and certificates
//! of a running server (see `rotation`).
//!
//! The two CAs are separate on purpose: a device certificate can never pass as a server
//! certificate (tablets do not trust the device CA), and the TLS CA never vouches for a tablet.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use cpis_protocol::{DeviceId, PublicKey};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

mod rotation;

pub use rotation::{
    CertStatus, ReloadingServerCert, SIGNING_KEY_ARCHIVE_DIR, archive_signing_key,
    archived_signing_key_path, certificate_status, install_signing_key, load_archived_signing_key,
    read_signing_key, rotate_server_certificate,
};

/// Ed25519 key that signs snapshots, deltas and checkpoints.
pub const FEED_SIGNING_KEY_FILE: &str = "feed-signing-key.pem";
/// TLS CA certificate, handed to tablets at enrolment.
pub const TLS_CA_CERT_FILE: &str = "tls-ca.pem";
/// TLS CA private key.
pub const TLS_CA_KEY_FILE: &str = "tls-ca-key.pem";
/// Server certificate, signed by the TLS CA.
pub const SERVER_CERT_FILE: &str = "tls-server.pem";
/// Server private key.
pub const SERVER_KEY_FILE: &str = "tls-server-key.pem";
/// Device CA certificate: the root the server trusts for client certificates.
pub const DEVICE_CA_CERT_FILE: &str = "device-ca.pem";
/// Device CA private key.
pub const DEVICE_CA_KEY_FILE: &str = "device-ca-key.pem";

/// 32 random bytes (hex) that seal a rolled-over feed signing key in the database, so every
/// replica's copy of the data dir can open it and the database alone cannot (see `keys`).
pub const KEY_WRAP_FILE: &str = "key-wrap.key";

/// Every file [`Pki::create`] writes.
pub const ALL_FILES: [&str; 8] = [
    FEED_SIGNING_KEY_FILE,
    KEY_WRAP_FILE,
    TLS_CA_CERT_FILE,
    TLS_CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    DEVICE_CA_CERT_FILE,
    DEVICE_CA_KEY_FILE,
];

/// How long the two CAs are valid. There is no CA rotation yet, so this is long.
const CA_VALIDITY: chrono::Duration = chrono::Duration::days(20 * 365);
/// How long the server certificate is valid.
const SERVER_CERT_VALIDITY: chrono::Duration = chrono::Duration::days(10 * 365);
/// CA and server certificates start this long before creation, so a tablet whose clock is a
/// little behind still accepts them.
const BACKDATE: chrono::Duration = chrono::Duration::days(1);
/// Below this remaining lifetime, loading the server certificate logs a warning.
const EXPIRY_WARNING: chrono::Duration = chrono::Duration::days(60);

/// Why the PKI could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `create` found a file it would have written.
    #[error("{} already exists; refusing to overwrite the server's keys", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file that `load` needs is not there.
    #[error(
        "{} is missing; run `cpis-sync-server init` to create the server's keys",
        path.display()
    )]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A private key file can be read by other users.
    #[error(
        "{} is readable by other users (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A hostname cannot go into the server certificate.
    #[error("hostname {name:?} cannot be used in the server certificate: {reason}")]
    InvalidHostname {
        /// The hostname as given.
        name: String,
        /// Why not.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The certificate signing request cannot be parsed or asks for something unsupported.
    #[error("certificate signing request is not valid: {reason}")]
    InvalidCsr {
        /// Why.
        reason: String,
    },
    /// The certificate signing request's signature does not verify.
    #[error("certificate signing request signature does not verify")]
    CsrSignature,
    /// The requested certificate lifetime is not usable.
    #[error("invalid certificate validity: {reason}")]
    InvalidValidity {
        /// Why.
        reason: String,
    },
    /// A PEM certificate given to a helper cannot be read.
    #[error("certificate is not valid: {reason}")]
    InvalidCertificate {
        /// Why.
        reason: String,
    },
    /// Building the rustls configuration failed.
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the client certificate verifier failed.
    #[error("building the client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

impl PkiError {
    /// True when the caller sent something unusable (a bad CSR), so an HTTP layer should
    /// answer 400 rather than 500.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            PkiError::InvalidCsr { .. } | PkiError::CsrSignature | PkiError::InvalidValidity { .. }
        )
    }
}

/// A client certificate issued to a tablet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate (leaf only), PEM. The device CA is the server's trust root, so no chain
    /// is needed.
    pub pem: String,
    /// The certificate's `notAfter`, to the second.
    pub expires_at: DateTime<Utc>,
}

/// The server's keys and certificates, loaded from the data dir.
pub struct Pki {
    dir: PathBuf,
    signing_key: SigningKey,
    ca_cert_pem: String,
    /// The server certificate chain as loaded at start (a rotated one is served by
    /// [`ReloadingServerCert`] without updating this).
    server_chain: Vec<CertificateDer<'static>>,
    server_cert_expires_at: DateTime<Utc>,
    device_ca_cert: CertificateDer<'static>,
    device_ca: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("feed_public_key", &PublicKey::from(&self.signing_key))
            .field("server_cert_expires_at", &self.server_cert_expires_at)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Creates, inside `dir` (which exists), the Ed25519 feed signing key, a private TLS CA,
    /// a server certificate (SANs = hostnames, always including localhost and 127.0.0.1)
    /// signed by that CA, and a separate device CA for client certificates. Private key
    /// files are written 0600. Refuses (error) if any of the files already exists; writes
    /// atomically (temp + rename).
    pub fn create(dir: &Path, hostnames: &[String]) -> Result<Pki, PkiError> {
        for name in ALL_FILES {
            let path = dir.join(name);
            if fs::symlink_metadata(&path).is_ok() {
                return Err(PkiError::Exists { path });
            }
        }
        let sans = server_names(hostnames)?;
        let now = Utc::now();

        let signing_key = SigningKey::generate(&mut rand::rngs::OsRng);
        let signing_pem =
            signing_key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| PkiError::BadFile {
                    path: dir.join(FEED_SIGNING_KEY_FILE),
                    reason: format!("encoding the feed signing key: {e}"),
                })?;

        let tls_ca_key = new_key("the TLS CA key")?;
        let tls_ca_params = ca_params("CP-IS Edge TLS CA", now);
        let tls_ca_cert = tls_ca_params
            .self_signed(&tls_ca_key)
            .map_err(generate("the TLS CA certificate"))?;
        let tls_ca_key_pem = tls_ca_key.serialize_pem();
        let tls_ca = Issuer::new(tls_ca_params, tls_ca_key);

        let server_key = new_key("the server key")?;
        let server_cert = server_params(sans, now)
            .signed_by(&server_key, &tls_ca)
            .map_err(generate("the server certificate"))?;

        let device_ca_key = new_key("the device CA key")?;
        let device_ca_cert = ca_params("CP-IS Edge device CA", now)
            .self_signed(&device_ca_key)
            .map_err(generate("the device CA certificate"))?;

        let files = [
            (FEED_SIGNING_KEY_FILE, signing_pem.as_bytes(), true),
            (TLS_CA_CERT_FILE, tls_ca_cert.pem().as_bytes(), false),
            (TLS_CA_KEY_FILE, tls_ca_key_pem.as_bytes(), true),
            (SERVER_CERT_FILE, server_cert.pem().as_bytes(), false),
            (SERVER_KEY_FILE, server_key.serialize_pem().as_bytes(), true),
            (DEVICE_CA_CERT_FILE, device_ca_cert.pem().as_bytes(), false),
            (
                DEVICE_CA_KEY_FILE,
                device_ca_key.serialize_pem().as_bytes(),
                true,
            ),
            (KEY_WRAP_FILE, new_key_wrap().as_bytes(), true),
        ]
        .map(|(name, contents, secret)| (name, contents.to_vec(), secret));
        write_files(dir, &files)?;
        tracing::info!(dir = %dir.display(), "created the server's signing key, TLS CA, server certificate and device CA");
        Pki::load(dir)
    }

    /// Loads the keys and certificates that [`Pki::create`] wrote, checking that each key
    /// matches its certificate and that no private key is readable by other users.
    pub fn load(dir: &Path) -> Result<Pki, PkiError> {
        let path = dir.join(FEED_SIGNING_KEY_FILE);
        let signing_pem = read_key_file(&path)?;
        let signing_key =
            SigningKey::from_pkcs8_pem(&signing_pem).map_err(|e| PkiError::BadFile {
                path: path.clone(),
                reason: format!("not an Ed25519 PKCS#8 private key: {e}"),
            })?;

        let ca_path = dir.join(TLS_CA_CERT_FILE);
        let ca_cert_pem = read_file(&ca_path)?;
        let ca_cert = single_cert(&ca_path, &ca_cert_pem)?;

        let server_path = dir.join(SERVER_CERT_FILE);
        let server_pem = read_file(&server_path)?;
        let server_chain = cert_chain(&server_path, &server_pem)?;
        let server_key_path = dir.join(SERVER_KEY_FILE);
        let server_key = read_key_pair(&server_key_path)?;
        let server_leaf = &server_chain[0];
        check_key_matches(&server_path, server_leaf, &server_key)?;
        check_issued_by(&server_path, server_leaf, &ca_path, &ca_cert)?;
        let server_cert_expires_at =
            cert_der_expiry(server_leaf).map_err(|e| bad(&server_path, e))?;
        let remaining = server_cert_expires_at - Utc::now();
        if remaining < chrono::Duration::zero() {
            tracing::error!(file = %server_path.display(), expired_at = %server_cert_expires_at, "the server certificate has expired; tablets will refuse to connect");
        } else if remaining < EXPIRY_WARNING {
            tracing::warn!(file = %server_path.display(), expires_at = %server_cert_expires_at, "the server certificate expires soon");
        }

        let device_ca_path = dir.join(DEVICE_CA_CERT_FILE);
        let device_ca_pem = read_file(&device_ca_path)?;
        let device_ca_cert = single_cert(&device_ca_path, &device_ca_pem)?;
        let device_ca_key = read_key_pair(&dir.join(DEVICE_CA_KEY_FILE))?;
        check_key_matches(&device_ca_path, &device_ca_cert, &device_ca_key)?;
        let device_ca = Issuer::from_ca_cert_der(&device_ca_cert, device_ca_key)
            .map_err(|e| bad(&device_ca_path, format!("not a usable CA certificate: {e}")))?;

        Ok(Pki {
            dir: dir.to_owned(),
            signing_key,
            ca_cert_pem,
            server_chain,
            server_cert_expires_at,
            device_ca_cert,
            device_ca,
        })
    }

    /// The key that signs snapshots, deltas and checkpoints.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }

    /// PEM of the TLS CA that tablets trust at enrolment (`cpis-agent enrol --ca FILE`).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// Where [`Pki::create`] wrote the TLS CA certificate inside the data dir.
    pub fn ca_cert_path(dir: &Path) -> PathBuf {
        dir.join(TLS_CA_CERT_FILE)
    }

    /// The server certificate (leaf) as loaded.
    pub fn server_certificate(&self) -> &CertificateDer<'static> {
        &self.server_chain[0]
    }

    /// When the server certificate expires.
    pub fn server_cert_expires_at(&self) -> DateTime<Utc> {
        self.server_cert_expires_at
    }

    /// Issues a client certificate for the key in a PEM CSR (the private key never leaves the
    /// tablet): subject CN = device id; validity `now .. now + valid_for`; ClientAuth EKU;
    /// signed by the device CA. Only the CSR's public key is used; anything else it asks for
    /// (names, CA rights, usages) is ignored. Rejects a malformed CSR or one whose signature
    /// does not verify.
    pub fn issue_device_certificate(
        &self,
        csr_pem: &str,
        device: DeviceId,
        valid_for: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<IssuedCert, PkiError> {
        if valid_for <= chrono::Duration::zero() {
            return Err(PkiError::InvalidValidity {
                reason: format!("the lifetime must be positive, not {valid_for}"),
            });
        }
        let not_before = whole_seconds(now)?;
        let not_after = not_before
            .checked_add_signed(valid_for)
            .and_then(|t| DateTime::from_timestamp(t.timestamp(), 0))
            .ok_or_else(|| PkiError::InvalidValidity {
                reason: format!("{now} + {valid_for} is out of range"),
            })?;

        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => PkiError::CsrSignature,
            other => PkiError::InvalidCsr {
                reason: other.to_string(),
            },
        })?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device.to_string());
        params.not_before = SystemTime::from(not_before).into();
        params.not_after = SystemTime::from(not_after).into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;

        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = request.signed_by(&self.device_ca).map_err(|e| match e {
            rcgen::Error::UnsupportedSignatureAlgorithm
            | rcgen::Error::KeyGenerationUnavailable => PkiError::InvalidCsr {
                reason: e.to_string(),
            },
            other => PkiError::Generate {
                what: "the device certificate",
                source: other,
            },
        })?;
        Ok(IssuedCert {
            pem: cert.pem(),
            expires_at: not_after,
        })
    }

    /// rustls server config: ring provider, TLS 1.2 + 1.3, ALPN h2 and http/1.1, the server
    /// certificate, and client auth optional but verified against the device CA when
    /// presented (council and enrolment endpoints have no client certificate; device
    /// endpoints require one, which the HTTP layer enforces via
    /// [`crate::tls::ClientIdentity`]).
    pub fn server_tls_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.device_ca_cert.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let resolver = Arc::new(ReloadingServerCert::new(&self.dir, provider.clone())?);
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// When a PEM certificate (the first one in `pem`) expires.
pub fn cert_pem_expiry(pem: &str) -> Result<DateTime<Utc>, PkiError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        PkiError::InvalidCertificate {
            reason: format!("no PEM certificate found: {e}"),
        }
    })?;
    cert_der_expiry(&der).map_err(|reason| PkiError::InvalidCertificate { reason })
}

/// The device id in a (verified) client certificate's subject common name.
pub fn device_id_from_cert(der: &CertificateDer<'_>) -> Result<DeviceId, PkiError> {
    let invalid = |reason: String| PkiError::InvalidCertificate { reason };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("cannot parse the certificate: {e}")))?;
    let mut names = cert.subject().iter_common_name();
    let cn = names
        .next()
        .ok_or_else(|| invalid("the certificate subject has no common name".to_owned()))?
        .as_str()
        .map_err(|e| invalid(format!("the certificate common name is not a string: {e}")))?;
    if names.next().is_some() {
        return Err(invalid(
            "the certificate subject has more than one common name".to_owned(),
        ));
    }
    cn.parse::<DeviceId>().map_err(|e| {
        invalid(format!(
            "the certificate common name is not a device id: {e}"
        ))
    })
}

fn cert_der_expiry(der: &CertificateDer<'_>) -> Result<DateTime<Utc>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let secs = cert.validity().not_after.timestamp();
    DateTime::from_timestamp(secs, 0).ok_or_else(|| format!("notAfter {secs} is out of range"))
}

fn generate(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

fn bad(path: &Path, reason: impl Into<String>) -> PkiError {
    PkiError::BadFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn new_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate(what))
}

fn whole_seconds(t: DateTime<Utc>) -> Result<DateTime<Utc>, PkiError> {
    DateTime::from_timestamp(t.timestamp(), 0).ok_or_else(|| PkiError::InvalidValidity {
        reason: format!("{t} is out of range"),
    })
}

fn validity(now: DateTime<Utc>, lifetime: chrono::Duration) -> (SystemTime, SystemTime) {
    let start = now - BACKDATE;
    (SystemTime::from(start), SystemTime::from(now + lifetime))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so the DER INTEGER is exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(name: &str, now: DateTime<Utc>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "CP-IS Edge");
    let (not_before, not_after) = validity(now, CA_VALIDITY);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The server certificate's names: the given hostnames (trimmed, de-duplicated, lower-cased),
/// then localhost and 127.0.0.1.
fn server_names(hostnames: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut names: Vec<String> = Vec::new();
    for raw in hostnames {
        let name = raw.trim().to_ascii_lowercase();
        if name.is_empty() || name.contains(char::is_whitespace) || name.contains('/') {
            return Err(PkiError::InvalidHostname {
                name: raw.clone(),
                reason: "must be a DNS name or an IP address".to_owned(),
            });
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for default in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.to_owned());
        }
    }
    names
        .into_iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e: rcgen::Error| PkiError::InvalidHostname {
                    name: name.clone(),
                    reason: e.to_string(),
                }),
        })
        .collect()
}

fn server_params(sans: Vec<SanType>, now: DateTime<Utc>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let common_name = match sans.first() {
        Some(SanType::DnsName(name)) => name.as_str().to_owned(),
        Some(SanType::IpAddress(ip)) => ip.to_string(),
        _ => "localhost".to_owned(),
    };
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "CP-IS Edge");
    params.subject_alt_names = sans;
    let (not_before, not_after) = validity(now, SERVER_CERT_VALIDITY);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            PkiError::Missing {
                path: path.to_owned(),
            }
        } else {
            PkiError::Io {
                action: "reading",
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Reads a private key file after checking that only its owner can read it.
fn read_key_file(path: &Path) -> Result<String, PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        match fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(PkiError::InsecurePermissions {
                        path: path.to_owned(),
                        mode,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PkiError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(PkiError::Io {
                    action: "reading",
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    read_file(path)
}

fn read_key_pair(path: &Path) -> Result<KeyPair, PkiError> {
    let pem = read_key_file(path)?;
    KeyPair::from_pem(&pem).map_err(|e| bad(path, format!("not a usable private key: {e}")))
}

fn cert_chain(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not a PEM certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(bad(path, "holds no PEM certificate"));
    }
    for cert in &chain {
        x509_parser::parse_x509_certificate(cert).map_err(|e| {
            bad(
                path,
                format!("holds a certificate that cannot be parsed: {e}"),
            )
        })?;
    }
    Ok(chain)
}

fn single_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    let mut chain = cert_chain(path, pem)?;
    if chain.len() != 1 {
        return Err(bad(
            path,
            format!("holds {} certificates, expected one", chain.len()),
        ));
    }
    Ok(chain.remove(0))
}

fn check_key_matches(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(cert_path, format!("cannot parse the certificate: {e}")))?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            cert_path,
            "the certificate does not match its private key file",
        ));
    }
    Ok(())
}

fn check_issued_by(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    ca_path: &Path,
    ca: &CertificateDer<'_>,
) -> Result<(), PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(cert_path, format!("cannot parse the certificate: {e}")))?;
    let (_, parsed_ca) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| bad(ca_path, format!("cannot parse the certificate: {e}")))?;
    if parsed.issuer().as_raw() != parsed_ca.subject().as_raw()
        || parsed
            .verify_signature(Some(parsed_ca.public_key()))
            .is_err()
    {
        return Err(bad(
            cert_path,
            format!("is not signed by the CA in {}", ca_path.display()),
        ));
    }
    Ok(())
}

/// Writes every file to a temporary name first (keys `0600` from the start), then renames
/// them into place and syncs the directory. On failure removes whatever it wrote.
fn write_files(dir: &Path, files: &[(&str, Vec<u8>, bool)]) -> Result<(), PkiError> {
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    let staging = files.iter().try_for_each(|(name, contents, secret)| {
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
        let dest = dir.join(name);
        let result = write_new(&tmp, contents, *secret);
        // Remember the temp file even if writing it failed part way, so it is cleaned up.
        staged.push((tmp, dest));
        result
    });
    if let Err(e) = staging {
        for (tmp, _) in &staged {
            let _ = fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (i, (tmp, dest)) in staged.iter().enumerate() {
        let renamed = if fs::symlink_metadata(dest).is_ok() {
            Err(PkiError::Exists { path: dest.clone() })
        } else {
            fs::rename(tmp, dest).map_err(|source| PkiError::Io {
                action: "renaming into place",
                path: dest.clone(),
                source,
            })
        };
        if let Err(e) = renamed {
            for (_, done) in &staged[..i] {
                let _ = fs::remove_file(done);
            }
            for (pending, _) in &staged[i..] {
                let _ = fs::remove_file(pending);
            }
            return Err(e);
        }
    }
    sync_dir(dir)
}

/// A new key-wrap key, as [`KEY_WRAP_FILE`] holds it.
fn new_key_wrap() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    format!("{}\n", hex::encode(bytes))
}

/// The data dir's key-wrap key, made now when the data dir predates it (a single SQLite
/// server: copies made after this hold it too).
pub fn key_wrap(dir: &Path) -> Result<[u8; 32], PkiError> {
    let path = dir.join(KEY_WRAP_FILE);
    if fs::symlink_metadata(&path).is_err() {
        write_new(&path, new_key_wrap().as_bytes(), true)?;
        sync_dir(dir)?;
    }
    let text = read_key_file(&path)?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .map_err(|e| bad(&path, format!("not 64 hex digits: {e}")))?;
    Ok(key)
}

fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io {
        action: "writing",
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| PkiError::Io {
                action: "syncing directory",
                path: dir.to_owned(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = (dir, File::open);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostnames() -> Vec<String> {
        vec!["sync.example.nhs.uk".to_owned()]
    }

    /// A tablet's key pair and CSR, as the agent makes them.
    fn tablet_csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "cpis-agent-tablet");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn create_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let created = Pki::create(dir.path(), &hostnames()).unwrap();
        let loaded = Pki::load(dir.path()).unwrap();
        assert_eq!(
            created.signing_key().verifying_key(),
            loaded.signing_key().verifying_key()
        );
        assert_eq!(created.ca_cert_pem(), loaded.ca_cert_pem());
        assert_eq!(
            fs::read_to_string(Pki::ca_cert_path(dir.path())).unwrap(),
            loaded.ca_cert_pem()
        );
        assert_eq!(created.server_chain, loaded.server_chain);
        assert!(loaded.server_cert_expires_at() > Utc::now() + chrono::Duration::days(365));
        loaded.server_tls_config().unwrap();
        // No temp files left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut expected: Vec<String> = ALL_FILES.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn server_certificate_names_the_hostnames_localhost_and_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(
            dir.path(),
            &["Sync.Example.NHS.uk".to_owned(), "10.1.2.3".to_owned()],
        )
        .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&pki.server_chain[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "DNSName(sync.example.nhs.uk)",
                "IPAddress(0a:01:02:03)",
                "DNSName(localhost)",
                "IPAddress(7f:00:00:01)"
            ]
        );
    }

    #[test]
    fn create_refuses_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        Pki::create(dir.path(), &[]).unwrap();
        let before = fs::read(dir.path().join(FEED_SIGNING_KEY_FILE)).unwrap();
        let err = Pki::create(dir.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            fs::read(dir.path().join(FEED_SIGNING_KEY_FILE)).unwrap(),
            before
        );

        // Even one stray file is enough to refuse, and nothing else gets written.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(DEVICE_CA_KEY_FILE), "x").unwrap();
        let err = Pki::create(other.path(), &[]).unwrap_err();
        match err {
            PkiError::Exists { path } => assert!(path.ends_with(DEVICE_CA_KEY_FILE)),
            other => panic!("unexpected {other}"),
        }
        assert_eq!(fs::read_dir(other.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn private_key_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        Pki::create(dir.path(), &[]).unwrap();
        for name in [
            FEED_SIGNING_KEY_FILE,
            KEY_WRAP_FILE,
            TLS_CA_KEY_FILE,
            SERVER_KEY_FILE,
            DEVICE_CA_KEY_FILE,
        ] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        for name in [TLS_CA_CERT_FILE, SERVER_CERT_FILE, DEVICE_CA_CERT_FILE] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0o044, "{name}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn load_refuses_a_key_others_can_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        Pki::create(dir.path(), &[]).unwrap();
        let key = dir.path().join(DEVICE_CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Pki::load(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::InsecurePermissions { .. }), "{err}");
        assert!(err.to_string().contains("device-ca-key.pem"), "{err}");
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pki::load(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::Missing { .. }), "{err}");
        assert!(err.to_string().contains(FEED_SIGNING_KEY_FILE), "{err}");
        assert!(err.to_string().contains("cpis-sync-server init"), "{err}");
    }

    #[test]
    fn load_refuses_a_certificate_that_does_not_match_its_key() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        Pki::create(one.path(), &[]).unwrap();
        Pki::create(two.path(), &[]).unwrap();
        fs::copy(
            two.path().join(SERVER_CERT_FILE),
            one.path().join(SERVER_CERT_FILE),
        )
        .unwrap();
        let err = Pki::load(one.path()).unwrap_err();
        assert!(err.to_string().contains(SERVER_CERT_FILE), "{err}");
    }

    #[test]
    fn debug_does_not_print_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let debug = format!("{pki:?}");
        let secret_hex = hex::encode(pki.signing_key().to_bytes());
        assert!(!debug.contains(&secret_hex), "{debug}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(debug.contains(&PublicKey::from(pki.signing_key()).to_string()));
    }

    #[test]
    fn issues_a_client_certificate_for_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let (key, csr) = tablet_csr();
        let device = DeviceId::new();
        let now = DateTime::from_timestamp(1_900_000_000, 123_456_789).unwrap();
        let issued = pki
            .issue_device_certificate(&csr, device, chrono::Duration::days(365), now)
            .unwrap();
        let expected_expiry = DateTime::from_timestamp(1_900_000_000 + 365 * 86_400, 0).unwrap();
        assert_eq!(issued.expires_at, expected_expiry);
        assert_eq!(cert_pem_expiry(&issued.pem).unwrap(), expected_expiry);

        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        assert_eq!(device_id_from_cert(&der).unwrap(), device);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.validity().not_before.timestamp(), 1_900_000_000);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        let (_, ca) = x509_parser::parse_x509_certificate(&pki.device_ca_cert).unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
    }

    #[test]
    fn ignores_what_the_csr_asks_for_beyond_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = pki
            .issue_device_certificate(
                &csr,
                DeviceId::new(),
                chrono::Duration::hours(1),
                Utc::now(),
            )
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        assert!(cert.subject_alternative_name().unwrap().is_none());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn rejects_garbage_and_tampered_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let issue = |csr: &str| {
            pki.issue_device_certificate(
                csr,
                DeviceId::new(),
                chrono::Duration::days(1),
                Utc::now(),
            )
        };

        for garbage in [
            "",
            "not a csr",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = issue(garbage).unwrap_err();
            assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
            assert!(err.is_client_error());
        }

        // Change the subject inside the signed part: the signature no longer verifies.
        let (_, csr) = tablet_csr();
        let body: String = csr.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let mut der = engine.decode(body).unwrap();
        let at = der
            .windows(b"tablet".len())
            .position(|w| w == b"tablet")
            .unwrap();
        der[at..at + 6].copy_from_slice(b"tablex");
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            engine.encode(&der)
        );
        let err = issue(&tampered).unwrap_err();
        assert!(matches!(err, PkiError::CsrSignature), "{err}");
        assert!(err.is_client_error());

        let err = pki
            .issue_device_certificate(&csr, DeviceId::new(), chrono::Duration::zero(), Utc::now())
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err}");
    }

    #[test]
    fn rejects_unusable_hostnames() {
        let dir = tempfile::tempdir().unwrap();
        for bad_name in ["", "two words", "ünïcode.example"] {
            let err = Pki::create(dir.path(), &[bad_name.to_owned()]).unwrap_err();
            assert!(matches!(err, PkiError::InvalidHostname { .. }), "{err}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn device_id_is_only_read_from_a_device_id_common_name() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path(), &[]).unwrap();
        let err = device_id_from_cert(&pki.server_chain[0]).unwrap_err();
        assert!(err.to_string().contains("not a device id"), "{err}");
        let err = device_id_from_cert(&CertificateDer::from(vec![1, 2, 3])).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCertificate { .. }), "{err}");
    }

    #[test]
    fn cert_pem_expiry_rejects_garbage() {
        assert!(matches!(
            cert_pem_expiry("nope"),
            Err(PkiError::InvalidCertificate { .. })
        ));
    }
}
