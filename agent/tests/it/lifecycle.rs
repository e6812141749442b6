//! Device lifecycle on the tablet: following a signed key rollover (and refusing a chain
//! that does not verify), and replacing the client identity atomically on renewal, end to
//! end against the real server's renew endpoint.

use std::sync::Arc;

use chrono::{Duration, Utc};
use cpis_agent::{Agent, Clock, ManualClock};
use cpis_protocol::lifecycle::{KeyChain, KeyRollover};
use cpis_protocol::{PublicKey, SignedMessage, SigningKey, VerifyError};

use crate::common::{Feed, fixture, install, new_agent, t0, verify_err};

#[test]
fn a_rollover_signed_by_the_pinned_key_is_followed_and_persisted() {
    let data = fixture(11, 200);
    let feed = Feed::new(data.region.clone());
    let dir = tempfile::tempdir().unwrap();
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 10, t0());
    let next = Feed {
        key: SigningKey::from_bytes(&[9u8; 32]),
        ..feed.clone()
    };
    // Signed by the new key: refused under the pinned one.
    assert!(matches!(
        verify_err(agent.accept_checkpoint(&next.checkpoint(1, 10, t0()))),
        VerifyError::BadSignature
    ));
    // A chain whose link is not signed by the pinned key changes nothing.
    let forged = KeyChain {
        rollovers: vec![SignedMessage::sign(
            &next.key,
            &KeyRollover {
                previous: feed.public(),
                next: next.public(),
                issued_at: t0(),
            },
        )],
    };
    assert!(agent.follow_rollover(&forged).is_err());
    assert_eq!(agent.pinned_key(), feed.public());
    assert_eq!(agent.state().unwrap().data, Some((1, 10)), "data untouched");
    // The real link, after an unrelated one: followed, pinned, and kept across a reopen.
    let other = SigningKey::from_bytes(&[3u8; 32]);
    let chain = KeyChain {
        rollovers: vec![
            SignedMessage::sign(
                &other,
                &KeyRollover {
                    previous: PublicKey::from(&other),
                    next: feed.public(),
                    issued_at: t0(),
                },
            ),
            SignedMessage::sign(
                &feed.key,
                &KeyRollover {
                    previous: feed.public(),
                    next: next.public(),
                    issued_at: t0(),
                },
            ),
        ],
    };
    assert_eq!(agent.follow_rollover(&chain).unwrap(), Some(next.public()));
    assert_eq!(agent.follow_rollover(&chain).unwrap(), None);
    agent
        .accept_checkpoint(&next.checkpoint(1, 10, t0() + Duration::minutes(1)))
        .unwrap();
    drop(agent);
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(t0() + Duration::minutes(2)));
    let agent = Agent::open(dir.path(), clock).unwrap();
    assert_eq!(agent.pinned_key(), next.public());
    // The old key no longer signs for this tablet.
    assert!(matches!(
        verify_err(agent.accept_checkpoint(&feed.checkpoint(1, 10, t0() + Duration::minutes(3)))),
        VerifyError::BadSignature
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_expiry_is_renewed_with_a_new_key_and_replaced_atomically() {
    let env = crate::server::Env::start(Utc::now()).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let token = env.enrolment_token(1, Duration::hours(1)).await;
    let agent =
        cpis_agent::sync::enrol(dir.path(), &env.base, &env.ca, &token, None, clock.clone())
            .await
            .unwrap();
    let old_key = agent.device_key_pem().unwrap();
    assert!(
        !dir.path().join("keys/device.key.pem").exists(),
        "never a plain key file"
    );
    let old_expiry = agent.enrolment().client_cert_expires_at;
    let client = cpis_agent::sync::device_client(&agent).unwrap();
    // Not due yet: nothing happens.
    assert!(
        !cpis_agent::lifecycle::renew_if_due(&agent, &client)
            .await
            .unwrap()
    );
    // 340 days into a 365-day certificate: due (less than 30 days left).
    clock.advance(std::time::Duration::from_secs(340 * 86400));
    assert!(
        cpis_agent::lifecycle::renew_if_due(&agent, &client)
            .await
            .unwrap()
    );
    let new_key = agent.device_key_pem().unwrap();
    assert_ne!(old_key, new_key, "a new key pair");
    for leftover in [
        "device.key.pem",
        "device.key.next.sealed",
        "device.cert.next.pem",
        "renew.commit",
    ] {
        assert!(!dir.path().join("keys").join(leftover).exists());
    }
    let new_expiry = agent.enrolment().client_cert_expires_at;
    assert!(new_expiry >= old_expiry, "{new_expiry} vs {old_expiry}");
    // The new identity works over mutual TLS, and survives a reopen.
    drop(agent);
    let agent = Agent::open(dir.path(), clock.clone()).unwrap();
    assert_eq!(agent.enrolment().client_cert_expires_at, new_expiry);
    cpis_agent::sync::device_client(&agent)
        .unwrap()
        .checkpoint()
        .await
        .unwrap();
}

#[test]
fn an_interrupted_renewal_keeps_the_old_identity_or_completes_on_open() {
    let data = fixture(12, 50);
    let feed = Feed::new(data.region.clone());
    let dir = tempfile::tempdir().unwrap();
    let (agent, _clock) = new_agent(dir.path(), &feed);
    drop(agent);
    // Written as agents before sealed TLS keys left them: plain PEM files, which the open
    // seals under the master key and shreds.
    let keys = dir.path().join("keys");
    std::fs::write(keys.join("device.key.pem"), "old key").unwrap();
    std::fs::write(keys.join("device.cert.pem"), "old cert").unwrap();
    // Crash before the commit marker: the new files are dropped.
    std::fs::write(keys.join("device.key.next.pem"), "new key").unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(t0()));
    let agent = Agent::open(dir.path(), clock.clone()).unwrap();
    assert_eq!(agent.device_key_pem().unwrap(), "old key");
    drop(agent);
    for plain_or_dropped in [
        "device.key.pem",
        "device.key.next.pem",
        "device.key.next.sealed",
    ] {
        assert!(!keys.join(plain_or_dropped).exists(), "{plain_or_dropped}");
    }
    // Crash after the marker, with the key already moved: the certificate follows on open.
    std::fs::write(keys.join("device.key.pem"), "new key").unwrap();
    std::fs::write(keys.join("device.cert.next.pem"), "new cert").unwrap();
    std::fs::write(keys.join("renew.commit"), "commit\n").unwrap();
    let agent = Agent::open(dir.path(), clock).unwrap();
    assert_eq!(agent.device_key_pem().unwrap(), "new key");
    assert_eq!(
        std::fs::read_to_string(keys.join("device.cert.pem")).unwrap(),
        "new cert"
    );
    assert!(!keys.join("renew.commit").exists());
    assert!(!keys.join("device.key.pem").exists());
}
