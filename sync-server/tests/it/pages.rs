//! The council inbox, uploads and trust fleet pages over real HTTPS: sign-in, sessions,
//! acknowledgement agreeing with the API, date filter, overdue marking, CSV export, refused
//! uploads, CSRF and cross-site refusals, council and trust isolation, revoke with
//! confirmation, and HTML-escaping of everything users or tablets control.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as Age;
use cpis_protocol::PlanType::{Cpp, Lac};
use cpis_protocol::api::{EnrolRequest, EnrolResponse, ErrorBody, UploadReceipt, codes, paths};
use cpis_protocol::{CouncilInfo, RegionId, TrustCode};
use cpis_sync_server::store::{NewEnrolmentToken, Store as _};
use cpis_sync_server::tokens;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::harness::*;

const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A page answer.
pub(crate) struct Page {
    pub(crate) status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Page {
    pub(crate) fn location(&self) -> &str {
        self.headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the hidden `csrf` field (the first form's).
    pub(crate) fn csrf(&self) -> String {
        attr_after(&self.body, "name=\"csrf\" value=\"").expect("a csrf field")
    }

    /// The HTML of the `<tr>` whose `attr` is `value`.
    fn row(&self, attr: &str, value: &str) -> Option<&str> {
        let start = self.body.find(&format!("<tr {attr}=\"{value}\""))?;
        let end = self.body[start..].find("</tr>")? + start;
        Some(&self.body[start..end])
    }

    /// The HTML of the element with `id` (from its tag to the matching close of `tag`).
    fn element(&self, tag: &str, id: &str) -> Option<&str> {
        let start = self.body.find(&format!("<{tag} id=\"{id}\""))?;
        let end = self.body[start..].find(&format!("</{tag}>"))? + start;
        Some(&self.body[start..end])
    }

    /// `data-event-id`s in page order.
    fn event_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut rest = self.body.as_str();
        while let Some(i) = rest.find("<tr data-event-id=\"") {
            rest = &rest[i + 19..];
            ids.push(rest[..rest.find('"').unwrap()].to_owned());
        }
        ids
    }

    fn assert_security_headers(&self) {
        assert_eq!(self.header("content-security-policy"), CSP);
        assert_eq!(self.header("x-content-type-options"), "nosniff");
        assert_eq!(self.header("referrer-policy"), "same-origin");
        assert_eq!(self.header("cache-control"), "no-store");
    }
}

fn attr_after(body: &str, prefix: &str) -> Option<String> {
    let i = body.find(prefix)? + prefix.len();
    Some(body[i..i + body[i..].find('"')?].to_owned())
}

/// A browser stand-in: no redirects followed, cookies kept, same-origin headers on POSTs.
pub(crate) struct Browser {
    client: reqwest::Client,
    base: String,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    pub(crate) fn new(env: &Env) -> Browser {
        Self::with_alpn(env, true)
    }

    fn with_alpn(env: &Env, h2: bool) -> Browser {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(env.ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // HTTP/2 when `h2` (as browsers do: no Host header, the authority is checked).
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Browser {
            client,
            base: env.base.clone(),
            cookies: BTreeMap::new(),
        }
    }

    /// Talks to another server from now on (another replica), keeping the cookies.
    pub(crate) fn switch_to(&mut self, env: &Env) {
        self.base = env.base.clone();
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn finish(&mut self, r: reqwest::Response) -> Page {
        for c in r.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let (pair, _) = c.split_once(';').unwrap_or((c, ""));
            let (k, v) = pair.split_once('=').unwrap();
            if v.is_empty() || c.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap();
        Page {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Page {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(r).await
    }

    /// POSTs a form as the page itself would (Origin = this server, Sec-Fetch-Site
    /// same-origin), with `extra` headers overriding.
    async fn post_with(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Page {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .header("origin", self.base.clone())
            .header("sec-fetch-site", "same-origin")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(fields));
        let mut req = req.build().unwrap();
        for (k, v) in extra {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut().insert(name, v.parse().unwrap());
        }
        let r = self.client.execute(req).await.unwrap();
        self.finish(r).await
    }

    pub(crate) async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.post_with(path, fields, &[]).await
    }

    /// Signs in at `/council` or `/fleet` with `token`.
    pub(crate) async fn sign_in(&mut self, base: &str, token: &str) -> Page {
        let form = self.get(base).await;
        assert_eq!(form.status, 200, "{}", form.body);
        let csrf = form.csrf();
        self.post(
            &format!("{base}/sign-in"),
            &[("token", token), ("csrf", &csrf)],
        )
        .await
    }
}

fn encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc = |s: &str| {
                s.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                            char::from(b).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect::<String>()
            };
            format!("{}={}", enc(k), enc(v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Seeded server; LEICS flags subjects 1 and 2 (CPP) and 4 (LAC), NOTTS flags subject 3.
async fn council_env() -> (Env, String, String) {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let notts = env.council_token(NOTTS).await;
    let r = env
        .upload(
            &leics,
            LEICS,
            &csv(&[
                (1, "CPP", "2024-01-01", ""),
                (2, "CPP", "2024-01-01", ""),
                (4, "LAC", "2024-01-01", ""),
            ]),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = env
        .upload(&notts, NOTTS, &csv(&[(3, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    (env, leics, notts)
}

#[tokio::test]
async fn council_sign_in_refuses_a_wrong_token_and_a_session_is_needed_for_every_page() {
    let (env, leics, _) = council_env().await;
    let mut b = Browser::new(&env);
    for path in ["/council/inbox", "/council/uploads", "/council/inbox.csv"] {
        let p = b.get(path).await;
        assert_eq!((p.status, p.location()), (303, "/council"), "{path}");
    }
    let form = b.get("/council").await;
    assert_eq!(form.status, 200);
    form.assert_security_headers();
    assert!(form.body.contains("<html lang=\"en-GB\">"));
    assert!(
        form.body
            .contains("<form id=\"sign-in\" method=\"post\" action=\"/council/sign-in\">")
    );
    assert!(
        form.body
            .contains("<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\"")
    );
    assert_eq!(form.body.matches("<h1>").count(), 1);
    assert!(form.body.contains("<main"));

    // A wrong token: 401 with the words, no session.
    let csrf = form.csrf();
    let p = b
        .post(
            "/council/sign-in",
            &[("token", "cpis_ct_wrong"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(p.status, 401);
    assert!(p.body.contains("That token was not accepted"));
    assert!(p.body.contains("role=\"alert\""));
    assert!(!b.cookies.contains_key("cpis_council"));
    // Another council's kind of token (a trust admin token) is no council token either.
    let p = b
        .post(
            "/council/sign-in",
            &[
                ("token", &format!("{}x", tokens::TRUST_ADMIN_PREFIX)),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(p.status, 401);

    // The right token without the form's csrf field: 403, no session.
    let p = b.post("/council/sign-in", &[("token", &leics)]).await;
    assert_eq!(p.status, 403);
    assert!(!b.cookies.contains_key("cpis_council"));

    // The right token: a session cookie scoped to /council, then the inbox.
    let form = b.get("/council").await;
    let csrf = form.csrf();
    let r = b
        .client
        .post(env.url("/council/sign-in"))
        .header("cookie", b.cookie_header())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encode(&[("token", &leics), ("csrf", &csrf)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // As from a browser: HTTP/2, no Host header; the same-origin check uses the authority.
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let session = set.iter().find(|c| c.starts_with("cpis_council=")).unwrap();
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/council",
        "Max-Age=28800",
    ] {
        assert!(session.contains(attr), "{session} lacks {attr}");
    }
    let p = b.finish(r).await;
    assert_eq!(p.location(), "/council/inbox");
    let inbox = b.get("/council/inbox").await;
    assert_eq!(inbox.status, 200);
    inbox.assert_security_headers();
    assert!(inbox.body.contains("Council E10000018"));
    assert!(inbox.body.contains("id=\"empty\">No notices waiting"));
    // Signed in: /council goes to the inbox.
    assert_eq!(b.get("/council").await.location(), "/council/inbox");

    // Over HTTP/1.1 too.
    let mut h1 = Browser::with_alpn(&env, false);
    assert_eq!(h1.sign_in("/council", &leics).await.status, 303);
    assert_eq!(h1.get("/council/inbox").await.status, 200);

    // A made-up session id is no session.
    let mut stranger = Browser::new(&env);
    stranger
        .cookies
        .insert("cpis_council".into(), "made-up".into());
    assert_eq!(stranger.get("/council/inbox").await.status, 303);

    // Sign out needs the csrf; then the session is gone.
    let csrf = inbox.csrf();
    let p = b.post("/council/sign-out", &[]).await;
    assert_eq!(p.status, 403);
    assert_eq!(b.get("/council/inbox").await.status, 200);
    let p = b.post("/council/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!((p.status, p.location()), (303, "/council"));
    let saved = b.cookies.clone();
    assert_eq!(b.get("/council/inbox").await.status, 303);
    // The old cookie, replayed, is dead too.
    b.cookies = saved;
    b.cookies.insert(
        "cpis_council".into(),
        session.split(';').next().unwrap()[13..].to_owned(),
    );
    assert_eq!(b.get("/council/inbox").await.status, 303);

    // Sessions end 8 hours after sign-in (the server's clock).
    let p = b.sign_in("/council", &leics).await;
    assert_eq!(p.status, 303);
    env.clock.advance(Age::hours(7));
    assert_eq!(b.get("/council/inbox").await.status, 200);
    env.clock.advance(Age::hours(1));
    let p = b.get("/council/inbox").await;
    assert_eq!((p.status, p.location()), (303, "/council"));
    env.stop().await;
}

#[tokio::test]
async fn the_inbox_lists_notices_newest_first_and_acknowledging_agrees_with_the_api() {
    let (env, leics, _) = council_env().await;
    let d = env.enrol(EM).await;
    // Subject 1 seen first, then subject 2 (CPP) and subject 4 (LAC) later.
    let first = d.event(1, t0(), &[LEICS], &[Cpp]);
    d.send_events(&env, std::slice::from_ref(&first)).await;
    env.clock.advance(Age::hours(2));
    let second = d.event(2, env.clock_now(), &[LEICS], &[Cpp]);
    let third = d.event(4, env.clock_now(), &[LEICS], &[Lac]);
    d.send_events(&env, &[second.clone(), third.clone()]).await;
    env.clock.advance(Age::minutes(5));

    let mut b = Browser::new(&env);
    assert_eq!(b.sign_in("/council", &leics).await.status, 303);
    let inbox = b.get("/council/inbox").await;
    assert_eq!(inbox.status, 200);
    assert!(inbox.body.contains("<table id=\"notices\""));
    assert!(!inbox.body.contains("id=\"empty\""));
    let ids = inbox.event_ids();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        ids[2],
        first.event_id.to_string(),
        "the oldest notice is last"
    );
    let row = inbox
        .row("data-event-id", &first.event_id.to_string())
        .unwrap();
    assert!(row.contains(&nhs(1).spaced()), "{row}");
    assert!(row.contains("CPP"));
    assert!(row.contains("East Midlands Ambulance (RX9)"));
    assert!(row.contains("staff P0001"));
    assert!(row.contains("incident INC-1"));
    assert!(
        row.contains("2025-06-01 12:00 UTC"),
        "accessed and received times: {row}"
    );
    assert!(row.contains(&format!(
        "<input type=\"checkbox\" name=\"event_id\" value=\"{}\"",
        first.event_id
    )));
    // The subject's recent contacts: the lookup itself, by the trust.
    assert!(
        row.contains("2025-06-01</time>: East Midlands Ambulance (RX9), ambulance"),
        "{row}"
    );
    let lac = inbox
        .row("data-event-id", &third.event_id.to_string())
        .unwrap();
    assert!(lac.contains("LAC (looked-after child)"));
    assert!(!row.contains("Overdue"), "two hours is not overdue");

    // Acknowledge two at once.
    let csrf = inbox.csrf();
    let p = b
        .post(
            "/council/inbox/ack",
            &[
                ("csrf", &csrf),
                ("event_id", &first.event_id.to_string()),
                ("event_id", &third.event_id.to_string()),
                ("from", ""),
                ("to", ""),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location(), "/council/inbox");
    let after = b.get(p.location()).await;
    assert!(after.body.contains("2 notices acknowledged"));
    assert!(after.body.contains("role=\"status\""));
    // Shown once.
    assert!(
        !b.get("/council/inbox")
            .await
            .body
            .contains("notices acknowledged")
    );
    assert_eq!(after.event_ids(), vec![second.event_id.to_string()]);
    // The API agrees: only the second is left.
    let api = env.mailbox(&leics, LEICS).await;
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].event_id, second.event_id);
    // And the audit log saw it as an acknowledgement.
    let audit = env.store().audit_entries(first.event_id).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.action == "notification_acknowledged")
    );

    // Acknowledge the last one through the API: the page shows the empty inbox.
    let r = env.ack(&leics, LEICS, &[api[0].id]).await;
    assert_eq!(r.status(), 200);
    let empty = b.get("/council/inbox").await;
    assert!(
        empty
            .body
            .contains("<p id=\"empty\">No notices waiting.</p>")
    );
    assert!(empty.event_ids().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn acknowledging_without_the_csrf_token_or_from_another_site_is_refused_and_changes_nothing()
{
    let (env, leics, _) = council_env().await;
    let d = env.enrol(EM).await;
    let e = d.event(1, t0(), &[LEICS], &[Cpp]);
    d.send_events(&env, std::slice::from_ref(&e)).await;
    let mut b = Browser::new(&env);
    b.sign_in("/council", &leics).await;
    let inbox = b.get("/council/inbox").await;
    let csrf = inbox.csrf();
    let id = e.event_id.to_string();

    let p = b.post("/council/inbox/ack", &[("event_id", &id)]).await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("role=\"alert\""));
    assert!(p.body.contains("security token"));
    let p = b
        .post(
            "/council/inbox/ack",
            &[("event_id", &id), ("csrf", "not-the-token")],
        )
        .await;
    assert_eq!(p.status, 403);
    // The right token from another site: refused by Origin, and by Sec-Fetch-Site.
    let p = b
        .post_with(
            "/council/inbox/ack",
            &[("event_id", &id), ("csrf", &csrf)],
            &[
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "same-origin"),
            ],
        )
        .await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("another site"));
    for site in ["cross-site", "same-site"] {
        let p = b
            .post_with(
                "/council/inbox/ack",
                &[("event_id", &id), ("csrf", &csrf)],
                &[("sec-fetch-site", site)],
            )
            .await;
        assert_eq!(p.status, 403, "{site}");
    }
    // The same origin over plain http is another origin.
    let p = b
        .post_with(
            "/council/inbox/ack",
            &[("event_id", &id), ("csrf", &csrf)],
            &[("origin", &b.base.replace("https://", "http://"))],
        )
        .await;
    assert_eq!(p.status, 403);
    // Over HTTP/1.1 (a Host header) the same checks hold.
    let mut h1 = Browser::with_alpn(&env, false);
    h1.cookies = b.cookies.clone();
    let p = h1
        .post_with(
            "/council/inbox/ack",
            &[("event_id", &id), ("csrf", &csrf)],
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(p.status, 403);
    // A cross-site sign-in is refused too.
    let mut other = Browser::new(&env);
    let form = other.get("/council").await;
    let p = other
        .post_with(
            "/council/sign-in",
            &[("token", &leics), ("csrf", &form.csrf())],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(p.status, 403);
    assert!(!other.cookies.contains_key("cpis_council"));

    // Nothing changed.
    assert_eq!(env.mailbox(&leics, LEICS).await.len(), 1);
    assert_eq!(b.get("/council/inbox").await.event_ids(), vec![id.clone()]);
    // Nothing selected, or a malformed id: 400 with the error in words, nothing changed.
    let p = b.post("/council/inbox/ack", &[("csrf", &csrf)]).await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("Select at least one notice"));
    let p = b
        .post(
            "/council/inbox/ack",
            &[("csrf", &csrf), ("event_id", &id), ("event_id", "<b>x")],
        )
        .await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("&quot;&lt;b&gt;x&quot; is not a notice id"));
    assert_eq!(env.mailbox(&leics, LEICS).await.len(), 1);
    // With the token, same origin: it goes.
    let p = b
        .post("/council/inbox/ack", &[("csrf", &csrf), ("event_id", &id)])
        .await;
    assert_eq!(p.status, 303);
    assert!(env.mailbox(&leics, LEICS).await.is_empty());
    env.stop().await;
}

#[tokio::test]
async fn the_date_filter_overdue_marking_and_csv_export_follow_the_received_time() {
    // Overdue after 24 hours on this server.
    let env = Env::start_with(|c| c.council_overdue_hours = 24).await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let r = env
        .upload(
            &leics,
            LEICS,
            &csv(&[(1, "CPP", "2024-01-01", ""), (2, "CPP", "2024-01-01", "")]),
        )
        .await;
    assert_eq!(r.status(), 200);
    let d = env.enrol(EM).await;
    let old = d.event(1, t0(), &[LEICS], &[Cpp]);
    d.send_events(&env, std::slice::from_ref(&old)).await; // received 2025-06-01
    env.clock.advance(Age::days(2));
    let mut new = d.event(2, env.clock_now(), &[LEICS], &[Cpp]);
    new.staff_id = Some("=HYPERLINK(\"x\")".into());
    d.send_events(&env, std::slice::from_ref(&new)).await; // received 2025-06-03
    env.clock.advance(Age::hours(1));

    let mut b = Browser::new(&env);
    b.sign_in("/council", &leics).await;
    let all = b.get("/council/inbox").await;
    assert_eq!(
        all.event_ids(),
        vec![new.event_id.to_string(), old.event_id.to_string()]
    );
    let old_row = all.row("data-event-id", &old.event_id.to_string()).unwrap();
    assert!(old_row.contains("class=\"overdue\""), "{old_row}");
    assert!(old_row.contains("Overdue"));
    let new_row = all.row("data-event-id", &new.event_id.to_string()).unwrap();
    assert!(
        !new_row.contains("overdue") && !new_row.contains("Overdue"),
        "{new_row}"
    );
    assert!(
        all.body
            .contains("2 notices waiting to be acknowledged, 1 overdue")
    );
    assert!(
        all.body
            .contains("<form id=\"filter\" method=\"get\" action=\"/council/inbox\">")
    );

    // Filter by received date.
    let p = b.get("/council/inbox?from=2025-06-02&to=2025-06-03").await;
    assert_eq!(p.event_ids(), vec![new.event_id.to_string()]);
    assert!(p.body.contains(
        "id=\"from\" name=\"from\" type=\"text\" autocomplete=\"off\" value=\"2025-06-02\""
    ));
    assert!(
        p.body
            .contains("href=\"/council/inbox.csv?from=2025-06-02&amp;to=2025-06-03\"")
    );
    let p = b.get("/council/inbox?to=2025-06-01").await;
    assert_eq!(p.event_ids(), vec![old.event_id.to_string()]);
    let p = b.get("/council/inbox?from=2025-07-01").await;
    assert!(p.body.contains("id=\"empty\""));
    // A bad date: 400, the error in words, the typed value kept (escaped).
    let p = b.get("/council/inbox?from=1%2F6%2F2025%3Cx%3E").await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("role=\"alert\""));
    assert!(p.body.contains("is not a date: use YYYY-MM-DD"));
    assert!(p.body.contains("value=\"1/6/2025&lt;x&gt;\""));
    assert!(!p.body.contains("<x>"));
    let p = b.get("/council/inbox?from=2025-06-03&to=2025-06-01").await;
    assert_eq!(p.status, 400);
    assert!(p.body.contains("The from date is after the to date"));

    // CSV: an attachment, not stored, the documented columns, filtered.
    let r = b.get("/council/inbox.csv").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/csv; charset=utf-8");
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(
        r.header("content-disposition"),
        format!("attachment; filename=\"cpis-notices-{LEICS}-2025-06-03.csv\"")
    );
    let mut reader = csv::Reader::from_reader(r.body.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        headers,
        [
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
            "recent_contacts"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    let col = |r: &csv::StringRecord, name: &str| {
        r.get(headers.iter().position(|h| h == name).unwrap())
            .unwrap()
            .to_owned()
    };
    assert_eq!(col(&rows[0], "event_id"), new.event_id.to_string());
    assert_eq!(col(&rows[0], "nhs_number"), nhs(2).to_string());
    assert_eq!(col(&rows[0], "plan_types"), "CPP");
    assert_eq!(col(&rows[0], "organisation_ods"), "RX9");
    assert_eq!(
        col(&rows[0], "organisation_name"),
        "East Midlands Ambulance"
    );
    assert_eq!(col(&rows[0], "received_at"), "2025-06-03T12:00:00Z");
    assert_eq!(col(&rows[0], "overdue"), "false");
    assert_eq!(col(&rows[1], "overdue"), "true");
    assert_eq!(col(&rows[1], "accessed_at"), "2025-06-01T12:00:00Z");
    assert_eq!(col(&rows[1], "incident_ref"), "INC-1");
    assert!(
        col(&rows[1], "recent_contacts")
            .contains("2025-06-01 RX9 East Midlands Ambulance (ambulance)")
    );
    // A formula is kept as text.
    assert_eq!(col(&rows[0], "staff_id"), "'=HYPERLINK(\"x\")");
    let api = env.mailbox(&leics, LEICS).await;
    let by_event = api.iter().find(|n| n.event_id == old.event_id).unwrap();
    assert_eq!(col(&rows[1], "notification_id"), by_event.id.to_string());
    let filtered = b.get("/council/inbox.csv?from=2025-06-02").await;
    let n = csv::Reader::from_reader(filtered.body.as_bytes())
        .records()
        .count();
    assert_eq!(n, 1);
    // Acknowledging from a filtered inbox goes back to the same dates.
    let p = b.get("/council/inbox?from=2025-06-02&to=2025-06-03").await;
    let p = b
        .post(
            "/council/inbox/ack",
            &[
                ("csrf", &p.csrf()),
                ("event_id", &new.event_id.to_string()),
                ("from", "2025-06-02"),
                ("to", "2025-06-03"),
            ],
        )
        .await;
    assert_eq!(p.location(), "/council/inbox?from=2025-06-02&to=2025-06-03");
    let p = b.get(p.location()).await;
    assert!(p.body.contains("1 notice acknowledged"));
    assert!(p.body.contains("No notices waiting for these dates."));
    env.stop().await;
}

#[tokio::test]
async fn the_default_overdue_threshold_is_the_apis_five_days() {
    let (env, leics, _) = council_env().await;
    let d = env.enrol(EM).await;
    let e = d.event(1, t0(), &[LEICS], &[Cpp]);
    d.send_events(&env, std::slice::from_ref(&e)).await;
    let mut b = Browser::new(&env);
    env.clock.advance(Age::days(4));
    b.sign_in("/council", &leics).await;
    let p = b.get("/council/inbox").await;
    assert!(
        !p.row("data-event-id", &e.event_id.to_string())
            .unwrap()
            .contains("Overdue")
    );
    assert!(!env.mailbox(&leics, LEICS).await[0].overdue);
    env.clock.advance(Age::days(1) + Age::minutes(1));
    // (The session of 4 days ago has ended.)
    assert_eq!(b.get("/council/inbox").await.status, 303);
    b.sign_in("/council", &leics).await;
    let p = b.get("/council/inbox").await;
    assert!(
        p.row("data-event-id", &e.event_id.to_string())
            .unwrap()
            .contains("Overdue")
    );
    assert!(
        env.mailbox(&leics, LEICS).await[0].overdue,
        "the API agrees"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_council_never_sees_or_acknowledges_another_councils_notices_on_the_pages() {
    let (env, leics, notts) = council_env().await;
    let d = env.enrol(EM).await;
    let theirs = d.event(1, t0(), &[LEICS], &[Cpp]);
    let mine = d.event(3, t0(), &[NOTTS], &[Cpp]);
    d.send_events(&env, &[theirs.clone(), mine.clone()]).await;
    let mut b = Browser::new(&env);
    b.sign_in("/council", &notts).await;
    let p = b.get("/council/inbox").await;
    assert_eq!(p.event_ids(), vec![mine.event_id.to_string()]);
    assert!(!p.body.contains(&nhs(1).spaced()));
    let csv = b.get("/council/inbox.csv").await;
    assert!(!csv.body.contains(&theirs.event_id.to_string()));
    assert!(csv.body.contains(&mine.event_id.to_string()));
    // Acknowledging Leicestershire's notice from Nottinghamshire's session does nothing.
    let p = b
        .post(
            "/council/inbox/ack",
            &[
                ("csrf", &p.csrf()),
                ("event_id", &theirs.event_id.to_string()),
            ],
        )
        .await;
    assert_eq!(p.status, 303);
    assert!(
        b.get(p.location())
            .await
            .body
            .contains("0 notices acknowledged")
    );
    assert_eq!(env.mailbox(&leics, LEICS).await.len(), 1);
    assert_eq!(env.mailbox(&notts, NOTTS).await.len(), 1);
    // Leicestershire's uploads are not on Nottinghamshire's page.
    let up = b.get("/council/uploads").await;
    assert_eq!(up.body.matches("<tr data-upload-id=").count(), 1);
    // A session cookie is for the council pages only: the API still wants the bearer token.
    let r = env
        .client()
        .get(env.url(&format!("/v1/councils/{NOTTS}/notifications")))
        .header("cookie", b.cookie_header())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    env.stop().await;
}

#[tokio::test]
async fn the_uploads_page_shows_receipts_and_refused_uploads_with_their_errors() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let r = env
        .upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    let receipt: UploadReceipt = r.json().await.unwrap();
    env.clock.advance(Age::minutes(1));
    let bad = format!(
        "{HEADER}{},<script>alert(1)</script>,2024-01-01,,,\n12345,CPP,2024-01-01,,,\n",
        nhs(2)
    );
    let r = env.upload(&leics, LEICS, &bad).await;
    assert_eq!(r.status(), 422);

    let mut b = Browser::new(&env);
    b.sign_in("/council", &leics).await;
    let p = b.get("/council/uploads").await;
    assert_eq!(p.status, 200);
    p.assert_security_headers();
    let table = p.element("table", "uploads").unwrap();
    let applied = p
        .row("data-upload-id", &receipt.upload_id.to_string())
        .unwrap();
    assert!(applied.contains("Applied"));
    assert!(applied.contains("1 rows; 1 added"), "{applied}");
    let refused_at = table.find("<tr class=\"refused\"").unwrap();
    assert!(
        refused_at < table.find("data-upload-id").unwrap(),
        "newest first"
    );
    let refused = &table[refused_at..];
    assert!(refused.contains("Refused"));
    assert!(refused.contains("the upload has 2 error(s); nothing was applied"));
    assert!(
        refused.contains(
            "Line 2, column plan_type: plan_type &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;"
        ),
        "{refused}"
    );
    assert!(refused.contains("Line 3, column nhs_number"));
    assert!(!p.body.contains("<script>"), "the error text is escaped");
    // The refused upload changed nothing.
    assert_eq!(
        env.store()
            .council_flags(council(LEICS))
            .await
            .unwrap()
            .len(),
        1
    );

    env.stop().await;
}

#[tokio::test]
async fn an_upload_too_large_is_listed_as_refused() {
    let env = Env::start_with(|c| c.max_upload_bytes = 200).await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let big = csv(&(0..20)
        .map(|i| (i, "CPP", "2024-01-01", ""))
        .collect::<Vec<_>>());
    let r = env.upload(&leics, LEICS, &big).await;
    assert_eq!(r.status(), 413);
    let mut b = Browser::new(&env);
    b.sign_in("/council", &leics).await;
    let p = b.get("/council/uploads").await;
    let refused = p.row("class", "refused").unwrap();
    assert!(
        refused.contains("200"),
        "the limit in the message: {refused}"
    );
    // Uploads are bounded per council: the newest 100 attempts are kept.
    for _ in 0..105 {
        assert_eq!(env.upload(&leics, LEICS, &big).await.status(), 413);
    }
    let p = b.get("/council/uploads").await;
    assert_eq!(p.body.matches("<tr class=\"refused\"").count(), 100);
    env.stop().await;
}

#[tokio::test]
async fn council_names_and_tablet_text_are_escaped_everywhere() {
    let env = Env::start().await;
    env.seed().await;
    let code = "E10000099";
    env.store()
        .add_council(CouncilInfo {
            code: code.parse().unwrap(),
            name: "<script>alert('c')</script> & Co".into(),
            region: EM.parse().unwrap(),
            emergency_phone: "0116 000 0000".into(),
            office_phone: None,
        })
        .await
        .unwrap();
    let token = env.council_token(code).await;
    let r = env
        .upload(&token, code, &csv(&[(7, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    let d = env.enrol(EM).await;
    let mut e = d.event(7, t0(), &[code], &[Cpp]);
    e.staff_id = Some("<img src=x onerror=alert(1)>".into());
    e.incident_ref = Some("\"><script>alert(2)</script>".into());
    d.send_events(&env, std::slice::from_ref(&e)).await;
    let mut b = Browser::new(&env);
    b.sign_in("/council", &token).await;
    for path in ["/council/inbox", "/council/uploads"] {
        let p = b.get(path).await;
        assert_eq!(p.status, 200);
        assert!(
            p.body
                .contains("&lt;script&gt;alert(&#39;c&#39;)&lt;/script&gt; &amp; Co"),
            "{path}"
        );
        assert!(!p.body.contains("<script"), "{path}");
        assert!(!p.body.contains("<img"), "{path}");
    }
    let p = b.get("/council/inbox").await;
    assert!(p.body.contains("staff &lt;img src=x onerror=alert(1)&gt;"));
    assert!(
        p.body
            .contains("incident &quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;")
    );

    // A tablet named with terminal escape sequences: `admin device list` shows them as text
    // and never sends them to the administrator's terminal (nor breaks the table's columns).
    enrol_named(&env, "RX9", "Tab\u{1b}]0;owned\u{7}\u{1b}[2J\tlet\n7").await;
    let out = cli_admin(&env, &["device", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("Tab\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9}let\\u{a}7"),
        "{table}"
    );
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{7}'),
        "{table}"
    );
    let columns = table.lines().next().unwrap().split('\t').count();
    assert!(
        table.lines().all(|l| l.split('\t').count() == columns),
        "every row keeps the header's columns: {table}"
    );
    env.stop().await;
}

// ---- the fleet -------------------------------------------------------------------------------

/// A second trust, RYA, with an enrolment token for EM.
async fn second_trust_device(env: &Env, name: &str) -> Device {
    let s = env.store();
    if !s
        .trusts()
        .await
        .unwrap()
        .iter()
        .any(|t| t.code.as_str() == "RYA")
    {
        s.add_trust("RYA".parse().unwrap(), "<b>West</b> Ambulance".into())
            .await
            .unwrap();
    }
    enrol_named(env, "RYA", name).await
}

async fn enrol_named(env: &Env, trust: &str, name: &str) -> Device {
    let (token, hash) = tokens::new_secret(tokens::ENROLMENT_PREFIX);
    env.store()
        .add_enrolment_token(
            NewEnrolmentToken {
                hash,
                trust: trust.parse::<TrustCode>().unwrap(),
                region: EM.parse::<RegionId>().unwrap(),
                uses: 1,
                expires_at: env.clock_now() + Age::hours(1),
            },
            env.clock_now(),
        )
        .await
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let r = env
        .client()
        .post(env.url(paths::ENROL))
        .json(&EnrolRequest {
            token,
            csr_pem: csr,
            name: Some(name.into()),
            agent_version: "1.2.3".into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let enrolment: EnrolResponse = r.json().await.unwrap();
    let client = client(
        &env.ca,
        Some((&enrolment.client_cert_pem, &key.serialize_pem())),
    );
    Device { client, enrolment }
}

/// A trust admin token made by the CLI (`admin trust token`), as an administrator would.
fn cli_admin_token(env: &Env, trust: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args([
            "admin",
            "--data-dir",
            env.dir.path().to_str().unwrap(),
            "trust",
            "token",
            "--trust",
            trust,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown once"));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("cpis_at_"), "{token}");
    token
}

#[tokio::test]
async fn a_trust_admin_sees_only_its_own_devices_and_revokes_after_confirming() {
    let env = Env::start().await;
    env.seed().await;
    let ours = enrol_named(&env, "RX9", "Ambulance <b>7</b>").await;
    let spare = enrol_named(&env, "RX9", "Spare tablet").await;
    let theirs = second_trust_device(&env, "West tablet").await;
    // The tablet reports: outbox depth and data age show on the page.
    let report = cpis_protocol::DeviceReport {
        agent_version: "1.2.4".into(),
        data_epoch: Some(1),
        data_version: Some(3),
        data_as_of: Some(env.clock_now() - Age::hours(30)),
        outbox_pending: 7,
        outbox_set_aside: 0,
        client_cert_expires_at: None,
        reported_at: env.clock_now(),
        key_protection: Some(cpis_protocol::KeyProtection::File),
    };
    env.store()
        .record_device_report(ours.enrolment.device_id, report, env.clock_now())
        .await
        .unwrap();

    // The CLI refuses an unknown trust with exit code 2.
    let out = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args([
            "admin",
            "--data-dir",
            env.dir.path().to_str().unwrap(),
            "trust",
            "token",
            "--trust",
            "ZZ9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let token = cli_admin_token(&env, "RX9");

    let mut b = Browser::new(&env);
    assert_eq!(b.get("/fleet/devices").await.location(), "/fleet");
    let form = b.get("/fleet").await;
    form.assert_security_headers();
    assert!(
        form.body
            .contains("<form id=\"sign-in\" method=\"post\" action=\"/fleet/sign-in\">")
    );
    // A council token is not a trust admin token.
    let council_token = env.council_token(LEICS).await;
    let p = b.sign_in("/fleet", &council_token).await;
    assert_eq!(p.status, 401);
    assert!(p.body.contains("That token was not accepted"));
    let p = b.sign_in("/fleet", &token).await;
    assert_eq!((p.status, p.location()), (303, "/fleet/devices"));
    assert!(b.cookies.contains_key("cpis_fleet"));

    let page = b.get("/fleet/devices").await;
    assert_eq!(page.status, 200);
    page.assert_security_headers();
    let table = page.element("table", "devices").unwrap();
    let id = ours.enrolment.device_id.to_string();
    assert!(table.contains(&id));
    assert!(table.contains(&spare.enrolment.device_id.to_string()));
    assert!(
        !page.body.contains(&theirs.enrolment.device_id.to_string()),
        "another trust's device"
    );
    assert!(!page.body.contains("West tablet"));
    let row = page.row("data-device-id", &id).unwrap();
    assert!(row.contains("Ambulance &lt;b&gt;7&lt;/b&gt;"), "{row}");
    assert!(row.contains(">EM<"));
    assert!(row.contains("1d 06h"), "data age: {row}");
    assert!(row.contains("7 waiting"), "outbox: {row}");
    assert!(row.contains("1.2.4"), "app version: {row}");
    assert!(row.contains("data-keys=\"file\">Key file"), "keys: {row}");
    assert!(row.contains("Stale data"));
    // Trust IT is told how many tablets keep their keys in a file.
    let alert = page.element("div", "key-files").unwrap();
    assert!(
        alert.contains("1 active tablet(s) keep their keys in a file"),
        "{alert}"
    );
    assert!(row.contains(&format!(
        "<a class=\"revoke\" href=\"/fleet/devices/{id}/revoke\">"
    )));
    let spare_row = page
        .row("data-device-id", &spare.enrolment.device_id.to_string())
        .unwrap();
    assert!(spare_row.contains("No report yet"));
    assert!(
        spare_row.contains("data-keys=\"unknown\">Not reported"),
        "{spare_row}"
    );
    assert!(page.body.contains("id=\"no-revoked\">No revoked devices."));
    assert!(page.element("table", "revoked").is_some());

    // Another trust's device: not found, nothing changed, even with a valid csrf.
    let other = theirs.enrolment.device_id.to_string();
    let p = b.get(&format!("/fleet/devices/{other}/revoke")).await;
    assert_eq!(p.status, 404);
    let p = b
        .post(
            &format!("/fleet/devices/{other}/revoke"),
            &[("csrf", &page.csrf())],
        )
        .await;
    assert_eq!(p.status, 404);
    assert!(
        env.store()
            .device(theirs.enrolment.device_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );

    // The confirmation page says what revoking does.
    let confirm = b.get(&format!("/fleet/devices/{id}/revoke")).await;
    assert_eq!(confirm.status, 200);
    confirm.assert_security_headers();
    let form = confirm.element("form", "confirm-revoke").unwrap();
    assert!(form.contains(&format!(
        "method=\"post\" action=\"/fleet/devices/{id}/revoke\""
    )));
    assert!(form.contains("id=\"confirm\""));
    assert!(form.contains("href=\"/fleet/devices\">Cancel</a>"));
    assert!(confirm.body.contains("shreds its data"));
    // Without the csrf, or from another site: refused, not revoked.
    let p = b.post(&format!("/fleet/devices/{id}/revoke"), &[]).await;
    assert_eq!(p.status, 403);
    let p = b
        .post_with(
            &format!("/fleet/devices/{id}/revoke"),
            &[("csrf", &confirm.csrf())],
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(p.status, 403);
    assert!(
        env.store()
            .device(ours.enrolment.device_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    let r = ours
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still enrolled");

    // Confirmed: revoked, gone from the active table, listed as revoked.
    let p = b
        .post(
            &format!("/fleet/devices/{id}/revoke"),
            &[("csrf", &confirm.csrf())],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location(), "/fleet/devices");
    let after = b.get(p.location()).await;
    assert!(after.body.contains("was revoked"));
    assert!(!after.element("table", "devices").unwrap().contains(&id));
    assert!(
        after
            .element("table", "revoked")
            .unwrap()
            .contains(&format!("<tr data-device-id=\"{id}\""))
    );
    assert!(
        after
            .element("table", "devices")
            .unwrap()
            .contains(&spare.enrolment.device_id.to_string())
    );
    // The device API now refuses the tablet and tells it to wipe.
    let r = ours
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, codes::DEVICE_REVOKED);
    assert!(body.error.wipe);
    // The other trust's tablet still works.
    let r = theirs
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Asking again: already revoked, no form.
    let again = b.get(&format!("/fleet/devices/{id}/revoke")).await;
    assert!(again.body.contains("already revoked"));
    assert!(!again.body.contains("confirm-revoke"));

    // The other trust's admin sees only its device; its name is escaped.
    let west = cli_admin_token(&env, "RYA");
    let mut w = Browser::new(&env);
    w.sign_in("/fleet", &west).await;
    let p = w.get("/fleet/devices").await;
    assert!(p.body.contains(&other));
    assert!(!p.body.contains(&id));
    assert!(p.body.contains("&lt;b&gt;West&lt;/b&gt; Ambulance"));
    assert!(!p.body.contains("<b>"));
    // The fleet session is not a council session.
    w.cookies
        .insert("cpis_council".into(), w.cookies["cpis_fleet"].clone());
    assert_eq!(w.get("/council/inbox").await.status, 303);
    env.stop().await;
}

/// `cpis-sync-server admin --data-dir DIR ARGS...` on the served data dir.
fn cli_admin(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args(["admin", "--data-dir", env.dir.path().to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// The token a successful `admin ... token` printed.
fn printed_token(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test]
async fn revoked_and_expired_tokens_are_refused_on_every_route_and_end_page_sessions_at_once() {
    let (env, _, notts) = council_env().await;
    let listing = |token: String| {
        env.client()
            .get(env.url(&format!("/v1/councils/{LEICS}/notifications")))
            .bearer_auth(token)
            .send()
    };
    let code = |r: reqwest::Response| async move {
        (
            r.status().as_u16(),
            r.json::<ErrorBody>().await.unwrap().error.code,
        )
    };
    // Two tokens from the CLI: one valid until revoked, one for 2 hours.
    let forever = printed_token(&cli_admin(&env, &["council", "token", "--ods", LEICS]));
    let out = cli_admin(
        &env,
        &["council", "token", "--ods", LEICS, "--expires", "2h"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("expires"));
    let expiring = printed_token(&out);
    assert_eq!(listing(forever.clone()).await.unwrap().status(), 200);
    assert_eq!(listing(expiring.clone()).await.unwrap().status(), 200);
    let bad_expiry = cli_admin(
        &env,
        &["council", "token", "--ods", LEICS, "--expires", "soon"],
    );
    assert_eq!(bad_expiry.status.code(), Some(2));

    // A council signed in to its inbox, a trust admin to its fleet page.
    let mut council = Browser::new(&env);
    let p = council.sign_in("/council", &forever).await;
    assert_eq!(p.status, 303);
    assert_eq!(council.get("/council/inbox").await.status, 200);
    let admin = cli_admin_token(&env, "RX9");
    let mut fleet = Browser::new(&env);
    assert_eq!(fleet.sign_in("/fleet", &admin).await.status, 303);
    assert_eq!(fleet.get("/fleet/devices").await.status, 200);

    // Revoking the council's tokens: every route refuses them with `token_revoked`, and the
    // page session ends at its next request.
    let out = cli_admin(&env, &["council", "revoke-tokens", "--ods", LEICS]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("revoked 3 token(s) of council"), "{said}");
    for token in [&forever, &expiring] {
        assert_eq!(
            code(listing(token.clone()).await.unwrap()).await,
            (401, codes::BEARER_REVOKED.to_owned())
        );
    }
    let upload = env
        .upload(&forever, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(code(upload).await, (401, codes::BEARER_REVOKED.to_owned()));
    let ack = env
        .client()
        .post(env.url(&format!("/v1/councils/{LEICS}/notifications/ack")))
        .bearer_auth(&forever)
        .json(&serde_json::json!({"ids": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(ack).await, (401, codes::BEARER_REVOKED.to_owned()));
    let p = council.get("/council/inbox").await;
    assert_eq!((p.status, p.location()), (303, "/council"));
    let mut again = Browser::new(&env);
    assert_eq!(again.sign_in("/council", &forever).await.status, 401);
    // Another council is not touched; a new token works.
    let notts_listing = env
        .client()
        .get(env.url(&format!("/v1/councils/{NOTTS}/notifications")))
        .bearer_auth(&notts)
        .send()
        .await
        .unwrap();
    assert_eq!(notts_listing.status(), 200);
    let fresh = printed_token(&cli_admin(&env, &["council", "token", "--ods", LEICS]));
    assert_eq!(listing(fresh.clone()).await.unwrap().status(), 200);

    // The trust's admin tokens: its fleet session ends and the token is refused.
    let out = cli_admin(&env, &["trust", "revoke-tokens", "--trust", "RX9"]);
    assert!(out.status.success());
    let p = fleet.get("/fleet/devices").await;
    assert_eq!((p.status, p.location()), (303, "/fleet"));
    assert_eq!(
        Browser::new(&env).sign_in("/fleet", &admin).await.status,
        401
    );
    let unknown = cli_admin(&env, &["trust", "revoke-tokens", "--trust", "ZZ9"]);
    assert_eq!(unknown.status.code(), Some(2));

    // Expiry: a token made for 2 hours is refused once they are over (`token_expired`),
    // one made without `--expires` is not.
    let short = printed_token(&cli_admin(
        &env,
        &["council", "token", "--ods", LEICS, "--expires", "2h"],
    ));
    env.clock.set(chrono::Utc::now() + Age::hours(3));
    assert_eq!(
        code(listing(short).await.unwrap()).await,
        (401, codes::BEARER_EXPIRED.to_owned())
    );
    assert_eq!(listing(fresh).await.unwrap().status(), 200);
    env.stop().await;
}
