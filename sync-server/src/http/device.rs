//! Device endpoints: enrolment, and (over mutual TLS) checkpoint, the live feed's waiting
//! checkpoint, delta and snapshot.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Duration;
use cpis_protocol::api::{EnrolRequest, EnrolResponse, SnapshotQuery, WaitQuery, codes, paths};
use cpis_protocol::{BODY_FORMAT, DeviceId, SNAPSHOT_FORMATS};
use serde::Deserialize;

use super::{ApiError, App};
use crate::feed::BuiltSnapshot;
use crate::live::Published;
use crate::metrics::LiveLabels;
use crate::store::{DeviceRecord, NewDevice, RegionHead, Store, TokenRefusal};
use crate::tls::ClientIdentity;
use crate::tokens;

/// How often a device's `last_seen` is written (at most).
const TOUCH_INTERVAL: Duration = Duration::minutes(5);
/// Longest accepted device name.
const MAX_NAME: usize = 100;

fn refusal(r: TokenRefusal) -> ApiError {
    match r {
        TokenRefusal::Unknown => ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::TOKEN_UNKNOWN,
            "the enrolment token is not known",
        ),
        TokenRefusal::UsedUp => ApiError::new(
            StatusCode::FORBIDDEN,
            codes::TOKEN_USED_UP,
            "the enrolment token has no uses left; ask trust IT for a new one",
        ),
        TokenRefusal::Expired => ApiError::new(
            StatusCode::FORBIDDEN,
            codes::TOKEN_EXPIRED,
            "the enrolment token has expired; ask trust IT for a new one",
        ),
        TokenRefusal::Revoked => ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::ENROLMENT_TOKEN_REVOKED,
            "the enrolment token has been revoked; ask trust IT for a new one",
        ),
    }
}

/// `POST /v1/enrol`.
pub(crate) async fn enrol<S: Store>(
    State(app): State<Arc<App<S>>>,
    request: Result<Json<EnrolRequest>, JsonRejection>,
) -> Result<Json<EnrolResponse>, ApiError> {
    let Json(request) = request.map_err(|e| ApiError::bad_request("bad_request", e.body_text()))?;
    let now = app.clock.now();
    crate::keys::refresh(&app.feed, &app.data_dir, &app.store, now).await;
    let hash = tokens::hash(&request.token);
    // Refuse a bad token before looking at the CSR.
    app.store
        .check_enrolment_token(hash, now)
        .await?
        .map_err(refusal)?;
    let name = request
        .name
        .map(|n| n.trim().chars().take(MAX_NAME).collect::<String>())
        .filter(|n| !n.is_empty());
    let device = DeviceId::new();
    let valid_for = Duration::days(i64::from(app.config.device_cert_days));
    let cert = app
        .pki
        // TLS checks certificate validity against the system clock, so it is issued
        // against the system clock too (not the injected one).
        .issue_device_certificate(&request.csr_pem, device, valid_for, chrono::Utc::now())
        .map_err(|e| {
            if e.is_client_error() {
                ApiError::bad_request(codes::BAD_CSR, e.to_string())
            } else {
                ApiError::internal("issuing the device certificate failed", &e)
            }
        })?;
    let record = app
        .store
        .enrol_device(
            hash,
            NewDevice {
                id: device,
                name,
                agent_version: request.agent_version.chars().take(MAX_NAME).collect(),
                cert_expires_at: cert.expires_at,
            },
            now,
        )
        .await?
        .map_err(refusal)?;
    tracing::info!(device = %record.id, trust = %record.trust, region = %record.region, "device enrolled");
    Ok(Json(EnrolResponse {
        device_id: record.id,
        trust: record.trust,
        region: record.region,
        client_cert_pem: cert.pem,
        client_cert_expires_at: cert.expires_at,
        signing_public_key: app.feed.public_key(),
        policy: app.feed.policy(),
    }))
}

/// A device authenticated by its client certificate, looked up on every request; a revoked
/// device is refused (`403 device_revoked`, `wipe: true`).
#[derive(Debug)]
pub(crate) struct AuthedDevice(pub(crate) DeviceRecord);

/// A device authenticated by its client certificate, revoked or not: only the access-event
/// upload takes it, so that a revoked tablet can still deliver its outbox before it wipes.
#[derive(Debug)]
pub(crate) struct DeviceEvenRevoked(pub(crate) DeviceRecord);

