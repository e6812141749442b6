//! An HTTP-level man-in-the-middle for tamper scenarios: it terminates the tablet's TLS with a
//! certificate from its own CA (which the tablet is told to trust alongside the server's),
//! relays each request to the real server as that tablet (using the tablet's own key and
//! certificate, read from its state directory by the test), and alters answers by rule: flip
//! a bit of a body or of a signature, truncate or extend a body, answer with a status, or
//! replay an answer recorded earlier (an older snapshot, another region's delta).
//!
//! Only a test can do this: the device key never leaves a real tablet. It shows that what
//! protects the data is the signature on it (DESIGN.md §2 rule 5), not the channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cpis_protocol::SignedMessage;
use cpis_protocol::api::paths;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::harness::https_client;

/// Bound on each relayed request and on a TLS handshake.
const RELAY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request body relayed (event batches, uploads).
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// Which answers a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `GET /v1/device/checkpoint` (a signed envelope as the body).
    Checkpoint,
    /// `GET /v1/device/snapshot` (signed snapshot metadata as the body).
    SnapshotMeta,
    /// `GET /v1/device/snapshots/{epoch}/{version}` (body; metadata in the signed header).
    SnapshotBody,
    /// `GET /v1/device/delta?from=V` (body; metadata in the signed header).
    Delta,
    /// `POST /v1/device/events`.
    Events,
    /// Anything else (enrolment, confirmation, ...).
    Other,
}

impl Target {
    /// The target of a request path.
    pub fn of(path: &str) -> Self {
        match path {
            paths::CHECKPOINT => Self::Checkpoint,
            paths::SNAPSHOT => Self::SnapshotMeta,
            paths::DELTA => Self::Delta,
            paths::EVENTS => Self::Events,
            p if p.starts_with(paths::SNAPSHOT_BODY_PREFIX) => Self::SnapshotBody,
            _ => Self::Other,
        }
    }
}

/// An answer as the server gave it (kept for replays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// What to do to an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Flip one bit (seeded position) of the body.
    FlipBodyBit,
    /// Flip one bit of the signature of the signed envelope (in the signed header if there is
    /// one, else the body).
    FlipSignature,
    /// Keep only this share of the body (0.0–1.0), framed as complete.
    Truncate(f64),
    /// Append this many bytes to the body (a body longer than its signed length).
    Extend(usize),
    /// Answer this status with an empty body without asking the server (e.g. 410 on a delta).
    Status(u16),
    /// Answer with this recorded answer without asking the server (replay).
    Replace(Recorded),
}

/// A tamper rule: an action on every answer of a target while the rule is set.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub target: Target,
    pub action: Action,
}

impl Rule {
    pub fn new(target: Target, action: Action) -> Self {
        Self { target, action }
    }
}

/// Counters of a tamper proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TamperStats {
    /// Requests received from tablets.
    pub requests: u64,
    /// Answers altered or replaced by a rule.
    pub tampered: u64,
}

#[derive(Debug)]
struct Shared {
    upstream: String,
    upstream_ca: String,
    client: Mutex<reqwest::Client>,
    rules: Mutex<Vec<Rule>>,
    recorded: Mutex<HashMap<Target, Recorded>>,
    rng: Mutex<ChaCha8Rng>,
    requests: AtomicU64,
    tampered: AtomicU64,
}

