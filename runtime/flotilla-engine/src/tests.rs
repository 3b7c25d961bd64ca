//! Engine behaviour from the reference systems, on an in-memory world and a
//! virtual clock, with Rhai policies.

use super::*;
use crate::sim::{self, AgentOutcome, Agents};
use crate::store::MemoryStore;
use flotilla_model::{Method, Node, Release, Selector};
use flotilla_policy::world::{ManualClock, MemoryDelivery, MemoryFleet};
use flotilla_policy::{Limits, RhaiPolicy};
use serde_json::json;

/// Policies by name, as Rhai source.
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

const CANARY: &str = include_str!("../../../policies/canary.rhai");
/// 2026-11-23 00:00 UTC, a Monday.
const MONDAY: u64 = 1_795_392_000_000;

struct World0 {
    engine: Engine,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
}

fn world(nodes: Vec<Node>, extra: &[(&str, &str)]) -> World0 {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let store = Arc::new(MemoryStore::new());
    let mut scripts = BTreeMap::from([
        ("default".to_string(), String::new()),
        ("canary".to_string(), CANARY.to_string()),
    ]);
    for (k, v) in extra {
        scripts.insert(k.to_string(), v.to_string());
    }
    let engine = Engine::new(
        store.clone(),
        Arc::new(MemoryFleet::new(nodes)),
        Arc::new(delivery()),
        clock.clone(),
        Arc::new(Scripts(scripts)),
    )
    .unwrap();
    World0 {
        engine,
        clock,
        store,
    }
}

/// The release `edgecore` 1.13.0 and the control plane `cloudcore` at v1.13.
fn delivery() -> MemoryDelivery {
    MemoryDelivery {
        releases: vec![Release {
            package: "edgecore".into(),
            version: "1.13.0".into(),
            kind: Default::default(),
            size: 0,
            sha256: String::new(),
        }],
        control_plane: BTreeMap::from([("cloudcore".to_string(), "v1.13".to_string())]),
    }
}

/// An engine whose only policy is `default` (an empty script), with no releases.
impl Scripts {
    /// Only the policy `default`, with `text` (empty: every hook at its default).
    fn default_policy(text: &str) -> Scripts {
        Scripts(BTreeMap::from([("default".to_string(), text.to_string())]))
    }
}

/// An engine over `store` and `fleet` with the releases of [`delivery`],
/// loading its policies from `policies`.
fn engine_over(
    store: Arc<MemoryStore>,
    fleet: Arc<MemoryFleet>,
    clock: &Arc<ManualClock>,
    policies: Arc<dyn PolicySource>,
) -> Engine {
    Engine::new(store, fleet, Arc::new(delivery()), clock.clone(), policies).unwrap()
}

fn engine_with_default_policy(
    store: Arc<MemoryStore>,
    fleet: Arc<MemoryFleet>,
    clock: &Arc<ManualClock>,
) -> Engine {
    let scripts = BTreeMap::from([("default".to_string(), String::new())]);
    Engine::new(
        store,
        fleet,
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Scripts(scripts)),
    )
    .unwrap()
}

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

fn drive(w: &mut World0, agents: &Agents) {
    sim::run(&mut w.engine, &w.clock, agents, 1000, 48 * 3600 * 1000).unwrap();
}

#[test]
fn kubeedge_targets_the_control_plane_version_and_skips_same_version_and_unhealthy() {
    let mut nodes = fleet(6, "1.12");
    nodes[1].version = "v1.13".into(); // already there
    nodes[2].healthy = false;
    nodes[3].schedulable = false; // cordoned but healthy: upgraded
    let mut w = world(nodes, &[]);
    let task = w.engine.create(spec("edge", "default", json!({}))).unwrap();
    drive(&mut w, &Agents::default());
    let t = w.engine.task(&task.id).unwrap();
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(t.target_version.as_deref(), Some("v1.13"));
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(states["n001"], "skipped");
    assert_eq!(states["n002"], "skipped");
    assert_eq!(states["n003"], "succeeded");
    let c = sim::counts(&w.engine, &task.id).unwrap();
    assert_eq!((c["succeeded"], c["skipped"]), (4, 2));
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node.skipped" && e.detail == "same-version: already at v1.13")
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node.skipped" && e.detail == "unhealthy: node is unhealthy")
    );
}

#[test]
fn a_node_busy_in_another_task_is_skipped() {
    let mut w = world(fleet(4, "1.12"), &[]);
    // The first task holds every node (its agents never answer).
    let a = w
        .engine
        .create(spec("first", "default", json!({})))
        .unwrap();
    w.engine.tick().unwrap();
    // (Another target: a second task to the same one is refused outright.)
    let mut second = spec("second", "default", json!({}));
    second.target = Target::Version("1.14".into());
    let b = w.engine.create(second).unwrap();
    w.engine.tick().unwrap();
    let states = sim::states(&w.engine, &b.id).unwrap();
    assert!(states.values().all(|s| s == "skipped"), "{states:?}");
    let events = w.engine.events(&b.id, 0, 100).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.detail == format!("busy-in-another-task: in task {}", a.id))
    );
}