impl<S: Store> FromRequestParts<Arc<App<S>>> for AuthedDevice {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App<S>>,
    ) -> Result<Self, Self::Rejection> {
        not_revoked(authenticate(parts, app).await?).map(AuthedDevice)
    }
}

impl<S: Store> FromRequestParts<Arc<App<S>>> for DeviceEvenRevoked {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App<S>>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(parts, app).await.map(DeviceEvenRevoked)
    }
}

/// `device`, unless it is revoked ([`revoked`]).
fn not_revoked(device: DeviceRecord) -> Result<DeviceRecord, ApiError> {
    if device.revoked_at.is_some() {
        tracing::warn!(device = %device.id, "revoked device refused");
        return Err(revoked());
    }
    Ok(device)
}

/// The answer to a revoked device on every route but the event upload.
pub(crate) fn revoked() -> ApiError {
    let mut err = ApiError::new(
        StatusCode::FORBIDDEN,
        codes::DEVICE_REVOKED,
        "this device has been revoked: send the pending access events, then erase its data",
    );
    err.body.error.wipe = true;
    err
}

fn cert_required(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        codes::CLIENT_CERT_REQUIRED,
        message,
    )
}

/// The device id of the request's client certificate (checked by TLS).
fn certificate_device(parts: &Parts) -> Result<DeviceId, ApiError> {
    match parts.extensions.get::<ClientIdentity>().copied() {
        Some(ClientIdentity(Some(id))) => Ok(id),
        _ => Err(cert_required(
            "device endpoints need the client certificate issued at enrolment",
        )),
    }
}

/// The enrolled device of the request's client certificate (revoked or not); records when
/// it was last seen.
async fn authenticate<S: Store>(
    parts: &Parts,
    app: &Arc<App<S>>,
) -> Result<DeviceRecord, ApiError> {
    let device = app.store.device(certificate_device(parts)?).await?;
    admit(app, device).await
}

/// The device read for the request's certificate, if enrolled: keeps the signing key current
/// and records when it was last seen.
async fn admit<S: Store>(
    app: &Arc<App<S>>,
    device: Option<DeviceRecord>,
) -> Result<DeviceRecord, ApiError> {
    let Some(device) = device else {
        return Err(cert_required(
            "the client certificate's device is not enrolled",
        ));
    };
    let id = device.id;
    let now = app.clock.now();
    if device.revoked_at.is_none() {
        crate::keys::refresh(&app.feed, &app.data_dir, &app.store, now).await;
    }
    if device
        .last_seen
        .is_none_or(|seen| now - seen >= TOUCH_INTERVAL)
        && let Err(e) = app.store.touch_device(id, now).await
    {
        tracing::warn!(device = %id, error = %e, "recording last_seen failed");
    }
    Ok(device)
}

pub(crate) fn octet(body: impl Into<Body>) -> Response {
    ([(header::CONTENT_TYPE, paths::OCTET)], body.into()).into_response()
}

fn signed_header(value: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(value).map_err(|e| ApiError::internal("signed header", &e))
}

/// `GET /v1/device/checkpoint`: the device and its region's head in one read (the same
/// checks as [`AuthedDevice`]).
pub(crate) async fn checkpoint<S: Store>(
    State(app): State<Arc<App<S>>>,
    DeviceAndHead(device, head): DeviceAndHead,
) -> Result<Response, ApiError> {
    signed_head(&app, &device, head)
}

/// The signed checkpoint of `head`, `device`'s region's.
fn signed_head<S: Store>(
    app: &App<S>,
    device: &DeviceRecord,
    head: Option<RegionHead>,
) -> Result<Response, ApiError> {
    let head = head
        .ok_or_else(|| ApiError::not_found(format!("region {} does not exist", device.region)))?;
    Ok(octet(app.feed.checkpoint(&head, app.clock.now())))
}

/// An [`AuthedDevice`] and its region's head, read together.
#[derive(Debug)]
pub(crate) struct DeviceAndHead(DeviceRecord, Option<RegionHead>);

impl<S: Store> FromRequestParts<Arc<App<S>>> for DeviceAndHead {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App<S>>,
    ) -> Result<Self, Self::Rejection> {
        let read = app
            .store
            .device_and_head(certificate_device(parts)?)
            .await?;
        let (device, head) = read.map_or((None, None), |(d, h)| (Some(d), h));
        let device = not_revoked(admit(app, device).await?)?;
        Ok(DeviceAndHead(device, head))
    }
}

