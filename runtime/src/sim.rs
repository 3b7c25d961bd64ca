//! Simulation: a virtual clock and simulated agents driving the real engine.
//! Each node's outcome is scripted (or drawn from a seeded generator); agents
//! answer instantly or after a latency. Used by `flotilla simulate`, engine
//! tests and the rollout benchmark.

use crate::engine::{Command, Engine, EngineError};
use crate::model::{RunEvent, TaskState};
use crate::world::{Clock, ManualClock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What a simulated agent does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    #[default]
    Succeed,
    /// The install fails and the agent restores the previous release.
    Fail,
    /// The install fails and so does the restore.
    RollbackFails,
    /// The device declines.
    Reject,
    /// The agent never answers (the node runs into its timeout as unknown).
    Silent,
    /// The agent starts but never finishes (timed out).
    Hang,
}

/// Scripted agents: an outcome per node, a default, and a latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Agents {
    #[serde(default)]
    pub default: Outcome,
    #[serde(default)]
    pub nodes: BTreeMap<String, Outcome>,
    /// Milliseconds from delivery to the final report.
    #[serde(default)]
    pub latency_ms: u64,
}

impl Agents {
    fn outcome(&self, node: &str) -> Outcome {
        self.nodes.get(node).copied().unwrap_or(self.default)
    }
}

/// A line of the simulated timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at: u64,
    pub what: String,
}

/// Drives `engine` with `agents` on `clock` until no task is active or
/// `max_ms` of virtual time passed. Returns the commands' timeline.
pub fn run(
    engine: &mut Engine,
    clock: &Arc<ManualClock>,
    agents: &Agents,
    tick_ms: u64,
    max_ms: u64,
) -> Result<Vec<Step>, EngineError> {
    let start = clock.now();
    let mut pending: Vec<(u64, String, Vec<RunEvent>)> = Vec::new();
    let mut timeline = Vec::new();
    while engine.has_active() && clock.now() - start <= max_ms {
        let now = clock.now();
        for command in engine.tick()? {
            match command {
                Command::Deliver { node, version, .. } => {
                    timeline.push(Step {
                        at: now,
                        what: format!("deliver {version} to {node}"),
                    });
                    let events = match agents.outcome(&node) {
                        Outcome::Succeed => vec![
                            RunEvent::Downloading,
                            RunEvent::Upgrading,
                            RunEvent::Verifying,
                            RunEvent::Succeeded,
                        ],
                        Outcome::Fail => vec![
                            RunEvent::Downloading,
                            RunEvent::Upgrading,
                            RunEvent::FailedRolledBack {
                                error: "install failed (simulated)".into(),
                            },
                        ],
                        Outcome::RollbackFails => vec![
                            RunEvent::Downloading,
                            RunEvent::Upgrading,
                            RunEvent::FailedRollbackFailed {
                                error: "install and restore failed (simulated)".into(),
                            },
                        ],
                        Outcome::Reject => vec![RunEvent::Rejected {
                            reason: "declined by the device (simulated)".into(),
                        }],
                        Outcome::Silent => vec![],
                        Outcome::Hang => vec![RunEvent::Downloading],
                    };
                    pending.push((now + agents.latency_ms, node, events));
                }
                Command::Restore { node, version, .. } => {
                    timeline.push(Step {
                        at: now,
                        what: format!("restore {version} on {node}"),
                    });
                    pending.push((now + agents.latency_ms, node, vec![RunEvent::RolledBack]));
                }
            }
        }
        // Deliver every report that is due.
        let (due, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(t, _, _)| *t <= now);
        pending = later;
        let idle = due.is_empty();
        // Agents report in bursts: each step of every due node, in order.
        let depth = due.iter().map(|(_, _, e)| e.len()).max().unwrap_or(0);
        for step in 0..depth {
            let batch: Vec<(String, RunEvent)> = due
                .iter()
                .filter_map(|(_, node, events)| events.get(step).map(|e| (node.clone(), e.clone())))
                .collect();
            let nodes: Vec<String> = batch.iter().map(|(n, _)| n.clone()).collect();
            for (node, result) in nodes.into_iter().zip(engine.report_many(batch)) {
                match result {
                    Ok(()) => {}
                    // A report after the node's timeout, or after a cancel, is
                    // refused by the engine; a real agent would see a 4xx.
                    Err(EngineError::Refused { reason, .. }) => timeline.push(Step {
                        at: now,
                        what: format!("report from {node} refused: {reason}"),
                    }),
                    Err(e) => return Err(e),
                }
            }
        }
        if idle {
            clock.advance(tick_ms);
        }
    }
    Ok(timeline)
}

/// Final counts per node-run state of a task.
pub fn counts(engine: &Engine, task: &str) -> Result<BTreeMap<String, usize>, EngineError> {
    let mut out = BTreeMap::new();
    for run in engine.runs(task)? {
        *out.entry(run.state.name().to_string()).or_insert(0) += 1;
    }
    Ok(out)
}

/// `true` when the task reached a final state.
pub fn finished(state: &TaskState) -> bool {
    !state.active()
}

/// Runs of each node, by id (for assertions).
pub fn states(engine: &Engine, task: &str) -> Result<HashMap<String, String>, EngineError> {
    Ok(engine
        .runs(task)?
        .into_iter()
        .map(|r| (r.node_id, r.state.name().to_string()))
        .collect())
}
