//! Upgrade tasks: the spec a user (or a webhook) submits, its validation, and
//! the task state machine.

use super::{Method, Selector, Strategy};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The version a task upgrades to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// An explicit version (`1.13`, `v4.2.1`).
    Version(String),
    /// Whatever the control plane runs for this component when the task starts
    /// (KubeEdge: edge nodes follow CloudCore's version).
    ControlPlane(String),
}

/// Which nodes a task may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    #[default]
    All,
    Selector(Selector),
}

/// Where the agent keeps the backup it restores from on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backup {
    /// The agent's default location.
    #[default]
    Default,
    /// A location the agent knows (`backup add` in the cluster reference):
    /// a plain name (a folder under the agent's backup root) or an absolute
    /// path the agent's own `backup_roots` allow. See [`backup_place`].
    Location(String),
    /// No backup: fast, but a failed install cannot be restored.
    None,
}

/// A [`Backup::Location`] that passed [`backup_place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupPlace<'a> {
    /// One path segment: a folder under the agent's backup root.
    Name(&'a str),
    /// A normalised absolute path; the agent decides whether its config
    /// allows it.
    Absolute(&'a str),
}

/// Longest backup location accepted (bytes).
const MAX_BACKUP_LOCATION: usize = 4096;
/// Longest segment of one (bytes; the usual file-name limit).
const MAX_SEGMENT: usize = 255;

/// Checks a backup location the way both the runner (422) and the agent
/// (refusing the work) do: a plain name of letters, digits, `-`, `_` and `.`
/// (not `.` or `..`), or an absolute path without `.`/`..` segments, empty
/// segments or a trailing `/`. Nothing here touches a file system; whether
/// an absolute path is allowed is the agent's call.
pub fn backup_place(location: &str) -> Result<BackupPlace<'_>, BackupPlaceError> {
    let bad = |problem| {
        Err(BackupPlaceError {
            location: location.to_string(),
            problem,
        })
    };
    if location.is_empty() || location.len() > MAX_BACKUP_LOCATION {
        return bad(BackupPlaceProblem::Length);
    }
    if location.chars().any(char::is_control) {
        return bad(BackupPlaceProblem::ControlCharacter);
    }
    let Some(rest) = location.strip_prefix('/') else {
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if location == "." || location == ".." {
            return bad(BackupPlaceProblem::DotName);
        }
        if location.len() > MAX_SEGMENT || !location.chars().all(name_char) {
            return bad(BackupPlaceProblem::NotAName);
        }
        return Ok(BackupPlace::Name(location));
    };
    if rest.is_empty() {
        return Ok(BackupPlace::Absolute(location));
    }
    for segment in rest.split('/') {
        match segment {
            "" => return bad(BackupPlaceProblem::NotNormalised),
            "." | ".." => return bad(BackupPlaceProblem::DotSegment),
            s if s.len() > MAX_SEGMENT => return bad(BackupPlaceProblem::LongSegment),
            _ => {}
        }
    }
    Ok(BackupPlace::Absolute(location))
}

/// A backup location [`backup_place`] refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backup location {location:?}: {problem}")]
pub struct BackupPlaceError {
    pub location: String,
    pub problem: BackupPlaceProblem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BackupPlaceProblem {
    #[error("must be 1-{MAX_BACKUP_LOCATION} bytes")]
    Length,
    #[error("contains a control character")]
    ControlCharacter,
    #[error("`.` and `..` are not names")]
    DotName,
    #[error(
        "use a plain name (1-{MAX_SEGMENT} letters, digits, `-`, `_`, `.`: a folder under the agent's backup root) or an absolute path"
    )]
    NotAName,
    #[error("an absolute path must be normalised: no `//` and no trailing `/`")]
    NotNormalised,
    #[error("an absolute path must not contain `.` or `..`")]
    DotSegment,
    #[error("a path segment is longer than {MAX_SEGMENT} bytes")]
    LongSegment,
}

