//! Shared test helpers: a test signing key that plays the server, fixture data, and agents
//! made without a network.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use cpis_agent::agent::{Enrolment, TlsMaterial};
use cpis_agent::{Agent, AgentError, Clock, ManualClock};
use cpis_protocol::{
    COLUMNS_FORMAT, Checkpoint, CouncilInfo, DeltaBody, DeltaMeta, FlagRecord, Policy, PublicKey,
    RegionId, SignedMessage, SigningKey, SnapshotBody, SnapshotMeta, VerifyError, encode_body,
    encode_snapshot,
};

/// The fixed start of test time.
pub(crate) fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub(crate) fn as_of_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()
}

/// One region's data from the fixtures crate (seeded).
#[derive(Debug, Clone)]
pub(crate) struct RegionData {
    pub(crate) region: RegionId,
    pub(crate) councils: Vec<CouncilInfo>,
    pub(crate) flags: Vec<FlagRecord>,
}

pub(crate) fn fixture(seed: u64, flags: usize) -> RegionData {
    let ds = cpis_fixtures::Dataset::generate(
        &cpis_fixtures::Config::new(seed, as_of_day()).with_flags(flags),
    )
    .unwrap();
    // The region with the most flags.
    let region = ds
        .directory
        .regions
        .iter()
        .max_by_key(|r| ds.region_flags(&r.id).len())
        .unwrap()
        .clone();
    let carried: Vec<_> = region
        .councils
        .iter()
        .chain(&region.neighbour_councils)
        .cloned()
        .collect();
    let councils = ds
        .directory
        .councils
        .iter()
        .filter(|c| carried.contains(&c.code))
        .map(|c| c.info())
        .collect();
    let flags = ds.region_flags(&region.id).into_iter().cloned().collect();
    RegionData {
        region: region.id,
        councils,
        flags,
    }
}

/// Plays the server's signing side.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    pub(crate) key: SigningKey,
    pub(crate) region: RegionId,
    pub(crate) policy: Policy,
}

impl Feed {
    pub(crate) fn new(region: RegionId) -> Self {
        Self {
            key: SigningKey::from_bytes(&[7u8; 32]),
            region,
            policy: Policy::default(),
        }
    }

    pub(crate) fn public(&self) -> PublicKey {
        PublicKey::from(&self.key)
    }

    pub(crate) fn checkpoint_msg(&self, epoch: u64, head: u64, at: DateTime<Utc>) -> Checkpoint {
        Checkpoint {
            region: self.region.clone(),
            epoch,
            head_version: head,
            server_time: at,
            expires_at: at + Duration::days(2),
            policy: self.policy,
        }
    }

    pub(crate) fn checkpoint(&self, epoch: u64, head: u64, at: DateTime<Utc>) -> SignedMessage {
        SignedMessage::sign(&self.key, &self.checkpoint_msg(epoch, head, at))
    }

    pub(crate) fn snapshot(
        &self,
        epoch: u64,
        version: u64,
        at: DateTime<Utc>,
        councils: &[CouncilInfo],
        flags: &[FlagRecord],
    ) -> (SignedMessage, Vec<u8>) {
        let body = SnapshotBody {
            councils: councils.to_vec(),
            flags: flags.to_vec(),
            contacts: vec![],
        };
        let (bytes, info) = encode_snapshot(&body, 3, COLUMNS_FORMAT).unwrap();
        let meta = SnapshotMeta {
            region: self.region.clone(),
            epoch,
            version,
            server_time: at,
            flag_count: flags.len() as u64,
            body: info,
        };
        (SignedMessage::sign(&self.key, &meta), bytes)
    }

    pub(crate) fn delta(
        &self,
        epoch: u64,
        from: u64,
        to: u64,
        at: DateTime<Utc>,
        body: &DeltaBody,
    ) -> (SignedMessage, Vec<u8>) {
        let (bytes, info) = encode_body(body, 3).unwrap();
        let meta = DeltaMeta {
            region: self.region.clone(),
            epoch,
            from_version: from,
            to_version: to,
            server_time: at,
            change_count: body.changes.len() as u64,
            body: info,
        };
        (SignedMessage::sign(&self.key, &meta), bytes)
    }
}

pub(crate) fn enrolment(feed: &Feed) -> Enrolment {
    Enrolment {
        device_id: cpis_protocol::DeviceId::new(),
        trust: "ZA1".parse().unwrap(),
        region: feed.region.clone(),
        server: "https://127.0.0.1:1".into(),
        signing_key: feed.public(),
        policy: feed.policy,
        client_cert_expires_at: t0() + Duration::days(365),
        name: Some("test tablet".into()),
    }
}

/// An enrolled agent without a network, on a manual clock at `t0`.
pub(crate) fn new_agent(dir: &Path, feed: &Feed) -> (Agent, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(t0()));
    let tls = TlsMaterial {
        ca_pem: String::new(),
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let agent = Agent::create(
        dir,
        &enrolment(feed),
        &tls,
        cpis_protocol::KeyProtection::File,
        dyn_clock,
    )
    .unwrap();
    (agent, clock)
}

/// Installs a snapshot at `version` (epoch 1) whose checkpoint is at `at`.
pub(crate) fn install(
    agent: &Agent,
    feed: &Feed,
    data: &RegionData,
    version: u64,
    at: DateTime<Utc>,
) {
    let cp = agent
        .accept_checkpoint(&feed.checkpoint(1, version, at))
        .unwrap();
    let (meta, body) = feed.snapshot(1, version, at, &data.councils, &data.flags);
    agent.apply_snapshot(&cp, &meta, &body).unwrap();
}

/// The verification error inside an agent error.
pub(crate) fn verify_err<T: std::fmt::Debug>(r: Result<T, AgentError>) -> VerifyError {
    match r {
        Err(AgentError::Verify(v)) => v,
        other => panic!("expected a verification error, got {other:?}"),
    }
}

/// A valid 999-prefixed NHS number not in `flags`.
pub(crate) fn unflagged_number(flags: &[FlagRecord]) -> cpis_protocol::NhsNumber {
    for n in 0..1_000_000u32 {
        let s = format!("999{n:06}");
        let digits: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
        let nine: [u8; 9] = digits.try_into().unwrap();
        if let Some(nhs) = cpis_protocol::NhsNumber::complete(nine)
            && !flags.iter().any(|f| f.nhs_number == nhs)
        {
            return nhs;
        }
    }
    unreachable!()
}
