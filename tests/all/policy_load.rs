//! Loading components: the world is checked at load, compiled artifacts are cached.

use flotilla_model::Hook;
use flotilla_policy::world::World;
use flotilla_policy::{Limits, Policy, PolicyError, WasmRuntime};
use flotilla_tests::component;

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
        msg.contains("missing export(s) select, plan, admit, evaluate, on-request"),
        "{msg}"
    );
    assert!(msg.contains("it exports: describe, greet"), "{msg}");
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
