//! The paramedic page's request checks, without IO: the `Host` must be a loopback name with
//! the listen port (a DNS-rebound page cannot reach the agent), a state-changing request must
//! come from this page (`Sec-Fetch-Site`, `Origin`, and a CSRF token), cookies are read
//! strictly, and the staff id has one spelling rule.
//!
//! CSRF: double submit with a signed token. The `cpis_csrf` cookie holds a random nonce and
//! its HMAC-SHA-256 under a key made at start-up; the form's hidden `csrf` field must equal
//! the cookie and the cookie must verify. A cookie planted by another program on a loopback
//! port (browsers share cookies across ports) does not verify, and a restart of the agent
//! makes old pages ask again rather than act.

use std::net::IpAddr;

use axum::http::{HeaderMap, header};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;

/// The staff id cookie (one 12-hour shift).
pub(crate) const STAFF_COOKIE: &str = "cpis_staff";
/// The CSRF cookie (double submit).
pub(crate) const CSRF_COOKIE: &str = "cpis_csrf";
/// A shift: how long the staff id is remembered, in seconds.
pub(crate) const SHIFT_SECS: u32 = 12 * 3600;
/// Longest staff id.
pub(crate) const STAFF_ID_MAX: usize = 32;
/// Longest incident reference.
pub(crate) const INCIDENT_REF_MAX: usize = 64;

/// Per-process secrets of the page.
pub struct PageKeys {
    csrf: [u8; 32],
}

impl std::fmt::Debug for PageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKeys(..)")
    }
}

impl Default for PageKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl PageKeys {
    /// Fresh random keys.
    pub fn new() -> Self {
        let mut csrf = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut csrf);
        Self { csrf }
    }

    fn mac(&self, nonce: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.csrf)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(b"cpis-agent page csrf\0");
        m.update(nonce);
        m
    }

    /// A new token: `hex(nonce).hex(hmac(nonce))`.
    pub(crate) fn issue(&self) -> String {
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let tag = self.mac(&nonce).finalize().into_bytes();
        format!("{}.{}", hex::encode(nonce), hex::encode(tag))
    }

    /// Whether `token` was issued by this process.
    pub(crate) fn valid(&self, token: &str) -> bool {
        let Some((n, t)) = token.split_once('.') else {
            return false;
        };
        let (Ok(nonce), Ok(tag)) = (hex::decode(n), hex::decode(t)) else {
            return false;
        };
        nonce.len() == 16 && self.mac(&nonce).verify_slice(&tag).is_ok()
    }
}

/// Equal strings, in time independent of where they differ.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name`, from every `Cookie` header.
pub(crate) fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Why a request was refused before it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `Sec-Fetch-Site` or `Origin` says another site sent it.
    CrossSite,
    /// The CSRF field is missing, differs from the cookie, or was not issued here.
    Csrf,
}

/// Checks `Host` (or the URI authority): `localhost`, a `127.0.0.0/8` literal or a loopback
/// IPv6 literal, with `port` when it is known (no port means 80).
pub(crate) fn host_ok(host: Option<&str>, port: Option<u16>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let (name, given) = if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        match after {
            "" => (ip, None),
            p => match p.strip_prefix(':') {
                Some(p) => (ip, Some(p)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    // An IPv6 literal only in brackets.
    let literal = name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        && (host.starts_with('[') || !name.contains(':'));
    let loopback = name.eq_ignore_ascii_case("localhost") || literal;
    if !loopback {
        return false;
    }
    let given = match given {
        None => 80,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(p) => p,
                Err(_) => return false,
            }
        }
        Some(_) => return false,
    };
    port.is_none_or(|want| want == given)
}

/// Refuses a state-changing request another site may have sent: `Sec-Fetch-Site` other than
/// `same-origin`/`none`, or an `Origin` that is not `http://` + this request's `Host` (which
/// [`super::host_check`] has already held to a loopback name with the listen port). A request
/// with neither header (a program, not a browser) passes. The one check of the page's form
/// posts and of the JSON API's POSTs ([`crate::api`]).
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), Refused> {
    if let Some(site) = headers.get("sec-fetch-site") {
        match site.to_str().map(str::to_ascii_lowercase).as_deref() {
            Ok("same-origin" | "none") => {}
            _ => return Err(Refused::CrossSite),
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let ok = match (origin.to_str(), host) {
            (Ok(o), Some(h)) => o
                .strip_prefix("http://")
                .is_some_and(|rest| rest.eq_ignore_ascii_case(h)),
            _ => false,
        };
        if !ok {
            return Err(Refused::CrossSite);
        }
    }
    Ok(())
}

/// The CSRF check: the field equals the cookie and the cookie was issued by this process.
pub(crate) fn csrf_ok(keys: &PageKeys, headers: &HeaderMap, field: &str) -> Result<(), Refused> {
    match cookie(headers, CSRF_COOKIE) {
        Some(c) if !field.is_empty() && same(c, field) && keys.valid(c) => Ok(()),
        _ => Err(Refused::Csrf),
    }
}

/// Checks a staff id as typed (surrounding spaces removed): 1 to 32 letters, digits, `-`, `_`
/// or `.`. The error says what is wrong, in words.
pub(crate) fn staff_id(input: &str) -> Result<String, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("Enter your staff id.".into());
    }
    let n = s.chars().count();
    if n > STAFF_ID_MAX {
        return Err(format!(
            "A staff id has at most {STAFF_ID_MAX} characters; this one has {n}."
        ));
    }
    if let Some((i, c)) = s
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        let what = if c == ' ' {
            "a space".to_string()
        } else {
            format!("“{c}”")
        };
        return Err(format!(
            "A staff id may only hold letters, digits, “-”, “_” and “.”; character {} is {what}.",
            i + 1
        ));
    }
    Ok(s.to_owned())
}

