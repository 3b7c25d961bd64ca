//! The node agent: enrolls with the runner, heartbeats its version and health,
//! takes work by long poll (push) or by asking (pull), and carries it out
//! against the node's release store. It knows the runner only through
//! [`crate::protocol`]; it keeps its token, releases and journal in one state
//! directory, so a restarted agent carries on where it was.

pub mod client;
pub mod journal;
pub mod releases;
pub mod upgrade;

use crate::protocol::{Enroll, Heartbeat, MAX_WAIT_SECONDS, Report, Work};
use client::{Client, ClientError};
use releases::{ReleaseError, ReleaseStore};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use upgrade::{Steps, Upgrader};

/// Everything the agent runs with; the CLI builds it from flags and a file.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub server: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub enroll_secret: Option<String>,
    pub labels: Vec<(String, String)>,
    pub attributes: Vec<(String, String)>,
    pub asset_path: String,
    pub schedulable: bool,
    pub steps: Steps,
    pub heartbeat: Duration,
    /// `Some(every)`: pull mode, ask for work this often; `None`: push.
    pub pull: Option<Duration>,
    /// Seconds a push long poll is held open (at most the protocol's limit).
    pub wait_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "the node has no token and no enrollment secret: pass --enroll-secret, set FLOTILLA_ENROLL_SECRET or `enroll_secret` in the config file"
    )]
    NoSecret,
    #[error("enrollment refused: {0}; check the enrollment secret")]
    EnrollRefused(String),
}

/// Pauses between retries of calls to the runner: 1 s doubling to 30 s.
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_secs(1 << self.0.min(5)).min(Duration::from_secs(30));
        self.0 += 1;
        d
    }
}

struct Agent {
    config: AgentConfig,
    client: Client,
    upgrader: Upgrader,
    enrolling: tokio::sync::Mutex<()>,
    stop: watch::Receiver<bool>,
}

/// Runs the agent until `shutdown` completes (SIGTERM / Ctrl-C in the CLI).
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let store = ReleaseStore::open(&config.state_dir)?;
    if let Some(r) = store.revert_trial()? {
        tracing::warn!(
            from = r.from,
            to = r.to,
            "trial release was not made permanent; back on the permanent release"
        );
        if let Some(cmd) = &config.steps.install_command {
            let dir = store.release_dir(&r.to);
            let env = [
                ("FLOTILLA_VERSION", r.to.clone()),
                ("FLOTILLA_PREVIOUS_VERSION", r.from.clone()),
                ("FLOTILLA_RELEASE_DIR", dir.display().to_string()),
                ("FLOTILLA_STATE_DIR", store.dir().display().to_string()),
                ("FLOTILLA_NODE_ID", config.node_id.clone()),
            ];
            if let Err(e) =
                upgrade::run_command(cmd, "restore", &env, &dir, config.steps.command_timeout).await
            {
                tracing::error!(error = e, "re-installing the permanent release failed");
            }
        }
    }
    let client = Client::new(&config.server, &config.node_id)?;
    client.set_token(read_token(&config.state_dir));
    let (stop_tx, stop) = watch::channel(false);
    let upgrader = Upgrader::new(store, config.steps.clone())?;
    let agent = Arc::new(Agent {
        config,
        client,
        upgrader,
        enrolling: tokio::sync::Mutex::new(()),
        stop,
    });

    let work = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.work_loop().await })
    };
    let beat = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.heartbeat_loop().await })
    };
    let mut work = std::pin::pin!(work);
    let result = tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down");
            Ok(())
        }
        r = &mut work => r.unwrap_or(Ok(())),
    };
    let _ = stop_tx.send(true);
    // Loops stop at their next await; a running command is killed with its
    // future, and the runner re-sends the open work after a restart.
    work.abort();
    beat.abort();
    result
}

