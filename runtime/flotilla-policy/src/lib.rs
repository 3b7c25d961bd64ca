//! The `Policy` trait the engine calls, its two hosts (`wasm`, `rhai`), the
//! documented defaults for hooks a policy leaves out, and the validation every
//! hook's output passes before the engine may act on it.
//!
//! A host implements the raw `call_*` methods; the provided methods (`select`,
//! `plan`, ...) add chunking, defaults and validation, so both hosts behave the
//! same at the edge the engine sees.

pub mod alloc;
pub mod build;
pub mod clock;
pub mod defaults;
pub mod rhai;
pub mod wasm;
pub mod world;

use flotilla_model::{
    Admission, CHUNK, Hook, Node, Offer, PolicyInfo, Selection, TaskContext, Verdict, Wave,
    WaveReport,
};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

pub use self::rhai::RhaiPolicy;

/// This crate's tests hold Rhai hooks to the memory cap as the runner does.
#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
pub use self::wasm::{CompiledPolicy, ContractError, WasmPolicy, WasmRuntime};

/// Why a policy call (or load) failed. Every variant names the policy; call
/// failures name the hook. The engine pauses the task with this message.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy {policy}: cannot load: {reason}")]
    Load { policy: String, reason: String },
    /// The policy's stored bytes could not be read or kept (a disk fault):
    /// nothing is wrong with the policy, and the same call may be retried.
    #[error("policy {policy}: {context}: {source}")]
    Io {
        policy: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {policy}: hook {hook} trapped: {message}")]
    Trap {
        policy: String,
        hook: Hook,
        message: String,
    },
    #[error("policy {policy}: hook {hook} exceeded its CPU budget ({budget})")]
    Budget {
        policy: String,
        hook: Hook,
        budget: String,
    },
    #[error("policy {policy}: hook {hook} exceeded its memory cap ({cap})")]
    Memory {
        policy: String,
        hook: Hook,
        cap: String,
    },
    #[error("policy {policy}: hook {hook} returned invalid output: {reason}")]
    Invalid {
        policy: String,
        hook: Hook,
        reason: String,
    },
}

impl PolicyError {
    /// A fault reading or keeping `policy`'s bytes ([`PolicyError::Io`]).
    pub fn io(policy: &str, context: impl Into<String>, source: std::io::Error) -> Self {
        PolicyError::Io {
            policy: policy.to_string(),
            context: context.into(),
            source,
        }
    }

    /// Is this a fault on the runner (retry later) rather than something
    /// wrong with the policy or its output?
    pub fn is_fault(&self) -> bool {
        matches!(self, PolicyError::Io { .. })
    }

    pub fn invalid(policy: &str, hook: Hook, reason: impl Into<String>) -> Self {
        PolicyError::Invalid {
            policy: policy.to_string(),
            hook,
            reason: reason.into(),
        }
    }
}

/// How a hook call failed, as a host tells it from its engine's error (an
/// interrupted epoch, a terminated Rhai run, a trap...). Both hosts turn it
/// into the error the engine records through [`Failure::into_error`], so a
/// budget, a cap and a trap read the same whichever host ran the policy.
pub(crate) enum Failure {
    /// Past its budget: the budget as shown (`100 ms`, `10000 operations`).
    Budget(String),
    /// Past its memory cap: the cap as shown (`64 MiB`).
    Memory(String),
    /// Anything else: a trap, a panic, a thrown error, with its message.
    Trap(String),
}

impl Failure {
    /// A CPU budget overrun of `budget`.
    pub(crate) fn cpu(budget: std::time::Duration) -> Self {
        Failure::Budget(duration_text(budget))
    }

    pub(crate) fn into_error(self, policy: &str, hook: Hook) -> PolicyError {
        let policy = policy.to_string();
        match self {
            Failure::Budget(budget) => PolicyError::Budget {
                policy,
                hook,
                budget,
            },
            Failure::Memory(cap) => PolicyError::Memory { policy, hook, cap },
            Failure::Trap(message) => PolicyError::Trap {
                policy,
                hook,
                message,
            },
        }
    }
}

