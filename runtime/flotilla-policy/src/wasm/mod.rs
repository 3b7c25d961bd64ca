//! The WebAssembly policy host: the only module that imports wasmtime.
//!
//! A [`WasmRuntime`] owns the engine (component model, epoch interruption), the
//! linker with the host functions and a locked-down WASI, and an on-disk cache
//! of compiled components. [`WasmRuntime::load_file`] compiles (or loads from the
//! cache) and pre-links a component once; [`CompiledPolicy::instantiate`] makes a
//! cheap [`WasmPolicy`] bound to a task's world and limits. A trap, blown budget
//! or memory cap discards the instance; the next call instantiates a fresh one.
//!
//! Instances come from wasmtime's pooling allocator (slots reserved once, reused
//! without `mmap`/`munmap`, memories initialised copy-on-write), which is what
//! makes instantiation cheap. The pool has a fixed number of slots
//! ([`POOL_INSTANCES`] component instances); when it is exhausted (or a
//! component needs more memories or tables than a slot has) an instance is
//! made by a second engine with the on-demand allocator instead, so a runner
//! holding many policies at once never fails for want of a slot. A component
//! beyond a slot's limits (core instances, memories, tables: an interpreter
//! such as componentize-py's links a dozen core instances) is compiled once
//! and loaded into the on-demand engine only: wasmtime's pooled engine refuses
//! such a component when it is loaded, so the artifact is compiled without an
//! allocator in sight (`precompile_component`) and tried on the pooled engine
//! first. The on-disk cache is bounded in size, least recently used evicted
//! first ([`DEFAULT_CACHE_BYTES`]). The memory cap
//! ([`Limits::memory_bytes`]) is enforced by the store's limiter either way; pool
//! slots keep wasmtime's default maximum so any cap a user sets fits.
//!
//! Modules: `host` (store state, limiter, locked-down WASI, host functions),
//! `lower` (hand lowering of node lists and contexts; the only code on
//! wasmtime's doc-hidden internals), `sections` (sniffing a binary for the
//! argument-arena section), `convert` (WIT types to and from the model).

use super::{Failure, Limits, Policy, PolicyError};
use crate::clock::CallClock;
use crate::world::World;
use flotilla_model::{self as model, Hook, PolicyInfo};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use wasmtime::component::{
    Component, ComponentExportIndex, Func, HasSelf, Linker, ResourceTable, TypedFunc,
};
use wasmtime::{
    CallHook, Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError,
    PoolingAllocationConfig, Store, StoreContextMut, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

mod convert;
mod host;
mod lower;
#[doc(hidden)]
pub use lower::use_derived_lowering;
mod sections;

use convert::{hook_from, plan_calls_from, selection_from, wit_ctx, wit_node};
use host::{Limiter, State};
use lower::{CtxArg, NOT_RESERVED, NodeList};
use sections::args_arena;

mod bindings {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../../wit",
    });
}

use bindings::flotilla::policy::{calendar, clock, delivery, fleet, log, status, types as wit};
use bindings::{Policy as PolicyWorld, PolicyIndices, PolicyPre};

/// How often the epoch advances; the CPU budget is counted in these ticks.
const TICK: Duration = Duration::from_millis(1);
/// Bytes of guest stderr kept to explain a trap (a Rust panic message lands here).
const STDERR_CAP: usize = 16 << 10;
/// The contract this runner speaks.
pub const CONTRACT: &str = "flotilla:policy@0.2.0";
/// The exported interface with the hooks.
const HOOKS: &str = "flotilla:policy/hooks@0.2.0";
/// Functions the `hooks` interface must have.
const EXPORTS: [&str; 6] = [
    "describe",
    "select",
    "plan",
    "admit",
    "evaluate",
    "on-request",
];
/// What to do with a component built against another contract version.
const REBUILD: &str = "rebuild it against flotilla:policy@0.2.0 (wit/policy.wit): \
    a Rust policy with the current flotilla-sdk (`cargo build --target wasm32-wasip2`), \
    any other with its bindings regenerated from the 0.2.0 WIT (the hooks are now the \
    exported interface `hooks`; `plan` takes its nodes in chunks)";

/// Component instances the pooling allocator has slots for. A policy instance
/// takes one (and `select` up to 4 while it spreads chunks over cores); past
/// this, instances are allocated on demand by the fallback engine. Each
/// memory slot reserves (not commits) wasmtime's default 4 GiB of address
/// space plus guards, so the pool stays modest: 64 instances are about
/// 0.5 TiB of reservation per runtime.
pub const POOL_INSTANCES: u32 = 64;
/// Per policy component in a pool slot: core instances (the module, the WASI
/// adapter, shims), linear memories and tables. A component that needs more
/// is instantiated by the fallback engine.
const POOL_CORE_PER_COMPONENT: u32 = 8;
const POOL_MEMORIES_PER_COMPONENT: u32 = 2;
const POOL_TABLES_PER_COMPONENT: u32 = 4;
/// Bytes of compiled components the on-disk cache keeps (least recently used
/// evicted past this; `FLOTILLA_CACHE_MAX_MB` overrides). An interpreter-based
/// component compiles to 30-60 MB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// The pool's room: instances, and per component the core instances,
/// memories and tables a slot holds. A component that needs more runs on the
/// on-demand engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    pub instances: u32,
    pub core_instances_per_component: u32,
    pub memories_per_component: u32,
    pub tables_per_component: u32,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            instances: POOL_INSTANCES,
            core_instances_per_component: POOL_CORE_PER_COMPONENT,
            memories_per_component: POOL_MEMORIES_PER_COMPONENT,
            tables_per_component: POOL_TABLES_PER_COMPONENT,
        }
    }
}

