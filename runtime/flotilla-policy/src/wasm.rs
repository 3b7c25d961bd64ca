//! The WebAssembly policy host: the only file that imports wasmtime.
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
//! holding many policies at once never fails for want of a slot. The memory cap
//! ([`Limits::memory_bytes`]) is enforced by the store's limiter either way; pool
//! slots keep wasmtime's default maximum so any cap a user sets fits.

use super::{Limits, Policy, PolicyError};
use crate::world::World;
use flotilla_model::{self as model, Hook, PolicyInfo};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use wasmtime::component::{
    Component, ComponentExportIndex, ComponentType, Func, HasSelf, Linker, Lower, ResourceTable,
    TypedFunc,
};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store, Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../../wit",
    });
}

use bindings::flotilla::policy::{clock, delivery, fleet, log, status, types as wit};
use bindings::{Policy as PolicyWorld, PolicyIndices, PolicyPre};

/// How often the epoch advances; the CPU budget is counted in these ticks.
const TICK: Duration = Duration::from_millis(1);
/// Bytes of guest stderr kept to explain a trap (a Rust panic message lands here).
const STDERR_CAP: usize = 16 << 10;
/// Exports a component must have to be a policy.
const EXPORTS: [&str; 6] = [
    "describe",
    "select",
    "plan",
    "admit",
    "evaluate",
    "on-request",
];

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

/// The custom section by which a component built with the SDK says it serves
/// argument-arena requests (`flotilla_sdk::arena`), and its content.
const ARENA_SECTION: &[u8] = b"flotilla-args-arena";
const ARENA_VERSION: &[u8] = b"v1";
/// The `old_len` that, with a null `old_ptr`, asks the guest's `cabi_realloc`
/// for a block of its argument arena (the SDK's `arena::ARENA_REQUEST`).
const ARENA_REQUEST: usize = 0x464C_4F54;

/// Does the component (or a core module in it) carry the argument-arena
/// section? Walks the binary's sections, into nested modules and components.
fn args_arena(bytes: &[u8]) -> bool {
    fn leb(bytes: &[u8], at: &mut usize) -> Option<usize> {
        let mut out = 0usize;
        for shift in (0..35).step_by(7) {
            let b = *bytes.get(*at)?;
            *at += 1;
            out |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }
    fn walk(bytes: &[u8], depth: u32) -> Option<bool> {
        if depth > 8 || bytes.get(..4)? != b"\0asm" {
            return None;
        }
        // Core modules are layer 0, components layer 1.
        let component = bytes.get(6..8)? == [1, 0];
        let mut at = 8;
        while at < bytes.len() {
            let id = bytes[at];
            at += 1;
            let len = leb(bytes, &mut at)?;
            let body = bytes.get(at..at.checked_add(len)?)?;
            at += len;
            match id {
                0 => {
                    let mut n = 0;
                    let name_len = leb(body, &mut n)?;
                    let name = body.get(n..n.checked_add(name_len)?)?;
                    if name == ARENA_SECTION && body.get(n + name_len..) == Some(ARENA_VERSION) {
                        return Some(true);
                    }
                }
                // Core module and component sections of a component.
                1 | 4 if component && walk(body, depth + 1) == Some(true) => {
                    return Some(true);
                }
                _ => {}
            }
        }
        Some(false)
    }
    walk(bytes, 0) == Some(true)
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
        let instances = instances.max(1);
        let err = |e: wasmtime::Error| PolicyError::Load {
            policy: "<runtime>".into(),
            reason: format!("cannot set up the Wasm engine: {e:#}"),
        };
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let fallback = Engine::new(&config).map_err(err)?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            .total_core_instances(instances * POOL_CORE_PER_COMPONENT)
            .total_memories(instances * POOL_MEMORIES_PER_COMPONENT)
            .total_tables(instances * POOL_TABLES_PER_COMPONENT)
            .max_core_instances_per_component(POOL_CORE_PER_COMPONENT)
            .max_memories_per_component(POOL_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(POOL_TABLES_PER_COMPONENT);
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
            ticker: Arc::new(Ticker(stop)),
        })
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
        let component = self.compile(bytes).map_err(|e| {
            let hint = if bytes.starts_with(b"\0asm\x01\0\0\0") {
                " (this is a core Wasm module, not a component: build the policy for \
                 `--target wasm32-wasip2` with the flotilla SDK)"
            } else {
                ""
            };
            load_err(format!("not a valid component: {e:#}{hint}"))
        })?;

        let ty = component.component_type();
        let exported: Vec<&str> = ty.exports(&self.engine).map(|(n, _)| n).collect();
        let missing: Vec<&str> = EXPORTS
            .iter()
            .copied()
            .filter(|e| !exported.contains(e))
            .collect();
        if !missing.is_empty() {
            return Err(load_err(format!(
                "does not implement world flotilla:policy/policy@0.1.0: missing export(s) {} \
                 (it exports: {}); put `#[flotilla_sdk::policy]` on the `impl Policy` of a Rust policy",
                missing.join(", "),
                if exported.is_empty() {
                    "nothing".to_string()
                } else {
                    exported.join(", ")
                }
            )));
        }

        let pooled = link(&self.linker, &component).map_err(load_err)?;
        let mut compiled = CompiledPolicy {
            name: name.to_string(),
            args_arena: args_arena(bytes),
            _ticker: self.ticker.clone(),
            pooled,
            fallback: Arc::new(Fallback {
                engine: self.fallback.clone(),
                linker: self.fallback_linker.clone(),
                component,
                linked: std::sync::OnceLock::new(),
            }),
            info: PolicyInfo {
                name: name.to_string(),
                version: String::new(),
                hooks: Vec::new(),
            },
        };
        let mut probe = compiled.instantiate(World::empty(), Limits::default())?;
        let live = probe.live(Hook::Select)?;
        let typecheck = live
            .select
            .typed::<NodesParams<'_>, (Vec<wit::Selection>,)>(&live.store)
            .and(
                live.plan
                    .typed::<NodesParams<'_>, (Vec<wit::Wave>,)>(&live.store),
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
        };
        Ok(compiled)
    }

    fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes);
        };
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
        let path = dir.join(format!("{key}.cwasm"));
        // Read into memory rather than mmap the file: a cache file truncated or
        // rewritten in place while mapped would take the process down (SIGBUS).
        if let Ok(cached) = std::fs::read(&path) {
            // SAFETY: the bytes are an artifact this runtime serialized into its
            // own cache directory (written to a temp file, renamed into place),
            // keyed by the engine's compatibility hash; wasmtime checks the header
            // and metadata, and a damaged file is recompiled below.
            match unsafe { Component::deserialize(&self.engine, &cached) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    "recompiling: cached component unusable: {e:#}"
                ),
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Err(e) = write_atomic(dir, &path, &component.serialize()?) {
            tracing::warn!(dir = %dir.display(), "cannot cache compiled component: {e}");
        }
        Ok(component)
    }
}

