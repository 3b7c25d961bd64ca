//! {{name}}: upgrade only edge nodes (label tier=edge), one first.
//!
//! Override only the hooks you need; the runner's defaults do the rest (here:
//! `admit` starts nodes at once, `evaluate` pauses on any failure).

use flotilla_sdk::{Context, Node, Policy, Selection, SkipReason, Wave};

pub struct Edge;

#[flotilla_sdk::policy]
impl Policy for Edge {
    fn select(_ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        nodes
            .iter()
            .map(|n| match n.label("tier") {
                Some("edge") => Selection::Include,
                _ => Selection::skip(SkipReason::Policy, "not an edge node"),
            })
            .collect()
    }

    fn plan(ctx: &Context, nodes: &[Node]) -> Vec<Wave> {
        let wave = |name: &str, nodes: &[Node]| Wave {
            name: name.into(),
            nodes: nodes.iter().map(|n| n.id.clone()).collect(),
            concurrency: ctx.concurrency,
            soak_seconds: 0,
            needs_approval: false,
        };
        match nodes.len() {
            0 => Vec::new(),
            1 => vec![wave("first", nodes)],
            _ => vec![wave("first", &nodes[..1]), wave("rest", &nodes[1..])],
        }
    }
}
