//! A policy can never take the runner down: loops hit the CPU budget, hoarding
//! hits the memory cap, panics and bad output become typed errors, and the next
//! call on the same policy works.

use flotilla_model::{Node, TaskContext, Verdict, WaveReport};
use flotilla_policy::world::World;
use flotilla_policy::{Limits, Policy, PolicyError, RhaiPolicy, WasmPolicy, WasmRuntime};
use flotilla_tests::component;
use serde_json::json;
use std::time::{Duration, Instant};

fn limits() -> Limits {
    Limits {
        cpu: Duration::from_millis(100),
        cpu_per_node: Duration::ZERO,
        memory_bytes: 32 << 20,
        ..Limits::default()
    }
}

fn misbehave() -> WasmPolicy {
    misbehave_with(limits())
}

fn misbehave_with(limits: Limits) -> WasmPolicy {
    let rt = WasmRuntime::new(None).unwrap();
    rt.load_file(&component("misbehave"))
        .unwrap()
        .instantiate(World::empty(), limits)
        .unwrap()
}

/// For the memory tests: a CPU budget far above what filling the cap takes,
/// so the cap is what stops the call even on a loaded machine (4096 nodes
/// lowered and 36 MiB touched took over 100 ms of CPU in CI).
fn memory_limits() -> Limits {
    Limits {
        cpu: Duration::from_secs(10),
        ..limits()
    }
}

fn ctx(mode: &str) -> TaskContext {
    TaskContext::new("2.0.0").with_params(json!({ "mode": mode }))
}

fn nodes() -> Vec<Node> {
    (0..10)
        .map(|i| Node::new(format!("n{i}"), "1.0.0"))
        .collect()
}

/// The next call on the same policy behaves.
fn still_works(p: &mut dyn Policy) {
    let out = p
        .select(&ctx("behave"), &nodes())
        .expect("the next call must succeed");
    assert_eq!(out.len(), 10);
}

