//! The trust fleet pages: sign in with a trust admin token, the trust's own tablets (last
//! seen, data age, outbox depth, app version, status) and revoking one after a confirmation,
//! through the same store call as `admin device revoke`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use chrono::{DateTime, Utc};
use cpis_protocol::{DeviceId, KeyProtection};

use super::html::{ICON_WARN, Nav, Notice, esc, layout, time};
use super::session::Session;
use super::{
    Fields, Pages, SignIn, TrustUser, check_post, current, error_page, form, html, see_other,
    store_failed,
};
use crate::fleet::{DataStatus, FleetRow, format_age, view};
use crate::store::{DeviceRecord, Store};
use crate::tokens;

/// The trust fleet page session's cookie.
pub(crate) const SESSION_COOKIE: &str = "cpis_fleet";

const SIGN_IN: SignIn = SignIn {
    base: "/fleet",
    title: "Trust fleet sign in",
    label: "Trust admin token",
    hint: "Your trust's admin token (it starts cpis_at_), made with \
           `cpis-sync-server admin trust token --trust CODE`.",
    cookie: SESSION_COOKIE,
    csrf_cookie: "cpis_fleet_csrf",
};

/// Most revoked devices listed.
const MAX_REVOKED_SHOWN: usize = 200;

type PageResult = Result<Response, Response>;

fn now<S: Store>(pages: &Pages<S>) -> DateTime<Utc> {
    pages.app.clock.now()
}

async fn signed_in<S: Store>(
    pages: &Pages<S>,
    headers: &HeaderMap,
) -> Result<Session<TrustUser>, Response> {
    signed_in_with_id(pages, headers).await.map(|(_, s)| s)
}

/// The session's id and the session, or `303` to the sign-in page. The token it was signed
/// in with is checked again on every request, so revoking it (`admin ... revoke-tokens`, from
/// any process) or its expiry signs the session out at once.
async fn signed_in_with_id<S: Store>(
    pages: &Pages<S>,
    headers: &HeaderMap,
) -> Result<(String, Session<TrustUser>), Response> {
    let (id, session) = current(
        &pages.app.store,
        &pages.sessions.fleet,
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
        .trust_for_admin_token(session.who.token, now(pages))
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    if still.as_ref().ok() != Some(&session.who.code) {
        tracing::info!(who = %session.who.code, "page session ended: its token was revoked or expired");
        pages
            .sessions
            .fleet
            .remove(&pages.app.store, &id)
            .await
            .map_err(|e| store_failed(&e, SIGN_IN.base))?;
        return Err(see_other(SIGN_IN.base, &[]));
    }
    Ok((id, session))
}

fn nav(session: &Session<TrustUser>) -> Nav<'_> {
    Nav {
        who: format!("{} ({})", session.who.name, session.who.code),
        links: vec![("/fleet/devices", "Devices", true)],
        sign_out: "/fleet/sign-out",
        csrf: &session.csrf,
    }
}

/// `GET /fleet`: the sign-in form (signed in already: the devices).
pub(crate) async fn sign_in_page<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
) -> Response {
    if signed_in(&pages, &headers).await.is_ok() {
        return see_other("/fleet/devices", &[]);
    }
    SIGN_IN.page(&headers, StatusCode::OK, None)
}

/// `POST /fleet/sign-in` (`token`, `csrf`).
pub(crate) async fn sign_in<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let fields = form(body, SIGN_IN.base)?;
    let token = SIGN_IN.check(&headers, &uri, &fields)?;
    let store = &pages.app.store;
    let hash = tokens::hash(&token);
    let trust = store
        .trust_for_admin_token(hash, now(&pages))
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    let Ok(code) = trust else {
        tracing::info!(refusal = ?trust, "fleet page sign-in refused");
        return Err(SIGN_IN.refused(&headers));
    };
    let name = store
        .trusts()
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?
        .into_iter()
        .find(|t| t.code == code)
        .map_or_else(|| code.to_string(), |t| t.name);
    tracing::info!(trust = %code, "trust admin signed in to the fleet page");
    let (id, _) = pages
        .sessions
        .fleet
        .create(
            &pages.app.store,
            TrustUser {
                code,
                name,
                token: hash,
            },
            now(&pages),
        )
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    Ok(SIGN_IN.signed_in(&id, "/fleet/devices"))
}

