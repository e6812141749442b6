//! Bearer secrets (council tokens, enrolment tokens, trust admin tokens): random, shown once,
//! stored as SHA-256.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// Prefix of council bearer tokens.
pub const COUNCIL_PREFIX: &str = "cpis_ct_";
/// Prefix of enrolment tokens.
pub const ENROLMENT_PREFIX: &str = "cpis_et_";
/// Prefix of trust admin tokens (sign-in to the trust's fleet page).
pub const TRUST_ADMIN_PREFIX: &str = "cpis_at_";

/// A new random secret with `prefix` (256 bits of entropy) and its hash.
pub fn new_secret(prefix: &str) -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    (token, hash)
}

/// The stored form of a secret.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// The token of an `Authorization: Bearer TOKEN` header, if the request has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}
