//! The sync decision logic as a state machine without IO: given what the tablet holds and
//! a verified checkpoint, what to fetch next; the driver in [`crate::sync`] does the
//! network and disk and reports back what happened.

use cpis_protocol::Checkpoint;

/// What the driver should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing more to fetch: the data is at the checkpoint's head (or as close as the
    /// server could bring it in this round).
    Done,
    /// `GET` the delta from this version.
    FetchDelta { from: u64 },
    /// Fetch the snapshot metadata and body.
    FetchSnapshot,
}

/// What happened to the last action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A delta was verified and applied; the tablet now holds `to`.
    DeltaApplied { to: u64 },
    /// `204`: the server says the tablet is at the head.
    DeltaUpToDate,
    /// `410`: the delta is beyond the retention horizon or from another epoch.
    DeltaGone,
    /// A snapshot was verified and installed.
    SnapshotApplied { epoch: u64, version: u64 },
}

/// Most delta rounds in one sync before giving up for this round.
const MAX_ROUNDS: u32 = 16;

/// One sync's plan.
#[derive(Debug, Clone)]
pub struct SyncPlan {
    epoch: u64,
    head: u64,
    held: Option<(u64, u64)>,
    rounds: u32,
    snapshots: u32,
}

impl SyncPlan {
    /// Starts a plan from what the tablet holds and the verified checkpoint.
    pub fn new(held: Option<(u64, u64)>, cp: &Checkpoint) -> (Self, Action) {
        let plan = Self {
            epoch: cp.epoch,
            head: cp.head_version,
            held,
            rounds: 0,
            snapshots: 0,
        };
        let action = plan.next();
        (plan, action)
    }

    fn next(&self) -> Action {
        match self.held {
            None => Action::FetchSnapshot,
            Some((epoch, _)) if epoch != self.epoch => Action::FetchSnapshot,
            Some((_, v)) if v >= self.head => Action::Done,
            Some((_, v)) => Action::FetchDelta { from: v },
        }
    }

    /// Takes what happened, returns what to do next.
    pub fn on(&mut self, event: Event) -> Action {
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Action::Done;
        }
        match event {
            Event::DeltaApplied { to } => {
                if let Some((e, _)) = self.held {
                    self.held = Some((e, to));
                }
                self.next()
            }
            Event::DeltaUpToDate => Action::Done,
            Event::DeltaGone => {
                if self.snapshots > 0 {
                    // A snapshot this round still left us behind a gone delta: stop here and
                    // try again next round rather than loop.
                    Action::Done
                } else {
                    Action::FetchSnapshot
                }
            }
            Event::SnapshotApplied { epoch, version } => {
                self.snapshots += 1;
                self.held = Some((epoch, version));
                self.next()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use cpis_protocol::Policy;

    fn cp(epoch: u64, head: u64) -> Checkpoint {
        Checkpoint {
            region: "EM".parse().unwrap(),
            epoch,
            head_version: head,
            server_time: Utc::now(),
            expires_at: Utc::now(),
            policy: Policy::default(),
        }
    }

    #[test]
    fn empty_tablet_takes_snapshot() {
        let (mut p, a) = SyncPlan::new(None, &cp(1, 10));
        assert_eq!(a, Action::FetchSnapshot);
        assert_eq!(
            p.on(Event::SnapshotApplied {
                epoch: 1,
                version: 10
            }),
            Action::Done
        );
    }

    #[test]
    fn at_head_does_nothing() {
        assert_eq!(SyncPlan::new(Some((1, 10)), &cp(1, 10)).1, Action::Done);
    }

    #[test]
    fn behind_takes_delta_then_done() {
        let (mut p, a) = SyncPlan::new(Some((1, 4)), &cp(1, 10));
        assert_eq!(a, Action::FetchDelta { from: 4 });
        assert_eq!(
            p.on(Event::DeltaApplied { to: 7 }),
            Action::FetchDelta { from: 7 }
        );
        assert_eq!(p.on(Event::DeltaApplied { to: 10 }), Action::Done);
    }

    #[test]
    fn gone_takes_snapshot_once() {
        let (mut p, _) = SyncPlan::new(Some((1, 4)), &cp(1, 10));
        assert_eq!(p.on(Event::DeltaGone), Action::FetchSnapshot);
        // The cached snapshot is older than the head: catch up by delta.
        assert_eq!(
            p.on(Event::SnapshotApplied {
                epoch: 1,
                version: 8
            }),
            Action::FetchDelta { from: 8 }
        );
        assert_eq!(p.on(Event::DeltaGone), Action::Done);
    }

    #[test]
    fn new_epoch_takes_snapshot() {
        assert_eq!(
            SyncPlan::new(Some((1, 40)), &cp(2, 3)).1,
            Action::FetchSnapshot
        );
    }

    #[test]
    fn up_to_date_answer_ends() {
        let (mut p, _) = SyncPlan::new(Some((1, 4)), &cp(1, 10));
        assert_eq!(p.on(Event::DeltaUpToDate), Action::Done);
    }

    #[test]
    fn rounds_are_bounded() {
        let (mut p, _) = SyncPlan::new(Some((1, 0)), &cp(1, 1000));
        let mut v = 0;
        let mut last = Action::FetchDelta { from: 0 };
        for _ in 0..100 {
            v += 1;
            last = p.on(Event::DeltaApplied { to: v });
            if last == Action::Done {
                break;
            }
        }
        assert_eq!(last, Action::Done);
        assert!(v <= MAX_ROUNDS as u64 + 1);
    }
}