/// A spec for `edgecore` at an explicit version, `extra` merged in.
fn versioned(name: &str, version: &str, extra: serde_json::Value) -> TaskSpec {
    let mut v = json!({
        "name": name,
        "package": "edgecore",
        "target": { "version": version },
        "policy": "default",
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn a_second_active_task_for_the_same_package_and_target_is_refused_naming_the_first() {
    let mut w = world(fleet(2, "1.12"), &[]);
    let first = w
        .engine
        .create(versioned("first", "1.13.0", json!({})))
        .unwrap();
    // `v1.13` is the version the control plane reports: the same target.
    for again in [
        versioned("again", "v1.13", json!({})),
        spec("cp", "default", json!({})),
    ] {
        match w.engine.create(again) {
            Err(EngineError::Active { task, .. }) => assert_eq!(task, first.id),
            other => panic!("not refused: {other:?}"),
        }
    }
    // Another package or another version is another task.
    w.engine
        .create(versioned("other", "1.14.0", json!({})))
        .unwrap();
    let mut other_package = versioned("pkg", "1.13.0", json!({}));
    other_package.package = "cloudcore".into();
    w.engine.create(other_package).unwrap();
    // Ended, the first no longer holds its target.
    w.engine.cancel(&first.id).unwrap();
    w.engine
        .create(versioned("after", "1.13.0", json!({})))
        .unwrap();
}

#[test]
fn a_node_newer_than_the_target_is_skipped_unless_the_task_downgrades() {
    let mut nodes = fleet(3, "1.12");
    nodes[1].version = "1.14.0".into();
    let mut w = world(nodes, &[]);
    let task = w
        .engine
        .create(versioned("up", "1.13.0", json!({})))
        .unwrap();
    drive(&mut w, &Agents::default());
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(
        (&*states["n000"], &*states["n001"], &*states["n002"]),
        ("succeeded", "skipped", "succeeded")
    );
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    assert!(
        events.iter().any(|e| e.node.as_deref() == Some("n001")
            && e.detail.starts_with("newer-than-target: ")
            && e.detail.contains("downgrade")),
        "{events:#?}"
    );

    // Every node in scope is newer: refused at creation, nothing stored.
    let mut w = world(fleet(2, "1.14.0"), &[]);
    let err = w
        .engine
        .create(versioned("down", "1.13.0", json!({})))
        .unwrap_err();
    assert!(matches!(err, EngineError::Downgrade { .. }), "{err}");
    assert!(err.to_string().contains("downgrade: true"), "{err}");
    assert!(w.store.tasks().unwrap().is_empty());
    // Said on purpose, it downgrades.
    let task = w
        .engine
        .create(versioned("down", "1.13.0", json!({"downgrade": true})))
        .unwrap();
    drive(&mut w, &Agents::default());
    let c = sim::counts(&w.engine, &task.id).unwrap();
    assert_eq!(c["succeeded"], 2, "{c:?}");
}

#[test]
fn canary_pauses_below_the_minimum_then_resumes_and_aborts_above_it() {
    let mut w = world(fleet(20, "1.12"), &[]);
    let task = w
        .engine
        .create(spec(
            "canary",
            "canary",
            json!({ "threshold": 0.1, "min_finished": 5 }),
        ))
        .unwrap();
    // The canary node fails: 1 finished < 5, so the task pauses for a person.
    let mut agents = Agents::default();
    agents.nodes.insert("n000".into(), AgentOutcome::Fail);
    drive(&mut w, &agents);
    let t = w.engine.task(&task.id).unwrap();
    assert!(
        matches!(&t.state, TaskState::Paused(r) if r.contains("failure rate 100% in wave 1 exceeds 10%")),
        "{:?}",
        t.state
    );
    // Waves 2.. have not started.
    assert_eq!(sim::counts(&w.engine, &task.id).unwrap()["queued"], 19);

    // Resumed, wave "10%" (n001) runs; wave "50%" has two failures of 8 -> abort.
    w.engine.resume(&task.id).unwrap();
    agents
        .nodes
        .insert("n003".into(), AgentOutcome::RollbackFails);
    agents.nodes.insert("n004".into(), AgentOutcome::Silent);
    drive(&mut w, &agents);
    let t = w.engine.task(&task.id).unwrap();
    assert!(
        matches!(&t.state, TaskState::Failed(r) if r.contains("exceeds 10% after")),
        "{:?}",
        t.state
    );
    let c = sim::counts(&w.engine, &task.id).unwrap();
    assert_eq!(c["failed-rolled-back"], 1);
    assert_eq!(c["failed-rollback-failed"], 1);
    assert_eq!(c["unknown"], 1);
    assert_eq!(c["cancelled"], 10, "the rest wave never starts: {c:?}");
}

#[test]
fn rollback_puts_the_previous_version_back_on_upgraded_nodes() {
    let policy = r#"
        fn evaluate(ctx, report) {
            if report.failed_rolled_back > 0 { #{ verdict: "rollback", reason: "a node failed" } }
            else { #{ verdict: "proceed" } }
        }
        fn plan(ctx, nodes) {
            [#{ name: "a", nodes: [nodes[0].id, nodes[1].id] }, #{ name: "b", nodes: [nodes[2].id, nodes[3].id] }]
        }
    "#;
    let mut w = world(fleet(4, "1.12"), &[("rb", policy)]);
    let task = w.engine.create(spec("rb", "rb", json!({}))).unwrap();
    let mut agents = Agents::default();
    agents.nodes.insert("n003".into(), AgentOutcome::Fail);
    let timeline = sim::run(&mut w.engine, &w.clock, &agents, 1000, 3_600_000).unwrap();
    let t = w.engine.task(&task.id).unwrap();
    assert_eq!(t.state, TaskState::RolledBack);
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(states["n000"], "rolled-back");
    assert_eq!(states["n002"], "rolled-back");
    assert_eq!(states["n003"], "failed-rolled-back");
    assert!(
        timeline.iter().any(|s| s.what == "restore 1.12 on n000"),
        "{timeline:?}"
    );
}

#[test]
fn nothing_starts_outside_the_window_monday_to_friday() {
    // 02:00-03:00 UTC on weekdays; the clock starts Monday 00:00.
    let params = json!({ "schedule": { "windows": [
        { "cron": "0 2 * * 1-5", "duration_minutes": 60, "timezone": "UTC" } ] } });
    let mut w = world(fleet(3, "1.12"), &[]);
    let task = w
        .engine
        .create(spec("windowed", "default", params))
        .unwrap();
    assert!(w.engine.tick().unwrap().is_empty(), "closed at 00:00");
    drive(&mut w, &Agents::default());
    let first = w
        .store
        .events(&task.id, 0, 100)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "node.offered")
        .unwrap();
    assert_eq!(
        first.at,
        MONDAY + 2 * 3600 * 1000,
        "starts when the window opens"
    );
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Succeeded);

    // A bad window is refused at creation.
    let bad = json!({ "schedule": { "windows": [
        { "cron": "0 2 * * *", "duration_minutes": 10, "timezone": "UTC" } ] } });
    let err = w
        .engine
        .create(spec("bad", "default", bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("below the 30 min minimum"), "{err}");
}

#[test]
fn pull_is_offered_through_on_request_and_refused_for_filtered_scope() {
    let mut w = world(fleet(2, "1.12"), &[]);
    let mut s = spec("pull", "default", json!({}));
    s.method = Method::Pull;
    let task = w.engine.create(s.clone()).unwrap();
    assert!(w.engine.tick().unwrap().is_empty(), "pull pushes nothing");
    let offer = w.engine.request("n000").unwrap();
    assert!(
        matches!(offer, Some(Command::Deliver { ref version, .. }) if version == "v1.13"),
        "{offer:?}"
    );
    assert!(w.engine.request("n000").unwrap().is_none(), "offered once");
    assert!(w.engine.request("stranger").unwrap().is_none());
    assert_eq!(sim::states(&w.engine, &task.id).unwrap()["n000"], "offered");

    s.name = "filtered".into();
    s.scope = Scope::Selector(Selector {
        labels: vec![("tier".into(), "edge".into())],
        ..Default::default()
    });
    let err = w.engine.create(s).unwrap_err().to_string();
    assert!(
        err.contains("pull (upon device request) needs scope `all`"),
        "{err}"
    );
}

/// An `on-request` that throws pauses its pull task like any hook's
/// failure (invariant 4), and the asking device gets no work. Failed
/// before: every ask answered an error and the task ran on, unpaused, with
/// nothing in its events.
#[test]
fn a_failing_on_request_pauses_its_pull_task() {
    let broken = r#"fn on_request(ctx, node) { throw "pull is broken"; }"#;
    let mut w = world(fleet(2, "1.12"), &[("broken", broken)]);
    let mut s = spec("pull", "broken", json!({}));
    s.method = Method::Pull;
    let task = w.engine.create(s).unwrap();
    w.engine.tick().unwrap();
    assert_eq!(w.engine.request("n000").unwrap(), None);
    let state = w.engine.task(&task.id).unwrap().state;
    assert!(
        matches!(&state, TaskState::Paused(r) if r.contains("pull is broken")),
        "{state:?}"
    );
    let errors = w
        .engine
        .events(&task.id, 0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "policy.error")
        .count();
    assert_eq!(errors, 1);
    // Paused: the next device gets nothing and the policy is not called.
    assert_eq!(w.engine.request("n001").unwrap(), None);
    assert_eq!(sim::states(&w.engine, &task.id).unwrap()["n000"], "queued");
}

#[test]
fn a_failing_policy_pauses_only_its_task() {
    let broken = r#"fn plan(ctx, nodes) { throw "boom"; }"#;
    let mut nodes = fleet(2, "1.12");
    nodes.extend((0..2).map(|i| {
        let mut n = Node::new(format!("m{i}"), "1.12");
        n.labels = vec![("tier".into(), "core".into())];
        n
    }));
    let mut w = world(nodes, &[("broken", broken)]);
    let mut bad = spec("bad", "broken", json!({}));
    bad.scope = Scope::Selector(Selector {
        ids: vec!["n000".into(), "n001".into()],
        ..Default::default()
    });
    let bad = w.engine.create(bad).unwrap();
    // (Another target: two active tasks never share package and target.)
    let mut good = spec("good", "default", json!({}));
    good.target = Target::Version("1.14".into());
    good.scope = Scope::Selector(Selector {
        labels: vec![("tier".into(), "core".into())],
        ..Default::default()
    });
    let good = w.engine.create(good).unwrap();
    drive(&mut w, &Agents::default());
    let b = w.engine.task(&bad.id).unwrap();
    assert!(
        matches!(&b.state, TaskState::Paused(r) if r.contains("boom")),
        "{:?}",
        b.state
    );
    assert_eq!(w.engine.task(&good.id).unwrap().state, TaskState::Succeeded);
}

#[test]
fn approval_waits_for_promote() {
    let mut w = world(fleet(20, "1.12"), &[]);
    let task = w
        .engine
        .create(spec("gated", "canary", json!({ "approval": true })))
        .unwrap();
    drive(&mut w, &Agents::default());
    let t = w.engine.task(&task.id).unwrap();
    assert!(t.awaiting_approval && t.current_wave == 1, "{t:?}");
    assert_eq!(sim::counts(&w.engine, &task.id).unwrap()["succeeded"], 1);
    w.engine.promote(&task.id).unwrap();
    assert!(
        w.engine.promote(&task.id).is_err(),
        "nothing left to promote right now"
    );
    drive(&mut w, &Agents::default()); // wave 2 runs, wave 3 waits again
    assert_eq!(sim::counts(&w.engine, &task.id).unwrap()["succeeded"], 2);
}

#[test]
fn an_engine_over_the_same_store_resumes_where_the_last_one_stopped() {
    let mut w = world(fleet(5, "1.12"), &[]);
    let task = w
        .engine
        .create(spec("resume", "default", json!({})))
        .unwrap();
    // Hand the nodes over, finish two, then "crash" (drop the engine).
    let commands = w.engine.tick().unwrap();
    assert_eq!(commands.len(), 5);
    w.engine.report("n000", RunEvent::Succeeded).unwrap();
    w.engine.report("n001", RunEvent::Succeeded).unwrap();
    let World0 { clock, store, .. } = w;
    let mut again = engine_with_default_policy(
        store.clone(),
        Arc::new(MemoryFleet::new(fleet(5, "1.12"))),
        &clock,
    );
    // Nothing is handed over twice: the three in flight stay offered.
    assert!(again.tick().unwrap().is_empty());
    for n in ["n002", "n003", "n004"] {
        again.report(n, RunEvent::Succeeded).unwrap();
    }
    again.tick().unwrap();
    assert_eq!(again.task(&task.id).unwrap().state, TaskState::Succeeded);
    let offered = store
        .events(&task.id, 0, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "node.offered")
        .count();
    assert_eq!(offered, 5, "each node handed over exactly once");
    // A report for a node in no task is refused.
    assert!(matches!(
        again.report("n000", RunEvent::Succeeded),
        Err(EngineError::NotInTask { .. })
    ));
}

/// The policy `default` (every hook at its default), but a disk fault
/// while `failing`.
struct FaultyDisk {
    failing: std::sync::atomic::AtomicBool,
}

impl PolicySource for FaultyDisk {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            let e = std::io::Error::from_raw_os_error(5); // EIO
            return Err(PolicyError::io(name, "reading policies/default.rhai", e));
        }
        Scripts::default_policy("").load(name, world)
    }
}

/// A disk fault reading a task's policy is not the policy failing: the task
/// is not paused (nobody would need to resume it), the next tick tries again.
/// Failed before: the fault paused the task like a trapping policy.
#[test]
fn a_disk_fault_loading_the_policy_is_retried_not_a_pause() {
    let mut w = world(fleet(3, "1.12"), &[]);
    let task = w
        .engine
        .create(spec("faulty", "default", json!({})))
        .unwrap();
    let World0 { clock, store, .. } = w;
    // A restarted engine loads the policy on its first tick: the disk fails.
    let source = Arc::new(FaultyDisk {
        failing: true.into(),
    });
    let fleet = Arc::new(MemoryFleet::new(fleet(3, "1.12")));
    let mut again = engine_over(store, fleet, &clock, source.clone());
    // Ticks come every 250 ms in the runner: two minutes of a failing disk.
    for _ in 0..480 {
        assert!(again.tick().unwrap().is_empty());
        clock.advance(250);
    }
    let state = again.task(&task.id).unwrap().state;
    assert!(!matches!(state, TaskState::Paused(_)), "{state:?}");
    // The operator sees it in the task's events once, not once a tick.
    let kinds = |engine: &Engine| -> Vec<String> {
        engine
            .events(&task.id, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| k.starts_with("policy."))
            .collect()
    };
    assert_eq!(kinds(&again), ["policy.unreadable"]);
    // The disk is back: the task goes on without anyone resuming it.
    source
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    sim::run(&mut again, &clock, &Agents::default(), 1000, 3600 * 1000).unwrap();
    assert_eq!(again.task(&task.id).unwrap().state, TaskState::Succeeded);
    // Every node was upgraded: the fault did not skip the targeting (it
    // did before: `succeeded` with every node pending, no waves planned).
    let states = sim::states(&again, &task.id).unwrap();
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(states.values().all(|s| s == "succeeded"), "{states:?}");
    assert_eq!(
        kinds(&again)[..3],
        ["policy.unreadable", "policy.readable", "policy.plan"]
    );
}

/// The policy `default`: `broken` while `failing`, every hook at its
/// default after.
struct Mended {
    broken: Scripts,
    failing: std::sync::atomic::AtomicBool,
}

impl Mended {
    fn new(broken: &str) -> Mended {
        Mended {
            broken: Scripts::default_policy(broken),
            failing: true.into(),
        }
    }
}

impl PolicySource for Mended {
    fn load(&self, name: &str, world: World) -> Result<Box<dyn Policy>, PolicyError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            self.broken.load(name, world)
        } else {
            Scripts::default_policy("").load(name, world)
        }
    }
}

/// A policy that fails during targeting pauses its task before anything
/// was planned. Resumed once the policy is mended, the task targets and
/// plans again and upgrades its nodes. Failed before: it completed at once,
/// `succeeded` with every node still pending (no waves to dispatch).
#[test]
fn a_task_paused_before_its_plan_targets_again_when_resumed() {
    let mut w = world(fleet(3, "1.12"), &[]);
    let task = w
        .engine
        .create(spec("mended", "default", json!({})))
        .unwrap();
    let World0 { clock, store, .. } = w;
    let source = Arc::new(Mended::new(
        r#"fn select(ctx, nodes) { throw "select is broken" }"#,
    ));
    let fleet = Arc::new(MemoryFleet::new(fleet(3, "1.12")));
    let mut again = engine_over(store, fleet, &clock, source.clone());
    again.tick().unwrap();
    let state = again.task(&task.id).unwrap().state;
    assert!(
        matches!(&state, TaskState::Paused(r) if r.contains("select is broken")),
        "{state:?}"
    );
    // Paused, it stays paused: nothing completes it behind the operator.
    for _ in 0..5 {
        clock.advance(1000);
        again.tick().unwrap();
    }
    assert!(matches!(
        again.task(&task.id).unwrap().state,
        TaskState::Paused(_)
    ));
    source
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    again.resume(&task.id).unwrap();
    sim::run(&mut again, &clock, &Agents::default(), 1000, 3600 * 1000).unwrap();
    assert_eq!(again.task(&task.id).unwrap().state, TaskState::Succeeded);
    let states = sim::states(&again, &task.id).unwrap();
    assert_eq!(states.len(), 3, "{states:?}");
    assert!(states.values().all(|s| s == "succeeded"), "{states:?}");
    assert_eq!(again.task(&task.id).unwrap().waves.len(), 1);
}

/// The same for a node an increment task found later: its `select`
/// failed, the task paused with the node's run created but undecided.
/// Resumed, the next scan looks at it again. Failed before: the run stayed
/// `pending` for good (only skipped runs were looked at again), the node
/// held by the task and never upgraded.
#[test]
fn a_node_whose_increment_targeting_failed_is_targeted_again() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let inventory = Arc::new(MemoryFleet::new(fleet(2, "1.12")));
    let source = Arc::new(Mended::new(
        r#"fn select(ctx, nodes) {
            nodes.map(|n| if n.id == "late" { throw "late is trouble" } else { #{ decision: "include" } })
        }"#,
    ));
    let store = Arc::new(MemoryStore::new());
    let mut engine = engine_over(store, inventory.clone(), &clock, source.clone());
    let mut s = spec("inc", "default", json!({}));
    s.strategy = serde_json::from_value(json!("increment")).unwrap();
    let task = engine.create(s).unwrap();
    // Two nodes take a while, so the task is running when "late" registers.
    let agents = Agents {
        latency_ms: 2 * 60_000,
        ..Default::default()
    };
    let mut agents_sim = sim::Sim::new(clock.clone(), agents);
    agents_sim.step(&mut engine).unwrap();
    inventory.upsert(Node::new("late", "1.12"));
    for _ in 0..3 {
        clock.advance(60_000);
        agents_sim.step(&mut engine).unwrap();
    }
    let state = engine.task(&task.id).unwrap().state;
    assert!(
        matches!(&state, TaskState::Paused(r) if r.contains("late is trouble")),
        "{state:?}"
    );
    source
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    engine.resume(&task.id).unwrap();
    for _ in 0..60 {
        if !engine.has_active() {
            break;
        }
        if agents_sim.step(&mut engine).unwrap() {
            clock.advance(60_000);
        }
    }
    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(
        states.get("late").map(String::as_str),
        Some("succeeded"),
        "{states:?}"
    );
    assert_eq!(engine.task(&task.id).unwrap().state, TaskState::Succeeded);
}

#[test]
fn silent_and_hanging_nodes_run_into_the_node_timeout() {
    let mut w = world(fleet(3, "1.12"), &[]);
    let mut s = spec("timeouts", "default", json!({}));
    s.node_timeout_seconds = 600;
    let task = w.engine.create(s).unwrap();
    let mut agents = Agents::default();
    agents.nodes.insert("n000".into(), AgentOutcome::Silent);
    agents.nodes.insert("n001".into(), AgentOutcome::Hang);
    drive(&mut w, &agents);
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(states["n000"], "unknown");
    assert_eq!(states["n001"], "timed-out");
    assert_eq!(states["n002"], "succeeded");
    let late = w
        .store
        .events(&task.id, 0, 100)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "node.timed-out")
        .unwrap();
    assert!(
        late.at >= MONDAY + 600_000,
        "not before the timeout: {}",
        late.at - MONDAY
    );
    // The default evaluate pauses on failures.
    let t = w.engine.task(&task.id).unwrap();
    assert!(
        matches!(&t.state, TaskState::Paused(r) if r.contains("2 of 3 nodes failed")),
        "{:?}",
        t.state
    );
}

