//! Scenario files: a policy's test case in YAML. A scenario gives a fleet,
//! releases, control-plane versions, a task, what the simulated agents do over
//! time and what must come out (waves, verdicts, final states, events). Running
//! one drives the real engine on a virtual clock (`sim`) and compares; the
//! result carries a readable diff of expected against actual.
//! `flotilla policy test` and `flotilla_sdk::testing` are thin shells over this.

use crate::sim::{self, AgentOutcome, Change, Random, Sim};
use crate::store::MemoryStore;
use crate::{Engine, EngineError, PolicySource};
use flotilla_model::{Event, Node, Release, RunState, TaskSpec, TaskState};
use flotilla_policy::wasm::CompiledPolicy;
use flotilla_policy::world::{Clock, ManualClock, MemoryDelivery, MemoryFleet, World};
use flotilla_policy::{Limits, Policy, PolicyError, PolicyKind, RhaiPolicy, WasmRuntime};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// 2026-01-05 00:00 UTC, a Monday: where a scenario's virtual clock starts.
pub const DEFAULT_START: u64 = 1_767_571_200_000;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid scenario:\n{source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A span of virtual time, written with a unit: `90s`, `5m`, `2h`, `1d`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span(pub u64);

impl Span {
    pub fn ms(self) -> u64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(|d| Span(d.as_millis() as u64))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration ({e}): write it with a unit, like 90s, 5m, 2h or 1d"
                ))
            })
    }
}

/// One outcome, or one per attempt (`[fail, succeed]`: fails, then a retry succeeds).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcomes(pub Vec<AgentOutcome>);

impl<'de> Deserialize<'de> for Outcomes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Outcomes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "an outcome (succeed, fail, rollback-fails, reject, silent, hang) or a list of them, one per attempt",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Outcomes, E> {
                AgentOutcome::deserialize(serde::de::value::StrDeserializer::<E>::new(s))
                    .map(|o| Outcomes(vec![o]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Outcomes, A::Error> {
                let mut out = Vec::new();
                while let Some(o) = seq.next_element::<AgentOutcome>()? {
                    out.push(o);
                }
                if out.is_empty() {
                    return Err(serde::de::Error::custom("an empty list of outcomes"));
                }
                Ok(Outcomes(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `n` generated nodes `prefix00`, `prefix01`, ... (at least two digits).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    pub prefix: String,
    pub count: usize,
    pub version: String,
    /// Index of the first node.
    #[serde(default)]
    pub from: usize,
    #[serde(default, deserialize_with = "flotilla_model::pairs::deserialize")]
    pub labels: Vec<(String, String)>,
    #[serde(default, deserialize_with = "flotilla_model::pairs::deserialize")]
    pub attributes: Vec<(String, String)>,
    #[serde(default)]
    pub asset_path: String,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default = "yes")]
    pub schedulable: bool,
    #[serde(default = "yes")]
    pub online: bool,
}

fn yes() -> bool {
    true
}

impl Generate {
    fn nodes(&self) -> impl Iterator<Item = Node> + '_ {
        let last = self.from + self.count.saturating_sub(1);
        let width = last.to_string().len().max(2);
        (self.from..self.from + self.count).map(move |i| Node {
            id: format!("{}{i:0width$}", self.prefix),
            version: self.version.clone(),
            labels: self.labels.clone(),
            attributes: self.attributes.clone(),
            asset_path: self.asset_path.clone(),
            healthy: self.healthy,
            schedulable: self.schedulable,
            online: self.online,
            last_seen: 0,
        })
    }
}

/// What the simulated agents do.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSpec {
    /// The outcome of nodes not listed (default: succeed).
    #[serde(default)]
    pub default: AgentOutcome,
    /// Per node: an outcome, or a list with one per attempt (the last repeats).
    #[serde(default)]
    pub nodes: BTreeMap<String, Outcomes>,
    /// Seeded random outcomes for nodes not listed (instead of `default`).
    #[serde(default)]
    pub random: Option<Random>,
    /// From delivery to the final report (default 0s).
    #[serde(default)]
    pub latency: Span,
    /// Pull tasks: how often every online device asks for work (default 1m).
    #[serde(default)]
    pub request_every: Option<Span>,
}

/// Fields of a node that a timeline entry may change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSet {
    pub version: Option<String>,
    pub healthy: Option<bool>,
    pub schedulable: Option<bool>,
    pub online: Option<bool>,
    /// What the node's agent reports now (`status.metric`), replacing the last set.
    pub metrics: Option<BTreeMap<String, f64>>,
}

