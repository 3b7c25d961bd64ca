//! The durable store on sled — the only crate that depends on sled.
//!
//! The engine's records live in **one tree**, `engine`, under prefixed keys
//! (values are serde_json; plans, run packs and event packs are that JSON
//! LZ4-compressed, marked by a first byte `LZ4` that JSON never starts with):
//! - `T task_id` → `Task` without its plan (`waves` stored as `[]`)
//! - `P task_id` → the task's `waves`, written only when they changed
//! - `R task_id \0 node_id` → `[generation, NodeRun]`: a run written out
//!   of the journal, or by a task's last commit (a plain `NodeRun`, as older
//!   stores hold, reads as generation 0)
//! - `J task_id \0 seq as big-endian u64` → `[generation, [NodeRun]]`: the
//!   runs of one small commit (see "Run journal" below)
//! - `Q task_id \0 generation as big-endian u32, first node_id` → a JSON
//!   array of up to `RUN_PACK` `NodeRun`s in node-id order: the runs of a
//!   big commit (see "Run packs" below)
//! - `E task_id \0 first_seq as big-endian u64` → a JSON array of up to
//!   [`PACK`] `Event`s with consecutive seqs starting at `first_seq` (each
//!   event keeps its own `seq`, `at`, `kind` and `detail`). One commit's
//!   events are stored in as few packs as fit; `events(task, from, limit)`
//!   finds the pack holding `from` by a backwards seek and reads on.
//!
//! Task ids must not contain NUL (refused by `commit`), so `task_id \0` is a
//! prefix of exactly one task's keys. A commit is one atomic `apply_batch` on
//! that tree: after a crash either all of it is there or none. `commit` does
//! not flush; `flush` makes everything committed so far durable.
//!
//! Why one tree and packed events: a sled transaction over several trees
//! costs far more than a batch on one, and a record per event would be most
//! of the records a rollout writes.
//!
//! Run packs: a commit of at least `RUN_PACK_MIN` runs (targeting, the
//! dispatch of a wave, a wave's worth of reports) does not write a record
//! per run but opens the task's next *generation* and writes its runs in
//! packs. A run's current value is the newest of its `R` record and the
//! packs holding it: an `R` record carries the generation that was current
//! when it was written, so it is newer than the packs of that generation and
//! older than every later one. Why: sled copies a leaf on every insert and
//! keeps the old copies of one batch until the batch ends, so big commits of
//! small records dominate a rollout's time and memory. Small
//! commits never rewrite a pack. Packs are never compacted: a task's
//! records hold each big commit's runs once, as its event log does.
//!
//! Run journal: a small commit of an active task (a batch of agents'
//! reports) writes its runs as one `J` record, not one `R` record each. The
//! store keeps the newest journaled run of each node in memory and *writes
//! the journal out* (each node's newest run becomes its `R` record, the `J`
//! records are removed, in the same atomic batch as the commit that does it)
//! before a big commit opens a generation, when the task ends, when the
//! journal would hold more than `JOURNAL_MAX` runs, and on a task's first
//! commit after the store opens (then read from disk). So every journal
//! record is of the current generation and newer than everything else of
//! the task; an ended task has none, and a point read of it costs one more
//! seek that finds nothing. Why: a batch of agents' reports becomes one sled
//! insert instead of one per run, and an agent's several reports of one
//! upgrade fall into one journal and are written out once.
//!
//! Earlier layouts (trees `tasks`, `plans`, `runs`, `events`) are not read:
//! opening such a store is refused with a clear error (pre-release, no
//! migration).
//!
//! Why `P`: the engine commits the whole `Task` on every tick, and the plan
//! of a big rollout is megabytes of JSON. Rewriting it each time would
//! dominate every commit, so the store remembers the plan it last wrote per
//! active task (its `plan_rev`, which the engine bumps on every change) and
//! writes the plan again only when that moved, without comparing plans.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use ::sled::{Batch, Db, IVec, Tree};
use serde::Serialize;
use serde::de::DeserializeOwned;

use flotilla_engine::store::memory::check_task_id;
use flotilla_engine::store::{Store, StoreError};
use flotilla_model::{Event, NodeRun, Task, TaskSpec, TaskState, Wave};

const SEP: u8 = 0;
/// Key prefixes in the `engine` tree.
const TASK: u8 = b'T';
const PLAN: u8 = b'P';
const RUN: u8 = b'R';
const RUN_PACKS: u8 = b'Q';
const EVENTS: u8 = b'E';
const JOURNAL: u8 = b'J';
/// At most this many events in one record, and a pack is closed once its
/// JSON passes [`PACK_BYTES`], so records stay small (sled copies a leaf
/// on every write to it).
const PACK: usize = 128;
const PACK_BYTES: usize = 16 << 10;
/// A commit of at least this many runs writes them in packs (a new
/// generation) instead of one record each.
const RUN_PACK_MIN: usize = 256;
/// Runs in one pack record (~90 bytes of JSON each).
const RUN_PACK: usize = 512;
/// Runs a task's journal holds at most before the next commit writes them
/// out as `R` records (see "Run journal" in the module docs).
const JOURNAL_MAX: usize = 8192;
/// Run packs kept decoded for point reads (at most ~2 MB).
const PACK_CACHE: usize = 16;
/// A commit of at least this many records frees sled's garbage at once
/// (see [`release_garbage`]).
const BIG_BATCH: usize = 1024;
/// Trees of the layout before `engine`; a store holding them is refused.
const OLD_TREES: [&str; 4] = ["tasks", "plans", "runs", "events"];

pub struct SledStore {
    dir: PathBuf,
    db: Db,
    /// Every engine record, under the prefixes in the module docs.
    tree: Tree,
    /// What the last commit of each active task left on disk. Locked for a
    /// whole commit so it always matches what is on disk.
    written: Mutex<HashMap<String, Written>>,
    /// sled records written by commits so far, and their bytes (keys and
    /// values): benches size a baseline by them.
    records: AtomicU64,
    bytes: AtomicU64,
    /// Per task: held (shared) by reads of its runs and (exclusively) by a
    /// commit that writes its journal out: a read that overlapped a
    /// write-out could find part of the journal gone and its `R` records not
    /// yet there. Per task, so a long read of one task (0.5 s at 100,000
    /// runs) never holds up another task's commits.
    moves: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    /// Run packs decoded for point reads, oldest first (see `decoded_pack`).
    pack_cache: Mutex<Vec<(IVec, Arc<Vec<NodeRun>>)>>,
}

/// Per active task: the `plan_rev` last written to `P`, the task's newest
/// run-pack generation (0: none yet) and its journal.
#[derive(Debug)]
struct Written {
    plan_rev: Option<u64>,
    generation: u32,
    /// `None` until this process has written the task's journal out once
    /// (what an earlier process left is not known).
    journal: Option<RunJournal>,
}