/// `100 ms` for whole milliseconds, else Rust's debug form (`1.5ms`).
pub(crate) fn duration_text(d: std::time::Duration) -> String {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

/// What a policy may use per call. The same limits apply to both hosts, each in
/// its own currency: Wasm checks the call's CPU time at epoch deadlines and
/// caps linear memory; Rhai counts operations, checks the call's CPU time as
/// it goes (both through [`clock`]) and caps string, array
/// and map sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU budget for one hook call (the CPU time of the thread running it;
    /// 10 times as much wall time at most: [`clock`])...
    pub cpu: Duration,
    /// ...plus this much per node handed to it (`select` chunks, `plan` gets
    /// the whole selection, so its budget grows with the fleet).
    pub cpu_per_node: Duration,
    /// Linear memory cap for a Wasm instance...
    pub memory_bytes: usize,
    /// ...plus this much per node handed to the call (`select` chunks; `plan`
    /// the nodes handed over so far). The nodes are lowered into the guest's
    /// own memory and a policy may keep them until `plan`'s last chunk, so
    /// memory, like CPU, scales with the work; an interpreter's heap (a
    /// JavaScript runtime's garbage collector) needs room to lag behind. Rhai
    /// counts what a call allocates beyond its input, so this is Wasm only.
    pub memory_per_node: usize,
    /// Rhai: operations per hook call.
    pub max_operations: u64,
    /// Rhai: nesting depth of function calls.
    pub max_call_depth: usize,
    /// Rhai: elements of one array or map, bytes of one string.
    pub max_collection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu: Duration::from_millis(50),
            cpu_per_node: Duration::from_micros(50),
            memory_bytes: 64 << 20,
            memory_per_node: 1 << 10,
            max_operations: 20_000_000,
            max_call_depth: 64,
            max_collection: 1 << 20,
        }
    }
}

impl Limits {
    /// The CPU budget of a call that is handed `nodes` nodes.
    pub fn budget(&self, nodes: usize) -> Duration {
        self.cpu + self.cpu_per_node * u32::try_from(nodes).unwrap_or(u32::MAX)
    }

    /// The memory cap of a Wasm call that is handed `nodes` nodes (at most
    /// the 4 GiB a 32-bit memory can address).
    pub fn memory(&self, nodes: usize) -> usize {
        self.memory_bytes
            .saturating_add(self.memory_per_node.saturating_mul(nodes))
            .min(4 << 30)
    }
}

/// A loaded policy. Hosts implement `info` and the `call_*` methods; callers use
/// the provided hook methods.
pub trait Policy: Send {
    fn info(&self) -> &PolicyInfo;

    /// Runs `select` on at most [`CHUNK`] nodes.
    fn call_select(
        &mut self,
        ctx: &TaskContext,
        nodes: &[Node],
    ) -> Result<Vec<Selection>, PolicyError>;
    /// Runs `select` on several chunks; hosts may spread them over cores.
    fn call_select_chunks(
        &mut self,
        ctx: &TaskContext,
        chunks: &[&[Node]],
    ) -> Result<Vec<Vec<Selection>>, PolicyError> {
        chunks.iter().map(|c| self.call_select(ctx, c)).collect()
    }
    fn call_plan(&mut self, ctx: &TaskContext, nodes: &[Node]) -> Result<Vec<Wave>, PolicyError>;
    fn call_admit(
        &mut self,
        ctx: &TaskContext,
        node: &Node,
        now: u64,
    ) -> Result<Admission, PolicyError>;
    fn call_evaluate(
        &mut self,
        ctx: &TaskContext,
        report: &WaveReport,
    ) -> Result<Verdict, PolicyError>;
    fn call_on_request(&mut self, ctx: &TaskContext, node: &Node) -> Result<Offer, PolicyError>;

    fn name(&self) -> &str {
        &self.info().name
    }