/// The engines, linkers and compile cache shared by every Wasm policy of a runner.
#[derive(Clone)]
pub struct WasmRuntime {
    /// Pooling allocator: where instances normally come from.
    engine: Engine,
    linker: Arc<Linker<State>>,
    /// On-demand allocator, same compilation settings: used when the pool is full.
    fallback: Engine,
    fallback_linker: Arc<Linker<State>>,
    cache_dir: Option<PathBuf>,
    /// Bytes the cache directory may hold.
    cache_bytes: u64,
    ticker: Arc<Ticker>,
}

/// Advances the engine's epoch every [`TICK`] until the last runtime is dropped.
struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl WasmRuntime {
    /// A runtime caching compiled components in `cache_dir` (`None`: no cache).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, PolicyError> {
        Self::with_pool(cache_dir, POOL_INSTANCES)
    }

    /// Like [`WasmRuntime::new`], with room for `instances` policy instances in
    /// the pool (at least 1) before instances are allocated on demand.
    pub fn with_pool(cache_dir: Option<PathBuf>, instances: u32) -> Result<Self, PolicyError> {
        Self::with_pool_limits(
            cache_dir,
            PoolLimits {
                instances,
                ..PoolLimits::default()
            },
        )
    }

    /// Like [`WasmRuntime::new`], with the pool's room given (each at least 1).
    pub fn with_pool_limits(
        cache_dir: Option<PathBuf>,
        limits: PoolLimits,
    ) -> Result<Self, PolicyError> {
        let instances = limits.instances.max(1);
        let core = limits.core_instances_per_component.max(1);
        let memories = limits.memories_per_component.max(1);
        let tables = limits.tables_per_component.max(1);
        let err = |e: wasmtime::Error| PolicyError::Load {
            policy: "<runtime>".into(),
            reason: format!("cannot set up the Wasm engine: {e:#}"),
        };
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let fallback = Engine::new(&config).map_err(err)?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(core))
            .total_memories(instances.saturating_mul(memories))
            .total_tables(instances.saturating_mul(tables))
            .max_core_instances_per_component(core)
            .max_memories_per_component(memories)
            .max_tables_per_component(tables);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(err)?;

        let linker = |engine: &Engine| -> Result<Arc<Linker<State>>, PolicyError> {
            let mut linker = Linker::<State>::new(engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(err)?;
            PolicyWorld::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s).map_err(err)?;
            Ok(Arc::new(linker))
        };
        let (pooled_linker, fallback_linker) = (linker(&engine)?, linker(&fallback)?);

        let stop = Arc::new(AtomicBool::new(false));
        let (ticking, flag) = ([engine.clone(), fallback.clone()], stop.clone());
        std::thread::Builder::new()
            .name("flotilla-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    for engine in &ticking {
                        engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| PolicyError::Load {
                policy: "<runtime>".into(),
                reason: format!("cannot start the epoch thread: {e}"),
            })?;

        Ok(WasmRuntime {
            engine,
            linker: pooled_linker,
            fallback,
            fallback_linker,
            cache_dir,
            cache_bytes: std::env::var("FLOTILLA_CACHE_MAX_MB")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_CACHE_BYTES, |mb| mb.saturating_mul(1 << 20)),
            ticker: Arc::new(Ticker(stop)),
        })
    }

    /// Bounds the on-disk cache to `bytes` (least recently used evicted first).
    pub fn set_cache_limit(&mut self, bytes: u64) {
        self.cache_bytes = bytes;
    }

    /// Is the compiled form of `bytes` in the on-disk cache (so loading it
    /// skips the compile)? `false` without a cache.
    pub fn is_cached(&self, bytes: &[u8]) -> bool {
        self.cache_path(bytes).is_some_and(|p| p.is_file())
    }

    fn cache_path(&self, bytes: &[u8]) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        // Keyed by content and by everything that makes a compiled artifact
        // incompatible (wasmtime version, target, settings).
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut compat);
        let key = format!(
            "{}-{:016x}",
            hex::encode(Sha256::digest(bytes)),
            compat.finish()
        );
        Some(dir.join(format!("{key}.cwasm")))
    }

    /// The default cache location: `$FLOTILLA_CACHE_DIR`, else the user cache dir.
    pub fn default_cache_dir() -> Option<PathBuf> {
        std::env::var_os("FLOTILLA_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                directories::ProjectDirs::from("dev", "flotilla", "flotilla")
                    .map(|d| d.cache_dir().join("components"))
            })
    }

    /// Loads a component from a `.wasm` file.
    pub fn load_file(&self, path: &Path) -> Result<CompiledPolicy, PolicyError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let bytes = std::fs::read(path).map_err(|e| PolicyError::Load {
            policy: name.clone(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        self.load_bytes(&name, &bytes)
    }

    /// Compiles (or loads from the cache) and pre-links a component, then asks it
    /// to `describe` itself.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<CompiledPolicy, PolicyError> {
        let load_err = |reason: String| PolicyError::Load {
            policy: name.to_string(),
            reason,
        };
        let (component, in_pool) = self.compile(bytes).map_err(|e| {
            let hint = if bytes.starts_with(b"\0asm\x01\0\0\0") {
                " (this is a core Wasm module, not a component: build the policy for \
                 `--target wasm32-wasip2` with the flotilla SDK)"
            } else {
                ""
            };
            load_err(format!("not a valid component: {e:#}{hint}"))
        })?;

        let engine = if in_pool {
            &self.engine
        } else {
            &self.fallback
        };
        contract_check(engine, &component).map_err(|e| load_err(e.to_string()))?;

        let pooled = if in_pool {
            Some(link(&self.linker, &component).map_err(load_err)?)
        } else {
            None
        };
        let mut compiled = CompiledPolicy {
            name: name.to_string(),
            args_arena: args_arena(bytes),
            _ticker: self.ticker.clone(),
            pooled,
            fallback: Arc::new(Fallback {
                engine: self.fallback.clone(),
                linker: self.fallback_linker.clone(),
                component,
                in_pool,
                linked: std::sync::OnceLock::new(),
            }),
            info: PolicyInfo {
                name: name.to_string(),
                version: String::new(),
                hooks: Vec::new(),
                plan_calls: model::PlanCalls::InOrder,
            },
        };
        let mut probe = compiled.instantiate(World::empty(), Limits::default())?;
        let live = probe.live(Hook::Select)?;
        let typecheck = live
            .select
            .typed::<NodesParams<'_>, (Vec<wit::Selection>,)>(&live.store)
            .and(
                live.plan
                    .typed::<PlanParams<'_>, (Vec<wit::Wave>,)>(&live.store),
            )
            .and(
                live.evaluate
                    .typed::<EvaluateParams<'_>, (wit::Verdict,)>(&live.store),
            );
        if let Err(e) = typecheck {
            return Err(load_err(format!(
                "select/plan/evaluate do not match the policy world: {e:#}"
            )));
        }
        let described = probe.describe()?;
        compiled.info = PolicyInfo {
            name: if described.name.is_empty() {
                name.to_string()
            } else {
                described.name
            },
            version: described.version,
            hooks: described.hooks,
            plan_calls: described.plan_calls,
        };
        Ok(compiled)
    }

    /// The component in the pooled engine (`true`), or in the on-demand one
    /// when it is beyond a pool slot's limits (`false`). Compiled once, from
    /// the cache when it is there.
    fn compile(&self, bytes: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let Some(path) = self.cache_path(bytes) else {
            let artifact = self.engine.precompile_component(bytes)?;
            return self.place(&artifact);
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        // Read into memory rather than mmap the file: a cache file truncated or
        // rewritten in place while mapped would take the process down (SIGBUS).
        if let Ok(cached) = std::fs::read(&path) {
            match self.place(&cached) {
                Ok(c) => {
                    // Recently used: last to be evicted.
                    let _ = std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok(c);
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    "recompiling: cached component unusable: {e:#}"
                ),
            }
        }
        let artifact = self.engine.precompile_component(bytes)?;
        if let Err(e) = write_atomic(dir, &path, &artifact) {
            tracing::warn!(dir = %dir.display(), "cannot cache compiled component: {e}");
        }
        evict(dir, self.cache_bytes, &path);
        self.place(&artifact)
    }

    /// Loads a compiled artifact into the pooled engine, or into the
    /// on-demand one when the pool's limits refuse it.
    fn place(&self, artifact: &[u8]) -> wasmtime::Result<(Component, bool)> {
        // SAFETY: the bytes are an artifact this runtime compiled just now or
        // serialized into its own cache directory (written to a temp file,
        // renamed into place), keyed by the engine's compatibility hash;
        // wasmtime checks the header and metadata, and a damaged file is
        // recompiled by the caller.
        match unsafe { Component::deserialize(&self.engine, artifact) } {
            Ok(c) => Ok((c, true)),
            Err(pool) => {
                // Both engines have the same compilation settings.
                // SAFETY: as above.
                let c = unsafe { Component::deserialize(&self.fallback, artifact) }?;
                tracing::info!("component runs on the on-demand engine: {pool:#}");
                Ok((c, false))
            }
        }
    }
}

/// Keeps the `*.cwasm` files of `dir` within `max` bytes, removing the least
/// recently used (oldest modification time; a cache hit touches its file)
/// first, never `keep` (the one just written).
fn evict(dir: &Path, max: u64, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= max {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::debug!(path = %path.display(), "evicted from the compile cache");
            total = total.saturating_sub(len);
        }
    }
}

