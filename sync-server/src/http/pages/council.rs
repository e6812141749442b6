//! The council pages: sign in with the council's token, the inbox of unacknowledged access
//! notifications (filter by date, overdue marked, acknowledge one or many through the same
//! store call as the API), its CSV export, and the recent upload attempts.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use cpis_protocol::mailbox::{MAX_LIMIT, Notification, NotificationId};
use cpis_protocol::{CareSetting, EventId};

use super::html::{ICON_CLOCK, Nav, Notice, esc, layout, query_value, time};
use super::session::Session;
use super::{
    CouncilUser, Fields, Pages, SignIn, check_post, current, form, html, see_other, store_failed,
};
use crate::fleet::format_age;
use crate::store::{AttemptOutcome, MAX_UPLOAD_ATTEMPTS, Store};
use crate::tokens;

/// The council inbox page session's cookie.
pub(crate) const SESSION_COOKIE: &str = "cpis_council";

const SIGN_IN: SignIn = SignIn {
    base: "/council",
    title: "Council sign in",
    label: "Council token",
    hint: "The council's token (it starts cpis_ct_), as given by the CP-IS Edge administrator.",
    cookie: SESSION_COOKIE,
    csrf_cookie: "cpis_council_csrf",
};

/// Most notices shown on the inbox page (the CSV export has them all).
pub(crate) const MAX_SHOWN: usize = 500;
/// Most notices read for the page, the export or an acknowledgement.
const MAX_READ: usize = 100_000;

type PageResult = Result<Response, Response>;

fn now<S: Store>(pages: &Pages<S>) -> DateTime<Utc> {
    pages.app.clock.now()
}

/// The signed-in council, or `303` to the sign-in page.
async fn signed_in<S: Store>(
    pages: &Pages<S>,
    headers: &HeaderMap,
) -> Result<Session<CouncilUser>, Response> {
    signed_in_with_id(pages, headers).await.map(|(_, s)| s)
}

/// The session's id and the session, or `303` to the sign-in page. The token it was signed
/// in with is checked again on every request, so revoking it (`admin ... revoke-tokens`, from
/// any process) or its expiry signs the session out at once.
async fn signed_in_with_id<S: Store>(
    pages: &Pages<S>,
    headers: &HeaderMap,
) -> Result<(String, Session<CouncilUser>), Response> {
    let (id, session) = current(
        &pages.app.store,
        &pages.sessions.councils,
        headers,
        SIGN_IN.cookie,
        now(pages),
    )
    .await
    .map_err(|e| store_failed(&e, SIGN_IN.base))?
    .ok_or_else(|| see_other(SIGN_IN.base, &[]))?;
    let still = pages
        .app
        .store
        .council_for_token(session.who.token, now(pages))
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    if still.as_ref().ok() != Some(&session.who.code) {
        tracing::info!(who = %session.who.code, "page session ended: its token was revoked or expired");
        pages
            .sessions
            .councils
            .remove(&pages.app.store, &id)
            .await
            .map_err(|e| store_failed(&e, SIGN_IN.base))?;
        return Err(see_other(SIGN_IN.base, &[]));
    }
    Ok((id, session))
}

fn nav<'a>(session: &'a Session<CouncilUser>, here: &str) -> Nav<'a> {
    Nav {
        who: format!("{} ({})", session.who.name, session.who.code),
        links: vec![
            ("/council/inbox", "Inbox", here == "inbox"),
            ("/council/uploads", "Uploads", here == "uploads"),
        ],
        sign_out: "/council/sign-out",
        csrf: &session.csrf,
    }
}

/// `GET /council`: the sign-in form (signed in already: the inbox).
pub(crate) async fn sign_in_page<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
) -> Response {
    if signed_in(&pages, &headers).await.is_ok() {
        return see_other("/council/inbox", &[]);
    }
    SIGN_IN.page(&headers, StatusCode::OK, None)
}