/// Pre-links `component` and finds its exports.
fn link(linker: &Linker<State>, component: &Component) -> Result<Linked, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("cannot link (imports outside the policy world?): {e:#}"))?;
    let pre =
        PolicyPre::new(pre).map_err(|e| format!("exports do not match the policy world: {e:#}"))?;
    let export = |name: &str| {
        component
            .get_export_index(None, name)
            .ok_or_else(|| format!("missing export {name}"))
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
    /// Linked in the pooling engine.
    pooled: Linked,
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
    /// The component in the pooling engine.
    component: Component,
    linked: std::sync::OnceLock<Result<Linked, String>>,
}

impl Fallback {
    fn get(&self) -> Result<&Linked, String> {
        self.linked
            .get_or_init(|| {
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
            ctx_cache: None,
        })
    }
}

/// A live instance: its store, its bindings, and `select`/`plan` as raw
/// functions for calls over borrowed nodes.
struct Live {
    store: Store<State>,
    bindings: PolicyWorld,
    select: Func,
    plan: Func,
    evaluate: Func,
    /// Node lists go into the guest's argument arena.
    arena: bool,
}

/// A node lowered straight from the model, borrowing its strings.
#[derive(ComponentType, Lower)]
#[component(record)]
struct NodeRef<'a> {
    id: &'a str,
    version: &'a str,
    labels: &'a [(String, String)],
    attributes: &'a [(String, String)],
    #[component(name = "asset-path")]
    asset_path: &'a str,
    healthy: bool,
    schedulable: bool,
    online: bool,
    #[component(name = "last-seen")]
    last_seen: u64,
}

impl<'a> From<&'a model::Node> for NodeRef<'a> {
    fn from(n: &'a model::Node) -> Self {
        NodeRef {
            id: &n.id,
            version: &n.version,
            labels: &n.labels,
            attributes: &n.attributes,
            asset_path: &n.asset_path,
            healthy: n.healthy,
            schedulable: n.schedulable,
            online: n.online,
            last_seen: n.last_seen,
        }
    }
}

/// `list<node>` lowered by hand, straight from the model.
///
/// Wasmtime's generic lowering of a record list looks up the guest memory for
/// every field it writes (two lookups per string on top of its allocation),
/// which made lowering most of what a million-node `select` cost. This writes
/// each chunk's records into a local buffer and copies it in once; strings and
/// lists are still allocated one by one through the guest's `cabi_realloc`,
/// as the canonical ABI requires (the guest owns and frees each). The type is
/// checked as `list<NodeRef>` (the derived record), and the field layout is
/// the canonical ABI's for the same fields (tested against the derived one).
/// Guests that want strings in another encoding than UTF-8 get the generic
/// lowering.
struct NodeList<'a> {
    nodes: &'a [model::Node],
    /// The component serves argument-arena requests (see [`args_arena`]):
    /// the whole list goes into one allocation.
    arena: bool,
    /// Where [`CtxArg`] already reserved that allocation (one request for
    /// both), [`NOT_RESERVED`] until then.
    reserved: Option<&'a AtomicUsize>,
}

/// The task context of a `select` or `plan` call: lowered by wasmtime, or,
/// for a component with an argument arena, by hand with its strings in one
/// arena block (a warm one-node call is mostly allocations otherwise).
struct CtxArg<'a> {
    ctx: &'a wit::TaskContext,
    arena: bool,
    /// The node list lowered after it: its arena block is asked for together
    /// with the context's, and its address left in the cell.
    nodes: Option<(&'a [model::Node], &'a AtomicUsize)>,
}

/// No arena block reserved for a node list (yet).
const NOT_RESERVED: usize = usize::MAX;

mod lower {
    use super::{CtxArg, NodeList, NodeRef, wit};
    use std::mem::MaybeUninit;
    use std::sync::atomic::Ordering;
    use wasmtime::ValRaw;
    use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
    use wasmtime::component::__internal::wasmtime_environ::component::VariantInfo;
    use wasmtime::component::__internal::{
        CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
    };
    use wasmtime::component::{ComponentType, Lower};

    /// The fields of `node`, in order: id, version, labels, attributes,
    /// asset-path, healthy, schedulable, online, last-seen.
    pub(super) const NODE_FIELDS: [CanonicalAbiInfo; 9] = [
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::SCALAR1,
        CanonicalAbiInfo::SCALAR1,
        CanonicalAbiInfo::SCALAR1,
        CanonicalAbiInfo::SCALAR8,
    ];
    pub(super) const NODE: CanonicalAbiInfo = CanonicalAbiInfo::record_static(&NODE_FIELDS);
    /// `tuple<string, string>`.
    const PAIR: CanonicalAbiInfo = CanonicalAbiInfo::record_static(&[
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
    ]);
    const MAX_STRING: usize = (1 << 31) - 1;

