//! The server-rendered pages on the API's HTTPS listener: the council inbox and uploads
//! (`/council`, signed in with the council's token) and the trust fleet (`/fleet`, signed in
//! with a trust admin token). Plain HTML built from escaped strings, inline CSS, no scripts.
//!
//! Every response carries a strict Content-Security-Policy, `nosniff`, `Referrer-Policy: same-origin` and
//! `Cache-Control: no-store` (the pages hold personal data). Every POST is refused when it
//! comes from another site (`Sec-Fetch-Site` cross-site/same-site, or an `Origin` that is not
//! this host) or lacks the session's CSRF token (sign-in: the double-submit cookie's).
//! Sessions live in the store, shared by every replica ([`session`]).

// Handlers answer `Result<Response, Response>`: the error is the page to show, built once.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Form;
use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cpis_protocol::{CouncilCode, TrustCode};

use super::App;
use crate::store::{SessionKind, Store};
use html::{Notice, esc, layout};
use session::{Session, Sessions};

mod council;
mod fleet;
pub(crate) mod html;
pub(crate) mod session;

/// `Content-Security-Policy` of every page: nothing external, no scripts, forms only here.
pub(crate) const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; \
                              img-src 'self' data:; form-action 'self'; \
                              frame-ancestors 'none'; base-uri 'none'";

/// A council signed in to its inbox.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct CouncilUser {
    pub(crate) code: CouncilCode,
    pub(crate) name: String,
    /// The hash of the token signed in with: checked again on every request.
    pub(crate) token: [u8; 32],
}

/// A trust administrator signed in to the fleet page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct TrustUser {
    pub(crate) code: TrustCode,
    pub(crate) name: String,
    /// The hash of the token signed in with: checked again on every request.
    pub(crate) token: [u8; 32],
}

/// What the page handlers share.
#[derive(Debug)]
pub(crate) struct Pages<S> {
    pub(crate) app: Arc<App<S>>,
    pub(crate) sessions: Arc<PageSessions>,
}

/// The page sessions of both kinds; the shedder's credential check reads them too, so a
/// signed-in council or trust admin is served from the main pool, not the anonymous one.
#[derive(Debug)]
pub(crate) struct PageSessions {
    pub(crate) councils: Sessions<CouncilUser>,
    pub(crate) fleet: Sessions<TrustUser>,
}

impl PageSessions {
    pub(crate) fn new() -> Self {
        Self {
            councils: Sessions::new(SessionKind::Council),
            fleet: Sessions::new(SessionKind::Fleet),
        }
    }

    /// Whether the request carries the cookie of a live session of either kind (its token
    /// is checked again by the page itself). A store that cannot answer counts as no.
    pub(crate) async fn signed_in<S: Store>(
        &self,
        store: &S,
        headers: &HeaderMap,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        matches!(
            current(store, &self.councils, headers, council::SESSION_COOKIE, now).await,
            Ok(Some(_))
        ) || matches!(
            current(store, &self.fleet, headers, fleet::SESSION_COOKIE, now).await,
            Ok(Some(_))
        )
    }
}