/// Something that happens at a point of virtual time (from the start):
/// exactly one of `offline`, `appear`, `set`, `promote`, `resume`, `pause`, `cancel`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct At {
    pub at: Span,
    /// The node `offline` and `set` apply to.
    #[serde(default)]
    pub node: Option<String>,
    /// The node goes offline for this long (its agent reports when it is back).
    #[serde(default)]
    pub offline: Option<Span>,
    /// A node registers now.
    #[serde(default)]
    pub appear: Option<Node>,
    #[serde(default)]
    pub set: Option<NodeSet>,
    /// An operator promotes the wave waiting for approval.
    #[serde(default)]
    pub promote: bool,
    /// An operator resumes the paused task.
    #[serde(default)]
    pub resume: bool,
    /// An operator pauses the task with this reason.
    #[serde(default)]
    pub pause: Option<String>,
    /// An operator cancels the task.
    #[serde(default)]
    pub cancel: bool,
    /// An operator rolls the task back with this reason.
    #[serde(default)]
    pub rollback: Option<String>,
}

/// An operator's command at a point of virtual time.
#[derive(Debug, Clone, PartialEq)]
enum Operator {
    Promote,
    Resume,
    Pause(String),
    Cancel,
    Rollback(String),
}

/// An event that must (or must not) be in the task's log: the kind exactly,
/// the node exactly if given, the detail containing `detail` if given, and
/// exactly `at` after the start if given.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub kind: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub at: Option<Span>,
}

impl EventMatch {
    fn matches(&self, e: &Event, start: u64) -> bool {
        self.at.is_none_or(|t| e.at == start + t.ms())
            && e.kind == self.kind
            && self
                .node
                .as_ref()
                .is_none_or(|n| e.node.as_ref() == Some(n))
            && self.detail.as_ref().is_none_or(|d| e.detail.contains(d))
    }
}

impl std::fmt::Display for EventMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kind)?;
        if let Some(n) = &self.node {
            write!(f, " {n}")?;
        }
        if let Some(d) = &self.detail {
            write!(f, " {d:?}")?;
        }
        if let Some(t) = self.at {
            write!(f, " at +{}", clock_text(t.ms()))?;
        }
        Ok(())
    }
}

/// What must come out. Text expectations (task, verdicts, node states) match
/// the actual text exactly or as a prefix that ends at a word boundary:
/// `abort` matches `abort: failure rate 50% ...`, `skipped: same-version`
/// matches `skipped: same-version: already at 1.13`, `failed` does not match
/// `failed-rolled-back`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The task is refused at creation, with this text (a prefix of the
    /// error, as other text expectations).
    #[serde(default)]
    pub refused: Option<String>,
    /// Final task state (`succeeded`, `failed: <reason>`, `paused`, `rolled-back`, ...).
    #[serde(default)]
    pub task: Option<String>,
    /// Node ids of each wave, in order.
    #[serde(default)]
    pub waves: Option<Vec<Vec<String>>>,
    /// Number of nodes in each wave, in order.
    #[serde(default)]
    pub wave_sizes: Option<Vec<usize>>,
    /// Every `evaluate` verdict in order (`proceed`, `pause: ...`, `abort: ...`);
    /// `wave 2: abort` also checks which wave it was for.
    #[serde(default)]
    pub verdicts: Option<Vec<String>>,
    /// Final state per node (`succeeded`, `skipped: unhealthy`, `failed-rolled-back`, ...).
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    /// Nodes per final state; states not listed are not checked.
    #[serde(default)]
    pub counts: BTreeMap<String, usize>,
    /// Events that must be in the task's log.
    #[serde(default)]
    pub events: Vec<EventMatch>,
    /// Events that must not be in the task's log.
    #[serde(default)]
    pub no_events: Vec<EventMatch>,
}

impl Expect {
    fn is_empty(&self) -> bool {
        self.refused.is_none()
            && self.task.is_none()
            && self.waves.is_none()
            && self.wave_sizes.is_none()
            && self.verdicts.is_none()
            && self.nodes.is_empty()
            && self.counts.is_empty()
            && self.events.is_empty()
            && self.no_events.is_empty()
    }
}

/// A scenario file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Default: the file name without `.yaml`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Virtual start time, Unix ms (default 2026-01-05 00:00 UTC, a Monday).
    #[serde(default)]
    pub start: Option<u64>,
    /// Virtual time step while nothing happens (default 1m).
    #[serde(default)]
    pub tick: Option<Span>,
    /// Give up after this much virtual time (default 14d).
    #[serde(default)]
    pub max: Option<Span>,
    /// Nodes, inline.
    #[serde(default)]
    pub fleet: Vec<Node>,
    /// A JSON array of nodes, relative to this file.
    #[serde(default)]
    pub fleet_file: Option<PathBuf>,
    /// Generated nodes.
    #[serde(default)]
    pub generate: Vec<Generate>,
    #[serde(default)]
    pub releases: Vec<Release>,
    /// Control-plane versions per component (`cloudcore: "1.13"`).
    #[serde(default)]
    pub control_plane: BTreeMap<String, String>,
    /// The task, as JSON task specs are written; its `policy` is the policy
    /// file, relative to this scenario.
    pub task: TaskSpec,
    #[serde(default)]
    pub agents: AgentsSpec,
    /// Fleet changes and operator commands (on `task`) over time.
    #[serde(default)]
    pub timeline: Vec<At>,
    pub expect: Expect,
    /// More tasks, each created at its time, with the same policy file, and
    /// checked against its own `expect`: two rollouts over one fleet (a node
    /// busy in one is skipped by the other), or a second one refused.
    #[serde(default)]
    pub more_tasks: Vec<MoreTask>,
}

