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
