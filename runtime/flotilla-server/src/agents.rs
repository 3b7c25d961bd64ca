//! The agent side of the API ([`flotilla_model::protocol`]): enrollment, heartbeats,
//! the push long poll, pull requests, reports and artifact downloads.
//!
//! Enrollment cannot take over an enrolled node: a node id that holds a token
//! enrolls again only with that token (`Authorization: Bearer`), with a
//! one-time node token an operator issued for it (`flotilla node token`), or
//! once after an operator allowed it (`flotilla node reenroll`); otherwise 409,
//! and its token and labels stay as they were.
//!
//! With mutual TLS (`tls.client_ca`), every agent route also needs a client
//! certificate that names the node the request is for ([`cert_auth`]): a
//! certificate of one node cannot act for another, even with its token.

use super::AppState;
use super::error::{ApiError, json};
use super::inventory::{NodeToken, Reenroll};
use super::tls::ClientCert;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_model::Node;
use flotilla_model::protocol::{Enroll, Enrolled, Heartbeat, MAX_WAIT_SECONDS, Report, Work};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tower::ServiceExt as _;

/// Open work per node, with a wake-up for the node's long poll. An entry
/// stays until the agent reports the work finished (or the engine no longer
/// has it open), so a reconnecting agent gets it again.
#[derive(Default)]
pub struct Outbox {
    slots: Mutex<HashMap<String, Slot>>,
    /// Nodes whose open work changed since the MQTT publisher last looked
    /// (`None` while nothing publishes): a set, so a burst of changes to one
    /// node is one publish, and its size is bounded by the fleet.
    changed: Mutex<Option<std::collections::HashSet<String>>>,
    changes: Notify,
}

#[derive(Default)]
struct Slot {
    work: Option<Work>,
    notify: Arc<Notify>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed_lock(&self) -> std::sync::MutexGuard<'_, Option<std::collections::HashSet<String>>> {
        self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, changes are kept for [`Outbox::take_changed`].
    pub fn track_changes(&self) {
        self.changed_lock().get_or_insert_with(Default::default);
    }

    /// Marks `nodes` changed (when changes are tracked).
    pub fn mark_changed<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) {
        let mut changed = self.changed_lock();
        if let Some(set) = changed.as_mut() {
            let before = set.len();
            set.extend(nodes.into_iter().map(str::to_string));
            if set.len() > before {
                self.changes.notify_one();
            }
        }
    }

    /// Marks every node with open work changed (a publisher that
    /// reconnected sends them all again).
    pub fn mark_all_changed(&self) {
        let nodes: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.work.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        self.mark_changed(nodes.iter().map(String::as_str));
    }

    /// Waits for changes, then takes them.
    pub async fn take_changed(&self) -> Vec<String> {
        loop {
            let notified = self.changes.notified();
            {
                let mut changed = self.changed_lock();
                if let Some(set) = changed.as_mut()
                    && !set.is_empty()
                {
                    return set.drain().collect();
                }
            }
            notified.await;
        }
    }

    /// Hands out work (replacing what a node had).
    pub fn put(&self, items: impl IntoIterator<Item = (String, Work)>) {
        let mut slots = self.lock();
        let mut changed = Vec::new();
        for (node, work) in items {
            let slot = slots.entry(node.clone()).or_default();
            if slot.work.as_ref() != Some(&work) {
                changed.push(node);
            }
            slot.work = Some(work);
            slot.notify.notify_waiters();
        }
        drop(slots);
        self.mark_changed(changed.iter().map(String::as_str));
    }

    /// Makes the open work exactly `items` (after a restart, and now and then
    /// to drop work the engine closed on its own: timeouts, cancels).
    pub fn replace(&self, items: impl IntoIterator<Item = (String, Work)>) {
        let mut fresh: HashMap<String, Work> = items.into_iter().collect();
        let mut slots = self.lock();
        let mut changed = Vec::new();
        for (node, slot) in slots.iter_mut() {
            let next = fresh.remove(node);
            if slot.work != next {
                slot.work = next;
                slot.notify.notify_waiters();
                changed.push(node.clone());
            }
        }
        for (node, work) in fresh {
            changed.push(node.clone());
            slots.insert(
                node,
                Slot {
                    work: Some(work),
                    notify: Arc::new(Notify::new()),
                },
            );
        }
        drop(slots);
        self.mark_changed(changed.iter().map(String::as_str));
    }

    /// The agent finished `task` on `node`.
    pub fn finish(&self, node: &str, task: &str) {
        let mut finished = false;
        if let Some(slot) = self.lock().get_mut(node)
            && slot.work.as_ref().is_some_and(|w| w.task() == task)
        {
            slot.work = None;
            finished = true;
        }
        if finished {
            self.mark_changed([node]);
        }
    }

    pub fn get(&self, node: &str) -> Option<Work> {
        self.lock().get(node).and_then(|s| s.work.clone())
    }

    /// Waits up to `wait` for work for `node`.
    pub async fn wait(&self, node: &str, wait: Duration) -> Option<Work> {
        let notify = {
            let mut slots = self.lock();
            let slot = slots.entry(node.to_string()).or_default();
            if let Some(w) = &slot.work {
                return Some(w.clone());
            }
            slot.notify.clone()
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(w) = self.get(node) {
                return Some(w);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get(node);
            }
        }
    }
}