/// `POST /fleet/sign-out` (`csrf`).
pub(crate) async fn sign_out<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let Some((id, session)) = current(
        &pages.app.store,
        &pages.sessions.fleet,
        &headers,
        SIGN_IN.cookie,
        now(&pages),
    )
    .await
    .map_err(|e| store_failed(&e, SIGN_IN.base))?
    else {
        return Ok(SIGN_IN.signed_out());
    };
    let fields = form(body, "/fleet/devices")?;
    check_post(&headers, &uri, &fields, &session.csrf, "/fleet/devices")?;
    pages
        .sessions
        .fleet
        .remove(&pages.app.store, &id)
        .await
        .map_err(|e| store_failed(&e, SIGN_IN.base))?;
    Ok(SIGN_IN.signed_out())
}

fn device_label(d: &DeviceRecord) -> String {
    match d.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
        Some(name) => name.to_owned(),
        None => format!("Device {}", d.id),
    }
}

fn status_html(status: DataStatus) -> &'static str {
    match status {
        DataStatus::Ok => "<span class=\"tag ok\">OK</span>",
        DataStatus::Stale => "<span class=\"tag warn\">Stale data</span>",
        DataStatus::Expired => {
            "<span class=\"tag bad\">EXPIRED data</span><br><span class=\"muted\">lookups answer unknown</span>"
        }
        DataStatus::PastWipeAge => {
            "<span class=\"tag bad\">PAST WIPE AGE</span><br><span class=\"muted\">the tablet has erased its data</span>"
        }
        DataStatus::NoReport => "<span class=\"tag warn\">No report yet</span>",
        DataStatus::Revoked => "<span class=\"tag bad\">Revoked</span>",
    }
}

fn active_row(r: &FleetRow) -> String {
    let d = &r.entry.device;
    let rep = r.entry.report.as_ref().map(|s| &s.report);
    let id = esc(&d.id.to_string());
    let label = esc(&device_label(d));
    format!(
        "<tr data-device-id=\"{id}\"><td>{label}<br><span class=\"muted\">{id}</span></td>\
         <td>{region}</td><td>{seen}</td><td>{age}</td><td>{outbox}</td><td>{version}</td>\
         <td>{keys}</td><td>{status}</td><td><a class=\"revoke\" href=\"/fleet/devices/{id}/revoke\">Revoke\
         <span class=\"visually-hidden\"> {label}</span></a></td></tr>\n",
        region = esc(d.region.as_str()),
        seen = r.last_seen.map_or_else(|| "Never".to_owned(), time),
        age = r
            .data_age
            .map_or_else(|| "No data reported".to_owned(), format_age),
        outbox = rep.map_or_else(
            || "Not reported".to_owned(),
            |p| format!(
                "{} waiting{}",
                p.outbox_pending,
                if p.outbox_set_aside > 0 {
                    format!(", {} set aside", p.outbox_set_aside)
                } else {
                    String::new()
                }
            )
        ),
        version = esc(&d.agent_version),
        keys = keys_html(rep.and_then(|p| p.key_protection)),
        status = status_html(r.status),
    )
}

/// How a tablet's keys are protected; a key file is flagged so trust IT can find those
/// tablets (safe only with full-disk encryption).
fn keys_html(protection: Option<KeyProtection>) -> &'static str {
    match protection {
        Some(KeyProtection::Tpm2) => "<span class=\"tag ok\" data-keys=\"tpm2\">TPM 2.0</span>",
        Some(KeyProtection::File) => {
            "<span class=\"tag warn\" data-keys=\"file\">Key file</span><br>\
             <span class=\"muted\">not sealed by a TPM</span>"
        }
        None => "<span class=\"muted\" data-keys=\"unknown\">Not reported</span>",
    }
}

