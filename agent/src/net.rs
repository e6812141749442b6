//! The network client: enrolment (trusting only the CA given), then mutual-TLS requests for
//! checkpoints, deltas, snapshots (resumable with HTTP Range), event uploads, online
//! confirmation, and the device lifecycle (report, certificate renewal, key chain).
//!
//! One TLS crypto provider: ring, passed explicitly in a preconfigured rustls `ClientConfig`.
//! Nothing received is trusted here: the caller verifies every signed message and body.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::StatusCode;

use cpis_protocol::api::{EnrolRequest, EnrolResponse, ErrorBody, codes, paths};
use cpis_protocol::confirm::{self, ConfirmRequest, ConfirmResponse};
use cpis_protocol::lifecycle::{self, DeviceReport, KeyChain, RenewRequest, RenewResponse};
use cpis_protocol::{
    AccessEvent, BodyInfo, EventBatch, EventUploadAck, SNAPSHOT_FORMATS, SignedMessage, VerifyError,
};

use crate::download::{DownloadError, SealedDownload};
use crate::keystore::Sealer;

/// Why a network exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "TLS failed talking to {url}: {reason} (is --ca the CA that issued the server's certificate?)"
    )]
    Tls { url: String, reason: String },
    #[error("bad CA or identity file: {0}")]
    BadPem(String),
    #[error("the enrolment token is not recognised by the server ({0})")]
    TokenUnknown(String),
    #[error("the enrolment token has already been used as many times as allowed ({0})")]
    TokenUsedUp(String),
    #[error("the enrolment token has expired ({0})")]
    TokenExpired(String),
    #[error("this device has been revoked by its trust: its data must be shredded ({0})")]
    Revoked(String),
    #[error("server answered {status}: {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
        /// `Retry-After` of a `429` or `503`, in seconds.
        retry_after: Option<u64>,
    },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    // Not `#[from]`, which would also make it the source: `{:#}` would print it twice.
    #[error("rejected: {0}")]
    Verify(VerifyError),
    #[error(transparent)]
    Download(#[from] DownloadError),
}

impl From<VerifyError> for NetError {
    fn from(e: VerifyError) -> Self {
        NetError::Verify(e)
    }
}

impl NetError {
    /// How long the server asked the device to wait (`Retry-After` on `429`/`503`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            NetError::Server {
                retry_after: Some(s),
                ..
            } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

fn classify(url: &str, e: reqwest::Error) -> NetError {
    let mut chain = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    let lower = chain.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        NetError::Tls {
            url: url.to_owned(),
            reason: chain,
        }
    } else {
        NetError::Unreachable {
            url: url.to_owned(),
            reason: chain,
        }
    }
}

