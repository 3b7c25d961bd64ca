//! Lowering node lists and task contexts by hand, straight from the model.
//!
//! The only module built on wasmtime's doc-hidden `component::__internal`
//! (no stability guarantee; wasmtime is pinned exactly in Cargo.toml). Its
//! layouts are tested against wasmtime's derived ones.

use super::wit;
use flotilla_model as model;
use std::mem::MaybeUninit;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use wasmtime::ValRaw;
use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::wasmtime_environ::component::VariantInfo;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};

/// The `old_len` that, with a null `old_ptr`, asks the guest's `cabi_realloc`
/// for a block of its argument arena (the SDK's `arena::ARENA_REQUEST`).
pub(super) const ARENA_REQUEST: usize = 0x464C_4F54;

/// A node lowered straight from the model, borrowing its strings.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(super) struct NodeRef<'a> {
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

/// Lower node lists with wasmtime's derived lowering instead of by hand: for
/// the benchmark that measures what the hand lowering saves (it is kept only
/// while the derived one misses the budgets). Process-wide.
static DERIVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[doc(hidden)]
pub fn use_derived_lowering(on: bool) {
    DERIVED.store(on, Ordering::Relaxed);
}

fn derived<T>(cx: &LowerContext<'_, T>) -> bool {
    cx.options().string_encoding != StringEncoding::Utf8 || DERIVED.load(Ordering::Relaxed)
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
pub(super) struct NodeList<'a> {
    pub(super) nodes: &'a [model::Node],
    /// The component serves argument-arena requests (see [`args_arena`]):
    /// the whole list goes into one allocation.
    pub(super) arena: bool,
    /// Where [`CtxArg`] already reserved that allocation (one request for
    /// both), [`NOT_RESERVED`] until then.
    pub(super) reserved: Option<&'a AtomicUsize>,
}

/// The task context of a `select` or `plan` call: lowered by wasmtime, or,
/// for a component with an argument arena, by hand with its strings in one
/// arena block (a warm one-node call is mostly allocations otherwise).
pub(super) struct CtxArg<'a> {
    pub(super) ctx: &'a wit::TaskContext,
    pub(super) arena: bool,
    /// The node list lowered after it: its arena block is asked for together
    /// with the context's, and its address left in the cell.
    pub(super) nodes: Option<(&'a [model::Node], &'a AtomicUsize)>,
}

/// No arena block reserved for a node list (yet).
pub(super) const NOT_RESERVED: usize = usize::MAX;

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
        if derived(cx) {
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
        if derived(cx) {
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
/// permanent, params, retries-failed, retries-timed-out.
pub(super) const CTX_FIELDS: [CanonicalAbiInfo; 13] = [
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
    CanonicalAbiInfo::SCALAR4,
    CanonicalAbiInfo::SCALAR4,
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
        let start = cx.realloc(0, ARENA_REQUEST, NODE.align32, both)?;
        if let Some((_, reserved)) = self.nodes {
            reserved.store(start, Ordering::Relaxed);
        }
        let base = start + nodes;
        let mut offsets = [0usize; 13];
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
            retries_failed,
            retries_timed_out,
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
        rec[retries_failed..retries_failed + 4].copy_from_slice(&c.retries_failed.to_le_bytes());
        rec[retries_timed_out..retries_timed_out + 4]
            .copy_from_slice(&c.retries_timed_out.to_le_bytes());
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
fn pairs<T>(cx: &mut LowerContext<'_, T>, pairs: &[(String, String)]) -> wasmtime::Result<[u8; 8]> {
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
        None => cx.realloc(0, ARENA_REQUEST, NODE.align32, total)?,
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
