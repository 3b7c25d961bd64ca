//! The upgrade pipeline for one piece of work: download (resumed, retried,
//! size-bounded, sha256-verified) → back up the current release → unpack →
//! switch → install command → health command → make permanent (or stay a
//! trial). A failure after the switch restores the previous release from its
//! backup. Progress goes out on a channel; the outcome is the returned report.

use super::client::{RunnerClient, RunnerClientError};
use super::journal::{Action, Entry, WorkJournal};
use super::releases::{ReleaseError, ReleaseStore, UnpackLimits, check_version};
use super::verify::{TrustedKeys, VerifyError};
use flotilla_model::protocol::{Artifact, Report, ReportState, Work};
use flotilla_model::{Backup, BackupPlace, ReleaseKind, backup_place};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedSender;

/// The commands and limits an upgrade runs with.
#[derive(Debug, Clone)]
pub struct Steps {
    pub node_id: String,
    /// Run in the new release's directory after the switch (`sh -c`).
    pub install_command: Option<String>,
    /// Run after install; non-zero means the release is unhealthy.
    pub health_command: Option<String>,
    /// Run for the restored release; the install command when unset.
    pub restore_command: Option<String>,
    pub command_timeout: Duration,
    /// Download attempts after the first.
    pub download_retries: u32,
    /// First pause between download attempts; doubles up to 30 s.
    pub retry_backoff: Duration,
    /// Absolute directories a task's `backup.location` may name (or lie
    /// under). Empty: only plain names, under the state dir's `backups/`.
    pub backup_roots: Vec<PathBuf>,
    /// An archive may unpack to this many times its own size...
    pub unpack_ratio: u64,
    /// ...but is always allowed this many bytes...
    pub unpack_min_bytes: u64,
    /// ...and at most this many entries (files, directories, links).
    pub unpack_max_entries: u64,
    /// Release signing keys this node trusts; when set, an install needs a
    /// signature by one of them (see [`crate::verify`]).
    pub trusted_keys: TrustedKeys,
    /// Take remote work that moves the node below its permanent release.
    pub allow_remote_downgrade: bool,
}

impl Default for Steps {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            install_command: None,
            health_command: None,
            restore_command: None,
            command_timeout: Duration::from_secs(300),
            download_retries: 5,
            retry_backoff: Duration::from_millis(500),
            backup_roots: Vec::new(),
            unpack_ratio: UnpackLimits::RATIO,
            unpack_min_bytes: UnpackLimits::MIN_BYTES,
            unpack_max_entries: UnpackLimits::MAX_ENTRIES,
            trusted_keys: TrustedKeys::default(),
            allow_remote_downgrade: false,
        }
    }
}

/// What carrying out a piece of work came to.
#[derive(Debug)]
pub enum Outcome {
    /// The final report, for the runner.
    Done(Report),
    /// A fault on this node (its disk) stopped the work before anything
    /// final could be said: nothing is reported, so the runner keeps the
    /// work open, and the agent asks for it again after a pause.
    Deferred(String),
}

/// Runs work against the node's release store.
pub struct Upgrader {
    pub store: ReleaseStore,
    pub journal: WorkJournal,
    pub steps: Steps,
}

fn report(task: &str, state: ReportState, detail: impl Into<String>) -> Report {
    Report {
        task: task.to_string(),
        state,
        detail: detail.into(),
    }
}

/// `path` (absolute, without `.`/`..`) is `root` or lies under it, both as
/// written and with symlinks resolved as far as each exists: a link in a
/// root that points elsewhere does not widen it.
fn inside(path: &Path, root: &Path) -> bool {
    if !root.is_absolute() || !path.starts_with(root) {
        return false;
    }
    match (resolve_existing(path), resolve_existing(root)) {
        (Some(path), Some(root)) => path.starts_with(root),
        _ => false,
    }
}

/// `path` with its longest existing ancestor canonicalised and the rest
/// appended (`None` if even `/` cannot be).
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(real, |p, s| p.join(s)));
        }
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
}

/// A step of the pipeline that failed, with what it failed on as its
/// source. The report to the runner says which step (`install failed:
/// ...`, `restore of 1.0 failed: ...`) around this message.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The release store (unpack, switch, backup, make permanent).
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The install, health or restore command.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The release's signature over the downloaded bytes.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A file the pipeline reads (the digest of a download).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker thread failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    #[error("{0} is not installed and no backup of it was found")]
    NoBackup(String),
    /// The node's own floor: remote work may not move it below its
    /// permanent release.
    #[error(
        "remote downgrade refused: the work would move this node from its permanent release {permanent} to the older {version}; allow it in the agent's own config (allow_remote_downgrade = true or --allow-remote-downgrade), or downgrade on the node with `flotilla-agent downgrade {version}`; nothing was changed"
    )]
    Downgrade { permanent: String, version: String },
    /// A backup location this node does not write to.
    #[error("refused: {0}; nothing on the node was changed")]
    BackupLocation(#[source] BackupLocationError),
}

/// Why this node will not write a task's backup where it says.
#[derive(Debug, thiserror::Error)]
pub enum BackupLocationError {
    /// Not a backup location at all (the runner checks this too).
    #[error(transparent)]
    Invalid(#[from] flotilla_model::BackupPlaceError),
    #[error(
        "backup location {} is not inside this agent's backup roots ({allowed}); allow it with `backup_roots` in the agent config (or --backup-root)",
        path.display()
    )]
    OutsideRoots { path: PathBuf, allowed: String },
}

/// An install, health or restore command that did not succeed; `action`
/// names it (`install`, `health`, `restore`).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start the {action} command `{cmd}`: {source}")]
    Start {
        action: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed; `stderr` is the end of what it wrote there.
    #[error("the {action} command `{cmd}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        action: String,
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the {action} command `{cmd}` failed to run: {source}")]
    Wait {
        action: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {action} command `{cmd}` did not finish within {timeout:?} and was killed")]
    Timeout {
        action: String,
        cmd: String,
        timeout: Duration,
    },
}

/// What went wrong with one download attempt.
#[derive(Debug, thiserror::Error)]
pub enum DownloadProblem {
    /// The runner's answer (or none): transient or not, see
    /// [`RunnerClientError::is_transient`].
    #[error(transparent)]
    Runner(#[from] RunnerClientError),
    #[error("the runner refused the node token")]
    Unauthorized,
    #[error("the server resumed at {start:?}, not at byte {offset}; starting over")]
    BadResume { start: Option<u64>, offset: u64 },
    #[error("the server refused the resume range; starting over")]
    RangeRefused,
    #[error("the server offers {offered} bytes, more than the release's size of {size}")]
    Offers { offered: u64, size: u64 },
    #[error("the server sent more than the release's size of {size} bytes")]
    TooLong { size: u64 },
    #[error("interrupted at byte {written}: {source}")]
    Interrupted {
        written: u64,
        #[source]
        source: reqwest::Error,
    },
    #[error("the body ended at byte {written} of {size}")]
    Short { written: u64, size: u64 },
    #[error(
        "sha256 mismatch: expected {expected}, got {got}; the artifact is corrupt (check the release's sha256 on the runner)"
    )]
    Digest { expected: String, got: String },
}