/// `GET /fleet/devices`: the trust's active and revoked tablets.
pub(crate) async fn devices<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
) -> PageResult {
    let (session_id, session) = signed_in_with_id(&pages, &headers).await?;
    let app = &pages.app;
    let now = now(&pages);
    let entries = app
        .store
        .trust_fleet(session.who.code.clone())
        .await
        .map_err(|e| store_failed(&e, "/fleet/devices"))?;
    let rows = view(entries, &app.feed.policy(), now);
    let (revoked, active): (Vec<&FleetRow>, Vec<&FleetRow>) = rows
        .iter()
        .partition(|r| r.entry.device.revoked_at.is_some());
    let notice = pages
        .sessions
        .fleet
        .take_flash(&pages.app.store, &session_id)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the message for this page could not be read");
            None
        })
        .map(Notice::Done);
    let mut body = format!(
        "<p>Tablets of {} only. Stalest data first. Data age is the server's time now minus the \
         time of the tablet's newest verified data; outbox is the lookups the tablet has not yet \
         sent.</p>\n<h2 id=\"active-heading\">Active devices ({})</h2>\n",
        esc(&session.who.name),
        active.len()
    );
    let key_files = active
        .iter()
        .filter(|r| {
            r.entry
                .report
                .as_ref()
                .and_then(|s| s.report.key_protection)
                == Some(KeyProtection::File)
        })
        .count();
    if key_files > 0 {
        let _ = writeln!(
            body,
            "<div id=\"key-files\" class=\"alert\">{ICON_WARN}<p><strong>{key_files} active \
             tablet(s) keep their keys in a file</strong>, not sealed by a TPM: a copy of such a \
             tablet's disk opens its data unless the disk is encrypted. Re-enrol them with \
             <code>--keystore tpm2</code> (see PROVISIONING.md).</p></div>"
        );
    }
    // The tables are always there (empty: one row saying so), so the lists are easy to find.
    body.push_str(
        "<div class=\"table-wrap\"><table id=\"devices\" aria-labelledby=\"active-heading\">\n\
         <thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Region</th>\
         <th scope=\"col\">Last seen</th><th scope=\"col\">Data age</th>\
         <th scope=\"col\">Outbox</th><th scope=\"col\">App version</th>\
         <th scope=\"col\">Keys</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Action</th></tr></thead>\n<tbody>\n",
    );
    if active.is_empty() {
        body.push_str("<tr><td colspan=\"9\" id=\"no-devices\">No active devices.</td></tr>\n");
    }
    for r in &active {
        body.push_str(&active_row(r));
    }
    body.push_str("</tbody></table></div>\n");
    let mut revoked = revoked;
    revoked.sort_by_key(|r| std::cmp::Reverse(r.entry.device.revoked_at));
    let _ = writeln!(
        body,
        "<h2 id=\"revoked-heading\">Revoked devices ({})</h2>",
        revoked.len()
    );
    body.push_str(
        "<div class=\"table-wrap\"><table id=\"revoked\" aria-labelledby=\"revoked-heading\">\n\
         <thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Region</th>\
         <th scope=\"col\">Revoked</th><th scope=\"col\">Last seen</th></tr></thead>\n<tbody>\n",
    );
    if revoked.is_empty() {
        body.push_str("<tr><td colspan=\"4\" id=\"no-revoked\">No revoked devices.</td></tr>\n");
    }
    for r in revoked.iter().take(MAX_REVOKED_SHOWN) {
        let d = &r.entry.device;
        let id = esc(&d.id.to_string());
        let _ = writeln!(
            body,
            "<tr data-device-id=\"{id}\"><td>{}<br><span class=\"muted\">{id}</span></td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&device_label(d)),
            esc(d.region.as_str()),
            d.revoked_at.map_or_else(String::new, time),
            r.last_seen.map_or_else(|| "Never".to_owned(), time),
        );
    }
    body.push_str("</tbody></table></div>\n");
    Ok(html(
        StatusCode::OK,
        layout(
            &format!("Devices of {}", session.who.name),
            Some(&nav(&session)),
            notice.as_ref(),
            &body,
        ),
    ))
}

