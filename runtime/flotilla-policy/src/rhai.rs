//! The Rhai policy host: a `.rhai` script whose functions `select(ctx, nodes)`,
//! `plan(ctx, nodes)`, `admit(ctx, node, now)`, `evaluate(ctx, report)` and
//! `on_request(ctx, node)` are the hooks of the `policy` world.
//!
//! Values cross as Rhai maps and arrays with the serde JSON shapes of the model
//! types (`ctx.params` is the JSON object as a map), except nodes: they are
//! values of the type `node` ([`node`]), which read like their maps
//! (`n.version`, `n["labels"]`, `"id" in n`, `n == #{...}`, `n.to_map()`)
//! without a map being built for each node of a chunk. The host functions mirror
//! the WIT imports (`fleet_query`, `fleet_get`, `fleet_count`, `releases`,
//! `control_plane_version`, `node_run`, `task_summary`, `node_history`, `metric`,
//! `now`, `log`) plus the version helpers of `flotilla-version` (`is_version`,
//! `version_same`, `version_in_range`, `version_cmp`).
//!
//! A script gets no filesystem, no `import`, no `eval`, no wall clock
//! (`timestamp`) and no `sleep`. Each hook call runs under [`Limits`]: an
//! operation count, a call depth, a CPU budget checked every
//! [`CLOCK_CHECK_EVERY`] operations, a cap on strings, arrays and maps, and
//! the memory cap of a Wasm instance on everything the call allocates and
//! still holds (counted by [`crate::alloc`], checked every
//! [`MEMORY_CHECK_EVERY`] operations).
//! `print`, `debug` and `log` write at most [`PRINT_LINES_PER_CALL`] lines a
//! call and [`PRINT_LINES_PER_MINUTE`] a minute per policy, each cut at
//! [`MAX_PRINT_BYTES`] with control characters escaped; what is dropped is
//! counted in one "lines suppressed" line.
//!
//! Top-level statements run once, at load. Top-level constants stay visible to
//! the hooks both by name and as `global::NAME`; `const VERSION = "1.2.0";` names
//! the policy's version.

mod node;

use super::{Failure, Limits, Policy, PolicyError};
use crate::clock::CallClock;
use crate::world::World;
use flotilla_model::{
    Admission, Hook, Node, Offer, PlanCalls, PolicyInfo, Selection, Selector, SkipReason,
    TaskContext, Verdict, Wave, WaveReport,
};
use flotilla_window::{Window, local_time_in};
use rhai::packages::{
    BasicArrayPackage, BasicBlobPackage, BasicMapPackage, BasicMathPackage, BitFieldPackage,
    CorePackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{
    AST, Array, CallFnOptions, Dynamic, Engine, EvalAltResult, FLOAT, INT, ImmutableString, Map,
    Module, Position, Scope, Shared,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `fleet_query` returns at most this many nodes a call.
const MAX_QUERY: INT = 4096;
/// Expression nesting at the top level and inside functions (Rhai's release defaults).
const MAX_EXPR_DEPTH: usize = 64;
const MAX_FN_EXPR_DEPTH: usize = 32;
/// The wall clock is read once per this many operations (the CPU clock only
/// once the wall deadline passed, see [`Deadline::passed`]). Reading it costs about
/// as much as one cheap operation, so this is noise; fewer would let a run of
/// expensive operations (megabyte string copies) overshoot the budget further.
const CLOCK_CHECK_EVERY: u64 = 256;
/// The memory a hook holds is checked once per this many operations: the
/// read is cheap, but a `select` over a million nodes runs ~10^8 operations.
const MEMORY_CHECK_EVERY: u64 = 4;
/// `print`, `debug` and `log` of one hook call: at most this many lines...
const PRINT_LINES_PER_CALL: usize = 100;
/// ...of at most this many bytes each (longer ones are cut)...
const MAX_PRINT_BYTES: usize = 1024;
/// ...and a policy at most this many a minute, across its calls and threads.
const PRINT_LINES_PER_MINUTE: usize = 1000;

type RhaiError = Box<EvalAltResult>;

/// A loaded `.rhai` policy.
pub struct RhaiPolicy {
    info: PolicyInfo,
    engine: Engine,
    ast: AST,
    limits: Limits,
    deadline: Arc<Deadline>,
    /// The policy's print allowance per minute, shared by its engines.
    prints: Arc<PrintWindow>,
    world: World,
    /// The script's top-level constants, for the engines of `workers`.
    constants: Option<Shared<Module>>,
    /// Engines for spreading `select` chunks over cores (made on first use).
    workers: Vec<Worker>,
    /// How many threads `select` may use (the calling one included).
    threads: usize,
    /// The last task context and its Rhai form: `select` is called once per chunk
    /// with the same context.
    ctx_cache: crate::CtxCache<(Dynamic, Sizes)>,
}

impl std::fmt::Debug for RhaiPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RhaiPolicy")
            .field("info", &self.info)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RhaiPolicy {
    /// Loads a script file; the policy is named after the file stem.
    pub fn load_file(path: &Path, world: World, limits: Limits) -> Result<Self, PolicyError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let source = std::fs::read_to_string(path).map_err(|e| PolicyError::Load {
            policy: name.clone(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::load_str(&name, &source, world, limits)
    }

    /// Compiles `source`, checks its hooks and runs its top-level statements once.
    pub fn load_str(
        name: &str,
        source: &str,
        world: World,
        limits: Limits,
    ) -> Result<Self, PolicyError> {
        let load_err = |reason: String| PolicyError::Load {
            policy: name.to_string(),
            reason,
        };
        if !crate::alloc::installed() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "this program does not count allocations (flotilla_policy::alloc::Counting \
                     is not its global allocator): Rhai hooks are held to the per-value caps, \
                     not to the memory cap"
                );
            });
        }
        let prints = Arc::new(PrintWindow::default());
        let deadline = Arc::new(Deadline::new(&limits, prints.clone()));
        let mut engine = new_engine(name, &world, &limits, deadline.clone());

        let mut ast = engine
            .compile(source)
            .map_err(|e| load_err(format!("syntax error: {e}")))?;
        let hooks = hooks_of(&ast).map_err(load_err)?;

        // Top-level statements: once, now, under the same limits as a hook.
        set_allowance(&mut engine, &limits, Sizes::default());
        deadline.arm(limits.cpu);
        let mut scope = Scope::new();
        let ran = engine.run_ast_with_scope(&mut scope, &ast);
        deadline.report_suppressed(name, "top-level statements");
        ran.map_err(|e| {
            load_err(match classify(&e, &limits, limits.cpu) {
                Failure::Budget(b) => {
                    format!("top-level statements exceeded the CPU budget ({b})")
                }
                Failure::Memory(c) => {
                    format!("top-level statements exceeded the memory cap ({c})")
                }
                Failure::Trap(m) => format!("top-level statements failed: {m}"),
            })
        })?;

        let version = match scope.get("VERSION") {
            Some(v) if scope.is_constant("VERSION") == Some(true) => {
                v.clone().flatten().into_string().map_err(|t| {
                    load_err(format!(
                        "`const VERSION` must be a string like \"1.2.0\", got {}",
                        describe_type(t)
                    ))
                })?
            }
            _ => "0.0.0".to_string(),
        };

        // Top-level constants stay visible to the hooks, by name and as `global::NAME`.
        let mut constants = Module::new();
        for (var, is_const, value) in scope.iter() {
            if is_const {
                constants.set_var(var, value);
            }
        }
        let any = constants.iter_var().next().is_some();
        let constants = any.then(|| {
            constants.build_index();
            let constants: Shared<Module> = constants.into();
            add_constants(&mut engine, &constants);
            constants
        });
        ast.clear_statements();

        Ok(RhaiPolicy {
            info: PolicyInfo {
                name: name.to_string(),
                version,
                hooks,
                // A script's `plan` gets every node in one call.
                plan_calls: PlanCalls::InOrder,
            },
            engine,
            ast,
            limits,
            deadline,
            prints,
            world,
            constants,
            workers: Vec::new(),
            threads: super::default_threads(),
            ctx_cache: Default::default(),
        })
    }

    /// The context as a Rhai map, converted once per distinct context.
    fn ctx_value(&mut self, ctx: &TaskContext) -> Result<(Dynamic, Sizes), String> {
        let entry = self.ctx_cache.take(ctx, |ctx| {
            let value = rhai::serde::to_dynamic(ctx).map_err(|e| format!("task context: {e}"))?;
            let sizes = Sizes::of(&value);
            Ok::<_, String>((value, sizes))
        })?;
        let out = entry.1.clone();
        self.ctx_cache.put(entry);
        Ok(out)
    }

    /// Runs one hook on already converted arguments, mapping failures.
    /// `nodes` is how many nodes the call is handed: the CPU budget grows with
    /// it ([`Limits::budget`]), as for a Wasm policy.
    fn call(
        &mut self,
        hook: Hook,
        args: Vec<Dynamic>,
        input: Sizes,
        nodes: usize,
    ) -> Result<Dynamic, PolicyError> {
        let run = Run {
            ast: &self.ast,
            limits: &self.limits,
            policy: &self.info.name,
        };
        run.call(&mut self.engine, &self.deadline, hook, args, input, nodes)
    }

    /// How many threads `select` may spread chunks over (default: the number
    /// of cores, at most 4). 1 keeps everything on the calling thread.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
        self.workers.truncate(self.threads - 1);
    }

    fn input_error(&self, hook: Hook, message: String) -> PolicyError {
        PolicyError::Trap {
            policy: self.info.name.clone(),
            hook,
            message: format!("cannot pass the input to the script: {message}"),
        }
    }

    fn invalid(&self, hook: Hook, reason: String) -> PolicyError {
        PolicyError::invalid(&self.info.name, hook, reason)
    }

    fn call_with_ctx(
        &mut self,
        hook: Hook,
        ctx: &TaskContext,
        mut args: Vec<Dynamic>,
        sizes: Sizes,
        nodes: usize,
    ) -> Result<Dynamic, PolicyError> {
        let (ctx, ctx_sizes) = self.ctx_value(ctx).map_err(|m| self.input_error(hook, m))?;
        args.insert(0, ctx);
        self.call(hook, args, ctx_sizes + sizes, nodes)
    }
}

/// An engine of its own (limits and deadline are per engine) for a thread
/// that runs `select` chunks.
struct Worker {
    engine: Engine,
    deadline: Arc<Deadline>,
}

/// What a hook call needs besides an engine: shared by the threads of a
/// `select` spread over cores.
#[derive(Clone, Copy)]
struct Run<'a> {
    ast: &'a AST,
    limits: &'a Limits,
    policy: &'a str,
}

