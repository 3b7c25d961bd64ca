//! The node-run state machine: one node's path through one task, from
//! `pending` to a final state. One enum, one transition function; an event that
//! does not apply to the current state is an error and changes nothing.

use super::SkipReason;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a node stands in a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum RunState {
    /// Targeted, not yet decided.
    Pending,
    /// Left out of the task, with the reason.
    Skipped {
        reason: SkipReason,
        detail: String,
    },
    /// Placed in a wave, waiting for its turn (and for its window / `admit`).
    Queued {
        wave: u32,
    },
    /// The release was handed to the node: pushed to its agent, or offered in
    /// answer to its request (pull). Waiting for the agent to start.
    Offered {
        wave: u32,
    },
    Downloading {
        wave: u32,
    },
    Upgrading {
        wave: u32,
    },
    Verifying {
        wave: u32,
    },
    Succeeded {
        wave: u32,
    },
    /// The upgrade failed and the node is back on its previous release.
    FailedRolledBack {
        wave: u32,
        error: String,
    },
    /// The upgrade failed and so did the restore: a person must look.
    FailedRollbackFailed {
        wave: u32,
        error: String,
    },
    /// Started but did not finish within the node timeout.
    TimedOut {
        wave: u32,
    },
    /// Handed over but the agent never reported.
    Unknown {
        wave: u32,
    },
    /// The device declined the upgrade.
    Rejected {
        wave: u32,
        reason: String,
    },
    /// The task rolled back: the previous release is being put back.
    RollingBack {
        wave: u32,
    },
    /// The task rolled back and this node is on its previous release again.
    RolledBack {
        wave: u32,
    },
    /// The task was cancelled or aborted before this node finished.
    Cancelled,
}

/// What happens to a node run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum RunEvent {
    Skip {
        reason: SkipReason,
        detail: String,
    },
    Queue {
        wave: u32,
    },
    Offer,
    /// Progress from the agent.
    Downloading,
    Upgrading,
    Verifying,
    Succeeded,
    FailedRolledBack {
        error: String,
    },
    FailedRollbackFailed {
        error: String,
    },
    Rejected {
        reason: String,
    },
    /// The node timeout passed while the node was working.
    Timeout,
    /// The node timeout passed and the agent never reported at all.
    NoReport,
    /// Retry a failed node (bounded by the task's retries).
    Retry,
    /// Put the previous release back on a node this task upgraded.
    Rollback,
    RolledBack,
    Cancel,
    /// The agent made a trial release permanent (its wave proved healthy).
    MadePermanent,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node run: `{event}` does not apply in state `{state}`")]
pub struct IllegalTransition {
    pub state: String,
    pub event: String,
}

