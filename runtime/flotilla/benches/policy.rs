//! Policy runtime budgets, each beside a native baseline measured in the same run:
//!
//! - targeting 1,000,000 nodes through `select` (chunked): Wasm ≤ 0.5 s, Rhai ≤ 1.5 s
//! - a hook call on a warm Wasm instance ≤ 2 µs
//! - instantiating from the cached compiled component ≤ 50 µs
//! - interpreted guests at fleet scale (`--only interpreted`): a Python and a
//!   JavaScript `select` over 100,000 nodes ≤ 2 s each, and their `plan` over
//!   100,000 nodes ≤ 2 s, with default limits, beside the Rust and Rhai canary's
//!   `plan` (the `policy new` edge template, built by componentize-py 0.25.1 and
//!   componentize-js 0.23.0; needs both tools on PATH)
//!
//! Run: `cargo bench -p flotilla --bench policy` (add `-- --quick` for fewer reps,
//! `-- --only wasm|rhai|warm|instantiate` for one part, e.g. under `perf`).

use flotilla_model::{Hook, Node, Selection, SkipReason, TaskContext};
use flotilla_policy::build::{build_component, workspace_root};
use flotilla_policy::world::World;
use flotilla_policy::{Limits, Policy, PolicyError, RhaiPolicy, WasmPolicy, WasmRuntime};
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

