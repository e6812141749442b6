//! Checks on access events sent by a device, before anything is stored: each event is read
//! on its own (one bad event never spoils the batch), must be the caller's own and have
//! bounded text. An event with impossible times (a tablet clock before 2024 or more than a
//! day ahead) is NOT refused: a crew's lookup must still reach the council. It is stored
//! marked [`clock_suspect`], and the server's receipt time stands in for the tablet's time
//! wherever time orders or ages anything.
//!
//! Also the rules for storing an event, which every store backend calls inside its write
//! transaction so that its SQL only reads and writes: what a repeated event id means
//! ([`repeated`]), which councils a flagged access notifies ([`councils_to_notify`]) and of
//! which plan types ([`notified_plan_types`]), and when its contact counts
//! ([`contact_time`]). Pure logic, no IO.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use cpis_protocol::ingest::{EARLIEST_ACCESS, MAX_CLOCK_AHEAD_SECS, MAX_TEXT_CHARS, codes};
use cpis_protocol::{
    AccessEvent, CouncilCode, DeviceId, EventId, LookupResult, PlanType, RejectedEvent, TrustCode,
};

use crate::store::{EventSource, RefusedEvent};

/// Most councils one event may name.
const MAX_COUNCILS: usize = 64;
/// How much of a refused event is kept in the audit log.
const MAX_AUDIT_DETAIL: usize = 4096;

/// The authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub device: DeviceId,
    pub trust: TrustCode,
}

/// A batch sorted into events to store and events rejected for good.
#[derive(Debug, Default)]
pub struct Checked {
    pub accepted: Vec<AccessEvent>,
    pub rejected: Vec<RejectedEvent>,
    /// The rejected events as the audit log records them.
    pub refused: Vec<RefusedEvent>,
}

/// Why a whole batch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("event {index} of the batch has no readable event_id (a UUID v7)")]
    NoEventId { index: usize },
}

fn truncated(s: &str) -> String {
    if s.len() <= MAX_AUDIT_DETAIL {
        return s.to_owned();
    }
    let mut end = MAX_AUDIT_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Checks one event; `Err((code, message))` rejects it.
pub fn check_event(
    event: &AccessEvent,
    caller: &Caller,
    now: DateTime<Utc>,
) -> Result<(), (&'static str, String)> {
    if event.device != caller.device || event.trust != caller.trust {
        return Err((
            codes::NOT_OWN_EVENT,
            format!(
                "the event names device {} of trust {}, but was sent by device {} of trust {}",
                event.device, event.trust, caller.device, caller.trust
            ),
        ));
    }
    let too_long = |what: &str, v: &Option<String>| {
        v.as_ref()
            .filter(|s| s.chars().count() > MAX_TEXT_CHARS)
            .map(|_| {
                (
                    codes::MALFORMED_EVENT,
                    format!("{what} is longer than {MAX_TEXT_CHARS} characters"),
                )
            })
    };
    if let Some(e) = too_long("staff_id", &event.staff_id) {
        return Err(e);
    }
    if let Some(e) = too_long("incident_ref", &event.incident_ref) {
        return Err(e);
    }
    if event.plan_types.len() > PlanType::ALL.len() || event.councils.len() > MAX_COUNCILS {
        return Err((
            codes::MALFORMED_EVENT,
            format!(
                "an event names at most {} plan types and {MAX_COUNCILS} councils",
                PlanType::ALL.len()
            ),
        ));
    }
    let _ = now;
    Ok(())
}

/// True when the event's times cannot be right: `accessed_at` before 2024 or more than a day
/// after `received_at` (the server's clock), or `data_as_of` (a server time) more than a day
/// after it. Such events are stored and notified with `clock_suspect`.
pub fn clock_suspect(event: &AccessEvent, received_at: DateTime<Utc>) -> bool {
    let latest = received_at + Duration::seconds(MAX_CLOCK_AHEAD_SECS);
    let earliest: DateTime<Utc> = EARLIEST_ACCESS.parse().unwrap_or(DateTime::UNIX_EPOCH);
    event.accessed_at > latest
        || event.accessed_at < earliest
        || event.data_as_of.is_some_and(|t| t > latest)
}

/// What an event id already stored means when it arrives again: the first stored version
/// always stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated {
    /// The new copy differs from the stored one.
    pub conflict: bool,
    /// What the audit log records, if anything (a plain retry records nothing).
    pub audit: Option<&'static str>,
    /// Whether its councils are notified again (idempotently: one notice per council).
    pub notify: bool,
}

