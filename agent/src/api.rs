//! The local API on loopback (DESIGN.md §6): `POST /v1/lookups`, `GET /v1/status`,
//! `POST /v1/sync`, and the paramedic page ([`crate::page`]) on the same listener. One
//! mapping from [`AgentError`] to status and `{error:{code,message}}` (a shredded device
//! answers `503 not_enrolled`, never data). Under `run`, lookups — from the JSON API and
//! from the page alike, through [`recorded_lookup`] — are checked nationally when they miss
//! (bounded, see [`crate::confirm`]) and nudge the background loop; `POST /v1/sync` asks the
//! loop for an attempt and answers its outcome. Every request must name a loopback host
//! (`Host: 127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`), so a web page whose DNS name
//! was rebound to 127.0.0.1 cannot use the API or the page ([`crate::page::host_check`]).
//!
//! Every `/v1/*` request then passes [`v1_guard`]: a POST that another web site may have sent
//! (`Sec-Fetch-Site` other than `same-origin`/`none`, or an `Origin` other than the
//! listener's own — the paramedic page's very check, [`crate::page::same_origin`]) is
//! refused with `403 cross_site_request` before anything is looked up or recorded; a request
//! with neither header (curl, an ePR app) passes. Then the local API token
//! ([`crate::local_token`]): `401 local_token_required` when `run --require-token` and no
//! `Authorization: Bearer`, `401 local_token_invalid` when a token is sent and is not this
//! agent's. The paramedic page has its own staff id and CSRF checks and is not token-gated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use cpis_protocol::api::ErrorBody;
use cpis_protocol::local::{LookupRequest, LookupResponse};

use crate::agent::{Agent, AgentError};
use crate::background::{Outcome, SyncHandle};
use crate::local_token::LocalAuth;
use crate::lookup::LookupInput;

/// Why the local API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("refusing to listen on {0}: the local API serves loopback addresses only")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every handler of the listener shares.
pub(crate) struct Shared {
    pub(crate) agent: Arc<Agent>,
    sync: tokio::sync::Mutex<()>,
    opts: ApiOptions,
    /// The paramedic page's per-process secrets.
    pub(crate) page: crate::page::PageKeys,
}

/// How the API works with the rest of `run`.
#[derive(Debug, Clone, Default)]
pub struct ApiOptions {
    /// The background loop; without it `POST /v1/sync` syncs inline.
    pub sync: Option<SyncHandle>,
    /// Bound of the online national check of a miss; `None`: no check.
    pub confirm_bound: Option<Duration>,
    /// The local API token check of `/v1/*` (off by default).
    pub auth: LocalAuth,
}

/// Longest `POST /v1/sync` waits for the loop's attempt.
const MANUAL_SYNC_WAIT: Duration = Duration::from_secs(120);

/// An error as the API shows it.
#[derive(Debug)]
pub struct HttpError(StatusCode, ErrorBody);

impl HttpError {
    /// An error with its status, code and message.
    pub fn new(status: StatusCode, body: ErrorBody) -> Self {
        Self(status, body)
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        self.0
    }

    /// The error's code and message.
    pub fn body(&self) -> &ErrorBody {
        &self.1
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        let (status, code) = match &e {
            AgentError::InvalidNhsNumber(n) => (StatusCode::BAD_REQUEST, n.code()),
            AgentError::NotEnrolled(_) | AgentError::RevokedPending { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_enrolled")
            }
            AgentError::Verify(v) | AgentError::ClockAhead { error: v, .. } => {
                (StatusCode::BAD_GATEWAY, v.code())
            }
            AgentError::Net(_) => (StatusCode::BAD_GATEWAY, "sync_failed"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        HttpError(status, ErrorBody::new(code, e.to_string()))
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, HttpError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(HttpError::from),
        Err(e) => Err(HttpError(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::new("internal", e.to_string()),
        )),
    }
}

async fn lookups(
    State(s): State<Arc<Shared>>,
    body: Result<Json<LookupRequest>, JsonRejection>,
) -> Result<Response, HttpError> {
    let Json(req) = body.map_err(|e| {
        HttpError(
            StatusCode::BAD_REQUEST,
            ErrorBody::new("bad_request", e.body_text()),
        )
    })?;
    Ok(Json(recorded_lookup(&s, req).await?).into_response())
}

/// One lookup as `POST /v1/lookups` and the paramedic page both do it: the access event is
/// committed to the outbox before anything is answered; under `run` a miss is checked
/// nationally within the bound (an answer tells the loop the server is reachable), and the
/// loop is told events are pending. An invalid NHS number records nothing.
pub(crate) async fn recorded_lookup(
    s: &Shared,
    req: LookupRequest,
) -> Result<LookupResponse, HttpError> {
    recorded_lookup_as(s, req, true).await
}

/// [`recorded_lookup`] for unscheduled care (a flagged answer notifies the councils) or
/// scheduled care (recorded in the audit trail, no council notice).
pub(crate) async fn recorded_lookup_as(
    s: &Shared,
    req: LookupRequest,
    unscheduled: bool,
) -> Result<LookupResponse, HttpError> {
    let agent = s.agent.clone();
    let (resp, event) = blocking(move || {
        agent.lookup_recorded_as(
            LookupInput {
                nhs_number: &req.nhs_number,
                staff_id: req.staff_id,
                incident_ref: req.incident_ref,
            },
            unscheduled,
        )
    })
    .await?;
    let resp = match s.opts.confirm_bound {
        Some(bound) => {
            let (resp, checked) = crate::confirm::confirm_miss(&s.agent, resp, &event, bound).await;
            if checked == crate::confirm::Checked::Answered
                && let Some(h) = &s.opts.sync
            {
                h.server_reachable();
            }
            resp
        }
        None => resp,
    };
    if let Some(h) = &s.opts.sync {
        h.events_pending();
    }
    Ok(resp)
}

async fn status(State(s): State<Arc<Shared>>) -> Result<Response, HttpError> {
    let agent = s.agent.clone();
    Ok(Json(blocking(move || agent.status()).await?).into_response())
}

async fn sync(State(s): State<Arc<Shared>>) -> Result<Response, HttpError> {
    // A revoked device may still sync: it only delivers its outbox, then wipes.
    s.agent.check_not_shredded()?;
    let Some(h) = &s.opts.sync else {
        let _one = s.sync.lock().await;
        let resp = crate::sync::sync_once(&s.agent, &|_, _| {}).await?;
        return Ok(Json(resp).into_response());
    };
    match tokio::time::timeout(MANUAL_SYNC_WAIT, h.sync_now()).await {
        Ok(Some(Outcome::Synced(r))) => Ok(Json(r).into_response()),
        Ok(Some(Outcome::Failed { error, retry_after })) => {
            let mut resp = HttpError(
                StatusCode::BAD_GATEWAY,
                ErrorBody::new("sync_failed", error),
            )
            .into_response();
            if let Some(ra) = retry_after
                && let Ok(v) = axum::http::HeaderValue::from_str(&ra.as_secs().to_string())
            {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            Ok(resp)
        }
        // The message already says the device was revoked and its data shredded.
        Ok(Some(Outcome::Revoked(msg))) => Err(AgentError::NotEnrolled(msg).into()),
        Ok(None) => Err(s.agent.check_live().err().map_or_else(
            || {
                HttpError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorBody::new("sync_stopped", "the background sync loop has stopped"),
                )
            },
            HttpError::from,
        )),
        Err(_) => Err(HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                "sync_pending",
                "the sync was not done within 120 s; it stays scheduled (see GET /v1/status)",
            ),
        )),
    }
}