/// A task's run journal: what its records on disk hold, kept in memory so
/// writing it out does not decode them.
#[derive(Debug, Default)]
struct RunJournal {
    /// Its records on disk are `first_seq..next_seq`.
    first_seq: u64,
    next_seq: u64,
    /// Runs in those records (a node counted once per record it is in).
    runs: usize,
    /// The newest journaled run of each node.
    newest: BTreeMap<String, NodeRun>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("dir", &self.dir).finish()
    }
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`. Only one `SledStore` may
    /// have a directory open at a time, in this process or any other.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = open_db(dir)?;
        Self::with_db(dir, db).inspect_err(|_| {
            // Not opened after all: a later open may wait for the release.
            opened().insert(registry_key(dir), false);
        })
    }

    fn with_db(dir: &Path, db: Db) -> Result<Self, StoreError> {
        for name in db.tree_names() {
            let old = OLD_TREES.iter().any(|t| t.as_bytes() == &name[..]);
            if old
                && !db
                    .open_tree(&name)
                    .map_err(|e| open_error(dir, e))?
                    .is_empty()
            {
                return Err(StoreError::Invalid(format!(
                    "store {} was written by an older Flotilla (tree {}); this version \
                     cannot read it: start with an empty data directory",
                    dir.display(),
                    String::from_utf8_lossy(&name)
                )));
            }
        }
        let tree = db.open_tree("engine").map_err(|e| open_error(dir, e))?;
        Ok(SledStore {
            dir: dir.to_path_buf(),
            tree,
            written: Mutex::new(HashMap::new()),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            moves: Mutex::new(HashMap::new()),
            pack_cache: Mutex::new(Vec::new()),
            db,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// sled records (keys) written by `commit` since this store was opened.
    pub fn records_written(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Bytes of keys and values written by `commit` since this store was opened.
    pub fn bytes_written(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn io(
        &self,
        what: &str,
        e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> StoreError {
        StoreError::io(format!("{what} in {}", self.dir.display()), e)
    }

    fn written(&self) -> MutexGuard<'_, HashMap<String, Written>> {
        self.written.lock().unwrap_or_else(|poisoned| {
            // A panic mid-commit: forget what we think is on disk, so every
            // plan is written again and generations are read back.
            let mut written = poisoned.into_inner();
            written.clear();
            self.written.clear_poison();
            written
        })
    }

    /// The newest run-pack generation of `task_id` on disk (0: none).
    fn last_generation(&self, task_id: &str) -> Result<u32, StoreError> {
        let prefix = key_of(|b| {
            task_key(b, RUN_PACKS, task_id);
            b.push(SEP);
        });
        match self.tree.scan_prefix(&prefix).next_back() {
            None => Ok(0),
            Some(kv) => {
                let (k, _) = kv.map_err(|e| self.io(&format!("reading runs of {task_id}"), e))?;
                pack_generation(&k, prefix.len())
            }
        }
    }

    /// A run pack, decoded, from the small cache of recent point reads
    /// (packs are never rewritten, so a cached pack is never stale). A
    /// policy asking `node-history` for every node it selects reads the
    /// packs of earlier tasks in node order: each is decoded once, not once
    /// per node.
    fn decoded_pack(&self, key: &IVec, value: &IVec) -> Result<Arc<Vec<NodeRun>>, StoreError> {
        let mut cache = self.pack_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, runs)) = cache.iter().find(|(k, _)| k == key) {
            return Ok(runs.clone());
        }
        let runs: Arc<Vec<NodeRun>> = Arc::new(decode(key, value)?);
        if cache.len() == PACK_CACHE {
            cache.remove(0);
        }
        cache.push((key.clone(), runs.clone()));
        Ok(runs)
    }

    /// Every run pack of `task_id`, oldest generation first: `(generation,
    /// key, packed runs)`.
    fn packs<'a>(
        &'a self,
        task_id: &'a str,
    ) -> impl Iterator<Item = Result<(u32, IVec, IVec), StoreError>> + 'a {
        let prefix = key_of(|b| {
            task_key(b, RUN_PACKS, task_id);
            b.push(SEP);
        });
        let len = prefix.len();
        self.tree.scan_prefix(prefix).map(move |kv| {
            let (k, v) = kv.map_err(|e| self.io(&format!("reading runs of {task_id}"), e))?;
            Ok((pack_generation(&k, len)?, k, v))
        })
    }

    /// A task head (`T id`) plus its plan (`P id`).
    fn read_task(&self, key: &[u8], head: &[u8]) -> Result<Task, StoreError> {
        let mut task: Task = decode(key, head)?;
        let plan = self.plan_bytes(key, &task.id)?;
        task.waves = decode(&plan_of(key), &plan)?;
        Ok(task)
    }

    /// The stored plan of the task whose head is at `key`.
    fn plan_bytes(&self, key: &[u8], id: &str) -> Result<IVec, StoreError> {
        let plan_key = plan_of(key);
        self.tree
            .get(&plan_key)
            .map_err(|e| self.io(&format!("reading the plan of {id}"), e))?
            .ok_or_else(|| StoreError::Corrupt {
                key: describe(&plan_key),
                reason: "missing (the task record has no plan)".into(),
            })
    }

    /// The lock that keeps reads of `task_id`'s runs and write-outs of its
    /// journal apart (see the field).
    fn moves(&self, task_id: &str) -> Arc<RwLock<()>> {
        let mut moves = self.moves.lock().unwrap_or_else(|e| e.into_inner());
        match moves.get(task_id) {
            Some(m) => m.clone(),
            None => moves.entry(task_id.to_string()).or_default().clone(),
        }
    }

    /// Every journal record of `task_id` in write order: `(key, generation,
    /// runs)`.
    fn journal<'a>(
        &'a self,
        task_id: &'a str,
    ) -> impl DoubleEndedIterator<Item = Result<(IVec, u32, Vec<NodeRun>), StoreError>> + 'a {
        let prefix = key_of(|b| {
            task_key(b, JOURNAL, task_id);
            b.push(SEP);
        });
        self.tree.scan_prefix(prefix).map(move |kv| {
            let (k, v) = kv.map_err(|e| self.io(&format!("reading runs of {task_id}"), e))?;
            let (generation, runs): (u32, Vec<NodeRun>) = decode(&k, &v)?;
            Ok((k, generation, runs))
        })
    }

    /// Adds to `batch` the writing out of the journal an earlier process
    /// left for `task_id`, read from disk: the newest journaled value of each
    /// node becomes its `R` record (with the journal's generation, so it
    /// ranks as the journal did), and the journal records are removed.
    /// Returns the seq after the last record.
    fn write_out_journal(&self, task_id: &str, batch: &mut Counted) -> Result<u64, StoreError> {
        let mut newest: BTreeMap<String, (u32, NodeRun)> = BTreeMap::new();
        let mut next_seq = 0;
        for record in self.journal(task_id) {
            let (k, generation, runs) = record?;
            next_seq = journal_seq(&k)? + 1;
            for run in runs {
                newest.insert(run.node_id.clone(), (generation, run));
            }
            batch.remove(k);
        }
        for (node, (generation, run)) in newest {
            let k = key_of(|b| run_key(b, task_id, &node));
            batch.put(k, encode_run(generation, &run, task_id)?);
        }
        Ok(next_seq)
    }
}

