//! Your first policy in Rust: upgrade only edge nodes, the canary one first.
//! Build with `cargo build --target wasm32-wasip2 -p first-policy`; test with
//! `cargo test -p first-policy` (runs `../first-policy.yaml` against the
//! component). The Rhai version is `examples/first-policy.rhai`.

use flotilla_sdk::{Context, Node, Policy, Selection, SkipReason, Wave};

pub struct FirstPolicy;

#[flotilla_sdk::policy(name = "first-policy")]
impl Policy for FirstPolicy {
    /// Who: nodes labelled tier=edge.
    fn select(_ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        nodes
            .iter()
            .map(|n| match n.label("tier") {
                Some("edge") => Selection::Include,
                _ => Selection::skip(SkipReason::Policy, "not an edge node"),
            })
            .collect()
    }

    /// In what order: one node first, then the rest.
    fn plan(_ctx: &Context, nodes: &[Node]) -> Vec<Wave> {
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        let wave = |name: &str, nodes: &[String]| Wave {
            name: name.into(),
            nodes: nodes.to_vec(),
            concurrency: 0,
            soak_seconds: 0,
            needs_approval: false,
        };
        match ids.split_first() {
            None => Vec::new(),
            Some((first, [])) => vec![wave("first", std::slice::from_ref(first))],
            Some((first, rest)) => vec![
                wave("first", std::slice::from_ref(first)),
                wave("rest", rest),
            ],
        }
    }
}
