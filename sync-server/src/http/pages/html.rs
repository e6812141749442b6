//! HTML building for the pages: the escaping every piece of text goes through, the shared
//! layout (one `<h1>`, a `<main>`, inline CSS, no scripts) and small formatting helpers.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

/// Text made safe for HTML element content and double- or single-quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newline have no place in a page.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A value for a URL query parameter (percent-encoded; escape the whole URL for HTML after).
pub(crate) fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A time for people, in a `<time>` element: `2025-06-01 12:00 UTC`.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    format!(
        "<time datetime=\"{}\">{}</time>",
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        t.format("%Y-%m-%d %H:%M UTC")
    )
}

/// Who is signed in, shown at the top of every page behind a sign-in.
#[derive(Debug)]
pub(crate) struct Nav<'a> {
    /// "Council: Leicestershire (E10000018)".
    pub(crate) who: String,
    /// (href, text, current) links.
    pub(crate) links: Vec<(&'a str, &'a str, bool)>,
    /// Where the sign-out form posts.
    pub(crate) sign_out: &'a str,
    pub(crate) csrf: &'a str,
}

/// A message shown above the page's content.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// Something went wrong (`role="alert"`).
    Error(String),
    /// Something was done (`role="status"`).
    Done(String),
}

impl Notice {
    pub(crate) fn html(&self) -> String {
        match self {
            Notice::Error(m) => format!(
                "<div class=\"alert\" role=\"alert\" id=\"error\">{ICON_WARN}<p><strong>Error:</strong> {}</p></div>\n",
                esc(m)
            ),
            Notice::Done(m) => format!(
                "<div class=\"done\" role=\"status\" id=\"done\">{ICON_TICK}<p>{}</p></div>\n",
                esc(m)
            ),
        }
    }
}

/// Warning icon, decorative (the words say it).
pub(crate) const ICON_WARN: &str = "<svg aria-hidden=\"true\" focusable=\"false\" width=\"20\" height=\"20\" viewBox=\"0 0 20 20\"><path d=\"M10 1 19 18H1z\" fill=\"currentColor\"/><path d=\"M9 7h2v5H9zm0 6h2v2H9z\" fill=\"#fff\"/></svg>";
/// Tick icon, decorative.
pub(crate) const ICON_TICK: &str = "<svg aria-hidden=\"true\" focusable=\"false\" width=\"20\" height=\"20\" viewBox=\"0 0 20 20\"><circle cx=\"10\" cy=\"10\" r=\"9\" fill=\"currentColor\"/><path d=\"m5.5 10.5 3 3 6-7\" stroke=\"#fff\" stroke-width=\"2\" fill=\"none\"/></svg>";
/// Clock icon (overdue), decorative.
pub(crate) const ICON_CLOCK: &str = "<svg aria-hidden=\"true\" focusable=\"false\" width=\"16\" height=\"16\" viewBox=\"0 0 20 20\"><circle cx=\"10\" cy=\"10\" r=\"8\" stroke=\"currentColor\" stroke-width=\"2.5\" fill=\"none\"/><path d=\"M10 5v5l3 3\" stroke=\"currentColor\" stroke-width=\"2.5\" fill=\"none\"/></svg>";