/// Why a download produced no artifact.
#[derive(Debug, thiserror::Error)]
enum DownloadError {
    /// The runner or the bytes are wrong; trying again will not help.
    #[error("download refused: {0}")]
    Refused(#[source] DownloadProblem),
    /// Every attempt failed.
    #[error(
        "download failed: {attempts} attempts, last: {}; the partial file is kept and resumed next time",
        last.as_ref().map_or("no attempt made".to_string(), |e| e.to_string())
    )]
    GaveUp {
        attempts: u32,
        last: Option<DownloadProblem>,
    },
    /// The node's own disk (writing the partial file, reading it for its
    /// digest): a fault of the node, not of the runner or the release.
    #[error("download failed: {0}")]
    Node(#[source] UpgradeError),
}

impl Upgrader {
    pub fn new(store: ReleaseStore, steps: Steps) -> Result<Self, super::releases::ReleaseError> {
        let journal = WorkJournal::open(store.dir())?;
        Ok(Self {
            store,
            journal,
            steps,
        })
    }

    /// Does `work` (or re-reports it when it was already done) and returns
    /// the final report, or why it was deferred. Steps are sent on
    /// `progress` as they start.
    pub async fn execute(
        &self,
        client: &RunnerClient,
        work: &Work,
        progress: &UnboundedSender<Report>,
    ) -> Outcome {
        Outcome::Done(match work {
            Work::Install {
                task,
                version,
                artifact,
                backup,
                permanent,
                package,
            } => {
                self.install(
                    client, task, package, version, artifact, backup, *permanent, progress,
                )
                .await
            }
            Work::Restore { task, version, .. } => self.restore(task, version).await,
            Work::MakePermanent { task, version, .. } => {
                return self.make_permanent(task, version);
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn install(
        &self,
        client: &RunnerClient,
        task: &str,
        package: &str,
        version: &str,
        artifact: &Artifact,
        backup: &Backup,
        permanent: bool,
        progress: &UnboundedSender<Report>,
    ) -> Report {
        if let Err(e) = check_version(version) {
            return report(task, ReportState::Rejected, e.to_string());
        }
        if artifact.sha256.len() != 64 || !artifact.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return report(
                task,
                ReportState::Rejected,
                format!("artifact sha256 `{}` is not 64 hex digits", artifact.sha256),
            );
        }
        // Checked before anything is journaled, downloaded or copied: the
        // runner checks too, but the node decides what it lets a task touch.
        if let Err(e) = self.backup_base(backup) {
            return report(task, ReportState::Rejected, e.to_string());
        }
        // The node's own keys and its own floor, before anything is
        // downloaded: whoever holds the runner decides neither.
        if let Err(e) = self.steps.trusted_keys.precheck(package, version, artifact) {
            return report(
                task,
                ReportState::Rejected,
                format!("{e}; nothing was downloaded or changed"),
            );
        }
        if let Err(e) = self.downgrade_allowed(version) {
            return report(task, ReportState::Rejected, e.to_string());
        }
        let mut entry = match self.journal.get(task, version, Action::Install) {
            Some(Entry {
                outcome: Some(done),
                ..
            }) => {
                tracing::info!(task, version, state = ?done.state, "work already done; reporting it again");
                return done;
            }
            Some(open) => {
                tracing::info!(task, version, "resuming work cut short by a restart");
                open
            }
            None => {
                // A disk fault, not a reason to decline the release: a
                // failure the task may retry.
                let previous = match self.store.current() {
                    Ok(p) => p,
                    Err(e) => {
                        return report(
                            task,
                            ReportState::FailedRolledBack,
                            format!("{e}; nothing on the node was changed"),
                        );
                    }
                };
                Entry {
                    task: task.to_string(),
                    version: version.to_string(),
                    action: Action::Install,
                    previous,
                    backup: None,
                    outcome: None,
                }
            }
        };
        if let Err(e) = self.journal.put(&entry) {
            return report(
                task,
                ReportState::FailedRolledBack,
                format!("cannot journal the work: {e}; nothing on the node was changed"),
            );
        }
        let outcome = self
            .install_steps(
                client, &mut entry, package, artifact, backup, permanent, progress,
            )
            .await;
        entry.outcome = Some(outcome.clone());
        if let Err(e) = self.journal.put(&entry) {
            tracing::warn!(task, error = %e, "cannot journal the outcome; a re-sent work will be redone");
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn install_steps(
        &self,
        client: &RunnerClient,
        entry: &mut Entry,
        package: &str,
        artifact: &Artifact,
        backup: &Backup,
        permanent: bool,
        progress: &UnboundedSender<Report>,
    ) -> Report {
        let task = entry.task.clone();
        let version = entry.version.clone();
        let previous = entry.previous.clone();
        let send = |state| {
            let _ = progress.send(report(&task, state, ""));
        };

        if previous.as_deref() == Some(version.as_str()) {
            if permanent && let Err(e) = self.store.make_permanent(&version) {
                return report(&task, ReportState::FailedRolledBack, e.to_string());
            }
            return report(
                &task,
                ReportState::Succeeded,
                format!("already on {version}"),
            );
        }

        send(ReportState::Downloading);
        let file = match self.download(client, artifact).await {
            Ok(f) => f,
            Err(e) => {
                return report(
                    &task,
                    ReportState::FailedRolledBack,
                    format!("{e}; nothing on the node was changed"),
                );
            }
        };

        // The bytes against the signature, before anything is unpacked.
        if let Ok(Some(checked)) = self
            .steps
            .trusted_keys
            .precheck(package, &version, artifact)
        {
            let keys = self.steps.trusted_keys.clone();
            let f = file.clone();
            let verified =
                blocking(move || keys.verify_file(&checked, &f).map_err(UpgradeError::from)).await;
            if let Err(e) = verified {
                let _ = tokio::fs::remove_file(&file).await;
                // The node cannot read its download: a fault, not the
                // release's fault.
                let state = match &e {
                    UpgradeError::Verify(v) if !v.is_fault() => ReportState::Rejected,
                    _ => ReportState::FailedRolledBack,
                };
                return report(&task, state, format!("{e}; nothing was unpacked or run"));
            }
        }

        send(ReportState::Upgrading);
        if let Some(prev) = &previous
            && entry.backup.is_none()
        {
            let to = match self.backup_base(backup) {
                Ok(base) => base.map(|b| b.join(prev)),
                Err(e) => return report(&task, ReportState::Rejected, e.to_string()),
            };
            if let Some(to) = to {
                let store = self.store.clone();
                let (p, t) = (prev.clone(), to.clone());
                match blocking(move || store.backup(&p, &t).map_err(UpgradeError::from)).await {
                    Ok(()) => {
                        entry.backup = Some(to);
                        if let Err(e) = self.journal.put(entry) {
                            tracing::warn!(error = %e, "cannot journal the backup location");
                        }
                    }
                    Err(e) => {
                        return report(
                            &task,
                            ReportState::FailedRolledBack,
                            format!(
                                "backup of {prev} failed: {e}; nothing on the node was changed"
                            ),
                        );
                    }
                }
            }
        }

        // A patch is laid over the release it patches; a full release stands alone.
        let base = match artifact.kind {
            ReleaseKind::Patch => match &previous {
                Some(p) => Some(p.clone()),
                None => {
                    return report(
                        &task,
                        ReportState::FailedRolledBack,
                        "a patch needs a release to patch, and none is installed; nothing on the node was changed",
                    );
                }
            },
            ReleaseKind::Full => None,
        };
        let store = self.store.clone();
        let (v, f) = (version.clone(), file.clone());
        let limits = UnpackLimits::for_artifact(
            artifact.size,
            self.steps.unpack_ratio,
            self.steps.unpack_min_bytes,
            self.steps.unpack_max_entries,
        );
        let unpacked = blocking(move || {
            store
                .unpack(&v, &f, base.as_deref(), &limits)
                .map_err(UpgradeError::from)
        })
        .await;
        let _ = tokio::fs::remove_file(&file).await;
        let dir = match unpacked {
            Ok(dir) => dir,
            Err(e) => {
                return report(
                    &task,
                    ReportState::FailedRolledBack,
                    format!("unpack failed: {e}; nothing on the node was changed"),
                );
            }
        };

        if let Err(e) = self.store.switch(&version) {
            return self.roll_back(entry, format!("switch failed: {e}")).await;
        }
        let env = self.env(&task, package, &version, previous.as_deref(), &dir);
        if let Some(cmd) = &self.steps.install_command
            && let Err(e) = self.run(cmd, "install", &env, &dir).await
        {
            return self.roll_back(entry, format!("install failed: {e}")).await;
        }

        send(ReportState::Verifying);
        if let Some(cmd) = &self.steps.health_command
            && let Err(e) = self.run(cmd, "health", &env, &dir).await
        {
            return self
                .roll_back(entry, format!("health check failed: {e}"))
                .await;
        }
        if permanent {
            if let Err(e) = self.store.make_permanent(&version) {
                return self
                    .roll_back(entry, format!("make permanent failed: {e}"))
                    .await;
            }
            report(&task, ReportState::Succeeded, "")
        } else {
            report(
                &task,
                ReportState::Succeeded,
                format!(
                    "{version} is current as a trial; a restart returns to the permanent release"
                ),
            )
        }
    }

    /// The directory the backup of a release goes into (as `<dir>/<version>`)
    /// for `backup` (`None`: no backup), or why this node refuses the
    /// location: the default and a plain name are under `backups/` in the
    /// state dir; an absolute path must lie inside one of
    /// [`Steps::backup_roots`], also once symlinks are followed.
    fn backup_base(&self, backup: &Backup) -> Result<Option<PathBuf>, UpgradeError> {
        let backups = self.store.dir().join("backups");
        let loc = match backup {
            Backup::None => return Ok(None),
            Backup::Default => return Ok(Some(backups)),
            Backup::Location(loc) => loc,
        };
        let refuse = |why: BackupLocationError| UpgradeError::BackupLocation(why);
        match backup_place(loc).map_err(|e| refuse(e.into()))? {
            BackupPlace::Name(name) => Ok(Some(backups.join(name))),
            BackupPlace::Absolute(path) => {
                let path = Path::new(path);
                let roots = &self.steps.backup_roots;
                if roots.iter().any(|root| inside(path, root)) {
                    return Ok(Some(path.to_path_buf()));
                }
                let allowed = if roots.is_empty() {
                    "none configured".to_string()
                } else {
                    let roots: Vec<String> =
                        roots.iter().map(|r| r.display().to_string()).collect();
                    roots.join(", ")
                };
                Err(refuse(BackupLocationError::OutsideRoots {
                    path: path.to_path_buf(),
                    allowed,
                }))
            }
        }
    }

    /// Whether remote work may move this node to `version`: not below its
    /// permanent release unless the node's own config allows it. Versions
    /// that do not parse as (lenient) semver have no order and pass.
    fn downgrade_allowed(&self, version: &str) -> Result<(), UpgradeError> {
        if self.steps.allow_remote_downgrade {
            return Ok(());
        }
        let Ok(Some(permanent)) = self.store.permanent() else {
            return Ok(());
        };
        match (
            flotilla_version::parse(version),
            flotilla_version::parse(&permanent),
        ) {
            (Ok(to), Ok(from)) if to < from => Err(UpgradeError::Downgrade {
                permanent,
                version: version.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// After a failed step past the switch: put the previous release back.
    async fn roll_back(&self, entry: &Entry, why: String) -> Report {
        let task = &entry.task;
        tracing::warn!(task, version = entry.version, reason = why, "rolling back");
        let Some(prev) = &entry.previous else {
            // Nothing was installed before: back to nothing.
            return match self.store.clear_current() {
                Ok(()) => report(
                    task,
                    ReportState::FailedRolledBack,
                    format!("{why}; no release was installed before, so none is current now"),
                ),
                Err(e) => report(
                    task,
                    ReportState::FailedRollbackFailed,
                    format!("{why}; {e}"),
                ),
            };
        };
        let Some(backup) = &entry.backup else {
            return report(
                task,
                ReportState::FailedRollbackFailed,
                format!(
                    "{why}; no backup of {prev} was taken (backup: none), so the node is left on {}; \
                     put {prev} back with `flotilla agent downgrade {prev}`",
                    entry.version
                ),
            );
        };
        match self.put_back(task, "", prev, backup).await {
            Ok(()) => report(
                task,
                ReportState::FailedRolledBack,
                format!("{why}; restored {prev} from its backup"),
            ),
            Err(e) => report(
                task,
                ReportState::FailedRollbackFailed,
                format!("{why}; restoring {prev} failed: {e}"),
            ),
        }
    }

    /// Restores `version` from `backup`, switches to it and runs the restore
    /// (or install) command for it.
    async fn put_back(
        &self,
        task: &str,
        package: &str,
        version: &str,
        backup: &Path,
    ) -> Result<(), UpgradeError> {
        let store = self.store.clone();
        let (v, b) = (version.to_string(), backup.to_path_buf());
        blocking(move || store.restore_backup(&v, &b).map_err(UpgradeError::from)).await?;
        self.store.switch(version)?;
        let dir = self.store.release_dir(version);
        let env = self.env(task, package, version, None, &dir);
        let cmd = self
            .steps
            .restore_command
            .as_ref()
            .or(self.steps.install_command.as_ref());
        if let Some(cmd) = cmd {
            self.run(cmd, "restore", &env, &dir).await?;
        }
        Ok(())
    }

    /// `Work::MakePermanent`: the trial release `version` (current) becomes
    /// the one a restart comes back on. Idempotent: asked again, it answers
    /// the same. Declined (`rejected`) only for what asking again will not
    /// change (another release is current, it is not installed); a disk
    /// fault defers it instead (see [`Outcome::Deferred`]).
    fn make_permanent(&self, task: &str, version: &str) -> Outcome {
        let declined = |detail: String| Outcome::Done(report(task, ReportState::Rejected, detail));
        let deferred =
            |e: ReleaseError| Outcome::Deferred(format!("making {version} permanent: {e}"));
        if let Err(e) = check_version(version) {
            return declined(e.to_string());
        }
        match self.store.current() {
            Ok(Some(current)) if current == version => {}
            Ok(current) => {
                return declined(format!(
                    "{version} is not the current release ({}); nothing made permanent",
                    current.as_deref().unwrap_or("none")
                ));
            }
            Err(e) if e.is_fault() => return deferred(e),
            Err(e) => return declined(e.to_string()),
        }
        match self.store.make_permanent(version) {
            Ok(()) => Outcome::Done(report(
                task,
                ReportState::MadePermanent,
                format!("{version} is permanent"),
            )),
            Err(e) if e.is_fault() => deferred(e),
            Err(e) => declined(e.to_string()),
        }
    }

    /// `Work::Restore`: put `version` back as current and permanent.
    async fn restore(&self, task: &str, version: &str) -> Report {
        if let Err(e) = check_version(version) {
            return report(task, ReportState::Rejected, e.to_string());
        }
        if let Some(Entry {
            outcome: Some(done),
            ..
        }) = self.journal.get(task, version, Action::Restore)
        {
            return done;
        }
        // A rollback of this task to the release its install left is the
        // node's own history; any other restore below the permanent
        // release is a downgrade like any other.
        if !self.journal.left(task, version)
            && let Err(e) = self.downgrade_allowed(version)
        {
            return report(task, ReportState::FailedRollbackFailed, e.to_string());
        }
        let current = self.store.current().ok().flatten();
        let mut entry = Entry {
            task: task.to_string(),
            version: version.to_string(),
            action: Action::Restore,
            previous: current.clone(),
            backup: None,
            outcome: None,
        };
        let outcome = match self.restore_steps(task, version).await {
            Ok(detail) => report(task, ReportState::RolledBack, detail),
            Err(e) => {
                // Leave the node where it was rather than half-way.
                if let Some(c) = &current {
                    let _ = self.store.switch(c);
                }
                report(
                    task,
                    ReportState::FailedRollbackFailed,
                    format!("restore of {version} failed: {e}"),
                )
            }
        };
        entry.outcome = Some(outcome.clone());
        if let Err(e) = self.journal.put(&entry) {
            tracing::warn!(task, error = %e, "cannot journal the outcome");
        }
        outcome
    }

    async fn restore_steps(&self, task: &str, version: &str) -> Result<String, UpgradeError> {
        let installed = self.store.is_installed(version);
        if !installed {
            let backup = self
                .journal
                .backup_of(task, version)
                .or_else(|| Some(self.store.default_backup(version)).filter(|p| p.is_dir()))
                .ok_or_else(|| UpgradeError::NoBackup(version.to_string()))?;
            self.put_back(task, "", version, &backup).await?;
            self.store.make_permanent(version)?;
            return Ok(format!("restored {version} from {}", backup.display()));
        }
        self.store.switch(version)?;
        let dir = self.store.release_dir(version);
        let env = self.env(task, "", version, None, &dir);
        if let Some(cmd) = self
            .steps
            .restore_command
            .as_ref()
            .or(self.steps.install_command.as_ref())
        {
            self.run(cmd, "restore", &env, &dir).await?;
        }
        self.store.make_permanent(version)?;
        Ok(format!("{version} is current and permanent again"))
    }

    fn env(
        &self,
        task: &str,
        package: &str,
        version: &str,
        previous: Option<&str>,
        dir: &Path,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("FLOTILLA_TASK", task.to_string()),
            ("FLOTILLA_PACKAGE", package.to_string()),
            ("FLOTILLA_VERSION", version.to_string()),
            (
                "FLOTILLA_PREVIOUS_VERSION",
                previous.unwrap_or("").to_string(),
            ),
            ("FLOTILLA_RELEASE_DIR", dir.display().to_string()),
            ("FLOTILLA_STATE_DIR", self.store.dir().display().to_string()),
            ("FLOTILLA_NODE_ID", self.steps.node_id.clone()),
        ]
    }

    /// Runs `sh -c cmd` in its own process group, killed whole on timeout.
    pub async fn run(
        &self,
        cmd: &str,
        action: &str,
        env: &[(&'static str, String)],
        dir: &Path,
    ) -> Result<(), CommandError> {
        run_command(cmd, action, env, dir, self.steps.command_timeout).await
    }

    /// Downloads `artifact` into `DIR/downloads/`, resuming a partial file,
    /// and returns the verified file.
    async fn download(
        &self,
        client: &RunnerClient,
        artifact: &Artifact,
    ) -> Result<PathBuf, DownloadError> {
        let url = client
            .resolve(&artifact.url)
            .map_err(|e| DownloadError::Refused(e.into()))?;
        let sha = artifact.sha256.to_ascii_lowercase();
        let part = self.store.downloads_dir().join(format!("{sha}.part"));
        let size = artifact.size;
        let mut last: Option<DownloadProblem> = None;
        for attempt in 0..=self.steps.download_retries {
            if attempt > 0 {
                let pause = self
                    .steps
                    .retry_backoff
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(Duration::from_secs(30));
                tracing::info!(attempt, ?pause, error = ?last.as_ref().map(|e| e.to_string()), "retrying the download");
                tokio::time::sleep(pause).await;
            }
            match fetch(client, &url, &part, size).await {
                Ok(()) => {
                    let got = {
                        let p = part.clone();
                        blocking(move || sha256_file(&p)).await
                    }
                    .map_err(DownloadError::Node)?;
                    if got != sha {
                        let _ = tokio::fs::remove_file(&part).await;
                        return Err(DownloadError::Refused(DownloadProblem::Digest {
                            expected: sha,
                            got,
                        }));
                    }
                    return Ok(part);
                }
                Err(Fetch::Refused(e)) => return Err(DownloadError::Refused(e)),
                Err(Fetch::Disk(e)) => return Err(DownloadError::Node(e)),
                Err(Fetch::Retry(e)) => last = Some(e),
            }
        }
        Err(DownloadError::GaveUp {
            attempts: self.steps.download_retries + 1,
            last,
        })
    }
}

enum Fetch {
    Refused(DownloadProblem),
    Retry(DownloadProblem),
    /// Writing the partial file failed.
    Disk(UpgradeError),
}

/// One download attempt: appends to `part` from where it ends.
async fn fetch(
    client: &RunnerClient,
    url: &reqwest::Url,
    part: &Path,
    size: u64,
) -> Result<(), Fetch> {
    let io = |source| {
        Fetch::Disk(UpgradeError::Io {
            path: part.to_path_buf(),
            source,
        })
    };
    let mut offset = match tokio::fs::metadata(part).await {
        Ok(m) => m.len(),
        Err(_) => 0,
    };
    if offset > size {
        tokio::fs::remove_file(part).await.map_err(io)?;
        offset = 0;
    }
    if offset == size && size > 0 {
        return Ok(());
    }
    let mut resp = match client.artifact(url, offset).await {
        Ok(r) => r,
        Err(e) if e.is_transient() => return Err(Fetch::Retry(e.into())),
        Err(RunnerClientError::Unauthorized) => {
            return Err(Fetch::Retry(DownloadProblem::Unauthorized));
        }
        Err(e) => return Err(Fetch::Refused(e.into())),
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .await
        .map_err(io)?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(offset) {
                file.set_len(0).await.map_err(io)?;
                return Err(Fetch::Retry(DownloadProblem::BadResume { start, offset }));
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            file.set_len(0).await.map_err(io)?;
            return Err(Fetch::Retry(DownloadProblem::RangeRefused));
        }
        _ => {
            // A full body: the server ignored the range.
            file.set_len(0).await.map_err(io)?;
            offset = 0;
        }
    }
    if let Some(len) = resp.content_length()
        && offset + len > size
    {
        drop(file);
        let _ = tokio::fs::remove_file(part).await;
        return Err(Fetch::Refused(DownloadProblem::Offers {
            offered: offset + len,
            size,
        }));
    }
    let mut written = offset;
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = file.flush().await;
                return Err(Fetch::Retry(DownloadProblem::Interrupted {
                    written,
                    source: e,
                }));
            }
        };
        written += chunk.len() as u64;
        if written > size {
            drop(file);
            let _ = tokio::fs::remove_file(part).await;
            return Err(Fetch::Refused(DownloadProblem::TooLong { size }));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    if written < size {
        return Err(Fetch::Retry(DownloadProblem::Short { written, size }));
    }
    Ok(())
}

/// The lowercase hex sha256 of a file (the digest check of a download).
pub fn sha256_file(path: &Path) -> Result<String, UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(hex::encode(h.finalize()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UpgradeError> + Send + 'static,
) -> Result<T, UpgradeError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(UpgradeError::Worker(e)))
}

/// Runs `sh -c cmd` with `env` in `dir`, in its own process group so a
/// timeout kills everything it started. `action` names it in errors.
pub async fn run_command(
    cmd: &str,
    action: &str,
    env: &[(&'static str, String)],
    dir: &Path,
    timeout: Duration,
) -> Result<(), CommandError> {
    let (action_s, cmd_s) = (action.to_string(), cmd.to_string());
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("FLOTILLA_ACTION", action)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = c.spawn().map_err(|source| CommandError::Start {
        action: action_s.clone(),
        cmd: cmd_s.clone(),
        source,
    })?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // The end of stderr is where a failing script says why.
            let trimmed = stderr.trim();
            let start = trimmed.len().saturating_sub(300);
            let start = (start..=trimmed.len())
                .find(|&i| trimmed.is_char_boundary(i))
                .unwrap_or(trimmed.len());
            Err(CommandError::Failed {
                action: action_s,
                cmd: cmd_s,
                status: out.status,
                stderr: trimmed[start..].to_string(),
            })
        }
        Ok(Err(source)) => Err(CommandError::Wait {
            action: action_s,
            cmd: cmd_s,
            source,
        }),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(CommandError::Timeout {
                action: action_s,
                cmd: cmd_s,
                timeout,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::releases::tests::{store_with, targz};
    use crate::testserver::{Response, TestServer};
    use std::fs;
    use std::io::Read as _;

    const LOG: &str = r#"echo "$FLOTILLA_ACTION $FLOTILLA_VERSION" >> "$FLOTILLA_STATE_DIR/log""#;

    fn release(version: &str) -> Vec<u8> {
        targz(&[
            ("bin/app", version.as_bytes()),
            ("VERSION", version.as_bytes()),
        ])
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn artifact_server(bytes: Vec<u8>) -> TestServer {
        TestServer::start(move |req| Response::ranged(req, &bytes))
    }

    fn install(server: &TestServer, bytes: &[u8], permanent: bool, backup: Backup) -> Work {
        Work::Install {
            task: "t1".into(),
            package: "edge".into(),
            version: "2.0.0".into(),
            artifact: Artifact {
                url: format!("{}/edge-2.0.0.tar.gz", server.url()),
                sha256: sha(bytes),
                size: bytes.len() as u64,
                kind: Default::default(),
                signature: None,
            },
            backup,
            permanent,
        }
    }

    /// `work` (an install) with `signature`, and the version it installs.
    fn with_signature(mut work: Work, sig: Option<String>) -> Work {
        if let Work::Install { artifact, .. } = &mut work {
            artifact.signature = sig;
        }
        work
    }

    /// Nothing of 2.0.0 on the node: not unpacked, no command run, no
    /// download kept, still on 1.0.0.
    fn untouched(up: &Upgrader, dir: &Path) {
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(up.store.installed().unwrap(), ["1.0.0"]);
        assert_eq!(log(dir), "", "a command ran");
        assert_eq!(fs::read_dir(up.store.downloads_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn with_trusted_keys_only_a_release_signed_for_itself_is_installed() {
        use crate::verify::tests::{keypair, sign, sign_release};
        let (pub_line, kp) = keypair();
        let (_, stranger) = keypair();
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let fresh = |name: &str| {
            let dir = tempfile::tempdir().unwrap();
            let mut up = node(dir.path(), Some(LOG), None);
            up.steps.trusted_keys = TrustedKeys::load(std::slice::from_ref(&pub_line)).unwrap();
            let _ = name;
            (dir, up)
        };
        let work = |sig: Option<String>| {
            with_signature(install(&server, &bytes, true, Backup::Default), sig)
        };

        // Refused before the download: no signature, another key, a
        // comment naming another release.
        for (name, sig, why) in [
            ("unsigned", None, "no signature"),
            (
                "stranger",
                Some(sign_release(&stranger, "edge", "2.0.0", &bytes)),
                "unknown key id",
            ),
            (
                "other version",
                Some(sign_release(&kp, "edge", "2.0.1", &bytes)),
                "comment mismatch",
            ),
            (
                "other package",
                Some(sign_release(&kp, "core", "2.0.0", &bytes)),
                "comment mismatch",
            ),
        ] {
            let (dir, up) = fresh(name);
            let before = server.seen().len();
            let (steps, outcome) = run(&up, &server, &work(sig)).await;
            assert_eq!(
                outcome.state,
                ReportState::Rejected,
                "{name}: {}",
                outcome.detail
            );
            assert!(
                outcome.detail.starts_with(why),
                "{name}: {}",
                outcome.detail
            );
            assert!(steps.is_empty(), "{name}: {steps:?}");
            assert_eq!(server.seen().len(), before, "{name}: downloaded");
            untouched(&up, dir.path());
        }

        // The comment names these bytes but the signature is over others:
        // refused after the download, before anything is unpacked.
        let honest = sign(&kp, b"other bytes", "x");
        let mut lines: Vec<String> = honest.lines().map(str::to_string).collect();
        lines[2] = format!(
            "trusted comment: {}",
            flotilla_model::signing::trusted_comment(
                "edge",
                "2.0.0",
                &sha(&bytes),
                bytes.len() as u64
            )
        );
        let (dir, up) = fresh("forged");
        let (steps, outcome) = run(&up, &server, &work(Some(lines.join("\n")))).await;
        assert_eq!(outcome.state, ReportState::Rejected, "{}", outcome.detail);
        assert!(
            outcome.detail.starts_with("bad signature"),
            "{}",
            outcome.detail
        );
        assert!(
            outcome.detail.contains("nothing was unpacked or run"),
            "{}",
            outcome.detail
        );
        assert_eq!(steps, [ReportState::Downloading]);
        untouched(&up, dir.path());

        // Signed for itself: installed.
        let (dir, up) = fresh("good");
        let (_, outcome) = run(
            &up,
            &server,
            &work(Some(sign_release(&kp, "edge", "2.0.0", &bytes))),
        )
        .await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("2.0.0"));
        assert_eq!(log(dir.path()), "install 2.0.0\nhealth 2.0.0\n");
    }

    #[tokio::test]
    async fn a_remote_downgrade_is_refused_unless_allowed_and_a_rollback_to_the_release_left_is_not()
     {
        let tmp = tempfile::tempdir().unwrap();
        let mut up = node(tmp.path(), Some(LOG), None);
        let old = release("0.9.0");
        let server = artifact_server(old.clone());
        let mut work = install(&server, &old, true, Backup::Default);
        if let Work::Install { version, .. } = &mut work {
            *version = "0.9.0".into();
        }
        let (steps, outcome) = run(&up, &server, &work).await;
        assert_eq!(outcome.state, ReportState::Rejected, "{}", outcome.detail);
        assert!(
            outcome.detail.contains("permanent release 1.0.0")
                && outcome.detail.contains("older 0.9.0"),
            "{}",
            outcome.detail
        );
        assert!(steps.is_empty() && server.seen().is_empty());
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        // A restore of a release this task's install did not leave is a
        // downgrade too.
        fs::create_dir_all(up.store.release_dir("0.8.0")).unwrap();
        let restore = |task: &str, v: &str| Work::Restore {
            task: task.into(),
            package: "edge".into(),
            version: v.into(),
        };
        let (_, outcome) = run(&up, &server, &restore("t9", "0.8.0")).await;
        assert_eq!(outcome.state, ReportState::FailedRollbackFailed);
        assert!(
            outcome.detail.contains("remote downgrade refused"),
            "{}",
            outcome.detail
        );
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));

        // The node's own config allows it.
        up.steps.allow_remote_downgrade = true;
        let mut work2 = work.clone();
        if let Work::Install { task, .. } = &mut work2 {
            *task = "t2".into();
        }
        let (_, outcome) = run(&up, &server, &work2).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("0.9.0"));

        // Back up to 2.0.0 and roll that task back to the 0.9.0 it left,
        // with downgrades no longer allowed: the rollback stays possible.
        up.steps.allow_remote_downgrade = false;
        let new = release("2.0.0");
        let server = artifact_server(new.clone());
        let mut up_work = install(&server, &new, true, Backup::Default);
        if let Work::Install { task, .. } = &mut up_work {
            *task = "t3".into();
        }
        let (_, outcome) = run(&up, &server, &up_work).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        let (_, outcome) = run(&up, &server, &restore("t3", "0.9.0")).await;
        assert_eq!(outcome.state, ReportState::RolledBack, "{}", outcome.detail);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("0.9.0"));
    }

    /// A node on 1.0.0 (current and permanent) with these commands.
    fn node(dir: &Path, install: Option<&str>, restore: Option<&str>) -> Upgrader {
        let store = store_with(dir, &["1.0.0"]);
        let steps = Steps {
            node_id: "n1".into(),
            install_command: install.map(str::to_string),
            health_command: Some(format!("test -f VERSION && {LOG}")),
            restore_command: restore.map(str::to_string),
            command_timeout: Duration::from_secs(10),
            download_retries: 3,
            retry_backoff: Duration::from_millis(10),
            backup_roots: Vec::new(),
            ..Steps::default()
        };
        Upgrader::new(store, steps).unwrap()
    }

    /// Runs `work`; returns the progress states and what it came to.
    async fn execute(
        up: &Upgrader,
        server: &TestServer,
        work: &Work,
    ) -> (Vec<ReportState>, Outcome) {
        let client = RunnerClient::new(&server.url(), "n1").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let outcome = up.execute(&client, work, &tx).await;
        drop(tx);
        let mut steps = Vec::new();
        while let Some(r) = rx.recv().await {
            steps.push(r.state);
        }
        (steps, outcome)
    }

    /// Runs `work`; returns the progress states and the final report.
    async fn run(up: &Upgrader, server: &TestServer, work: &Work) -> (Vec<ReportState>, Report) {
        match execute(up, server, work).await {
            (steps, Outcome::Done(r)) => (steps, r),
            (_, Outcome::Deferred(why)) => panic!("deferred: {why}"),
        }
    }

    /// A node on release 2.0.0 as a trial (1.0.0 permanent), and the server
    /// it downloaded it from.
    async fn on_trial(dir: &Path) -> (Upgrader, TestServer) {
        let up = node(dir, None, None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let work = install(&server, &bytes, false, Backup::Default);
        let (_, outcome) = run(&up, &server, &work).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        (up, server)
    }

    fn make_permanent(version: &str) -> Work {
        Work::MakePermanent {
            task: "t1".into(),
            package: "app".into(),
            version: version.into(),
        }
    }

    fn log(dir: &Path) -> String {
        fs::read_to_string(dir.join("log")).unwrap_or_default()
    }

    /// A disk fault on the node before anything changed is a failure the
    /// task may retry, never the node declining the release (`rejected`).
    #[tokio::test]
    async fn a_disk_fault_before_the_install_is_a_failure_not_a_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        // The work journal cannot be written: its directory became a file.
        dir_becomes_a_file(&tmp.path().join("work"));
        let (steps, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        failed_and_unchanged(&outcome, "cannot journal the work", "");
        assert!(steps.is_empty(), "{steps:?}");
        assert!(server.seen().is_empty(), "downloaded");
        untouched(&up, tmp.path());
    }

    /// The node's disk failing a download is the node's failure, not the
    /// runner refusing it.
    #[tokio::test]
    async fn a_disk_fault_during_the_download_is_not_called_a_refusal() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        dir_becomes_a_file(&up.store.downloads_dir());
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        failed_and_unchanged(&outcome, "download failed: ", "Not a directory");
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
    }

    /// A folder the agent writes to becomes a file: every write in it fails.
    fn dir_becomes_a_file(dir: &Path) {
        fs::remove_dir_all(dir).unwrap();
        fs::write(dir, "").unwrap();
    }

    /// Failed, rolled back, and said so: the detail starts with `prefix`,
    /// contains `cause` and ends with "nothing on the node was changed".
    fn failed_and_unchanged(outcome: &Report, prefix: &str, cause: &str) {
        let detail = &outcome.detail;
        assert_eq!(outcome.state, ReportState::FailedRolledBack, "{detail}");
        assert!(
            detail.starts_with(prefix)
                && detail.contains(cause)
                && detail.ends_with("nothing on the node was changed"),
            "{detail}"
        );
    }

    #[tokio::test]
    async fn an_install_backs_up_unpacks_installs_verifies_and_makes_permanent() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let (steps, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        use ReportState::*;
        assert_eq!(steps, [Downloading, Upgrading, Verifying]);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("2.0.0"));
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("2.0.0"));
        assert_eq!(log(tmp.path()), "install 2.0.0\nhealth 2.0.0\n");
        let backup = up.store.default_backup("1.0.0").join("bin/app");
        assert_eq!(fs::read_to_string(backup).unwrap(), "1.0.0");
        // The downloaded artifact is not kept once unpacked.
        assert_eq!(fs::read_dir(up.store.downloads_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_partial_download_left_by_a_killed_agent_is_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = release("2.0.0");
        let half = bytes.len() / 2;
        let part = up
            .store
            .downloads_dir()
            .join(format!("{}.part", sha(&bytes)));
        fs::write(&part, &bytes[..half]).unwrap();
        let server = artifact_server(bytes.clone());
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].headers.get("range"),
            Some(&format!("bytes={half}-"))
        );
    }

    #[tokio::test]
    async fn a_cut_download_is_retried_from_where_it_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = release("2.0.0");
        let served = bytes.clone();
        let first = std::sync::atomic::AtomicBool::new(true);
        let server = TestServer::start(move |req| {
            let mut r = Response::ranged(req, &served);
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                r.cut_after = Some(100);
            }
            r
        });
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].headers.get("range"), None);
        assert_eq!(
            seen[1].headers.get("range").map(String::as_str),
            Some("bytes=100-")
        );
    }

    #[tokio::test]
    async fn a_sha256_mismatch_is_refused_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let server = artifact_server(corrupt);
        let (steps, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::FailedRolledBack);
        assert!(
            outcome.detail.contains("sha256 mismatch"),
            "{}",
            outcome.detail
        );
        assert_eq!(steps, [ReportState::Downloading]);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert!(!up.store.is_installed("2.0.0"));
        assert_eq!(log(tmp.path()), "");
        // Refused at once, not retried, and the bad bytes are gone.
        assert_eq!(server.seen().len(), 1);
        assert_eq!(fs::read_dir(up.store.downloads_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn more_bytes_than_the_release_size_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = release("2.0.0");
        let mut bigger = bytes.clone();
        bigger.extend_from_slice(&[0; 64]);
        let server = artifact_server(bigger);
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::FailedRolledBack);
        assert!(
            outcome.detail.contains("more than the release's size"),
            "{}",
            outcome.detail
        );
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
    }

    #[tokio::test]
    async fn a_failed_install_restores_the_previous_release_from_backup() {
        let tmp = tempfile::tempdir().unwrap();
        let install_cmd = format!(r#"{LOG}; test "$FLOTILLA_VERSION" != 2.0.0"#);
        let up = node(tmp.path(), Some(&install_cmd), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let (steps, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(
            outcome.state,
            ReportState::FailedRolledBack,
            "{}",
            outcome.detail
        );
        assert!(
            outcome.detail.contains("install failed"),
            "{}",
            outcome.detail
        );
        assert!(
            outcome.detail.contains("restored 1.0.0"),
            "{}",
            outcome.detail
        );
        assert_eq!(steps, [ReportState::Downloading, ReportState::Upgrading]);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(log(tmp.path()), "install 2.0.0\nrestore 1.0.0\n");
    }

    #[tokio::test]
    async fn a_failed_restore_reports_rollback_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(
            tmp.path(),
            Some("exit 3"),
            Some("echo cannot start >&2; exit 4"),
        );
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(
            outcome.state,
            ReportState::FailedRollbackFailed,
            "{}",
            outcome.detail
        );
        assert!(
            outcome.detail.contains("cannot start"),
            "{}",
            outcome.detail
        );

        // Without a backup there is nothing to restore from.
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some("exit 3"), None);
        let (_, outcome) = run(&up, &server, &install(&server, &bytes, true, Backup::None)).await;
        assert_eq!(
            outcome.state,
            ReportState::FailedRollbackFailed,
            "{}",
            outcome.detail
        );
        assert!(outcome.detail.contains("no backup"), "{}", outcome.detail);
        assert!(!up.store.default_backup("1.0.0").exists());
    }

    #[tokio::test]
    async fn a_trial_stays_current_until_a_restart_reverts_it() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, false, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("2.0.0"));
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("1.0.0"));
        let restarted = ReleaseStore::open(tmp.path()).unwrap();
        assert!(restarted.revert_trial().unwrap().is_some());
        assert_eq!(restarted.current().unwrap().as_deref(), Some("1.0.0"));
    }

    #[tokio::test]
    async fn a_trial_made_permanent_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let (up, server) = on_trial(tmp.path()).await;
        let commit = make_permanent;
        let (_, wrong) = run(&up, &server, &commit("3.0.0")).await;
        assert_eq!(wrong.state, ReportState::Rejected, "{}", wrong.detail);
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("1.0.0"));
        let (_, done) = run(&up, &server, &commit("2.0.0")).await;
        assert_eq!(done.state, ReportState::MadePermanent, "{}", done.detail);
        let (_, again) = run(&up, &server, &commit("2.0.0")).await;
        assert_eq!(
            again.state,
            ReportState::MadePermanent,
            "asked again, same answer"
        );
        let restarted = ReleaseStore::open(tmp.path()).unwrap();
        assert!(restarted.revert_trial().unwrap().is_none());
        assert_eq!(restarted.current().unwrap().as_deref(), Some("2.0.0"));
    }

