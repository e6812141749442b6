//! The national CP-IS FHIR R4 interface, served offline on the local listener under
//! [`BASE`], so an ePR built for the national API works by changing only its base URL:
//!
//! * `GET {BASE}/CareTeam?patient:identifier=https://fhir.nhs.uk/Id/nhs-number|N` — the same
//!   recorded lookup as `POST /v1/lookups` ([`crate::api::recorded_lookup_as`]): the access
//!   event is committed before the answer; `IsUnscheduledAccessEvent: false` records it for
//!   the audit trail without a council notice; `TraceID` is the incident reference.
//! * `GET {BASE}/AuditEvent?patient:identifier=...[&_include=...]` — the subject's recent
//!   unscheduled-care contacts the tablet holds. Reading a child's access history is itself
//!   recorded (never notified: the CareTeam search of the same encounter notifies).
//! * `GET {BASE}/metadata` — the CapabilityStatement of exactly this.
//!
//! Honesty for ePRs that read only the entries: an empty searchset is answered only for a
//! (fresh or stale) `not_flagged`, with `meta.lastUpdated` = the data's as-of time and an
//! `OperationOutcome` entry (`search.mode = outcome`) naming the region, the councils covered
//! and the freshness; every warning of the answer (stale data, national check unavailable…)
//! is a `warning` issue. An `unknown` answer is never a searchset: `503` `OperationOutcome`.
//! Errors are `OperationOutcome`s with the guide's codes (`INVALID_SEARCH_DATA`,
//! `PRECONDITION_FAILED`), `application/fhir+json`. The mapping is in agent/README.md.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use cpis_protocol::local::{FlagView, LookupRequest, LookupResponse};
use cpis_protocol::{CareSetting, Freshness, LookupResult, PlanType, RecentContact};

use crate::api::{HttpError, Shared, recorded_lookup_as};

/// Where the interface is served on the local listener.
pub const BASE: &str = "/cpis/FHIR/R4";
/// The media type of every answer.
pub const FHIR_JSON: &str = "application/fhir+json";
/// NHS number identifiers.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// ODS codes of organisations (councils, ambulance trusts).
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// The plan types, where the guide names no coding of its own (documented in the README).
pub const PLAN_TYPE_SYSTEM: &str = "https://cpis-edge.example.invalid/fhir/CodeSystem/plan-type";
/// The care settings of recent contacts (likewise ours).
pub const CARE_SETTING_SYSTEM: &str =
    "https://cpis-edge.example.invalid/fhir/CodeSystem/care-setting";
/// The NHS's error and warning codes in `OperationOutcome.issue.details`.
const SPINE_ERROR_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/Spine-ErrorOrWarningCode";
/// The `_include` of the guide's AuditEvent search.
pub const AUDIT_INCLUDE: &str =
    "AuditEvent:entity-type=http://terminology.hl7.org/CodeSystem/v3-RoleClass|ASSIGNED";
const MAX_TRACE_ID: usize = cpis_protocol::ingest::MAX_TEXT_CHARS;

/// The FHIR routes (guarded with the rest of the local API by the caller).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(&format!("{BASE}/metadata"), get(metadata))
        .route(&format!("{BASE}/CareTeam"), get(care_team))
        .route(&format!("{BASE}/AuditEvent"), get(audit_event))
        .route(&format!("{BASE}/{{*rest}}"), get(not_supported))
}

