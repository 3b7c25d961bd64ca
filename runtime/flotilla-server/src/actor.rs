//! The engine's own thread. Handlers send jobs; the thread takes every job
//! that is waiting as one batch (held open while more follow closely, see
//! `LINGER_GAP`), applies it (agent reports through
//! `Engine::report_many_for`, operator calls in order, then a tick when one is
//! due) and hands it to the flusher thread, which flushes the store once for
//! every batch applied since its last flush, and only then answers the
//! callers and hands new work to the agents, batch by batch in order. One
//! flush covers a whole burst of reports (group commit), nothing is
//! acknowledged or sent before it is on disk, and the engine thread takes
//! the next batch while the previous one is being flushed (sled's
//! `apply_batch` itself waits for a flush in progress, but gathering the
//! jobs, the engine's work in memory, encoding the records and answering
//! the callers overlap it).

use super::agents::Outbox;
use super::error::ApiError;
use super::inventory::Inventory;
use super::metrics::Metrics;
use flotilla_engine::store::{Store, StoreError};
use flotilla_engine::{Command, Engine, EngineError};
use flotilla_model::protocol::{Report, ReportState};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Largest batch taken at once.
const BATCH: usize = 8192;
/// After reports, the next tick comes at most this soon (a finished wave
/// moves on quickly without ticking on every batch: a tick walks the current
/// wave, ~6 ms at 10,000 nodes, so ticking every 20 ms under a stream of
/// reports cost a third of the engine thread).
const TICK_AFTER_REPORTS: Duration = Duration::from_millis(100);
/// Group commit: after a job arrives, the batch stays open while more
/// arrive in each `LINGER_GAP`, for at most `LINGER_MAX`. Measured on the api
/// bench (10,000 nodes, 64 reports in flight): without it a batch averaged
/// ~13 reports and each paid a flush (~380 µs) plus the wake-ups of the
/// engine and sled's I/O threads, 15.4–17.9k reports/s; with it
/// 20.6–23.3k/s on the same machine. It adds at most `LINGER_MAX` to the
/// answer of a lone request. With the flusher thread (a batch is flushed
/// while the next one gathers) a shorter window, 50 µs / 500 µs instead of
/// 200 µs / 1 ms, measured 13.1–17.7k/s (55–67 % of bare axum in 5 of 6
/// runs) against 12.9–13.3k/s (47–62 %) with the old window, both on a
/// machine loaded by other builds (load 3–4 on 2 cores): a weak signal.
const LINGER_GAP: Duration = Duration::from_micros(50);
const LINGER_MAX: Duration = Duration::from_micros(500);
/// How often the agents' queues are rebuilt from the engine's open work.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// Answers an operator call: with its result once the flush after it
/// succeeded, with the flush's error if it failed (nothing of it is then
/// acknowledged).
type Reply = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
type Call = Box<dyn FnOnce(&mut Engine) -> (Vec<Command>, Reply) + Send>;

enum Job {
    Report {
        node: String,
        report: Report,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Call(Call),
    /// A call that only reads: it does not bring the next tick forward.
    Read(Call),
    Stop,
}

/// Sends jobs to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
}

pub struct ActorThread(std::thread::JoinHandle<()>);

impl ActorThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the engine thread panicked");
        }
    }
}

