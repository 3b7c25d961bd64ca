//! Shared fixtures for the end-to-end tests: guest components built on demand,
//! the shipped policies' paths, and fleets.

use flotilla_model::Node;
use flotilla_policy::build::{build_component, workspace_root};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub fn workspace() -> PathBuf {
    workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// The component of a workspace policy crate, built once per test process.
pub fn component(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(package) {
        return p.clone();
    }
    let path = build_component(&workspace(), package).unwrap_or_else(|e| panic!("{e}"));
    built.insert(package.to_string(), path.clone());
    path
}

/// The component of a shipped Python (`policies/NAME`, `app.py`) or
/// JavaScript policy, built with its pinned tool once per test process (and
/// kept across runs while its sources are unchanged).
pub fn interpreted(name: &str) -> PathBuf {
    use flotilla_policy::build::{Interpreted, build_interpreted};
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let dir = workspace().join("policies").join(name);
    let lang = if dir.join("app.py").is_file() {
        Interpreted::Python
    } else {
        Interpreted::JavaScript
    };
    let out = workspace()
        .join("target")
        .join("guests")
        .join("interpreted");
    let path = build_interpreted(lang, &dir, &workspace().join("wit"), &out)
        .unwrap_or_else(|e| panic!("{e}"));
    built.insert(name.to_string(), path.clone());
    path
}

/// A shipped Rhai policy.
pub fn script(name: &str) -> PathBuf {
    workspace().join("policies").join(format!("{name}.rhai"))
}

/// `n` nodes `node-00000`.. with versions cycling through `versions`, every
/// seventh unhealthy, two labels, one attribute and an asset path.
pub fn fleet(n: usize, versions: &[&str]) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let mut node = Node::new(format!("node-{i:05}"), versions[i % versions.len()]);
            node.healthy = i % 7 != 3;
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
