//! Persistence behind a trait: tasks, node runs and event logs. The engine
//! writes every state change here before it acts on it or acknowledges it.
//! `memory` is for tests and simulation without disk; the `flotilla-store-sled`
//! crate is the durable one.

pub mod memory;

use flotilla_model::{Event, NodeRun, Task};

pub use self::memory::MemoryStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Io(String),
    #[error("storage: corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Durable state of the runner. Writes of one call are atomic: a crash leaves
/// either all of them or none.
pub trait Store: Send + Sync {
    /// Writes the task, its changed runs and new events in one atomic batch.
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError>;
    fn task(&self, id: &str) -> Result<Option<Task>, StoreError>;
    /// Every task, oldest first.
    fn tasks(&self) -> Result<Vec<Task>, StoreError>;
    /// Every task, oldest first, without its plan (`waves` empty): for
    /// listings that need tasks' states, not their waves (a 100,000-node
    /// plan is ~1.5 MB of JSON).
    fn task_heads(&self) -> Result<Vec<Task>, StoreError> {
        let mut tasks = self.tasks()?;
        for t in &mut tasks {
            t.waves = Vec::new();
        }
        Ok(tasks)
    }
    /// A task's runs, ordered by node id.
    fn runs(&self, task_id: &str) -> Result<Vec<NodeRun>, StoreError>;
    /// One node's run in a task.
    fn run(&self, task_id: &str, node_id: &str) -> Result<Option<NodeRun>, StoreError>;
    /// Events of a task from `from_seq`, at most `limit`.
    fn events(&self, task_id: &str, from_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Makes everything committed so far durable on disk.
    fn flush(&self) -> Result<(), StoreError>;
}