#[test]
fn wasm_infinite_loop_is_stopped_within_its_budget() {
    let mut p = misbehave();
    let t = Instant::now();
    let err = p.select(&ctx("loop"), &nodes()).unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, PolicyError::Budget { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("hook select exceeded its CPU budget (100 ms)"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_millis(600),
        "{took:?}"
    );
    still_works(&mut p);
}

/// `select` keeps no state between calls, so an instance whose memory grew
/// (an interpreter's garbage, here a leak of 6 MiB a call) is swapped for a
/// fresh one between chunks, on every worker: 12 chunks leak 72 MiB against a
/// 32 MiB cap and the call still succeeds. Failed on the worker threads
/// before (each kept its instance across its chunks).
#[test]
fn select_swaps_an_instance_whose_memory_grew_between_chunks() {
    let many: Vec<Node> = (0..12 * flotilla_model::CHUNK)
        .map(|i| Node::new(format!("n{i}"), "1.0.0"))
        .collect();
    for workers in [1, 2] {
        let mut p = misbehave_with(memory_limits());
        p.set_workers(workers);
        let out = p
            .select(&ctx("leak"), &many)
            .unwrap_or_else(|e| panic!("{workers} worker(s): {e}"));
        assert_eq!(out.len(), many.len());
    }
}

/// A Wasm call's memory cap grows with the nodes handed to it (1 KiB each by
/// default): the nodes are lowered into the guest's memory.
#[test]
fn the_memory_cap_grows_with_the_nodes_handed_over() {
    let many: Vec<Node> = (0..flotilla_model::CHUNK)
        .map(|i| Node::new(format!("n{i}"), "1.0.0"))
        .collect();
    let mut p = misbehave_with(memory_limits());
    let err = p.select(&ctx("alloc"), &many).unwrap_err();
    assert!(matches!(err, PolicyError::Memory { .. }), "{err}");
    assert!(err.to_string().contains("memory cap (36 MiB)"), "{err}");
}

#[test]
fn wasm_unbounded_allocation_is_stopped_at_the_cap() {
    let mut p = misbehave_with(memory_limits());
    let err = p.select(&ctx("alloc"), &nodes()).unwrap_err();
    assert!(matches!(err, PolicyError::Memory { .. }), "{err}");
    assert!(err.to_string().contains("memory cap (32 MiB)"), "{err}");
    still_works(&mut p);
}

#[test]
fn wasm_panic_is_a_trap_that_carries_the_panic_message() {
    let mut p = misbehave();
    let err = p.select(&ctx("panic"), &nodes()).unwrap_err();
    assert!(matches!(err, PolicyError::Trap { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("policy misbehave: hook select trapped"),
        "{msg}"
    );
    assert!(msg.contains("misbehave was told to panic"), "{msg}");
    still_works(&mut p);
}

#[test]
fn wasm_invalid_output_gets_a_clear_error() {
    let mut p = misbehave();
    let cases = [
        (
            "unknown-node",
            "names node \"ghost\", which is not among the selected nodes",
        ),
        ("empty-wave", "wave 1 (\"second\") is empty"),
        ("duplicate", "node \"n0\" is in wave 0 and again in wave 1"),
    ];
    for (mode, want) in cases {
        let err = p.plan(&ctx(mode), &nodes()).unwrap_err();
        assert!(matches!(err, PolicyError::Invalid { .. }), "{mode}: {err}");
        assert!(err.to_string().contains(want), "{mode}: {err}");
    }
    let err = p
        .evaluate(&ctx("empty-reason"), &WaveReport::default())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("hook evaluate returned invalid output: `pause` must say why"),
        "{err}"
    );
    let err = p.select(&ctx("short"), &nodes()).unwrap_err();
    assert!(
        err.to_string()
            .contains("returned 9 decisions for a chunk of 10 nodes"),
        "{err}"
    );
    still_works(&mut p);
}

/// A fleet whose `count` takes 250 ms of wall time and no CPU (a store
/// busy elsewhere).
struct SlowFleet;

impl flotilla_policy::world::Fleet for SlowFleet {
    fn query(&self, _: &flotilla_model::Selector, _: u64, _: u32) -> Vec<Node> {
        Vec::new()
    }
    fn get(&self, _: &str) -> Option<Node> {
        None
    }
    fn count(&self, _: &flotilla_model::Selector) -> u64 {
        std::thread::sleep(Duration::from_millis(250));
        7
    }
}

/// The budget is the CPU time of the call's thread: 250 ms waiting on a host
/// function (or on a loaded machine's neighbours) is not the policy's, while
/// a loop still stops at its 100 ms. Both calls failed with a wall-clock
/// budget.
#[test]
fn the_budget_counts_the_calls_cpu_time_not_time_spent_waiting() {
    let world = || World {
        fleet: std::sync::Arc::new(SlowFleet),
        ..World::empty()
    };
    let rt = WasmRuntime::new(None).unwrap();
    let mut wasm = rt
        .load_file(&component("misbehave"))
        .unwrap()
        .instantiate(world(), limits())
        .unwrap();
    let src = r#"
        fn select(ctx, nodes) {
            if fleet_count(#{}) != 7 { throw "count"; }
            nodes.map(|n| #{ decision: "include" })
        }
    "#;
    let mut rhai = RhaiPolicy::load_str("rhai-count", src, world(), limits()).unwrap();
    for p in [&mut wasm as &mut dyn Policy, &mut rhai] {
        let t = Instant::now();
        let out = p
            .select(&ctx("count"), &nodes())
            .unwrap_or_else(|e| panic!("{}: {e}", p.name()));
        assert_eq!(out.len(), 10);
        assert!(t.elapsed() >= Duration::from_millis(250));
    }
    let t = Instant::now();
    let err = wasm.select(&ctx("loop"), &nodes()).unwrap_err();
    assert!(matches!(err, PolicyError::Budget { .. }), "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn wasm_budget_applies_per_call_not_per_instance() {
    // Many cheap calls on one instance add up to far more than one budget.
    let mut p = misbehave();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        still_works(&mut p);
    }
}

#[test]
fn rhai_infinite_loop_and_hoarding_are_stopped_and_the_next_call_works() {
    let src = r#"
        fn select(ctx, nodes) {
            if ctx.params.mode == "loop" { loop { } }
            if ctx.params.mode == "alloc" { let s = "x"; loop { s += s; } }
            nodes.map(|n| #{ decision: "include" })
        }
    "#;
    let mut p = RhaiPolicy::load_str("rhai-misbehave", src, World::empty(), limits()).unwrap();
    let t = Instant::now();
    let err = p.select(&ctx("loop"), &nodes()).unwrap_err();
    assert!(matches!(err, PolicyError::Budget { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    still_works(&mut p);
    let err = p.select(&ctx("alloc"), &nodes()).unwrap_err();
    assert!(matches!(err, PolicyError::Memory { .. }), "{err}");
    still_works(&mut p);
}

#[test]
fn wasm_select_spread_over_instances_matches_one_instance_and_survives_a_trap() {
    let rt = WasmRuntime::new(None).unwrap();
    let compiled = rt.load_file(&component("version-gate")).unwrap();
    // This test is about equivalence, not budgets: a loaded CI machine must
    // not turn it into a timing test.
    let roomy = Limits {
        cpu: Duration::from_secs(30),
        ..Limits::default()
    };
    let nodes = flotilla_tests::fleet(20_000, &["1.12", "v1.13", "1.9.0", "2.0.0", "junk"]);
    let gate = TaskContext::new("1.13").with_params(json!({ "range": ">=1.10, <2" }));
    let mut one = compiled.instantiate(World::empty(), roomy).unwrap();
    one.set_workers(1);
    let mut many = compiled.instantiate(World::empty(), roomy).unwrap();
    many.set_workers(3);
    assert_eq!(
        one.select(&gate, &nodes).unwrap(),
        many.select(&gate, &nodes).unwrap()
    );

    // A trap in one worker's chunk fails the call; the next call still works.
    let mut p = misbehave();
    p.set_workers(2);
    let big: Vec<Node> = (0..10_000)
        .map(|i| Node::new(format!("n{i}"), "1.0.0"))
        .collect();
    let err = p.select(&ctx("panic"), &big).unwrap_err();
    assert!(
        err.to_string().contains("misbehave was told to panic"),
        "{err}"
    );
    assert_eq!(p.select(&ctx("behave"), &big).unwrap().len(), 10_000);
}

/// Issue 17.5 and the 0.2 contract's additions, through a real component:
/// the calendar import (the runner's zone and window rules), a wave
/// report's `skipped` and the context's retries (lowered by hand into the
/// argument arena).
#[test]
fn a_component_reads_the_calendar_the_skipped_count_and_the_retries() {
    let mut p = misbehave();
    // 2026-03-29 00:30 UTC: 01:30 CET in Berlin, a Sunday; the 02:00
    // window opens after the spring-forward gap, at 03:00 CEST (01:00 UTC).
    let mut c = TaskContext::new("2.0.0").with_params(json!({
        "mode": "calendar", "at": 1_774_744_200_000u64, "zone": "Europe/Berlin",
    }));
    c.retries_failed = 3;
    c.retries_timed_out = 1;
    let report = WaveReport {
        skipped: 2,
        ..WaveReport::default()
    };
    let Verdict::Pause(said) = p.evaluate(&c, &report).unwrap() else {
        panic!("expected a pause");
    };
    assert!(said.contains("Ok(LocalDateTime { year: 2026, month: 3, day: 29, hour: 1, minute: 30, second: 0, weekday: 7, offset-minutes: 60, abbreviation: \"CET\" })"), "{said}");
    assert!(
        said.contains("open Ok(false) next Ok(Some(1774746000000))"),
        "{said}"
    );
    assert!(said.ends_with("skipped 2 retries 3/1"), "{said}");
    // An unknown zone is an error the policy sees, not a trap.
    let c = TaskContext::new("2.0.0").with_params(json!({
        "mode": "calendar", "at": 0, "zone": "Mars/Olympus",
    }));
    let Verdict::Pause(said) = p.evaluate(&c, &report).unwrap() else {
        panic!("expected a pause");
    };
    assert!(
        said.contains("Err(\"unknown time zone 'Mars/Olympus'"),
        "{said}"
    );
    still_works(&mut p);
}