    /// One decision per node, in order; any number of nodes (chunked here).
    fn select(&mut self, ctx: &TaskContext, nodes: &[Node]) -> Result<Vec<Selection>, PolicyError> {
        if !self.info().implements(Hook::Select) {
            return Ok(defaults::select(nodes));
        }
        if nodes.len() <= CHUNK {
            // One chunk (a warm call, a small fleet): no chunk bookkeeping.
            let got = self.call_select(ctx, nodes)?;
            return check_selections(self.name(), nodes.len(), got);
        }
        let chunks: Vec<&[Node]> = nodes.chunks(CHUNK).collect();
        let results = self.call_select_chunks(ctx, &chunks)?;
        let mut out = Vec::with_capacity(nodes.len());
        for (chunk, got) in chunks.iter().zip(results) {
            out.extend(check_selections(self.name(), chunk.len(), got)?);
        }
        Ok(out)
    }

    /// Waves over the selected nodes; every node in exactly one non-empty wave.
    fn plan(&mut self, ctx: &TaskContext, nodes: &[Node]) -> Result<Vec<Wave>, PolicyError> {
        if !self.info().implements(Hook::Plan) {
            return Ok(defaults::plan(ctx, nodes));
        }
        let waves = self.call_plan(ctx, nodes)?;
        validate_plan(nodes, &waves)
            .map_err(|r| PolicyError::invalid(self.name(), Hook::Plan, r.to_string()))?;
        Ok(waves)
    }

    fn admit(
        &mut self,
        ctx: &TaskContext,
        node: &Node,
        now: u64,
    ) -> Result<Admission, PolicyError> {
        if !self.info().implements(Hook::Admit) {
            return Ok(Admission::Now);
        }
        let a = self.call_admit(ctx, node, now)?;
        if let Admission::Never(reason) = &a {
            require_reason(self.name(), Hook::Admit, "never", reason)?;
        }
        Ok(a)
    }

    fn evaluate(&mut self, ctx: &TaskContext, report: &WaveReport) -> Result<Verdict, PolicyError> {
        if !self.info().implements(Hook::Evaluate) {
            return Ok(defaults::evaluate(report));
        }
        let v = self.call_evaluate(ctx, report)?;
        match &v {
            Verdict::Pause(r) => require_reason(self.name(), Hook::Evaluate, "pause", r)?,
            Verdict::Rollback(r) => require_reason(self.name(), Hook::Evaluate, "rollback", r)?,
            Verdict::Abort(r) => require_reason(self.name(), Hook::Evaluate, "abort", r)?,
            Verdict::Proceed | Verdict::RetryFailed => {}
        }
        Ok(v)
    }

    fn on_request(&mut self, ctx: &TaskContext, node: &Node) -> Result<Offer, PolicyError> {
        if !self.info().implements(Hook::OnRequest) {
            return Ok(Offer::Offer);
        }
        let o = self.call_on_request(ctx, node)?;
        if let Offer::Decline(r) = &o {
            require_reason(self.name(), Hook::OnRequest, "decline", r)?;
        }
        Ok(o)
    }

    /// Runs one hook on JSON input and returns its JSON output (`policy eval`).
    fn eval_json(
        &mut self,
        hook: Hook,
        ctx: &TaskContext,
        input: serde_json::Value,
    ) -> Result<serde_json::Value, EvalError> {
        fn arg<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
            what: &str,
        ) -> Result<T, EvalError> {
            serde_json::from_value(v).map_err(|e| EvalError::Input(format!("{what}: {e}")))
        }
        let field = |input: &serde_json::Value, key: &str| {
            input
                .get(key)
                .cloned()
                .ok_or_else(|| EvalError::Input(format!("missing field `{key}`")))
        };
        let out = match hook {
            Hook::Select => {
                let nodes: Vec<Node> = arg(input, "nodes (a JSON array of nodes)")?;
                serde_json::to_value(self.select(ctx, &nodes)?)
            }
            Hook::Plan => {
                let nodes: Vec<Node> = arg(input, "nodes (a JSON array of nodes)")?;
                serde_json::to_value(self.plan(ctx, &nodes)?)
            }
            Hook::Admit => {
                let node: Node = arg(field(&input, "node")?, "node")?;
                let now: u64 = arg(field(&input, "now")?, "now (Unix ms)")?;
                serde_json::to_value(self.admit(ctx, &node, now)?)
            }
            Hook::Evaluate => {
                let report: WaveReport = arg(input, "wave report")?;
                serde_json::to_value(self.evaluate(ctx, &report)?)
            }
            Hook::OnRequest => {
                let node: Node = arg(input, "node")?;
                serde_json::to_value(self.on_request(ctx, &node)?)
            }
        };
        out.map_err(|e| EvalError::Input(e.to_string()))
    }
}

