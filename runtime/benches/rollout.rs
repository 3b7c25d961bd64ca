//! A simulated rollout of 100,000 nodes through the real engine, persisted in
//! sled, on a virtual clock with instant agents (budget ≤ 10 s), and the memory
//! it holds per tracked node (budget ≤ 1 KiB RSS). Beside it, in the same run,
//! the baseline: the same number of records written to sled in a tight loop,
//! so the ratio is the engine's own overhead.
//!
//! Run: `cargo bench -p flotilla --bench rollout` (`-- --nodes N` to change the size).

use flotilla::engine::{Engine, PolicySource};
use flotilla::model::{Event, Node, NodeRun, Task, TaskSpec};
use flotilla::policy::{Limits, Policy, PolicyError, RhaiPolicy};
use flotilla::sim::{self, Agents};
use flotilla::store::{SledStore, Store, StoreError};
use flotilla::world::{ManualClock, MemoryDelivery, MemoryFleet, World};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts the records the engine writes, to size the baseline.
struct Counting {
    inner: SledStore,
    records: AtomicU64,
    bytes: AtomicU64,
}

impl Store for Counting {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        self.records.fetch_add(
            1 + runs.len() as u64 + events.len() as u64,
            Ordering::Relaxed,
        );
        let approx = runs
            .first()
            .map_or(0, |r| serde_json::to_vec(r).map_or(0, |v| v.len()));
        self.bytes.fetch_add(approx as u64, Ordering::Relaxed);
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
        let src = include_str!("../../policies/canary.rhai");
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
        records: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let clock = Arc::new(ManualClock::new(1_767_571_200_000));
    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut engine = Engine::new(
        store.clone(),
        Arc::new(MemoryFleet::new(nodes)),
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Canary),
    )
    .unwrap();
    let task = engine.create(spec).unwrap();
    sim::run(&mut engine, &clock, &Agents::default(), 1000, 86_400_000).unwrap();
    store.flush().unwrap();
    let took = t.elapsed();
    let rss_after = rss_bytes();
    let counts = sim::counts(&engine, &task.id).unwrap();
    assert_eq!(counts.get("succeeded"), Some(&n), "{counts:?}");
    let records = store.records.load(Ordering::Relaxed);
    let per_node_rss = rss_after.saturating_sub(rss_before) as f64 / n as f64;

    // Baseline: the same number of records, of the size of a node run, into
    // sled in a tight loop, then one flush.
    let db = sled::open(dir.join("baseline")).unwrap();
    let tree = db.open_tree("runs").unwrap();
    let value = vec![b'x'; 200];
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
        "{:<44} {:>10.3} s",
        format!("baseline: {records} sled inserts, tight loop"),
        base.as_secs_f64()
    );
    println!(
        "{:<44} {:>11.1}x",
        "ratio (engine / baseline)",
        took.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "{:<44} {:>8.0} B {:>10}",
        "RSS growth per tracked node", per_node_rss, "1024 B"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
