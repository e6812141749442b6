//! One error type for every endpoint, mapped once to a status and `{error:{code, message}}`.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cpis_protocol::api::{ErrorBody, codes};

use crate::feed::FeedError;
use crate::store::StoreError;

/// The `Retry-After` of a `503 database_unavailable`, in seconds.
pub(crate) const DATABASE_RETRY_SECS: u64 = 5;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(code, message),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorised(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORISED, message)
    }

    /// A council or trust admin token refused (`401`, with a code saying why).
    pub fn bearer_refused(refusal: crate::store::TokenRefusal) -> Self {
        use crate::store::TokenRefusal;
        let (code, message) = match refusal {
            TokenRefusal::Revoked => (
                codes::BEARER_REVOKED,
                "the token has been revoked; ask for a new one",
            ),
            TokenRefusal::Expired => (
                codes::BEARER_EXPIRED,
                "the token has expired; ask for a new one",
            ),
            TokenRefusal::Unknown | TokenRefusal::UsedUp => {
                (codes::UNAUTHORISED, "the token is not known")
            }
        };
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, codes::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::TOO_LARGE,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn overloaded(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::OVERLOADED,
                "the server is busy; try again after the Retry-After delay",
            )
        }
    }

    /// `429 rate_limited`: one device asks more often than its rate allows.
    pub fn rate_limited(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                codes::RATE_LIMITED,
                "this device is sending requests faster than its rate allows; try again after \
                 the Retry-After delay",
            )
        }
    }

    /// `503 database_unavailable`: the database cannot be reached now; try again shortly.
    pub fn database_unavailable(detail: &str) -> Self {
        tracing::warn!(%detail, "database unavailable; answered 503");
        Self {
            retry_after: Some(Duration::from_secs(DATABASE_RETRY_SECS)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::DATABASE_UNAVAILABLE,
                "the server cannot reach its database just now; nothing was changed. Send the \
                 request again after the Retry-After delay",
            )
        }
    }

    pub fn internal(what: &str, error: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error, "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}; the error has been logged"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Missing(what) => ApiError::not_found(format!("{what} does not exist")),
            StoreError::Unavailable(detail) => ApiError::database_unavailable(detail),
            _ => ApiError::internal("storage failed", &e),
        }
    }
}

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::Store(s) => s.into(),
            other => ApiError::internal("building the feed failed", &other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds).
            let secs = (after.as_secs() + u64::from(after.subsec_nanos() > 0))
                .max(1)
                .to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