const CSS: &str = r#"
*{box-sizing:border-box}
html{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;font-size:100%;line-height:1.5;color:#0b0c0c;background:#fff}
body{margin:0}
header.top{background:#003087;color:#fff;padding:.75rem 1rem;display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;align-items:center}
header.top .brand{font-weight:700;font-size:1.1rem}
header.top a{color:#fff}
header.top nav ul{list-style:none;margin:0;padding:0;display:flex;gap:1rem;flex-wrap:wrap}
header.top nav a[aria-current]{font-weight:700;text-decoration-thickness:3px}
header.top form{margin:0 0 0 auto}
header.top .who{margin:0}
main{padding:1rem;max-width:100rem}
h1{font-size:1.75rem;margin:.5rem 0 1rem}
h2{font-size:1.35rem;margin:1.5rem 0 .5rem}
a{color:#1d4ed8}
a:visited{color:#4c2c92}
a:focus,button:focus,input:focus,summary:focus{outline:3px solid #ffbf47;outline-offset:0;box-shadow:0 0 0 6px #0b0c0c}
label{display:block;font-weight:600;margin:.5rem 0 .25rem}
input[type=text],input[type=password],input[type=date]{font:inherit;padding:.4rem .5rem;border:2px solid #0b0c0c;border-radius:0;min-width:12rem;max-width:100%}
input[type=checkbox]{width:1.5rem;height:1.5rem}
button,.button{font:inherit;font-weight:600;padding:.5rem 1rem;border:2px solid #00401e;background:#00703c;color:#fff;cursor:pointer;text-decoration:none;display:inline-block;border-radius:0}
button.secondary,.button.secondary{background:#f3f2f1;color:#0b0c0c;border-color:#0b0c0c}
button.danger{background:#b10e1e;border-color:#6b0812}
header.top button{background:#fff;color:#003087;border-color:#fff;padding:.25rem .75rem}
.row{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-end}
.row>div{min-width:10rem}
.alert{border:4px solid #b10e1e;color:#b10e1e;padding:.5rem 1rem;margin:1rem 0;display:flex;gap:.75rem;align-items:flex-start}
.alert p{margin:0;color:#0b0c0c}
.done{border:4px solid #00703c;color:#00703c;padding:.5rem 1rem;margin:1rem 0;display:flex;gap:.75rem;align-items:flex-start}
.done p{margin:0;color:#0b0c0c}
.table-wrap{overflow-x:auto;position:relative}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
caption{text-align:left;font-weight:700;padding:.25rem 0}
th,td{border-bottom:1px solid #b1b4b6;padding:.5rem;text-align:left;vertical-align:top}
th{background:#f3f2f1}
tr.overdue td{background:#fdecea}
.tag{display:inline-flex;gap:.25rem;align-items:center;font-weight:700;padding:0 .4rem;border:2px solid currentColor}
.tag.overdue{color:#b10e1e}
.tag.refused{color:#b10e1e}
.tag.applied{color:#00703c}
.tag.bad{color:#b10e1e}
.tag.warn{color:#7a4100}
.tag.ok{color:#00703c}
ul.plain{margin:0;padding-left:1.1rem}
.muted{color:#505a5f}
.nhs{font-variant-numeric:tabular-nums;white-space:nowrap;font-weight:600}
.visually-hidden{position:absolute!important;width:1px;height:1px;margin:0;padding:0;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap;border:0}
.actions{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;margin:1rem 0}
"#;

/// A whole page: `title` (escaped) in `<title>` and `<h1>`; `body` is trusted HTML built
/// from escaped parts.
pub(crate) fn layout(
    title: &str,
    nav: Option<&Nav<'_>>,
    notice: Option<&Notice>,
    body: &str,
) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en-GB\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} – CP-IS Edge</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <header class=\"top\">\n<span class=\"brand\">CP-IS Edge</span>",
        esc(title)
    );
    if let Some(nav) = nav {
        let _ = write!(
            out,
            "<p class=\"who\">{}</p>\n<nav aria-label=\"Pages\"><ul>",
            esc(&nav.who)
        );
        for (href, text, current) in &nav.links {
            let cur = if *current {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(
                out,
                "<li><a href=\"{}\"{cur}>{}</a></li>",
                esc(href),
                esc(text)
            );
        }
        let _ = writeln!(
            out,
            "</ul></nav>\n<form id=\"sign-out\" method=\"post\" action=\"{}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Sign out</button></form>",
            esc(nav.sign_out),
            esc(nav.csrf)
        );
    }
    let _ = writeln!(
        out,
        "</header>\n<main id=\"main\">\n<h1>{}</h1>\n{}{body}</main>\n</body>\n</html>",
        esc(title),
        notice.map(Notice::html).unwrap_or_default()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("a\u{0}b"), "a\u{FFFD}b");
        assert_eq!(query_value("2025-06-01"), "2025-06-01");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }

    #[test]
    fn the_title_is_escaped_once_in_title_and_h1() {
        let page = layout("<b>x</b>", None, None, "");
        assert_eq!(page.matches("&lt;b&gt;x&lt;/b&gt;").count(), 2);
        assert!(!page.contains("<b>"));
        assert!(page.contains("<html lang=\"en-GB\">"));
    }
}
