//! Lookups against fixture data: the three input forms, matches with council contacts,
//! misses, invalid input, and the access event written before the answer.

use cpis_agent::{AgentError, LookupInput};
use cpis_protocol::{Freshness, LookupResult};

use crate::common::*;

#[test]
fn lookups_match_fixture_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(21, 2_000);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 5, t0());
    for f in data.flags.iter().step_by(37) {
        let digits = f.nhs_number.to_string();
        for form in [
            digits.clone(),
            f.nhs_number.spaced(),
            f.nhs_number.spaced().replace(' ', "-"),
        ] {
            let r = agent
                .lookup(LookupInput {
                    nhs_number: &form,
                    staff_id: Some("P123".into()),
                    incident_ref: None,
                })
                .unwrap();
            assert_eq!(r.result, LookupResult::Flagged, "{form}");
            assert_eq!(r.nhs_number, digits);
            assert_eq!(r.freshness, Freshness::Fresh);
            assert_eq!(r.data_as_of, Some(t0()));
            let expected: Vec<_> = data
                .flags
                .iter()
                .filter(|g| g.nhs_number == f.nhs_number)
                .collect();
            assert_eq!(r.flags.len(), expected.len());
            let view = r
                .flags
                .iter()
                .find(|v| v.plan_type == f.plan_type && v.council.ods == f.council)
                .unwrap();
            assert_eq!(view.start_date, f.start_date);
            let council = data.councils.iter().find(|c| c.code == f.council).unwrap();
            assert_eq!(view.council.name, council.name);
            assert_eq!(view.council.emergency_phone, council.emergency_phone);
            assert_eq!(r.coverage.councils.len(), data.councils.len());
            assert_eq!(r.region, data.region);
        }
    }
    let miss = unflagged_number(&data.flags);
    let r = agent
        .lookup(LookupInput {
            nhs_number: &miss.to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.result, LookupResult::NotFlagged);
    assert!(r.flags.is_empty());
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let status = agent.status().unwrap();
    assert_eq!(
        status.outbox_pending,
        (data.flags.iter().step_by(37).count() * 3 + 1) as u64
    );
}

#[test]
fn invalid_numbers_are_rejected_with_reason_and_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(22, 100);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    for (input, code) in [
        ("", "nhs_number_empty"),
        ("943476591", "nhs_number_wrong_length"),
        ("9434765918", "nhs_number_check_digit_mismatch"),
        ("94347659x9", "nhs_number_non_digit"),
        ("9434 765 919", "nhs_number_bad_grouping"),
    ] {
        match agent.lookup(LookupInput {
            nhs_number: input,
            ..Default::default()
        }) {
            Err(AgentError::InvalidNhsNumber(e)) => assert_eq!(e.code(), code, "{input}"),
            other => panic!("{input:?}: {other:?}"),
        }
    }
    assert_eq!(agent.status().unwrap().outbox_pending, 0);
}

#[test]
fn no_data_answers_unknown_and_records_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(23, 100);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    let r = agent
        .lookup(LookupInput {
            nhs_number: "943 476 5919",
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.result, LookupResult::Unknown);
    assert!(r.warnings.iter().any(|w| w.code == "no_data"));
    assert_eq!(agent.status().unwrap().outbox_pending, 1);
}

#[test]
fn event_is_durable_before_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(24, 200);
    let feed = Feed::new(data.region.clone());
    let (agent, clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 3, t0());
    let f = &data.flags[0];
    let r = agent
        .lookup(LookupInput {
            nhs_number: &f.nhs_number.to_string(),
            staff_id: Some("S-1".into()),
            incident_ref: Some("INC-9".into()),
        })
        .unwrap();
    drop(agent);
    // Reopen from disk (a new process would see the same): the event is there.
    let agent = cpis_agent::Agent::open(dir.path(), clock).unwrap();
    let events = agent.pending_events(10).unwrap();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.event_id, r.event_id);
    assert_eq!(e.nhs_number, f.nhs_number);
    assert_eq!(e.result, LookupResult::Flagged);
    assert_eq!(e.staff_id.as_deref(), Some("S-1"));
    assert_eq!(e.incident_ref.as_deref(), Some("INC-9"));
    assert_eq!(e.setting, cpis_protocol::CareSetting::Ambulance);
    assert!(e.councils.contains(&f.council));
    assert_eq!(e.data_as_of, Some(t0()));
}
