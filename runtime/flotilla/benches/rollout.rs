//! A simulated rollout of 100,000 nodes through the real engine, persisted in
//! sled, on a virtual clock with instant agents (budget ≤ 10 s), and the memory
//! it holds per tracked node (budget ≤ 1 KiB RSS). Beside it, in the same run,
//! the baseline: the same number of records and bytes written to sled in a
//! tight loop, so the ratio is the engine's own overhead.
//!
//! Memory is RSS growth from just before the engine starts (the fleet is
//! built before) divided by the nodes: the largest seen between simulation
//! steps, while the task tracks its nodes (the budget line), at the end of
//! the run, and the kernel's peak (`VmHWM`, which also catches what a
//! single step allocates and frees, e.g. targeting all nodes at once). The
//! simulator runs [`Sim::quiet`] (no timeline line per node: 100,000 of
//! them would be the simulator's memory, not the engine's); its own
//! per-node state (attempt counts, reports in flight) is still counted.
//! `ROLLOUT_STAGES=1` prints the time, RSS and heap in use after every step.
//!
//! The baseline writes as many records as the store wrote (sled keys, from
//! `SledStore::records_written`: packs of node runs and of events, task
//! heads and plans) with values of their average size
//! (`SledStore::bytes_written`), so the ratio is the engine's own overhead.
//!
//! Run: `cargo bench -p flotilla --bench rollout` (`-- --nodes N` to change the size).

