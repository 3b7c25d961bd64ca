// {{name}}: upgrade only edge nodes (label tier=edge), one first.
//
// Every hook is exported (the runner calls only those `describe` lists and
// applies its default to the others: here `admit` starts nodes at once and
// `evaluate` pauses on any failure). Fields are camelCase, variants
// `{ tag, val }`, u64 values BigInt, `ctx.params` a JSON string.

const label = (node, key) => (node.labels.find(([k]) => k === key) || [])[1];

export const hooks = {
  describe() {
    // `plan` places each node by its index and keeps nothing between calls,
    // so its calls are independent: the runner may run them at once on
    // several cores. A plan that must see every node first (sorting,
    // grouping) says planCalls: "in-order" instead.
    return { name: "{{name}}", version: "0.1.0", hooks: ["select", "plan"], planCalls: "independent" };
  },

  select(ctx, nodes) {
    return nodes.map((n) =>
      label(n, "tier") === "edge"
        ? { tag: "include" }
        : { tag: "skip", val: { reason: "policy", detail: "not an edge node" } },
    );
  },

  // Nodes come in chunks; node i of this one is number offset + i of total.
  // Waves of the same name are merged by the runner.
  plan(ctx, nodes, offset, total) {
    const wave = (name, ids) => ({ name, nodes: ids, concurrency: ctx.concurrency, soakSeconds: 0n, needsApproval: false });
    const out = [];
    if (offset === 0 && nodes.length > 0) out.push(wave("first", [nodes[0].id]));
    const rest = (offset === 0 ? nodes.slice(1) : nodes).map((n) => n.id);
    if (rest.length > 0) out.push(wave("rest", rest));
    return out;
  },

  admit(ctx, node, now) {
    return { tag: "now" };
  },

  evaluate(ctx, report) {
    return { tag: "proceed" };
  },

  onRequest(ctx, node) {
    return { tag: "offer" };
  },
};
