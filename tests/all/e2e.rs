//! End to end across processes on loopback: a real `flotilla serve` and real
//! `flotilla agent` processes (the binary `flotilla-e2e`, built from the
//! runner's own `main.rs` by this package), driven through the HTTP API.
//!
//! Every child is killed when its [`Proc`] is dropped (also when a test
//! panics; the logs of a failed test are printed first). Every wait polls
//! with a bound ([`wait_for`]). The runner ticks every 50 ms and agents beat
//! every second, so each test takes seconds, not minutes.

use flotilla_model::{NodeRun, RunState};
use flotilla_tests::workspace;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla-e2e");

/// The agent program the tests run: `FLOTILLA_E2E_AGENT` if set (CI sets it
/// to the static x86-64 musl build of `flotilla-agent`, the binary that
/// ships), else the native `flotilla-agent` that `cargo test` builds.
fn agent_bin() -> PathBuf {
    match std::env::var_os("FLOTILLA_E2E_AGENT") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "FLOTILLA_E2E_AGENT={} is not a file; build it with `cargo build --profile agent -p flotilla-agent --target x86_64-unknown-linux-musl` or unset it",
                p.display()
            );
            p
        }
        None => PathBuf::from(env!("CARGO_BIN_EXE_flotilla-agent-e2e")),
    }
}
const SECRET: &str = "e2e-enroll-secret";
const PACKAGE: &str = "app";
/// Appends one line per command run: `install 1.1.0`, `restore 1.0.0`.
pub(crate) const LOG_INSTALL: &str =
    r#"echo "$FLOTILLA_ACTION $FLOTILLA_VERSION" >> "$FLOTILLA_STATE_DIR/installs""#;
/// The release's own file must be there.
const HEALTH: &str = "test -f VERSION";

/// Polls `f` every 50 ms until it gives a value; panics after `timeout`.
pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- processes -----

/// A child process, killed (SIGKILL) and reaped when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({BIN}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// SIGKILL: the process gets no chance to flush or say goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{} ignored SIGTERM for 10 s; killing it", self.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_file(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ----- the HTTP API -----

/// A blocking face over reqwest for the tests.
pub(crate) struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(base: String) -> Api {
        Api::with_ca(base, None)
    }

    /// Over TLS, trusting the CA in the PEM file `ca` (beside the public roots).
    fn with_ca(base: String, ca: Option<&Path>) -> Api {
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(20));
        if let Some(ca) = ca {
            http = http.add_root_certificate(
                reqwest::Certificate::from_pem(&fs::read(ca).unwrap()).unwrap(),
            );
        }
        Api {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: http.build().unwrap(),
            base,
        }
    }

    fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), reqwest::Error> {
        self.rt.block_on(async {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let text = resp.text().await?;
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        })
    }

    fn ok(&self, what: &str, req: reqwest::RequestBuilder) -> Value {
        let (status, body) = self
            .send(req)
            .unwrap_or_else(|e| panic!("{what}: the runner is unreachable: {e}"));
        assert!((200..300).contains(&status), "{what}: {status} {body}");
        body
    }

    pub(crate) fn get(&self, path: &str) -> Value {
        self.ok(
            &format!("GET {path}"),
            self.http.get(format!("{}{path}", self.base)),
        )
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> Value {
        self.ok(
            &format!("POST {path}"),
            self.http.post(format!("{}{path}", self.base)).json(&body),
        )
    }

    fn put(&self, path: &str, bytes: Vec<u8>) -> Value {
        self.ok(
            &format!("PUT {path}"),
            self.http.put(format!("{}{path}", self.base)).body(bytes),
        )
    }

    /// `None` while the runner is down.
    fn try_get(&self, path: &str) -> Option<Value> {
        match self.send(self.http.get(format!("{}{path}", self.base))) {
            Ok((200, v)) => Some(v),
            _ => None,
        }
    }
}

// ----- releases -----

