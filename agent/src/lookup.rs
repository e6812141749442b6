//! Lookups and status: NHS number → keyed hash → sealed row → tri-state answer with
//! freshness, coverage and warnings; the access event is committed to the outbox (fsync)
//! before the answer is returned.
//!
//! Result rule: any flag held for the number (live, or ended within the 12-month retention)
//! makes the result `flagged` — a match is always shown, with its dates (ended flags carry
//! their end date and `ended: true`) and the data's as-of date, whatever the freshness.
//! Without a match the result is `not_flagged` only while the data is fresh or stale; with
//! expired data, or no data at all, it is `unknown`.

use chrono::{DateTime, Utc};

use cpis_protocol::local::{
    CouncilContact, Coverage, CoveredCouncil, FlagView, LookupResponse, StatusResponse, Warning,
};
use cpis_protocol::{
    AccessEvent, CareSetting, EventId, Freshness, LookupResult, NhsNumber, retained_until,
};

use crate::agent::{Agent, AgentError, lock};
use crate::freshness::{Readings, Verified, clock_offset, judge, true_now};
use crate::store::DataState;

/// Outbox size above which every answer warns that events are not getting through.
pub const OUTBOX_BACKLOG_WARNING: u64 = 100;

/// How far (seconds) the tablet clock may be from the best estimate of the true time before
/// answers warn `clock_ahead` or `clock_behind`.
const CLOCK_WARNING_SECS: i64 = 600;

/// A lookup as asked.
#[derive(Debug, Clone, Default)]
pub struct LookupInput<'a> {
    /// Any of the three accepted forms.
    pub nhs_number: &'a str,
    pub staff_id: Option<String>,
    pub incident_ref: Option<String>,
}

fn warn(code: &str, message: String) -> Warning {
    Warning {
        code: code.into(),
        message,
    }
}

/// An age in words: minutes, hours or days.
pub(crate) fn human_age(secs: u64) -> String {
    if secs < 2 * 3600 {
        format!("{} minutes", secs / 60)
    } else if secs < 3 * 86400 {
        format!("{} hours", secs / 3600)
    } else {
        format!("{} days", secs / 86400)
    }
}

/// A clock offset in words, to the nearest minute first (readings of two clocks a few
/// milliseconds apart should not turn "30 days" into "29 days").
pub(crate) fn human_offset(secs: u64) -> String {
    human_age(secs.saturating_add(30) / 60 * 60)
}

/// Freshness, age and warnings about the data.
fn assess(
    st: &DataState,
    now: DateTime<Utc>,
    boot: Option<&crate::clock::BootStamp>,
    high_water: Option<DateTime<Utc>>,
) -> (Freshness, Option<u64>, Vec<Warning>) {
    let mut warnings = Vec::new();
    if let Some(why) = &st.damaged {
        warnings.push(warn(
            "store_damaged",
            format!(
                "The flag data on this tablet is damaged ({why}): a miss cannot be relied on. \
                 The next sync installs a full copy."
            ),
        ));
    }
    // How far the wall clock is from the true time (known only when the boot clock measured
    // the time since the last verification).
    let offset = clock_offset(
        st.data_as_of,
        st.verified_local,
        st.verified_boot.as_ref(),
        now,
        boot,
    )
    .map_or(0, |d| d.num_seconds());
    let clock_ahead = (offset > CLOCK_WARNING_SECS).then(|| {
        warn(
            "clock_ahead",
            format!(
                "The tablet clock is {} ahead; check the tablet's date and time.",
                human_offset(offset.unsigned_abs())
            ),
        )
    });
    let (Some(as_of), Some(_)) = (st.data_as_of, st.data) else {
        warnings.push(warn(
            "no_data",
            "No flag data is installed on this tablet: a miss cannot be relied on. \
             Sync when a connection is available."
                .into(),
        ));
        warnings.extend(clock_ahead);
        return (Freshness::Expired, None, warnings);
    };
    let v = Verified {
        as_of,
        verified_local: st.verified_local,
        verified_boot: st.verified_boot.as_ref(),
    };
    let r = Readings {
        now,
        boot,
        high_water,
    };
    let (freshness, age) = judge(&st.policy, &v, &r);
    match freshness {
        Freshness::Fresh => {}
        Freshness::Stale => warnings.push(warn(
            "data_stale",
            format!(
                "Data is {} old (fresh for {}): it may miss recent plans. Sync when possible.",
                human_age(age),
                human_age(st.policy.fresh_secs)
            ),
        )),
        Freshness::Expired => warnings.push(warn(
            "data_expired",
            format!(
                "Data is {} old, past the {} limit: a miss cannot be relied on \
                 (result unknown). Sync as soon as possible.",
                human_age(age),
                human_age(st.policy.expiry_secs)
            ),
        )),
    }
    if now + chrono::Duration::seconds(CLOCK_WARNING_SECS) < as_of || offset < -CLOCK_WARNING_SECS {
        warnings.push(warn(
            "clock_behind",
            "The tablet clock is behind the server's time; check the tablet's date and time."
                .into(),
        ));
    }
    warnings.extend(clock_ahead);
    (freshness, Some(age), warnings)
}