/// `POST /council/sign-in` (`token`, `csrf`).
pub(crate) async fn sign_in<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let fields = form(body, SIGN_IN.base)?;
    let token = SIGN_IN.check(&headers, &uri, &fields)?;
    let app = &pages.app;
    let hash = tokens::hash(&token);
    let council = app
        .store
        .council_for_token(hash, now(&pages))
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    let Ok(code) = council else {
        tracing::info!(refusal = ?council, "council page sign-in refused");
        return Err(SIGN_IN.refused(&headers));
    };
    let councils = app
        .store
        .councils()
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    let name = councils
        .into_iter()
        .find(|c| c.code == code)
        .map_or_else(|| code.to_string(), |c| c.name);
    tracing::info!(council = %code, "council signed in to the inbox page");
    let (id, _) = pages
        .sessions
        .councils
        .create(
            &pages.app.store,
            CouncilUser {
                code,
                name,
                token: hash,
            },
            now(&pages),
        )
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    Ok(SIGN_IN.signed_in(&id, "/council/inbox"))
}

/// `POST /council/sign-out` (`csrf`).
pub(crate) async fn sign_out<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let Some((id, session)) = current(
        &pages.app.store,
        &pages.sessions.councils,
        &headers,
        SIGN_IN.cookie,
        now(&pages),
    )
    .await
    .map_err(|e| store_failed(&e, SIGN_IN.base))?
    else {
        return Ok(SIGN_IN.signed_out());
    };
    let fields = form(body, "/council/inbox")?;
    check_post(&headers, &uri, &fields, &session.csrf, "/council/inbox")?;
    pages
        .sessions
        .councils
        .remove(&pages.app.store, &id)
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    Ok(SIGN_IN.signed_out())
}

// ---- the inbox -----------------------------------------------------------------------------

/// The inbox's date filter (received date, UTC, both ends included).
#[derive(Debug, Clone, Default)]
struct Filter {
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    /// As typed, to show back.
    from_text: String,
    to_text: String,
}

impl Filter {
    fn parse(fields: &[(String, String)]) -> Result<Filter, (Filter, String)> {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        let mut filter = Filter {
            from_text: get("from"),
            to_text: get("to"),
            ..Filter::default()
        };
        let date = |text: &str, what: &str| -> Result<Option<NaiveDate>, String> {
            if text.is_empty() {
                return Ok(None);
            }
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| {
                    format!(
                        "The {what} date \"{text}\" is not a date: use YYYY-MM-DD, e.g. 2025-06-01."
                    )
                })
        };
        match date(&filter.from_text, "from")
            .and_then(|from| Ok((from, date(&filter.to_text, "to")?)))
        {
            Ok((from, to)) => {
                if let (Some(f), Some(t)) = (from, to)
                    && f > t
                {
                    return Err((filter, "The from date is after the to date.".to_owned()));
                }
                filter.from = from;
                filter.to = to;
                Ok(filter)
            }
            Err(message) => Err((filter, message)),
        }
    }

    fn keeps(&self, n: &Notification) -> bool {
        let day = n.received_at.date_naive();
        self.from.is_none_or(|f| day >= f) && self.to.is_none_or(|t| day <= t)
    }

    fn active(&self) -> bool {
        self.from.is_some() || self.to.is_some()
    }

    /// `from=..&to=..` (the dates as typed), for links.
    fn query(&self) -> String {
        format!(
            "from={}&to={}",
            query_value(&self.from_text),
            query_value(&self.to_text)
        )
    }
}

/// Every unacknowledged notification of the council (up to [`MAX_READ`]), newest first.
async fn unacknowledged<S: Store>(
    pages: &Pages<S>,
    council: &cpis_protocol::CouncilCode,
) -> Result<Vec<Notification>, crate::store::StoreError> {
    let app = &pages.app;
    let now = app.clock.now();
    let mut all: Vec<Notification> = Vec::new();
    let mut after = 0u64;
    loop {
        let page = app
            .store
            .list_notifications(council.clone(), after, MAX_LIMIT, now)
            .await?;
        let full = page.len() == MAX_LIMIT as usize;
        if let Some(last) = page.last() {
            after = last.id.get();
        }
        all.extend(page);
        if !full || all.len() >= MAX_READ {
            break;
        }
    }
    all.reverse();
    Ok(all)
}

fn overdue_after<S>(pages: &Pages<S>) -> Duration {
    Duration::hours(
        i64::try_from(pages.app.config.council_overdue_hours).unwrap_or(i64::MAX / 3600 / 2),
    )
}

fn setting_words(s: CareSetting) -> &'static str {
    match s {
        CareSetting::Ambulance => "ambulance",
        CareSetting::EmergencyDepartment => "emergency department",
        CareSetting::UrgentTreatmentCentre => "urgent treatment centre",
        CareSetting::Other => "other setting",
    }
}

