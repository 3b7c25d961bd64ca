//! The web dashboard: plain HTML, CSS and JavaScript built into the binary
//! (`dashboard/`, no framework, no CDN, no Node toolchain) and the reads it
//! needs beyond the rest of the management API.
//!
//! - [`asset_routes`]: `/` and `/dashboard/*`, served to anyone (they hold
//!   no data) with a strict Content-Security-Policy: scripts and styles only
//!   from the runner itself, no inline script, no framing.
//! - [`api_routes`], behind the management guard like every `/v1` route:
//!   - `GET /v1/whoami`: the caller's token name and role (the dashboard
//!     disables what the role may not do; the server refuses it anyway);
//!   - `GET /v1/tasks/{id}/live`: server-sent events (read with `fetch`, so
//!     the token travels in the `Authorization` header, never in a URL): the
//!     task and its counts when they change, and its new events. At most
//!     [`MAX_LIVE_STREAMS_PER_CALLER`] per token and [`MAX_LIVE_STREAMS`] in
//!     all, each closed after [`LIVE_STREAM_SECONDS`] (the dashboard
//!     reconnects) and when the runner shuts down, a comment every
//!     [`KEEP_ALIVE_SECONDS`];
//!   - `GET /v1/tasks/{id}/grid`: one byte per node run, the state's index
//!     in the `x-flotilla-states` header, in node-id order, and
//!     `GET /v1/tasks/{id}/grid/nodes`, the node ids in that order: a
//!     100,000-node task is 100 kB, not 100,000 JSON objects;
//!   - `GET /v1/nodes/{id}/history`: the node's runs across tasks;
//!   - `GET /v1/policies/{name}/source`: a Rhai policy's text.

use super::AppState;
use super::api::task_view;
use super::error::ApiError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flotilla_engine::store::Store;
use flotilla_model::{NodeRun, RunState, Task};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// What the dashboard's pages may load and do: only the runner's own
/// scripts, styles and API; no inline script, no plugins, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Live streams open at once, over every caller.
pub const MAX_LIVE_STREAMS: usize = 64;
/// Live streams one caller (token name) may hold at once.
pub const MAX_LIVE_STREAMS_PER_CALLER: usize = 16;

/// The live streams open: in all (a semaphore) and per caller.
pub struct LiveStreams {
    all: Arc<tokio::sync::Semaphore>,
    by_caller: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A place taken by one live stream; given back when dropped.
pub struct LivePlace {
    streams: Arc<LiveStreams>,
    caller: String,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for LivePlace {
    fn drop(&mut self) {
        let mut by = self
            .streams
            .by_caller
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.caller);
            }
        }
    }
}

impl Default for LiveStreams {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveStreams {
    pub fn new() -> LiveStreams {
        LiveStreams {
            all: Arc::new(tokio::sync::Semaphore::new(MAX_LIVE_STREAMS)),
            by_caller: Default::default(),
        }
    }

    /// A place for `caller`'s new stream: 429 at the caller's cap, 503 at
    /// the runner's (both with `Retry-After`).
    fn take(self: &Arc<Self>, caller: &str) -> Result<LivePlace, ApiError> {
        let mut by = self.by_caller.lock().unwrap_or_else(|e| e.into_inner());
        let n = by.get(caller).copied().unwrap_or(0);
        if n >= MAX_LIVE_STREAMS_PER_CALLER {
            let mut e = ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "token {caller} holds {MAX_LIVE_STREAMS_PER_CALLER} live streams, its most; close one first"
                ),
            )
            .hint("close other dashboard tabs, or poll GET /v1/tasks/{id}");
            e.retry_after = Some(5);
            return Err(e);
        }
        let all = self.all.clone().try_acquire_owned().map_err(|_| {
            let mut e = ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_LIVE_STREAMS} live streams are open; try again later"),
            )
            .hint("close other dashboard tabs, or poll GET /v1/tasks/{id}");
            e.retry_after = Some(5);
            e
        })?;
        by.insert(caller.to_string(), n + 1);
        Ok(LivePlace {
            streams: self.clone(),
            caller: caller.to_string(),
            _all: all,
        })
    }
}
/// A live stream ends after this long; the dashboard opens a new one.
pub const LIVE_STREAM_SECONDS: u64 = 300;
/// A comment line this often keeps a quiet stream within the idle timeout.
pub const KEEP_ALIVE_SECONDS: u64 = 10;
/// Events in one `events` message of a live stream, and messages a look.
const EVENT_PAGE: usize = 1000;
const EVENT_PAGES: usize = 5;
/// How often a live stream looks for changes.
const LIVE_POLL: Duration = Duration::from_millis(500);

