//! Issue 13, point 9: a Rhai hook's allocations count against the memory cap
//! of a Wasm instance. A hook that keeps 800 × 1 MB blobs alive (each value
//! within Rhai's per-value caps) is stopped with a memory error that pauses
//! only its task. This binary installs the counting allocator, as `flotilla`
//! does (see `main.rs`).

use flotilla_engine::sim::{self, Agents};
use flotilla_engine::store::MemoryStore;
use flotilla_engine::{Engine, PolicySource};
use flotilla_model::{Node, Scope, Selector, TaskSpec, TaskState};
use flotilla_policy::world::{ManualClock, MemoryDelivery, MemoryFleet, World};
use flotilla_policy::{Limits, Policy, PolicyError, RhaiPolicy};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Scripts(BTreeMap<&'static str, &'static str>);

impl PolicySource for Scripts {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        let src = self.0.get(name).ok_or_else(|| PolicyError::Load {
            policy: name.into(),
            reason: "no such policy".into(),
        })?;
        // A budget the hoarder does not reach first: the cap must stop it.
        let limits = Limits {
            cpu: Duration::from_secs(20),
            ..Limits::default()
        };
        Ok(Box::new(RhaiPolicy::load_str(name, src, world, limits)?))
    }
}

const HOARDER: &str = r#"
fn plan(ctx, nodes) {
    let keep = [];
    for i in 0..800 { keep.push(Fn("len").curry(blob(1_000_000, i))); }
    [#{name: "all", nodes: nodes.map(|n| n.id)}]
}
"#;

/// A task of its own package (one active task per package and target).
fn spec(name: &str, policy: &str, ids: &[&str]) -> TaskSpec {
    let mut s: TaskSpec = serde_json::from_value(json!({
        "name": name,
        "package": format!("edge-{name}"),
        "target": {"version": "2.0.0"},
        "policy": policy,
    }))
    .unwrap();
    s.scope = Scope::Selector(Selector {
        ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    s
}

#[test]
fn a_rhai_hook_hoarding_800_blobs_is_stopped_at_the_memory_cap_and_pauses_only_its_task() {
    assert!(flotilla_policy::alloc::installed());
    let clock = Arc::new(ManualClock::new(1_795_392_000_000));
    let nodes: Vec<Node> = ["a1", "a2", "b1", "b2"]
        .iter()
        .map(|id| Node::new(*id, "1.0.0"))
        .collect();
    let mut engine = Engine::new(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryFleet::new(nodes)),
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Scripts(BTreeMap::from([
            ("hoarder", HOARDER),
            ("default", ""),
        ]))),
    )
    .unwrap();
    let bad = engine
        .create(spec("bad", "hoarder", &["a1", "a2"]))
        .unwrap();
    let good = engine
        .create(spec("good", "default", &["b1", "b2"]))
        .unwrap();
    let started = Instant::now();
    sim::run(&mut engine, &clock, &Agents::default(), 1000, 3600 * 1000).unwrap();
    let b = engine.task(&bad.id).unwrap();
    match &b.state {
        TaskState::Paused(r) => {
            assert!(r.contains("memory cap") && r.contains("64 MiB"), "{r}");
        }
        other => panic!("the hoarder's task: {other:?}"),
    }
    assert_eq!(engine.task(&good.id).unwrap().state, TaskState::Succeeded);
    // Stopped at the cap, not after allocating 800 MB under a 20 s budget.
    assert!(started.elapsed() < Duration::from_secs(10));
}
