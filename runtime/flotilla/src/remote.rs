//! The verbs that talk to a running runner over its API: `flotilla task`,
//! `node`, `release`, and `policy upload|list`. Each verb is a library
//! function that returns what it would print (tests call them directly);
//! [`run`] parses nothing, it only prints and picks the exit code.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use flotilla_client::{
    Client, DEFAULT_SERVER, DryRun, NewRelease, NodeFilter, PolicyEntry, TaskAction, TaskView,
};
use flotilla_model::ReleaseRecord;
use flotilla_model::{Hook, Node, NodeRun, ReleaseKind, RunState, Task, TaskSpec, TaskState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Where the runner is and how to talk to it; accepted by every remote verb.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The runner's URL.
    #[arg(long, env = "FLOTILLA_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// The management token, when the runner has one.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the server's JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// A PEM file of CA certificates trusted for the runner's TLS
    /// certificate, beside the built-in public roots (a private CA).
    #[arg(long, env = "FLOTILLA_CA_FILE", value_name = "PATH", global = true)]
    pub ca_file: Option<PathBuf>,
}

impl Remote {
    pub fn client(&self) -> anyhow::Result<Client> {
        let ca =
            match &self.ca_file {
                Some(p) => Some(std::fs::read(p).with_context(|| {
                    format!("cannot read the CA file (--ca-file) {}", p.display())
                })?),
                None => None,
            };
        Ok(Client::with_ca(
            &self.server,
            self.token.clone(),
            ca.as_deref(),
        )?)
    }
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: TaskCommand,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task from a spec (JSON or YAML; `-` reads stdin).
    Create {
        file: PathBuf,
        /// Simulate on the runner's current inventory and show the plan; create nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List tasks.
    List {
        /// Only tasks in this state (scheduled, running, paused, succeeded, failed, ...).
        #[arg(long)]
        state: Option<String>,
    },
    /// A task: its state, waves with progress, and node counts per state.
    Show { id: String },
    /// A task's node runs (`--state succeeded`, `--state failed` for every failure).
    Runs {
        id: String,
        #[arg(long)]
        state: Option<String>,
    },
    /// A task's event log.
    Events {
        id: String,
        /// Keep printing new events until the task ends.
        #[arg(long)]
        follow: bool,
    },
    /// Stop starting new nodes (running ones finish).
    Pause(ControlArgs),
    /// Continue a paused task.
    Resume(ControlArgs),
    /// Start a wave that waits for approval.
    Promote(ControlArgs),
    /// Cancel a task: nodes that have not started are left alone.
    Cancel(ControlArgs),
    /// Put the previous release back on every node the task upgraded.
    Rollback(ControlArgs),
    /// Live progress, a bar per wave, until the task ends (exit 0 only if it succeeded).
    Watch {
        id: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    pub id: String,
    /// Recorded in the task's event log.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes in the runner's inventory.
    List {
        /// Only nodes with this label (repeatable; all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Only nodes on this version (`v1.13` = `1.13`).
        #[arg(long)]
        version: Option<String>,
        /// Only online (true) or offline (false) nodes.
        #[arg(long)]
        online: Option<bool>,
        /// Only healthy (true) or unhealthy (false) nodes.
        #[arg(long)]
        healthy: Option<bool>,
    },
    /// Issue a one-time token that enrolls node ID (and no other) once; the
    /// agent gives it as its enrollment secret. The stronger alternative to
    /// a fleet-wide secret.
    Token {
        id: String,
        /// How long it is valid (`30m`, `24h`, `7d`; at most 30 days).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
    /// Allow the enrolled node ID to enroll once more with the enrollment
    /// secret (a node rebuilt without its token). Without this, enrolling an
    /// enrolled id is refused.
    Reenroll {
        id: String,
        /// How long the allowance lasts (at most 30 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a management token (admin only). Its secret is printed once;
    /// the runner keeps only its SHA-256.
    Create {
        name: String,
        /// read (GET only), operate (tasks) or admin (everything).
        #[arg(long, value_parser = ["read", "operate", "admin"])]
        role: String,
    },
    /// The runner's management tokens: names, roles, when made and last used.
    List,
    /// Revoke a token made with `token create` (config tokens are removed
    /// from the config).
    Revoke { name: String },
    /// Read a token on stdin and print its SHA-256, for `[[tokens]]` in the
    /// runner's config. Talks to no runner.
    Digest,
}

/// `flotilla audit`: the runner's audit log (admin only).
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// How many records (the newest, or the first after --after).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Records after this sequence number (0: from the oldest kept).
    #[arg(long)]
    pub after: Option<u64>,
}

/// A `--label` that is not `KEY=VALUE` (clap shows it as the reason).
#[derive(Debug)]
struct NotKeyValue(String);

impl std::fmt::Display for NotKeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: expected KEY=VALUE", self.0)
    }
}

impl std::error::Error for NotKeyValue {}

fn key_value(s: &str) -> Result<(String, String), NotKeyValue> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(NotKeyValue(s.to_string())),
    }
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub remote: Remote,
    #[command(subcommand)]
    pub command: ReleaseCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Register a release and upload its artifact (or point at its URL).
    Add(ReleaseAdd),
    /// List releases.
    List {
        #[arg(long)]
        package: Option<String>,
    },
    /// Sign an artifact as a release with a minisign secret key: writes
    /// ARTIFACT.minisig with the trusted comment
    /// `flotilla-release package=P version=V sha256=H size=N`. Offline.
    Sign(ReleaseSign),
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseSign {
    /// The minisign secret key (`minisign -G` makes one). An encrypted key's
    /// password comes from FLOTILLA_SIGN_PASSWORD, else it is asked for.
    #[arg(long)]
    pub key: PathBuf,
    /// The artifact to sign.
    pub artifact: PathBuf,
    #[arg(long)]
    pub package: String,
    #[arg(long)]
    pub version: String,
    /// Where the signature goes [default: ARTIFACT.minisig].
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReleaseKindArg {
    Full,
    Patch,
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseAdd {
    #[arg(long)]
    pub package: String,
    #[arg(long)]
    pub version: String,
    /// The artifact to upload; the runner computes its sha256 and size.
    #[arg(long, required_unless_present = "url", conflicts_with_all = ["url", "sha256", "size"])]
    pub file: Option<PathBuf>,
    /// Where agents download the artifact instead (needs --sha256 and --size).
    #[arg(long, requires_all = ["sha256", "size"])]
    pub url: Option<String>,
    #[arg(long, requires = "url")]
    pub sha256: Option<String>,
    #[arg(long, requires = "url")]
    pub size: Option<u64>,
    #[arg(long, value_enum, default_value_t = ReleaseKindArg::Full)]
    pub kind: ReleaseKindArg,
    /// The artifact's minisign signature (a .minisig file, from
    /// `flotilla release sign` or `minisign -S -t ...`).
    #[arg(long, value_name = "FILE.minisig")]
    pub signature: Option<PathBuf>,
}

/// `flotilla policy upload NAME FILE`.
#[derive(Debug, Args)]
pub struct PolicyUpload {
    /// The name tasks refer to it by.
    pub name: String,
    /// A `.wasm` component or a `.rhai` script.
    pub file: PathBuf,
    #[command(flatten)]
    pub remote: Remote,
}

/// `flotilla policy list`.
#[derive(Debug, Args)]
pub struct PolicyList {
    #[command(flatten)]
    pub remote: Remote,
}

// ----- running the verbs -----

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print(text: &str) {
    if !text.is_empty() {
        outln!("{}", text.trim_end_matches('\n'));
    }
}

pub fn run_task(args: TaskArgs) -> anyhow::Result<ExitCode> {
    let c = args.remote.client()?;
    let json = args.remote.json;
    runtime()?.block_on(async move {
        let text = match args.command {
            TaskCommand::Create { file, dry_run } => {
                let spec = read_spec(&file)?;
                task_create(&c, &spec, dry_run, json).await?
            }
            TaskCommand::List { state } => task_list(&c, state.as_deref(), json).await?,
            TaskCommand::Show { id } => task_show(&c, &id, json).await?,
            TaskCommand::Runs { id, state } => task_runs(&c, &id, state.as_deref(), json).await?,
            TaskCommand::Events { id, follow: false } => task_events(&c, &id, json).await?,
            TaskCommand::Events { id, follow: true } => {
                follow_events(&c, &id, json, Duration::from_secs(1), None, &mut |l| {
                    print(&l)
                })
                .await?;
                String::new()
            }
            TaskCommand::Pause(a) => control(&c, TaskAction::Pause, &a, json).await?,
            TaskCommand::Resume(a) => control(&c, TaskAction::Resume, &a, json).await?,
            TaskCommand::Promote(a) => control(&c, TaskAction::Promote, &a, json).await?,
            TaskCommand::Cancel(a) => control(&c, TaskAction::Cancel, &a, json).await?,
            TaskCommand::Rollback(a) => control(&c, TaskAction::Rollback, &a, json).await?,
            TaskCommand::Watch { id, interval } => {
                if !(0.05..=3600.0).contains(&interval) {
                    bail!("--interval must be between 0.05 and 3600 seconds");
                }
                let opts = WatchOptions {
                    interval: Duration::from_secs_f64(interval),
                    bars: std::io::stderr().is_terminal(),
                    timeout: None,
                };
                let view = watch(&c, &id, &opts, &mut |l| eprintln!("{l}")).await?;
                print(&if json {
                    serde_json::to_string_pretty(&view)?
                } else {
                    task_headline(&view.task)
                });
                return Ok(if view.task.state == TaskState::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
        };
        print(&text);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let c = args.remote.client()?;
    let json = args.remote.json;
    runtime()?.block_on(async move {
        let text = match args.command {
            NodeCommand::List {
                labels,
                version,
                online,
                healthy,
            } => {
                let filter = NodeFilter {
                    labels,
                    version,
                    online,
                    healthy,
                };
                node_list(&c, &filter, json).await?
            }
            NodeCommand::Token { id, expires } => node_token(&c, &id, expires, json).await?,
            NodeCommand::Reenroll { id, expires } => node_reenroll(&c, &id, expires, json).await?,
        };
        print(&text);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_release(args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    if let ReleaseCommand::Sign(sign) = &args.command {
        print(&release_sign(sign)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = args.remote.client()?;
    let json = args.remote.json;
    runtime()?.block_on(async move {
        let text = match args.command {
            ReleaseCommand::Add(add) => {
                let bar = !json && std::io::stderr().is_terminal();
                release_add(&c, &add, bar, json).await?
            }
            ReleaseCommand::List { package } => release_list(&c, package.as_deref(), json).await?,
            ReleaseCommand::Sign(_) => unreachable!("signing is offline, handled above"),
        };
        print(&text);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    if let TokenCommand::Digest = args.command {
        let text = std::io::read_to_string(std::io::stdin()).context("reading stdin")?;
        print(&token_digest(&text)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = args.remote.client()?;
    let json = args.remote.json;
    runtime()?.block_on(async move {
        let text = match args.command {
            TokenCommand::Create { name, role } => token_create(&c, &name, &role, json).await?,
            TokenCommand::List => token_list(&c, json).await?,
            TokenCommand::Revoke { name } => token_revoke(&c, &name, json).await?,
            TokenCommand::Digest => unreachable!("handled above"),
        };
        print(&text);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let c = args.remote.client()?;
    let json = args.remote.json;
    runtime()?.block_on(async move {
        print(&audit(&c, args.after, args.limit, json).await?);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_policy_upload(args: PolicyUpload) -> anyhow::Result<ExitCode> {
    let c = args.remote.client()?;
    runtime()?.block_on(async move {
        // The runner compiles a new component before it answers.
        let progress = super::policy::Progress::start(
            format!(
                "uploading {}: the runner compiles a new component before it answers \
                 (10 s and more for an interpreter-based one)...",
                args.file.display()
            ),
            false,
        );
        let uploaded = policy_upload(&c, &args.name, &args.file, args.remote.json).await;
        drop(progress);
        print(&uploaded?);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_policy_list(args: PolicyList) -> anyhow::Result<ExitCode> {
    let c = args.remote.client()?;
    runtime()?.block_on(async move {
        print(&policy_list(&c, args.remote.json).await?);
        Ok(ExitCode::SUCCESS)
    })
}

// ----- tasks -----

/// Reads a task spec: JSON, or YAML when it does not parse as JSON; `-` is stdin.
pub fn read_spec(path: &Path) -> anyhow::Result<TaskSpec> {
    let (text, name) = if path == Path::new("-") {
        (
            std::io::read_to_string(std::io::stdin())
                .context("reading the task spec from stdin")?,
            "stdin".to_string(),
        )
    } else {
        (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        )
    };
    parse_spec(&text).with_context(|| format!("{name} is not a task spec"))
}

/// Parses a task spec from JSON or YAML text.
pub fn parse_spec(text: &str) -> anyhow::Result<TaskSpec> {
    if text.trim_start().starts_with('{') {
        Ok(serde_json::from_str(text)?)
    } else {
        Ok(serde_saphyr::from_str(text)?)
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)?)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

/// `task create`: creates the task, or with `dry_run` shows what would happen.
pub async fn task_create(
    c: &Client,
    spec: &TaskSpec,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<String> {
    if dry_run {
        let plan = c.dry_run(spec).await?;
        return if json {
            to_json(&plan)
        } else {
            Ok(render_dry_run(spec, &plan))
        };
    }
    let task = c.create_task(spec).await?;
    if json {
        return to_json(&task);
    }
    Ok(format!(
        "created task {} ({}): {}\nfollow it with `flotilla task watch {}`",
        task.id, task.spec.name, task.state, task.id
    ))
}

/// The plan of a dry run: waves with their sizes, then the final counts.
pub fn render_dry_run(spec: &TaskSpec, plan: &DryRun) -> String {
    let mut out = format!(
        "dry run of {} ({} to {}): {} wave{}, would end {}\n",
        spec.name,
        spec.package,
        target_text(&spec.target),
        plan.waves.len(),
        if plan.waves.len() == 1 { "" } else { "s" },
        plan.final_state
    );
    let mut t = table(&["wave", "name", "nodes", "concurrency", "soak", "approval"]);
    for (i, w) in plan.waves.iter().enumerate() {
        t.add_row(vec![
            (i + 1).to_string(),
            w.name.clone(),
            w.nodes.len().to_string(),
            match w.concurrency {
                0 if spec.concurrency == 0 => "unbounded".to_string(),
                0 => spec.concurrency.to_string(),
                n => n.to_string(),
            },
            if w.soak_seconds == 0 {
                "-".into()
            } else {
                humantime::format_duration(Duration::from_secs(w.soak_seconds)).to_string()
            },
            if w.needs_approval { "needed" } else { "-" }.into(),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out.push_str(&counts_table(&plan.counts));
    if !plan.note.is_empty() {
        out.push_str(&format!("\nnote: {}", plan.note));
    }
    out
}

fn target_text(t: &flotilla_model::Target) -> String {
    match t {
        flotilla_model::Target::Version(v) => v.clone(),
        flotilla_model::Target::ControlPlane(c) => format!("the {c} version"),
    }
}

fn counts_table(counts: &BTreeMap<String, usize>) -> String {
    let mut t = table(&["state", "nodes"]);
    for (state, n) in counts {
        t.add_row(vec![state.clone(), n.to_string()]);
    }
    let total: usize = counts.values().sum();
    t.add_row(vec!["total".to_string(), total.to_string()]);
    t.to_string()
}

/// `task list`.
pub async fn task_list(c: &Client, state: Option<&str>, json: bool) -> anyhow::Result<String> {
    let tasks = c.tasks(state).await?;
    if json {
        return to_json(&tasks);
    }
    if tasks.is_empty() {
        return Ok(match state {
            Some(s) => format!("no {s} tasks"),
            None => "no tasks".into(),
        });
    }
    let now = now_ms();
    let mut t = table(&[
        "id", "name", "package", "target", "state", "wave", "updated",
    ]);
    for task in &tasks {
        t.add_row(vec![
            task.id.clone(),
            task.name.clone(),
            task.package.clone(),
            task.target_version.clone().unwrap_or_else(|| "-".into()),
            state_text(&task.state, task.awaiting_approval),
            if task.waves == 0 {
                "-".into()
            } else {
                format!(
                    "{}/{}",
                    (task.current_wave as usize + 1).min(task.waves),
                    task.waves
                )
            },
            ago(now, task.updated_at),
        ]);
    }
    Ok(t.to_string())
}

fn state_text(s: &TaskState, awaiting_approval: bool) -> String {
    let base = match s {
        TaskState::Paused(r) | TaskState::Failed(r) | TaskState::RollingBack(r)
            if !r.is_empty() =>
        {
            format!("{} ({r})", s.name())
        }
        _ => s.name().to_string(),
    };
    if awaiting_approval && s.active() {
        format!("{base}, awaiting promote")
    } else {
        base
    }
}

/// Progress of one wave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaveProgress {
    pub name: String,
    pub total: usize,
    /// Finished one way or another (succeeded, failed, skipped, cancelled, rolled back).
    pub done: usize,
    pub failed: usize,
    pub succeeded: usize,
}

/// Per-wave progress from each node's latest state name (`succeeded`,
/// `failed-rolled-back`, ...).
pub fn wave_progress(task: &Task, states: &HashMap<String, String>) -> Vec<WaveProgress> {
    task.waves
        .iter()
        .map(|w| {
            let mut p = WaveProgress {
                name: w.name.clone(),
                total: w.nodes.len(),
                ..Default::default()
            };
            for n in &w.nodes {
                let Some(s) = states.get(n) else { continue };
                let failed = matches!(
                    s.as_str(),
                    "failed-rolled-back"
                        | "failed-rollback-failed"
                        | "timed-out"
                        | "unknown"
                        | "rejected"
                );
                let done = failed
                    || matches!(
                        s.as_str(),
                        "succeeded" | "skipped" | "rolled-back" | "cancelled"
                    );
                p.done += usize::from(done);
                p.failed += usize::from(failed);
                p.succeeded += usize::from(s == "succeeded");
            }
            p
        })
        .collect()
}

fn task_headline(task: &Task) -> String {
    let wave = if task.waves.is_empty() {
        String::new()
    } else {
        format!(
            ", wave {} of {}",
            (task.current_wave as usize + 1).min(task.waves.len()),
            task.waves.len()
        )
    };
    format!(
        "task {} ({}): {}{wave}",
        task.id,
        task.spec.name,
        state_text(&task.state, task.awaiting_approval)
    )
}

/// `task show`: the task, its waves with progress, and counts per state.
pub async fn task_show(c: &Client, id: &str, json: bool) -> anyhow::Result<String> {
    let view = c.task(id).await?;
    if json {
        return to_json(&view);
    }
    let runs = c.all_runs(id, None).await?;
    Ok(render_task(&view, &runs.items))
}

pub fn render_task(view: &TaskView, runs: &[NodeRun]) -> String {
    let task = &view.task;
    let now = now_ms();
    let mut out = task_headline(task);
    out.push_str(&format!(
        "\n{} to {} (policy {}), created {}, updated {}\n",
        task.spec.package,
        task.target_version
            .clone()
            .unwrap_or_else(|| target_text(&task.spec.target)),
        task.spec.policy,
        ago(now, task.created_at),
        ago(now, task.updated_at),
    ));
    if let Some(sha) = &task.policy_sha256 {
        out.push_str(&format!("policy sha256 {sha}\n"));
    }
    if task.awaiting_approval && task.state.active() {
        out.push_str(&format!(
            "wave {} waits for approval: `flotilla task promote {}`\n",
            task.current_wave + 1,
            task.id
        ));
    }
    if let Some(until) = task.soak_until
        && until > now
    {
        out.push_str(&format!(
            "soaking for {} more\n",
            humantime::format_duration(Duration::from_secs((until - now) / 1000))
        ));
    }
    if !task.waves.is_empty() {
        let states: HashMap<String, String> = runs
            .iter()
            .map(|r| (r.node_id.clone(), r.state.name().to_string()))
            .collect();
        let mut t = table(&["wave", "name", "nodes", "done", "succeeded", "failed", ""]);
        for (i, p) in wave_progress(task, &states).iter().enumerate() {
            let marker = if i as u32 == task.current_wave && task.state.active() {
                "◀ current"
            } else {
                ""
            };
            t.add_row(vec![
                (i + 1).to_string(),
                p.name.clone(),
                p.total.to_string(),
                format!("{}/{}", p.done, p.total),
                p.succeeded.to_string(),
                p.failed.to_string(),
                marker.to_string(),
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out.push_str(&counts_table(&view.counts));
    out
}

/// `task runs`: the success or failure list.
pub async fn task_runs(
    c: &Client,
    id: &str,
    state: Option<&str>,
    json: bool,
) -> anyhow::Result<String> {
    let runs = c.all_runs(id, state).await?;
    if json {
        return to_json(&runs);
    }
    if runs.items.is_empty() {
        return Ok(match state {
            Some(s) => format!("no {s} node runs in task {id}"),
            None => format!("no node runs in task {id} yet"),
        });
    }
    let now = now_ms();
    let mut t = table(&[
        "node", "state", "wave", "from", "attempts", "detail", "updated",
    ]);
    for r in &runs.items {
        t.add_row(vec![
            r.node_id.clone(),
            r.state.name().to_string(),
            r.state
                .wave()
                .map(|w| (w + 1).to_string())
                .unwrap_or_else(|| "-".into()),
            r.from_version.clone(),
            r.attempts.to_string(),
            run_detail(&r.state),
            ago(now, r.updated_at),
        ]);
    }
    Ok(format!("{t}\n{} node runs", runs.total))
}

fn run_detail(s: &RunState) -> String {
    match s {
        RunState::Skipped { reason, detail } => format!("{}: {detail}", reason.as_str()),
        RunState::FailedRolledBack { error, .. } | RunState::FailedRollbackFailed { error, .. } => {
            error.clone()
        }
        RunState::Rejected { reason, .. } => reason.clone(),
        _ => String::new(),
    }
}

fn event_line(e: &flotilla_model::Event) -> String {
    let node = e
        .node
        .as_deref()
        .map(|n| format!(" {n}"))
        .unwrap_or_default();
    format!(
        "{:>5}  {}  {:<16}{node} {}",
        e.seq,
        clock_time(e.at),
        e.kind,
        e.detail
    )
}

/// `task events`: the whole log.
pub async fn task_events(c: &Client, id: &str, json: bool) -> anyhow::Result<String> {
    let mut events = Vec::new();
    let mut from = 0;
    // Each page is at most 5000 events; a log is finite, but stay bounded.
    for _ in 0..10_000 {
        let page = c.events(id, from, 5000).await?;
        from = page.next;
        events.extend(page.events);
        if !page.more {
            break;
        }
    }
    if json {
        return to_json(&events);
    }
    Ok(events.iter().map(event_line).collect::<Vec<_>>().join("\n"))
}

/// `task events --follow`: prints events as they come (one JSON object a
/// line with `json`) until the task ends or `timeout` passes.
pub async fn follow_events(
    c: &Client,
    id: &str,
    json: bool,
    interval: Duration,
    timeout: Option<Duration>,
    out: &mut dyn FnMut(String),
) -> anyhow::Result<Task> {
    let start = Instant::now();
    let mut from = 0;
    loop {
        let task = c.task(id).await?.task;
        loop {
            let page = c.events(id, from, 5000).await?;
            from = page.next;
            for e in &page.events {
                out(if json {
                    serde_json::to_string(e)?
                } else {
                    event_line(e)
                });
            }
            if !page.more {
                break;
            }
        }
        if !task.state.active() {
            return Ok(task);
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            bail!(
                "task {id} is still {} after {:?}",
                task.state,
                start.elapsed()
            );
        }
        tokio::time::sleep(interval).await;
    }
}

/// `task pause|resume|promote|cancel|rollback`.
pub async fn control(
    c: &Client,
    action: TaskAction,
    args: &ControlArgs,
    json: bool,
) -> anyhow::Result<String> {
    let task = c.control(&args.id, action, args.reason.as_deref()).await?;
    if json {
        return to_json(&task);
    }
    Ok(task_headline(&task))
}

/// How `task watch` shows progress.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub interval: Duration,
    /// Progress bars on stderr; otherwise plain lines to the sink.
    pub bars: bool,
    /// Give up (an error) after this long; `None` = until the task ends.
    pub timeout: Option<Duration>,
}

/// `task watch`: follows a task until it is no longer active and returns
/// its final view. Progress goes to bars on stderr or, without `bars`, as
/// lines to `out` (events, and each wave's progress when it changes).
pub async fn watch(
    c: &Client,
    id: &str,
    opts: &WatchOptions,
    out: &mut dyn FnMut(String),
) -> anyhow::Result<TaskView> {
    let start = Instant::now();
    let multi = MultiProgress::with_draw_target(if opts.bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:<24} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut last: Vec<WaveProgress> = Vec::new();
    let mut states: HashMap<String, String> = HashMap::new();
    let mut from = 0;
    let say = |line: String, out: &mut dyn FnMut(String)| {
        if opts.bars {
            let _ = multi.println(line);
        } else {
            out(line);
        }
    };
    loop {
        let view = c.task(id).await?;
        loop {
            let page = c.events(id, from, 5000).await?;
            from = page.next;
            for e in page.events {
                match (&e.node, e.kind.strip_prefix("node.")) {
                    (Some(node), Some(state)) => {
                        states.insert(node.clone(), state.to_string());
                    }
                    _ => say(event_line(&e), out),
                }
            }
            if !page.more {
                break;
            }
        }
        let progress = wave_progress(&view.task, &states);
        for (i, p) in progress.iter().enumerate() {
            if bars.len() <= i {
                let bar = multi.add(ProgressBar::new(p.total as u64));
                bar.set_style(style.clone());
                bar.set_prefix(format!("wave {} {}", i + 1, p.name));
                bars.push(bar);
            }
            let bar = &bars[i];
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            let mut msg = Vec::new();
            if p.failed > 0 {
                msg.push(format!("{} failed", p.failed));
            }
            if i as u32 == view.task.current_wave && view.task.state.active() {
                msg.push(match &view.task.state {
                    TaskState::Paused(_) => "paused".to_string(),
                    _ if view.task.awaiting_approval => "awaiting promote".to_string(),
                    _ => "◀".to_string(),
                });
            }
            bar.set_message(msg.join(", "));
            if !opts.bars && last.get(i) != Some(p) {
                out(format!(
                    "wave {} {}: {}/{} done, {} failed",
                    i + 1,
                    p.name,
                    p.done,
                    p.total,
                    p.failed
                ));
            }
        }
        last = progress;
        if !view.task.state.active() {
            for b in &bars {
                b.abandon();
            }
            return Ok(view);
        }
        if opts.timeout.is_some_and(|t| start.elapsed() >= t) {
            for b in &bars {
                b.abandon();
            }
            bail!(
                "task {id} is still {} after {:?}",
                view.task.state,
                start.elapsed()
            );
        }
        tokio::time::sleep(opts.interval).await;
    }
}

// ----- nodes -----

/// `node list`.
pub async fn node_list(c: &Client, filter: &NodeFilter, json: bool) -> anyhow::Result<String> {
    let page = c.nodes(filter).await?;
    if json {
        return to_json(&page);
    }
    Ok(render_nodes(&page.items, page.total, now_ms()))
}

/// `node token ID [--expires 24h]`.
pub async fn node_token(
    c: &Client,
    id: &str,
    expires: Duration,
    json: bool,
) -> anyhow::Result<String> {
    let t = c.enroll_token(id, expires).await?;
    if json {
        return to_json(&t);
    }
    Ok(format!(
        "Enrollment token for node {} (works once, until {} UTC):\n{}\n\
         The agent gives it as its enrollment secret (--enroll-secret or FLOTILLA_ENROLL_SECRET).",
        t.node_id,
        clock_time(t.expires_at),
        t.token
    ))
}

/// `node reenroll ID [--expires 1h]`.
pub async fn node_reenroll(
    c: &Client,
    id: &str,
    expires: Duration,
    json: bool,
) -> anyhow::Result<String> {
    let r = c.allow_reenroll(id, expires).await?;
    if json {
        return to_json(&r);
    }
    Ok(format!(
        "Node {} may enroll once more, with the enrollment secret, until {} UTC.",
        r.node_id,
        clock_time(r.expires_at)
    ))
}

// ----- tokens and the audit log -----

/// `token digest`: the SHA-256 the runner's `[[tokens]]` lists for `text`
/// (surrounding whitespace, as a trailing newline, is not part of a token).
pub fn token_digest(text: &str) -> anyhow::Result<String> {
    let t = text.trim();
    if t.is_empty() {
        bail!("no token on stdin");
    }
    Ok(flotilla_server::access::token_digest(t))
}

/// `token create NAME --role R`.
pub async fn token_create(
    c: &Client,
    name: &str,
    role: &str,
    json: bool,
) -> anyhow::Result<String> {
    let t = c.create_token(name, role).await?;
    if json {
        return to_json(&t);
    }
    Ok(format!(
        "Token {} (role {}), shown only this once:\n{}\n\
         Callers pass it as --token or FLOTILLA_TOKEN; revoke it with `flotilla token revoke {}`.",
        t.name, t.role, t.token, t.name
    ))
}

/// `token list`.
pub async fn token_list(c: &Client, json: bool) -> anyhow::Result<String> {
    let tokens = c.tokens().await?;
    if json {
        return to_json(&tokens);
    }
    if tokens.is_empty() {
        return Ok("no tokens: the runner's API is open (loopback only)".into());
    }
    let now = now_ms();
    let mut t = table(&["name", "role", "source", "created", "last used"]);
    for k in &tokens {
        t.add_row(vec![
            k.name.clone(),
            k.role.clone(),
            k.source.clone(),
            k.created_at.map(clock_time).unwrap_or_else(|| "-".into()),
            k.last_used
                .map(|u| ago(now, u))
                .unwrap_or_else(|| "never".into()),
        ]);
    }
    Ok(t.to_string())
}

/// `token revoke NAME`.
pub async fn token_revoke(c: &Client, name: &str, json: bool) -> anyhow::Result<String> {
    let t = c.revoke_token(name).await?;
    if json {
        return to_json(&t);
    }
    Ok(format!("Token {} (role {}) revoked.", t.name, t.role))
}

/// `audit [--after N] [--limit N]`.
pub async fn audit(
    c: &Client,
    after: Option<u64>,
    limit: usize,
    json: bool,
) -> anyhow::Result<String> {
    let page = c.audit(after, limit).await?;
    if json {
        return to_json(&page);
    }
    if page.items.is_empty() {
        return Ok("no audit records".into());
    }
    let mut t = table(&["seq", "time (UTC)", "who", "call", "object", "outcome"]);
    for r in &page.items {
        let outcome = match (&r.status, &r.reason) {
            (Some(s), Some(why)) => format!("{s} {}: {why}", r.outcome),
            (Some(s), None) => format!("{s} {}", r.outcome),
            (None, _) => r.outcome.clone(),
        };
        t.add_row(vec![
            r.seq.to_string(),
            clock_time(r.at),
            r.who.clone(),
            format!("{} {}", r.method, r.path),
            r.object.clone().unwrap_or_else(|| "-".into()),
            outcome,
        ]);
    }
    let mut out = t.to_string();
    if page.more {
        out.push_str(&format!("\nmore: flotilla audit --after {}", page.next));
    }
    Ok(out)
}

pub fn render_nodes(nodes: &[Node], total: usize, now: u64) -> String {
    if nodes.is_empty() {
        return "no nodes match".into();
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let mut t = table(&["id", "version", "online", "healthy", "labels", "last seen"]);
    for n in nodes {
        t.add_row(vec![
            n.id.clone(),
            n.version.clone(),
            yes_no(n.online),
            yes_no(n.healthy),
            n.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            ago(now, n.last_seen),
        ]);
    }
    let mut out = t.to_string();
    if total > nodes.len() {
        out.push_str(&format!("\n{} of {total} nodes shown", nodes.len()));
    }
    out
}

// ----- releases -----

/// `release add`: registers the release, then streams the file to the
/// runner (a progress bar on stderr with `bar`).
pub async fn release_add(
    c: &Client,
    add: &ReleaseAdd,
    bar: bool,
    json: bool,
) -> anyhow::Result<String> {
    let signature = match &add.signature {
        Some(path) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("reading the signature {}", path.display()))?;
            if meta.len() > flotilla_model::signing::MAX_SIGNATURE_BYTES as u64 {
                bail!(
                    "{} is {} bytes, not a minisign signature",
                    path.display(),
                    meta.len()
                );
            }
            Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the signature {}", path.display()))?,
            )
        }
        None => None,
    };
    // Open first: a missing file must not leave a release without an artifact.
    let file = match &add.file {
        Some(path) => {
            let f = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let len = f.metadata().await?.len();
            if len == 0 {
                bail!("{} is empty", path.display());
            }
            Some((f, len))
        }
        None => None,
    };
    let rec = c
        .create_release(&NewRelease {
            package: add.package.clone(),
            version: add.version.clone(),
            kind: match add.kind {
                ReleaseKindArg::Full => ReleaseKind::Full,
                ReleaseKindArg::Patch => ReleaseKind::Patch,
            },
            url: add.url.clone(),
            sha256: add.sha256.clone(),
            size: add.size,
            signature,
        })
        .await?;
    let rec = match file {
        Some((f, len)) => {
            // Small files upload in a blink; a bar only for the big ones.
            let progress = if bar && len >= 8 << 20 {
                let b = ProgressBar::new(len);
                b.set_style(
                    ProgressStyle::with_template(
                        "uploading [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            } else {
                ProgressBar::hidden()
            };
            let body = reqwest::Body::wrap_stream(file_stream(f, progress.clone()));
            let uploaded = c
                .upload_artifact(&rec.package, &rec.version, body, Some(len))
                .await;
            progress.finish_and_clear();
            uploaded.with_context(|| {
                format!(
                    "release {} {} is registered but its artifact did not upload; publish a new version",
                    rec.package, rec.version
                )
            })?
        }
        None => rec,
    };
    if json {
        return to_json(&rec);
    }
    Ok(format!(
        "release {} {} ({}): {} bytes, sha256 {}{}",
        rec.package,
        rec.version,
        kind_text(rec.kind),
        rec.size,
        rec.sha256,
        rec.url
            .as_deref()
            .map(|u| format!(", served from {u}"))
            .unwrap_or_default()
    ))
}

/// `release sign`: a minisign signature whose trusted comment binds the
/// artifact to the release (package, version, sha256, size).
pub fn release_sign(args: &ReleaseSign) -> anyhow::Result<String> {
    // The version as the runner stores it (`1.2` is `1.2.0`): the trusted
    // comment is compared with that.
    let version = flotilla_version::parse(&args.version)
        .map_err(|e| anyhow::anyhow!("version {:?}: {e}", args.version))?
        .to_string();
    flotilla_model::check_name("package", &args.package)?;
    let text = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading the secret key {}", args.key.display()))?;
    // The minisign 0.11 CLI writes a password-less key (`-G -W`) with a
    // zero checksum, which the crate's box reader refuses as corrupted: such
    // a key (no KDF) is read as its bytes.
    let raw = text
        .lines()
        .nth(1)
        .and_then(|l| flotilla_model::signing::base64_decode(l.trim()));
    let sk = match minisign::SecretKey::from_unencrypted_box(text.clone().into()) {
        Ok(sk) => sk,
        Err(_)
            if raw
                .as_ref()
                .is_some_and(|b| b.len() == 158 && b[2..4] == [0, 0]) =>
        {
            minisign::SecretKey::from_bytes(raw.as_deref().unwrap_or_default()).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a usable minisign secret key: {e}",
                    args.key.display()
                )
            })?
        }
        Err(_) => {
            let password = std::env::var("FLOTILLA_SIGN_PASSWORD").ok();
            minisign::SecretKey::from_box(text.into(), password).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a usable minisign secret key: {e}",
                    args.key.display()
                )
            })?
        }
    };
    let open = || {
        std::fs::File::open(&args.artifact)
            .with_context(|| format!("opening {}", args.artifact.display()))
    };
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut open()?, &mut hasher)
        .with_context(|| format!("reading {}", args.artifact.display()))?;
    if size == 0 {
        bail!("{} is empty", args.artifact.display());
    }
    let sha256 = hex::encode(hasher.finalize());
    let comment = flotilla_model::signing::trusted_comment(&args.package, &version, &sha256, size);
    let sig = minisign::sign(None, &sk, open()?, Some(&comment), None)
        .map_err(|e| anyhow::anyhow!("signing {}: {e}", args.artifact.display()))?;
    let out = args.output.clone().unwrap_or_else(|| {
        let mut p = args.artifact.clone().into_os_string();
        p.push(".minisig");
        PathBuf::from(p)
    });
    std::fs::write(&out, sig.into_string())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(format!(
        "signed {} as {} {version} ({size} bytes, sha256 {sha256}): {}",
        args.artifact.display(),
        args.package,
        out.display()
    ))
}

fn kind_text(k: ReleaseKind) -> &'static str {
    match k {
        ReleaseKind::Full => "full",
        ReleaseKind::Patch => "patch",
    }
}

/// The file's bytes in 256 KiB chunks, advancing `progress`.
fn file_stream(
    file: tokio::fs::File,
    progress: ProgressBar,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::try_unfold((file, progress), |(mut file, progress)| async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 256 << 10];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        progress.inc(n as u64);
        Ok(Some((buf, (file, progress))))
    })
}

/// `release list`.
pub async fn release_list(c: &Client, package: Option<&str>, json: bool) -> anyhow::Result<String> {
    let releases = c.releases(package).await?;
    if json {
        return to_json(&releases);
    }
    Ok(render_releases(&releases))
}

pub fn render_releases(releases: &[ReleaseRecord]) -> String {
    if releases.is_empty() {
        return "no releases".into();
    }
    let now = now_ms();
    let mut t = table(&[
        "package", "version", "kind", "size", "sha256", "artifact", "created",
    ]);
    for r in releases {
        t.add_row(vec![
            r.package.clone(),
            r.version.clone(),
            kind_text(r.kind).to_string(),
            r.size.to_string(),
            r.sha256.get(..12).unwrap_or(&r.sha256).to_string(),
            match (&r.url, r.ready()) {
                (Some(u), _) => u.clone(),
                (None, true) => "uploaded".into(),
                (None, false) => "missing: upload it".into(),
            },
            ago(now, r.created_at),
        ]);
    }
    t.to_string()
}

// ----- policies -----

/// `policy upload`: the runner loads the policy before it keeps it; prints
/// the hooks it implements.
pub async fn policy_upload(
    c: &Client,
    name: &str,
    file: &Path,
    json: bool,
) -> anyhow::Result<String> {
    let bytes = tokio::fs::read(file)
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    let entry = c.upload_policy(name, bytes).await?;
    if json {
        return to_json(&entry);
    }
    let mut out = format!(
        "uploaded policy {} ({}, sha256 {})\n",
        entry.name,
        entry.kind.as_deref().unwrap_or("?"),
        entry
            .sha256
            .as_deref()
            .map(|s| s.get(..12).unwrap_or(s))
            .unwrap_or("?"),
    );
    if let Some(info) = &entry.info {
        let mut t = table(&["hook", "implemented"]);
        for h in Hook::ALL {
            t.add_row(vec![
                h.as_str().to_string(),
                if info.implements(h) {
                    "yes"
                } else {
                    "no (default)"
                }
                .to_string(),
            ]);
        }
        out.push_str(&t.to_string());
        if info.implements(Hook::Plan) {
            out.push_str(&format!("\nplan calls: {}", info.plan_calls.describe()));
        }
    }
    Ok(out)
}

fn hooks_text(e: &PolicyEntry) -> String {
    match (&e.info, &e.error) {
        (_, Some(err)) => format!("error: {err}"),
        (Some(info), None) => info
            .hooks
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        (None, None) => "-".into(),
    }
}

/// `policy list`.
pub async fn policy_list(c: &Client, json: bool) -> anyhow::Result<String> {
    let policies = c.policies().await?;
    if json {
        return to_json(&policies);
    }
    if policies.is_empty() {
        return Ok("no policies".into());
    }
    let mut t = table(&["name", "kind", "builtin", "hooks", "sha256"]);
    for p in &policies {
        t.add_row(vec![
            p.name.clone(),
            p.kind.clone().unwrap_or_else(|| "-".into()),
            if p.builtin { "yes" } else { "no" }.to_string(),
            hooks_text(p),
            p.sha256
                .as_deref()
                .map(|s| s.get(..12).unwrap_or(s).to_string())
                .unwrap_or_default(),
        ]);
    }
    Ok(t.to_string())
}

// ----- time -----

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `12s ago`, `3m ago`, `5h ago`, `2d ago`; `never` for 0.
pub fn ago(now: u64, at: u64) -> String {
    if at == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(at) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// UTC wall-clock time of a Unix-ms timestamp.
fn clock_time(at: u64) -> String {
    chrono::DateTime::from_timestamp_millis(at as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_people_say_them() {
        let now = 10_000_000;
        assert_eq!(ago(now, 0), "never");
        assert_eq!(ago(now, now - 12_000), "12s ago");
        assert_eq!(ago(now, now - 180_000), "3m ago");
        assert_eq!(ago(now, now + 5_000), "0s ago");
        assert_eq!(ago(now * 100, now * 100 - 2 * 86_400_000), "2d ago");
    }

    #[test]
    fn specs_parse_from_json_and_yaml() {
        let json =
            r#"{"name": "a", "package": "p", "target": {"version": "1.2"}, "policy": "canary"}"#;
        let yaml = "name: a\npackage: p\ntarget:\n  version: '1.2'\npolicy: canary\n";
        assert_eq!(parse_spec(json).unwrap(), parse_spec(yaml).unwrap());
        let err = format!(
            "{:#}",
            parse_spec("name: a\npackage: p\nconcurency: 3\n").unwrap_err()
        );
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn wave_progress_counts_done_and_failed() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "t1", "state": {"state": "running"}, "target_version": "1.2",
            "spec": {"name": "a", "package": "p", "target": {"version": "1.2"}, "policy": "canary"},
            "waves": [{"name": "canary", "nodes": ["a", "b"]}, {"name": "rest", "nodes": ["c", "d", "e"]}],
            "current_wave": 1, "soak_until": null, "awaiting_approval": false,
            "created_at": 1, "updated_at": 2,
        }))
        .unwrap();
        let states: HashMap<String, String> = [
            ("a", "succeeded"),
            ("b", "failed-rolled-back"),
            ("c", "upgrading"),
            ("d", "succeeded"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = wave_progress(&task, &states);
        assert_eq!(
            (p[0].total, p[0].done, p[0].failed, p[0].succeeded),
            (2, 2, 1, 1)
        );
        assert_eq!(
            (p[1].total, p[1].done, p[1].failed, p[1].succeeded),
            (3, 1, 0, 1)
        );
    }

    #[test]
    fn node_table_shows_labels_and_last_seen() {
        let mut n = Node::new("edge-01", "1.12");
        n.labels = vec![
            ("tier".into(), "edge".into()),
            ("region".into(), "eu".into()),
        ];
        n.last_seen = 88_000;
        n.online = false;
        let out = render_nodes(&[n], 3, 100_000);
        assert!(out.contains("edge-01"), "{out}");
        assert!(out.contains("tier=edge,region=eu"), "{out}");
        assert!(out.contains("12s ago"), "{out}");
        assert!(out.contains("1 of 3 nodes shown"), "{out}");
    }
}