    type Generic<'a> = [NodeRef<'a>];

    // SAFETY: the same type, ABI and flat representation as `[NodeRef]`
    // (a `list<node>`); `typecheck` is that type's.
    unsafe impl ComponentType for NodeList<'_> {
        type Lower = <Generic<'static> as ComponentType>::Lower;
        const ABI: CanonicalAbiInfo = <Generic<'static> as ComponentType>::ABI;

        fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
            <Generic<'static> as ComponentType>::typecheck(ty, types)
        }
    }

    // SAFETY: writes a pointer pair to a list of `NODE` records laid out by
    // the canonical ABI, every pointer returned by the guest's realloc.
    unsafe impl Lower for NodeList<'_> {
        fn linear_lower_to_flat<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            dst: &mut MaybeUninit<Self::Lower>,
        ) -> wasmtime::Result<()> {
            if cx.options().string_encoding != StringEncoding::Utf8 {
                let refs: Vec<NodeRef<'_>> = self.nodes.iter().map(NodeRef::from).collect();
                return refs.as_slice().linear_lower_to_flat(cx, ty, dst);
            }
            let (ptr, len) = self.lower(cx)?;
            // Both as 64-bit values, as wasmtime lowers every pointer pair.
            let pair = [ValRaw::i64(ptr as i64), ValRaw::i64(len as i64)];
            dst.write(pair);
            Ok(())
        }

        fn linear_lower_to_memory<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            offset: usize,
        ) -> wasmtime::Result<()> {
            if cx.options().string_encoding != StringEncoding::Utf8 {
                let refs: Vec<NodeRef<'_>> = self.nodes.iter().map(NodeRef::from).collect();
                return refs.as_slice().linear_lower_to_memory(cx, ty, offset);
            }
            let (ptr, len) = self.lower(cx)?;
            *cx.get::<8>(offset) = pointer_pair(ptr, len)?;
            Ok(())
        }
    }

    impl NodeList<'_> {
        fn lower<T>(&self, cx: &mut LowerContext<'_, T>) -> wasmtime::Result<(usize, usize)> {
            if self.arena {
                let reserved = self
                    .reserved
                    .map(|r| r.swap(super::NOT_RESERVED, Ordering::Relaxed))
                    .filter(|r| *r != super::NOT_RESERVED);
                lower_nodes_arena(cx, self.nodes, reserved)
            } else {
                lower_nodes(cx, self.nodes)
            }
        }
    }

    /// The fields of `task-context`, in order: task-id, name, package,
    /// target-version, source-versions, strategy, method, concurrency, backup,
    /// permanent, params.
    pub(super) const CTX_FIELDS: [CanonicalAbiInfo; 11] = [
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::POINTER_PAIR,
        CanonicalAbiInfo::enum_(2),
        CanonicalAbiInfo::enum_(2),
        CanonicalAbiInfo::SCALAR4,
        CanonicalAbiInfo::variant_static(BACKUP_CASES),
        CanonicalAbiInfo::SCALAR1,
        CanonicalAbiInfo::POINTER_PAIR,
    ];
    pub(super) const CTX: CanonicalAbiInfo = CanonicalAbiInfo::record_static(&CTX_FIELDS);
    /// `backup`: agent-default, location(string), none.
    const BACKUP_CASES: &[Option<CanonicalAbiInfo>] =
        &[None, Some(CanonicalAbiInfo::POINTER_PAIR), None];
    const BACKUP: VariantInfo = VariantInfo::new_static(BACKUP_CASES);

    type GenericCtx = wit::TaskContext;

    // SAFETY: the same type, ABI and flat representation as `task-context`.
    unsafe impl ComponentType for CtxArg<'_> {
        type Lower = <GenericCtx as ComponentType>::Lower;
        const ABI: CanonicalAbiInfo = <GenericCtx as ComponentType>::ABI;

        fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
            <GenericCtx as ComponentType>::typecheck(ty, types)
        }
    }

    // SAFETY: the generic lowering, or a `task-context` record laid out by the
    // canonical ABI (checked against the generic layout in a test) whose
    // pointers are into one arena block returned by the guest's realloc.
    unsafe impl Lower for CtxArg<'_> {
        fn linear_lower_to_flat<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            dst: &mut MaybeUninit<Self::Lower>,
        ) -> wasmtime::Result<()> {
            self.ctx.linear_lower_to_flat(cx, ty, dst)
        }

        fn linear_lower_to_memory<T>(
            &self,
            cx: &mut LowerContext<'_, T>,
            ty: InterfaceType,
            offset: usize,
        ) -> wasmtime::Result<()> {
            if !self.arena || cx.options().string_encoding != StringEncoding::Utf8 {
                return self.ctx.linear_lower_to_memory(cx, ty, offset);
            }
            let c = self.ctx;
            let location = match &c.backup {
                wit::Backup::Location(l) => Some(l.as_str()),
                _ => None,
            };
            let strings = [
                c.task_id.as_str(),
                &c.name,
                &c.package,
                &c.target_version,
                &c.params,
            ];
            let list = c.source_versions.len() * 8;
            let text: usize = strings.iter().map(|s| s.len()).sum::<usize>()
                + c.source_versions.iter().map(String::len).sum::<usize>()
                + location.map_or(0, str::len);
            let total = list
                .checked_add(text)
                .filter(|t| *t <= MAX_STRING)
                .ok_or_else(|| wasmtime::format_err!("task context too large"))?;
            // The node list's block first (8-aligned), then the context's.
            let nodes = match self.nodes {
                Some((nodes, _)) => nodes_arena_size(nodes)?.2.next_multiple_of(4),
                None => 0,
            };
            let both = nodes
                .checked_add(total)
                .filter(|t| *t <= MAX_STRING)
                .ok_or_else(|| wasmtime::format_err!("arguments too large"))?;
            let start = cx.realloc(0, super::ARENA_REQUEST, NODE.align32, both)?;
            if let Some((_, reserved)) = self.nodes {
                reserved.store(start, Ordering::Relaxed);
            }
            let base = start + nodes;
            let mut offsets = [0usize; 11];
            let mut at = 0usize;
            for (o, f) in offsets.iter_mut().zip(&CTX_FIELDS) {
                *o = f.next_field32_size(&mut at);
            }
            let mut rec = [0u8; CTX.size32 as usize];
            let mem = cx.as_slice_mut();
            let block = mem
                .get_mut(base..base + total)
                .ok_or_else(|| wasmtime::format_err!("realloc return: beyond end of memory"))?;
            let (list_buf, text_buf) = block.split_at_mut(list);
            let mut text_at = 0usize;
            let mut put = |s: &str| -> [u8; 8] {
                let at = text_at;
                text_buf[at..at + s.len()].copy_from_slice(s.as_bytes());
                text_at += s.len();
                pair_bytes(base + list + at, s.len())
            };
            let [
                id,
                name,
                package,
                target,
                sources,
                strategy,
                method,
                conc,
                backup,
                perm,
                params,
            ] = offsets;
            rec[id..id + 8].copy_from_slice(&put(&c.task_id));
            rec[name..name + 8].copy_from_slice(&put(&c.name));
            rec[package..package + 8].copy_from_slice(&put(&c.package));
            rec[target..target + 8].copy_from_slice(&put(&c.target_version));
            for (slot, v) in list_buf.chunks_exact_mut(8).zip(&c.source_versions) {
                slot.copy_from_slice(&put(v));
            }
            rec[sources..sources + 8].copy_from_slice(&pair_bytes(base, c.source_versions.len()));
            rec[strategy] = match c.strategy {
                wit::Strategy::Snapshot => 0,
                wit::Strategy::Increment => 1,
            };
            rec[method] = match c.method {
                wit::DeliveryMethod::Push => 0,
                wit::DeliveryMethod::Pull => 1,
            };
            rec[conc..conc + 4].copy_from_slice(&c.concurrency.to_le_bytes());
            rec[backup] = match c.backup {
                wit::Backup::AgentDefault => 0,
                wit::Backup::Location(_) => 1,
                wit::Backup::None => 2,
            };
            if let Some(l) = location {
                let payload = backup + BACKUP.payload_offset32 as usize;
                rec[payload..payload + 8].copy_from_slice(&put(l));
            }
            rec[perm] = u8::from(c.permanent);
            rec[params..params + 8].copy_from_slice(&put(&c.params));
            mem.get_mut(offset..offset + rec.len())
                .ok_or_else(|| wasmtime::format_err!("task context beyond end of memory"))?
                .copy_from_slice(&rec);
            Ok(())
        }
    }

    fn pointer_pair(ptr: usize, len: usize) -> wasmtime::Result<[u8; 8]> {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&u32::try_from(ptr)?.to_le_bytes());
        out[4..].copy_from_slice(&u32::try_from(len)?.to_le_bytes());
        Ok(out)
    }

    /// Copies `bytes` into a fresh guest allocation; its pointer pair.
    fn string<T>(cx: &mut LowerContext<'_, T>, s: &str) -> wasmtime::Result<[u8; 8]> {
        if s.len() > MAX_STRING {
            wasmtime::bail!("string length of {} too large to copy into wasm", s.len());
        }
        let ptr = cx.realloc(0, 0, 1, s.len())?;
        cx.as_slice_mut()
            .get_mut(ptr..ptr + s.len())
            .ok_or_else(|| wasmtime::format_err!("realloc return: beyond end of memory"))?
            .copy_from_slice(s.as_bytes());
        pointer_pair(ptr, s.len())
    }

    /// A `list<tuple<string, string>>`; its pointer pair.
    fn pairs<T>(
        cx: &mut LowerContext<'_, T>,
        pairs: &[(String, String)],
    ) -> wasmtime::Result<[u8; 8]> {
        let size = PAIR.size32 as usize;
        let ptr = cx.realloc(0, 0, PAIR.align32, pairs.len() * size)?;
        let mut buf = vec![0u8; pairs.len() * size];
        for (slot, (k, v)) in buf.chunks_exact_mut(size).zip(pairs) {
            slot[..8].copy_from_slice(&string(cx, k)?);
            slot[8..16].copy_from_slice(&string(cx, v)?);
        }
        copy_in(cx, ptr, &buf)?;
        pointer_pair(ptr, pairs.len())
    }

    fn copy_in<T>(cx: &mut LowerContext<'_, T>, ptr: usize, buf: &[u8]) -> wasmtime::Result<()> {
        cx.as_slice_mut()
            .get_mut(ptr..ptr + buf.len())
            .ok_or_else(|| wasmtime::format_err!("realloc return: beyond end of memory"))?
            .copy_from_slice(buf);
        Ok(())
    }

    /// Offsets of the fields of a `node` record.
    fn node_offsets() -> [usize; 9] {
        let mut offsets = [0usize; 9];
        let mut at = 0usize;
        for (o, f) in offsets.iter_mut().zip(&NODE_FIELDS) {
            *o = f.next_field32_size(&mut at);
        }
        offsets
    }

    /// The records of `nodes`, their label and attribute lists and every
    /// string, in one block of the guest's argument arena (one call into the
    /// guest instead of one per string): `[records][pair lists][string bytes]`.
    /// The guest owns each value as a sub-block it never frees one by one
    /// (see `flotilla_sdk::arena`).
    fn lower_nodes_arena<T>(
        cx: &mut LowerContext<'_, T>,
        nodes: &[flotilla_model::Node],
        reserved: Option<usize>,
    ) -> wasmtime::Result<(usize, usize)> {
        let node_size = NODE.size32 as usize;
        let pair_size = PAIR.size32 as usize;
        let (records, lists, total) = nodes_arena_size(nodes)?;
        let base = match reserved {
            Some(base) => base,
            None => cx.realloc(0, super::ARENA_REQUEST, NODE.align32, total)?,
        };
        let block = cx
            .as_slice_mut()
            .get_mut(base..base + total)
            .ok_or_else(|| wasmtime::format_err!("realloc return: beyond end of memory"))?;
        let (recs, rest) = block.split_at_mut(records);
        let (lists_buf, text_buf) = rest.split_at_mut(lists);
        // Guest addresses of the next pair record and the next string byte.
        let mut list_at = 0usize;
        let mut text_at = 0usize;
        let mut put = |s: &str, text_at: &mut usize| -> [u8; 8] {
            let at = *text_at;
            text_buf[at..at + s.len()].copy_from_slice(s.as_bytes());
            *text_at += s.len();
            pair_bytes(base + records + lists + at, s.len())
        };
        let [
            id,
            version,
            labels,
            attrs,
            asset,
            healthy,
            schedulable,
            online,
            seen,
        ] = node_offsets();
        for (rec, n) in recs.chunks_exact_mut(node_size).zip(nodes) {
            rec[id..id + 8].copy_from_slice(&put(&n.id, &mut text_at));
            rec[version..version + 8].copy_from_slice(&put(&n.version, &mut text_at));
            for (field, list) in [(labels, &n.labels), (attrs, &n.attributes)] {
                rec[field..field + 8]
                    .copy_from_slice(&pair_bytes(base + records + list_at, list.len()));
                for (k, v) in list {
                    let slot = &mut lists_buf[list_at..list_at + pair_size];
                    slot[..8].copy_from_slice(&put(k, &mut text_at));
                    slot[8..16].copy_from_slice(&put(v, &mut text_at));
                    list_at += pair_size;
                }
            }
            rec[asset..asset + 8].copy_from_slice(&put(&n.asset_path, &mut text_at));
            rec[healthy] = u8::from(n.healthy);
            rec[schedulable] = u8::from(n.schedulable);
            rec[online] = u8::from(n.online);
            rec[seen..seen + 8].copy_from_slice(&n.last_seen.to_le_bytes());
            // Padding bytes are whatever the block held: canonical lifting
            // never reads them.
        }
        Ok((base, nodes.len()))
    }

    /// Bytes of a node list in the arena: records, pair lists, in all.
    fn nodes_arena_size(nodes: &[flotilla_model::Node]) -> wasmtime::Result<(usize, usize, usize)> {
        let too_big = || wasmtime::format_err!("size overflow copying a list of nodes");
        let (mut pairs, mut text) = (0usize, 0usize);
        for n in nodes {
            pairs += n.labels.len() + n.attributes.len();
            text += n.id.len() + n.version.len() + n.asset_path.len();
            for (k, v) in n.labels.iter().chain(&n.attributes) {
                text += k.len() + v.len();
            }
        }
        let records = nodes
            .len()
            .checked_mul(NODE.size32 as usize)
            .ok_or_else(too_big)?;
        let lists = pairs
            .checked_mul(PAIR.size32 as usize)
            .ok_or_else(too_big)?;
        let total = records
            .checked_add(lists)
            .and_then(|t| t.checked_add(text))
            .filter(|t| *t <= MAX_STRING)
            .ok_or_else(too_big)?;
        Ok((records, lists, total))
    }

    /// A pointer pair already known to fit in 32 bits (inside guest memory).
    fn pair_bytes(ptr: usize, len: usize) -> [u8; 8] {
        let mut out = [0; 8];
        out[..4].copy_from_slice(&(ptr as u32).to_le_bytes());
        out[4..].copy_from_slice(&(len as u32).to_le_bytes());
        out
    }

    /// The records of `nodes` in guest memory; their pointer and count.
    fn lower_nodes<T>(
        cx: &mut LowerContext<'_, T>,
        nodes: &[flotilla_model::Node],
    ) -> wasmtime::Result<(usize, usize)> {
        let offsets = node_offsets();
        let size = NODE.size32 as usize;
        let total = nodes
            .len()
            .checked_mul(size)
            .ok_or_else(|| wasmtime::format_err!("size overflow copying a list"))?;
        let base = cx.realloc(0, 0, NODE.align32, total)?;
        let mut buf = vec![0u8; total];
        let [
            id,
            version,
            labels,
            attrs,
            asset,
            healthy,
            schedulable,
            online,
            seen,
        ] = offsets;
        for (rec, n) in buf.chunks_exact_mut(size).zip(nodes) {
            rec[id..id + 8].copy_from_slice(&string(cx, &n.id)?);
            rec[version..version + 8].copy_from_slice(&string(cx, &n.version)?);
            rec[labels..labels + 8].copy_from_slice(&pairs(cx, &n.labels)?);
            rec[attrs..attrs + 8].copy_from_slice(&pairs(cx, &n.attributes)?);
            rec[asset..asset + 8].copy_from_slice(&string(cx, &n.asset_path)?);
            rec[healthy] = u8::from(n.healthy);
            rec[schedulable] = u8::from(n.schedulable);
            rec[online] = u8::from(n.online);
            rec[seen..seen + 8].copy_from_slice(&n.last_seen.to_le_bytes());
        }
        copy_in(cx, base, &buf)?;
        Ok((base, nodes.len()))
    }
}

