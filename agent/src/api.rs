//! The local API on loopback (DESIGN.md §6): `POST /v1/lookups`, `GET /v1/status`,
//! `POST /v1/sync`. One mapping from [`AgentError`] to status and `{error:{code,message}}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use cpis_protocol::api::ErrorBody;
use cpis_protocol::local::LookupRequest;

use crate::agent::{Agent, AgentError};
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

struct Shared {
    agent: Arc<Agent>,
    sync: tokio::sync::Mutex<()>,
}

/// An error as the API shows it.
#[derive(Debug)]
pub struct HttpError(StatusCode, ErrorBody);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<AgentError> for HttpError {
    fn from(e: AgentError) -> Self {
        let (status, code) = match &e {
            AgentError::InvalidNhsNumber(n) => (StatusCode::BAD_REQUEST, n.code()),
            AgentError::NotEnrolled(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_enrolled"),
            AgentError::Verify(v) => (StatusCode::BAD_GATEWAY, v.code()),
            AgentError::Net(_) => (StatusCode::BAD_GATEWAY, "sync_failed"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        HttpError(status, ErrorBody::new(code, e.to_string()))
    }
}

async fn blocking<T: Send + 'static>(
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
    let agent = s.agent.clone();
    let resp = blocking(move || {
        agent.lookup(LookupInput {
            nhs_number: &req.nhs_number,
            staff_id: req.staff_id,
            incident_ref: req.incident_ref,
        })
    })
    .await?;
    Ok(Json(resp).into_response())
}

async fn status(State(s): State<Arc<Shared>>) -> Result<Response, HttpError> {
    let agent = s.agent.clone();
    Ok(Json(blocking(move || agent.status()).await?).into_response())
}

async fn sync(State(s): State<Arc<Shared>>) -> Result<Response, HttpError> {
    let _one = s.sync.lock().await;
    let resp = crate::sync::sync_once(&s.agent, &|_, _| {}).await?;
    Ok(Json(resp).into_response())
}

/// The router, for tests that drive it directly.
pub fn router(agent: Arc<Agent>) -> Router {
    let shared = Arc::new(Shared {
        agent,
        sync: tokio::sync::Mutex::new(()),
    });
    Router::new()
        .route("/v1/lookups", post(lookups))
        .route("/v1/status", get(status))
        .route("/v1/sync", post(sync))
        .with_state(shared)
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
        let app = router(agent);
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
