//! Version gate: include only healthy nodes whose version lies in the semver
//! range `range` (default `*`) and differs from the target; skip the others
//! with a reason. The Rhai twin is `policies/version-gate.rhai`.

use flotilla_sdk::{Context, Node, Policy, Selection, SkipReason, version};

pub struct VersionGate;

#[flotilla_sdk::policy(name = "version-gate")]
impl Policy for VersionGate {
    fn select(ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        let range_text: String = ctx.param_or("range", "*".to_string());
        let range = version::parse_range(&range_text)
            .unwrap_or_else(|_| panic!("param range: invalid semver range '{range_text}'"));
        let target = &ctx.target_version;
        // Parsed once per chunk, not per node; same meaning as `version::same`.
        let target_parsed = version::parse(target).ok();
        nodes
            .iter()
            .map(|node| {
                let v = &node.version;
                if !node.healthy {
                    return Selection::skip(SkipReason::Unhealthy, "node is unhealthy");
                }
                let parsed = version::parse(v);
                let same = match (&parsed, &target_parsed) {
                    (Ok(a), Some(b)) => a == b,
                    _ => v.trim() == target.trim(),
                };
                if same {
                    return Selection::skip(
                        SkipReason::SameVersion,
                        format!("already at {target}"),
                    );
                }
                match parsed {
                    Err(_) => Selection::skip(
                        SkipReason::OutOfRange,
                        format!("version '{v}' is not a version"),
                    ),
                    Ok(p) if !range.matches(&p) => Selection::skip(
                        SkipReason::OutOfRange,
                        format!("version {v} is not in {range_text}"),
                    ),
                    Ok(_) => Selection::Include,
                }
            })
            .collect()
    }
}