const FLEET: usize = 1_000_000;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let root = workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")));
    eprintln!("building the version-gate component ...");
    let wasm = build_component(&root, "version-gate").expect("build version-gate");
    let cache = std::env::temp_dir().join(format!("flotilla-bench-cache-{}", std::process::id()));

    // The million-node fleet only for the parts that use it (it takes a while to build).
    let nodes = fleet(if part("wasm") || part("rhai") {
        FLEET
    } else {
        5000
    });
    let range = ">=1.10, <2";
    let ctx = TaskContext::new("1.13").with_params(serde_json::json!({ "range": range }));

    let rt = WasmRuntime::new(Some(cache.clone())).unwrap();
    let compiled = rt.load_file(&wasm).unwrap();
    let mut wasm_policy = compiled
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let mut rhai_policy = RhaiPolicy::load_file(
        &root.join("policies/version-gate.rhai"),
        World::empty(),
        Limits::default(),
    )
    .unwrap();

    // The same decision as the policy, as a native closure.
    let req = flotilla_version::parse_range(range).unwrap();
    let native = |ctx: &TaskContext, nodes: &[Node]| -> Vec<Selection> {
        let target = &ctx.target_version;
        let target_parsed = flotilla_version::parse(target).ok();
        let skip = |reason, detail| Selection::Skip { reason, detail };
        nodes
            .iter()
            .map(|n| {
                let v = &n.version;
                if !n.healthy {
                    return skip(SkipReason::Unhealthy, "node is unhealthy".into());
                }
                let parsed = flotilla_version::parse(v);
                let same = match (&parsed, &target_parsed) {
                    (Ok(a), Some(b)) => a == b,
                    _ => v.trim() == target.trim(),
                };
                if same {
                    return skip(SkipReason::SameVersion, format!("already at {target}"));
                }
                match parsed {
                    Err(_) => skip(
                        SkipReason::OutOfRange,
                        format!("version '{v}' is not a version"),
                    ),
                    Ok(p) if !req.matches(&p) => skip(
                        SkipReason::OutOfRange,
                        format!("version {v} is not in {range}"),
                    ),
                    Ok(_) => Selection::Include,
                }
            })
            .collect()
    };

    // Sanity: all three decide the same.
    let sample = &nodes[..5000];
    let want = native(&ctx, sample);
    assert_eq!(wasm_policy.select(&ctx, sample).unwrap(), want);
    assert_eq!(rhai_policy.select(&ctx, sample).unwrap(), want);

    let mut rows = Vec::new();

    let base = if part("wasm") || part("rhai") {
        median(reps, || black_box(native(&ctx, &nodes)).len())
    } else {
        Duration::ZERO
    };
    if part("wasm") {
        let w = median(reps, || wasm_policy.select(&ctx, &nodes).unwrap().len());
        rows.push(row(
            "select 1M nodes, wasm",
            w,
            base,
            Duration::from_millis(500),
            last_cpu(1),
        ));
        // The same with wasmtime's derived lowering of the node list instead
        // of the hand lowering (`wasm/lower.rs`, on doc-hidden internals): the
        // hand lowering stays only while this misses the budget or costs
        // much more.
        flotilla_policy::wasm::use_derived_lowering(true);
        let d = median(reps, || wasm_policy.select(&ctx, &nodes).unwrap().len());
        flotilla_policy::wasm::use_derived_lowering(false);
        rows.push(row(
            "  same, derived lowering",
            d,
            base,
            Duration::from_millis(500),
            last_cpu(1),
        ));
        // The boundary alone: a component that includes every node without looking.
        let trivial = build_component(&root, "misbehave").expect("build misbehave");
        let mut trivial = rt
            .load_file(&trivial)
            .unwrap()
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        let t = median(reps, || trivial.select(&ctx, &nodes).unwrap().len());
        rows.push(row(
            "select 1M nodes, wasm, include-all",
            t,
            base,
            Duration::from_millis(500),
            last_cpu(1),
        ));
        // ... and with nodes that carry only an id and a version: what the labels,
        // attributes and asset path cost to cross (one guest allocation per string).
        let bare: Vec<Node> = nodes
            .iter()
            .map(|n| Node::new(n.id.clone(), n.version.clone()))
            .collect();
        let t = median(reps, || trivial.select(&ctx, &bare).unwrap().len());
        rows.push(row(
            "  same, bare nodes (id + version)",
            t,
            base,
            Duration::from_millis(500),
            last_cpu(1),
        ));
    }
    if part("rhai") {
        let r = median(reps.min(3), || {
            rhai_policy.select(&ctx, &nodes).unwrap().len()
        });
        rows.push(row(
            "select 1M nodes, rhai",
            r,
            base,
            Duration::from_millis(1500),
            last_cpu(1),
        ));
    }
    if part("warm") {
        // A warm call: one node through `select` (lowering ctx and node, lifting the decision).
        let one = &nodes[..1];
        let calls = 100_000;
        let base = median(reps, || {
            (0..calls).map(|_| black_box(native(&ctx, one)).len()).sum()
        }) / calls as u32;
        let w = median(reps, || {
            (0..calls)
                .map(|_| wasm_policy.select(&ctx, one).unwrap().len())
                .sum()
        }) / calls as u32;
        let cpu = last_cpu(calls as u32);
        rows.push(row(
            "warm hook call (select, 1 node)",
            w,
            base,
            Duration::from_micros(2),
            cpu,
        ));
        // `evaluate` on the canary: context + wave report in, verdict out.
        let canary = build_component(&root, "canary").expect("build canary");
        let mut canary = rt
            .load_file(&canary)
            .unwrap()
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        let report = flotilla_model::WaveReport {
            wave: 1,
            waves: 4,
            total: 10,
            succeeded: 9,
            failed_rolled_back: 1,
            task_finished: 11,
            ..Default::default()
        };
        let proceed =
            |v: flotilla_model::Verdict| matches!(v, flotilla_model::Verdict::Proceed) as usize;
        let w = median(reps, || {
            (0..calls)
                .map(|_| proceed(canary.evaluate(&ctx, &report).unwrap()))
                .sum()
        }) / calls as u32;
        let cpu = last_cpu(calls as u32);
        let native_eval = |r: &flotilla_model::WaveReport| {
            if r.failed() * 10 > r.finished() {
                flotilla_model::Verdict::Pause(format!("{} failed", r.failed()))
            } else {
                flotilla_model::Verdict::Proceed
            }
        };
        let base_eval = median(reps, || {
            (0..calls)
                .map(|_| proceed(native_eval(black_box(&report))))
                .sum()
        }) / calls as u32;
        rows.push(row(
            "warm hook call (evaluate)",
            w,
            base_eval,
            Duration::from_micros(2),
            cpu,
        ));
    }
    if part("interpreted") {
        interpreted(&root, &cache, &mut rows);
    }
    let mut load_from_cache = Duration::ZERO;
    if part("instantiate") {
        // Instantiate from the on-disk cache: a new runtime (as after a restart) loads
        // the compiled artifact, then each instantiation makes a store and an instance.
        let rt2 = WasmRuntime::new(Some(cache.clone())).unwrap();
        let t = Instant::now();
        let cached = rt2.load_file(&wasm).unwrap();
        load_from_cache = t.elapsed();
        let n_inst = 2000;
        let inst = median(reps, || {
            (0..n_inst)
                .map(|_| {
                    let mut p = cached
                        .instantiate(World::empty(), Limits::default())
                        .unwrap();
                    p.warm().unwrap();
                    1
                })
                .sum()
        }) / n_inst as u32;
        let cpu = last_cpu(n_inst as u32);
        // The native counterpart of "get a ready policy": parse the params, box the closure.
        let base_inst = median(reps, || {
            (0..n_inst)
                .map(|_| {
                    let req = flotilla_version::parse_range(black_box(range)).unwrap();
                    let ready: Box<dyn Fn(&Node) -> bool> = Box::new(move |n: &Node| {
                        flotilla_version::in_range(&n.version, &req.to_string()).unwrap_or(false)
                    });
                    drop(black_box(ready));
                    1
                })
                .sum()
        }) / n_inst as u32;
        rows.push(row(
            "instantiate from cached component",
            inst,
            base_inst,
            Duration::from_micros(50),
            cpu,
        ));
    }

    println!();
    println!(
        "{:<36} {:>12} {:>12} {:>14} {:>10} {:>8} {:>12}",
        "what", "measured", "budget", "native base", "ratio", "ok", "cpu"
    );
    for (what, m, b, budget, cpu) in &rows {
        println!(
            "{:<36} {:>12} {:>12} {:>14} {:>9.1}x {:>8} {:>12}",
            what,
            fmt(*m),
            fmt(*budget),
            fmt(*b),
            m.as_secs_f64() / b.as_secs_f64().max(1e-12),
            if m <= budget { "yes" } else { "NO" },
            cpu.map_or("-".to_string(), fmt)
        );
    }
    println!(
        "(cpu: CPU time of the measured run, all threads of the process; the \
         native baselines run on one thread, Wasm and Rhai `select` on up to 4)"
    );
    println!(
        "(load of the compiled component from the disk cache: {})",
        fmt(load_from_cache)
    );
    let _ = std::fs::remove_dir_all(&cache);
}

