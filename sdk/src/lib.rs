//! Write Flotilla rollout policies in Rust.
//!
//! Implement [`Policy`] for a type, overriding only the hooks you care about, and
//! put `#[flotilla_sdk::policy]` on the impl. Build with
//! `cargo build --target wasm32-wasip2` and hand the `.wasm` to the runner.
//!
//! ```ignore
//! use flotilla_sdk::*;
//!
//! struct OnlyHealthy;
//!
//! #[flotilla_sdk::policy]
//! impl Policy for OnlyHealthy {
//!     fn select(_ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
//!         nodes.iter().map(|n| if n.healthy { Selection::Include } else {
//!             Selection::skip(SkipReason::Unhealthy, "node is unhealthy")
//!         }).collect()
//!     }
//! }
//! ```
//!
//! The attribute records which hooks the impl defines; the runner applies its
//! documented default for the others without calling the component (the
//! defaults below are the same, for local use).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "::flotilla_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::flotilla::policy::types::{
    Admission, Backup, DeliveryMethod, Hook, Level, Node, NodeRun, Offer, Outcome, PlanCalls,
    PolicyInfo, Release, ReleaseKind, Selection, Selector, Skip, SkipReason, Strategy, TaskContext,
    TaskSummary, Verdict, Wave, WaveReport,
};
pub use flotilla_sdk_macros::policy;
pub use flotilla_version as version;
pub use semver;
pub use serde_json;

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub mod arena;
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub mod testing;

/// Largest number of nodes the runner hands to `select` in one call.
pub const CHUNK: usize = 4096;

/// The task a hook runs for, with its parameters parsed.
pub struct Context {
    pub task: TaskContext,
    params: Rc<serde_json::Value>,
}

impl Context {
    /// Parses `task.params` (a JSON object; `{}` when the task gave none).
    pub fn new(task: TaskContext) -> Self {
        thread_local! {
            // Hooks are called many times with the same task: parse its params once.
            static LAST: RefCell<Option<(String, Rc<serde_json::Value>)>> = const { RefCell::new(None) };
        }
        let params = LAST.with(|last| {
            let mut last = last.borrow_mut();
            match &*last {
                Some((raw, parsed)) if *raw == task.params => parsed.clone(),
                _ => {
                    let parsed = Rc::new(
                        serde_json::from_str(&task.params)
                            .unwrap_or(serde_json::Value::Object(Default::default())),
                    );
                    *last = Some((task.params.clone(), parsed.clone()));
                    parsed
                }
            }
        });
        Context { task, params }
    }

    /// `derive(ctx)`, computed once per task context and remembered: for what
    /// a hook works out from the context alone (a parsed range, a threshold)
    /// before looking at any node. `derive` must be a pure function of the
    /// context; its result is reused while the context stays the same, keyed
    /// by the closure's type (one memo per call site), so no state from
    /// earlier calls leaks into a decision. A panic in `derive` remembers
    /// nothing.
    pub fn derive<T: 'static, F: FnOnce(&Context) -> T + 'static>(&self, derive: F) -> Rc<T> {
        type Memo = HashMap<TypeId, (TaskContext, Rc<dyn Any>)>;
        thread_local! {
            static MEMO: RefCell<Memo> = RefCell::new(HashMap::new());
        }
        let key = TypeId::of::<F>();
        let hit = MEMO.with(|m| {
            m.borrow()
                .get(&key)
                .filter(|(task, _)| *task == self.task)
                .and_then(|(_, v)| v.clone().downcast::<T>().ok())
        });
        if let Some(hit) = hit {
            return hit;
        }
        let value = Rc::new(derive(self));
        let stored: Rc<dyn Any> = value.clone();
        MEMO.with(|m| m.borrow_mut().insert(key, (self.task.clone(), stored)));
        value
    }

    /// All parameters.
    pub fn params(&self) -> &serde_json::Value {
        &self.params
    }

    /// One parameter, deserialized; `None` when absent.
    ///
    /// # Panics
    /// When present but of the wrong type: the call traps, and the runner
    /// pauses the task with this message.
    pub fn param<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let v = self.params.get(key)?;
        match serde_json::from_value(v.clone()) {
            Ok(t) => Some(t),
            Err(e) => panic!("param {key}: {e} (got {v})"),
        }
    }

    /// One parameter or a default.
    pub fn param_or<T: serde::de::DeserializeOwned>(&self, key: &str, default: T) -> T {
        self.param(key).unwrap_or(default)
    }

    /// The target version, parsed leniently (`v1.13` is 1.13.0).
    pub fn target(&self) -> Option<semver::Version> {
        version::parse(&self.task.target_version).ok()
    }
}