/// What a user submits to start an upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// 1–63 chars of `[a-z0-9-]`, starting and ending alphanumeric (a DNS label).
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub package: String,
    pub target: Target,
    /// Versions the task upgrades from; empty = any.
    #[serde(default)]
    pub source_versions: Vec<String>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub method: Method,
    /// Policy name (as uploaded) and its parameters.
    pub policy: String,
    #[serde(default = "empty_object")]
    pub params: serde_json::Value,
    #[serde(default)]
    pub backup: Backup,
    /// `false`: a trial release that reverts on restart until made permanent.
    #[serde(default = "yes")]
    pub permanent: bool,
    /// Nodes upgrading at once (0 = unbounded) unless a wave says otherwise.
    #[serde(default)]
    pub concurrency: u32,
    #[serde(default = "default_timeout")]
    pub node_timeout_seconds: u64,
    /// More attempts for a node whose run failed or timed out, each after a
    /// backoff (see [`Retry`]); `retry` sets them per failure kind.
    #[serde(default)]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// The target may be older than what nodes run (EMQX-style downgrade).
    /// Without it, a node on a newer version is skipped (`newer-than-target`)
    /// and a task whose target is older than every node in scope is refused:
    /// a replayed or stale trigger never rolls a fleet back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downgrade: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn yes() -> bool {
    true
}

fn default_timeout() -> u64 {
    300
}

/// Retries per failure kind, as AWS IoT Jobs' `retryConfig` has them
/// (`FAILED`, `TIMED_OUT`). A rejection (the device declined) and a failed
/// restore (a person must look) are never retried on their own; a policy's
/// `retry-failed` verdict can still re-queue a rejected node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Retries of a run that failed and was rolled back (default: `retries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u32>,
    /// Retries of a run that timed out or never reported (default: `retries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<u32>,
    /// Wait before the first retry; it doubles with each further one, to at
    /// most an hour. Default 30.
    #[serde(default = "default_backoff")]
    pub backoff_seconds: u64,
}

/// Retries per failure kind at most (AWS IoT Jobs' limit).
pub const MAX_RETRIES: u32 = 10;
const DEFAULT_BACKOFF_SECONDS: u64 = 30;
const MAX_BACKOFF_SECONDS: u64 = 3600;

fn default_backoff() -> u64 {
    DEFAULT_BACKOFF_SECONDS
}

/// What is wrong with a spec, phrased for the person who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid task: {0}")]
pub struct SpecError(pub SpecProblem);

/// The one thing a [`SpecError`] finds wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error(
        "name {0:?} must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"
    )]
    TaskName(String),
    /// The policy's name.
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("`package` is empty")]
    NoPackage,
    #[error("target version {0:?} is not a version (like 1.13 or v4.2.1)")]
    TargetVersion(String),
    #[error("target control-plane component is empty")]
    NoComponent,
    #[error("source version {0:?} is not a version")]
    SourceVersion(String),
    #[error(
        "{0} asset trees selected; at most 5 are allowed (use node ids for devices deeper down)"
    )]
    TooManyAssetTrees(usize),
    #[error("pull (upon device request) needs scope `all`: a filtered scope must use push")]
    PullNeedsAll,
    #[error(transparent)]
    Backup(#[from] BackupPlaceError),
    #[error("`params` must be a JSON object")]
    ParamsNotObject,
    #[error("`node_timeout_seconds` must be at least 1")]
    NoNodeTimeout,
    #[error("at most {MAX_RETRIES} retries per failure kind (as AWS IoT Jobs allows); {0} asked")]
    TooManyRetries(u32),
    #[error("`retry.backoff_seconds` must be at most {MAX_BACKOFF_SECONDS}")]
    BackoffTooLong,
}

impl<E: Into<SpecProblem>> From<E> for SpecError {
    fn from(e: E) -> Self {
        SpecError(e.into())
    }
}

/// A name that breaks the one name rule ([`check_name`]): what it names
/// (`policy`, `hook`, `token`, `package`) and the name given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {name:?}: use 1-63 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit"
)]
pub struct NameError {
    pub what: String,
    pub name: String,
}