/// The run states in the order of the grid's byte codes.
pub const STATES: [&str; 16] = [
    "pending",
    "skipped",
    "queued",
    "offered",
    "downloading",
    "upgrading",
    "verifying",
    "succeeded",
    "failed-rolled-back",
    "failed-rollback-failed",
    "timed-out",
    "unknown",
    "rejected",
    "rolling-back",
    "rolled-back",
    "cancelled",
];

/// A run state's grid code: its index in [`STATES`] (a new state does not
/// compile until it has one).
fn code(state: &RunState) -> u8 {
    match state {
        RunState::Pending => 0,
        RunState::Skipped { .. } => 1,
        RunState::Queued { .. } => 2,
        RunState::Offered { .. } => 3,
        RunState::Downloading { .. } => 4,
        RunState::Upgrading { .. } => 5,
        RunState::Verifying { .. } => 6,
        RunState::Succeeded { .. } => 7,
        RunState::FailedRolledBack { .. } => 8,
        RunState::FailedRollbackFailed { .. } => 9,
        RunState::TimedOut { .. } => 10,
        RunState::Unknown { .. } => 11,
        RunState::Rejected { .. } => 12,
        RunState::RollingBack { .. } => 13,
        RunState::RolledBack { .. } => 14,
        RunState::Cancelled => 15,
    }
}

pub fn asset_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The assets change with the binary.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

pub fn api_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tasks/{id}/live", get(live))
        .route("/v1/tasks/{id}/grid", get(grid))
        .route("/v1/tasks/{id}/grid/nodes", get(grid_nodes))
        .route("/v1/nodes/{id}/history", get(history))
        .route("/v1/policies/{name}/source", get(policy_source))
}

async fn whoami(caller: Option<axum::Extension<super::access::Caller>>) -> Response {
    match caller {
        Some(axum::Extension(c)) => {
            Json(serde_json::json!({"name": c.name, "role": c.role})).into_response()
        }
        None => ApiError::unauthorized("no caller").into_response(),
    }
}

/// A task id as the engine makes them: short, no separators.
fn valid_task_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ApiError::not_found(format!("no task {id:?}")));
    }
    Ok(())
}

/// The task's runs in node-id order, mapped by `f`: from the engine's
/// memory for a task it holds, else from the store (404 for no task).
async fn runs_map<T: Send + 'static>(
    state: &Arc<AppState>,
    id: String,
    f: fn(&NodeRun) -> T,
) -> Result<Vec<T>, ApiError> {
    valid_task_id(&id)?;
    let live = {
        let id = id.clone();
        state
            .engine
            .read(move |e| e.live_runs(&id).map(|runs| runs.map(f).collect::<Vec<T>>()))
            .await?
    };
    if let Some(v) = live {
        return Ok(v);
    }
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<T>, ApiError> {
        if store.task(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no task {id}")));
        }
        let mut runs = store.runs(&id)?;
        runs.sort_unstable_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(runs.iter().map(f).collect())
    })
    .await
    .map_err(ApiError::internal)?
}

/// `GET /v1/tasks/{id}/grid`: one byte per run, in node-id order; the
/// byte is the state's index in `x-flotilla-states`.
async fn grid(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = runs_map(&state, id, |r| code(&r.state)).await?;
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-flotilla-states",
        HeaderValue::from_str(&STATES.join(",")).map_err(ApiError::internal)?,
    );
    Ok(res)
}

/// `GET /v1/tasks/{id}/grid/nodes`: the node ids of the grid's cells and
/// the wave each is planned in (`null`: in none), for the plan `plan_rev`.
async fn grid_nodes(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    valid_task_id(&id)?;
    let task = {
        let id = id.clone();
        state.engine.read(move |e| e.task(&id)).await??
    };
    let nodes = runs_map(&state, id, |r| r.node_id.clone()).await?;
    let mut wave_of = std::collections::HashMap::new();
    for (i, w) in task.waves.iter().enumerate() {
        for n in &w.nodes {
            wave_of.insert(n.as_str(), i);
        }
    }
    let waves: Vec<Option<usize>> = nodes
        .iter()
        .map(|n| wave_of.get(n.as_str()).copied())
        .collect();
    Ok(Json(serde_json::json!({
        "nodes": nodes, "waves": waves, "plan_rev": task.plan_rev,
    })))
}