/// The checks of every `/v1/*` request before its handler: a state-changing request from
/// another site is refused (`403 cross_site_request`), then the local API token is checked
/// (`401 local_token_required` / `local_token_invalid`, with `WWW-Authenticate: Bearer`).
async fn v1_guard(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let fhir = req.uri().path().starts_with(crate::fhir::BASE);
    // The FHIR interface answers its refusals as OperationOutcomes, like everything else it
    // answers.
    let shape = |resp: HttpError| -> Response {
        if fhir {
            crate::fhir::Outcome::from_http(&resp).into_response()
        } else {
            resp.into_response()
        }
    };
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read_only && crate::page::same_origin(req.headers()).is_err() {
        return shape(HttpError(
            StatusCode::FORBIDDEN,
            ErrorBody::new(
                "cross_site_request",
                "this request came from a web page of another site (Origin or Sec-Fetch-Site) \
                 and was refused; nothing was looked up, recorded or synced. The local API \
                 accepts requests from programs on the tablet and from its own pages only",
            ),
        ));
    }
    let mut authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().ok());
    // An ePR built for the national API sends its own access token there; unless this agent
    // requires its local token, a bearer that is not one of ours is not ours to judge.
    if fhir
        && !s.opts.auth.is_required()
        && authorization
            .flatten()
            .is_some_and(|h| !h.contains(crate::local_token::PREFIX))
    {
        authorization = None;
    }
    if let Err(why) = s.opts.auth.check(authorization) {
        let mut resp = shape(HttpError(
            StatusCode::UNAUTHORIZED,
            ErrorBody::new(why.code(), why.message()),
        ));
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer realm=\"cpis-agent\""),
        );
        return resp;
    }
    next.run(req).await
}

/// The router, for tests that drive it directly.
pub fn router(agent: Arc<Agent>) -> Router {
    router_with(agent, ApiOptions::default())
}

/// The router with the background loop and the national check. Without a known listen
/// port the `Host` check accepts a loopback name with any port; [`LocalApi`] knows its port.
pub fn router_with(agent: Arc<Agent>, opts: ApiOptions) -> Router {
    build(agent, opts, None)
}

fn build(agent: Arc<Agent>, opts: ApiOptions, port: Option<u16>) -> Router {
    let shared = Arc::new(Shared {
        agent,
        sync: tokio::sync::Mutex::new(()),
        opts,
        page: crate::page::PageKeys::new(),
    });
    Router::new()
        .route("/v1/lookups", post(lookups))
        .route("/v1/status", get(status))
        .route("/v1/sync", post(sync))
        .merge(crate::fhir::routes())
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            v1_guard,
        ))
        .layer(axum::middleware::map_response(crate::page::api_headers))
        .merge(crate::page::routes())
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(
            port,
            crate::page::host_check,
        ))
}

/// A running local API.
#[derive(Debug)]
pub struct LocalApi {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalApi {
    /// Binds `addr` (loopback only; port 0 picks one) and serves until shut down.
    pub async fn bind(agent: Arc<Agent>, addr: SocketAddr) -> Result<Self, ApiError> {
        Self::bind_with(agent, addr, ApiOptions::default()).await
    }

    /// [`LocalApi::bind`] with the background loop and the national check.
    pub async fn bind_with(
        agent: Arc<Agent>,
        addr: SocketAddr,
        opts: ApiOptions,
    ) -> Result<Self, ApiError> {
        if !addr.ip().is_loopback() {
            return Err(ApiError::NotLoopback(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiError::Bind { addr, source })?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = build(agent, opts, Some(addr.port()));
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
        });
        Ok(Self {
            addr,
            stop: Some(tx),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes requests in flight, and waits.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits until the server stops.
    pub async fn join(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