impl EngineHandle {
    /// Applies an agent's report; resolves once it is on disk.
    pub async fn report(&self, node: String, report: Report) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Report {
                node,
                report,
                reply,
            })
            .map_err(|_| ApiError::unavailable())?;
        rx.await
            .map_err(|_| ApiError::unavailable())?
            .map_err(ApiError::from)
    }

    /// Runs `f` on the engine; resolves with its result once what it changed
    /// is on disk. Commands `f` returns go to the agents.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> (R, Vec<Command>) + Send + 'static,
    ) -> Result<R, ApiError> {
        self.run(Job::Call, f).await
    }

    /// Runs `f` on the engine to read something; resolves with its result
    /// once everything the engine applied before it is on disk. Unlike
    /// [`EngineHandle::call`], it does not make the engine tick.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        self.run(Job::Read, move |engine| (f(engine), Vec::new()))
            .await
    }

    /// Sends `f` as the job `kind` makes of it and waits for its answer.
    async fn run<R: Send + 'static>(
        &self,
        kind: fn(Call) -> Job,
        f: impl FnOnce(&mut Engine) -> (R, Vec<Command>) + Send + 'static,
    ) -> Result<R, ApiError> {
        let (tx, rx) = oneshot::channel::<Result<R, ApiError>>();
        let call: Call = Box::new(move |engine| {
            let (r, commands) = f(engine);
            (
                commands,
                Box::new(move |flushed: Result<(), &StoreError>| {
                    let _ = tx.send(flushed.map(|()| r).map_err(ApiError::store_fault));
                }),
            )
        });
        self.tx
            .send(kind(call))
            .map_err(|_| ApiError::unavailable())?;
        rx.await.map_err(|_| ApiError::unavailable())?
    }

    /// Asks the thread to stop after its current batch.
    pub fn stop(&self) {
        let _ = self.tx.send(Job::Stop);
    }
}

/// A batch the engine applied, waiting for the flush that makes it durable.
/// Everything in it happens only after that flush.
struct Applied {
    reports: Vec<AppliedReport>,
    /// Operator calls' answers.
    calls: Vec<Reply>,
    /// New work for agents.
    commands: Vec<Command>,
    /// The engine's open work after this batch, when it was time to rebuild
    /// the agents' queues from it.
    open: Option<Vec<Command>>,
}

/// A report's answer, and the (node, task) whose work it finished, if it did.
struct AppliedReport {
    reply: oneshot::Sender<Result<(), EngineError>>,
    result: Result<(), EngineError>,
    done: Option<(String, String)>,
}

/// Starts the engine thread (and its flusher).
pub fn spawn(
    mut engine: Engine,
    store: Arc<dyn Store>,
    outbox: Arc<Outbox>,
    inventory: Arc<Inventory>,
    tick: Duration,
    metrics: Arc<Metrics>,
) -> (EngineHandle, ActorThread) {
    let (tx, rx) = mpsc::channel::<Job>();
    // Work handed out before a restart is handed out again: in the outbox
    // before this returns, so before the server answers an agent's poll.
    let open = engine.open_work();
    outbox.replace(open.iter().map(|c| inventory.work(c)));
    let (applied_tx, applied_rx) = mpsc::channel::<Applied>();
    let flusher = std::thread::Builder::new()
        .name("flotilla-flush".into())
        .spawn(move || flush_loop(applied_rx, &*store, &outbox, &inventory))
        .expect("spawning the flusher thread");
    let thread = std::thread::Builder::new()
        .name("flotilla-engine".into())
        .spawn(move || {
            let mut last_tick = Instant::now() - tick;
            let mut last_reconcile = Instant::now();
            let mut reports_since_tick = false;
            let mut stopping = false;
            let mut batch = Vec::new();
            while !stopping {
                let due = if reports_since_tick {
                    last_tick + TICK_AFTER_REPORTS.min(tick)
                } else {
                    last_tick + tick
                };
                let wait = due.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => stopping = true,
                }
                // Group commit: once one job is here, take what follows it
                // closely too (agents' reports come in bursts), so one flush
                // covers more of them. The thread sleeps between looks
                // instead of waiting on the channel: a sender then finds no
                // waiting receiver and does not wake it (a futex call and a
                // context switch per report). Measured on the api bench, 8
                // interleaved pairs: +3 % reports/s (median), 7 of 8 ahead.
                // A batch of one stays open until `LINGER_MAX`.
                let linger_until = Instant::now() + LINGER_MAX;
                while !batch.is_empty() && batch.len() < BATCH {
                    let had = batch.len();
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let left = linger_until.saturating_duration_since(Instant::now());
                    if left.is_zero() || (batch.len() == had && had > 1) {
                        break;
                    }
                    std::thread::sleep(LINGER_GAP.min(left));
                }
                let mut reports = Vec::with_capacity(batch.len());
                let mut report_replies = Vec::with_capacity(batch.len());
                let mut applied = Applied {
                    reports: Vec::with_capacity(batch.len()),
                    calls: Vec::new(),
                    commands: Vec::new(),
                    open: None,
                };
                let mut operator_changes = false;
                for job in batch.drain(..) {
                    match job {
                        Job::Report {
                            node,
                            report,
                            reply,
                        } => {
                            let done =
                                is_final(report.state).then(|| (node.clone(), report.task.clone()));
                            reports.push((node, Some(report.task.clone()), report.event()));
                            report_replies.push((reply, done));
                        }
                        Job::Call(call) => {
                            let (c, reply) = call(&mut engine);
                            applied.commands.extend(c);
                            applied.calls.push(reply);
                            operator_changes = true;
                        }
                        Job::Read(read) => {
                            let (_, reply) = read(&mut engine);
                            applied.calls.push(reply);
                        }
                        Job::Stop => stopping = true,
                    }
                }
                if !reports.is_empty() {
                    reports_since_tick = true;
                    metrics.reports(reports.len());
                    let results = engine.report_many_for(reports);
                    applied
                        .reports
                        .extend(report_replies.into_iter().zip(results).map(
                            |((reply, done), result)| AppliedReport {
                                reply,
                                result,
                                done,
                            },
                        ));
                }
                // An operator's change (create, pause, promote, ...) takes
                // effect at once; reads wait for the tick that is due.
                if operator_changes || Instant::now() >= due {
                    match engine.tick() {
                        Ok(c) => applied.commands.extend(c),
                        Err(e) => tracing::error!("engine tick: {e}"),
                    }
                    last_tick = Instant::now();
                    reports_since_tick = false;
                }
                if last_reconcile.elapsed() >= RECONCILE_EVERY {
                    applied.open = Some(engine.open_work());
                    last_reconcile = Instant::now();
                }
                // The flusher makes it durable and then answers; meanwhile
                // this thread takes the next batch.
                if applied_tx.send(applied).is_err() {
                    tracing::error!("the flusher thread is gone; stopping the engine");
                    break;
                }
            }
            drop(applied_tx);
            if flusher.join().is_err() {
                tracing::error!("the flusher thread panicked");
            }
            tracing::info!("engine stopped");
        })
        .expect("spawning the engine thread");
    (EngineHandle { tx }, ActorThread(thread))
}

