//! Domain types shared by every layer: nodes, releases, the task context a policy
//! sees, and the values policy hooks return. Plain data, no I/O; the wire shape
//! (JSON, WIT, Rhai maps) is derived from these.

pub mod facts;
pub mod pairs;
pub mod protocol;
pub mod run;
pub mod signing;
pub mod task;

pub use run::{IllegalTransition, NodeRun, RunEvent, RunState};
pub use task::{
    Backup, BackupPlace, BackupPlaceError, BackupPlaceProblem, Event, NameError, Retry, Scope,
    SpecError, SpecProblem, Target, Task, TaskEvent, TaskSpec, TaskState, backup_place, check_name,
};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest number of nodes handed to a policy in one `select` call.
pub const CHUNK: usize = 4096;

/// A node of the fleet as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, deserialize_with = "crate::pairs::deserialize")]
    pub labels: Vec<(String, String)>,
    #[serde(default, deserialize_with = "crate::pairs::deserialize")]
    pub attributes: Vec<(String, String)>,
    #[serde(default)]
    pub asset_path: String,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default = "yes")]
    pub schedulable: bool,
    #[serde(default = "yes")]
    pub online: bool,
    /// Unix ms of the last agent report; 0 when never seen.
    #[serde(default)]
    pub last_seen: u64,
}

fn yes() -> bool {
    true
}

impl Node {
    /// A healthy, schedulable, online node with no labels: handy in tests and fixtures.
    pub fn new(id: impl Into<String>, version: impl Into<String>) -> Self {
        Node {
            id: id.into(),
            version: version.into(),
            labels: Vec::new(),
            attributes: Vec::new(),
            asset_path: String::new(),
            healthy: true,
            schedulable: true,
            online: true,
            last_seen: 0,
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        lookup(&self.labels, key)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        lookup(&self.attributes, key)
    }
}

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseKind {
    #[default]
    Full,
    Patch,
}

/// A version of a package the runner can deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub package: String,
    pub version: String,
    #[serde(default)]
    pub kind: ReleaseKind,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Snapshot,
    Increment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    #[default]
    Push,
    Pull,
}

/// What a policy knows about the task it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskContext {
    #[serde(default)]
    pub task_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub package: String,
    pub target_version: String,
    #[serde(default)]
    pub source_versions: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub method: Method,
    /// 0 = unbounded.
    #[serde(default)]
    pub concurrency: u32,
    /// The task's backup choice (`"default"`, `"none"` or `{"location": "..."}`).
    #[serde(default)]
    pub backup: Backup,
    /// `false` for a trial release, made permanent when its wave is healthy.
    #[serde(default = "yes")]
    pub permanent: bool,
    /// Policy parameters, a JSON object.
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    /// Retries of a failed-rolled-back run and of a timed-out or silent
    /// one (the task's `retries`/`retry`); a node's `attempts` says how many
    /// it has used.
    #[serde(default)]
    pub retries_failed: u32,
    #[serde(default)]
    pub retries_timed_out: u32,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl TaskContext {
    pub fn new(target_version: impl Into<String>) -> Self {
        TaskContext {
            task_id: String::new(),
            name: String::new(),
            package: String::new(),
            target_version: target_version.into(),
            source_versions: Vec::new(),
            strategy: Strategy::Snapshot,
            method: Method::Push,
            concurrency: 0,
            backup: Backup::Default,
            permanent: true,
            params: empty_object(),
            retries_failed: 0,
            retries_timed_out: 0,
        }
    }

    pub fn with_params(mut self, params: serde_json::Value) -> Self {
        self.params = params;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    SameVersion,
    Unhealthy,
    BusyInAnotherTask,
    OutOfRange,
    Policy,
    /// The node runs a newer version than the target and the task is not a
    /// downgrade. The runner's own skip; not in the WIT contract.
    NewerThanTarget,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::SameVersion,
        SkipReason::Unhealthy,
        SkipReason::BusyInAnotherTask,
        SkipReason::OutOfRange,
        SkipReason::Policy,
        SkipReason::NewerThanTarget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::SameVersion => "same-version",
            SkipReason::Unhealthy => "unhealthy",
            SkipReason::BusyInAnotherTask => "busy-in-another-task",
            SkipReason::OutOfRange => "out-of-range",
            SkipReason::Policy => "policy",
            SkipReason::NewerThanTarget => "newer-than-target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The decision for one node of a `select` chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Selection {
    Include,
    Skip { reason: SkipReason, detail: String },
}

/// One step of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    pub nodes: Vec<String>,
    /// 0 = the task's concurrency.
    #[serde(default)]
    pub concurrency: u32,
    #[serde(default)]
    pub soak_seconds: u64,
    #[serde(default)]
    pub needs_approval: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "admission", content = "value")]
