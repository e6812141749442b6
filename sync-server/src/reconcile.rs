//! Reconciliation: the difference between a council's current flags and its new full list.
//!
//! Pure logic, no IO: store backends call [`diff`] inside their write transaction.

use std::collections::BTreeMap;

use cpis_protocol::api::UploadCounts;
use cpis_protocol::{Change, FlagKey, FlagRecord};

/// What happened to one flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Updated,
    /// Updated from open to ended.
    Ended,
    Removed,
    Unchanged,
}

/// The changes that turn `current` into `uploaded`, in key order, and the receipt counts.
///
/// `uploaded` must be free of duplicate keys (upload validation guarantees it). A flag
/// present in both with equal fields is unchanged; a flag that gains an end date is ended;
/// any other difference is an update; a flag missing from the upload is removed.
pub fn diff(current: Vec<FlagRecord>, uploaded: Vec<FlagRecord>) -> (Vec<Change>, UploadCounts) {
    let mut counts = UploadCounts {
        rows: uploaded.len() as u64,
        ..UploadCounts::default()
    };
    let mut old: BTreeMap<FlagKey, FlagRecord> =
        current.into_iter().map(|f| (f.key(), f)).collect();
    let mut new: BTreeMap<FlagKey, FlagRecord> =
        uploaded.into_iter().map(|f| (f.key(), f)).collect();
    let mut keys: Vec<FlagKey> = old.keys().chain(new.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let mut changes = Vec::new();
    for key in keys {
        let outcome = match (old.remove(&key), new.remove(&key)) {
            (None, Some(n)) => {
                changes.push(Change::Upsert(n));
                Outcome::Added
            }
            (Some(_), None) => {
                changes.push(Change::Remove(key));
                Outcome::Removed
            }
            (Some(o), Some(n)) if o == n => Outcome::Unchanged,
            (Some(o), Some(n)) => {
                let ended = o.end_date.is_none() && n.end_date.is_some();
                changes.push(Change::Upsert(n));
                if ended {
                    Outcome::Ended
                } else {
                    Outcome::Updated
                }
            }
            (None, None) => continue,
        };
        match outcome {
            Outcome::Added => counts.added += 1,
            Outcome::Updated => counts.updated += 1,
            Outcome::Ended => counts.ended += 1,
            Outcome::Removed => counts.removed += 1,
            Outcome::Unchanged => counts.unchanged += 1,
        }
    }
    (changes, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use cpis_protocol::{CouncilCode, NhsNumber, PlanType};

    fn flag(n: u8, plan: PlanType, end: Option<&str>) -> FlagRecord {
        FlagRecord {
            council: "E06000018".parse().unwrap(),
            nhs_number: NhsNumber::complete([9, 9, 9, 0, 0, 0, 0, 0, n]).unwrap(),
            plan_type: plan,
            start_date: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
            end_date: end.map(|e| e.parse().unwrap()),
            date_of_birth: None,
            local_id: None,
        }
    }

    #[test]
    fn every_outcome_is_counted() {
        let current = vec![
            flag(1, PlanType::Cpp, None),               // unchanged
            flag(2, PlanType::Cpp, None),               // ended
            flag(3, PlanType::Lac, None),               // updated (start date)
            flag(4, PlanType::Cpp, None),               // removed
            flag(4, PlanType::Lac, Some("2024-06-01")), // updated (end date moved)
        ];
        let mut moved = flag(3, PlanType::Lac, None);
        moved.start_date = NaiveDate::from_ymd_opt(2024, 2, 1).unwrap();
        let uploaded = vec![
            flag(1, PlanType::Cpp, None),
            flag(2, PlanType::Cpp, Some("2025-01-01")),
            moved,
            flag(4, PlanType::Lac, Some("2024-07-01")),
            flag(5, PlanType::Ucpp, None), // added
        ];
        let (changes, counts) = diff(current, uploaded);
        assert_eq!(
            counts,
            UploadCounts {
                rows: 5,
                added: 1,
                updated: 2,
                ended: 1,
                removed: 1,
                unchanged: 1
            }
        );
        assert_eq!(changes.len(), 5);
        let removed: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Remove(k) => Some(k.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec![flag(4, PlanType::Cpp, None).key()]);
        let _: CouncilCode = removed[0].council.clone();
    }

    #[test]
    fn same_list_changes_nothing() {
        let list = vec![flag(1, PlanType::Cpp, None), flag(2, PlanType::Lac, None)];
        let (changes, counts) = diff(list.clone(), list);
        assert!(changes.is_empty());
        assert_eq!(counts.unchanged, 2);
    }
}