/// Pre-links `component` and finds its exports.
fn link(linker: &Linker<State>, component: &Component) -> Result<Linked, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("cannot link (imports outside the policy world?): {e:#}"))?;
    let pre =
        PolicyPre::new(pre).map_err(|e| format!("exports do not match the policy world: {e:#}"))?;
    let hooks = component
        .get_export_index(None, HOOKS)
        .ok_or_else(|| format!("missing export {HOOKS}"))?;
    let export = |name: &str| {
        component
            .get_export_index(Some(&hooks), name)
            .ok_or_else(|| format!("missing export {HOOKS}#{name}"))
    };
    let (select, plan) = (export("select")?, export("plan")?);
    let evaluate = export("evaluate")?;
    let indices = PolicyIndices::new(pre.instance_pre())
        .map_err(|e| format!("exports do not match the policy world: {e:#}"))?;
    Ok(Linked {
        pre,
        indices,
        select,
        plan,
        evaluate,
    })
}

fn write_atomic(dir: &Path, path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// A compiled, pre-linked policy component; instantiate it once per task.
#[derive(Clone)]
pub struct CompiledPolicy {
    name: String,
    /// Keeps the epoch ticker (and so every CPU budget) alive while a policy
    /// outlives the runtime handle it was loaded from.
    _ticker: Arc<Ticker>,
    /// Linked in the pooling engine; `None` when the component is beyond a
    /// pool slot's limits.
    pooled: Option<Linked>,
    /// Linked in the on-demand engine on first need (pool exhausted).
    fallback: Arc<Fallback>,
    info: PolicyInfo,
    /// The component serves argument-arena requests ([`args_arena`]).
    args_arena: bool,
}

/// A component pre-linked in one engine.
#[derive(Clone)]
struct Linked {
    pre: PolicyPre<State>,
    indices: PolicyIndices,
    /// `select` and `plan` are called through typed functions over borrowed
    /// nodes ([`NodeRef`]), so a million nodes cross without being cloned.
    select: ComponentExportIndex,
    plan: ComponentExportIndex,
    /// `evaluate` likewise, for its context ([`CtxArg`]).
    evaluate: ComponentExportIndex,
}

/// The component in the on-demand engine, made when the pool first runs out
/// (the compiled code is copied over, not recompiled: both engines have the
/// same compilation settings).
struct Fallback {
    engine: Engine,
    linker: Arc<Linker<State>>,
    /// The component: in the pooling engine, or (`in_pool` false) already in
    /// the on-demand one.
    component: Component,
    in_pool: bool,
    linked: std::sync::OnceLock<Result<Linked, String>>,
}

impl Fallback {
    fn get(&self) -> Result<&Linked, String> {
        self.linked
            .get_or_init(|| {
                if !self.in_pool {
                    return link(&self.linker, &self.component);
                }
                let bytes = self
                    .component
                    .serialize()
                    .map_err(|e| format!("cannot copy the component: {e:#}"))?;
                // SAFETY: the bytes were serialized just now by an engine with
                // the same compilation settings.
                let component = unsafe { Component::deserialize(&self.engine, &bytes) }
                    .map_err(|e| format!("cannot copy the component: {e:#}"))?;
                link(&self.linker, &component)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl CompiledPolicy {
    pub fn info(&self) -> &PolicyInfo {
        &self.info
    }

    /// A policy bound to `world` and `limits`. Cheap: the instance itself is
    /// created on the first call (and again after a trap).
    pub fn instantiate(&self, world: World, limits: Limits) -> Result<WasmPolicy, PolicyError> {
        Ok(WasmPolicy {
            compiled: self.clone(),
            world,
            limits,
            live: None,
            spare: Vec::new(),
            workers: super::default_threads(),
            ctx_cache: Default::default(),
        })
    }
}

/// A live instance: its store, its bindings, and `select`/`plan` as raw
/// functions for calls over borrowed nodes.
struct LiveInstance {
    store: Store<State>,
    bindings: PolicyWorld,
    select: Func,
    plan: Func,
    evaluate: Func,
    /// Node lists go into the guest's argument arena.
    arena: bool,
}

impl LiveInstance {
    /// Starts a call on this thread: its CPU budget and its memory cap.
    fn arm(&mut self, budget: Duration, memory_cap: usize) {
        // Lazily: a warm call is over long before its first look, and
        // reading the CPU clock would cost a fifth of it.
        let clock = CallClock::lazy(budget);
        self.store.set_epoch_deadline(ticks(clock.first_look()));
        self.store.data_mut().clock = Some(clock);
        let limiter = &mut self.store.data_mut().limiter;
        limiter.memory_cap = memory_cap;
        limiter.hit_cap = false;
    }

    /// Its memory grew past half the base cap: linear memory never shrinks,
    /// so a fresh instance (copy-on-write from the compiled image) is smaller.
    fn grown(&self, limits: &Limits) -> bool {
        self.store.data().limiter.largest > limits.memory_bytes / 2
    }
}

/// A Wasm policy bound to one task's world.
pub struct WasmPolicy {
    compiled: CompiledPolicy,
    world: World,
    limits: Limits,
    live: Option<LiveInstance>,
    /// Extra instances for spreading `select` chunks over cores.
    spare: Vec<LiveInstance>,
    workers: usize,
    ctx_cache: crate::CtxCache<wit::TaskContext>,
}

impl WasmPolicy {
    /// Creates the instance now rather than on the first call (benchmarks, `check`).
    pub fn warm(&mut self) -> Result<(), PolicyError> {
        self.live(Hook::Select).map(|_| ())
    }

    /// How many live instances this policy holds (its own and the extra ones
    /// `select` and an independent `plan` spread chunks over).
    pub fn instances(&self) -> usize {
        usize::from(self.live.is_some()) + self.spare.len()
    }

    /// The largest linear memory any of its live instances grew to, in
    /// bytes (what the memory cap is held against).
    pub fn memory_bytes(&self) -> usize {
        self.live
            .iter()
            .chain(&self.spare)
            .map(|l| l.store.data().limiter.largest)
            .max()
            .unwrap_or(0)
    }

    /// Drops the instances; the next call makes a new one.
    pub fn discard(&mut self) {
        self.live = None;
        self.spare.clear();
    }

    /// How many instances `select`, and a `plan` declared independent, may
    /// spread chunks over (default: the number of cores, at most 4). 1 keeps
    /// everything on the calling thread.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers.max(1);
        self.spare.truncate(self.workers - 1);
    }

    /// Drops instances whose memory grew past half the cap: linear memory
    /// never shrinks, and an interpreter's heap (a JavaScript or Python
    /// runtime's) grows over calls until it collects; a fresh instance (cheap:
    /// copy-on-write from the compiled image) starts small again. Called before
    /// `select` and before the first chunk of a `plan`; between a plan's
    /// chunks only when it is declared independent (otherwise a policy may
    /// keep state across them).
    fn recycle_grown(&mut self) {
        let limits = self.limits;
        let grown = |l: &LiveInstance| l.grown(&limits);
        if self.live.as_ref().is_some_and(grown) {
            tracing::debug!(policy = %self.compiled.name, "instance memory past half the cap: recycled");
            self.live = None;
        }
        self.spare.retain(|l| !grown(l));
    }

    fn live(&mut self, hook: Hook) -> Result<&mut LiveInstance, PolicyError> {
        if self.live.is_none() {
            self.live = Some(self.new_live(hook)?);
        }
        Ok(self.live.as_mut().expect("instance was just created"))
    }

    fn new_live(&self, hook: Hook) -> Result<LiveInstance, PolicyError> {
        self.maker().new_live(hook)
    }

    /// What makes new instances of this policy, shareable with `select`'s
    /// worker threads.
    fn maker(&self) -> Maker<'_> {
        Maker {
            compiled: &self.compiled,
            world: &self.world,
            limits: &self.limits,
        }
    }

    fn classify(
        &self,
        hook: Hook,
        nodes: usize,
        store: &Store<State>,
        e: wasmtime::Error,
    ) -> PolicyError {
        classify(&self.compiled.name, &self.limits, hook, nodes, store, e)
    }

    /// Runs one export with a fresh CPU budget; any failure discards the instance.
    fn call<R>(
        &mut self,
        hook: Hook,
        nodes: usize,
        f: impl FnOnce(&mut LiveInstance) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        let (budget, cap) = (self.limits.budget(nodes), self.limits.memory(nodes));
        let live = self.live(hook)?;
        live.arm(budget, cap);
        match f(live) {
            Ok(r) => Ok(r),
            Err(e) => {
                let live = self.live.take().expect("instance is live");
                Err(self.classify(hook, nodes, &live.store, e))
            }
        }
    }

    /// The lowered context, reused while the task's context is unchanged. It is
    /// taken out of the cache for the call and put back by [`Self::with_ctx`].
    fn take_ctx(&mut self, ctx: &model::TaskContext) -> (model::TaskContext, wit::TaskContext) {
        let converted = self
            .ctx_cache
            .take(ctx, |ctx| Ok::<_, std::convert::Infallible>(wit_ctx(ctx)));
        match converted {
            Ok(entry) => entry,
            Err(never) => match never {},
        }
    }

    fn with_ctx<R>(
        &mut self,
        ctx: &model::TaskContext,
        f: impl FnOnce(&mut Self, &wit::TaskContext) -> Result<R, PolicyError>,
    ) -> Result<R, PolicyError> {
        let cached = self.take_ctx(ctx);
        let out = f(self, &cached.1);
        self.ctx_cache.put(cached);
        out
    }

    /// Runs `call` on every chunk (with its offset), the chunks spread in
    /// contiguous groups over up to `workers` instances on scoped threads;
    /// the results come back in chunk order. For calls that keep no state
    /// between chunks (`select`, and `plan` declared independent): each call
    /// has a budget and cap for its own chunk, and an instance whose memory
    /// grew is swapped for a fresh one between chunks. A failed instance is
    /// discarded (a trapped one cannot be entered again), the others kept.
    fn spread_chunks<T: Send>(
        &mut self,
        ctx: &model::TaskContext,
        hook: Hook,
        chunks: &[(u32, &[model::Node])],
        call: impl Fn(&mut LiveInstance, &wit::TaskContext, u32, &[model::Node]) -> wasmtime::Result<T>
        + Sync,
    ) -> Result<Vec<T>, PolicyError> {
        self.recycle_grown();
        let per = chunks.len().div_ceil(self.workers.max(1)).max(1);
        let groups: Vec<&[(u32, &[model::Node])]> = chunks.chunks(per).collect();
        let mut lives = Vec::with_capacity(groups.len());
        while lives.len() < groups.len() {
            let live = match (lives.is_empty(), self.live.take(), self.spare.pop()) {
                (true, Some(primary), spare) => {
                    self.spare.extend(spare);
                    primary
                }
                (_, primary, Some(spare)) => {
                    self.live = primary;
                    spare
                }
                (_, primary, None) => {
                    self.live = primary;
                    self.new_live(hook)?
                }
            };
            lives.push(live);
        }
        let cached = self.take_ctx(ctx);
        let maker = self.maker();
        let (name, limits, maker, call) = (&self.compiled.name, self.limits, &maker, &call);
        let wit_ctx = &cached.1;
        let results = crate::spread(lives, groups, |live, group| {
            let mut out = Vec::with_capacity(group.len());
            for &(offset, chunk) in group {
                // Nothing is kept between calls: an instance whose heap grew
                // (an interpreter's garbage) is swapped for a fresh one.
                if live.grown(&limits) {
                    *live = maker.new_live(hook)?;
                }
                live.arm(limits.budget(chunk.len()), limits.memory(chunk.len()));
                match call(live, wit_ctx, offset, chunk) {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        return Err(classify(name, &limits, hook, chunk.len(), &live.store, e));
                    }
                }
            }
            Ok(out)
        });
        self.ctx_cache.put(cached);
        let mut all = Vec::with_capacity(chunks.len());
        let mut first_err = None;
        for (live, result) in results {
            if result.is_ok() {
                if self.live.is_none() {
                    self.live = Some(live);
                } else {
                    self.spare.push(live);
                }
            }
            match result {
                Ok(v) => all.extend(v),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(all),
        }
    }

    fn describe(&mut self) -> Result<PolicyInfo, PolicyError> {
        let info = self.call(Hook::Select, 0, |l| {
            l.bindings
                .flotilla_policy_hooks()
                .call_describe(&mut l.store)
        })?;
        Ok(PolicyInfo {
            name: info.name,
            version: info.version,
            hooks: info.hooks.into_iter().map(hook_from).collect(),
            plan_calls: plan_calls_from(info.plan_calls),
        })
    }
}

impl Policy for WasmPolicy {
    fn info(&self) -> &PolicyInfo {
        &self.compiled.info
    }

    /// Chunks are spread over up to `workers` instances on scoped threads (the
    /// contract says `select` keeps no state between calls). Each call has its
    /// own budget; a failed instance is discarded, the others are kept.
    fn call_select_chunks(
        &mut self,
        ctx: &model::TaskContext,
        chunks: &[&[model::Node]],
    ) -> Result<Vec<Vec<model::Selection>>, PolicyError> {
        if self.workers <= 1 || chunks.len() <= 1 {
            return chunks.iter().map(|c| self.call_select(ctx, c)).collect();
        }
        let chunks: Vec<(u32, &[model::Node])> = chunks.iter().map(|c| (0, *c)).collect();
        self.spread_chunks(ctx, Hook::Select, &chunks, |live, ctx, _, chunk| {
            Ok(call_select(live, ctx, chunk)?
                .into_iter()
                .map(selection_from)
                .collect())
        })
    }

    fn call_select(
        &mut self,
        ctx: &model::TaskContext,
        nodes: &[model::Node],
    ) -> Result<Vec<model::Selection>, PolicyError> {
        self.recycle_grown();
        let out = self.with_ctx(ctx, |this, ctx| {
            this.call(Hook::Select, nodes.len(), |live| {
                call_select(live, ctx, nodes)
            })
        })?;
        Ok(out.into_iter().map(selection_from).collect())
    }

    fn call_plan(
        &mut self,
        ctx: &model::TaskContext,
        nodes: &[model::Node],
    ) -> Result<Vec<model::Wave>, PolicyError> {
        let total = u32::try_from(nodes.len()).map_err(|_| {
            PolicyError::invalid(&self.compiled.name, Hook::Plan, "more than 2^32 nodes")
        })?;
        let chunks: Vec<(u32, &[model::Node])> = nodes
            .chunks(model::CHUNK)
            .enumerate()
            .map(|(i, c)| ((i * model::CHUNK) as u32, c))
            .collect();
        let outs: Vec<Vec<wit::Wave>> = if self.compiled.info.plan_calls
            == model::PlanCalls::Independent
            && self.workers > 1
            && chunks.len() > 1
        {
            // Declared independent: spread like `select`'s chunks.
            self.spread_chunks(ctx, Hook::Plan, &chunks, |live, ctx, offset, chunk| {
                call_plan(live, ctx, chunk, offset, total)
            })?
        } else {
            // In order, in this policy's one instance; each call's budget
            // covers the nodes handed over so far (a policy may keep them and
            // decide on the last call).
            self.recycle_grown();
            let mut outs = Vec::with_capacity(chunks.len());
            for &(offset, chunk) in &chunks {
                let handed = offset as usize + chunk.len();
                outs.push(self.with_ctx(ctx, |this, ctx| {
                    this.call(Hook::Plan, handed, |live| {
                        call_plan(live, ctx, chunk, offset, total)
                    })
                })?);
            }
            outs
        };
        // Waves of the same name are merged, in chunk order.
        let mut waves: Vec<model::Wave> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for w in outs.into_iter().flatten() {
            match by_name.get(&w.name) {
                Some(&i) => waves[i].nodes.extend(w.nodes),
                None => {
                    by_name.insert(w.name.clone(), waves.len());
                    waves.push(model::Wave {
                        name: w.name,
                        nodes: w.nodes,
                        concurrency: w.concurrency,
                        soak_seconds: w.soak_seconds,
                        needs_approval: w.needs_approval,
                    });
                }
            }
        }
        Ok(waves)
    }

    fn call_admit(
        &mut self,
        ctx: &model::TaskContext,
        node: &model::Node,
        now: u64,
    ) -> Result<model::Admission, PolicyError> {
        let node = wit_node(node);
        let out = self.with_ctx(ctx, |this, ctx| {
            this.call(Hook::Admit, 1, |l| {
                l.bindings
                    .flotilla_policy_hooks()
                    .call_admit(&mut l.store, ctx, &node, now)
            })
        })?;
        Ok(match out {
            wit::Admission::Now => model::Admission::Now,
            wit::Admission::DeferUntil(t) => model::Admission::DeferUntil(t),
            wit::Admission::Never(r) => model::Admission::Never(r),
        })
    }

    fn call_evaluate(
        &mut self,
        ctx: &model::TaskContext,
        report: &model::WaveReport,
    ) -> Result<model::Verdict, PolicyError> {
        let report = wit::WaveReport {
            wave: report.wave,
            waves: report.waves,
            total: report.total,
            succeeded: report.succeeded,
            failed_rolled_back: report.failed_rolled_back,
            failed_rollback_failed: report.failed_rollback_failed,
            timed_out: report.timed_out,
            unknown: report.unknown,
            rejected: report.rejected,
            in_flight: report.in_flight,
            skipped: report.skipped,
            failed_nodes: report.failed_nodes.clone(),
            task_finished: report.task_finished,
            task_failed: report.task_failed,
        };
        let out = self.with_ctx(ctx, |this, ctx| {
            this.call(Hook::Evaluate, 0, |l| {
                // SAFETY: `load_bytes` type-checked `evaluate` against
                // `(task-context, wave-report) -> verdict` for this component.
                let f: TypedFunc<EvaluateParams<'_>, (wit::Verdict,)> =
                    unsafe { TypedFunc::new_unchecked(l.evaluate) };
                let ctx = CtxArg {
                    ctx,
                    arena: l.arena,
                    nodes: None,
                };
                Ok(f.call(&mut l.store, (ctx, &report))?.0)
            })
        })?;
        Ok(match out {
            wit::Verdict::Proceed => model::Verdict::Proceed,
            wit::Verdict::Pause(r) => model::Verdict::Pause(r),
            wit::Verdict::RetryFailed => model::Verdict::RetryFailed,
            wit::Verdict::Rollback(r) => model::Verdict::Rollback(r),
            wit::Verdict::Abort(r) => model::Verdict::Abort(r),
        })
    }

    fn call_on_request(
        &mut self,
        ctx: &model::TaskContext,
        node: &model::Node,
    ) -> Result<model::Offer, PolicyError> {
        let node = wit_node(node);
        let out = self.with_ctx(ctx, |this, ctx| {
            this.call(Hook::OnRequest, 1, |l| {
                l.bindings
                    .flotilla_policy_hooks()
                    .call_on_request(&mut l.store, ctx, &node)
            })
        })?;
        Ok(match out {
            wit::Offer::Offer => model::Offer::Offer,
            wit::Offer::DeferUntil(t) => model::Offer::DeferUntil(t),
            wit::Offer::Decline(r) => model::Offer::Decline(r),
        })
    }
}

/// Epoch ticks until the clock of a call with `left` of its budget is looked
/// at; one extra tick because the current tick may be about to end.
fn ticks(left: Duration) -> u64 {
    (left.as_micros() / TICK.as_micros()).max(1) as u64 + 1
}

/// At each epoch deadline: the call goes on while its thread has CPU budget
/// left (and the wall-clock backstop is not reached), else it is interrupted.
fn on_deadline(mut store: StoreContextMut<'_, State>) -> wasmtime::Result<UpdateDeadline> {
    Ok(
        match store.data_mut().clock.as_mut().and_then(|c| c.remaining()) {
            Some(left) => UpdateDeadline::Continue(ticks(left)),
            None => UpdateDeadline::Interrupt,
        },
    )
}

/// Turns a failed call into the error the engine records: budget, memory cap,
/// or a trap with whatever the guest printed to stderr (a Rust panic message).
fn classify(
    policy: &str,
    limits: &Limits,
    hook: Hook,
    nodes: usize,
    store: &Store<State>,
    e: wasmtime::Error,
) -> PolicyError {
    let failure = if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        Failure::cpu(limits.budget(nodes))
    } else if store.data().limiter.hit_cap {
        Failure::Memory(format!("{} MiB", store.data().limiter.memory_cap >> 20))
    } else {
        let stderr = store.data().stderr.contents();
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr = stderr.trim();
        Failure::Trap(if stderr.is_empty() {
            format!("{e:#}")
        } else {
            format!("{e:#}; guest stderr: {stderr}")
        })
    };
    failure.into_error(policy, hook)
}

/// Makes instances of a compiled policy for one world and limits.
struct Maker<'a> {
    compiled: &'a CompiledPolicy,
    world: &'a World,
    limits: &'a Limits,
}

impl Maker<'_> {
    /// A new instance from the pool, or from the on-demand engine when the
    /// pool has no free slot.
    pub(super) fn new_live(&self, hook: Hook) -> Result<LiveInstance, PolicyError> {
        let err = |message: String| PolicyError::Trap {
            policy: self.compiled.name.clone(),
            hook,
            message: format!("cannot instantiate: {message}"),
        };
        let Some(pooled) = &self.compiled.pooled else {
            let linked = self.compiled.fallback.get().map_err(err)?;
            return self
                .instantiate_in(linked)
                .map_err(|e| err(format!("{e:#}")));
        };
        match self.instantiate_in(pooled) {
            Ok(live) => Ok(live),
            // The pool is full, or the component needs more than a slot has
            // (any other failure happens again below and is reported from there).
            Err(e) => {
                if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
                    tracing::debug!(policy = %self.compiled.name, "instance pool exhausted");
                } else {
                    tracing::debug!(policy = %self.compiled.name, "not instantiable from the pool: {e:#}");
                }
                let linked = self.compiled.fallback.get().map_err(err)?;
                self.instantiate_in(linked)
                    .map_err(|e| err(format!("{e:#}")))
            }
        }
    }

    fn instantiate_in(&self, linked: &Linked) -> wasmtime::Result<LiveInstance> {
        let stderr = MemoryOutputPipe::new(STDERR_CAP);
        let state = State {
            wasi: None,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_cap: self.limits.memory_bytes,
                hit_cap: false,
                largest: 0,
            },
            world: self.world.clone(),
            policy: self.compiled.name.clone(),
            stderr,
            clock: None,
        };
        let mut store = Store::new(linked.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(on_deadline);
        // The guest's first host call starts a lazily started CPU clock: the
        // time it then waits on the host is not the guest's.
        store.call_hook(|mut store, hook| {
            if matches!(hook, CallHook::CallingHost)
                && let Some(clock) = store.data_mut().clock.as_mut()
            {
                clock.begin();
            }
            Ok(())
        });
        let clock = CallClock::lazy(self.limits.budget(0));
        store.set_epoch_deadline(ticks(clock.first_look()));
        store.data_mut().clock = Some(clock);
        let instance = linked.pre.instance_pre().instantiate(&mut store)?;
        let bindings = linked.indices.load(&mut store, &instance)?;
        let mut func = |index| {
            instance
                .get_func(&mut store, index)
                .ok_or_else(|| wasmtime::format_err!("export vanished"))
        };
        let (select, plan) = (func(&linked.select)?, func(&linked.plan)?);
        let evaluate = func(&linked.evaluate)?;
        Ok(LiveInstance {
            store,
            bindings,
            select,
            plan,
            evaluate,
            arena: self.compiled.args_arena,
        })
    }
}