pub enum Admission {
    Now,
    DeferUntil(u64),
    Never(String),
}

/// Counts of one wave, handed to `evaluate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct WaveReport {
    pub wave: u32,
    pub waves: u32,
    pub total: u32,
    pub succeeded: u32,
    pub failed_rolled_back: u32,
    pub failed_rollback_failed: u32,
    pub timed_out: u32,
    pub unknown: u32,
    pub rejected: u32,
    pub in_flight: u32,
    /// Nodes that left the wave without an upgrade: `admit` said never, or
    /// the node left the inventory before its turn. Not in `finished`.
    pub skipped: u32,
    pub failed_nodes: Vec<String>,
    pub task_finished: u32,
    pub task_failed: u32,
}

impl WaveReport {
    /// Nodes of this wave that failed in any way.
    pub fn failed(&self) -> u32 {
        self.failed_rolled_back
            + self.failed_rollback_failed
            + self.timed_out
            + self.unknown
            + self.rejected
    }

    /// Nodes of this wave that reached a final state.
    pub fn finished(&self) -> u32 {
        self.succeeded + self.failed()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict", content = "reason")]
pub enum Verdict {
    Proceed,
    Pause(String),
    RetryFailed,
    Rollback(String),
    Abort(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Proceed => f.write_str("proceed"),
            Verdict::RetryFailed => f.write_str("retry-failed"),
            Verdict::Pause(r) => write!(f, "pause: {r}"),
            Verdict::Rollback(r) => write!(f, "rollback: {r}"),
            Verdict::Abort(r) => write!(f, "abort: {r}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "offer", content = "value")]
pub enum Offer {
    Offer,
    DeferUntil(u64),
    Decline(String),
}

/// The hooks of the policy world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Select,
    Plan,
    Admit,
    Evaluate,
    OnRequest,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Select,
        Hook::Plan,
        Hook::Admit,
        Hook::Evaluate,
        Hook::OnRequest,
    ];

    /// The WIT name (`on-request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Select => "select",
            Hook::Plan => "plan",
            Hook::Admit => "admit",
            Hook::Evaluate => "evaluate",
            Hook::OnRequest => "on-request",
        }
    }

    /// The script function name (`on_request`).
    pub fn fn_name(self) -> &'static str {
        match self {
            Hook::OnRequest => "on_request",
            other => other.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|h| h.as_str() == s || h.fn_name() == s)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub name: String,
    pub version: String,
    pub hooks: Vec<Hook>,
    /// How `plan` may be called over several chunks (absent in a runner's
    /// answer from before 2026-12: in order).
    #[serde(default)]
    pub plan_calls: PlanCalls,
}

/// How the runner may call `plan` when the selection spans several chunks
/// (`policy-info.plan-calls` of the contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanCalls {
    /// In order, in one instance; the policy may keep state between calls.
    #[default]
    InOrder,
    /// Each call depends only on its own chunk: the calls may run at once in
    /// separate instances.
    Independent,
}

impl PlanCalls {
    /// For people: `policy check` and `policy upload` print it.
    pub fn describe(self) -> &'static str {
        match self {
            PlanCalls::InOrder => {
                "in order, in one instance (the policy may keep state between chunks)"
            }
            PlanCalls::Independent => "independent (chunks may run at once on several cores)",
        }
    }
}

impl PolicyInfo {
    pub fn implements(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }
}

/// A selector over the inventory; empty lists match everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    pub ids: Vec<String>,
    #[serde(deserialize_with = "crate::pairs::deserialize")]
    pub labels: Vec<(String, String)>,
    #[serde(deserialize_with = "crate::pairs::deserialize")]
    pub attributes: Vec<(String, String)>,
    /// Asset-tree roots; a node matches at the root or below it.
    pub asset_trees: Vec<String>,
}

impl Selector {
    pub fn matches(&self, node: &Node) -> bool {
        (self.ids.is_empty() || self.ids.contains(&node.id))
            && self
                .labels
                .iter()
                .all(|(k, v)| node.label(k) == Some(v.as_str()))
            && self
                .attributes
                .iter()
                .all(|(k, v)| node.attribute(k) == Some(v.as_str()))
            && (self.asset_trees.is_empty()
                || self
                    .asset_trees
                    .iter()
                    .any(|root| in_tree(&node.asset_path, root)))
    }
}

/// `/a/b` is in the tree `/a` and in `/a/b`, not in `/ab`.
fn in_tree(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    path == root
        || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
        || root.is_empty()
}

/// A node's run in the current task, as the `status` host functions report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRunInfo {
    pub node_id: String,
    pub state: String,
    pub attempts: u32,
    pub wave: Option<u32>,
}