impl SledStore {
    /// A named tree of JSON records beside the engine's own (inventory,
    /// releases, agent tokens, webhook deliveries). Same database, same
    /// durability: `flush` covers it.
    pub fn kv(&self, name: &str) -> Result<Kv, StoreError> {
        let tree = self
            .db
            .open_tree(name)
            .map_err(|e| self.io(&format!("opening tree {name}"), e))?;
        Ok(Kv {
            name: name.to_string(),
            tree,
        })
    }
}

/// A tree of JSON values by string key. See [`SledStore::kv`].
#[derive(Clone)]
pub struct Kv {
    name: String,
    tree: Tree,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv").field("name", &self.name).finish()
    }
}

impl Kv {
    fn err(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> StoreError {
        StoreError::io(format!("tree {}", self.name), e)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.tree.get(key.as_bytes()).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => decode_kv(&self.name, key.as_bytes(), &v).map(Some),
        }
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let v = encode(value, || format!("{}/{key}", self.name))?;
        self.tree
            .insert(key.as_bytes(), v)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Stores `value` only if `key` is absent; returns the value already
    /// there otherwise (atomic: two racing callers cannot both insert).
    pub fn put_new<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Option<T>, StoreError> {
        let v = encode(value, || format!("{}/{key}", self.name))?;
        match self
            .tree
            .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(v))
            .map_err(|e| self.err(e))?
        {
            Ok(()) => Ok(None),
            Err(cas) => match cas.current {
                Some(cur) => decode_kv(&self.name, key.as_bytes(), &cur).map(Some),
                None => Ok(None),
            },
        }
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree.remove(key.as_bytes()).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Up to `limit` records with keys strictly after `key`, in key order.
    pub fn after<T: DeserializeOwned>(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        use std::ops::Bound;
        let mut out = Vec::new();
        let range = (
            Bound::Excluded(key.as_bytes().to_vec()),
            Bound::Unbounded::<Vec<u8>>,
        );
        for item in self.tree.range(range).take(limit) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                decode_kv(&self.name, &k, &v)?,
            ));
        }
        Ok(out)
    }

    /// The last `n` records, in key order.
    pub fn last_n<T: DeserializeOwned>(&self, n: usize) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter().rev().take(n) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                decode_kv(&self.name, &k, &v)?,
            ));
        }
        out.reverse();
        Ok(out)
    }

    /// The greatest key, if any.
    pub fn last_key(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .last()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned()))
    }

    /// Removes every record whose key sorts before `key`; returns how many.
    pub fn remove_before(&self, key: &str) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.range(..key.as_bytes()) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            self.tree.remove(k).map_err(|e| self.err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// How many records there are (walks the tree).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Every record, in key order.
    pub fn all<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            out.push((key, decode_kv(&self.name, &k, &v)?));
        }
        Ok(out)
    }
}

/// What `T id` holds: a `Task` with its plan left out (`waves` is always
/// empty), so it reads back as a `Task`. Built by destructuring `Task`
/// exhaustively: a new field does not compile until it is stored here.
#[derive(Serialize)]
struct TaskHead<'a> {
    id: &'a str,
    spec: &'a TaskSpec,
    state: &'a TaskState,
    target_version: &'a Option<String>,
    waves: &'a [Wave],
    plan_rev: u64,
    current_wave: u32,
    soak_until: Option<u64>,
    awaiting_approval: bool,
    draining: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_sha256: &'a Option<String>,
    created_at: u64,
    updated_at: u64,
}

impl<'a> TaskHead<'a> {
    fn of(task: &'a Task) -> Self {
        let Task {
            id,
            spec,
            state,
            target_version,
            waves: _,
            plan_rev,
            current_wave,
            soak_until,
            awaiting_approval,
            draining,
            policy_sha256,
            created_at,
            updated_at,
        } = task;
        TaskHead {
            id,
            spec,
            state,
            target_version,
            waves: &[],
            plan_rev: *plan_rev,
            current_wave: *current_wave,
            soak_until: *soak_until,
            awaiting_approval: *awaiting_approval,
            draining: *draining,
            policy_sha256,
            created_at: *created_at,
            updated_at: *updated_at,
        }
    }
}

/// How long an open waits for a store this process closed to let go of its
/// lock (see [`open_db`]); far more than the moment it takes.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The directories this process has opened a store in: `true` while a
/// `SledStore` on it is alive, `false` once it was dropped.
static OPENED: Mutex<BTreeMap<PathBuf, bool>> = Mutex::new(BTreeMap::new());

fn opened() -> MutexGuard<'static, BTreeMap<PathBuf, bool>> {
    OPENED.lock().unwrap_or_else(|e| e.into_inner())
}

fn registry_key(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Opens sled in `dir`. sled holds an exclusive lock on its file while the
/// file is open, and the file stays open as long as anything of the database
/// lives: after the last handle is dropped, jobs of sled's own thread pool
/// that write its last buffers still hold it for a moment. A store dropped
/// and opened again in the same process (a runner restarted in-process, a
/// test) could find it "locked" by itself. So when this process has had the
/// store open and has dropped it, a locked file is waited for (bounded);
/// locked by a store still open here, or by another process, it is an
/// error at once.
fn open_db(dir: &Path) -> Result<Db, StoreError> {
    let key = registry_key(dir);
    let was = opened().get(&key).copied();
    if was == Some(true) {
        return Err(StoreError::io(
            format!("store {} is locked", dir.display()),
            "another open store in this process is using it",
        ));
    }
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        // sled's page cache defaults to 1 GiB; the runner keeps its own
        // working set in memory, so a small cache keeps RSS proportional to
        // the fleet.
        let opened_db = ::sled::Config::new()
            .path(dir)
            .cache_capacity(32 << 20)
            .open();
        match opened_db {
            Ok(db) => {
                opened().insert(key, true);
                return Ok(db);
            }
            Err(e) if was == Some(false) && is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(open_error(dir, e)),
        }
    }
}

fn is_lock_error(e: &::sled::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Some(open) = opened().get_mut(&registry_key(&self.dir)) {
            *open = false;
        }
    }
}

fn open_error(dir: &Path, e: ::sled::Error) -> StoreError {
    let text = e.to_string();
    if is_lock_error(&e) {
        StoreError::io(
            format!("store {} is locked", dir.display()),
            format!("another process (or another open store in this process) is using it ({text})"),
        )
    } else {
        StoreError::io(format!("cannot open store {}", dir.display()), e)
    }
}

thread_local! {
    /// Reused buffer for keys and values, so a commit allocates only the sled
    /// values themselves (`IVec`s; short keys are stored inline).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Builds a key into the scratch buffer and hands the bytes to `f`.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        buf.clear();
        let r = f(&mut buf);
        // Do not keep a huge buffer alive forever after one big task.
        if buf.capacity() > 4 << 20 {
            *buf = Vec::new();
        }
        r
    })
}

