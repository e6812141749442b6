//! The council mailbox: isolation, cursor paging, acknowledgement, overdue reporting.

use std::collections::BTreeSet;
use std::process::Command;

use chrono::{Duration, Utc};
use cpis_protocol::EventId;
use cpis_protocol::PlanType::Cpp;
use cpis_protocol::api::ErrorBody;
use cpis_protocol::mailbox::{AckResponse, NotificationId, NotificationPage};
use cpis_sync_server::store::Store as _;

use crate::harness::*;

async fn with_flags(env: &Env) -> (String, String) {
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let notts = env.council_token(NOTTS).await;
    let r = env
        .upload(&leics, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    let r = env
        .upload(&notts, NOTTS, &csv(&[(3, "CPP", "2024-01-01", "")]))
        .await;
    assert_eq!(r.status(), 200);
    (leics, notts)
}

#[tokio::test]
async fn a_council_never_lists_or_acknowledges_another_councils_notices() {
    let env = Env::start().await;
    let (leics, notts) = with_flags(&env).await;
    let d = env.enrol(EM).await;
    d.send_events(
        &env,
        &[
            d.event(1, t0(), &[LEICS], &[Cpp]),
            d.event(3, t0(), &[NOTTS], &[Cpp]),
        ],
    )
    .await;
    let theirs = env.mailbox(&notts, NOTTS).await;
    assert_eq!(theirs.len(), 1);

    // Leicestershire's token on Nottinghamshire's mailbox: 403, to list and to acknowledge.
    let r = env.list(&leics, NOTTS, None, None).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<ErrorBody>().await.unwrap().error.code, "forbidden");
    let r = env.ack(&leics, NOTTS, &[theirs[0].id]).await;
    assert_eq!(r.status(), 403);
    // Nottinghamshire's ids on Leicestershire's own path acknowledge nothing.
    let r = env.ack(&leics, LEICS, &[theirs[0].id]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<AckResponse>().await.unwrap().acknowledged, 0);
    assert_eq!(env.mailbox(&notts, NOTTS).await, theirs);
    // No token or an unknown one: 401.
    let r = env
        .client()
        .get(env.url(&format!("/v1/councils/{LEICS}/notifications")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        env.list("cpis_ct_nope", LEICS, None, None).await.status(),
        401
    );
    let mine = env.mailbox(&leics, LEICS).await;
    assert_eq!(mine.len(), 1);
    assert_ne!(mine[0].event_id, theirs[0].event_id);
    env.stop().await;
}

#[tokio::test]
async fn paging_returns_every_notice_once_in_order_and_ack_removes_them() {
    let env = Env::start().await;
    let (leics, _) = with_flags(&env).await;
    let d = env.enrol(EM).await;
    let events: Vec<_> = (0..250)
        .map(|i| d.event(1, t0() - Duration::seconds(i), &[LEICS], &[Cpp]))
        .collect();
    d.send_events(&env, &events).await;

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let r = env.list(&leics, LEICS, after.as_deref(), Some(100)).await;
        assert_eq!(r.status(), 200);
        let page: NotificationPage = r.json().await.unwrap();
        sizes.push(page.notifications.len());
        seen.extend(page.notifications);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(sizes, vec![100, 100, 50]);
    let ids: Vec<NotificationId> = seen.iter().map(|n| n.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "queue order");
    let sent: BTreeSet<EventId> = events.iter().map(|e| e.event_id).collect();
    let got: BTreeSet<EventId> = seen.iter().map(|n| n.event_id).collect();
    assert_eq!(got, sent);
    assert_eq!(seen.len(), 250, "each exactly once");

    // Default page size 100; bad limits and cursors are refused.
    let page: NotificationPage = env
        .list(&leics, LEICS, None, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.notifications.len(), 100);
    for (after, limit) in [(None, Some(0)), (None, Some(1001)), (Some("garbage"), None)] {
        assert_eq!(env.list(&leics, LEICS, after, limit).await.status(), 400);
    }

    // Acknowledge the first 100 (plus an unknown id): they leave the mailbox.
    let mut first: Vec<NotificationId> = ids[..100].to_vec();
    first.push(NotificationId::try_from(999_999).unwrap());
    let r = env.ack(&leics, LEICS, &first).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<AckResponse>().await.unwrap().acknowledged, 100);
    let left = env.mailbox(&leics, LEICS).await;
    assert_eq!(left.len(), 150);
    assert_eq!(left[0].id, ids[100]);
    // Again: nothing more leaves, nothing breaks.
    let r = env.ack(&leics, LEICS, &first).await;
    assert_eq!(r.json::<AckResponse>().await.unwrap().acknowledged, 0);
    assert_eq!(env.mailbox(&leics, LEICS).await.len(), 150);
    // A cursor from before the acknowledgement still works.
    let page: NotificationPage = env
        .list(&leics, LEICS, after.as_deref(), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.notifications.len(), 50);
    // The audit log keeps the acknowledged ones.
    let audit = env.store().audit_entries(seen[0].event_id).await.unwrap();
    assert_eq!(audit.last().unwrap().action, "notification_acknowledged");
    let m = env.metrics().await;
    assert_eq!(
        metric(&m, &format!("cpis_mailbox_pending{{council=\"{LEICS}\"}}")),
        Some(150.0)
    );
    env.stop().await;
}