/// The rule for an event id sent again, from `source`, with `body` where `stored` was kept.
/// An online confirmation was shown to the crew with the server's answer, so its councils
/// are notified even when the outbox's copy got here first; any other repeat is a retry
/// (nothing to do) or, with different content, logged and ignored.
pub fn repeated(stored: &str, body: &str, source: EventSource) -> Repeated {
    let conflict = stored != body;
    let confirm = source == EventSource::Confirm;
    Repeated {
        conflict,
        audit: match (conflict, confirm) {
            (true, true) => Some("event_confirmed"),
            (true, false) => Some("event_resent_different"),
            (false, _) => None,
        },
        notify: confirm,
    }
}

/// The councils a flagged access in unscheduled care notifies, each once, in code order;
/// none for a miss, and none for scheduled care (recorded in the audit trail only, as the
/// national service does).
pub fn councils_to_notify(event: &AccessEvent) -> BTreeSet<&CouncilCode> {
    if event.result != LookupResult::Flagged || !event.unscheduled {
        return BTreeSet::new();
    }
    event.councils.iter().collect()
}

/// The plan types a council is told of, given those it `held` for the subject (its flags,
/// and the change log's record of flags it had): those the event names that it held, or
/// else all it held. `None` when it held none: a council is only told of a subject it has,
/// or recently had, a flag for.
pub fn notified_plan_types(named: &[PlanType], held: &BTreeSet<PlanType>) -> Option<Vec<PlanType>> {
    if held.is_empty() {
        return None;
    }
    let named: BTreeSet<PlanType> = named.iter().filter(|p| held.contains(p)).copied().collect();
    Some(if named.is_empty() {
        held.iter().copied().collect()
    } else {
        named.into_iter().collect()
    })
}

/// When a notified access counts as the subject's contact: the tablet's time, unless its
/// clock was impossible, when the server's receipt time stands in (a wrong clock must not
/// order or date the subject's contacts).
pub fn contact_time(
    event: &AccessEvent,
    clock_suspect: bool,
    received_at: DateTime<Utc>,
) -> DateTime<Utc> {
    if clock_suspect {
        received_at
    } else {
        event.accessed_at
    }
}

