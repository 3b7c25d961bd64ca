//! An in-memory `Store` for tests and simulation: the same contract as the
//! sled store (atomic commits, runs ordered by node id, events paged by seq),
//! nothing on disk. One mutex guards all three maps, so a commit is atomic.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{Store, StoreError};
use flotilla_model::{Event, NodeRun, Task};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: BTreeMap<String, Task>,
    /// Task id → node id → run.
    runs: BTreeMap<String, BTreeMap<String, NodeRun>>,
    /// Task id → seq → event.
    events: BTreeMap<String, BTreeMap<u64, Event>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A commit only inserts clones, so a panic elsewhere while holding the
        // lock cannot leave a half-applied commit worth refusing to read.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Task ids are key prefixes in the sled store (`task \0 ...`); refuse a NUL in
/// both stores so simulation behaves like production.
pub fn check_task_id(id: &str) -> Result<(), StoreError> {
    if id.as_bytes().contains(&0) {
        return Err(StoreError::Invalid(format!(
            "task id {id:?} contains a NUL byte, which the store cannot key"
        )));
    }
    Ok(())
}

/// Overwrites `stored` with `new`, cloning the plan only when it changed: the
/// engine commits the whole task on every tick, and a plan of 100,000 nodes
/// costs far more to clone than to compare. Destructured exhaustively, so a new
/// `Task` field does not compile until it is copied here.
fn update_task(stored: &mut Task, new: &Task) {
    let Task {
        id,
        spec,
        state,
        target_version,
        waves,
        plan_rev,
        current_wave,
        soak_until,
        awaiting_approval,
        draining,
        policy_sha256,
        created_at,
        updated_at,
    } = new;
    stored.id.clone_from(id);
    stored.spec.clone_from(spec);
    stored.state.clone_from(state);
    stored.target_version.clone_from(target_version);
    if stored.plan_rev != *plan_rev || stored.waves.len() != waves.len() {
        stored.waves.clone_from(waves);
    }
    stored.plan_rev = *plan_rev;
    stored.current_wave = *current_wave;
    stored.soak_until = *soak_until;
    stored.awaiting_approval = *awaiting_approval;
    stored.draining = *draining;
    stored.policy_sha256.clone_from(policy_sha256);
    stored.created_at = *created_at;
    stored.updated_at = *updated_at;
}

