//! Event ingest: durable, de-duplicated by event id, each event judged on its own, one
//! notification per owning council, recent contacts, online confirmation.

use std::collections::BTreeSet;

use chrono::Duration;
use cpis_protocol::PlanType::{Cpp, Lac};
use cpis_protocol::api::{ErrorBody, codes, paths};
use cpis_protocol::confirm::{self, ConfirmRequest, ConfirmResponse};
use cpis_protocol::ingest::codes as reject;
use cpis_protocol::{DeviceId, EventId, EventUploadAck, LookupResult, MAX_RECENT_CONTACTS};
use cpis_sync_server::store::Store;

use crate::harness::*;

/// Seeds councils and flags: subject 1 is CPP with Leicestershire and LAC with
/// Nottinghamshire (both EM); subject 2 is CPP with Lancashire (NW).
async fn flagged_env() -> (Env, String, String, String) {
    // These tests check what confirmations answer, more of them than a device's default
    // confirmation burst (its limit is tested in `shed`).
    let env = Env::start_with(|c| c.load_shedding.confirm_burst = 50).await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let notts = env.council_token(NOTTS).await;
    let lancs = env.council_token(LANCS).await;
    for (token, ods, rows) in [
        (&leics, LEICS, csv(&[(1, "CPP", "2024-01-01", "")])),
        (&notts, NOTTS, csv(&[(1, "LAC", "2024-02-01", "")])),
        (&lancs, LANCS, csv(&[(2, "CPP", "2024-03-01", "")])),
    ] {
        assert_eq!(env.upload(token, ods, &rows).await.status(), 200);
    }
    (env, leics, notts, lancs)
}

#[tokio::test]
async fn a_batch_is_stored_once_and_each_owning_council_told_once() {
    let (env, leics, notts, lancs) = flagged_env().await;
    let d = env.enrol(EM).await;
    let at = t0() - Duration::minutes(90);
    let both = d.event(1, at, &[LEICS, NOTTS], &[Cpp, Lac]);
    let miss = d.event(5, at, &[], &[]);
    // A forged council list: Lancashire holds no flag for subject 1 and is never told.
    let forged = d.event(1, at, &[LEICS, LANCS], &[Cpp]);
    let mut not_own = d.event(1, at, &[LEICS], &[Cpp]);
    not_own.device = DeviceId::new();
    let batch = vec![both.clone(), miss.clone(), not_own.clone(), forged.clone()];

    for round in 0..2 {
        let ack = d.send_events(&env, &batch).await;
        assert_eq!(
            ack.stored,
            vec![both.event_id, miss.event_id, forged.event_id],
            "round {round}: every event held is acknowledged, every time"
        );
        assert_eq!(ack.rejected.len(), 1);
        assert_eq!(ack.rejected[0].event_id, not_own.event_id);
        assert_eq!(ack.rejected[0].code, reject::NOT_OWN_EVENT);
    }
    let mut expected = vec![both.event_id, miss.event_id, forged.event_id];
    expected.sort();
    assert_eq!(env.store().event_ids().await.unwrap(), expected);

    let l = env.mailbox(&leics, LEICS).await;
    let n = env.mailbox(&notts, NOTTS).await;
    assert_eq!(
        l.iter().map(|x| x.event_id).collect::<Vec<_>>(),
        vec![both.event_id, forged.event_id]
    );
    assert_eq!(
        n.iter().map(|x| x.event_id).collect::<Vec<_>>(),
        vec![both.event_id]
    );
    assert!(env.mailbox(&lancs, LANCS).await.is_empty());
    // Each council sees only its own plan types; the notice carries DESIGN §6's fields.
    assert_eq!(l[0].plan_types, vec![Cpp]);
    assert_eq!(n[0].plan_types, vec![Lac]);
    assert_eq!(l[0].nhs_number, nhs(1));
    assert_eq!(l[0].accessed_at, at);
    assert_eq!(l[0].received_at, t0());
    assert_eq!(l[0].organisation.ods.as_str(), "RX9");
    assert_eq!(l[0].organisation.name, "East Midlands Ambulance");
    assert_eq!(l[0].device_id, d.enrolment.device_id);
    assert_eq!(l[0].staff_id.as_deref(), Some("P0001"));
    assert_eq!(l[0].incident_ref.as_deref(), Some("INC-1"));
    assert_eq!(l[0].data_as_of, both.data_as_of);
    assert!(!l[0].overdue);

    // Every event is in the audit log, once.
    let audit = env.store().audit_entries(both.event_id).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["event_stored", "notification_queued", "notification_queued"]
    );
    let refused = env.store().audit_entries(not_own.event_id).await.unwrap();
    assert_eq!(
        refused.len(),
        2,
        "the rejected event is audited at each attempt"
    );
    assert!(refused.iter().all(|a| a.action == "event_refused"));

    // The same id with different content: still "stored", the first version stands.
    let mut changed = miss.clone();
    changed.staff_id = Some("SOMEONE-ELSE".into());
    let ack = d.send_events(&env, &[changed]).await;
    assert_eq!(ack.stored, vec![miss.event_id]);
    let kept = env
        .store()
        .stored_event(miss.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.event, miss);
    let audit = env.store().audit_entries(miss.event_id).await.unwrap();
    assert_eq!(audit.last().unwrap().action, "event_resent_different");

    // The access→receipt delay is recorded once per stored event (90 minutes each).
    let m = env.metrics().await;
    assert_eq!(metric(&m, "cpis_event_delay_seconds_count"), Some(3.0));
    assert_eq!(
        metric(&m, "cpis_event_delay_seconds_sum"),
        Some(3.0 * 5400.0)
    );
    assert_eq!(
        metric(
            &m,
            "cpis_access_events_total{outcome=\"duplicate\",source=\"upload\"}"
        ),
        Some(4.0)
    );
    env.stop().await;
}

