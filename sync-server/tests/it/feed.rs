//! The signed feed as a tablet sees it: enrolment, checkpoint, snapshot (with Range resume),
//! deltas (204 at head, 410 past retention → snapshot), epochs, and ops endpoints.

use chrono::Duration;
use cpis_protocol::api::{ErrorBody, codes, paths};
use cpis_protocol::{
    BODY_FORMAT, COLUMNS_FORMAT, Change, Checkpoint, DeltaBody, DeltaMeta, Position, PublicKey,
    SignedMessage, SnapshotBody, SnapshotMeta,
};
use cpis_sync_server::store::{LogRetention, Store};

use crate::harness::*;

/// The signed checkpoint's bytes, as served.
async fn checkpoint_bytes(env: &Env, d: &Device) -> axum::body::Bytes {
    let r = d
        .client
        .get(env.url(paths::CHECKPOINT))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], paths::OCTET);
    r.bytes().await.unwrap()
}

/// What a poll reads (`Store::device_and_head`) is what the device and region head reads
/// give apart.
async fn read_together_as_apart(env: &Env, d: &Device) {
    let id = d.enrolment.device_id;
    let (device, head) = env.store().device_and_head(id).await.unwrap().unwrap();
    assert_eq!(
        Some(&device),
        env.store().device(id).await.unwrap().as_ref()
    );
    let apart = env.store().region_head(device.region).await.unwrap();
    assert!(apart.is_some());
    assert_eq!(head, apart);
}

async fn checkpoint(env: &Env, d: &Device) -> Checkpoint {
    SignedMessage::from_bytes(&checkpoint_bytes(env, d).await)
        .unwrap()
        .open::<Checkpoint>(d.enrolment.signing_public_key.verifying_key())
        .unwrap()
}

/// The current snapshot in the body format this version's tablets ask for.
async fn snapshot(env: &Env, d: &Device) -> (SnapshotMeta, SnapshotBody) {
    snapshot_in(env, d, &format!("?format={COLUMNS_FORMAT}")).await
}

