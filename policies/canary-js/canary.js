// Canary, in JavaScript: one node, then 10 %, then 50 %, then the rest. After
// each wave it pauses when the wave's failure rate exceeds `threshold`, and
// aborts instead once at least `min_finished` nodes of the task have finished.
//
// The twin of policies/canary/src/lib.rs (Rust) and policies/canary.rhai
// (Rhai); tests/all/policy_twins.rs holds all of them to the same table.
//
// Params: `threshold` (fraction, default 0.1), `min_finished` (default 5),
// `soak_seconds` (default 0), `approval` (waves after the first need a
// promote, default false).
//
// Build (@bytecodealliance/componentize-js@0.23.0; the runner provides no
// wasi:http, hence the two --disable):
//   componentize-js canary.js --wit ../../wit --world-name policy \
//       --disable http fetch-event -o canary-js.wasm
//
// Bindings: the hooks are the exported object `hooks`; record fields are
// camelCase (`failedRolledBack`), variants `{ tag, val }`, enums strings,
// u64 values BigInt (`soakSeconds`, `now`).

let lastParams = ["", {}];

// `ctx.params` parsed once per task context (it arrives as a JSON string).
function params(ctx) {
  if (lastParams[0] !== ctx.params) {
    const parsed = ctx.params ? JSON.parse(ctx.params) : {};
    lastParams = [ctx.params, parsed !== null && typeof parsed === "object" && !Array.isArray(parsed) ? parsed : {}];
  }
  return lastParams[1];
}

function param(ctx, key, fallback, kind) {
  const p = params(ctx);
  const v = Object.prototype.hasOwnProperty.call(p, key) ? p[key] : fallback;
  if (kind === "float" && typeof v === "number") return v;
  if (kind === "int" && Number.isInteger(v) && v >= 0) return v;
  if (kind === "bool" && typeof v === "boolean") return v;
  throw new Error(`param ${key}: expected a ${kind}, got ${JSON.stringify(v)}`);
}

// (name, start, end) of each non-empty wave over `total` nodes.
function wavesOf(total) {
  const bounds = [
    ["canary", 1],
    ["10%", Math.ceil((total * 10) / 100)],
    ["50%", Math.ceil((total * 50) / 100)],
    ["rest", total],
  ];
  const out = [];
  let prev = 0;
  for (const [name, b] of bounds) {
    const bound = Math.min(b, total);
    if (bound > prev) {
      out.push([name, prev, bound]);
      prev = bound;
    }
  }
  return out;
}

// Half away from zero, as Rust's f64::round.
const rounded = (x) => (x >= 0 ? Math.floor(x + 0.5) : -Math.floor(-x + 0.5));

export const hooks = {
  describe() {
    // `plan` places each node by its index and keeps nothing between calls:
    // the runner may run its chunks at once.
    return { name: "canary", version: "0.1.0", hooks: ["plan", "evaluate"], planCalls: "independent" };
  },

  select(ctx, nodes) {
    return nodes.map(() => ({ tag: "include" }));
  },

  // Stateless over chunks: each node's wave follows from its index
  // (offset + i) out of total; the runner merges waves of the same name.
  plan(ctx, nodes, offset, total) {
    const soakSeconds = BigInt(param(ctx, "soak_seconds", 0, "int"));
    const approval = param(ctx, "approval", false, "bool");
    const end = offset + nodes.length;
    const out = [];
    wavesOf(total).forEach(([name, start, stop], i) => {
      const lo = Math.max(start, offset);
      const hi = Math.min(stop, end);
      if (lo < hi) {
        const ids = new Array(hi - lo);
        for (let j = lo; j < hi; j++) ids[j - lo] = nodes[j - offset].id;
        out.push({
          name,
          nodes: ids,
          concurrency: ctx.concurrency,
          soakSeconds,
          needsApproval: approval && i > 0,
        });
      }
    });
    return out;
  },

  admit(ctx, node, now) {
    return { tag: "now" };
  },

  evaluate(ctx, report) {
    const threshold = param(ctx, "threshold", 0.1, "float");
    const minFinished = param(ctx, "min_finished", 5, "int");
    const failed =
      report.failedRolledBack + report.failedRollbackFailed + report.timedOut + report.unknown + report.rejected;
    const finished = report.succeeded + failed;
    if (finished === 0) return { tag: "proceed" };
    const rate = failed / finished;
    if (rate <= threshold) return { tag: "proceed" };
    const p = rounded(rate * 100);
    const t = rounded(threshold * 100);
    const w = report.wave + 1;
    const f = report.taskFinished;
    if (f >= minFinished) {
      return { tag: "abort", val: `failure rate ${p}% in wave ${w} exceeds ${t}% after ${f} finished nodes` };
    }
    return {
      tag: "pause",
      val: `failure rate ${p}% in wave ${w} exceeds ${t}%; waiting for a person (only ${f} of ${minFinished} finished nodes needed to abort)`,
    };
  },

  onRequest(ctx, node) {
    return { tag: "offer" };
  },
};