/// Counts over every run of a task, as the `status.summary` host function
/// reports them. `failed` is the sum of the five failure kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TaskSummary {
    pub total: u32,
    pub skipped: u32,
    pub pending: u32,
    pub in_flight: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub failed_rolled_back: u32,
    pub failed_rollback_failed: u32,
    pub timed_out: u32,
    pub unknown: u32,
    pub rejected: u32,
    pub rolled_back: u32,
    pub cancelled: u32,
}

impl TaskSummary {
    /// Adds one run in `state` to the counts.
    pub fn add(&mut self, state: &RunState) {
        self.total += 1;
        let field = match state {
            RunState::Pending | RunState::Queued { .. } => &mut self.pending,
            RunState::Skipped { .. } => &mut self.skipped,
            RunState::Offered { .. }
            | RunState::Downloading { .. }
            | RunState::Upgrading { .. }
            | RunState::Verifying { .. }
            | RunState::RollingBack { .. } => &mut self.in_flight,
            RunState::Succeeded { .. } => &mut self.succeeded,
            RunState::FailedRolledBack { .. } => &mut self.failed_rolled_back,
            RunState::FailedRollbackFailed { .. } => &mut self.failed_rollback_failed,
            RunState::TimedOut { .. } => &mut self.timed_out,
            RunState::Unknown { .. } => &mut self.unknown,
            RunState::Rejected { .. } => &mut self.rejected,
            RunState::RolledBack { .. } => &mut self.rolled_back,
            RunState::Cancelled => &mut self.cancelled,
        };
        *field += 1;
        if state.failed() {
            self.failed += 1;
        }
    }

    /// The counts of `states`.
    pub fn of<'a>(states: impl IntoIterator<Item = &'a RunState>) -> Self {
        let mut s = TaskSummary::default();
        for state in states {
            s.add(state);
        }
        s
    }
}

/// A past outcome of a node in an earlier task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub task_id: String,
    pub version: String,
    pub state: String,
    pub at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// A release as the runner stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub package: String,
    pub version: String,
    #[serde(default)]
    pub kind: ReleaseKind,
    /// Where agents download it: an external URL, or `None` when the
    /// artifact was uploaded to the runner.
    #[serde(default)]
    pub url: Option<String>,
    /// Lowercase hex; empty until an artifact is uploaded.
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub created_at: u64,
    /// The release's minisign signature (the `.minisig` text), if it was
    /// given; its trusted comment is [`signing::trusted_comment`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// One audited call (`GET /v1/audit`): the runner writes it, the client
/// reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1; the paging cursor.
    pub seq: u64,
    /// Unix ms.
    pub at: u64,
    /// The token's name, `hook:NAME`, `anonymous` (no token configured), or
    /// `-` (no or an unknown token).
    pub who: String,
    pub method: String,
    pub path: String,
    /// What the call is about: a task id, `package@version`, a policy,
    /// node, component or token name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The answer's status; `None` while the call runs (or if its outcome
    /// could not be stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `ok`, `refused` (4xx), `fault` (5xx) or `pending`.
    pub outcome: String,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditRecord {
    pub fn outcome_of(status: Option<u16>) -> &'static str {
        match status {
            None => "pending",
            Some(s) if s < 400 => "ok",
            Some(s) if s < 500 => "refused",
            Some(_) => "fault",
        }
    }
}

/// A task with its node-run counts per state (`GET /v1/tasks/{id}`): the
/// runner answers it, the client and the dashboard read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub task: Task,
    pub counts: std::collections::BTreeMap<String, usize>,
}

/// A page of the audit log: ask again with `after` = `next` for more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    pub next: u64,
    pub more: bool,
}

impl ReleaseRecord {
    /// Agents can fetch it: an uploaded artifact or a URL with its digest.
    pub fn ready(&self) -> bool {
        !self.sha256.is_empty() && self.size > 0
    }

    pub fn artifact_path(&self) -> String {
        format!("/v1/releases/{}/{}/artifact", self.package, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_tree_includes_the_root_and_children_only() {
        let sel = Selector {
            asset_trees: vec!["/plant-a".into()],
            ..Default::default()
        };
        let mut n = Node::new("n", "1.0.0");
        for (path, want) in [
            ("/plant-a", true),
            ("/plant-a/line-1", true),
            ("/plant-ab", false),
            ("", false),
        ] {
            n.asset_path = path.into();
            assert_eq!(sel.matches(&n), want, "{path}");
        }
    }

    #[test]
    fn hook_names_round_trip() {
        for h in Hook::ALL {
            assert_eq!(Hook::parse(h.as_str()), Some(h));
            assert_eq!(Hook::parse(h.fn_name()), Some(h));
        }
    }
}