#[tokio::test]
async fn bad_events_are_rejected_one_by_one_and_bad_batches_whole() {
    let (env, leics, _, _) = flagged_env().await;
    let d = env.enrol(EM).await;
    let good = d.event(1, t0(), &[LEICS], &[Cpp]);
    let future = d.event(1, t0() + Duration::days(2), &[LEICS], &[Cpp]);
    let mut other_trust = d.event(1, t0(), &[LEICS], &[Cpp]);
    other_trust.trust = "RYA".parse().unwrap();
    let mut unreadable = serde_json::to_value(d.event(1, t0(), &[LEICS], &[Cpp])).unwrap();
    unreadable["result"] = "maybe".into();
    let body = serde_json::json!({ "events": [good, future, other_trust, unreadable] });
    let r = d
        .client
        .post(env.url(paths::EVENTS))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ack: cpis_protocol::EventUploadAck = r.json().await.unwrap();
    // A tablet clock two days ahead is not a reason to lose the notice.
    assert_eq!(ack.stored, vec![good.event_id, future.event_id]);
    let codes_seen: Vec<&str> = ack.rejected.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(
        codes_seen,
        vec![reject::NOT_OWN_EVENT, reject::MALFORMED_EVENT]
    );
    assert_eq!(env.mailbox(&leics, LEICS).await.len(), 2);

    // Too many events, or too many bytes: 413, nothing stored.
    let many: Vec<_> = (0..501).map(|_| d.event(7, t0(), &[], &[])).collect();
    let r = d.post_events(&env, &many).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::TOO_LARGE
    );
    let r = d
        .client
        .post(env.url(paths::EVENTS))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Not a batch at all: 400.
    let r = d
        .client
        .post(env.url(paths::EVENTS))
        .json(&serde_json::json!({"items": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut stored = vec![good.event_id, future.event_id];
    stored.sort();
    assert_eq!(env.store().event_ids().await.unwrap(), stored);

    // No certificate: 401; revoked: 403 with wipe.
    let r = env
        .client()
        .post(env.url(paths::EVENTS))
        .json(&serde_json::json!({"events": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    env.store()
        .revoke_device(d.enrolment.device_id, t0())
        .await
        .unwrap();
    // A revoked device is refused everything but the delivery of its outbox, which is
    // stored and recorded as sent after the revocation (no notice is lost to it).
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.json::<ErrorBody>().await.unwrap().error.wipe);
    let late = d.event(1, t0(), &[], &[]);
    let r = d.post_events(&env, std::slice::from_ref(&late)).await;
    assert_eq!(r.status(), 200);
    let ack: EventUploadAck = r.json().await.unwrap();
    assert_eq!(ack.stored, vec![late.event_id]);
    let stored = env
        .store()
        .stored_event(late.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.source, "after_revocation");
    // Its online confirmation is refused like any other route.
    let r = d
        .client
        .post(env.url(confirm::PATH))
        .json(&ConfirmRequest {
            event: d.event(2, t0(), &[], &[]),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    env.stop().await;
}

#[tokio::test]
async fn recent_contacts_keep_the_newest_25_and_travel_with_each_notice() {
    let (env, leics, _, _) = flagged_env().await;
    let d = env.enrol(EM).await;
    // 30 contacts a day apart, sent out of order in two batches.
    let mut events: Vec<_> = (0..30)
        .map(|i| d.event(1, t0() - Duration::days(i), &[LEICS], &[Cpp]))
        .collect();
    events.reverse();
    d.send_events(&env, &events[..13]).await;
    d.send_events(&env, &events[13..]).await;
    // A not-flagged lookup of the same subject is no contact of a flagged subject.
    d.send_events(&env, &[d.event(1, t0(), &[], &[])]).await;

    let contacts = env.store().recent_contacts(nhs(1)).await.unwrap();
    assert_eq!(contacts.len(), MAX_RECENT_CONTACTS);
    let dates: Vec<_> = contacts.iter().map(|c| c.date).collect();
    let expected: Vec<_> = (0..25)
        .map(|i| (t0() - Duration::days(i)).date_naive())
        .collect();
    assert_eq!(dates, expected, "newest first; the 5 oldest dropped");
    assert_eq!(contacts[0].organisation.name, "East Midlands Ambulance");
    assert_eq!(contacts[0].setting, cpis_protocol::CareSetting::Ambulance);

    let notices = env.mailbox(&leics, LEICS).await;
    assert_eq!(notices.len(), 30);
    assert!(notices.iter().all(|n| n.recent_contacts == contacts));
    // Other subjects have none.
    assert!(
        env.store()
            .recent_contacts(nhs(2))
            .await
            .unwrap()
            .is_empty()
    );
    env.stop().await;
}

/// One batch is judged exactly as if its events had come one by one, in batch order: a
/// repeated id is new only at its first occurrence, and a contact counts as changed only when
/// it is still among the newest 25 right after its own addition. (The PostgreSQL backend
/// stores a batch in a few set-based statements; the conformance pass runs this on both.)
#[tokio::test]
async fn a_batch_is_judged_as_if_its_events_came_one_by_one() {
    use cpis_sync_server::store::{EventIngest, EventSource, IngestEvent};
    let (env, _, _, _) = flagged_env().await;
    let d = env.enrol(EM).await;
    let day = |n: i64| t0() - Duration::days(n);
    // 23 contacts already kept: 10 to 32 days ago.
    let before: Vec<_> = (10..33)
        .map(|n| d.event(1, day(n), &[LEICS], &[Cpp]))
        .collect();
    d.send_events(&env, &before).await;
    let head = env.store().head_version().await.unwrap();

    let flagged = |n| d.event(1, day(n), &[LEICS], &[Cpp]);
    let (a, b, c, e, f) = (
        flagged(40),
        flagged(1),
        flagged(50),
        flagged(2),
        flagged(45),
    );
    let mut a_changed = a.clone();
    a_changed.incident_ref = Some("INC-2".into());
    let batch = [
        a.clone(), // 24 kept: kept
        b.clone(), // 25 kept: kept
        c,         // the oldest of 26: dropped at once
        e,         // pushes out a (40 days): kept
        b.clone(), // the same event again: not new, no notice, no contact
        f,         // older than all 25 kept: dropped at once
        a_changed, // a again with other content: the first stands
    ];
    let outcomes = env
        .store()
        .ingest_events(EventIngest {
            device: d.enrolment.device_id,
            trust: d.enrolment.trust.clone(),
            source: EventSource::Upload,
            received_at: t0(),
            events: batch
                .iter()
                .map(|e| IngestEvent::new(e.clone(), t0()).unwrap())
                .collect(),
            refused: Vec::new(),
        })
        .await
        .unwrap();
    let judged: Vec<_> = outcomes
        .iter()
        .map(|o| {
            (
                o.new,
                o.conflict,
                !o.notified.is_empty(),
                o.contacts_changed,
            )
        })
        .collect();
    assert_eq!(
        judged,
        [
            (true, false, true, true),
            (true, false, true, true),
            (true, false, true, false),
            (true, false, true, true),
            (false, false, false, false),
            (true, false, true, false),
            (false, true, false, false),
        ],
        "(new, conflict, notified, contacts changed) per event"
    );
    // Three contacts changes, each one version per council holding subject 1 (two).
    assert_eq!(env.store().head_version().await.unwrap(), head + 6);
    let dates: Vec<_> = env
        .store()
        .recent_contacts(nhs(1))
        .await
        .unwrap()
        .iter()
        .map(|c| c.date)
        .collect();
    let expected: Vec<_> = [1, 2]
        .into_iter()
        .chain(10..33)
        .map(|n| day(n).date_naive())
        .collect();
    assert_eq!(dates, expected);
    // One batch's entries share one time; their order among themselves is the backend's.
    let actions: BTreeSet<String> = env
        .store()
        .audit_entries(a.event_id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        BTreeSet::from(
            [
                "event_stored",
                "event_resent_different",
                "notification_queued"
            ]
            .map(String::from)
        )
    );
    env.stop().await;
}

#[tokio::test]
async fn online_confirmation_answers_nationally_and_records_the_access() {
    let (env, _, _, lancs) = flagged_env().await;
    let d = env.enrol(EM).await;
    let confirm = |event: cpis_protocol::AccessEvent| {
        let client = d.client.clone();
        let url = env.url(confirm::PATH);
        async move {
            client
                .post(url)
                .json(&ConfirmRequest { event })
                .send()
                .await
                .unwrap()
        }
    };

    // Subject 2 is flagged only in NW: an EM tablet's regional miss is confirmed as flagged.
    let miss = d.event(2, t0() - Duration::seconds(3), &[], &[]);
    let r = confirm(miss.clone()).await;
    assert_eq!(r.status(), 200);
    let answer: ConfirmResponse = r.json().await.unwrap();
    assert_eq!(answer.result, LookupResult::Flagged);
    assert_eq!(answer.event_id, miss.event_id);
    assert_eq!(answer.checked_at, t0());
    assert_eq!(answer.councils_covered, 3);
    assert_eq!(answer.flags.len(), 1);
    let f = &answer.flags[0];
    assert_eq!(f.council.ods.as_str(), LANCS);
    assert_eq!(f.council.emergency_phone, "0116 000 0000");
    assert_eq!(f.plan_type, Cpp);
    assert!(!f.ended);
    assert!(answer.recent_contacts.is_empty(), "no earlier contacts");

    // Stored as the answer the crew was shown, and Lancashire is told.
    let stored = env
        .store()
        .stored_event(miss.event_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.source, "confirm");
    assert_eq!(stored.event.result, LookupResult::Flagged);
    assert_eq!(stored.event.councils, vec![council(LANCS)]);
    assert_eq!(stored.event.data_as_of, Some(t0()));
    let notices = env.mailbox(&lancs, LANCS).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].event_id, miss.event_id);

    // A retry of the same confirmation changes nothing; the outbox copy is then "stored".
    assert_eq!(confirm(miss.clone()).await.status(), 200);
    let ack = d.send_events(&env, std::slice::from_ref(&miss)).await;
    assert_eq!(ack.stored, vec![miss.event_id]);
    assert_eq!(env.mailbox(&lancs, LANCS).await.len(), 1);

    // The outbox copy got there first (a background sync raced the check): the council is
    // still told, once, since the crew saw its flag.
    let raced = d.event(2, t0(), &[], &[]);
    d.send_events(&env, std::slice::from_ref(&raced)).await;
    assert_eq!(confirm(raced.clone()).await.status(), 200);
    assert_eq!(confirm(raced.clone()).await.status(), 200);
    let ids: Vec<EventId> = env
        .mailbox(&lancs, LANCS)
        .await
        .iter()
        .map(|n| n.event_id)
        .collect();
    assert_eq!(ids, vec![miss.event_id, raced.event_id]);
    let second: ConfirmResponse = confirm(d.event(2, t0(), &[], &[]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        second.recent_contacts.len(),
        2,
        "the crew sees earlier contacts"
    );

    // Nobody flags subject 9: not flagged, nationally; still recorded.
    let nobody = d.event(9, t0(), &[], &[]);
    let answer: ConfirmResponse = confirm(nobody.clone()).await.json().await.unwrap();
    assert_eq!(answer.result, LookupResult::NotFlagged);
    assert!(answer.flags.is_empty());
    assert!(
        env.store()
            .stored_event(nobody.event_id)
            .await
            .unwrap()
            .is_some()
    );

    // Another device's event: 403; and the national answer is not given.
    let mut not_own = d.event(2, t0(), &[], &[]);
    not_own.device = DeviceId::new();
    let r = confirm(not_own.clone()).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        reject::NOT_OWN_EVENT
    );
    assert!(
        env.store()
            .stored_event(not_own.event_id)
            .await
            .unwrap()
            .is_none()
    );
    let all: BTreeSet<EventId> = env.store().event_ids().await.unwrap().into_iter().collect();
    assert_eq!(all.len(), 4);
    env.stop().await;
}

#[tokio::test]
async fn a_tablet_with_a_wrong_clock_still_notifies_the_council_marked_clock_suspect() {
    let (env, leics, _, _) = flagged_env().await;
    let d = env.enrol(EM).await;
    // Clock unset (1970), and a year ahead.
    let mut unset = d.event(1, "1970-01-01T00:05:00Z".parse().unwrap(), &[LEICS], &[Cpp]);
    unset.data_as_of = None;
    let ahead = d.event(1, t0() + Duration::days(365), &[LEICS], &[Cpp]);
    let right = d.event(1, t0() - Duration::days(2), &[LEICS], &[Cpp]);
    let ack = d
        .send_events(&env, &[unset.clone(), ahead.clone(), right.clone()])
        .await;
    assert_eq!(
        ack.stored,
        vec![unset.event_id, ahead.event_id, right.event_id]
    );
    assert!(ack.rejected.is_empty());

    let mailbox = env.mailbox(&leics, LEICS).await;
    assert_eq!(mailbox.len(), 3, "every lookup reaches the council");
    let by_event = |id| mailbox.iter().find(|n| n.event_id == id).unwrap();
    for (event, suspect) in [(&unset, true), (&ahead, true), (&right, false)] {
        let n = by_event(event.event_id);
        assert_eq!(n.clock_suspect, suspect, "{:?}", event.accessed_at);
        assert_eq!(
            n.accessed_at, event.accessed_at,
            "the tablet's time as sent"
        );
        assert_eq!(n.received_at, t0(), "the server's time");
    }
    // The JSON carries the field.
    let raw: serde_json::Value = env
        .client()
        .get(env.url(&format!("/v1/councils/{LEICS}/notifications")))
        .bearer_auth(&leics)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["notifications"][0]["clock_suspect"], true);

    // The recent contacts are dated by the server for the suspect events, not 1970 or next
    // year; the good one keeps the tablet's date.
    let contacts = env.store().recent_contacts(nhs(1)).await.unwrap();
    let dates: Vec<_> = contacts.iter().map(|c| c.date).collect();
    assert_eq!(
        dates,
        vec![
            t0().date_naive(),
            t0().date_naive(),
            (t0() - Duration::days(2)).date_naive()
        ]
    );
    // Overdue counts from the server's queue time, whatever the tablet said.
    env.clock.advance(Duration::days(6));
    let mailbox = env.mailbox(&leics, LEICS).await;
    assert!(mailbox.iter().all(|n| n.overdue));
    env.stop().await;
}