/// `GET /v1/device/checkpoint/wait?epoch=E&after=V&wait=S`: the live feed (see
/// [`crate::live`]).
pub(crate) async fn checkpoint_wait<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let max = app.config.live_wait_max_secs;
    if max == 0 {
        return Err(ApiError::not_found(
            "the live feed is off on this server (live_wait_max_secs = 0): poll the checkpoint",
        ));
    }
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "bad_query",
            format!(
                "give ?epoch=E&after=VERSION&wait=SECONDS: {}",
                e.body_text()
            ),
        )
    })?;
    let answered = |outcome| {
        app.metrics
            .live_answers
            .get_or_create(&LiveLabels { outcome })
            .inc();
    };
    let Some(_slot) = app.live.enter(&app.metrics) else {
        answered("full");
        return Err(ApiError::overloaded(crate::live::spread_retry()));
    };
    let held = (q.epoch, q.after);
    let moved = |p: &Published| p.heads.get(&device.region).is_some_and(|h| *h > held);
    let mut heads = app.live.subscribe();
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(q.wait.min(max)));
    tokio::pin!(deadline);
    let outcome = loop {
        if moved(&heads.borrow_and_update()) {
            break "changed";
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { break "unchanged" },
            () = &mut deadline => break "unchanged",
            () = app.live.closing().cancelled() => {
                answered("closing");
                return Err(ApiError::overloaded(crate::live::spread_retry()));
            }
        }
    };
    answered(outcome);
    let published = heads.borrow().clone();
    let now = app.clock.now();
    match published.heads.get(&device.region) {
        // Signed now, as a poll's is (a tablet refuses a checkpoint older than one it has
        // seen, so the time signed never steps back); the heads were read within
        // `Heads::is_recent`.
        Some(&(epoch, version)) if app.live.is_recent(&published, now) => Ok(octet(
            app.feed.checkpoint_of(&device.region, epoch, version, now),
        )),
        // Heads not read lately (the server starting, the database away) or a region created
        // since: the store, as a poll (503 when the database does not answer).
        _ => {
            let head = app.store.region_head(device.region.clone()).await?;
            signed_head(&app, &device, head)
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeltaQuery {
    from: u64,
    /// The epoch the device holds; another epoch answers 410.
    epoch: Option<u64>,
}

/// `GET /v1/device/delta?from=V[&epoch=E]`.
pub(crate) async fn delta<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<DeltaQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(
            "bad_query",
            format!("give ?from=VERSION: {}", e.body_text()),
        )
    })?;
    let unknown = || ApiError::not_found(format!("region {} does not exist", device.region));
    // A fleet at one version asks for the same delta when the region moves: the head (one
    // small read) says which, and a delta built for another tablet is answered again.
    let head = app
        .store
        .region_head(device.region.clone())
        .await?
        .ok_or_else(unknown)?;
    if let Some(answer) = delta_position(&head, &q)? {
        return Ok(answer);
    }
    let built = match app
        .feed
        .cached_delta(&head.region, head.epoch, q.from, head.version)
    {
        Some(hit) => hit,
        None => {
            let changes = app
                .store
                .region_changes(device.region.clone(), q.from)
                .await?
                .ok_or_else(unknown)?;
            // The head may have moved since: check again against the one read with the changes.
            if let Some(answer) = delta_position(&changes.head, &q)? {
                return Ok(answer);
            }
            app.feed.build_delta(changes, q.from, app.clock.now())?
        }
    };
    let mut response = octet(built.body.clone());
    response
        .headers_mut()
        .insert(paths::SIGNED_HEADER, signed_header(&built.header)?);
    Ok(response)
}

/// What a delta request gets before any change is read: `204` at the head, `410` for another
/// epoch or a version below the change log's floor, `400` ahead of the head; `None` when a
/// delta is owed.
fn delta_position(head: &RegionHead, q: &DeltaQuery) -> Result<Option<Response>, ApiError> {
    let gone = |why: String| ApiError::new(StatusCode::GONE, codes::DELTA_GONE, why);
    if let Some(epoch) = q.epoch
        && epoch != head.epoch
    {
        return Err(gone(format!(
            "the region is now in epoch {}, not {epoch}: take a snapshot",
            head.epoch
        )));
    }
    if q.from == head.version {
        return Ok(Some(StatusCode::NO_CONTENT.into_response()));
    }
    if q.from > head.version {
        return Err(ApiError::bad_request(
            "version_ahead",
            format!("version {} is ahead of the head {}", q.from, head.version),
        ));
    }
    if q.from < head.floor {
        return Err(gone(format!(
            "changes before version {} are no longer kept: take a snapshot",
            head.floor
        )));
    }
    Ok(None)
}