/// A FHIR answer: the resource as `application/fhir+json`.
fn fhir(status: StatusCode, resource: Value) -> Response {
    let mut resp = (status, resource.to_string()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp
}

/// A failure as an `OperationOutcome`.
#[derive(Debug)]
pub(crate) struct Outcome {
    status: StatusCode,
    /// FHIR issue type (`invalid`, `incomplete`, …).
    code: &'static str,
    /// The guide's detail code, where it has one.
    detail: Option<(&'static str, &'static str)>,
    diagnostics: String,
}

impl Outcome {
    fn invalid_search(diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            detail: Some(("INVALID_SEARCH_DATA", "Invalid search data")),
            diagnostics: diagnostics.into(),
        }
    }

    fn precondition(diagnostics: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            detail: Some(("PRECONDITION_FAILED", "Missing or invalid header parameter")),
            diagnostics: diagnostics.into(),
        }
    }

    /// An error of the local API (or of its guard) in FHIR's shape, keeping its status.
    pub(crate) fn from_http(e: &HttpError) -> Self {
        let body = e.body();
        let (code, detail) = match (e.status(), body.error.code.as_str()) {
            (StatusCode::BAD_REQUEST, _) => (
                "invalid",
                Some(("INVALID_SEARCH_DATA", "Invalid NHS number")),
            ),
            (StatusCode::UNAUTHORIZED, _) => ("login", None),
            (StatusCode::FORBIDDEN, _) => ("forbidden", Some(("ACCESS_DENIED", "Access denied"))),
            (StatusCode::SERVICE_UNAVAILABLE, "not_enrolled") => ("processing", None),
            (StatusCode::SERVICE_UNAVAILABLE, _) => ("transient", None),
            _ => ("exception", None),
        };
        Self {
            status: e.status(),
            code,
            detail,
            diagnostics: format!("{}: {}", body.error.code, body.error.message),
        }
    }

    pub(crate) fn resource(&self) -> Value {
        let mut issue = json!({
            "severity": "error",
            "code": self.code,
            "diagnostics": self.diagnostics,
        });
        if let Some((code, display)) = self.detail {
            issue["details"] = json!({
                "coding": [{"system": SPINE_ERROR_SYSTEM, "code": code, "display": display}]
            });
        }
        json!({"resourceType": "OperationOutcome", "issue": [issue]})
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        fhir(self.status, self.resource())
    }
}

impl From<HttpError> for Outcome {
    fn from(e: HttpError) -> Self {
        Outcome::from_http(&e)
    }
}

/// What every search takes: the patient and the headers.
#[derive(Debug)]
struct Search {
    nhs_number: String,
    unscheduled: bool,
    trace_id: Option<String>,
    include: bool,
}

/// Reads `patient:identifier` (the `|` raw or percent-encoded; the NHS number in any of the
/// three forms), `_include` where `include` names the one accepted, `_format` (JSON only),
/// and the headers. Any other parameter is refused: an ePR must not believe a filter was
/// applied.
fn search(
    query: Option<&str>,
    headers: &HeaderMap,
    include: Option<&str>,
) -> Result<Search, Outcome> {
    let mut patient: Option<String> = None;
    let mut included = false;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "patient:identifier" => {
                if patient.is_some() {
                    return Err(Outcome::invalid_search(
                        "patient:identifier is given more than once",
                    ));
                }
                let Some((system, number)) = value.split_once('|') else {
                    return Err(Outcome::invalid_search(format!(
                        "patient:identifier must be {NHS_NUMBER_SYSTEM}|<NHS number>, got {value:?}"
                    )));
                };
                if system != NHS_NUMBER_SYSTEM {
                    return Err(Outcome::invalid_search(format!(
                        "patient:identifier must use the system {NHS_NUMBER_SYSTEM}, got {system:?}"
                    )));
                }
                patient = Some(number.to_owned());
            }
            "_include" if include.is_some_and(|i| i == value) => included = true,
            "_include" => {
                return Err(Outcome::invalid_search(format!(
                    "_include {value:?} is not supported{}",
                    include.map_or_else(String::new, |i| format!(" (only {i})"))
                )));
            }
            "_format" if matches!(value.as_ref(), "json" | FHIR_JSON | "application/json") => {}
            "_format" => {
                return Err(Outcome::invalid_search(format!(
                    "_format {value:?} is not supported: JSON only"
                )));
            }
            other => {
                return Err(Outcome::invalid_search(format!(
                    "unknown search parameter {other:?}: this endpoint takes patient:identifier{}",
                    if include.is_some() {
                        " and _include"
                    } else {
                        ""
                    }
                )));
            }
        }
    }
    let nhs_number = patient.ok_or_else(|| {
        Outcome::invalid_search(format!(
            "patient:identifier is required: {NHS_NUMBER_SYSTEM}|<NHS number>"
        ))
    })?;
    let text = |name: &str| -> Result<Option<String>, Outcome> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().to_owned()))
                .map_err(|_| Outcome::precondition(format!("{name} is not readable text"))),
        }
    };
    let unscheduled = match text("IsUnscheduledAccessEvent")?.as_deref() {
        // Ambulance care is unscheduled.
        None => true,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(Outcome::precondition(format!(
                "IsUnscheduledAccessEvent must be true or false, got {v:?}"
            )));
        }
    };
    let trace_id = text("TraceID")?.filter(|t| !t.is_empty());
    if trace_id
        .as_ref()
        .is_some_and(|t| t.chars().count() > MAX_TRACE_ID)
    {
        return Err(Outcome::precondition(format!(
            "TraceID is longer than {MAX_TRACE_ID} characters"
        )));
    }
    Ok(Search {
        nhs_number,
        unscheduled,
        trace_id,
        include: included,
    })
}

