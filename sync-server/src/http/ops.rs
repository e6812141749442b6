//! Operational endpoints: `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use cpis_protocol::mailbox::OVERDUE_AFTER_DAYS;

use super::App;
use crate::metrics::CouncilLabels;
use crate::store::Store;

/// `GET /healthz`: `200 ok` when the database answers; `503` saying why when it does not (a
/// load balancer then sends requests to the other replicas).
pub(crate) async fn healthz<S: Store>(State(app): State<Arc<App<S>>>) -> Response {
    if !app.database.is_ready() {
        return unhealthy(&format!(
            "not serving yet: {}",
            app.database.why_not_ready()
        ));
    }
    match app.store.head_version().await {
        Ok(v) => {
            app.metrics
                .head_version
                .set(i64::try_from(v).unwrap_or(i64::MAX));
            (StatusCode::OK, "ok\n").into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "health check: the database does not answer");
            unhealthy(&format!("database unreachable: {e}"))
        }
    }
}

fn unhealthy(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "5")],
        format!("unavailable: {why}\n"),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub(crate) async fn metrics<S: Store>(State(app): State<Arc<App<S>>>) -> Response {
    if let Ok(v) = app.store.head_version().await {
        app.metrics
            .head_version
            .set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    let overdue_before = app.clock.now() - chrono::Duration::days(OVERDUE_AFTER_DAYS);
    match app.store.mailbox_stats(overdue_before).await {
        Ok(stats) => {
            for s in stats {
                let labels = CouncilLabels {
                    council: s.council.to_string(),
                };
                let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                app.metrics
                    .mailbox_pending
                    .get_or_create(&labels)
                    .set(gauge(s.pending));
                app.metrics
                    .mailbox_overdue
                    .get_or_create(&labels)
                    .set(gauge(s.overdue));
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading mailbox counts for /metrics failed"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    super::not_found()
}
