//! The rollout engine: turns a task and its policy into waves of node upgrades.
//!
//! The engine is a synchronous state machine driven from outside: `tick`
//! advances every active task at the clock's current time and returns the
//! commands to send to agents; `report` applies what an agent said; `request`
//! answers a device asking for work (pull). It takes its world as traits
//! (store, fleet, delivery, clock, policies), so a test builds it in memory and
//! the simulator drives it on a virtual clock. Every change is committed to the
//! store before the command that depends on it is returned.

use crate::store::{Store, StoreError};
use crate::window::Schedule;
use flotilla_model::run::IllegalTransition;
use flotilla_model::{
    Admission, Backup, Event, Hook, Method, Node, NodeRun, Offer, RunEvent, RunState, Scope,
    Selection, Selector, SkipReason, Target, Task, TaskContext, TaskEvent, TaskSpec, TaskState,
    Verdict, WaveReport,
};
use flotilla_policy::world::{Clock, Delivery, Fleet, World};
use flotilla_policy::{Policy, PolicyError};
use status::PolicyStatusView;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub mod mem;
pub mod scenario;
pub mod sim;
mod status;
pub mod store;
/// Maintenance windows (the `flotilla-window` crate, shared with the policy hosts).
pub use flotilla_window as window;

/// How often an increment task looks for nodes that registered later.
const SCAN_EVERY_MS: u64 = 60_000;

/// Loads the policy a task names, bound to the task's world.
pub trait PolicySource: Send + Sync {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError>;

    /// Keeps the bytes `name` has now, so [`PolicySource::load_pinned`]
    /// finds them whatever is uploaded later, and returns their hex SHA-256.
    /// `None`: this source keeps no copies (tasks load by name).
    fn pin(&self, name: &str) -> Result<Option<String>, PolicyError> {
        let _ = name;
        Ok(None)
    }

    /// Loads the bytes of `name` whose SHA-256 is `sha256`, as pinned.
    fn load_pinned(
        &self,
        name: &str,
        sha256: &str,
        world: World,
    ) -> Result<Box<dyn Policy>, PolicyError> {
        let _ = sha256;
        self.load(name, world)
    }
}

/// Work for an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Install `version` of `package` (push mode; in pull mode the same data
    /// is the answer to the device's request).
    Deliver {
        task: String,
        node: String,
        package: String,
        version: String,
        backup: Backup,
        permanent: bool,
    },
    /// Put `version` back (a task rollback).
    Restore {
        task: String,
        node: String,
        package: String,
        version: String,
    },
    /// Make the trial release `version` permanent (a trial task's wave was
    /// judged healthy).
    MakePermanent {
        task: String,
        node: String,
        package: String,
        version: String,
    },
}

/// Why a node-run transition was not applied; the engine turns it into a
/// refusal of the call that asked for it.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("node {node} is not in task {task}")]
    NotInTask { node: String, task: String },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("node {node} was not asked to make a release permanent")]
    NotCommitting { node: String },
}