/// Checks an incident reference (optional; surrounding spaces removed; at most 64 printable
/// characters). `Ok(None)` when empty.
pub(crate) fn incident_ref(input: &str) -> Result<Option<String>, String> {
    let s = input.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let n = s.chars().count();
    if n > INCIDENT_REF_MAX {
        return Err(format!(
            "An incident reference has at most {INCIDENT_REF_MAX} characters; this one has {n}."
        ));
    }
    if s.chars().any(char::is_control) {
        return Err("The incident reference holds a control character; type it again.".into());
    }
    Ok(Some(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for h in [
            "127.0.0.1:7411",
            "localhost:7411",
            "LOCALHOST:7411",
            "[::1]:7411",
            "127.1.2.3:7411",
        ] {
            assert!(host_ok(Some(h), Some(7411)), "{h}");
        }
        for h in [
            "127.0.0.1:7412",
            "evil.example:7411",
            "127.0.0.1.evil.example:7411",
            "localhost.:7411",
            "10.0.0.1:7411",
            "[::2]:7411",
            "::1:7411",
            "127.0.0.1:",
            "127.0.0.1:+7411",
            "",
        ] {
            assert!(!host_ok(Some(h), Some(7411)), "{h}");
        }
        assert!(!host_ok(None, None));
        assert!(host_ok(Some("127.0.0.1"), Some(80)));
        assert!(host_ok(Some("localhost:1234"), None));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, axum::http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origins() {
        let host = ("host", "127.0.0.1:7411");
        for ok in [
            vec![host],
            vec![host, ("sec-fetch-site", "same-origin")],
            vec![host, ("sec-fetch-site", "none")],
            vec![host, ("origin", "http://127.0.0.1:7411")],
            vec![
                host,
                ("origin", "http://127.0.0.1:7411"),
                ("sec-fetch-site", "Same-Origin"),
            ],
        ] {
            assert_eq!(same_origin(&headers(&ok)), Ok(()), "{ok:?}");
        }
        for bad in [
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "https://127.0.0.1:7411")],
            vec![host, ("origin", "http://127.0.0.1:7412")],
            vec![("origin", "http://127.0.0.1:7411")],
            vec![
                host,
                ("origin", "http://127.0.0.1:7411"),
                ("sec-fetch-site", "cross-site"),
            ],
        ] {
            assert_eq!(
                same_origin(&headers(&bad)),
                Err(Refused::CrossSite),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tokens() {
        let k = PageKeys::new();
        let t = k.issue();
        assert!(k.valid(&t));
        assert!(!PageKeys::new().valid(&t));
        assert!(!k.valid(&t.replace('.', "")));
        assert!(!k.valid(""));
    }

    #[test]
    fn staff_ids() {
        assert_eq!(staff_id("  P123-4 ").unwrap(), "P123-4");
        assert!(staff_id("").unwrap_err().contains("Enter"));
        assert!(staff_id("P 1").unwrap_err().contains("a space"));
        assert!(staff_id("a;b").unwrap_err().contains("character 2"));
        assert!(staff_id(&"x".repeat(33)).unwrap_err().contains("33"));
    }
}