/// A further task of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoreTask {
    /// When it is created (from the start; default at once, after `task`).
    #[serde(default)]
    pub at: Span,
    pub task: TaskSpec,
    pub expect: Expect,
}

/// A parsed, checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub path: PathBuf,
    pub name: String,
    pub file: ScenarioFile,
    nodes: Vec<Node>,
    changes: Vec<(u64, Change)>,
    operators: Vec<(u64, Operator)>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Scenario::parse(path, &text)
    }

    /// Parses `text` as the scenario at `path` (relative paths in it are
    /// resolved from `path`'s folder).
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let file: ScenarioFile =
            serde_saphyr::from_str(text).map_err(|source| ScenarioError::Parse {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        let invalid = |message: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let name = file.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "scenario".into())
        });
        if file.expect.is_empty() {
            return Err(invalid(
                "`expect` checks nothing: add task, waves, wave_sizes, verdicts, nodes, counts, events or no_events".into(),
            ));
        }
        for (i, more) in file.more_tasks.iter().enumerate() {
            if more.expect.is_empty() {
                return Err(invalid(format!(
                    "more_tasks[{i}].expect checks nothing: add refused, task, waves, wave_sizes, verdicts, nodes, counts, events or no_events"
                )));
            }
            if resolve(path, Path::new(&more.task.policy))
                != resolve(path, Path::new(&file.task.policy))
            {
                return Err(invalid(format!(
                    "more_tasks[{i}].task.policy is {:?}, task.policy is {:?}: a scenario tests one policy, so every task names the same file",
                    more.task.policy, file.task.policy
                )));
            }
        }
        if let Some(r) = &file.agents.random {
            r.validate().map_err(|e| invalid(format!("agents.{e}")))?;
        }
        if let (Some(w), Some(s)) = (&file.expect.waves, &file.expect.wave_sizes) {
            let sizes: Vec<usize> = w.iter().map(Vec::len).collect();
            if sizes != *s {
                return Err(invalid(format!(
                    "expect.waves has sizes {sizes:?} but expect.wave_sizes says {s:?}: keep one"
                )));
            }
        }

        let mut nodes = file.fleet.clone();
        if let Some(f) = &file.fleet_file {
            let p = resolve(path, f);
            let text = std::fs::read_to_string(&p).map_err(|source| ScenarioError::Read {
                path: p.clone(),
                source,
            })?;
            let more: Vec<Node> = serde_json::from_str(&text).map_err(|e| {
                invalid(format!(
                    "fleet_file {} is not a JSON array of nodes: {e}",
                    p.display()
                ))
            })?;
            nodes.extend(more);
        }
        for g in &file.generate {
            nodes.extend(g.nodes());
        }
        let mut seen = std::collections::HashSet::new();
        for n in &nodes {
            if !seen.insert(n.id.as_str()) {
                return Err(invalid(format!(
                    "node {} is in the fleet twice: give every node its own id",
                    n.id
                )));
            }
        }

        let start = file.start.unwrap_or(DEFAULT_START);
        let mut changes = Vec::new();
        let mut operators = Vec::new();
        for (i, a) in file.timeline.iter().enumerate() {
            let t = start + a.at.ms();
            let what = format!(
                "timeline[{i}] (at {})",
                humantime::format_duration(std::time::Duration::from_millis(a.at.ms()))
            );
            let actions = [
                a.offline.is_some(),
                a.appear.is_some(),
                a.set.is_some(),
                a.promote,
                a.resume,
                a.pause.is_some(),
                a.cancel,
                a.rollback.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if actions != 1 {
                return Err(invalid(format!(
                    "{what} has {actions} actions: give exactly one of offline, appear, set, promote, resume, pause, cancel, rollback"
                )));
            }
            let node = || {
                a.node.clone().ok_or_else(|| {
                    invalid(format!("{what}: say which `node` goes offline or changes"))
                })
            };
            if let Some(d) = a.offline {
                let node = node()?;
                changes.push((t, set_online(&node, false)));
                changes.push((t + d.ms(), set_online(&node, true)));
            } else if let Some(n) = &a.appear {
                changes.push((t, Change::Upsert(n.clone())));
            } else if let Some(s) = &a.set {
                changes.push((
                    t,
                    Change::Set {
                        node: node()?,
                        version: s.version.clone(),
                        healthy: s.healthy,
                        schedulable: s.schedulable,
                        online: s.online,
                        metrics: s.metrics.clone(),
                    },
                ));
            } else if a.promote {
                operators.push((t, Operator::Promote));
            } else if a.resume {
                operators.push((t, Operator::Resume));
            } else if let Some(r) = &a.pause {
                operators.push((t, Operator::Pause(r.clone())));
            } else if a.cancel {
                operators.push((t, Operator::Cancel));
            } else if let Some(r) = &a.rollback {
                operators.push((t, Operator::Rollback(r.clone())));
            }
        }
        operators.sort_by_key(|(t, _)| *t);
        Ok(Scenario {
            path: path.to_path_buf(),
            name,
            file,
            nodes,
            changes,
            operators,
        })
    }

    /// The policy the scenario names (`task.policy`, relative to the file).
    pub fn policy_path(&self) -> PathBuf {
        resolve(&self.path, Path::new(&self.file.task.policy))
    }

    /// Runs the scenario against the policy it names, or `policy` instead.
    pub fn run(&self, runtime: &WasmRuntime, policy: Option<&Path>) -> ScenarioReport {
        let path = policy
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.policy_path());
        match PolicyFile::open(&path, runtime) {
            Ok(source) => self.run_with(&path, Arc::new(source)),
            Err(e) => self.run_failed(&path, e.to_string()),
        }
    }

    /// The report of this scenario when it could not run.
    pub fn run_failed(&self, policy: &Path, error: String) -> ScenarioReport {
        ScenarioReport::could_not_run(&self.name, &self.path, policy, error)
    }

    /// Runs the scenario with policies from `source` (`policy` is only the
    /// name shown in the report).
    pub fn run_with(&self, policy: &Path, source: Arc<dyn PolicySource>) -> ScenarioReport {
        match self.simulate(source) {
            Ok(actual) => self.compare(policy, actual),
            Err(e) => self.run_failed(policy, e.to_string()),
        }
    }

    fn simulate(&self, source: Arc<dyn PolicySource>) -> Result<Actual, EngineError> {
        let f = &self.file;
        let start = f.start.unwrap_or(DEFAULT_START);
        let tick = f.tick.map_or(60_000, Span::ms).max(1);
        let max = f.max.map_or(14 * 86_400_000, Span::ms);
        let clock = Arc::new(ManualClock::new(start));
        let fleet = Arc::new(MemoryFleet::new(self.nodes.clone()));
        let mut engine = Engine::new(
            Arc::new(MemoryStore::new()),
            fleet.clone(),
            Arc::new(MemoryDelivery {
                releases: f.releases.clone(),
                control_plane: f.control_plane.clone(),
            }),
            clock.clone(),
            source,
        )?;
        let mut agents = sim::Agents {
            default: f.agents.default,
            random: f.agents.random.clone(),
            latency_ms: f.agents.latency.ms(),
            ..Default::default()
        };
        for (node, outcomes) in &f.agents.nodes {
            agents.attempts.insert(node.clone(), outcomes.0.clone());
        }
        if f.task.method == flotilla_model::Method::Pull {
            agents.request_every_ms = f.agents.request_every.map_or(60_000, Span::ms).max(1);
        }
        let mut sim = Sim::new(clock.clone(), agents).with_fleet(fleet, self.changes.clone());
        // `task.policy` is a file here, which `source` already holds; the
        // engine takes policy names. Tasks are created in time order, the
        // main one first.
        let mut due: Vec<(u64, usize, TaskSpec)> = std::iter::once((start, 0, f.task.clone()))
            .chain(
                f.more_tasks
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (start + m.at.ms(), i + 1, m.task.clone())),
            )
            .collect();
        due.sort_by_key(|(t, i, _)| (*t, *i));
        let mut due = due.into_iter().peekable();
        // Each task's id, or why the engine refused it; `None` until its time.
        let mut created: Vec<Option<Result<String, EngineError>>> =
            (0..1 + f.more_tasks.len()).map(|_| None).collect();
        let mut operators = self.operators.iter().peekable();
        let mut operator_log = Vec::new();
        loop {
            let now = clock.now();
            while let Some((_, i, mut spec)) = due.next_if(|(t, _, _)| *t <= now) {
                spec.policy = local_policy_name(Path::new(&spec.policy));
                created[i] = match engine.create(spec) {
                    Ok(task) => Some(Ok(task.id)),
                    Err(EngineError::Store(e)) => return Err(e.into()),
                    Err(refused) => Some(Err(refused)),
                };
            }
            while let Some((_, op)) = operators.next_if(|(t, _)| *t <= now) {
                let Some(Ok(main)) = &created[0] else {
                    continue;
                };
                let done = match op {
                    Operator::Promote => engine.promote(main).map(drop),
                    Operator::Resume => engine.resume(main).map(drop),
                    Operator::Pause(r) => engine.pause(main, r).map(drop),
                    Operator::Cancel => engine.cancel(main).map(drop),
                    Operator::Rollback(r) => engine
                        .rollback(main, r)
                        .map(|(_, commands)| sim.handle(commands)),
                };
                if let Err(e) = done {
                    operator_log.push(sim::Step {
                        at: now,
                        what: format!("operator {op:?} refused: {e}"),
                    });
                }
            }
            let idle = sim.step(&mut engine)?;
            let more_to_come = due.peek().is_some();
            if (!engine.has_active() && !more_to_come) || now - start > max {
                break;
            }
            if idle {
                // Stop once every task waits for a person and nothing else
                // is coming: no task, report, fleet change or operator command.
                if operators.peek().is_none() && !sim.busy() && !more_to_come {
                    let mut all_waiting = true;
                    for id in created.iter().flatten().flatten() {
                        let t = engine.task(id)?;
                        let waiting = !t.state.active()
                            || ((matches!(t.state, TaskState::Paused(_)) || t.awaiting_approval)
                                && engine.runs(id)?.iter().all(|r| !r.state.in_flight()));
                        all_waiting &= waiting;
                    }
                    if all_waiting {
                        break;
                    }
                }
                clock.advance(tick);
            }
        }
        let mut timeline = sim.into_timeline();
        timeline.extend(operator_log);
        timeline.sort_by_key(|s| s.at);
        let mut tasks = Vec::new();
        for c in created {
            tasks.push(match c {
                None => TaskActual::Refused("never created".into()),
                Some(Err(refused)) => TaskActual::Refused(refused.to_string()),
                Some(Ok(id)) => TaskActual::Ran {
                    task: Box::new(engine.task(&id)?),
                    runs: engine
                        .runs(&id)?
                        .into_iter()
                        .map(|r| (r.node_id.clone(), r.state))
                        .collect(),
                    events: engine.events(&id, 0, usize::MAX)?,
                },
            });
        }
        Ok(Actual {
            tasks,
            timeline,
            start,
        })
    }

    /// One task's expectations against what it did (or its refusal).
    fn compare_task(e: &Expect, got: &TaskActual, start: u64, lines: &mut Lines) {
        let (task, runs, events) = match got {
            TaskActual::Refused(why) => {
                let want = e.refused.as_deref().unwrap_or("(created)");
                lines.text("refused", want, why);
                return;
            }
            TaskActual::Ran { task, runs, events } => (task, runs, events),
        };
        if let Some(want) = &e.refused {
            lines.text("refused", want, "(created)");
        }

        if let Some(want) = &e.task {
            lines.text("task", want, &task_text(&task.state));
        }
        if let Some(want) = &e.waves {
            let got: Vec<String> = task.waves.iter().map(|w| w.nodes.join(" ")).collect();
            let want: Vec<String> = want.iter().map(|w| w.join(" ")).collect();
            lines.list("wave", &want, &got, |a, b| a == b);
        }
        if let Some(want) = &e.wave_sizes {
            let got: Vec<String> = task
                .waves
                .iter()
                .map(|w| format!("{} nodes", w.nodes.len()))
                .collect();
            let want: Vec<String> = want.iter().map(|n| format!("{n} nodes")).collect();
            lines.list("wave", &want, &got, |a, b| a == b);
        }
        if let Some(want) = &e.verdicts {
            let got: Vec<String> = events
                .iter()
                .filter(|e| e.kind == "policy.verdict")
                .map(|e| e.detail.clone())
                .collect();
            lines.list("verdict", want, &got, |want, got| {
                // `wave 2: abort` checks the wave too; `abort` only the verdict.
                let verdict = got.split_once(": ").map_or(got, |(_, v)| v);
                if want.starts_with("wave ") {
                    text_matches(want, got)
                } else {
                    text_matches(want, verdict)
                }
            });
        }
        for (node, want) in &e.nodes {
            let got = runs
                .get(node)
                .map_or_else(|| "not in the task".to_string(), run_text);
            lines.text(&format!("node {node}"), want, &got);
        }
        if !e.counts.is_empty() {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for state in runs.values() {
                *counts.entry(state.name()).or_default() += 1;
            }
            for (state, want) in &e.counts {
                let got = counts.get(state.as_str()).copied().unwrap_or(0);
                lines.exact(
                    &format!("count {state}"),
                    &want.to_string(),
                    &got.to_string(),
                );
            }
        }
        for m in &e.events {
            let got = match events.iter().find(|ev| m.matches(ev, start)) {
                Some(_) => "occurs".to_string(),
                None => "missing".to_string(),
            };
            lines.exact(&format!("event {m}"), "occurs", &got);
        }
        for m in &e.no_events {
            let got = match events.iter().find(|ev| m.matches(ev, start)) {
                Some(ev) => format!("occurs at +{}: {}", clock_text(ev.at - start), ev.detail),
                None => "none".to_string(),
            };
            lines.exact(&format!("no event {m}"), "none", &got);
        }
    }

    fn compare(&self, policy: &Path, actual: Actual) -> ScenarioReport {
        let mut lines = Lines::default();
        let expects = std::iter::once(&self.file.expect)
            .chain(self.file.more_tasks.iter().map(|m| &m.expect));
        for (i, (e, got)) in expects.zip(&actual.tasks).enumerate() {
            lines.prefix = if i == 0 {
                String::new()
            } else {
                format!("task {}: ", i + 1)
            };
            Self::compare_task(e, got, actual.start, &mut lines);
        }
        let main = &actual.tasks[0];
        let passed = lines.mismatches.is_empty();
        let diff = if passed {
            String::new()
        } else {
            similar::TextDiff::from_lines(&lines.expected, &lines.actual)
                .unified_diff()
                .context_radius(2)
                .header("expected", "actual")
                .to_string()
        };
        ScenarioReport {
            name: self.name.clone(),
            path: self.path.clone(),
            policy: policy.to_path_buf(),
            passed,
            error: None,
            mismatches: lines.mismatches,
            diff,
            task: Some(match main {
                TaskActual::Refused(why) => format!("refused: {why}"),
                TaskActual::Ran { task, .. } => task_text(&task.state),
            }),
            events: match actual.tasks.into_iter().next() {
                Some(TaskActual::Ran { events, .. }) => events,
                _ => Vec::new(),
            },
            timeline: actual
                .timeline
                .into_iter()
                .map(|s| format!("+{} {}", clock_text(s.at - actual.start), s.what))
                .collect(),
        }
    }
}

