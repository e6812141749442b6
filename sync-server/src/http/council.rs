//! The council API: bearer-token authentication and uploads. Every upload attempt of an
//! authenticated council is recorded for its uploads page: applied ones by the store with
//! the receipt, refused ones (invalid rows, too large) here.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cpis_protocol::CouncilCode;
use cpis_protocol::api::{ErrorDetail, UploadReceipt, UploadRejection, codes};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, App};
use crate::metrics::UploadLabels;
use crate::store::{MAX_KEPT_UPLOAD_ERRORS, RefusedUpload, Store};
use crate::tokens;
use crate::upload::{self, Invalid, UploadOptions};

/// Checks the bearer token and that it belongs to the council in the path.
pub(crate) async fn authorise<S: Store>(
    app: &App<S>,
    headers: &HeaderMap,
    ods: &str,
) -> Result<CouncilCode, ApiError> {
    let token = tokens::bearer(headers).ok_or_else(|| {
        ApiError::unauthorised("send the council's token as `Authorization: Bearer TOKEN`")
    })?;
    let council = app
        .store
        .council_for_token(tokens::hash(token), app.clock.now())
        .await?
        .map_err(ApiError::bearer_refused)?;
    // The path must name the token's own council; anything else is refused the same way
    // whether or not that council exists.
    if ods.trim() != council.as_str() {
        return Err(ApiError::forbidden(format!(
            "this token belongs to council {council}; it cannot act for {ods}"
        )));
    }
    Ok(council)
}

/// A council authenticated from the request's headers alone (its bearer token, for the
/// council named in the path), before any body is read: an unauthenticated client cannot
/// make the server read (or wait for) a 32 MiB upload.
#[derive(Debug)]
pub(crate) struct AuthedCouncil(pub(crate) CouncilCode);

impl<S: Store> FromRequestParts<Arc<App<S>>> for AuthedCouncil {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App<S>>,
    ) -> Result<Self, Self::Rejection> {
        let Path(ods) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
        authorise(app, &parts.headers, &ods)
            .await
            .map(AuthedCouncil)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    #[serde(default)]
    allow_empty: bool,
}

/// `POST /v1/councils/{ods}/uploads`.
pub(crate) async fn upload<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedCouncil(council): AuthedCouncil,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let now = app.clock.now();
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            let error = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(app.config.max_upload_bytes)
            } else {
                ApiError::bad_request("bad_body", e.body_text())
            };
            let refused = RefusedUpload {
                message: error.body.error.message.clone(),
                error_count: 1,
                errors: Vec::new(),
            };
            record_refusal(&app, &council, refused, now).await;
            return Err(error);
        }
    };
    let today = now.date_naive();
    let options = UploadOptions {
        allow_empty: query.allow_empty,
    };
    let parse_council = council.clone();
    let parsed =
        tokio::task::spawn_blocking(move || upload::parse(&parse_council, &body, today, options))
            .await
            .map_err(|e| ApiError::internal("upload validation failed", &e))?;
    let rows = match parsed {
        Ok(rows) => rows,
        Err(Invalid(errors)) => {
            app.metrics
                .uploads
                .get_or_create(&UploadLabels { result: "rejected" })
                .inc();
            tracing::info!(%council, errors = errors.len(), "upload rejected");
            let rejection = UploadRejection {
                error: ErrorDetail {
                    code: codes::INVALID_UPLOAD.to_owned(),
                    message: format!(
                        "the upload has {} error(s); nothing was applied",
                        errors.len()
                    ),
                    wipe: false,
                },
                errors,
            };
            let refused = RefusedUpload {
                message: rejection.error.message.clone(),
                error_count: rejection.errors.len() as u64,
                errors: rejection
                    .errors
                    .iter()
                    .take(MAX_KEPT_UPLOAD_ERRORS)
                    .cloned()
                    .collect(),
            };
            record_refusal(&app, &council, refused, now).await;
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(rejection)).into_response());
        }
    };
    // Retention runs before every upload so that the receipt's version includes it.
    let purged = app.store.purge_expired(today, now).await?;
    app.metrics.purged_flags.inc_by(purged);
    let upload_id = Uuid::now_v7();
    let outcome = app
        .store
        .apply_upload(council.clone(), upload_id, rows, now)
        .await?;
    // Waiting tablets of the regions it moved hear of it now (see `live`).
    app.live.hint();
    let c = outcome.counts;
    app.metrics
        .uploads
        .get_or_create(&UploadLabels { result: "accepted" })
        .inc();
    app.metrics
        .upload_changes
        .inc_by(c.added + c.updated + c.ended + c.removed);
    app.metrics
        .head_version
        .set(i64::try_from(outcome.version).unwrap_or(i64::MAX));
    tracing::info!(
        %council, %upload_id, rows = c.rows, added = c.added, updated = c.updated,
        ended = c.ended, removed = c.removed, unchanged = c.unchanged,
        version = outcome.version, "upload applied"
    );
    Ok(Json(UploadReceipt {
        upload_id,
        result: "success".to_owned(),
        counts: c,
        version: outcome.version,
    })
    .into_response())
}

/// Records a refused upload for the council's uploads page. The refusal is answered whether
/// or not this works: a failure is logged.
async fn record_refusal<S: Store>(
    app: &App<S>,
    council: &CouncilCode,
    refused: RefusedUpload,
    now: chrono::DateTime<chrono::Utc>,
) {
    if let Err(e) = app
        .store
        .record_refused_upload(council.clone(), refused, now)
        .await
    {
        tracing::warn!(%council, error = %e, "recording a refused upload failed");
    }
}