#[test]
fn retry_failed_runs_failed_nodes_again_within_the_retries() {
    let retry = r#"
        fn evaluate(ctx, report) {
            if report.failed_rolled_back > 0 { #{ verdict: "retry-failed" } } else { #{ verdict: "proceed" } }
        }
    "#;
    let mut w = world(fleet(2, "1.12"), &[("retry", retry)]);
    let mut s = spec("retry", "retry", json!({}));
    s.retries = 2;
    let task = w.engine.create(s).unwrap();
    let mut agents = Agents::default();
    agents.nodes.insert("n001".into(), AgentOutcome::Fail);
    drive(&mut w, &agents);
    let runs = w.engine.runs(&task.id).unwrap();
    let failing = runs.iter().find(|r| r.node_id == "n001").unwrap();
    assert_eq!(failing.attempts, 3, "1 try + 2 retries");
    assert_eq!(failing.state.name(), "failed-rolled-back");
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Succeeded);
}

#[test]
fn an_offline_node_gets_its_push_when_it_comes_back() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let mut nodes = fleet(3, "1.12");
    nodes[1].online = false;
    let inventory = Arc::new(MemoryFleet::new(nodes.clone()));
    let mut engine =
        engine_with_default_policy(Arc::new(MemoryStore::new()), inventory.clone(), &clock);
    let mut s = spec("offline", "default", json!({}));
    s.target = Target::Version("1.13".into());
    let task = engine.create(s).unwrap();
    sim::run(&mut engine, &clock, &Agents::default(), 60_000, 3_600_000).unwrap();
    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(states["n001"], "queued", "{states:?}");
    assert_eq!(states["n000"], "succeeded");
    assert!(
        engine.task(&task.id).unwrap().state.active(),
        "waits for the offline node"
    );

    nodes[1].online = true;
    inventory.upsert(nodes[1].clone());
    sim::run(&mut engine, &clock, &Agents::default(), 60_000, 3_600_000).unwrap();
    assert_eq!(sim::states(&engine, &task.id).unwrap()["n001"], "succeeded");
    assert_eq!(engine.task(&task.id).unwrap().state, TaskState::Succeeded);
}