type NodesParams<'a> = (CtxArg<'a>, NodeList<'a>);
type PlanParams<'a> = (CtxArg<'a>, NodeList<'a>, u32, u32);
type EvaluateParams<'a> = (CtxArg<'a>, &'a wit::WaveReport);

/// The context and node-list arguments of `select` and `plan`: the nodes
/// go into the guest's argument arena when it has one (`reserved` is the
/// block the context's lowering asks for them).
fn node_args<'a>(
    live: &LiveInstance,
    ctx: &'a wit::TaskContext,
    nodes: &'a [model::Node],
    reserved: &'a AtomicUsize,
) -> (CtxArg<'a>, NodeList<'a>) {
    let arena = live.arena;
    (
        CtxArg {
            ctx,
            arena,
            nodes: Some((nodes, reserved)),
        },
        NodeList {
            nodes,
            arena,
            reserved: Some(reserved),
        },
    )
}

/// Calls `select` on one chunk of borrowed nodes in `live`.
fn call_select(
    live: &mut LiveInstance,
    ctx: &wit::TaskContext,
    nodes: &[model::Node],
) -> wasmtime::Result<Vec<wit::Selection>> {
    // SAFETY: `load_bytes` type-checked `select` against
    // `(ctx, list<node>) -> list<selection>` for this component; skipping the
    // check on every call saves microseconds.
    let f: TypedFunc<NodesParams<'_>, (Vec<wit::Selection>,)> =
        unsafe { TypedFunc::new_unchecked(live.select) };
    let reserved = AtomicUsize::new(NOT_RESERVED);
    let args = node_args(live, ctx, nodes, &reserved);
    Ok(f.call(&mut live.store, args)?.0)
}