fn instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The recorded lookup behind a search; `unknown` becomes a `503`, never a searchset.
async fn lookup(s: &Shared, q: &Search, unscheduled: bool) -> Result<LookupResponse, Outcome> {
    let req = LookupRequest {
        nhs_number: q.nhs_number.clone(),
        staff_id: None,
        incident_ref: q.trace_id.clone(),
    };
    let resp = recorded_lookup_as(s, req, unscheduled).await?;
    if resp.result == LookupResult::Unknown {
        let why: Vec<&str> = resp.warnings.iter().map(|w| w.message.as_str()).collect();
        return Err(Outcome {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "incomplete",
            detail: None,
            diagnostics: format!(
                "the tablet cannot answer for this patient now (result unknown): {}. This is \
                 not a \"no record\" answer; ask the national service or the council. The \
                 access was recorded (event {})",
                if why.is_empty() {
                    "no usable data".to_owned()
                } else {
                    why.join("; ").trim_end_matches('.').to_owned()
                },
                resp.event_id
            ),
        });
    }
    Ok(resp)
}

/// The `search.mode = outcome` entry: what the answer covered, and its warnings.
fn coverage_outcome(resp: &LookupResponse) -> Value {
    let councils: Vec<String> = resp
        .coverage
        .councils
        .iter()
        .map(|c| format!("{} ({})", c.name, c.ods))
        .collect();
    let freshness = match resp.freshness {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "STALE",
        Freshness::Expired => "EXPIRED",
    };
    let national = match &resp.national {
        Some(n) => format!(
            " Checked nationally at {} ({} councils): {}.",
            instant(n.checked_at),
            n.councils_covered,
            n.result.as_str()
        ),
        None => " Not checked nationally (the server was not reached or not asked).".to_owned(),
    };
    let mut issues = vec![json!({
        "severity": "information",
        "code": "informational",
        "diagnostics": format!(
            "Answered offline by the tablet from region {} data as of {} ({freshness}); it covers \
             {} council(s): {}.{national} Access recorded as event {}.",
            resp.coverage.region,
            resp.data_as_of.map_or_else(|| "never".to_owned(), instant),
            councils.len(),
            councils.join(", "),
            resp.event_id
        ),
    })];
    for w in &resp.warnings {
        issues.push(json!({
            "severity": "warning",
            "code": "informational",
            "details": {"text": w.code},
            "diagnostics": w.message,
        }));
    }
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

/// A searchset of `matches` (full URL, resource), `included` resources and the outcome.
fn searchset(
    resp: &LookupResponse,
    self_url: String,
    matches: Vec<(String, Value)>,
    included: Vec<(String, Value)>,
) -> Value {
    let total = matches.len();
    let mut entries: Vec<Value> = matches
        .into_iter()
        .map(|(full_url, r)| json!({"fullUrl": full_url, "resource": r, "search": {"mode": "match"}}))
        .collect();
    entries.extend(included.into_iter().map(
        |(full_url, r)| json!({"fullUrl": full_url, "resource": r, "search": {"mode": "include"}}),
    ));
    entries.push(json!({
        "fullUrl": format!("urn:uuid:{}", uuid::Uuid::now_v7()),
        "resource": coverage_outcome(resp),
        "search": {"mode": "outcome"},
    }));
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": resp.event_id.to_string(),
        "identifier": {"system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", resp.event_id)},
        "type": "searchset",
        "timestamp": instant(Utc::now()),
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
        "entry": entries,
    });
    if let Some(t) = resp.data_as_of {
        bundle["meta"] = json!({"lastUpdated": instant(t)});
    }
    bundle
}

fn self_url(headers: &HeaderMap, path: &str, query: Option<&str>) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    match query {
        Some(q) if !q.is_empty() => format!("http://{host}{BASE}/{path}?{q}"),
        _ => format!("http://{host}{BASE}/{path}"),
    }
}

