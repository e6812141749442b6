//! The paramedic page's HTML. Markup is written with [`Html`]: literal markup goes in only
//! as `&'static str` ([`Html::raw`]); everything else — typed input, names, numbers, dates —
//! goes through [`Html::text`], which escapes `& < > " '`, so nothing typed or received can
//! become markup, in text or in an attribute.

use chrono::{DateTime, NaiveDate, Utc};

use cpis_protocol::local::{FlagView, LookupResponse, StatusResponse};
use cpis_protocol::{CareSetting, Freshness, LookupResult, PlanType};

use super::guard::{INCIDENT_REF_MAX, STAFF_ID_MAX};

/// An HTML document being written.
#[derive(Debug, Default)]
pub(crate) struct Html(String);

impl Html {
    /// Literal markup (compile-time text only).
    pub(crate) fn raw(&mut self, s: &'static str) -> &mut Self {
        self.0.push_str(s);
        self
    }

    /// Text or an attribute value, escaped.
    pub(crate) fn text(&mut self, s: &str) -> &mut Self {
        for c in s.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        self
    }

    /// A number.
    pub(crate) fn num(&mut self, n: u64) -> &mut Self {
        self.0.push_str(&n.to_string());
        self
    }

    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// What is shown in `section#result`.
#[derive(Debug)]
pub(crate) enum Shown {
    /// An answer (flagged, not flagged or unknown).
    Answer(Box<LookupResponse>),
    /// The NHS number was not valid: the reason, in words.
    Invalid(String),
}

/// Everything one page shows.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// The device status, or why there is none (not enrolled, shredded).
    pub(crate) status: Option<Result<StatusResponse, String>>,
    /// The staff id of this shift.
    pub(crate) staff: Option<String>,
    pub(crate) csrf: String,
    /// A problem with the request, in words (shown with `role="alert"`).
    pub(crate) problem: Option<String>,
    pub(crate) shown: Option<Shown>,
    /// What was typed, kept when it was refused.
    pub(crate) staff_value: String,
    pub(crate) staff_invalid: bool,
    pub(crate) nhs_value: String,
    pub(crate) incident_value: String,
    pub(crate) incident_invalid: bool,
}

const STYLE: &str = include_str!("style.css");

const ICON_WARN: &str = r#"<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path fill="currentColor" fill-rule="evenodd" d="M12 1.5 0.5 22h23L12 1.5zM10.8 8h2.4v7h-2.4zm0 9h2.4v2.4h-2.4z"/></svg>"#;
const ICON_TICK: &str = r#"<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path fill="currentColor" fill-rule="evenodd" d="M12 1a11 11 0 1 0 0 22 11 11 0 0 0 0-22zm-1.6 16-5.2-5.2 1.7-1.7 3.5 3.5 7.3-7.3 1.7 1.7z"/></svg>"#;
const ICON_QUESTION: &str = r##"<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><circle cx="12" cy="12" r="11" fill="currentColor"/><text x="12" y="17.5" text-anchor="middle" font-size="16" font-weight="700" font-family="Arial,sans-serif" fill="#ffdd00">?</text></svg>"##;
const ICON_CROSS: &str = r#"<svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path fill="currentColor" fill-rule="evenodd" d="M12 1a11 11 0 1 0 0 22 11 11 0 0 0 0-22zM7.8 6.1 12 10.3l4.2-4.2 1.7 1.7-4.2 4.2 4.2 4.2-1.7 1.7-4.2-4.2-4.2 4.2-1.7-1.7 4.2-4.2-4.2-4.2z"/></svg>"#;

/// A date for people in the UK: `1 November 2026`.
pub(crate) fn date_gb(d: NaiveDate) -> String {
    d.format("%-d %B %Y").to_string()
}

