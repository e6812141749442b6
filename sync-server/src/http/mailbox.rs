//! The council mailbox (bearer token; `{ods}` must be the token's council): list
//! unacknowledged access notifications with an opaque cursor, and acknowledge them.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cpis_protocol::mailbox::{
    AckRequest, AckResponse, DEFAULT_LIMIT, MAX_LIMIT, NotificationId, NotificationPage,
};
use serde::Deserialize;

use super::council::AuthedCouncil;
use super::{ApiError, App};
use crate::store::Store;

/// Cursor text: a version tag and the last notification id seen, base64url.
const CURSOR_TAG: &[u8] = b"n1";

fn encode_cursor(last: NotificationId) -> String {
    let mut raw = CURSOR_TAG.to_vec();
    raw.extend_from_slice(&last.get().to_be_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Option<u64> {
    let raw = URL_SAFE_NO_PAD.decode(cursor.trim()).ok()?;
    let id = raw.strip_prefix(CURSOR_TAG)?;
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/councils/{ods}/notifications?after=CURSOR&limit=N`.
pub(crate) async fn list<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedCouncil(council): AuthedCouncil,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<NotificationPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    let after = match q.after.as_deref() {
        None | Some("") => 0,
        Some(c) => decode_cursor(c).ok_or_else(|| {
            ApiError::bad_request(
                "bad_cursor",
                "after must be a `next` cursor from an earlier page",
            )
        })?,
    };
    let mut notifications = app
        .store
        .list_notifications(council, after, limit + 1, app.clock.now())
        .await?;
    let more = notifications.len() > limit as usize;
    notifications.truncate(limit as usize);
    let next = if more {
        notifications.last().map(|n| encode_cursor(n.id))
    } else {
        None
    };
    Ok(Json(NotificationPage {
        notifications,
        next,
    }))
}

/// `POST /v1/councils/{ods}/notifications/ack` `{ids:[...]}` → `{acknowledged:N}`.
pub(crate) async fn ack<S: Store>(
    State(app): State<Arc<App<S>>>,
    AuthedCouncil(council): AuthedCouncil,
    body: Result<Json<AckRequest>, JsonRejection>,
) -> Result<Json<AckResponse>, ApiError> {
    let Json(request) = body.map_err(|e| ApiError::bad_request("bad_request", e.body_text()))?;
    if request.ids.len() > MAX_LIMIT as usize {
        return Err(ApiError::bad_request(
            "too_many_ids",
            format!("acknowledge at most {MAX_LIMIT} ids at a time"),
        ));
    }
    let acknowledged = if request.ids.is_empty() {
        0
    } else {
        app.store
            .acknowledge_notifications(council.clone(), request.ids, app.clock.now())
            .await?
    };
    app.metrics.notifications_acknowledged.inc_by(acknowledged);
    tracing::info!(%council, acknowledged, "notifications acknowledged");
    Ok(Json(AckResponse { acknowledged }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_junk() {
        let id = NotificationId::try_from(12_345).unwrap();
        assert_eq!(decode_cursor(&encode_cursor(id)), Some(12_345));
        assert_eq!(decode_cursor("12345"), None);
        assert_eq!(decode_cursor("!!"), None);
    }
}
