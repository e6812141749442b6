//! Device endpoints for access events (mutual TLS): batch upload and online confirmation.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use cpis_protocol::confirm::{ConfirmRequest, ConfirmResponse};
use cpis_protocol::ingest::MAX_BATCH_EVENTS;
use cpis_protocol::local::{CouncilContact, FlagView};
use cpis_protocol::{AccessEvent, EventUploadAck, Freshness, LookupResult, retained_until};
use serde::Deserialize;

use super::device::{AuthedDevice, DeviceEvenRevoked};
use super::{ApiError, App};
use crate::ingest::{self, Caller};
use crate::metrics::{ConfirmLabels, EventLabels};
use crate::store::{DeviceRecord, EventIngest, EventSource, IngestEvent, IngestOutcome, Store};

/// A batch read loosely, so that each event is judged on its own.
#[derive(Debug, Deserialize)]
struct RawBatch {
    events: Vec<serde_json::Value>,
}

fn body_or_413<S: Store>(
    app: &App<S>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(app.config.max_event_batch_bytes)
        } else {
            ApiError::bad_request("bad_body", e.body_text())
        }
    })
}

fn caller(device: &DeviceRecord) -> Caller {
    Caller {
        device: device.id,
        trust: device.trust.clone(),
    }
}

/// Stores checked events and records metrics; answers after commit.
async fn store_events<S: Store>(
    app: &App<S>,
    device: &DeviceRecord,
    source: EventSource,
    events: Vec<AccessEvent>,
    refused: Vec<crate::store::RefusedEvent>,
    now: DateTime<Utc>,
) -> Result<Vec<IngestOutcome>, ApiError> {
    if events.is_empty() && refused.is_empty() {
        return Ok(Vec::new());
    }
    let events = events
        .into_iter()
        .map(|e| IngestEvent::new(e, now))
        .collect::<Result<Vec<_>, _>>()?;
    // A wrong tablet clock says nothing about delay: those events are left out of it.
    let accessed: Vec<Option<DateTime<Utc>>> = events
        .iter()
        .map(|e| (!e.clock_suspect).then_some(e.event.accessed_at))
        .collect();
    let outcomes = app
        .store
        .ingest_events(EventIngest {
            device: device.id,
            trust: device.trust.clone(),
            source,
            received_at: now,
            events,
            refused,
        })
        .await?;
    if outcomes.iter().any(|o| o.contacts_changed) {
        app.live.hint();
    }
    let labels = |outcome| EventLabels {
        outcome,
        source: source.as_str(),
    };
    for (o, accessed_at) in outcomes.iter().zip(accessed) {
        if o.new {
            app.metrics.events.get_or_create(&labels("stored")).inc();
            if let Some(accessed_at) = accessed_at {
                let delay = (now - accessed_at).num_milliseconds().max(0) as f64 / 1000.0;
                app.metrics.event_delay_seconds.observe(delay);
            }
        } else {
            app.metrics.events.get_or_create(&labels("duplicate")).inc();
        }
        app.metrics
            .notifications_queued
            .inc_by(if o.new { o.notified.len() as u64 } else { 0 });
    }
    Ok(outcomes)
}