impl TaskSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |p: SpecProblem| Err(SpecError(p));
        validate_name(&self.name)?;
        if self.package.trim().is_empty() {
            return bad(SpecProblem::NoPackage);
        }
        match &self.target {
            Target::Version(v) if flotilla_version::parse(v).is_err() => {
                return bad(SpecProblem::TargetVersion(v.clone()));
            }
            Target::ControlPlane(c) if c.trim().is_empty() => {
                return bad(SpecProblem::NoComponent);
            }
            _ => {}
        }
        for v in &self.source_versions {
            if flotilla_version::parse(v).is_err() {
                return bad(SpecProblem::SourceVersion(v.clone()));
            }
        }
        if let Scope::Selector(sel) = &self.scope {
            if sel.asset_trees.len() > 5 {
                return bad(SpecProblem::TooManyAssetTrees(sel.asset_trees.len()));
            }
            if self.method == Method::Pull {
                return bad(SpecProblem::PullNeedsAll);
            }
        }
        // The same rule as every route that takes a policy name: a name is
        // never a path, so no policy is loaded from outside its directory.
        check_name("policy", &self.policy)?;
        if let Backup::Location(loc) = &self.backup {
            backup_place(loc)?;
        }
        if !self.params.is_object() {
            return bad(SpecProblem::ParamsNotObject);
        }
        if self.node_timeout_seconds == 0 {
            return bad(SpecProblem::NoNodeTimeout);
        }
        let (failed, timed_out) = self.retries_per_kind();
        if failed.max(timed_out) > MAX_RETRIES {
            return bad(SpecProblem::TooManyRetries(failed.max(timed_out)));
        }
        if self
            .retry
            .as_ref()
            .is_some_and(|r| r.backoff_seconds > MAX_BACKOFF_SECONDS)
        {
            return bad(SpecProblem::BackoffTooLong);
        }
        Ok(())
    }

    /// Retries for a failed-rolled-back run and for a timed-out or silent
    /// one: `retry` per kind where it says, `retries` otherwise.
    pub fn retries_per_kind(&self) -> (u32, u32) {
        let r = self.retry.as_ref();
        (
            r.and_then(|r| r.failed).unwrap_or(self.retries),
            r.and_then(|r| r.timed_out).unwrap_or(self.retries),
        )
    }

    /// How long a node waits before its attempt `attempt + 1`, after its
    /// attempt `attempt` (1-based) failed: the backoff doubling per attempt,
    /// at most an hour.
    pub fn retry_backoff_ms(&self, attempt: u32) -> u64 {
        let base = self
            .retry
            .as_ref()
            .map_or(DEFAULT_BACKOFF_SECONDS, |r| r.backoff_seconds);
        let doubled = base.saturating_mul(1 << attempt.saturating_sub(1).min(20));
        doubled.min(MAX_BACKOFF_SECONDS) * 1000
    }
}

/// The one name rule for packages, policies, hooks and components: 1–63
/// lowercase letters, digits, `-`, `_` or `.`, starting with a letter or a
/// digit (so never `.`, `..`, a hidden file or a path).
pub fn check_name(what: &str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what: what.to_string(),
            name: name.to_string(),
        })
    }
}

/// Task names are DNS labels: 1–63 chars, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(ok_char)
        && name.ends_with(ok_char)
        && name.chars().all(|c| ok_char(c) || c == '-');
    if valid {
        Ok(())
    } else {
        Err(SpecProblem::TaskName(name.to_string()).into())
    }
}