fn task_key(buf: &mut Vec<u8>, kind: u8, task_id: &str) {
    buf.push(kind);
    buf.extend_from_slice(task_id.as_bytes());
}

fn run_key(buf: &mut Vec<u8>, task_id: &str, node_id: &str) {
    buf.push(RUN);
    buf.extend_from_slice(task_id.as_bytes());
    buf.push(SEP);
    buf.extend_from_slice(node_id.as_bytes());
}

fn journal_key(buf: &mut Vec<u8>, task_id: &str, seq: u64) {
    buf.push(JOURNAL);
    buf.extend_from_slice(task_id.as_bytes());
    buf.push(SEP);
    buf.extend_from_slice(&seq.to_be_bytes());
}

/// The seq at the end of a journal key.
fn journal_seq(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: describe(key),
            reason: "a journal key without a seq".into(),
        })
}

fn pack_key(buf: &mut Vec<u8>, task_id: &str, generation: u32, first_node: &str) {
    buf.push(RUN_PACKS);
    buf.extend_from_slice(task_id.as_bytes());
    buf.push(SEP);
    buf.extend_from_slice(&generation.to_be_bytes());
    buf.extend_from_slice(first_node.as_bytes());
}

/// The generation in a pack key whose `Q task_id \0` prefix is `prefix_len` long.
fn pack_generation(key: &[u8], prefix_len: usize) -> Result<u32, StoreError> {
    key.get(prefix_len..prefix_len + 4)
        .and_then(|g| g.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            key: describe(key),
            reason: "a run-pack key without a generation".into(),
        })
}

/// An `R` value: `[generation, run]`, or a plain run (generation 0).
fn decode_run(key: &[u8], value: &[u8]) -> Result<(u32, NodeRun), StoreError> {
    if value.first() == Some(&b'[') {
        decode(key, value)
    } else {
        decode(key, value).map(|run| (0, run))
    }
}

fn encode_run(generation: u32, run: &NodeRun, task_id: &str) -> Result<IVec, StoreError> {
    encode(&(generation, run), || {
        format!("runs/{task_id}/{}", run.node_id)
    })
}

fn event_key(buf: &mut Vec<u8>, task_id: &str, seq: u64) {
    buf.push(EVENTS);
    buf.extend_from_slice(task_id.as_bytes());
    buf.push(SEP);
    buf.extend_from_slice(&seq.to_be_bytes());
}

fn key_of(f: impl FnOnce(&mut Vec<u8>)) -> IVec {
    with_scratch(|buf| {
        f(buf);
        IVec::from(&buf[..])
    })
}

fn encode<T: Serialize>(value: &T, what: impl FnOnce() -> String) -> Result<IVec, StoreError> {
    with_scratch(|buf| {
        serde_json::to_writer(&mut *buf, value)
            .map_err(|e| StoreError::Invalid(format!("cannot encode {}: {e}", what())))?;
        Ok(IVec::from(&buf[..]))
    })
}

/// First byte of a compressed value: an LZ4 block of JSON, its length as a
/// little-endian u32 before it. JSON never starts with this byte, so plain
/// and compressed values read through the same [`decode`].
const LZ4: u8 = 0x01;

/// Compresses the JSON in `json` into a value.
fn compress(json: &[u8]) -> IVec {
    let mut out = vec![0; 5 + lz4_flex::block::get_maximum_output_size(json.len())];
    out[0] = LZ4;
    out[1..5].copy_from_slice(&(json.len() as u32).to_le_bytes());
    let n = lz4_flex::block::compress_into(json, &mut out[5..])
        .expect("the output buffer has the maximum compressed size");
    out.truncate(5 + n);
    IVec::from(out)
}

/// [`encode`], compressed: for the big values (packs and plans).
fn encode_compressed<T: Serialize>(
    value: &T,
    what: impl FnOnce() -> String,
) -> Result<IVec, StoreError> {
    with_scratch(|buf| {
        serde_json::to_writer(&mut *buf, value)
            .map_err(|e| StoreError::Invalid(format!("cannot encode {}: {e}", what())))?;
        Ok(compress(buf))
    })
}

/// A key as a person reads it: `tasks/<id>`, `plans/<id>`,
/// `runs/<task>/<node>`, `events/<task>/<first seq>`.
fn describe(key: &[u8]) -> String {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (kind, rest) = match key.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return "engine/(empty key)".into(),
    };
    let tree = match kind {
        TASK => "tasks",
        PLAN => "plans",
        RUN => "runs",
        RUN_PACKS => "runpacks",
        EVENTS => "events",
        JOURNAL => "journal",
        _ => return format!("engine/{}", lossy(key)),
    };
    match rest.iter().position(|&b| b == SEP) {
        Some(i) if (kind == EVENTS || kind == JOURNAL) && rest.len() == i + 9 => {
            let seq = u64::from_be_bytes(rest[i + 1..].try_into().expect("8 bytes"));
            format!("{tree}/{}/{seq}", lossy(&rest[..i]))
        }
        Some(i) if kind == RUN_PACKS && rest.len() >= i + 5 => {
            let generation = u32::from_be_bytes(rest[i + 1..i + 5].try_into().expect("4 bytes"));
            format!(
                "runpacks/{}/{generation}/{}",
                lossy(&rest[..i]),
                lossy(&rest[i + 5..])
            )
        }
        Some(i) => format!("{tree}/{}/{}", lossy(&rest[..i]), lossy(&rest[i + 1..])),
        None => format!("{tree}/{}", lossy(rest)),
    }
}

/// The key of the plan of the task whose head is at `head_key`.
fn plan_of(head_key: &[u8]) -> IVec {
    key_of(|b| {
        b.push(PLAN);
        b.extend_from_slice(&head_key[1..]);
    })
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: describe(key),
        reason,
    };
    if value.first() == Some(&LZ4) {
        let len = value
            .get(1..5)
            .map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| corrupt("a compressed value without its length".into()))?;
        let json = lz4_flex::block::decompress(&value[5..], len)
            .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
        return serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()));
    }
    serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))
}

fn decode_kv<T: DeserializeOwned>(tree: &str, key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: format!("{tree}/{}", String::from_utf8_lossy(key)),
        reason: e.to_string(),
    })
}

/// sled frees replaced pages through crossbeam's epoch GC, and a batch
/// holds one epoch guard for all its writes: the garbage of a big commit
/// (~4 KB per record written: old copies of the leaves it rewrote) is
/// queued, and each later guard frees only a few bags of it. After the
/// first commit of a 100,000-node task that was ~400 MB still held minutes
/// later. Each `pin` + `flush` moves our bag to the global queue and
/// collects up to 8 bags (64 objects each); a few per record written frees
/// it all, measured at ~3 ms per 1,000 records (the frees sled would do
/// anyway, eventually) and ~0.1 µs per round once nothing is left.
/// `sled::pin` is `#[doc(hidden)]` but public; sled is pinned at 0.34.7.
///
/// The engine then hands the heap's free pages back to the OS after big
/// work ([`flotilla_engine::mem`]).
fn release_garbage(records: usize) {
    for _ in 0..records / 32 + 64 {
        ::sled::pin().flush();
    }
}