/// The agents' routes that answer at once (within the request timeout).
/// JSON bodies are capped at `max_body_bytes`, as on every other route.
pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/agents/enroll", post(enroll))
        .route("/v1/agents/{node}/heartbeat", post(heartbeat))
        .route("/v1/agents/{node}/request", post(request))
        .route("/v1/agents/{node}/report", post(report))
        .route("/v1/releases/{package}/{version}/artifact", get(artifact))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_body_bytes,
        ))
        .with_state(state)
}

/// The routes that may take longer than the request timeout: the push long
/// poll (up to [`MAX_WAIT_SECONDS`]) and artifact uploads (streamed, capped
/// at `max_upload_bytes`).
pub fn long_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/agents/{node}/work", get(work))
        .route(
            "/v1/releases/{package}/{version}/artifact",
            axum::routing::put(super::api::upload_artifact).layer(
                axum::middleware::from_fn_with_state(state.clone(), super::api::guard),
            ),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_body_bytes,
        ))
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The caller holds `node`'s token.
fn node_auth(state: &AppState, headers: &HeaderMap, node: &str) -> Result<(), ApiError> {
    let Some(token) = bearer(headers) else {
        return Err(
            ApiError::unauthorized("missing `Authorization: Bearer <node token>`")
                .hint("enroll first: POST /v1/agents/enroll"),
        );
    };
    if state.inventory.check_token(node, token) {
        Ok(())
    } else if state.inventory.any_token(token) {
        Err(ApiError::forbidden(format!(
            "this token belongs to another node; it cannot act for {node}"
        )))
    } else {
        Err(
            ApiError::unauthorized(format!("not a valid token for node {node}"))
                .hint("enroll again to get a new token"),
        )
    }
}

/// The client certificate of the request's connection, if the runner asks
/// for them (set by the accept loop).
pub struct Peer(Option<ClientCert>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ClientCert>().cloned()))
    }
}

/// With `tls.client_ca`: the connection's client certificate names `node`.
fn cert_auth(state: &AppState, peer: &Peer, node: &str) -> Result<(), ApiError> {
    if !state
        .config
        .tls
        .as_ref()
        .is_some_and(|t| t.requires_client_cert())
    {
        return Ok(());
    }
    match peer.0.as_ref().and_then(|c| c.node.as_deref()) {
        Some(named) if named == node => Ok(()),
        Some(named) => {
            tracing::warn!(node, certificate = named, "an agent's client certificate names another node");
            Err(ApiError::forbidden(format!(
                "the client certificate names node {named}; it cannot act for node {node}"
            ))
            .hint("each agent needs its own certificate, with its node id as the subject's CN"))
        }
        None => Err(ApiError::forbidden(format!(
            "this runner requires a client certificate for node {node} (tls.client_ca is set), and the connection has none with a usable subject CN"
        ))
        .hint(format!(
            "give the agent --client-cert and --client-key: a certificate issued by the runner's client CA with CN={node}"
        ))),
    }
}

pub(crate) fn valid_node_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 253 {
        return Err(ApiError::unprocessable("node_id must be 1-253 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(ApiError::unprocessable(format!(
            "node_id {id:?} may contain only letters, digits and - _ . :"
        )));
    }
    Ok(())
}

