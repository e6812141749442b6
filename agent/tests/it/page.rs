//! The paramedic page on the agent's loopback listener, driven over HTTP like a browser
//! would: the staff id once per shift, each kind of result with its content, invalid input
//! (400, value kept, nothing recorded), the freshness banner as the data ages, the outbox
//! count, HTML escaping of everything typed, the CSRF / cross-site / Host (DNS rebinding)
//! refusals that record nothing, the security headers, and — under `run` against the real
//! server — a page lookup going through the same national check and outbox as the JSON API.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cpis_agent::api::LocalApi;
use cpis_agent::{Agent, ManualClock, SystemClock};
use cpis_protocol::{
    CareSetting, FlagRecord, Organisation, RecentContact, SignedMessage, SnapshotBody,
    SnapshotMeta, SubjectContacts, encode_body,
};

use crate::common::*;

const CSP: &str = "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How `Html::text` escapes: what a name must look like in the page.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn urlenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One answer from the page.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn result(&self) -> &str {
        let start = self
            .body
            .find("<section id=\"result\"")
            .unwrap_or_else(|| panic!("no section#result in:\n{}", self.body));
        let end = self.body[start..].find("</section>").unwrap() + start;
        &self.body[start..end]
    }

    fn data_result(&self) -> &str {
        let r = self.result();
        let s = r.find("data-result=\"").unwrap() + "data-result=\"".len();
        &r[s..s + r[s..].find('"').unwrap()]
    }

    fn freshness(&self) -> &str {
        let s = self
            .body
            .find("id=\"freshness-banner\" data-freshness=\"")
            .unwrap_or_else(|| panic!("no banner in:\n{}", self.body))
            + "id=\"freshness-banner\" data-freshness=\"".len();
        &self.body[s..s + self.body[s..].find('"').unwrap()]
    }

    fn banner(&self) -> &str {
        let s = self.body.find("id=\"freshness-banner\"").unwrap();
        &self.body[s..s + self.body[s..].find("</div>").unwrap()]
    }

    fn outbox(&self) -> &str {
        let s = self.body.find("<p id=\"outbox-pending\">").unwrap() + 23;
        &self.body[s..s + self.body[s..].find("</p>").unwrap()]
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }
}

/// A browser tab: cookies kept, redirects not followed, the CSRF token from the last page.
struct Tab {
    base: String,
    client: reqwest::Client,
    cookies: Vec<(String, String)>,
    csrf: String,
}

impl Tab {
    fn new(addr: std::net::SocketAddr) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Vec::new(),
            csrf: String::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, rb: reqwest::RequestBuilder) -> Answer {
        let rb = if self.cookies.is_empty() {
            rb
        } else {
            rb.header("cookie", self.cookie_header())
        };
        let resp = tokio::time::timeout(Duration::from_secs(30), rb.send())
            .await
            .expect("the page answers within 30 s")
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap();
        let a = Answer {
            status,
            headers,
            body,
        };
        for c in a.set_cookies() {
            let (k, v) = c.split(';').next().unwrap().split_once('=').unwrap();
            self.cookies.retain(|(n, _)| n != k);
            if !c.contains("Max-Age=0") {
                self.cookies.push((k.to_owned(), v.to_owned()));
            }
        }
        if let Some(s) = a.body.find("name=\"csrf\" value=\"") {
            let s = s + "name=\"csrf\" value=\"".len();
            self.csrf = a.body[s..s + a.body[s..].find('"').unwrap()].to_owned();
        }
        a
    }

    async fn get(&mut self, path: &str) -> Answer {
        let rb = self.client.get(format!("{}{path}", self.base));
        self.send(rb).await
    }

    /// A POST as the page's own form sends it (with this tab's token).
    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let csrf = self.csrf.clone();
        let mut all = fields.to_vec();
        all.push(("csrf", &csrf));
        self.post_raw(path, &all, &[]).await
    }

    async fn post_raw(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", urlenc(k), urlenc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut rb = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        self.send(rb).await
    }

    /// Starts a shift as `staff`.
    async fn shift(&mut self, staff: &str) {
        self.get("/").await;
        let a = self.post("/shift", &[("staff_id", staff)]).await;
        assert_eq!(a.status, 303, "{}", a.body);
        let a = self.get("/").await;
        assert!(a.body.contains("<form id=\"lookup\""), "{}", a.body);
    }
}