/// The current snapshot's metadata and opened body, both fetched with `query`.
async fn snapshot_in(env: &Env, d: &Device, query: &str) -> (SnapshotMeta, SnapshotBody) {
    let key = d.enrolment.signing_public_key;
    let bytes = d
        .client
        .get(env.url(&format!("{}{query}", paths::SNAPSHOT)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let meta: SnapshotMeta = SignedMessage::from_bytes(&bytes)
        .unwrap()
        .open(key.verifying_key())
        .unwrap();
    let r = d
        .client
        .get(env.url(&format!(
            "{}/{}/{}{query}",
            paths::SNAPSHOT_BODY_PREFIX,
            meta.epoch,
            meta.version
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header: SnapshotMeta =
        SignedMessage::from_header(r.headers()[paths::SIGNED_HEADER].to_str().unwrap())
            .unwrap()
            .open(key.verifying_key())
            .unwrap();
    assert_eq!(header, meta);
    let body = r.bytes().await.unwrap();
    let opened = meta.body.open_snapshot(&body).unwrap();
    (meta, opened)
}

pub(crate) async fn delta(env: &Env, d: &Device, from: u64) -> reqwest::Response {
    d.client
        .get(env.url(&format!("{}?from={from}", paths::DELTA)))
        .send()
        .await
        .unwrap()
}

pub(crate) async fn open_delta(d: &Device, r: reqwest::Response) -> (DeltaMeta, DeltaBody) {
    assert_eq!(r.status(), 200);
    let key = d.enrolment.signing_public_key;
    let meta: DeltaMeta =
        SignedMessage::from_header(r.headers()[paths::SIGNED_HEADER].to_str().unwrap())
            .unwrap()
            .open(key.verifying_key())
            .unwrap();
    let body = r.bytes().await.unwrap();
    let opened: DeltaBody = meta.body.open(&body).unwrap();
    (meta, opened)
}

#[tokio::test]
async fn everything_served_verifies_with_the_protocol_crate() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    env.upload(
        &leics,
        LEICS,
        &csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-03-01", "")]),
    )
    .await;
    let d = env.enrol(EM).await;
    assert_eq!(d.enrolment.region.as_str(), EM);
    assert_eq!(d.enrolment.trust.as_str(), "RX9");
    let pinned: PublicKey = d.enrolment.signing_public_key;
    assert_eq!(d.enrolment.policy, cpis_protocol::Policy::default());

    let mut pos = Position::empty(EM.parse().unwrap());
    let cp = checkpoint(&env, &d).await;
    cp.check(&pos, env.clock_now()).unwrap();
    assert_eq!(cp.head_version, 2);
    assert_eq!(cp.server_time, env.clock_now());
    assert_eq!(cp.expires_at, env.clock_now() + Duration::days(1));

    let (meta, body) = snapshot(&env, &d).await;
    meta.check(&pos, &cp).unwrap();
    assert_eq!((meta.version, meta.flag_count), (2, 2));
    assert_eq!(body.flags.len(), 2);
    assert_eq!(
        body.councils.len(),
        2,
        "both EM councils are in the directory"
    );
    assert_eq!(body.councils[0].emergency_phone, "0116 000 0000");
    pos.data = Some((meta.epoch, meta.version));
    pos.server_time = Some(cp.server_time);

    // At head: 204. Ahead of head: 400.
    assert_eq!(delta(&env, &d, 2).await.status(), 204);
    assert_eq!(delta(&env, &d, 99).await.status(), 400);

    // A change: the delta verifies against the new checkpoint and carries it.
    env.clock.advance(Duration::minutes(10));
    env.upload(
        &leics,
        LEICS,
        &csv(&[
            (1, "CPP", "2024-01-01", "2025-05-30"),
            (3, "UCPP", "2025-02-01", ""),
        ]),
    )
    .await;
    // Another region's change moves the global head, not EM's.
    let lancs = env.council_token(LANCS).await;
    env.upload(&lancs, LANCS, &csv(&[(7, "CPP", "2024-01-01", "")]))
        .await;
    let cp2 = checkpoint(&env, &d).await;
    cp2.check(&pos, env.clock_now()).unwrap();
    assert_eq!(cp2.head_version, 5);
    let (dmeta, dbody) = open_delta(&d, delta(&env, &d, 2).await).await;
    dmeta.check(&pos, &cp2).unwrap();
    assert_eq!((dmeta.from_version, dmeta.to_version), (2, 5));
    let kinds: Vec<(u64, bool)> = dbody
        .changes
        .iter()
        .map(|c| (c.version, matches!(c.change, Change::Remove(_))))
        .collect();
    assert_eq!(kinds, vec![(3, false), (4, true), (5, false)]);
    assert_eq!(dmeta.change_count, 3);
    let _ = pinned;

    // healthz on the public listener says only "ok"; metrics (per-council mailbox counts)
    // are on their own loopback listener and nowhere on the public one.
    let h = env.client().get(env.url("/healthz")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(h.text().await.unwrap(), "ok\n");
    let public = env.client().get(env.url("/metrics")).send().await.unwrap();
    assert_eq!(
        public.status(),
        404,
        "/metrics must not be on the public listener"
    );
    let m = env.metrics().await;
    assert!(
        m.contains("cpis_council_uploads_total{result=\"accepted\"} 3"),
        "{m}"
    );
    assert!(m.contains("cpis_head_version 6"), "{m}");
    assert!(m.contains("route=\"/v1/device/checkpoint\""), "{m}");
    let nf = env.client().get(env.url("/nope")).send().await.unwrap();
    assert_eq!(nf.status(), 404);
    assert_eq!(
        nf.json::<ErrorBody>().await.unwrap().error.code,
        codes::NOT_FOUND
    );
    env.stop().await;
}

#[tokio::test]
async fn a_head_is_signed_once_a_second_and_a_change_is_answered_at_once() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let upload = |rows: &'static [(u32, &'static str, &'static str, &'static str)]| {
        let (env, leics) = (&env, &leics);
        async move { assert_eq!(env.upload(leics, LEICS, &csv(rows)).await.status(), 200) }
    };
    upload(&[(1, "CPP", "2024-01-01", "")]).await;
    let d = env.enrol(EM).await;
    // The same head within a second: the same signed bytes (no new signature).
    let first = checkpoint_bytes(&env, &d).await;
    env.clock.advance(Duration::milliseconds(999));
    assert_eq!(checkpoint_bytes(&env, &d).await, first);
    // A second on, signed again, with the time of the read.
    env.clock.advance(Duration::milliseconds(1));
    let cp = checkpoint(&env, &d).await;
    assert_eq!(cp.server_time, env.clock_now());
    // A change is answered by the next poll, not a second later.
    let before = cp.head_version;
    upload(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-02-01", "")]).await;
    let cp = checkpoint(&env, &d).await;
    assert!(cp.head_version > before);
    assert_eq!(cp.server_time, env.clock_now());
    read_together_as_apart(&env, &d).await;
    assert!(
        env.store()
            .device_and_head(cpis_protocol::DeviceId::new())
            .await
            .unwrap()
            .is_none()
    );
    // A clock that went back is not answered with a checkpoint from its future.
    env.clock.advance(Duration::seconds(-10));
    assert_eq!(checkpoint(&env, &d).await.server_time, env.clock_now());
    env.stop().await;
}

/// Polls answer from a head each read connection keeps while the database is unchanged; a
/// commit by any other connection (here one opened on the file, as `admin` in another
/// process would) is seen by the next poll.
#[tokio::test]
async fn a_commit_by_another_connection_is_seen_by_the_next_poll() {
    if test_database().is_some() {
        return; // SQLite's own file; PostgreSQL reads its head in the poll's statement.
    }
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    let d = env.enrol(EM).await;
    let before = checkpoint(&env, &d).await;
    // Several polls, so that every pooled connection has the head cached.
    for _ in 0..20 {
        assert_eq!(checkpoint(&env, &d).await.epoch, before.epoch);
    }
    let db =
        rusqlite::Connection::open(env.dir.path().join(cpis_sync_server::config::DATABASE_FILE))
            .unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db.execute("UPDATE regions SET epoch = epoch + 1 WHERE id = ?1", [EM])
        .unwrap();
    drop(db);
    for _ in 0..20 {
        assert_eq!(checkpoint(&env, &d).await.epoch, before.epoch + 1);
    }
}

/// A fleet at one version asks for the same delta when the region moves: it is built and
/// signed once and answered to every tablet (same bytes, same signing time), until the head
/// moves again.
#[tokio::test]
async fn a_fleet_at_one_version_is_answered_one_built_delta() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    let (a, b) = (env.enrol(EM).await, env.enrol(EM).await);
    let from = checkpoint(&env, &a).await.head_version;
    env.upload(
        &leics,
        LEICS,
        &csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-02-01", "")]),
    )
    .await;

    let (first, body) = open_delta(&a, delta(&env, &a, from).await).await;
    assert_eq!((first.from_version, body.changes.len()), (from, 1));
    env.clock.advance(Duration::seconds(30));
    let (again, _) = open_delta(&b, delta(&env, &b, from).await).await;
    assert_eq!(again, first, "the same signed delta, not one built again");

    // The head moves: the next tablet gets a delta to the new head, signed now.
    env.upload(
        &leics,
        LEICS,
        &csv(&[(1, "CPP", "2024-01-01", ""), (3, "CPP", "2024-03-01", "")]),
    )
    .await;
    let (moved, body) = open_delta(&b, delta(&env, &b, from).await).await;
    assert!(moved.to_version > first.to_version);
    assert_eq!(moved.server_time, env.clock_now());
    assert_eq!(body.changes.len(), 3, "{:?}", body.changes);
}

/// A server where council `LEICS` holds `n` plans, and a tablet enrolled in its region.
async fn region_of_plans(n: u32) -> (Env, Device) {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let rows: Vec<(u32, &str, &str, &str)> = (0..n).map(|i| (i, "CPP", "2024-01-01", "")).collect();
    env.upload(&leics, LEICS, &csv(&rows)).await;
    let d = env.enrol(EM).await;
    (env, d)
}

/// Tablets from before the columnar body ask for no format and get rows; tablets of this
/// version ask for columns. Both hold the same snapshot, signed apart, cached apart; a
/// format the server does not write is a 400 that names the ones it does.
#[tokio::test]
async fn a_tablet_that_names_no_format_gets_rows_and_one_that_asks_gets_columns() {
    let (env, d) = region_of_plans(300).await;

    let (old_meta, old_body) = snapshot_in(&env, &d, "").await;
    assert_eq!(old_meta.body.format, BODY_FORMAT);
    let (meta, body) = snapshot(&env, &d).await;
    assert_eq!(meta.body.format, COLUMNS_FORMAT);
    assert_eq!(
        (meta.epoch, meta.version),
        (old_meta.epoch, old_meta.version)
    );
    assert_eq!(body, old_body);
    assert_eq!(body.flags.len(), 300);
    assert!(
        meta.body.len < old_meta.body.len,
        "columns {} B, rows {} B",
        meta.body.len,
        old_meta.body.len
    );
    // Asked again, each is the cached one.
    assert_eq!(snapshot_in(&env, &d, "?format=2").await.0, old_meta);
    assert_eq!(snapshot(&env, &d).await.0, meta);

    for (query, why) in [
        ("?format=7", "7 is not one of them"),
        ("?format=x", "format"),
    ] {
        let r = d
            .client
            .get(env.url(&format!("{}{query}", paths::SNAPSHOT)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.error.code, "bad_query");
        assert!(e.error.message.contains("[3, 2]"), "{}", e.error.message);
        assert!(e.error.message.contains(why), "{}", e.error.message);
    }
}

#[tokio::test]
async fn snapshot_download_resumes_with_range() {
    let (env, d) = region_of_plans(2000).await;
    let key = d.enrolment.signing_public_key;
    let bytes = d
        .client
        .get(env.url(paths::SNAPSHOT))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let meta: SnapshotMeta = SignedMessage::from_bytes(&bytes)
        .unwrap()
        .open(key.verifying_key())
        .unwrap();
    let url = env.url(&format!(
        "{}/{}/{}",
        paths::SNAPSHOT_BODY_PREFIX,
        meta.epoch,
        meta.version
    ));
    let len = meta.body.len;
    let cut = len / 3;

    let first = d
        .client
        .get(&url)
        .header("range", format!("bytes=0-{}", cut - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 206);
    assert_eq!(
        first.headers()["content-range"],
        format!("bytes 0-{}/{len}", cut - 1).as_str()
    );
    let mut body = first.bytes().await.unwrap().to_vec();
    assert_eq!(body.len() as u64, cut);
    meta.body.check_received(body.len() as u64).unwrap();

    let rest = d
        .client
        .get(&url)
        .header("range", format!("bytes={cut}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 206);
    body.extend_from_slice(&rest.bytes().await.unwrap());
    let opened: SnapshotBody = meta.body.open_snapshot(&body).unwrap();
    assert_eq!(opened.flags.len(), 2000);

    let bad = d
        .client
        .get(&url)
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);

    // A version no longer current and not cached: 410 snapshot_gone.
    let gone = d
        .client
        .get(env.url(&format!(
            "{}/{}/{}",
            paths::SNAPSHOT_BODY_PREFIX,
            meta.epoch,
            1
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 410);
    assert_eq!(
        gone.json::<ErrorBody>().await.unwrap().error.code,
        codes::SNAPSHOT_GONE
    );
    env.stop().await;
}

#[tokio::test]
async fn a_delta_past_retention_is_410_and_a_snapshot_recovers() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    let d = env.enrol(EM).await;
    let (old, _) = snapshot(&env, &d).await;
    assert_eq!(old.version, 1);
    env.upload(
        &leics,
        LEICS,
        &csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2025-06-01", "")]),
    )
    .await;

    env.clock.advance(Duration::days(40));
    let all = csv(&[
        (1, "CPP", "2024-01-01", ""),
        (2, "LAC", "2025-06-01", ""),
        (3, "LAC", "2025-07-01", ""),
    ]);
    env.upload(&leics, LEICS, &all).await;
    // Change-log retention of 30 days drops version 1's entry.
    let now = env.clock_now();
    let pruned = env
        .store()
        .prune_change_log(LogRetention {
            keep_since: now - Duration::days(30),
            max_versions: 1_000_000,
        })
        .await
        .unwrap();
    assert_eq!(pruned, 2, "versions 1 and 2 are older than 30 days");

    let r = delta(&env, &d, old.version).await;
    assert_eq!(r.status(), 410);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::DELTA_GONE
    );

    let cp = checkpoint(&env, &d).await;
    let pos = Position {
        region: EM.parse().unwrap(),
        data: Some((old.epoch, old.version)),
        server_time: Some(old.server_time),
    };
    cp.check(&pos, env.clock_now()).unwrap();
    let (meta, body) = snapshot(&env, &d).await;
    meta.check(&pos, &cp).unwrap();
    assert_eq!(meta.version, 3);
    assert_eq!(body.flags.len(), 3);
    assert_eq!(delta(&env, &d, 3).await.status(), 204);
    env.stop().await;
}

#[tokio::test]
async fn neighbour_councils_change_the_epoch_and_join_the_snapshot() {
    let env = Env::start().await;
    env.seed().await;
    let lancs = env.council_token(LANCS).await;
    env.upload(&lancs, LANCS, &csv(&[(5, "LAC", "2024-01-01", "")]))
        .await;
    let d = env.enrol(EM).await;
    let cp = checkpoint(&env, &d).await;
    let (before, body) = snapshot(&env, &d).await;
    assert!(body.flags.is_empty());

    let region = env
        .store()
        .set_region_neighbours(EM.parse().unwrap(), vec![council(LANCS)])
        .await
        .unwrap();
    assert_eq!(region.epoch, cp.epoch + 1);
    read_together_as_apart(&env, &d).await;
    let cp2 = checkpoint(&env, &d).await;
    assert_eq!(cp2.epoch, cp.epoch + 1);
    // A delta asked for in the old epoch is gone: the tablet takes a snapshot.
    let r = d
        .client
        .get(env.url(&format!(
            "{}?from={}&epoch={}",
            paths::DELTA,
            before.version,
            before.epoch
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    let (after, body) = snapshot(&env, &d).await;
    assert_eq!(after.epoch, cp2.epoch);
    assert_eq!(body.flags.len(), 1);
    assert_eq!(body.flags[0].council.as_str(), LANCS);
    assert!(body.councils.iter().any(|c| c.code.as_str() == LANCS));
    env.stop().await;
}

#[tokio::test]
async fn enrolment_refuses_bad_tokens_and_csrs() {
    let env = Env::start().await;
    env.seed().await;
    let (r, _) = env.enrol_with("cpis_et_unknown").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::TOKEN_UNKNOWN
    );

    let token = env.enrolment_token(EM, 1).await;
    let (r, _) = env.enrol_with(&token).await;
    assert_eq!(r.status(), 200);
    let (r, _) = env.enrol_with(&token).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::TOKEN_USED_UP
    );

    let token = env.enrolment_token(EM, 5).await;
    let bad_csr = env
        .client()
        .post(env.url(paths::ENROL))
        .json(&cpis_protocol::api::EnrolRequest {
            token: token.clone(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            name: None,
            agent_version: "test".into(),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(bad_csr.status(), 400);
    assert_eq!(
        bad_csr.json::<ErrorBody>().await.unwrap().error.code,
        codes::BAD_CSR
    );

    env.clock.advance(Duration::hours(25));
    let (r, _) = env.enrol_with(&token).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        codes::TOKEN_EXPIRED
    );
    assert_eq!(env.store().devices().await.unwrap().len(), 1);
    env.stop().await;
}

#[tokio::test]
async fn recent_contacts_travel_in_the_holding_regions_snapshots_and_deltas() {
    use cpis_protocol::PlanType::Cpp;
    use cpis_protocol::SubjectContacts;
    use cpis_protocol::confirm::{self, ConfirmRequest};

    let env = Env::start().await;
    env.seed().await;
    let (leics, notts, lancs) = (
        env.council_token(LEICS).await,
        env.council_token(NOTTS).await,
        env.council_token(LANCS).await,
    );
    // Subject 1 is flagged by both EM councils; subject 2 by Lancashire (NW).
    env.upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    env.upload(&notts, NOTTS, &csv(&[(1, "LAC", "2024-01-01", "")]))
        .await;
    env.upload(&lancs, LANCS, &csv(&[(2, "CPP", "2024-01-01", "")]))
        .await;
    let em = env.enrol(EM).await;
    let nw = env.enrol(NW).await;
    let em0 = checkpoint(&env, &em).await.head_version;
    let nw0 = checkpoint(&env, &nw).await.head_version;

    // A flagged lookup of subject 1 in EM: one contacts change in EM's delta (the two
    // councils' entries collapse into one), none in NW's.
    let seen = em.event(1, t0() - Duration::hours(3), &[LEICS, NOTTS], &[Cpp]);
    em.send_events(&env, std::slice::from_ref(&seen)).await;
    let em1 = checkpoint(&env, &em).await.head_version;
    let global = env.store().head_version().await.unwrap();
    assert_eq!(
        (em0, em1, global),
        (2, 5, 5),
        "one entry per council holding the subject (versions 4 and 5)"
    );
    assert_eq!(checkpoint(&env, &nw).await.head_version, nw0);
    assert_eq!(delta(&env, &nw, nw0).await.status(), 204);
    let (meta, body) = open_delta(&em, delta(&env, &em, em0).await).await;
    assert_eq!(meta.change_count, 1);
    let Change::Contacts(SubjectContacts {
        nhs_number,
        contacts,
    }) = &body.changes[0].change
    else {
        panic!("expected a contacts change, got {:?}", body.changes[0]);
    };
    assert_eq!(*nhs_number, nhs(1));
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].date, (t0() - Duration::hours(3)).date_naive());
    assert_eq!(contacts[0].organisation.name, "East Midlands Ambulance");
    assert_eq!(body.changes[0].version, em1);

    // The snapshot carries them for the subject it holds.
    let (smeta, sbody) = snapshot(&env, &em).await;
    assert_eq!(smeta.version, em1);
    assert_eq!(
        sbody.contacts,
        vec![SubjectContacts {
            nhs_number: nhs(1),
            contacts: contacts.clone()
        }]
    );
    let (_, nw_body) = snapshot(&env, &nw).await;
    assert!(nw_body.contacts.is_empty());

    // A replay, or a lookup that was no match, changes nothing.
    em.send_events(&env, &[seen, em.event(1, t0(), &[], &[])])
        .await;
    assert_eq!(checkpoint(&env, &em).await.head_version, em1);

    // An EM tablet confirming subject 2 online: NW, which holds it, gets the contact.
    let r = em
        .client
        .post(env.url(confirm::PATH))
        .json(&ConfirmRequest {
            event: em.event(2, t0(), &[], &[]),
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(checkpoint(&env, &em).await.head_version, em1);
    let (_, nw_delta) = open_delta(&nw, delta(&env, &nw, nw0).await).await;
    assert!(matches!(
        &nw_delta.changes[..],
        [cpis_protocol::VersionedChange { change: Change::Contacts(sc), .. }]
            if sc.nhs_number == nhs(2) && sc.contacts.len() == 1
    ));

    // Once no council flags subject 2, maintenance drops its contacts.
    let r = env
        .client()
        .post(env.url(&format!("/v1/councils/{LANCS}/uploads?allow_empty=true")))
        .bearer_auth(&lancs)
        .body(HEADER.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(env.store().purge_orphan_contacts().await.unwrap(), 1);
    assert!(
        env.store()
            .recent_contacts(nhs(2))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(env.store().recent_contacts(nhs(1)).await.unwrap().len(), 1);
    env.stop().await;
}