/// A Wasm policy bound to one task's world.
pub struct WasmPolicy {
    compiled: CompiledPolicy,
    world: World,
    limits: Limits,
    live: Option<Live>,
    /// Extra instances for spreading `select` chunks over cores.
    spare: Vec<Live>,
    workers: usize,
    ctx_cache: Option<(model::TaskContext, wit::TaskContext)>,
}

impl WasmPolicy {
    /// Creates the instance now rather than on the first call (benchmarks, `check`).
    pub fn warm(&mut self) -> Result<(), PolicyError> {
        self.live(Hook::Select).map(|_| ())
    }

    /// Drops the instances; the next call makes a new one.
    pub fn discard(&mut self) {
        self.live = None;
        self.spare.clear();
    }

    /// How many instances `select` may spread chunks over (default: the
    /// number of cores, at most 4). 1 keeps everything on the calling thread.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers.max(1);
        self.spare.truncate(self.workers - 1);
    }

    fn live(&mut self, hook: Hook) -> Result<&mut Live, PolicyError> {
        if self.live.is_none() {
            self.live = Some(self.new_live(hook)?);
        }
        Ok(self.live.as_mut().expect("instance was just created"))
    }

    /// A new instance from the pool, or from the on-demand engine when the
    /// pool has no free slot.
    fn new_live(&self, hook: Hook) -> Result<Live, PolicyError> {
        let err = |message: String| PolicyError::Trap {
            policy: self.compiled.name.clone(),
            hook,
            message: format!("cannot instantiate: {message}"),
        };
        match self.instantiate_in(&self.compiled.pooled) {
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

    fn instantiate_in(&self, linked: &Linked) -> wasmtime::Result<Live> {
        let stderr = MemoryOutputPipe::new(STDERR_CAP);
        let state = State {
            wasi: None,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_cap: self.limits.memory_bytes,
                hit_cap: false,
            },
            world: self.world.clone(),
            policy: self.compiled.name.clone(),
            stderr,
        };
        let mut store = Store::new(linked.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.ticks(0));
        let instance = linked.pre.instance_pre().instantiate(&mut store)?;
        let bindings = linked.indices.load(&mut store, &instance)?;
        let mut func = |index| {
            instance
                .get_func(&mut store, index)
                .ok_or_else(|| wasmtime::format_err!("export vanished"))
        };
        let (select, plan) = (func(&linked.select)?, func(&linked.plan)?);
        let evaluate = func(&linked.evaluate)?;
        Ok(Live {
            store,
            bindings,
            select,
            plan,
            evaluate,
            arena: self.compiled.args_arena,
        })
    }

    fn ticks(&self, nodes: usize) -> u64 {
        ticks(&self.limits, nodes)
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
        f: impl FnOnce(&mut Live) -> wasmtime::Result<R>,
    ) -> Result<R, PolicyError> {
        let ticks = self.ticks(nodes);
        let live = self.live(hook)?;
        live.store.set_epoch_deadline(ticks);
        match f(live) {
            Ok(r) => Ok(r),
            Err(e) => {
                let live = self.live.take().expect("instance is live");
                Err(self.classify(hook, nodes, &live.store, e))
            }
        }
    }

    /// Calls `select` or `plan` (same signature) on borrowed nodes.
    fn call_nodes<R: wasmtime::component::ComponentType + wasmtime::component::Lift + 'static>(
        &mut self,
        hook: Hook,
        ctx: &model::TaskContext,
        nodes: &[model::Node],
    ) -> Result<R, PolicyError> {
        self.with_ctx(ctx, |this, ctx| {
            this.call(hook, nodes.len(), |live| call_nodes(live, hook, ctx, nodes))
        })
    }

    /// The lowered context, reused while the task's context is unchanged. It is
    /// taken out of the cache for the call and put back by [`Self::with_ctx`].
    fn take_ctx(&mut self, ctx: &model::TaskContext) -> (model::TaskContext, wit::TaskContext) {
        match self.ctx_cache.take() {
            Some(cached) if cached.0 == *ctx => cached,
            _ => (ctx.clone(), wit_ctx(ctx)),
        }
    }

    fn with_ctx<R>(
        &mut self,
        ctx: &model::TaskContext,
        f: impl FnOnce(&mut Self, &wit::TaskContext) -> Result<R, PolicyError>,
    ) -> Result<R, PolicyError> {
        let cached = self.take_ctx(ctx);
        let out = f(self, &cached.1);
        self.ctx_cache = Some(cached);
        out
    }

    fn describe(&mut self) -> Result<PolicyInfo, PolicyError> {
        let info = self.call(Hook::Select, 0, |l| l.bindings.call_describe(&mut l.store))?;
        Ok(PolicyInfo {
            name: info.name,
            version: info.version,
            hooks: info.hooks.into_iter().map(hook_from).collect(),
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
        let per = chunks.len().div_ceil(self.workers.max(1)).max(1);
        let groups: Vec<&[&[model::Node]]> = chunks.chunks(per).collect();
        if groups.len() <= 1 {
            return chunks.iter().map(|c| self.call_select(ctx, c)).collect();
        }
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
                    self.new_live(Hook::Select)?
                }
            };
            lives.push(live);
        }
        let cached = self.take_ctx(ctx);
        let (name, limits) = (&self.compiled.name, self.limits);
        let wit_ctx = &cached.1;
        let results: Vec<WorkerResult> = std::thread::scope(|scope| {
            let handles: Vec<_> = lives
                .into_iter()
                .zip(groups)
                .map(|(mut live, group)| {
                    scope.spawn(move || {
                        let mut out = Vec::with_capacity(group.len());
                        for chunk in group {
                            live.store.set_epoch_deadline(ticks(&limits, chunk.len()));
                            match call_nodes::<Vec<wit::Selection>>(
                                &mut live,
                                Hook::Select,
                                wit_ctx,
                                chunk,
                            ) {
                                Ok(v) => out.push(v.into_iter().map(selection_from).collect()),
                                Err(e) => {
                                    let err = classify(
                                        name,
                                        &limits,
                                        Hook::Select,
                                        chunk.len(),
                                        &live.store,
                                        e,
                                    );
                                    return (None, Err(err));
                                }
                            }
                        }
                        (Some(live), Ok(out))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a select worker thread panicked"))
                .collect()
        });
        self.ctx_cache = Some(cached);
        let mut all = Vec::with_capacity(chunks.len());
        let mut first_err = None;
        for (live, result) in results {
            if let Some(live) = live {
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

    fn call_select(
        &mut self,
        ctx: &model::TaskContext,
        nodes: &[model::Node],
    ) -> Result<Vec<model::Selection>, PolicyError> {
        let out: Vec<wit::Selection> = self.call_nodes(Hook::Select, ctx, nodes)?;
        Ok(out.into_iter().map(selection_from).collect())
    }

    fn call_plan(
        &mut self,
        ctx: &model::TaskContext,
        nodes: &[model::Node],
    ) -> Result<Vec<model::Wave>, PolicyError> {
        let out: Vec<wit::Wave> = self.call_nodes(Hook::Plan, ctx, nodes)?;
        Ok(out
            .into_iter()
            .map(|w| model::Wave {
                name: w.name,
                nodes: w.nodes,
                concurrency: w.concurrency,
                soak_seconds: w.soak_seconds,
                needs_approval: w.needs_approval,
            })
            .collect())
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
                l.bindings.call_admit(&mut l.store, ctx, &node, now)
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
                l.bindings.call_on_request(&mut l.store, ctx, &node)
            })
        })?;
        Ok(match out {
            wit::Offer::Offer => model::Offer::Offer,
            wit::Offer::DeferUntil(t) => model::Offer::DeferUntil(t),
            wit::Offer::Decline(r) => model::Offer::Decline(r),
        })
    }
}

/// Epoch ticks for a call handed `nodes` nodes; one extra tick because the
/// current tick may be about to end.
fn ticks(limits: &Limits, nodes: usize) -> u64 {
    (limits.budget(nodes).as_micros() / TICK.as_micros()).max(1) as u64 + 1
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
    let policy = policy.to_string();
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return PolicyError::Budget {
            policy,
            hook,
            budget: format!("{} ms", limits.budget(nodes).as_millis()),
        };
    }
    if store.data().limiter.hit_cap {
        return PolicyError::Memory {
            policy,
            hook,
            cap: format!("{} MiB", limits.memory_bytes >> 20),
        };
    }
    let stderr = store.data().stderr.contents();
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    PolicyError::Trap {
        policy,
        hook,
        message: if stderr.is_empty() {
            format!("{e:#}")
        } else {
            format!("{e:#}; guest stderr: {stderr}")
        },
    }
}