/// A subject with flags in the data, its flags, and a council name with no character that
/// needs escaping beyond what `esc` does.
struct Fixture {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    clock: Arc<ManualClock>,
    data: RegionData,
    api: LocalApi,
    hit: FlagRecord,
    miss: String,
}

/// A snapshot like `Feed::snapshot`, carrying recent contacts of `with_contacts`.
fn snapshot_with_contacts(
    feed: &Feed,
    data: &RegionData,
    version: u64,
    with_contacts: &FlagRecord,
) -> (SignedMessage, Vec<u8>) {
    let body = SnapshotBody {
        councils: data.councils.clone(),
        flags: data.flags.clone(),
        contacts: vec![SubjectContacts {
            nhs_number: with_contacts.nhs_number,
            contacts: vec![RecentContact {
                date: as_of_day() - chrono::Duration::days(3),
                organisation: Organisation {
                    ods: "RX9".parse().unwrap(),
                    name: "Midshire Ambulance Service".into(),
                },
                setting: CareSetting::Ambulance,
            }],
        }],
    };
    let (bytes, info) = encode_body(&body, 3).unwrap();
    let meta = SnapshotMeta {
        region: feed.region.clone(),
        epoch: 1,
        version,
        server_time: t0(),
        flag_count: data.flags.len() as u64,
        body: info,
    };
    (SignedMessage::sign(&feed.key, &meta), bytes)
}

