//! The engine's own thread. Handlers send jobs; the thread takes every job
//! that is waiting as one batch (held open while more follow closely, see
//! `LINGER_GAP`), applies it (agent reports through
//! `Engine::report_many`, operator calls in order, then a tick when one is
//! due), flushes the store once, and only then answers the callers and hands
//! new work to the agents. One fsync covers a whole burst of reports (group
//! commit), and nothing is acknowledged or sent before it is on disk.

use super::agents::Outbox;
use super::error::ApiError;
use super::inventory::Inventory;
use super::metrics::Metrics;
use crate::engine::{Command, Engine, EngineError};
use crate::protocol::{Report, ReportState};
use crate::store::{SledStore, Store};
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
/// follow within `LINGER_GAP`, for at most `LINGER_MAX`. Measured on the api
/// bench (10,000 nodes, 64 reports in flight): without it a batch averaged
/// ~13 reports and each paid a flush (~380 µs) plus the wake-ups of the
/// engine and sled's I/O threads, 15.4–17.9k reports/s; with it
/// 20.6–23.3k/s on the same machine. It adds at most `LINGER_MAX` to the
/// answer of a lone request.
const LINGER_GAP: Duration = Duration::from_micros(200);
const LINGER_MAX: Duration = Duration::from_millis(1);
/// How often the agents' queues are rebuilt from the engine's open work.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

type Reply = Box<dyn FnOnce() + Send>;
type Call = Box<dyn FnOnce(&mut Engine) -> (Vec<Command>, Reply) + Send>;

enum Job {
    Report {
        node: String,
        report: Report,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Call(Call),
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
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |engine| {
            let (r, commands) = f(engine);
            (
                commands,
                Box::new(move || {
                    let _ = tx.send(r);
                }),
            )
        });
        self.tx
            .send(Job::Call(call))
            .map_err(|_| ApiError::unavailable())?;
        rx.await.map_err(|_| ApiError::unavailable())
    }

    /// Asks the thread to stop after its current batch.
    pub fn stop(&self) {
        let _ = self.tx.send(Job::Stop);
    }
}

/// Starts the engine thread.
pub fn spawn(
    mut engine: Engine,
    store: Arc<SledStore>,
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
    let thread = std::thread::Builder::new()
        .name("flotilla-engine".into())
        .spawn(move || {
            let mut last_tick = Instant::now() - tick;
            let mut last_reconcile = Instant::now();
            let mut reports_since_tick = false;
            let mut stopping = false;
            while !stopping {
                let due = if reports_since_tick {
                    last_tick + TICK_AFTER_REPORTS.min(tick)
                } else {
                    last_tick + tick
                };
                let wait = due.saturating_duration_since(Instant::now());
                let mut batch = Vec::new();
                match rx.recv_timeout(wait) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => stopping = true,
                }
                // Group commit: once one job is here, take what follows it
                // closely too (agents' reports come in bursts), so one flush
                // covers more of them.
                let linger_until = Instant::now() + LINGER_MAX;
                while !batch.is_empty() && batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => {
                            let left = linger_until.saturating_duration_since(Instant::now());
                            match rx.recv_timeout(LINGER_GAP.min(left)) {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                }
                let mut reports = Vec::new();
                let mut replies: Vec<Reply> = Vec::new();
                let mut commands = Vec::new();
                let mut report_replies = Vec::new();
                let mut finals = Vec::new();
                let mut calls = 0;
                for job in batch {
                    match job {
                        Job::Report {
                            node,
                            report,
                            reply,
                        } => {
                            finals.push(
                                is_final(report.state).then(|| (node.clone(), report.task.clone())),
                            );
                            reports.push((node, report.event()));
                            report_replies.push(reply);
                        }
                        Job::Call(call) => {
                            calls += 1;
                            let (c, reply) = call(&mut engine);
                            commands.extend(c);
                            replies.push(reply);
                        }
                        Job::Stop => stopping = true,
                    }
                }
                let results = if reports.is_empty() {
                    Vec::new()
                } else {
                    reports_since_tick = true;
                    metrics.reports(reports.len());
                    engine.report_many(reports)
                };
                if calls > 0 || Instant::now() >= due {
                    match engine.tick() {
                        Ok(c) => commands.extend(c),
                        Err(e) => tracing::error!("engine tick: {e}"),
                    }
                    last_tick = Instant::now();
                    reports_since_tick = false;
                }
                if let Err(e) = store.flush() {
                    // Nothing of this batch may be acknowledged.
                    tracing::error!("flushing the store: {e}; refusing this batch");
                    for r in report_replies {
                        let _ = r.send(Err(EngineError::Store(crate::store::StoreError::Io(
                            e.to_string(),
                        ))));
                    }
                    // Operator calls still get their answer: their caller
                    // learns of the failure from the store on its next read.
                    for r in replies {
                        r();
                    }
                    continue;
                }
                for (done, result) in finals.iter().zip(&results) {
                    if let (Some((node, task)), Ok(())) = (done, result) {
                        outbox.finish(node, task);
                    }
                }
                for (reply, result) in report_replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                for r in replies {
                    r();
                }
                if !commands.is_empty() {
                    outbox.put(commands.iter().map(|c| inventory.work(c)));
                }
                if last_reconcile.elapsed() >= RECONCILE_EVERY {
                    let open = engine.open_work();
                    outbox.replace(open.iter().map(|c| inventory.work(c)));
                    last_reconcile = Instant::now();
                }
            }
            tracing::info!("engine stopped");
        })
        .expect("spawning the engine thread");
    (EngineHandle { tx }, ActorThread(thread))
}

fn is_final(state: ReportState) -> bool {
    !matches!(
        state,
        ReportState::Downloading | ReportState::Upgrading | ReportState::Verifying
    )
}