impl RunState {
    /// The kebab-case state name (`failed-rolled-back`), as events and the API show it.
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Skipped { .. } => "skipped",
            RunState::Queued { .. } => "queued",
            RunState::Offered { .. } => "offered",
            RunState::Downloading { .. } => "downloading",
            RunState::Upgrading { .. } => "upgrading",
            RunState::Verifying { .. } => "verifying",
            RunState::Succeeded { .. } => "succeeded",
            RunState::FailedRolledBack { .. } => "failed-rolled-back",
            RunState::FailedRollbackFailed { .. } => "failed-rollback-failed",
            RunState::TimedOut { .. } => "timed-out",
            RunState::Unknown { .. } => "unknown",
            RunState::Rejected { .. } => "rejected",
            RunState::RollingBack { .. } => "rolling-back",
            RunState::RolledBack { .. } => "rolled-back",
            RunState::Cancelled => "cancelled",
        }
    }

    /// The wave this run belongs to, once queued.
    pub fn wave(&self) -> Option<u32> {
        match self {
            RunState::Pending | RunState::Skipped { .. } | RunState::Cancelled => None,
            RunState::Queued { wave }
            | RunState::Offered { wave }
            | RunState::Downloading { wave }
            | RunState::Upgrading { wave }
            | RunState::Verifying { wave }
            | RunState::Succeeded { wave }
            | RunState::FailedRolledBack { wave, .. }
            | RunState::FailedRollbackFailed { wave, .. }
            | RunState::TimedOut { wave }
            | RunState::Unknown { wave }
            | RunState::Rejected { wave, .. }
            | RunState::RollingBack { wave }
            | RunState::RolledBack { wave } => Some(*wave),
        }
    }

    /// The node is being worked on: it counts against concurrency and keeps
    /// the node busy for other tasks.
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            RunState::Offered { .. }
                | RunState::Downloading { .. }
                | RunState::Upgrading { .. }
                | RunState::Verifying { .. }
                | RunState::RollingBack { .. }
        )
    }

    /// A failure the wave report counts.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            RunState::FailedRolledBack { .. }
                | RunState::FailedRollbackFailed { .. }
                | RunState::TimedOut { .. }
                | RunState::Unknown { .. }
                | RunState::Rejected { .. }
        )
    }

    /// Nothing more will happen to this run unless the task retries or rolls back.
    pub fn finished(&self) -> bool {
        self.failed()
            || matches!(
                self,
                RunState::Succeeded { .. }
                    | RunState::Skipped { .. }
                    | RunState::RolledBack { .. }
                    | RunState::Cancelled
            )
    }

    /// The one transition function.
    pub fn next(self, event: RunEvent) -> Result<RunState, IllegalTransition> {
        use RunEvent as E;
        use RunState as S;
        let next = match (&self, event) {
            // A queued node can still be left out (`admit` says never).
            (S::Pending | S::Queued { .. }, E::Skip { reason, detail }) => {
                S::Skipped { reason, detail }
            }
            (S::Pending, E::Queue { wave }) => S::Queued { wave },
            (S::Queued { wave }, E::Offer) => S::Offered { wave: *wave },
            // Agents report progress; a fast agent may skip a step, and the
            // same step twice (a resumed download) is harmless.
            (S::Offered { wave } | S::Downloading { wave }, E::Downloading) => {
                S::Downloading { wave: *wave }
            }
            (
                S::Offered { wave } | S::Downloading { wave } | S::Upgrading { wave },
                E::Upgrading,
            ) => S::Upgrading { wave: *wave },
            (
                S::Offered { wave }
                | S::Downloading { wave }
                | S::Upgrading { wave }
                | S::Verifying { wave },
                E::Verifying,
            ) => S::Verifying { wave: *wave },
            (
                S::Offered { wave }
                | S::Downloading { wave }
                | S::Upgrading { wave }
                | S::Verifying { wave },
                E::Succeeded,
            ) => S::Succeeded { wave: *wave },
            (
                S::Offered { wave }
                | S::Downloading { wave }
                | S::Upgrading { wave }
                | S::Verifying { wave },
                E::FailedRolledBack { error },
            ) => S::FailedRolledBack { wave: *wave, error },
            (
                S::Offered { wave }
                | S::Downloading { wave }
                | S::Upgrading { wave }
                | S::Verifying { wave }
                | S::RollingBack { wave },
                E::FailedRollbackFailed { error },
            ) => S::FailedRollbackFailed { wave: *wave, error },
            // Downloading too: a node refuses a release whose bytes fail
            // its signature, after it downloaded them and before it
            // unpacks anything.
            (S::Offered { wave } | S::Downloading { wave }, E::Rejected { reason }) => {
                S::Rejected {
                    wave: *wave,
                    reason,
                }
            }
            (
                S::Downloading { wave } | S::Upgrading { wave } | S::Verifying { wave },
                E::Timeout,
            ) => S::TimedOut { wave: *wave },
            (S::Offered { wave }, E::NoReport) => S::Unknown { wave: *wave },
            (
                S::FailedRolledBack { wave, .. }
                | S::TimedOut { wave }
                | S::Unknown { wave }
                | S::Rejected { wave, .. },
                E::Retry,
            ) => S::Queued { wave: *wave },
            (S::Succeeded { wave }, E::Rollback) => S::RollingBack { wave: *wave },
            (S::Succeeded { wave }, E::MadePermanent) => S::Succeeded { wave: *wave },
            (S::RollingBack { wave }, E::RolledBack) => S::RolledBack { wave: *wave },
            (S::Pending | S::Queued { .. } | S::Offered { .. }, E::Cancel) => S::Cancelled,
            (_, event) => {
                return Err(IllegalTransition {
                    state: self.name().to_string(),
                    event: event.name().to_string(),
                });
            }
        };
        Ok(next)
    }
}

