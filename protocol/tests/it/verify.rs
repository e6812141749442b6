//! Each rejection of DESIGN.md §2 rule 5 has its own typed error.

use chrono::Duration;
use cpis_protocol::{
    BodyInfo, Checkpoint, DeltaBody, DeltaMeta, Policy, Position, SnapshotBody, SnapshotMeta,
    VerifyError, encode_body,
};

use crate::{council_info, region, t0};

fn cp(epoch: u64, head: u64) -> Checkpoint {
    Checkpoint {
        region: region("EM"),
        epoch,
        head_version: head,
        server_time: t0(),
        expires_at: t0() + Duration::hours(24),
        policy: Policy::default(),
    }
}

fn held(epoch: u64, version: u64) -> Position {
    Position {
        region: region("EM"),
        data: Some((epoch, version)),
        server_time: Some(t0() - Duration::hours(1)),
    }
}

fn body_info() -> BodyInfo {
    encode_body(
        &DeltaBody {
            councils: vec![council_info("E0601")],
            changes: vec![],
        },
        3,
    )
    .unwrap()
    .1
}

fn delta(epoch: u64, from: u64, to: u64) -> DeltaMeta {
    DeltaMeta {
        region: region("EM"),
        epoch,
        from_version: from,
        to_version: to,
        server_time: t0(),
        change_count: 0,
        body: body_info(),
    }
}

fn snapshot(epoch: u64, version: u64) -> SnapshotMeta {
    SnapshotMeta {
        region: region("EM"),
        epoch,
        version,
        server_time: t0(),
        flag_count: 0,
        body: body_info(),
    }
}

#[test]
fn a_good_checkpoint_passes() {
    cp(1, 10).check(&held(1, 9), t0()).unwrap();
    cp(1, 10)
        .check(&Position::empty(region("EM")), t0())
        .unwrap();
    // The same checkpoint again is accepted (it does not refresh anything).
    cp(1, 10).check(&held(1, 10), t0()).unwrap();
}

#[test]
fn wrong_region() {
    let mut c = cp(1, 10);
    c.region = region("LON");
    assert!(matches!(
        c.check(&held(1, 9), t0()),
        Err(VerifyError::WrongRegion { .. })
    ));
    let mut d = delta(1, 9, 10);
    d.region = region("LON");
    assert!(matches!(
        d.check(&held(1, 9), &cp(1, 10)),
        Err(VerifyError::WrongRegion { .. })
    ));
    let mut s = snapshot(1, 10);
    s.region = region("LON");
    assert!(matches!(
        s.check(&held(1, 9), &cp(1, 10)),
        Err(VerifyError::WrongRegion { .. })
    ));
}

#[test]
fn rollback() {
    // Older version in the same epoch.
    let err = cp(1, 8).check(&held(1, 9), t0()).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Rollback {
                what: "version",
                ..
            }
        ),
        "{err}"
    );
    // Older epoch.
    let err = cp(0, 50).check(&held(1, 9), t0()).unwrap_err();
    assert!(
        matches!(err, VerifyError::Rollback { what: "epoch", .. }),
        "{err}"
    );
    // Older server time than already verified: a replayed checkpoint.
    let mut pos = held(1, 9);
    pos.server_time = Some(t0() + Duration::minutes(5));
    let err = cp(1, 10).check(&pos, t0()).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Rollback {
                what: "server time",
                ..
            }
        ),
        "{err}"
    );
    // An older snapshot.
    let err = snapshot(1, 5).check(&held(1, 9), &cp(1, 10)).unwrap_err();
    assert!(matches!(err, VerifyError::Rollback { .. }), "{err}");
    // A delta that does not move forward.
    let err = delta(1, 9, 9).check(&held(1, 9), &cp(1, 10)).unwrap_err();
    assert!(matches!(err, VerifyError::Rollback { .. }), "{err}");
}

#[test]
fn wrong_epoch() {
    assert_eq!(
        delta(2, 9, 10).check(&held(1, 9), &cp(2, 10)),
        Err(VerifyError::WrongEpoch {
            expected: 1,
            found: 2
        })
    );
    assert_eq!(
        snapshot(1, 10).check(&held(1, 9), &cp(2, 10)),
        Err(VerifyError::WrongEpoch {
            expected: 2,
            found: 1
        })
    );
}

#[test]
fn base_mismatch() {
    assert_eq!(
        delta(1, 7, 10).check(&held(1, 9), &cp(1, 10)),
        Err(VerifyError::BaseMismatch { held: 9, base: 7 })
    );
}

#[test]
fn expired() {
    let late = t0() + Duration::hours(25);
    assert!(matches!(
        cp(1, 10).check(&held(1, 9), late),
        Err(VerifyError::Expired { .. })
    ));
    // A tablet clock set back does not revive an expired checkpoint: the newest server time
    // already verified is the floor.
    let mut pos = held(1, 9);
    pos.server_time = Some(t0());
    let mut c = cp(1, 10);
    c.expires_at = t0() - Duration::seconds(1);
    c.server_time = t0();
    assert!(matches!(
        c.check(&pos, t0() - Duration::days(30)),
        Err(VerifyError::Expired { .. })
    ));
}

#[test]
fn oversize_truncated_and_digest() {
    let body = SnapshotBody {
        councils: vec![council_info("E0601")],
        flags: vec![],
        contacts: vec![],
    };
    let (bytes, info) = encode_body(&body, 3).unwrap();
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"endless");
    assert_eq!(
        info.open::<SnapshotBody>(&longer).unwrap_err(),
        VerifyError::OversizeBody {
            declared: info.len,
            received: info.len + 7
        }
    );
    assert!(matches!(
        info.check_received(info.len + 1),
        Err(VerifyError::OversizeBody { .. })
    ));
    assert!(matches!(
        info.open::<SnapshotBody>(&bytes[..bytes.len() - 1]),
        Err(VerifyError::TruncatedBody { .. })
    ));
    let mut other = info;
    other.sha256[0] ^= 1;
    assert_eq!(
        other.open::<SnapshotBody>(&bytes).unwrap_err(),
        VerifyError::DigestMismatch
    );
    assert_eq!(info.open::<SnapshotBody>(&bytes).unwrap(), body);
}

#[test]
fn a_delta_needs_data_and_may_pass_a_checkpoint_taken_just_before() {
    assert!(matches!(
        delta(1, 0, 10).check(&Position::empty(region("EM")), &cp(1, 10)),
        Err(VerifyError::Malformed(_))
    ));
    // The region changed between the checkpoint and the delta request: newer data is fine.
    delta(1, 9, 11).check(&held(1, 9), &cp(1, 10)).unwrap();
    snapshot(1, 12).check(&held(1, 9), &cp(1, 10)).unwrap();
    delta(1, 9, 10).check(&held(1, 9), &cp(1, 10)).unwrap();
    snapshot(1, 10).check(&held(1, 9), &cp(1, 10)).unwrap();
    // A new epoch means a snapshot, even one at a lower version number.
    snapshot(2, 3).check(&held(1, 9), &cp(2, 3)).unwrap();
}