impl Run<'_> {
    /// Runs one hook on already converted arguments in `engine`, mapping failures.
    fn call(
        &self,
        engine: &mut Engine,
        deadline: &Deadline,
        hook: Hook,
        args: Vec<Dynamic>,
        input: Sizes,
        nodes: usize,
    ) -> Result<Dynamic, PolicyError> {
        set_allowance(engine, self.limits, input);
        let budget = self.limits.budget(nodes);
        deadline.arm(budget);
        let mut scope = Scope::new();
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let result = engine.call_fn_with_options::<Dynamic>(
            options,
            &mut scope,
            self.ast,
            hook.fn_name(),
            args,
        );
        deadline.report_suppressed(self.policy, hook.fn_name());
        result
            .map(Dynamic::flatten)
            .map_err(|e| classify(&e, self.limits, budget).into_error(self.policy, hook))
    }

    /// `select` on each of `chunks` in turn.
    fn select(
        &self,
        engine: &mut Engine,
        deadline: &Deadline,
        ctx: &(Dynamic, Sizes),
        chunks: &[&[Node]],
    ) -> Result<Vec<Vec<Selection>>, PolicyError> {
        chunks
            .iter()
            .map(|chunk| {
                let (nodes, sizes) = nodes_to_dynamic(chunk);
                let args = vec![ctx.0.clone(), nodes];
                let out = self.call(
                    engine,
                    deadline,
                    Hook::Select,
                    args,
                    ctx.1 + sizes,
                    chunk.len(),
                )?;
                selections(out).map_err(|r| PolicyError::invalid(self.policy, Hook::Select, r))
            })
            .collect()
    }
}

impl Policy for RhaiPolicy {
    fn info(&self) -> &PolicyInfo {
        &self.info
    }

    /// Chunks are spread over up to `threads` threads, each with an engine of
    /// its own and the same AST (the contract says `select` keeps no state
    /// between calls). Each chunk has its own budget; the first error in
    /// chunk order is returned.
    fn call_select_chunks(
        &mut self,
        ctx: &TaskContext,
        chunks: &[&[Node]],
    ) -> Result<Vec<Vec<Selection>>, PolicyError> {
        let per = chunks.len().div_ceil(self.threads).max(1);
        let groups: Vec<&[&[Node]]> = chunks.chunks(per).collect();
        if groups.len() <= 1 {
            return chunks.iter().map(|c| self.call_select(ctx, c)).collect();
        }
        let ctx = self
            .ctx_value(ctx)
            .map_err(|m| self.input_error(Hook::Select, m))?;
        while self.workers.len() < groups.len() - 1 {
            let deadline = Arc::new(Deadline::new(&self.limits, self.prints.clone()));
            let mut engine =
                new_engine(&self.info.name, &self.world, &self.limits, deadline.clone());
            if let Some(constants) = &self.constants {
                add_constants(&mut engine, constants);
            }
            self.workers.push(Worker { engine, deadline });
        }
        let run = Run {
            ast: &self.ast,
            limits: &self.limits,
            policy: &self.info.name,
        };
        let mut workers = vec![(&mut self.engine, &*self.deadline)];
        workers.extend(
            self.workers
                .iter_mut()
                .map(|w| (&mut w.engine, &*w.deadline)),
        );
        workers.truncate(groups.len());
        let results = crate::spread(workers, groups, |(engine, deadline), group| {
            run.select(engine, deadline, &ctx, group)
        });
        let mut all = Vec::with_capacity(chunks.len());
        for (_, r) in results {
            all.extend(r?);
        }
        Ok(all)
    }

    fn call_select(
        &mut self,
        ctx: &TaskContext,
        nodes: &[Node],
    ) -> Result<Vec<Selection>, PolicyError> {
        let n = nodes.len();
        let (nodes, sizes) = nodes_to_dynamic(nodes);
        let out = self.call_with_ctx(Hook::Select, ctx, vec![nodes], sizes, n)?;
        selections(out).map_err(|r| self.invalid(Hook::Select, r))
    }

    fn call_plan(&mut self, ctx: &TaskContext, nodes: &[Node]) -> Result<Vec<Wave>, PolicyError> {
        let n = nodes.len();
        let (nodes, sizes) = nodes_to_dynamic(nodes);
        let out = self.call_with_ctx(Hook::Plan, ctx, vec![nodes], sizes, n)?;
        waves(out).map_err(|r| self.invalid(Hook::Plan, r))
    }

    fn call_admit(
        &mut self,
        ctx: &TaskContext,
        node: &Node,
        now: u64,
    ) -> Result<Admission, PolicyError> {
        let args = vec![node_to_dynamic(node), Dynamic::from_int(to_int(now))];
        let sizes = node_sizes(node);
        let out = self.call_with_ctx(Hook::Admit, ctx, args, sizes, 1)?;
        admission(out).map_err(|r| self.invalid(Hook::Admit, r))
    }

    fn call_evaluate(
        &mut self,
        ctx: &TaskContext,
        report: &WaveReport,
    ) -> Result<Verdict, PolicyError> {
        let report = rhai::serde::to_dynamic(report)
            .map_err(|e| self.input_error(Hook::Evaluate, format!("wave report: {e}")))?;
        let sizes = Sizes::of(&report);
        let out = self.call_with_ctx(Hook::Evaluate, ctx, vec![report], sizes, 0)?;
        verdict(out).map_err(|r| self.invalid(Hook::Evaluate, r))
    }

    fn call_on_request(&mut self, ctx: &TaskContext, node: &Node) -> Result<Offer, PolicyError> {
        let sizes = node_sizes(node);
        let out =
            self.call_with_ctx(Hook::OnRequest, ctx, vec![node_to_dynamic(node)], sizes, 1)?;
        offer(out).map_err(|r| self.invalid(Hook::OnRequest, r))
    }
}

// ---------------------------------------------------------------------------
// Engine

/// One engine's per-call state, which the progress and print callbacks
/// check: the CPU deadline, the memory the call started with, and
/// the lines it printed. An engine runs one call at a time, on one thread.
#[derive(Debug)]
struct Deadline {
    base: Instant,
    /// Nanoseconds after `base` when `clock` is next looked at (the wall
    /// clock is cheap to read, the thread's CPU clock is a system call).
    at: AtomicU64,
    /// The running call's CPU budget (see [`crate::clock`]).
    clock: std::sync::Mutex<Option<CallClock>>,
    /// The thread's allocation balance ([`crate::alloc::thread_live`]) when
    /// the call started, and how much it may grow.
    memory_start: AtomicIsize,
    memory_cap: isize,
    printed: AtomicUsize,
    suppressed: AtomicUsize,
    prints: Arc<PrintWindow>,
}

/// A policy's print lines in the current minute.
#[derive(Debug)]
struct PrintWindow(std::sync::Mutex<(Instant, usize)>);

impl Default for PrintWindow {
    fn default() -> Self {
        PrintWindow(std::sync::Mutex::new((Instant::now(), 0)))
    }
}

impl PrintWindow {
    /// Takes one line of the minute's allowance, if any is left.
    fn take(&self) -> bool {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if w.0.elapsed() >= Duration::from_secs(60) {
            *w = (Instant::now(), 0);
        }
        w.1 += 1;
        w.1 <= PRINT_LINES_PER_MINUTE
    }
}

/// What the progress callback stops a call with when it holds too much.
const MEMORY_TOKEN: &str = "memory cap";

impl Deadline {
    fn new(limits: &Limits, prints: Arc<PrintWindow>) -> Self {
        Deadline {
            base: Instant::now(),
            at: AtomicU64::new(u64::MAX),
            clock: std::sync::Mutex::new(None),
            memory_start: AtomicIsize::new(0),
            memory_cap: isize::try_from(limits.memory_bytes).unwrap_or(isize::MAX),
            printed: AtomicUsize::new(0),
            suppressed: AtomicUsize::new(0),
            prints,
        }
    }

    /// Starts a call on this thread.
    fn arm(&self, budget: Duration) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some(CallClock::start(budget));
        self.look_again_in(budget);
        self.memory_start
            .store(crate::alloc::thread_live(), Ordering::Relaxed);
        self.printed.store(0, Ordering::Relaxed);
        self.suppressed.store(0, Ordering::Relaxed);
    }

    fn look_again_in(&self, d: Duration) {
        let at = (self.base.elapsed() + d).as_nanos();
        self.at
            .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The call used its CPU budget (or reached the wall-clock backstop).
    /// Runs on the thread of the call.
    fn passed(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if now <= self.at.load(Ordering::Relaxed) {
            return false;
        }
        let left = self
            .clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|c| c.remaining());
        match left {
            Some(left) => {
                self.look_again_in(left);
                false
            }
            None => true,
        }
    }

    /// The call holds more than the memory cap (0 without the counting
    /// allocator, which then never says so).
    fn over_memory(&self) -> bool {
        let grown =
            crate::alloc::thread_balance().wrapping_sub(self.memory_start.load(Ordering::Relaxed));
        grown > self.memory_cap
    }

    /// Writes one line of the script's output, if the call's and the
    /// policy's allowances have room; counts it as suppressed otherwise.
    fn print(&self, line: impl FnOnce()) {
        if self.printed.fetch_add(1, Ordering::Relaxed) < PRINT_LINES_PER_CALL && self.prints.take()
        {
            line();
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// After a call: one line for everything its allowance dropped.
    fn report_suppressed(&self, policy: &str, during: &str) {
        let n = self.suppressed.swap(0, Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(
                policy = %policy,
                "{n} lines suppressed from {during}: a policy prints at most \
                 {PRINT_LINES_PER_CALL} lines a call and {PRINT_LINES_PER_MINUTE} a minute"
            );
        }
    }
}

/// A line of a script's output as it may go into the runner's log: control
/// characters (a forged newline, terminal escapes) escaped, cut at
/// [`MAX_PRINT_BYTES`].
fn log_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_PRINT_BYTES) + 32);
    for (i, c) in s.char_indices() {
        if out.len() >= MAX_PRINT_BYTES {
            out.push_str(&format!("... ({} bytes cut)", s.len() - i));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// An engine with the standard library minus the wall clock, with no module
/// loading and no `eval`, the limits, and the host functions.
fn new_engine(name: &str, world: &World, limits: &Limits, deadline: Arc<Deadline>) -> Engine {
    let mut engine = Engine::new_raw();
    // The standard package without `BasicTimePackage` (`timestamp()` would be a
    // second clock): the only time a policy sees is `now()`.
    engine.register_global_module(CorePackage::new().as_shared_module());
    engine.register_global_module(BitFieldPackage::new().as_shared_module());
    engine.register_global_module(LogicPackage::new().as_shared_module());
    engine.register_global_module(BasicMathPackage::new().as_shared_module());
    engine.register_global_module(BasicArrayPackage::new().as_shared_module());
    engine.register_global_module(BasicBlobPackage::new().as_shared_module());
    engine.register_global_module(BasicMapPackage::new().as_shared_module());
    engine.register_global_module(MoreStringPackage::new().as_shared_module());
    engine.set_max_strings_interned(256);

    engine.set_module_resolver(NoModules);
    engine.disable_symbol("eval");

    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_depth);
    engine.set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH);
    set_allowance(&mut engine, limits, Sizes::default());
    let progress = deadline.clone();
    engine.on_progress(move |ops| {
        // Every few operations: one allocates at most about two values of
        // `max_collection` bytes (a copy and its source), so the cap is
        // overshot by at most a few of those.
        if ops % MEMORY_CHECK_EVERY == 0 && progress.over_memory() {
            Some(Dynamic::from(MEMORY_TOKEN))
        } else if ops % CLOCK_CHECK_EVERY == 0 && progress.passed() {
            Some(Dynamic::from("cpu budget"))
        } else {
            None
        }
    });

    let policy: Arc<str> = name.into();
    let (p, d) = (policy.clone(), deadline.clone());
    engine.on_print(move |s| d.print(|| tracing::info!(policy = %p, "{}", log_line(s))));
    let (p, d) = (policy.clone(), deadline.clone());
    engine.on_debug(move |s, _, pos| {
        d.print(|| tracing::debug!(policy = %p, %pos, "{}", log_line(s)));
    });

    node::register(&mut engine);
    register_host(&mut engine, world, policy, deadline);
    register_version_helpers(&mut engine);
    register_calendar(&mut engine);
    engine
}

