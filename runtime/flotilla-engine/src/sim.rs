//! Simulation: a virtual clock and simulated agents driving the real engine.
//! Each node's outcome is scripted per attempt (or drawn from a seeded
//! generator); agents answer after a latency; the fleet changes over time
//! (nodes go offline and come back, register later, change version or health).
//! Used by `flotilla simulate`, `flotilla policy test` (through `scenario`),
//! engine tests and the rollout benchmark.

use crate::{Command, Engine, EngineError};
use flotilla_model::{Backup, Node, RunEvent, TaskState};
use flotilla_policy::world::{Clock, Fleet, ManualClock, MemoryFleet};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What a simulated agent does with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AgentOutcome {
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

/// Outcomes drawn from a seeded generator, for nodes without a scripted
/// outcome. Each probability is a fraction (0.1 = 10 %); what is left succeeds.
/// A draw depends only on the seed, the node id and the attempt, so adding a
/// node does not change what the others do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Random {
    pub seed: u64,
    pub fail: f64,
    pub rollback_fails: f64,
    pub reject: f64,
    pub silent: f64,
    pub hang: f64,
}

/// A simulation that cannot be set up or played as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    #[error("random.{name} is {value}: write a fraction between 0 and 1 (0.1 = 10%)")]
    NotAFraction { name: &'static str, value: f64 },
    #[error("random probabilities add up to {0}; they must add up to at most 1")]
    AboveOne(f64),
    /// A change over time to a node the fleet does not have.
    #[error("no node {0} in the fleet to change")]
    UnknownNode(String),
}

impl Random {
    /// Checks the probabilities are fractions that add up to at most 1.
    pub fn validate(&self) -> Result<(), SimError> {
        let all = [
            ("fail", self.fail),
            ("rollback_fails", self.rollback_fails),
            ("reject", self.reject),
            ("silent", self.silent),
            ("hang", self.hang),
        ];
        for (name, p) in all {
            if !(0.0..=1.0).contains(&p) {
                return Err(SimError::NotAFraction { name, value: p });
            }
        }
        let sum: f64 = all.iter().map(|(_, p)| p).sum();
        if sum > 1.0 + 1e-9 {
            return Err(SimError::AboveOne(sum));
        }
        Ok(())
    }

    fn draw(&self, node: &str, attempt: u32) -> AgentOutcome {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ fnv1a(node) ^ u64::from(attempt));
        let x = rng.f64();
        let mut edge = 0.0;
        for (p, outcome) in [
            (self.fail, AgentOutcome::Fail),
            (self.rollback_fails, AgentOutcome::RollbackFails),
            (self.reject, AgentOutcome::Reject),
            (self.silent, AgentOutcome::Silent),
            (self.hang, AgentOutcome::Hang),
        ] {
            edge += p;
            if x < edge {
                return outcome;
            }
        }
        AgentOutcome::Succeed
    }
}

/// A stable hash of a node id (std's hasher may change between releases, and a
/// seeded simulation must give the same outcomes forever).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Scripted agents: an outcome per node (or per attempt), a default or a
/// seeded random draw for the rest, and a latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agents {
    #[serde(default)]
    pub default: AgentOutcome,
    #[serde(default)]
    pub nodes: BTreeMap<String, AgentOutcome>,
    /// Outcomes per attempt: the first delivery gets the first, a retry the
    /// next, and the last one repeats. Wins over `nodes`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attempts: BTreeMap<String, Vec<AgentOutcome>>,
    /// Draws the outcome of nodes not in `nodes`/`attempts` (instead of `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<Random>,
    /// Milliseconds from delivery to the final report.
    #[serde(default)]
    pub latency_ms: u64,
    /// Pull mode: every online node of the fleet asks for work this often
    /// (0 = devices never ask). Needs a fleet (`Sim::with_fleet`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub request_every_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Agents {
    /// The outcome of `node`'s `attempt`-th delivery (from 1).
    pub fn outcome(&self, node: &str, attempt: u32) -> AgentOutcome {
        if let Some(script) = self.attempts.get(node).filter(|s| !s.is_empty()) {
            let i = (attempt.max(1) as usize - 1).min(script.len() - 1);
            return script[i];
        }
        if let Some(o) = self.nodes.get(node) {
            return *o;
        }
        match &self.random {
            Some(r) => r.draw(node, attempt),
            None => self.default,
        }
    }
}

/// A change to the simulated fleet at a point of virtual time.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A node registers (or is replaced): "appear later".
    Upsert(Node),
    /// Sets some fields of a known node (version, health, online, ...).
    Set {
        node: String,
        version: Option<String>,
        healthy: Option<bool>,
        schedulable: Option<bool>,
        online: Option<bool>,
        /// Replaces the metrics the node's agent reports.
        metrics: Option<flotilla_policy::world::Metrics>,
    },
}

