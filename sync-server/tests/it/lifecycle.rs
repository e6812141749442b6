//! Device lifecycle: reports for the fleet view, certificate renewal, the key chain, and
//! signing key rollover followed by tablets without re-enrolling.

use cpis_protocol::api::{ErrorBody, codes};
use cpis_protocol::lifecycle::paths;
use cpis_protocol::{DeviceReport, KeyChain, RenewRequest, RenewResponse};
use cpis_sync_server::store::Store as _;

use crate::harness::*;

fn report(outbox: u64) -> DeviceReport {
    DeviceReport {
        agent_version: "0.9.1".into(),
        data_epoch: Some(1),
        data_version: Some(7),
        data_as_of: Some(t0() - chrono::Duration::hours(3)),
        outbox_pending: outbox,
        outbox_set_aside: 1,
        client_cert_expires_at: None,
        reported_at: t0() - chrono::Duration::days(400),
        key_protection: Some(cpis_protocol::KeyProtection::Tpm2),
    }
}

fn new_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key.serialize_pem())
}

async fn chain(client: &reqwest::Client, env: &Env) -> KeyChain {
    let r = client.get(env.url(paths::KEYS)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    postcard::from_bytes(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn a_report_is_kept_with_the_servers_receipt_time() {
    let env = Env::start().await;
    env.seed().await;
    let device = env.enrol(EM).await;
    for outbox in [5, 2] {
        let r = device
            .client
            .post(env.url(paths::REPORT))
            .json(&report(outbox))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let fleet = env.store().fleet().await.unwrap();
    assert_eq!(fleet.len(), 1);
    let stored = fleet[0].report.clone().unwrap();
    assert_eq!(
        stored.report,
        report(2),
        "the latest report replaces the earlier one"
    );
    assert_eq!(
        stored.received_at,
        t0(),
        "the server's clock, not the tablet's"
    );
    assert_eq!(fleet[0].device.agent_version, "0.9.1");
    // An agent from before key protection was reported: accepted, shown as not reported.
    let mut old = serde_json::to_value(report(3)).unwrap();
    old.as_object_mut().unwrap().remove("key_protection");
    let r = device
        .client
        .post(env.url(paths::REPORT))
        .json(&old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let fleet = env.store().fleet().await.unwrap();
    assert_eq!(
        fleet[0].report.as_ref().unwrap().report.key_protection,
        None
    );

    // Without a certificate: 401; garbage: 400.
    let r = env
        .client()
        .post(env.url(paths::REPORT))
        .json(&report(1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = device
        .client
        .post(env.url(paths::REPORT))
        .header("content-type", "application/json")
        .body("{\"agent_version\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn renewal_issues_a_working_certificate_for_a_new_key() {
    let env = Env::start().await;
    env.seed().await;
    let device = env.enrol(EM).await;
    let (csr, key_pem) = new_csr();
    let r = device
        .client
        .post(env.url(paths::RENEW))
        .json(&RenewRequest { csr_pem: csr })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let renewed: RenewResponse = r.json().await.unwrap();
    assert!(renewed.client_cert_expires_at >= device.enrolment.client_cert_expires_at);
    let stored = env
        .store()
        .device(device.enrolment.device_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.cert_expires_at, renewed.client_cert_expires_at);

    // The new certificate with the new key is the same device.
    let renewed_client = client(&env.ca, Some((&renewed.client_cert_pem, &key_pem)));
    let r = renewed_client
        .post(env.url(paths::REPORT))
        .json(&report(0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let fleet = env.store().fleet().await.unwrap();
    assert_eq!(fleet[0].device.id, device.enrolment.device_id);
    assert!(fleet[0].report.is_some());

    // A CSR that is not one: 400 bad_csr.
    let r = device
        .client
        .post(env.url(paths::RENEW))
        .json(&RenewRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, codes::BAD_CSR);
}

#[tokio::test]
async fn a_revoked_device_is_told_to_wipe_on_every_lifecycle_endpoint() {
    let env = Env::start().await;
    env.seed().await;
    let device = env.enrol(EM).await;
    assert!(chain(&device.client, &env).await.rollovers.is_empty());
    env.store()
        .revoke_device(device.enrolment.device_id, t0())
        .await
        .unwrap();
    let (csr, _) = new_csr();
    let responses = [
        device
            .client
            .post(env.url(paths::REPORT))
            .json(&report(0))
            .send()
            .await
            .unwrap(),
        device
            .client
            .post(env.url(paths::RENEW))
            .json(&RenewRequest { csr_pem: csr })
            .send()
            .await
            .unwrap(),
        device
            .client
            .get(env.url(paths::KEYS))
            .send()
            .await
            .unwrap(),
    ];
    for r in responses {
        assert_eq!(r.status(), 403);
        let body: ErrorBody = r.json().await.unwrap();
        assert_eq!(body.error.code, codes::DEVICE_REVOKED);
        assert!(body.error.wipe);
    }
    let stored = env
        .store()
        .device(device.enrolment.device_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.cert_expires_at, device.enrolment.client_cert_expires_at,
        "no renewal for a revoked device"
    );
}

async fn signed(client: &reqwest::Client, env: &Env, path: &str) -> cpis_protocol::SignedMessage {
    let r = client.get(env.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    cpis_protocol::SignedMessage::from_bytes(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn tablets_follow_a_rolled_over_signing_key_without_re_enrolling() {
    use cpis_protocol::api::paths as feed;
    use cpis_protocol::{Checkpoint, DeltaMeta, SignedMessage, SnapshotMeta, VerifyError};

    let env = Env::start().await;
    env.seed().await;
    let token = env.council_token(LEICS).await;
    assert_eq!(
        env.upload(&token, LEICS, &csv(&[(1, "CPP", "2025-01-01", "")]))
            .await
            .status(),
        200
    );
    let device = env.enrol(EM).await;
    let pinned = device.enrolment.signing_public_key;
    let cp: Checkpoint = signed(&device.client, &env, feed::CHECKPOINT)
        .await
        .open(pinned.verifying_key())
        .unwrap();
    let position = cpis_protocol::Position {
        region: cp.region.clone(),
        data: Some((cp.epoch, cp.head_version)),
        server_time: Some(cp.server_time),
    };
    // A snapshot signed by the old key sits in the cache, and a delta too.
    signed(&device.client, &env, feed::SNAPSHOT)
        .await
        .open::<SnapshotMeta>(pinned.verifying_key())
        .unwrap();
    env.upload(
        &token,
        LEICS,
        &csv(&[(1, "CPP", "2025-01-01", ""), (2, "LAC", "2025-02-01", "")]),
    )
    .await;
    let delta_from = |from: u64| {
        let (client, url) = (
            device.client.clone(),
            env.url(&format!("{}?from={from}", feed::DELTA)),
        );
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            SignedMessage::from_header(r.headers()[feed::SIGNED_HEADER].to_str().unwrap()).unwrap()
        }
    };
    delta_from(cp.head_version)
        .await
        .open::<DeltaMeta>(pinned.verifying_key())
        .unwrap();

    let rolled = cpis_sync_server::keys::roll(env.dir.path(), env.store(), env.clock_now())
        .await
        .unwrap();
    assert_eq!(rolled.previous, pinned);
    assert!(
        env.dir
            .path()
            .join("feed-signing-keys")
            .join(format!("{pinned}.pem"))
            .exists(),
        "the old key is archived, not deleted"
    );

    // Within the recheck interval the server notices; after it, only the new key signs.
    env.clock
        .advance(cpis_sync_server::keys::KEY_RECHECK + chrono::Duration::seconds(1));
    let chain = chain(&device.client, &env).await;
    assert_eq!(chain.rollovers.len(), 1);
    let followed = chain.follow(&pinned).unwrap();
    assert_eq!(followed, rolled.next);
    let envelope = signed(&device.client, &env, feed::CHECKPOINT).await;
    assert_eq!(
        envelope.open::<Checkpoint>(pinned.verifying_key()),
        Err(VerifyError::BadSignature)
    );
    let cp2: Checkpoint = envelope.open(followed.verifying_key()).unwrap();
    cp2.check(&position, env.clock_now()).unwrap();
    // (The second upload moved the head on by one.)
    assert_eq!(
        Some((cp2.epoch, cp2.head_version)),
        position.data.map(|(e, v)| (e, v + 1))
    );
    // The cached snapshot signed by the old key is not served again.
    let meta = signed(&device.client, &env, feed::SNAPSHOT).await;
    assert_eq!(
        meta.open::<SnapshotMeta>(pinned.verifying_key()),
        Err(VerifyError::BadSignature)
    );
    meta.open::<SnapshotMeta>(followed.verifying_key()).unwrap();
    // Nor the delta.
    let delta = delta_from(cp.head_version).await;
    assert_eq!(
        delta.open::<DeltaMeta>(pinned.verifying_key()),
        Err(VerifyError::BadSignature)
    );
    delta.open::<DeltaMeta>(followed.verifying_key()).unwrap();
    // A tablet enrolled now pins the new key.
    assert_eq!(
        env.enrol(EM).await.enrolment.signing_public_key,
        rolled.next
    );

    // A second rollover: the chain leads from the first key to the newest, link by link.
    let again = cpis_sync_server::keys::roll(env.dir.path(), env.store(), env.clock_now())
        .await
        .unwrap();
    assert_eq!(again.previous, rolled.next);
    env.clock
        .advance(cpis_sync_server::keys::KEY_RECHECK + chrono::Duration::seconds(1));
    let chain = self::chain(&device.client, &env).await;
    assert_eq!(chain.follow(&pinned).unwrap(), again.next);
    assert_eq!(chain.follow(&rolled.next).unwrap(), again.next);
    signed(&device.client, &env, feed::CHECKPOINT)
        .await
        .open::<Checkpoint>(again.next.verifying_key())
        .unwrap();

    // A restarted server signs with the newest key too.
    let dir = env.stop().await;
    let env = Env::serve(dir, |_| {}).await;
    assert_eq!(env.enrol(EM).await.enrolment.signing_public_key, again.next);
}

/// The server certificate presented in a fresh TLS handshake.
async fn presented_certificate(env: &Env) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(env.ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr = env.handle.as_ref().unwrap().local_addr();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    use rustls::pki_types::pem::PemObject as _;
    let env = Env::start().await;
    env.seed().await;
    let device = env.enrol(EM).await;
    let before = presented_certificate(&env).await;
    let expires_at = cpis_sync_server::pki::rotate_server_certificate(
        env.dir.path(),
        &["localhost".into(), "sync.example.nhs.uk".into()],
    )
    .unwrap();
    assert!(expires_at > chrono::Utc::now() + chrono::Duration::days(3000));
    let after = presented_certificate(&env).await;
    assert_ne!(
        before, after,
        "the next handshake presents the new certificate"
    );
    let on_disk = std::fs::read(env.dir.path().join("tls-server.pem")).unwrap();
    let on_disk = rustls::pki_types::CertificateDer::from_pem_slice(&on_disk).unwrap();
    assert_eq!(after, on_disk.to_vec());
    // Tablets trust the CA, so they keep working (new connections).
    let renewed = client(&env.ca, None);
    assert_eq!(
        renewed
            .get(env.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = device
        .client
        .get(env.url(paths::KEYS))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status = cpis_sync_server::pki::certificate_status(env.dir.path()).unwrap();
    let server = status.iter().find(|c| c.file == "tls-server.pem").unwrap();
    assert!(server.names.contains(&"sync.example.nhs.uk".to_owned()));
    assert_eq!(server.expires_at, expires_at);

    // A broken replacement (a key that does not match) is not served: the last good one is.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_path = env.dir.path().join("tls-server-key.pem");
    std::fs::remove_file(&key_path).unwrap();
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .unwrap();
        f.write_all(other.serialize_pem().as_bytes()).unwrap();
    }
    assert_eq!(presented_certificate(&env).await, after);
}