/// A moment for people in the UK: `1 November 2026 at 12:00 UTC`.
pub(crate) fn when_gb(t: DateTime<Utc>) -> String {
    t.format("%-d %B %Y at %H:%M UTC").to_string()
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// An age in words: `just now`, `12 minutes ago`, `3 hours ago` (under two days),
/// `2 days ago`.
pub(crate) fn ago(secs: u64) -> String {
    if secs < 60 {
        "less than a minute ago".into()
    } else if secs < 3600 {
        format!("{} ago", plural(secs / 60, "minute", "minutes"))
    } else if secs < 48 * 3600 {
        format!("{} ago", plural(secs / 3600, "hour", "hours"))
    } else {
        format!("{} ago", plural(secs / 86400, "day", "days"))
    }
}

/// A length of time in words: `24 hours`, `7 days`.
fn span(secs: u64) -> String {
    if secs < 48 * 3600 {
        plural(secs / 3600, "hour", "hours")
    } else {
        plural(secs / 86400, "day", "days")
    }
}

/// The plan type in words.
pub(crate) fn plan_words(p: PlanType) -> &'static str {
    match p {
        PlanType::Cpp => "Child Protection Plan",
        PlanType::Lac => "Looked After Child",
        PlanType::Ucpp => "Unborn Child Protection Plan",
    }
}

/// A UK phone number as a `tel:` URI: `0116 496 0000` → `tel:+441164960000`. `None` when
/// it holds no digits.
pub(crate) fn tel_uri(phone: &str) -> Option<String> {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    let international = phone.trim_start().starts_with('+');
    Some(if international {
        format!("tel:+{digits}")
    } else if let Some(rest) = digits.strip_prefix("00") {
        format!("tel:+{rest}")
    } else if let Some(rest) = digits.strip_prefix('0') {
        format!("tel:+44{rest}")
    } else {
        format!("tel:{digits}")
    })
}

fn spaced(nhs: &str) -> String {
    if nhs.len() == 10 && nhs.bytes().all(|b| b.is_ascii_digit()) {
        format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..])
    } else {
        nhs.to_owned()
    }
}

fn setting_words(s: CareSetting) -> &'static str {
    match s {
        CareSetting::Ambulance => "ambulance",
        CareSetting::EmergencyDepartment => "emergency department",
        CareSetting::UrgentTreatmentCentre => "urgent treatment centre",
        CareSetting::Other => "other setting",
    }
}

fn headline_word(r: LookupResult) -> &'static str {
    match r {
        LookupResult::Flagged => "FLAGGED",
        LookupResult::NotFlagged => "NOT FLAGGED",
        LookupResult::Unknown => "UNKNOWN",
    }
}

/// The whole page.
pub(crate) fn page(v: &View) -> String {
    let mut h = Html::default();
    h.raw("<!DOCTYPE html>\n<html lang=\"en-GB\">\n<head>\n<meta charset=\"utf-8\">\n")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")
        .raw("<meta name=\"referrer\" content=\"same-origin\">\n<title>");
    if v.problem.is_some() {
        h.raw("Problem – ");
    }
    match &v.shown {
        Some(Shown::Answer(r)) => {
            h.text(headline_word(r.result)).raw(" – ");
        }
        Some(Shown::Invalid(_)) => {
            h.raw("Not a valid NHS number – ");
        }
        None => {}
    }
    h.raw("Child protection check – CP-IS Edge</title>\n<style>\n")
        .raw(STYLE)
        .raw("</style>\n</head>\n<body>\n");
    header(&mut h, v);
    h.raw("<main id=\"main\" class=\"wrap\">\n");
    banner(&mut h, v);
    h.raw("<h1>Child protection check</h1>\n");
    if let Some(p) = &v.problem {
        h.raw("<div id=\"problem\" class=\"problem\" role=\"alert\">")
            .raw("<h2>There is a problem</h2><p id=\"problem-text\">")
            .text(p)
            .raw("</p></div>\n");
    }
    let enrolled = matches!(v.status, Some(Ok(_)));
    match (&v.staff, enrolled) {
        (_, false) => {}
        (None, true) => staff_form(&mut h, v),
        (Some(_), true) => lookup_form(&mut h, v),
    }
    match &v.shown {
        Some(Shown::Answer(r)) => answer(&mut h, r),
        Some(Shown::Invalid(reason)) => invalid(&mut h, reason),
        None => {}
    }
    h.raw("</main>\n");
    footer(&mut h, v);
    h.raw("</body>\n</html>\n");
    h.finish()
}