/// `policy eval` failures: the input did not fit the hook, or the policy failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// One decision per node of a chunk of `nodes` nodes.
fn check_selections(
    policy: &str,
    nodes: usize,
    got: Vec<Selection>,
) -> Result<Vec<Selection>, PolicyError> {
    if got.len() != nodes {
        return Err(PolicyError::invalid(
            policy,
            Hook::Select,
            format!(
                "returned {} decisions for a chunk of {nodes} nodes (one per node, in order)",
                got.len(),
            ),
        ));
    }
    Ok(got)
}

fn require_reason(policy: &str, hook: Hook, what: &str, reason: &str) -> Result<(), PolicyError> {
    if reason.trim().is_empty() {
        return Err(PolicyError::invalid(
            policy,
            hook,
            format!("`{what}` must say why (the reason is empty)"),
        ));
    }
    Ok(())
}

/// Every wave non-empty, every id one of `nodes`, every node in exactly one wave.
pub fn validate_plan(nodes: &[Node], waves: &[Wave]) -> Result<(), PlanError> {
    let mut placed: HashMap<&str, Option<usize>> =
        nodes.iter().map(|n| (n.id.as_str(), None)).collect();
    for (i, wave) in waves.iter().enumerate() {
        if wave.nodes.is_empty() {
            return Err(PlanError::EmptyWave {
                wave: i,
                name: wave.name.clone(),
            });
        }
        for id in &wave.nodes {
            match placed.get_mut(id.as_str()) {
                None => {
                    return Err(PlanError::UnknownNode {
                        wave: i,
                        name: wave.name.clone(),
                        node: id.clone(),
                    });
                }
                Some(Some(prev)) => {
                    return Err(PlanError::TwoWaves {
                        node: id.clone(),
                        first: *prev,
                        again: i,
                    });
                }
                Some(slot) => *slot = Some(i),
            }
        }
    }
    let mut missing: Vec<&str> = placed
        .iter()
        .filter(|(_, w)| w.is_none())
        .map(|(id, _)| *id)
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        return Err(PlanError::Unplaced {
            count: missing.len(),
            first: missing.iter().take(5).map(|s| s.to_string()).collect(),
        });
    }
    Ok(())
}

/// How a plan breaks "every selected node in exactly one non-empty wave".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("wave {wave} ({name:?}) is empty")]
    EmptyWave { wave: usize, name: String },
    #[error("wave {wave} ({name:?}) names node {node:?}, which is not among the selected nodes")]
    UnknownNode {
        wave: usize,
        name: String,
        node: String,
    },
    #[error("node {node:?} is in wave {first} and again in wave {again}")]
    TwoWaves {
        node: String,
        first: usize,
        again: usize,
    },
    /// Selected nodes in no wave: how many, and the first five by id.
    #[error(
        "{count} selected node(s) are in no wave: {}{}",
        first.join(", "),
        if *count > first.len() { ", ..." } else { "" }
    )]
    Unplaced { count: usize, first: Vec<String> },
}

/// A task context as a host passes it to a policy, converted once and kept
/// while the task's context is unchanged (both hosts; a task's context
/// changes rarely, its hooks are called often).
#[derive(Debug)]
pub(crate) struct CtxCache<T>(Option<(TaskContext, T)>);