/// `POST /v1/device/events`: JSON `EventBatch` → `EventUploadAck`, after commit. The one
/// route a revoked device may still use: its outbox is delivered (and recorded as sent
/// after revocation) rather than lost when it wipes.
pub(crate) async fn upload<S: Store>(
    State(app): State<Arc<App<S>>>,
    DeviceEvenRevoked(device): DeviceEvenRevoked,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EventUploadAck>, ApiError> {
    let body = body_or_413(&app, body)?;
    let batch: RawBatch = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("bad_batch", format!("the body is not an event batch: {e}"))
    })?;
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            cpis_protocol::api::codes::TOO_LARGE,
            format!(
                "a batch holds at most {MAX_BATCH_EVENTS} events, not {}",
                batch.events.len()
            ),
        ));
    }
    let now = app.clock.now();
    let source = if device.revoked_at.is_some() {
        tracing::warn!(device = %device.id, events = batch.events.len(), "access events from a revoked device");
        EventSource::AfterRevocation
    } else {
        EventSource::Upload
    };
    let checked = ingest::check_batch(batch.events, &caller(&device), now)
        .map_err(|e| ApiError::bad_request("bad_batch", e.to_string()))?;
    if !checked.rejected.is_empty() {
        app.metrics
            .events
            .get_or_create(&EventLabels {
                outcome: "rejected",
                source: source.as_str(),
            })
            .inc_by(checked.rejected.len() as u64);
        tracing::warn!(
            device = %device.id, rejected = checked.rejected.len(),
            "events rejected for good"
        );
    }
    let outcomes = store_events(
        &app,
        &device,
        source,
        checked.accepted,
        checked.refused,
        now,
    )
    .await?;
    tracing::debug!(device = %device.id, stored = outcomes.len(), "event batch stored");
    Ok(Json(EventUploadAck {
        stored: outcomes.iter().map(|o| o.event_id).collect(),
        rejected: checked.rejected,
    }))
}

/// `POST /v1/device/confirm`: the national answer for the event's NHS number; the event is
/// stored with that answer (see `cpis_protocol::confirm`).
pub(crate) async fn confirm<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedDevice(device): AuthedDevice,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ConfirmResponse>, ApiError> {
    let body = body_or_413(&app, body)?;
    let ConfirmRequest { event } = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "bad_request",
            format!("the body is not a confirmation request: {e}"),
        )
    })?;
    let now = app.clock.now();
    if let Err((code, message)) = ingest::check_event(&event, &caller(&device), now) {
        let status = if code == cpis_protocol::ingest::codes::NOT_OWN_EVENT {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        };
        return Err(ApiError::new(status, code, message));
    }
    let today = now.date_naive();
    let national = app.store.national_lookup(event.nhs_number).await?;
    let mut flags: Vec<FlagView> = national
        .flags
        .into_iter()
        .filter(|(f, _)| f.end_date.is_none_or(|end| retained_until(end) >= today))
        .map(|(f, c)| FlagView {
            plan_type: f.plan_type,
            start_date: f.start_date,
            end_date: f.end_date,
            ended: f.is_ended(today),
            council: CouncilContact {
                ods: c.code,
                name: c.name,
                emergency_phone: c.emergency_phone,
                office_phone: c.office_phone,
            },
        })
        .collect();
    // Live flags first, then the most recent (as the agent shows them).
    flags.sort_by(|a, b| a.ended.cmp(&b.ended).then(b.start_date.cmp(&a.start_date)));
    let result = if flags.is_empty() {
        LookupResult::NotFlagged
    } else {
        LookupResult::Flagged
    };
    let mut plan_types: Vec<_> = flags.iter().map(|f| f.plan_type).collect();
    plan_types.sort();
    plan_types.dedup();
    let mut councils: Vec<_> = flags.iter().map(|f| f.council.ods.clone()).collect();
    councils.sort();
    councils.dedup();
    let event_id = event.event_id;
    let nhs_number = event.nhs_number;
    let answered = AccessEvent {
        result,
        plan_types,
        councils,
        data_as_of: Some(now),
        freshness: Freshness::Fresh,
        ..event
    };
    store_events(
        &app,
        &device,
        EventSource::Confirm,
        vec![answered],
        Vec::new(),
        now,
    )
    .await?;
    app.metrics
        .confirmations
        .get_or_create(&ConfirmLabels {
            result: result.as_str(),
        })
        .inc();
    tracing::info!(device = %device.id, event = %event_id, result = result.as_str(), "online confirmation");
    Ok(Json(ConfirmResponse {
        nhs_number,
        result,
        recent_contacts: if flags.is_empty() {
            Vec::new()
        } else {
            national.contacts
        },
        flags,
        checked_at: now,
        councils_covered: national.councils_covered,
        event_id,
    }))
}
