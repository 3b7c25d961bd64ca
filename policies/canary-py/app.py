"""Canary, in Python: one node, then 10 %, then 50 %, then the rest. After each
wave it pauses when the wave's failure rate exceeds `threshold`, and aborts
instead once at least `min_finished` nodes of the task have finished.

The twin of policies/canary/src/lib.rs (Rust) and policies/canary.rhai (Rhai);
tests/all/policy_twins.rs holds all of them to the same table.

Params: `threshold` (fraction, default 0.1), `min_finished` (default 5),
`soak_seconds` (default 0), `approval` (waves after the first need a promote,
default false).

Build (componentize-py==0.25.1):
    componentize-py -d ../../wit -w policy componentize app -o canary-py.wasm
"""

import json
import math

from wit_world import exports
from wit_world.imports.types import (
    Admission_Now,
    Hook,
    Offer_Offer,
    PlanCalls,
    PolicyInfo,
    Selection_Include,
    Verdict_Abort,
    Verdict_Pause,
    Verdict_Proceed,
    Wave,
)

_PARAMS = ("", {})


def params(ctx):
    """`ctx.params` parsed once per task context (it arrives as a JSON string)."""
    global _PARAMS
    if _PARAMS[0] != ctx.params:
        parsed = json.loads(ctx.params) if ctx.params else {}
        _PARAMS = (ctx.params, parsed if isinstance(parsed, dict) else {})
    return _PARAMS[1]


def param(ctx, key, default, kind):
    value = params(ctx).get(key, default)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    raise ValueError(f"param {key}: expected a {kind}, got {json.dumps(value)}")


def rounded(x):
    """Half away from zero, as Rust's f64::round (Python's round() is banker's)."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def waves_of(total):
    """(name, start, end) of each non-empty wave over `total` nodes."""
    bounds = [
        ("canary", 1),
        ("10%", -(-total * 10 // 100)),
        ("50%", -(-total * 50 // 100)),
        ("rest", total),
    ]
    out, prev = [], 0
    for name, bound in bounds:
        bound = min(bound, total)
        if bound > prev:
            out.append((name, prev, bound))
            prev = bound
    return out


class Hooks(exports.Hooks):
    def describe(self):
        # `plan` places each node by its index and keeps nothing between
        # calls: the runner may run its chunks at once.
        return PolicyInfo(
            name="canary",
            version="0.1.0",
            hooks=[Hook.PLAN, Hook.EVALUATE],
            plan_calls=PlanCalls.INDEPENDENT,
        )

    def select(self, ctx, nodes):
        return [Selection_Include()] * len(nodes)

    def plan(self, ctx, nodes, offset, total):
        # Stateless over chunks: each node's wave follows from its index
        # (offset + i) out of total; the runner merges waves of the same name.
        soak_seconds = param(ctx, "soak_seconds", 0, "int")
        approval = param(ctx, "approval", False, "bool")
        end = offset + len(nodes)
        out = []
        for i, (name, start, stop) in enumerate(waves_of(total)):
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                out.append(
                    Wave(
                        name=name,
                        nodes=[n.id for n in nodes[lo - offset : hi - offset]],
                        concurrency=ctx.concurrency,
                        soak_seconds=soak_seconds,
                        needs_approval=approval and i > 0,
                    )
                )
        return out

    def admit(self, ctx, node, now):
        return Admission_Now()

    def evaluate(self, ctx, report):
        threshold = param(ctx, "threshold", 0.1, "float")
        min_finished = param(ctx, "min_finished", 5, "int")
        failed = (
            report.failed_rolled_back
            + report.failed_rollback_failed
            + report.timed_out
            + report.unknown
            + report.rejected
        )
        finished = report.succeeded + failed
        if finished == 0:
            return Verdict_Proceed()
        rate = failed / finished
        if rate <= threshold:
            return Verdict_Proceed()
        p, t = rounded(rate * 100.0), rounded(threshold * 100.0)
        w, f = report.wave + 1, report.task_finished
        if f >= min_finished:
            return Verdict_Abort(
                f"failure rate {p}% in wave {w} exceeds {t}% after {f} finished nodes"
            )
        return Verdict_Pause(
            f"failure rate {p}% in wave {w} exceeds {t}%; waiting for a person "
            f"(only {f} of {min_finished} finished nodes needed to abort)"
        )

    def on_request(self, ctx, node):
        return Offer_Offer()