/// A `.tar.gz` release: `VERSION`, `bin/app`, and `pad` incompressible bytes.
fn artifact(version: &str, pad: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    let filler: Vec<u8> = (0..pad)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let script = format!("#!/bin/sh\necho app {version}\n");
    let files: [(&str, &[u8], u32); 3] = [
        ("VERSION", version.as_bytes(), 0o644),
        ("bin/app", script.as_bytes(), 0o755),
        ("data/filler", &filler, 0o644),
    ];
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, path, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Puts `version` on a node as its current, permanent release, as an earlier
/// upgrade would have (so there is something to back up and restore).
fn seed(state_dir: &Path, version: &str) {
    let rel = state_dir.join("releases").join(version);
    fs::create_dir_all(rel.join("bin")).unwrap();
    fs::write(rel.join("VERSION"), version).unwrap();
    fs::write(
        rel.join("bin/app"),
        format!("#!/bin/sh\necho app {version}\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        Path::new("releases").join(version),
        state_dir.join("current"),
    )
    .unwrap();
    fs::write(state_dir.join("permanent"), version).unwrap();
}

fn current(state_dir: &Path) -> Option<String> {
    fs::read_link(state_dir.join("current"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn permanent(state_dir: &Path) -> Option<String> {
    fs::read_to_string(state_dir.join("permanent"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The lines the install command appended on this node.
fn installs(state_dir: &Path) -> Vec<String> {
    fs::read_to_string(state_dir.join("installs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every agent of `c` installed `version` exactly once (a runner or broker
/// killed mid-rollout upgrades nothing twice) and runs it.
fn each_installed_once(c: &Cluster, version: &str) {
    for a in &c.agents {
        assert_eq!(
            installs(&a.dir),
            [format!("install {version}")],
            "{} upgraded twice",
            a.id
        );
        assert_eq!(current(&a.dir).as_deref(), Some(version), "{}", a.id);
    }
}

// ----- a runner and its agents -----

pub(crate) struct AgentSpec {
    pub(crate) install: String,
    pub(crate) health: String,
    pub(crate) extra: Vec<String>,
    /// The release the node is on before the test.
    pub(crate) seed: Option<&'static str>,
    /// Pass the enrollment secret.
    pub(crate) secret: bool,
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            install: LOG_INSTALL.to_string(),
            health: HEALTH.to_string(),
            extra: Vec::new(),
            seed: Some("1.0.0"),
            secret: true,
        }
    }
}

struct Agent {
    id: String,
    dir: PathBuf,
    args: Vec<String>,
    proc: Option<Proc>,
}

/// A runner and its agents in one temp dir; every process dies with it.
pub(crate) struct Cluster {
    agents: Vec<Agent>,
    runner: Option<Proc>,
    starts: u32,
    addr: SocketAddr,
    pub(crate) api: Api,
    /// The CA of the runner's certificate when it serves TLS (`https://`).
    ca: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start() -> Cluster {
        Cluster::start_with(&format!("enroll_secret = {SECRET:?}\n"))
    }

    /// A runner with `extra` TOML in its config.
    fn start_with(extra: &str) -> Cluster {
        Cluster::start_tls(extra, None)
    }

    /// A runner with `extra` TOML in its config (its `tls = {...}`, say,
    /// from [`crate::tls::Pki::runner_toml`]), reached over TLS trusting
    /// the CA in the PEM file `ca`, if given.
    fn start_tls(extra: &str, ca: Option<&Path>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-e2e")
            .tempdir()
            .unwrap();
        fs::write(
            dir.path().join("runner.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\ndata = {:?}\ntick_ms = 50\noffline_after_seconds = 5\n{extra}",
                dir.path().join("runner-data")
            ),
        )
        .unwrap();
        let mut c = Cluster {
            agents: Vec::new(),
            runner: None,
            starts: 0,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api: Api::new(String::new()),
            ca: ca.map(Path::to_path_buf),
            dir,
        };
        c.start_runner();
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Starts the runner (on the port it had before, after a restart) and
    /// waits for its "listening" line.
    fn start_runner(&mut self) {
        self.starts += 1;
        let out = self.path().join(format!("runner-{}.out", self.starts));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.path().join("runner.toml"))
            .arg("--listen")
            .arg(self.addr.to_string())
            .env("FLOTILLA_LOG", "info")
            .stdout(log_file(&out))
            .stderr(log_file(&self.path().join("runner.log")));
        self.runner = Some(Proc::spawn("the runner", &mut cmd));
        let addr = wait_for("the runner to listen", Duration::from_secs(20), || {
            if let Some(Some(status)) = self
                .runner
                .as_mut()
                .map(|p| p.child.as_mut().unwrap().try_wait().unwrap())
            {
                panic!(
                    "the runner exited ({status}): {}",
                    fs::read_to_string(self.path().join("runner.log")).unwrap_or_default()
                );
            }
            let text = fs::read_to_string(&out).ok()?;
            let rest = text.split("listening on ").nth(1)?;
            let url = rest.split_whitespace().next()?;
            let addr = url.split_once("://")?.1;
            addr.parse::<SocketAddr>().ok()
        });
        self.addr = addr;
        self.api = Api::with_ca(self.url(), self.ca.as_deref());
    }

    /// SIGKILL to the runner.
    fn kill_runner(&mut self) {
        if let Some(mut p) = self.runner.take() {
            p.kill();
        }
    }

    pub(crate) fn add_agent(&mut self, spec: AgentSpec) -> usize {
        let i = self.agents.len();
        let id = format!("node-{i:02}");
        let dir = self.path().join("agents").join(&id);
        fs::create_dir_all(&dir).unwrap();
        if let Some(v) = spec.seed {
            seed(&dir, v);
        }
        let mut args: Vec<String> = [
            "--server",
            &self.url(),
            "--node-id",
            &id,
            "--state-dir",
            &dir.display().to_string(),
            "--heartbeat",
            "1",
            "--wait",
            "5",
            "--command-timeout",
            "30",
            "--install-command",
            &spec.install,
            "--health-command",
            &spec.health,
            "--label",
            "e2e=yes",
        ]
        .map(String::from)
        .to_vec();
        if spec.secret {
            args.extend(["--enroll-secret".to_string(), SECRET.to_string()]);
        }
        args.extend(spec.extra);
        self.agents.push(Agent {
            id,
            dir,
            args,
            proc: None,
        });
        self.start_agent(i);
        i
    }

    fn start_agent(&mut self, i: usize) {
        let log = self.path().join(format!("{}.log", self.agents[i].id));
        let a = &mut self.agents[i];
        let mut cmd = Command::new(agent_bin());
        cmd.args(&a.args)
            .env("FLOTILLA_LOG", "info")
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        a.proc = Some(Proc::spawn(&a.id, &mut cmd));
    }

    fn node(&self, i: usize) -> Value {
        self.api.get(&format!("/v1/nodes/{}", self.agents[i].id))
    }

    /// Waits until every agent is enrolled, online and has said its version.
    pub(crate) fn wait_enrolled(&self) {
        let n = self.agents.len();
        wait_for(
            &format!("{n} agents to enroll"),
            Duration::from_secs(30),
            || {
                let nodes = self.api.get("/v1/nodes");
                let items = nodes["items"].as_array()?;
                let ready = items
                    .iter()
                    .filter(|n| n["online"] == true)
                    .filter(|n| {
                        let id = n["id"].as_str().unwrap_or("");
                        self.agents.iter().any(|a| {
                            a.id == id
                                && n["version"].as_str() == current(&a.dir).as_deref().or(Some(""))
                        })
                    })
                    .count();
                (ready == n).then_some(())
            },
        );
    }

    /// Creates a release and uploads its artifact; returns the bytes.
    pub(crate) fn release(&self, version: &str, pad: usize) -> Vec<u8> {
        let bytes = artifact(version, pad);
        self.api.post(
            "/v1/releases",
            json!({"package": PACKAGE, "version": version}),
        );
        let rec = self.api.put(
            &format!("/v1/releases/{PACKAGE}/{version}/artifact"),
            bytes.clone(),
        );
        assert_eq!(rec["sha256"], sha256(&bytes));
        bytes
    }

    /// Creates a canary task to `version` over every node; returns its id.
    pub(crate) fn task(&self, name: &str, version: &str, extra: Value) -> String {
        let mut spec = json!({
            "name": name,
            "package": PACKAGE,
            "target": {"version": version},
            "policy": "canary",
            "node_timeout_seconds": 60,
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let task = self.api.post("/v1/tasks", spec);
        task["id"].as_str().unwrap().to_string()
    }

    fn runs(&self, task: &str) -> BTreeMap<String, NodeRun> {
        let page = self.api.get(&format!("/v1/tasks/{task}/runs"));
        serde_json::from_value::<Vec<NodeRun>>(page["items"].clone())
            .unwrap()
            .into_iter()
            .map(|r| (r.node_id.clone(), r))
            .collect()
    }

    /// Waits until the task is in one of `states`; returns its view.
    pub(crate) fn wait_task(&self, task: &str, states: &[&str], timeout: Duration) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.api.try_get(&format!("/v1/tasks/{task}")) {
                if states.iter().any(|s| v["state"]["state"] == *s) {
                    return v;
                }
                last = v;
            }
            assert!(
                Instant::now() < deadline,
                "task {task} not {states:?} after {timeout:?}; last seen: state {} counts {}",
                last["state"],
                last["counts"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the node's run in `task` is final (not on its way).
    fn wait_run(&self, task: &str, i: usize, timeout: Duration) -> NodeRun {
        let id = self.agents[i].id.clone();
        wait_for(&format!("a final run of {id} in {task}"), timeout, || {
            let run = self.runs(task).remove(&id)?;
            run.state.finished().then_some(run)
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut p) = a.proc.take() {
                p.stop();
            }
        }
        if let Some(mut p) = self.runner.take() {
            p.stop();
        }
        if std::thread::panicking() {
            // Keep what tells why: the logs, and the directory itself.
            let mut logs: Vec<PathBuf> = fs::read_dir(self.path())
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.sort();
            for p in logs.iter().filter(|p| p.is_file()) {
                let text = fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("----- {} (last {} lines)", p.display(), tail.len());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
            let kept = self.dir.path().to_path_buf();
            let _ = std::mem::replace(
                &mut self.dir,
                tempfile::Builder::new()
                    .prefix("flotilla-e2e-x")
                    .tempdir()
                    .unwrap(),
            )
            .keep();
            eprintln!("kept {}", kept.display());
        }
    }
}

fn counts(view: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(view["counts"].clone()).unwrap()
}

// ----- the tests -----

#[test]
fn a_canary_rollout_over_twelve_agent_processes_succeeds_everywhere() {
    let t0 = Instant::now();
    let mut c = Cluster::start();
    for _ in 0..12 {
        c.add_agent(AgentSpec::default());
    }
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("canary-e2e", "1.1.0", json!({}));
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 12)]));
    let waves: Vec<&str> = view["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(waves, ["canary", "10%", "50%", "rest"]);
    for (i, a) in c.agents.iter().enumerate() {
        assert_eq!(current(&a.dir).as_deref(), Some("1.1.0"), "{}", a.id);
        assert_eq!(permanent(&a.dir).as_deref(), Some("1.1.0"), "{}", a.id);
        assert_eq!(installs(&a.dir), ["install 1.1.0"], "{}", a.id);
        // The old release was backed up before the switch.
        assert!(a.dir.join("backups/1.0.0/VERSION").is_file(), "{}", a.id);
        let _ = i;
    }
    // The runner learns the new versions from the heartbeats.
    wait_for("every node to say 1.1.0", Duration::from_secs(10), || {
        (0..c.agents.len())
            .all(|i| c.node(i)["version"] == "1.1.0")
            .then_some(())
    });
    eprintln!("12 agents upgraded in {:?}", t0.elapsed());
}

/// An install command that fails for `version` (and logs like the others).
fn failing_install(version: &str) -> String {
    format!(
        r#"{LOG_INSTALL}; if [ "$FLOTILLA_ACTION" = install ] && [ "$FLOTILLA_VERSION" = {version} ]; then echo "no space left on the device" >&2; exit 3; fi"#
    )
}

#[test]
fn an_agent_whose_install_fails_rolls_back_and_reports_it() {
    let mut c = Cluster::start();
    let bad = c.add_agent(AgentSpec {
        install: failing_install("1.1.0"),
        ..AgentSpec::default()
    });
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("install-fails", "1.1.0", json!({}));
    let run = c.wait_run(&task, bad, Duration::from_secs(30));
    let RunState::FailedRolledBack { error, .. } = &run.state else {
        panic!("expected failed-rolled-back, got {:?}", run.state);
    };
    assert!(error.contains("install failed"), "{error}");
    assert!(error.contains("no space left on the device"), "{error}");
    assert!(error.contains("restored 1.0.0 from its backup"), "{error}");
    let dir = &c.agents[bad].dir;
    assert_eq!(current(dir).as_deref(), Some("1.0.0"));
    assert_eq!(permanent(dir).as_deref(), Some("1.0.0"));
    assert_eq!(installs(dir), ["install 1.1.0", "restore 1.0.0"]);
    // One failed node of one: the canary pauses the task for a person.
    let view = c.wait_task(&task, &["paused", "failed"], Duration::from_secs(10));
    assert_eq!(
        counts(&view),
        BTreeMap::from([("failed-rolled-back".into(), 1)])
    );
}

/// Issue 17.4: the simulator agrees with real agents. The same small
/// rollout (one node succeeds, one's install fails, one's install and
/// restore fail), with and without a backup, runs through real agent
/// processes and then through the simulator as a scenario that expects the
/// final states the real agents reached.
#[test]
fn the_simulator_ends_a_rollout_where_real_agents_do() {
    for backup in ["default", "none"] {
        let mut c = Cluster::start();
        c.add_agent(AgentSpec::default());
        c.add_agent(AgentSpec {
            install: failing_install("1.1.0"),
            ..AgentSpec::default()
        });
        c.add_agent(AgentSpec {
            install: failing_install("1.1.0"),
            extra: vec!["--restore-command".into(), "exit 4".into()],
            ..AgentSpec::default()
        });
        c.wait_enrolled();
        c.release("1.1.0", 0);
        // One wave of everyone, and no failure rate stops it.
        let spec = json!({
            "name": "sim-vs-real",
            "package": PACKAGE,
            "target": {"version": "1.1.0"},
            "policy": "canary",
            "params": {"threshold": 1.0},
            "backup": backup,
            "node_timeout_seconds": 60,
        });
        let task = c.api.post("/v1/tasks", spec.clone())["id"]
            .as_str()
            .unwrap()
            .to_string();
        let view = c.wait_task(
            &task,
            &["succeeded", "failed", "paused"],
            Duration::from_secs(60),
        );
        let real: BTreeMap<String, String> = c
            .runs(&task)
            .into_iter()
            .map(|(id, r)| (id, r.state.name().to_string()))
            .collect();
        assert_eq!(real.len(), 3, "{real:?}");
        let mut sim_spec = spec.clone();
        sim_spec["policy"] = json!(workspace().join("policies/canary.rhai"));
        let scenario = json!({
            "fleet": (0..3).map(|i| json!({
                "id": format!("node-{i:02}"),
                "version": "1.0.0",
                "labels": [["e2e", "yes"]],
            })).collect::<Vec<_>>(),
            "releases": [{"package": PACKAGE, "version": "1.1.0"}],
            "task": sim_spec,
            "agents": {"nodes": {"node-01": "fail", "node-02": "rollback-fails"}},
            "expect": {"task": view["state"]["state"], "nodes": real},
        });
        let file = c.path().join("sim-vs-real.yaml");
        fs::write(&file, serde_json::to_string(&scenario).unwrap()).unwrap();
        let runtime = flotilla_policy::WasmRuntime::new(None).unwrap();
        let report = flotilla_engine::scenario::Scenario::load(&file)
            .unwrap()
            .run(&runtime, None);
        assert!(
            report.passed,
            "backup {backup}: the simulator disagrees with the real agents {real:?}:\n{}",
            report.explain()
        );
    }
}

#[test]
fn an_agent_whose_restore_fails_reports_rollback_failed() {
    let mut c = Cluster::start();
    let bad = c.add_agent(AgentSpec {
        install: failing_install("1.1.0"),
        extra: vec![
            "--restore-command".into(),
            r#"echo "restore $FLOTILLA_VERSION" >> "$FLOTILLA_STATE_DIR/installs"; echo "the old service will not start" >&2; exit 4"#.into(),
        ],
        ..AgentSpec::default()
    });
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("restore-fails", "1.1.0", json!({}));
    let run = c.wait_run(&task, bad, Duration::from_secs(30));
    let RunState::FailedRollbackFailed { error, .. } = &run.state else {
        panic!("expected failed-rollback-failed, got {:?}", run.state);
    };
    assert!(error.contains("install failed"), "{error}");
    assert!(error.contains("restoring 1.0.0 failed"), "{error}");
    assert!(error.contains("the old service will not start"), "{error}");
    assert_eq!(
        installs(&c.agents[bad].dir),
        ["install 1.1.0", "restore 1.0.0"]
    );
    let view = c.wait_task(&task, &["paused", "failed"], Duration::from_secs(10));
    assert_eq!(
        counts(&view),
        BTreeMap::from([("failed-rollback-failed".into(), 1)])
    );
}

#[test]
fn a_corrupt_artifact_is_refused_and_reported() {
    let mut c = Cluster::start();
    let node = c.add_agent(AgentSpec::default());
    c.wait_enrolled();
    // A release whose URL serves other bytes than its sha256 says: the
    // runner's own artifact of 1.0.1.
    let bytes = c.release("1.0.1", 0);
    let wrong = sha256(b"not these bytes");
    c.api.post(
        "/v1/releases",
        json!({
            "package": PACKAGE, "version": "1.1.0",
            "url": format!("{}/v1/releases/{PACKAGE}/1.0.1/artifact", c.url()),
            "sha256": wrong, "size": bytes.len(),
        }),
    );
    let task = c.task("corrupt", "1.1.0", json!({}));
    let run = c.wait_run(&task, node, Duration::from_secs(30));
    let RunState::FailedRolledBack { error, .. } = &run.state else {
        panic!("expected failed-rolled-back, got {:?}", run.state);
    };
    assert!(error.contains("sha256 mismatch"), "{error}");
    assert!(error.contains(&wrong), "{error}");
    assert!(error.contains("nothing on the node was changed"), "{error}");
    let dir = &c.agents[node].dir;
    assert_eq!(current(dir).as_deref(), Some("1.0.0"));
    assert!(installs(dir).is_empty(), "{:?}", installs(dir));
    assert!(!dir.join("releases/1.1.0").exists());
    // Nothing of the bad download is kept.
    assert_eq!(fs::read_dir(dir.join("downloads")).unwrap().count(), 0);
}

#[test]
fn a_trial_release_reverts_on_agent_restart_until_made_permanent() {
    let mut c = Cluster::start();
    let n = c.add_agent(AgentSpec::default());
    c.wait_enrolled();
    c.release("1.1.0", 0);
    // The wave soaks an hour before it is judged (and its release made
    // permanent by the runner): until then the node is on a trial.
    let task = c.task(
        "trial",
        "1.1.0",
        json!({"permanent": false, "params": {"soak_seconds": 3600}}),
    );
    let run = c.wait_run(&task, n, Duration::from_secs(30));
    assert_eq!(run.state.name(), "succeeded");
    let dir = c.agents[n].dir.clone();
    assert_eq!(current(&dir).as_deref(), Some("1.1.0"));
    assert_eq!(permanent(&dir).as_deref(), Some("1.0.0"));

    // A restart comes back on the permanent release, and the runner hears it.
    c.agents[n].proc.take().unwrap().stop();
    c.start_agent(n);
    wait_for("the trial to revert", Duration::from_secs(20), || {
        (current(&dir).as_deref() == Some("1.0.0") && c.node(n)["version"] == "1.0.0").then_some(())
    });
    assert!(dir.join("releases/1.1.0/VERSION").is_file());

    // `flotilla-agent install` makes it permanent; a restart keeps it.
    c.agents[n].proc.take().unwrap().stop();
    let out = Command::new(agent_bin())
        .args(["install", "1.1.0", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Made release permanent: 1.1.0"), "{stdout}");
    assert_eq!(permanent(&dir).as_deref(), Some("1.1.0"));
    c.start_agent(n);
    wait_for("the node to say 1.1.0", Duration::from_secs(20), || {
        (c.node(n)["version"] == "1.1.0").then_some(())
    });
    assert_eq!(current(&dir).as_deref(), Some("1.1.0"));
}

#[test]
fn the_runner_makes_a_healthy_trial_wave_permanent() {
    let mut c = Cluster::start();
    let n = c.add_agent(AgentSpec::default());
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("trial-ok", "1.1.0", json!({"permanent": false}));
    c.wait_task(&task, &["succeeded"], Duration::from_secs(30));
    let dir = c.agents[n].dir.clone();
    wait_for(
        "the release to be made permanent",
        Duration::from_secs(20),
        || (permanent(&dir).as_deref() == Some("1.1.0")).then_some(()),
    );
    wait_for(
        "node.permanent in the task's events",
        Duration::from_secs(10),
        || {
            let events = c.api.get(&format!("/v1/tasks/{task}/events?limit=1000"));
            events["events"]
                .as_array()?
                .iter()
                .any(|e| e["kind"] == "node.permanent")
                .then_some(())
        },
    );
    // A restart stays on it.
    c.agents[n].proc.take().unwrap().stop();
    c.start_agent(n);
    wait_for(
        "the node to report 1.1.0 after a restart",
        Duration::from_secs(20),
        || (c.node(n)["version"] == "1.1.0").then_some(()),
    );
    assert_eq!(current(&dir).as_deref(), Some("1.1.0"));
}

#[test]
fn the_runner_killed_mid_wave_resumes_and_no_agent_upgrades_twice() {
    let mut c = Cluster::start();
    let slow = format!("sleep 0.3; {LOG_INSTALL}");
    for _ in 0..10 {
        c.add_agent(AgentSpec {
            install: slow.clone(),
            ..AgentSpec::default()
        });
    }
    c.wait_enrolled();
    c.release("1.1.0", 0);
    // Waves of 1, 1, 3 and 5 nodes, two at a time: several seconds of rollout.
    let task = c.task("crash-resume", "1.1.0", json!({"concurrency": 2}));
    let succeeded = |c: &Cluster| {
        c.api
            .try_get(&format!("/v1/tasks/{task}"))
            .map(|v| v["counts"]["succeeded"].as_u64().unwrap_or(0))
    };
    // Kill right after the start, after the canary, and twice mid-wave.
    let mut kills = Vec::new();
    for at in [0, 1, 3, 7] {
        let seen = wait_for(
            &format!("{at} nodes to succeed"),
            Duration::from_secs(30),
            || succeeded(&c).filter(|&s| s >= at),
        );
        c.kill_runner();
        kills.push(seen);
        c.start_runner();
    }
    assert!(
        kills.iter().any(|&s| s < 10),
        "every kill came after the rollout: {kills:?}"
    );
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 10)]));
    each_installed_once(&c, "1.1.0");
    eprintln!("killed the runner at {kills:?} succeeded nodes");
}

/// An artifact server on loopback that sends the first `cut` bytes of the
/// first download and then stalls (an agent killed mid-download never gets
/// the rest); later downloads are served whole, honouring `Range`.
struct StallingServer {
    addr: SocketAddr,
    /// The `Range` start of every request (0 without one).
    starts: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
}

impl StallingServer {
    fn start(bytes: Vec<u8>, cut: usize) -> StallingServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (starts.clone(), stop.clone());
        std::thread::spawn(move || {
            let bytes = Arc::new(bytes);
            while !st.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (bytes, s, st) = (bytes.clone(), s.clone(), st.clone());
                std::thread::spawn(move || serve_one(conn, &bytes, cut, &s, &st));
            }
        });
        StallingServer { addr, starts, stop }
    }
}

impl Drop for StallingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_one(
    mut conn: std::net::TcpStream,
    bytes: &[u8],
    cut: usize,
    starts: &Mutex<Vec<u64>>,
    stop: &AtomicBool,
) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut start = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            start = v
                .trim()
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap_or(0);
        }
    }
    let first = {
        let mut s = starts.lock().unwrap();
        s.push(start);
        s.len() == 1
    };
    let total = bytes.len();
    let body = &bytes[start as usize..];
    let head = if start == 0 {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n")
    } else {
        format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{total}\r\nconnection: close\r\n\r\n",
            body.len(),
            total - 1
        )
    };
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    if first {
        let _ = conn.write_all(&body[..cut]);
        let _ = conn.flush();
        // Hold the connection open with nothing more to say.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            let mut buf = [0u8; 1];
            conn.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            match conn.read(&mut buf) {
                // The agent hung up (it was killed).
                Ok(0) => return,
                _ => continue,
            }
        }
    } else {
        let _ = conn.write_all(body);
    }
}

#[test]
fn an_agent_killed_mid_download_resumes_and_finishes_after_restart() {
    let mut c = Cluster::start();
    let n = c.add_agent(AgentSpec::default());
    c.wait_enrolled();
    let bytes = artifact("1.1.0", 512 * 1024);
    let cut = 200_000;
    let sha = sha256(&bytes);
    let server = StallingServer::start(bytes.clone(), cut);
    c.api.post(
        "/v1/releases",
        json!({
            "package": PACKAGE, "version": "1.1.0",
            "url": format!("http://{}/app-1.1.0.tar.gz", server.addr),
            "sha256": sha, "size": bytes.len(),
        }),
    );
    let task = c.task("resume-download", "1.1.0", json!({}));
    let dir = c.agents[n].dir.clone();
    let part = dir.join("downloads").join(format!("{sha}.part"));
    wait_for(
        "the first part of the download",
        Duration::from_secs(30),
        || {
            fs::metadata(&part)
                .ok()
                .filter(|m| m.len() == cut as u64)
                .map(drop)
        },
    );
    let id = c.agents[n].id.clone();
    wait_for(
        "the runner to hear of the download",
        Duration::from_secs(10),
        || (c.runs(&task)[&id].state.name() == "downloading").then_some(()),
    );
    // SIGKILL: no goodbye, the partial file stays.
    c.agents[n].proc.take().unwrap().kill();
    c.start_agent(n);
    let run = c.wait_run(&task, n, Duration::from_secs(30));
    assert_eq!(run.state.name(), "succeeded", "{:?}", run.state);
    assert_eq!(
        *server.starts.lock().unwrap(),
        [0, cut as u64],
        "resumed at the cut"
    );
    assert_eq!(current(&dir).as_deref(), Some("1.1.0"));
    assert_eq!(installs(&dir), ["install 1.1.0"]);
    assert!(!part.exists(), "the download is cleaned up");
}

#[test]
fn pull_agents_ask_and_get_the_release_through_the_policy() {
    let mut c = Cluster::start();
    for _ in 0..3 {
        c.add_agent(AgentSpec {
            extra: vec!["--pull".into(), "--pull-interval".into(), "1".into()],
            ..AgentSpec::default()
        });
    }
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("pull-e2e", "1.1.0", json!({"method": "pull"}));
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(30));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 3)]));
    for a in &c.agents {
        assert_eq!(installs(&a.dir), ["install 1.1.0"], "{}", a.id);
    }
}

