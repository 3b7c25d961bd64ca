//! What a policy sees through the `status` host functions while the engine
//! runs its task: the task's own runs (live, not a copy) and the node's
//! outcomes in earlier tasks (read from the store), and the metrics agents
//! report (from the fleet).
//!
//! The engine owns a task's runs. Around every policy call it lends them to
//! the task's [`PolicyStatusView`] (a move of the map, not a copy) and takes them back
//! after, so `status.run` and `status.summary` answer from the state the
//! engine is deciding on, and nothing is duplicated in memory.

use crate::store::Store;
use flotilla_model::{NodeRun, NodeRunInfo, Outcome, Task, TaskSummary};
use flotilla_policy::world::{Fleet, TaskStatus};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The `status` world of one task.
pub(crate) struct PolicyStatusView {
    task_id: String,
    runs: Mutex<BTreeMap<String, NodeRun>>,
    store: Arc<dyn Store>,
    fleet: Arc<dyn Fleet>,
    /// Ended tasks, newest first, read once on the first history question
    /// (a task that ends while this one runs is not seen by it).
    earlier: OnceLock<Vec<(String, String)>>,
}

impl PolicyStatusView {
    pub(crate) fn new(task_id: &str, store: Arc<dyn Store>, fleet: Arc<dyn Fleet>) -> Self {
        PolicyStatusView {
            task_id: task_id.to_string(),
            runs: Mutex::new(BTreeMap::new()),
            store,
            fleet,
            earlier: OnceLock::new(),
        }
    }

    /// Runs `f` with the task's runs visible to the policy.
    pub(crate) fn lend<R>(&self, runs: &mut BTreeMap<String, NodeRun>, f: impl FnOnce() -> R) -> R {
        std::mem::swap(&mut *self.lock(), runs);
        // Give them back even when `f` panics (a policy host bug), so the
        // engine never continues with an empty task.
        struct Back<'a>(&'a PolicyStatusView, &'a mut BTreeMap<String, NodeRun>);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                std::mem::swap(&mut *self.0.lock(), self.1);
            }
        }
        let _back = Back(self, runs);
        f()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, NodeRun>> {
        // Swaps leave the map whole, so a poisoned lock is still consistent.
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (task id, target version) of every ended task but this one, newest first.
    fn earlier(&self) -> &[(String, String)] {
        self.earlier.get_or_init(|| {
            let mut tasks: Vec<Task> = match self.store.task_heads() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(task = %self.task_id, "status.node-history: {e}");
                    Vec::new()
                }
            };
            tasks.retain(|t| t.id != self.task_id && !t.state.active());
            tasks.reverse();
            tasks
                .into_iter()
                .map(|t| {
                    let version = t.target_version.clone().unwrap_or_default();
                    (t.id, version)
                })
                .collect()
        })
    }
}

impl TaskStatus for PolicyStatusView {
    fn run(&self, node_id: &str) -> Option<NodeRunInfo> {
        self.lock().get(node_id).map(|r| NodeRunInfo {
            node_id: r.node_id.clone(),
            state: r.state.name().to_string(),
            attempts: r.attempts,
            wave: r.state.wave(),
        })
    }

    fn summary(&self) -> TaskSummary {
        TaskSummary::of(self.lock().values().map(|r| &r.state))
    }

    fn history(&self, node_id: &str, limit: u32) -> Vec<Outcome> {
        let mut out = Vec::new();
        for (task, version) in self.earlier() {
            if out.len() >= limit as usize {
                break;
            }
            match self.store.run(task, node_id) {
                Ok(Some(run)) if run.state.wave().is_some() => out.push(Outcome {
                    task_id: task.clone(),
                    version: version.clone(),
                    state: run.state.name().to_string(),
                    at: run.updated_at,
                }),
                Ok(_) => {}
                Err(e) => tracing::warn!(task = %self.task_id, "status.node-history: {e}"),
            }
        }
        out.sort_by_key(|o| std::cmp::Reverse(o.at));
        out
    }

    fn metric(&self, node_id: &str, name: &str) -> Option<f64> {
        self.fleet.metric(node_id, name)
    }
}