fn plan_words(n: &Notification) -> String {
    n.plan_types
        .iter()
        .map(|p| format!("{} ({})", p.as_str(), p.description()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn contacts_html(n: &Notification) -> String {
    if n.recent_contacts.is_empty() {
        return "<span class=\"muted\">No recent contacts recorded</span>".to_owned();
    }
    let mut out = String::from("<ul class=\"plain\">");
    for c in &n.recent_contacts {
        let _ = write!(
            out,
            "<li><time datetime=\"{d}\">{d}</time>: {} ({}), {}</li>",
            esc(&c.organisation.name),
            esc(c.organisation.ods.as_str()),
            setting_words(c.setting),
            d = c.date.format("%Y-%m-%d"),
        );
    }
    out.push_str("</ul>");
    out
}

fn row_html(n: &Notification, now: DateTime<Utc>, overdue_after: Duration) -> String {
    let waited = now - n.received_at;
    let overdue = waited > overdue_after;
    let event = esc(&n.event_id.to_string());
    let nhs = esc(&n.nhs_number.spaced());
    let mut seen_by = format!(
        "{} ({})",
        esc(&n.organisation.name),
        esc(n.organisation.ods.as_str())
    );
    let _ = write!(
        seen_by,
        "<br><span class=\"muted\">{}",
        setting_words(n.setting)
    );
    if let Some(staff) = &n.staff_id {
        let _ = write!(seen_by, ", staff {}", esc(staff));
    }
    if let Some(incident) = &n.incident_ref {
        let _ = write!(seen_by, ", incident {}", esc(incident));
    }
    seen_by.push_str("</span>");
    let accessed = if n.clock_suspect {
        format!(
            "{} <span class=\"tag warn\">tablet clock wrong</span>",
            time(n.accessed_at)
        )
    } else {
        time(n.accessed_at)
    };
    let status = if overdue {
        format!(
            "<span class=\"tag overdue\">{ICON_CLOCK} Overdue</span><br><span class=\"muted\">waiting {}</span>",
            format_age(waited)
        )
    } else {
        format!("Waiting {}", format_age(waited))
    };
    format!(
        "<tr data-event-id=\"{event}\"{class}>\
         <td><input type=\"checkbox\" name=\"event_id\" value=\"{event}\" id=\"select-{event}\">\
         <label class=\"visually-hidden\" for=\"select-{event}\">Select the notice about NHS number {nhs}</label></td>\
         <td class=\"nhs\">{nhs}</td><td>{plans}</td><td>{seen_by}</td><td>{accessed}</td>\
         <td>{received}</td><td>{status}</td><td>{contacts}</td></tr>\n",
        class = if overdue { " class=\"overdue\"" } else { "" },
        plans = esc(&plan_words(n)),
        received = time(n.received_at),
        contacts = contacts_html(n),
    )
}

/// The inbox page (filter, table, acknowledge form) with a status and message.
async fn inbox_page<S: Store>(
    pages: &Pages<S>,
    session: &Session<CouncilUser>,
    filter: &Filter,
    status: StatusCode,
    notice: Option<Notice>,
    list: bool,
) -> PageResult {
    let now = now(pages);
    let overdue_after = overdue_after(pages);
    let mut body = format!(
        "<form id=\"filter\" method=\"get\" action=\"/council/inbox\">\n\
         <fieldset><legend>Show notices received between (dates in UTC)</legend>\n<div class=\"row\">\
         <div><label for=\"from\">From (YYYY-MM-DD)</label>\
         <input id=\"from\" name=\"from\" type=\"text\" autocomplete=\"off\" value=\"{}\"></div>\
         <div><label for=\"to\">To (YYYY-MM-DD)</label>\
         <input id=\"to\" name=\"to\" type=\"text\" autocomplete=\"off\" value=\"{}\"></div>\
         <div><button type=\"submit\" class=\"secondary\">Filter</button> \
         <a href=\"/council/inbox\">Clear dates</a></div></div></fieldset>\n</form>\n",
        esc(&filter.from_text),
        esc(&filter.to_text)
    );
    let _ = writeln!(
        body,
        "<p class=\"actions\"><a id=\"export\" href=\"{}\" download>Export these notices as CSV</a>\
         <span class=\"muted\">Notices waiting more than {} are marked Overdue.</span></p>",
        esc(&format!("/council/inbox.csv?{}", filter.query())),
        format_age(overdue_after)
    );
    if list {
        let all = unacknowledged(pages, &session.who.code)
            .await
            .map_err(|e| store_failed(&e, "/council/inbox"))?;
        let notices: Vec<&Notification> = all.iter().filter(|n| filter.keeps(n)).collect();
        if notices.is_empty() {
            let words = if filter.active() {
                "No notices waiting for these dates."
            } else {
                "No notices waiting."
            };
            let _ = writeln!(body, "<p id=\"empty\">{words}</p>");
        } else {
            let overdue = notices
                .iter()
                .filter(|n| now - n.received_at > overdue_after)
                .count();
            let _ = writeln!(
                body,
                "<p id=\"summary\">{} notice{} waiting to be acknowledged, {} overdue.</p>",
                notices.len(),
                if notices.len() == 1 { "" } else { "s" },
                overdue
            );
            if notices.len() > MAX_SHOWN {
                let _ = writeln!(
                    body,
                    "<p>Showing the newest {MAX_SHOWN}. Narrow the dates or export the CSV to see them all.</p>"
                );
            }
            let _ = writeln!(
                body,
                "<form id=\"ack\" method=\"post\" action=\"/council/inbox/ack\">\n\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"from\" value=\"{}\">\
                 <input type=\"hidden\" name=\"to\" value=\"{}\">\n\
                 <div class=\"table-wrap\"><table id=\"notices\">\n\
                 <caption>Unacknowledged notices, newest first</caption>\n\
                 <thead><tr><th scope=\"col\">Select</th><th scope=\"col\">NHS number</th>\
                 <th scope=\"col\">Plan</th><th scope=\"col\">Seen by</th>\
                 <th scope=\"col\">Accessed</th><th scope=\"col\">Received</th>\
                 <th scope=\"col\">Status</th><th scope=\"col\">Recent contacts</th></tr></thead>\n<tbody>",
                esc(&session.csrf),
                esc(&filter.from_text),
                esc(&filter.to_text)
            );
            for n in notices.iter().take(MAX_SHOWN) {
                body.push_str(&row_html(n, now, overdue_after));
            }
            body.push_str(
                "</tbody></table></div>\n<p><button type=\"submit\" id=\"ack-selected\">\
                 Acknowledge selected</button></p>\n</form>\n",
            );
        }
    }
    Ok(html(
        status,
        layout(
            &format!("Access notices for {}", session.who.name),
            Some(&nav(session, "inbox")),
            notice.as_ref(),
            &body,
        ),
    ))
}

/// `GET /council/inbox?from=YYYY-MM-DD&to=YYYY-MM-DD`.
pub(crate) async fn inbox<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> PageResult {
    let (id, session) = signed_in_with_id(&pages, &headers).await?;
    let fields = query.map(|Query(q)| q).unwrap_or_default();
    match Filter::parse(&fields) {
        Ok(filter) => {
            let notice = pages
                .sessions
                .councils
                .take_flash(&pages.app.store, &id)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the message for this page could not be read");
                    None
                })
                .map(Notice::Done);
            inbox_page(&pages, &session, &filter, StatusCode::OK, notice, true).await
        }
        Err((filter, message)) => {
            inbox_page(
                &pages,
                &session,
                &filter,
                StatusCode::BAD_REQUEST,
                Some(Notice::Error(message)),
                false,
            )
            .await
        }
    }
}

/// The notices ticked on the inbox form (`event_id`, repeated), or why nothing can be
/// acknowledged.
fn selected_events(fields: &Fields) -> Result<BTreeSet<EventId>, String> {
    let mut selected = BTreeSet::new();
    for (k, v) in fields {
        if k != "event_id" {
            continue;
        }
        let id = v
            .trim()
            .parse::<EventId>()
            .map_err(|_| format!("\"{v}\" is not a notice id. Nothing was acknowledged."))?;
        selected.insert(id);
    }
    if selected.is_empty() {
        return Err("Select at least one notice to acknowledge.".into());
    }
    if selected.len() > MAX_LIMIT as usize {
        return Err(format!(
            "Acknowledge at most {MAX_LIMIT} notices at a time. Nothing was acknowledged."
        ));
    }
    Ok(selected)
}

/// `POST /council/inbox/ack` (`event_id` repeated, `csrf`, `from`, `to`): acknowledges the
/// selected notices with the API's store call, then `303` back to the inbox.
pub(crate) async fn ack<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let (session_id, session) = signed_in_with_id(&pages, &headers).await?;
    let fields = form(body, "/council/inbox")?;
    check_post(&headers, &uri, &fields, &session.csrf, "/council/inbox")?;
    let filter = Filter::parse(&fields).unwrap_or_default();
    let selected = match selected_events(&fields) {
        Ok(selected) => selected,
        Err(message) => {
            return inbox_page(
                &pages,
                &session,
                &filter,
                StatusCode::BAD_REQUEST,
                Some(Notice::Error(message)),
                true,
            )
            .await;
        }
    };
    let app = &pages.app;
    // Only this council's own notices can be chosen: the ids come from its own mailbox.
    let ids: Vec<NotificationId> = unacknowledged(&pages, &session.who.code)
        .await
        .map_err(|e| store_failed(&e, "/council/inbox"))?
        .into_iter()
        .filter(|n| selected.contains(&n.event_id))
        .map(|n| n.id)
        .collect();
    let acknowledged = if ids.is_empty() {
        0
    } else {
        app.store
            .acknowledge_notifications(session.who.code.clone(), ids, app.clock.now())
            .await
            .map_err(|e| store_failed(&e, "/council/inbox"))?
    };
    app.metrics.notifications_acknowledged.inc_by(acknowledged);
    tracing::info!(council = %session.who.code, acknowledged, "notifications acknowledged on the inbox page");
    if let Err(e) = pages
        .sessions
        .councils
        .set_flash(
            &pages.app.store,
            &session_id,
            format!(
                "{acknowledged} notice{} acknowledged.",
                if acknowledged == 1 { "" } else { "s" }
            ),
        )
        .await
    {
        tracing::warn!(error = %e, "the message for the next page could not be saved");
    }
    // Back to the inbox, with the dates it was filtered by.
    let back = if filter.from_text.is_empty() && filter.to_text.is_empty() {
        "/council/inbox".to_owned()
    } else {
        format!("/council/inbox?{}", filter.query())
    };
    Ok(see_other(&back, &[]))
}