fn outbox_warnings(warnings: &mut Vec<Warning>, pending: u64, aside: u64) {
    if pending >= OUTBOX_BACKLOG_WARNING {
        warnings.push(warn(
            "outbox_backlog",
            format!("{pending} access records are waiting to be sent to the server."),
        ));
    }
    if aside > 0 {
        warnings.push(warn(
            "outbox_set_aside",
            format!(
                "{aside} access records were refused by the server and are kept aside on this \
                 tablet; tell trust IT."
            ),
        ));
    }
}

fn coverage(st: &DataState) -> Coverage {
    Coverage {
        region: st.region.clone(),
        councils: st
            .councils
            .iter()
            .map(|c| CoveredCouncil {
                ods: c.code.clone(),
                name: c.name.clone(),
            })
            .collect(),
    }
}

impl Agent {
    /// Answers a lookup and records its access event durably before returning.
    pub fn lookup(&self, input: LookupInput<'_>) -> Result<LookupResponse, AgentError> {
        Ok(self.lookup_recorded(input)?.0)
    }

    /// [`Agent::lookup`], also returning the access event exactly as it was committed to the
    /// outbox (for the online national check, which must send the same event).
    pub fn lookup_recorded(
        &self,
        input: LookupInput<'_>,
    ) -> Result<(LookupResponse, AccessEvent), AgentError> {
        self.lookup_recorded_as(input, true)
    }