/// Python and JavaScript at fleet scale: the `policy new` edge template's
/// `select` and `plan` over 100,000 nodes, with default limits, beside the
/// Rust and Rhai canaries' `plan` over the same nodes. Also prints the first
/// compile of each interpreted component and the instance's memory after
/// each call (it must not grow across chunks).
fn interpreted(root: &Path, cache: &Path, rows: &mut Vec<Row>) {
    use flotilla::policy_new::{Lang, create};
    use flotilla_policy::build::{Interpreted, build_interpreted};
    const N: usize = 100_000;
    let nodes = fleet(N);
    let ctx = TaskContext::new("2.0.0");
    let native_select = |nodes: &[Node]| -> usize {
        nodes
            .iter()
            .filter(|n| n.labels.iter().any(|(k, v)| k == "tier" && v == "edge"))
            .count()
    };
    let base = median(3, || black_box(native_select(&nodes)));
    let tmp = std::env::temp_dir().join(format!("flotilla-bench-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let rt = WasmRuntime::new(Some(cache.to_path_buf())).unwrap();
    for (name, lang, tool, select_row, plan_row) in [
        (
            "edge-py",
            Lang::Python,
            Interpreted::Python,
            "select 100k nodes, python",
            "plan 100k nodes, python",
        ),
        (
            "edge-js",
            Lang::Js,
            Interpreted::JavaScript,
            "select 100k nodes, js",
            "plan 100k nodes, js",
        ),
    ] {
        let dir = tmp.join(name);
        create(&dir, name, lang, None).unwrap();
        eprintln!("building {name} ...");
        let wasm = build_interpreted(tool, &dir, &dir.join("wit"), &dir.join("out"))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let compiled = rt.load_file(&wasm).unwrap();
        eprintln!(
            "{name}: {} bytes, first compile + load {}",
            std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0),
            fmt(t.elapsed())
        );
        // With default limits, in a fresh instance per hook (as a task's
        // first call would be): the first call is checked, then timed.
        for (hook, what) in [(Hook::Select, select_row), (Hook::Plan, plan_row)] {
            let mut p = compiled
                .instantiate(World::empty(), Limits::default())
                .unwrap();
            let once = |p: &mut WasmPolicy| -> Result<usize, PolicyError> {
                match hook {
                    Hook::Select => p.select(&ctx, &nodes).map(|s| s.len()),
                    _ => p.plan(&ctx, &nodes).map(|w| w.len()),
                }
            };
            match once(&mut p) {
                Ok(_) => {
                    let d = median(3, || once(&mut p).unwrap());
                    rows.push(row(what, d, base, Duration::from_secs(2), last_cpu(1)));
                    // Four calls over 25 chunks each: an instance's memory
                    // must stay under the cap, not grow call after call.
                    eprintln!(
                        "{name}: {what}: largest instance memory after 4 calls {:.1} MiB \
                         ({} instances; base cap {} MiB)",
                        p.memory_bytes() as f64 / (1 << 20) as f64,
                        p.instances(),
                        Limits::default().memory_bytes >> 20
                    );
                }
                Err(e) => {
                    // Not met: say so, then time it with a wider budget.
                    eprintln!("{name}: {what} with default limits FAILED: {e}");
                    let wide = Limits {
                        cpu_per_node: Duration::from_millis(1),
                        ..Limits::default()
                    };
                    let mut p = compiled.instantiate(World::empty(), wide).unwrap();
                    if let Err(e) = once(&mut p) {
                        eprintln!("{name}: {what} with 1 ms a node FAILED too: {e}");
                        continue;
                    }
                    let d = median(3, || once(&mut p).unwrap());
                    let what: &'static str = format!("{what} (1 ms a node)").leak();
                    rows.push(row(what, d, base, Duration::from_secs(2), last_cpu(1)));
                }
            }
        }
    }
    // The canary's Rust and Rhai twins' `plan` over the same 100,000 nodes.
    let canary = build_component(root, "canary").expect("build canary");
    let mut rust = rt
        .load_file(&canary)
        .unwrap()
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let r = median(3, || rust.plan(&ctx, &nodes).unwrap().len());
    rows.push(row(
        "plan 100k nodes, rust canary",
        r,
        base,
        Duration::from_secs(2),
        last_cpu(1),
    ));
    let mut rhai = RhaiPolicy::load_file(
        &root.join("policies/canary.rhai"),
        World::empty(),
        Limits::default(),
    )
    .unwrap();
    let r = median(3, || rhai.plan(&ctx, &nodes).unwrap().len());
    rows.push(row(
        "plan 100k nodes, rhai canary",
        r,
        base,
        Duration::from_secs(2),
        last_cpu(1),
    ));
    let _ = std::fs::remove_dir_all(&tmp);
}

type Row = (&'static str, Duration, Duration, Duration, Option<Duration>);

/// A row; `cpu` is the CPU time of the measured run ([`last_cpu`]).
fn row(
    what: &'static str,
    measured: Duration,
    base: Duration,
    budget: Duration,
    cpu: Option<Duration>,
) -> Row {
    (what, measured, base, budget, cpu)
}

/// The CPU time of the run the last `median` picked, divided by `calls`.
fn last_cpu(calls: u32) -> Option<Duration> {
    CPU.with(|c| c.get()).map(|c| c / calls)
}

/// Median wall time of `reps` runs of `f`, after one warm-up run. The CPU
/// time (all threads of the process) of that same run is recorded in `CPU`.
fn median(reps: usize, mut f: impl FnMut() -> usize) -> Duration {
    black_box(f());
    let mut times: Vec<(Duration, Option<Duration>)> = (0..reps)
        .map(|_| {
            let (t, cpu) = (Instant::now(), process_cpu());
            black_box(f());
            let cpu = process_cpu().zip(cpu).map(|(b, a)| b.saturating_sub(a));
            (t.elapsed(), cpu)
        })
        .collect();
    times.sort();
    let (wall, cpu) = times[reps / 2];
    CPU.with(|c| c.set(cpu));
    wall
}

thread_local! {
    /// CPU time of the run `median` last picked.
    static CPU: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

/// User + system CPU time of this process so far (Linux; 10 ms resolution):
/// on a busy machine it moves less than wall time does.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn fmt(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.2} µs", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

/// A fleet like a real one: two labels, one attribute, an asset path, versions
/// spread over in-range, out-of-range, same-version and garbage, some unhealthy.
fn fleet(n: usize) -> Vec<Node> {
    let versions = [
        "1.12", "v1.13", "1.9.0", "2.0.0", "1.12.3", "1.11", "garbage", "1.10.1",
    ];
    (0..n)
        .map(|i| {
            let mut node = Node::new(format!("node-{i:07}"), versions[i % versions.len()]);
            node.healthy = i % 13 != 5;
            node.labels = vec![
                ("region".into(), ["eu", "us", "ap"][i % 3].into()),
                (
                    "tier".into(),
                    if i % 2 == 0 { "edge" } else { "core" }.into(),
                ),
            ];
            node.attributes = vec![("model".into(), format!("m{}", i % 4))];
            node.asset_path = format!("/site-{}/rack-{}", i % 5, i % 11);
            node
        })
        .collect()
}