// ---- CSV export ----------------------------------------------------------------------------

/// Columns of the CSV export, in order.
pub(crate) const CSV_COLUMNS: [&str; 15] = [
    "notification_id",
    "event_id",
    "nhs_number",
    "plan_types",
    "organisation_ods",
    "organisation_name",
    "setting",
    "staff_id",
    "incident_ref",
    "accessed_at",
    "received_at",
    "clock_suspect",
    "data_as_of",
    "overdue",
    "recent_contacts",
];

/// A cell a spreadsheet will not run as a formula: text starting `=`, `+`, `-`, `@`, tab or
/// carriage return gets a leading `'`.
fn cell(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    }
}

fn csv_body(
    notices: &[&Notification],
    now: DateTime<Utc>,
    overdue_after: Duration,
) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_COLUMNS)?;
    let t = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for n in notices {
        let contacts: Vec<String> = n
            .recent_contacts
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} ({})",
                    c.date.format("%Y-%m-%d"),
                    c.organisation.ods,
                    c.organisation.name,
                    setting_words(c.setting)
                )
            })
            .collect();
        let plans: Vec<&str> = n.plan_types.iter().map(|p| p.as_str()).collect();
        w.write_record([
            n.id.to_string(),
            n.event_id.to_string(),
            n.nhs_number.to_string(),
            plans.join(";"),
            n.organisation.ods.to_string(),
            cell(&n.organisation.name),
            setting_words(n.setting).to_owned(),
            cell(n.staff_id.as_deref().unwrap_or("")),
            cell(n.incident_ref.as_deref().unwrap_or("")),
            t(n.accessed_at),
            t(n.received_at),
            n.clock_suspect.to_string(),
            n.data_as_of.map(t).unwrap_or_default(),
            (now - n.received_at > overdue_after).to_string(),
            cell(&contacts.join("; ")),
        ])?;
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

