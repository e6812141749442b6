//! Council uploads: reconciliation, whole-file validation, size limit, retention purge.

use cpis_protocol::api::{UploadCounts, UploadReceipt, UploadRejection, codes};
use cpis_protocol::{FlagRecord, PlanType};
use cpis_sync_server::store::Store;

use crate::harness::*;

async fn receipt(response: reqwest::Response) -> UploadReceipt {
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn upload_reconciles_every_case_and_resending_changes_nothing() {
    let env = Env::start().await;
    env.seed().await;
    let token = env.council_token(LEICS).await;

    let first = csv(&[
        (1, "CPP", "2024-01-01", ""),
        (2, "LAC", "2023-05-01", ""),
        (3, "CPP", "2024-02-01", ""),
        (4, "UCPP", "2025-01-10", ""),
    ]);
    let r = receipt(env.upload(&token, LEICS, &first).await).await;
    assert_eq!(r.result, "success");
    assert_eq!(
        r.counts,
        UploadCounts {
            rows: 4,
            added: 4,
            ..Default::default()
        }
    );
    assert_eq!(r.version, 4);

    // 1 unchanged, 2 ended, 3 updated (start date), 4 removed, 5 added.
    let second = csv(&[
        (1, "CPP", "2024-01-01", ""),
        (2, "LAC", "2023-05-01", "2025-05-01"),
        (3, "CPP", "2024-02-02", ""),
        (5, "LAC", "2025-03-01", ""),
    ]);
    let r = receipt(env.upload(&token, LEICS, &second).await).await;
    assert_eq!(
        r.counts,
        UploadCounts {
            rows: 4,
            added: 1,
            updated: 1,
            ended: 1,
            removed: 1,
            unchanged: 1
        }
    );
    assert_eq!(r.version, 8, "four changes, four new versions");

    let again = receipt(env.upload(&token, LEICS, &second).await).await;
    assert_eq!(again.counts.unchanged, 4);
    assert_eq!(again.counts.rows, 4);
    assert_eq!(again.version, 8, "re-sending the same file changes nothing");

    let flags = env.store().council_flags(council(LEICS)).await.unwrap();
    let mut keys: Vec<(cpis_protocol::NhsNumber, PlanType)> =
        flags.iter().map(|f| (f.nhs_number, f.plan_type)).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            (nhs(1), PlanType::Cpp),
            (nhs(2), PlanType::Lac),
            (nhs(3), PlanType::Cpp),
            (nhs(5), PlanType::Lac)
        ]
    );
    let ended = flags.iter().find(|f| f.nhs_number == nhs(2)).unwrap();
    assert_eq!(ended.end_date, Some(date("2025-05-01")));
    env.stop().await;
}

#[tokio::test]
async fn invalid_upload_lists_every_error_and_applies_nothing() {
    let env = Env::start().await;
    env.seed().await;
    let token = env.council_token(LEICS).await;
    let good = csv(&[(1, "CPP", "2024-01-01", ""), (2, "LAC", "2024-01-01", "")]);
    let before = receipt(env.upload(&token, LEICS, &good).await).await;
    let flags_before: Vec<FlagRecord> = env.store().council_flags(council(LEICS)).await.unwrap();

    let bad = format!(
        "{HEADER}{n1},CPP,2024-01-01,2025-01-01,,\n\
         9434765918,CPP,2024-01-01,,,\n\
         {n3},XYZ,2024-01-01,,,\n\
         {n4},LAC,01/02/2024,,,\n\
         {n5},LAC,2024-05-01,2024-04-01,,\n\
         {n6},CPP,2023-01-01,2024-03-01,,\n\
         {n7},CPP,2025-07-01,,,\n\
         {n7},CPP,2025-01-01,,,\n",
        n1 = nhs(1),
        n3 = nhs(3),
        n4 = nhs(4),
        n5 = nhs(5),
        n6 = nhs(6),
        n7 = nhs(7),
    );
    let response = env.upload(&token, LEICS, &bad).await;
    assert_eq!(response.status(), 422);
    let rejection: UploadRejection = response.json().await.unwrap();
    assert_eq!(rejection.error.code, codes::INVALID_UPLOAD);
    let got: Vec<(u64, &str, &str)> = rejection
        .errors
        .iter()
        .map(|e| (e.line, e.column.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (3, "nhs_number", "nhs_number_check_digit_mismatch"),
            (4, "plan_type", "bad_plan_type"),
            (5, "start_date", "bad_date"),
            (6, "end_date", "end_before_start"),
            (7, "end_date", "ended_past_retention"),
            (8, "start_date", "date_in_future"),
            (9, "", "duplicate_flag"),
        ]
    );
    assert!(rejection.errors[6].message.contains("line 8"));
    // Row 2 alone was valid (it would have ended flag 1): nothing at all was applied.
    assert_eq!(
        env.store().council_flags(council(LEICS)).await.unwrap(),
        flags_before
    );
    assert_eq!(env.store().head_version().await.unwrap(), before.version);

    let header = env.upload(&token, LEICS, "nhs,plan\n1,CPP\n").await;
    assert_eq!(header.status(), 422);
    let rejection: UploadRejection = header.json().await.unwrap();
    assert_eq!(rejection.errors[0].code, "bad_header");
    env.stop().await;
}

