//! Online confirmation of a regional miss (DESIGN.md §4): the lookup's access event is first
//! committed to the outbox as for any lookup, then the SAME event is sent to
//! `POST /v1/device/confirm` with a short bound on the whole exchange. A national answer
//! within the bound replaces the regional result (a flag found in another region is shown as
//! flagged, with its councils and recent contacts, and a note that the national check found
//! it; a national miss says it covered every council). Without an answer in time the
//! regional answer stands, with a warning naming its coverage. The event stays in the outbox
//! either way and is uploaded as usual (the server de-duplicates by id).

use std::time::Duration;

use cpis_protocol::confirm::ConfirmResponse;
use cpis_protocol::local::{LookupResponse, NationalCheck, Warning};
use cpis_protocol::{AccessEvent, LookupResult};

use crate::agent::Agent;

/// Default bound on the whole national check.
pub const DEFAULT_BOUND: Duration = Duration::from_millis(1500);

/// How the national check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Not asked: the regional answer was already a match.
    NotNeeded,
    /// The server answered within the bound.
    Answered,
    /// No answer within the bound (timeout, network, server error).
    NoAnswer,
}

/// Confirms a regional miss nationally within `bound`; returns the answer to show.
pub async fn confirm_miss(
    agent: &Agent,
    mut local: LookupResponse,
    event: &AccessEvent,
    bound: Duration,
) -> (LookupResponse, Checked) {
    if local.result == LookupResult::Flagged {
        return (local, Checked::NotNeeded);
    }
    let ask = async {
        let client = crate::sync::device_client(agent)?;
        Ok::<_, crate::AgentError>(client.confirm(event).await?)
    };
    match tokio::time::timeout(bound, ask).await {
        Ok(Ok(answer)) if answer.event_id == event.event_id => {
            merge(&mut local, answer);
            (local, Checked::Answered)
        }
        other => {
            let why = match other {
                Err(_) => format!("did not answer within {:.1} s", bound.as_secs_f64()),
                Ok(Err(e)) => format!("could not be reached ({e})"),
                Ok(Ok(_)) => "answered for another event".into(),
            };
            tracing::info!("national check: {why}");
            let councils: Vec<String> = local
                .coverage
                .councils
                .iter()
                .map(|c| format!("{} ({})", c.name, c.ods))
                .collect();
            local.warnings.push(Warning {
                code: "national_check_unavailable".into(),
                message: format!(
                    "The national check {why}: this answer covers region {} only: {}.",
                    local.coverage.region,
                    if councils.is_empty() {
                        "no councils".into()
                    } else {
                        councils.join(", ")
                    }
                ),
            });
            (local, Checked::NoAnswer)
        }
    }
}

fn merge(local: &mut LookupResponse, n: ConfirmResponse) {
    let when = n.checked_at.format("%Y-%m-%d %H:%M UTC");
    match n.result {
        LookupResult::Flagged => {
            local.result = LookupResult::Flagged;
            local.flags = n.flags;
            local.recent_contacts = n.recent_contacts;
            local.warnings.push(Warning {
                code: "national_match".into(),
                message: format!(
                    "Not in this tablet's regional data: FLAGGED by the national check of {} \
                     councils at {when}. Call the council shown.",
                    n.councils_covered
                ),
            });
        }
        _ => {
            local.result = LookupResult::NotFlagged;
            local.warnings.push(Warning {
                code: "national_miss".into(),
                message: format!(
                    "The national check of {} councils at {when} found no flag either.",
                    n.councils_covered
                ),
            });
        }
    }
    local.national = Some(NationalCheck {
        result: local.result,
        checked_at: n.checked_at,
        councils_covered: n.councils_covered,
    });
}