/// `GET /council/inbox.csv?from=..&to=..`: the filtered inbox as a CSV attachment.
pub(crate) async fn export<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> PageResult {
    let session = signed_in(&pages, &headers).await?;
    let fields = query.map(|Query(q)| q).unwrap_or_default();
    let filter = match Filter::parse(&fields) {
        Ok(f) => f,
        Err((filter, message)) => {
            return inbox_page(
                &pages,
                &session,
                &filter,
                StatusCode::BAD_REQUEST,
                Some(Notice::Error(message)),
                false,
            )
            .await;
        }
    };
    let all = unacknowledged(&pages, &session.who.code)
        .await
        .map_err(|e| store_failed(&e, "/council/inbox"))?;
    let notices: Vec<&Notification> = all.iter().filter(|n| filter.keeps(n)).collect();
    let now = now(&pages);
    let body = csv_body(&notices, now, overdue_after(&pages)).map_err(|e| {
        tracing::error!(error = %e, "writing the CSV export failed");
        super::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Export failed",
            "The CSV could not be written. Try again.",
            "/council/inbox",
        )
    })?;
    tracing::info!(council = %session.who.code, rows = notices.len(), "inbox exported as CSV");
    let filename = format!(
        "attachment; filename=\"cpis-notices-{}-{}.csv\"",
        session.who.code,
        now.format("%Y-%m-%d")
    );
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&filename) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

