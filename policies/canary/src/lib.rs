//! Canary: one node, then 10 %, then 50 %, then the rest. After each wave it
//! pauses when the wave's failure rate exceeds `threshold`, and aborts instead
//! once at least `min_finished` nodes of the task have finished.
//!
//! Params: `threshold` (fraction, default 0.1), `min_finished` (default 5),
//! `soak_seconds` (default 0), `approval` (waves after the first need a
//! promote, default false). The Rhai twin is `policies/canary.rhai`.

use flotilla_sdk::{Context, Node, Policy, Verdict, Wave, WaveReport};

pub struct Canary;

/// Cumulative wave bounds: the canary node, then 10 %, 50 %, all (ceil).
fn bounds(n: usize) -> [(&'static str, usize); 4] {
    [
        ("canary", 1),
        ("10%", (n * 10).div_ceil(100)),
        ("50%", (n * 50).div_ceil(100)),
        ("rest", n),
    ]
}

#[flotilla_sdk::policy(name = "canary")]
impl Policy for Canary {
    fn plan(ctx: &Context, nodes: &[Node]) -> Vec<Wave> {
        let soak_seconds: u64 = ctx.param_or("soak_seconds", 0);
        let approval: bool = ctx.param_or("approval", false);
        let n = nodes.len();
        let mut waves = Vec::new();
        let mut prev = 0;
        for (name, bound) in bounds(n) {
            let bound = bound.min(n);
            if bound > prev {
                waves.push(Wave {
                    name: name.into(),
                    nodes: nodes[prev..bound].iter().map(|n| n.id.clone()).collect(),
                    concurrency: ctx.concurrency,
                    soak_seconds,
                    needs_approval: approval && !waves.is_empty(),
                });
                prev = bound;
            }
        }
        waves
    }

    fn evaluate(ctx: &Context, report: &WaveReport) -> Verdict {
        let threshold: f64 = ctx.param_or("threshold", 0.1);
        let min_finished: u32 = ctx.param_or("min_finished", 5);
        let finished = report.finished();
        if finished == 0 {
            return Verdict::Proceed;
        }
        let rate = f64::from(report.failed()) / f64::from(finished);
        if rate <= threshold {
            return Verdict::Proceed;
        }
        let (p, t, w, f) = (
            (rate * 100.0).round() as i64,
            (threshold * 100.0).round() as i64,
            report.wave + 1,
            report.task_finished,
        );
        if f >= min_finished {
            Verdict::Abort(format!(
                "failure rate {p}% in wave {w} exceeds {t}% after {f} finished nodes"
            ))
        } else {
            Verdict::Pause(format!(
                "failure rate {p}% in wave {w} exceeds {t}%; waiting for a person \
                 (only {f} of {min_finished} finished nodes needed to abort)"
            ))
        }
    }
}