#[test]
fn increment_adds_nodes_that_register_later_snapshot_does_not() {
    for (strategy, late_joins) in [("increment", true), ("snapshot", false)] {
        let clock = Arc::new(ManualClock::new(MONDAY));
        let inventory = Arc::new(MemoryFleet::new(fleet(2, "1.12")));
        let mut engine =
            engine_with_default_policy(Arc::new(MemoryStore::new()), inventory.clone(), &clock);
        let mut s = spec("inc", "default", json!({}));
        s.target = Target::Version("1.13".into());
        s.strategy = serde_json::from_value(json!(strategy)).unwrap();
        let task = engine.create(s).unwrap();
        // Two nodes hang so the task is still running when the newcomer registers.
        let agents = Agents {
            latency_ms: 2 * 60_000,
            ..Default::default()
        };
        clock.advance(0);
        engine.tick().unwrap();
        inventory.upsert(Node::new("late", "1.12"));
        inventory.upsert(Node::new("late-but-current", "1.13"));
        sim::run(&mut engine, &clock, &agents, 60_000, 3_600_000).unwrap();
        let states = sim::states(&engine, &task.id).unwrap();
        if late_joins {
            assert_eq!(
                states.get("late").map(String::as_str),
                Some("succeeded"),
                "{states:?}"
            );
            assert_eq!(
                states.get("late-but-current").map(String::as_str),
                Some("skipped")
            );
        } else {
            assert!(!states.contains_key("late"), "{states:?}");
        }
    }
}

