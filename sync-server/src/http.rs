//! The HTTP API: routes, authentication, the single error-to-response mapping, metrics and
//! load shedding. Handlers live in `http/`. `/metrics` is served by [`metrics_router`] on
//! its own listener (loopback by default), never on the public one.
//!
//! Every API request passes, outermost first: [`record`] (metrics), [`credentials`] (is
//! there a credential the server knows — client certificate, valid bearer token or live
//! page session? — which decides the pool that sheds it), the shedder, then [`deadline`]
//! (the whole request, reading its body included, within `request_timeout_secs`, else
//! `408`). The live feed's waiting checkpoint request passes only [`record`] and the
//! readiness gate: it is bounded by `live_max_waiting` instead (see [`crate::live`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cpis_protocol::api::{codes, paths};

use crate::clock::Clock;
use crate::config::Config;
use crate::feed::Feed;
use crate::metrics::{Metrics, RequestLabels};
use crate::pki::Pki;
use crate::shed::Shedder;
use crate::store::Store;

mod council;
mod device;
mod error;
mod events;
mod lifecycle;
mod mailbox;
mod ops;
mod pages;

pub use error::ApiError;

/// What every handler shares.
#[derive(Debug)]
pub struct App<S> {
    pub store: S,
    /// The data dir (keys are re-read from it after a rollover).
    pub data_dir: std::path::PathBuf,
    pub feed: Feed,
    pub pki: Arc<Pki>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Whether the database has answered since the start (PostgreSQL may not yet).
    pub database: Arc<crate::server::DatabaseState>,
    /// The region heads waiting tablets watch (the live feed).
    pub live: crate::live::Heads,
}

/// The server's routes with their layers.
pub fn router<S: Store + Clone>(app: Arc<App<S>>) -> Router {
    let max_upload = app.config.max_upload_bytes;
    let max_events = app.config.max_event_batch_bytes;
    // Every API route is shed (429/503, see `shed`); `/healthz` and `/metrics` are not, so
    // the server reports healthy and stays measurable while it sheds.
    let shed = Arc::new(Shedder::new(&app.config, app.metrics.clone()));
    let sessions = Arc::new(pages::PageSessions::new());
    let known = Arc::new(Known {
        app: app.clone(),
        sessions: sessions.clone(),
    });
    let api = Router::new()
        .route(
            "/v1/councils/{ods}/uploads",
            post(council::upload::<S>).layer(DefaultBodyLimit::max(max_upload)),
        )
        .route("/v1/councils/{ods}/notifications", get(mailbox::list::<S>))
        .route(
            "/v1/councils/{ods}/notifications/ack",
            post(mailbox::ack::<S>),
        )
        .route(paths::ENROL, post(device::enrol::<S>))
        .route(
            paths::EVENTS,
            post(events::upload::<S>).layer(DefaultBodyLimit::max(max_events)),
        )
        .route(cpis_protocol::confirm::PATH, post(events::confirm::<S>))
        .route(
            cpis_protocol::lifecycle::paths::REPORT,
            post(lifecycle::report::<S>),
        )
        .route(
            cpis_protocol::lifecycle::paths::RENEW,
            post(lifecycle::renew::<S>),
        )
        .route(
            cpis_protocol::lifecycle::paths::KEYS,
            get(lifecycle::keys::<S>),
        )
        .route(paths::CHECKPOINT, get(device::checkpoint::<S>))
        .route(paths::DELTA, get(device::delta::<S>))
        .route(paths::SNAPSHOT, get(device::snapshot::<S>))
        .route(
            &format!("{}/{{epoch}}/{{version}}", paths::SNAPSHOT_BODY_PREFIX),
            get(device::snapshot_body::<S>),
        )
        .merge(pages::router(app.clone(), sessions))
        .fallback(ops::not_found)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn_with_state(app.clone(), deadline::<S>))
        .layer(middleware::from_fn_with_state(app.clone(), ready::<S>))
        .layer(middleware::from_fn_with_state(shed, crate::shed::layer))
        .layer(middleware::from_fn_with_state(known, credentials::<S>));
    // The live feed's waiting requests cost memory, not work: neither shed nor cut by the
    // request deadline; `live_max_waiting` bounds them instead (see `live`).
    let waiting = Router::new()
        .route(paths::CHECKPOINT_WAIT, get(device::checkpoint_wait::<S>))
        .layer(middleware::from_fn_with_state(app.clone(), ready::<S>));
    Router::new()
        .route("/healthz", get(ops::healthz::<S>))
        .merge(api)
        .merge(waiting)
        .layer(middleware::from_fn_with_state(app.clone(), record::<S>))
        .with_state(app)
}

/// The `/metrics` listener's only route (plain HTTP, see `Config::metrics_listen`).
pub fn metrics_router<S: Store + Clone>(app: Arc<App<S>>) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics::<S>))
        .fallback(ops::not_found)
        .with_state(app)
}

/// A request that carries a credential the server knows: a client certificate (checked by
/// TLS), a council or trust admin bearer token valid now, or the cookie of a live page
/// session. Requests without one draw from the small anonymous pool of the shedder, so they
/// can never starve tablets or councils.
#[derive(Debug, Clone, Copy)]
pub struct Credentialed;

/// What [`credentials`] checks a request against.
#[derive(Debug)]
struct Known<S> {
    app: Arc<App<S>>,
    sessions: Arc<pages::PageSessions>,
}

/// Marks requests with a known credential ([`Credentialed`]); reads headers only.
async fn credentials<S: Store>(
    State(known): State<Arc<Known<S>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let app = &known.app;
    let device = matches!(
        req.extensions().get::<crate::tls::ClientIdentity>(),
        Some(crate::tls::ClientIdentity(Some(_)))
    );
    let known = device
        || known
            .sessions
            .signed_in(&app.store, req.headers(), app.clock.now())
            .await
        || {
            let bearer = crate::tokens::bearer(req.headers()).map(crate::tokens::hash);
            match bearer {
                None => false,
                Some(hash) => {
                    let now = app.clock.now();
                    matches!(app.store.council_for_token(hash, now).await, Ok(Ok(_)))
                        || matches!(app.store.trust_for_admin_token(hash, now).await, Ok(Ok(_)))
                }
            }
        };
    if known {
        req.extensions_mut().insert(Credentialed);
    }
    next.run(req).await
}

/// Answers `503 database_unavailable` until the database has answered since the start.
async fn ready<S: Store>(State(app): State<Arc<App<S>>>, req: Request, next: Next) -> Response {
    if app.database.is_ready() {
        return next.run(req).await;
    }
    ApiError::database_unavailable(&app.database.why_not_ready()).into_response()
}

/// Ends a request not answered within `request_timeout_secs` with `408`: a client that
/// trickles its body (or a handler stuck) gives its slot back.
async fn deadline<S: Store>(State(app): State<Arc<App<S>>>, req: Request, next: Next) -> Response {
    let limit = std::time::Duration::from_secs(app.config.request_timeout_secs.max(1));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            app.metrics.request_timeouts.inc();
            ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                codes::REQUEST_TIMEOUT,
                format!(
                    "the request was not complete within {} s; send it again",
                    limit.as_secs()
                ),
            )
            .into_response()
        }
    }
}

async fn record<S: Store>(State(app): State<Arc<App<S>>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let response = next.run(req).await;
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// The `not_found` answer for unknown paths.
pub(crate) fn not_found() -> Response {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        "no such endpoint",
    )
    .into_response()
}