/// The device named in the path, if it is this trust's; other trusts' devices are "not
/// found" exactly like unknown ones.
async fn own_device<S: Store>(
    pages: &Pages<S>,
    session: &Session<TrustUser>,
    id: &str,
) -> Result<DeviceRecord, Response> {
    let not_found = || {
        error_page(
            StatusCode::NOT_FOUND,
            "Device not found",
            "There is no such device in your trust.",
            "/fleet/devices",
        )
    };
    let id: DeviceId = id.trim().parse().map_err(|_| not_found())?;
    let device = pages
        .app
        .store
        .device(id)
        .await
        .map_err(|e| store_failed(&e, "/fleet/devices"))?
        .ok_or_else(not_found)?;
    if device.trust != session.who.code {
        return Err(not_found());
    }
    Ok(device)
}

/// `GET /fleet/devices/{id}/revoke`: what revoking does, and the confirm button.
pub(crate) async fn confirm_revoke<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult {
    let session = signed_in(&pages, &headers).await?;
    let device = own_device(&pages, &session, &id).await?;
    let label = esc(&device_label(&device));
    let did = esc(&device.id.to_string());
    let body = if let Some(at) = device.revoked_at {
        format!(
            "<p id=\"already-revoked\">{label} ({did}) was already revoked on {}.</p>\n\
             <p><a href=\"/fleet/devices\">Back to devices</a></p>\n",
            time(at)
        )
    } else {
        format!(
            "<dl><dt>Device</dt><dd>{label}</dd><dt>Id</dt><dd>{did}</dd>\
             <dt>Region</dt><dd>{region}</dd><dt>App version</dt><dd>{version}</dd></dl>\n\
             <div class=\"alert\">{ICON_WARN}<p><strong>Revoking cannot be undone.</strong> The \
             server refuses this tablet from now on, and the tablet shreds its data (the \
             flags and any lookups it holds) at its next contact with the server. To use it \
             again it must be enrolled afresh.</p></div>\n\
             <form id=\"confirm-revoke\" method=\"post\" action=\"/fleet/devices/{did}/revoke\">\n\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\n\
             <div class=\"actions\"><button type=\"submit\" id=\"confirm\" class=\"danger\">\
             Revoke {label}</button> <a id=\"cancel\" href=\"/fleet/devices\">Cancel</a></div>\n\
             </form>\n",
            region = esc(device.region.as_str()),
            version = esc(&device.agent_version),
            csrf = esc(&session.csrf),
        )
    };
    Ok(html(
        StatusCode::OK,
        layout(
            &format!("Revoke {}?", device_label(&device)),
            Some(&nav(&session)),
            None,
            &body,
        ),
    ))
}

/// `POST /fleet/devices/{id}/revoke` (`csrf`): revokes (as `admin device revoke` does) and
/// `303` back to the devices.
pub(crate) async fn revoke<S: Store>(
    State(pages): State<Arc<Pages<S>>>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    body: Result<Form<Fields>, FormRejection>,
) -> PageResult {
    let (session_id, session) = signed_in_with_id(&pages, &headers).await?;
    let back = format!("/fleet/devices/{}/revoke", super::html::query_value(&id));
    let fields = form(body, &back)?;
    check_post(&headers, &uri, &fields, &session.csrf, &back)?;
    let device = own_device(&pages, &session, &id).await?;
    let changed = pages
        .app
        .store
        .revoke_device(device.id, now(&pages))
        .await
        .map_err(|e| store_failed(&e, &back))?;
    tracing::info!(
        device = %device.id, trust = %session.who.code, changed,
        "device revoked from the fleet page"
    );
    if let Err(e) = pages.sessions.fleet.set_flash(
        &pages.app.store,
        &session_id,
        format!(
            "{} was revoked. It is refused from now on and erases its data at its next contact.",
            device_label(&device)
        ),
    )
    .await
    {
        tracing::warn!(error = %e, "the message for the next page could not be saved");
    }
    Ok(see_other("/fleet/devices", &[]))
}