fn header(h: &mut Html, v: &View) {
    h.raw("<header class=\"top\"><div class=\"wrap bar\">")
        .raw("<p class=\"brand\">CP-IS Edge</p>")
        .raw("<p id=\"outbox-pending\">");
    match &v.status {
        Some(Ok(s)) => {
            h.text(&plural(
                s.outbox_pending,
                "notice waiting to be sent",
                "notices waiting to be sent",
            ));
            if s.outbox_set_aside > 0 {
                h.raw(" (").text(&plural(
                    s.outbox_set_aside,
                    "refused by the server: tell trust IT",
                    "refused by the server: tell trust IT",
                ));
                h.raw(")");
            }
        }
        _ => {
            h.raw("Notices waiting to be sent: unknown");
        }
    }
    h.raw("</p>");
    if let Some(staff) = &v.staff {
        h.raw("<div class=\"shift\"><p>Staff id: <strong id=\"staff-shown\">")
            .text(staff)
            .raw("</strong></p>")
            .raw("<form id=\"end-shift\" method=\"post\" action=\"/shift/end\">");
        csrf(h, v);
        h.raw("<button type=\"submit\" class=\"secondary\">End shift</button></form></div>");
    }
    h.raw("</div></header>\n");
}

fn csrf(h: &mut Html, v: &View) {
    h.raw("<input type=\"hidden\" name=\"csrf\" value=\"")
        .text(&v.csrf)
        .raw("\">");
}

fn banner(h: &mut Html, v: &View) {
    let (state, as_of, age, policy) = match &v.status {
        Some(Ok(s)) => (s.freshness, s.data_as_of, s.data_age_secs, Some(s.policy)),
        _ => (Freshness::Expired, None, None, None),
    };
    h.raw("<div id=\"freshness-banner\" data-freshness=\"")
        .text(state.as_str())
        .raw("\" class=\"banner ")
        .text(state.as_str())
        .raw("\">");
    h.raw(if state == Freshness::Fresh {
        ICON_TICK
    } else {
        ICON_WARN
    });
    h.raw("<p>");
    let age_words = |h: &mut Html| {
        if let Some(a) = age {
            h.text(&ago(a));
        } else {
            h.raw("at an unknown time");
        }
        if let Some(t) = as_of {
            h.raw(" (").text(&when_gb(t)).raw(")");
        }
    };
    match (&v.status, as_of, state) {
        (Some(Err(why)), _, _) => {
            h.raw("<strong>NO DATA</strong> — ").text(why);
        }
        (None, _, _) => {
            h.raw("<strong>NO DATA</strong> — the tablet's state could not be read.");
        }
        (Some(Ok(_)), None, _) => {
            h.raw(
                "<strong>NO DATA</strong> — no flag data is on this tablet yet, so every \
                 check answers UNKNOWN. Connect to a network so it can sync.",
            );
        }
        (Some(Ok(_)), Some(_), Freshness::Fresh) => {
            h.raw("Data up to date: last verified update ");
            age_words(h);
            h.raw(".");
        }
        (Some(Ok(_)), Some(_), Freshness::Stale) => {
            h.raw("<strong>STALE DATA</strong> — last verified update ");
            age_words(h);
            h.raw(". A NOT FLAGGED answer may miss plans made since");
            if let Some(p) = policy {
                h.raw(" (data is fresh for ")
                    .text(&span(p.fresh_secs))
                    .raw(")");
            }
            h.raw(". Connect to a network to update.");
        }
        (Some(Ok(_)), Some(_), Freshness::Expired) => {
            h.raw("<strong>EXPIRED DATA</strong> — last verified update ");
            age_words(h);
            h.raw(". Too old to rely on");
            if let Some(p) = policy {
                h.raw(" (limit ").text(&span(p.expiry_secs)).raw(")");
            }
            h.raw(": a child not found is shown as UNKNOWN. Connect to a network to update.");
        }
    }
    h.raw("</p></div>\n");
}