use flotilla_engine::sim::{self, Agents, Sim};
use flotilla_engine::store::{Store, StoreError};
use flotilla_engine::{Engine, PolicySource};
use flotilla_model::{Event, Node, NodeRun, Task, TaskSpec};
use flotilla_policy::world::{Clock, ManualClock, MemoryDelivery, MemoryFleet, World};
use flotilla_policy::{Limits, Policy, PolicyError, RhaiPolicy};
use flotilla_store_sled::SledStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts what the engine hands the store (the sled records it became are
/// counted by the store itself), to size the baseline.
struct Counting {
    inner: SledStore,
    runs: AtomicU64,
    events: AtomicU64,
}

impl Store for Counting {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        self.runs.fetch_add(runs.len() as u64, Ordering::Relaxed);
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.inner.commit(task, runs, events)
    }
    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.inner.task(id)
    }
    fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.inner.tasks()
    }
    fn runs(&self, task_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        self.inner.runs(task_id)
    }
    fn run(&self, task_id: &str, node_id: &str) -> Result<Option<NodeRun>, StoreError> {
        self.inner.run(task_id, node_id)
    }
    fn events(&self, task_id: &str, from: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.inner.events(task_id, from, limit)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

struct Canary;

impl PolicySource for Canary {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        let src = include_str!("../../../policies/canary.rhai");
        Ok(Box::new(RhaiPolicy::load_str(
            name,
            src,
            world,
            Limits::default(),
        )?))
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Peak RSS of the process so far (`VmHWM`).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Bytes the allocator has handed out and not yet been given back (glibc's
/// `mallinfo2`): beside RSS, it tells live data from heap holes.
fn heap_in_use() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallinfo2` only reads the allocator's counters.
    return unsafe { libc::mallinfo2() }.uordblks;
    #[allow(unreachable_code)]
    0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("flotilla-rollout-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let nodes: Vec<Node> = (0..n)
        .map(|i| Node::new(format!("node-{i:07}"), "1.12.0"))
        .collect();
    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "name": "bench", "package": "edgecore", "target": {"version": "1.13.0"},
        "policy": "canary", "params": {"threshold": 0.1}, "concurrency": 0
    }))
    .unwrap();

    let store = Arc::new(Counting {
        inner: SledStore::open(&dir.join("engine")).unwrap(),
        runs: AtomicU64::new(0),
        events: AtomicU64::new(0),
    });
    let clock = Arc::new(ManualClock::new(1_767_571_200_000));
    // The inventory exists before any task: what a rollout costs is measured
    // from here.
    let fleet = Arc::new(MemoryFleet::new(nodes));
    let verbose = std::env::var_os("ROLLOUT_STAGES").is_some();
    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut engine = Engine::new(
        store.clone(),
        fleet,
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Canary),
    )
    .unwrap();
    let task = engine.create(spec).unwrap();
    // `sim::run`, with the RSS sampled after every step: the most the
    // engine holds while it tracks the nodes, not only what is left after.
    let mut sim = Sim::new(clock.clone(), Agents::default()).quiet();
    let mut live_rss = 0;
    let mut steps = 0;
    let start = clock.now();
    while engine.has_active() && clock.now() - start <= 86_400_000 {
        if sim.step(&mut engine).unwrap() {
            clock.advance(1000);
        }
        steps += 1;
        let rss = rss_bytes();
        live_rss = live_rss.max(rss);
        if verbose {
            eprintln!(
                "step {steps:>3} at {:>7.3} s: RSS +{:>6.1} MB, heap in use {:>6.1} MB",
                t.elapsed().as_secs_f64(),
                rss.saturating_sub(rss_before) as f64 / 1e6,
                heap_in_use() as f64 / 1e6
            );
        }
    }
    store.flush().unwrap();
    let took = t.elapsed();
    // Before the simulator is dropped: what it frees then would leave holes
    // in the heap that only a trim the runner never does would hand back.
    let rss_after = rss_bytes();
    drop(sim);
    let peak = peak_rss_bytes();
    let counts = sim::counts(&engine, &task.id).unwrap();
    assert_eq!(counts.get("succeeded"), Some(&n), "{counts:?}");
    let records = store.inner.records_written();
    let (runs, events) = (
        store.runs.load(Ordering::Relaxed),
        store.events.load(Ordering::Relaxed),
    );
    let per_node_rss = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    let per_node_live = live_rss.saturating_sub(rss_before) as f64 / n as f64;
    let per_node_peak = peak.saturating_sub(rss_before) as f64 / n as f64;

    // What `node-history` costs against this task once it has ended: a
    // point read of every node's run, in node order (as a policy's
    // `select` asks).
    let t = Instant::now();
    for i in 0..n {
        let run = store.run(&task.id, &format!("node-{i:07}")).unwrap();
        assert!(run.is_some_and(|r| r.state.name() == "succeeded"));
    }
    let point_read = t.elapsed() / n as u32;
    // Every run of the task at once (what a resume and `/metrics` read).
    let t = Instant::now();
    assert_eq!(store.runs(&task.id).unwrap().len(), n);
    let read_all = t.elapsed();
    // A task list (`GET /v1/tasks`, polled by the dashboard): heads and wave
    // counts, beside reading every task with its plan.
    let t = Instant::now();
    let listed = store.inner.task_list().unwrap();
    let list = t.elapsed();
    let t = Instant::now();
    let full = store.inner.tasks().unwrap();
    let with_plans = t.elapsed();
    assert_eq!(listed.len(), full.len());
    assert_eq!(listed[0].1, full[0].waves.len());

    // Baseline: the same number of records and bytes (values of the
    // average size the store wrote) into sled in a tight loop, then one flush.
    let bytes = store.inner.bytes_written();
    let db = sled::open(dir.join("baseline")).unwrap();
    let tree = db.open_tree("runs").unwrap();
    let value = vec![b'x'; (bytes / records.max(1)).saturating_sub(8) as usize];
    let t = Instant::now();
    for i in 0..records {
        tree.insert(i.to_be_bytes(), value.as_slice()).unwrap();
    }
    db.flush().unwrap();
    let base = t.elapsed();

    println!();
    println!("{:<44} {:>12} {:>10}", "what", "measured", "budget");
    println!(
        "{:<44} {:>10.3} s {:>10}",
        format!("rollout of {n} nodes, sled, instant agents"),
        took.as_secs_f64(),
        "10 s"
    );
    println!(
        "{:<44} {:>12}",
        "run writes / events the engine committed",
        format!("{runs} / {events}")
    );
    println!(
        "{:<44} {:>10.3} s",
        format!(
            "baseline: {records} sled inserts ({:.1} MB), tight loop",
            bytes as f64 / 1e6
        ),
        base.as_secs_f64()
    );
    println!(
        "{:<44} {:>11.1}x",
        "ratio (engine / baseline)",
        took.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "{:<44} {:>8.0} B {:>10}",
        "RSS growth per tracked node, task live", per_node_live, "1024 B"
    );
    println!("{:<44} {:>8.0} B", "  at the end of the run", per_node_rss);
    println!(
        "{:<44} {:>8.0} B",
        "  peak within a step (VmHWM)", per_node_peak
    );
    println!(
        "{:<44} {:>9.2} µs",
        "point read of a run after the task (history)",
        point_read.as_secs_f64() * 1e6
    );
    println!(
        "{:<44} {:>10.3} s",
        "read of every run of the task",
        read_all.as_secs_f64()
    );
    println!(
        "{:<44} {:>9.2} ms",
        "task list (heads, wave counts)",
        list.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>9.2} ms",
        "  baseline: every task with its plan",
        with_plans.as_secs_f64() * 1e3
    );
    // sled flushes on drop: close both databases before removing their files.
    drop((engine, store, tree, db));
    let _ = std::fs::remove_dir_all(&dir);
}
