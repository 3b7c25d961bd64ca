//! Version gate: include only healthy nodes whose version lies in the semver
//! range `range` (default `*`) and differs from the target; skip the others
//! with a reason. The Rhai twin is `policies/version-gate.rhai`.

use flotilla_sdk::{Context, Node, Policy, Selection, SkipReason, semver, version};

pub struct VersionGate;

/// What `select` works out from the context alone: parsed once per task
/// context (`Context::derive`), not once per call.
struct Gate {
    range_text: String,
    range: semver::VersionReq,
    target: String,
    target_parsed: Option<semver::Version>,
}

impl Gate {
    fn new(ctx: &Context) -> Gate {
        let range_text: String = ctx.param_or("range", "*".to_string());
        let range = version::parse_range(&range_text)
            .unwrap_or_else(|_| panic!("param range: invalid semver range '{range_text}'"));
        let target = ctx.target_version.clone();
        let target_parsed = version::parse(&target).ok();
        Gate {
            range_text,
            range,
            target,
            target_parsed,
        }
    }

    /// The decision for a healthy node at version `v`.
    fn decide(&self, v: &str) -> Selection {
        let target = &self.target;
        let parsed = version::parse(v);
        // Same meaning as `version::same`.
        let same = match (&parsed, &self.target_parsed) {
            (Ok(a), Some(b)) => a == b,
            _ => v.trim() == target.trim(),
        };
        if same {
            return Selection::skip(SkipReason::SameVersion, format!("already at {target}"));
        }
        match parsed {
            Err(_) => Selection::skip(
                SkipReason::OutOfRange,
                format!("version '{v}' is not a version"),
            ),
            Ok(p) if !self.range.matches(&p) => Selection::skip(
                SkipReason::OutOfRange,
                format!("version {v} is not in {}", self.range_text),
            ),
            Ok(_) => Selection::Include,
        }
    }
}

/// Distinct versions remembered per call: a fleet has few, and a healthy
/// node's decision depends on its version alone.
const SEEN: usize = 32;

#[flotilla_sdk::policy(name = "version-gate")]
impl Policy for VersionGate {
    fn select(ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        let gate = ctx.derive(Gate::new);
        let mut seen: Vec<(&str, Selection)> = Vec::new();
        nodes
            .iter()
            .map(|node| {
                if !node.healthy {
                    return Selection::skip(SkipReason::Unhealthy, "node is unhealthy");
                }
                let v = node.version.as_str();
                if let Some((_, d)) = seen.iter().find(|(s, _)| *s == v) {
                    return d.clone();
                }
                let d = gate.decide(v);
                if seen.len() < SEEN {
                    seen.push((v, d.clone()));
                }
                d
            })
            .collect()
    }
}