    /// [`Agent::lookup_recorded`] for unscheduled care (`unscheduled`: a flagged answer
    /// notifies the councils) or scheduled care (recorded, no council notice).
    pub fn lookup_recorded_as(
        &self,
        input: LookupInput<'_>,
        unscheduled: bool,
    ) -> Result<(LookupResponse, AccessEvent), AgentError> {
        let nhs: NhsNumber = input.nhs_number.parse()?;
        self.check_live()?;
        self.shred_if_too_old()?;
        let enrolment = self.enrolment();
        let key = self.keys.subject_key(nhs);
        let now = self.clock.now();
        let boot = self.clock.boot();
        let (st, row, recent_contacts) = {
            let db = lock(&self.flags);
            let st = self.state_in(&db)?;
            let read = db.subject(&self.keys, &key, st.generation).and_then(|row| {
                let contacts = if row.is_some() {
                    db.contacts(&self.keys, &key, st.generation)?
                } else {
                    Vec::new()
                };
                Ok((row, contacts))
            });
            match read {
                Ok((row, contacts)) => (st, row, contacts),
                // A row that does not open was put there from another copy of the store.
                Err(crate::store::StoreError::Key(_)) => {
                    let st = self.mark_damaged(&db, "a sealed row does not open".into())?;
                    (st, None, Vec::new())
                }
                Err(e) => return Err(e.into()),
            }
        };
        if let (Some((ver, _)), Some((_, held))) = (&row, st.data)
            && *ver > held
        {
            {
                return Err(AgentError::Store(crate::store::StoreError::Corrupt(
                    format!("a row is at version {ver}, beyond the installed version {held}"),
                )));
            }
        }
        let mut outbox = lock(&self.outbox);
        let high_water = outbox.high_water(&self.keys)?;
        let (freshness, age, mut warnings) = assess(&st, now, boot.as_ref(), high_water);
        let today = now.date_naive();
        let mut flags: Vec<FlagView> = row
            .map(|r| r.1)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.end_date.is_none_or(|end| retained_until(end) >= today))
            .map(|f| {
                let council = st
                    .councils
                    .iter()
                    .find(|c| c.code == f.council)
                    .map_or_else(
                        || CouncilContact {
                            ods: f.council.clone(),
                            name: format!("council {}", f.council),
                            emergency_phone: String::new(),
                            office_phone: None,
                        },
                        |c| CouncilContact {
                            ods: c.code.clone(),
                            name: c.name.clone(),
                            emergency_phone: c.emergency_phone.clone(),
                            office_phone: c.office_phone.clone(),
                        },
                    );
                FlagView {
                    plan_type: f.plan_type,
                    start_date: f.start_date,
                    end_date: f.end_date,
                    ended: f.is_ended(today),
                    council,
                }
            })
            .collect();
        // Live flags first, then the most recent.
        flags.sort_by(|a, b| a.ended.cmp(&b.ended).then(b.start_date.cmp(&a.start_date)));
        // A damaged store cannot vouch for a miss (a deleted row reads as one); a flag it
        // still holds is real (its seal authenticates it) and is shown.
        let result = if !flags.is_empty() {
            LookupResult::Flagged
        } else if freshness == Freshness::Expired || st.damaged.is_some() {
            LookupResult::Unknown
        } else {
            LookupResult::NotFlagged
        };
        let mut plan_types: Vec<_> = flags.iter().map(|f| f.plan_type).collect();
        plan_types.sort();
        plan_types.dedup();
        let mut councils: Vec<_> = flags.iter().map(|f| f.council.ods.clone()).collect();
        councils.sort();
        councils.dedup();
        let event = AccessEvent {
            event_id: EventId::new(),
            accessed_at: now,
            trust: enrolment.trust.clone(),
            device: enrolment.device_id,
            staff_id: input.staff_id,
            nhs_number: nhs,
            result,
            plan_types,
            councils,
            data_as_of: st.data_as_of,
            freshness,
            setting: CareSetting::Ambulance,
            incident_ref: input.incident_ref,
            unscheduled,
        };
        // The high-water mark records the best estimate of the true time, not a wall clock
        // that may have been moved within this boot.
        let estimate = true_now(
            st.verified_local,
            st.verified_boot.as_ref(),
            now,
            boot.as_ref(),
        );
        let hw = high_water.map_or(estimate, |h| h.max(estimate));
        outbox.append(&self.keys, &event, hw)?;
        let pending = outbox.pending_count()?;
        let aside = outbox.set_aside_count()?;
        drop(outbox);
        outbox_warnings(&mut warnings, pending, aside);
        let response = LookupResponse {
            nhs_number: nhs.to_string(),
            result,
            flags,
            freshness,
            data_as_of: st.data_as_of,
            data_age_secs: age,
            region: st.region.clone(),
            coverage: coverage(&st),
            warnings,
            event_id: event.event_id,
            recent_contacts,
            national: None,
        };
        Ok((response, event))
    }

    /// The device's status. Also shreds the flags by itself when no checkpoint has been
    /// verified for the policy's wipe age (DESIGN.md §2 rule 6).
    pub fn status(&self) -> Result<StatusResponse, AgentError> {
        self.check_live()?;
        self.shred_if_too_old()?;
        let enrolment = self.enrolment();
        let now = self.clock.now();
        let (st, subjects) = {
            let db = lock(&self.flags);
            (self.state_in(&db)?, db.subject_count()?)
        };
        let (high_water, pending, aside) = {
            let outbox = lock(&self.outbox);
            (
                outbox.high_water(&self.keys)?,
                outbox.pending_count()?,
                outbox.set_aside_count()?,
            )
        };
        let (freshness, age, mut warnings) =
            assess(&st, now, self.clock.boot().as_ref(), high_water);
        outbox_warnings(&mut warnings, pending, aside);
        let cov = coverage(&st);
        Ok(StatusResponse {
            device: enrolment.device_id,
            trust: enrolment.trust.clone(),
            region: st.region.clone(),
            server: enrolment.server.clone(),
            epoch: st.data.map(|d| d.0),
            version: st.data.map(|d| d.1),
            data_as_of: st.data_as_of,
            data_age_secs: age,
            freshness,
            policy: st.policy,
            subjects,
            councils: cov.councils,
            last_sync_attempt: st.last_sync_attempt,
            last_sync_success: st.last_sync_success,
            last_sync_error: st.last_sync_error.clone(),
            outbox_pending: pending,
            outbox_set_aside: aside,
            consecutive_failures: st.consecutive_failures,
            next_sync_at: st.next_sync_at,
            client_cert_expires_at: enrolment.client_cert_expires_at,
            key_protection: self.key_protection(),
            warnings,
        })
    }

    /// Access events waiting to be sent, and set aside (refused by the server for good).
    pub fn outbox_counts(&self) -> Result<(u64, u64), AgentError> {
        let outbox = lock(&self.outbox);
        Ok((outbox.pending_count()?, outbox.set_aside_count()?))
    }

    /// Unsent access events, oldest first (sealed in the outbox until the server stores them).
    pub fn pending_events(&self, limit: usize) -> Result<Vec<AccessEvent>, AgentError> {
        Ok(lock(&self.outbox)
            .pending(&self.keys, limit)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// Deletes the flags when the data is older than the wipe age. Returns whether it did.
    pub fn shred_if_too_old(&self) -> Result<bool, AgentError> {
        let now = self.clock.now();
        let high_water = lock(&self.outbox).high_water(&self.keys)?;
        let mut db = lock(&self.flags);
        let st = self.state_in(&db)?;
        let (Some(as_of), Some(_)) = (st.data_as_of, st.data) else {
            return Ok(false);
        };
        let v = Verified {
            as_of,
            verified_local: st.verified_local,
            verified_boot: st.verified_boot.as_ref(),
        };
        let boot = self.clock.boot();
        let r = Readings {
            now,
            boot: boot.as_ref(),
            high_water,
        };
        let age = crate::freshness::data_age(&v, &r);
        if u64::try_from(age.num_seconds()).unwrap_or(0) <= st.policy.wipe_secs {
            return Ok(false);
        }
        // The outbox is kept: its notices are still delivered at the next contact.
        self.drop_flags_in(&mut db)?;
        Ok(true)
    }
}
