//! `flotilla policy check|eval`: load a `.wasm` or `.rhai` policy and report on
//! it, or run one hook on JSON input. (`upload` and `list` talk to a runner;
//! they live in `remote.rs`.)

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use flotilla_model::{Hook, Node, TaskContext};
use flotilla_policy::world::{MemoryFleet, World};
use flotilla_policy::{Limits, WasmRuntime};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load a policy and report which hooks it implements, or why it won't load.
    Check {
        /// A `.wasm` component or a `.rhai` script.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one hook on JSON input and print its JSON output.
    Eval(EvalArgs),
    /// Run scenario files (YAML) against their policies on a virtual clock;
    /// pass/fail per scenario with a diff of what differed.
    Test(super::test::TestArgs),
    /// Upload a policy to a runner under NAME (it must load there).
    Upload(super::remote::PolicyUpload),
    /// List the policies a runner has.
    List(super::remote::PolicyList),
    /// Create a policy project (policy, a scenario, build and test commands)
    /// in Rust, Rhai, Python or JavaScript.
    New(super::policy_new::NewArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A `.wasm` component or a `.rhai` script.
    pub file: PathBuf,
    /// select | plan | admit | evaluate | on-request
    #[arg(long)]
    pub hook: String,
    /// The hook's input as JSON (`-` for stdin): nodes for select/plan, a wave
    /// report for evaluate, a node for on-request, {"node":..,"now":ms} for admit.
    #[arg(long)]
    pub input: PathBuf,
    /// The task context as JSON (target_version, params, ...).
    #[arg(long, conflicts_with_all = ["target", "params"])]
    pub ctx: Option<PathBuf>,
    /// Shorthand for a context with this target version.
    #[arg(long, default_value = "0.0.0")]
    pub target: String,
    /// Policy parameters, a JSON object.
    #[arg(long)]
    pub params: Option<String>,
    /// Nodes the fleet host functions see (a JSON array of nodes).
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// CPU budget per call, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub cpu_ms: u64,
    /// Memory cap for a Wasm policy, in MiB.
    #[arg(long, default_value_t = 64)]
    pub memory_mib: usize,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file, json } => check(&file, json),
        PolicyCommand::Eval(args) => eval(args),
        PolicyCommand::Test(args) => super::test::run(args),
        PolicyCommand::Upload(args) => super::remote::run_policy_upload(args),
        PolicyCommand::List(args) => super::remote::run_policy_list(args),
        PolicyCommand::New(args) => super::policy_new::run(args),
    }
}

fn runtime() -> anyhow::Result<WasmRuntime> {
    Ok(WasmRuntime::new(WasmRuntime::default_cache_dir())?)
}

/// A line on stderr while something slow runs: at once when `now` is true
/// (a compile known to be needed), else once it has taken longer than a
/// second; and how long it took when it ends, if anything was said.
pub struct Progress {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    pub fn start(message: String, now: bool) -> Progress {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let thread = std::thread::spawn(move || {
            if !now
                && rx.recv_timeout(Duration::from_secs(1))
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                return;
            }
            eprintln!("{message}");
            let _ = rx.recv();
            eprintln!("  ... done in {:.1} s", started.elapsed().as_secs_f64());
        });
        Progress {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The progress line of loading `file`: a Wasm component not in the compile
/// cache is compiled first (10 s and more for an interpreter-based one).
fn load_progress(file: &Path, rt: &WasmRuntime) -> Progress {
    let wasm =
        flotilla_policy::PolicyKind::of(file).is_ok_and(|k| k == flotilla_policy::PolicyKind::Wasm);
    let miss = wasm && std::fs::read(file).is_ok_and(|b| !rt.is_cached(&b));
    let message = if miss {
        format!(
            "compiling {} (first load of this component; cached afterwards; an \
             interpreter-based component takes 10 s and more)...",
            file.display()
        )
    } else {
        format!("loading {}...", file.display())
    };
    Progress::start(message, miss)
}

fn check(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let progress = load_progress(file, &rt);
    let loaded = flotilla_policy::load(file, &rt, World::empty(), Limits::default());
    drop(progress);
    let kind = flotilla_policy::PolicyKind::of(file).map_or("unknown", |k| k.describe());
    match loaded {
        Ok(p) => {
            let info = p.info();
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "ok": true, "file": file, "kind": kind, "name": info.name,
                        "version": info.version, "hooks": info.hooks, "plan_calls": info.plan_calls })
                );
            } else {
                outln!("{} {} ({kind}) loads.", info.name, info.version);
                let mut t = Table::new();
                t.load_preset(UTF8_FULL_CONDENSED)
                    .set_header(["hook", "implemented", "otherwise"]);
                for h in Hook::ALL {
                    let (yes, otherwise) = if info.implements(h) {
                        ("yes", "")
                    } else {
                        ("no", default_text(h))
                    };
                    t.add_row([h.as_str(), yes, otherwise]);
                }
                outln!("{t}");
                if info.implements(Hook::Plan) {
                    outln!("plan calls: {}", info.plan_calls.describe());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "ok": false, "file": file, "kind": kind, "error": e.to_string() })
                );
            } else {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn default_text(h: Hook) -> &'static str {
    match h {
        Hook::Select => "default: include every node",
        Hook::Plan => "default: one wave with every node",
        Hook::Admit => "default: start now",
        Hook::Evaluate => "default: proceed, pause on any failure",
        Hook::OnRequest => "default: offer",
    }
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let Some(hook) = Hook::parse(&args.hook) else {
        bail!(
            "unknown hook {:?}: expected one of select, plan, admit, evaluate, on-request",
            args.hook
        );
    };
    let ctx: TaskContext = match &args.ctx {
        Some(path) => serde_json::from_value(read_json(path)?)
            .with_context(|| format!("{} is not a task context", path.display()))?,
        None => {
            let params = match &args.params {
                Some(p) => serde_json::from_str(p).context("--params is not valid JSON")?,
                None => serde_json::json!({}),
            };
            if !params.is_object() {
                bail!("--params must be a JSON object, like '{{\"range\": \">=1.2\"}}'");
            }
            TaskContext::new(&args.target).with_params(params)
        }
    };
    let mut world = World::empty();
    if let Some(path) = &args.fleet {
        let nodes: Vec<Node> = serde_json::from_value(read_json(path)?)
            .with_context(|| format!("{} is not a JSON array of nodes", path.display()))?;
        world.fleet = Arc::new(MemoryFleet::new(nodes));
    }
    let limits = Limits {
        cpu: Duration::from_millis(args.cpu_ms),
        memory_bytes: args.memory_mib << 20,
        ..Limits::default()
    };
    let input = read_json(&args.input)?;
    let mut p = flotilla_policy::load(&args.file, &runtime()?, world, limits)?;
    let out = p.eval_json(hook, &ctx, input)?;
    outln!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
