//! The shipped policies written twice — a Rust component and a Rhai script —
//! decide identically on a shared table of inputs.

use flotilla_model::{Node, PlanCalls, TaskContext, WaveReport};
use flotilla_policy::world::World;
use flotilla_policy::{Limits, Policy, RhaiPolicy, WasmRuntime};
use flotilla_tests::{component, fleet, interpreted, script};
use serde_json::json;

fn twins(name: &str) -> (Box<dyn Policy>, Box<dyn Policy>) {
    let rt = WasmRuntime::new(None).unwrap();
    let wasm = rt
        .load_file(&component(name))
        .unwrap()
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let rhai = RhaiPolicy::load_file(&script(name), World::empty(), Limits::default()).unwrap();
    assert_eq!(wasm.info().hooks, rhai.info().hooks, "{name}: same hooks");
    (Box::new(wasm), Box::new(rhai))
}

#[test]
fn version_gate_twins_agree() {
    let (mut rust, mut rhai) = twins("version-gate");
    let versions = [
        "1.12",
        "v1.13",
        "1.9.0",
        "2.0.0",
        "garbage",
        "1.13.0",
        "1.14.2-rc.1",
        "V1.12.7",
        "",
    ];
    let nodes = fleet(200, &versions);
    let mut compared = 0;
    for target in ["1.13", "v1.14.0", "2"] {
        for range in [">=1.10, <2", "*", "~1.12", "^1", "=1.9.0"] {
            let ctx = TaskContext::new(target).with_params(json!({ "range": range }));
            let a = rust.select(&ctx, &nodes).unwrap();
            let b = rhai.select(&ctx, &nodes).unwrap();
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x, y, "target {target}, range {range}, node {:?}", nodes[i]);
            }
            assert_eq!(a.len(), b.len());
            compared += a.len();
        }
    }
    assert_eq!(compared, 200 * 15);

    // No range: everything in range. A bad range: both refuse, naming the param.
    let ctx = TaskContext::new("1.13");
    assert_eq!(
        rust.select(&ctx, &nodes).unwrap(),
        rhai.select(&ctx, &nodes).unwrap()
    );
    let bad = TaskContext::new("1.13").with_params(json!({ "range": "not a range" }));
    for p in [&mut rust, &mut rhai] {
        let err = p.select(&bad, &nodes).unwrap_err().to_string();
        assert!(
            err.contains("param range: invalid semver range 'not a range'"),
            "{err}"
        );
    }
}

