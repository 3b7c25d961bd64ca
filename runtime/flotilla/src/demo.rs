//! `flotilla demo`: a runner and N agents as real processes on loopback, one
//! canary rollout through the HTTP API, shown live.
//!
//! Everything lives in one directory: `runner/` (the runner's data),
//! `agents/<node>/` (each agent's state dir), `logs/` (every child's output),
//! the release artifact and the configs. Children are this executable
//! (`serve`, `agent`); they are stopped (SIGTERM, SIGKILL after 5 s) when the
//! demo ends, fails or is interrupted. `--keep` leaves them running until
//! Ctrl-C so the API can be explored.

use anyhow::{Context as _, bail};
use clap::Args;
use flotilla_model::{NodeRun, RunState};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many agents (nodes) to start, 1-200.
    #[arg(long, default_value_t = 20)]
    pub agents: usize,
    /// Directory for the runner's data, the agents' state and the logs
    /// (new or empty) [default: a new directory under the system temp dir].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the runner and the agents running after the rollout, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

const PACKAGE: &str = "demo-app";
const FROM: &str = "1.0.0";
const TO: &str = "1.1.0";
/// Writes a file into the new release and logs the step in the node's dir.
const INSTALL: &str = r#"sleep 0.3 && echo "$FLOTILLA_VERSION installed on $FLOTILLA_NODE_ID" > installed.txt && echo "$FLOTILLA_ACTION $FLOTILLA_VERSION" >> "$FLOTILLA_STATE_DIR/installs.log""#;
/// The release's files are there and the install left its mark.
const HEALTH: &str = r#"test -x bin/app && test -s installed.txt"#;

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(1..=200).contains(&args.agents) {
        bail!("--agents must be between 1 and 200");
    }
    let dir = prepare_dir(args.dir.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut children = Children::default();
    let result = rt.block_on(async {
        tokio::select! {
            r = demo(&args, &dir, &mut children) => r,
            () = interrupted() => {
                outln!("\nInterrupted; stopping the runner and the agents.");
                Ok(ExitCode::from(130))
            }
        }
    });
    children.stop_all();
    if let Err(e) = &result {
        outln!(
            "\nThe demo failed: {e:#}\nLogs: {}",
            dir.join("logs").display()
        );
    } else if !args.keep {
        outln!(
            "\nStopped the runner and {} agents (--keep leaves them running to explore the API).",
            args.agents
        );
    }
    result
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The demo directory: new, or given and empty.
fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => {
            if d.exists() && fs::read_dir(d)?.next().is_some() {
                bail!(
                    "{} is not empty; give a new or empty directory (the demo creates runner/, agents/ and logs/ in it)",
                    d.display()
                );
            }
            d.to_path_buf()
        }
        None => std::env::temp_dir().join(format!("flotilla-demo-{}", random_hex(4))),
    };
    fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(std::path::absolute(&dir)?)
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Every child the demo started; stopped on drop too.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
        let out = fs::File::create(log).with_context(|| log.display().to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    /// Fails when a child has exited (the demo cannot go on without it).
    fn check(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                bail!("{name} exited early ({status}); see its log");
            }
        }
        Ok(())
    }

    /// SIGTERM to all, then SIGKILL whatever still runs after 5 s.
    fn stop_all(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // Agents first, so none of them reports to a runner that is gone.
        for (_, c) in self.0.iter().rev() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, mut c) in self.0.drain(..) {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        tracing::warn!("{name} did not stop within 5 s; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("{what}: the runner is unreachable"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{what}: the runner answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base)), path)
            .await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(
            self.http.post(format!("{}{path}", self.base)).json(&body),
            path,
        )
        .await
    }
}