fn plan_type_display(p: PlanType) -> &'static str {
    match p {
        PlanType::Cpp => "Child Protection Plan",
        PlanType::Lac => "Looked After Child",
        PlanType::Ucpp => "Unborn Child Protection Plan",
    }
}

fn nhs_reference(nhs: &str) -> Value {
    json!({"identifier": {"system": NHS_NUMBER_SYSTEM, "value": nhs}})
}

/// One flag as a CareTeam: the plan, its period, and the council responsible with its phones
/// (`rank` 1 = the emergency, out-of-hours number; `rank` 2 = the office).
fn care_team_of(nhs: &str, f: &FlagView) -> (String, Value) {
    let id = format!(
        "{}-{}-{}",
        f.plan_type.as_str().to_ascii_lowercase(),
        f.council.ods.as_str().to_ascii_lowercase(),
        f.start_date
    );
    let mut telecom = Vec::new();
    if !f.council.emergency_phone.is_empty() {
        telecom.push(json!({"system": "phone", "value": f.council.emergency_phone, "use": "work", "rank": 1}));
    }
    if let Some(office) = f.council.office_phone.as_deref().filter(|p| !p.is_empty()) {
        telecom.push(json!({"system": "phone", "value": office, "use": "work", "rank": 2}));
    }
    let mut period = json!({"start": f.start_date.to_string()});
    if let Some(end) = f.end_date {
        period["end"] = json!(end.to_string());
    }
    let mut team = json!({
        "resourceType": "CareTeam",
        "id": &id,
        "status": if f.ended { "inactive" } else { "active" },
        "category": [{"coding": [{
            "system": PLAN_TYPE_SYSTEM,
            "code": f.plan_type.as_str(),
            "display": plan_type_display(f.plan_type),
        }]}],
        "name": format!("{} — {}", plan_type_display(f.plan_type), f.council.name),
        "subject": nhs_reference(nhs),
        "period": period,
        "managingOrganization": [{
            "identifier": {"system": ODS_SYSTEM, "value": f.council.ods.as_str()},
            "display": f.council.name,
        }],
    });
    if !telecom.is_empty() {
        team["telecom"] = Value::Array(telecom);
    }
    (format!("urn:cpis-edge:CareTeam:{id}"), team)
}

fn setting_code(s: CareSetting) -> (&'static str, &'static str) {
    match s {
        CareSetting::Ambulance => ("ambulance", "Ambulance service"),
        CareSetting::EmergencyDepartment => ("emergency_department", "Emergency department"),
        CareSetting::UrgentTreatmentCentre => {
            ("urgent_treatment_centre", "Urgent treatment centre")
        }
        CareSetting::Other => ("other", "Other unscheduled care"),
    }
}

/// One recent contact as an AuditEvent: the organisation that saw the child (the `ASSIGNED`
/// agent), the day (contacts are kept by date), the setting.
fn audit_event_of(nhs: &str, i: usize, c: &RecentContact) -> (String, Value) {
    let ods = c.organisation.ods.as_str();
    let id = format!("contact-{}-{}-{i}", c.date, ods.to_ascii_lowercase());
    let (setting, setting_display) = setting_code(c.setting);
    let who = json!({
        "reference": format!("Organization/{ods}"),
        "identifier": {"system": ODS_SYSTEM, "value": ods},
        "display": c.organisation.name,
    });
    let event = json!({
        "resourceType": "AuditEvent",
        "id": id,
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "action": "R",
        "period": {"start": c.date.to_string()},
        "recorded": format!("{}T00:00:00Z", c.date),
        "purposeOfEvent": [{"coding": [{
            "system": CARE_SETTING_SYSTEM,
            "code": setting,
            "display": setting_display,
        }]}],
        "agent": [{
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                "code": "ASSIGNED",
                "display": "assigned entity",
            }]},
            "who": who,
            "requestor": true,
        }],
        "source": {"observer": {
            "identifier": {"system": ODS_SYSTEM, "value": ods},
            "display": c.organisation.name,
        }},
        "entity": [{
            "what": nhs_reference(nhs),
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "1",
                "display": "Person",
            },
        }],
    });
    (format!("urn:cpis-edge:AuditEvent:{id}"), event)
}

fn organisation(ods: &str, name: &str) -> (String, Value) {
    (
        format!("urn:cpis-edge:Organization:{ods}"),
        json!({
            "resourceType": "Organization",
            "id": ods,
            "identifier": [{"system": ODS_SYSTEM, "value": ods}],
            "name": name,
        }),
    )
}