/// The page routes, with their own state, to merge into the API router.
pub(crate) fn router<S: Store + Clone, T: Clone + Send + Sync + 'static>(
    app: Arc<App<S>>,
    sessions: Arc<PageSessions>,
) -> Router<T> {
    let pages = Arc::new(Pages { app, sessions });
    Router::new()
        .route("/council", get(council::sign_in_page::<S>))
        .route("/council/sign-in", post(council::sign_in::<S>))
        .route("/council/sign-out", post(council::sign_out::<S>))
        .route("/council/inbox", get(council::inbox::<S>))
        .route("/council/inbox/ack", post(council::ack::<S>))
        .route("/council/inbox.csv", get(council::export::<S>))
        .route("/council/uploads", get(council::uploads::<S>))
        .route("/fleet", get(fleet::sign_in_page::<S>))
        .route("/fleet/sign-in", post(fleet::sign_in::<S>))
        .route("/fleet/sign-out", post(fleet::sign_out::<S>))
        .route("/fleet/devices", get(fleet::devices::<S>))
        .route(
            "/fleet/devices/{id}/revoke",
            get(fleet::confirm_revoke::<S>).post(fleet::revoke::<S>),
        )
        .layer(middleware::map_response(security_headers))
        .with_state(pages)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`, not `no-referrer`: under `no-referrer` Chromium sends `Origin: null` on
    // the page's own form posts, which the same-origin check must refuse. Other sites still
    // get no referrer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

// ---- responses -----------------------------------------------------------------------------

/// An HTML page with a status.
pub(crate) fn html(status: StatusCode, page: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// `303 See Other` to `location`, with extra headers (cookies).
pub(crate) fn see_other(location: &str, cookies: &[String]) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            h.append(header::SET_COOKIE, v);
        }
    }
    response
}

/// A page that only says what went wrong, with a way back.
pub(crate) fn error_page(status: StatusCode, title: &str, message: &str, back: &str) -> Response {
    let body = format!("<p><a href=\"{}\">Go back</a></p>\n", esc(back));
    html(
        status,
        layout(title, None, Some(&Notice::Error(message.to_owned())), &body),
    )
}

/// The store failed: 500 (503 while the database cannot be reached), without internals.
pub(crate) fn store_failed(e: &crate::store::StoreError, back: &str) -> Response {
    if let crate::store::StoreError::Unavailable(detail) = e {
        tracing::warn!(%detail, "page: the database is unavailable");
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service briefly unavailable",
            "The server cannot reach its database just now. Nothing was changed. Try again in \
             a minute; if it keeps happening, tell the service desk.",
            back,
        );
    }
    tracing::error!(error = %e, "page: store operation failed");
    error_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The server could not read or save this just now. Nothing was changed. Try again in a \
         minute; if it keeps happening, tell the service desk.",
        back,
    )
}

// ---- cookies -------------------------------------------------------------------------------

/// The value of a cookie sent with the request.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
}

/// A `Set-Cookie` value: HttpOnly, Secure, SameSite=Strict, scoped to `path`.
pub(crate) fn set_cookie(name: &str, value: &str, path: &str, max_age_secs: i64) -> String {
    format!(
        "{name}={value}; HttpOnly; Secure; SameSite=Strict; Path={path}; Max-Age={max_age_secs}"
    )
}

/// The session named by the cookie, if it is live.
pub(crate) async fn current<S: Store, T: serde::Serialize + serde::de::DeserializeOwned>(
    store: &S,
    sessions: &Sessions<T>,
    headers: &HeaderMap,
    cookie_name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<(String, Session<T>)>, crate::store::StoreError> {
    let Some(id) = cookie(headers, cookie_name) else {
        return Ok(None);
    };
    Ok(sessions.get(store, &id, now).await?.map(|s| (id, s)))
}

// ---- cross-site checks ---------------------------------------------------------------------

/// Refuses a request sent by another site: `Sec-Fetch-Site` of `cross-site` or `same-site`,
/// or an `Origin` other than `https://` + this request's host.
pub(crate) fn same_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), &'static str> {
    // Every copy of a header is checked: a second one must not hide a cross-site first.
    for site in headers.get_all("sec-fetch-site") {
        let site = site.to_str().unwrap_or("cross-site").trim();
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return Err("the form was sent from another site");
        }
    }
    for origin in headers.get_all(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("").trim();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| uri.authority().map(|a| a.as_str().to_owned()));
        let Some(host) = host else {
            return Err("the request names no host to check its origin against");
        };
        let expected = format!("https://{}", host.trim());
        if !origin.eq_ignore_ascii_case(&expected) {
            return Err("the form was sent from another site");
        }
    }
    Ok(())
}

/// The `403` page of a refused cross-site or token-less POST; nothing was changed.
pub(crate) fn forbidden_post(why: &str, back: &str) -> Response {
    error_page(
        StatusCode::FORBIDDEN,
        "Request refused",
        &format!(
            "This request was refused because {why}. Nothing was changed. Go back, reload the \
             page and try again."
        ),
        back,
    )
}

// ---- forms ---------------------------------------------------------------------------------

/// A POSTed form's fields, in order (repeated names kept).
pub(crate) type Fields = Vec<(String, String)>;

/// The form, or a `400` page.
pub(crate) fn form(
    form: Result<Form<Fields>, FormRejection>,
    back: &str,
) -> Result<Fields, Response> {
    form.map(|Form(f)| f).map_err(|e| {
        error_page(
            StatusCode::BAD_REQUEST,
            "Form not understood",
            &format!(
                "The form could not be read ({}). Nothing was changed.",
                e.body_text()
            ),
            back,
        )
    })
}