async fn fixture_page(seed: u64, install_data: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(seed, 300);
    let feed = Feed::new(data.region.clone());
    let (agent, clock) = new_agent(dir.path(), &feed);
    // An active flag, so the subject is shown as flagged with no end date.
    let hit = data
        .flags
        .iter()
        .find(|f| f.end_date.is_none())
        .unwrap()
        .clone();
    if install_data {
        let cp = agent
            .accept_checkpoint(&feed.checkpoint(1, 5, t0()))
            .unwrap();
        let (meta, body) = snapshot_with_contacts(&feed, &data, 5, &hit);
        agent.apply_snapshot(&cp, &meta, &body).unwrap();
    }
    let miss = unflagged_number(&data.flags).to_string();
    let agent = Arc::new(agent);
    let api = LocalApi::bind(agent.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Fixture {
        _dir: dir,
        agent,
        clock,
        data,
        api,
        hit,
        miss,
    }
}

fn pending(agent: &Agent) -> u64 {
    agent.outbox_counts().unwrap().0
}

fn dashed(n: &str) -> String {
    format!("{}-{}-{}", &n[..3], &n[3..6], &n[6..])
}

fn assert_page_headers(a: &Answer) {
    let h = &a.headers;
    assert_eq!(h["content-security-policy"], CSP);
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cache-control"], "no-store");
    assert!(
        h["content-type"].to_str().unwrap().starts_with("text/html"),
        "{:?}",
        h["content-type"]
    );
    assert!(a.body.starts_with("<!DOCTYPE html>"));
    assert!(a.body.contains("<html lang=\"en-GB\">"));
    assert_eq!(a.body.matches("<h1").count(), 1, "{}", a.body);
    assert_eq!(a.body.matches("<main").count(), 1);
    assert!(!a.body.contains("<script"), "the page needs no script");
    assert!(
        !a.body.contains("http://") && !a.body.contains("https://"),
        "no external asset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_id_once_per_shift_then_a_flagged_child_with_plans_council_phone_and_contacts() {
    let f = fixture_page(81, true).await;
    let mut tab = Tab::new(f.api.local_addr());

    // First visit: the banner, the outbox, the staff-id form and no lookup form.
    let a = tab.get("/").await;
    assert_eq!(a.status, 200);
    assert_page_headers(&a);
    assert_eq!(a.freshness(), "fresh");
    assert!(
        a.banner()
            .contains("last verified update less than a minute ago"),
        "{}",
        a.banner()
    );
    assert_eq!(a.outbox(), "0 notices waiting to be sent");
    // The footer says how the keys are protected (this tablet's are in a file).
    assert!(
        a.body.contains(
            "<p id=\"key-protection\" data-key-protection=\"file\">Keys: in a file on the \
             tablet&#39;s disk, not sealed by a TPM"
        ),
        "{}",
        a.body
    );
    assert!(
        a.body
            .contains("<form id=\"staff\" class=\"ask\" method=\"post\" action=\"/shift\">")
    );
    assert!(a.body.contains("<input id=\"staff-id\" name=\"staff_id\""));
    assert!(!a.body.contains("id=\"lookup\""));
    let csrf_cookie = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("cpis_csrf="))
        .expect("a CSRF cookie is issued");
    assert!(csrf_cookie.contains("HttpOnly") && csrf_cookie.contains("SameSite=Strict"));
    assert!(!tab.csrf.is_empty());

    // A lookup before the staff id: asked for it, nothing looked up.
    let n = f.hit.nhs_number.to_string();
    let a = tab.post("/lookup", &[("nhs_number", &n)]).await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("role=\"alert\""));
    assert!(
        a.body.contains("Enter your staff id before checking"),
        "{}",
        a.body
    );
    assert!(a.body.contains("<form id=\"staff\""));
    assert!(!a.body.contains("id=\"result\""));
    assert_eq!(pending(&f.agent), 0, "no staff id: nothing recorded");

    // An empty, then an invalid staff id: 400 with the reason, the value kept (escaped).
    let a = tab.post("/shift", &[("staff_id", "  ")]).await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("Enter your staff id."));
    let a = tab
        .post("/shift", &[("staff_id", "P1\"><script>x</script>")])
        .await;
    assert_eq!(a.status, 400);
    assert!(
        a.body.contains("may only hold letters, digits"),
        "{}",
        a.body
    );
    assert!(!a.body.contains("<script>x"), "typed text is never markup");
    assert!(
        a.body
            .contains("value=\"P1&quot;&gt;&lt;script&gt;x&lt;/script&gt;\"")
    );
    assert!(
        a.set_cookies()
            .iter()
            .all(|c| !c.starts_with("cpis_staff="))
    );

    // The staff id: a cookie for one 12-hour shift, then the lookup form.
    let a = tab.post("/shift", &[("staff_id", "P123")]).await;
    assert_eq!(a.status, 303);
    assert_eq!(a.headers["location"], "/");
    let staff_cookie = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("cpis_staff="))
        .unwrap();
    assert_eq!(
        staff_cookie,
        "cpis_staff=P123; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200"
    );
    let a = tab.get("/").await;
    assert_page_headers(&a);
    assert!(
        a.body
            .contains("Staff id: <strong id=\"staff-shown\">P123</strong>")
    );
    assert!(
        a.body
            .contains("<form id=\"end-shift\" method=\"post\" action=\"/shift/end\">")
    );
    assert!(a.body.contains(">End shift</button>"));
    assert!(
        a.body.contains(
            "<form id=\"lookup\" class=\"ask\" method=\"post\" action=\"/lookup#result\">"
        )
    );
    assert!(a.body.contains(
        "<input id=\"nhs-number\" name=\"nhs_number\" type=\"text\" inputmode=\"numeric\" autocomplete=\"off\" spellcheck=\"false\" autofocus"
    ));
    assert!(
        a.body
            .contains("<input id=\"incident-ref\" name=\"incident_ref\"")
    );
    assert!(a.body.contains(">Check</button>"));
    assert!(!a.body.contains("id=\"staff-id\""));

    // The flagged child, typed with dashes.
    let a = tab
        .post(
            "/lookup",
            &[("nhs_number", &dashed(&n)), ("incident_ref", "INC-7")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_page_headers(&a);
    assert_eq!(a.data_result(), "flagged");
    let r = a.result();
    assert!(r.contains("<h2 id=\"result-heading\">FLAGGED</h2>"));
    assert!(r.contains("role=\"alert\""));
    assert!(r.contains("<svg"), "an icon with the words");
    assert!(r.contains(&format!("NHS number {}", f.hit.nhs_number.spaced())));
    let words = match f.hit.plan_type.as_str() {
        "CPP" => "Child Protection Plan",
        "LAC" => "Looked After Child",
        _ => "Unborn Child Protection Plan",
    };
    assert!(r.contains(words), "{r}");
    assert!(
        r.contains(&f.hit.start_date.format("%-d %B %Y").to_string()),
        "start date in en-GB words: {r}"
    );
    let council = f
        .data
        .councils
        .iter()
        .find(|c| c.code == f.hit.council)
        .unwrap();
    assert!(r.contains(&esc(&council.name)), "{r}");
    let digits: String = council
        .emergency_phone
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let tel = format!(
        "<a class=\"tel\" href=\"tel:+44{}\">Call {}</a>",
        &digits[1..],
        council.emergency_phone
    );
    assert!(r.contains(&tel), "tap-to-call {tel} in {r}");
    if let Some(office) = &council.office_phone {
        assert!(r.contains(office.as_str()), "{r}");
    }
    assert!(r.contains("<ul id=\"recent-contacts\">"), "{r}");
    assert!(r.contains("Midshire Ambulance Service (ambulance)"));
    let contact_day = (as_of_day() - chrono::Duration::days(3))
        .format("%-d %B %Y")
        .to_string();
    assert!(r.contains(&contact_day));
    // Recorded with the staff id and the incident, and counted at the top.
    assert_eq!(a.outbox(), "1 notice waiting to be sent");
    let events = f.agent.pending_events(10).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].nhs_number, f.hit.nhs_number);
    assert_eq!(events[0].staff_id.as_deref(), Some("P123"));
    assert_eq!(events[0].incident_ref.as_deref(), Some("INC-7"));
    assert_eq!(events[0].result, cpis_protocol::LookupResult::Flagged);
    // The NHS number went in the body only; the answer's URL is the form's.
    assert!(!a.headers.contains_key("location"));

    // End of shift: the cookie is cleared and the next visitor is asked again.
    let a = tab.post("/shift/end", &[]).await;
    assert_eq!(a.status, 303);
    assert!(
        a.set_cookies()
            .iter()
            .any(|c| c.starts_with("cpis_staff=;") && c.contains("Max-Age=0"))
    );
    let a = tab.get("/").await;
    assert!(a.body.contains("<form id=\"staff\""));
    assert!(!a.body.contains("P123"));
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_flagged_shows_coverage_and_age_then_the_banner_and_results_follow_the_data_age() {
    let f = fixture_page(82, true).await;
    let mut tab = Tab::new(f.api.local_addr());
    tab.shift("P9").await;

    let a = tab.post("/lookup", &[("nhs_number", &f.miss)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.data_result(), "not_flagged");
    let r = a.result();
    assert!(r.contains("NOT FLAGGED"));
    assert!(
        r.contains(&format!("region <strong>{}</strong>", f.data.region)),
        "{r}"
    );
    for c in &f.data.councils {
        assert!(
            r.contains(&format!("<li>{}</li>", esc(&c.name))),
            "{} in {r}",
            c.name
        );
    }
    assert!(r.contains(&format!("{} councils", f.data.councils.len())));
    assert!(
        r.contains("last verified update less than a minute ago"),
        "{r}"
    );
    assert_eq!(a.freshness(), "fresh");

    // 26 hours on: stale, said in words with the age.
    f.clock.advance(Duration::from_secs(26 * 3600));
    let a = tab.get("/").await;
    assert_eq!(a.freshness(), "stale");
    assert!(
        a.banner()
            .contains("<strong>STALE DATA</strong> — last verified update 26 hours ago"),
        "{}",
        a.banner()
    );
    assert!(a.banner().contains("<svg"), "an icon with the words");
    let a = tab.post("/lookup", &[("nhs_number", &f.miss)]).await;
    assert_eq!(a.data_result(), "not_flagged");
    assert_eq!(a.freshness(), "stale");

    // Eight days on: expired; a miss is UNKNOWN with the reason, a match still shows.
    f.clock.advance(Duration::from_secs(6 * 86400 + 22 * 3600));
    let a = tab.get("/").await;
    assert_eq!(a.freshness(), "expired");
    assert!(
        a.banner()
            .contains("<strong>EXPIRED DATA</strong> — last verified update 8 days ago"),
        "{}",
        a.banner()
    );
    let a = tab.post("/lookup", &[("nhs_number", &f.miss)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.data_result(), "unknown");
    let r = a.result();
    assert!(r.contains("<h2 id=\"result-heading\">UNKNOWN</h2>"));
    assert!(
        r.contains("the data is too old to rely on (last verified update 8 days ago)"),
        "{r}"
    );
    assert_eq!(a.freshness(), "expired");
    let a = tab
        .post("/lookup", &[("nhs_number", &f.hit.nhs_number.spaced())])
        .await;
    assert_eq!(a.data_result(), "flagged");
    assert_eq!(a.freshness(), "expired");
    assert_eq!(a.outbox(), "4 notices waiting to be sent");
    assert_eq!(pending(&f.agent), 4);
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tablet_with_no_data_answers_unknown_with_the_reason() {
    let f = fixture_page(83, false).await;
    let mut tab = Tab::new(f.api.local_addr());
    tab.shift("P9").await;
    let a = tab.get("/").await;
    assert_eq!(a.freshness(), "expired");
    assert!(
        a.banner().contains("<strong>NO DATA</strong>"),
        "{}",
        a.banner()
    );
    let a = tab.post("/lookup", &[("nhs_number", &f.miss)]).await;
    assert_eq!(a.data_result(), "unknown");
    assert!(
        a.result().contains("no flag data is on this tablet yet"),
        "{}",
        a.result()
    );
    assert_eq!(pending(&f.agent), 1, "an unknown answer is recorded too");
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_numbers_get_400_with_the_reason_the_value_kept_escaped_and_nothing_recorded() {
    let f = fixture_page(84, true).await;
    let mut tab = Tab::new(f.api.local_addr());
    tab.shift("P9").await;
    let cases = [
        ("943 476 5918", "Wrong check digit"),
        ("94347659", "has 10 digits; this one has 8"),
        ("943476591912", "has 10 digits; this one has 12"),
        ("94a4765919", "digits only: character 3 is “a”"),
        ("", "Type the 10-digit NHS number"),
    ];
    for (typed, reason) in cases {
        let a = tab
            .post(
                "/lookup",
                &[("nhs_number", typed), ("incident_ref", "INC 1")],
            )
            .await;
        assert_eq!(a.status, 400, "{typed}");
        assert_page_headers(&a);
        assert_eq!(a.data_result(), "invalid", "{typed}");
        let r = a.result();
        assert!(r.contains(reason), "{typed}: {r}");
        assert!(r.contains("role=\"alert\""));
        assert!(r.contains("nothing was recorded"));
        assert!(
            a.body.contains(&format!(
                "aria-describedby=\"nhs-hint nhs-error\" value=\"{typed}\""
            )),
            "{typed} kept in the field: {}",
            a.body
        );
        assert!(a.body.contains("value=\"INC 1\""), "the incident kept");
    }
    // Markup typed in the field is shown as text, never as markup.
    let evil = "<script>alert(1)</script>\"'&";
    let a = tab.post("/lookup", &[("nhs_number", evil)]).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.data_result(), "invalid");
    assert!(!a.body.contains("<script>alert(1)"), "{}", a.body);
    assert!(
        a.body
            .contains("value=\"&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;\""),
        "{}",
        a.body
    );
    assert!(
        a.result().contains("character 1 is “&lt;”"),
        "{}",
        a.result()
    );
    // A bad incident reference is refused too, before anything is looked up.
    let long = "X".repeat(65);
    let a = tab
        .post(
            "/lookup",
            &[("nhs_number", &f.miss), ("incident_ref", &long)],
        )
        .await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("at most 64 characters; this one has 65"));
    assert!(!a.body.contains("id=\"result\""));
    assert_eq!(pending(&f.agent), 0, "invalid input records nothing");
    assert_eq!(a.outbox(), "0 notices waiting to be sent");
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_cross_site_posts_are_refused_and_record_nothing() {
    let f = fixture_page(85, true).await;
    let addr = f.api.local_addr();
    let mut tab = Tab::new(addr);
    tab.shift("P9").await;
    let n = f.miss.clone();
    let good = tab.csrf.clone();

    // No token, another token, a token not issued by this agent (cookie and field alike).
    let a = tab.post_raw("/lookup", &[("nhs_number", &n)], &[]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("role=\"alert\""));
    assert!(a.body.contains("Nothing was looked up or changed"));
    let a = tab
        .post_raw("/lookup", &[("nhs_number", &n), ("csrf", "abc.def")], &[])
        .await;
    assert_eq!(a.status, 403);
    let forged = format!("{}.{}", "00".repeat(16), "11".repeat(32));
    let mut other = Tab::new(addr);
    other.cookies = vec![
        ("cpis_staff".into(), "P9".into()),
        ("cpis_csrf".into(), forged.clone()),
    ];
    let a = other
        .post_raw("/lookup", &[("nhs_number", &n), ("csrf", &forged)], &[])
        .await;
    assert_eq!(a.status, 403);
    // A cookie-less request with a once-good token.
    let mut bare = Tab::new(addr);
    let a = bare
        .post_raw("/lookup", &[("nhs_number", &n), ("csrf", &good)], &[])
        .await;
    assert_eq!(a.status, 403);

    // The right token, sent by another site.
    let fields = [("nhs_number", n.as_str()), ("csrf", good.as_str())];
    for headers in [
        vec![("sec-fetch-site", "cross-site")],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![("origin", "https://127.0.0.1")],
    ] {
        let a = tab.post_raw("/lookup", &fields, &headers).await;
        assert_eq!(a.status, 403, "{headers:?}");
        assert!(a.body.contains("came from another site"), "{headers:?}");
        assert!(!a.body.contains("id=\"result\""));
    }
    let a = tab
        .post_raw(
            "/shift",
            &[("staff_id", "EVIL"), ("csrf", &good)],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(a.status, 403);
    assert!(
        a.set_cookies()
            .iter()
            .all(|c| !c.starts_with("cpis_staff="))
    );
    let a = tab
        .post_raw(
            "/shift/end",
            &[("csrf", &good)],
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(a.status, 403);
    assert!(
        a.set_cookies()
            .iter()
            .all(|c| !c.starts_with("cpis_staff="))
    );
    assert_eq!(pending(&f.agent), 0, "nothing refused was recorded");

    // The page's own form, as a browser sends it, goes through.
    let origin = format!("http://{addr}");
    let a = tab
        .post_raw(
            "/lookup",
            &fields,
            &[("sec-fetch-site", "same-origin"), ("origin", &origin)],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.data_result(), "not_flagged");
    assert_eq!(pending(&f.agent), 1);
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_another_host_are_refused_dns_rebinding() {
    let f = fixture_page(86, true).await;
    let addr = f.api.local_addr();
    let port = addr.port();
    let mut tab = Tab::new(addr);
    tab.shift("P9").await;
    let good = tab.csrf.clone();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        let rb = tab
            .client
            .get(format!("{}/", tab.base))
            .header("host", &host);
        let a = tab.send(rb).await;
        assert_eq!(a.status, 421, "{host}");
        assert!(
            a.body.contains("answers only requests addressed to"),
            "{host}"
        );
        assert!(!a.body.contains("freshness-banner"), "no data for {host}");
        assert_eq!(a.headers["content-security-policy"], CSP);
        let a = tab
            .post_raw(
                "/lookup",
                &[("nhs_number", &f.miss), ("csrf", &good)],
                &[("host", &host)],
            )
            .await;
        assert_eq!(a.status, 421, "{host}");
        // The JSON API is guarded the same way.
        let rb = tab
            .client
            .post(format!("{}/v1/lookups", tab.base))
            .header("host", &host)
            .json(&serde_json::json!({"nhs_number": f.miss}));
        let a = tab.send(rb).await;
        assert_eq!(a.status, 421, "{host}");
        let e: cpis_protocol::api::ErrorBody = serde_json::from_str(&a.body).unwrap();
        assert_eq!(e.error.code, "bad_host");
    }
    assert_eq!(pending(&f.agent), 0);
    // localhost with the port is this agent.
    let rb = tab
        .client
        .get(format!("{}/", tab.base))
        .header("host", format!("localhost:{port}"));
    let a = tab.send(rb).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("freshness-banner"));
    f.api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_run_a_page_lookup_is_checked_nationally_and_its_notice_delivered() {
    use crate::server::*;
    let mut env = Env::start(Utc::now()).await;
    with_another_region(&mut env).await;
    let dir = tempfile::tempdir().unwrap();
    let token = env.enrolment_token(1, chrono::Duration::hours(1)).await;
    let agent = Arc::new(
        cpis_agent::sync::enrol(
            dir.path(),
            &env.base,
            &env.ca,
            &token,
            None,
            Arc::new(SystemClock),
        )
        .await
        .unwrap(),
    );
    let svc = run_quick(agent.clone()).await;
    let mut tab = Tab::new(svc.local_addr());
    tab.shift("P77").await;
    // Not in this tablet's region (EM): the national check finds Lancashire's flag.
    let a = tab
        .post(
            "/lookup",
            &[("nhs_number", &nhs(7).spaced()), ("incident_ref", "INC-9")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.data_result(), "flagged");
    let r = a.result();
    assert!(r.contains("Looked After Child"), "{r}");
    assert!(r.contains("Lancashire Test Council"));
    assert!(
        r.contains("<a class=\"tel\" href=\"tel:+441772000000\">Call 01772 000 000</a>"),
        "{r}"
    );
    assert!(
        r.contains("Found by the national check of 3 councils"),
        "{r}"
    );
    assert!(r.contains("1 March 2025"));
    // The loop was told: the notice reaches Lancashire once, with the staff id.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.outbox_counts().unwrap().0 > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notices = env.mailbox(LANCS).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].staff_id.as_deref(), Some("P77"));
    assert_eq!(notices[0].incident_ref.as_deref(), Some("INC-9"));
    let a = tab.get("/").await;
    assert_eq!(a.outbox(), "0 notices waiting to be sent");
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_tablet_says_so_and_checks_nothing() {
    let f = fixture_page(87, true).await;
    let mut tab = Tab::new(f.api.local_addr());
    tab.shift("P9").await;
    f.agent.shred().unwrap();
    let a = tab.get("/").await;
    assert_eq!(a.status, 503);
    assert_page_headers(&a);
    assert_eq!(a.freshness(), "expired");
    assert!(a.banner().contains("<strong>NO DATA</strong>"));
    assert!(a.body.contains("role=\"alert\""));
    assert!(
        a.body.contains("not enrolled, or its data was shredded"),
        "{}",
        a.body
    );
    assert!(!a.body.contains("<form id=\"lookup\""));
    let a = tab.post("/lookup", &[("nhs_number", &f.miss)]).await;
    assert_eq!(a.status, 503);
    assert!(!a.body.contains("id=\"result\""));
    f.api.shutdown().await.unwrap();
}