/// Why the engine refuses an operator's or an agent's call on a task (an
/// [`EngineError::Refused`]): the task is as it was.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the task is not active")]
    NotActive,
    #[error("no wave is waiting for approval")]
    NoWaveAwaiting,
    #[error("a {0} task cannot be rolled back")]
    CannotRollBack(&'static str),
    #[error("node {node} is busy in task {other}; finish or cancel that first")]
    NodeBusy { node: String, other: String },
    /// A report that names another task than the one its node is in.
    #[error("node {node} is not in task {named} (it is in task {actual}); the report is ignored")]
    OtherTask {
        node: String,
        named: String,
        actual: String,
    },
    /// The task's `params.schedule` is not a schedule.
    #[error("params.schedule: {0}")]
    Schedule(#[source] serde_json::Error),
    /// The task's state does not allow this step (resume a running task).
    #[error(transparent)]
    State(#[from] flotilla_model::task::IllegalTaskTransition),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Spec(#[from] flotilla_model::SpecError),
    #[error("no task {0}")]
    NoTask(String),
    #[error("node {node} is in no active task")]
    NotInTask { node: String },
    #[error("task {task}: {reason}")]
    Refused { task: String, reason: Refusal },
    #[error("task {task}: {source}")]
    Transition {
        task: String,
        #[source]
        source: TransitionError,
    },
    /// Another active task already takes `package` to this target: a second
    /// one (a replayed webhook, a double click) would race it for its nodes.
    #[error(
        "task {task} is already taking {package} to {target}; wait for it to end or cancel it first"
    )]
    Active {
        task: String,
        package: String,
        target: String,
    },
    /// Task names say which rollout is which: two active ones may not share one.
    #[error(
        "task {task} is active under the name {name:?}; choose another name, or wait for it to end or cancel it first"
    )]
    NameTaken { name: String, task: String },
    /// Every node in scope runs a newer version than the target, and the
    /// spec does not say `downgrade: true`.
    #[error(
        "all {nodes} nodes in scope run a version newer than {target}: this task would only downgrade; set `downgrade: true` if that is what you mean"
    )]
    Downgrade { target: String, nodes: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// An active task held in memory beside its stored copy.
struct LiveTask {
    task: Task,
    ctx: TaskContext,
    schedule: Schedule,
    policy: Option<Box<dyn Policy>>,
    runs: BTreeMap<String, NodeRun>,
    /// Runs changed since the last commit.
    dirty: Vec<String>,
    /// Events since the last commit.
    events: Vec<Event>,
    next_seq: u64,
    /// Last look for new nodes (increment tasks).
    last_scan: Option<u64>,
    /// What the policy reads through `status` (the runs, lent per call).
    status: Arc<PolicyStatusView>,
    /// The disk failed reading the policy: since when, and when it was last
    /// logged (a fault is retried every tick, logged once a minute).
    policy_fault: Option<(u64, u64)>,
}

impl LiveTask {
    /// Runs whose work is out with an agent (handed over, not yet reported
    /// finished). A task that ended keeps its nodes while it has any: a
    /// cancelled or aborted task drains, so no other task touches a node
    /// an agent is still upgrading.
    fn in_flight(&self) -> bool {
        self.runs.values().any(out_with_agent)
    }

    /// Its targeting and planning finished (a plan was stored; tasks of
    /// runners before `plan_rev` have their waves).
    fn planned(&self) -> bool {
        self.task.plan_rev > 0 || !self.task.waves.is_empty()
    }

    fn event(&mut self, at: u64, node: Option<&str>, kind: &str, detail: impl Into<String>) {
        let policy_sha256 = (kind.starts_with("policy.") || kind == "task.created")
            .then(|| self.task.policy_sha256.clone())
            .flatten();
        self.events.push(Event {
            seq: self.next_seq,
            at,
            node: node.map(str::to_string),
            kind: kind.to_string(),
            detail: detail.into(),
            policy_sha256,
        });
        self.next_seq += 1;
    }

    /// Applies a node-run transition and records it.
    fn transition(&mut self, node: &str, event: RunEvent, at: u64) -> Result<(), TransitionError> {
        let run = self
            .runs
            .get_mut(node)
            .ok_or_else(|| TransitionError::NotInTask {
                node: node.to_string(),
                task: self.task.id.clone(),
            })?;
        if let (true, RunEvent::Rejected { reason }) = (run.committing, &event) {
            // The agent could not make the trial release permanent: the node
            // stays upgraded (a restart reverts it); a person decides.
            run.committing = false;
            run.updated_at = at;
            let detail = format!("not made permanent: {reason}");
            self.dirty.push(node.to_string());
            self.event(at, Some(node), "node.not-permanent", detail);
            return Ok(());
        }
        let next = run.state.clone().next(event.clone())?;
        let detail = match &next {
            RunState::Skipped { reason, detail } => format!("{}: {detail}", reason.as_str()),
            RunState::FailedRolledBack { error, .. }
            | RunState::FailedRollbackFailed { error, .. } => error.clone(),
            RunState::Rejected { reason, .. } => reason.clone(),
            other => other.name().to_string(),
        };
        if matches!(event, RunEvent::Offer | RunEvent::Rollback) {
            run.attempts += 1;
            run.started_at = Some(at);
        }
        if matches!(event, RunEvent::MadePermanent) {
            if !run.committing {
                return Err(TransitionError::NotCommitting {
                    node: node.to_string(),
                });
            }
            run.committing = false;
        }
        run.state = next;
        run.updated_at = at;
        let kind = if matches!(event, RunEvent::MadePermanent) {
            "node.permanent".to_string()
        } else {
            format!("node.{}", run.state.name())
        };
        self.dirty.push(node.to_string());
        self.event(at, Some(node), &kind, detail);
        Ok(())
    }

    /// Cancels runs that have not started: pending and queued, and offered
    /// ones too when `offered` (an agent may already be working on those).
    fn cancel_waiting(&mut self, at: u64, offered: bool) {
        let waiting: Vec<String> = self
            .runs
            .values()
            .filter(|r| match r.state {
                RunState::Pending | RunState::Queued { .. } => true,
                RunState::Offered { .. } => offered,
                _ => false,
            })
            .map(|r| r.node_id.clone())
            .collect();
        for node in waiting {
            // Every state selected above accepts `cancel`.
            let _ = self.transition(&node, RunEvent::Cancel, at);
        }
    }

    fn task_transition(&mut self, event: TaskEvent, at: u64) -> Result<(), EngineError> {
        let next =
            self.task
                .state
                .clone()
                .next(event.clone())
                .map_err(|e| EngineError::Refused {
                    task: self.task.id.clone(),
                    reason: e.into(),
                })?;
        let detail = match &next {
            TaskState::Paused(r) | TaskState::Failed(r) | TaskState::RollingBack(r) => r.clone(),
            other => other.name().to_string(),
        };
        self.task.state = next;
        self.task.updated_at = at;
        let kind = format!("task.{}", self.task.state.name());
        self.event(at, None, &kind, detail);
        Ok(())
    }

    /// [`LiveTask::transition`] for a call that must refuse when it does not apply.
    fn apply(&mut self, node: &str, event: RunEvent, at: u64) -> Result<(), EngineError> {
        self.transition(node, event, at)
            .map_err(|source| EngineError::Transition {
                task: self.task.id.clone(),
                source,
            })
    }

    /// Nodes upgrading at once in the current wave (`usize::MAX`: unbounded).
    fn concurrency(&self) -> usize {
        let wave = self.task.waves.get(self.task.current_wave as usize);
        match (
            wave.map_or(0, |w| w.concurrency),
            self.task.spec.concurrency,
        ) {
            (0, 0) => usize::MAX,
            (0, c) | (c, _) => c as usize,
        }
    }

    /// Re-queues the wave's failed runs that have retries left for their
    /// failure kind, each not before its backoff.
    fn retry_failed(&mut self, wave: u32, now: u64) {
        let (failed, timed_out) = self.task.spec.retries_per_kind();
        if failed == 0 && timed_out == 0 {
            return;
        }
        let again: Vec<(String, u32, u32, &'static str)> = self
            .wave_runs(wave)
            .filter_map(|r| {
                let allowed = match r.state {
                    RunState::FailedRolledBack { .. } => failed,
                    RunState::TimedOut { .. } | RunState::Unknown { .. } => timed_out,
                    _ => return None,
                };
                (r.attempts <= allowed)
                    .then(|| (r.node_id.clone(), r.attempts, allowed + 1, r.state.name()))
            })
            .collect();
        for (node, attempt, of, after) in again {
            let wait = self.task.spec.retry_backoff_ms(attempt);
            if self.transition(&node, RunEvent::Retry, now).is_err() {
                continue;
            }
            if let Some(run) = self.runs.get_mut(&node) {
                run.not_before = Some(now + wait);
            }
            let detail = format!(
                "attempt {} of {of} after {after}, not before {}",
                attempt + 1,
                now + wait
            );
            self.event(now, Some(&node), "node.retry", detail);
        }
    }

    /// One walk of the wave on every tick (the full report, which also
    /// walks every run of the task, only once the wave has ended).
    fn tally(&self, wave: u32, now: u64) -> Tally {
        let push = self.task.spec.method == Method::Push && self.schedule.is_open(now);
        let mut tally = Tally {
            unfinished: 0,
            running: 0,
            ready: push.then(Vec::new),
        };
        for r in self.wave_runs(wave) {
            if !r.state.finished() {
                tally.unfinished += 1;
            }
            if r.state.in_flight() {
                tally.running += 1;
            } else if let Some(ready) = &mut tally.ready
                && matches!(r.state, RunState::Queued { .. })
                && r.not_before.is_none_or(|t| t <= now)
            {
                ready.push(r.node_id.clone());
            }
        }
        tally
    }

    /// The report of an ended wave once its soak is over; starts the soak
    /// on the first look.
    fn soaked(&mut self, wave: u32, now: u64) -> Option<WaveReport> {
        let soak_seconds = self.task.waves[wave as usize].soak_seconds;
        match self.task.soak_until {
            None if soak_seconds > 0 => {
                self.task.soak_until = Some(now + soak_seconds * 1000);
                let detail = format!("wave {} soaks {}s", wave + 1, soak_seconds);
                self.event(now, None, "wave.soak", detail);
                None
            }
            Some(t) if now < t => None,
            _ => Some(self.report(wave)),
        }
    }

    fn wave_runs(&self, wave: u32) -> impl Iterator<Item = &NodeRun> {
        self.task
            .waves
            .get(wave as usize)
            .into_iter()
            .flat_map(|w| w.nodes.iter())
            .filter_map(|id| self.runs.get(id))
    }

    fn report(&self, wave: u32) -> WaveReport {
        let mut r = WaveReport {
            wave,
            waves: self.task.waves.len() as u32,
            ..Default::default()
        };
        for run in self.wave_runs(wave) {
            r.total += 1;
            match &run.state {
                RunState::Succeeded { .. } => r.succeeded += 1,
                RunState::FailedRolledBack { .. } => r.failed_rolled_back += 1,
                RunState::FailedRollbackFailed { .. } => r.failed_rollback_failed += 1,
                RunState::TimedOut { .. } => r.timed_out += 1,
                RunState::Unknown { .. } => r.unknown += 1,
                RunState::Rejected { .. } => r.rejected += 1,
                RunState::Skipped { .. } | RunState::Cancelled => r.skipped += 1,
                _ => r.in_flight += 1,
            }
            if run.state.failed() {
                r.failed_nodes.push(run.node_id.clone());
            }
        }
        for run in self.runs.values() {
            if run.state.wave().is_some() && run.state.finished() {
                r.task_finished += 1;
                if run.state.failed() {
                    r.task_failed += 1;
                }
            }
        }
        r
    }
}

/// The engine. See the module docs.
pub struct Engine {
    store: Arc<dyn Store>,
    fleet: Arc<dyn Fleet>,
    delivery: Arc<dyn Delivery>,
    clock: Arc<dyn Clock>,
    policies: Arc<dyn PolicySource>,
    live: BTreeMap<String, LiveTask>,
    /// node id → the active task that holds it (invariant 1); one shared
    /// id per task, not a copy per node.
    busy: HashMap<String, Arc<str>>,
    next_id: u64,
    /// Runs committed (or dropped with a finished task) in the current
    /// `tick` or `report_many` (see [`crate::mem`]).
    committed_this_call: usize,
}

/// A tick or burst of reports that committed this many runs hands the
/// heap's free pages back to the OS at its end. Only big work: a steady flow
/// of small bursts (an API under load) reuses what it frees and never trims.
const TRIM_AFTER_RUNS: usize = 4096;
/// A task targeting at least this many nodes rebuilds its run map compactly.
const COMPACT_RUNS: usize = 1024;
/// A run or event buffer bigger than this is freed after a commit instead of
/// kept for the next one.
const KEEP_BUFFER: usize = 4096;

/// Empties a per-commit buffer, keeping its allocation only if it is small.
fn empty_buffer<T>(buffer: &mut Vec<T>) {
    if buffer.capacity() > KEEP_BUFFER {
        *buffer = Vec::new();
    } else {
        buffer.clear();
    }
}

impl Engine {
    /// An engine over `store`, resuming every active task found there.
    pub fn new(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        delivery: Arc<dyn Delivery>,
        clock: Arc<dyn Clock>,
        policies: Arc<dyn PolicySource>,
    ) -> Result<Self, EngineError> {
        let mut engine = Engine {
            store,
            fleet,
            delivery,
            clock,
            policies,
            live: BTreeMap::new(),
            busy: HashMap::new(),
            next_id: 1,
            committed_this_call: 0,
        };
        for task in engine.store.tasks()? {
            engine.next_id = engine.next_id.max(task_number(&task.id) + 1);
            // An ended task still draining work out with agents is held too.
            if task.state.active() || task.draining {
                let runs = engine.store.runs(&task.id)?;
                let next_seq = last_seq(&*engine.store, &task.id)?;
                engine.hold(task, runs, next_seq);
            }
        }
        Ok(engine)
    }

    /// Holds an active task in memory (and its nodes busy).
    fn hold(&mut self, task: Task, runs: Vec<NodeRun>, next_seq: u64) {
        let ctx = context(&task);
        let holder: Arc<str> = Arc::from(task.id.as_str());
        for run in &runs {
            if run.state.wave().is_some() && !run.state.finished()
                || matches!(run.state, RunState::Pending)
                || run.committing
            {
                self.busy.insert(run.node_id.clone(), holder.clone());
            }
        }
        let schedule = schedule_of(&task.spec);
        self.live.insert(
            task.id.clone(),
            LiveTask {
                ctx,
                schedule,
                policy: None,
                runs: runs.into_iter().map(|r| (r.node_id.clone(), r)).collect(),
                dirty: Vec::new(),
                events: Vec::new(),
                next_seq,
                last_scan: None,
                policy_fault: None,
                status: Arc::new(PolicyStatusView::new(
                    &task.id,
                    self.store.clone(),
                    self.fleet.clone(),
                )),
                task,
            },
        );
    }

    /// Validates and stores a new task; it starts on the next tick.
    ///
    /// Refused: a second active task for the same package and target
    /// ([`EngineError::Active`]), and a task whose target is older than every
    /// node in scope unless it says `downgrade` ([`EngineError::Downgrade`]).
    /// Both are checked here, on the engine's one thread, so two racing
    /// requests cannot both pass.
    pub fn create(&mut self, spec: TaskSpec) -> Result<Task, EngineError> {
        spec.validate()?;
        schedule_from_params(&spec).map_err(|e| EngineError::Refused {
            task: spec.name.clone(),
            reason: Refusal::Schedule(e),
        })?;
        let resolved = self.resolve(&spec.target);
        self.refuse_a_second_active_task(&spec, resolved.as_deref())?;
        if !spec.downgrade
            && let Some(target) = &resolved
        {
            self.refuse_a_downgrade_of_everyone(&spec, target)?;
        }
        let policy_sha256 = self.policies.pin(&spec.policy)?;
        let now = self.clock.now();
        let task = Task {
            id: format!("t{:06}", self.next_id),
            spec,
            state: TaskState::Scheduled,
            target_version: None,
            waves: Vec::new(),
            plan_rev: 0,
            current_wave: 0,
            soak_until: None,
            awaiting_approval: false,
            draining: false,
            policy_sha256,
            created_at: now,
            updated_at: now,
        };
        self.next_id += 1;
        self.hold(task.clone(), Vec::new(), 0);
        let live = self.live.get_mut(&task.id).expect("just inserted");
        live.event(
            now,
            None,
            "task.created",
            match &task.policy_sha256 {
                Some(sha) => format!("policy {} sha256 {sha}", task.spec.policy),
                None => format!("policy {}", task.spec.policy),
            },
        );
        self.commit(&task.id)?;
        Ok(task)
    }

    /// The version `target` stands for now (`None`: the control plane
    /// reports none yet; the task fails at start if it still does not).
    fn resolve(&self, target: &Target) -> Option<String> {
        match target {
            Target::Version(v) => Some(v.clone()),
            Target::ControlPlane(c) => self.delivery.control_plane_version(c),
        }
    }

    fn refuse_a_second_active_task(
        &self,
        spec: &TaskSpec,
        resolved: Option<&str>,
    ) -> Result<(), EngineError> {
        for live in self.live.values() {
            let other = &live.task;
            if other.state.active() && other.spec.name == spec.name {
                return Err(EngineError::NameTaken {
                    name: spec.name.clone(),
                    task: other.id.clone(),
                });
            }
            if !other.state.active() || other.spec.package != spec.package {
                continue;
            }
            // A started task keeps the version it resolved at start.
            let theirs = other
                .target_version
                .clone()
                .or_else(|| self.resolve(&other.spec.target));
            let same = match (&other.spec.target, &spec.target) {
                (Target::ControlPlane(a), Target::ControlPlane(b)) if a == b => true,
                _ => theirs
                    .as_deref()
                    .zip(resolved)
                    .is_some_and(|(a, b)| flotilla_version::same(a, b)),
            };
            if same {
                return Err(EngineError::Active {
                    task: other.id.clone(),
                    package: spec.package.clone(),
                    target: resolved.or(theirs.as_deref()).unwrap_or("?").to_string(),
                });
            }
        }
        Ok(())
    }

    /// A target older than every node in scope can only downgrade: refused
    /// unless the spec says so. Nodes whose version does not parse, and an
    /// empty scope (an increment task waiting for nodes), refuse nothing.
    /// Stops at the first node that is not newer.
    fn refuse_a_downgrade_of_everyone(
        &self,
        spec: &TaskSpec,
        target: &str,
    ) -> Result<(), EngineError> {
        let Ok(target_v) = flotilla_version::parse(target) else {
            return Ok(());
        };
        let selector = match &spec.scope {
            Scope::All => Selector::default(),
            Scope::Selector(s) => s.clone(),
        };
        let mut newer = 0;
        loop {
            let page = self.fleet.query(&selector, newer as u64, 4096);
            for node in &page {
                if !newer_than(&node.version, &target_v) {
                    return Ok(());
                }
                newer += 1;
            }
            if page.len() < 4096 {
                break;
            }
        }
        if newer == 0 {
            return Ok(());
        }
        Err(EngineError::Downgrade {
            target: target.to_string(),
            nodes: newer,
        })
    }

    pub fn task(&self, id: &str) -> Result<Task, EngineError> {
        match self.live.get(id) {
            Some(l) => Ok(l.task.clone()),
            None => self
                .store
                .task(id)?
                .ok_or_else(|| EngineError::NoTask(id.into())),
        }
    }

    pub fn runs(&self, id: &str) -> Result<Vec<NodeRun>, EngineError> {
        match self.live.get(id) {
            Some(l) => Ok(l.runs.values().cloned().collect()),
            None => Ok(self.store.runs(id)?),
        }
    }

    /// A task held in memory (active, or ended with work still out), with
    /// its runs counted by state: `None` for any other task. Cheaper than
    /// reading every run back from the store.
    pub fn live_view(&self, id: &str) -> Option<(Task, BTreeMap<String, usize>)> {
        let live = self.live.get(id)?;
        Some((live.task.clone(), count_states(live.runs.values())))
    }

    /// A task held in memory without its waves' node lists (each wave's
    /// size instead, in order), and its runs counted by state: what a
    /// dashboard polls, without copying a 100,000-node plan each time.
    pub fn live_head(&self, id: &str) -> Option<(Task, Vec<usize>, BTreeMap<String, usize>)> {
        let live = self.live.get(id)?;
        let t = &live.task;
        let sizes = t.waves.iter().map(|w| w.nodes.len()).collect();
        let waves = t
            .waves
            .iter()
            .map(|w| flotilla_model::Wave {
                name: w.name.clone(),
                nodes: Vec::new(),
                concurrency: w.concurrency,
                soak_seconds: w.soak_seconds,
                needs_approval: w.needs_approval,
            })
            .collect();
        let head = Task {
            id: t.id.clone(),
            spec: t.spec.clone(),
            state: t.state.clone(),
            target_version: t.target_version.clone(),
            waves,
            plan_rev: t.plan_rev,
            current_wave: t.current_wave,
            soak_until: t.soak_until,
            awaiting_approval: t.awaiting_approval,
            draining: t.draining,
            policy_sha256: t.policy_sha256.clone(),
            created_at: t.created_at,
            updated_at: t.updated_at,
        };
        Some((head, sizes, count_states(live.runs.values())))
    }

    /// The runs of a task held in memory, in node-id order, without copying
    /// them (the dashboard's grid): `None` for any other task.
    pub fn live_runs(&self, id: &str) -> Option<impl Iterator<Item = &NodeRun>> {
        self.live.get(id).map(|l| l.runs.values())
    }

    /// The runs of every task held in memory, counted by state, by task id.
    pub fn live_counts(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        self.live
            .iter()
            .map(|(id, live)| (id.clone(), count_states(live.runs.values())))
            .collect()
    }

    /// True while any task is scheduled, running or paused.
    pub fn has_active(&self) -> bool {
        !self.live.is_empty()
    }

    fn commit(&mut self, id: &str) -> Result<(), EngineError> {
        let Some(live) = self.live.get_mut(id) else {
            return Ok(());
        };
        live.dirty.sort_unstable();
        live.dirty.dedup();
        let runs: Vec<NodeRun> = live
            .dirty
            .iter()
            .filter_map(|n| live.runs.get(n).cloned())
            .collect();
        live.task.draining = !live.task.state.active() && live.in_flight();
        self.store.commit(&live.task, &runs, &live.events)?;
        self.committed_this_call += runs.len();
        drop(runs);
        empty_buffer(&mut live.dirty);
        empty_buffer(&mut live.events);
        if !live.task.state.active() {
            // Ended: every node whose work is done is free; one still out
            // with an agent stays held until the agent reports or times out.
            for run in live.runs.values() {
                if !out_with_agent(run) && self.busy.get(&run.node_id).map(|t| &**t) == Some(id) {
                    self.busy.remove(&run.node_id);
                }
            }
            if !live.task.draining {
                // Its runs leave memory: as much to free as committing them.
                self.committed_this_call += live.runs.len();
                self.live.remove(id);
            }
        }
        Ok(())
    }

    /// Advances every active task; returns the commands to send, which are
    /// already committed to the store.
    pub fn tick(&mut self) -> Result<Vec<Command>, EngineError> {
        self.committed_this_call = 0;
        let ids: Vec<String> = self.live.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            if let Err(e) = self.advance(&id, &mut out) {
                match e {
                    // The disk failed reading the policy's bytes: nothing is
                    // wrong with the task or its policy, the next tick tries
                    // again (no one should have to resume it).
                    EngineError::Policy(err) if err.is_fault() => self.note_policy_fault(&id, &err),
                    // A policy failure pauses only its task (invariant 4).
                    EngineError::Policy(err) => self.pause_for_policy(&id, &err),
                    other => return Err(other),
                }
            }
            self.commit(&id)?;
        }
        self.release_memory_after_big_work();
        Ok(out)
    }

    /// Trims the heap once enough runs went through commits (targeting and
    /// whole waves allocate and free tens of MB; see [`crate::mem`]).
    fn release_memory_after_big_work(&mut self) {
        if self.committed_this_call >= TRIM_AFTER_RUNS {
            self.committed_this_call = 0;
            crate::mem::release_free_memory();
        }
    }

    /// Calls the task's policy (loading it on first use), with the task's
    /// runs lent to its `status` view for the length of the call.
    fn call_policy<R>(
        live: &mut LiveTask,
        policies: &dyn PolicySource,
        world: &World,
        f: impl FnOnce(&mut dyn Policy) -> Result<R, PolicyError>,
    ) -> Result<R, EngineError> {
        if live.policy.is_none() {
            let now = world.clock.now();
            let world = World {
                status: live.status.clone(),
                ..world.clone()
            };
            live.policy = Some(match &live.task.policy_sha256 {
                Some(sha) => policies.load_pinned(&live.task.spec.policy, sha, world)?,
                None => policies.load(&live.task.spec.policy, world)?,
            });
            if let Some((since, _)) = live.policy_fault.take() {
                tracing::info!(task = %live.task.id, "policy read again");
                live.event(
                    now,
                    None,
                    "policy.readable",
                    format!(
                        "read again after {} s of disk faults",
                        now.saturating_sub(since) / 1000
                    ),
                );
            }
        }
        let policy = live.policy.as_mut().expect("just loaded");
        Ok(live.status.lend(&mut live.runs, || f(policy.as_mut()))?)
    }

    /// The world of every task; `call_policy` adds the task's own `status`.
    fn world(&self) -> World {
        World {
            fleet: self.fleet.clone(),
            delivery: self.delivery.clone(),
            status: Arc::new(flotilla_policy::world::MemoryStatus::default()),
            clock: self.clock.clone(),
        }
    }

    fn advance(&mut self, id: &str, out: &mut Vec<Command>) -> Result<(), EngineError> {
        let now = self.clock.now();
        let state = self.live[id].task.state.clone();
        match state {
            TaskState::Scheduled => {
                if !self.live[id].schedule.is_open(now) {
                    return Ok(());
                }
                self.start(id, now)?;
                self.dispatch(id, now, out)
            }
            // Targeting or planning did not finish (a policy error paused
            // the task and it was resumed, or the disk failed reading the
            // policy): from the start again, not a dispatch of no waves.
            TaskState::Running if !self.live[id].planned() => {
                self.start(id, now)?;
                self.dispatch(id, now, out)
            }
            TaskState::Running => {
                self.scan(id, now)?;
                self.dispatch(id, now, out)
            }
            // Paused: nothing new starts, but running nodes still time out.
            TaskState::Paused(_) => {
                self.expire(id, now);
                Ok(())
            }
            TaskState::RollingBack(_) => {
                self.expire(id, now);
                let live = live_task(&mut self.live, id)?;
                finish_rollback(live, now);
                Ok(())
            }
            // Ended but draining: work still out with agents times out.
            _ => {
                self.expire(id, now);
                Ok(())
            }
        }
    }

    /// Targeting and planning: who is upgraded and in which waves.
    fn start(&mut self, id: &str, now: u64) -> Result<(), EngineError> {
        let world = self.world();
        let resolved = match &self.live[id].task.spec.target {
            Target::Version(v) => Ok(v.clone()),
            Target::ControlPlane(c) => self
                .delivery
                .control_plane_version(c)
                .ok_or_else(|| format!("the control plane reports no version for {c}")),
        };
        let target = match resolved {
            Ok(t) => t,
            Err(reason) => {
                let live = live_task(&mut self.live, id)?;
                return live.task_transition(TaskEvent::Fail(reason), now);
            }
        };
        let selector = match &self.live[id].task.spec.scope {
            Scope::All => Selector::default(),
            Scope::Selector(s) => s.clone(),
        };
        let nodes = self.query_all(&selector);

        // Again, after a try that stopped before its plan: the nodes it
        // held are let go, and its runs of nodes now out of scope cancelled
        // (targeting below makes every node in scope a fresh run).
        if !matches!(self.live[id].task.state, TaskState::Scheduled) {
            let in_scope: std::collections::HashSet<&str> =
                nodes.iter().map(|n| n.id.as_str()).collect();
            let live = live_task(&mut self.live, id)?;
            let mut gone = Vec::new();
            for (node, run) in &live.runs {
                if self.busy.get(node).is_some_and(|t| &**t == id) {
                    self.busy.remove(node);
                }
                if !in_scope.contains(node.as_str()) && matches!(run.state, RunState::Pending) {
                    gone.push(node.clone());
                }
            }
            for node in gone {
                live.apply(&node, RunEvent::Cancel, now)?;
            }
        }
        let live = live_task(&mut self.live, id)?;
        live.task.target_version = Some(target.clone());
        live.ctx.target_version = target.clone();
        if matches!(live.task.state, TaskState::Scheduled) {
            live.task_transition(TaskEvent::Start, now)?;
        }
        live.event(
            now,
            None,
            "task.targeting",
            format!("{} nodes in scope, target {target}", nodes.len()),
        );

        let selected = self.target(id, nodes, &target, now, world.clone())?;
        let live = live_task(&mut self.live, id)?;
        // Inserted one by one in node order, the map's nodes are half full;
        // built again from its sorted entries they are full (~100 bytes
        // less per run, measured at 100,000 nodes).
        if live.runs.len() >= COMPACT_RUNS {
            live.runs = std::mem::take(&mut live.runs).into_iter().collect();
        }
        let ctx = live.ctx.clone();
        let waves = Self::call_policy(live, &*self.policies, &world, |p| p.plan(&ctx, &selected))?;
        live.event(
            now,
            None,
            "policy.plan",
            format!(
                "{} selected in {} waves: {}",
                selected.len(),
                waves.len(),
                waves
                    .iter()
                    .map(|w| format!("{} ({})", w.name, w.nodes.len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        for (i, wave) in waves.iter().enumerate() {
            for node in &wave.nodes {
                live.apply(node, RunEvent::Queue { wave: i as u32 }, now)?;
            }
        }
        live.task.awaiting_approval = waves.first().is_some_and(|w| w.needs_approval);
        live.task.waves = waves;
        live.task.plan_rev += 1;
        live.task.current_wave = 0;
        Ok(())
    }

    /// Targeting: the runner's own skips (busy, same version, unhealthy, not
    /// a source version) first, then the policy's `select`. Creates a run for
    /// every node, records every skip, and returns the selected nodes.
    fn target(
        &mut self,
        id: &str,
        nodes: Vec<Node>,
        target: &str,
        now: u64,
        world: World,
    ) -> Result<Vec<Node>, EngineError> {
        let holder: Arc<str> = Arc::from(id);
        let live = live_task(&mut self.live, id)?;
        // The runner's own skips come first; the policy sees the rest.
        let sources = live.task.spec.source_versions.clone();
        // `None`: a downgrade task, or a target that is not a version.
        let no_older_than = (!live.task.spec.downgrade)
            .then(|| flotilla_version::parse(target).ok())
            .flatten();
        let mut candidates: Vec<Node> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let skip = if let Some(other) = self.busy.get(&node.id).filter(|t| &***t != id) {
                Some((SkipReason::BusyInAnotherTask, format!("in task {other}")))
            } else if flotilla_version::same(&node.version, target) {
                Some((SkipReason::SameVersion, format!("already at {target}")))
            } else if no_older_than
                .as_ref()
                .is_some_and(|t| newer_than(&node.version, t))
            {
                Some((
                    SkipReason::NewerThanTarget,
                    format!(
                        "runs {}, newer than the target {target}; only a task with `downgrade: true` takes it back",
                        node.version
                    ),
                ))
            } else if !node.healthy {
                Some((SkipReason::Unhealthy, "node is unhealthy".to_string()))
            } else if !sources.is_empty()
                && !sources
                    .iter()
                    .any(|s| flotilla_version::same(s, &node.version))
            {
                Some((
                    SkipReason::OutOfRange,
                    format!(
                        "version {} is not one of {}",
                        node.version,
                        sources.join(", ")
                    ),
                ))
            } else {
                None
            };
            live.runs.insert(
                node.id.clone(),
                NodeRun::new(node.id.clone(), node.version.clone(), now),
            );
            live.dirty.push(node.id.clone());
            match skip {
                Some((reason, detail)) => {
                    live.apply(&node.id, RunEvent::Skip { reason, detail }, now)?;
                }
                None => {
                    self.busy.insert(node.id.clone(), holder.clone());
                    candidates.push(node);
                }
            }
        }

        let ctx = live.ctx.clone();
        let decisions = Self::call_policy(live, &*self.policies, &world, |p| {
            p.select(&ctx, &candidates)
        })?;
        let mut selected = Vec::with_capacity(candidates.len());
        let mut skipped = Vec::new();
        for (node, decision) in candidates.into_iter().zip(decisions) {
            match decision {
                Selection::Include => selected.push(node),
                Selection::Skip { reason, detail } => skipped.push((node.id, reason, detail)),
            }
        }
        for (node, reason, detail) in skipped {
            self.busy.remove(&node);
            live.apply(&node, RunEvent::Skip { reason, detail }, now)?;
        }
        Ok(selected)
    }

    /// Increment tasks: nodes that registered since the last scan and match,
    /// and skipped nodes whose reason went away (see [`worth_another_look`]),
    /// go through targeting again and join the current wave when selected.
    fn scan(&mut self, id: &str, now: u64) -> Result<(), EngineError> {
        let live = live_task(&mut self.live, id)?;
        if live.task.spec.strategy != flotilla_model::Strategy::Increment
            || live.last_scan.is_some_and(|t| now < t + SCAN_EVERY_MS)
            || live.task.current_wave as usize >= live.task.waves.len()
        {
            return Ok(());
        }
        live.last_scan = Some(now);
        let target = live.task.target_version.clone().unwrap_or_default();
        let selector = match &live.task.spec.scope {
            Scope::All => Selector::default(),
            Scope::Selector(s) => s.clone(),
        };
        let runs = &self.live[id].runs;
        let (mut again, mut undecided) = (0, 0);
        let fresh: Vec<Node> = self
            .query_all(&selector)
            .into_iter()
            .filter(|n| match runs.get(&n.id) {
                None => true,
                Some(run) => {
                    let look = worth_another_look(run, n, self.busy.get(&n.id), id);
                    if matches!(run.state, RunState::Pending) {
                        undecided += usize::from(look);
                    } else {
                        again += usize::from(look);
                    }
                    look
                }
            })
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let world = self.world();
        let live = live_task(&mut self.live, id)?;
        if undecided > 0 {
            live.event(
                now,
                None,
                "task.increment",
                format!("{undecided} nodes left undecided by a failed select are targeted again"),
            );
        }
        if again > 0 {
            live.event(
                now,
                None,
                "task.increment",
                match again {
                    1 => "1 skipped node changed and is targeted again".to_string(),
                    n => format!("{n} skipped nodes changed and are targeted again"),
                },
            );
        }
        let selected = self.target(id, fresh, &target, now, world)?;
        let live = live_task(&mut self.live, id)?;
        let wave = live.task.current_wave;
        for node in &selected {
            live.task.waves[wave as usize].nodes.push(node.id.clone());
            live.task.plan_rev += 1;
            live.apply(&node.id, RunEvent::Queue { wave }, now)?;
        }
        if !selected.is_empty() {
            live.event(
                now,
                None,
                "task.increment",
                match selected.len() {
                    1 => format!("1 node joins wave {}", wave + 1),
                    n => format!("{n} nodes join wave {}", wave + 1),
                },
            );
        }
        Ok(())
    }

    fn query_all(&self, selector: &Selector) -> Vec<Node> {
        let mut nodes = Vec::new();
        loop {
            let page = self.fleet.query(selector, nodes.len() as u64, 4096);
            let last = page.len() < 4096;
            nodes.extend(page);
            if last {
                return nodes;
            }
        }
    }

    /// Marks runs whose node timeout passed.
    fn expire(&mut self, id: &str, now: u64) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        let timeout = live.task.spec.node_timeout_seconds * 1000;
        let late: Vec<(String, RunEvent)> = live
            .runs
            .values()
            .filter(|r| r.state.in_flight() && r.started_at.is_some_and(|t| now >= t + timeout))
            .filter_map(|r| match r.state {
                RunState::Offered { .. } => Some((r.node_id.clone(), RunEvent::NoReport)),
                RunState::Downloading { .. }
                | RunState::Upgrading { .. }
                | RunState::Verifying { .. } => Some((r.node_id.clone(), RunEvent::Timeout)),
                RunState::RollingBack { .. } => Some((
                    r.node_id.clone(),
                    RunEvent::FailedRollbackFailed {
                        error: "no report of the restore within the node timeout".into(),
                    },
                )),
                _ => None,
            })
            .collect();
        for (node, event) in late {
            let _ = live.transition(&node, event, now);
        }
    }

    /// One step of a running task's current wave: expire late runs, retry
    /// failed ones that have retries left, hand queued nodes over (push),
    /// and once every run of the wave has ended, soak, ask the policy and
    /// act on its verdict.
    fn dispatch(&mut self, id: &str, now: u64, out: &mut Vec<Command>) -> Result<(), EngineError> {
        self.expire(id, now);
        let live = live_task(&mut self.live, id)?;
        if live.task.current_wave as usize >= live.task.waves.len() {
            return live.task_transition(TaskEvent::Complete, now);
        }
        if live.task.awaiting_approval {
            return Ok(());
        }
        let wave = live.task.current_wave;
        live.retry_failed(wave, now);
        let tally = live.tally(wave, now);
        if tally.unfinished > 0 {
            // Push mode hands nodes over here; pull mode waits for requests.
            if let Some(ready) = tally.ready {
                self.hand_over(id, ready, tally.running, now, out)?;
            }
            return Ok(());
        }
        let Some(report) = live.soaked(wave, now) else {
            return Ok(());
        };
        let verdict = self.judge(id, wave, &report, now)?;
        self.act_on(id, wave, verdict, now, out)
    }

    /// Offers the ready nodes of a push task's wave, up to its concurrency
    /// (`running` are out with agents already), as `admit` allows.
    fn hand_over(
        &mut self,
        id: &str,
        ready: Vec<String>,
        mut running: usize,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let world = self.world();
        let live = live_task(&mut self.live, id)?;
        let limit = live.concurrency();
        let ctx = live.ctx.clone();
        for node_id in ready {
            if running >= limit {
                break;
            }
            let Some(node) = self.fleet.get(&node_id) else {
                // Gone from the inventory: the run ends, the wave goes on.
                live.transition(&node_id, RunEvent::Cancel, now).ok();
                continue;
            };
            // Push to an offline node waits until it is back (EnOS
            // "cloud push": it gets the request on reconnect).
            if !node.online {
                continue;
            }
            let admission = Self::call_policy(live, &*self.policies, &world, |p| {
                if p.info().implements(Hook::Admit) {
                    p.admit(&ctx, &node, now)
                } else {
                    Ok(Admission::Now)
                }
            })?;
            match admission {
                Admission::Now => {
                    live.apply(&node_id, RunEvent::Offer, now)?;
                    running += 1;
                    out.push(deliver(&live.task, &node_id));
                }
                Admission::DeferUntil(t) => {
                    if let Some(run) = live.runs.get_mut(&node_id) {
                        run.not_before = Some(t);
                    }
                    live.dirty.push(node_id.clone());
                    live.event(
                        now,
                        Some(&node_id),
                        "policy.admit",
                        format!("deferred until {t}"),
                    );
                }
                Admission::Never(reason) => {
                    let skip = RunEvent::Skip {
                        reason: SkipReason::Policy,
                        detail: reason,
                    };
                    live.apply(&node_id, skip, now)?;
                }
            }
        }
        Ok(())
    }

    /// Asks the policy what a finished wave's report means.
    fn judge(
        &mut self,
        id: &str,
        wave: u32,
        report: &WaveReport,
        now: u64,
    ) -> Result<Verdict, EngineError> {
        let world = self.world();
        let live = live_task(&mut self.live, id)?;
        let ctx = live.ctx.clone();
        let verdict =
            Self::call_policy(live, &*self.policies, &world, |p| p.evaluate(&ctx, report))?;
        live.task.soak_until = None;
        let detail = format!("wave {}: {verdict}", wave + 1);
        live.event(now, None, "policy.verdict", detail);
        Ok(verdict)
    }

    fn act_on(
        &mut self,
        id: &str,
        wave: u32,
        verdict: Verdict,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let live = live_task(&mut self.live, id)?;
        match verdict {
            Verdict::Proceed => {
                if !live.task.spec.permanent {
                    commit_wave(live, wave, now, out);
                }
                self.next_wave(id, now)
            }
            Verdict::Pause(reason) => {
                // Resuming continues with the next wave (or completes the
                // task when this was the last one): a person looks first.
                // A next wave that needs approval still waits for a promote
                // after the resume.
                live.task.current_wave += 1;
                live.task.awaiting_approval = live
                    .task
                    .waves
                    .get(live.task.current_wave as usize)
                    .is_some_and(|w| w.needs_approval);
                live.task_transition(TaskEvent::Pause(reason), now)
            }
            Verdict::RetryFailed => {
                let retries = live.task.spec.retries;
                let again: Vec<String> = live
                    .wave_runs(wave)
                    .filter(|r| r.state.failed() && r.attempts <= retries)
                    .map(|r| r.node_id.clone())
                    .collect();
                if again.is_empty() {
                    return self.next_wave(id, now);
                }
                for node in again {
                    live.transition(&node, RunEvent::Retry, now).ok();
                }
                Ok(())
            }
            Verdict::Rollback(reason) => self.rollback_at(id, reason, now, out),
            Verdict::Abort(reason) => self.abort(id, reason, now),
        }
    }

    fn next_wave(&mut self, id: &str, now: u64) -> Result<(), EngineError> {
        let live = live_task(&mut self.live, id)?;
        live.task.current_wave += 1;
        match live.task.waves.get(live.task.current_wave as usize) {
            None => live.task_transition(TaskEvent::Complete, now),
            Some(wave) => {
                live.task.awaiting_approval = wave.needs_approval;
                let detail = format!("wave {} ({})", live.task.current_wave + 1, wave.name);
                live.event(now, None, "wave.start", detail);
                Ok(())
            }
        }
    }

    fn abort(&mut self, id: &str, reason: String, now: u64) -> Result<(), EngineError> {
        let live = live_task(&mut self.live, id)?;
        live.cancel_waiting(now, false);
        live.task_transition(TaskEvent::Fail(reason), now)
    }

    fn rollback_at(
        &mut self,
        id: &str,
        reason: String,
        now: u64,
        out: &mut Vec<Command>,
    ) -> Result<(), EngineError> {
        let live = live_task(&mut self.live, id)?;
        let upgraded: Vec<(String, String)> = live
            .runs
            .values()
            .filter(|r| matches!(r.state, RunState::Succeeded { .. }))
            .map(|r| (r.node_id.clone(), r.from_version.clone()))
            .collect();
        live.cancel_waiting(now, false);
        for (node, version) in &upgraded {
            live.transition(node, RunEvent::Rollback, now).ok();
            out.push(Command::Restore {
                task: id.into(),
                node: node.clone(),
                package: live.task.spec.package.clone(),
                version: version.clone(),
            });
        }
        // Stop dispatching; the task becomes rolled-back when the restores report.
        live.task.current_wave = live.task.waves.len() as u32;
        live.task_transition(TaskEvent::Rollback(reason), now)?;
        if upgraded.is_empty() {
            live.task_transition(TaskEvent::RolledBack, now)?;
        }
        Ok(())
    }

    /// What an agent reports about its node in the active task.
    pub fn report(&mut self, node: &str, event: RunEvent) -> Result<(), EngineError> {
        self.report_many(vec![(node.to_string(), event)])
            .pop()
            .expect("one result per report")
    }

    /// Applies many reports and commits each touched task once: the cheap way
    /// to take a burst of agent reports. Every report is persisted before its
    /// result is returned; one result per report, in order.
    pub fn report_many(
        &mut self,
        reports: Vec<(String, RunEvent)>,
    ) -> Vec<Result<(), EngineError>> {
        self.report_many_for(
            reports
                .into_iter()
                .map(|(node, event)| (node, None, event))
                .collect(),
        )
    }

    /// [`Engine::report_many`] for reports that name their task (an agent's
    /// always do): a report about another task than the one its node is in
    /// now (a late report of a task that ended, say) is refused and changes
    /// nothing.
    pub fn report_many_for(
        &mut self,
        reports: Vec<(String, Option<String>, RunEvent)>,
    ) -> Vec<Result<(), EngineError>> {
        let now = self.clock.now();
        self.committed_this_call = 0;
        let mut touched: Vec<String> = Vec::new();
        // What each touched task was before this batch, to put back if its
        // commit fails: nothing may act on a change the store did not take.
        let mut undo: Vec<Undo> = Vec::new();
        // Each applied report with the index of its task in `touched`.
        let mut results: Vec<Result<usize, EngineError>> = Vec::with_capacity(reports.len());
        for (node, named, event) in reports {
            let Some(id) = self.busy.get(&node).cloned() else {
                results.push(Err(EngineError::NotInTask { node }));
                continue;
            };
            let id: &str = &id;
            if let Some(named) = named.filter(|t| t != id) {
                results.push(Err(EngineError::Refused {
                    task: named.clone(),
                    reason: Refusal::OtherTask {
                        node: node.clone(),
                        named: named.clone(),
                        actual: id.to_string(),
                    },
                }));
                continue;
            }
            let live = self
                .live
                .get_mut(id)
                .expect("busy nodes belong to live tasks");
            let at = match touched.iter().position(|t| t == id) {
                Some(at) => at,
                None => {
                    touched.push(id.to_string());
                    undo.push(Undo::of(live));
                    touched.len() - 1
                }
            };
            let applied = match live.runs.get(&node) {
                // Sent again (its answer was lost, or its commit stored but
                // not flushed): taken again, and applied once. The commit
                // below still makes sure what it says is on disk.
                Some(run) if is_repeat(run, &event) => Ok(()),
                Some(run) => {
                    undo[at].keep(run);
                    live.apply(&node, event, now)
                }
                None => live.apply(&node, event, now),
            };
            results.push(applied.map(|()| at));
        }
        let mut failed: Vec<Option<StoreError>> = Vec::with_capacity(touched.len());
        for (id, undo) in touched.iter().zip(undo) {
            let live = self
                .live
                .get_mut(id)
                .expect("a task touched in this batch is live");
            finish_rollback(live, now);
            match self.commit(id) {
                Ok(()) => failed.push(None),
                Err(e) => {
                    // A fault, not a refusal: nothing of this task's batch
                    // is acknowledged, and it is undone in memory, so the
                    // agent's retry applies it (once) when the store is back.
                    if let Some(live) = self.live.get_mut(id) {
                        undo.restore(live);
                    }
                    failed.push(Some(match e {
                        EngineError::Store(e) => e,
                        other => StoreError::io("commit", other.to_string()),
                    }));
                }
            }
        }
        self.release_memory_after_big_work();
        results
            .into_iter()
            .map(|r| match r {
                Ok(at) => match &failed[at] {
                    None => Ok(()),
                    Some(e) => Err(EngineError::Store(e.clone())),
                },
                Err(e) => Err(e),
            })
            .collect()
    }

    /// A disk fault reading `id`'s policy: said once in the task's events,
    /// and logged once a minute while it lasts, not on every tick.
    fn note_policy_fault(&mut self, id: &str, err: &PolicyError) {
        let now = self.clock.now();
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        match &mut live.policy_fault {
            None => {
                tracing::warn!(task = %id, "{err}; trying again on every tick");
                let detail = format!("{err}; trying again on every tick");
                live.event(now, None, "policy.unreadable", detail);
                live.policy_fault = Some((now, now));
            }
            Some((since, logged)) if now.saturating_sub(*logged) >= 60_000 => {
                let secs = now.saturating_sub(*since) / 1000;
                tracing::warn!(task = %id, "{err}; still trying, for {secs} s now");
                *logged = now;
            }
            Some(_) => {}
        }
    }

    /// A policy failure pauses only its task (invariant 4): the instance is
    /// dropped (the next call loads it afresh) and the failure recorded.
    fn pause_for_policy(&mut self, id: &str, err: &PolicyError) {
        let now = self.clock.now();
        if let Some(live) = self.live.get_mut(id) {
            live.policy = None;
            live.event(now, None, "policy.error", err.to_string());
            let _ = live.task_transition(TaskEvent::Pause(err.to_string()), now);
        }
    }

    /// Pull mode: a device asks for work. Returns the delivery if the policy
    /// offers it now. An `on-request` that fails pauses the task, as any
    /// hook's failure does, and the device gets no work (it asks again); a
    /// disk fault reading the policy is an error the device retries.
    pub fn request(&mut self, node: &str) -> Result<Option<Command>, EngineError> {
        let Some(id) = self.busy.get(node).map(|t| t.to_string()) else {
            return Ok(None);
        };
        let now = self.clock.now();
        let world = self.world();
        let live = live_task(&mut self.live, &id)?;
        // Queued in the current wave, and its retry backoff (if any) over.
        let queued_now = live.runs.get(node).is_some_and(|r| {
            matches!(r.state, RunState::Queued { wave } if wave == live.task.current_wave)
                && r.not_before.is_none_or(|t| t <= now)
        });
        if live.task.spec.method != Method::Pull
            || live.task.state != TaskState::Running
            || !queued_now
            || !live.schedule.is_open(now)
        {
            return Ok(None);
        }
        let Some(n) = self.fleet.get(node) else {
            return Ok(None);
        };
        let ctx = live.ctx.clone();
        let offer =
            match Self::call_policy(live, &*self.policies, &world, |p| p.on_request(&ctx, &n)) {
                Ok(offer) => offer,
                Err(EngineError::Policy(err)) if !err.is_fault() => {
                    self.pause_for_policy(&id, &err);
                    self.commit(&id)?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
        let answer = match offer {
            Offer::Offer => {
                live.apply(node, RunEvent::Offer, now)?;
                Some(deliver(&live.task, node))
            }
            Offer::DeferUntil(t) => {
                live.event(
                    now,
                    Some(node),
                    "policy.on-request",
                    format!("ask again at {t}"),
                );
                None
            }
            Offer::Decline(reason) => {
                live.event(
                    now,
                    Some(node),
                    "policy.on-request",
                    format!("declined: {reason}"),
                );
                None
            }
        };
        self.commit(&id)?;
        Ok(answer)
    }

    fn operate(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut LiveTask, u64) -> Result<(), EngineError>,
    ) -> Result<Task, EngineError> {
        let now = self.clock.now();
        let live = self.live.get_mut(id).ok_or_else(|| EngineError::Refused {
            task: id.into(),
            reason: Refusal::NotActive,
        })?;
        f(live, now)?;
        let task = live.task.clone();
        self.commit(id)?;
        Ok(task)
    }

    pub fn pause(&mut self, id: &str, reason: &str) -> Result<Task, EngineError> {
        let reason = if reason.trim().is_empty() {
            "paused by an operator"
        } else {
            reason
        };
        self.operate(id, |l, now| {
            l.task_transition(TaskEvent::Pause(reason.into()), now)
        })
    }

    pub fn resume(&mut self, id: &str) -> Result<Task, EngineError> {
        self.operate(id, |l, now| {
            l.policy = None; // a policy that failed gets a fresh instance
            l.task_transition(TaskEvent::Resume, now)
        })
    }

    /// Lets a wave that waits for approval start.
    pub fn promote(&mut self, id: &str) -> Result<Task, EngineError> {
        self.operate(id, |l, now| {
            if !l.task.awaiting_approval {
                return Err(EngineError::Refused {
                    task: l.task.id.clone(),
                    reason: Refusal::NoWaveAwaiting,
                });
            }
            l.task.awaiting_approval = false;
            l.event(
                now,
                None,
                "wave.promoted",
                format!("wave {}", l.task.current_wave + 1),
            );
            Ok(())
        })
    }

    pub fn cancel(&mut self, id: &str) -> Result<Task, EngineError> {
        self.operate(id, |l, now| {
            // An operator's cancel also withdraws offers no agent has taken up.
            l.cancel_waiting(now, true);
            l.task_transition(TaskEvent::Cancel, now)
        })
    }

    /// An operator's rollback: puts the previous release back on every node
    /// the task upgraded. Works on an active task and on one that succeeded
    /// (a release found bad later), as long as none of its nodes is busy in
    /// another task. Returns the restores to send.
    pub fn rollback(
        &mut self,
        id: &str,
        reason: &str,
    ) -> Result<(Task, Vec<Command>), EngineError> {
        let reason = if reason.trim().is_empty() {
            "rolled back by an operator".to_string()
        } else {
            reason.to_string()
        };
        if !self.live.contains_key(id) {
            let task = self
                .store
                .task(id)?
                .ok_or_else(|| EngineError::NoTask(id.into()))?;
            if task.state != TaskState::Succeeded {
                return Err(EngineError::Refused {
                    task: id.into(),
                    reason: Refusal::CannotRollBack(task.state.name()),
                });
            }
            let runs = self.store.runs(id)?;
            let upgraded: Vec<&str> = runs
                .iter()
                .filter(|r| matches!(r.state, RunState::Succeeded { .. }))
                .map(|r| r.node_id.as_str())
                .collect();
            if let Some((node, other)) = upgraded
                .iter()
                .find_map(|n| self.busy.get(*n).map(|t| (*n, t)))
            {
                return Err(EngineError::Refused {
                    task: id.into(),
                    reason: Refusal::NodeBusy {
                        node: node.to_string(),
                        other: other.to_string(),
                    },
                });
            }
            let upgraded: Vec<String> = upgraded.into_iter().map(str::to_string).collect();
            let next_seq = last_seq(&*self.store, id)?;
            self.hold(task, runs, next_seq);
            let holder: Arc<str> = Arc::from(id);
            for node in upgraded {
                self.busy.insert(node, holder.clone());
            }
        }
        let now = self.clock.now();
        let mut out = Vec::new();
        let result = self.rollback_at(id, reason, now, &mut out);
        if result.is_err()
            && self
                .live
                .get(id)
                .is_some_and(|l| l.task.state == TaskState::Succeeded)
        {
            // Put a finished task we loaded back where it was.
            let live = self.live.remove(id).expect("checked live above");
            for node in live.runs.keys() {
                if self.busy.get(node).map(|t| &**t) == Some(id) {
                    self.busy.remove(node);
                }
            }
        }
        result?;
        self.commit(id)?;
        Ok((self.task(id)?, out))
    }

    /// Work that is out with agents now: deliveries not yet finished and
    /// restores not yet reported. A server rebuilds its agents' queues from
    /// this after a restart, so nothing handed over is lost.
    pub fn open_work(&self) -> Vec<Command> {
        let mut out = Vec::new();
        for live in self.live.values() {
            for run in live.runs.values() {
                match run.state {
                    RunState::Offered { .. }
                    | RunState::Downloading { .. }
                    | RunState::Upgrading { .. }
                    | RunState::Verifying { .. } => out.push(deliver(&live.task, &run.node_id)),
                    RunState::RollingBack { .. } => out.push(Command::Restore {
                        task: live.task.id.clone(),
                        node: run.node_id.clone(),
                        package: live.task.spec.package.clone(),
                        version: run.from_version.clone(),
                    }),
                    RunState::Succeeded { .. } if run.committing => {
                        out.push(make_permanent(&live.task, &run.node_id))
                    }
                    _ => {}
                }
            }
        }
        out
    }

    pub fn events(&self, id: &str, from: u64, limit: usize) -> Result<Vec<Event>, EngineError> {
        Ok(self.store.events(id, from, limit)?)
    }
}

/// A rolling-back task is rolled back once no restore is out any more
/// (checked only in that state: this runs once per burst of reports).
fn finish_rollback(live: &mut LiveTask, now: u64) {
    if matches!(live.task.state, TaskState::RollingBack(_))
        && live
            .runs
            .values()
            .all(|r| !matches!(r.state, RunState::RollingBack { .. }))
    {
        let _ = live.task_transition(TaskEvent::RolledBack, now);
    }
}

/// A task as it was before a batch of reports touched it: what a failed
/// commit of the batch puts back.
struct Undo {
    state: TaskState,
    updated_at: u64,
    draining: bool,
    next_seq: u64,
    events: usize,
    dirty: usize,
    /// Each changed run as it was, once per node (by node id: a batch can
    /// be a whole wave, and a linear look made it quadratic).
    runs: HashMap<String, NodeRun>,
}

impl Undo {
    fn of(live: &LiveTask) -> Undo {
        Undo {
            state: live.task.state.clone(),
            updated_at: live.task.updated_at,
            draining: live.task.draining,
            next_seq: live.next_seq,
            events: live.events.len(),
            dirty: live.dirty.len(),
            runs: HashMap::new(),
        }
    }

    /// Keeps `run` as it is now, unless an earlier report of the batch did.
    fn keep(&mut self, run: &NodeRun) {
        if !self.runs.contains_key(&run.node_id) {
            self.runs.insert(run.node_id.clone(), run.clone());
        }
    }

    fn restore(self, live: &mut LiveTask) {
        live.task.state = self.state;
        live.task.updated_at = self.updated_at;
        live.task.draining = self.draining;
        live.next_seq = self.next_seq;
        // Changes left from before the batch (an earlier failed commit of a
        // tick) stay, to be committed with the next one.
        live.events.truncate(self.events);
        live.dirty.truncate(self.dirty);
        for (node, run) in self.runs {
            live.runs.insert(node, run);
        }
    }
}

/// A final report the run already shows: sent again by an agent that did
/// not get the answer to the first one.
fn is_repeat(run: &NodeRun, event: &RunEvent) -> bool {
    match (&run.state, event) {
        (RunState::Succeeded { .. }, RunEvent::Succeeded)
        | (RunState::RolledBack { .. }, RunEvent::RolledBack) => true,
        (RunState::FailedRolledBack { error: a, .. }, RunEvent::FailedRolledBack { error: b })
        | (
            RunState::FailedRollbackFailed { error: a, .. },
            RunEvent::FailedRollbackFailed { error: b },
        )
        | (RunState::Rejected { reason: a, .. }, RunEvent::Rejected { reason: b }) => a == b,
        _ => false,
    }
}

/// One walk of a wave (see [`LiveTask::tally`]).
struct Tally {
    /// Runs that have not ended: they keep the wave open.
    unfinished: usize,
    /// Runs out with an agent.
    running: usize,
    /// Push mode inside the task's window: queued runs whose turn has come.
    ready: Option<Vec<String>>,
}

/// Handed to an agent and not reported finished (a trial release being made
/// permanent included).
fn out_with_agent(run: &NodeRun) -> bool {
    run.committing
        || matches!(
            run.state,
            RunState::Offered { .. }
                | RunState::Downloading { .. }
                | RunState::Upgrading { .. }
                | RunState::Verifying { .. }
                | RunState::RollingBack { .. }
        )
}

/// A trial task's wave was judged healthy: its upgraded nodes make the
/// release permanent.
/// Increment tasks: is a skipped node worth targeting again? Only when what
/// it was skipped for changed, so a node that stays unhealthy (or stays out
/// of range) is not re-skipped, with a new event, on every scan:
/// - busy in another task: that task let go of it;
/// - unhealthy: its health check passes now;
/// - same version, out of range, or the policy's own skip: its version changed
///   (a policy skip for labels or attributes is not revisited).
fn worth_another_look(run: &NodeRun, node: &Node, busy_in: Option<&Arc<str>>, task: &str) -> bool {
    // Created by a targeting that did not finish (its `select` failed):
    // never decided, so decided now.
    if matches!(run.state, RunState::Pending) {
        return true;
    }
    let RunState::Skipped { reason, .. } = &run.state else {
        return false;
    };
    match reason {
        SkipReason::BusyInAnotherTask => busy_in.is_none_or(|t| &**t == task),
        SkipReason::Unhealthy => node.healthy,
        SkipReason::SameVersion
        | SkipReason::OutOfRange
        | SkipReason::Policy
        | SkipReason::NewerThanTarget => node.version != run.from_version,
    }
}

/// `version` parses and is newer than `target` (semver precedence: build
/// metadata does not count).
fn newer_than(version: &str, target: &flotilla_version::Version) -> bool {
    flotilla_version::parse(version)
        .is_ok_and(|v| v.cmp_precedence(target) == std::cmp::Ordering::Greater)
}

fn commit_wave(live: &mut LiveTask, wave: u32, now: u64, out: &mut Vec<Command>) {
    let nodes: Vec<String> = live
        .wave_runs(wave)
        .filter(|r| matches!(r.state, RunState::Succeeded { .. }))
        .map(|r| r.node_id.clone())
        .collect();
    for node in nodes {
        if let Some(run) = live.runs.get_mut(&node) {
            run.committing = true;
            run.updated_at = now;
        }
        live.dirty.push(node.clone());
        out.push(make_permanent(&live.task, &node));
    }
}

fn make_permanent(task: &Task, node: &str) -> Command {
    Command::MakePermanent {
        task: task.id.clone(),
        node: node.to_string(),
        package: task.spec.package.clone(),
        version: task.target_version.clone().unwrap_or_default(),
    }
}

fn deliver(task: &Task, node: &str) -> Command {
    Command::Deliver {
        task: task.id.clone(),
        node: node.to_string(),
        package: task.spec.package.clone(),
        version: task.target_version.clone().unwrap_or_default(),
        backup: task.spec.backup.clone(),
        permanent: task.spec.permanent,
    }
}

fn context(task: &Task) -> TaskContext {
    let (retries_failed, retries_timed_out) = task.spec.retries_per_kind();
    TaskContext {
        task_id: task.id.clone(),
        name: task.spec.name.clone(),
        package: task.spec.package.clone(),
        target_version: task.target_version.clone().unwrap_or_default(),
        source_versions: task.spec.source_versions.clone(),
        strategy: task.spec.strategy,
        method: task.spec.method,
        concurrency: task.spec.concurrency,
        backup: task.spec.backup.clone(),
        permanent: task.spec.permanent,
        params: task.spec.params.clone(),
        retries_failed,
        retries_timed_out,
    }
}

/// A task's windows come from its `schedule` param (`{"windows": [...]}`);
/// none means always open.
/// A task the engine holds, or `NoTask`: the engine's steps take a task id
/// and look it up once per borrow, without a panic if the id went away.
fn live_task<'a>(
    live: &'a mut BTreeMap<String, LiveTask>,
    id: &str,
) -> Result<&'a mut LiveTask, EngineError> {
    live.get_mut(id)
        .ok_or_else(|| EngineError::NoTask(id.to_string()))
}

fn schedule_from_params(spec: &TaskSpec) -> Result<Schedule, serde_json::Error> {
    match spec.params.get("schedule") {
        None => Ok(Schedule::always()),
        Some(v) => serde_json::from_value(v.clone()),
    }
}

fn schedule_of(spec: &TaskSpec) -> Schedule {
    schedule_from_params(spec).unwrap_or_else(|_| Schedule::always())
}

fn task_number(id: &str) -> u64 {
    id.trim_start_matches('t').parse().unwrap_or(0)
}

fn last_seq(store: &dyn Store, id: &str) -> Result<u64, StoreError> {
    let mut from = 0;
    loop {
        let page = store.events(id, from, 4096)?;
        match page.last() {
            None => return Ok(from),
            Some(e) => from = e.seq + 1,
        }
        if page.len() < 4096 {
            return Ok(from);
        }
    }
}

/// Runs counted by state name.
pub fn count_states<'a>(runs: impl IntoIterator<Item = &'a NodeRun>) -> BTreeMap<String, usize> {
    // Counted by the static name: no string is made per run.
    let mut by: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in runs {
        *by.entry(r.state.name()).or_insert(0) += 1;
    }
    by.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests;
