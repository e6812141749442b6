//! Isolation: councils only reach their own data, devices only their own region, revoked
//! devices are refused and told to wipe.

use cpis_protocol::api::{ErrorBody, codes, paths};
use cpis_protocol::{SignedMessage, SnapshotBody, SnapshotMeta};
use cpis_sync_server::store::Store;

use crate::harness::*;

#[tokio::test]
async fn a_council_can_never_read_or_change_another_councils_data() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let notts = env.council_token(NOTTS).await;
    let body = csv(&[(1, "CPP", "2024-01-01", "")]);
    assert_eq!(env.upload(&notts, NOTTS, &body).await.status(), 200);

    // Leicestershire's token on Nottinghamshire's path: refused, nothing changes.
    let wipe_attempt = HEADER.to_owned();
    let r = env
        .client()
        .post(env.url(&format!("/v1/councils/{NOTTS}/uploads?allow_empty=true")))
        .bearer_auth(&leics)
        .body(wipe_attempt)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::FORBIDDEN
    );
    assert_eq!(
        env.store()
            .council_flags(council(NOTTS))
            .await
            .unwrap()
            .len(),
        1
    );

    // Unknown councils are refused the same way (no existence oracle).
    assert_eq!(env.upload(&leics, "E99999999", &body).await.status(), 403);
    // No token, or a made-up one: 401.
    let r = env
        .client()
        .post(env.url(&format!("/v1/councils/{LEICS}/uploads")))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        env.upload("cpis_ct_madeup", LEICS, &body).await.status(),
        401
    );
    assert!(
        env.store()
            .council_flags(council(LEICS))
            .await
            .unwrap()
            .is_empty()
    );
    env.stop().await;
}

#[tokio::test]
async fn a_device_only_ever_receives_its_own_region() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let lancs = env.council_token(LANCS).await;
    assert_eq!(
        env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
            .await
            .status(),
        200
    );
    assert_eq!(
        env.upload(&lancs, LANCS, &csv(&[(2, "LAC", "2024-01-01", "")]))
            .await
            .status(),
        200
    );
    let em = env.enrol(EM).await;
    let nw = env.enrol(NW).await;
    let key = em.enrolment.signing_public_key;

    let fetch = |d: &Device| {
        let client = d.client.clone();
        let url = env.url(paths::SNAPSHOT);
        async move {
            let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
            SignedMessage::from_bytes(&bytes)
                .unwrap()
                .open::<SnapshotMeta>(key.verifying_key())
                .unwrap()
        }
    };
    let em_meta = fetch(&em).await;
    let nw_meta = fetch(&nw).await;
    assert_eq!(em_meta.region.as_str(), EM);
    assert_eq!(nw_meta.region.as_str(), NW);

    let body_url = |m: &SnapshotMeta| {
        env.url(&format!(
            "{}/{}/{}",
            paths::SNAPSHOT_BODY_PREFIX,
            m.epoch,
            m.version
        ))
    };
    let body = em
        .client
        .get(body_url(&em_meta))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let snapshot: SnapshotBody = em_meta.body.open(&body).unwrap();
    assert_eq!(snapshot.flags.len(), 1);
    assert!(snapshot.flags.iter().all(|f| f.council.as_str() == LEICS));
    assert!(snapshot.councils.iter().all(|c| c.region.as_str() == EM));

    // Asking for NW's snapshot body with an EM certificate never yields NW data.
    if (nw_meta.epoch, nw_meta.version) != (em_meta.epoch, em_meta.version) {
        let r = em.client.get(body_url(&nw_meta)).send().await.unwrap();
        assert_eq!(r.status(), 410);
    }
    env.stop().await;
}

#[tokio::test]
async fn missing_certificate_is_401_and_a_revoked_device_is_told_to_wipe() {
    let env = Env::start().await;
    env.seed().await;
    let r = env
        .client()
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::CLIENT_CERT_REQUIRED
    );

    let device = env.enrol(EM).await;
    let ok = device
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let seen = env
        .store()
        .device(device.enrolment.device_id)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.last_seen.is_some());

    assert!(
        env.store()
            .revoke_device(device.enrolment.device_id, env.clock_now())
            .await
            .unwrap()
    );
    for path in [
        paths::CHECKPOINT,
        paths::SNAPSHOT,
        "/v1/device/delta?from=0",
    ] {
        let r = device.client.get(env.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let body: ErrorBody = r.json().await.unwrap();
        assert_eq!(body.error.code, codes::DEVICE_REVOKED);
        assert!(body.error.wipe, "a revoked device is told to wipe");
    }
    env.stop().await;
}