#[test]
fn cancel_withdraws_waiting_work_and_frees_the_nodes() {
    let mut w = world(fleet(4, "1.12"), &[]);
    let mut s = spec("cancel-me", "default", json!({}));
    s.concurrency = 1;
    let task = w.engine.create(s).unwrap();
    assert_eq!(w.engine.tick().unwrap().len(), 1, "one node at a time");
    w.engine.report("n000", RunEvent::Downloading).unwrap();
    let t = w.engine.cancel(&task.id).unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(
        states["n000"], "downloading",
        "work in progress is not cancelled"
    );
    assert_eq!(states["n001"], "cancelled");
    assert!(w.engine.cancel(&task.id).is_err(), "cancelled once");
    // The waiting nodes are free for the next task; the one an agent is still
    // upgrading is not, until its agent reports.
    let next = w
        .engine
        .create(spec("again", "default", json!({})))
        .unwrap();
    w.engine.tick().unwrap();
    let states = sim::states(&w.engine, &next.id).unwrap();
    assert_eq!(states["n000"], "skipped", "{states:?}");
    assert!(
        ["n001", "n002", "n003"]
            .iter()
            .all(|n| states[*n] == "offered"),
        "{states:?}"
    );
    // An engine started over the same store finds the draining task: n000's
    // work is still out and its report is still taken.
    let restarted = engine_with_default_policy(
        w.store.clone(),
        Arc::new(MemoryFleet::new(fleet(4, "1.12"))),
        &w.clock,
    );
    assert!(
        restarted
            .open_work()
            .iter()
            .any(|c| matches!(c, Command::Deliver { task: t, node, .. } if *t == task.id && node == "n000")),
        "a restart forgot the draining task"
    );
    drop(restarted);
    // The cancelled task still takes its agent's reports, then lets go.
    w.engine.report("n000", RunEvent::Upgrading).unwrap();
    w.engine.report("n000", RunEvent::Verifying).unwrap();
    w.engine.report("n000", RunEvent::Succeeded).unwrap();
    assert_eq!(
        sim::states(&w.engine, &task.id).unwrap()["n000"],
        "succeeded"
    );
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Cancelled);
    assert!(
        w.engine
            .open_work()
            .iter()
            .all(|c| !matches!(c, Command::Deliver { task: t, .. } if *t == task.id)),
        "the cancelled task has nothing out any more"
    );
    w.engine.cancel(&next.id).unwrap();
    let third = w
        .engine
        .create(spec("third", "default", json!({})))
        .unwrap();
    w.engine.tick().unwrap();
    let states = sim::states(&w.engine, &third.id).unwrap();
    assert_eq!(states["n000"], "offered", "n000 is free again: {states:?}");
}