fn set_online(node: &str, online: bool) -> Change {
    Change::Set {
        node: node.to_string(),
        version: None,
        healthy: None,
        schedulable: None,
        online: Some(online),
        metrics: None,
    }
}

fn resolve(scenario: &Path, relative: &Path) -> PathBuf {
    match scenario.parent() {
        Some(dir) if relative.is_relative() => dir.join(relative),
        _ => relative.to_path_buf(),
    }
}

/// `HH:MM:SS` (hours may exceed 24) of a span of virtual ms.
fn clock_text(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn task_text(state: &TaskState) -> String {
    match state {
        TaskState::Paused(r) | TaskState::Failed(r) | TaskState::RollingBack(r) => {
            format!("{}: {r}", state.name())
        }
        other => other.name().to_string(),
    }
}

fn run_text(state: &RunState) -> String {
    match state {
        RunState::Skipped { reason, detail } => {
            format!("skipped: {}: {detail}", reason.as_str())
        }
        RunState::FailedRolledBack { error, .. } | RunState::FailedRollbackFailed { error, .. } => {
            format!("{}: {error}", state.name())
        }
        RunState::Rejected { reason, .. } => format!("rejected: {reason}"),
        other => other.name().to_string(),
    }
}

/// `want` is `got`, or a prefix of it ending at a word boundary.
fn text_matches(want: &str, got: &str) -> bool {
    let want = want.trim();
    got == want
        || got.strip_prefix(want).is_some_and(|rest| {
            !rest.starts_with(|c: char| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

/// What a run produced.
struct Actual {
    /// The main task, then `more_tasks`, in the file's order.
    tasks: Vec<TaskActual>,
    timeline: Vec<sim::Step>,
    start: u64,
}

/// What one task of a run did.
enum TaskActual {
    /// The engine refused to create it: why.
    Refused(String),
    Ran {
        task: Box<flotilla_model::Task>,
        runs: BTreeMap<String, RunState>,
        events: Vec<Event>,
    },
}

/// Expected and actual, one check a line, so a line diff shows what differs.
/// A check that passes prints the expected text on both sides.
#[derive(Default)]
struct Lines {
    expected: String,
    actual: String,
    mismatches: Vec<Mismatch>,
    /// Put before every label (`task 2: `).
    prefix: String,
}

impl Lines {
    fn push(&mut self, what: &str, want: &str, got: &str, ok: bool) {
        let what = &format!("{}{what}", self.prefix);
        let _ = writeln!(self.expected, "{what}: {want}");
        if ok {
            let _ = writeln!(self.actual, "{what}: {want}");
        } else {
            let _ = writeln!(self.actual, "{what}: {got}");
            self.mismatches.push(Mismatch {
                what: what.to_string(),
                expected: want.to_string(),
                actual: got.to_string(),
            });
        }
    }

    fn exact(&mut self, what: &str, want: &str, got: &str) {
        self.push(what, want, got, want == got);
    }

    fn text(&mut self, what: &str, want: &str, got: &str) {
        self.push(what, want, got, text_matches(want, got));
    }

    /// Item by item; a missing or extra item is its own mismatch.
    fn list(
        &mut self,
        what: &str,
        want: &[String],
        got: &[String],
        ok: impl Fn(&str, &str) -> bool,
    ) {
        for i in 0..want.len().max(got.len()) {
            let label = format!("{}{what} {}", self.prefix, i + 1);
            match (want.get(i), got.get(i)) {
                (Some(w), Some(g)) => self.push(&label, w, g, ok(w, g)),
                (Some(w), None) => {
                    let _ = writeln!(self.expected, "{label}: {w}");
                    self.mismatches.push(Mismatch {
                        what: label,
                        expected: w.clone(),
                        actual: "(none)".into(),
                    });
                }
                (None, Some(g)) => {
                    let _ = writeln!(self.actual, "{label}: {g}");
                    self.mismatches.push(Mismatch {
                        what: label,
                        expected: "(none)".into(),
                        actual: g.clone(),
                    });
                }
                (None, None) => {}
            }
        }
    }
}

/// One check that failed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatch {
    pub what: String,
    pub expected: String,
    pub actual: String,
}

/// The result of running one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub path: PathBuf,
    pub policy: PathBuf,
    pub passed: bool,
    /// The scenario could not run (policy does not load, engine refused the task).
    pub error: Option<String>,
    pub mismatches: Vec<Mismatch>,
    /// Unified diff of expected against actual (empty when passed).
    pub diff: String,
    /// Final task state.
    pub task: Option<String>,
    #[serde(skip)]
    pub events: Vec<Event>,
    /// What the simulated world did (deliveries, fleet changes), `+HH:MM:SS what`.
    #[serde(skip)]
    pub timeline: Vec<String>,
}

impl ScenarioReport {
    /// A scenario that could not run: it does not parse, its policy does not
    /// load, or the engine refused its task.
    pub fn could_not_run(name: &str, path: &Path, policy: &Path, error: String) -> ScenarioReport {
        ScenarioReport {
            name: name.to_string(),
            path: path.to_path_buf(),
            policy: policy.to_path_buf(),
            passed: false,
            error: Some(error),
            mismatches: Vec::new(),
            diff: String::new(),
            task: None,
            events: Vec::new(),
            timeline: Vec::new(),
        }
    }

    /// What went wrong, for a person: the error, or the diff.
    pub fn explain(&self) -> String {
        if let Some(e) = &self.error {
            return format!("scenario {} could not run: {e}", self.name);
        }
        if self.passed {
            return format!("scenario {} passed", self.name);
        }
        format!(
            "scenario {} ({}) failed against {}:\n{}",
            self.name,
            self.path.display(),
            self.policy.display(),
            self.diff
        )
    }

    /// The task's event log, one line each, for `--verbose` output.
    pub fn event_log(&self) -> String {
        let start = self.events.first().map_or(0, |e| e.at);
        let mut out = String::new();
        for e in &self.events {
            let node = e
                .node
                .as_deref()
                .map(|n| format!(" {n}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "+{} {}{node} {}",
                clock_text(e.at - start),
                e.kind,
                e.detail
            );
        }
        out
    }
}

/// The policy name a local run (a scenario, `flotilla simulate`) gives the
/// task for the policy file at `path`: its stem made a valid name
/// ([`flotilla_model::check_name`]), or `policy`.
pub fn local_policy_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '-',
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(63)
        .collect();
    if flotilla_model::check_name("policy", &name).is_ok() {
        name
    } else {
        "policy".into()
    }
}

/// A policy file loaded once and instantiated for every task that names it.
pub enum PolicyFile {
    Wasm(Box<CompiledPolicy>),
    Rhai(PathBuf),
}

impl PolicyFile {
    /// Loads (and for a component, compiles) `path` and checks it
    /// instantiates, so a broken policy is reported before anything runs.
    pub fn open(path: &Path, runtime: &WasmRuntime) -> Result<PolicyFile, PolicyError> {
        let file = match PolicyKind::of(path)? {
            PolicyKind::Wasm => PolicyFile::Wasm(Box::new(runtime.load_file(path)?)),
            PolicyKind::Rhai => PolicyFile::Rhai(path.to_path_buf()),
        };
        file.load("", World::empty())?;
        Ok(file)
    }
}

impl PolicySource for PolicyFile {
    fn load(&self, _name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        Ok(match self {
            PolicyFile::Wasm(c) => Box::new(c.instantiate(world, Limits::default())?),
            PolicyFile::Rhai(p) => Box::new(RhaiPolicy::load_file(p, world, Limits::default())?),
        })
    }
}

/// Scenario files under `paths`: files as given, folders searched recursively
/// for `*.yaml` / `*.yml`, sorted.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ScenarioError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(ScenarioError::Read {
                path: p.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ScenarioError> {
    let read = |e| ScenarioError::Read {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("/tmp/s/case.yaml"), text)
    }

    const MINIMAL: &str = "
task:
  name: t
  package: edgecore
  target: {version: '1.13'}
  policy: ../p.rhai
expect:
  task: succeeded
";

    #[test]
    fn a_minimal_scenario_parses_with_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.name, "case");
        assert_eq!(s.policy_path(), Path::new("/tmp/s/../p.rhai"));
        assert_eq!(s.file.task.node_timeout_seconds, 300);
        assert_eq!(s.file.agents.default, AgentOutcome::Succeed);
    }

    #[test]
    fn a_policy_file_gives_the_task_a_valid_policy_name() {
        for (path, name) in [
            ("../../canary.rhai", "canary"),
            ("/x/My Policy.wasm", "my-policy"),
            ("_private.rhai", "private"),
            ("..", "policy"),
            ("", "policy"),
        ] {
            assert_eq!(local_policy_name(Path::new(path)), name, "{path}");
        }
    }

    #[test]
    fn a_timeline_sets_the_metrics_a_policy_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("guard.rhai"),
            r#"
            fn plan(ctx, nodes) { nodes.map(|n| #{ name: n.id, nodes: [n.id] }) }
            fn evaluate(ctx, report) {
                let load = metric("n1", "load1") ?? 0.0;
                if load > 4.0 { return #{ verdict: "pause", reason: `n1 load1 ${load}` }; }
                #{ verdict: "proceed" }
            }
            "#,
        )
        .unwrap();
        let path = dir.path().join("metrics.yaml");
        std::fs::write(
            &path,
            "fleet:\n  - {id: n1, version: \"1.0\"}\n  - {id: n2, version: \"1.0\"}\n\
             task: {name: t, package: p, target: {version: \"2.0\"}, policy: guard.rhai}\n\
             agents: {latency: 2m}\n\
             timeline:\n  - {at: 1m, node: n1, set: {metrics: {load1: 9.5}}}\n\
             expect:\n  task: \"paused: n1 load1 9.5\"\n  nodes: {n1: succeeded, n2: queued}\n",
        )
        .unwrap();
        let scenario = Scenario::load(&path).unwrap();
        let report = scenario.run(&WasmRuntime::new(None).unwrap(), None);
        assert!(report.passed, "{}\n{:?}", report.diff, report.error);
        assert!(
            report
                .timeline
                .iter()
                .any(|l| l.ends_with("node n1: metrics load1=9.5")),
            "{:?}",
            report.timeline
        );
    }

    #[test]
    fn an_unknown_field_names_the_field_and_the_line() {
        let text = MINIMAL.replace("expect:", "expct:\n  task: succeeded\nexpect:");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `expct`"), "{err}");
        assert!(err.contains("line 7") || err.contains(":7:"), "{err}");
        let text = MINIMAL.replace("  package", "  concurency: 3\n  package");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `concurency`"), "{err}");
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let err = parse(&format!("{MINIMAL}tick: 5\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("write it with a unit"), "{err}");
        let err = parse(&format!("{MINIMAL}agents:\n  nodes:\n    n1: explode\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("explode"), "{err}");
        let err = parse(&MINIMAL.replace("expect:\n  task: succeeded\n", "expect: {}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`expect` checks nothing"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}timeline:\n  - at: 5m\n    promote: true\n    resume: true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("timeline[0] (at 5m) has 2 actions"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}timeline:\n  - at: 5m\n    offline: 1h\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("say which `node`"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}agents:\n  random: {{seed: 1, fail: 1.5}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("agents.random.fail is 1.5"), "{err}");
        let err = parse(&format!("{MINIMAL}generate:\n  - {{prefix: n, count: 2, version: '1'}}\n  - {{prefix: n, count: 1, version: '1'}}\n")).unwrap_err().to_string();
        assert!(err.contains("node n00 is in the fleet twice"), "{err}");
    }

    #[test]
    fn outcomes_are_one_or_one_per_attempt() {
        let s = parse(&format!(
            "{MINIMAL}agents:\n  latency: 30s\n  nodes:\n    n1: fail\n    n2: [fail, succeed]\n"
        ))
        .unwrap();
        assert_eq!(s.file.agents.nodes["n1"].0, vec![AgentOutcome::Fail]);
        assert_eq!(
            s.file.agents.nodes["n2"].0,
            vec![AgentOutcome::Fail, AgentOutcome::Succeed]
        );
        assert_eq!(s.file.agents.latency.ms(), 30_000);
    }

    #[test]
    fn generated_ids_are_zero_padded() {
        let s = parse(&format!(
            "{MINIMAL}generate:\n  - {{prefix: edge-, count: 3, version: 1.12, from: 9}}\n"
        ))
        .unwrap();
        let ids: Vec<&str> = s.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["edge-09", "edge-10", "edge-11"]);
        assert_eq!(s.nodes[0].version, "1.12");
    }

    #[test]
    fn text_matches_at_word_boundaries() {
        assert!(text_matches("abort", "abort: failure rate 50%"));
        assert!(text_matches(
            "skipped: same-version",
            "skipped: same-version: already at 1.13"
        ));
        assert!(!text_matches("failed", "failed-rolled-back: x"));
        assert!(!text_matches("failure rate 5", "failure rate 50%"));
        assert!(text_matches("succeeded", "succeeded"));
    }
}
