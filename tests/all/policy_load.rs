//! Loading components: the world is checked at load, compiled artifacts are cached.

use flotilla_model::Hook;
use flotilla_policy::world::World;
use flotilla_policy::{Limits, Policy, PolicyError, WasmRuntime};
use flotilla_tests::{component, workspace};

#[test]
fn a_component_of_another_world_is_rejected_with_what_is_missing() {
    let rt = WasmRuntime::new(None).unwrap();
    let err = rt
        .load_file(&component("not-a-policy"))
        .err()
        .expect("must be rejected");
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::Load { .. }), "{msg}");
    assert!(
        msg.contains("missing export flotilla:policy/hooks@0.2.0"),
        "{msg}"
    );
    assert!(msg.contains("it exports: describe, greet"), "{msg}");
}

/// A component of contract 0.1.0: the hooks as top-level exports (what
/// componentize-py could not build: `select` collided with libc's), and
/// optionally a 0.1.0 import.
fn contract_0_1(with_import: bool) -> Vec<u8> {
    let import = if with_import {
        r#"(import "flotilla:policy/clock@0.1.0" (instance (export "now" (func (result u64)))))"#
    } else {
        ""
    };
    wat::parse_str(format!(
        r#"(component
            {import}
            (core module $m (func (export "describe")) (func (export "select")))
            (core instance $i (instantiate $m))
            (func (export "describe") (canon lift (core func $i "describe")))
            (func (export "select") (canon lift (core func $i "select"))))"#
    ))
    .unwrap()
}

#[test]
fn a_component_of_contract_0_1_is_refused_naming_the_version_and_what_to_rebuild() {
    let rt = WasmRuntime::new(None).unwrap();
    for with_import in [true, false] {
        let err = rt
            .load_bytes("old", &contract_0_1(with_import))
            .err()
            .expect("a 0.1 component must be refused");
        let msg = err.to_string();
        assert!(matches!(err, PolicyError::Load { .. }), "{msg}");
        assert!(msg.contains("flotilla:policy@0.1.0"), "{msg}");
        assert!(msg.contains("speaks flotilla:policy@0.2.0"), "{msg}");
        assert!(
            msg.contains("rebuild it against flotilla:policy@0.2.0"),
            "{msg}"
        );
        assert!(msg.contains("flotilla-sdk"), "{msg}");
    }
}