/// A task for the live stream: each wave's node list is replaced by its
/// `size` (a 100,000-node plan is 1.5 MB of JSON, sent on every change
/// otherwise; the grid's nodes say which node is in which wave).
fn summary(task: Task, sizes: Vec<usize>, counts: BTreeMap<String, usize>) -> serde_json::Value {
    let mut v = serde_json::to_value(flotilla_model::TaskView { task, counts }).unwrap_or_default();
    if let Some(waves) = v.get_mut("waves").and_then(|w| w.as_array_mut()) {
        for (w, size) in waves.iter_mut().zip(sizes) {
            if let Some(o) = w.as_object_mut() {
                o.remove("nodes");
                o.insert("size".into(), size.into());
            }
        }
    }
    v
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    limit: Option<usize>,
}

/// The most tasks a node's history lists.
const MAX_HISTORY: usize = 500;

/// `GET /v1/nodes/{id}/history?limit=N`: the node's runs, newest task
/// first (default 50, at most 500).
async fn history(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::unprocessable(format!(
            "limit must be between 1 and {MAX_HISTORY}"
        )));
    }
    if id.is_empty() || id.len() > 253 {
        return Err(ApiError::unprocessable("node id must be 1-253 characters"));
    }
    let store = state.store.clone();
    let known = state.inventory.node(&id).is_some();
    let items = tokio::task::spawn_blocking(move || -> Result<Vec<serde_json::Value>, ApiError> {
        let mut tasks = store.task_heads()?;
        tasks.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let mut out = Vec::new();
        for t in tasks {
            if out.len() == limit {
                break;
            }
            if let Some(run) = store.run(&t.id, &id)? {
                out.push(serde_json::json!({
                    "task": t.id, "name": t.spec.name, "package": t.spec.package,
                    "target_version": t.target_version, "task_state": t.state,
                    "created_at": t.created_at, "run": run,
                }));
            }
        }
        Ok(out)
    })
    .await
    .map_err(ApiError::internal)??;
    if !known && items.is_empty() {
        return Err(ApiError::not_found("no such node, and no task ran on it"));
    }
    Ok(Json(serde_json::json!({ "items": items })))
}

/// `GET /v1/policies/{name}/source`: `{name, kind, source}`; `source` is
/// the Rhai text, `null` for a component.
async fn policy_source(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::api::valid_name("policy", &name)?;
    let policies = state.policies.clone();
    let n = name.clone();
    let got = tokio::task::spawn_blocking(move || policies.rhai_text(&n))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::policy)?;
    match got {
        None => Err(ApiError::not_found(format!("no policy {name}"))),
        Some(None) => Ok(Json(
            serde_json::json!({"name": name, "kind": "wasm", "source": null}),
        )),
        Some(Some(text)) => Ok(Json(
            serde_json::json!({"name": name, "kind": "rhai", "source": text}),
        )),
    }
}

/// Where a live stream stands.
struct LiveStream {
    state: Arc<AppState>,
    id: String,
    /// The last task view sent (its JSON).
    last: Option<String>,
    /// The next event to send.
    from: u64,
    started: Instant,
    first: bool,
    done: bool,
    /// The runner is shutting down.
    closing: tokio::sync::watch::Receiver<bool>,
    queue: VecDeque<SseEvent>,
    _place: LivePlace,
}