/// Calls `plan` on one chunk of borrowed nodes in `live`.
fn call_plan(
    live: &mut LiveInstance,
    ctx: &wit::TaskContext,
    nodes: &[model::Node],
    offset: u32,
    total: u32,
) -> wasmtime::Result<Vec<wit::Wave>> {
    // SAFETY: `load_bytes` type-checked `plan` against
    // `(ctx, list<node>, u32, u32) -> list<wave>` for this component.
    let f: TypedFunc<PlanParams<'_>, (Vec<wit::Wave>,)> =
        unsafe { TypedFunc::new_unchecked(live.plan) };
    let reserved = AtomicUsize::new(NOT_RESERVED);
    let (ctx, nodes) = node_args(live, ctx, nodes, &reserved);
    Ok(f.call(&mut live.store, (ctx, nodes, offset, total))?.0)
}

/// Is `component` a policy of this runner's contract? A component built
/// against another version of `flotilla:policy` (0.1.0 exported the hooks at
/// the top level) is named as such, with what to rebuild.
/// How a component fails to speak this runner's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    /// It names `flotilla:policy` interfaces of another version.
    #[error(
        "built against flotilla:policy@{version}, which this runner does not load (it speaks {CONTRACT}): {REBUILD}"
    )]
    OtherVersion { version: String },
    /// Its hooks are top-level exports, as in 0.1.0.
    #[error(
        "exports its hooks at the top level as flotilla:policy@0.1.0 did; this runner speaks {CONTRACT}: {REBUILD}"
    )]
    TopLevelHooks,
    /// No `hooks` interface among its exports.
    #[error(
        "does not implement world flotilla:policy/policy@0.2.0: missing export {HOOKS} (it exports: {}); put `#[flotilla_sdk::policy]` on the `impl Policy` of a Rust policy",
        if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
    )]
    NoHooks { exports: Vec<String> },
    #[error("export {HOOKS} is not an interface instance")]
    HooksNotAnInterface,
    /// The `hooks` interface lacks some hooks.
    #[error(
        "does not implement world flotilla:policy/policy@0.2.0: {HOOKS} lacks {} (it has: {})",
        missing.join(", "),
        has.join(", ")
    )]
    MissingHooks {
        missing: Vec<String>,
        has: Vec<String>,
    },
    /// `describe` answers a `policy-info` of other fields (built against an
    /// earlier draft of 0.2.0, before `plan-calls`).
    #[error(
        "its `describe` returns policy-info with the fields ({}), but {CONTRACT} has ({}): it was built against an earlier draft of 0.2.0 (before `plan-calls`); {REBUILD}",
        fields.join(", "),
        POLICY_INFO_FIELDS.join(", ")
    )]
    PolicyInfoFields { fields: Vec<String> },
}