/// The flusher: takes every batch the engine applied since its last flush,
/// flushes the store once for all of them, then answers their callers and
/// hands their work to the agents, in the order the engine applied them.
fn flush_loop(
    rx: mpsc::Receiver<Applied>,
    store: &dyn Store,
    outbox: &Outbox,
    inventory: &Inventory,
) {
    let mut groups = Vec::new();
    while let Ok(first) = rx.recv() {
        groups.push(first);
        while let Ok(more) = rx.try_recv() {
            groups.push(more);
        }
        let flushed = store.flush();
        if let Err(e) = &flushed {
            // Nothing of these batches may be acknowledged.
            tracing::error!("flushing the store: {e}; refusing this batch");
        }
        for g in groups.drain(..) {
            match &flushed {
                Ok(()) => {
                    for AppliedReport {
                        reply,
                        result,
                        done,
                    } in g.reports
                    {
                        if let (Some((node, task)), Ok(())) = (&done, &result) {
                            outbox.finish(node, task);
                        }
                        let _ = reply.send(result);
                    }
                    for r in g.calls {
                        r(Ok(()));
                    }
                    if !g.commands.is_empty() {
                        outbox.put(g.commands.iter().map(|c| inventory.work(c)));
                    }
                    if let Some(open) = g.open {
                        outbox.replace(open.iter().map(|c| inventory.work(c)));
                    }
                }
                Err(e) => {
                    // A fault: every caller is told so (503), and the work
                    // of these batches is not handed to agents.
                    for r in g.reports {
                        let _ = r.reply.send(Err(EngineError::Store(e.clone())));
                    }
                    for r in g.calls {
                        r(Err(e));
                    }
                }
            }
        }
    }
}

fn is_final(state: ReportState) -> bool {
    !matches!(
        state,
        ReportState::Downloading | ReportState::Upgrading | ReportState::Verifying
    )
}