impl Agent {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d` unless the agent is stopping; `false` when it is.
    async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(d) => !self.stopped(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    fn current(&self) -> String {
        self.upgrader
            .store
            .current()
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Enrolls when the node has no token; fatal only when enrollment
    /// cannot work (no secret, secret refused).
    async fn ensure_enrolled(&self) -> Result<(), AgentError> {
        let _guard = self.enrolling.lock().await;
        let mut backoff = Backoff(0);
        while self.client.token().is_none() {
            let Some(secret) = self.config.enroll_secret.clone() else {
                return Err(AgentError::NoSecret);
            };
            let enroll = Enroll {
                node_id: self.config.node_id.clone(),
                secret,
                version: self.current(),
                labels: self.config.labels.clone(),
                attributes: self.config.attributes.clone(),
                asset_path: self.config.asset_path.clone(),
                healthy: true,
                schedulable: self.config.schedulable,
            };
            match self.client.enroll(&enroll).await {
                Ok(e) => {
                    write_token(&self.config.state_dir, &e.token);
                    self.client.set_token(Some(e.token));
                    tracing::info!(node = self.config.node_id, "enrolled");
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "enrollment failed");
                    if !self.pause(backoff.next()).await {
                        break;
                    }
                }
                Err(e) => return Err(AgentError::EnrollRefused(e.to_string())),
            }
        }
        Ok(())
    }

    /// A 401 means the token is gone on the runner's side: forget it.
    fn on_error(&self, e: &ClientError) {
        if matches!(e, ClientError::Unauthorized) {
            self.client.set_token(None);
            let _ = std::fs::remove_file(self.config.state_dir.join("token"));
        }
    }

    async fn heartbeat_loop(&self) {
        while !self.stopped() {
            if self.client.token().is_some() {
                let hb = Heartbeat {
                    version: self.current(),
                    healthy: self.healthy().await,
                    schedulable: self.config.schedulable,
                };
                match self.client.heartbeat(&hb).await {
                    Ok(()) => tracing::debug!(version = hb.version, "heartbeat"),
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat failed");
                        self.on_error(&e);
                    }
                }
            }
            if !self.pause(self.config.heartbeat).await {
                break;
            }
        }
    }

    /// The health command on the current release, when there is one.
    async fn healthy(&self) -> bool {
        let (Some(cmd), Some(version)) = (
            &self.config.steps.health_command,
            self.upgrader.store.current().ok().flatten(),
        ) else {
            return true;
        };
        let dir = self.upgrader.store.release_dir(&version);
        let env = [
            ("FLOTILLA_VERSION", version.clone()),
            ("FLOTILLA_RELEASE_DIR", dir.display().to_string()),
            ("FLOTILLA_NODE_ID", self.config.node_id.clone()),
        ];
        upgrade::run_command(cmd, "health", &env, &dir, self.config.steps.command_timeout)
            .await
            .inspect_err(|e| tracing::warn!(error = e, "unhealthy"))
            .is_ok()
    }

    async fn work_loop(&self) -> Result<(), AgentError> {
        let mut backoff = Backoff(0);
        while !self.stopped() {
            self.ensure_enrolled().await?;
            let next = match self.config.pull {
                Some(_) => self.client.request().await,
                None => self.client.work(self.config.wait_seconds).await,
            };
            match next {
                Ok(Some(work)) => {
                    backoff = Backoff(0);
                    self.handle(work).await;
                }
                Ok(None) => {
                    backoff = Backoff(0);
                    if let Some(every) = self.config.pull
                        && !self.pause(every).await
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "asking for work failed");
                    self.on_error(&e);
                    if !self.pause(backoff.next()).await {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Carries out one piece of work, streaming progress, then delivers the
    /// final report (retrying until the runner takes or refuses it).
    async fn handle(&self, work: Work) {
        let task = work.task().to_string();
        tracing::info!(task, ?work, "work received");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
        let forward = async {
            while let Some(r) = rx.recv().await {
                // Progress is best effort: the final report is what counts.
                if let Err(e) = self.client.report(&r).await {
                    tracing::warn!(error = %e, state = ?r.state, "progress report failed");
                    self.on_error(&e);
                }
            }
        };
        let (outcome, ()) = tokio::join!(
            async move {
                let o = self.upgrader.execute(&self.client, &work, &tx).await;
                drop(tx);
                o
            },
            forward
        );
        tracing::info!(task, state = ?outcome.state, detail = outcome.detail, "work finished");
        self.deliver(&outcome).await;
    }

    async fn deliver(&self, report: &Report) {
        let mut backoff = Backoff(0);
        while !self.stopped() {
            if self.ensure_enrolled().await.is_err() {
                return;
            }
            match self.client.report(report).await {
                Ok(()) => return,
                Err(ClientError::Refused(why)) => {
                    tracing::warn!(task = report.task, why, "the runner refused the report");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "final report failed; retrying");
                    self.on_error(&e);
                    if !self.pause(backoff.next()).await {
                        return;
                    }
                }
            }
        }
    }
}

fn read_token(dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(dir.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn write_token(dir: &std::path::Path, token: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("token");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the token; the agent enrolls again after a restart");
    }
}

/// The default long poll: the protocol's limit.
pub const DEFAULT_WAIT_SECONDS: u64 = MAX_WAIT_SECONDS;