/// What a `select` worker hands back: its instance (unless it failed) and its chunks' decisions.
type WorkerResult = (
    Option<Live>,
    Result<Vec<Vec<model::Selection>>, PolicyError>,
);

type NodesParams<'a> = (CtxArg<'a>, NodeList<'a>);
type EvaluateParams<'a> = (CtxArg<'a>, &'a wit::WaveReport);

/// Calls `select` or `plan` (same signature) on borrowed nodes in `live`.
fn call_nodes<R: wasmtime::component::ComponentType + wasmtime::component::Lift + 'static>(
    live: &mut Live,
    hook: Hook,
    ctx: &wit::TaskContext,
    nodes: &[model::Node],
) -> wasmtime::Result<R> {
    let func = match hook {
        Hook::Plan => live.plan,
        _ => live.select,
    };
    // SAFETY: `load_bytes` type-checked `select` against
    // `(ctx, list<node>) -> list<selection>` and `plan` against
    // `(ctx, list<node>) -> list<wave>` for this component, and callers pass the
    // matching `R`; skipping the check on every call saves microseconds.
    let f: TypedFunc<NodesParams<'_>, (R,)> = unsafe { TypedFunc::new_unchecked(func) };
    let arena = live.arena;
    let reserved = AtomicUsize::new(NOT_RESERVED);
    let args = (
        CtxArg {
            ctx,
            arena,
            nodes: Some((nodes, &reserved)),
        },
        NodeList {
            nodes,
            arena,
            reserved: Some(&reserved),
        },
    );
    Ok(f.call(&mut live.store, args)?.0)
}

