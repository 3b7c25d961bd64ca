//! The world a policy (and later the engine) reads through: fleet inventory,
//! package delivery, the current task's status and the clock, each a trait so the
//! engine, the simulator and tests plug in their own. In-memory versions live here.

use flotilla_model::{Node, NodeRunInfo, Outcome, Release, Selector, TaskSummary};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Read-only fleet inventory.
pub trait Fleet: Send + Sync {
    /// Nodes matching `selector`, ordered by id, from `offset`, at most `limit`.
    fn query(&self, selector: &Selector, offset: u64, limit: u32) -> Vec<Node>;
    fn get(&self, id: &str) -> Option<Node>;
    fn count(&self, selector: &Selector) -> u64;
    /// The latest value of a metric the node's agent reported.
    fn metric(&self, _node_id: &str, _name: &str) -> Option<f64> {
        None
    }
}

/// Packages the runner can deliver.
pub trait Delivery: Send + Sync {
    /// Releases of a package, oldest version first.
    fn releases(&self, package: &str) -> Vec<Release>;
    /// The version the control plane runs for a component.
    fn control_plane_version(&self, component: &str) -> Option<String>;
}

/// The state of the task a policy serves.
pub trait TaskStatus: Send + Sync {
    fn run(&self, node_id: &str) -> Option<NodeRunInfo>;
    fn summary(&self) -> TaskSummary;
    fn history(&self, node_id: &str, limit: u32) -> Vec<Outcome>;
    fn metric(&self, node_id: &str, name: &str) -> Option<f64>;
}

/// The only time a policy sees: Unix milliseconds.
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// Everything a policy may read, bundled for the policy hosts.
#[derive(Clone)]
pub struct World {
    pub fleet: Arc<dyn Fleet>,
    pub delivery: Arc<dyn Delivery>,
    pub status: Arc<dyn TaskStatus>,
    pub clock: Arc<dyn Clock>,
}

impl World {
    /// An empty fleet, no releases, no task, a clock fixed at 0.
    pub fn empty() -> Self {
        World {
            fleet: Arc::new(MemoryFleet::default()),
            delivery: Arc::new(MemoryDelivery::default()),
            status: Arc::new(MemoryStatus::default()),
            clock: Arc::new(ManualClock::new(0)),
        }
    }
}

impl Default for World {
    fn default() -> Self {
        Self::empty()
    }
}

/// An inventory held in memory, ordered by node id. Nodes can be added or
/// changed while it is shared (a node registers, goes offline, comes back).
#[derive(Debug, Default)]
pub struct MemoryFleet {
    nodes: std::sync::RwLock<BTreeMap<String, Node>>,
    /// The latest metrics each agent reported (not persisted: a restarted
    /// runner waits for the next heartbeat).
    metrics: std::sync::RwLock<HashMap<String, Metrics>>,
}

/// Metric name → latest value, as an agent reports them.
pub type Metrics = BTreeMap<String, f64>;

impl MemoryFleet {
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Self {
        MemoryFleet {
            nodes: std::sync::RwLock::new(nodes.into_iter().map(|n| (n.id.clone(), n)).collect()),
            metrics: Default::default(),
        }
    }

    /// Adds or replaces a node.
    pub fn upsert(&self, node: Node) {
        self.write().insert(node.id.clone(), node);
    }

    /// Takes a node out of the inventory.
    pub fn remove(&self, id: &str) -> Option<Node> {
        self.write().remove(id)
    }

    /// Ids of the nodes marked online whose agent was last seen before
    /// `before` (Unix ms), without copying the nodes.
    pub fn silent_since(&self, before: u64) -> Vec<String> {
        self.read()
            .values()
            .filter(|n| n.online && n.last_seen != 0 && n.last_seen < before)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Replaces what a node's agent last reported (empty clears it).
    pub fn set_metrics(&self, node_id: &str, metrics: Metrics) {
        let mut all = self.metrics.write().unwrap_or_else(|e| e.into_inner());
        if metrics.is_empty() {
            all.remove(node_id);
        } else {
            all.insert(node_id.to_string(), metrics);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Node>> {
        // The map is never left half-written, so a poisoned lock is still usable.
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Node>> {
        self.nodes.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Fleet for MemoryFleet {
    fn query(&self, selector: &Selector, offset: u64, limit: u32) -> Vec<Node> {
        self.read()
            .values()
            .filter(|n| selector.matches(n))
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(limit as usize)
            .cloned()
            .collect()
    }

    fn get(&self, id: &str) -> Option<Node> {
        self.read().get(id).cloned()
    }

    fn count(&self, selector: &Selector) -> u64 {
        self.read().values().filter(|n| selector.matches(n)).count() as u64
    }

    fn metric(&self, node_id: &str, name: &str) -> Option<f64> {
        let all = self.metrics.read().unwrap_or_else(|e| e.into_inner());
        all.get(node_id)?.get(name).copied()
    }
}

#[derive(Debug, Default, Clone)]
pub struct MemoryDelivery {
    pub releases: Vec<Release>,
    pub control_plane: BTreeMap<String, String>,
}

impl Delivery for MemoryDelivery {
    fn releases(&self, package: &str) -> Vec<Release> {
        let mut out: Vec<Release> = self
            .releases
            .iter()
            .filter(|r| r.package == package)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            match (
                flotilla_version::parse(&a.version),
                flotilla_version::parse(&b.version),
            ) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.version.cmp(&b.version),
            }
        });
        out
    }

    fn control_plane_version(&self, component: &str) -> Option<String> {
        self.control_plane.get(component).cloned()
    }
}

#[derive(Debug, Default, Clone)]
pub struct MemoryStatus {
    pub runs: BTreeMap<String, NodeRunInfo>,
    pub summary: TaskSummary,
    pub history: BTreeMap<String, Vec<Outcome>>,
    pub metrics: BTreeMap<(String, String), f64>,
}

impl TaskStatus for MemoryStatus {
    fn run(&self, node_id: &str) -> Option<NodeRunInfo> {
        self.runs.get(node_id).cloned()
    }

    fn summary(&self) -> TaskSummary {
        self.summary
    }

    fn history(&self, node_id: &str, limit: u32) -> Vec<Outcome> {
        self.history
            .get(node_id)
            .map(|h| h.iter().take(limit as usize).cloned().collect())
            .unwrap_or_default()
    }

    fn metric(&self, node_id: &str, name: &str) -> Option<f64> {
        self.metrics
            .get(&(node_id.to_string(), name.to_string()))
            .copied()
    }
}

/// A clock that moves only when told to: the virtual clock of tests and simulation.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(ms: u64) -> Self {
        ManualClock(AtomicU64::new(ms))
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Wall-clock time, for the real runner.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}
