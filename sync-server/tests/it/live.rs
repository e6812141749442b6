//! The live feed: a tablet's waiting checkpoint request is answered as soon as its region's
//! head moves (an upload, in this process or, on PostgreSQL, on another replica), else after
//! its wait with the head unchanged; waiting requests are neither shed nor cut by the request
//! deadline, are bounded on their own, and are sent away spread out when the server stops.

use std::time::{Duration, Instant};

use cpis_protocol::api::{ErrorBody, codes, paths};
use cpis_protocol::{Checkpoint, SignedMessage};
use cpis_sync_server::store::Store as _;

use crate::harness::*;

pub(crate) async fn wait(
    env: &Env,
    d: &Device,
    epoch: u64,
    after: u64,
    secs: u64,
) -> reqwest::Response {
    d.client
        .get(env.url(&format!(
            "{}?epoch={epoch}&after={after}&wait={secs}",
            paths::CHECKPOINT_WAIT
        )))
        .timeout(Duration::from_secs(secs + 30))
        .send()
        .await
        .unwrap()
}

/// The checkpoint a wait answered with, verified.
pub(crate) async fn answered(d: &Device, r: reqwest::Response) -> Checkpoint {
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], paths::OCTET);
    SignedMessage::from_bytes(&r.bytes().await.unwrap())
        .unwrap()
        .open::<Checkpoint>(d.enrolment.signing_public_key.verifying_key())
        .unwrap()
}

async fn head(env: &Env) -> (u64, u64) {
    let h = env
        .store()
        .region_head(EM.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    (h.epoch, h.version)
}

#[tokio::test]
async fn a_waiting_tablet_hears_of_an_upload_at_once_and_of_nothing_else() {
    // Heads re-read only every minute: the upload's own hint must wake the waiting tablet.
    let env = Env::start_with(|c| c.live_recheck_millis = 60_000).await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let em = env.enrol(EM).await;
    let nw = env.enrol(NW).await;
    assert_eq!(
        env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
            .await
            .status(),
        200
    );
    let (epoch, v1) = head(&env).await;
    assert!(v1 > 0);

    // Behind the head: answered at once, with the head.
    let r = wait(&env, &em, epoch, 0, 20).await;
    let cp = answered(&em, r).await;
    assert_eq!((cp.epoch, cp.head_version), (epoch, v1));
    assert_eq!(cp.region.as_str(), EM);
    assert!(cp.expires_at > cp.server_time);

    // At the head: held until the next upload, then answered with it.
    let held = {
        let (env, em) = (&env, &em);
        async move {
            let started = Instant::now();
            let r = wait(env, em, epoch, v1, 20).await;
            (started.elapsed(), answered(em, r).await)
        }
    };
    let other = {
        let (env, nw) = (&env, &nw);
        async move {
            let nw_epoch = env
                .store()
                .region_head(NW.parse().unwrap())
                .await
                .unwrap()
                .unwrap();
            let started = Instant::now();
            let r = wait(env, nw, nw_epoch.epoch, nw_epoch.version, 3).await;
            (started.elapsed(), answered(nw, r).await, nw_epoch.version)
        }
    };
    let upload = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = env
            .upload(
                &leics,
                LEICS,
                &csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-02-01", "")]),
            )
            .await;
        assert_eq!(r.status(), 200);
    };
    let ((took, cp), (nw_took, nw_cp, nw_version), ()) = tokio::join!(held, other, upload);
    let (_, v2) = head(&env).await;
    assert!(v2 > v1);
    assert_eq!(cp.head_version, v2, "answered with the new head");
    assert!(
        took < Duration::from_secs(15),
        "answered by the upload, not the 20 s wait: {took:?}"
    );
    // Another region's tablet is not woken by it: held for its whole wait, head unchanged.
    assert_eq!(nw_cp.head_version, nw_version);
    assert!(nw_took >= Duration::from_millis(2900), "{nw_took:?}");

    // Nothing changes: answered after the wait, the head unchanged and freshly signed.
    let started = Instant::now();
    let cp = answered(&em, wait(&env, &em, epoch, v2, 1).await).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(cp.head_version, v2);

    // Bad queries and revoked tablets are refused like any device request.
    let r = em
        .client
        .get(env.url(&format!("{}?after=x", paths::CHECKPOINT_WAIT)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    env.store()
        .revoke_device(em.enrolment.device_id, env.clock_now())
        .await
        .unwrap();
    let r = wait(&env, &em, epoch, v2, 1).await;
    assert_eq!(r.status(), 403);
    assert!(r.json::<ErrorBody>().await.unwrap().error.wipe);
    env.stop().await;
}

#[tokio::test]
async fn waiting_tablets_are_neither_shed_nor_cut_by_the_request_deadline() {
    let env = Env::start_with(|c| {
        c.max_concurrent_requests = 2;
        c.request_timeout_secs = 1;
    })
    .await;
    env.seed().await;
    let d = env.enrol(EM).await;
    let (epoch, version) = head(&env).await;
    let waits: Vec<_> = (0..8).map(|_| wait(&env, &d, epoch, version, 3)).collect();
    let poll = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Eight held, two slots for work: a poll is still served.
        d.client
            .get(env.url(paths::CHECKPOINT))
            .send()
            .await
            .unwrap()
            .status()
    };
    let (held, polled) = tokio::join!(futures_util::future::join_all(waits), poll);
    assert_eq!(polled, 200);
    for r in held {
        // Held for 3 s past the 1 s request deadline, and answered.
        assert_eq!(answered(&d, r).await.head_version, version);
    }
    env.stop().await;
}

#[tokio::test]
async fn the_live_feed_is_bounded_can_be_off_and_a_stopping_server_sends_tablets_away() {
    let off = Env::start_with(|c| c.live_wait_max_secs = 0).await;
    off.seed().await;
    let d = off.enrol(EM).await;
    let r = wait(&off, &d, 1, 0, 5).await;
    assert_eq!(r.status(), 404, "off: the tablet polls");
    off.stop().await;

    let env = Env::start_with(|c| c.live_max_waiting = 2).await;
    env.seed().await;
    let d = env.enrol(EM).await;
    let (epoch, version) = head(&env).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(wait_owned(
                env.base.clone(),
                d.client.clone(),
                epoch,
                version,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = wait(&env, &d, epoch, version, 20).await;
    assert_eq!(r.status(), 503, "a third is refused: the tablet polls");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry));
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::OVERLOADED
    );
    // Stopping: the two held are answered 503 with a Retry-After each, not left to be cut.
    env.stop().await;
    for h in held {
        let (status, retry) = h.await.unwrap();
        assert_eq!(status, 503);
        assert!((1..=30).contains(&retry.unwrap()));
    }
}

/// A wait of 20 s by a task of its own: its status and `Retry-After`.
async fn wait_owned(
    base: String,
    client: reqwest::Client,
    epoch: u64,
    after: u64,
) -> (u16, Option<u64>) {
    let r = client
        .get(format!(
            "{base}{}?epoch={epoch}&after={after}&wait=20",
            paths::CHECKPOINT_WAIT
        ))
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (r.status().as_u16(), retry)
}