impl Store for MemoryStore {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        check_task_id(&task.id)?;
        let mut inner = self.lock();
        let inner = &mut *inner;
        match inner.tasks.get_mut(&task.id) {
            Some(t) => update_task(t, task),
            None => {
                inner.tasks.insert(task.id.clone(), task.clone());
            }
        }
        if !runs.is_empty() {
            if !inner.runs.contains_key(&task.id) {
                inner.runs.insert(task.id.clone(), BTreeMap::new());
            }
            let of_task = inner.runs.get_mut(&task.id).expect("inserted above");
            for run in runs {
                match of_task.get_mut(&run.node_id) {
                    Some(r) => r.clone_from(run),
                    None => {
                        of_task.insert(run.node_id.clone(), run.clone());
                    }
                }
            }
        }
        if !events.is_empty() {
            if !inner.events.contains_key(&task.id) {
                inner.events.insert(task.id.clone(), BTreeMap::new());
            }
            let of_task = inner.events.get_mut(&task.id).expect("inserted above");
            for event in events {
                of_task.insert(event.seq, event.clone());
            }
        }
        Ok(())
    }

    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        Ok(self.lock().tasks.get(id).cloned())
    }

    fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        let mut tasks: Vec<Task> = self.lock().tasks.values().cloned().collect();
        // Already in id order: a stable sort by creation time gives (created_at, id).
        tasks.sort_by_key(|t| t.created_at);
        Ok(tasks)
    }

    fn runs(&self, task_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        Ok(self
            .lock()
            .runs
            .get(task_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    fn run(&self, task_id: &str, node_id: &str) -> Result<Option<NodeRun>, StoreError> {
        Ok(self
            .lock()
            .runs
            .get(task_id)
            .and_then(|m| m.get(node_id).cloned()))
    }

    fn events(&self, task_id: &str, from_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .lock()
            .events
            .get(task_id)
            .map(|m| {
                m.range(from_seq..)
                    .take(limit)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The contract every `Store` must meet, run against both implementations.
#[cfg(any(test, feature = "conformance"))]
pub mod conformance {
    use super::super::{Store, StoreError};
    use flotilla_model::{Event, NodeRun, RunState, Task, TaskSpec, TaskState, Wave};

    pub fn task(id: &str, created_at: u64) -> Task {
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "name": "t1",
            "package": "edgecore",
            "target": {"version": "1.13"},
            "policy": "canary",
        }))
        .unwrap();
        Task {
            id: id.into(),
            spec,
            state: TaskState::Scheduled,
            target_version: Some("1.13".into()),
            waves: Vec::new(),
            plan_rev: 0,
            current_wave: 0,
            soak_until: None,
            awaiting_approval: false,
            draining: false,
            policy_sha256: Some("ab".repeat(32)),
            created_at,
            updated_at: created_at,
        }
    }

    pub fn run(node: &str, from: &str, now: u64) -> NodeRun {
        NodeRun::new(node, from, now)
    }

    pub fn event(seq: u64, kind: &str) -> Event {
        Event {
            seq,
            at: 1000 + seq,
            node: seq.is_multiple_of(2).then(|| format!("n{seq}")),
            kind: kind.into(),
            detail: format!("detail {seq}"),
            policy_sha256: None,
        }
    }

    pub fn round_trip(store: &dyn Store) {
        let mut t = task("task-1", 10);
        let runs = vec![run("n1", "1.12", 10), run("n2", "1.11", 10)];
        let events = vec![event(0, "task.created"), event(1, "task.start")];
        store.commit(&t, &runs, &events).unwrap();
        assert_eq!(store.task("task-1").unwrap().as_ref(), Some(&t));
        assert_eq!(store.task("task-2").unwrap(), None);
        assert_eq!(store.runs("task-1").unwrap(), runs);
        assert_eq!(store.events("task-1", 0, 100).unwrap(), events);

        // A later commit overwrites the task and the runs it names, keeps the rest.
        t.state = TaskState::Running;
        t.updated_at = 20;
        let mut n2 = runs[1].clone();
        n2.state = RunState::Queued { wave: 0 };
        n2.updated_at = 20;
        store
            .commit(&t, std::slice::from_ref(&n2), &[event(2, "node.queued")])
            .unwrap();
        assert_eq!(
            store.task("task-1").unwrap().unwrap().state,
            TaskState::Running
        );
        assert_eq!(store.runs("task-1").unwrap(), vec![runs[0].clone(), n2]);
        assert_eq!(store.events("task-1", 0, 100).unwrap().len(), 3);
        assert_eq!(store.tasks().unwrap(), vec![t]);
        store.flush().unwrap();
    }

    /// Big commits (a store may write them differently, e.g. packed) and
    /// small ones interleave: every run reads back as its newest write, in
    /// `runs` and in point reads. Returns the runs expected.
    pub fn big_and_small_commits_interleave(store: &dyn Store) -> Vec<NodeRun> {
        let t = task("t1", 1);
        let at = |i: usize, now: u64| run(&format!("n{i:04}"), "1.12", now);
        let mut want: Vec<NodeRun> = (0..1200).map(|i| at(i, 1)).collect();
        store.commit(&t, &want, &[]).unwrap();
        let small: Vec<NodeRun> = [5, 600, 1199].iter().map(|&i| at(i, 2)).collect();
        store.commit(&t, &small, &[]).unwrap();
        // Out of order on purpose: a store must not rely on sorted input.
        let mut big: Vec<NodeRun> = (500..1200).rev().map(|i| at(i, 3)).collect();
        store.commit(&t, &big, &[]).unwrap();
        store.commit(&t, &[at(600, 4)], &[]).unwrap();
        big.reverse();
        want[5] = at(5, 2);
        want[500..].clone_from_slice(&big);
        want[600] = at(600, 4);
        assert_eq!(store.runs("t1").unwrap(), want);
        for i in [0, 5, 499, 500, 511, 512, 600, 1023, 1024, 1199] {
            assert_eq!(
                store.run("t1", &format!("n{i:04}")).unwrap().as_ref(),
                Some(&want[i]),
                "n{i:04}"
            );
        }
        for absent in ["n", "n0000x", "n1200", "m0001", "o"] {
            assert_eq!(store.run("t1", absent).unwrap(), None, "{absent}");
        }
        assert!(store.runs("t").unwrap().is_empty());
        want
    }

    pub fn runs_ordered_and_isolated(store: &dyn Store) {
        let a = task("a", 1);
        let ab = task("ab", 2);
        // Committed out of order; node ids shared between the two tasks.
        let ids = ["n10", "n2", "m", "n1", "z", "n1-x"];
        let runs_a: Vec<NodeRun> = ids.iter().map(|id| run(id, "a", 1)).collect();
        let runs_ab: Vec<NodeRun> = ids.iter().map(|id| run(id, "ab", 2)).collect();
        store.commit(&a, &runs_a, &[]).unwrap();
        store.commit(&ab, &runs_ab[..3], &[]).unwrap();
        store.commit(&ab, &runs_ab[3..], &[]).unwrap();

        let mut sorted: Vec<&str> = ids.to_vec();
        sorted.sort();
        for (tid, from) in [("a", "a"), ("ab", "ab")] {
            let got = store.runs(tid).unwrap();
            let got_ids: Vec<&str> = got.iter().map(|r| r.node_id.as_str()).collect();
            assert_eq!(got_ids, sorted, "task {tid}");
            assert!(
                got.iter().all(|r| r.from_version == from),
                "task {tid}: {got:?}"
            );
        }
        assert!(store.runs("b").unwrap().is_empty());
        assert!(store.runs("").unwrap().is_empty());
        // Point reads: the run of that task only.
        assert_eq!(store.run("ab", "n1").unwrap().unwrap().from_version, "ab");
        assert_eq!(store.run("a", "n1").unwrap().unwrap().from_version, "a");
        assert!(store.run("a", "n1-").unwrap().is_none());
        assert!(store.run("b", "n1").unwrap().is_none());
    }

    pub fn events_paging(store: &dyn Store) {
        let t = task("paged", 1);
        let other = task("paged-2", 1);
        // 300 events in three commits (crossing the one-byte boundary of the
        // big-endian seq, 255 → 256), plus noise in another task.
        let all: Vec<Event> = (0..300).map(|s| event(s, "node.report")).collect();
        store.commit(&t, &[], &all[..100]).unwrap();
        store.commit(&other, &[], &all[..50]).unwrap();
        store.commit(&t, &[], &all[200..]).unwrap();
        store.commit(&t, &[], &all[100..200]).unwrap();

        assert_eq!(store.events("paged", 0, usize::MAX).unwrap(), all);
        assert_eq!(store.events("paged", 0, 10).unwrap(), all[..10]);
        assert_eq!(store.events("paged", 250, 10).unwrap(), all[250..260]);
        assert_eq!(store.events("paged", 255, 3).unwrap(), all[255..258]);
        assert_eq!(store.events("paged", 295, 10).unwrap(), all[295..]);
        assert!(store.events("paged", 300, 10).unwrap().is_empty());
        assert!(store.events("paged", u64::MAX, 10).unwrap().is_empty());
        assert!(store.events("paged", 0, 0).unwrap().is_empty());
        assert_eq!(store.events("paged-2", 0, 1000).unwrap(), all[..50]);
        assert!(store.events("page", 0, 1000).unwrap().is_empty());

        // Paging by `last seq + 1` visits every event exactly once.
        let mut seen = Vec::new();
        let mut from = 0;
        loop {
            let page = store.events("paged", from, 7).unwrap();
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            seen.extend(page);
        }
        assert_eq!(seen, all);
    }

    pub fn heads_leave_out_the_plan(store: &dyn Store) {
        let mut t1 = task("t1", 2);
        t1.waves = waves(&[("canary", &["n000"]), ("rest", &["n001", "n002"])]);
        let t2 = task("t2", 1);
        store.commit(&t1, &[], &[]).unwrap();
        store.commit(&t2, &[], &[]).unwrap();
        let heads = store.task_heads().unwrap();
        let mut want = store.tasks().unwrap();
        assert_eq!(want[1].waves.len(), 2, "the plan is stored");
        want[1].waves.clear();
        assert_eq!(heads, want);
        assert_eq!(heads[0].id, "t2");
        let list = store.task_list().unwrap();
        let counts: Vec<(&str, usize)> = list.iter().map(|(t, n)| (t.id.as_str(), *n)).collect();
        assert_eq!(counts, [("t2", 0), ("t1", 2)]);
        let list_heads: Vec<Task> = list.into_iter().map(|(t, _)| t).collect();
        assert_eq!(list_heads, heads);
    }

    pub fn tasks_oldest_first(store: &dyn Store) {
        // created_at first, then id; the ids' own order disagrees.
        for (id, at) in [("c", 5), ("a", 7), ("b", 5), ("d", 1)] {
            store.commit(&task(id, at), &[], &[]).unwrap();
        }
        let ids: Vec<String> = store.tasks().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["d", "b", "c", "a"]);
    }

    pub fn waves(names_and_nodes: &[(&str, &[&str])]) -> Vec<Wave> {
        names_and_nodes
            .iter()
            .map(|(name, nodes)| Wave {
                name: (*name).into(),
                nodes: nodes.iter().map(|n| (*n).into()).collect(),
                concurrency: 0,
                soak_seconds: 0,
                needs_approval: false,
            })
            .collect()
    }

    /// The plan is stored apart and rewritten only when `plan_rev` moved:
    /// every change, including one back to an earlier plan, must be kept.
    pub fn plan_changes_are_kept(store: &dyn Store) {
        let mut t = task("planned", 1);
        let first = waves(&[("canary", &["n1"]), ("rest", &["n2", "n3"])]);
        t.waves = first.clone();
        t.plan_rev += 1;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(store.task("planned").unwrap().unwrap().waves, first);

        // Same plan, other fields change.
        t.current_wave = 1;
        t.updated_at = 2;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(store.task("planned").unwrap().unwrap(), t);

        // One node id changes inside a wave.
        t.waves[1].nodes[1] = "n4".into();
        t.plan_rev += 1;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(
            store.task("planned").unwrap().unwrap().waves[1].nodes,
            ["n2", "n4"]
        );

        // Back to the first plan, then an appended wave (increment tasks).
        t.waves = first.clone();
        t.plan_rev += 1;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(store.task("planned").unwrap().unwrap().waves, first);
        t.waves.extend(waves(&[("late", &["n9"])]));
        t.plan_rev += 1;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(store.tasks().unwrap(), vec![t.clone()]);

        // A finished task, then (unusually) committed again with a new plan.
        t.state = TaskState::Succeeded;
        store.commit(&t, &[], &[]).unwrap();
        t.waves.clear();
        t.plan_rev += 1;
        store.commit(&t, &[], &[]).unwrap();
        assert_eq!(store.task("planned").unwrap().unwrap(), t);
    }

    pub fn nul_in_task_id_is_refused(store: &dyn Store) {
        let err = store
            .commit(&task("a\0b", 1), &[run("n", "1", 1)], &[])
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Invalid(m) if m.contains("NUL")),
            "{err}"
        );
        assert!(store.tasks().unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::conformance as c;
    use super::*;

    #[test]
    fn round_trip() {
        c::round_trip(&MemoryStore::new());
    }

    #[test]
    fn runs_ordered_and_isolated() {
        c::runs_ordered_and_isolated(&MemoryStore::new());
    }

    #[test]
    fn events_paging() {
        c::events_paging(&MemoryStore::new());
    }

    #[test]
    fn tasks_oldest_first() {
        c::tasks_oldest_first(&MemoryStore::new());
    }

    #[test]
    fn heads_leave_out_the_plan() {
        c::heads_leave_out_the_plan(&MemoryStore::new());
    }

    #[test]
    fn plan_changes_are_kept() {
        c::plan_changes_are_kept(&MemoryStore::new());
    }

    #[test]
    fn nul_in_task_id_is_refused() {
        c::nul_in_task_id_is_refused(&MemoryStore::new());
    }

    #[test]
    fn big_and_small_commits_interleave() {
        c::big_and_small_commits_interleave(&MemoryStore::new());
    }
}
