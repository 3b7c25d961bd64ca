//! The node agent: enrolls with the runner, heartbeats its version and health,
//! takes work by long poll (push) or by asking (pull), and carries it out
//! against the node's release store. It knows the runner only through
//! [`flotilla_model::protocol`]; it keeps its token, releases and journal in one state
//! directory, so a restarted agent carries on where it was.

pub mod cli;
pub mod client;
pub mod journal;
pub mod mqtt;
pub mod releases;
pub mod upgrade;
pub mod verify;

#[cfg(test)]
mod testserver;

use client::{RunnerClient, RunnerClientError};
use flotilla_model::protocol::{Enroll, Heartbeat, MAX_WAIT_SECONDS, Report, Work};
use releases::{ReleaseError, ReleaseStore};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use upgrade::{Outcome, Steps, Upgrader};

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
    /// A private CA and a client certificate (mutual TLS), for the runner
    /// and the broker.
    pub tls: client::ClientTls,
    /// `Some`: heartbeats, work, pull requests and reports go over this
    /// MQTT broker instead of HTTP (enrollment and downloads stay on HTTP).
    pub mqtt: Option<mqtt::MqttConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    RunnerClient(#[from] RunnerClientError),
    #[error(
        "the runner wants an enrollment secret and the node has none: pass --enroll-secret, set FLOTILLA_ENROLL_SECRET or `enroll_secret` in the config file"
    )]
    NoSecret,
    #[error("enrollment refused: {detail}; {hint}")]
    EnrollRefused { detail: String, hint: &'static str },
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
}

/// What to do about a refused enrollment, by the runner's answer.
fn enroll_hint(e: &RunnerClientError) -> &'static str {
    match e {
        RunnerClientError::Status { status, .. } if status.as_u16() == 403 => {
            "with mutual TLS the client certificate must name this node (its CN is the node id): check --client-cert"
        }
        RunnerClientError::Status { status, .. } if status.as_u16() == 409 => {
            "this node id is enrolled already: keep its token in the state dir, or allow a re-enrollment with `flotilla node reenroll ID` (or a node token)"
        }
        _ => "check the enrollment secret",
    }
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

/// What became of a final report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Taken,
    Refused,
    /// Nothing was reported: a fault on this node deferred the work (see
    /// [`upgrade::Outcome::Deferred`]); it is asked for again after a pause.
    Deferred,
    /// The agent is stopping; the journal re-reports it after a restart.
    Stopped,
}

struct Agent {
    config: AgentConfig,
    client: RunnerClient,
    /// The broker, when the agent speaks MQTT (`--mqtt`).
    mqtt: Option<mqtt::MqttLink>,
    upgrader: Upgrader,
    enrolling: tokio::sync::Mutex<()>,
    stop: watch::Receiver<bool>,
    /// Work is under way: the current release may be half-installed, so
    /// heartbeats repeat the last health seen instead of checking it.
    busy: AtomicBool,
    last_health: AtomicBool,
}

