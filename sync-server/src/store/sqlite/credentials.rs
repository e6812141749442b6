//! SQL behind revocable credentials (migration 5): council upload tokens and trust admin
//! tokens gain an optional expiry and a revocation time; enrolment tokens a revocation time
//! and a listing. A refused token is told apart (unknown, expired, revoked, used up), so every
//! route can say which.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use subtle::ConstantTimeEq as _;

use super::{from_ts, parse_col, require};
use crate::store::codec::ts;
use crate::store::{EnrolmentTokenInfo, StoreError, TokenRefusal, enrolment_token_id};

/// Expiry and revocation of bearer credentials (migration 5).
pub(super) const MIGRATION: &str = r#"
ALTER TABLE council_tokens ADD COLUMN expires_at INTEGER;
ALTER TABLE council_tokens ADD COLUMN revoked_at INTEGER;
CREATE INDEX council_tokens_council ON council_tokens(council);
ALTER TABLE trust_admin_tokens ADD COLUMN expires_at INTEGER;
ALTER TABLE trust_admin_tokens ADD COLUMN revoked_at INTEGER;
CREATE INDEX trust_admin_tokens_trust ON trust_admin_tokens(trust);
ALTER TABLE enrolment_tokens ADD COLUMN revoked_at INTEGER;
"#;

/// A bearer credential of `table` (`council_tokens` or `trust_admin_tokens`, owner column
/// `owner`): who it belongs to, or why it is refused.
pub(super) fn bearer<T: std::str::FromStr>(
    c: &Connection,
    table: &'static str,
    owner: &'static str,
    hash: &[u8; 32],
    now: DateTime<Utc>,
) -> Result<Result<T, TokenRefusal>, StoreError>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let row = c
        .query_row(
            &format!("SELECT hash, {owner}, expires_at, revoked_at FROM {table} WHERE hash = ?1"),
            [&hash[..]],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    parse_col::<T>(r, 1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((stored, who, expires_at, revoked_at)) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    if !bool::from(stored.as_slice().ct_eq(&hash[..])) {
        return Ok(Err(TokenRefusal::Unknown));
    }
    if revoked_at.is_some() {
        return Ok(Err(TokenRefusal::Revoked));
    }
    if expires_at.is_some_and(|e| e <= ts(now)) {
        return Ok(Err(TokenRefusal::Expired));
    }
    Ok(Ok(who))
}

/// Records a bearer credential of `table` for `owner_value` (which must exist in
/// `owner_table`).
#[allow(clippy::too_many_arguments)]
pub(super) fn add_bearer(
    c: &Connection,
    table: &'static str,
    owner: &'static str,
    (owner_table, owner_key, what): (&'static str, &'static str, &'static str),
    owner_value: &str,
    hash: &[u8; 32],
    now: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    require(
        c,
        &format!("SELECT 1 FROM {owner_table} WHERE {owner_key} = ?1"),
        owner_value,
        what,
    )?;
    c.execute(
        &format!(
            "INSERT INTO {table} (hash, {owner}, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)"
        ),
        params![&hash[..], owner_value, ts(now), expires_at.map(ts)],
    )?;
    Ok(())
}

/// Revokes every live credential of `owner_value` in `table`; returns how many.
pub(super) fn revoke_bearers(
    c: &Connection,
    table: &'static str,
    owner: &'static str,
    (owner_table, owner_key, what): (&'static str, &'static str, &'static str),
    owner_value: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    require(
        c,
        &format!("SELECT 1 FROM {owner_table} WHERE {owner_key} = ?1"),
        owner_value,
        what,
    )?;
    let n = c.execute(
        &format!("UPDATE {table} SET revoked_at = ?2 WHERE {owner} = ?1 AND revoked_at IS NULL"),
        params![owner_value, ts(now)],
    )?;
    Ok(n as u64)
}

/// Every enrolment token, newest first.
pub(super) fn enrolment_tokens(c: &Connection) -> Result<Vec<EnrolmentTokenInfo>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT hash, trust, region, uses_left, expires_at, created_at, revoked_at \
         FROM enrolment_tokens ORDER BY created_at DESC, rowid DESC",
    )?;
    let rows = stmt.query_map([], |r| {
        let hash: Vec<u8> = r.get(0)?;
        Ok(EnrolmentTokenInfo {
            id: enrolment_token_id(&hash),
            trust: parse_col(r, 1)?,
            region: parse_col(r, 2)?,
            uses_left: u32::try_from(r.get::<_, i64>(3)?.max(0)).unwrap_or(u32::MAX),
            expires_at: from_ts(4, r.get(4)?)?,
            created_at: from_ts(5, r.get(5)?)?,
            revoked_at: r
                .get::<_, Option<i64>>(6)?
                .map(|t| from_ts(6, t))
                .transpose()?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revokes the enrolment token whose id is `id`; `Missing` when there is none, `false` when
/// it was already revoked.
pub(super) fn revoke_enrolment_token(
    c: &Connection,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let hashes: Vec<Vec<u8>> = {
        let mut stmt = c.prepare("SELECT hash FROM enrolment_tokens")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let Some(hash) = hashes.into_iter().find(|h| enrolment_token_id(h) == id) else {
        return Err(StoreError::Missing(format!("enrolment token {id}")));
    };
    let n = c.execute(
        "UPDATE enrolment_tokens SET revoked_at = ?2 WHERE hash = ?1 AND revoked_at IS NULL",
        params![hash, ts(now)],
    )?;
    Ok(n == 1)
}
