//! Device lifecycle endpoints (over mutual TLS, after the per-request device lookup that
//! refuses revoked devices with `403 device_revoked` + `wipe`): the tablet's report for the
//! fleet view, client certificate renewal, and the chain of feed signing key rollovers.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Duration;
use cpis_protocol::api::{codes, paths as api_paths};
use cpis_protocol::{DeviceReport, KeyChain, RenewRequest, RenewResponse};

use super::device::AuthedDevice;
use super::{ApiError, App};
use crate::store::Store;

/// Longest agent version kept.
const MAX_VERSION: usize = 100;

/// `POST /v1/device/report`: stores the device's latest report with the server's receipt
/// time; `204`.
pub(crate) async fn report<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    request: Result<Json<DeviceReport>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(mut report) =
        request.map_err(|e| ApiError::bad_request("bad_request", e.body_text()))?;
    report.agent_version = report.agent_version.chars().take(MAX_VERSION).collect();
    app.store
        .record_device_report(device.id, report, app.clock.now())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/device/renew`: a new client certificate for the CSR's (new) key, valid for
/// `device_cert_days` from now; the device's recorded expiry becomes the new one. The old
/// certificate stays valid until it expires.
pub(crate) async fn renew<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    request: Result<Json<RenewRequest>, JsonRejection>,
) -> Result<Json<RenewResponse>, ApiError> {
    let Json(request) = request.map_err(|e| ApiError::bad_request("bad_request", e.body_text()))?;
    let valid_for = Duration::days(i64::from(app.config.device_cert_days));
    let cert = app
        .pki
        // Against the system clock, as at enrolment: TLS checks validity against it.
        .issue_device_certificate(&request.csr_pem, device.id, valid_for, chrono::Utc::now())
        .map_err(|e| {
            if e.is_client_error() {
                ApiError::bad_request(codes::BAD_CSR, e.to_string())
            } else {
                ApiError::internal("issuing the device certificate failed", &e)
            }
        })?;
    app.store
        .renew_device_certificate(device.id, cert.expires_at)
        .await?;
    tracing::info!(device = %device.id, expires_at = %cert.expires_at, "client certificate renewed");
    Ok(Json(RenewResponse {
        client_cert_pem: cert.pem,
        client_cert_expires_at: cert.expires_at,
    }))
}

/// `GET /v1/device/keys`: every key rollover, oldest first (postcard [`KeyChain`]).
pub(crate) async fn keys<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(_device): AuthedDevice,
) -> Result<Response, ApiError> {
    let chain = KeyChain {
        rollovers: app
            .store
            .key_rollovers()
            .await?
            .into_iter()
            .map(|r| r.signed)
            .collect(),
    };
    Ok((
        [(header::CONTENT_TYPE, api_paths::OCTET)],
        cpis_protocol::signing::encode(&chain),
    )
        .into_response())
}