/// Where a task stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum TaskState {
    /// Created; starts when its first window opens.
    Scheduled,
    Running,
    /// Nothing new starts until resumed; running nodes finish.
    Paused(String),
    Succeeded,
    Failed(String),
    Cancelled,
    /// A rollback verdict: restores are out to the nodes this task upgraded.
    RollingBack(String),
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event", content = "reason")]
pub enum TaskEvent {
    Start,
    Pause(String),
    Resume,
    /// Every wave finished and the last verdict was proceed.
    Complete,
    /// Aborted by a verdict or an operator, or failed for good.
    Fail(String),
    Cancel,
    /// Start putting the previous release back.
    Rollback(String),
    /// The rollback of every upgraded node finished.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task: `{event}` does not apply in state `{state}`")]
pub struct IllegalTaskTransition {
    pub state: String,
    pub event: String,
}

impl TaskState {
    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Running => "running",
            TaskState::Paused(_) => "paused",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed(_) => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::RollingBack(_) => "rolling-back",
            TaskState::RolledBack => "rolled-back",
        }
    }

    /// Scheduled, running, paused or rolling back: its nodes are busy for
    /// other tasks.
    pub fn active(&self) -> bool {
        matches!(
            self,
            TaskState::Scheduled
                | TaskState::Running
                | TaskState::Paused(_)
                | TaskState::RollingBack(_)
        )
    }

    pub fn next(self, event: TaskEvent) -> Result<TaskState, IllegalTaskTransition> {
        use TaskEvent as E;
        use TaskState as S;
        Ok(match (&self, event) {
            (S::Scheduled, E::Start) => S::Running,
            (S::Running | S::Scheduled, E::Pause(r)) => S::Paused(r),
            // A pause while paused updates the reason (a second verdict).
            (S::Paused(_), E::Pause(r)) => S::Paused(r),
            (S::Paused(_), E::Resume) => S::Running,
            (S::Running, E::Complete) => S::Succeeded,
            (S::Scheduled | S::Running | S::Paused(_), E::Fail(r)) => S::Failed(r),
            (S::Scheduled | S::Running | S::Paused(_), E::Cancel) => S::Cancelled,
            (S::Running | S::Paused(_) | S::Succeeded, E::Rollback(r)) => S::RollingBack(r),
            (S::RollingBack(_), E::RolledBack) => S::RolledBack,
            (_, event) => {
                return Err(IllegalTaskTransition {
                    state: self.name().into(),
                    event: event.name().into(),
                });
            }
        })
    }
}