/// The snapshot body format a request asks for: rows when it names none (tablets from before
/// the columnar format), `400` for one this server does not write.
fn snapshot_format(
    query: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<u16, ApiError> {
    let bad = |why: String| {
        ApiError::bad_request(
            "bad_query",
            format!(
                "give ?format=F, F one of the snapshot body formats this server writes {:?}: {why}",
                SNAPSHOT_FORMATS
            ),
        )
    };
    let Query(q) = query.map_err(|e| bad(e.body_text()))?;
    match q.format {
        None => Ok(BODY_FORMAT),
        Some(f) if SNAPSHOT_FORMATS.contains(&f) => Ok(f),
        Some(f) => Err(bad(format!("{f} is not one of them"))),
    }
}

/// The device's region's current snapshot in `format` (built once; `None` for no region).
async fn current_snapshot<S: Store>(
    app: &App<S>,
    device: &DeviceRecord,
    format: u16,
) -> Result<Option<Arc<BuiltSnapshot>>, ApiError> {
    Ok(app
        .feed
        .current_snapshot(
            &app.store,
            &device.region,
            format,
            app.clock.now(),
            &app.metrics,
        )
        .await?)
}

/// `GET /v1/device/snapshot[?format=F]`: the signed metadata of the region's current snapshot.
pub(crate) async fn snapshot<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    query: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let format = snapshot_format(query)?;
    let snapshot = current_snapshot(&app, &device, format)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("region {} does not exist", device.region)))?;
    Ok(octet(snapshot.signed.clone()))
}

/// `GET /v1/device/snapshots/{epoch}/{version}[?format=F]`: the body, with HTTP Range
/// support.
pub(crate) async fn snapshot_body<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    Path((epoch, version)): Path<(u64, u64)>,
    query: Result<Query<SnapshotQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = snapshot_format(query)?;
    let snapshot = match app.feed.cached(&device.region, epoch, version, format) {
        Some(s) => s,
        None => {
            // Not cached (e.g. after a restart): build it if it is still the current one.
            match current_snapshot(&app, &device, format).await? {
                Some(s) if s.meta.epoch == epoch && s.meta.version == version => s,
                _ => {
                    return Err(ApiError::new(
                        StatusCode::GONE,
                        codes::SNAPSHOT_GONE,
                        format!(
                            "snapshot {epoch}/{version} is no longer available: fetch {} again",
                            paths::SNAPSHOT
                        ),
                    ));
                }
            }
        }
    };
    ranged(&snapshot, headers.get(header::RANGE))
}

/// Parses a single `bytes=` range against a body of `len` bytes.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (s, "") => (s.parse().ok()?, len.checked_sub(1)?),
        (s, e) => {
            let e: u64 = e.parse().ok()?;
            (s.parse().ok()?, e.min(len.checked_sub(1)?))
        }
    };
    (start <= end && start < len).then_some((start, end))
}

fn ranged(snapshot: &BuiltSnapshot, range: Option<&HeaderValue>) -> Result<Response, ApiError> {
    let len = snapshot.body.len() as u64;
    let etag = format!("\"{}\"", hex::encode(snapshot.meta.body.sha256));
    let mut response = match range.and_then(|v| v.to_str().ok()) {
        None => octet(snapshot.body.clone()),
        Some(value) => match parse_range(value, len) {
            Some((start, end)) => {
                let part = snapshot.body.slice(start as usize..=end as usize);
                let mut r = octet(part);
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    signed_header(&format!("bytes {start}-{end}/{len}"))?,
                );
                r
            }
            None => {
                let mut r = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range_not_satisfiable",
                    format!("give one range within the {len} bytes of the body"),
                )
                .into_response();
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    signed_header(&format!("bytes */{len}"))?,
                );
                return Ok(r);
            }
        },
    };
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, signed_header(&etag)?);
    h.insert(paths::SIGNED_HEADER, signed_header(&snapshot.header)?);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