#[tokio::test]
async fn unacknowledged_notices_become_overdue_after_5_days() {
    // The admin command reads the wall clock, so the server's clock runs near it.
    let now = Utc::now();
    let env = Env::start_at(now - Duration::days(6)).await;
    let (leics, _) = with_flags(&env).await;
    let d = env.enrol(EM).await;
    d.send_events(
        &env,
        &[
            d.event(1, env.clock_now(), &[LEICS], &[Cpp]),
            d.event(1, env.clock_now(), &[LEICS], &[Cpp]),
        ],
    )
    .await;
    env.clock.set(now - Duration::days(1));
    d.send_events(&env, &[d.event(1, env.clock_now(), &[LEICS], &[Cpp])])
        .await;

    let overdue = format!("cpis_mailbox_overdue{{council=\"{LEICS}\"}}");
    let pending = format!("cpis_mailbox_pending{{council=\"{LEICS}\"}}");
    // Four days after the first two: nothing is overdue yet.
    env.clock.set(now - Duration::days(2));
    let m = env.metrics().await;
    assert_eq!(metric(&m, &overdue), Some(0.0));
    assert_eq!(metric(&m, &pending), Some(3.0));
    assert!(env.mailbox(&leics, LEICS).await.iter().all(|n| !n.overdue));
    // Six days after: the first two are overdue, in /metrics and in the listing.
    env.clock.set(now);
    let m = env.metrics().await;
    assert_eq!(metric(&m, &overdue), Some(2.0));
    assert_eq!(
        metric(&m, &format!("cpis_mailbox_overdue{{council=\"{NOTTS}\"}}")),
        Some(0.0)
    );
    let flags: Vec<bool> = env
        .mailbox(&leics, LEICS)
        .await
        .iter()
        .map(|n| n.overdue)
        .collect();
    assert_eq!(flags, vec![true, true, false]);

    // And in `admin mailbox list` (run while the server is serving).
    let d = env.dir.path().to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args(["admin", "--data-dir", d, "mailbox", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("COUNCIL\tNAME\tPENDING\tOVERDUE"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with(LEICS)).unwrap();
    let cols: Vec<&str> = row.split('\t').collect();
    assert_eq!(&cols[2..4], &["3", "2"], "{row}");
    let out = Command::new(env!("CARGO_BIN_EXE_cpis-sync-server"))
        .args(["admin", "--data-dir", d, "mailbox", "list", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = v["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["council"] == LEICS)
        .unwrap();
    assert_eq!(m["overdue"], 2);
    assert_eq!(m["pending"], 3);

    // Acknowledged, they stop being overdue.
    let ids: Vec<_> = env
        .mailbox(&leics, LEICS)
        .await
        .iter()
        .map(|n| n.id)
        .collect();
    env.ack(&leics, LEICS, &ids).await;
    assert_eq!(metric(&env.metrics().await, &overdue), Some(0.0));
    env.stop().await;
}
