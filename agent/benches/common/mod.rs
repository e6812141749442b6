//! What the agent benchmarks share: a signed region snapshot of synthetic flags and the
//! enrolment of a tablet that trusts its signing key.

use chrono::{DateTime, NaiveDate, Utc};
use cpis_agent::agent::{Enrolment, TlsMaterial};
use cpis_protocol::{
    COLUMNS_FORMAT, Checkpoint, CouncilInfo, FlagRecord, Policy, PublicKey, SignedMessage,
    SigningKey, SnapshotBody, SnapshotMeta, encode_snapshot,
};

/// A region's flags as a signed snapshot at version 100, with the checkpoint that leads to
/// it, both as of `now`.
pub(crate) struct Region {
    pub(crate) flags: Vec<FlagRecord>,
    // Not every benchmark reads it.
    #[allow(dead_code)]
    pub(crate) councils: Vec<CouncilInfo>,
    pub(crate) snapshot: SignedMessage,
    pub(crate) body: Vec<u8>,
    pub(crate) checkpoint: SignedMessage,
    pub(crate) enrolment: Enrolment,
}

/// `n` synthetic flags of the fixtures' first region (seed `seed`, as of 2026-11-01).
pub(crate) fn region(n: usize, seed: u64, now: DateTime<Utc>) -> Region {
    let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
    let config = cpis_fixtures::Config::new(seed, day);
    let directory = cpis_fixtures::Directory::generate(&config).unwrap();
    let region = directory.regions[0].id.clone();
    let ds = cpis_fixtures::Dataset::generate_region(&config, &region, n).unwrap();
    let flags: Vec<FlagRecord> = ds.flags().cloned().collect();
    let councils: Vec<CouncilInfo> = ds.directory.councils.iter().map(|c| c.info()).collect();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let (body, info) = encode_snapshot(
        &SnapshotBody {
            councils: councils.clone(),
            flags: flags.clone(),
            contacts: vec![],
        },
        3,
        COLUMNS_FORMAT,
    )
    .unwrap();
    let snapshot = SignedMessage::sign(
        &key,
        &SnapshotMeta {
            region: region.clone(),
            epoch: 1,
            version: 100,
            server_time: now,
            flag_count: flags.len() as u64,
            body: info,
        },
    );
    let checkpoint = SignedMessage::sign(
        &key,
        &Checkpoint {
            region: region.clone(),
            epoch: 1,
            head_version: 100,
            server_time: now,
            expires_at: now + chrono::Duration::days(1),
            policy: Policy::default(),
        },
    );
    let enrolment = Enrolment {
        device_id: cpis_protocol::DeviceId::new(),
        trust: "ZA1".parse().unwrap(),
        region,
        server: "https://127.0.0.1:1".into(),
        signing_key: PublicKey::from(&key),
        policy: Policy::default(),
        client_cert_expires_at: now + chrono::Duration::days(365),
        name: None,
    };
    Region {
        flags,
        councils,
        snapshot,
        body,
        checkpoint,
        enrolment,
    }
}

/// No TLS material: the benchmarks never talk to a server.
pub(crate) fn no_tls() -> TlsMaterial {
    TlsMaterial {
        ca_pem: String::new(),
        cert_pem: String::new(),
        key_pem: String::new(),
    }
}