/// A component built against the draft of 0.2.0 before `policy-info` got
/// `plan-calls` (this repository's canary in JavaScript, built against that
/// WIT) is refused at load with what to rebuild, not at its first call with
/// a bare type mismatch.
#[test]
fn a_component_of_the_draft_0_2_without_plan_calls_is_refused_at_load() {
    use flotilla_policy::build::{Interpreted, build_interpreted};
    let tmp = tempfile::tempdir().unwrap();
    let wit = std::fs::read_to_string(workspace().join("wit/policy.wit")).unwrap();
    let field = "        plan-calls: plan-calls,\n";
    assert!(
        wit.contains(field),
        "the WIT's policy-info changed: update this test"
    );
    std::fs::create_dir(tmp.path().join("wit")).unwrap();
    std::fs::write(tmp.path().join("wit/policy.wit"), wit.replace(field, "")).unwrap();
    let js = std::fs::read_to_string(workspace().join("policies/canary-js/canary.js")).unwrap();
    let draft = js.replace(r#", planCalls: "independent""#, "");
    assert_ne!(
        draft, js,
        "the JS canary's describe changed: update this test"
    );
    let dir = tmp.path().join("draft");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("canary.js"), draft).unwrap();
    let wasm = build_interpreted(
        Interpreted::JavaScript,
        &dir,
        &tmp.path().join("wit"),
        tmp.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = WasmRuntime::new(None)
        .unwrap()
        .load_file(&wasm)
        .err()
        .expect("a draft 0.2 component must be refused");
    let msg = err.to_string();
    assert!(matches!(err, PolicyError::Load { .. }), "{msg}");
    assert!(
        msg.contains("policy-info with the fields (name, version, hooks)"),
        "{msg}"
    );
    assert!(msg.contains("(name, version, hooks, plan-calls)"), "{msg}");
    assert!(
        msg.contains("rebuild it against flotilla:policy@0.2.0"),
        "{msg}"
    );
}

#[test]
fn a_core_module_or_garbage_is_rejected_with_a_hint() {
    let rt = WasmRuntime::new(None).unwrap();
    let core = rt
        .load_bytes("core", b"\0asm\x01\0\0\0")
        .err()
        .unwrap()
        .to_string();
    assert!(core.contains("core Wasm module, not a component"), "{core}");
    let junk = rt.load_bytes("junk", b"hello").err().unwrap().to_string();
    assert!(
        junk.contains("policy junk: cannot load: not a valid component"),
        "{junk}"
    );
}

#[test]
fn describe_reports_the_implemented_hooks() {
    let rt = WasmRuntime::new(None).unwrap();
    let canary = rt.load_file(&component("canary")).unwrap();
    assert_eq!(canary.info().name, "canary");
    assert_eq!(canary.info().hooks, vec![Hook::Plan, Hook::Evaluate]);
    let gate = rt.load_file(&component("version-gate")).unwrap();
    assert_eq!(gate.info().hooks, vec![Hook::Select]);
}

#[test]
fn compiled_components_are_cached_on_disk_and_a_damaged_cache_is_recompiled() {
    let dir = std::env::temp_dir().join(format!("flotilla-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let wasm = component("version-gate");

    let rt = WasmRuntime::new(Some(dir.clone())).unwrap();
    rt.load_file(&wasm).unwrap();
    let cached: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert_eq!(cached[0].extension().unwrap(), "cwasm");

    // A new runtime (a restarted runner) loads from the cache and works.
    let rt2 = WasmRuntime::new(Some(dir.clone())).unwrap();
    let mut p = rt2
        .load_file(&wasm)
        .unwrap()
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let ctx = flotilla_model::TaskContext::new("2.0.0");
    let nodes = vec![flotilla_model::Node::new("a", "1.0.0")];
    assert_eq!(p.select(&ctx, &nodes).unwrap().len(), 1);

    // A truncated artifact is not trusted: it is recompiled and replaced.
    std::fs::write(&cached[0], b"garbage").unwrap();
    let rt3 = WasmRuntime::new(Some(dir.clone())).unwrap();
    rt3.load_file(&wasm).unwrap();
    assert!(std::fs::metadata(&cached[0]).unwrap().len() > 1000);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_component_beyond_the_pools_limits_loads_and_runs_on_the_on_demand_engine() {
    // A pool whose slots hold one core instance: every SDK component (module,
    // WASI adapter, shims) is beyond it, as an interpreter's dozen are beyond
    // the default 8.
    let limits = flotilla_policy::wasm::PoolLimits {
        core_instances_per_component: 1,
        ..Default::default()
    };
    let rt = WasmRuntime::with_pool_limits(None, limits).unwrap();
    let canary = rt.load_file(&component("canary")).unwrap();
    assert_eq!(canary.info().hooks, vec![Hook::Plan, Hook::Evaluate]);
    let mut p = canary
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let ctx = flotilla_model::TaskContext::new("2.0.0");
    let nodes: Vec<_> = (0..20)
        .map(|i| flotilla_model::Node::new(format!("n{i:02}"), "1.0.0"))
        .collect();
    let waves = p.plan(&ctx, &nodes).unwrap();
    assert_eq!(
        waves.iter().map(|w| w.nodes.len()).collect::<Vec<_>>(),
        vec![1, 1, 8, 10]
    );

    // With the default pool: a component of 9 core instances is not refused
    // by the pool (it is refused for what it is: not a policy).
    let mut text = String::from("(component (core module $m)");
    for i in 0..9 {
        text.push_str(&format!(" (core instance $i{i} (instantiate $m))"));
    }
    text.push(')');
    let rt = WasmRuntime::new(None).unwrap();
    let err = rt
        .load_bytes("wide", &wat::parse_str(&text).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains("pooling allocator"), "{err}");
    assert!(
        err.contains("missing export flotilla:policy/hooks@0.2.0"),
        "{err}"
    );
}

#[test]
fn the_compile_cache_is_bounded_and_evicts_the_least_recently_used() {
    let dir = std::env::temp_dir().join(format!("flotilla-lru-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files = || -> Vec<(std::path::PathBuf, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.path(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let pause = || std::thread::sleep(std::time::Duration::from_millis(20));
    let (gate, canary, misbehave) = (
        component("version-gate"),
        component("canary"),
        component("misbehave"),
    );
    let rt = WasmRuntime::new(Some(dir.clone())).unwrap();
    rt.load_file(&gate).unwrap();
    let gate_file = files()[0].clone();
    pause();
    rt.load_file(&canary).unwrap();
    let both = files();
    assert_eq!(both.len(), 2);
    let canary_file = both.iter().find(|f| f.0 != gate_file.0).unwrap().clone();
    pause();
    // A hit makes version-gate the most recently used...
    assert!(rt.is_cached(&std::fs::read(&gate).unwrap()));
    rt.load_file(&gate).unwrap();
    pause();
    // ...so a third compile past the bound evicts canary, not version-gate.
    let mut rt = rt;
    rt.set_cache_limit(gate_file.1 + canary_file.1);
    rt.load_file(&misbehave).unwrap();
    let left: Vec<_> = files().into_iter().map(|f| f.0).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&gate_file.0), "{left:?}");
    assert!(!left.contains(&canary_file.0), "{left:?}");
    assert!(!rt.is_cached(&std::fs::read(&canary).unwrap()));
    // A bound smaller than one artifact still keeps the one just compiled.
    rt.set_cache_limit(1);
    rt.load_file(&canary).unwrap();
    let left: Vec<_> = files().into_iter().map(|f| f.0).collect();
    assert_eq!(left, vec![canary_file.0.clone()]);
    std::fs::remove_dir_all(&dir).unwrap();
}