async fn enroll(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let e: Enroll = json(&body)?;
    valid_node_id(&e.node_id)?;
    cert_auth(&state, &peer, &e.node_id)?;
    e.check()?;
    let now = state.clock.now();
    let inventory = &state.inventory;
    // From the first check to the stored token, one enrollment at a time: two
    // racing requests cannot both take a fresh id or one one-time token.
    let _one_at_a_time = inventory.enrolling();
    let refused = |e: ApiError| {
        state.metrics.enroll(false);
        Err(e)
    };
    // The secret is this node's one-time token, or the runner's shared one.
    let node_token = match inventory.enroll_token(&e.node_id, &e.secret, now)? {
        NodeToken::Valid => true,
        NodeToken::Expired(at) => {
            return refused(
                ApiError::unauthorized(format!(
                    "the enrollment token of node {} expired at {at} (Unix ms)",
                    e.node_id
                ))
                .hint(format!(
                    "ask for a new one: flotilla node token {}",
                    e.node_id
                )),
            );
        }
        NodeToken::No => false,
    };
    if !node_token
        && let Some(secret) = state.config.enroll_secret.as_deref()
        && !crate::secret::matches(secret, &e.secret)
    {
        return refused(ApiError::unauthorized("wrong enrollment secret"));
    }
    // An enrolled id: only the node itself, or with an operator's leave.
    let mut by_allowance = false;
    if !node_token && inventory.is_enrolled(&e.node_id) {
        let own = bearer(&headers).is_some_and(|t| inventory.check_token(&e.node_id, t));
        if !own {
            let why = match inventory.reenroll_allowed(&e.node_id, now)? {
                Reenroll::Allowed => None,
                Reenroll::Expired(at) => Some(format!(
                    "node {} is already enrolled, and the operator's allowance to enroll it again expired at {at} (Unix ms)",
                    e.node_id
                )),
                Reenroll::No => Some(format!(
                    "node {} is already enrolled; enrolling it again needs its current token (`Authorization: Bearer`) or an operator's allowance",
                    e.node_id
                )),
            };
            if let Some(why) = why {
                tracing::warn!(node = %e.node_id, "enrollment of an enrolled node refused");
                return refused(ApiError::conflict(why).hint(format!(
                    "an operator allows it once: flotilla node reenroll {id} (or issues a node token: flotilla node token {id})",
                    id = e.node_id
                )));
            }
            by_allowance = true;
        }
    }
    let previous = inventory.node(&e.node_id);
    let node = Node {
        id: e.node_id.clone(),
        version: e.version,
        labels: e.labels,
        attributes: e.attributes,
        asset_path: e.asset_path,
        healthy: e.healthy,
        schedulable: e.schedulable,
        online: true,
        last_seen: now,
    };
    if previous.as_ref() != Some(&node) {
        inventory.upsert_node(node)?;
    }
    let token = inventory.issue_token(&e.node_id, now)?;
    // Used up in the same flush as the token they let through.
    if node_token {
        inventory.consume_enroll_token(&e.node_id)?;
    }
    if by_allowance {
        inventory.consume_reenroll(&e.node_id)?;
    }
    state.store_flush()?;
    state.metrics.enroll(true);
    tracing::info!(node = %e.node_id, node_token, by_allowance, "agent enrolled");
    Ok((StatusCode::OK, Json(Enrolled { token })).into_response())
}

async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Path(node): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    cert_auth(&state, &peer, &node)?;
    node_auth(&state, &headers, &node)?;
    ingest_heartbeat(&state, &node, json(&body)?)?;
    Ok(StatusCode::NO_CONTENT)
}

// One ingest function per message kind, called by both transports (HTTP
// here, MQTT in `mqtt.rs`) once they know which node the message is from.

/// A node's heartbeat: its version, health and metrics.
pub(crate) fn ingest_heartbeat(
    state: &AppState,
    node: &str,
    hb: Heartbeat,
) -> Result<(), ApiError> {
    hb.check()?;
    let now = state.clock.now();
    let found = state.inventory.update_node(node, |n| {
        n.version = hb.version;
        n.healthy = hb.healthy;
        n.schedulable = hb.schedulable;
        n.online = true;
        n.last_seen = now;
    })?;
    match found {
        Some(_) => {
            state.inventory.fleet().set_metrics(node, hb.metrics);
            Ok(())
        }
        None => Err(ApiError::not_found(format!("no node {node}")).hint("enroll again")),
    }
}