impl Change {
    fn apply(&self, fleet: &MemoryFleet) -> Result<String, SimError> {
        match self {
            Change::Upsert(node) => {
                fleet.upsert(node.clone());
                Ok(format!("node {} registers at {}", node.id, node.version))
            }
            Change::Set {
                node,
                version,
                healthy,
                schedulable,
                online,
                metrics,
            } => {
                let mut n = fleet
                    .get(node)
                    .ok_or_else(|| SimError::UnknownNode(node.clone()))?;
                let mut what = Vec::new();
                if let Some(v) = version {
                    n.version = v.clone();
                    what.push(format!("version {v}"));
                }
                if let Some(h) = healthy {
                    n.healthy = *h;
                    what.push(if *h { "healthy" } else { "unhealthy" }.to_string());
                }
                if let Some(s) = schedulable {
                    n.schedulable = *s;
                    what.push(if *s { "schedulable" } else { "unschedulable" }.to_string());
                }
                if let Some(o) = online {
                    n.online = *o;
                    what.push(if *o { "online" } else { "offline" }.to_string());
                }
                fleet.upsert(n);
                if let Some(m) = metrics {
                    fleet.set_metrics(node, m.clone());
                    let shown: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    what.push(format!("metrics {}", shown.join(" ")));
                }
                Ok(format!("node {node}: {}", what.join(", ")))
            }
        }
    }
}

/// A line of the simulated timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub at: u64,
    pub what: String,
}

/// Reports an agent will send: due time, node, events in order.
type Pending = (u64, String, Vec<RunEvent>);

/// The simulated world around an engine: agents, the fleet's changes over
/// time, reports in flight, and the timeline of what happened.
pub struct Sim {
    clock: Arc<ManualClock>,
    agents: Agents,
    fleet: Option<Arc<MemoryFleet>>,
    /// Changes still to come, by absolute time (sorted).
    changes: Vec<(u64, Change)>,
    next_change: usize,
    pending: Vec<Pending>,
    attempts: HashMap<String, u32>,
    last_request: Option<u64>,
    timeline: Vec<Step>,
    /// Record a timeline line per command (deliver, restore, make permanent).
    per_node_lines: bool,
}

impl Sim {
    pub fn new(clock: Arc<ManualClock>, agents: Agents) -> Self {
        Sim {
            clock,
            agents,
            fleet: None,
            changes: Vec::new(),
            next_change: 0,
            pending: Vec::new(),
            attempts: HashMap::new(),
            last_request: None,
            timeline: Vec::new(),
            per_node_lines: true,
        }
    }

    /// The fleet the engine reads, so the simulation can change it at the
    /// given absolute times, hold back the reports of offline nodes and let
    /// devices ask for work (pull).
    pub fn with_fleet(mut self, fleet: Arc<MemoryFleet>, mut changes: Vec<(u64, Change)>) -> Self {
        changes.sort_by_key(|(at, _)| *at);
        self.fleet = Some(fleet);
        self.changes = changes;
        self
    }

    /// No timeline line per command sent to a node (fleet changes and
    /// errors are still recorded): for big simulations whose timeline nobody
    /// reads line by line, e.g. the rollout benchmark, where 100,000
    /// "deliver" lines would be the simulator's memory, not the engine's.
    pub fn quiet(mut self) -> Self {
        self.per_node_lines = false;
        self
    }

    /// A timeline line about a command, unless [`Sim::quiet`].
    fn note(&mut self, at: u64, what: impl FnOnce() -> String) {
        if self.per_node_lines {
            self.timeline.push(Step { at, what: what() });
        }
    }

    pub fn timeline(&self) -> &[Step] {
        &self.timeline
    }

    pub fn into_timeline(self) -> Vec<Step> {
        self.timeline
    }