/// The fields of `policy-info`, in order.
const POLICY_INFO_FIELDS: [&str; 4] = ["name", "version", "hooks", "plan-calls"];

fn contract_check(engine: &Engine, component: &Component) -> Result<(), ContractError> {
    use wasmtime::component::types::ComponentItem;
    let ty = component.component_type();
    let exports: Vec<(&str, ComponentItem)> = ty.exports(engine).map(|(n, e)| (n, e.ty)).collect();
    let names: Vec<&str> = exports.iter().map(|(n, _)| *n).collect();
    let imports: Vec<&str> = ty.imports(engine).map(|(n, _)| n).collect();
    // Another version of the contract, by an interface it names.
    let other = names
        .iter()
        .chain(imports.iter())
        .filter_map(|n| n.strip_prefix("flotilla:policy/"))
        .filter_map(|n| n.split_once('@').map(|(_, v)| v))
        .find(|v| *v != CONTRACT.rsplit('@').next().unwrap_or_default());
    let top_level_hooks = names.contains(&"describe") && names.contains(&"select");
    if let Some(version) = other {
        return Err(ContractError::OtherVersion {
            version: version.to_string(),
        });
    }
    if top_level_hooks && !names.contains(&HOOKS) {
        return Err(ContractError::TopLevelHooks);
    }
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let Some((_, hooks)) = exports.iter().find(|(n, _)| *n == HOOKS) else {
        return Err(ContractError::NoHooks {
            exports: owned(&names),
        });
    };
    let ComponentItem::ComponentInstance(hooks) = hooks else {
        return Err(ContractError::HooksNotAnInterface);
    };
    let inner: Vec<&str> = hooks.exports(engine).map(|(n, _)| n).collect();
    let missing: Vec<&str> = EXPORTS
        .iter()
        .copied()
        .filter(|e| !inner.contains(e))
        .collect();
    if !missing.is_empty() {
        return Err(ContractError::MissingHooks {
            missing: owned(&missing),
            has: owned(&inner),
        });
    }
    // `policy-info` as this runner has it: a component built before
    // `plan-calls` was added to 0.2.0 would otherwise fail at its first
    // instantiation with a bare type mismatch.
    use wasmtime::component::types::Type;
    if let Some(ComponentItem::ComponentFunc(describe)) =
        hooks.get_export(engine, "describe").map(|e| e.ty)
        && let Some(Type::Record(info)) = describe.results().next()
    {
        let fields: Vec<&str> = info.fields().map(|f| f.name).collect();
        if fields != POLICY_INFO_FIELDS {
            return Err(ContractError::PolicyInfoFields {
                fields: owned(&fields),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