/// No files, no network, no env or args, clocks stuck at zero, deterministic
/// randomness: a policy sees the world only through the policy imports.
fn locked_down_wasi(stderr: MemoryOutputPipe) -> WasiCtx {
    struct Frozen;
    impl wasmtime_wasi::HostWallClock for Frozen {
        fn resolution(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn now(&self) -> Duration {
            Duration::ZERO
        }
    }
    impl wasmtime_wasi::HostMonotonicClock for Frozen {
        fn resolution(&self) -> u64 {
            1_000_000_000
        }
        fn now(&self) -> u64 {
            0
        }
    }
    WasiCtxBuilder::new()
        .stderr(stderr)
        .wall_clock(Frozen)
        .monotonic_clock(Frozen)
        .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a; 32]))
        .insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5; 32]))
        .insecure_random_seed(0)
        .allow_ip_name_lookup(false)
        .allow_tcp(false)
        .allow_udp(false)
        .build()
}

/// Host state of one instance.
struct State {
    /// Built on the first WASI call: most policies make none, and building it
    /// is a good part of what an instantiation costs.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    limiter: Limiter,
    world: World,
    policy: String,
    stderr: MemoryOutputPipe,
}

struct Limiter {
    memory_cap: usize,
    hit_cap: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.memory_cap;
        self.hit_cap |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 16)
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let stderr = &self.stderr;
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| locked_down_wasi(stderr.clone())),
            table: &mut self.table,
        }
    }
}

