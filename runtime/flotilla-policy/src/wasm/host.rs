//! What a policy instance runs with: its store state, the memory limiter, a
//! locked-down WASI, and the host functions of the policy imports.

use super::convert::{selector_from, wit_node};
use super::{calendar, clock, delivery, fleet, log, status, wit};
use crate::world::World;
use flotilla_model as model;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// No files, no network, no env or args, clocks stuck at zero, deterministic
/// randomness: a policy sees the world only through the policy imports.
pub(super) fn locked_down_wasi(stderr: MemoryOutputPipe) -> WasiCtx {
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
pub(super) struct State {
    /// Built on the first WASI call: most policies make none, and building it
    /// is a good part of what an instantiation costs.
    pub(super) wasi: Option<WasiCtx>,
    pub(super) table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) world: World,
    pub(super) policy: String,
    pub(super) stderr: MemoryOutputPipe,
    /// The running call's CPU budget (see [`crate::clock`]).
    pub(super) clock: Option<crate::clock::CallClock>,
}

pub(super) struct Limiter {
    pub(super) memory_cap: usize,
    pub(super) hit_cap: bool,
    /// The largest size a memory of the instance was allowed to grow to.
    pub(super) largest: usize,
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
        if ok {
            self.largest = self.largest.max(desired);
        }
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

/// `flotilla-window`, as the Rhai host's `local_time`, `window_open` and
/// `window_next_open`: one implementation for the runner and both hosts.
impl calendar::Host for State {
    fn local_time(&mut self, at: u64, zone: String) -> Result<calendar::LocalDateTime, String> {
        let t = flotilla_window::local_time_in(&zone, at).map_err(|e| e.to_string())?;
        // Calendar fields are small by construction (month 1-12, ...).
        let small = |v: u32| u8::try_from(v).unwrap_or(u8::MAX);
        Ok(calendar::LocalDateTime {
            year: t.year,
            month: small(t.month),
            day: small(t.day),
            hour: small(t.hour),
            minute: small(t.minute),
            second: small(t.second),
            weekday: small(t.weekday),
            offset_minutes: t.offset_minutes,
            abbreviation: t.abbreviation,
        })
    }

    fn window_open(
        &mut self,
        cron: String,
        duration_minutes: u32,
        zone: String,
        at: u64,
    ) -> Result<bool, String> {
        let w = flotilla_window::Window::parse(&cron, duration_minutes, &zone)
            .map_err(|e| e.to_string())?;
        Ok(w.is_open(at))
    }

    fn window_next_open(
        &mut self,
        cron: String,
        duration_minutes: u32,
        zone: String,
        at: u64,
    ) -> Result<Option<u64>, String> {
        let w = flotilla_window::Window::parse(&cron, duration_minutes, &zone)
            .map_err(|e| e.to_string())?;
        Ok(w.next_open(at))
    }
}