/// `GET {BASE}/CareTeam`.
async fn care_team(
    State(s): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Outcome> {
    let q = search(query.as_deref(), &headers, None)?;
    let resp = lookup(&s, &q, q.unscheduled).await?;
    if resp.result == LookupResult::Flagged && resp.flags.is_empty() {
        // Never an empty searchset for a flagged child (it would read as "no record").
        return Err(Outcome {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "incomplete",
            detail: None,
            diagnostics: format!(
                "the patient is flagged but the plan details are not available on the tablet; \
                 ask the national service or the council. The access was recorded (event {})",
                resp.event_id
            ),
        });
    }
    let nhs = resp.nhs_number.clone();
    let matches = resp.flags.iter().map(|f| care_team_of(&nhs, f)).collect();
    let url = self_url(&headers, "CareTeam", query.as_deref());
    Ok(fhir(
        StatusCode::OK,
        searchset(&resp, url, matches, Vec::new()),
    ))
}

/// `GET {BASE}/AuditEvent`: recorded for the audit trail, never a council notice.
async fn audit_event(
    State(s): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Outcome> {
    let q = search(query.as_deref(), &headers, Some(AUDIT_INCLUDE))?;
    let resp = lookup(&s, &q, false).await?;
    let nhs = resp.nhs_number.clone();
    let matches = resp
        .recent_contacts
        .iter()
        .enumerate()
        .map(|(i, c)| audit_event_of(&nhs, i, c))
        .collect();
    let included = if q.include {
        let orgs: BTreeMap<&str, &str> = resp
            .recent_contacts
            .iter()
            .map(|c| (c.organisation.ods.as_str(), c.organisation.name.as_str()))
            .collect();
        orgs.into_iter()
            .map(|(ods, name)| organisation(ods, name))
            .collect()
    } else {
        Vec::new()
    };
    let url = self_url(&headers, "AuditEvent", query.as_deref());
    Ok(fhir(
        StatusCode::OK,
        searchset(&resp, url, matches, included),
    ))
}

/// `GET {BASE}/metadata`: what is served, exactly.
async fn metadata(headers: HeaderMap) -> Response {
    fhir(
        StatusCode::OK,
        capability_statement(&self_url(&headers, "", None)),
    )
}

/// The CapabilityStatement of this interface.
pub fn capability_statement(base_url: &str) -> Value {
    let patient = |resource: &str| {
        json!({
            "name": "patient",
            "type": "reference",
            "documentation": format!(
                "Required, with the :identifier modifier only: patient:identifier=\
                 {NHS_NUMBER_SYSTEM}|<NHS number> (the | raw or as %7C). The {resource} search \
                 is recorded as an access before it is answered."
            ),
        })
    };
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-06",
        "publisher": "CP-IS Edge",
        "kind": "instance",
        "software": {"name": "cpis-agent", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "CP-IS Edge tablet agent: the CP-IS FHIR R4 interface, answered \
                            offline from the tablet's encrypted copy of its region's flags",
            "url": base_url.trim_end_matches('/'),
        },
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "rest": [{
            "mode": "server",
            "documentation": "Headers: IsUnscheduledAccessEvent (true, the default: a flagged \
                              answer notifies the council; false: recorded, not notified), \
                              TraceID (kept as the incident reference), Authorization (the \
                              local API token when the agent requires one).",
            "resource": [
                {
                    "type": "CareTeam",
                    "interaction": [{"code": "search-type"}],
                    "searchParam": [patient("CareTeam")],
                },
                {
                    "type": "AuditEvent",
                    "interaction": [{"code": "search-type"}],
                    "searchInclude": [AUDIT_INCLUDE],
                    "searchParam": [patient("AuditEvent")],
                },
            ],
        }],
    })
}

/// Any other path under the base.
async fn not_supported(axum::extract::Path(rest): axum::extract::Path<String>) -> Outcome {
    Outcome {
        status: StatusCode::NOT_FOUND,
        code: "not-supported",
        detail: None,
        diagnostics: format!(
            "{BASE}/{rest} is not served: this interface serves {BASE}/CareTeam, \
             {BASE}/AuditEvent and {BASE}/metadata (GET)"
        ),
    }
}
