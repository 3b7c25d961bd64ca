//! What this node has done for each piece of work, kept in `DIR/work/`. The
//! runner re-sends open work after a reconnect; the journal is how the agent
//! stays idempotent: finished work is re-reported, never redone, and work cut
//! short by a crash resumes knowing which release was current before it.

use super::releases::{ReleaseError, write_atomic};
use flotilla_model::protocol::Report;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Install,
    Restore,
}

/// One piece of work as this node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub task: String,
    pub version: String,
    pub action: Action,
    /// The release that was current when the work first started.
    pub previous: Option<String>,
    /// Where the previous release was backed up, once it was.
    #[serde(default)]
    pub backup: Option<PathBuf>,
    /// The final report, once the work is finished.
    #[serde(default)]
    pub outcome: Option<Report>,
}

#[derive(Debug, Clone)]
pub struct WorkJournal {
    dir: PathBuf,
}

impl WorkJournal {
    pub fn open(state_dir: &std::path::Path) -> Result<Self, ReleaseError> {
        let dir = state_dir.join("work");
        fs::create_dir_all(&dir).map_err(|source| ReleaseError::Io {
            action: "cannot create",
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Task ids come from the network: the file name is a hash of the key.
    fn path(&self, task: &str, version: &str, action: Action) -> PathBuf {
        let mut h = Sha256::new();
        h.update(task.as_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
        h.update(format!("{action:?}").as_bytes());
        self.dir
            .join(format!("{}.json", &hex::encode(h.finalize())[..32]))
    }

    pub fn get(&self, task: &str, version: &str, action: Action) -> Option<Entry> {
        let path = self.path(task, version, action);
        match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(e) => Some(e),
                Err(e) => {
                    // A torn entry is treated as no entry: the work is redone.
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable journal entry");
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read journal entry");
                None
            }
        }
    }

    pub fn put(&self, entry: &Entry) -> Result<(), ReleaseError> {
        let path = self.path(&entry.task, &entry.version, entry.action);
        let bytes = serde_json::to_vec_pretty(entry).expect("journal entries serialize");
        write_atomic(&path, &bytes)
    }

    /// Whether an install of `task` moved this node off `version` (the
    /// release a rollback of that task goes back to).
    pub fn left(&self, task: &str, version: &str) -> bool {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return false;
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Entry>(&b).ok())
            .any(|e| {
                e.task == task
                    && e.action == Action::Install
                    && e.previous.as_deref() == Some(version)
            })
    }

    /// The backup an install of `task` made of `version`, if any.
    pub fn backup_of(&self, task: &str, version: &str) -> Option<PathBuf> {
        let entries = fs::read_dir(&self.dir).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Entry>(&b).ok())
            .filter(|e| e.task == task && e.action == Action::Install)
            .filter(|e| e.previous.as_deref() == Some(version))
            .find_map(|e| e.backup)
    }
}