#[test]
fn an_operator_rollback_puts_the_previous_release_back_on_every_node() {
    let mut c = Cluster::start();
    for _ in 0..3 {
        c.add_agent(AgentSpec::default());
    }
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("rollback-e2e", "1.1.0", json!({}));
    c.wait_task(&task, &["succeeded"], Duration::from_secs(30));
    c.api.post(
        &format!("/v1/tasks/{task}/rollback"),
        json!({"reason": "customers complain"}),
    );
    let view = c.wait_task(&task, &["rolled-back"], Duration::from_secs(30));
    assert_eq!(counts(&view), BTreeMap::from([("rolled-back".into(), 3)]));
    for a in &c.agents {
        assert_eq!(
            installs(&a.dir),
            ["install 1.1.0", "restore 1.0.0"],
            "{}",
            a.id
        );
        assert_eq!(current(&a.dir).as_deref(), Some("1.0.0"), "{}", a.id);
        assert_eq!(permanent(&a.dir).as_deref(), Some("1.0.0"), "{}", a.id);
    }
}

#[test]
fn an_agent_without_a_secret_enrolls_where_none_is_asked_and_stops_where_one_is() {
    let mut open = Cluster::start_with("");
    open.add_agent(AgentSpec {
        secret: false,
        ..AgentSpec::default()
    });
    open.wait_enrolled();

    let mut closed = Cluster::start();
    let n = closed.add_agent(AgentSpec {
        secret: false,
        ..AgentSpec::default()
    });
    let status = wait_for("the agent to give up", Duration::from_secs(20), || {
        let p = closed.agents[n].proc.as_mut().unwrap();
        p.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!status.success());
    let log = fs::read_to_string(closed.path().join("node-00.log")).unwrap();
    assert!(
        log.contains("the runner wants an enrollment secret and the node has none"),
        "{log}"
    );
}

#[test]
fn a_node_is_not_reported_unhealthy_while_its_upgrade_is_under_way() {
    let mut c = Cluster::start();
    // Healthy only once the install command has left its mark, which takes
    // it two heartbeats.
    let n = c.add_agent(AgentSpec {
        install: format!("sleep 2; touch installed; {LOG_INSTALL}"),
        health: "test -f installed".into(),
        seed: None,
        ..AgentSpec::default()
    });
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("healthy-meanwhile", "1.1.0", json!({}));
    let id = c.agents[n].id.clone();
    let mut samples = 0;
    let run = wait_for("the upgrade", Duration::from_secs(30), || {
        let node = c.node(n);
        assert_eq!(
            node["healthy"], true,
            "reported unhealthy mid-upgrade: {node}"
        );
        samples += 1;
        let run = c.runs(&task).remove(&id)?;
        run.state.finished().then_some(run)
    });
    assert_eq!(run.state.name(), "succeeded", "{:?}", run.state);
    assert!(samples > 20, "sampled the node's health {samples} times");
}

#[test]
fn the_agent_binary_says_its_version() {
    let out = Command::new(agent_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("flotilla-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn flotilla_demo_rolls_out_and_stops_its_children_also_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = Command::new(BIN)
        .args(["demo", "--agents", "4", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("succeeded after"), "{stdout}");
    assert!(stdout.contains("  succeeded                4"), "{stdout}");
    assert!(
        stdout.contains("Stopped the runner and 4 agents"),
        "{stdout}"
    );
    for i in 1..=4 {
        let node = dir.join(format!("agents/node-{i:02}"));
        assert_eq!(current(&node).as_deref(), Some("1.1.0"));
        let log = fs::read_to_string(node.join("installs.log")).unwrap();
        assert_eq!(log, "install 1.1.0\n");
    }
    let url = stdout
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let api = Api::new(url);
    assert!(api.try_get("/healthz").is_none(), "the runner still runs");

    // --keep: everything stays up until SIGINT, then stops.
    let dir = tmp.path().join("kept");
    let stdout_path = tmp.path().join("kept.out");
    let mut demo = Proc::spawn(
        "the demo",
        Command::new(BIN)
            .args(["demo", "--agents", "2", "--keep", "--dir"])
            .arg(&dir)
            .stdout(log_file(&stdout_path))
            .stderr(log_file(&tmp.path().join("kept.err"))),
    );
    let url = wait_for(
        "the demo to finish its rollout",
        Duration::from_secs(60),
        || {
            let text = fs::read_to_string(&stdout_path).ok()?;
            text.contains("--keep:").then_some(())?;
            text.split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(str::to_string)
        },
    );
    let api = Api::new(url);
    assert!(api.try_get("/healthz").is_some(), "the runner is kept");
    demo.signal(nix::sys::signal::Signal::SIGINT);
    wait_for("the demo to stop", Duration::from_secs(20), || {
        demo.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(api.try_get("/healthz").is_none(), "the runner was stopped");
    let text = fs::read_to_string(&stdout_path).unwrap();
    assert!(text.contains("Interrupted; stopping"), "{text}");
}

/// Issue 17.6: `flotilla simulate` has devices ask for work in a pull task
/// (it used to say the task "would end running"), and exits non-zero when
/// the task would not succeed, like `task watch`.
#[test]
fn simulate_covers_pull_and_fails_when_the_task_would_not_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.json");
    let nodes: Vec<Value> = (0..4)
        .map(|i| json!({"id": format!("d{i}"), "version": "1.0", "online": true}))
        .collect();
    fs::write(&fleet, serde_json::to_vec(&nodes).unwrap()).unwrap();
    let policy = workspace().join("policies/canary.rhai");
    let simulate = |task: Value, agents: Option<Value>| {
        let task_file = dir.path().join("task.json");
        fs::write(&task_file, serde_json::to_vec(&task).unwrap()).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("simulate")
            .arg("--fleet")
            .arg(&fleet)
            .arg("--task")
            .arg(&task_file)
            .arg("--policy")
            .arg(&policy)
            .arg("--json");
        if let Some(a) = agents {
            let f = dir.path().join("agents.json");
            fs::write(&f, serde_json::to_vec(&a).unwrap()).unwrap();
            cmd.arg("--agents").arg(f);
        }
        let out = cmd.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "simulate printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    };
    let pull = json!({
        "name": "pull", "package": "fw", "target": {"version": "2.0"},
        "policy": "canary", "method": "pull",
    });
    let (code, v) = simulate(pull, None);
    assert_eq!(v["task"]["state"]["state"], "succeeded", "{v}");
    assert_eq!(v["counts"]["succeeded"], 4, "{v}");
    assert_eq!(code, Some(0));

    let push = json!({
        "name": "push", "package": "fw", "target": {"version": "2.0"}, "policy": "canary",
    });
    let (code, v) = simulate(push, Some(json!({"nodes": {"d0": "fail"}})));
    assert_ne!(v["task"]["state"]["state"], "succeeded", "{v}");
    assert_eq!(code, Some(1), "a task that would not succeed exits 1");
}

// ----- over TLS (certificates from crate::tls::Pki) -----

mod over_tls {
    use super::*;
    use crate::tls::Pki;

    /// The certificate the runner at `url` serves on a new connection.
    fn served_cert(url: &str, ca: &Path) -> Option<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let http = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&fs::read(ca).unwrap()).ok()?)
                .tls_info(true)
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .ok()?;
            let res = http.get(format!("{url}/healthz")).send().await.ok()?;
            let info = res.extensions().get::<reqwest::tls::TlsInfo>()?;
            info.peer_certificate().map(<[u8]>::to_vec)
        })
    }

    #[test]
    fn agents_with_the_private_ca_roll_out_over_tls_and_one_without_it_cannot_connect() {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(pki_dir.path(), &[]);
        let mut c = Cluster::start_tls(
            &format!("enroll_secret = {SECRET:?}\n{}", pki.runner_toml(false)),
            Some(&pki.ca),
        );
        assert!(c.url().starts_with("https://"), "{}", c.url());
        for _ in 0..3 {
            c.add_agent(AgentSpec {
                extra: pki.agent_args("", false),
                ..AgentSpec::default()
            });
        }
        c.wait_enrolled();
        // This one trusts only the public roots.
        let lost = c.add_agent(AgentSpec::default());
        c.release("1.1.0", 0);
        let task = c.task("tls-e2e", "1.1.0", json!({}));
        let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
        assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 3)]));
        for a in &c.agents[..3] {
            assert_eq!(current(&a.dir).as_deref(), Some("1.1.0"), "{}", a.id);
        }
        // It never enrolled, and its log says why and what to do.
        let log = c.path().join(format!("{}.log", c.agents[lost].id));
        wait_for(
            "the agent without the CA to say why",
            Duration::from_secs(20),
            || {
                let text = fs::read_to_string(&log).ok()?;
                (text.contains("UnknownIssuer") && text.contains("--ca-file")).then_some(())
            },
        );
        let nodes = c.api.get("/v1/nodes");
        assert_eq!(nodes["items"].as_array().unwrap().len(), 3, "{nodes}");
        assert_eq!(current(&c.agents[lost].dir).as_deref(), Some("1.0.0"));

        // Plain HTTP to the TLS listener gets nothing from the API.
        let plain = Api::new(format!("http://{}", c.addr));
        assert!(plain.try_get("/v1/nodes").is_none());
    }

    #[test]
    fn mutual_tls_refuses_a_certificate_of_another_node_and_takes_its_own() {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(pki_dir.path(), &["node-00", "node-01"]);
        let mut c = Cluster::start_tls(
            &format!("enroll_secret = {SECRET:?}\n{}", pki.runner_toml(true)),
            Some(&pki.ca),
        );
        // node-00 with its own certificate.
        c.add_agent(AgentSpec {
            extra: pki.agent_args("node-00", true),
            ..AgentSpec::default()
        });
        c.wait_enrolled();
        // node-01 presents node-00's certificate (and has the secret).
        let thief = c.add_agent(AgentSpec {
            extra: pki.agent_args("node-00", true),
            ..AgentSpec::default()
        });
        assert_eq!(c.agents[thief].id, "node-01");
        let log = c.path().join(format!("{}.log", c.agents[thief].id));
        wait_for("node-01 to be refused", Duration::from_secs(20), || {
            let text = fs::read_to_string(&log).ok()?;
            text.contains("403").then_some(text)
        });
        let text = fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(
                "the client certificate names node node-00; it cannot act for node node-01"
            ),
            "{text}"
        );
        // The management API (token-authenticated) needs no client certificate.
        let nodes = c.api.get("/v1/nodes");
        let ids: Vec<&str> = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["node-00"], "node-01 is not enrolled");

        // node-00's own certificate carries a whole rollout (work, reports,
        // the artifact download).
        c.release("1.1.0", 0);
        let task = c.task("mtls-e2e", "1.1.0", json!({}));
        let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
        assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 1)]));
        assert_eq!(current(&c.agents[0].dir).as_deref(), Some("1.1.0"));
    }

    #[test]
    fn sighup_reloads_the_certificate_on_the_same_listener_and_a_bad_file_keeps_the_old_one() {
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(pki_dir.path(), &[]);
        let (next_cert, next_key) = pki.server_cert("next");
        let live_cert = pki.dir.join("live.crt");
        let live_key = pki.dir.join("live.key");
        fs::copy(&pki.cert, &live_cert).unwrap();
        fs::copy(&pki.key, &live_key).unwrap();
        let mut c = Cluster::start_tls(
            &format!("tls = {{ cert = {live_cert:?}, key = {live_key:?} }}\n"),
            Some(&pki.ca),
        );
        let url = c.url();
        assert_eq!(served_cert(&url, &pki.ca), Some(pki.der("runner")));
        let pid = c.runner.as_ref().unwrap().child.as_ref().unwrap().id();

        // A connection opened before the reload.
        let before = Api::with_ca(url.clone(), Some(&pki.ca));
        before.get("/healthz");

        fs::copy(&next_cert, &live_cert).unwrap();
        fs::copy(&next_key, &live_key).unwrap();
        c.runner
            .as_ref()
            .unwrap()
            .signal(nix::sys::signal::Signal::SIGHUP);
        wait_for(
            "the new certificate to be served",
            Duration::from_secs(10),
            || (served_cert(&url, &pki.ca)? == pki.der("next")).then_some(()),
        );
        // The same process and listener; the earlier connection still works.
        assert_eq!(c.runner.as_ref().unwrap().child.as_ref().unwrap().id(), pid);
        before.get("/healthz");

        // A broken file: logged, and the certificate in force stays.
        fs::write(&live_cert, "not a certificate").unwrap();
        c.runner
            .as_ref()
            .unwrap()
            .signal(nix::sys::signal::Signal::SIGHUP);
        let log = c.path().join("runner.log");
        wait_for(
            "the failed reload to be logged",
            Duration::from_secs(10),
            || {
                let text = fs::read_to_string(&log).ok()?;
                text.contains("TLS not reloaded").then_some(())
            },
        );
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("no `BEGIN CERTIFICATE`"), "{text}");
        assert_eq!(served_cert(&url, &pki.ca), Some(pki.der("next")));
        assert!(
            c.runner
                .as_mut()
                .unwrap()
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_none(),
            "the runner is still up"
        );
    }
}

// Signed releases and remote downgrades (issue 14), on the helpers above.
mod signed;

// Agents over an MQTT broker (issue 19), on the helpers above; its
// broker also serves all/hardening_faults.rs.
pub(crate) mod mqtt;
