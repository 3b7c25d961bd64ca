//! What the runner does for a hook a policy does not implement. The SDK's trait
//! defaults mirror these (a twin test checks), so a Rust policy, a Rhai script
//! and an empty policy agree.

use flotilla_model::{Node, Selection, TaskContext, Verdict, Wave, WaveReport};

/// Include every node: the runner's own skips (same version, unhealthy, busy)
/// already ran.
pub fn select(nodes: &[Node]) -> Vec<Selection> {
    vec![Selection::Include; nodes.len()]
}

/// One wave named "all" with every node, at the task's concurrency.
pub fn plan(ctx: &TaskContext, nodes: &[Node]) -> Vec<Wave> {
    if nodes.is_empty() {
        return Vec::new();
    }
    vec![Wave {
        name: "all".into(),
        nodes: nodes.iter().map(|n| n.id.clone()).collect(),
        concurrency: ctx.concurrency,
        soak_seconds: 0,
        needs_approval: false,
    }]
}

/// Proceed when nothing failed; otherwise pause so a person looks.
pub fn evaluate(report: &WaveReport) -> Verdict {
    match report.failed() {
        0 => Verdict::Proceed,
        n => Verdict::Pause(format!(
            "{n} of {} nodes failed in wave {}",
            report.total,
            report.wave + 1
        )),
    }
}