    /// Something is still to come from the simulated world: a report in
    /// flight or a scheduled fleet change.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty() || self.next_change < self.changes.len()
    }

    /// One round at the current virtual time: due fleet changes, an engine
    /// tick, device requests (pull), then every report that is due. Returns
    /// `true` when nothing happened that calls for another round at the same
    /// time (the caller then advances the clock).
    pub fn step(&mut self, engine: &mut Engine) -> Result<bool, EngineError> {
        let now = self.clock.now();
        self.apply_changes(now);
        for command in engine.tick()? {
            self.command(command, now);
        }
        self.requests(engine, now)?;
        self.reports(engine, now)
    }

    fn apply_changes(&mut self, now: u64) {
        let Some(fleet) = &self.fleet else { return };
        while let Some((at, change)) = self.changes.get(self.next_change) {
            if *at > now {
                break;
            }
            let what = change
                .apply(fleet)
                .unwrap_or_else(|e| format!("ignored: {e}"));
            self.timeline.push(Step { at: now, what });
            self.next_change += 1;
        }
    }

    /// Commands the engine returned outside a tick (an operator's rollback)
    /// go to the simulated agents like those of a tick.
    pub fn handle(&mut self, commands: Vec<Command>) {
        let now = self.clock.now();
        for command in commands {
            self.command(command, now);
        }
    }

    fn command(&mut self, command: Command, now: u64) {
        match command {
            Command::Deliver {
                node,
                version,
                backup,
                ..
            } => {
                self.note(now, || format!("deliver {version} to {node}"));
                // Counted only where an outcome depends on it (a big
                // simulation of uniform agents keeps no map per node).
                let attempt = if self.agents.attempts.is_empty() && self.agents.random.is_none() {
                    1
                } else {
                    let attempt = self.attempts.entry(node.clone()).or_insert(0);
                    *attempt += 1;
                    *attempt
                };
                let events = match self.agents.outcome(&node, attempt) {
                    AgentOutcome::Succeed => vec![
                        RunEvent::Downloading,
                        RunEvent::Upgrading,
                        RunEvent::Verifying,
                        RunEvent::Succeeded,
                    ],
                    // As the agent: without a backup there is nothing to
                    // put back, and the node is left on the new release.
                    AgentOutcome::Fail if backup == Backup::None => vec![
                        RunEvent::Downloading,
                        RunEvent::Upgrading,
                        RunEvent::FailedRollbackFailed {
                            error: format!(
                                "install failed (simulated); no backup was taken (backup: none), so the node is left on {version}"
                            ),
                        },
                    ],
                    AgentOutcome::Fail => vec![
                        RunEvent::Downloading,
                        RunEvent::Upgrading,
                        RunEvent::FailedRolledBack {
                            error: "install failed (simulated)".into(),
                        },
                    ],
                    AgentOutcome::RollbackFails => vec![
                        RunEvent::Downloading,
                        RunEvent::Upgrading,
                        RunEvent::FailedRollbackFailed {
                            error: "install and restore failed (simulated)".into(),
                        },
                    ],
                    AgentOutcome::Reject => vec![RunEvent::Rejected {
                        reason: "declined by the device (simulated)".into(),
                    }],
                    AgentOutcome::Silent => vec![],
                    AgentOutcome::Hang => vec![RunEvent::Downloading],
                };
                self.pending
                    .push((now + self.agents.latency_ms, node, events));
            }
            Command::Restore { node, version, .. } => {
                self.note(now, || format!("restore {version} on {node}"));
                self.pending.push((
                    now + self.agents.latency_ms,
                    node,
                    vec![RunEvent::RolledBack],
                ));
            }
            Command::MakePermanent { node, version, .. } => {
                self.note(now, || format!("make {version} permanent on {node}"));
                self.pending.push((
                    now + self.agents.latency_ms,
                    node,
                    vec![RunEvent::MadePermanent],
                ));
            }
        }
    }

    /// Pull mode: every online node asks for work, at most once per interval.
    fn requests(&mut self, engine: &mut Engine, now: u64) -> Result<(), EngineError> {
        let every = self.agents.request_every_ms;
        let Some(fleet) = self.fleet.clone() else {
            return Ok(());
        };
        if every == 0 || self.last_request.is_some_and(|t| now < t + every) {
            return Ok(());
        }
        self.last_request = Some(now);
        let nodes = fleet.query(&Default::default(), 0, u32::MAX);
        for node in nodes.into_iter().filter(|n| n.online) {
            match engine.request(&node.id) {
                Ok(Some(command)) => self.command(command, now),
                Ok(None) => {}
                // A policy failure in `on-request` is the engine's to report;
                // the device just gets no work this time.
                Err(EngineError::Policy(e)) => self.timeline.push(Step {
                    at: now,
                    what: format!("request from {} failed: {e}", node.id),
                }),
                Err(EngineError::Refused { reason, .. }) => self.timeline.push(Step {
                    at: now,
                    what: format!("request from {} refused: {reason}", node.id),
                }),
                Err(EngineError::Transition { source, .. }) => self.timeline.push(Step {
                    at: now,
                    what: format!("request from {} refused: {source}", node.id),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn reports(&mut self, engine: &mut Engine, now: u64) -> Result<bool, EngineError> {
        // Deliver every report that is due, except from nodes that are offline
        // (their agent reports when it is back).
        let fleet = self.fleet.clone();
        let online = |node: &str| {
            fleet
                .as_ref()
                .is_none_or(|f| f.get(node).is_none_or(|n| n.online))
        };
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, node, _)| *t <= now && online(node));
        self.pending = later;
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
                    Err(EngineError::Refused { reason, .. }) => self.timeline.push(Step {
                        at: now,
                        what: format!("report from {node} refused: {reason}"),
                    }),
                    Err(EngineError::Transition { source, .. }) => self.timeline.push(Step {
                        at: now,
                        what: format!("report from {node} refused: {source}"),
                    }),
                    Err(EngineError::NotInTask { .. }) => self.timeline.push(Step {
                        at: now,
                        what: format!("report from {node} refused: the node is in no active task"),
                    }),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(idle)
    }
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
    let sim = Sim::new(clock.clone(), agents.clone());
    run_sim(sim, engine, clock, tick_ms, max_ms)
}

/// Steps `sim` until no task is active or `max_ms` of virtual time passed.
fn run_sim(
    mut sim: Sim,
    engine: &mut Engine,
    clock: &Arc<ManualClock>,
    tick_ms: u64,
    max_ms: u64,
) -> Result<Vec<Step>, EngineError> {
    let start = clock.now();
    while engine.has_active() && clock.now() - start <= max_ms {
        if sim.step(engine)? {
            clock.advance(tick_ms);
        }
    }
    Ok(sim.into_timeline())
}

/// [`run`] over the engine's `fleet`, whose online devices also ask for
/// work (pull tasks) every `agents.request_every_ms`, as real agents in
/// pull mode do; 0 uses the agents' default interval (30 s).
pub fn run_on(
    engine: &mut Engine,
    clock: &Arc<ManualClock>,
    fleet: Arc<MemoryFleet>,
    agents: &Agents,
    tick_ms: u64,
    max_ms: u64,
) -> Result<Vec<Step>, EngineError> {
    let mut agents = agents.clone();
    if agents.request_every_ms == 0 {
        agents.request_every_ms = DEFAULT_PULL_INTERVAL_MS;
    }
    let sim = Sim::new(clock.clone(), agents).with_fleet(fleet, Vec::new());
    run_sim(sim, engine, clock, tick_ms, max_ms)
}

/// How often an agent in pull mode asks for work unless told otherwise
/// (`flotilla-agent --pull-interval`).
pub const DEFAULT_PULL_INTERVAL_MS: u64 = 30_000;

/// Final counts per node-run state of a task.
pub fn counts(engine: &Engine, task: &str) -> Result<BTreeMap<String, usize>, EngineError> {
    Ok(crate::count_states(&engine.runs(task)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_outcomes_are_seeded_and_proportional() {
        let agents = Agents {
            random: Some(Random {
                seed: 7,
                fail: 0.2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let draw = |a: &Agents| -> Vec<AgentOutcome> {
            (0..1000).map(|i| a.outcome(&format!("n{i}"), 1)).collect()
        };
        let first = draw(&agents);
        assert_eq!(first, draw(&agents), "same seed, same outcomes");
        let fails = first.iter().filter(|o| **o == AgentOutcome::Fail).count();
        assert!((150..250).contains(&fails), "about 20% fail, got {fails}");
        let mut other = agents.clone();
        other.random.as_mut().unwrap().seed = 8;
        assert_ne!(first, draw(&other), "another seed, other outcomes");
    }

    #[test]
    fn attempts_script_retries_and_repeat_the_last() {
        let mut agents = Agents::default();
        agents
            .attempts
            .insert("n1".into(), vec![AgentOutcome::Fail, AgentOutcome::Succeed]);
        agents.nodes.insert("n1".into(), AgentOutcome::Hang);
        assert_eq!(agents.outcome("n1", 1), AgentOutcome::Fail);
        assert_eq!(agents.outcome("n1", 2), AgentOutcome::Succeed);
        assert_eq!(agents.outcome("n1", 5), AgentOutcome::Succeed);
        assert_eq!(agents.outcome("n2", 1), AgentOutcome::Succeed);
    }

    #[test]
    fn random_probabilities_are_checked() {
        let r = Random {
            fail: 0.7,
            reject: 0.5,
            ..Default::default()
        };
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("add up to 1.2")
        );
        let r = Random {
            hang: -0.1,
            ..Default::default()
        };
        assert_eq!(
            r.validate().unwrap_err(),
            SimError::NotAFraction {
                name: "hang",
                value: -0.1
            }
        );
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("random.hang is -0.1")
        );
    }
}
