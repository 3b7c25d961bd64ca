//! The audit log: one record per state-changing management call (every
//! method but GET, refused ones included) and per webhook delivery: when,
//! who (token name, `hook:NAME`, or `-` for an unknown token), what (method,
//! path, the object: task id, release, policy, node, token name) and the
//! outcome (status, and the refusal's reason).
//!
//! Records live in the `audit` tree of the runner's database, keyed by a
//! sequence number (zero-padded, so key order is call order), and only the
//! last `audit_keep` are kept.
//!
//! Written before the change: a call that passed the token check first
//! stores its record as `pending`, then runs; a store fault there answers
//! 503 and the call does not run. The handler's own flush makes the record
//! durable with the change it records. Its outcome is filled in afterwards
//! (best effort: if that write fails the record stays `pending`, which says
//! the call was attempted and its outcome is unknown). A refused call (401,
//! 403) is recorded once, with its outcome; a fault writing that record is
//! logged and the refusal answered all the same (it changed nothing).

use crate::error::ApiError;
use flotilla_engine::store::StoreError;
use flotilla_store_sled::{Kv, SledStore};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// `audit_keep`'s default.
pub const DEFAULT_KEEP: u64 = 100_000;
/// The most records one `GET /v1/audit` returns.
pub const MAX_PAGE: usize = 1000;

pub use flotilla_model::{AuditPage, AuditRecord};

pub struct Audit {
    kv: Kv,
    next: AtomicU64,
    keep: u64,
    /// Tests make writes fail with it (a store fault).
    fail: AtomicBool,
}

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Longest path and reason kept in a record.
const MAX_TEXT: usize = 512;

fn bounded(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Audit {
    /// Opens the log and drops records beyond the last `keep`.
    pub fn open(store: &SledStore, keep: u64) -> Result<Audit, StoreError> {
        let kv = store.kv("audit")?;
        let last = kv
            .last_key()?
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        if last > keep {
            kv.remove_before(&key(last - keep + 1))?;
        }
        Ok(Audit {
            kv,
            next: AtomicU64::new(last + 1),
            keep,
            fail: AtomicBool::new(false),
        })
    }

    #[doc(hidden)]
    pub fn inject_fault(&self, on: bool) {
        self.fail.store(on, Ordering::SeqCst);
    }

    fn put(&self, rec: &AuditRecord) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::io("audit", "injected fault"));
        }
        self.kv.put(&key(rec.seq), rec)
    }

    /// Stores a new record (unflushed) and returns it with its `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &self,
        at: u64,
        who: &str,
        method: &str,
        path: &str,
        object: Option<String>,
        status: Option<u16>,
        reason: Option<String>,
    ) -> Result<AuditRecord, StoreError> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        let rec = AuditRecord {
            seq,
            at,
            who: who.into(),
            method: method.into(),
            path: bounded(path.into()),
            object: object.map(bounded),
            status,
            outcome: AuditRecord::outcome_of(status).into(),
            reason: reason.map(bounded),
        };
        self.put(&rec)?;
        if seq > self.keep {
            self.kv.remove(&key(seq - self.keep))?;
        }
        Ok(rec)
    }

    /// Fills in a pending record's outcome.
    pub fn finish(
        &self,
        mut rec: AuditRecord,
        object: Option<String>,
        status: u16,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        if object.is_some() {
            rec.object = object.map(bounded);
        }
        rec.status = Some(status);
        rec.outcome = AuditRecord::outcome_of(Some(status)).into();
        rec.reason = reason.map(bounded);
        self.put(&rec)
    }

    /// Records after `after` (exclusive; 0 = from the oldest kept), or with
    /// `after` `None` the newest `limit`, oldest first.
    pub fn page(&self, after: Option<u64>, limit: usize) -> Result<AuditPage, ApiError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let rows: Vec<(String, AuditRecord)> = match after {
            Some(a) => self.kv.after(&key(a), limit + 1)?,
            None => self.kv.last_n(limit)?,
        };
        let more = after.is_some() && rows.len() > limit;
        let items: Vec<AuditRecord> = rows.into_iter().take(limit).map(|(_, r)| r).collect();
        let next = items.last().map(|r| r.seq).unwrap_or(after.unwrap_or(0));
        Ok(AuditPage { items, next, more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_last_n_in_order_and_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("db")).unwrap();
        let audit = Audit::open(&store, 5).unwrap();
        for i in 0..8u64 {
            let r = audit
                .append(i, "ci", "POST", "/v1/tasks", None, None, None)
                .unwrap();
            audit.finish(r, Some(format!("t{i}")), 201, None).unwrap();
        }
        let all = audit.page(Some(0), 100).unwrap();
        assert_eq!(
            all.items.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5, 6, 7, 8]
        );
        assert!(!all.more);
        let p1 = audit.page(Some(0), 2).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert!(p1.more);
        let p2 = audit.page(Some(p1.next), 2).unwrap();
        assert_eq!(p2.items[0].seq, 6);
        let newest = audit.page(None, 2).unwrap();
        assert_eq!(
            newest.items.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [7, 8]
        );
        assert_eq!(newest.items[1].object.as_deref(), Some("t7"));
        assert_eq!(newest.items[1].outcome, "ok");
        drop(audit);
        // Reopened with a smaller bound: the oldest go, numbering goes on.
        let audit = Audit::open(&store, 2).unwrap();
        assert_eq!(audit.page(Some(0), 100).unwrap().items.len(), 2);
        let r = audit
            .append(9, "-", "DELETE", "/v1/tokens/x", None, Some(401), None)
            .unwrap();
        assert_eq!((r.seq, r.outcome.as_str()), (9, "refused"));
    }
}