impl RunEvent {
    pub fn name(&self) -> &'static str {
        match self {
            RunEvent::Skip { .. } => "skip",
            RunEvent::Queue { .. } => "queue",
            RunEvent::Offer => "offer",
            RunEvent::Downloading => "downloading",
            RunEvent::Upgrading => "upgrading",
            RunEvent::Verifying => "verifying",
            RunEvent::Succeeded => "succeeded",
            RunEvent::FailedRolledBack { .. } => "failed-rolled-back",
            RunEvent::FailedRollbackFailed { .. } => "failed-rollback-failed",
            RunEvent::Rejected { .. } => "rejected",
            RunEvent::Timeout => "timeout",
            RunEvent::NoReport => "no-report",
            RunEvent::Retry => "retry",
            RunEvent::Rollback => "rollback",
            RunEvent::RolledBack => "rolled-back",
            RunEvent::Cancel => "cancel",
            RunEvent::MadePermanent => "made-permanent",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunEvent as E;
    use RunState as S;

    fn run(events: impl IntoIterator<Item = RunEvent>) -> Result<RunState, IllegalTransition> {
        events.into_iter().try_fold(S::Pending, RunState::next)
    }

    #[test]
    fn the_happy_path_and_its_shortcuts() {
        let s = run([
            E::Queue { wave: 2 },
            E::Offer,
            E::Downloading,
            E::Downloading,
            E::Upgrading,
            E::Verifying,
            E::Succeeded,
        ])
        .unwrap();
        assert_eq!(s, S::Succeeded { wave: 2 });
        assert!(s.finished() && !s.failed() && !s.in_flight());
        // A fast agent may report success straight after the offer.
        assert_eq!(
            run([E::Queue { wave: 0 }, E::Offer, E::Succeeded]).unwrap(),
            S::Succeeded { wave: 0 }
        );
    }

    #[test]
    fn a_node_may_reject_work_after_downloading_it_but_not_once_it_upgrades() {
        // A signature that fails over the downloaded bytes.
        let reason = || E::Rejected {
            reason: "bad signature".into(),
        };
        assert_eq!(
            run([E::Queue { wave: 1 }, E::Offer, E::Downloading, reason()]).unwrap(),
            S::Rejected {
                wave: 1,
                reason: "bad signature".into()
            }
        );
        assert!(
            run([
                E::Queue { wave: 1 },
                E::Offer,
                E::Downloading,
                E::Upgrading,
                reason()
            ])
            .is_err()
        );
    }

    #[test]
    fn failures_retries_and_rollback() {
        let failed = run([
            E::Queue { wave: 1 },
            E::Offer,
            E::Upgrading,
            E::FailedRolledBack {
                error: "install exited 1".into(),
            },
        ])
        .unwrap();
        assert!(failed.failed() && failed.finished());
        assert_eq!(
            failed.clone().next(E::Retry).unwrap(),
            S::Queued { wave: 1 }
        );
        assert_eq!(
            run([E::Queue { wave: 0 }, E::Offer, E::NoReport]).unwrap(),
            S::Unknown { wave: 0 }
        );
        assert_eq!(
            run([E::Queue { wave: 0 }, E::Offer, E::Downloading, E::Timeout]).unwrap(),
            S::TimedOut { wave: 0 }
        );
        let back = run([
            E::Queue { wave: 0 },
            E::Offer,
            E::Succeeded,
            E::Rollback,
            E::RolledBack,
        ])
        .unwrap();
        assert_eq!(back, S::RolledBack { wave: 0 });
    }

    #[test]
    fn illegal_transitions_are_errors_that_name_state_and_event() {
        let err = run([E::Queue { wave: 0 }, E::Succeeded]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node run: `succeeded` does not apply in state `queued`"
        );
        // A finished node cannot be upgraded twice, nor a running one cancelled.
        assert!(S::Succeeded { wave: 0 }.next(E::Offer).is_err());
        assert!(S::Upgrading { wave: 0 }.next(E::Cancel).is_err());
        assert!(
            S::Skipped {
                reason: SkipReason::SameVersion,
                detail: String::new()
            }
            .next(E::Queue { wave: 0 })
            .is_err()
        );
        // Success is not retried.
        assert!(S::Succeeded { wave: 0 }.next(E::Retry).is_err());
    }
}

/// One node's run in one task, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRun {
    pub node_id: String,
    pub state: RunState,
    /// The version the node had when targeted (what a rollback restores).
    pub from_version: String,
    /// Times the node was handed the release (1 + retries used).
    pub attempts: u32,
    /// When the current attempt was handed over (Unix ms), for the timeout.
    pub started_at: Option<u64>,
    /// Not before this time (Unix ms), when `admit` deferred it.
    pub not_before: Option<u64>,
    pub updated_at: u64,
    /// A trial release on this node is being made permanent (the agent was
    /// told; its report is awaited).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committing: bool,
}

impl NodeRun {
    pub fn new(node_id: impl Into<String>, from_version: impl Into<String>, now: u64) -> Self {
        NodeRun {
            node_id: node_id.into(),
            state: RunState::Pending,
            from_version: from_version.into(),
            attempts: 0,
            started_at: None,
            not_before: None,
            updated_at: now,
            committing: false,
        }
    }
}
