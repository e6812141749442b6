//! The paramedic page on the agent's loopback listener: `GET /` shows the data's freshness
//! (always), the notices waiting to be sent, and either the staff-id form (once per shift)
//! or the NHS number form; `POST /lookup` answers with a large FLAGGED / NOT FLAGGED /
//! UNKNOWN result (or the reason the number is not valid) through the very same recorded
//! lookup as `POST /v1/lookups` ([`crate::api::recorded_lookup`]). `POST /shift` and
//! `POST /shift/end` set and clear the `cpis_staff` cookie.
//!
//! Server-rendered HTML (see [`render`]), no script, no external asset. Every request must
//! name a loopback host ([`host_check`]); every POST must come from this page (`Sec-Fetch-Site`,
//! `Origin`, CSRF token: [`guard`]); every page carries a strict Content-Security-Policy,
//! `nosniff`, `Referrer-Policy: same-origin` and `no-store` (pages hold personal data). The NHS number only
//! travels in a POST body, never in a URL.

mod guard;
mod render;

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, map_response};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;

use cpis_protocol::api::ErrorBody;
use cpis_protocol::local::LookupRequest;
use cpis_protocol::{NhsNumber, NhsNumberError};

pub use guard::PageKeys;
pub(crate) use guard::same_origin;

use crate::api::{HttpError, Shared, blocking, recorded_lookup};
use guard::{CSRF_COOKIE, Refused, SHIFT_SECS, STAFF_COOKIE};
use render::{Shown, View};

/// The Content-Security-Policy of every page.
pub const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Largest form body accepted.
const FORM_LIMIT: usize = 16 * 1024;

/// The page's routes (state: the listener's shared state).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(index))
        .route("/shift", get(to_index).post(start_shift))
        .route("/shift/end", get(to_index).post(end_shift))
        .route("/lookup", get(to_index).post(lookup))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(map_response(page_headers))
}

fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &'static str) {
    headers.insert(name, HeaderValue::from_static(value));
}

/// Headers of every page.
pub(crate) async fn page_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // `same-origin`, not `no-referrer`: under `no-referrer` Chromium sends `Origin: null` on
    // the page's own form posts, which the same-origin check must refuse. Other sites still get
    // no referrer.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    resp
}

/// Headers of every JSON API answer (they may hold personal data too).
pub(crate) async fn api_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::CACHE_CONTROL, "no-store");
    resp
}

/// Refuses (421) any request not addressed to a loopback name with the listen port: a page
/// whose DNS name was rebound to 127.0.0.1 sends its own name as `Host`.
pub(crate) async fn host_check(
    State(port): State<Option<u16>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req.headers().get(header::HOST).map(|h| h.to_str().ok());
    let authority = req.uri().authority().map(|a| a.as_str());
    let ok = match (host, authority) {
        (None, None) => false,
        (Some(h), a) => guard::host_ok(h, port) && a.is_none_or(|a| guard::host_ok(Some(a), port)),
        (None, Some(a)) => guard::host_ok(Some(a), port),
    };
    if ok {
        return next.run(req).await;
    }
    let what = match port {
        Some(p) => format!("127.0.0.1:{p} or localhost:{p}"),
        None => "127.0.0.1 or localhost".into(),
    };
    let message = format!(
        "This agent answers only requests addressed to {what}; a page under another name \
         cannot use it."
    );
    if req.uri().path().starts_with("/v1/") {
        return api_headers(
            HttpError::new(
                StatusCode::MISDIRECTED_REQUEST,
                ErrorBody::new("bad_host", message),
            )
            .into_response(),
        )
        .await;
    }
    let mut h = render::Html::default();
    h.raw("<!DOCTYPE html>\n<html lang=\"en-GB\"><head><meta charset=\"utf-8\"><title>Wrong address – CP-IS Edge</title></head><body><main><h1>Wrong address</h1><p role=\"alert\">")
        .text(&message)
        .raw("</p></main></body></html>\n");
    page_headers(
        (
            StatusCode::MISDIRECTED_REQUEST,
            axum::response::Html(h.finish()),
        )
            .into_response(),
    )
    .await
}

async fn to_index() -> Redirect {
    Redirect::to("/")
}