    /// A disk fault making a trial permanent is not the node declining: the
    /// runner takes `rejected` then as "not made permanent, a person
    /// decides", and the node would fall back to the old release at its
    /// next restart. Nothing is reported instead; the runner keeps the work
    /// open and the agent asks for it again, which succeeds once the disk
    /// is back. Failed before: `rejected` with "cannot replace ...".
    #[tokio::test]
    async fn a_disk_fault_making_a_trial_permanent_is_deferred_not_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (up, server) = on_trial(tmp.path()).await;
        let commit = make_permanent("2.0.0");
        // The `permanent` file cannot be replaced: a non-empty directory.
        let permanent = up.store.dir().join("permanent");
        let kept = fs::read(&permanent).unwrap();
        fs::remove_file(&permanent).unwrap();
        fs::create_dir_all(permanent.join("blocked")).unwrap();
        match execute(&up, &server, &commit).await.1 {
            Outcome::Deferred(why) => assert!(why.contains("permanent"), "{why}"),
            Outcome::Done(r) => panic!("reported {:?}: {}", r.state, r.detail),
        }
        // The disk is back: the same work, asked for again, succeeds.
        fs::remove_dir_all(&permanent).unwrap();
        fs::write(&permanent, kept).unwrap();
        let (_, done) = run(&up, &server, &commit).await;
        assert_eq!(done.state, ReportState::MadePermanent, "{}", done.detail);
        let restarted = ReleaseStore::open(tmp.path()).unwrap();
        assert!(restarted.revert_trial().unwrap().is_none());
    }

    #[tokio::test]
    async fn finished_work_sent_again_is_reported_again_not_redone() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let work = install(&server, &bytes, true, Backup::Default);
        let (_, first) = run(&up, &server, &work).await;
        let (steps, again) = run(&up, &server, &work).await;
        assert_eq!(first.state, ReportState::Succeeded);
        assert_eq!(again, first);
        assert!(steps.is_empty());
        assert_eq!(server.seen().len(), 1);
        assert_eq!(log(tmp.path()), "install 2.0.0\nhealth 2.0.0\n");
    }

    #[tokio::test]
    async fn a_restore_puts_the_named_release_back() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let (_, done) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(done.state, ReportState::Succeeded, "{}", done.detail);
        // An operator removed 1.0.0 meanwhile: the backup brings it back.
        fs::remove_dir_all(up.store.release_dir("1.0.0")).unwrap();
        let restore = Work::Restore {
            task: "t1".into(),
            package: "edge".into(),
            version: "1.0.0".into(),
        };
        let (_, outcome) = run(&up, &server, &restore).await;
        assert_eq!(outcome.state, ReportState::RolledBack, "{}", outcome.detail);
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(up.store.permanent().unwrap().as_deref(), Some("1.0.0"));
        assert!(log(tmp.path()).ends_with("restore 1.0.0\n"));

        // (Not older than the permanent 1.0.0: an older one the task did
        // not leave is a remote downgrade, refused before this.)
        let missing = Work::Restore {
            task: "t2".into(),
            package: "edge".into(),
            version: "1.0.5".into(),
        };
        let (_, outcome) = run(&up, &server, &missing).await;
        assert_eq!(outcome.state, ReportState::FailedRollbackFailed);
        assert!(
            outcome.detail.contains("no backup of it"),
            "{}",
            outcome.detail
        );
    }

    /// Every path under `dir` with its file contents (the whole tree, to
    /// tell that nothing was created, changed or deleted anywhere in it).
    fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p.clone());
                    out.insert(p, None);
                } else {
                    out.insert(p.clone(), fs::read(&p).ok());
                }
            }
        }
        out
    }

    /// A task's backup location built by hand (as a hostile or broken runner
    /// could send it): one that leaves the agent's backup roots is refused
    /// before anything is downloaded, backed up or deleted, in the state
    /// directory or outside it.
    #[tokio::test]
    async fn a_backup_location_outside_the_backup_roots_is_refused_touching_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("node").join("state");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("1.0.0")).unwrap();
        fs::write(outside.join("1.0.0").join("keep"), "not the agent's").unwrap();
        let up = node(&state, None, None);
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let before = tree(tmp.path());
        let absolute = outside.display().to_string();
        for loc in [
            "../../outside",
            "../outside",
            "..",
            "a/../../../outside",
            "releases/../../../outside",
            absolute.as_str(),
            "/etc",
            "",
        ] {
            let work = install(&server, &bytes, true, Backup::Location(loc.into()));
            let (steps, outcome) = run(&up, &server, &work).await;
            assert_eq!(
                outcome.state,
                ReportState::Rejected,
                "{loc:?}: {}",
                outcome.detail
            );
            assert!(
                outcome.detail.contains("backup"),
                "{loc:?}: {}",
                outcome.detail
            );
            assert!(steps.is_empty(), "{loc:?}: work began: {steps:?}");
        }
        assert_eq!(tree(tmp.path()), before, "something was created or deleted");
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert!(server.seen().is_empty(), "nothing was downloaded");
    }

    /// What a backup location may be: a name under `backups/`, or a path
    /// inside a configured root (not through a link that leaves it).
    #[tokio::test]
    async fn a_backup_goes_to_a_named_folder_or_inside_a_configured_root() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let root = tmp.path().join("roots");
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
        let mut up = node(&state, None, None);
        up.steps.backup_roots = vec![root.clone()];
        let bytes = release("2.0.0");
        let server = artifact_server(bytes.clone());
        let work = |loc: &str| install(&server, &bytes, true, Backup::Location(loc.into()));

        let (_, outcome) = run(&up, &server, &work("nightly")).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        let named = state
            .join("backups")
            .join("nightly")
            .join("1.0.0")
            .join("bin/app");
        assert_eq!(fs::read_to_string(named).unwrap(), "1.0.0");

        let mut up = node(&tmp.path().join("state-2"), None, None);
        up.steps.backup_roots = vec![root.clone()];
        let inside_root = root.join("edge");
        let (_, outcome) = run(&up, &server, &work(&inside_root.display().to_string())).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        assert!(inside_root.join("1.0.0").join("bin/app").is_file());

        // Through the link the path leaves the root: refused, nothing written.
        let mut up = node(&tmp.path().join("state-3"), None, None);
        up.steps.backup_roots = vec![root.clone()];
        let through = root.join("link").join("edge");
        let (steps, outcome) = run(&up, &server, &work(&through.display().to_string())).await;
        assert_eq!(outcome.state, ReportState::Rejected, "{}", outcome.detail);
        assert!(
            outcome.detail.contains("backup roots"),
            "{}",
            outcome.detail
        );
        assert!(steps.is_empty());
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        // A sibling whose name merely starts like the root is not in it.
        let sibling = format!("{}-x", root.display());
        let (_, outcome) = run(&up, &server, &work(&sibling)).await;
        assert_eq!(outcome.state, ReportState::Rejected, "{}", outcome.detail);
        assert!(!Path::new(&sibling).exists());
    }

    /// A `.tar.gz` of one regular file `path` with `mode` and `len` zero bytes.
    fn one_file_targz(path: &str, mode: u32, len: usize, level: u32) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(len as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, path, std::io::repeat(0).take(len as u64))
            .unwrap();
        // A setgid directory too: directories are masked like files.
        let mut d = tar::Header::new_gnu();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_size(0);
        d.set_mode(0o2775);
        d.set_cksum();
        b.append_data(&mut d, "share", std::io::empty()).unwrap();
        b.into_inner().unwrap().finish().unwrap()
    }

    #[tokio::test]
    async fn setuid_setgid_and_sticky_bits_are_dropped_when_unpacking() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = one_file_targz("bin/su-me", 0o4755, 16, 6);
        let server = artifact_server(bytes.clone());
        // This release has no VERSION file for the usual health check.
        let mut up = up;
        up.steps.health_command = None;
        let work = install(&server, &bytes, true, Backup::None);
        let (_, outcome) = run(&up, &server, &work).await;
        assert_eq!(outcome.state, ReportState::Succeeded, "{}", outcome.detail);
        let dir = up.store.release_dir("2.0.0");
        let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("bin/su-me"), 0o755);
        assert_eq!(mode("share") & 0o7000, 0);
    }

    #[tokio::test]
    async fn a_gzip_bomb_is_refused_and_leaves_no_partial_release() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), Some(LOG), None);
        // 64 MiB of zeros: ~64 KiB on the wire, past the default cap (16 x
        // the artifact, at least 64 MiB) once its headers are counted.
        let bytes = one_file_targz("blob", 0o644, 64 << 20, 9);
        assert!(bytes.len() < 100 << 10, "{} bytes", bytes.len());
        let server = artifact_server(bytes.clone());
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::FailedRolledBack);
        assert!(
            outcome.detail.contains("unpacks to more than")
                && outcome.detail.contains("unpack_ratio"),
            "{}",
            outcome.detail
        );
        assert_eq!(up.store.current().unwrap().as_deref(), Some("1.0.0"));
        assert!(!up.store.is_installed("2.0.0"));
        let left: Vec<_> = fs::read_dir(up.store.releases_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["1.0.0"], "a partial release was left behind");
        assert_eq!(fs::read_dir(up.store.downloads_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_failed_download_reports_the_status_and_never_the_body() {
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let bytes = release("2.0.0");
        let server = TestServer::start(|_| {
            let mut r = Response::status(500);
            r.body = b"internal-secret: db password hunter2".to_vec();
            r
        });
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert_eq!(outcome.state, ReportState::FailedRolledBack);
        assert!(outcome.detail.contains("500"), "{}", outcome.detail);
        assert!(
            !outcome.detail.contains("hunter2") && !outcome.detail.contains("internal-secret"),
            "the server's body was reflected: {}",
            outcome.detail
        );
        // A 404 is final at once, and says only its status too (a fresh
        // node: this one's journal has the outcome of `t1` already).
        let tmp = tempfile::tempdir().unwrap();
        let up = node(tmp.path(), None, None);
        let server = TestServer::start(|_| {
            let mut r = Response::status(404);
            r.body = b"internal-secret".to_vec();
            r
        });
        let (_, outcome) = run(
            &up,
            &server,
            &install(&server, &bytes, true, Backup::Default),
        )
        .await;
        assert!(outcome.detail.contains("404"), "{}", outcome.detail);
        assert!(
            !outcome.detail.contains("internal-secret"),
            "{}",
            outcome.detail
        );
        assert_eq!(server.seen().len(), 1);
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let err = run_command(
            "sleep 30 & sleep 30",
            "install",
            &[],
            tmp.path(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("was killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
