"""{{name}}: upgrade only edge nodes (label tier=edge), one first.

Every hook is exported (the runner calls only those `describe` lists and
applies its default to the others: here `admit` starts nodes at once and
`evaluate` pauses on any failure).
"""

import json

from wit_world import exports
from wit_world.imports.types import (
    Admission_Now,
    Hook,
    Offer_Offer,
    PlanCalls,
    PolicyInfo,
    Selection_Include,
    Selection_Skip,
    Skip,
    SkipReason,
    Verdict_Proceed,
    Wave,
)


def label(node, key):
    return next((v for k, v in node.labels if k == key), None)


class Hooks(exports.Hooks):
    def describe(self):
        # `plan` places each node by its index and keeps nothing between
        # calls, so it says its calls are independent: the runner may run
        # them at once on several cores. A plan that must see every node
        # first (sorting, grouping) says PlanCalls.IN_ORDER instead.
        return PolicyInfo(
            name="{{name}}",
            version="0.1.0",
            hooks=[Hook.SELECT, Hook.PLAN],
            plan_calls=PlanCalls.INDEPENDENT,
        )

    def select(self, ctx, nodes):
        # ctx.params is a JSON string: json.loads(ctx.params) for the task's parameters.
        return [
            Selection_Include()
            if label(n, "tier") == "edge"
            else Selection_Skip(Skip(reason=SkipReason.POLICY, detail="not an edge node"))
            for n in nodes
        ]

    def plan(self, ctx, nodes, offset, total):
        # Nodes come in chunks; node i of this one is number offset + i of
        # total. Waves of the same name are merged by the runner.
        out = []
        if offset == 0 and nodes:
            out.append(Wave("first", [nodes[0].id], ctx.concurrency, 0, False))
        rest = [n.id for n in (nodes[1:] if offset == 0 else nodes)]
        if rest:
            out.append(Wave("rest", rest, ctx.concurrency, 0, False))
        return out

    def admit(self, ctx, node, now):
        return Admission_Now()

    def evaluate(self, ctx, report):
        return Verdict_Proceed()

    def on_request(self, ctx, node):
        return Offer_Offer()