impl LiveStream {
    /// Looks for a changed view and new events; queues what to send.
    async fn look(&mut self) -> Result<(), ApiError> {
        let id = self.id.clone();
        let head = self.state.engine.read(move |e| e.live_head(&id)).await?;
        let (task, sizes, counts) = match head {
            Some(h) => h,
            None => {
                let mut view = task_view(&self.state, self.id.clone()).await?;
                let sizes = view
                    .task
                    .waves
                    .iter_mut()
                    .map(|w| std::mem::take(&mut w.nodes).len())
                    .collect();
                (view.task, sizes, view.counts)
            }
        };
        // An ended task changes no more once its work is back.
        if !task.state.active() && !task.draining {
            self.done = true;
        }
        let text = summary(task, sizes, counts).to_string();
        if self.last.as_deref() != Some(text.as_str()) {
            self.queue
                .push_back(SseEvent::default().event("task").data(text.clone()));
            self.last = Some(text);
        }
        // New events, a message per page: a long log catches up at
        // EVENT_PAGE * EVENT_PAGES events a look.
        for _ in 0..EVENT_PAGES {
            let store = self.state.store.clone();
            let (id, from) = (self.id.clone(), self.from);
            let events = tokio::task::spawn_blocking(move || store.events(&id, from, EVENT_PAGE))
                .await
                .map_err(ApiError::internal)??;
            let Some(last) = events.last() else {
                break;
            };
            self.from = last.seq + 1;
            let text = serde_json::to_string(&events).map_err(ApiError::internal)?;
            self.queue
                .push_back(SseEvent::default().event("events").data(text));
            if events.len() < EVENT_PAGE {
                break;
            }
        }
        Ok(())
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LiveQuery {
    /// The first event seq to send (default 0).
    #[serde(default)]
    from: u64,
}

/// `GET /v1/tasks/{id}/live?from=SEQ`: server-sent events: `task` (the task
/// view, when it changed), `events` (an array of new events), `error` (and
/// the stream ends), a comment every [`KEEP_ALIVE_SECONDS`].
async fn live(
    State(state): State<Arc<AppState>>,
    caller: Option<axum::Extension<super::access::Caller>>,
    Path(id): Path<String>,
    q: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    valid_task_id(&id)?;
    // 404 before the stream starts.
    task_view(&state, id.clone()).await?;
    let caller = caller.map(|axum::Extension(c)| c.name).unwrap_or_default();
    let place = state.live_streams.take(&caller)?;
    let closing = state.closing.subscribe();
    let live = LiveStream {
        closing,
        state,
        id,
        last: None,
        from: q.from,
        started: Instant::now(),
        first: true,
        done: false,
        queue: VecDeque::new(),
        _place: place,
    };
    let stream = futures_util::stream::unfold(live, |mut l| async move {
        loop {
            if let Some(ev) = l.queue.pop_front() {
                return Some((Ok::<_, Infallible>(ev), l));
            }
            if l.done
                || *l.closing.borrow()
                || l.started.elapsed() >= Duration::from_secs(LIVE_STREAM_SECONDS)
            {
                return None;
            }
            if !l.first {
                tokio::select! {
                    () = tokio::time::sleep(LIVE_POLL) => {}
                    // Shutting down (or the runner is gone): end the stream.
                    _ = l.closing.changed() => return None,
                }
            }
            l.first = false;
            if let Err(e) = l.look().await {
                let body = serde_json::json!({"error": e.error}).to_string();
                l.queue
                    .push_back(SseEvent::default().event("error").data(body));
                l.done = true;
            }
        }
    });
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(KEEP_ALIVE_SECONDS)))
        .into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::SkipReason;

    /// Every run state has its own grid code, named in `STATES`.
    #[test]
    fn every_run_state_has_its_own_grid_code() {
        let all = [
            RunState::Pending,
            RunState::Skipped {
                reason: SkipReason::Policy,
                detail: String::new(),
            },
            RunState::Queued { wave: 0 },
            RunState::Offered { wave: 0 },
            RunState::Downloading { wave: 0 },
            RunState::Upgrading { wave: 0 },
            RunState::Verifying { wave: 0 },
            RunState::Succeeded { wave: 0 },
            RunState::FailedRolledBack {
                wave: 0,
                error: String::new(),
            },
            RunState::FailedRollbackFailed {
                wave: 0,
                error: String::new(),
            },
            RunState::TimedOut { wave: 0 },
            RunState::Unknown { wave: 0 },
            RunState::Rejected {
                wave: 0,
                reason: String::new(),
            },
            RunState::RollingBack { wave: 0 },
            RunState::RolledBack { wave: 0 },
            RunState::Cancelled,
        ];
        assert_eq!(all.len(), STATES.len());
        for (i, s) in all.iter().enumerate() {
            assert_eq!(STATES[code(s) as usize], s.name(), "{s:?}");
            assert_eq!(code(s) as usize, i);
        }
    }
}