/// Clears [`Agent::busy`] however the work ends.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
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
                tracing::error!(error = %e, "re-installing the permanent release failed");
            }
        }
    }
    let client = RunnerClient::with_tls(&config.server, &config.node_id, &config.tls)?;
    client.set_token(read_token(&config.state_dir));
    let (stop_tx, stop) = watch::channel(false);
    let upgrader = Upgrader::new(store, config.steps.clone())?;
    let mqtt = match &config.mqtt {
        Some(m) => Some(mqtt::MqttLink::start(m, &config.node_id, &config.tls)?),
        None => None,
    };
    let agent = Arc::new(Agent {
        config,
        client,
        mqtt,
        upgrader,
        enrolling: tokio::sync::Mutex::new(()),
        stop,
        busy: AtomicBool::new(false),
        last_health: AtomicBool::new(true),
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
        r = &mut work => r.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the work loop failed");
            Ok(())
        }),
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
        while self.client.token().is_none() && !self.stopped() {
            // A runner on loopback may ask for no secret; one that does
            // refuses the empty one, and the error says where to set it.
            let secret = self.config.enroll_secret.clone().unwrap_or_default();
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
                Err(_) if self.config.enroll_secret.is_none() => {
                    return Err(AgentError::NoSecret);
                }
                Err(e) => {
                    let hint = enroll_hint(&e);
                    let detail = e.to_string();
                    return Err(AgentError::EnrollRefused { detail, hint });
                }
            }
        }
        Ok(())
    }

    /// A 401 means the token is gone on the runner's side: forget it.
    fn on_error(&self, e: &RunnerClientError) {
        if matches!(e, RunnerClientError::Unauthorized) {
            self.client.set_token(None);
            let _ = std::fs::remove_file(self.config.state_dir.join("token"));
        }
    }

    async fn heartbeat_loop(&self) {
        while !self.stopped() {
            // The first beat goes out as soon as the node is enrolled.
            if self.ensure_enrolled().await.is_err() || self.stopped() {
                return;
            }
            if self.client.token().is_some() {
                let healthy = if self.busy.load(Ordering::SeqCst) {
                    self.last_health.load(Ordering::SeqCst)
                } else {
                    let h = self.healthy().await;
                    self.last_health.store(h, Ordering::SeqCst);
                    h
                };
                let hb = Heartbeat {
                    version: self.current(),
                    healthy,
                    schedulable: self.config.schedulable,
                    metrics: system_metrics(),
                };
                if let Some(m) = &self.mqtt {
                    match m.heartbeat(&hb) {
                        Ok(()) => tracing::debug!(version = hb.version, "heartbeat (mqtt)"),
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                } else {
                    match self.client.heartbeat(&hb).await {
                        Ok(()) => tracing::debug!(version = hb.version, "heartbeat"),
                        Err(e) => {
                            tracing::warn!(error = %e, "heartbeat failed");
                            self.on_error(&e);
                        }
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
            .inspect_err(|e| tracing::warn!(error = %e, "unhealthy"))
            .is_ok()
    }

    async fn work_loop(&self) -> Result<(), AgentError> {
        let mut backoff = Backoff(0);
        // Grows while work keeps being deferred (a disk fault that lasts).
        let mut deferred = Backoff(0);
        while !self.stopped() {
            self.ensure_enrolled().await?;
            if self.stopped() {
                break;
            }
            let next = match (&self.mqtt, self.config.pull) {
                (Some(m), Some(every)) => {
                    // The runner answers on the work topic; a slow answer
                    // is picked up by the next ask.
                    let wait = every.clamp(Duration::from_secs(1), Duration::from_secs(10));
                    match m.request(wait).await {
                        Ok(w) => Ok(w),
                        Err(e) => {
                            tracing::error!(error = %e, "the MQTT client stopped");
                            return Err(e.into());
                        }
                    }
                }
                (Some(m), None) => Ok(m
                    .work(Duration::from_secs(self.config.wait_seconds.max(1)))
                    .await),
                (None, Some(_)) => self.client.request().await,
                (None, None) => self.client.work(self.config.wait_seconds).await,
            };
            match next {
                Ok(Some(work)) => {
                    backoff = Backoff(0);
                    // A runner that refuses the report but keeps the work
                    // open would otherwise get it back at once, forever;
                    // deferred work likewise, until the fault is gone.
                    let pause = match self.handle(work).await {
                        Delivery::Refused => Some(Duration::from_secs(5)),
                        Delivery::Deferred => Some(deferred.next()),
                        Delivery::Taken | Delivery::Stopped => {
                            deferred = Backoff(0);
                            None
                        }
                    };
                    if let Some(p) = pause
                        && !self.pause(p).await
                    {
                        break;
                    }
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
    async fn handle(&self, work: Work) -> Delivery {
        let task = work.task().to_string();
        tracing::info!(task, ?work, "work received");
        self.busy.store(true, Ordering::SeqCst);
        let _busy = Busy(&self.busy);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
        let forward = async {
            while let Some(r) = rx.recv().await {
                // Progress is best effort: the final report is what counts.
                if let Some(m) = &self.mqtt {
                    if let Err(e) = m.report(&r).await {
                        tracing::warn!(error = %e, state = ?r.state, "progress report failed");
                    }
                } else if let Err(e) = self.client.report(&r).await {
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
        let outcome = match outcome {
            Outcome::Done(report) => report,
            Outcome::Deferred(why) => {
                tracing::warn!(
                    task,
                    why,
                    "work deferred by a fault on this node; asking for it again after a pause"
                );
                return Delivery::Deferred;
            }
        };
        tracing::info!(task, state = ?outcome.state, detail = outcome.detail, "work finished");
        self.deliver(&outcome).await
    }

    async fn deliver(&self, report: &Report) -> Delivery {
        // Over MQTT the client holds it until the broker has it; the runner
        // keeps the work open (and sends it again) until it stored it.
        if let Some(m) = &self.mqtt {
            return match m.report(report).await {
                Ok(()) => Delivery::Taken,
                Err(e) => {
                    tracing::error!(task = report.task, error = %e, "final report not sent; the journal sends it again when the work comes back");
                    Delivery::Stopped
                }
            };
        }
        let mut backoff = Backoff(0);
        while !self.stopped() {
            if self.ensure_enrolled().await.is_err() {
                break;
            }
            match self.client.report(report).await {
                Ok(()) => return Delivery::Taken,
                Err(RunnerClientError::Refused(why)) => {
                    tracing::warn!(task = report.task, why, "the runner refused the report");
                    return Delivery::Refused;
                }
                // A 4xx other than 401 will not change by sending it again.
                Err(e) if !e.is_transient() && !matches!(e, RunnerClientError::Unauthorized) => {
                    tracing::error!(task = report.task, error = %e, "the runner rejected the report");
                    return Delivery::Refused;
                }
                // A fault on the runner (503 for a store that could not
                // take the report), a network error: the outcome stays in
                // the journal and goes again, no sooner than the runner asked.
                Err(e) => {
                    tracing::warn!(error = %e, "final report failed; retrying");
                    self.on_error(&e);
                    let pause = backoff.next().max(e.retry_after().unwrap_or_default());
                    if !self.pause(pause).await {
                        break;
                    }
                }
            }
        }
        Delivery::Stopped
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

/// What the agent reports of its machine with every heartbeat, for policies
/// (`status.metric`): `load1` (the 1-minute load average) and
/// `mem_available_ratio` (available / total memory), where the system tells
/// (Linux `/proc`); nothing elsewhere.
fn system_metrics() -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    if let Some(load1) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
    {
        m.insert("load1".to_string(), load1);
    }
    if let Ok(info) = std::fs::read_to_string("/proc/meminfo") {
        let kb = |key: &str| {
            info.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        if let (Some(total), Some(avail)) = (kb("MemTotal:"), kb("MemAvailable:"))
            && total > 0.0
        {
            m.insert("mem_available_ratio".to_string(), avail / total);
        }
    }
    m.retain(|_, v| v.is_finite());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::Backup;
    use flotilla_model::protocol::{Artifact, Enrolled, ReportState};
    use releases::tests::{store_with, targz};
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicBool, Ordering};
    use testserver::{Request, Response, TestServer};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    const TOKEN: &str = "tok-n1";
    const CUT: usize = 20_000;

    /// A refused enrollment says what to do by the runner's answer: a 403
    /// under mutual TLS is about the certificate, not the secret.
    #[test]
    fn a_refused_enrollment_says_what_to_check_by_the_answer() {
        let refused = |code: u16| {
            enroll_hint(&RunnerClientError::Status {
                what: "enroll",
                status: reqwest::StatusCode::from_u16(code).unwrap(),
                body: String::new(),
                retry_after: None,
            })
        };
        assert!(refused(403).contains("--client-cert"));
        assert!(refused(409).contains("flotilla node reenroll"));
        assert!(refused(401).contains("enrollment secret"));
    }

    #[test]
    fn the_agent_reports_load_and_memory_where_proc_tells() {
        let m = system_metrics();
        if std::path::Path::new("/proc/loadavg").exists() {
            assert!(m["load1"] >= 0.0, "{m:?}");
            let mem = m["mem_available_ratio"];
            assert!(mem > 0.0 && mem <= 1.0, "{m:?}");
        }
        let hb = Heartbeat {
            version: "1".into(),
            healthy: true,
            schedulable: true,
            metrics: m,
        };
        assert!(hb.check().is_ok(), "the runner would refuse {hb:?}");
    }

    /// Task t1's install of edge 2.0.0 whose artifact is `bytes`.
    fn install_edge(bytes: &[u8], permanent: bool) -> Work {
        Work::Install {
            task: "t1".into(),
            package: "edge".into(),
            version: "2.0.0".into(),
            artifact: Artifact {
                url: "/v1/releases/edge/2.0.0/artifact".into(),
                sha256: hex::encode(Sha256::digest(bytes)),
                size: bytes.len() as u64,
                kind: Default::default(),
                signature: None,
            },
            backup: Backup::Default,
            permanent,
        }
    }

    /// An agent of node `n1` for `server` (secret `s3cret`, the install
    /// command `test -f VERSION`, quick retries).
    fn agent_config(server: &TestServer, dir: &std::path::Path, pull: bool) -> AgentConfig {
        AgentConfig {
            server: server.url(),
            node_id: "n1".into(),
            state_dir: dir.to_path_buf(),
            enroll_secret: Some("s3cret".into()),
            labels: vec![("tier".into(), "edge".into())],
            attributes: Vec::new(),
            asset_path: String::new(),
            schedulable: true,
            steps: Steps {
                node_id: "n1".into(),
                install_command: Some("test -f VERSION".into()),
                retry_backoff: Duration::from_millis(10),
                ..Steps::default()
            },
            heartbeat: Duration::from_millis(100),
            pull: pull.then_some(Duration::from_millis(100)),
            wait_seconds: 1,
            tls: Default::default(),
            mqtt: None,
        }
    }

    /// A runner that holds one piece of work for node `n1` until a final
    /// report on it arrives, as the real one does.
    struct FakeRunner {
        server: TestServer,
        reports: UnboundedReceiver<Report>,
        heartbeats: UnboundedReceiver<Heartbeat>,
        done: Arc<AtomicBool>,
    }

    impl FakeRunner {
        /// `cut_first`: the first artifact download breaks off after
        /// [`CUT`] bytes (an agent that dies mid-download).
        fn start(permanent: bool, cut_first: bool) -> Self {
            // Incompressible filler so the artifact is big enough to cut.
            let mut x = 0x2545_f491_u32;
            let filler: Vec<u8> = (0..64 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let bytes = targz(&[("VERSION", b"2.0.0"), ("blob", &filler)]);
            let work = install_edge(&bytes, permanent);
            Self::holding(work, bytes, cut_first)
        }

        /// A runner that holds `work` until its final report; the artifact
        /// of release edge 2.0.0 is `bytes`.
        fn holding(work: Work, bytes: Vec<u8>, cut_first: bool) -> Self {
            let cut = AtomicBool::new(cut_first);
            let (report_tx, reports) = unbounded_channel();
            let (beat_tx, heartbeats) = unbounded_channel();
            let done = Arc::new(AtomicBool::new(false));
            let finished = done.clone();
            let server = TestServer::start(move |req: &Request| {
                let authed =
                    req.headers.get("authorization").map(String::as_str) == Some("Bearer tok-n1");
                match (req.method.as_str(), req.path()) {
                    ("POST", "/v1/agents/enroll") => {
                        let e: Enroll = serde_json::from_slice(&req.body).unwrap();
                        if e.secret != "s3cret" || e.node_id != "n1" {
                            return Response::status(401);
                        }
                        Response::json(&Enrolled {
                            token: TOKEN.into(),
                        })
                    }
                    _ if !authed => Response::status(401),
                    ("POST", "/v1/agents/n1/heartbeat") => {
                        let _ = beat_tx.send(serde_json::from_slice(&req.body).unwrap());
                        Response::status(204)
                    }
                    ("GET", "/v1/agents/n1/work") | ("POST", "/v1/agents/n1/request") => {
                        if finished.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(50));
                            Response::status(204)
                        } else {
                            Response::json(&work)
                        }
                    }
                    ("POST", "/v1/agents/n1/report") => {
                        let r: Report = serde_json::from_slice(&req.body).unwrap();
                        if !matches!(
                            r.state,
                            ReportState::Downloading
                                | ReportState::Upgrading
                                | ReportState::Verifying
                        ) {
                            finished.store(true, Ordering::SeqCst);
                        }
                        let _ = report_tx.send(r);
                        Response::status(204)
                    }
                    ("GET", "/v1/releases/edge/2.0.0/artifact") => {
                        let mut r = Response::ranged(req, &bytes);
                        if cut.swap(false, Ordering::SeqCst) {
                            r.cut_after = Some(CUT);
                        }
                        r
                    }
                    _ => Response::status(404),
                }
            });
            Self {
                server,
                reports,
                heartbeats,
                done,
            }
        }

        fn config(&self, dir: &std::path::Path, pull: bool) -> AgentConfig {
            agent_config(&self.server, dir, pull)
        }

        /// Runs the agent until a final report arrives (at most 20 s);
        /// returns every report of the run.
        async fn run_until_final(&mut self, config: AgentConfig) -> Vec<Report> {
            let mut seen = Vec::new();
            let reports = &mut self.reports;
            let stop = async {
                let wait = async {
                    while let Some(r) = reports.recv().await {
                        let last = !matches!(
                            r.state,
                            ReportState::Downloading
                                | ReportState::Upgrading
                                | ReportState::Verifying
                        );
                        seen.push(r);
                        if last {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), wait).await;
            };
            run(config, stop).await.unwrap();
            seen
        }

        fn paths(&self) -> Vec<String> {
            self.server
                .seen()
                .iter()
                .map(|r| r.path().to_string())
                .collect()
        }
    }

    /// A disk fault making a trial permanent defers the work: no report
    /// (a `rejected` would leave the node to fall back at its next
    /// restart), the agent asks for the work again after a pause, and once
    /// the disk is back it reports `made-permanent`. The runner hands out a
    /// trial install, then (once it succeeded) the make-permanent, and holds
    /// that until its final report, as the real one does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn make_permanent_deferred_by_a_disk_fault_is_asked_for_again_until_done() {
        let tmp = tempfile::tempdir().unwrap();
        // `permanent` cannot be written: the file its new content goes to
        // first is a directory.
        let blocker = tmp
            .path()
            .join(format!("permanent.tmp{}", std::process::id()));
        std::fs::create_dir_all(blocker.join("blocked")).unwrap();
        let bytes = targz(&[("VERSION", b"2.0.0")]);
        let install = install_edge(&bytes, false);
        let commit = Work::MakePermanent {
            task: "t1".into(),
            package: "edge".into(),
            version: "2.0.0".into(),
        };
        // 0: the install is out; 1: the make-permanent is; 2: done.
        let stage = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (report_tx, mut reports) = unbounded_channel::<Report>();
        let server = {
            let (stage, commits) = (stage.clone(), commits.clone());
            TestServer::start(
                move |req: &Request| match (req.method.as_str(), req.path()) {
                    ("POST", "/v1/agents/enroll") => Response::json(&Enrolled {
                        token: TOKEN.into(),
                    }),
                    ("POST", "/v1/agents/n1/heartbeat") => Response::status(204),
                    ("GET", "/v1/agents/n1/work") => match stage.load(Ordering::SeqCst) {
                        0 => Response::json(&install),
                        1 => {
                            commits.fetch_add(1, Ordering::SeqCst);
                            Response::json(&commit)
                        }
                        _ => {
                            std::thread::sleep(Duration::from_millis(50));
                            Response::status(204)
                        }
                    },
                    ("POST", "/v1/agents/n1/report") => {
                        let r: Report = serde_json::from_slice(&req.body).unwrap();
                        match r.state {
                            ReportState::Succeeded => stage.store(1, Ordering::SeqCst),
                            ReportState::MadePermanent | ReportState::Rejected => {
                                stage.store(2, Ordering::SeqCst)
                            }
                            _ => {}
                        }
                        let _ = report_tx.send(r);
                        Response::status(204)
                    }
                    ("GET", "/v1/releases/edge/2.0.0/artifact") => Response::ranged(req, &bytes),
                    _ => Response::status(404),
                },
            )
        };
        let config = agent_config(&server, tmp.path(), false);
        // The disk comes back once the make-permanent was handed out twice.
        let mend = {
            let (blocker, commits) = (blocker.clone(), commits.clone());
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                while std::time::Instant::now() < deadline {
                    let n = commits.load(Ordering::SeqCst);
                    if n >= 2 {
                        std::fs::remove_dir_all(&blocker).unwrap();
                        return n;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                0
            })
        };
        let mut finals = Vec::new();
        let stop = async {
            let wait = async {
                while let Some(r) = reports.recv().await {
                    if matches!(r.state, ReportState::MadePermanent | ReportState::Rejected) {
                        finals.push(r);
                        break;
                    }
                    finals.push(r);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(20), wait).await;
        };
        run(config, stop).await.unwrap();
        assert!(
            mend.join().unwrap() >= 2,
            "the make-permanent was not asked for again"
        );
        let states: Vec<ReportState> = finals.iter().map(|r| r.state).collect();
        assert_eq!(
            states.last(),
            Some(&ReportState::MadePermanent),
            "{finals:?}"
        );
        assert!(!states.contains(&ReportState::Rejected), "{finals:?}");
        let restarted = ReleaseStore::open(tmp.path()).unwrap();
        assert!(restarted.revert_trial().unwrap().is_none());
        assert_eq!(restarted.permanent().unwrap().as_deref(), Some("2.0.0"));
    }

    /// An agent wired to `server` only for delivering reports.
    fn reporting_agent(server: &TestServer, dir: &std::path::Path) -> (Agent, watch::Sender<bool>) {
        let store = ReleaseStore::open(dir).unwrap();
        let client = RunnerClient::new(&server.url(), "n1").unwrap();
        client.set_token(Some(TOKEN.into()));
        let (stop_tx, stop) = watch::channel(false);
        let config = AgentConfig {
            server: server.url(),
            node_id: "n1".into(),
            state_dir: dir.to_path_buf(),
            enroll_secret: None,
            labels: Vec::new(),
            attributes: Vec::new(),
            asset_path: String::new(),
            schedulable: true,
            steps: Steps::default(),
            heartbeat: Duration::from_secs(60),
            pull: None,
            wait_seconds: 1,
            tls: Default::default(),
            mqtt: None,
        };
        let agent = Agent {
            upgrader: Upgrader::new(store, config.steps.clone()).unwrap(),
            config,
            client,
            mqtt: None,
            enrolling: tokio::sync::Mutex::new(()),
            stop,
            busy: AtomicBool::new(false),
            last_health: AtomicBool::new(true),
        };
        (agent, stop_tx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_answered_503_is_kept_and_retried_after_retry_after_until_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        // The runner's store is failing for the first two tries.
        let server = TestServer::start(move |req: &Request| {
            assert_eq!(req.path(), "/v1/agents/n1/report");
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                let mut r = Response::status(503);
                r.headers.push(("retry-after".into(), "2".into()));
                r.body = br#"{"error":"the runner could not store this change"}"#.to_vec();
                r
            } else {
                Response::status(204)
            }
        });
        let (agent, _stop) = reporting_agent(&server, tmp.path());
        let report = Report {
            task: "t1".into(),
            state: ReportState::Succeeded,
            detail: String::new(),
        };
        let started = std::time::Instant::now();
        let delivered = tokio::time::timeout(Duration::from_secs(30), agent.deliver(&report))
            .await
            .expect("delivered within 30 s");
        assert_eq!(delivered, Delivery::Taken);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Each retry waited for what the runner asked (2 s), not the
        // agent's own first backoff steps (1 s, 2 s).
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "retried after {:?}",
            started.elapsed()
        );
        let bodies: Vec<Report> = server
            .seen()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert!(bodies.iter().all(|b| *b == report), "{bodies:?}");

        // A 409 is a refusal: final at once, not retried.
        let refused = TestServer::start(|_: &Request| Response::status(409));
        let (agent, _stop) = reporting_agent(&refused, tmp.path());
        assert_eq!(agent.deliver(&report).await, Delivery::Refused);
        assert_eq!(refused.seen().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_enrolls_takes_pushed_work_and_reports_each_step() {
        let tmp = tempfile::tempdir().unwrap();
        store_with(tmp.path(), &["1.0.0"]);
        let mut runner = FakeRunner::start(true, false);
        let reports = runner
            .run_until_final(runner.config(tmp.path(), false))
            .await;
        let states: Vec<_> = reports.iter().map(|r| r.state).collect();
        use ReportState::*;
        assert_eq!(
            states,
            [Downloading, Upgrading, Verifying, Succeeded],
            "{reports:?}"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("token")).unwrap(),
            TOKEN
        );
        let paths = runner.paths();
        assert!(paths.contains(&"/v1/releases/edge/2.0.0/artifact".to_string()));
        assert_eq!(paths.iter().filter(|p| p.ends_with("enroll")).count(), 1);
        assert!(
            runner.heartbeats.try_recv().is_ok(),
            "no heartbeat in {paths:?}"
        );

        // A restart before the runner saw the outcome: the work comes again,
        // the token is reused and the outcome re-reported without a download.
        runner.done.store(false, Ordering::SeqCst);
        let before = runner.server.seen().len();
        let again = runner
            .run_until_final(runner.config(tmp.path(), false))
            .await;
        assert_eq!(
            again.iter().map(|r| r.state).collect::<Vec<_>>(),
            [Succeeded]
        );
        let later = &runner.paths()[before..];
        assert!(
            !later
                .iter()
                .any(|p| p.ends_with("enroll") || p.ends_with("artifact")),
            "{later:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pulled_trial_reverts_when_the_agent_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        store_with(tmp.path(), &["1.0.0"]);
        let mut runner = FakeRunner::start(false, false);
        let reports = runner
            .run_until_final(runner.config(tmp.path(), true))
            .await;
        assert_eq!(
            reports.last().unwrap().state,
            ReportState::Succeeded,
            "{reports:?}"
        );
        assert!(runner.paths().iter().any(|p| p.ends_with("/request")));
        let store = ReleaseStore::open(tmp.path()).unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some("2.0.0"));

        // Restarted: back on the permanent release, and the heartbeat says so.
        while runner.heartbeats.try_recv().is_ok() {}
        let config = runner.config(tmp.path(), true);
        let beats = &mut runner.heartbeats;
        let mut first = None;
        let first_beat = async {
            first = tokio::time::timeout(Duration::from_secs(20), beats.recv())
                .await
                .ok()
                .flatten();
        };
        run(config, first_beat).await.unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(first.expect("a heartbeat").version, "1.0.0");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_stopped_mid_download_resumes_after_restart() {
        let tmp = tempfile::tempdir().unwrap();
        store_with(tmp.path(), &["1.0.0"]);
        let mut runner = FakeRunner::start(true, true);
        // First life: the download breaks off, and the agent is stopped while
        // it waits to retry, with the partial file on disk.
        let mut config = runner.config(tmp.path(), false);
        config.steps.retry_backoff = Duration::from_secs(60);
        let downloads = tmp.path().join("downloads");
        let partial = async {
            for _ in 0..400 {
                let len = std::fs::read_dir(&downloads)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>();
                if len >= CUT as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        run(config, partial).await.unwrap();
        let reports: Vec<_> = std::iter::from_fn(|| runner.reports.try_recv().ok()).collect();
        assert_eq!(
            reports.iter().map(|r| r.state).collect::<Vec<_>>(),
            [ReportState::Downloading]
        );

        // Second life: the runner re-sends the open work; the download goes on
        // from the partial file.
        let reports = runner
            .run_until_final(runner.config(tmp.path(), false))
            .await;
        assert_eq!(
            reports.last().unwrap().state,
            ReportState::Succeeded,
            "{reports:?}"
        );
        let ranges: Vec<_> = runner
            .server
            .seen()
            .iter()
            .filter(|r| r.path().ends_with("/artifact"))
            .map(|r| r.headers.get("range").cloned())
            .collect();
        assert_eq!(ranges, [None, Some(format!("bytes={CUT}-"))]);
    }
}