/// A running tamper proxy; dropping it stops it.
#[derive(Debug)]
pub struct TamperProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl TamperProxy {
    /// Starts on `127.0.0.1:0`, relaying to `upstream` (`https://127.0.0.1:PORT`) whose TLS
    /// certificate is issued by `upstream_ca_pem`. Relays without a client certificate until
    /// [`Self::set_identity`] (enrolment needs none).
    pub async fn start(upstream: &str, upstream_ca_pem: &str, seed: u64) -> anyhow::Result<Self> {
        let (ca_pem, tls) = mitm_tls()?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the tamper proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            upstream_ca: upstream_ca_pem.to_owned(),
            client: Mutex::new(https_client(upstream_ca_pem, None, RELAY_TIMEOUT)?),
            rules: Mutex::new(Vec::new()),
            recorded: Mutex::new(HashMap::new()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            requests: AtomicU64::new(0),
            tampered: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(shared.clone());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accept = accept_loop(listener, tls, app, tracker.clone(), cancel.clone());
        tracker.spawn(cancel.clone().run_until_cancelled_owned(accept));
        Ok(Self {
            shared,
            addr,
            ca_pem,
            cancel,
            tracker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`: give this to the tablet as its server.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The proxy's own CA (PEM): the tablet must trust it as well as the server's.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// From now on, relays as the device with this certificate and key (PEM).
    pub fn set_identity(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let client = https_client(
            &self.shared.upstream_ca,
            Some((cert_pem, key_pem)),
            RELAY_TIMEOUT,
        )?;
        *lock(&self.shared.client) = client;
        Ok(())
    }

    /// Relays as the tablet whose state directory is `state_dir` (its certificate, and its
    /// private key opened with its master key).
    pub fn set_identity_from(&self, state_dir: &std::path::Path) -> anyhow::Result<()> {
        let (cert, key) = cpis_agent::agent::device_identity(state_dir)
            .with_context(|| format!("reading the identity in {}", state_dir.display()))?;
        self.set_identity(&cert, &key)
    }

    /// Replaces the rules (none: relay faithfully).
    pub fn set_rules(&self, rules: Vec<Rule>) {
        *lock(&self.shared.rules) = rules;
    }

    /// The last successful answer the server gave for `target`, as it gave it.
    pub fn recorded(&self, target: Target) -> Option<Recorded> {
        lock(&self.shared.recorded).get(&target).cloned()
    }

    pub fn stats(&self) -> TamperStats {
        TamperStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            tampered: self.shared.tampered.load(Ordering::Relaxed),
        }
    }

    /// Stops and waits (bounded) for every connection task.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh CA and a certificate for `127.0.0.1` and `localhost` issued by it.
fn mitm_tls() -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let ca_key = KeyPair::generate_for(alg)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "CP-IS field tests tamper CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(alg)?;
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let chain = vec![leaf.der().clone()];
    let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
        .context("reading the generated key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((ca_pem, Arc::new(config)))
}

/// Accepts TLS connections and serves HTTP/1.1 and HTTP/2 on each, in tracked tasks.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (acceptor, builder, app) = (acceptor.clone(), builder.clone(), app.clone());
        let conn = async move {
            let Ok(Ok(tls)) = tokio::time::timeout(RELAY_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let service = TowerToHyperService::new(app);
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        };
        tracker.spawn(cancel.child_token().run_until_cancelled_owned(conn));
    }
}

/// Relays one request, recording and tampering with the answer by the rules.
async fn relay(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    match relay_inner(&shared, req).await {
        Ok(r) => r,
        Err(e) => (StatusCode::BAD_GATEWAY, format!("tamper proxy: {e:#}")).into_response(),
    }
}

const REQUEST_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::RANGE,
    header::AUTHORIZATION,
    header::ACCEPT,
];
const ANSWER_HEADERS: [&str; 5] = [
    "content-type",
    "content-range",
    "accept-ranges",
    "retry-after",
    paths::SIGNED_HEADER,
];

async fn relay_inner(shared: &Shared, req: Request) -> anyhow::Result<Response> {
    let target = Target::of(req.uri().path());
    let rules: Vec<Action> = lock(&shared.rules)
        .iter()
        .filter(|r| r.target == target)
        .map(|r| r.action.clone())
        .collect();
    for action in &rules {
        match action {
            Action::Status(code) => {
                shared.tampered.fetch_add(1, Ordering::Relaxed);
                return Ok(StatusCode::from_u16(*code)?.into_response());
            }
            Action::Replace(recorded) => {
                shared.tampered.fetch_add(1, Ordering::Relaxed);
                return respond(recorded.clone());
            }
            _ => {}
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    let mut headers = reqwest::header::HeaderMap::new();
    for name in REQUEST_HEADERS {
        if let Some(v) = req.headers().get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let body = axum::body::to_bytes(req.into_body(), MAX_REQUEST)
        .await
        .map_err(|e| anyhow!("reading the request: {e}"))?;
    let client = lock(&shared.client).clone();
    let answer = client
        .request(method, format!("{}{path}", shared.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await
        .context("relaying to the server")?;
    let status = answer.status().as_u16();
    let headers: Vec<(String, String)> = ANSWER_HEADERS
        .iter()
        .filter_map(|name| {
            let v = answer.headers().get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), v.to_owned()))
        })
        .collect();
    let body = answer
        .bytes()
        .await
        .context("reading the server's answer")?;
    let mut recorded = Recorded {
        status,
        headers,
        body,
    };
    if (200..300).contains(&status) {
        lock(&shared.recorded).insert(target, recorded.clone());
    }
    let mut changed = false;
    for action in rules {
        changed |= apply(shared, &action, &mut recorded)?;
    }
    if changed {
        shared.tampered.fetch_add(1, Ordering::Relaxed);
    }
    respond(recorded)
}

/// Applies one in-place action; returns whether the answer changed.
fn apply(shared: &Shared, action: &Action, r: &mut Recorded) -> anyhow::Result<bool> {
    let mut body = r.body.to_vec();
    match action {
        Action::FlipBodyBit => {
            if body.is_empty() {
                return Ok(false);
            }
            let (byte, bit) = {
                let mut rng = lock(&shared.rng);
                (rng.gen_range(0..body.len()), rng.gen_range(0..8u8))
            };
            body[byte] ^= 1 << bit;
        }
        Action::FlipSignature => {
            let header = r
                .headers
                .iter_mut()
                .find(|(k, _)| k == paths::SIGNED_HEADER);
            match header {
                Some((_, value)) => {
                    let mut m = SignedMessage::from_header(value)?;
                    flip_first_bit(&mut m.signature);
                    *value = m.to_header();
                }
                None => {
                    let mut m = SignedMessage::from_bytes(&body)?;
                    flip_first_bit(&mut m.signature);
                    body = m.to_bytes();
                }
            }
        }
        Action::Truncate(share) => {
            let keep = ((body.len() as f64) * share.clamp(0.0, 1.0)) as usize;
            body.truncate(keep.min(body.len().saturating_sub(1)));
        }
        Action::Extend(extra) => body.extend(std::iter::repeat_n(0x5a, *extra)),
        Action::Status(_) | Action::Replace(_) => return Ok(false),
    }
    r.body = Bytes::from(body);
    Ok(true)
}

fn flip_first_bit(bytes: &mut [u8]) {
    if let Some(b) = bytes.first_mut() {
        *b ^= 1;
    }
}

fn respond(r: Recorded) -> anyhow::Result<Response> {
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        headers.insert(HeaderName::try_from(k.as_str())?, HeaderValue::try_from(v)?);
    }
    let mut response = Response::new(Body::from(r.body));
    *response.status_mut() = StatusCode::from_u16(r.status)?;
    *response.headers_mut() = headers;
    Ok(response)
}
