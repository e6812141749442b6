//! The national CP-IS FHIR R4 interface on the local listener: CareTeam and AuditEvent
//! searches and the CapabilityStatement, for flagged, not flagged, stale, expired (`unknown`:
//! never an empty searchset), invalid input and a tablet with no data; the council notified
//! once for unscheduled care and not at all for scheduled care. Every response body is run
//! through a real FHIR R4 validator (the fhir.resources models, installed by
//! `scripts/install-fhir-validator.sh`), not only the field checks here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use cpis_agent::api::LocalApi;
use serde_json::Value;

use crate::common::*;
use crate::server::{Env, LANCS, LEICS, nhs, run_quick, with_another_region};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A FHIR answer: status, content type, body.
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

async fn get(base: &str, path_and_query: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client().get(format!("{base}{path_and_query}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    Answer {
        status,
        content_type,
        body,
    }
}

fn care_team(number: &str) -> String {
    format!("/cpis/FHIR/R4/CareTeam?patient:identifier={NHS}%7C{number}")
}

/// The resources of a searchset's entries with `search.mode` = `mode`.
fn entries<'a>(bundle: &'a Value, mode: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| &e["resource"])
        .collect()
}

fn issue_codes(outcome: &Value) -> Vec<String> {
    outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}/{}",
                i["severity"].as_str().unwrap(),
                i["code"].as_str().unwrap(),
                i["details"]["coding"][0]["code"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The validator's Python, installed once per test run.
fn validator() -> &'static PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhir-validator");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/install-fhir-validator.sh"
        );
        let out = Command::new("sh").arg(script).arg(&venv).output().unwrap();
        assert!(
            out.status.success(),
            "install-fhir-validator.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        venv.join("bin").join("python")
    })
}

