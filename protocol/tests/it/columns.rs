//! The columnar snapshot body (format 3): lossless and deterministic for any body, readable
//! beside the row format, and refusing damaged columns with an error, never a panic.

use chrono::{Datelike as _, NaiveDate};
use cpis_protocol::{
    BODY_FORMAT, BodyInfo, COLUMNS_FORMAT, FlagRecord, SnapshotBody, VerifyError, encode_snapshot,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use crate::{arb_contacts, arb_flag, council_info};

/// Any date chrono can hold: the columns store day differences, which must not overflow.
fn arb_any_date() -> impl Strategy<Value = NaiveDate> {
    (NaiveDate::MIN.num_days_from_ce()..=NaiveDate::MAX.num_days_from_ce())
        .prop_map(|d| NaiveDate::from_num_days_from_ce_opt(d).unwrap())
}

/// Flags in any order, some sharing the previous flag's date of birth or case id (as a
/// subject with two plans does), case ids of any characters with long and short digit tails,
/// and dates anywhere in chrono's range.
fn arb_flags() -> impl Strategy<Value = Vec<FlagRecord>> {
    prop::collection::vec(
        (
            arb_flag(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of("[^\\x00]{0,4}[0-9]{0,12}"),
            prop::option::of((arb_any_date(), arb_any_date(), arb_any_date())),
        ),
        0..60,
    )
    .prop_map(|rows| {
        let mut flags: Vec<FlagRecord> = Vec::with_capacity(rows.len());
        for (mut f, same_dob, same_id, id, dates) in rows {
            if let Some(id) = id {
                f.local_id = Some(id);
            }
            if let Some((s, e, d)) = dates {
                f.start_date = s;
                f.end_date = f.end_date.map(|_| e);
                f.date_of_birth = f.date_of_birth.map(|_| d);
            }
            if let Some(prev) = flags.last() {
                if same_dob && prev.date_of_birth.is_some() {
                    f.date_of_birth = prev.date_of_birth;
                }
                if same_id && prev.local_id.is_some() {
                    f.local_id = prev.local_id.clone();
                }
            }
            flags.push(f);
        }
        flags
    })
}

/// A body in the columnar format, as its raw (decompressed) columns.
fn raw_columns(body: &SnapshotBody) -> Vec<u8> {
    let (bytes, info) = encode_snapshot(body, 3, COLUMNS_FORMAT).unwrap();
    zstd::bulk::decompress(&bytes, info.raw_len as usize).unwrap()
}

/// Compresses raw columns and describes them as a signed snapshot would.
fn body_of(raw: &[u8]) -> (Vec<u8>, BodyInfo) {
    let bytes = zstd::bulk::compress(raw, 3).unwrap();
    let info = BodyInfo {
        format: COLUMNS_FORMAT,
        len: bytes.len() as u64,
        raw_len: raw.len() as u64,
        sha256: Sha256::digest(&bytes).into(),
    };
    (bytes, info)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_body_round_trips_through_the_columns(
        flags in arb_flags(),
        contacts in prop::collection::vec(arb_contacts(), 0..4),
    ) {
        let body = SnapshotBody {
            councils: vec![council_info("E0601"), council_info("E0602")],
            flags,
            contacts,
        };
        let (bytes, info) = encode_snapshot(&body, 3, COLUMNS_FORMAT).unwrap();
        prop_assert_eq!(info.format, COLUMNS_FORMAT);
        prop_assert_eq!(info.open_snapshot(&bytes).unwrap(), body.clone());
        let (again, info2) = encode_snapshot(&body, 3, COLUMNS_FORMAT).unwrap();
        prop_assert_eq!(again, bytes);
        prop_assert_eq!(info2, info);
        // The row format of the same body opens to the same thing.
        let (rows, row_info) = encode_snapshot(&body, 3, BODY_FORMAT).unwrap();
        prop_assert_eq!(row_info.format, BODY_FORMAT);
        prop_assert_eq!(row_info.open_snapshot(&rows).unwrap(), body);
    }

    /// Damaged columns (signed as they are, so past the digest) are refused with an error.
    #[test]
    fn damaged_columns_are_an_error_not_a_panic(
        flags in arb_flags(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = SnapshotBody { councils: vec![council_info("E0601")], flags, contacts: vec![] };
        let raw = raw_columns(&body);
        let mut changed = raw.clone();
        let i = at.index(changed.len());
        changed[i] = byte;
        let (bytes, info) = body_of(&changed);
        // Whatever it gives, it returns (a panic fails the test).
        let _ = info.open_snapshot(&bytes);
        let short = &raw[..cut.index(raw.len())];
        let (bytes, info) = body_of(short);
        prop_assert!(matches!(info.open_snapshot(&bytes), Err(VerifyError::Malformed(_))));
    }
}

#[test]
fn bytes_after_the_columns_are_refused() {
    let body = SnapshotBody {
        councils: vec![council_info("E0601")],
        flags: vec![],
        contacts: vec![],
    };
    let mut longer = raw_columns(&body);
    longer.push(0);
    let (bytes, info) = body_of(&longer);
    let err = info.open_snapshot(&bytes).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Malformed(m) if m.contains("1 byte after the columns")),
        "{err:?}"
    );
}

#[test]
fn a_body_format_this_version_does_not_read_is_named() {
    let body = SnapshotBody {
        councils: vec![council_info("E0601")],
        flags: vec![],
        contacts: vec![],
    };
    let (bytes, mut info) = encode_snapshot(&body, 3, COLUMNS_FORMAT).unwrap();
    info.format = 9;
    let err = info.open_snapshot(&bytes).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Malformed(m) if m.contains("body format 9 is not supported")),
        "{err:?}"
    );
    assert!(
        encode_snapshot(&body, 3, 9)
            .unwrap_err()
            .contains("format 9")
    );
    // A delta reader never takes a columnar body.
    let (bytes, info) = encode_snapshot(&body, 3, COLUMNS_FORMAT).unwrap();
    assert!(info.open::<SnapshotBody>(&bytes).is_err());
}