/// A pull request: the node's open work, or what the engine offers it now.
pub(crate) async fn ingest_request(state: &AppState, node: &str) -> Result<Option<Work>, ApiError> {
    seen(state, node)?;
    if let Some(w) = state.outbox.get(node) {
        return Ok(Some(w));
    }
    let n = node.to_string();
    let command = state
        .engine
        .call(move |engine| match engine.request(&n) {
            Ok(Some(c)) => (Ok(Some(c.clone())), vec![c]),
            Ok(None) => (Ok(None), vec![]),
            Err(e) => (Err(e), vec![]),
        })
        .await??;
    Ok(command.map(|c| state.inventory.work(&c).1))
}

/// A node's report on its work; resolves once the store has it.
pub(crate) async fn ingest_report(state: &AppState, node: &str, r: Report) -> Result<(), ApiError> {
    state.engine.report(node.to_string(), r).await
}

/// A poll is a sign of life too.
fn seen(state: &AppState, node: &str) -> Result<(), ApiError> {
    let now = state.clock.now();
    state.inventory.update_node(node, |n| {
        n.online = true;
        n.last_seen = now;
    })?;
    Ok(())
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default)]
    wait: u64,
}

async fn work(
    State(state): State<Arc<AppState>>,
    Path(node): Path<String>,
    Query(q): Query<WaitQuery>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cert_auth(&state, &peer, &node)?;
    node_auth(&state, &headers, &node)?;
    seen(&state, &node)?;
    let wait = Duration::from_secs(q.wait.min(MAX_WAIT_SECONDS));
    match state.outbox.wait(&node, wait).await {
        Some(w) => Ok(Json(w).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn request(
    State(state): State<Arc<AppState>>,
    Path(node): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    cert_auth(&state, &peer, &node)?;
    node_auth(&state, &headers, &node)?;
    match ingest_request(&state, &node).await? {
        Some(w) => Ok(Json(w).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn report(
    State(state): State<Arc<AppState>>,
    Path(node): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    cert_auth(&state, &peer, &node)?;
    node_auth(&state, &headers, &node)?;
    ingest_report(&state, &node, json(&body)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Artifact download for agents (node token; with mutual TLS, and that
/// node's client certificate) and operators (a management token of any
/// role); honours `Range`, so an interrupted download resumes.
async fn artifact(
    State(state): State<Arc<AppState>>,
    Path((package, version)): Path<(String, String)>,
    peer: Peer,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let token = bearer(&headers);
    let node = token.and_then(|t| state.inventory.token_node(t));
    if let Some(node) = &node {
        cert_auth(&state, &peer, node)?;
    }
    let allowed = node.is_some()
        || super::api::caller(&state, &headers).is_some_and(|c| {
            c.role.allows(
                super::access::role_of(
                    &axum::http::Method::GET,
                    "/v1/releases/{package}/{version}/artifact",
                )
                .unwrap_or(super::access::Role::Admin),
            )
        });
    if !allowed {
        return Err(ApiError::unauthorized(
            "a node token or a management token is required",
        ));
    }
    let r = state
        .inventory
        .release(&package, &version)
        .ok_or_else(|| ApiError::not_found(format!("no release {package} {version}")))?;
    if r.url.is_some() || r.sha256.is_empty() {
        return Err(ApiError::not_found(format!(
            "release {package} {version} has no uploaded artifact"
        ))
        .hint(match &r.url {
            Some(u) => format!("it is served from {u}"),
            None => format!("upload it: PUT {}", r.artifact_path()),
        }));
    }
    let file = state.inventory.artifact_file(&r.sha256);
    let res = tower_http::services::ServeFile::new(file)
        .oneshot(req)
        .await
        .map_err(ApiError::internal)?;
    Ok(res.map(axum::body::Body::new))
}

/// Marks nodes offline that have not been heard from (push waits for them).
pub async fn sweep_offline(state: Arc<AppState>) {
    let after = state.config.offline_after_seconds.max(1) * 1000;
    let mut every =
        tokio::time::interval(Duration::from_secs(5).min(Duration::from_millis(after / 2)));
    loop {
        every.tick().await;
        let before = state.clock.now().saturating_sub(after);
        for id in state.inventory.fleet().silent_since(before) {
            // Checked again under the write: a heartbeat may have come since.
            let mut went = false;
            let r = state.inventory.update_node(&id, |n| {
                if n.last_seen < before {
                    n.online = false;
                    went = true;
                }
            });
            match r {
                Ok(_) if went => tracing::info!(node = %id, "node went offline"),
                Ok(_) => {}
                Err(e) => tracing::error!("marking {id} offline: {e}"),
            }
        }
    }
}