async fn demo(args: &DemoArgs, dir: &Path, children: &mut Children) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let logs = dir.join("logs");
    let data = dir.join("runner");
    let secret = random_hex(16);
    let config = dir.join("runner.toml");
    fs::write(
        &config,
        format!(
            "# Written by `flotilla demo`.\nlisten = \"127.0.0.1:0\"\ndata = {:?}\ntick_ms = 100\noffline_after_seconds = 10\nenroll_secret = {secret:?}\n",
            data.display().to_string()
        ),
    )?;

    // The runner, on a free port; it says where on stdout.
    let out = logs.join("runner.out");
    let out_file = fs::File::create(&out)?;
    let err_file = fs::File::create(logs.join("runner.log"))?;
    let runner = Command::new(&exe)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FLOTILLA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .context("cannot start the runner")?;
    children.0.push(("the runner".into(), runner));
    let url = poll(
        "the runner to listen",
        Duration::from_secs(30),
        children,
        || {
            let text = fs::read_to_string(&out).ok()?;
            let rest = text.split("listening on ").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        },
    )
    .await?;
    outln!("Runner  {url}  (data in {})", data.display());

    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: url.clone(),
    };

    // The agents, each on release FROM as if installed earlier.
    let zones = ["north", "south", "east"];
    for i in 1..=args.agents {
        let id = format!("node-{i:02}");
        let state = dir.join("agents").join(&id);
        seed(&state, FROM)?;
        let mut cmd = Command::new(&exe);
        cmd.arg("agent")
            .args(["--server", &url, "--node-id", &id, "--state-dir"])
            .arg(&state)
            .args([
                "--heartbeat",
                "1",
                "--wait",
                "10",
                "--command-timeout",
                "30",
            ])
            .args(["--install-command", INSTALL, "--health-command", HEALTH])
            .arg("--label")
            .arg(format!("zone={}", zones[i % zones.len()]))
            .env("FLOTILLA_ENROLL_SECRET", &secret)
            .env("FLOTILLA_LOG", "info");
        children.spawn(&id, &mut cmd, &logs.join(format!("{id}.log")))?;
    }
    let n = args.agents;
    let started = Instant::now();
    let mut last = usize::MAX;
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64);
    loop {
        children.check()?;
        let nodes = api.get("/v1/nodes").await?;
        let ready = nodes["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|n| n["online"] == true && n["version"] == FROM)
                    .count()
            })
            .unwrap_or(0);
        if ready != last && !std::io::stdout().is_terminal() || ready == n {
            outln!("Agents  {ready}/{n} enrolled");
        }
        last = ready;
        if ready == n {
            break;
        }
        if Instant::now() >= deadline {
            bail!("only {ready} of {n} agents enrolled within the time allowed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    outln!(
        "        {n} agents on {FROM} in {:.1}s (state in {})",
        started.elapsed().as_secs_f64(),
        dir.join("agents").display()
    );

    // The release: a small .tar.gz, uploaded to the runner.
    let bytes = artifact(TO)?;
    let file = dir.join(format!("{PACKAGE}-{TO}.tar.gz"));
    fs::write(&file, &bytes)?;
    api.post("/v1/releases", json!({"package": PACKAGE, "version": TO}))
        .await?;
    let rec = api
        .call(
            api.http
                .put(format!("{url}/v1/releases/{PACKAGE}/{TO}/artifact"))
                .body(bytes),
            "upload",
        )
        .await?;
    outln!(
        "Release {PACKAGE} {TO}  ({} bytes, sha256 {})",
        rec["size"],
        rec["sha256"].as_str().unwrap_or("?")
    );

    let task = api
        .post(
            "/v1/tasks",
            json!({
                "name": "demo-canary",
                "description": "flotilla demo: canary rollout with the shipped canary policy",
                "package": PACKAGE,
                "target": {"version": TO},
                "policy": "canary",
                "params": {"soak_seconds": 1, "threshold": 0.2},
                "concurrency": 5,
                "node_timeout_seconds": 60,
            }),
        )
        .await?;
    let id = task["id"]
        .as_str()
        .context("the task has no id")?
        .to_string();
    outln!("Task    {id} demo-canary: {PACKAGE} -> {TO}, policy canary, 5 at a time\n");

    let rollout = Instant::now();
    let (view, runs) = watch(&api, &id, n, children).await?;

    outln!(
        "\nTask {id}: {} after {:.1}s.",
        view["state"]["state"].as_str().unwrap_or("?"),
        rollout.elapsed().as_secs_f64()
    );
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &runs {
        *counts.entry(r.state.name()).or_default() += 1;
    }
    for (state, count) in &counts {
        outln!("  {state:<24} {count}");
    }
    for r in runs.iter().filter(|r| r.state.failed()) {
        outln!("  {}: {}", r.node_id, run_detail(&r.state));
    }
    let first = dir.join("agents").join("node-01");
    outln!(
        "\nWhere things are ({})\n  runner data   {}\n  runner config {}\n  agent state   {}/<node>  (releases/, current, permanent, installs.log)\n  logs          {}\n  artifact      {}",
        dir.display(),
        data.display(),
        config.display(),
        dir.join("agents").display(),
        logs.display(),
        file.display()
    );
    outln!(
        "\nLook closer\n  flotilla agent versions --state-dir {}\n  cat {}/installs.log",
        first.display(),
        first.display()
    );
    let ok = view["state"]["state"] == "succeeded";
    if args.keep {
        outln!(
            "  curl -s {url}/v1/tasks/{id}\n  curl -s '{url}/v1/tasks/{id}/events?limit=20'\n  curl -s {url}/v1/nodes\n\n--keep: the runner ({url}) and {n} agents keep running; Ctrl-C stops them."
        );
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            children.check()?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_detail(state: &RunState) -> String {
    match state {
        RunState::FailedRolledBack { error, .. } | RunState::FailedRollbackFailed { error, .. } => {
            error.clone()
        }
        other => other.name().to_string(),
    }
}

/// Polls `f` every 100 ms (failing when a child dies) until it gives a value.
async fn poll<T>(
    what: &str,
    timeout: Duration,
    children: &mut Children,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        children.check()?;
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Shows the rollout wave by wave until the task stops moving; returns the
/// task's last view and its runs.
async fn watch(
    api: &Api,
    id: &str,
    n: usize,
    children: &mut Children,
) -> anyhow::Result<(Value, Vec<NodeRun>)> {
    let tty = std::io::stdout().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "  wave {prefix:<8} [{bar:30.green/red}] {pos:>3}/{len:<3} {msg}",
    )?
    .progress_chars("=> ");
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    let mut printed: Vec<String> = Vec::new();
    let mut last_state = String::new();
    let deadline = Instant::now() + Duration::from_secs(300 + 2 * n as u64);
    loop {
        children.check()?;
        let view = api.get(&format!("/v1/tasks/{id}")).await?;
        let page = api.get(&format!("/v1/tasks/{id}/runs?limit=10000")).await?;
        let runs: Vec<NodeRun> = serde_json::from_value(page["items"].clone())?;
        let by_node: BTreeMap<&str, &NodeRun> =
            runs.iter().map(|r| (r.node_id.as_str(), r)).collect();
        let state = view["state"]["state"].as_str().unwrap_or("?").to_string();
        let waves = view["waves"].as_array().cloned().unwrap_or_default();
        for (w, wave) in waves.iter().enumerate() {
            let name = wave["name"].as_str().unwrap_or("?");
            let nodes: Vec<&str> = wave["nodes"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let (mut done, mut failed, mut busy) = (0u64, 0, 0);
            for node in &nodes {
                match by_node.get(node).map(|r| &r.state) {
                    Some(s) if s.failed() => {
                        done += 1;
                        failed += 1;
                    }
                    Some(s) if s.finished() => done += 1,
                    Some(s) if s.in_flight() => busy += 1,
                    _ => {}
                }
            }
            let msg = match (busy, failed) {
                (0, 0) => String::new(),
                (b, 0) => format!("{b} upgrading"),
                (0, f) => format!("{f} failed"),
                (b, f) => format!("{b} upgrading, {f} failed"),
            };
            if tty {
                if bars.len() <= w {
                    let bar = multi.add(
                        indicatif::ProgressBar::new(nodes.len() as u64)
                            .with_style(style.clone())
                            .with_prefix(name.to_string()),
                    );
                    bars.push(bar);
                }
                bars[w].set_position(done);
                bars[w].set_message(msg);
            } else {
                let line = format!("  wave {name:<8} {done:>3}/{:<3} {msg}", nodes.len())
                    .trim_end()
                    .to_string();
                if printed.len() <= w {
                    printed.push(String::new());
                }
                if printed[w] != line {
                    outln!("{line}");
                    printed[w] = line;
                }
            }
        }
        if state != last_state {
            let line = match state.as_str() {
                "paused" => {
                    "  task paused (the policy stopped the rollout for a person)".to_string()
                }
                s => format!("  task {s}"),
            };
            if tty {
                multi.println(line)?;
            } else {
                outln!("{line}");
            }
            last_state = state.clone();
        }
        let stopped = matches!(
            state.as_str(),
            "succeeded" | "failed" | "cancelled" | "rolled-back" | "paused"
        ) && !runs.iter().any(|r| r.state.in_flight());
        if stopped {
            for b in &bars {
                b.finish();
            }
            return Ok((view, runs));
        }
        if Instant::now() >= deadline {
            bail!("the rollout did not finish in time (task {id} is {state})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts `version` on a node's state dir as its current, permanent release.
fn seed(state: &Path, version: &str) -> anyhow::Result<()> {
    let rel = state.join("releases").join(version);
    fs::create_dir_all(rel.join("bin"))?;
    fs::write(rel.join("VERSION"), version)?;
    write_app(&rel.join("bin/app"), version)?;
    fs::write(
        rel.join("installed.txt"),
        format!("{version} installed before the demo\n"),
    )?;
    std::os::unix::fs::symlink(Path::new("releases").join(version), state.join("current"))?;
    fs::write(state.join("permanent"), version)?;
    Ok(())
}

fn write_app(path: &Path, version: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, app_script(version))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn app_script(version: &str) -> String {
    format!("#!/bin/sh\necho \"{PACKAGE} {version}\"\n")
}

/// The release artifact: `VERSION` and an executable `bin/app`.
fn artifact(version: &str) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let script = app_script(version);
    for (path, data, mode) in [
        ("VERSION", version.as_bytes(), 0o644),
        ("bin/app", script.as_bytes(), 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, data)?;
    }
    Ok(tar.into_inner()?.finish()?)
}
