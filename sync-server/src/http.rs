//! The HTTP API: routes, authentication, the single error-to-response mapping, metrics and
//! load shedding. Handlers live in `http/`.

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
}

/// The server's routes with their layers.
pub fn router<S: Store + Clone>(app: Arc<App<S>>) -> Router {
    let max_upload = app.config.max_upload_bytes;
    let max_events = app.config.max_event_batch_bytes;
    // Every API route is shed (429/503, see `shed`); `/healthz` and `/metrics` are not, so
    // the server reports healthy and stays measurable while it sheds.
    let shed = Arc::new(Shedder::new(&app.config, app.metrics.clone()));
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
        .merge(pages::router(app.clone()))
        .fallback(ops::not_found)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn_with_state(shed, crate::shed::layer));
    Router::new()
        .route("/healthz", get(ops::healthz::<S>))
        .route("/metrics", get(ops::metrics::<S>))
        .merge(api)
        .layer(middleware::from_fn_with_state(app.clone(), record::<S>))
        .with_state(app)
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
