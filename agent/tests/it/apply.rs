//! Every verification rejection leaves the previous data in place (DESIGN.md §2 rules 4–5).

use chrono::Duration;
use cpis_agent::{Agent, LookupInput};
use cpis_protocol::{
    Change, DeltaBody, LookupResult, SignedMessage, SigningKey, VerifyError, VersionedChange,
};

use crate::common::*;

struct Setup {
    _dir: tempfile::TempDir,
    agent: Agent,
    feed: Feed,
    data: RegionData,
}

/// An agent holding epoch 1, version 10 of a fixture region, verified at t0.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(11, 400);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 10, t0());
    Setup {
        _dir: dir,
        agent,
        feed,
        data,
    }
}

/// A plain lookup of one NHS number.
fn look_up(agent: &Agent, n: cpis_protocol::NhsNumber) -> cpis_protocol::local::LookupResponse {
    agent
        .lookup(LookupInput {
            nhs_number: &n.to_string(),
            ..Default::default()
        })
        .unwrap()
}

/// The previous data is still there, answering as before.
fn assert_kept(s: &Setup) {
    let st = s.agent.state().unwrap();
    assert_eq!(st.data, Some((1, 10)));
    let f = &s.data.flags[0];
    let r = s
        .agent
        .lookup(LookupInput {
            nhs_number: &f.nhs_number.to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
}

#[test]
fn bad_signature_is_rejected() {
    let s = setup();
    let mut other = s.feed.clone();
    other.key = SigningKey::from_bytes(&[9u8; 32]);
    let e = verify_err(s.agent.accept_checkpoint(&other.checkpoint(1, 11, t0())));
    assert_eq!(e, VerifyError::BadSignature);
    // A genuine checkpoint, then a snapshot signed by another key.
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 11, t0()))
        .unwrap();
    let (meta, body) = other.snapshot(1, 11, t0(), &s.data.councils, &s.data.flags[1..]);
    assert_eq!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, &body)),
        VerifyError::BadSignature
    );
    // A bit flipped in the signed payload.
    let (mut meta, body) = s
        .feed
        .snapshot(1, 11, t0(), &s.data.councils, &s.data.flags[1..]);
    meta.payload[3] ^= 0x40;
    assert_eq!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, &body)),
        VerifyError::BadSignature
    );
    assert_kept(&s);
}

#[test]
fn tampered_oversize_and_truncated_bodies_are_rejected() {
    let s = setup();
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 11, t0()))
        .unwrap();
    let (meta, body) = s
        .feed
        .snapshot(1, 11, t0(), &s.data.councils, &s.data.flags[1..]);
    let mut tampered = body.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    assert_eq!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, &tampered)),
        VerifyError::DigestMismatch
    );
    let mut long = body.clone();
    long.extend_from_slice(&[0u8; 100]);
    assert!(matches!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, &long)),
        VerifyError::OversizeBody { .. }
    ));
    let short = &body[..body.len() - 1];
    assert!(matches!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, short)),
        VerifyError::TruncatedBody { .. }
    ));
    assert_kept(&s);
}

#[test]
fn rollback_is_rejected() {
    let s = setup();
    // A checkpoint older than one already verified.
    let e = verify_err(s.agent.accept_checkpoint(&s.feed.checkpoint(
        1,
        10,
        t0() - Duration::hours(1),
    )));
    assert!(matches!(e, VerifyError::Rollback { .. }), "{e:?}");
    // A checkpoint with a lower head version.
    let e = verify_err(s.agent.accept_checkpoint(&s.feed.checkpoint(1, 9, t0())));
    assert!(matches!(e, VerifyError::Rollback { .. }), "{e:?}");
    // An older snapshot under a valid checkpoint.
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 12, t0()))
        .unwrap();
    let (meta, body) = s
        .feed
        .snapshot(1, 5, t0(), &s.data.councils, &s.data.flags[1..]);
    let e = verify_err(s.agent.apply_snapshot(&cp, &meta, &body));
    assert!(matches!(e, VerifyError::Rollback { .. }), "{e:?}");
    assert_kept(&s);
}