/// The CSRF token for this visitor: theirs when it verifies, else a new one (to be set).
fn csrf_for(keys: &PageKeys, headers: &HeaderMap) -> (String, bool) {
    match guard::cookie(headers, CSRF_COOKIE) {
        Some(c) if keys.valid(c) => (c.to_owned(), false),
        _ => (keys.issue(), true),
    }
}

fn staff_of(headers: &HeaderMap) -> Option<String> {
    guard::cookie(headers, STAFF_COOKIE).and_then(|v| guard::staff_id(v).ok())
}

async fn status_of(s: &Shared) -> Result<cpis_protocol::local::StatusResponse, String> {
    let agent = s.agent.clone();
    blocking(move || agent.status())
        .await
        .map_err(|e| match e.body().error.code.as_str() {
            "not_enrolled" => "this tablet is not enrolled, or its data was shredded \
                               (revoked or wiped). Tell trust IT."
                .to_string(),
            _ => format!(
                "the tablet's data could not be read: {}",
                e.body().error.message
            ),
        })
}

fn cookie_header(value: String) -> Option<HeaderValue> {
    HeaderValue::from_str(&value).ok()
}

/// A page answer: the view rendered, with the CSRF cookie when it is new.
async fn respond(s: &Shared, code: StatusCode, headers: &HeaderMap, mut view: View) -> Response {
    let (csrf, new) = csrf_for(&s.page, headers);
    view.csrf = csrf;
    if view.status.is_none() {
        view.status = Some(status_of(s).await);
    }
    let mut code = code;
    if let Some(Err(why)) = &view.status {
        // Not enrolled or shredded: nothing can be checked, and the page says why.
        if view.problem.is_none() {
            view.problem = Some(format!("Checks are not possible: {why}"));
        }
        if code.is_success() {
            code = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let mut resp = (code, axum::response::Html(render::page(&view))).into_response();
    if new
        && let Some(v) = cookie_header(format!(
            "{CSRF_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
            view.csrf
        ))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn index(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let view = View {
        staff: staff_of(&headers),
        ..View::default()
    };
    respond(&s, StatusCode::OK, &headers, view).await
}

/// Refuses a POST another site may have sent, or one without this page's token.
async fn refuse(s: &Shared, headers: &HeaderMap, why: Refused) -> Response {
    let problem = match why {
        Refused::CrossSite => {
            "This request came from another site or page and was refused. Nothing was \
             looked up or changed."
        }
        Refused::Csrf => {
            "This form had expired (for example the agent restarted) or did not come from \
             this page, so it was refused. Nothing was looked up or changed: please try again."
        }
    };
    let view = View {
        staff: staff_of(headers),
        problem: Some(problem.into()),
        ..View::default()
    };
    respond(s, StatusCode::FORBIDDEN, headers, view).await
}

async fn bad_form(s: &Shared, headers: &HeaderMap, e: &FormRejection) -> Response {
    let view = View {
        staff: staff_of(headers),
        problem: Some(format!(
            "The form could not be read ({}). Nothing was looked up or changed.",
            e.body_text()
        )),
        ..View::default()
    };
    respond(s, e.status(), headers, view).await
}

/// A posted form and its CSRF token.
trait Posted {
    fn csrf(&self) -> &str;
}

/// The checks every form post passes before anything is done: the same-origin check, a
/// readable form, then its CSRF token. The refusal page otherwise.
async fn checked<T: Posted>(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    form: Result<Form<T>, FormRejection>,
) -> Result<T, Response> {
    if let Err(why) = guard::same_origin(headers) {
        return Err(refuse(s, headers, why).await);
    }
    let Form(form) = match form {
        Ok(f) => f,
        Err(e) => return Err(bad_form(s, headers, &e).await),
    };
    if let Err(why) = guard::csrf_ok(&s.page, headers, form.csrf()) {
        return Err(refuse(s, headers, why).await);
    }
    Ok(form)
}

impl Posted for ShiftForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

impl Posted for TokenForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

impl Posted for LookupForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

#[derive(Debug, Deserialize)]
struct ShiftForm {
    #[serde(default)]
    staff_id: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
struct TokenForm {
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
struct LookupForm {
    #[serde(default)]
    nhs_number: String,
    #[serde(default)]
    incident_ref: String,
    #[serde(default)]
    csrf: String,
}

async fn start_shift(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<ShiftForm>, FormRejection>,
) -> Response {
    let form = match checked(&s, &headers, form).await {
        Ok(f) => f,
        Err(refused) => return refused,
    };
    match guard::staff_id(&form.staff_id) {
        Ok(id) => {
            let mut resp = Redirect::to("/").into_response();
            if let Some(v) = cookie_header(format!(
                "{STAFF_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SHIFT_SECS}"
            )) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            resp
        }
        Err(problem) => {
            let view = View {
                problem: Some(problem),
                staff_value: form.staff_id,
                staff_invalid: true,
                ..View::default()
            };
            respond(&s, StatusCode::BAD_REQUEST, &headers, view).await
        }
    }
}

async fn end_shift(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    if let Err(refused) = checked(&s, &headers, form).await {
        return refused;
    }
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("cpis_staff=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    resp
}

/// Why a typed NHS number is not valid, in words a tired person acts on. The expected check
/// digit is deliberately not given: "correcting" the last digit could name another child.
fn nhs_reason(e: &NhsNumberError) -> String {
    match e {
        NhsNumberError::Empty => "Type the 10-digit NHS number.".into(),
        NhsNumberError::NonDigit { found, position } => {
            format!("An NHS number is digits only: character {position} is “{found}”.")
        }
        NhsNumberError::WrongLength { found } => {
            format!("An NHS number has 10 digits; this one has {found}.")
        }
        NhsNumberError::BadGrouping => "The spaces or dashes are in the wrong places: type it as \
                                        943 476 5919, 943-476-5919 or 9434765919."
            .into(),
        NhsNumberError::CheckValueTen | NhsNumberError::CheckDigitMismatch { .. } => {
            "Wrong check digit: this is not a valid NHS number. One of the digits is probably \
             mistyped; check each digit against the source."
                .into()
        }
    }
}

async fn lookup(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<LookupForm>, FormRejection>,
) -> Response {
    let form = match checked(&s, &headers, form).await {
        Ok(f) => f,
        Err(refused) => return refused,
    };
    let Some(staff) = staff_of(&headers) else {
        let view = View {
            problem: Some(
                "Enter your staff id before checking an NHS number. Nothing was looked up.".into(),
            ),
            ..View::default()
        };
        return respond(&s, StatusCode::BAD_REQUEST, &headers, view).await;
    };
    let incident_ref = match guard::incident_ref(&form.incident_ref) {
        Ok(r) => r,
        Err(problem) => {
            let view = View {
                staff: Some(staff),
                problem: Some(format!("{problem} Nothing was looked up.")),
                nhs_value: form.nhs_number,
                incident_value: form.incident_ref,
                incident_invalid: true,
                ..View::default()
            };
            return respond(&s, StatusCode::BAD_REQUEST, &headers, view).await;
        }
    };
    let nhs: NhsNumber = match form.nhs_number.parse() {
        Ok(n) => n,
        Err(e) => {
            let view = View {
                staff: Some(staff),
                shown: Some(Shown::Invalid(nhs_reason(&e))),
                nhs_value: form.nhs_number,
                incident_value: form.incident_ref,
                ..View::default()
            };
            return respond(&s, StatusCode::BAD_REQUEST, &headers, view).await;
        }
    };
    let req = LookupRequest {
        nhs_number: nhs.to_string(),
        staff_id: Some(staff.clone()),
        incident_ref,
    };
    match recorded_lookup(&s, req).await {
        Ok(answer) => {
            let view = View {
                staff: Some(staff),
                shown: Some(Shown::Answer(Box::new(answer))),
                ..View::default()
            };
            respond(&s, StatusCode::OK, &headers, view).await
        }
        Err(e) => {
            let view = View {
                staff: Some(staff),
                problem: Some(format!(
                    "The check could not be done: {}",
                    e.body().error.message
                )),
                nhs_value: form.nhs_number,
                incident_value: form.incident_ref,
                ..View::default()
            };
            respond(&s, e.status(), &headers, view).await
        }
    }
}