#[test]
fn a_trial_wave_judged_healthy_is_made_permanent() {
    let mut w = world(fleet(3, "1.12"), &[]);
    let mut s = spec("trial", "default", json!({}));
    s.permanent = false;
    let task = w.engine.create(s).unwrap();
    let delivered = w.engine.tick().unwrap();
    assert_eq!(delivered.len(), 3);
    assert!(delivered.iter().all(|c| matches!(
        c,
        Command::Deliver {
            permanent: false,
            ..
        }
    )));
    // Not before its wave is judged.
    assert!(
        w.engine.report("n000", RunEvent::MadePermanent).is_err(),
        "a node not asked to make its release permanent"
    );
    for n in ["n000", "n001", "n002"] {
        for e in [
            RunEvent::Downloading,
            RunEvent::Upgrading,
            RunEvent::Verifying,
            RunEvent::Succeeded,
        ] {
            w.engine.report(n, e).unwrap();
        }
    }
    let commits = w.engine.tick().unwrap();
    let nodes: Vec<&str> = commits
        .iter()
        .filter_map(|c| match c {
            Command::MakePermanent { node, version, .. } if version == "v1.13" => {
                Some(node.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(nodes, ["n000", "n001", "n002"]);
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Succeeded);
    // The task holds its nodes until every agent confirmed (or a restart
    // would find the work still open).
    assert_eq!(w.engine.open_work().len(), 3);
    w.engine.report("n000", RunEvent::MadePermanent).unwrap();
    w.engine.report("n001", RunEvent::MadePermanent).unwrap();
    w.engine
        .report(
            "n002",
            RunEvent::Rejected {
                reason: "disk full".into(),
            },
        )
        .unwrap();
    assert!(w.engine.open_work().is_empty());
    assert!(!w.engine.has_active(), "the task let go of its nodes");
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    let permanent = events.iter().filter(|e| e.kind == "node.permanent").count();
    assert_eq!(permanent, 2);
    assert!(
        events
            .iter()
            .any(|e| e.kind == "node.not-permanent" && e.detail.contains("disk full"))
    );
}

#[test]
fn a_permanent_task_sends_no_make_permanent() {
    let mut w = world(fleet(2, "1.12"), &[]);
    let task = w.engine.create(spec("perm", "default", json!({}))).unwrap();
    drive(&mut w, &Agents::default());
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Succeeded);
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    assert!(!events.iter().any(|e| e.kind == "node.permanent"));
}

#[test]
fn a_resume_after_a_pause_verdict_still_waits_for_the_next_waves_approval() {
    let mut w = world(fleet(20, "1.12"), &[]);
    let task = w
        .engine
        .create(spec(
            "gated",
            "canary",
            json!({ "threshold": 0.1, "min_finished": 5, "approval": true }),
        ))
        .unwrap();
    let mut agents = Agents::default();
    agents.nodes.insert("n000".into(), AgentOutcome::Fail);
    drive(&mut w, &agents);
    assert!(matches!(
        w.engine.task(&task.id).unwrap().state,
        TaskState::Paused(_)
    ));
    w.engine.resume(&task.id).unwrap();
    drive(&mut w, &agents);
    // Wave 2 needs a promote: nothing of it starts on the resume alone.
    let t = w.engine.task(&task.id).unwrap();
    assert!(t.awaiting_approval, "{t:?}");
    assert_eq!(sim::counts(&w.engine, &task.id).unwrap()["queued"], 19);
    w.engine.promote(&task.id).unwrap();
    w.engine.tick().unwrap();
    assert_eq!(sim::counts(&w.engine, &task.id).unwrap()["offered"], 1);
}

/// A policy reading `status`: the task's runs and counts while it decides,
/// and a node's outcome in an earlier task.
const STATUS_READER: &str = r#"
fn plan(ctx, nodes) {
    [#{ name: "first", nodes: [nodes[0].id] }, #{ name: "rest", nodes: nodes.extract(1).map(|n| n.id) }]
}
fn admit(ctx, node, now) {
    let h = node_history(node.id, 5);
    if h.len() > 0 && h[0].state == "failed-rolled-back" {
        return #{ admission: "never", value: `failed in ${h[0].task_id} (${h[0].version})` };
    }
    #{ admission: "now" }
}
fn evaluate(ctx, report) {
    let s = task_summary();
    let r = node_run("n000");
    if report.wave == 0 {
        return #{ verdict: "pause", reason: `total ${s.total} succeeded ${s.succeeded} failed ${s.failed} failed_rolled_back ${s.failed_rolled_back} pending ${s.pending}; n000 ${r.state} in wave ${r.wave}` };
    }
    #{ verdict: "proceed" }
}
"#;

#[test]
fn policies_read_the_task_status_and_earlier_outcomes() {
    let mut w = world(fleet(4, "1.12"), &[("status", STATUS_READER)]);
    // An earlier task in which n002 failed.
    let mut agents = Agents::default();
    agents.nodes.insert("n002".into(), AgentOutcome::Fail);
    let first = w
        .engine
        .create(spec("first", "default", json!({})))
        .unwrap();
    drive(&mut w, &agents);
    assert_eq!(
        sim::states(&w.engine, &first.id).unwrap()["n002"],
        "failed-rolled-back"
    );
    // The default policy paused on the failure; the operator ends the task.
    w.engine.cancel(&first.id).unwrap();
    assert!(!w.engine.task(&first.id).unwrap().state.active());
    // The simulated fleet still reports 1.12 everywhere, so all four are candidates.

    let task = w
        .engine
        .create(spec("second", "status", json!({})))
        .unwrap();
    let mut agents = Agents::default();
    agents.nodes.insert("n000".into(), AgentOutcome::Fail);
    drive(&mut w, &agents);
    let t = w.engine.task(&task.id).unwrap();
    assert_eq!(
        t.state,
        TaskState::Paused(
            "total 4 succeeded 0 failed 1 failed_rolled_back 1 pending 3; n000 failed-rolled-back in wave 0"
                .into()
        ),
    );
    w.engine.resume(&task.id).unwrap();
    drive(&mut w, &Agents::default());
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(states["n002"], "skipped", "{states:?}");
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    assert!(
        events.iter().any(|e| e.node.as_deref() == Some("n002")
            && e.detail
                .contains(&format!("failed in {} (v1.13)", first.id))),
        "{events:#?}"
    );
    assert_eq!(states["n001"], "succeeded");
}

/// Steps `sim` a minute at a time until no task is active (at most 1000 steps).
fn step_to_end(engine: &mut Engine, clock: &ManualClock, sim: &mut sim::Sim) {
    for _ in 0..1000 {
        if !engine.has_active() {
            break;
        }
        if sim.step(engine).unwrap() {
            clock.advance(60_000);
        }
    }
}

#[test]
fn increment_targets_a_skipped_node_again_only_when_its_reason_went_away() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let mut nodes = fleet(4, "1.12");
    nodes[1].healthy = false; // recovers later: joins
    nodes[2].healthy = false; // stays unhealthy: skipped once, not again and again
    nodes[3].version = "1.13".into(); // downgraded by hand later: joins
    let inventory = Arc::new(MemoryFleet::new(nodes));
    let mut engine =
        engine_with_default_policy(Arc::new(MemoryStore::new()), inventory.clone(), &clock);
    let mut s = spec("inc", "default", json!({}));
    s.target = Target::Version("1.13".into());
    s.strategy = serde_json::from_value(json!("increment")).unwrap();
    s.node_timeout_seconds = 3600;
    let task = engine.create(s).unwrap();
    // Slow agents keep the task running across many scans.
    let agents = Agents {
        latency_ms: 30 * 60_000,
        ..Default::default()
    };
    // Five minutes in, n001 recovers and n003 is downgraded by hand.
    let set = |node: &str, version: Option<&str>, healthy: Option<bool>| sim::Change::Set {
        node: node.into(),
        version: version.map(str::to_string),
        healthy,
        schedulable: None,
        online: None,
        metrics: None,
    };
    let later = clock.now() + 5 * 60_000;
    let mut sim = sim::Sim::new(clock.clone(), agents).with_fleet(
        inventory.clone(),
        vec![
            (later, set("n001", None, Some(true))),
            (later, set("n003", Some("1.12.0"), None)),
        ],
    );
    sim.step(&mut engine).unwrap();
    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(
        (&*states["n001"], &*states["n002"], &*states["n003"]),
        ("skipped", "skipped", "skipped")
    );
    step_to_end(&mut engine, &clock, &mut sim);

    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(states["n000"], "succeeded");
    assert_eq!(states["n001"], "succeeded", "{states:?}");
    assert_eq!(states["n002"], "skipped");
    assert_eq!(states["n003"], "succeeded", "{states:?}");
    let events = engine.events(&task.id, 0, 10_000).unwrap();
    let skips = |node: &str| {
        events
            .iter()
            .filter(|e| e.node.as_deref() == Some(node) && e.kind == "node.skipped")
            .count()
    };
    assert_eq!(skips("n002"), 1, "a node still unhealthy is not re-skipped");
    assert_eq!(skips("n001"), 1);
    assert!(
        events.iter().any(|e| e.kind == "task.increment"
            && e.detail == "2 skipped nodes changed and are targeted again"),
        "{events:#?}"
    );
    // The rollback target of a node that joined later is what it had then.
    let runs = engine.runs(&task.id).unwrap();
    let n003 = runs.iter().find(|r| r.node_id == "n003").unwrap();
    assert_eq!(n003.from_version, "1.12.0");
}

#[test]
fn increment_takes_a_node_once_another_task_lets_go_of_it() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let inventory = Arc::new(MemoryFleet::new(fleet(3, "1.12")));
    let mut engine =
        engine_with_default_policy(Arc::new(MemoryStore::new()), inventory.clone(), &clock);
    // The first task holds n000 and n001; its agents do not answer yet.
    let mut first = spec("first", "default", json!({}));
    first.target = Target::Version("1.13".into());
    first.scope = serde_json::from_value(json!({"selector": {"ids": ["n000", "n001"]}})).unwrap();
    let first = engine.create(first).unwrap();
    engine.tick().unwrap();
    // The increment task gets n002 (slow, so the task keeps running) and
    // skips the two busy ones.
    let mut s = spec("inc", "default", json!({}));
    s.target = Target::Version("1.14".into());
    s.strategy = serde_json::from_value(json!("increment")).unwrap();
    s.node_timeout_seconds = 3600;
    let task = engine.create(s).unwrap();
    let agents = Agents {
        latency_ms: 10 * 60_000,
        ..Default::default()
    };
    let mut sim = sim::Sim::new(clock.clone(), agents);
    sim.step(&mut engine).unwrap();
    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(
        (&*states["n000"], &*states["n001"], &*states["n002"]),
        ("skipped", "skipped", "offered"),
    );
    // The first task's work comes back failed; cancelled, it lets go.
    for n in ["n000", "n001"] {
        engine
            .report(
                n,
                RunEvent::FailedRolledBack {
                    error: "disk full".into(),
                },
            )
            .unwrap();
    }
    engine.cancel(&first.id).unwrap();
    step_to_end(&mut engine, &clock, &mut sim);
    let states = sim::states(&engine, &task.id).unwrap();
    assert!(states.values().all(|s| s == "succeeded"), "{states:?}");
}

#[test]
fn policies_read_the_metrics_agents_report() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let fleet = Arc::new(MemoryFleet::new(fleet(2, "1.12")));
    let guard = r#"
        fn evaluate(ctx, report) {
            let load = metric("n000", "load1");
            if load == () { return #{ verdict: "pause", reason: "no load1 from n000" }; }
            if load > 4.0 { return #{ verdict: "rollback", reason: `n000 load1 ${load} after the upgrade` }; }
            #{ verdict: "proceed" }
        }
        fn plan(ctx, nodes) { nodes.map(|n| #{ name: n.id, nodes: [n.id] }) }
    "#;
    let scripts = BTreeMap::from([("guard".to_string(), guard.to_string())]);
    let mut engine = Engine::new(
        Arc::new(MemoryStore::new()),
        fleet.clone(),
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Scripts(scripts)),
    )
    .unwrap();
    let mut s = spec("guarded", "guard", json!({}));
    s.target = Target::Version("1.13".into());
    let task = engine.create(s).unwrap();
    fleet.set_metrics("n000", BTreeMap::from([("load1".to_string(), 7.5)]));
    sim::run(&mut engine, &clock, &Agents::default(), 1000, 3_600_000).unwrap();
    let t = engine.task(&task.id).unwrap();
    assert_eq!(t.state, TaskState::RolledBack);
    let events = engine.events(&task.id, 0, 1000).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.detail.contains("n000 load1 7.5 after the upgrade")),
        "{events:#?}"
    );
    // Cleared: the policy sees nothing.
    fleet.set_metrics("n000", BTreeMap::new());
    let mut s = spec("guarded-again", "guard", json!({}));
    s.target = Target::Version("1.14".into());
    let task = engine.create(s).unwrap();
    sim::run(&mut engine, &clock, &Agents::default(), 1000, 3_600_000).unwrap();
    assert_eq!(
        engine.task(&task.id).unwrap().state,
        TaskState::Paused("no load1 from n000".into())
    );
}

#[test]
fn a_report_naming_another_task_is_refused_and_changes_nothing() {
    let mut w = world(fleet(2, "1.12"), &[]);
    let task = w.engine.create(spec("one", "default", json!({}))).unwrap();
    assert_eq!(w.engine.tick().unwrap().len(), 2);
    let before = w.store.runs(&task.id).unwrap();
    let results = w.engine.report_many_for(vec![
        ("n000".into(), Some("t999999".into()), RunEvent::Succeeded),
        ("n001".into(), Some(task.id.clone()), RunEvent::Downloading),
    ]);
    match &results[0] {
        Err(EngineError::Refused {
            task: t,
            reason: Refusal::OtherTask { actual, .. },
        }) => {
            assert_eq!(t, "t999999");
            assert_eq!(actual, &task.id);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let after = w.store.runs(&task.id).unwrap();
    assert_eq!(after[0], before[0], "the refused report changed nothing");
    assert_eq!(after[1].state.name(), "downloading");
}

#[test]
fn live_counts_match_the_runs_on_disk_and_end_with_the_task() {
    let mut w = world(fleet(5, "1.12"), &[]);
    let task = w.engine.create(spec("one", "default", json!({}))).unwrap();
    w.engine.tick().unwrap();
    let results = w.engine.report_many_for(vec![
        ("n000".into(), Some(task.id.clone()), RunEvent::Downloading),
        ("n001".into(), Some(task.id.clone()), RunEvent::Succeeded),
    ]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let on_disk = count_states(&w.store.runs(&task.id).unwrap());
    assert_eq!(on_disk.values().sum::<usize>(), 5);
    assert_eq!((on_disk["downloading"], on_disk["succeeded"]), (1, 1));
    let (live_task, counts) = w.engine.live_view(&task.id).expect("the task is live");
    assert_eq!(counts, on_disk);
    assert_eq!(live_task, w.store.task(&task.id).unwrap().unwrap());
    assert_eq!(
        w.engine.live_counts(),
        BTreeMap::from([(task.id.clone(), on_disk)])
    );
    // Once every node has finished and the task ended, it is no longer held.
    let rest: Vec<_> = ["n000", "n002", "n003", "n004"]
        .iter()
        .map(|n| (n.to_string(), Some(task.id.clone()), RunEvent::Succeeded))
        .collect();
    assert!(w.engine.report_many_for(rest).iter().all(Result::is_ok));
    for _ in 0..10 {
        w.engine.tick().unwrap();
        w.clock.advance(60);
    }
    assert!(!w.store.task(&task.id).unwrap().unwrap().state.active());
    assert!(w.engine.live_view(&task.id).is_none());
    assert!(w.engine.live_counts().is_empty());
    assert!(w.engine.live_view("t999").is_none());
}

/// A store whose commits fail while `failing` is set (a full disk, an I/O
/// error): the fault the engine must tell apart from a refusal.
struct FaultyStore {
    inner: MemoryStore,
    failing: std::sync::atomic::AtomicBool,
}

impl FaultyStore {
    fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::io("injected fault", "disk full"))
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        self.check()?;
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
    fn events(&self, task_id: &str, from_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.inner.events(task_id, from_seq, limit)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.flush()
    }
}

#[test]
fn a_failed_commit_is_a_fault_not_a_refusal_and_the_retried_report_applies_once() {
    let clock = Arc::new(ManualClock::new(MONDAY));
    let store = Arc::new(FaultyStore {
        inner: MemoryStore::new(),
        failing: Default::default(),
    });
    let scripts = BTreeMap::from([("default".to_string(), String::new())]);
    let mut engine = Engine::new(
        store.clone(),
        Arc::new(MemoryFleet::new(fleet(2, "1.12"))),
        Arc::new(MemoryDelivery::default()),
        clock.clone(),
        Arc::new(Scripts(scripts)),
    )
    .unwrap();
    let mut s = spec("one", "default", json!({}));
    s.target = Target::Version("1.13".into());
    let task = engine.create(s).unwrap();
    assert_eq!(engine.tick().unwrap().len(), 2);
    let report = |engine: &mut Engine, event: RunEvent| {
        engine
            .report_many_for(vec![("n000".into(), Some(task.id.clone()), event)])
            .pop()
            .unwrap()
    };
    assert!(report(&mut engine, RunEvent::Downloading).is_ok());
    let events_before = store.events(&task.id, 0, 1000).unwrap().len();

    store.fail(true);
    match report(&mut engine, RunEvent::Succeeded) {
        Err(EngineError::Store(e)) => assert!(e.to_string().contains("disk full"), "{e}"),
        other => panic!("expected a store fault, got {other:?}"),
    }
    // Not applied in memory either: nothing acts on what is not stored.
    let run = |engine: &Engine| {
        engine
            .runs(&task.id)
            .unwrap()
            .into_iter()
            .find(|r| r.node_id == "n000")
            .unwrap()
    };
    assert_eq!(run(&engine).state.name(), "downloading");
    assert_eq!(engine.live_view(&task.id).unwrap().1["downloading"], 1);

    store.fail(false);
    assert!(report(&mut engine, RunEvent::Succeeded).is_ok());
    assert_eq!(run(&engine).state.name(), "succeeded");
    let events = store.events(&task.id, 0, 1000).unwrap();
    let succeeded = events
        .iter()
        .filter(|e| e.node.as_deref() == Some("n000") && e.kind == "node.succeeded")
        .count();
    assert_eq!(succeeded, 1, "{events:#?}");
    assert_eq!(events.len(), events_before + 1, "{events:#?}");
    // The same report again (its answer was lost): taken again, not refused,
    // and not applied twice.
    assert!(report(&mut engine, RunEvent::Succeeded).is_ok());
    assert_eq!(
        store.events(&task.id, 0, 1000).unwrap().len(),
        events_before + 1
    );
}

/// Issue 17.1: a node `admit` leaves out, and a node that leaves the
/// inventory, end their runs for the wave's accounting.
#[test]
fn a_node_left_out_by_admit_or_gone_from_the_inventory_does_not_hang_its_wave() {
    let never_n001 = r#"
        fn admit(ctx, node, now) {
            if node.id == "n001" { #{ admission: "never", value: "under maintenance" } } else { #{ admission: "now" } }
        }
        fn evaluate(ctx, report) {
            if report.skipped == 1 && report.succeeded == 2 { #{ verdict: "proceed" } }
            else { #{ verdict: "pause", reason: `skipped ${report.skipped} succeeded ${report.succeeded}` } }
        }
    "#;
    let mut w = world(fleet(3, "1.12"), &[("never", never_n001)]);
    let task = w.engine.create(spec("never", "never", json!({}))).unwrap();
    drive(&mut w, &Agents::default());
    let states = sim::states(&w.engine, &task.id).unwrap();
    assert_eq!(states["n001"], "skipped", "{states:?}");
    assert_eq!(
        w.engine.task(&task.id).unwrap().state,
        TaskState::Succeeded,
        "{states:?}"
    );

    // A node that leaves the inventory while queued: its run is cancelled
    // and the wave still ends.
    let fleet = Arc::new(MemoryFleet::new(fleet(3, "1.12")));
    let clock = Arc::new(ManualClock::new(MONDAY));
    let store = Arc::new(MemoryStore::new());
    let mut engine = engine_with_default_policy(store, fleet.clone(), &clock);
    let mut s = spec("gone", "default", json!({}));
    s.target = flotilla_model::Target::Version("1.13.0".into());
    s.concurrency = 1;
    let task = engine.create(s).unwrap();
    assert_eq!(engine.tick().unwrap().len(), 1, "one at a time");
    fleet.remove("n002");
    engine.report("n000", RunEvent::Succeeded).unwrap();
    sim::run(&mut engine, &clock, &Agents::default(), 1000, 3600 * 1000).unwrap();
    let states = sim::states(&engine, &task.id).unwrap();
    assert_eq!(states["n002"], "cancelled", "{states:?}");
    assert_eq!(engine.task(&task.id).unwrap().state, TaskState::Succeeded);
}

/// Issue 17.2: `retries` re-queue a failed node on their own, after a
/// backoff, whatever the policy; `evaluate` sees the node only at the end.
#[test]
fn retries_rerun_a_failed_node_on_their_own_after_a_backoff() {
    let seen = r#"
        fn evaluate(ctx, report) {
            if report.failed_rolled_back > 0 { #{ verdict: "abort", reason: `saw ${report.failed_rolled_back} failed` } }
            else { #{ verdict: "proceed" } }
        }
    "#;
    let mut w = world(fleet(2, "1.12"), &[("strict", seen)]);
    let mut s = spec("retry", "strict", json!({}));
    s.retries = 1;
    let task = w.engine.create(s).unwrap();
    let mut agents = Agents::default();
    agents.attempts.insert(
        "n001".into(),
        vec![AgentOutcome::Fail, AgentOutcome::Succeed],
    );
    drive(&mut w, &agents);
    let runs = w.engine.runs(&task.id).unwrap();
    let n001 = runs.iter().find(|r| r.node_id == "n001").unwrap();
    assert_eq!(n001.state.name(), "succeeded");
    assert_eq!(n001.attempts, 2);
    assert_eq!(w.engine.task(&task.id).unwrap().state, TaskState::Succeeded);
    let events = w.engine.events(&task.id, 0, 1000).unwrap();
    let retry = events
        .iter()
        .find(|e| e.kind == "node.retry")
        .expect("a retry event");
    assert!(
        retry.detail.contains("attempt 2 of 2") && retry.detail.contains("failed-rolled-back"),
        "{retry:?}"
    );
    // The backoff: the second offer is at least `backoff_seconds` after the failure.
    let failed_at = events
        .iter()
        .find(|e| e.kind == "node.failed-rolled-back")
        .unwrap()
        .at;
    let offered_again = events
        .iter()
        .filter(|e| e.kind == "node.offered" && e.node.as_deref() == Some("n001"))
        .nth(1)
        .unwrap()
        .at;
    assert!(
        offered_again >= failed_at + 30_000,
        "{failed_at} {offered_again}"
    );

    // Per failure kind: timed-out runs are not retried when `timed_out: 0`,
    // and the retries used up, `evaluate` sees the failure.
    let per_kind = |outcome: AgentOutcome| {
        let mut w = world(fleet(2, "1.12"), &[("strict", seen)]);
        let mut s = spec("kinds", "strict", json!({}));
        s.retry = Some(flotilla_model::Retry {
            failed: Some(2),
            timed_out: Some(0),
            backoff_seconds: 1,
        });
        let task = w.engine.create(s).unwrap();
        let mut agents = Agents::default();
        agents.nodes.insert("n001".into(), outcome);
        drive(&mut w, &agents);
        let runs = w.engine.runs(&task.id).unwrap();
        let n001 = runs.into_iter().find(|r| r.node_id == "n001").unwrap();
        (n001, w.engine.task(&task.id).unwrap().state)
    };
    let (n001, state) = per_kind(AgentOutcome::Fail);
    assert_eq!(n001.attempts, 3, "1 try + 2 retries");
    assert_eq!(state, TaskState::Failed("saw 1 failed".into()));
    let (n001, _) = per_kind(AgentOutcome::Hang);
    assert_eq!((n001.state.name(), n001.attempts), ("timed-out", 1));
}

/// Issue 17.10: two active tasks may not share a name; an ended task's name
/// is free again.
#[test]
fn two_active_tasks_may_not_share_a_name() {
    let mut w = world(fleet(2, "1.12"), &[]);
    let first = w
        .engine
        .create(versioned("nightly", "1.13.0", json!({})))
        .unwrap();
    let mut other = versioned("nightly", "1.14.0", json!({}));
    other.package = "mosquitto".into();
    match w.engine.create(other.clone()) {
        Err(EngineError::NameTaken { name, task }) => {
            assert_eq!(
                (name.as_str(), task.as_str()),
                ("nightly", first.id.as_str())
            );
        }
        other => panic!("expected the name to be refused, got {other:?}"),
    }
    w.engine.cancel(&first.id).unwrap();
    drive(&mut w, &Agents::default());
    assert!(!w.engine.task(&first.id).unwrap().state.active());
    w.engine.create(other).unwrap();
}