#[test]
fn mix_and_match_delta_is_rejected() {
    let s = setup();
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 20, t0()))
        .unwrap();
    let body = DeltaBody {
        councils: s.data.councils.clone(),
        changes: vec![VersionedChange {
            version: 15,
            change: Change::Remove(s.data.flags[0].key()),
        }],
    };
    let (meta, bytes) = s.feed.delta(1, 12, 15, t0(), &body);
    assert_eq!(
        verify_err(s.agent.apply_delta(&cp, &meta, &bytes)),
        VerifyError::BaseMismatch { held: 10, base: 12 }
    );
    // Another epoch's delta.
    let (meta, bytes) = s.feed.delta(2, 10, 15, t0(), &body);
    assert!(matches!(
        verify_err(s.agent.apply_delta(&cp, &meta, &bytes)),
        VerifyError::WrongEpoch { .. }
    ));
    // A snapshot envelope passed as a delta.
    let (smeta, sbody) = s
        .feed
        .snapshot(1, 20, t0(), &s.data.councils, &s.data.flags);
    assert!(matches!(
        verify_err(s.agent.apply_delta(&cp, &smeta, &sbody)),
        VerifyError::WrongKind { .. }
    ));
    // A delta whose changes lie outside its declared range.
    let bad = DeltaBody {
        councils: s.data.councils.clone(),
        changes: vec![VersionedChange {
            version: 25,
            change: Change::Remove(s.data.flags[0].key()),
        }],
    };
    let (meta, bytes) = s.feed.delta(1, 10, 15, t0(), &bad);
    assert!(matches!(
        verify_err(s.agent.apply_delta(&cp, &meta, &bytes)),
        VerifyError::Malformed(_)
    ));
    assert_kept(&s);
}

#[test]
fn wrong_region_and_expired_are_rejected() {
    let s = setup();
    let mut other = s.feed.clone();
    other.region = "ZZ".parse().unwrap();
    assert!(matches!(
        verify_err(s.agent.accept_checkpoint(&other.checkpoint(1, 11, t0()))),
        VerifyError::WrongRegion { .. }
    ));
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 11, t0()))
        .unwrap();
    let (meta, body) = other.snapshot(1, 11, t0(), &s.data.councils, &s.data.flags);
    assert!(matches!(
        verify_err(s.agent.apply_snapshot(&cp, &meta, &body)),
        VerifyError::WrongRegion { .. }
    ));
    // A checkpoint that expired before now (freeze attack).
    let mut old = s.feed.checkpoint_msg(1, 11, t0());
    old.expires_at = t0() - Duration::minutes(1);
    let signed = SignedMessage::sign(&s.feed.key, &old);
    assert!(matches!(
        verify_err(s.agent.accept_checkpoint(&signed)),
        VerifyError::Expired { .. }
    ));
    // A flag count that does not match the body.
    let body = cpis_protocol::SnapshotBody {
        councils: s.data.councils.clone(),
        flags: s.data.flags.clone(),
        contacts: vec![],
    };
    let (bytes, info) = cpis_protocol::encode_body(&body, 3).unwrap();
    let meta = cpis_protocol::SnapshotMeta {
        region: s.feed.region.clone(),
        epoch: 1,
        version: 11,
        server_time: t0(),
        flag_count: s.data.flags.len() as u64 + 1,
        body: info,
    };
    let signed = SignedMessage::sign(&s.feed.key, &meta);
    assert!(matches!(
        verify_err(s.agent.apply_snapshot(&cp, &signed, &bytes)),
        VerifyError::Malformed(_)
    ));
    assert_kept(&s);
}