/// Runs each document through the FHIR R4 validator; `Err` with its report if any fails.
/// With `CPIS_FHIR_EXAMPLES=DIR` the documents are also kept in DIR (the README's examples).
fn validate(docs: &[(&str, &Value)]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("CPIS_FHIR_EXAMPLES").map(PathBuf::from);
    let mut files = Vec::new();
    for (i, (name, doc)) in docs.iter().enumerate() {
        if let Some(keep) = &keep {
            std::fs::create_dir_all(keep).unwrap();
            std::fs::write(
                keep.join(format!("{name}.json")),
                serde_json::to_vec_pretty(doc).unwrap(),
            )
            .unwrap();
        }
        let path = dir.path().join(format!("{i:02}-{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
        files.push(path);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fhir/validate.py");
    let python = validator().clone();
    let out = Command::new(python)
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn care_team_answers_flagged_not_flagged_stale_and_refuses_unknown_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(61, 300);
    let feed = Feed::new(data.region.clone());
    let (agent, clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 3, t0());
    let agent = Arc::new(agent);
    let api = LocalApi::bind(agent.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let mut docs: Vec<(&str, Value)> = Vec::new();
    let hit = data.flags.iter().find(|f| f.end_date.is_none()).unwrap();
    let miss = unflagged_number(&data.flags).to_string();

    // Flagged: one CareTeam a plan, with its council; the | percent-encoded, the number
    // with dashes; TraceID is the incident reference.
    let dashed = hit.nhs_number.spaced().replace(' ', "-");
    let a = get(
        &base,
        &care_team(&dashed),
        &[("TraceID", "trace-1"), ("IsUnscheduledAccessEvent", "true")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.content_type, "application/fhir+json");
    let b = &a.body;
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "searchset");
    let teams = entries(b, "match");
    assert!(!teams.is_empty());
    assert_eq!(b["total"], teams.len());
    let team = teams
        .iter()
        .find(|t| t["category"][0]["coding"][0]["code"] == hit.plan_type.as_str())
        .unwrap();
    assert_eq!(team["resourceType"], "CareTeam");
    assert_eq!(team["subject"]["identifier"]["system"], NHS);
    assert_eq!(
        team["subject"]["identifier"]["value"],
        hit.nhs_number.to_string()
    );
    assert_eq!(
        team["managingOrganization"][0]["identifier"]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(team["period"]["start"], hit.start_date.to_string());
    assert_eq!(team["telecom"][0]["rank"], 1, "the emergency number first");
    assert!(b["meta"]["lastUpdated"].is_string());
    assert_eq!(entries(b, "outcome").len(), 1);
    let event = agent.pending_events(10).unwrap();
    assert_eq!(event.len(), 1, "recorded before it was answered");
    assert_eq!(event[0].incident_ref.as_deref(), Some("trace-1"));
    assert!(event[0].unscheduled);
    assert_eq!(b["id"], event[0].event_id.to_string());
    docs.push(("flagged", a.body));

    // The | raw; scheduled care: recorded all the same, marked scheduled.
    let a = get(
        &base,
        &format!(
            "/cpis/FHIR/R4/CareTeam?patient:identifier={NHS}|{}",
            hit.nhs_number
        ),
        &[("IsUnscheduledAccessEvent", "FALSE")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let events = agent.pending_events(10).unwrap();
    assert_eq!(events.len(), 2);
    assert!(!events[1].unscheduled);
    // The number with spaces (percent-encoded, and as + the way forms encode them).
    for spaced in [
        hit.nhs_number.spaced().replace(' ', "%20"),
        hit.nhs_number.spaced().replace(' ', "+"),
    ] {
        let a = get(&base, &care_team(&spaced), &[]).await;
        assert_eq!(a.status, 200, "{spaced}: {}", a.body);
        assert!(!entries(&a.body, "match").is_empty());
    }

    // Not flagged: an empty searchset, with what it covered, as of when.
    let a = get(&base, &care_team(&miss), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["total"], 0);
    assert!(entries(&a.body, "match").is_empty());
    let outcome = entries(&a.body, "outcome")[0].clone();
    let said = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(said.contains(&format!("region {}", data.region)), "{said}");
    assert!(said.contains("(fresh)"), "{said}");
    assert!(
        !issue_codes(&outcome)
            .iter()
            .any(|c| c.starts_with("warning") && c.contains("data_stale"))
    );
    docs.push(("not-flagged", a.body.clone()));

    // Stale (26 hours on): still an answer, with a warning issue.
    clock.advance(Duration::from_secs(26 * 3600));
    let a = get(&base, &care_team(&miss), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let outcome = entries(&a.body, "outcome")[0].clone();
    assert!(
        outcome["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["severity"] == "warning" && i["details"]["text"] == "data_stale"),
        "{outcome}"
    );
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("(STALE)")
    );
    docs.push(("stale", a.body.clone()));

    // Expired (eight days on): unknown is an error, never an empty searchset; a flag held
    // is still an answer.
    clock.advance(Duration::from_secs(6 * 86400 + 22 * 3600));
    let a = get(&base, &care_team(&miss), &[]).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["resourceType"], "OperationOutcome");
    assert_eq!(issue_codes(&a.body), vec!["error/incomplete/"]);
    assert!(
        a.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("not a \"no record\" answer")
    );
    docs.push(("expired-unknown", a.body.clone()));
    let a = get(&base, &care_team(&hit.nhs_number.to_string()), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(!entries(&a.body, "match").is_empty());

    // Bad input: 400 OperationOutcomes with the guide's codes; nothing recorded.
    let before = agent.pending_events(100).unwrap().len();
    for (query, headers, code) in [
        (care_team("9434765918"), vec![], "INVALID_SEARCH_DATA"),
        (
            "/cpis/FHIR/R4/CareTeam?patient:identifier=9434765919".to_owned(),
            vec![],
            "INVALID_SEARCH_DATA",
        ),
        (
            "/cpis/FHIR/R4/CareTeam?patient:identifier=https://example.org/id%7C9434765919"
                .to_owned(),
            vec![],
            "INVALID_SEARCH_DATA",
        ),
        (
            "/cpis/FHIR/R4/CareTeam".to_owned(),
            vec![],
            "INVALID_SEARCH_DATA",
        ),
        (
            format!("{}&status=active", care_team("9434765919")),
            vec![],
            "INVALID_SEARCH_DATA",
        ),
        (
            care_team("9434765919"),
            vec![("IsUnscheduledAccessEvent", "maybe")],
            "PRECONDITION_FAILED",
        ),
    ] {
        let a = get(&base, &query, &headers).await;
        assert_eq!(a.status, 400, "{query}: {}", a.body);
        assert_eq!(a.content_type, "application/fhir+json");
        assert_eq!(
            issue_codes(&a.body),
            vec![format!("error/invalid/{code}")],
            "{query}"
        );
        docs.push(("bad-input", a.body));
    }
    assert_eq!(agent.pending_events(100).unwrap().len(), before);

    // What is served, and nothing else.
    let a = get(&base, "/cpis/FHIR/R4/metadata", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["resourceType"], "CapabilityStatement");
    assert_eq!(a.body["fhirVersion"], "4.0.1");
    let served: Vec<&str> = a.body["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(served, ["CareTeam", "AuditEvent"]);
    docs.push(("metadata", a.body));
    let a = get(&base, "/cpis/FHIR/R4/Patient?identifier=x", &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(issue_codes(&a.body), vec!["error/not-supported/"]);
    docs.push(("not-served", a.body));

    // A tablet that shredded its data: 503, not a searchset.
    agent.shred().unwrap();
    let a = get(&base, &care_team(&miss), &[]).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(issue_codes(&a.body), vec!["error/processing/"]);
    docs.push(("not-enrolled", a.body));

    let refs: Vec<(&str, &Value)> = docs.iter().map(|(n, d)| (*n, d)).collect();
    let report = validate(&refs).unwrap_or_else(|r| panic!("invalid FHIR:\n{r}"));
    assert_eq!(report.matches("valid ").count(), docs.len(), "{report}");
    // The validator does fail: an element FHIR does not have, and a missing required one.
    let mut wrong = docs[0].1.clone();
    wrong["entry"][0]["resource"]["plan"] = "CPP".into();
    let mut incomplete = docs[1].1.clone();
    incomplete.as_object_mut().unwrap().remove("type");
    let report = validate(&[("wrong", &wrong), ("incomplete", &incomplete)]).unwrap_err();
    assert_eq!(report.matches("INVALID").count(), 2, "{report}");
    api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unscheduled_care_notifies_the_council_once_scheduled_care_never_and_access_history_reads()
{
    let env = Env::start(Utc::now()).await;
    env.upload(LEICS, &[(nhs(0), "CPP", "2026-01-10", "")])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(env.enrol_agent(&env.base, dir.path()).await);
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let api = LocalApi::bind(agent.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let number = nhs(0).to_string();
    let mut ids = Vec::new();
    for header in [Some("true"), Some("false"), None] {
        let headers: Vec<(&str, &str)> = header
            .map(|h| vec![("IsUnscheduledAccessEvent", h)])
            .unwrap_or_default();
        let a = get(&base, &care_team(&number), &headers).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["total"], 1);
        ids.push(a.body["id"].as_str().unwrap().to_owned());
    }
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let notices = env.mailbox(LEICS).await;
    let noticed: Vec<String> = notices.iter().map(|n| n.event_id.to_string()).collect();
    assert_eq!(
        noticed.len(),
        2,
        "true and the default (unscheduled) notify; false does not: {noticed:?}"
    );
    assert!(noticed.contains(&ids[0]) && noticed.contains(&ids[2]));
    assert!(!noticed.contains(&ids[1]));
    // The scheduled access is in the audit trail all the same.
    use cpis_sync_server::store::Store as _;
    let stored = env
        .handle
        .store()
        .stored_event(ids[1].parse().unwrap())
        .await
        .unwrap();
    assert!(stored.is_some(), "recorded for the audit trail");

    // The next sync brings the access history back to the tablet.
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    let a = get(
        &base,
        &format!(
            "/cpis/FHIR/R4/AuditEvent?patient:identifier={NHS}%7C{number}&_include={}",
            "AuditEvent:entity-type=http://terminology.hl7.org/CodeSystem/v3-RoleClass%7CASSIGNED"
        ),
        &[("TraceID", "trace-history")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let history = a.body;
    let events = entries(&history, "match");
    // One contact per notified (unscheduled) access; the scheduled one adds none.
    assert_eq!(events.len(), 2, "{}", history);
    assert_eq!(events[0]["resourceType"], "AuditEvent");
    assert_eq!(events[0]["agent"][0]["who"]["identifier"]["value"], "ZA1");
    assert_eq!(
        events[0]["entity"][0]["what"]["identifier"]["value"],
        number
    );
    let included = entries(&history, "include");
    assert_eq!(included.len(), 1);
    assert_eq!(included[0]["resourceType"], "Organization");
    // Reading the history was recorded, and notified nobody.
    cpis_agent::sync::sync_once(&agent, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(env.mailbox(LEICS).await.len(), 2);
    let history_event = history["id"].as_str().unwrap().parse().unwrap();
    assert!(
        env.handle
            .store()
            .stored_event(history_event)
            .await
            .unwrap()
            .is_some()
    );
    // A _include other than the guide's is refused.
    let a = get(
        &base,
        &format!(
            "/cpis/FHIR/R4/AuditEvent?patient:identifier={NHS}%7C{number}&_include=CareTeam:subject"
        ),
        &[],
    )
    .await;
    assert_eq!(a.status, 400);

    let report = validate(&[("audit-events", &history), ("bad-include", &a.body)]);
    assert!(report.is_ok(), "{report:?}");
    api.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_token_gates_fhir_and_a_national_access_token_is_not_ours_to_judge() {
    use cpis_agent::api::ApiOptions;
    use cpis_agent::local_token::{LocalAuth, LocalToken};
    let dir = tempfile::tempdir().unwrap();
    let data = fixture(62, 50);
    let feed = Feed::new(data.region.clone());
    let (agent, _clock) = new_agent(dir.path(), &feed);
    install(&agent, &feed, &data, 2, t0());
    let agent = Arc::new(agent);
    let token = LocalToken::load_or_create(dir.path()).unwrap();
    let wrong = LocalToken::generate();
    let query = care_team(&data.flags[0].nhs_number.to_string());
    let national = "Bearer Z2NVIitD7bQOzsoCpO3P";
    let local = format!("Bearer {}", token.as_str());
    let wrong = format!("Bearer {}", wrong.as_str());
    let mut docs = Vec::new();
    for (auth, cases) in [
        (
            LocalAuth::Required(token.clone()),
            vec![
                (None, 401),
                (Some(national), 401),
                (Some(local.as_str()), 200),
            ],
        ),
        (
            LocalAuth::Checked(token.clone()),
            vec![
                (None, 200),
                (Some(national), 200),
                (Some(wrong.as_str()), 401),
                (Some(local.as_str()), 200),
            ],
        ),
    ] {
        let required = matches!(auth, LocalAuth::Required(_));
        let api = LocalApi::bind_with(
            agent.clone(),
            "127.0.0.1:0".parse().unwrap(),
            ApiOptions {
                auth,
                ..ApiOptions::default()
            },
        )
        .await
        .unwrap();
        let base = format!("http://{}", api.local_addr());
        for (header, status) in cases {
            let headers: Vec<(&str, &str)> = header
                .map(|h| vec![("Authorization", h)])
                .unwrap_or_default();
            let a = get(&base, &query, &headers).await;
            assert_eq!(
                a.status, status,
                "required {required}, {header:?}: {}",
                a.body
            );
            assert_eq!(a.content_type, "application/fhir+json");
            if status == 401 {
                assert_eq!(issue_codes(&a.body), vec!["error/login/"]);
                docs.push(a.body);
            }
        }
        api.shutdown().await.unwrap();
    }
    let refs: Vec<(&str, &Value)> = docs.iter().map(|d| ("unauthorised", d)).collect();
    validate(&refs).unwrap_or_else(|r| panic!("invalid FHIR:\n{r}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_run_a_fhir_miss_is_checked_nationally_as_a_v1_lookup_is() {
    let mut env = Env::start(Utc::now()).await;
    with_another_region(&mut env).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = Arc::new(env.enrol_agent(&env.base, dir.path()).await);
    let svc = run_quick(agent.clone()).await;
    let base = format!("http://{}", svc.local_addr());
    // Not in this tablet's region (EM): the national check finds Lancashire's flag, and the
    // CareTeam is Lancashire's, stated as checked nationally.
    let a = get(
        &base,
        &care_team(&nhs(7).to_string()),
        &[("TraceID", "INC-FHIR")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let teams = entries(&a.body, "match");
    assert_eq!(teams.len(), 1, "{}", a.body);
    assert_eq!(teams[0]["category"][0]["coding"][0]["code"], "LAC");
    assert_eq!(
        teams[0]["managingOrganization"][0]["identifier"]["value"],
        LANCS
    );
    let outcome = entries(&a.body, "outcome")[0].clone();
    let said = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(said.contains("Checked nationally at"), "{said}");
    assert!(said.contains(": flagged."), "{said}");
    // The notice reaches Lancashire once, with the TraceID as the incident reference.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.outbox_counts().unwrap().0 > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox did not drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notices = env.mailbox(LANCS).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].incident_ref.as_deref(), Some("INC-FHIR"));
    validate(&[("national", &a.body)]).unwrap_or_else(|r| panic!("invalid FHIR:\n{r}"));
    svc.shutdown().await.unwrap();
}