// ---- uploads -------------------------------------------------------------------------------

/// `GET /council/uploads`: the newest upload attempts, applied and refused.
pub(crate) async fn uploads<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
) -> PageResult {
    let session = signed_in(&pages, &headers).await?;
    let attempts = pages
        .app
        .store
        .upload_attempts(session.who.code.clone(), MAX_UPLOAD_ATTEMPTS as u32)
        .await
        .map_err(|e| store_failed(&e, "/council/uploads"))?;
    let mut body = format!(
        "<p>Uploads reach the server through the API (<code>POST /v1/councils/{}/uploads</code>, \
         the council's full list as CSV). The newest {MAX_UPLOAD_ATTEMPTS} attempts are shown, \
         newest first. A refused upload changed nothing.</p>\n",
        esc(session.who.code.as_str())
    );
    if attempts.is_empty() {
        body.push_str("<p id=\"no-uploads\">No uploads yet.</p>\n");
    } else {
        body.push_str(
            "<div class=\"table-wrap\"><table id=\"uploads\">\n<caption>Upload attempts, newest first</caption>\n\
             <thead><tr><th scope=\"col\">Received</th><th scope=\"col\">Result</th>\
             <th scope=\"col\">Details</th></tr></thead>\n<tbody>\n",
        );
        for a in &attempts {
            match &a.outcome {
                AttemptOutcome::Applied {
                    upload_id,
                    counts: c,
                    version,
                } => {
                    let _ = writeln!(
                        body,
                        "<tr data-upload-id=\"{id}\"><td>{}</td>\
                         <td><span class=\"tag applied\">Applied</span></td>\
                         <td>Receipt {id}: {} rows; {} added, {} updated, {} ended, {} removed, \
                         {} unchanged; version {version}</td></tr>",
                        time(a.received_at),
                        c.rows,
                        c.added,
                        c.updated,
                        c.ended,
                        c.removed,
                        c.unchanged,
                        id = esc(&upload_id.to_string()),
                    );
                }
                AttemptOutcome::Refused(r) => {
                    let mut details = format!("<p>{}</p>", esc(&r.message));
                    if !r.errors.is_empty() {
                        details.push_str("<ul class=\"plain errors\">");
                        for e in &r.errors {
                            let column = if e.column.is_empty() {
                                String::new()
                            } else {
                                format!(", column {}", esc(&e.column))
                            };
                            let _ = write!(
                                details,
                                "<li>Line {}{column}: {}</li>",
                                e.line,
                                esc(&e.message)
                            );
                        }
                        details.push_str("</ul>");
                        let more = r.error_count.saturating_sub(r.errors.len() as u64);
                        if more > 0 {
                            let _ = write!(details, "<p>and {more} more error(s) not kept.</p>");
                        }
                    }
                    let _ = writeln!(
                        body,
                        "<tr class=\"refused\"><td>{}</td>\
                         <td><span class=\"tag refused\">Refused</span></td><td>{details}</td></tr>",
                        time(a.received_at),
                    );
                }
            }
        }
        body.push_str("</tbody></table></div>\n");
    }
    Ok(html(
        StatusCode::OK,
        layout(
            &format!("Uploads from {}", session.who.name),
            Some(&nav(&session, "uploads")),
            None,
            &body,
        ),
    ))
}
