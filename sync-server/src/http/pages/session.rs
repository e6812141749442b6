//! Page sessions, kept in memory: a random id in an HttpOnly cookie maps to who signed in,
//! the session's CSRF token and its expiry (8 hours after sign-in). Bounded: when full, the
//! expired sessions go, then the ones closest to expiry. A restart signs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;

/// How long a session lasts after sign-in.
pub(crate) const SESSION_HOURS: i64 = 8;
/// Most sessions held at once (per kind: council, fleet).
pub(crate) const MAX_SESSIONS: usize = 10_000;

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
    /// A message for the next page shown (e.g. "2 notices acknowledged"), shown once.
    pub(crate) flash: Option<String>,
}

/// The sessions of one kind.
#[derive(Debug)]
pub(crate) struct Sessions<T> {
    map: Mutex<HashMap<String, Session<T>>>,
    max: usize,
}

impl<T: Clone> Sessions<T> {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }

    /// Starts a session; returns its id (the cookie's value) and the session.
    pub(crate) fn create(&self, who: T, now: DateTime<Utc>) -> (String, Session<T>) {
        let id = random_token();
        let session = Session {
            who,
            csrf: random_token(),
            expires_at: now + Duration::hours(SESSION_HOURS),
            flash: None,
        };
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= self.max {
            map.retain(|_, s| s.expires_at > now);
        }
        while map.len() >= self.max {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session with this id; an expired one is dropped.
    pub(crate) fn get(&self, id: &str, now: DateTime<Utc>) -> Option<Session<T>> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(id) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Leaves a message for the session's next page.
    pub(crate) fn set_flash(&self, id: &str, message: String) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = map.get_mut(id) {
            s.flash = Some(message);
        }
    }

    /// Takes the message left for this page, if any.
    pub(crate) fn take_flash(&self, id: &str) -> Option<String> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get_mut(id).and_then(|s| s.flash.take())
    }

    /// Ends a session.
    pub(crate) fn remove(&self, id: &str) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(id);
    }

    /// Sessions held (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t0() -> DateTime<Utc> {
        "2025-06-01T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn sessions_expire_after_eight_hours_and_end_on_sign_out() {
        let s = Sessions::new(10);
        let (id, session) = s.create("A", t0());
        assert_ne!(id, session.csrf);
        assert_eq!(s.get(&id, t0() + Duration::hours(7)).unwrap().who, "A");
        assert!(s.get(&id, t0() + Duration::hours(8)).is_none());
        let (id, _) = s.create("B", t0());
        s.set_flash(&id, "done".into());
        assert_eq!(s.take_flash(&id).as_deref(), Some("done"));
        assert_eq!(s.take_flash(&id), None, "shown once");
        s.remove(&id);
        assert!(s.get(&id, t0()).is_none());
        assert!(s.get("made-up", t0()).is_none());
    }

    #[test]
    fn the_map_stays_bounded_dropping_the_oldest() {
        let s = Sessions::new(3);
        let ids: Vec<String> = (0..5)
            .map(|i| s.create(i, t0() + Duration::minutes(i)).0)
            .collect();
        assert_eq!(s.len(), 3);
        assert!(s.get(&ids[0], t0()).is_none());
        assert!(s.get(&ids[1], t0()).is_none());
        assert_eq!(s.get(&ids[4], t0()).unwrap().who, 4);
    }

    #[test]
    fn secrets_compare_whole_and_empty_never_matches() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("", ""));
    }
}
