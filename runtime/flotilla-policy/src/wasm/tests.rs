use super::lower::NodeRef;
use super::*;
use wasmtime::component::ComponentType;

#[test]
fn hand_lowered_nodes_have_the_derived_layout() {
    let derived = <NodeRef<'static> as ComponentType>::ABI;
    assert_eq!(lower::NODE.size32, derived.size32);
    assert_eq!(lower::NODE.align32, derived.align32);
    assert_eq!(lower::NODE.size32, 56);
    let derived = <wit::TaskContext as ComponentType>::ABI;
    assert_eq!(lower::CTX.size32, derived.size32);
    assert_eq!(lower::CTX.align32, derived.align32);
    assert_eq!(lower::CTX.size32, 80);
}
use crate::build::{build_component, workspace_root};
use flotilla_model::{Node, Selection, TaskContext};

#[test]
fn sdk_components_get_their_nodes_in_the_argument_arena() {
    let root = workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")));
    let wasm = build_component(&root, "version-gate").expect("build version-gate");
    let bytes = std::fs::read(&wasm).unwrap();
    assert!(args_arena(&bytes), "the SDK's section is found");
    assert!(!args_arena(b"\0asm\x01\0\0\0"));
    assert!(!args_arena(&bytes[..bytes.len() / 2]) || args_arena(&bytes));
    let rt = WasmRuntime::new(None).unwrap();
    let compiled = rt.load_file(&wasm).unwrap();
    assert!(compiled.args_arena);
    let mut canonical = compiled.clone();
    canonical.args_arena = false;
    let ctx = TaskContext::new("1.13").with_params(serde_json::json!({ "range": ">=1.10, <2" }));
    let versions = ["1.12", "v1.13", "1.9.0", "", "garbage", "1.10.1", "1.12.3"];
    let fleet = |n: usize, wide: usize| -> Vec<Node> {
        (0..n)
            .map(|i| {
                let mut node = Node::new(format!("n{i}"), versions[i % versions.len()]);
                node.healthy = i % 5 != 1;
                node.labels = (0..i % 4)
                    .map(|j| (format!("k{j}"), "v".repeat(j * wide)))
                    .collect();
                node.attributes = vec![("model".into(), format!("m{i}"))];
                node.asset_path = if i % 3 == 0 {
                    String::new()
                } else {
                    "/a/b".into()
                };
                node
            })
            .collect()
    };
    let mut arena = compiled
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let mut plain = canonical
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    arena.set_workers(1);
    plain.set_workers(1);
    // Chunks of growing and shrinking size (the arena grows, is reused, is
    // given back), with long strings that outgrow a block in a call.
    // The last but one needs a block over the 8 MiB the SDK keeps between calls.
    let sizes = [
        (1, 1),
        (0, 1),
        (4096, 1),
        (10, 5000),
        (9000, 300),
        (4096, 2000),
        (3, 1),
    ];
    for (n, wide) in sizes {
        let nodes = fleet(n, wide);
        let want = plain.select(&ctx, &nodes).unwrap();
        assert_eq!(arena.select(&ctx, &nodes).unwrap(), want, "{n} nodes");
        assert_eq!(want.len(), n);
    }
    // Every field as the guest sees it: `echo` returns each node's `{:?}`.
    let echo = build_component(&root, "misbehave").expect("build misbehave");
    let compiled = rt.load_file(&echo).unwrap();
    assert!(compiled.args_arena);
    let mut canonical = compiled.clone();
    canonical.args_arena = false;
    let mut arena = compiled
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let mut plain = canonical
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    let mut ctx = TaskContext::new("1").with_params(serde_json::json!({ "mode": "echo" }));
    ctx.task_id = "t-1".into();
    ctx.source_versions = vec!["1.0".into(), "1.1".into()];
    ctx.backup = model::Backup::Location("/backups".into());
    ctx.method = model::Method::Pull;
    ctx.concurrency = 7;
    for (n, wide) in sizes {
        let mut nodes = fleet(n, wide);
        for (i, node) in nodes.iter_mut().enumerate() {
            node.last_seen = i as u64 * 7919;
            node.online = i % 2 == 0;
            node.schedulable = i % 3 != 0;
        }
        let got = arena.select(&ctx, &nodes).unwrap();
        assert_eq!(got, plain.select(&ctx, &nodes).unwrap(), "{n} nodes");
        if let Some(Selection::Skip { detail, .. }) = got.first() {
            for part in [
                "task-id: \"t-1\"",
                "source-versions: [\"1.0\", \"1.1\"]",
                "Location(\"/backups\")",
                "concurrency: 7",
                "params: \"{\\\"mode\\\":\\\"echo\\\"}\"",
            ] {
                assert!(detail.contains(part), "{part} in {detail}");
            }
            assert!(detail.to_lowercase().contains("pull"), "{detail}");
        }
        for (node, sel) in nodes.iter().zip(&got) {
            let Selection::Skip { detail, .. } = sel else {
                panic!("echo skips: {sel:?}")
            };
            assert!(detail.contains(&format!("id: {:?}", node.id)), "{detail}");
            assert!(
                detail.contains(&format!("last-seen: {}", node.last_seen)),
                "{detail}"
            );
            if let Some((k, v)) = node.labels.last() {
                assert!(detail.contains(&format!("({k:?}, {v:?})")), "{detail}");
            }
        }
    }
    // `evaluate` reads its context from the arena too.
    let report = model::WaveReport::default();
    assert_eq!(
        arena.evaluate(&ctx, &report).unwrap(),
        model::Verdict::Proceed
    );
    let ctx = ctx.with_params(serde_json::json!({ "mode": "empty-reason" }));
    assert!(matches!(
        arena.evaluate(&ctx, &report),
        Err(PolicyError::Invalid { .. })
    ));
    assert!(matches!(
        plain.evaluate(&ctx, &report),
        Err(PolicyError::Invalid { .. })
    ));
}

#[test]
fn a_full_pool_falls_back_to_on_demand_instances() {
    let root = workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")));
    let wasm = build_component(&root, "version-gate").expect("build version-gate");
    let rt = WasmRuntime::with_pool(None, 2).unwrap();
    let compiled = rt.load_file(&wasm).unwrap();
    let ctx = TaskContext::new("2.0.0");
    let nodes = [Node::new("a", "1.0.0"), Node::new("b", "2.0.0")];
    // Twice the pool's slots held at once: the rest come from the fallback engine.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut p = compiled
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        p.warm().unwrap();
        let out = p.select(&ctx, &nodes).unwrap();
        assert_eq!(out[0], Selection::Include);
        assert!(matches!(out[1], Selection::Skip { .. }));
        held.push(p);
    }
    // Fallback instances keep the memory cap and the CPU budget.
    let limits = Limits {
        memory_bytes: 64 << 10,
        ..Limits::default()
    };
    let mut small = compiled.instantiate(World::empty(), limits).unwrap();
    assert!(matches!(
        small.warm().unwrap_err(),
        PolicyError::Trap { .. } | PolicyError::Memory { .. }
    ));
    drop(held);
    // Slots are returned: pooled instances again.
    let mut p = compiled
        .instantiate(World::empty(), Limits::default())
        .unwrap();
    assert_eq!(p.select(&ctx, &nodes).unwrap().len(), 2);
}