/// A sled batch that counts what goes into it.
#[derive(Default)]
struct Counted {
    batch: Batch,
    records: usize,
    bytes: u64,
}

impl Counted {
    fn put(&mut self, key: IVec, value: IVec) {
        self.records += 1;
        self.bytes += (key.len() + value.len()) as u64;
        self.batch.insert(key, value);
    }

    fn remove(&mut self, key: IVec) {
        self.records += 1;
        self.bytes += key.len() as u64;
        self.batch.remove(key);
    }
}

/// Splits `events` into packs: consecutive seqs, at most [`PACK`] events and
/// about [`PACK_BYTES`] of JSON each. Returns `(first seq, JSON array)`.
fn pack_events(task_id: &str, events: &[Event]) -> Result<Vec<(u64, IVec)>, StoreError> {
    let mut packs = Vec::with_capacity(events.len() / PACK + 1);
    let mut rest = events;
    while let Some(first) = rest.first() {
        let v = with_scratch(|buf| {
            buf.push(b'[');
            let mut n = 0;
            for (i, e) in rest.iter().enumerate() {
                if i > 0 && (e.seq != first.seq + i as u64 || i == PACK || buf.len() >= PACK_BYTES)
                {
                    break;
                }
                if i > 0 {
                    buf.push(b',');
                }
                serde_json::to_writer(&mut *buf, e).map_err(|err| {
                    StoreError::Invalid(format!("cannot encode events/{task_id}/{}: {err}", e.seq))
                })?;
                n += 1;
            }
            buf.push(b']');
            Ok::<_, StoreError>((n, compress(buf)))
        })?;
        packs.push((first.seq, v.1));
        rest = &rest[v.0..];
    }
    Ok(packs)
}

impl Store for SledStore {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        check_task_id(&task.id)?;
        let mut written = self.written();
        // Out of the memo until the commit is on disk: if it fails, the next
        // commit reads what is on disk again.
        let before = match written.remove(task.id.as_str()) {
            Some(w) => w,
            None => Written {
                plan_rev: None,
                generation: self.last_generation(&task.id)?,
                journal: None,
            },
        };
        let mut batch = Counted::default();
        let head = encode(&TaskHead::of(task), || format!("tasks/{}", task.id))?;
        batch.put(key_of(|b| task_key(b, TASK, &task.id)), head);

        let big = runs.len() >= RUN_PACK_MIN;
        let ending = !task.state.active();
        // The journal is written out before a generation opens (so every
        // journal record is of the current generation), when the task ends
        // (so an ended task's runs are all in `R` records and packs: point
        // reads never decode a journal), when it would grow past
        // `JOURNAL_MAX`, and on a task's first commit since the store opened.
        let write_out = match &before.journal {
            None => true,
            Some(j) => j.runs > 0 && (big || ending || j.runs + runs.len() > JOURNAL_MAX),
        };
        let mut journal = match before.journal {
            Some(mut j) if write_out => {
                for seq in j.first_seq..j.next_seq {
                    batch.remove(key_of(|b| journal_key(b, &task.id, seq)));
                }
                for (node, run) in std::mem::take(&mut j.newest) {
                    let k = key_of(|b| run_key(b, &task.id, &node));
                    batch.put(k, encode_run(before.generation, &run, &task.id)?);
                }
                RunJournal {
                    first_seq: j.next_seq,
                    next_seq: j.next_seq,
                    ..RunJournal::default()
                }
            }
            Some(j) => j,
            None => {
                let next_seq = self.write_out_journal(&task.id, &mut batch)?;
                RunJournal {
                    first_seq: next_seq,
                    next_seq,
                    ..RunJournal::default()
                }
            }
        };