impl wit::Host for State {}

impl fleet::Host for State {
    fn query(&mut self, selector: wit::Selector, offset: u64, limit: u32) -> Vec<wit::Node> {
        let limit = limit.min(model::CHUNK as u32);
        self.world
            .fleet
            .query(&selector_from(selector), offset, limit)
            .iter()
            .map(wit_node)
            .collect()
    }

    fn get(&mut self, id: String) -> Option<wit::Node> {
        self.world.fleet.get(&id).as_ref().map(wit_node)
    }

    fn count(&mut self, selector: wit::Selector) -> u64 {
        self.world.fleet.count(&selector_from(selector))
    }
}

impl delivery::Host for State {
    fn releases(&mut self, package: String) -> Vec<wit::Release> {
        self.world
            .delivery
            .releases(&package)
            .into_iter()
            .map(|r| wit::Release {
                package: r.package,
                version: r.version,
                kind: match r.kind {
                    model::ReleaseKind::Full => wit::ReleaseKind::Full,
                    model::ReleaseKind::Patch => wit::ReleaseKind::Patch,
                },
                size: r.size,
                sha256: r.sha256,
            })
            .collect()
    }

    fn control_plane_version(&mut self, component: String) -> Option<String> {
        self.world.delivery.control_plane_version(&component)
    }
}

impl status::Host for State {
    fn run(&mut self, node_id: String) -> Option<wit::NodeRun> {
        self.world.status.run(&node_id).map(|r| wit::NodeRun {
            node_id: r.node_id,
            state: r.state,
            attempts: r.attempts,
            wave: r.wave,
        })
    }

    fn summary(&mut self) -> wit::TaskSummary {
        let s = self.world.status.summary();
        wit::TaskSummary {
            total: s.total,
            skipped: s.skipped,
            pending: s.pending,
            in_flight: s.in_flight,
            succeeded: s.succeeded,
            failed: s.failed,
            failed_rolled_back: s.failed_rolled_back,
            failed_rollback_failed: s.failed_rollback_failed,
            timed_out: s.timed_out,
            unknown: s.unknown,
            rejected: s.rejected,
            rolled_back: s.rolled_back,
            cancelled: s.cancelled,
        }
    }

    fn node_history(&mut self, node_id: String, limit: u32) -> Vec<wit::Outcome> {
        self.world
            .status
            .history(&node_id, limit)
            .into_iter()
            .map(|o| wit::Outcome {
                task_id: o.task_id,
                version: o.version,
                state: o.state,
                at: o.at,
            })
            .collect()
    }

    fn metric(&mut self, node_id: String, name: String) -> Option<f64> {
        self.world.status.metric(&node_id, &name)
    }
}

impl log::Host for State {
    fn log(&mut self, level: wit::Level, message: String) {
        let policy = self.policy.as_str();
        match level {
            wit::Level::Trace => tracing::trace!(policy, "{message}"),
            wit::Level::Debug => tracing::debug!(policy, "{message}"),
            wit::Level::Info => tracing::info!(policy, "{message}"),
            wit::Level::Warn => tracing::warn!(policy, "{message}"),
            wit::Level::Error => tracing::error!(policy, "{message}"),
        }
    }
}

impl clock::Host for State {
    fn now(&mut self) -> u64 {
        self.world.clock.now()
    }
}

fn wit_node(n: &model::Node) -> wit::Node {
    wit::Node {
        id: n.id.clone(),
        version: n.version.clone(),
        labels: n.labels.clone(),
        attributes: n.attributes.clone(),
        asset_path: n.asset_path.clone(),
        healthy: n.healthy,
        schedulable: n.schedulable,
        online: n.online,
        last_seen: n.last_seen,
    }
}

fn wit_ctx(c: &model::TaskContext) -> wit::TaskContext {
    wit::TaskContext {
        task_id: c.task_id.clone(),
        name: c.name.clone(),
        package: c.package.clone(),
        target_version: c.target_version.clone(),
        source_versions: c.source_versions.clone(),
        strategy: match c.strategy {
            model::Strategy::Snapshot => wit::Strategy::Snapshot,
            model::Strategy::Increment => wit::Strategy::Increment,
        },
        method: match c.method {
            model::Method::Push => wit::DeliveryMethod::Push,
            model::Method::Pull => wit::DeliveryMethod::Pull,
        },
        concurrency: c.concurrency,
        backup: match &c.backup {
            model::Backup::Default => wit::Backup::AgentDefault,
            model::Backup::Location(l) => wit::Backup::Location(l.clone()),
            model::Backup::None => wit::Backup::None,
        },
        permanent: c.permanent,
        params: c.params.to_string(),
    }
}

fn selector_from(s: wit::Selector) -> model::Selector {
    model::Selector {
        ids: s.ids,
        labels: s.labels,
        attributes: s.attributes,
        asset_trees: s.asset_trees,
    }
}

fn selection_from(s: wit::Selection) -> model::Selection {
    match s {
        wit::Selection::Include => model::Selection::Include,
        wit::Selection::Skip(skip) => model::Selection::Skip {
            reason: match skip.reason {
                wit::SkipReason::SameVersion => model::SkipReason::SameVersion,
                wit::SkipReason::Unhealthy => model::SkipReason::Unhealthy,
                wit::SkipReason::BusyInAnotherTask => model::SkipReason::BusyInAnotherTask,
                wit::SkipReason::OutOfRange => model::SkipReason::OutOfRange,
                wit::SkipReason::Policy => model::SkipReason::Policy,
            },
            detail: skip.detail,
        },
    }
}