/// A rustls client config trusting only `ca_pem`, with the device identity when given.
pub fn tls_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| NetError::BadPem(format!("CA file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| NetError::BadPem(format!("CA certificate: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(NetError::BadPem(
            "the CA file holds no PEM certificate".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::BadPem(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert_pem, key_pem)) => {
            let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| NetError::BadPem(format!("device certificate: {e}")))?;
            let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
                .map_err(|e| NetError::BadPem(format!("device key: {e}")))?
                .ok_or_else(|| NetError::BadPem("no private key in the device key file".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| NetError::BadPem(format!("device identity: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn http_client(cfg: rustls::ClientConfig) -> Result<reqwest::Client, NetError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| NetError::Protocol(format!("building the HTTP client: {e}")))
}

async fn error_of(resp: reqwest::Response) -> NetError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let text = resp.text().await.unwrap_or_default();
    let (code, message, wipe) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.error.code, b.error.message, b.error.wipe),
        Err(_) => (String::new(), text.chars().take(200).collect(), false),
    };
    let detail = if message.is_empty() {
        code.clone()
    } else {
        message.clone()
    };
    match code.as_str() {
        codes::TOKEN_UNKNOWN => NetError::TokenUnknown(detail),
        codes::TOKEN_USED_UP => NetError::TokenUsedUp(detail),
        codes::TOKEN_EXPIRED => NetError::TokenExpired(detail),
        codes::DEVICE_REVOKED => NetError::Revoked(detail),
        _ if wipe => NetError::Revoked(detail),
        _ => NetError::Server {
            status,
            code,
            message,
            retry_after,
        },
    }
}

/// What enrolment returns: the server's answer and the device's new private key (PEM).
#[derive(Debug)]
pub struct Enrolled {
    pub response: EnrolResponse,
    pub key_pem: String,
}

/// A new ECDSA P-256 key pair (PEM) and a CSR for it (PEM).
pub fn new_key_and_csr() -> Result<(String, String), NetError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| NetError::Protocol(format!("making the device key: {e}")))?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| NetError::Protocol(format!("CSR parameters: {e}")))?;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| NetError::Protocol(format!("making the CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Makes an ECDSA P-256 key pair and a CSR, and exchanges the token for a certificate,
/// trusting only `ca_pem` for the server.
pub async fn enrol(
    server: &str,
    ca_pem: &str,
    token: &str,
    name: Option<String>,
) -> Result<Enrolled, NetError> {
    let (key_pem, csr) = new_key_and_csr()?;
    let client = http_client(tls_config(ca_pem, None)?)?;
    let url = format!("{}{}", server.trim_end_matches('/'), paths::ENROL);
    let req = EnrolRequest {
        token: token.to_owned(),
        csr_pem: csr,
        name,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let resp = client
        .post(&url)
        .json(&req)
        .send()
        .await
        .map_err(|e| classify(&url, e))?;
    if !resp.status().is_success() {
        return Err(error_of(resp).await);
    }
    let response: EnrolResponse = resp
        .json()
        .await
        .map_err(|e| NetError::Protocol(format!("enrolment answer: {e}")))?;
    Ok(Enrolled { response, key_pem })
}

/// What a delta request returned.
#[derive(Debug)]
pub enum DeltaFetch {
    /// `204`: already at the head.
    UpToDate,
    /// `410`: take a snapshot.
    Gone,
    Body {
        signed: SignedMessage,
        body: Vec<u8>,
    },
}

/// The mutual-TLS client of an enrolled device.
#[derive(Debug, Clone)]
pub struct DeviceClient {
    http: reqwest::Client,
    base: String,
}

/// Ceiling on the size of a checkpoint or snapshot metadata envelope.
const MAX_ENVELOPE: u64 = 64 * 1024;

fn signed_header(resp: &reqwest::Response) -> Result<SignedMessage, NetError> {
    let v = resp
        .headers()
        .get(paths::SIGNED_HEADER)
        .ok_or_else(|| NetError::Protocol(format!("no {} header", paths::SIGNED_HEADER)))?
        .to_str()
        .map_err(|_| NetError::Protocol("signed header is not text".into()))?;
    Ok(SignedMessage::from_header(v)?)
}

/// The first byte of a `206` answer's `Content-Range: bytes START-END/LEN`.
fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let (start, _) = v.trim().strip_prefix("bytes ")?.split_once('-')?;
    start.trim().parse().ok()
}

impl DeviceClient {
    pub fn new(
        server: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, NetError> {
        Ok(Self {
            http: http_client(tls_config(ca_pem, Some((cert_pem, key_pem)))?)?,
            base: server.trim_end_matches('/').to_owned(),
        })
    }

    async fn get(&self, path: &str) -> Result<(String, reqwest::Response), NetError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| classify(&url, e))?;
        Ok((url, resp))
    }

    /// Reads a body, never more than `cap` bytes.
    async fn read_capped(
        url: &str,
        resp: reqwest::Response,
        cap: u64,
    ) -> Result<Vec<u8>, NetError> {
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| classify(url, e))?;
            if out.len() as u64 + chunk.len() as u64 > cap {
                return Err(NetError::Verify(VerifyError::OversizeBody {
                    declared: cap,
                    received: out.len() as u64 + chunk.len() as u64,
                }));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// The region's signed checkpoint.
    pub async fn checkpoint(&self) -> Result<SignedMessage, NetError> {
        let (url, resp) = self.get(paths::CHECKPOINT).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        Ok(SignedMessage::from_bytes(
            &Self::read_capped(&url, resp, MAX_ENVELOPE).await?,
        )?)
    }

    /// The live feed: the region's signed checkpoint once its head passes `epoch`,
    /// `version`, or after about `wait` with the head unchanged (the server may hold it for
    /// less).
    pub async fn wait_for_head(
        &self,
        epoch: u64,
        version: u64,
        wait: Duration,
    ) -> Result<SignedMessage, NetError> {
        let url = format!(
            "{}{}?epoch={epoch}&after={version}&wait={}",
            self.base,
            paths::CHECKPOINT_WAIT,
            wait.as_secs()
        );
        let resp = self
            .http
            .get(&url)
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| classify(&url, e))?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        Ok(SignedMessage::from_bytes(
            &Self::read_capped(&url, resp, MAX_ENVELOPE).await?,
        )?)
    }

    /// The current snapshot's signed metadata, its body in the newest format this version
    /// reads (a server from before that format ignores the ask and sends rows, which this
    /// version reads too: the format is in the signed metadata).
    pub async fn snapshot_meta(&self) -> Result<SignedMessage, NetError> {
        let path = format!("{}?format={}", paths::SNAPSHOT, SNAPSHOT_FORMATS[0]);
        let (url, resp) = self.get(&path).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        Ok(SignedMessage::from_bytes(
            &Self::read_capped(&url, resp, MAX_ENVELOPE).await?,
        )?)
    }

    /// The delta from `from`; the body is read no further than its signed length.
    /// `declared` opens the signed metadata to learn that length (the caller's verification).
    pub async fn delta(
        &self,
        from: u64,
        declared: impl Fn(&SignedMessage) -> Result<BodyInfo, NetError>,
    ) -> Result<DeltaFetch, NetError> {
        let (url, resp) = self.get(&format!("{}?from={from}", paths::DELTA)).await?;
        match resp.status() {
            StatusCode::NO_CONTENT => return Ok(DeltaFetch::UpToDate),
            StatusCode::GONE => return Ok(DeltaFetch::Gone),
            s if s.is_success() => {}
            _ => return Err(error_of(resp).await),
        }
        let signed = signed_header(&resp)?;
        let info = declared(&signed)?;
        let body = Self::read_capped(&url, resp, info.len).await?;
        Ok(DeltaFetch::Body { signed, body })
    }

    /// Downloads a snapshot body into a sealed partial download in `dir` (see
    /// [`crate::download`]), resuming a previous partial download of the identical signed
    /// metadata with HTTP Range from the body bytes its valid chunks hold, and checking the
    /// running size against the signed length. What arrived before an interruption is kept
    /// (sealed) for the next attempt. Returns the complete body, unverified: the caller checks
    /// its digest. `progress(done, total)` is called as bytes arrive, first with the resume
    /// offset.
    #[allow(clippy::too_many_arguments)]
    pub async fn snapshot_body(
        &self,
        signed: &SignedMessage,
        epoch: u64,
        version: u64,
        info: &BodyInfo,
        dir: &Path,
        sealer: &Sealer,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Vec<u8>, NetError> {
        let (mut dl, mut body) = SealedDownload::open(dir, sealer, &signed.to_bytes())?;
        if dl.len() > info.len {
            dl.restart()?;
            body.clear();
        }
        let mut have = dl.len();
        if have < info.len {
            let url = format!(
                "{}{}/{epoch}/{version}?format={}",
                self.base,
                paths::SNAPSHOT_BODY_PREFIX,
                info.format
            );
            let mut req = self.http.get(&url);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let resp = req.send().await.map_err(|e| classify(&url, e))?;
            let status = resp.status();
            if status == StatusCode::RANGE_NOT_SATISFIABLE {
                dl.restart()?;
                return Err(NetError::Protocol("range not satisfiable; retry".into()));
            }
            if !status.is_success() {
                return Err(error_of(resp).await);
            }
            let header = signed_header(&resp)?;
            if header != *signed {
                return Err(NetError::Protocol(
                    "the snapshot body's signed metadata differs from the one requested".into(),
                ));
            }
            if status == StatusCode::PARTIAL_CONTENT {
                let start = content_range_start(&resp);
                if start != Some(have) {
                    dl.restart()?;
                    return Err(NetError::Protocol(format!(
                        "asked for the body from byte {have}, the server sent a range starting at {start:?}; retry"
                    )));
                }
            } else {
                have = 0;
                body.clear();
                dl.restart()?;
            }
            progress(have, info.len);
            let mut stream = resp.bytes_stream();
            let received = loop {
                let Some(chunk) = stream.next().await else {
                    break Ok(());
                };
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => break Err(classify(&url, e)),
                };
                let total = have + chunk.len() as u64;
                if let Err(e) = info.check_received(total) {
                    drop(dl);
                    SealedDownload::remove_all(dir);
                    return Err(e.into());
                }
                dl.append(&chunk)?;
                body.extend_from_slice(&chunk);
                have = total;
                progress(have, info.len);
            };
            // Complete or interrupted, what arrived is sealed and durable: an interrupted
            // transfer resumes from here next time.
            dl.flush()?;
            received?;
        }
        Ok(body)
    }

    /// Removes the partial download once a snapshot is installed (or rejected).
    pub fn clear_downloads(dir: &Path) {
        SealedDownload::remove_all(dir);
    }

    /// Uploads a batch of events; returns the server's acknowledgement.
    pub async fn upload_events(&self, batch: &EventBatch) -> Result<EventUploadAck, NetError> {
        let url = format!("{}{}", self.base, paths::EVENTS);
        let resp = self
            .http
            .post(&url)
            .json(batch)
            .send()
            .await
            .map_err(|e| classify(&url, e))?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| NetError::Protocol(format!("events acknowledgement: {e}")))
    }

    async fn post_json<T: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response, NetError> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .http
            .post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| classify(&url, e))?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        Ok(resp)
    }

    /// Online confirmation of a lookup (the caller bounds the wait).
    pub async fn confirm(&self, event: &AccessEvent) -> Result<ConfirmResponse, NetError> {
        let req = ConfirmRequest {
            event: event.clone(),
        };
        self.post_json(confirm::PATH, &req)
            .await?
            .json()
            .await
            .map_err(|e| NetError::Protocol(format!("confirmation answer: {e}")))
    }

    /// The device's state for the fleet view.
    pub async fn report(&self, report: &DeviceReport) -> Result<(), NetError> {
        self.post_json(lifecycle::paths::REPORT, report).await?;
        Ok(())
    }

    /// A new client certificate for the CSR of a new key pair.
    pub async fn renew(&self, csr_pem: &str) -> Result<RenewResponse, NetError> {
        let req = RenewRequest {
            csr_pem: csr_pem.to_owned(),
        };
        self.post_json(lifecycle::paths::RENEW, &req)
            .await?
            .json()
            .await
            .map_err(|e| NetError::Protocol(format!("renewal answer: {e}")))
    }

    /// The chain of signed key rollovers (unverified: [`KeyChain::follow`] checks it).
    pub async fn key_chain(&self) -> Result<KeyChain, NetError> {
        let (url, resp) = self.get(lifecycle::paths::KEYS).await?;
        if !resp.status().is_success() {
            return Err(error_of(resp).await);
        }
        let bytes = Self::read_capped(&url, resp, MAX_KEY_CHAIN).await?;
        postcard::from_bytes(&bytes)
            .map_err(|e| NetError::Verify(VerifyError::Malformed(format!("key chain: {e}"))))
    }
}

/// Ceiling on the size of the key chain.
const MAX_KEY_CHAIN: u64 = 1024 * 1024;
