//! Persistence behind a trait: tasks, node runs and event logs. The engine
//! writes every state change here before it acts on it or acknowledges it.
//! `memory` is for tests and simulation without disk; the `flotilla-store-sled`
//! crate is the durable one.

pub mod memory;

use flotilla_model::{Event, NodeRun, Task};

pub use self::memory::MemoryStore;

/// Why a store call failed, by what the caller can do about it.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The storage failed (I/O error, disk full, locked by another process):
    /// a fault, not a refusal; the same call may succeed later.
    Io {
        context: String,
        source: SourceError,
    },
    /// A record on disk cannot be decoded: reading it again will not help.
    Corrupt { key: String, reason: String },
    /// What was asked cannot be stored (a key the store cannot hold, a value
    /// that does not encode, a limit reached, a data directory of another
    /// version): retrying will not help either.
    Invalid(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io { context, source } => write!(f, "storage: {context}: {source}"),
            StoreError::Corrupt { key, reason } => {
                write!(f, "storage: corrupt record {key}: {reason}")
            }
            StoreError::Invalid(m) => write!(f, "storage: {m}"),
        }
    }
}

impl std::error::Error for StoreError {
    /// The fault's own error (not the `Arc` it is shared in).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// The underlying error of a fault (sled's, the file system's), shared so
/// that a fault reported to several callers keeps its chain.
pub type SourceError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// A fault while doing `context`, caused by `source`.
    pub fn io(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        StoreError::Io {
            context: context.into(),
            source: std::sync::Arc::from(source.into()),
        }
    }

    /// A fault: the caller may retry the same call.
    pub fn is_fault(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }
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
    /// Every task, oldest first, without its plan, with its number of
    /// waves: what a task list shows (`GET /v1/tasks`, polled by the
    /// dashboard), without building every plan's node ids.
    fn task_list(&self) -> Result<Vec<(Task, usize)>, StoreError> {
        Ok(self
            .tasks()?
            .into_iter()
            .map(|mut t| {
                let waves = t.waves.len();
                t.waves = Vec::new();
                (t, waves)
            })
            .collect())
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

#[cfg(test)]
mod tests {
    use super::StoreError;
    use std::error::Error;

    #[test]
    fn a_fault_keeps_its_cause_and_says_it_may_be_retried() {
        let err = StoreError::io("commit", std::io::Error::from_raw_os_error(28));
        assert!(err.is_fault());
        let cause = err.source().expect("the cause is kept");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("as the type it was");
        assert_eq!(io.raw_os_error(), Some(28));
        assert!(err.to_string().starts_with("storage: commit: "), "{err}");
        // Shared, not copied to text, when one fault answers several callers.
        assert!(err.clone().source().is_some());
        assert!(!StoreError::Invalid("key with a NUL byte".into()).is_fault());
    }
}