fn staff_form(h: &mut Html, v: &View) {
    h.raw("<form id=\"staff\" class=\"ask\" method=\"post\" action=\"/shift\">");
    csrf(h, v);
    h.raw("<div class=\"fields\"><div class=\"field main\">")
        .raw("<label for=\"staff-id\">Your staff id</label>")
        .raw("<p id=\"staff-hint\" class=\"hint\">Asked once per shift (12 hours). Letters, digits, “-”, “_” or “.”.</p>")
        .raw("<input id=\"staff-id\" name=\"staff_id\" type=\"text\" autocomplete=\"off\" autocapitalize=\"characters\" spellcheck=\"false\" maxlength=\"");
    h.num(STAFF_ID_MAX as u64 * 2).raw("\" autofocus");
    if v.staff_invalid {
        h.raw(" aria-invalid=\"true\" aria-describedby=\"staff-hint problem-text\"");
    } else {
        h.raw(" aria-describedby=\"staff-hint\"");
    }
    h.raw(" value=\"")
        .text(&v.staff_value)
        .raw("\"></div><div class=\"actions\"><button type=\"submit\" class=\"primary\">Start shift</button></div></div></form>\n");
}

fn lookup_form(h: &mut Html, v: &View) {
    let invalid = matches!(v.shown, Some(Shown::Invalid(_)));
    h.raw("<form id=\"lookup\" class=\"ask\" method=\"post\" action=\"/lookup#result\">");
    csrf(h, v);
    h.raw("<div class=\"fields\"><div class=\"field main\">")
        .raw("<label for=\"nhs-number\">NHS number</label>")
        .raw("<p id=\"nhs-hint\" class=\"hint\">10 digits, for example 943 476 5919</p>")
        .raw("<input id=\"nhs-number\" name=\"nhs_number\" type=\"text\" inputmode=\"numeric\" autocomplete=\"off\" spellcheck=\"false\" autofocus");
    if invalid {
        h.raw(" aria-invalid=\"true\" aria-describedby=\"nhs-hint nhs-error\"");
    } else {
        h.raw(" aria-describedby=\"nhs-hint\"");
    }
    h.raw(" value=\"").text(&v.nhs_value).raw("\"></div>");
    h.raw("<div class=\"field extra\">")
        .raw("<label for=\"incident-ref\">Incident reference (optional)</label>")
        .raw("<p id=\"incident-hint\" class=\"hint\">Recorded with the check</p>")
        .raw("<input id=\"incident-ref\" name=\"incident_ref\" type=\"text\" autocomplete=\"off\" spellcheck=\"false\" maxlength=\"");
    h.num(INCIDENT_REF_MAX as u64 * 2).raw("\"");
    if v.incident_invalid {
        h.raw(" aria-invalid=\"true\" aria-describedby=\"incident-hint problem-text\"");
    } else {
        h.raw(" aria-describedby=\"incident-hint\"");
    }
    h.raw(" value=\"")
        .text(&v.incident_value)
        .raw("\"></div><div class=\"actions\"><button type=\"submit\" id=\"check\" class=\"primary\">Check</button></div></div></form>\n");
}

fn result_open(h: &mut Html, kind: &'static str, icon: &'static str, word: &'static str) {
    h.raw("<section id=\"result\" data-result=\"")
        .raw(kind)
        .raw("\" class=\"result ")
        .raw(kind)
        .raw("\" aria-labelledby=\"result-heading\">")
        .raw("<div class=\"headline\" role=\"alert\">")
        .raw(icon)
        .raw("<h2 id=\"result-heading\">")
        .raw(word)
        .raw("</h2>");
}

fn invalid(h: &mut Html, reason: &str) {
    result_open(h, "invalid", ICON_CROSS, "Not a valid NHS number");
    h.raw("<p id=\"nhs-error\" class=\"subject reason\">")
        .text(reason)
        .raw("</p></div>")
        .raw("<p>Nothing was looked up and nothing was recorded. Check the number and try again.</p></section>\n");
}

fn data_line(h: &mut Html, r: &LookupResponse) {
    h.raw("<p class=\"meta\">Data: ");
    match (r.data_as_of, r.data_age_secs) {
        (Some(t), Some(a)) => {
            h.raw("last verified update ")
                .text(&ago(a))
                .raw(" (")
                .text(&when_gb(t))
                .raw(")");
        }
        (Some(t), None) => {
            h.raw("as of ").text(&when_gb(t));
        }
        _ => {
            h.raw("none on this tablet");
        }
    }
    h.raw(", ").text(r.freshness.as_str()).raw(".</p>");
}