impl TaskEvent {
    pub fn name(&self) -> &'static str {
        match self {
            TaskEvent::Start => "start",
            TaskEvent::Pause(_) => "pause",
            TaskEvent::Resume => "resume",
            TaskEvent::Complete => "complete",
            TaskEvent::Fail(_) => "fail",
            TaskEvent::Cancel => "cancel",
            TaskEvent::Rollback(_) => "rollback",
            TaskEvent::RolledBack => "rolled-back",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TaskSpec {
        serde_json::from_value(serde_json::json!({
            "name": "edge-1-13",
            "package": "edgecore",
            "target": { "version": "v1.13" },
            "policy": "canary",
        }))
        .unwrap()
    }

    #[test]
    fn defaults_follow_the_references() {
        let s = spec();
        assert_eq!(s.node_timeout_seconds, 300);
        assert_eq!(s.retries, 0);
        assert!(s.permanent);
        assert_eq!(s.scope, Scope::All);
        assert_eq!(s.method, Method::Push);
        s.validate().unwrap();
    }

    #[test]
    fn a_refused_spec_says_what_is_wrong_as_before() {
        let mut s = spec();
        s.package = " ".into();
        let err = s.validate().unwrap_err();
        assert_eq!(err.0, SpecProblem::NoPackage);
        assert_eq!(err.to_string(), "invalid task: `package` is empty");
        let mut s = spec();
        s.policy = "../etc".into();
        let err = s.validate().unwrap_err();
        assert!(
            matches!(&err.0, SpecProblem::Name(n) if n.what == "policy"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "invalid task: policy \"../etc\": use 1-63 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        );
        let mut s = spec();
        s.backup = Backup::Location("/a//b".into());
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "invalid task: backup location \"/a//b\": an absolute path must be normalised: no `//` and no trailing `/`"
        );
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "edge-upgrade-1", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Upper",
            "under_score",
            &"x".repeat(64),
            "sp ace",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pull_needs_scope_all_and_trees_are_capped() {
        let mut s = spec();
        s.method = Method::Pull;
        s.validate().unwrap();
        s.scope = Scope::Selector(Selector {
            labels: vec![("tier".into(), "edge".into())],
            ..Default::default()
        });
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("pull (upon device request) needs scope `all`"),
            "{err}"
        );
        s.method = Method::Push;
        s.validate().unwrap();
        s.scope = Scope::Selector(Selector {
            asset_trees: (0..6).map(|i| format!("/t{i}")).collect(),
            ..Default::default()
        });
        assert!(s.validate().unwrap_err().to_string().contains("at most 5"));
    }

    #[test]
    fn bad_versions_and_unknown_fields_are_refused() {
        let mut s = spec();
        s.target = Target::Version("latest".into());
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("\"latest\" is not a version")
        );
        let err = serde_json::from_value::<TaskSpec>(serde_json::json!({
            "name": "a", "package": "p", "target": {"version": "1"}, "policy": "c", "concurency": 3
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `concurency`"), "{err}");
    }

    #[test]
    fn backup_locations_are_one_plain_name_or_a_clean_absolute_path() {
        let mut s = spec();
        for ok in [
            "nightly",
            "before-1.4_x",
            "a.b",
            "/srv/backups",
            "/srv/backups/edge",
            "/",
        ] {
            s.backup = Backup::Location(ok.into());
            s.validate().unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "../../outside",
            "a/b",
            "nightly/",
            "./nightly",
            "/srv/../etc",
            "/srv/./b",
            "/srv//b",
            "/srv/b/",
            "sp ace",
            "tab\t",
            "/srv/b\0",
            "ü",
            &"x".repeat(256),
            &format!("/{}", "x/".repeat(3000)),
        ] {
            s.backup = Backup::Location(bad.into());
            let err = s.validate().expect_err(bad).to_string();
            assert!(err.contains("backup location"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn policy_names_follow_the_one_name_rule() {
        let mut s = spec();
        for ok in ["canary", "version-gate", "my_policy.v2", "a"] {
            s.policy = ok.into();
            s.validate().unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            "../../outside/evil",
            "../evil",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "-dash",
            "Upper",
            "sp ace",
            &"x".repeat(64),
        ] {
            s.policy = bad.into();
            let err = s.validate().expect_err(bad).to_string();
            assert!(err.contains("policy"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn task_state_machine() {
        use TaskEvent as E;
        let s = TaskState::Scheduled.next(E::Start).unwrap();
        let s = s.next(E::Pause("2 of 10 failed".into())).unwrap();
        assert!(s.active());
        let s = s.next(E::Resume).unwrap().next(E::Complete).unwrap();
        assert_eq!(s, TaskState::Succeeded);
        assert!(!s.active());
        let err = s.next(E::Resume).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task: `resume` does not apply in state `succeeded`"
        );
        assert!(TaskState::Cancelled.next(E::Start).is_err());
        assert!(TaskState::Scheduled.next(E::Complete).is_err());
        // A rollback cannot be resumed half-way; it ends rolled back.
        let rb = TaskState::Running
            .next(E::Rollback("bad wave".into()))
            .unwrap();
        assert!(rb.active());
        assert!(rb.clone().next(E::Resume).is_err());
        assert_eq!(rb.next(E::RolledBack).unwrap(), TaskState::RolledBack);
    }
}

/// A task as stored: the spec, where it stands, and the plan the policy made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// The version being rolled out, resolved at start (control-plane targets).
    pub target_version: Option<String>,
    /// The policy's plan, fixed when targeting finished (increment tasks append).
    pub waves: Vec<super::Wave>,
    /// Bumped whenever `waves` changes, so a store can tell a changed plan
    /// from an unchanged one without comparing every node id.
    #[serde(default)]
    pub plan_rev: u64,
    /// Index of the wave being dispatched or evaluated.
    pub current_wave: u32,
    /// The current wave finished and soaks until then (Unix ms) before `evaluate`.
    pub soak_until: Option<u64>,
    /// The current wave needs a promote before it starts.
    pub awaiting_approval: bool,
    /// Ended (cancelled, failed, succeeded) but work is still out with
    /// agents: the task holds those nodes until they report. Kept on the
    /// task so a restarted engine finds draining tasks without reading the
    /// runs of every task that ever ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Hex SHA-256 of the policy's bytes when the task was created: the
    /// task runs those bytes to its end, whatever is uploaded later under
    /// the same name (`None` for tasks of older runners and engines whose
    /// policy source keeps no copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
}

/// One line of a task's audit trail: every transition and every policy decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the task's log, from 0.
    pub seq: u64,
    /// Unix ms.
    pub at: u64,
    /// The node concerned, if any.
    pub node: Option<String>,
    /// `task.start`, `node.skipped`, `policy.verdict`, ...
    pub kind: String,
    pub detail: String,
    /// The policy's SHA-256 on `policy.*` events (and `task.created`): the
    /// bytes that made the decision, to replay it with `flotilla policy eval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
}