        let generation = if big {
            let generation = before.generation.checked_add(1).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "task {} has run out of run-pack generations",
                    task.id
                ))
            })?;
            let mut sorted: Vec<&NodeRun> = runs.iter().collect();
            if !sorted.is_sorted_by(|a, b| a.node_id < b.node_id) {
                sorted.sort_by(|a, b| a.node_id.cmp(&b.node_id));
                sorted.dedup_by(|a, b| a.node_id == b.node_id);
            }
            for pack in sorted.chunks(RUN_PACK) {
                let first = &pack[0].node_id;
                let k = key_of(|b| pack_key(b, &task.id, generation, first));
                let v = encode_compressed(&pack, || {
                    format!("runpacks/{}/{generation}/{first}", task.id)
                })?;
                batch.put(k, v);
            }
            generation
        } else if ending {
            for run in runs {
                let k = key_of(|b| run_key(b, &task.id, &run.node_id));
                batch.put(k, encode_run(before.generation, run, &task.id)?);
            }
            before.generation
        } else {
            if !runs.is_empty() {
                let seq = journal.next_seq;
                let k = key_of(|b| journal_key(b, &task.id, seq));
                let v = encode_compressed(&(before.generation, runs), || {
                    format!("journal/{}/{seq}", task.id)
                })?;
                batch.put(k, v);
                journal.next_seq += 1;
                journal.runs += runs.len();
                for run in runs {
                    journal.newest.insert(run.node_id.clone(), run.clone());
                }
            }
            before.generation
        };
        for (first, v) in pack_events(&task.id, events)? {
            batch.put(key_of(|b| event_key(b, &task.id, first)), v);
        }
        let plan_written = before.plan_rev != Some(task.plan_rev);
        if plan_written {
            let plan = encode_compressed(&task.waves, || format!("plans/{}", task.id))?;
            batch.put(key_of(|b| task_key(b, PLAN, &task.id)), plan);
        }
        let Counted {
            batch,
            records,
            bytes,
        } = batch;
        {
            let moves = write_out.then(|| self.moves(&task.id));
            let _moving = moves
                .as_ref()
                .map(|m| m.write().unwrap_or_else(|e| e.into_inner()));
            self.tree
                .apply_batch(batch)
                .map_err(|e| self.io("commit failed", e))?;
        }
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if records >= BIG_BATCH {
            release_garbage(records);
        }
        if !task.state.active() {
            // Finished tasks are rarely committed again (their journal is
            // written out); a later commit writes the plan once more and
            // reads the generation back.
        } else {
            let now = Written {
                plan_rev: Some(task.plan_rev),
                generation,
                journal: Some(journal),
            };
            written.insert(task.id.clone(), now);
        }
        Ok(())
    }

    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let key = key_of(|b| task_key(b, TASK, id));
        match self.tree.get(&key) {
            Ok(Some(v)) => self.read_task(&key, &v).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(self.io(&format!("reading task {id}"), e)),
        }
    }

    fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        let mut tasks = Vec::new();
        for kv in self.tree.scan_prefix([TASK]) {
            let (k, v) = kv.map_err(|e| self.io("reading tasks", e))?;
            tasks.push(self.read_task(&k, &v)?);
        }
        // The scan is in id order: a stable sort by creation time gives (created_at, id).
        tasks.sort_by_key(|t| t.created_at);
        Ok(tasks)
    }

    fn task_heads(&self) -> Result<Vec<Task>, StoreError> {
        let mut tasks: Vec<Task> = Vec::new();
        for kv in self.tree.scan_prefix([TASK]) {
            let (k, v) = kv.map_err(|e| self.io("reading tasks", e))?;
            tasks.push(decode(&k, &v)?);
        }
        tasks.sort_by_key(|t| t.created_at);
        Ok(tasks)
    }

    fn task_list(&self) -> Result<Vec<(Task, usize)>, StoreError> {
        let mut list = Vec::new();
        for kv in self.tree.scan_prefix([TASK]) {
            let (k, v) = kv.map_err(|e| self.io("reading tasks", e))?;
            let task: Task = decode(&k, &v)?;
            // The waves counted, their node ids skipped (not built).
            let waves: Vec<serde::de::IgnoredAny> =
                decode(&plan_of(&k), &self.plan_bytes(&k, &task.id)?)?;
            list.push((task, waves.len()));
        }
        list.sort_by_key(|(t, _)| t.created_at);
        Ok(list)
    }

    fn runs(&self, task_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        if check_task_id(task_id).is_err() {
            return Ok(Vec::new());
        }
        // A run's value is the one of highest rank: (generation, kind) with
        // pack < `R` record < journal, and later records of one kind over
        // earlier ones. No write-out moves runs from the journal to `R`
        // records while this reads (`moves`); commits that add journal
        // records or packs may, and the read sees them or not.
        let moves = self.moves(task_id);
        let _reading = moves.read().unwrap_or_else(|e| e.into_inner());
        const PACKED: u8 = 0;
        const RECORD: u8 = 1;
        const JOURNALED: u8 = 2;
        let mut newest: BTreeMap<String, (u32, u8, NodeRun)> = BTreeMap::new();
        let mut offer = |generation: u32, kind: u8, run: NodeRun| match newest.get_mut(&run.node_id)
        {
            Some(have) if (have.0, have.1) > (generation, kind) => {}
            Some(have) => *have = (generation, kind, run),
            None => {
                newest.insert(run.node_id.clone(), (generation, kind, run));
            }
        };
        for record in self.journal(task_id) {
            let (_, generation, runs) = record?;
            for run in runs {
                offer(generation, JOURNALED, run);
            }
        }
        let prefix = key_of(|b| {
            task_key(b, RUN, task_id);
            b.push(SEP);
        });
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv.map_err(|e| self.io(&format!("reading runs of {task_id}"), e))?;
            let (generation, run) = decode_run(&k, &v)?;
            offer(generation, RECORD, run);
        }
        for pack in self.packs(task_id) {
            let (generation, k, v) = pack?;
            let runs: Vec<NodeRun> = decode(&k, &v)?;
            for run in runs {
                offer(generation, PACKED, run);
            }
        }
        Ok(newest.into_values().map(|(_, _, run)| run).collect())
    }

    fn run(&self, task_id: &str, node_id: &str) -> Result<Option<NodeRun>, StoreError> {
        if check_task_id(task_id).is_err() {
            return Ok(None);
        }
        let moves = self.moves(task_id);
        let _reading = moves.read().unwrap_or_else(|e| e.into_inner());
        // The journal, newest record first. Only an active task has one (see
        // `commit`): for an ended task this is one seek that finds nothing.
        let mut journaled = None;
        for record in self.journal(task_id).rev() {
            let (_, generation, runs) = record?;
            if let Some(run) = runs.into_iter().rev().find(|r| r.node_id == node_id) {
                journaled = Some((generation, run));
                break;
            }
        }
        let key = key_of(|b| run_key(b, task_id, node_id));
        let record = match self.tree.get(&key) {
            Ok(Some(v)) => Some(decode_run(&key, &v)?),
            Ok(None) => None,
            Err(e) => return Err(self.io(&format!("reading run {task_id}/{node_id}"), e)),
        };
        // A journaled run is newer than an `R` record of its generation.
        let record = match (journaled, record) {
            (Some(j), Some(r)) if r.0 > j.0 => Some(r),
            (Some(j), _) => Some(j),
            (None, r) => r,
        };
        // A pack of a later generation than the record is newer: from the
        // newest generation back, one seek each to the pack whose first node
        // is the last at or before `node_id`.
        let after = record.as_ref().map_or(1, |(g, _)| g + 1);
        for generation in (after..=self.last_generation(task_id)?).rev() {
            let lowest = key_of(|b| pack_key(b, task_id, generation, ""));
            let at = key_of(|b| pack_key(b, task_id, generation, node_id));
            let Some(kv) = self.tree.range(lowest..=at).next_back() else {
                continue;
            };
            let (k, v) = kv.map_err(|e| self.io(&format!("reading run {task_id}/{node_id}"), e))?;
            let runs = self.decoded_pack(&k, &v)?;
            if let Ok(i) = runs.binary_search_by(|r| r.node_id.as_str().cmp(node_id)) {
                return Ok(Some(runs[i].clone()));
            }
        }
        Ok(record.map(|(_, run)| run))
    }

    fn events(&self, task_id: &str, from_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        if limit == 0 || check_task_id(task_id).is_err() {
            return Ok(Vec::new());
        }
        let err = |e| self.io(&format!("reading events of {task_id}"), e);
        let lowest = key_of(|b| event_key(b, task_id, 0));
        let at = key_of(|b| event_key(b, task_id, from_seq));
        let end = key_of(|b| event_key(b, task_id, u64::MAX));
        // The pack holding `from_seq` starts at or before it.
        let start = match self.tree.range(lowest..=at.clone()).next_back() {
            Some(kv) => kv.map_err(err)?.0,
            None => at,
        };
        let mut events = Vec::with_capacity(limit.min(1024));
        for kv in self.tree.range(start..=end) {
            let (k, v) = kv.map_err(err)?;
            let pack: Vec<Event> = decode(&k, &v)?;
            for e in pack {
                if e.seq < from_seq || events.last().is_some_and(|l: &Event| e.seq <= l.seq) {
                    continue;
                }
                events.push(e);
                if events.len() == limit {
                    return Ok(events);
                }
            }
        }
        Ok(events)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| self.io("flushing", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_engine::store::memory::conformance as c;

    fn fresh() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn round_trip() {
        c::round_trip(&fresh().1);
    }

    #[test]
    fn runs_ordered_and_isolated() {
        c::runs_ordered_and_isolated(&fresh().1);
    }

    #[test]
    fn events_paging() {
        c::events_paging(&fresh().1);
    }

    #[test]
    fn tasks_oldest_first() {
        c::tasks_oldest_first(&fresh().1);
    }

    #[test]
    fn heads_leave_out_the_plan() {
        c::heads_leave_out_the_plan(&fresh().1);
    }

    #[test]
    fn plan_changes_are_kept() {
        c::plan_changes_are_kept(&fresh().1);
    }

    #[test]
    fn nul_in_task_id_is_refused() {
        c::nul_in_task_id_is_refused(&fresh().1);
    }

    #[test]
    fn big_and_small_commits_interleave() {
        let dir = tempfile::tempdir().unwrap();
        let want = {
            let store = SledStore::open(dir.path()).unwrap();
            let want = c::big_and_small_commits_interleave(&store);
            // Two generations of packs (1,200 and 700 runs; 1,200 runs are
            // three packs); the three runs of the first small commit were
            // journaled, then written out as records before the second
            // generation opened; the last small commit is journaled.
            let count = |kind: u8| store.tree.scan_prefix([kind]).count();
            assert_eq!((count(RUN_PACKS), count(RUN), count(JOURNAL)), (5, 3, 1));
            want
        };
        // The generation is read back from disk: a big commit after a
        // reopen still wins over everything before it.
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.runs("t1").unwrap(), want);
        let t = c::task("t1", 1);
        let newer: Vec<NodeRun> = (0..300)
            .map(|i| c::run(&format!("n{i:04}"), "1.12", 9))
            .collect();
        store.commit(&t, &newer, &[]).unwrap();
        assert_eq!(store.run("t1", "n0005").unwrap().as_ref(), Some(&newer[5]));
        assert_eq!(store.runs("t1").unwrap()[..300], newer[..]);
        assert_eq!(store.runs("t1").unwrap()[300..], want[300..]);
    }

    /// Small commits `from..to` of an active task, as agents' reports make
    /// them: each a few nodes, nodes coming back in later commits. Returns
    /// the runs they wrote, as they should read now.
    fn report_like_commits(
        store: &SledStore,
        t: &Task,
        (from, to): (u64, u64),
    ) -> BTreeMap<String, NodeRun> {
        let mut want = BTreeMap::new();
        for i in from..to {
            let runs: Vec<NodeRun> = (0..7)
                .map(|k| c::run(&format!("n{:04}", (i * 5 + k * 3) % 997), "1.12", i))
                .collect();
            store
                .commit(t, &runs, &[c::event(i, "node.report")])
                .unwrap();
            for r in runs {
                want.insert(r.node_id.clone(), r);
            }
        }
        want
    }

    fn reads_as(store: &SledStore, task: &str, want: &BTreeMap<String, NodeRun>) {
        let all: Vec<NodeRun> = want.values().cloned().collect();
        assert_eq!(store.runs(task).unwrap(), all);
        for node in ["n0000", "n0003", "n0500", "n0996"] {
            assert_eq!(
                store.run(task, node).unwrap().as_ref(),
                want.get(node),
                "{node}"
            );
        }
        assert_eq!(store.run(task, "n0997").unwrap(), None);
    }

    #[test]
    fn small_commits_are_journaled_and_read_back_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = c::task("t1", 1);
        let count = |store: &SledStore, kind: u8| store.tree.scan_prefix([kind]).count();
        let want = {
            let store = SledStore::open(dir.path()).unwrap();
            let want = report_like_commits(&store, &t, (0, 300));
            // One journal record per commit and no run record yet.
            assert_eq!((count(&store, JOURNAL), count(&store, RUN)), (300, 0));
            reads_as(&store, "t1", &want);
            want
        };
        // What an earlier process journaled reads back, and the first
        // commit after the reopen writes it out.
        let store = SledStore::open(dir.path()).unwrap();
        reads_as(&store, "t1", &want);
        let mut want = want;
        let more = report_like_commits(&store, &t, (300, 301));
        want.extend(more);
        assert_eq!(count(&store, JOURNAL), 1);
        assert_eq!(count(&store, RUN), 997);
        reads_as(&store, "t1", &want);
        assert_eq!(store.events("t1", 0, 1000).unwrap().len(), 301);
    }

    /// A store dropped and opened again at once, as a restarted runner in
    /// one process does (and the test above): sled writes its last buffers
    /// from its own thread pool, whose jobs keep the database file (and so
    /// its lock) open for a moment after the handle is dropped. The reopen
    /// must wait that moment out rather than find the store "locked".
    #[test]
    fn a_store_reopened_right_after_a_drop_is_never_locked() {
        let dir = tempfile::tempdir().unwrap();
        let t = c::task("t1", 1);
        // Load on the other cores widens the window, as a busy machine does.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        let mut failures = Vec::new();
        for round in 0..300u64 {
            match SledStore::open(dir.path()) {
                Ok(store) => {
                    report_like_commits(&store, &t, (round * 3, round * 3 + 3));
                }
                Err(e) => failures.push(format!("round {round}: {e}")),
            }
        }
        stop.store(true, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn the_journal_is_written_out_when_full_and_when_the_task_ends() {
        let (_dir, store) = fresh();
        let count = |kind: u8| store.tree.scan_prefix([kind]).count();
        let mut t = c::task("t1", 1);
        // 7 runs a commit: the journal is written out every
        // JOURNAL_MAX / 7 commits.
        let per_write_out = (JOURNAL_MAX / 7) as u64;
        let mut want = report_like_commits(&store, &t, (0, per_write_out + 10));
        assert_eq!(count(JOURNAL), 10);
        assert_eq!(count(RUN), 997);
        reads_as(&store, "t1", &want);
        // The last commit of the task: nothing is left in the journal, and
        // its own runs are run records.
        t.state = TaskState::Succeeded;
        let last = vec![c::run("n0003", "1.13", 9999), c::run("n0998", "1.13", 9999)];
        store.commit(&t, &last, &[]).unwrap();
        for r in last {
            want.insert(r.node_id.clone(), r);
        }
        assert_eq!(count(JOURNAL), 0);
        assert_eq!(count(RUN), 998);
        let all: Vec<NodeRun> = want.values().cloned().collect();
        assert_eq!(store.runs("t1").unwrap(), all);
        assert_eq!(
            store.run("t1", "n0003").unwrap().as_ref(),
            want.get("n0003")
        );
        assert_eq!(
            store.run("t1", "n0998").unwrap().as_ref(),
            want.get("n0998")
        );
    }

    /// A reader never sees a run older than what was committed before its
    /// read began, while write-outs move runs from the journal to records.
    #[test]
    fn reads_during_write_outs_never_go_back() {
        use std::sync::atomic::AtomicU64;
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        let t = c::task("t1", 1);
        // Round r updates the 10 nodes k with k % 5 == r % 5; ~6 write-outs.
        let rounds: u64 = (JOURNAL_MAX as u64 / 10) * 6;
        let node = |k: u64| format!("n{k:02}");
        let committed = Arc::new(AtomicU64::new(0));
        let writer = {
            let (store, committed, t) = (store.clone(), committed.clone(), t.clone());
            std::thread::spawn(move || {
                for r in 1..=rounds {
                    let runs: Vec<NodeRun> = (0..50)
                        .filter(|k| k % 5 == r % 5)
                        .map(|k| c::run(&node(k), "1.12", r))
                        .collect();
                    store.commit(&t, &runs, &[]).unwrap();
                    committed.store(r, Ordering::SeqCst);
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() {
            let floor = committed.load(Ordering::SeqCst);
            let runs = store.runs("t1").unwrap();
            for k in 0..50 {
                // The last round at or before `floor` that updated node k.
                let want = (1..=floor).rev().find(|r| r % 5 == k % 5).unwrap_or(0);
                let got = runs
                    .iter()
                    .find(|r| r.node_id == node(k))
                    .map_or(0, |r| r.updated_at);
                assert!(
                    got >= want,
                    "{}: read {got} after round {want} was committed",
                    node(k)
                );
            }
            reads += 1;
        }
        writer.join().unwrap();
        assert!(reads > 10, "only {reads} reads overlapped the writes");
    }

    #[test]
    fn a_read_of_one_task_holds_up_write_outs_of_that_task_only() {
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let (_dir, store) = fresh();
        let store = Arc::new(store);
        // A read of task a in progress. A task's first commit since the
        // store opened writes its journal out.
        let held = store.moves("a");
        let reading = held.read().unwrap();
        let commit_in_thread = |id: &'static str| {
            let (store, (tx, rx)) = (store.clone(), channel());
            std::thread::spawn(move || {
                store
                    .commit(&c::task(id, 1), &[c::run("n1", "1", 1)], &[])
                    .unwrap();
                tx.send(()).unwrap();
            });
            rx
        };
        commit_in_thread("b")
            .recv_timeout(Duration::from_secs(10))
            .expect("task b's write-out waited for a read of task a");
        let a = commit_in_thread("a");
        assert!(
            a.recv_timeout(Duration::from_millis(200)).is_err(),
            "task a's write-out did not wait for the read of task a"
        );
        drop(reading);
        a.recv_timeout(Duration::from_secs(10))
            .expect("task a's commit after the read ended");
        assert_eq!(store.runs("a").unwrap(), vec![c::run("n1", "1", 1)]);
    }

    #[test]
    fn a_run_written_by_an_older_version_still_reads() {
        let (_dir, store) = fresh();
        let old = c::run("n1", "1.12", 1);
        store
            .tree
            .insert(b"Rt1\0n1", serde_json::to_vec(&old).unwrap())
            .unwrap();
        assert_eq!(store.runs("t1").unwrap(), vec![old.clone()]);
        assert_eq!(store.run("t1", "n1").unwrap(), Some(old));
    }

    #[test]
    fn reopen_after_drop_sees_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut t1 = c::task("t1", 1);
        t1.waves = c::waves(&[("canary", &["n000"]), ("rest", &["n001", "n002"])]);
        let t2 = c::task("t2", 2);
        let runs: Vec<NodeRun> = (0..50)
            .map(|i| c::run(&format!("n{i:03}"), "1.12", 1))
            .collect();
        let events: Vec<Event> = (0..20).map(|s| c::event(s, "node.report")).collect();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.commit(&t1, &runs[..25], &events[..10]).unwrap();
            store.commit(&t2, &runs[..5], &[]).unwrap();
            t1.waves[1].nodes.push("n003".into());
            t1.plan_rev += 1;
            t1.updated_at = 3;
            store.commit(&t1, &runs[25..], &events[10..]).unwrap();
            // No explicit flush: dropping the store must not lose commits.
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.tasks().unwrap(), vec![t1, t2]);
        assert_eq!(store.runs("t1").unwrap(), runs);
        assert_eq!(store.runs("t2").unwrap(), runs[..5]);
        assert_eq!(store.events("t1", 0, 100).unwrap(), events);
        assert!(store.events("t2", 0, 100).unwrap().is_empty());
    }

    #[test]
    fn corrupt_values_name_their_key() {
        let (_dir, store) = fresh();
        store
            .commit(
                &c::task("t1", 1),
                &[c::run("n1", "1", 1)],
                &[c::event(7, "x")],
            )
            .unwrap();
        // Test-only path: write garbage straight into the tree.
        store.tree.insert(b"Rt1\0n1", &b"\xffgarbage"[..]).unwrap();
        store
            .tree
            .insert(b"Et1\0\0\0\0\0\0\0\0\x07", &b"[{\"seq\":"[..])
            .unwrap();
        store.tree.insert(b"Tt1", &b"[]"[..]).unwrap();

        let corrupt = |r: Result<_, StoreError>| match r {
            Err(StoreError::Corrupt { key, reason }) => {
                assert!(!reason.is_empty());
                key
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        };
        assert_eq!(corrupt(store.runs("t1").map(drop)), "runs/t1/n1");
        assert_eq!(corrupt(store.events("t1", 0, 10).map(drop)), "events/t1/7");
        assert_eq!(corrupt(store.task("t1").map(drop)), "tasks/t1");
        assert_eq!(corrupt(store.tasks().map(drop)), "tasks/t1");
        let err = store.task("t1").unwrap_err().to_string();
        assert!(
            err.starts_with("storage: corrupt record tasks/t1: "),
            "{err}"
        );

        // A task whose plan is garbage, then missing.
        store.commit(&c::task("t2", 2), &[], &[]).unwrap();
        store.tree.insert(b"Pt2", &b"{}"[..]).unwrap();
        assert_eq!(corrupt(store.task("t2").map(drop)), "plans/t2");
        store.tree.remove(b"Pt2").unwrap();
        assert_eq!(corrupt(store.task("t2").map(drop)), "plans/t2");
    }

    #[test]
    fn events_are_packed_and_page_across_packs() {
        let (_dir, store) = fresh();
        let t = c::task("t1", 1);
        // 1000 events in one commit (several packs), then 3 commits of one.
        let all: Vec<Event> = (0..1003).map(|s| c::event(s, "node.queued")).collect();
        store.commit(&t, &[], &all[..1000]).unwrap();
        for e in &all[1000..] {
            store.commit(&t, &[], std::slice::from_ref(e)).unwrap();
        }
        let records = store.tree.scan_prefix(b"Et1\0").count();
        assert!(records < 20, "{records} records for 1003 events");
        for from in [0, 1, 127, 128, 129, 500, 999, 1000, 1001, 1002] {
            for limit in [1, 7, 128, 2000] {
                let want: Vec<Event> = all.iter().skip(from).take(limit).cloned().collect();
                assert_eq!(
                    store.events("t1", from as u64, limit).unwrap(),
                    want,
                    "from {from} limit {limit}"
                );
            }
        }
        assert!(store.events("t1", 1003, 10).unwrap().is_empty());
    }

    #[test]
    fn a_store_of_the_old_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = ::sled::open(dir.path()).unwrap();
            db.open_tree("runs")
                .unwrap()
                .insert(b"t1\0n1", &b"{}"[..])
                .unwrap();
            db.flush().unwrap();
        }
        let err = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("older Flotilla"), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_a_clear_error() {
        let (dir, _store) = fresh();
        let err = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is locked"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn an_unusable_dir_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = SledStore::open(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
    }
}