impl std::ops::Deref for Context {
    type Target = TaskContext;
    fn deref(&self) -> &TaskContext {
        &self.task
    }
}

impl Node {
    /// The node's version, parsed leniently.
    pub fn semver(&self) -> Option<semver::Version> {
        version::parse(&self.version).ok()
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Selection {
    pub fn skip(reason: SkipReason, detail: impl Into<String>) -> Self {
        Selection::Skip(Skip {
            reason,
            detail: detail.into(),
        })
    }
}

impl WaveReport {
    /// Nodes of this wave that failed in any way.
    pub fn failed(&self) -> u32 {
        self.failed_rolled_back
            + self.failed_rollback_failed
            + self.timed_out
            + self.unknown
            + self.rejected
    }

    /// Nodes of this wave that reached a final state.
    pub fn finished(&self) -> u32 {
        self.succeeded + self.failed()
    }
}

/// A rollout policy. Every hook has the runner's default; override what you need
/// and mark the impl with `#[flotilla_sdk::policy]`.
pub trait Policy {
    /// One decision per node, in the order given. Default: include every node.
    fn select(ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        let _ = ctx;
        vec![Selection::Include; nodes.len()]
    }

    /// Waves over the selected nodes. Default: one wave "all", task concurrency.
    fn plan(ctx: &Context, nodes: &[Node]) -> Vec<Wave> {
        if nodes.is_empty() {
            return Vec::new();
        }
        vec![Wave {
            name: "all".into(),
            nodes: nodes.iter().map(|n| n.id.clone()).collect(),
            concurrency: ctx.concurrency,
            soak_seconds: 0,
            needs_approval: false,
        }]
    }

    /// May this node start at `now` (Unix ms)? Default: now.
    fn admit(ctx: &Context, node: &Node, now: u64) -> Admission {
        let _ = (ctx, node, now);
        Admission::Now
    }

    /// After each wave. Default: proceed when nothing failed, else pause.
    fn evaluate(ctx: &Context, report: &WaveReport) -> Verdict {
        let _ = ctx;
        match report.failed() {
            0 => Verdict::Proceed,
            n => Verdict::Pause(format!(
                "{n} of {} nodes failed in wave {}",
                report.total,
                report.wave + 1
            )),
        }
    }

    /// Pull mode: does this device get the package now? Default: offer.
    fn on_request(ctx: &Context, node: &Node) -> Offer {
        let _ = (ctx, node);
        Offer::Offer
    }
}

/// Name, version and implemented hooks; written by `#[flotilla_sdk::policy]`.
#[doc(hidden)]
pub trait Describe {
    const NAME: &'static str;
    const VERSION: &'static str;
    const HOOKS: &'static [Hook];
}

/// Host functions: the world as the runner shows it to the policy.
pub mod host {
    use super::bindings::flotilla::policy as imports;
    pub use imports::types::{Node, NodeRun, Outcome, Release, Selector, TaskSummary};

    // The type is generated by wit-bindgen, which cannot derive `Default` for
    // this record alone.
    #[allow(clippy::derivable_impls)]
    impl Default for Selector {
        fn default() -> Self {
            Selector {
                ids: Vec::new(),
                labels: Vec::new(),
                attributes: Vec::new(),
                asset_trees: Vec::new(),
            }
        }
    }

    /// Every node matching `selector`, fetched page by page.
    pub fn query_all(selector: &Selector) -> Vec<Node> {
        let mut out = Vec::new();
        loop {
            let page = imports::fleet::query(selector, out.len() as u64, super::CHUNK as u32);
            let done = page.len() < super::CHUNK;
            out.extend(page);
            if done {
                return out;
            }
        }
    }

    pub use imports::calendar::{LocalDateTime, local_time, window_next_open, window_open};
    pub use imports::clock::now;
    pub use imports::delivery::{control_plane_version, releases};
    pub use imports::fleet::{count, get, query};
    pub use imports::status::{metric, node_history, run, summary};

    /// Logs through the runner's tracing, tagged with the policy name.
    pub fn log(level: super::Level, message: &str) {
        imports::log::log(level, message)
    }
}

/// `plan` over chunks: keeps a copy of each chunk's nodes (out of the
/// argument arena) until the last one, then calls `plan` on all of them.
/// Used by the export glue.
#[doc(hidden)]
pub fn __plan_chunk(
    ctx: TaskContext,
    nodes: &[Node],
    offset: u32,
    total: u32,
    plan: impl FnOnce(&Context, &[Node]) -> Vec<Wave>,
) -> Vec<Wave> {
    thread_local! {
        static NODES: RefCell<Vec<Node>> = const { RefCell::new(Vec::new()) };
    }
    let last = u64::from(offset) + nodes.len() as u64 >= u64::from(total);
    if offset == 0 && last {
        // One chunk: no copy.
        NODES.with(|n| *n.borrow_mut() = Vec::new());
        return plan(&Context::new(ctx), nodes);
    }
    NODES.with(|n| {
        let mut kept = n.borrow_mut();
        if offset == 0 {
            kept.clear();
            kept.reserve_exact(total as usize);
        }
        kept.extend(nodes.iter().cloned());
    });
    if !last {
        return Vec::new();
    }
    let all = NODES.with(|n| std::mem::take(&mut *n.borrow_mut()));
    plan(&Context::new(ctx), &all)
}

/// Glue between a [`Policy`] and the generated `Guest` trait; used by the macro.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_policy {
    ($ty:ty) => {
        const _: () = {
            struct __FlotillaGlue;
            impl $crate::bindings::exports::flotilla::policy::hooks::Guest for __FlotillaGlue {
                fn describe() -> $crate::PolicyInfo {
                    $crate::PolicyInfo {
                        name: <$ty as $crate::Describe>::NAME.into(),
                        version: <$ty as $crate::Describe>::VERSION.into(),
                        hooks: <$ty as $crate::Describe>::HOOKS.to_vec(),
                        // The glue keeps every chunk and calls the policy's
                        // `plan` on the last one: the calls are in order.
                        plan_calls: $crate::PlanCalls::InOrder,
                    }
                }
                // Each hook drops its arguments, then frees the argument
                // arena for the next call (see `flotilla_sdk::arena`).
                fn select(
                    ctx: $crate::TaskContext,
                    nodes: ::std::vec::Vec<$crate::Node>,
                ) -> ::std::vec::Vec<$crate::Selection> {
                    let out = <$ty as $crate::Policy>::select(&$crate::Context::new(ctx), &nodes);
                    ::std::mem::drop(nodes);
                    $crate::arena::reset();
                    out
                }
                // `plan` gets the selected nodes chunk by chunk (contract
                // 0.2); the policy's `plan` gets them all at once: they are
                // copied out of the argument arena and kept until the last
                // chunk, then the waves are returned from that call.
                fn plan(
                    ctx: $crate::TaskContext,
                    nodes: ::std::vec::Vec<$crate::Node>,
                    offset: u32,
                    total: u32,
                ) -> ::std::vec::Vec<$crate::Wave> {
                    let out = $crate::__plan_chunk(ctx, &nodes, offset, total, |ctx, all| {
                        <$ty as $crate::Policy>::plan(ctx, all)
                    });
                    ::std::mem::drop(nodes);
                    $crate::arena::reset();
                    out
                }
                fn admit(
                    ctx: $crate::TaskContext,
                    node: $crate::Node,
                    now: u64,
                ) -> $crate::Admission {
                    let out =
                        <$ty as $crate::Policy>::admit(&$crate::Context::new(ctx), &node, now);
                    ::std::mem::drop(node);
                    $crate::arena::reset();
                    out
                }
                fn evaluate(
                    ctx: $crate::TaskContext,
                    report: $crate::WaveReport,
                ) -> $crate::Verdict {
                    let out =
                        <$ty as $crate::Policy>::evaluate(&$crate::Context::new(ctx), &report);
                    ::std::mem::drop(report);
                    $crate::arena::reset();
                    out
                }
                fn on_request(ctx: $crate::TaskContext, node: $crate::Node) -> $crate::Offer {
                    let out =
                        <$ty as $crate::Policy>::on_request(&$crate::Context::new(ctx), &node);
                    ::std::mem::drop(node);
                    $crate::arena::reset();
                    out
                }
            }
            // Exported from the component only: a native build of the crate
            // (its `cargo test`) links the cdylib with a version script that
            // cannot name `flotilla:policy/hooks@0.2.0#select`.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::__export_world!(__FlotillaGlue);
            // Natively the hooks are reached only through the test harness
            // (which runs the component): keep them live so a policy's own
            // types are not "never constructed" there.
            #[cfg(not(target_arch = "wasm32"))]
            #[used]
            static __FLOTILLA_HOOKS: (
                fn() -> $crate::PolicyInfo,
                fn($crate::TaskContext, ::std::vec::Vec<$crate::Node>) -> ::std::vec::Vec<$crate::Selection>,
            ) = (
                <__FlotillaGlue as $crate::bindings::exports::flotilla::policy::hooks::Guest>::describe,
                <__FlotillaGlue as $crate::bindings::exports::flotilla::policy::hooks::Guest>::select,
            );
        };
    };
}
