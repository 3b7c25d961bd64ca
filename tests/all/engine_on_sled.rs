//! The engine over the durable store: what it holds in memory and what sled
//! reads back agree at every step, and across an engine dropped mid-rollout.

use flotilla_engine::sim::{self, AgentOutcome, Agents, Sim};
use flotilla_engine::store::Store;
use flotilla_engine::{Engine, PolicySource};
use flotilla_model::{Node, TaskSpec};
use flotilla_policy::world::{ManualClock, MemoryDelivery, MemoryFleet, World};
use flotilla_policy::{Limits, Policy, PolicyError, RhaiPolicy};
use flotilla_store_sled::SledStore;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

struct Scripts(BTreeMap<String, String>);

impl PolicySource for Scripts {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        let src = self.0.get(name).ok_or_else(|| PolicyError::Load {
            policy: name.into(),
            reason: "no such policy".into(),
        })?;
        Ok(Box::new(RhaiPolicy::load_str(
            name,
            src,
            world,
            Limits::default(),
        )?))
    }
}

const CANARY: &str = include_str!("../../policies/canary.rhai");
/// 2026-11-23 00:00 UTC, a Monday.
const MONDAY: u64 = 1_795_392_000_000;

fn fleet(n: usize, version: &str) -> Vec<Node> {
    (0..n)
        .map(|i| Node::new(format!("n{i:03}"), version))
        .collect()
}

fn spec(name: &str, policy: &str, params: serde_json::Value) -> TaskSpec {
    serde_json::from_value(json!({
        "name": name,
        "package": "edgecore",
        "target": { "control-plane": "cloudcore" },
        "policy": policy,
        "params": params,
    }))
    .unwrap()
}

/// A task big enough for the sled store to write run packs (commits of
/// ≥ 256 runs) reads back from disk exactly as the engine holds it after
/// every step, also after the engine is dropped mid-rollout and a new one
/// resumes from the store.
#[test]
fn a_big_task_on_sled_reads_back_as_the_engine_holds_it_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let clock = Arc::new(ManualClock::new(MONDAY));
    let fleet = Arc::new(MemoryFleet::new(fleet(700, "1.12")));
    let delivery = Arc::new(MemoryDelivery {
        releases: Vec::new(),
        control_plane: BTreeMap::from([("cloudcore".to_string(), "v1.13".to_string())]),
    });
    let scripts = Arc::new(Scripts(BTreeMap::from([(
        "canary".to_string(),
        CANARY.to_string(),
    )])));
    let new_engine = || {
        Engine::new(
            store.clone(),
            fleet.clone(),
            delivery.clone(),
            clock.clone(),
            scripts.clone(),
        )
        .unwrap()
    };
    // Some nodes fail (and roll back), the rest succeed.
    let mut agents = Agents::default();
    for i in (25..700).step_by(50) {
        agents.nodes.insert(format!("n{i:03}"), AgentOutcome::Fail);
    }
    let mut engine = new_engine();
    let task = engine
        .create(spec("big", "canary", json!({"threshold": 0.5})))
        .unwrap();
    let check = |engine: &Engine, step: usize| {
        let on_disk = store.runs(&task.id).unwrap();
        assert_eq!(on_disk, engine.runs(&task.id).unwrap(), "step {step}");
        on_disk
    };
    let mut sim = Sim::new(clock.clone(), agents.clone());
    let mut step = 0;
    while engine.has_active() && step < 2_000 {
        if sim.step(&mut engine).unwrap() {
            clock.advance(1000);
        }
        step += 1;
        check(&engine, step);
        if step == 5 {
            // The runner goes away mid-rollout: a new engine reads it all back.
            drop(engine);
            engine = new_engine();
            check(&engine, step);
            sim = Sim::new(clock.clone(), agents.clone());
        }
    }
    let runs = check(&engine, step);
    assert!(step > 5 && !engine.has_active(), "stuck after {step} steps");
    assert_eq!(runs.len(), 700);
    let counts = sim::counts(&engine, &task.id).unwrap();
    assert!(
        counts.get("succeeded").copied().unwrap_or(0) >= 600,
        "{counts:?}"
    );
    // The store wrote packs (so this test exercises them), and records.
    assert!(
        store.records_written() < 700 * 4,
        "{}",
        store.records_written()
    );
}
