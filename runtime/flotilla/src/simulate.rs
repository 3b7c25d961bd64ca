//! `flotilla simulate`: run a task against a fleet file with simulated agents
//! on a virtual clock, through the real engine, and print the timeline.

use anyhow::Context as _;
use clap::Args;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use flotilla_engine::sim::{self, Agents};
use flotilla_engine::store::MemoryStore;
use flotilla_engine::{Engine, PolicySource};
use flotilla_model::{Node, TaskSpec};
use flotilla_policy::world::{ManualClock, MemoryDelivery, MemoryFleet, World};
use flotilla_policy::{Limits, Policy, PolicyError, WasmRuntime};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The fleet: a JSON array of nodes.
    #[arg(long)]
    pub fleet: PathBuf,
    /// The task: a JSON task spec (its `policy` is replaced by --policy).
    #[arg(long)]
    pub task: PathBuf,
    /// The policy: a `.wasm` component or a `.rhai` script.
    #[arg(long)]
    pub policy: PathBuf,
    /// Simulated agents: {"default": "succeed", "nodes": {"n1": "fail"}, "latency_ms": 0}.
    /// Outcomes: succeed, fail, rollback-fails, reject, silent, hang.
    #[arg(long)]
    pub agents: Option<PathBuf>,
    /// Control-plane versions for `{"control-plane": X}` targets, as `X=VERSION`.
    #[arg(long = "control-plane", value_name = "COMPONENT=VERSION")]
    pub control_plane: Vec<String>,
    /// Virtual start time (Unix ms); default 2026-01-05 00:00 UTC, a Monday.
    #[arg(long, default_value_t = 1_767_571_200_000)]
    pub start: u64,
    /// Give up after this much virtual time.
    #[arg(long, default_value_t = 14)]
    pub max_days: u64,
    /// Print JSON instead of a timeline and a table.
    #[arg(long)]
    pub json: bool,
}

struct OneFile {
    path: PathBuf,
    runtime: WasmRuntime,
}

impl PolicySource for OneFile {
    fn load(&self, _name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        flotilla_policy::load(&self.path, &self.runtime, world, Limits::default())
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not {what}", path.display()))
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let nodes: Vec<Node> = read(&args.fleet, "a JSON array of nodes")?;
    let mut spec: TaskSpec = read(&args.task, "a task spec")?;
    spec.policy = flotilla_engine::scenario::local_policy_name(&args.policy);
    let agents: Agents = match &args.agents {
        Some(p) => read(p, "an agents file")?,
        None => Agents::default(),
    };
    let mut control_plane = BTreeMap::new();
    for cp in &args.control_plane {
        let (k, v) = cp
            .split_once('=')
            .with_context(|| format!("--control-plane {cp:?}: expected COMPONENT=VERSION"))?;
        control_plane.insert(k.to_string(), v.to_string());
    }
    let clock = Arc::new(ManualClock::new(args.start));
    let source = OneFile {
        path: args.policy.clone(),
        runtime: WasmRuntime::new(WasmRuntime::default_cache_dir())?,
    };
    // Load once up front so a broken policy is reported before anything runs.
    source.load(&spec.policy, World::empty())?;
    let store = Arc::new(MemoryStore::new());
    let fleet = Arc::new(MemoryFleet::new(nodes));
    let mut engine = Engine::new(
        store,
        fleet.clone(),
        Arc::new(MemoryDelivery {
            releases: Vec::new(),
            control_plane,
        }),
        clock.clone(),
        Arc::new(source),
    )?;
    let task = engine.create(spec)?;
    // Online devices ask for work (pull tasks) as real agents do.
    sim::run_on(
        &mut engine,
        &clock,
        fleet,
        &agents,
        60_000,
        args.max_days * 86_400_000,
    )?;
    // Like `task watch`: a script can tell a rollout that would not succeed.
    let code = if task_succeeded(&engine, &task.id)? {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    let task = engine.task(&task.id)?;
    let events = engine.events(&task.id, 0, usize::MAX)?;
    let counts = sim::counts(&engine, &task.id)?;

    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "task": task, "events": events, "counts": counts,
            }))?
        );
        return Ok(code);
    }
    for e in events
        .iter()
        .filter(|e| !e.kind.starts_with("node.") || e.kind == "node.skipped")
    {
        let t = (e.at - args.start) / 1000;
        let node = e
            .node
            .as_deref()
            .map(|n| format!(" {n}"))
            .unwrap_or_default();
        outln!(
            "+{:02}:{:02}:{:02}  {:<16}{node} {}",
            t / 3600,
            t / 60 % 60,
            t % 60,
            e.kind,
            e.detail
        );
    }
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(["state", "nodes"]);
    for (state, n) in &counts {
        table.add_row([state.clone(), n.to_string()]);
    }
    outln!("\ntask {} ({}): {}", task.id, task.spec.name, task.state);
    outln!("{table}");
    if code != ExitCode::SUCCESS {
        outln!(
            "the task would end {}, not succeeded (exit code 1)",
            task.state.name()
        );
    }
    Ok(code)
}

fn task_succeeded(engine: &Engine, id: &str) -> anyhow::Result<bool> {
    Ok(engine.task(id)?.state == flotilla_model::TaskState::Succeeded)
}
