//! Page sessions, kept in the store so that every server replica sees a sign-in and a
//! sign-out: a random id in an HttpOnly cookie maps to who signed in, the session's CSRF token
//! and its expiry (8 hours after sign-in). The store keeps only the SHA-256 of the id, so a
//! copy of the database holds no live session; maintenance deletes expired sessions.

use std::marker::PhantomData;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use rand::RngCore as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::store::{PageSession, SessionKind, Store, StoreError};

/// How long a session lasts after sign-in.
pub(crate) const SESSION_HOURS: i64 = 8;

/// A new random value (256 bits, base64url): session ids and CSRF tokens.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares secrets in constant time; empty never matches.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// One signed-in person.
#[derive(Debug, Clone)]
pub(crate) struct Session<T> {
    pub(crate) who: T,
    /// Every POST of the session carries it in the `csrf` field.
    pub(crate) csrf: String,
    pub(crate) expires_at: DateTime<Utc>,
}

/// The sessions of one kind, in the store.
#[derive(Debug)]
pub(crate) struct Sessions<T> {
    kind: SessionKind,
    who: PhantomData<fn() -> T>,
}

/// The key a session is stored under: the SHA-256 of its cookie value.
fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl<T: Serialize + DeserializeOwned> Sessions<T> {
    pub(crate) fn new(kind: SessionKind) -> Self {
        Self {
            kind,
            who: PhantomData,
        }
    }

    /// Starts a session; returns its id (the cookie's value) and the session.
    pub(crate) async fn create<S: Store>(
        &self,
        store: &S,
        who: T,
        now: DateTime<Utc>,
    ) -> Result<(String, Session<T>), StoreError> {
        let id = random_token();
        let session = Session {
            who,
            csrf: random_token(),
            expires_at: now + Duration::hours(SESSION_HOURS),
        };
        let stored = PageSession {
            who: serde_json::to_string(&session.who)
                .map_err(|e| StoreError::Task(e.to_string()))?,
            csrf: session.csrf.clone(),
            expires_at: session.expires_at,
            flash: None,
        };
        store
            .create_page_session(key(&id), self.kind, stored)
            .await?;
        Ok((id, session))
    }

    /// The live session with this id.
    pub(crate) async fn get<S: Store>(
        &self,
        store: &S,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Session<T>>, StoreError> {
        let Some(stored) = store.page_session(key(id), self.kind, now).await? else {
            return Ok(None);
        };
        let who = serde_json::from_str(&stored.who).map_err(|e| StoreError::Corrupt {
            table: "page_sessions",
            detail: e.to_string(),
        })?;
        Ok(Some(Session {
            who,
            csrf: stored.csrf,
            expires_at: stored.expires_at,
        }))
    }

    /// Leaves a message for the session's next page.
    pub(crate) async fn set_flash<S: Store>(
        &self,
        store: &S,
        id: &str,
        message: String,
    ) -> Result<(), StoreError> {
        store.set_page_session_flash(key(id), Some(message)).await?;
        Ok(())
    }

    /// Takes the message left for this page, if any.
    pub(crate) async fn take_flash<S: Store>(
        &self,
        store: &S,
        id: &str,
    ) -> Result<Option<String>, StoreError> {
        store.set_page_session_flash(key(id), None).await
    }

    /// Ends a session, on every replica.
    pub(crate) async fn remove<S: Store>(&self, store: &S, id: &str) -> Result<(), StoreError> {
        store.end_page_session(key(id)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::SqliteStore;

    fn t0() -> DateTime<Utc> {
        "2025-06-01T12:00:00Z".parse().unwrap()
    }

    #[tokio::test]
    async fn sessions_expire_after_eight_hours_and_end_on_sign_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cpis.db")).unwrap();
        let s: Sessions<String> = Sessions::new(SessionKind::Council);
        let (id, session) = s.create(&store, "A".into(), t0()).await.unwrap();
        assert_ne!(id, session.csrf);
        let later = t0() + Duration::hours(7);
        assert_eq!(s.get(&store, &id, later).await.unwrap().unwrap().who, "A");
        assert!(
            s.get(&store, &id, t0() + Duration::hours(8))
                .await
                .unwrap()
                .is_none()
        );
        let fleet: Sessions<String> = Sessions::new(SessionKind::Fleet);
        assert!(
            fleet.get(&store, &id, t0()).await.unwrap().is_none(),
            "a council session does not sign in to the fleet pages"
        );
        let (id, _) = s.create(&store, "B".into(), t0()).await.unwrap();
        s.set_flash(&store, &id, "done".into()).await.unwrap();
        assert_eq!(
            s.take_flash(&store, &id).await.unwrap().as_deref(),
            Some("done")
        );
        assert_eq!(s.take_flash(&store, &id).await.unwrap(), None, "shown once");
        s.remove(&store, &id).await.unwrap();
        assert!(s.get(&store, &id, t0()).await.unwrap().is_none());
        assert!(s.get(&store, "made-up", t0()).await.unwrap().is_none());
        assert_eq!(
            store
                .purge_page_sessions(t0() + Duration::hours(9))
                .await
                .unwrap(),
            1,
            "the expired first session is purged"
        );
    }

    #[test]
    fn secrets_compare_whole_and_empty_never_matches() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("", ""));
    }
}