impl<T> Default for CtxCache<T> {
    fn default() -> Self {
        CtxCache(None)
    }
}

impl<T> CtxCache<T> {
    /// The converted `ctx`, taken out of the cache (converted now if the
    /// cached one is another); [`Self::put`] it back after the call.
    pub(crate) fn take<E>(
        &mut self,
        ctx: &TaskContext,
        convert: impl FnOnce(&TaskContext) -> Result<T, E>,
    ) -> Result<(TaskContext, T), E> {
        match self.0.take() {
            Some(cached) if cached.0 == *ctx => Ok(cached),
            _ => Ok((ctx.clone(), convert(ctx)?)),
        }
    }

    pub(crate) fn put(&mut self, entry: (TaskContext, T)) {
        self.0 = Some(entry);
    }
}

/// Runs `run` on each worker with its group of `select` chunks, the first on
/// the calling thread and the others on scoped threads, and hands back each
/// worker with its result, in order. Both hosts spread `select` this way
/// (the contract says `select` keeps no state between calls).
pub(crate) fn spread<W: Send, G: Send, R: Send>(
    workers: Vec<W>,
    groups: Vec<G>,
    run: impl Fn(&mut W, G) -> R + Sync,
) -> Vec<(W, R)> {
    let run = &run;
    std::thread::scope(|scope| {
        let mut pairs = workers.into_iter().zip(groups);
        let first = pairs.next();
        let handles: Vec<_> = pairs
            .map(|(mut w, g)| {
                scope.spawn(move || {
                    let r = run(&mut w, g);
                    (w, r)
                })
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len() + 1);
        if let Some((mut w, g)) = first {
            let r = run(&mut w, g);
            out.push((w, r));
        }
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("a select worker thread panicked")),
        );
        out
    })
}

/// How many threads a host spreads `select` chunks over by default: the
/// number of cores, at most 4. Asked once: `available_parallelism` reads
/// cgroup files, which costs more than instantiating a Wasm policy.
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
}

/// The two kinds of policy file, told apart by extension: the one place that
/// knows `.wasm` is a component and `.rhai` a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Wasm,
    Rhai,
}

impl PolicyKind {
    /// Every kind, in the order a name is looked up when both files exist.
    pub const ALL: [PolicyKind; 2] = [PolicyKind::Wasm, PolicyKind::Rhai];

    pub fn from_extension(ext: &str) -> Option<PolicyKind> {
        match ext {
            "wasm" => Some(PolicyKind::Wasm),
            "rhai" => Some(PolicyKind::Rhai),
            _ => None,
        }
    }

    /// The kind of the file at `path`, or a load error saying what is expected.
    pub fn of(path: &Path) -> Result<PolicyKind, PolicyError> {
        path.extension()
            .and_then(|e| e.to_str())
            .and_then(PolicyKind::from_extension)
            .ok_or_else(|| PolicyError::Load {
                policy: path.display().to_string(),
                reason: "unknown policy kind: expected a `.wasm` component or a `.rhai` script"
                    .into(),
            })
    }

    pub fn extension(self) -> &'static str {
        match self {
            PolicyKind::Wasm => "wasm",
            PolicyKind::Rhai => "rhai",
        }
    }

    /// For people: `wasm component`, `rhai script`.
    pub fn describe(self) -> &'static str {
        match self {
            PolicyKind::Wasm => "wasm component",
            PolicyKind::Rhai => "rhai script",
        }
    }
}

/// Loads a `.wasm` component or a `.rhai` script, by extension.
pub fn load(
    path: &Path,
    runtime: &WasmRuntime,
    world: crate::world::World,
    limits: Limits,
) -> Result<Box<dyn Policy>, PolicyError> {
    match PolicyKind::of(path)? {
        PolicyKind::Wasm => Ok(Box::new(
            runtime.load_file(path)?.instantiate(world, limits)?,
        )),
        PolicyKind::Rhai => Ok(Box::new(RhaiPolicy::load_file(path, world, limits)?)),
    }
}