#[tokio::test]
async fn empty_list_needs_allow_empty_and_oversize_is_413() {
    let env = Env::start_with(|c| c.max_upload_bytes = 2_000).await;
    env.seed().await;
    let token = env.council_token(LEICS).await;
    receipt(
        env.upload(&token, LEICS, &csv(&[(1, "CPP", "2024-01-01", "")]))
            .await,
    )
    .await;

    let empty = env.upload(&token, LEICS, HEADER).await;
    assert_eq!(empty.status(), 422);
    let rejection: UploadRejection = empty.json().await.unwrap();
    assert_eq!(rejection.errors[0].code, "empty_upload");
    assert_eq!(
        env.store()
            .council_flags(council(LEICS))
            .await
            .unwrap()
            .len(),
        1
    );

    let allowed = env
        .client()
        .post(env.url(&format!("/v1/councils/{LEICS}/uploads?allow_empty=true")))
        .bearer_auth(&token)
        .body(HEADER)
        .send()
        .await
        .unwrap();
    let r = receipt(allowed).await;
    assert_eq!(r.counts.removed, 1);
    assert!(
        env.store()
            .council_flags(council(LEICS))
            .await
            .unwrap()
            .is_empty()
    );

    let rows: Vec<(u32, &str, &str, &str)> =
        (0..100).map(|i| (i, "CPP", "2024-01-01", "")).collect();
    let big = env.upload(&token, LEICS, &csv(&rows)).await;
    assert_eq!(big.status(), 413);
    let body: cpis_protocol::api::ErrorBody = big.json().await.unwrap();
    assert_eq!(body.error.code, codes::TOO_LARGE);
    env.stop().await;
}

#[tokio::test]
async fn flags_are_purged_twelve_months_after_their_end_as_changes() {
    let env = Env::start().await;
    env.seed().await;
    let leics = env.council_token(LEICS).await;
    let notts = env.council_token(NOTTS).await;
    let r = receipt(
        env.upload(
            &leics,
            LEICS,
            &csv(&[
                (1, "CPP", "2023-01-01", "2024-07-01"),
                (2, "CPP", "2024-01-01", ""),
            ]),
        )
        .await,
    )
    .await;
    assert_eq!(r.version, 2);
    // Retained until 2025-07-01; on 2025-07-02 the next upload (any council) purges it.
    env.clock.set("2025-07-02T09:00:00Z".parse().unwrap());
    let r = receipt(
        env.upload(&notts, NOTTS, &csv(&[(9, "LAC", "2025-01-01", "")]))
            .await,
    )
    .await;
    assert_eq!(r.version, 4, "one purge change, then one added flag");
    let flags = env.store().council_flags(council(LEICS)).await.unwrap();
    assert_eq!(flags.len(), 1);
    assert_eq!(flags[0].nhs_number, nhs(2));
    let changes = env
        .store()
        .region_changes(EM.parse().unwrap(), 2)
        .await
        .unwrap()
        .unwrap()
        .changes;
    assert_eq!(changes.len(), 2);
    assert!(matches!(
        &changes[0].change,
        cpis_protocol::Change::Remove(k) if k.nhs_number == nhs(1)
    ));
    env.stop().await;
}