/// The first value of a field.
pub(crate) fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Checks a POST: same origin and the session's CSRF token in the `csrf` field.
pub(crate) fn check_post(
    headers: &HeaderMap,
    uri: &Uri,
    fields: &Fields,
    csrf: &str,
    back: &str,
) -> Result<(), Response> {
    same_origin(headers, uri).map_err(|why| forbidden_post(why, back))?;
    let sent = field(fields, "csrf").unwrap_or("");
    if !session::same_secret(sent, csrf) {
        return Err(forbidden_post(
            "the form's security token was missing or out of date",
            back,
        ));
    }
    Ok(())
}

// ---- sign-in -------------------------------------------------------------------------------

/// What differs between the council and the fleet sign-in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignIn {
    /// `/council` or `/fleet`.
    pub(crate) base: &'static str,
    /// The page's title.
    pub(crate) title: &'static str,
    /// The token field's label.
    pub(crate) label: &'static str,
    /// Help under the label.
    pub(crate) hint: &'static str,
    /// Session cookie name.
    pub(crate) cookie: &'static str,
    /// The sign-in form's double-submit CSRF cookie name.
    pub(crate) csrf_cookie: &'static str,
}

impl SignIn {
    /// The sign-in page with `status` and an optional message; sets the double-submit cookie
    /// when the visitor has none.
    pub(crate) fn page(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        notice: Option<Notice>,
    ) -> Response {
        let existing = cookie(headers, self.csrf_cookie).filter(|v| v.len() == 43);
        let (csrf, set) = match existing {
            Some(v) => (v, None),
            None => {
                let v = session::random_token();
                let c = set_cookie(
                    self.csrf_cookie,
                    &v,
                    self.base,
                    session::SESSION_HOURS * 3600,
                );
                (v, Some(c))
            }
        };
        let body = format!(
            "<form id=\"sign-in\" method=\"post\" action=\"{base}/sign-in\">\n\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
             <label for=\"token\">{label}</label>\n\
             <p class=\"muted\" id=\"token-hint\">{hint}</p>\n\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" \
             aria-describedby=\"token-hint\" required spellcheck=\"false\">\n\
             <p><button type=\"submit\">Sign in</button></p>\n</form>\n\
             <p class=\"muted\">You stay signed in for {hours} hours on this browser, or until you \
             sign out. A server restart signs everyone out.</p>\n",
            base = self.base,
            csrf = esc(&csrf),
            label = esc(self.label),
            hint = esc(self.hint),
            hours = session::SESSION_HOURS,
        );
        let mut response = html(status, layout(self.title, None, notice.as_ref(), &body));
        if let Some(c) = set.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
        response
    }

    /// Checks a sign-in POST (same origin, double-submit token) and returns the token typed,
    /// or the page to answer.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        fields: &Fields,
    ) -> Result<String, Response> {
        let expected = cookie(headers, self.csrf_cookie).unwrap_or_default();
        check_post(headers, uri, fields, &expected, self.base)?;
        let token = field(fields, "token").unwrap_or("").trim().to_owned();
        if token.is_empty() {
            return Err(self.page(
                headers,
                StatusCode::BAD_REQUEST,
                Some(Notice::Error("Enter your token.".into())),
            ));
        }
        Ok(token)
    }

    /// The answer to a token that matched nothing.
    pub(crate) fn refused(&self, headers: &HeaderMap) -> Response {
        self.page(
            headers,
            StatusCode::UNAUTHORIZED,
            Some(Notice::Error(
                "That token was not accepted. Check you copied all of it and try again.".into(),
            )),
        )
    }

    /// Starts a session: the cookie and `303` to `next`.
    pub(crate) fn signed_in(&self, id: &str, next: &str) -> Response {
        see_other(
            next,
            &[set_cookie(
                self.cookie,
                id,
                self.base,
                session::SESSION_HOURS * 3600,
            )],
        )
    }

    /// Ends a session: the cookie cleared and `303` to the sign-in page.
    pub(crate) fn signed_out(&self) -> Response {
        see_other(self.base, &[set_cookie(self.cookie, "", self.base, 0)])
    }
}
