//! Encode/decode round trips and single-bit tamper detection.

use cpis_protocol::{
    Change, Checkpoint, DeltaBody, FlagRecord, Policy, SignedMessage, SigningKey, SnapshotBody,
    SnapshotMeta, VerifyError, VersionedChange, encode_body,
};
use proptest::prelude::*;
use rand::SeedableRng;

use crate::{arb_contacts, arb_flag, council_info, region, t0};

fn key(seed: u64) -> SigningKey {
    SigningKey::generate(&mut rand::rngs::StdRng::seed_from_u64(seed))
}

fn checkpoint(head: u64) -> Checkpoint {
    Checkpoint {
        region: region("EM"),
        epoch: 3,
        head_version: head,
        server_time: t0(),
        expires_at: t0() + chrono::Duration::hours(24),
        policy: Policy::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn flag_round_trips(flag in arb_flag()) {
        let bin = postcard::to_stdvec(&flag).unwrap();
        prop_assert_eq!(postcard::from_bytes::<FlagRecord>(&bin).unwrap(), flag.clone());
        let json = serde_json::to_string(&flag).unwrap();
        prop_assert_eq!(serde_json::from_str::<FlagRecord>(&json).unwrap(), flag.clone());
        // Deterministic: encoding twice gives the same bytes.
        prop_assert_eq!(postcard::to_stdvec(&flag).unwrap(), bin);
    }

    #[test]
    fn body_round_trips(
        flags in prop::collection::vec(arb_flag(), 0..40),
        contacts in prop::collection::vec(arb_contacts(), 0..4),
    ) {
        let body = SnapshotBody { councils: vec![council_info("E0601")], flags, contacts };
        let (bytes, info) = encode_body(&body, 3).unwrap();
        prop_assert_eq!(info.open::<SnapshotBody>(&bytes).unwrap(), body.clone());
        let (again, info2) = encode_body(&body, 3).unwrap();
        prop_assert_eq!(again, bytes);
        prop_assert_eq!(info2, info);
    }

    #[test]
    fn delta_with_every_change_kind_round_trips(
        flag in arb_flag(),
        contacts in arb_contacts(),
    ) {
        let body = DeltaBody {
            councils: vec![council_info("E0601")],
            changes: vec![
                VersionedChange { version: 1, change: Change::Upsert(flag.clone()) },
                VersionedChange { version: 2, change: Change::Contacts(contacts.clone()) },
                VersionedChange { version: 3, change: Change::Remove(flag.key()) },
            ],
        };
        let (bytes, info) = encode_body(&body, 3).unwrap();
        prop_assert_eq!(info.open::<DeltaBody>(&bytes).unwrap(), body);
        let json = serde_json::to_string(&contacts).unwrap();
        prop_assert_eq!(serde_json::from_str::<cpis_protocol::SubjectContacts>(&json).unwrap(), contacts);
    }

    #[test]
    fn signed_message_round_trips(head in 0u64..u64::MAX) {
        let k = key(1);
        let cp = checkpoint(head);
        let signed = SignedMessage::sign(&k, &cp);
        let back = SignedMessage::from_bytes(&signed.to_bytes()).unwrap();
        prop_assert_eq!(back.open::<Checkpoint>(&k.verifying_key()).unwrap(), cp.clone());
        let header = SignedMessage::from_header(&signed.to_header()).unwrap();
        prop_assert_eq!(header.open::<Checkpoint>(&k.verifying_key()).unwrap(), cp);
    }

    /// Any single-bit change anywhere in a signed envelope is rejected.
    #[test]
    fn any_bit_flip_in_a_signed_message_is_rejected(head in 0u64..1_000_000, bit in 0usize..4096) {
        let k = key(2);
        let bytes = SignedMessage::sign(&k, &checkpoint(head)).to_bytes();
        let bit = bit % (bytes.len() * 8);
        let mut tampered = bytes.clone();
        tampered[bit / 8] ^= 1 << (bit % 8);
        let opened = SignedMessage::from_bytes(&tampered)
            .and_then(|m| m.open::<Checkpoint>(&k.verifying_key()));
        prop_assert!(opened.is_err(), "bit {} accepted", bit);
    }

    /// Any single-bit change in a body is caught by its signed digest.
    #[test]
    fn any_bit_flip_in_a_body_is_rejected(flags in prop::collection::vec(arb_flag(), 1..20), bit in 0usize..1_000_000) {
        let body = SnapshotBody { councils: vec![council_info("E0601")], flags, contacts: vec![] };
        let (mut bytes, info) = encode_body(&body, 3).unwrap();
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert_eq!(info.open::<SnapshotBody>(&bytes).unwrap_err(), VerifyError::DigestMismatch);
    }
}

#[test]
fn another_key_is_a_bad_signature() {
    let signed = SignedMessage::sign(&key(1), &checkpoint(5));
    assert_eq!(
        signed.open::<Checkpoint>(&key(2).verifying_key()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn a_message_cannot_pass_as_another_kind() {
    let k = key(1);
    let signed = SignedMessage::sign(&k, &checkpoint(5));
    let err = signed.open::<SnapshotMeta>(&k.verifying_key()).unwrap_err();
    assert_eq!(err.code(), "wrong_kind");
    // Relabelling the kind breaks the signature, which binds it.
    let mut relabelled = signed;
    relabelled.kind = cpis_protocol::MessageKind::SnapshotMeta;
    assert_eq!(
        relabelled.open::<SnapshotMeta>(&k.verifying_key()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = SignedMessage::sign(&key(1), &checkpoint(5)).to_bytes();
    bytes.push(0);
    assert_eq!(
        SignedMessage::from_bytes(&bytes).unwrap_err().code(),
        "malformed"
    );
}

mod key_chain {
    use cpis_protocol::{KeyChain, KeyRollover, PublicKey, SignedMessage, VerifyError};

    use super::key;
    use crate::t0;

    fn link(from: u64, to: u64) -> SignedMessage {
        let rollover = KeyRollover {
            previous: PublicKey::from(&key(from)),
            next: PublicKey::from(&key(to)),
            issued_at: t0(),
        };
        SignedMessage::sign(&key(from), &rollover)
    }

    #[test]
    fn a_tablet_follows_the_chain_from_its_pinned_key() {
        let chain = KeyChain {
            rollovers: vec![link(10, 11), link(11, 12), link(12, 13)],
        };
        let bytes = postcard::to_stdvec(&chain).unwrap();
        let chain: KeyChain = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            chain.follow(&PublicKey::from(&key(10))).unwrap(),
            PublicKey::from(&key(13))
        );
        // A tablet enrolled after the first rollover starts further along.
        assert_eq!(
            chain.follow(&PublicKey::from(&key(12))).unwrap(),
            PublicKey::from(&key(13))
        );
        // Nothing newer: the pinned key stays.
        assert_eq!(
            chain.follow(&PublicKey::from(&key(13))).unwrap(),
            PublicKey::from(&key(13))
        );
        // A key the chain never mentions is not replaced by anything.
        assert_eq!(
            chain.follow(&PublicKey::from(&key(99))).unwrap(),
            PublicKey::from(&key(99))
        );
    }

    #[test]
    fn a_forged_link_is_refused() {
        // Claims to come from key 10 but is signed by an attacker's key 66.
        let forged = KeyRollover {
            previous: PublicKey::from(&key(10)),
            next: PublicKey::from(&key(66)),
            issued_at: t0(),
        };
        let chain = KeyChain {
            rollovers: vec![SignedMessage::sign(&key(66), &forged)],
        };
        assert_eq!(
            chain.follow(&PublicKey::from(&key(10))),
            Err(VerifyError::BadSignature)
        );
    }
}