fn warnings(h: &mut Html, r: &LookupResponse) {
    if r.warnings.is_empty() {
        return;
    }
    h.raw("<div class=\"box\"><h3>Please note</h3><ul class=\"warnings\">");
    for w in &r.warnings {
        h.raw("<li>").text(&w.message).raw("</li>");
    }
    h.raw("</ul></div>");
}

fn subject(h: &mut Html, r: &LookupResponse) {
    h.raw("<p class=\"subject\">NHS number ")
        .text(&spaced(&r.nhs_number))
        .raw("</p></div>");
}

fn answer(h: &mut Html, r: &LookupResponse) {
    match r.result {
        LookupResult::Flagged => {
            result_open(h, "flagged", ICON_WARN, "FLAGGED");
            subject(h, r);
            h.raw("<p class=\"lead\">A child protection flag is held. Call the council’s emergency number below.</p>");
            if let Some(n) = &r.national {
                h.raw("<p>Found by the national check of ")
                    .num(n.councils_covered)
                    .raw(" councils at ")
                    .text(&when_gb(n.checked_at))
                    .raw(".</p>");
            }
            h.raw("<ul class=\"plans\">");
            for f in &r.flags {
                plan(h, f);
            }
            h.raw("</ul>");
            contacts(h, r);
            data_line(h, r);
            warnings(h, r);
        }
        LookupResult::NotFlagged => {
            result_open(h, "not_flagged", ICON_TICK, "NOT FLAGGED");
            subject(h, r);
            h.raw("<p class=\"lead\">No child protection flag is held for this number in the councils covered below.</p>");
            h.raw("<div class=\"box\" id=\"coverage\"><h3>Coverage</h3>");
            if let Some(n) = &r.national {
                h.raw("<p>National check: no flag in any of the ")
                    .num(n.councils_covered)
                    .raw(" councils, checked ")
                    .text(&when_gb(n.checked_at))
                    .raw(".</p>");
            }
            h.raw("<p>This tablet’s data: region <strong>")
                .text(r.coverage.region.as_str())
                .raw("</strong>, ")
                .text(&plural(
                    r.coverage.councils.len() as u64,
                    "council",
                    "councils",
                ))
                .raw(":</p><ul class=\"councils\">");
            for c in &r.coverage.councils {
                h.raw("<li>").text(&c.name).raw("</li>");
            }
            h.raw("</ul>");
            data_line(h, r);
            h.raw("</div>");
            warnings(h, r);
        }
        LookupResult::Unknown => {
            result_open(h, "unknown", ICON_QUESTION, "UNKNOWN");
            subject(h, r);
            h.raw("<p class=\"lead\" id=\"unknown-reason\">Cannot say whether a flag is held: ");
            let damaged = r.warnings.iter().any(|w| w.code == "store_damaged");
            match (r.data_as_of, r.data_age_secs) {
                _ if damaged => {
                    h.raw(
                        "the flag data on this tablet is damaged (part of it is missing or \
                         was replaced); a full copy is installed at the next sync.",
                    );
                }
                (None, _) => {
                    h.raw("no flag data is on this tablet yet (it has not synced).");
                }
                (Some(_), Some(a)) => {
                    h.raw("the data is too old to rely on (last verified update ")
                        .text(&ago(a))
                        .raw(").");
                }
                (Some(_), None) => {
                    h.raw("the data is too old to rely on.");
                }
            }
            h.raw(
                "</p><p>Treat this as not known: follow your trust’s safeguarding procedure.</p>",
            );
            h.raw("<p>Region ")
                .text(r.coverage.region.as_str())
                .raw(".</p>");
            data_line(h, r);
            warnings(h, r);
        }
    }
    h.raw("</section>\n");
}