/// Reads and checks each event of a batch on its own.
pub fn check_batch(
    events: Vec<serde_json::Value>,
    caller: &Caller,
    now: DateTime<Utc>,
) -> Result<Checked, BatchError> {
    let mut out = Checked::default();
    for (index, value) in events.into_iter().enumerate() {
        let raw = truncated(&value.to_string());
        let id = value
            .get("event_id")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<EventId>().ok());
        let mut reject = |event_id: EventId, code: &'static str, message: String| {
            out.refused.push(RefusedEvent {
                event_id: Some(event_id),
                code: code.to_owned(),
                detail: format!("{message}; sent: {raw}"),
            });
            out.rejected.push(RejectedEvent {
                event_id,
                code: code.to_owned(),
                message,
            });
        };
        let event: AccessEvent = match serde_json::from_value(value) {
            Ok(e) => e,
            Err(e) => {
                let Some(id) = id else {
                    return Err(BatchError::NoEventId { index });
                };
                reject(
                    id,
                    codes::MALFORMED_EVENT,
                    format!("the event cannot be read: {e}"),
                );
                continue;
            }
        };
        match check_event(&event, caller, now) {
            Ok(()) => out.accepted.push(event),
            Err((code, message)) => reject(event.event_id, code, message),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cpis_protocol::{CareSetting, Freshness, LookupResult, NhsNumber};

    fn now() -> DateTime<Utc> {
        "2025-06-01T12:00:00Z".parse().unwrap()
    }

    fn caller() -> Caller {
        Caller {
            device: DeviceId::new(),
            trust: "RX9".parse().unwrap(),
        }
    }

    fn event(c: &Caller) -> AccessEvent {
        AccessEvent {
            event_id: EventId::new(),
            accessed_at: now(),
            trust: c.trust.clone(),
            device: c.device,
            staff_id: None,
            nhs_number: "9434765919".parse::<NhsNumber>().unwrap(),
            result: LookupResult::NotFlagged,
            plan_types: vec![],
            councils: vec![],
            data_as_of: Some(now()),
            freshness: Freshness::Fresh,
            setting: CareSetting::Ambulance,
            incident_ref: None,
            unscheduled: true,
        }
    }

    #[test]
    fn a_repeated_id_keeps_the_first_version_and_a_confirmation_still_notifies() {
        let retry = repeated("a", "a", EventSource::Upload);
        assert_eq!(
            retry,
            Repeated {
                conflict: false,
                audit: None,
                notify: false
            }
        );
        let different = repeated("a", "b", EventSource::Upload);
        assert!(different.conflict && !different.notify);
        assert_eq!(different.audit, Some("event_resent_different"));
        let confirmed = repeated("a", "b", EventSource::Confirm);
        assert!(confirmed.conflict && confirmed.notify);
        assert_eq!(confirmed.audit, Some("event_confirmed"));
        let same_confirmation = repeated("a", "a", EventSource::Confirm);
        assert!(!same_confirmation.conflict && same_confirmation.notify);
        assert_eq!(same_confirmation.audit, None);
    }

    #[test]
    fn only_flagged_accesses_notify_each_named_council_once_of_what_it_held() {
        let c = caller();
        let mut e = event(&c);
        let leics: CouncilCode = "E10000018".parse().unwrap();
        let notts: CouncilCode = "E10000024".parse().unwrap();
        e.councils = vec![notts.clone(), leics.clone(), notts.clone()];
        assert!(councils_to_notify(&e).is_empty(), "a miss notifies nobody");
        e.result = LookupResult::Flagged;
        assert_eq!(
            councils_to_notify(&e).into_iter().collect::<Vec<_>>(),
            vec![&leics, &notts]
        );
        e.unscheduled = false;
        assert!(
            councils_to_notify(&e).is_empty(),
            "scheduled care: no notice"
        );
        e.unscheduled = true;

        let held: BTreeSet<PlanType> = [PlanType::Cpp, PlanType::Lac].into_iter().collect();
        // Named and held: only those; named but not held by this council: all it held.
        assert_eq!(
            notified_plan_types(&[PlanType::Lac, PlanType::Lac, PlanType::Ucpp], &held),
            Some(vec![PlanType::Lac])
        );
        assert_eq!(
            notified_plan_types(&[PlanType::Ucpp], &held),
            Some(vec![PlanType::Cpp, PlanType::Lac])
        );
        assert_eq!(
            notified_plan_types(&[PlanType::Cpp], &BTreeSet::new()),
            None
        );

        let received = now() + Duration::hours(1);
        assert_eq!(contact_time(&e, false, received), e.accessed_at);
        assert_eq!(contact_time(&e, true, received), received);
    }

    #[test]
    fn each_event_is_judged_alone() {
        let c = caller();
        let good = event(&c);
        let mut other = event(&c);
        other.device = DeviceId::new();
        let mut future = event(&c);
        future.accessed_at = now() + Duration::days(2);
        let mut unset = event(&c);
        unset.accessed_at = "1970-01-01T00:00:00Z".parse().unwrap();
        let mut long = event(&c);
        long.staff_id = Some("x".repeat(MAX_TEXT_CHARS + 1));
        let mut unreadable = serde_json::to_value(event(&c)).unwrap();
        unreadable["setting"] = "helicopter".into();
        let unreadable_id: EventId = unreadable["event_id"].as_str().unwrap().parse().unwrap();
        let values = vec![
            serde_json::to_value(&good).unwrap(),
            serde_json::to_value(&other).unwrap(),
            serde_json::to_value(&future).unwrap(),
            serde_json::to_value(&unset).unwrap(),
            serde_json::to_value(&long).unwrap(),
            unreadable,
        ];
        let checked = check_batch(values, &c, now()).unwrap();
        assert_eq!(
            checked.accepted,
            vec![good.clone(), future.clone(), unset.clone()],
            "a wrong tablet clock never stops a notice"
        );
        assert!(!clock_suspect(&good, now()));
        assert!(clock_suspect(&future, now()));
        assert!(clock_suspect(&unset, now()));
        let codes: Vec<(EventId, &str)> = checked
            .rejected
            .iter()
            .map(|r| (r.event_id, r.code.as_str()))
            .collect();
        assert_eq!(
            codes,
            vec![
                (other.event_id, codes::NOT_OWN_EVENT),
                (long.event_id, codes::MALFORMED_EVENT),
                (unreadable_id, codes::MALFORMED_EVENT),
            ]
        );
        assert_eq!(checked.refused.len(), 3);
    }

    #[test]
    fn an_event_without_a_readable_id_refuses_the_batch() {
        let c = caller();
        let mut v = serde_json::to_value(event(&c)).unwrap();
        v["event_id"] = "550e8400-e29b-41d4-a716-446655440000".into();
        let err =
            check_batch(vec![serde_json::to_value(event(&c)).unwrap(), v], &c, now()).unwrap_err();
        assert_eq!(err, BatchError::NoEventId { index: 1 });
    }
}