/// Makes a script's top-level constants visible by name and as `global::NAME`.
fn add_constants(engine: &mut Engine, constants: &Shared<Module>) {
    engine.register_static_module("global", constants.clone());
    engine.register_global_module(constants.clone());
}

/// Caps strings, arrays and maps at `max_collection` on top of what the host
/// handed in: Rhai counts a value's size recursively, so a chunk of nodes (or a
/// whole fleet for `plan`) must not eat the script's own allowance.
fn set_allowance(engine: &mut Engine, limits: &Limits, input: Sizes) {
    let cap = limits.max_collection;
    engine.set_max_string_size(cap.saturating_add(input.strings));
    engine.set_max_array_size(cap.saturating_add(input.arrays));
    engine.set_max_map_size(cap.saturating_add(input.maps));
}

/// Refuses every `import`: a policy is one self-contained script.
struct NoModules;

impl rhai::ModuleResolver for NoModules {
    fn resolve(
        &self,
        _: &Engine,
        _: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, RhaiError> {
        Err(EvalAltResult::ErrorRuntime(
            format!(
                "cannot import '{path}': a Rhai policy is a single script (import is not available)"
            )
            .into(),
            pos,
        )
        .into())
    }
}

fn throw(message: String) -> RhaiError {
    message.into()
}

fn register_host(engine: &mut Engine, world: &World, policy: Arc<str>, calls: Arc<Deadline>) {
    let fleet = world.fleet.clone();
    engine.register_fn(
        "fleet_query",
        move |selector: Map, offset: INT, limit: INT| -> Result<Array, RhaiError> {
            let selector = to_selector(selector, "fleet_query")?;
            let offset = u64::try_from(offset)
                .map_err(|_| throw(format!("fleet_query: offset must be >= 0, got {offset}")))?;
            if limit < 0 {
                return Err(throw(format!(
                    "fleet_query: limit must be >= 0, got {limit}"
                )));
            }
            let limit = limit.min(MAX_QUERY) as u32;
            Ok(node::Chunk::array(&fleet.query(&selector, offset, limit)))
        },
    );
    let fleet = world.fleet.clone();
    engine.register_fn("fleet_get", move |id: &str| -> Dynamic {
        fleet
            .get(id)
            .as_ref()
            .map_or(Dynamic::UNIT, node_to_dynamic)
    });
    let fleet = world.fleet.clone();
    engine.register_fn(
        "fleet_count",
        move |selector: Map| -> Result<INT, RhaiError> {
            let selector = to_selector(selector, "fleet_count")?;
            Ok(to_int(fleet.count(&selector)))
        },
    );

    let delivery = world.delivery.clone();
    engine.register_fn(
        "releases",
        move |package: &str| -> Result<Dynamic, RhaiError> {
            rhai::serde::to_dynamic(delivery.releases(package))
        },
    );
    let delivery = world.delivery.clone();
    engine.register_fn("control_plane_version", move |component: &str| -> Dynamic {
        delivery
            .control_plane_version(component)
            .map_or(Dynamic::UNIT, Dynamic::from)
    });

    let status = world.status.clone();
    engine.register_fn("node_run", move |id: &str| -> Result<Dynamic, RhaiError> {
        match status.run(id) {
            Some(run) => rhai::serde::to_dynamic(run),
            None => Ok(Dynamic::UNIT),
        }
    });
    let status = world.status.clone();
    engine.register_fn("task_summary", move || -> Result<Dynamic, RhaiError> {
        rhai::serde::to_dynamic(status.summary())
    });
    let status = world.status.clone();
    engine.register_fn(
        "node_history",
        move |id: &str, limit: INT| -> Result<Dynamic, RhaiError> {
            let limit = u32::try_from(limit.max(0)).unwrap_or(u32::MAX);
            rhai::serde::to_dynamic(status.history(id, limit))
        },
    );
    let status = world.status.clone();
    engine.register_fn("metric", move |id: &str, name: &str| -> Dynamic {
        status
            .metric(id, name)
            .map_or(Dynamic::UNIT, |v| Dynamic::from_float(v as FLOAT))
    });

    let clock = world.clock.clone();
    engine.register_fn("now", move || -> INT { to_int(clock.now()) });

    engine.register_fn(
        "log",
        move |level: &str, message: Dynamic| -> Result<(), RhaiError> {
            let p = &*policy;
            if !matches!(level, "trace" | "debug" | "info" | "warn" | "error") {
                return Err(throw(format!(
                    "log: unknown level '{}' (trace, debug, info, warn or error)",
                    log_line(level)
                )));
            }
            calls.print(|| {
                let message = log_line(&message.to_string());
                match level {
                    "trace" => tracing::trace!(policy = %p, "{message}"),
                    "debug" => tracing::debug!(policy = %p, "{message}"),
                    "info" => tracing::info!(policy = %p, "{message}"),
                    "warn" => tracing::warn!(policy = %p, "{message}"),
                    _ => tracing::error!(policy = %p, "{message}"),
                }
            });
            Ok(())
        },
    );

    // `sleep` comes with Rhai's core package; a policy must not block the runner.
    let refuse_sleep = || -> Result<(), RhaiError> {
        Err(throw(
            "sleep is not available to policies (defer with `admit` instead)".into(),
        ))
    };
    engine.register_fn("sleep", move |_: INT| refuse_sleep());
    engine.register_fn("sleep", move |_: FLOAT| refuse_sleep());
}

/// A selector map (`#{labels: [["env", "prod"]]}`); label and attribute pairs may
/// also be given as a map (`#{labels: #{env: "prod"}}`).
fn to_selector(mut selector: Map, func: &str) -> Result<Selector, RhaiError> {
    for key in ["labels", "attributes"] {
        if let Some(v) = selector.get_mut(key)
            && let Some(map) = v.read_lock::<Map>().map(|m| m.clone())
        {
            *v = Dynamic::from_array(
                map.into_iter()
                    .map(|(k, v)| Dynamic::from_array(vec![k.as_str().into(), v]))
                    .collect(),
            );
        }
    }
    rhai::serde::from_dynamic(&Dynamic::from_map(selector)).map_err(|e| {
        throw(format!(
            "{func}: invalid selector: {}",
            one_line(&e.to_string())
        ))
    })
}

/// Local time and maintenance windows in named IANA zones, the runner's own
/// window logic (`flotilla-window`): a policy puts each node into its own
/// night without writing daylight-saving rules.
/// - `local_time(ms, zone)`: `#{year, month, day, hour, minute, second,
///   weekday (1 = Monday), offset_minutes, abbreviation}`;
/// - `window_open(cron, minutes, zone, ms)`: whether the window that opens
///   at each `cron` match in `zone` for `minutes` is open at `ms`;
/// - `window_next_open(cron, minutes, zone, ms)`: the first instant at or
///   after `ms` at which it is open (`()` past the end of the calendar).
///
/// A bad zone or pattern is an error naming what to fix.
fn register_calendar(engine: &mut Engine) {
    fn at(ms: INT, func: &str) -> Result<u64, RhaiError> {
        u64::try_from(ms).map_err(|_| throw(format!("{func}: instant {ms} is negative")))
    }
    fn window(cron: &str, minutes: INT, zone: &str, func: &str) -> Result<Window, RhaiError> {
        let minutes = u32::try_from(minutes)
            .map_err(|_| throw(format!("{func}: duration {minutes} min is out of range")))?;
        Window::parse(cron, minutes, zone).map_err(|e| throw(format!("{func}: {e}")))
    }
    engine.register_fn(
        "local_time",
        |ms: INT, zone: &str| -> Result<Dynamic, RhaiError> {
            let t = local_time_in(zone, at(ms, "local_time")?)
                .map_err(|e| throw(format!("local_time: {e}")))?;
            rhai::serde::to_dynamic(&t).map_err(|e| throw(format!("local_time: {e}")))
        },
    );
    engine.register_fn(
        "window_open",
        |cron: &str, minutes: INT, zone: &str, ms: INT| -> Result<bool, RhaiError> {
            Ok(window(cron, minutes, zone, "window_open")?.is_open(at(ms, "window_open")?))
        },
    );
    engine.register_fn(
        "window_next_open",
        |cron: &str, minutes: INT, zone: &str, ms: INT| -> Result<Dynamic, RhaiError> {
            let w = window(cron, minutes, zone, "window_next_open")?;
            Ok(w.next_open(at(ms, "window_next_open")?)
                .map_or(Dynamic::UNIT, |t| Dynamic::from_int(to_int(t))))
        },
    );
}

fn register_version_helpers(engine: &mut Engine) {
    engine.register_fn("is_version", |s: &str| parsed::version(s).is_ok());
    // `flotilla_version::same`, on cached parses.
    engine.register_fn("version_same", |a: &str, b: &str| {
        match (parsed::version(a), parsed::version(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => a.trim() == b.trim(),
        }
    });
    engine.register_fn(
        "version_in_range",
        |version: &str, range: &str| -> Result<bool, RhaiError> {
            parsed::range(range, |req| {
                let req = req.as_ref().map_err(|e| {
                    throw(format!(
                        "version_in_range: invalid semver range '{range}': {e}"
                    ))
                })?;
                let v = parsed::version(version).map_err(|e| {
                    throw(format!(
                        "version_in_range: '{version}' is not a version: {e}"
                    ))
                })?;
                Ok(req.matches(&v))
            })
        },
    );
    engine.register_fn(
        "version_cmp",
        |a: &str, b: &str| -> Result<INT, RhaiError> {
            let parse = |s: &str| {
                parsed::version(s)
                    .map_err(|e| throw(format!("version_cmp: '{s}' is not a version: {e}")))
            };
            Ok(match parse(a)?.cmp(&parse(b)?) {
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => 1,
            })
        },
    );
}

/// `flotilla_version::parse` and `parse_range`, remembered per thread: a fleet
/// has few distinct versions, and `select` asks about each node several times.
mod parsed {
    use semver::{Version, VersionReq};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Entries kept per thread before the cache starts over.
    const CAP: usize = 1024;
    /// Longer strings are parsed every time rather than kept.
    const MAX_KEY: usize = 64;

    type Cache<T> = RefCell<HashMap<Box<str>, Result<T, String>>>;

    thread_local! {
        static VERSIONS: Cache<Version> = RefCell::new(HashMap::new());
        static RANGES: Cache<VersionReq> = RefCell::new(HashMap::new());
    }

    /// Calls `f` on the cached parse of `key`. `f` must not use the same cache.
    fn cached<T, R>(
        cache: &'static std::thread::LocalKey<Cache<T>>,
        key: &str,
        parse: fn(&str) -> Result<T, semver::Error>,
        f: impl FnOnce(&Result<T, String>) -> R,
    ) -> R {
        if key.len() > MAX_KEY {
            return f(&parse(key).map_err(|e| e.to_string()));
        }
        cache.with(|c| {
            if let Some(hit) = c.borrow().get(key) {
                return f(hit);
            }
            let value = parse(key).map_err(|e| e.to_string());
            let out = f(&value);
            let mut c = c.borrow_mut();
            if c.len() >= CAP {
                c.clear();
            }
            c.insert(key.into(), value);
            out
        })
    }

    /// `flotilla_version::parse`, the error as text.
    pub fn version(s: &str) -> Result<Version, String> {
        cached(&VERSIONS, s, flotilla_version::parse, Clone::clone)
    }

    /// `flotilla_version::parse_range`, the error as text; `f` may call [`version`].
    pub fn range<R>(s: &str, f: impl FnOnce(&Result<VersionReq, String>) -> R) -> R {
        cached(&RANGES, s, flotilla_version::parse_range, f)
    }
}

/// The hooks `ast` defines, checking each one's parameters.
fn hooks_of(ast: &AST) -> Result<Vec<Hook>, String> {
    let mut hooks = Vec::new();
    for hook in Hook::ALL {
        let params: &[&str] = match hook {
            Hook::Select | Hook::Plan => &["ctx", "nodes"],
            Hook::Admit => &["ctx", "node", "now"],
            Hook::Evaluate => &["ctx", "report"],
            Hook::OnRequest => &["ctx", "node"],
        };
        let mut found = false;
        for f in ast.iter_functions() {
            if f.name != hook.fn_name() || f.this_type.is_some() {
                continue;
            }
            if f.params.len() != params.len() {
                return Err(format!(
                    "hook `{}` must be `fn {}({})`, but the script defines it with {} parameter{} ({})",
                    hook.fn_name(),
                    hook.fn_name(),
                    params.join(", "),
                    f.params.len(),
                    if f.params.len() == 1 { "" } else { "s" },
                    f.params.join(", "),
                ));
            }
            found = true;
        }
        if found {
            hooks.push(hook);
        }
    }
    Ok(hooks)
}

// ---------------------------------------------------------------------------
// Errors

/// What stopped a Rhai run: the operation count or the CPU-time deadline
/// (budget), the allocation counter or a collection past its size (memory
/// cap), or the script itself.
fn classify(err: &EvalAltResult, limits: &Limits, budget: Duration) -> Failure {
    match err.unwrap_inner() {
        EvalAltResult::ErrorTooManyOperations(..) => {
            Failure::Budget(format!("{} operations", limits.max_operations))
        }
        EvalAltResult::ErrorTerminated(token, _)
            if token.clone().into_string().ok().as_deref() == Some(MEMORY_TOKEN) =>
        {
            Failure::Memory(format!(
                "{} MiB held by one call",
                limits.memory_bytes >> 20
            ))
        }
        EvalAltResult::ErrorTerminated(..) => Failure::cpu(budget),
        EvalAltResult::ErrorDataTooLarge(what, pos) => Failure::Memory(format!(
            "{} elements or bytes per string, array or map; {} too large{}",
            limits.max_collection,
            what.to_lowercase(),
            if pos.is_none() {
                String::new()
            } else {
                format!(" at {pos}")
            }
        )),
        _ => Failure::Trap(one_line(&err.to_string())),
    }
}

fn one_line(s: &str) -> String {
    s.trim().replace('\n', ", ")
}

// ---------------------------------------------------------------------------
// Input: model values to Rhai values

/// What Rhai counts against its size limits: array elements, map entries and
/// string bytes, all nested levels together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sizes {
    arrays: usize,
    maps: usize,
    strings: usize,
}

impl std::ops::Add for Sizes {
    type Output = Sizes;
    fn add(self, o: Sizes) -> Sizes {
        Sizes {
            arrays: self.arrays + o.arrays,
            maps: self.maps + o.maps,
            strings: self.strings + o.strings,
        }
    }
}

impl Sizes {
    /// Rhai's own count (`calc_data_sizes`) of a value.
    fn of(value: &Dynamic) -> Sizes {
        fn walk(v: &Dynamic, s: &mut Sizes) {
            if let Some(a) = v.read_lock::<Array>() {
                for x in a.iter() {
                    s.arrays += 1;
                    walk(x, s);
                }
            } else if let Some(m) = v.read_lock::<Map>() {
                for x in m.values() {
                    s.maps += 1;
                    walk(x, s);
                }
            } else if let Some(st) = v.read_lock::<ImmutableString>() {
                s.strings += st.len();
            } else if let Some(b) = v.read_lock::<rhai::Blob>() {
                s.arrays += b.len();
            }
        }
        let mut s = Sizes::default();
        walk(value, &mut s);
        s
    }
}

fn to_int(v: u64) -> INT {
    INT::try_from(v).unwrap_or(INT::MAX)
}

/// Nodes as an array of `node` values ([`node`]), and the allowance they
/// bring: what Rhai would count for them as maps (their JSON shape), so a
/// script may turn its input into that much data (`nodes.map(|n| n.id)`)
/// without it counting against its own [`Limits::max_collection`].
fn nodes_to_dynamic(nodes: &[Node]) -> (Dynamic, Sizes) {
    let sizes = nodes
        .iter()
        .fold(Sizes::default(), |s, n| s + node_sizes(n));
    (Dynamic::from_array(node::Chunk::array(nodes)), sizes)
}

fn node_to_dynamic(node: &Node) -> Dynamic {
    node::Chunk::one(node)
}

/// One node's map counted as an element of an array.
fn node_sizes(n: &Node) -> Sizes {
    let pair_bytes = |pairs: &[(String, String)]| -> usize {
        pairs.iter().map(|(k, v)| k.len() + v.len()).sum()
    };
    Sizes {
        arrays: 1 + 3 * (n.labels.len() + n.attributes.len()),
        maps: node::FIELDS.len(),
        strings: n.id.len()
            + n.version.len()
            + n.asset_path.len()
            + pair_bytes(&n.labels)
            + pair_bytes(&n.attributes),
    }
}

// ---------------------------------------------------------------------------
// Output: Rhai values to model values

/// "a string", "an integer", ... for messages.
fn describe_type(type_name: &str) -> String {
    match type_name {
        "string" | "&str" | "alloc::string::String" => "a string".into(),
        "i64" | "i32" | "integer" => "an integer".into(),
        "f64" | "f32" | "float" => "a float".into(),
        "bool" => "a bool".into(),
        "char" => "a character".into(),
        "array" => "an array".into(),
        "map" => "a map".into(),
        "()" => "`()` (no value: does every path return one?)".into(),
        "Fn" => "a function pointer".into(),
        other => format!("a value of type {other}"),
    }
}

fn describe(v: &Dynamic) -> String {
    describe_type(v.type_name())
}

fn into_map(v: Dynamic, what: &str, example: &str) -> Result<Map, String> {
    let v = v.flatten();
    if v.is_map() {
        Ok(v.cast::<Map>())
    } else {
        Err(format!(
            "{what}: expected a map like {example}, got {}",
            describe(&v)
        ))
    }
}

fn into_array(v: Dynamic, what: &str) -> Result<Array, String> {
    let v = v.flatten();
    if v.is_array() {
        Ok(v.cast::<Array>())
    } else {
        Err(format!("expected an array of {what}, got {}", describe(&v)))
    }
}

/// A string field, shared with the script's value (no copy).
fn str_field(map: &Map, key: &str, what: &str) -> Result<ImmutableString, String> {
    match map.get(key) {
        None => Err(format!("{what}: missing field `{key}`")),
        Some(v) => v
            .clone()
            .flatten()
            .into_immutable_string()
            .map_err(|t| format!("{what}: `{key}` must be a string, got {}", describe_type(t))),
    }
}

fn string_field(map: &Map, key: &str, what: &str) -> Result<String, String> {
    // Copy the text; `String::from(ImmutableString)` would first clone the
    // shared string.
    str_field(map, key, what).map(|s| s.as_str().to_owned())
}

/// The variant name in `key`, one of `allowed`.
fn tag(map: &Map, key: &str, what: &str, allowed: &[&str]) -> Result<ImmutableString, String> {
    let t = str_field(map, key, what)?;
    if allowed.contains(&t.as_str()) {
        Ok(t)
    } else {
        Err(format!(
            "{what}: unknown {key} \"{t}\" (expected one of {})",
            allowed
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

fn uint(v: Dynamic, max: u64, what: &str) -> Result<u64, String> {
    let v = v.flatten();
    let n = if let Ok(i) = v.as_int() {
        u64::try_from(i).ok()
    } else if let Ok(f) = v.as_float() {
        (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= u64::MAX as FLOAT)
            .then_some(f as u64)
    } else {
        return Err(format!("{what} must be an integer, got {}", describe(&v)));
    };
    n.filter(|n| *n <= max)
        .ok_or_else(|| format!("{what} must be an integer from 0 to {max}, got {v}"))
}

fn selections(out: Dynamic) -> Result<Vec<Selection>, String> {
    let items = into_array(out, "selections")?;
    let mut result = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        result.push(selection(item).map_err(|e| format!("selection {i}: {e}"))?);
    }
    Ok(result)
}

fn selection(item: Dynamic) -> Result<Selection, String> {
    let m = into_map(item, "decision", "#{decision: \"include\"}")?;
    if tag(&m, "decision", "decision", &["include", "skip"])? == "include" {
        return Ok(Selection::Include);
    }
    let reason = str_field(&m, "reason", "skip")?;
    let reason = SkipReason::parse(&reason).ok_or_else(|| {
        format!(
            "skip: unknown reason \"{reason}\" (expected one of {})",
            SkipReason::ALL
                .iter()
                .map(|r| format!("\"{}\"", r.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let detail = string_field(&m, "detail", "skip")?;
    Ok(Selection::Skip { reason, detail })
}

fn waves(out: Dynamic) -> Result<Vec<Wave>, String> {
    let items = into_array(out, "waves")?;
    let mut result = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        result.push(wave(item).map_err(|e| format!("wave {i}: {e}"))?);
    }
    Ok(result)
}

fn wave(item: Dynamic) -> Result<Wave, String> {
    let mut m = into_map(item, "wave", "#{name: \"canary\", nodes: [\"n1\"]}")?;
    let name = string_field(&m, "name", "wave")?;
    m.remove("name");
    let nodes = match m.remove("nodes") {
        None => return Err("missing field `nodes`".into()),
        Some(v) => into_array(v, "node ids in `nodes`")?
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                id.flatten().into_string().map_err(|t| {
                    format!(
                        "`nodes[{i}]` must be a node id string, got {}",
                        describe_type(t)
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let concurrency = match m.remove("concurrency") {
        None => 0,
        Some(v) => uint(v, u32::MAX as u64, "`concurrency`")? as u32,
    };
    let soak_seconds = match m.remove("soak_seconds") {
        None => 0,
        Some(v) => uint(v, u64::MAX, "`soak_seconds`")?,
    };
    let needs_approval = match m.remove("needs_approval") {
        None => false,
        Some(v) => v
            .as_bool()
            .map_err(|t| format!("`needs_approval` must be a bool, got {}", describe_type(t)))?,
    };
    if let Some(key) = m.keys().next() {
        return Err(format!(
            "unknown field `{key}` (a wave has name, nodes, concurrency, soak_seconds, needs_approval)"
        ));
    }
    Ok(Wave {
        name,
        nodes,
        concurrency,
        soak_seconds,
        needs_approval,
    })
}

fn verdict(out: Dynamic) -> Result<Verdict, String> {
    let m = into_map(out, "verdict", "#{verdict: \"proceed\"}")?;
    let kind = tag(
        &m,
        "verdict",
        "verdict",
        &["proceed", "pause", "retry-failed", "rollback", "abort"],
    )?;
    let what = format!("`{kind}`");
    Ok(match kind.as_str() {
        "proceed" => Verdict::Proceed,
        "retry-failed" => Verdict::RetryFailed,
        "pause" => Verdict::Pause(string_field(&m, "reason", &what)?),
        "rollback" => Verdict::Rollback(string_field(&m, "reason", &what)?),
        _ => Verdict::Abort(string_field(&m, "reason", &what)?),
    })
}

fn admission(out: Dynamic) -> Result<Admission, String> {
    let mut m = into_map(out, "admission", "#{admission: \"now\"}")?;
    let kind = tag(
        &m,
        "admission",
        "admission",
        &["now", "defer-until", "never"],
    )?;
    Ok(match kind.as_str() {
        "now" => Admission::Now,
        "defer-until" => Admission::DeferUntil(defer_value(&mut m)?),
        _ => Admission::Never(string_field(&m, "value", "`never`")?),
    })
}

fn offer(out: Dynamic) -> Result<Offer, String> {
    let mut m = into_map(out, "offer", "#{offer: \"offer\"}")?;
    let kind = tag(&m, "offer", "offer", &["offer", "defer-until", "decline"])?;
    Ok(match kind.as_str() {
        "offer" => Offer::Offer,
        "defer-until" => Offer::DeferUntil(defer_value(&mut m)?),
        _ => Offer::Decline(string_field(&m, "value", "`decline`")?),
    })
}

fn defer_value(m: &mut Map) -> Result<u64, String> {
    match m.remove("value") {
        None => Err("`defer-until`: missing field `value` (Unix ms)".into()),
        Some(v) => uint(v, u64::MAX, "`defer-until` value (Unix ms)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defaults;
    use crate::world::{ManualClock, MemoryFleet, MemoryStatus};
    use serde_json::json;
    use std::path::PathBuf;

    fn shipped(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../policies")
            .join(name)
    }

    fn load(source: &str) -> RhaiPolicy {
        load_with(source, World::empty(), Limits::default())
    }

    fn load_with(source: &str, world: World, limits: Limits) -> RhaiPolicy {
        RhaiPolicy::load_str("test", source, world, limits).unwrap_or_else(|e| panic!("{e}"))
    }

    fn node(id: &str, version: &str) -> Node {
        Node::new(id, version)
    }

    fn skip(reason: SkipReason, detail: &str) -> Selection {
        Selection::Skip {
            reason,
            detail: detail.into(),
        }
    }

    fn report(wave: u32) -> WaveReport {
        WaveReport {
            wave,
            waves: 3,
            total: 3,
            ..Default::default()
        }
    }

    #[test]
    fn version_gate_decides_per_node() {
        let mut p = RhaiPolicy::load_file(
            &shipped("version-gate.rhai"),
            World::empty(),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(p.info().name, "version-gate");
        assert_eq!(p.info().version, "0.1.0");
        assert_eq!(p.info().hooks, vec![Hook::Select]);

        let ctx = TaskContext::new("1.13").with_params(json!({"range": ">=1.10, <2"}));
        let mut sick = node("a", "1.12");
        sick.healthy = false;
        let nodes = vec![
            sick,
            node("b", "v1.13"),
            node("c", "one.two"),
            node("d", "1.9.0"),
            node("e", "1.12"),
            node("f", "2.0"),
            node("g", ""),
            node("h", "1.12"),
        ];
        assert_eq!(
            p.select(&ctx, &nodes).unwrap(),
            vec![
                skip(SkipReason::Unhealthy, "node is unhealthy"),
                skip(SkipReason::SameVersion, "already at 1.13"),
                skip(SkipReason::OutOfRange, "version 'one.two' is not a version"),
                skip(SkipReason::OutOfRange, "version 1.9.0 is not in >=1.10, <2"),
                Selection::Include,
                skip(SkipReason::OutOfRange, "version 2.0 is not in >=1.10, <2"),
                skip(SkipReason::OutOfRange, "version '' is not a version"),
                Selection::Include,
            ]
        );

        // No range: everything that parses is in range.
        let ctx = TaskContext::new("2.0.0");
        assert_eq!(
            p.select(&ctx, &[node("x", "0.1"), node("y", "2")]).unwrap(),
            vec![
                Selection::Include,
                skip(SkipReason::SameVersion, "already at 2.0.0")
            ]
        );
        // Other hooks are the runner's defaults.
        assert_eq!(
            p.plan(&ctx, &[node("x", "0.1")]).unwrap(),
            defaults::plan(&ctx, &[node("x", "0.1")])
        );
    }

    #[test]
    fn version_gate_rejects_an_invalid_range() {
        let mut p = RhaiPolicy::load_file(
            &shipped("version-gate.rhai"),
            World::empty(),
            Limits::default(),
        )
        .unwrap();
        let ctx = TaskContext::new("1.0").with_params(json!({"range": "nope"}));
        match p.select(&ctx, &[node("a", "0.9")]) {
            Err(PolicyError::Trap { hook, message, .. }) => {
                assert_eq!(hook, Hook::Select);
                assert!(
                    message.contains("param range: invalid semver range 'nope'"),
                    "{message}"
                );
            }
            other => panic!("expected a trap, got {other:?}"),
        }
    }

    #[test]
    fn canary_plans_growing_waves() {
        let mut p =
            RhaiPolicy::load_file(&shipped("canary.rhai"), World::empty(), Limits::default())
                .unwrap();
        assert_eq!(p.info().name, "canary");
        assert_eq!(p.info().hooks, vec![Hook::Plan, Hook::Evaluate]);

        let nodes: Vec<Node> = (0..25).map(|i| node(&format!("n{i:02}"), "1.0")).collect();
        let mut ctx =
            TaskContext::new("2.0").with_params(json!({"soak_seconds": 30, "approval": true}));
        ctx.concurrency = 4;
        let waves = p.plan(&ctx, &nodes).unwrap();
        let shape: Vec<(&str, usize, bool)> = waves
            .iter()
            .map(|w| (w.name.as_str(), w.nodes.len(), w.needs_approval))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("canary", 1, false),
                ("10%", 2, true),
                ("50%", 10, true),
                ("rest", 12, true)
            ]
        );
        assert!(
            waves
                .iter()
                .all(|w| w.concurrency == 4 && w.soak_seconds == 30)
        );
        assert_eq!(waves[1].nodes, vec!["n01", "n02"]);
        assert_eq!(waves[3].nodes.last().unwrap(), "n24");

        // Defaults; small lists collapse into fewer waves (for 2 nodes, 10% and
        // 50% round up to the canary).
        let ctx = TaskContext::new("2.0");
        let waves = p.plan(&ctx, &nodes[..2]).unwrap();
        assert_eq!(waves.len(), 2);
        assert_eq!(
            (waves[0].name.as_str(), waves[1].name.as_str()),
            ("canary", "rest")
        );
        assert!(
            waves
                .iter()
                .all(|w| !w.needs_approval && w.soak_seconds == 0)
        );
        assert_eq!(p.plan(&ctx, &[]).unwrap(), vec![]);
        // Not a select policy: the runner's default includes everything.
        assert_eq!(
            p.select(&ctx, &nodes[..3]).unwrap(),
            defaults::select(&nodes[..3])
        );
    }

    #[test]
    fn canary_evaluates_failure_rate() {
        let mut p =
            RhaiPolicy::load_file(&shipped("canary.rhai"), World::empty(), Limits::default())
                .unwrap();
        let ctx = TaskContext::new("2.0");
        let mut r = report(1);
        assert_eq!(p.evaluate(&ctx, &r).unwrap(), Verdict::Proceed);

        r.succeeded = 9;
        r.timed_out = 1; // 10%: not above the threshold
        r.task_finished = 10;
        assert_eq!(p.evaluate(&ctx, &r).unwrap(), Verdict::Proceed);

        r.succeeded = 1;
        r.failed_rolled_back = 1;
        r.unknown = 1; // 2 of 3
        r.timed_out = 0;
        r.task_finished = 3;
        assert_eq!(
            p.evaluate(&ctx, &r).unwrap(),
            Verdict::Pause(
                "failure rate 67% in wave 2 exceeds 10%; waiting for a person \
                 (only 3 of 5 finished nodes needed to abort)"
                    .into()
            )
        );
        r.task_finished = 5;
        assert_eq!(
            p.evaluate(&ctx, &r).unwrap(),
            Verdict::Abort("failure rate 67% in wave 2 exceeds 10% after 5 finished nodes".into())
        );

        // An integer threshold is a fraction too; min_finished is a parameter.
        let ctx = TaskContext::new("2.0").with_params(json!({"threshold": 1, "min_finished": 2}));
        assert_eq!(p.evaluate(&ctx, &r).unwrap(), Verdict::Proceed);
        let ctx = TaskContext::new("2.0").with_params(json!({"threshold": 0.5, "min_finished": 6}));
        assert_eq!(
            p.evaluate(&ctx, &r).unwrap(),
            Verdict::Pause(
                "failure rate 67% in wave 2 exceeds 50%; waiting for a person \
                 (only 5 of 6 finished nodes needed to abort)"
                    .into()
            )
        );
    }

    #[test]
    fn missing_hooks_fall_back_to_defaults() {
        let mut p = load(
            r#"
            fn select(ctx, nodes) { nodes.map(|n| #{decision: "include"}) }
            fn helper(a) { a }
            "#,
        );
        assert_eq!(p.info().hooks, vec![Hook::Select]);
        assert_eq!(p.info().version, "0.0.0");
        let ctx = TaskContext::new("2.0");
        let mut r = report(0);
        r.succeeded = 2;
        r.rejected = 1;
        let want = defaults::evaluate(&r);
        assert!(matches!(want, Verdict::Pause(_)));
        assert_eq!(p.evaluate(&ctx, &r).unwrap(), want);
        let nodes = [node("a", "1"), node("b", "1")];
        assert_eq!(p.plan(&ctx, &nodes).unwrap(), defaults::plan(&ctx, &nodes));
        assert_eq!(p.admit(&ctx, &nodes[0], 5).unwrap(), Admission::Now);
        assert_eq!(p.on_request(&ctx, &nodes[0]).unwrap(), Offer::Offer);
    }

    #[test]
    fn an_infinite_loop_is_stopped_by_the_cpu_budget() {
        let limits = Limits {
            cpu: Duration::from_millis(100),
            max_operations: u64::MAX,
            ..Limits::default()
        };
        let mut p = load_with(
            r#"
            fn evaluate(ctx, report) {
                if report.wave == 0 { loop {} }
                #{verdict: "proceed"}
            }
            "#,
            World::empty(),
            limits,
        );
        let ctx = TaskContext::new("2.0");
        let started = Instant::now();
        let err = p.evaluate(&ctx, &report(0)).unwrap_err();
        let elapsed = started.elapsed();
        match &err {
            PolicyError::Budget { hook, budget, .. } => {
                assert_eq!(*hook, Hook::Evaluate);
                assert_eq!(budget, "100 ms");
            }
            other => panic!("expected a budget error, got {other:?}"),
        }
        assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
        // The deadline is per call: the next call runs normally.
        assert_eq!(p.evaluate(&ctx, &report(1)).unwrap(), Verdict::Proceed);
        // ... and the one after that is stopped again.
        assert!(matches!(
            p.evaluate(&ctx, &report(0)),
            Err(PolicyError::Budget { .. })
        ));
    }

    #[test]
    fn too_many_operations_is_a_budget_error() {
        let limits = Limits {
            max_operations: 10_000,
            cpu: Duration::from_secs(10),
            ..Limits::default()
        };
        let mut p = load_with(
            r#"
            fn evaluate(ctx, report) {
                let i = 0;
                while i < report.total { i += 1; }
                #{verdict: "proceed"}
            }
            "#,
            World::empty(),
            limits,
        );
        let ctx = TaskContext::new("2.0");
        let mut r = report(0);
        r.total = 1_000_000;
        match p.evaluate(&ctx, &r) {
            Err(PolicyError::Budget { budget, .. }) => assert_eq!(budget, "10000 operations"),
            other => panic!("expected a budget error, got {other:?}"),
        }
        // The count is per call.
        r.total = 1_000;
        for _ in 0..20 {
            assert_eq!(p.evaluate(&ctx, &r).unwrap(), Verdict::Proceed);
        }
    }

    #[test]
    fn unbounded_allocation_hits_the_memory_cap() {
        let mut p = load(
            r#"
            fn evaluate(ctx, report) {
                if report.wave == 0 {
                    let s = "x";
                    loop { s += s; }
                }
                if report.wave == 1 {
                    let a = [];
                    loop { a += [1, 2, 3, 4, 5, 6, 7, 8]; a += a; }
                }
                #{verdict: "proceed"}
            }
            "#,
        );
        let ctx = TaskContext::new("2.0");
        let started = Instant::now();
        for wave in [0, 1] {
            match p.evaluate(&ctx, &report(wave)) {
                Err(PolicyError::Memory { hook, cap, .. }) => {
                    assert_eq!(hook, Hook::Evaluate);
                    assert!(cap.contains("1048576"), "{cap}");
                }
                other => panic!("wave {wave}: expected a memory error, got {other:?}"),
            }
            assert_eq!(p.evaluate(&ctx, &report(2)).unwrap(), Verdict::Proceed);
        }
        assert!(started.elapsed() < Duration::from_secs(2));

        // A small cap, an array grown one element at a time.
        let limits = Limits {
            max_collection: 1000,
            ..Limits::default()
        };
        let mut p = load_with(
            r#"fn select(ctx, nodes) { let a = []; loop { a.push(nodes[0]); } }"#,
            World::empty(),
            limits,
        );
        let err = p.select(&ctx, &[node("a", "1")]).unwrap_err();
        assert!(matches!(err, PolicyError::Memory { .. }), "{err}");
    }

    /// Limits with a CPU budget far past what the tests need, so what stops a
    /// hook is the limit under test, not the clock of a loaded machine.
    fn roomy_cpu() -> Limits {
        Limits {
            cpu: Duration::from_secs(20),
            ..Limits::default()
        }
    }

    #[test]
    fn a_hook_hoarding_many_values_each_within_the_caps_hits_the_memory_cap() {
        // 800 live 1 MB blobs (and 1 MB map keys): each value is within
        // `max_collection`, and Rhai counts neither curried values nor map
        // keys, so only the hook's total allocation can stop this.
        let mut p = load_with(
            r#"
            fn evaluate(ctx, report) {
                if report.wave == 0 {
                    let keep = [];
                    for i in 0..800 { keep.push(Fn("len").curry(blob(1_000_000, i))); }
                }
                if report.wave == 1 {
                    let keys = #{};
                    let s = "k";
                    s.pad(1_000_000, "k");
                    for i in 0..800 { keys[`${i}${s}`] = i; }
                }
                #{verdict: "proceed"}
            }
            "#,
            World::empty(),
            roomy_cpu(),
        );
        assert!(crate::alloc::installed());
        let ctx = TaskContext::new("2.0");
        for wave in [0, 1] {
            let before = crate::alloc::thread_live();
            let started = Instant::now();
            match p.evaluate(&ctx, &report(wave)) {
                Err(PolicyError::Memory { hook, cap, .. }) => {
                    assert_eq!(hook, Hook::Evaluate);
                    assert!(cap.contains("64 MiB"), "{cap}");
                }
                other => panic!("wave {wave}: expected a memory error, got {other:?}"),
            }
            // Stopped near the cap, not after 800 MB; and all of it freed.
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(crate::alloc::thread_live() - before < 4 << 20);
            assert_eq!(p.evaluate(&ctx, &report(2)).unwrap(), Verdict::Proceed);
        }
    }

    /// Runs `f` with a subscriber that writes what it logs into a buffer.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn print_is_truncated_and_rate_limited_per_call() {
        let mut p = load_with(
            r#"
            fn evaluate(ctx, report) {
                let line = "y";
                line.pad(5000, "y");
                for i in 0..30000 { print(line); }
                debug(line);
                log("warn", line + "\r\n\u001b[31mforged line");
                #{verdict: "proceed"}
            }
            "#,
            World::empty(),
            roomy_cpu(),
        );
        let ctx = TaskContext::new("2.0");
        let out = logged(|| {
            assert_eq!(p.evaluate(&ctx, &report(0)).unwrap(), Verdict::Proceed);
        });
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines.len() <= PRINT_LINES_PER_CALL + 2,
            "{} lines logged for one call",
            lines.len()
        );
        assert!(
            lines.iter().all(|l| l.len() <= MAX_PRINT_BYTES + 300),
            "a line longer than the cap"
        );
        assert!(
            lines.iter().any(|l| l.contains("lines suppressed")),
            "{}",
            lines.last().unwrap_or(&"")
        );
        assert!(
            !out.contains('\u{1b}'),
            "a control character reached the log"
        );
        // The next call has a budget of its own, within the policy's.
        let out = logged(|| {
            assert_eq!(p.evaluate(&ctx, &report(0)).unwrap(), Verdict::Proceed);
        });
        assert!(out.lines().count() <= PRINT_LINES_PER_CALL + 2);
    }

    #[test]
    fn input_larger_than_the_cap_is_not_the_scripts_fault() {
        // Rhai counts sizes recursively; the host's input does not count against
        // the script's allowance.
        let limits = Limits {
            max_collection: 100,
            ..Limits::default()
        };
        let mut p = load_with(
            r#"fn plan(ctx, nodes) { [#{name: "all", nodes: nodes.map(|n| n.id)}] }"#,
            World::empty(),
            limits,
        );
        let nodes: Vec<Node> = (0..500).map(|i| node(&format!("n{i}"), "1.0")).collect();
        let waves = p.plan(&TaskContext::new("2.0"), &nodes).unwrap();
        assert_eq!(waves[0].nodes.len(), 500);
    }

    #[test]
    fn invalid_output_is_reported_with_the_hook() {
        let mut p = load(
            r#"
            fn select(ctx, nodes) {
                if nodes.len() == 1 { return "all of them"; }
                if nodes.len() == 2 { return [#{decision: "include"}, #{decision: "skip", reason: "bored", detail: ""}]; }
                [#{decision: "include"}]
            }
            fn evaluate(ctx, report) {
                if report.wave == 0 { #{verdict: "pause", reason: ""} }
                else if report.wave == 1 { "proceed" }
                else { }
            }
            fn plan(ctx, nodes) { [#{name: "w", nodes: nodes.map(|n| n.id), colour: "red"}] }
            fn admit(ctx, node, now) { #{admission: "defer-until", value: -1} }
            "#,
        );
        let ctx = TaskContext::new("2.0");
        let reason = |r: Result<_, PolicyError>, want_hook: Hook| match r {
            Err(PolicyError::Invalid { hook, reason, .. }) => {
                assert_eq!(hook, want_hook);
                reason
            }
            Err(e) => panic!("expected invalid output, got {e}"),
            Ok(_) => panic!("expected invalid output"),
        };
        let r = reason(p.select(&ctx, &[node("a", "1")]).map(|_| ()), Hook::Select);
        assert_eq!(r, "expected an array of selections, got a string");
        let r = reason(
            p.select(&ctx, &[node("a", "1"), node("b", "1")])
                .map(|_| ()),
            Hook::Select,
        );
        assert!(
            r.starts_with("selection 1: skip: unknown reason \"bored\""),
            "{r}"
        );
        let r = reason(
            p.select(&ctx, &vec![node("a", "1"); 3]).map(|_| ()),
            Hook::Select,
        );
        assert!(r.contains("returned 1 decisions for a chunk of 3"), "{r}");

        let r = reason(p.evaluate(&ctx, &report(0)).map(|_| ()), Hook::Evaluate);
        assert!(r.contains("`pause` must say why"), "{r}");
        let r = reason(p.evaluate(&ctx, &report(1)).map(|_| ()), Hook::Evaluate);
        assert_eq!(
            r,
            "verdict: expected a map like #{verdict: \"proceed\"}, got a string"
        );
        let r = reason(p.evaluate(&ctx, &report(2)).map(|_| ()), Hook::Evaluate);
        assert!(r.contains("got `()`"), "{r}");

        let r = reason(p.plan(&ctx, &[node("a", "1")]).map(|_| ()), Hook::Plan);
        assert!(r.contains("wave 0: unknown field `colour`"), "{r}");
        let r = reason(p.admit(&ctx, &node("a", "1"), 0).map(|_| ()), Hook::Admit);
        assert!(
            r.contains("`defer-until` value (Unix ms) must be an integer from 0"),
            "{r}"
        );
    }

    #[test]
    fn output_shapes_convert() {
        let mut p = load(
            r#"
            fn select(ctx, nodes) {
                [#{decision: "include"}, #{decision: "skip", reason: "policy", detail: "not today"}]
            }
            fn plan(ctx, nodes) {
                [#{name: "one", nodes: [nodes[0].id], concurrency: 2, soak_seconds: 60, needs_approval: true},
                 #{name: "two", nodes: [nodes[1].id]}]
            }
            fn admit(ctx, node, now) {
                if node.id == "a" { #{admission: "now"} }
                else if node.id == "b" { #{admission: "defer-until", value: now + 1000} }
                else { #{admission: "never", value: "cordoned"} }
            }
            fn evaluate(ctx, report) {
                switch report.wave {
                    0 => #{verdict: "proceed"},
                    1 => #{verdict: "retry-failed"},
                    2 => #{verdict: "rollback", reason: "bad"},
                    _ => #{verdict: "abort", reason: "worse"},
                }
            }
            fn on_request(ctx, node) {
                if node.id == "a" { #{offer: "offer"} }
                else if node.id == "b" { #{offer: "defer-until", value: 7} }
                else { #{offer: "decline", value: "busy"} }
            }
            "#,
        );
        assert_eq!(p.info().hooks, Hook::ALL.to_vec());
        let ctx = TaskContext::new("2.0");
        let nodes = [node("a", "1"), node("b", "1"), node("c", "1")];
        assert_eq!(
            p.select(&ctx, &nodes[..2]).unwrap(),
            vec![Selection::Include, skip(SkipReason::Policy, "not today")]
        );
        assert_eq!(
            p.plan(&ctx, &nodes[..2]).unwrap(),
            vec![
                Wave {
                    name: "one".into(),
                    nodes: vec!["a".into()],
                    concurrency: 2,
                    soak_seconds: 60,
                    needs_approval: true
                },
                Wave {
                    name: "two".into(),
                    nodes: vec!["b".into()],
                    concurrency: 0,
                    soak_seconds: 0,
                    needs_approval: false
                },
            ]
        );
        assert_eq!(p.admit(&ctx, &nodes[0], 5).unwrap(), Admission::Now);
        assert_eq!(
            p.admit(&ctx, &nodes[1], 5).unwrap(),
            Admission::DeferUntil(1005)
        );
        assert_eq!(
            p.admit(&ctx, &nodes[2], 5).unwrap(),
            Admission::Never("cordoned".into())
        );
        assert_eq!(p.evaluate(&ctx, &report(0)).unwrap(), Verdict::Proceed);
        assert_eq!(p.evaluate(&ctx, &report(1)).unwrap(), Verdict::RetryFailed);
        assert_eq!(
            p.evaluate(&ctx, &report(2)).unwrap(),
            Verdict::Rollback("bad".into())
        );
        assert_eq!(
            p.evaluate(&ctx, &report(3)).unwrap(),
            Verdict::Abort("worse".into())
        );
        assert_eq!(p.on_request(&ctx, &nodes[0]).unwrap(), Offer::Offer);
        assert_eq!(p.on_request(&ctx, &nodes[1]).unwrap(), Offer::DeferUntil(7));
        assert_eq!(
            p.on_request(&ctx, &nodes[2]).unwrap(),
            Offer::Decline("busy".into())
        );
    }

    #[test]
    fn inputs_have_the_serde_shapes() {
        let mut p = load(
            r#"
            fn on_request(ctx, node) {
                let want = #{
                    id: "a", version: "1.2", labels: [["env", "prod"]], attributes: [],
                    asset_path: "/p/l", healthy: true, schedulable: false, online: true,
                    last_seen: 42,
                };
                if node != want { throw `node: ${node}`; }
                if ctx.target_version != "2.0" || ctx.strategy != "snapshot" || ctx.method != "pull"
                    || ctx.params.nested.list[1] != 2 || ctx.concurrency != 3 {
                    throw `ctx: ${ctx}`;
                }
                #{offer: "offer"}
            }
            fn evaluate(ctx, report) {
                if report.failed_nodes != ["x"] || report.task_failed != 1 || report.in_flight != 2 {
                    throw `report: ${report}`;
                }
                #{verdict: "proceed"}
            }
            "#,
        );
        let mut ctx = TaskContext::new("2.0").with_params(json!({"nested": {"list": [1, 2]}}));
        ctx.method = flotilla_model::Method::Pull;
        ctx.concurrency = 3;
        let mut n = node("a", "1.2");
        n.labels = vec![("env".into(), "prod".into())];
        n.asset_path = "/p/l".into();
        n.schedulable = false;
        n.last_seen = 42;
        assert_eq!(p.on_request(&ctx, &n).unwrap(), Offer::Offer);
        let mut r = report(0);
        r.failed_nodes = vec!["x".into()];
        r.task_failed = 1;
        r.in_flight = 2;
        assert_eq!(p.evaluate(&ctx, &r).unwrap(), Verdict::Proceed);
    }

    #[test]
    fn load_errors() {
        let err =
            |src: &str| match RhaiPolicy::load_str("bad", src, World::empty(), Limits::default()) {
                Err(PolicyError::Load { policy, reason }) => {
                    assert_eq!(policy, "bad");
                    reason
                }
                Err(e) => panic!("expected a load error, got {e}"),
                Ok(_) => panic!("expected a load error"),
            };
        let r = err("fn select(ctx, nodes) {\n  let x = ;\n}");
        assert!(r.starts_with("syntax error"), "{r}");
        assert!(r.contains("line 2"), "{r}");

        let r = err("fn admit(ctx, node) { #{admission: \"now\"} }");
        assert!(r.contains("`fn admit(ctx, node, now)`"), "{r}");
        assert!(r.contains("2 parameters"), "{r}");

        let r = err("throw \"no\";");
        assert!(
            r.contains("top-level statements failed: Runtime error: no"),
            "{r}"
        );
        let r = err("const VERSION = 3;");
        assert!(r.contains("`const VERSION` must be a string"), "{r}");
        let r = err("import \"fs\" as fs;");
        assert!(r.contains("cannot import 'fs'"), "{r}");
        let r = err("fn select(ctx, nodes) { eval(\"1\") }");
        assert!(r.contains("eval"), "{r}");
        let r = err("let t = 0; loop { t += 1; }");
        assert!(r.contains("exceeded the CPU budget"), "{r}");
        assert!(matches!(
            RhaiPolicy::load_file(
                Path::new("/nonexistent/x.rhai"),
                World::empty(),
                Limits::default()
            ),
            Err(PolicyError::Load { .. })
        ));
    }

    #[test]
    fn top_level_runs_once_and_constants_reach_the_hooks() {
        let mut p = load(
            r#"
            const VERSION = "3.1.4";
            const LIMIT = 2;
            let hidden = 7;
            print("loading");
            fn admit(ctx, node, now) {
                if now > global::LIMIT + LIMIT { #{admission: "now"} }
                else { #{admission: "defer-until", value: LIMIT * 2} }
            }
            "#,
        );
        assert_eq!(p.info().version, "3.1.4");
        let ctx = TaskContext::new("2.0");
        let n = node("a", "1");
        assert_eq!(p.admit(&ctx, &n, 1).unwrap(), Admission::DeferUntil(4));
        assert_eq!(p.admit(&ctx, &n, 5).unwrap(), Admission::Now);
    }

    #[test]
    fn traps_carry_the_message_and_the_next_call_works() {
        let mut p = load(
            r#"
            fn helper(x) { if x == 0 { throw "wave zero is cursed"; } x }
            fn evaluate(ctx, report) {
                helper(report.wave);
                if report.wave == 1 { let m = #{}; m.nope(); }
                if report.wave == 2 { return timestamp(); }
                if report.wave == 3 { sleep(1); }
                #{verdict: "proceed"}
            }
            "#,
        );
        let ctx = TaskContext::new("2.0");
        let msg = |r| match r {
            Err(PolicyError::Trap { message, .. }) => message,
            other => panic!("expected a trap, got {other:?}"),
        };
        let m = msg(p.evaluate(&ctx, &report(0)));
        assert!(m.contains("wave zero is cursed"), "{m}");
        assert!(m.contains("line 2"), "{m}");
        assert!(m.contains("helper"), "{m}");
        assert!(!m.contains('\n'), "{m}");
        let m = msg(p.evaluate(&ctx, &report(1)));
        assert!(m.contains("Function not found: nope"), "{m}");
        // No wall clock and no sleeping.
        let m = msg(p.evaluate(&ctx, &report(2)));
        assert!(m.contains("timestamp"), "{m}");
        let m = msg(p.evaluate(&ctx, &report(3)));
        assert!(m.contains("sleep is not available"), "{m}");
        assert_eq!(p.evaluate(&ctx, &report(4)).unwrap(), Verdict::Proceed);
    }

    #[test]
    fn host_functions() {
        let mut labelled = node("n2", "1.0");
        labelled.labels = vec![("env".into(), "prod".into())];
        let mut labelled3 = node("n3", "1.1");
        labelled3.labels = vec![("env".into(), "prod".into())];
        let clock = Arc::new(ManualClock::new(1_000));
        let mut status = MemoryStatus::default();
        status.metrics.insert(("n1".into(), "cpu".into()), 0.5);
        let world = World {
            fleet: Arc::new(MemoryFleet::new([node("n1", "1.0"), labelled, labelled3])),
            status: Arc::new(status),
            clock: clock.clone(),
            ..World::empty()
        };
        let mut p = load_with(
            r#"
            fn admit(ctx, node, now) {
                let prod = fleet_query(#{labels: [["env", "prod"]]}, 0, 10);
                if prod.len() != 2 || prod[0].id != "n2" || prod[1].version != "1.1" { throw `query: ${prod}`; }
                let page = fleet_query(#{labels: #{env: "prod"}}, 1, 1_000_000);
                if page.len() != 1 || page[0].id != "n3" { throw `page: ${page}`; }
                if fleet_count(#{}) != 3 || fleet_count(#{ids: ["n1", "zz"]}) != 1 { throw "count"; }
                if fleet_get("n1").version != "1.0" || fleet_get("zz") != () { throw "get"; }
                if metric("n1", "cpu") != 0.5 || metric("n1", "mem") != () { throw "metric"; }
                if control_plane_version("cloudcore") != () || releases("pkg") != [] { throw "delivery"; }
                if node_run("n1") != () || task_summary().total != 0 || node_history("n1", 5) != [] { throw "status"; }
                if !version_in_range("v1.12", ">=1.10, <2") || version_in_range("2.0", ">=1.10, <2") { throw "range"; }
                if !is_version("v1.13") || is_version("one.two") { throw "is_version"; }
                if !version_same("v1.13", "1.13.0") || version_cmp("1.9", "1.10") != -1
                    || version_cmp("2", "2.0.0") != 0 || version_cmp("3", "2.9") != 1 { throw "cmp"; }
                log("info", "hello from a policy");
                debug("debugging");
                #{admission: "defer-until", value: now() + 5}
            }
            fn on_request(ctx, node) {
                switch node.id {
                    "range" => version_in_range("1.0", "not a range"),
                    "cmp" => version_cmp("1.0", "x.y"),
                    "sel" => fleet_query(#{colour: "red"}, 0, 1),
                    "log" => log("loud", "x"),
                    _ => ()
                }
                #{offer: "offer"}
            }
            "#,
            world,
            Limits::default(),
        );
        let ctx = TaskContext::new("2.0");
        assert_eq!(
            p.admit(&ctx, &node("a", "1"), 0).unwrap(),
            Admission::DeferUntil(1_005)
        );
        clock.advance(60_000);
        assert_eq!(
            p.admit(&ctx, &node("a", "1"), 0).unwrap(),
            Admission::DeferUntil(61_005)
        );

        for (id, want) in [
            (
                "range",
                "version_in_range: invalid semver range 'not a range'",
            ),
            ("cmp", "version_cmp: 'x.y' is not a version"),
            ("sel", "fleet_query: invalid selector"),
            ("log", "log: unknown level 'loud'"),
        ] {
            match p.on_request(&ctx, &node(id, "1")) {
                Err(PolicyError::Trap { message, .. }) => {
                    assert!(message.contains(want), "{id}: {message}")
                }
                other => panic!("{id}: expected a trap, got {other:?}"),
            }
        }
    }

    #[test]
    fn nodes_read_like_their_maps() {
        let mut n = node("node-1", "1.2.3");
        n.labels = vec![
            ("env".into(), "prod".into()),
            ("tier".into(), "edge".into()),
        ];
        n.attributes = vec![("model".into(), "m7".into())];
        n.asset_path = "/plant/line".into();
        n.last_seen = 42;
        // The node's map is the serde shape.
        let via_serde = rhai::serde::to_dynamic(&n).unwrap();
        let value = node_to_dynamic(&n);
        let map = value.read_lock::<node::RhaiNode>().unwrap().to_map();
        assert_eq!(Dynamic::from_map(map).to_string(), via_serde.to_string());
        // The allowance is what Rhai counts for the nodes as maps.
        let nodes = [n.clone(), node("b", "")];
        let maps = Dynamic::from_array(
            nodes
                .iter()
                .map(|n| rhai::serde::to_dynamic(n).unwrap())
                .collect(),
        );
        assert_eq!(nodes_to_dynamic(&nodes).1, Sizes::of(&maps));
        // What scripts do with a node.
        let mut p = load(
            r#"
            fn on_request(ctx, n) {
                let checks = [
                    n.id == "node-1", n["version"] == "1.2.3", n.labels[1][1] == "edge",
                    n.attributes == [["model", "m7"]], n.asset_path == "/plant/line",
                    n.healthy, n.online, n.schedulable, n.last_seen == 42,
                    n["nope"] == (), "version" in n, !("nope" in n), type_of(n) == "node",
                    n == n.to_map(), n.to_map() == n, n.to_map().version == "1.2.3",
                    n.keys().len() == 9, n.len() == 9, `${n}` == `${n.to_map()}`,
                    n != #{id: "other"},
                ];
                let i = checks.index_of(false);
                if i >= 0 { throw `check ${i} failed`; }
                #{offer: "offer"}
            }
            fn select(ctx, nodes) {
                nodes.map(|| if this.healthy && this.labels.len() == 2 {
                    #{decision: "include"}
                } else {
                    #{decision: "skip", reason: "policy", detail: `${this.id} ${this.version}`}
                })
            }
            "#,
        );
        assert_eq!(
            p.on_request(&TaskContext::new("2"), &n).unwrap(),
            Offer::Offer
        );
        let mut other = node("b", "0.1");
        other.healthy = false;
        assert_eq!(
            p.select(&TaskContext::new("2"), &[n, other]).unwrap(),
            vec![Selection::Include, skip(SkipReason::Policy, "b 0.1")]
        );
    }

    #[test]
    fn version_helpers_agree_with_flotilla_version() {
        let mut p = load(
            r#"
            fn on_request(ctx, node) {
                let a = node.version;
                let b = ctx.target_version;
                #{offer: "decline", value: `${version_same(a, b)} ${is_version(a)}`}
            }
            "#,
        );
        let cases = [
            "v1.13",
            "1.13.0",
            "1.13",
            " 1.13 ",
            "weird",
            "",
            "1.14.0-rc.1",
            "x.y",
        ];
        for a in cases {
            for b in cases {
                // Twice: the second answer comes from the parse cache.
                for _ in 0..2 {
                    let got = p.on_request(&TaskContext::new(b), &node("n", a)).unwrap();
                    let want = format!(
                        "{} {}",
                        flotilla_version::same(a, b),
                        flotilla_version::parse(a).is_ok()
                    );
                    assert_eq!(got, Offer::Decline(want), "{a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn select_spread_over_threads_matches_one_thread_and_reports_the_first_error() {
        let src = r#"
            const SKIP = "odd";
            fn select(ctx, nodes) {
                let out = [];
                for n in nodes {
                    if n.id == ctx.params.boom { throw `boom at ${n.id}`; }
                    out.push(if n.version == SKIP {
                        #{decision: "skip", reason: "policy", detail: global::SKIP}
                    } else {
                        #{decision: "include"}
                    });
                }
                out
            }
        "#;
        let nodes: Vec<Node> = (0..flotilla_model::CHUNK * 3 + 7)
            .map(|i| node(&format!("n{i}"), if i % 2 == 1 { "odd" } else { "1.0" }))
            .collect();
        let ctx = TaskContext::new("2.0").with_params(json!({"boom": ""}));
        // About equivalence, not budgets: a busy machine must not make it a timing test.
        let roomy = Limits {
            cpu: Duration::from_secs(30),
            ..Limits::default()
        };
        let mut one = load_with(src, World::empty(), roomy);
        one.set_threads(1);
        let want = one.select(&ctx, &nodes).unwrap();
        assert_eq!(want[1], skip(SkipReason::Policy, "odd"));
        let mut many = load_with(src, World::empty(), roomy);
        many.set_threads(3);
        assert_eq!(many.select(&ctx, &nodes).unwrap(), want);
        // An error in the last chunk (on another thread) is reported.
        let last = format!("n{}", nodes.len() - 1);
        let boom = TaskContext::new("2.0").with_params(json!({"boom": last}));
        match many.select(&boom, &nodes) {
            Err(PolicyError::Trap { message, .. }) => assert!(message.contains(&last), "{message}"),
            other => panic!("expected a trap, got {other:?}"),
        }
        // ... and the policy still works.
        assert_eq!(many.select(&ctx, &nodes).unwrap(), want);
    }

    /// `cargo test --release -p flotilla --lib policy::rhai::tests::select_a_million -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn select_a_million_nodes_through_version_gate() {
        let mut p = RhaiPolicy::load_file(
            &shipped("version-gate.rhai"),
            World::empty(),
            Limits {
                cpu: Duration::from_secs(10), // measure, don't trip
                ..Limits::default()
            },
        )
        .unwrap();
        let ctx = TaskContext::new("1.13").with_params(json!({"range": ">=1.10, <2"}));
        // The fleet of `benches/policy.rs`.
        let versions = [
            "1.12", "v1.13", "1.9.0", "2.0.0", "1.12.3", "1.11", "garbage", "1.10.1",
        ];
        let nodes: Vec<Node> = (0..1_000_000)
            .map(|i| {
                let mut n = node(&format!("node-{i:07}"), versions[i % versions.len()]);
                n.healthy = i % 13 != 5;
                n.labels = vec![
                    ("region".into(), ["eu", "us", "ap"][i % 3].into()),
                    (
                        "tier".into(),
                        if i % 2 == 0 { "edge" } else { "core" }.into(),
                    ),
                ];
                n.attributes = vec![("model".into(), format!("m{}", i % 4))];
                n.asset_path = format!("/site-{}/rack-{}", i % 5, i % 11);
                n
            })
            .collect();
        // CPU time of this thread (Linux), to see through a busy machine.
        fn thread_cpu() -> Option<Duration> {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            let ticks: u64 =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some(Duration::from_millis(ticks * 10))
        }
        p.select(&ctx, &nodes[..10_000]).unwrap(); // warm-up
        for _ in 0..3 {
            let (started, cpu) = (Instant::now(), thread_cpu());
            let out = p.select(&ctx, &nodes).unwrap();
            let (elapsed, cpu) = (started.elapsed(), thread_cpu().zip(cpu).map(|(b, a)| b - a));
            assert_eq!(out.len(), nodes.len());
            let included = out.iter().filter(|s| **s == Selection::Include).count();
            println!(
                "select over 1,000,000 nodes: {elapsed:?} wall, {cpu:?} thread CPU ({included} included)"
            );
        }
    }

    /// Issue 17.5: local time and windows in named zones, the runner's rules.
    #[test]
    fn scripts_read_local_time_and_windows_in_named_zones() {
        let mut p = load(
            r#"
            fn admit(ctx, node, now) {
                let t = local_time(now, node.version);
                if !window_open("0 2 * * *", 60, node.version, now) {
                    return #{ admission: "defer-until", value: window_next_open("0 2 * * *", 60, node.version, now) };
                }
                #{ admission: "never", value: `${t.hour}:${t.minute} ${t.abbreviation} ${t.offset_minutes} ${t.weekday}` }
            }
            "#,
        );
        let ctx = TaskContext::new("1");
        // 2026-03-29 00:30 UTC: 01:30 CET in Berlin, a Sunday; closed until
        // 03:00 CEST (the 02:00 opening is in the spring-forward gap).
        let at = 1_774_744_200_000;
        assert_eq!(
            p.admit(&ctx, &node("a", "Europe/Berlin"), at).unwrap(),
            Admission::DeferUntil(1_774_746_000_000)
        );
        // Open at 02:30 JST in Tokyo (17:30 UTC the day before).
        let tokyo = 1_774_719_000_000;
        assert_eq!(
            p.admit(&ctx, &node("a", "Asia/Tokyo"), tokyo).unwrap(),
            Admission::Never("2:30 JST 540 7".into())
        );
        let err = p
            .admit(&ctx, &node("a", "Europe/Berlln"), at)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown time zone 'Europe/Berlln'"), "{err}");
    }
}