fn plan(h: &mut Html, f: &FlagView) {
    h.raw("<li class=\"plan\"><h3>")
        .text(plan_words(f.plan_type))
        .raw(" (")
        .text(f.plan_type.as_str())
        .raw(")</h3><dl>");
    h.raw("<dt>Started</dt><dd><time datetime=\"")
        .text(&f.start_date.to_string())
        .raw("\">")
        .text(&date_gb(f.start_date))
        .raw("</time></dd>");
    match (f.end_date, f.ended) {
        (Some(end), true) => {
            h.raw("<dt>Ended</dt><dd class=\"ended\">ENDED on <time datetime=\"")
                .text(&end.to_string())
                .raw("\">")
                .text(&date_gb(end))
                .raw("</time> (shown for 12 months after it ends)</dd>");
        }
        (Some(end), false) => {
            h.raw("<dt>Ends</dt><dd><time datetime=\"")
                .text(&end.to_string())
                .raw("\">")
                .text(&date_gb(end))
                .raw("</time></dd>");
        }
        (None, _) => {
            h.raw("<dt>Status</dt><dd>Active, no end date</dd>");
        }
    }
    h.raw("<dt>Council</dt><dd>")
        .text(&f.council.name)
        .raw("</dd>");
    h.raw("<dt>Emergency</dt><dd>");
    match tel_uri(&f.council.emergency_phone) {
        Some(uri) => {
            h.raw("<a class=\"tel\" href=\"")
                .text(&uri)
                .raw("\">Call ")
                .text(&f.council.emergency_phone)
                .raw("</a>");
        }
        None => {
            h.raw("Not known: ask your clinical hub for the council’s out-of-hours team.");
        }
    }
    h.raw("</dd><dt>Office</dt><dd>");
    match f
        .council
        .office_phone
        .as_deref()
        .and_then(|p| tel_uri(p).map(|u| (p, u)))
    {
        Some((p, uri)) => {
            h.raw("<a class=\"tel-office\" href=\"")
                .text(&uri)
                .raw("\">")
                .text(p)
                .raw("</a>");
        }
        None => {
            h.raw("Not given");
        }
    }
    h.raw("</dd></dl></li>");
}

fn contacts(h: &mut Html, r: &LookupResponse) {
    h.raw("<div class=\"box\"><h3>Recent contacts</h3>");
    if r.recent_contacts.is_empty() {
        h.raw("<p id=\"recent-contacts\">No recent contacts shown.</p>");
    } else {
        h.raw("<ul id=\"recent-contacts\">");
        for c in &r.recent_contacts {
            h.raw("<li><time datetime=\"")
                .text(&c.date.to_string())
                .raw("\">")
                .text(&date_gb(c.date))
                .raw("</time> — ")
                .text(&c.organisation.name)
                .raw(" (")
                .text(setting_words(c.setting))
                .raw(")</li>");
        }
        h.raw("</ul>");
    }
    h.raw("</div>");
}

fn footer(h: &mut Html, v: &View) {
    h.raw("<footer class=\"wrap\">");
    if let Some(Ok(s)) = &v.status {
        h.raw("<p>Region ")
            .text(s.region.as_str())
            .raw(" · trust ")
            .text(s.trust.as_str())
            .raw(" · ")
            .text(&plural(s.councils.len() as u64, "council", "councils"))
            .raw(" covered · device ")
            .text(&s.device.to_string())
            .raw("</p><p id=\"key-protection\" data-key-protection=\"")
            .text(s.key_protection.as_str())
            .raw("\">Keys: ")
            .text(s.key_protection.describe())
            .raw("</p>");
    }
    h.raw("<p>Every check is recorded and the council is told. This page works without a network.</p></footer>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything() {
        let mut h = Html::default();
        h.text("<script>alert('x')</script> & \"q\"");
        assert_eq!(
            h.finish(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn words() {
        assert_eq!(ago(30), "less than a minute ago");
        assert_eq!(ago(60), "1 minute ago");
        assert_eq!(ago(3 * 3600 + 5), "3 hours ago");
        assert_eq!(ago(30 * 3600), "30 hours ago");
        assert_eq!(ago(2 * 86400), "2 days ago");
        assert_eq!(
            date_gb(NaiveDate::from_ymd_opt(2026, 3, 4).unwrap_or_default()),
            "4 March 2026"
        );
        assert_eq!(
            tel_uri("0116 496 0000").as_deref(),
            Some("tel:+441164960000")
        );
        assert_eq!(
            tel_uri("+44 20 7946 0000").as_deref(),
            Some("tel:+442079460000")
        );
        assert_eq!(tel_uri(""), None);
    }
}