/// The canary's Python and JavaScript twins, built by their pinned tools.
fn canary_interpreted() -> Vec<(&'static str, Box<dyn Policy>)> {
    let rt = WasmRuntime::new(None).unwrap();
    ["canary-py", "canary-js"]
        .into_iter()
        .map(|name| {
            let p = rt
                .load_file(&interpreted(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                // The twins must decide alike; how fast an interpreter does
                // it is the policy bench's to say. A wall-clock budget of
                // 50 ms fails them on a loaded machine (seen in a full run).
                .instantiate(
                    World::empty(),
                    Limits {
                        cpu: std::time::Duration::from_secs(10),
                        ..Limits::default()
                    },
                )
                .unwrap();
            (name, Box::new(p) as Box<dyn Policy>)
        })
        .collect()
}

#[test]
fn canary_plan_twins_agree() {
    let (mut rust, mut rhai) = twins("canary");
    let mut others = canary_interpreted();
    for (name, p) in &others {
        assert_eq!(p.info().hooks, rust.info().hooks, "{name}: same hooks");
        assert_eq!(p.info().name, "canary", "{name}");
    }
    for n in [0, 1, 2, 5, 9, 10, 11, 19, 20, 21, 99, 100, 101, 1000, 5000] {
        let nodes: Vec<Node> = fleet(n, &["1.0.0"]);
        for params in [
            json!({}),
            json!({ "soak_seconds": 600, "approval": true }),
            json!({ "approval": false, "soak_seconds": 0 }),
        ] {
            let mut ctx = TaskContext::new("2.0.0").with_params(params.clone());
            ctx.concurrency = 3;
            let a = rust.plan(&ctx, &nodes).unwrap();
            let b = rhai.plan(&ctx, &nodes).unwrap();
            assert_eq!(a, b, "n = {n}, params {params}");
            for (name, p) in &mut others {
                let c = p.plan(&ctx, &nodes).unwrap();
                assert_eq!(a, c, "{name}: n = {n}, params {params}");
            }
            if n >= 10 {
                let sizes: Vec<usize> = a.iter().map(|w| w.nodes.len()).collect();
                assert_eq!(sizes[0], 1, "the canary is one node");
                assert_eq!(sizes.iter().sum::<usize>(), n);
            }
        }
    }
}

/// A `plan` declared independent (the Python and JavaScript canaries) has
/// its chunks spread over instances like `select`'s, and still plans as the
/// Rust canary does with every node at once; the Rust canary's `plan` is in
/// order (the SDK keeps each chunk until the last) and stays in one instance.
#[test]
fn an_independent_plan_is_spread_over_instances_and_an_in_order_one_is_not() {
    let rt = WasmRuntime::new(None).unwrap();
    let limits = Limits {
        cpu: std::time::Duration::from_secs(10),
        ..Limits::default()
    };
    // Three chunks: two instances take two chunks and one.
    let nodes: Vec<Node> = fleet(2 * flotilla_model::CHUNK + 100, &["1.0.0"]);
    let mut ctx = TaskContext::new("2.0.0").with_params(json!({ "soak_seconds": 60 }));
    ctx.concurrency = 7;
    let mut rust = rt
        .load_file(&component("canary"))
        .unwrap()
        .instantiate(World::empty(), limits)
        .unwrap();
    assert_eq!(rust.info().plan_calls, PlanCalls::InOrder);
    rust.set_workers(2);
    let expected = rust.plan(&ctx, &nodes).unwrap();
    assert_eq!(
        rust.instances(),
        1,
        "an in-order plan stays in one instance"
    );
    assert_eq!(expected.len(), 4);
    for name in ["canary-py", "canary-js"] {
        let compiled = rt
            .load_file(&interpreted(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(compiled.info().plan_calls, PlanCalls::Independent, "{name}");
        for workers in [1, 2] {
            let mut p = compiled.instantiate(World::empty(), limits).unwrap();
            p.set_workers(workers);
            let got = p.plan(&ctx, &nodes).unwrap();
            assert_eq!(got, expected, "{name}, {workers} workers");
            assert_eq!(p.instances(), workers, "{name}: instances used");
        }
    }
}

#[test]
fn canary_evaluate_twins_agree() {
    let (mut rust, mut rhai) = twins("canary");
    let mut others = canary_interpreted();
    let mut verdicts = std::collections::BTreeSet::new();
    for (succeeded, rolled_back, rb_failed, timed_out, unknown) in [
        (0, 0, 0, 0, 0),
        (1, 0, 0, 0, 0),
        (0, 1, 0, 0, 0),
        (9, 1, 0, 0, 0),
        (8, 1, 1, 0, 0),
        (45, 2, 0, 2, 1),
        (10, 0, 0, 0, 10),
        (3, 0, 0, 1, 0),
    ] {
        for task_finished in [1, 4, 5, 50] {
            for (threshold, min_finished) in [
                (json!(0.1), 5),
                (json!(0), 1),
                (json!(0.5), 100),
                (json!(1), 5),
            ] {
                let report = WaveReport {
                    wave: 1,
                    waves: 4,
                    total: succeeded + rolled_back + rb_failed + timed_out + unknown,
                    succeeded,
                    failed_rolled_back: rolled_back,
                    failed_rollback_failed: rb_failed,
                    timed_out,
                    unknown,
                    task_finished,
                    ..WaveReport::default()
                };
                let ctx = TaskContext::new("2.0.0")
                    .with_params(json!({ "threshold": threshold, "min_finished": min_finished }));
                let a = rust.evaluate(&ctx, &report).unwrap();
                let b = rhai.evaluate(&ctx, &report).unwrap();
                assert_eq!(a, b, "{report:?} threshold {threshold} min {min_finished}");
                for (name, p) in &mut others {
                    let c = p.evaluate(&ctx, &report).unwrap();
                    assert_eq!(a, c, "{name}: {report:?} threshold {threshold}");
                }
                verdicts.insert(format!("{a:?}").split('(').next().unwrap().to_string());
            }
        }
    }
    // The table exercises every branch.
    assert_eq!(
        verdicts.into_iter().collect::<Vec<_>>(),
        vec!["Abort", "Pause", "Proceed"]
    );
}