#[test]
fn delta_applies_changes() {
    let s = setup();
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 12, t0()))
        .unwrap();
    let gone = s.data.flags[0].clone();
    let mut ended = s.data.flags[1].clone();
    ended.end_date = Some(as_of_day() - chrono::Days::new(30));
    let mut added = s.data.flags[2].clone();
    added.nhs_number = unflagged_number(&s.data.flags);
    let body = DeltaBody {
        councils: s.data.councils.clone(),
        changes: vec![
            VersionedChange {
                version: 11,
                change: Change::Remove(gone.key()),
            },
            VersionedChange {
                version: 12,
                change: Change::Upsert(ended.clone()),
            },
            VersionedChange {
                version: 12,
                change: Change::Upsert(added.clone()),
            },
        ],
    };
    // Two changes at one version is out of order: rejected.
    let (meta, bytes) = s.feed.delta(1, 10, 12, t0(), &body);
    assert!(matches!(
        verify_err(s.agent.apply_delta(&cp, &meta, &bytes)),
        VerifyError::Malformed(_)
    ));
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 13, t0()))
        .unwrap();
    let mut body = body;
    body.changes[2].version = 13;
    let (meta, bytes) = s.feed.delta(1, 10, 13, t0(), &body);
    s.agent.apply_delta(&cp, &meta, &bytes).unwrap();
    assert_eq!(s.agent.state().unwrap().data, Some((1, 13)));
    let look = |n| look_up(&s.agent, n);
    let still_flagged = s
        .data
        .flags
        .iter()
        .filter(|f| f.nhs_number == gone.nhs_number)
        .count()
        > 1;
    if !still_flagged {
        assert_eq!(look(gone.nhs_number).result, LookupResult::NotFlagged);
    }
    let r = look(ended.nhs_number);
    let v = r
        .flags
        .iter()
        .find(|f| f.plan_type == ended.plan_type && f.council.ods == ended.council)
        .unwrap();
    assert!(v.ended);
    assert_eq!(v.end_date, ended.end_date);
    assert_eq!(r.result, LookupResult::Flagged);
    assert_eq!(look(added.nhs_number).result, LookupResult::Flagged);
}

/// Body format 2: a delta may carry a subject's recent contacts. The agent does not keep
/// them yet; the delta still applies (its version is taken) and every flag stays as it was.
#[test]
fn delta_carrying_recent_contacts_applies_and_keeps_flags() {
    let s = setup();
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 11, t0()))
        .unwrap();
    let subject = s.data.flags[0].nhs_number;
    let contacts = cpis_protocol::SubjectContacts {
        nhs_number: subject,
        contacts: vec![cpis_protocol::RecentContact {
            date: as_of_day(),
            organisation: cpis_protocol::Organisation {
                ods: "RX9".parse().unwrap(),
                name: "East Midlands Ambulance".into(),
            },
            setting: cpis_protocol::CareSetting::Ambulance,
        }],
    };
    let body = DeltaBody {
        councils: s.data.councils.clone(),
        changes: vec![VersionedChange {
            version: 11,
            change: Change::Contacts(contacts),
        }],
    };
    let (meta, bytes) = s.feed.delta(1, 10, 11, t0(), &body);
    s.agent.apply_delta(&cp, &meta, &bytes).unwrap();
    assert_eq!(s.agent.state().unwrap().data, Some((1, 11)));
    let r = s
        .agent
        .lookup(LookupInput {
            nhs_number: &subject.to_string(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.result, LookupResult::Flagged);
    let held = s
        .data
        .flags
        .iter()
        .filter(|f| f.nhs_number == subject)
        .count();
    assert_eq!(r.flags.len(), held);
}

/// A server from before the columnar body sends snapshots as rows (body format 2): this
/// version installs them the same.
#[test]
fn a_snapshot_in_the_row_format_of_an_older_server_installs() {
    let s = setup();
    let gone = s.data.flags[0].nhs_number;
    let kept: Vec<cpis_protocol::FlagRecord> = s
        .data
        .flags
        .iter()
        .filter(|f| f.nhs_number != gone)
        .cloned()
        .collect();
    let body = cpis_protocol::SnapshotBody {
        councils: s.data.councils.clone(),
        flags: kept.clone(),
        contacts: vec![],
    };
    let (bytes, info) =
        cpis_protocol::encode_snapshot(&body, 3, cpis_protocol::BODY_FORMAT).unwrap();
    assert_eq!(info.format, 2);
    let meta = cpis_protocol::SnapshotMeta {
        region: s.feed.region.clone(),
        epoch: 1,
        version: 11,
        server_time: t0(),
        flag_count: kept.len() as u64,
        body: info,
    };
    let cp = s
        .agent
        .accept_checkpoint(&s.feed.checkpoint(1, 11, t0()))
        .unwrap();
    let signed = SignedMessage::sign(&s.feed.key, &meta);
    s.agent.apply_snapshot(&cp, &signed, &bytes).unwrap();
    assert_eq!(s.agent.state().unwrap().data, Some((1, 11)));
    assert_eq!(look_up(&s.agent, gone).result, LookupResult::NotFlagged);
    assert_eq!(
        look_up(&s.agent, kept[0].nhs_number).result,
        LookupResult::Flagged
    );
}