fn hook_from(h: wit::Hook) -> Hook {
    match h {
        wit::Hook::Select => Hook::Select,
        wit::Hook::Plan => Hook::Plan,
        wit::Hook::Admit => Hook::Admit,
        wit::Hook::Evaluate => Hook::Evaluate,
        wit::Hook::OnRequest => Hook::OnRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_lowered_nodes_have_the_derived_layout() {
        let derived = <NodeRef<'static> as ComponentType>::ABI;
        assert_eq!(lower::NODE.size32, derived.size32);
        assert_eq!(lower::NODE.align32, derived.align32);
        assert_eq!(lower::NODE.size32, 56);
        let derived = <wit::TaskContext as ComponentType>::ABI;
        assert_eq!(lower::CTX.size32, derived.size32);
        assert_eq!(lower::CTX.align32, derived.align32);
        assert_eq!(lower::CTX.size32, 72);
    }
    use crate::build::{build_component, workspace_root};
    use flotilla_model::{Node, Selection, TaskContext};

    #[test]
    fn sdk_components_get_their_nodes_in_the_argument_arena() {
        let root = workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")));
        let wasm = build_component(&root, "version-gate").expect("build version-gate");
        let bytes = std::fs::read(&wasm).unwrap();
        assert!(args_arena(&bytes), "the SDK's section is found");
        assert!(!args_arena(b"\0asm\x01\0\0\0"));
        assert!(!args_arena(&bytes[..bytes.len() / 2]) || args_arena(&bytes));
        let rt = WasmRuntime::new(None).unwrap();
        let compiled = rt.load_file(&wasm).unwrap();
        assert!(compiled.args_arena);
        let mut canonical = compiled.clone();
        canonical.args_arena = false;
        let ctx =
            TaskContext::new("1.13").with_params(serde_json::json!({ "range": ">=1.10, <2" }));
        let versions = ["1.12", "v1.13", "1.9.0", "", "garbage", "1.10.1", "1.12.3"];
        let fleet = |n: usize, wide: usize| -> Vec<Node> {
            (0..n)
                .map(|i| {
                    let mut node = Node::new(format!("n{i}"), versions[i % versions.len()]);
                    node.healthy = i % 5 != 1;
                    node.labels = (0..i % 4)
                        .map(|j| (format!("k{j}"), "v".repeat(j * wide)))
                        .collect();
                    node.attributes = vec![("model".into(), format!("m{i}"))];
                    node.asset_path = if i % 3 == 0 {
                        String::new()
                    } else {
                        "/a/b".into()
                    };
                    node
                })
                .collect()
        };
        let mut arena = compiled
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        let mut plain = canonical
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        arena.set_workers(1);
        plain.set_workers(1);
        // Chunks of growing and shrinking size (the arena grows, is reused, is
        // given back), with long strings that outgrow a block in a call.
        // The last but one needs a block over the 8 MiB the SDK keeps between calls.
        let sizes = [
            (1, 1),
            (0, 1),
            (4096, 1),
            (10, 5000),
            (9000, 300),
            (4096, 2000),
            (3, 1),
        ];
        for (n, wide) in sizes {
            let nodes = fleet(n, wide);
            let want = plain.select(&ctx, &nodes).unwrap();
            assert_eq!(arena.select(&ctx, &nodes).unwrap(), want, "{n} nodes");
            assert_eq!(want.len(), n);
        }
        // Every field as the guest sees it: `echo` returns each node's `{:?}`.
        let echo = build_component(&root, "misbehave").expect("build misbehave");
        let compiled = rt.load_file(&echo).unwrap();
        assert!(compiled.args_arena);
        let mut canonical = compiled.clone();
        canonical.args_arena = false;
        let mut arena = compiled
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        let mut plain = canonical
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        let mut ctx = TaskContext::new("1").with_params(serde_json::json!({ "mode": "echo" }));
        ctx.task_id = "t-1".into();
        ctx.source_versions = vec!["1.0".into(), "1.1".into()];
        ctx.backup = model::Backup::Location("/backups".into());
        ctx.method = model::Method::Pull;
        ctx.concurrency = 7;
        for (n, wide) in sizes {
            let mut nodes = fleet(n, wide);
            for (i, node) in nodes.iter_mut().enumerate() {
                node.last_seen = i as u64 * 7919;
                node.online = i % 2 == 0;
                node.schedulable = i % 3 != 0;
            }
            let got = arena.select(&ctx, &nodes).unwrap();
            assert_eq!(got, plain.select(&ctx, &nodes).unwrap(), "{n} nodes");
            if let Some(Selection::Skip { detail, .. }) = got.first() {
                for part in [
                    "task-id: \"t-1\"",
                    "source-versions: [\"1.0\", \"1.1\"]",
                    "Location(\"/backups\")",
                    "concurrency: 7",
                    "params: \"{\\\"mode\\\":\\\"echo\\\"}\"",
                ] {
                    assert!(detail.contains(part), "{part} in {detail}");
                }
                assert!(detail.to_lowercase().contains("pull"), "{detail}");
            }
            for (node, sel) in nodes.iter().zip(&got) {
                let Selection::Skip { detail, .. } = sel else {
                    panic!("echo skips: {sel:?}")
                };
                assert!(detail.contains(&format!("id: {:?}", node.id)), "{detail}");
                assert!(
                    detail.contains(&format!("last-seen: {}", node.last_seen)),
                    "{detail}"
                );
                if let Some((k, v)) = node.labels.last() {
                    assert!(detail.contains(&format!("({k:?}, {v:?})")), "{detail}");
                }
            }
        }
        // `evaluate` reads its context from the arena too.
        let report = model::WaveReport::default();
        assert_eq!(
            arena.evaluate(&ctx, &report).unwrap(),
            model::Verdict::Proceed
        );
        let ctx = ctx.with_params(serde_json::json!({ "mode": "empty-reason" }));
        assert!(matches!(
            arena.evaluate(&ctx, &report),
            Err(PolicyError::Invalid { .. })
        ));
        assert!(matches!(
            plain.evaluate(&ctx, &report),
            Err(PolicyError::Invalid { .. })
        ));
    }

    #[test]
    fn a_full_pool_falls_back_to_on_demand_instances() {
        let root = workspace_root(Path::new(env!("CARGO_MANIFEST_DIR")));
        let wasm = build_component(&root, "version-gate").expect("build version-gate");
        let rt = WasmRuntime::with_pool(None, 2).unwrap();
        let compiled = rt.load_file(&wasm).unwrap();
        let ctx = TaskContext::new("2.0.0");
        let nodes = [Node::new("a", "1.0.0"), Node::new("b", "2.0.0")];
        // Twice the pool's slots held at once: the rest come from the fallback engine.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut p = compiled
                .instantiate(World::empty(), Limits::default())
                .unwrap();
            p.warm().unwrap();
            let out = p.select(&ctx, &nodes).unwrap();
            assert_eq!(out[0], Selection::Include);
            assert!(matches!(out[1], Selection::Skip { .. }));
            held.push(p);
        }
        // Fallback instances keep the memory cap and the CPU budget.
        let limits = Limits {
            memory_bytes: 64 << 10,
            ..Limits::default()
        };
        let mut small = compiled.instantiate(World::empty(), limits).unwrap();
        assert!(matches!(
            small.warm().unwrap_err(),
            PolicyError::Trap { .. } | PolicyError::Memory { .. }
        ));
        drop(held);
        // Slots are returned: pooled instances again.
        let mut p = compiled
            .instantiate(World::empty(), Limits::default())
            .unwrap();
        assert_eq!(p.select(&ctx, &nodes).unwrap().len(), 2);
    }
}
