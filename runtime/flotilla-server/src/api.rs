//! The management API under `/v1`: nodes, releases, policies, tasks, events,
//! tokens and the audit log. Every route here passes [`guard`]: a token
//! whose role allows the route ([`crate::access::ROLES`]) when any token
//! exists, and an audit record for every call that is not a GET.

use super::AppState;
use super::access::{self, Caller, Role};
use super::error::{ApiError, ErrorText, json, json_or_default};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use flotilla_engine::sim::{self, Agents};
use flotilla_engine::store::{MemoryStore, Store};
use flotilla_engine::{Engine, PolicySource, count_states};
use flotilla_model::ReleaseRecord;
use flotilla_model::{Node, NodeRun, ReleaseKind, Selector, Target, Task, TaskSpec, TaskView};
use flotilla_policy::world::{ManualClock, MemoryFleet, World};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::io::AsyncWriteExt as _;

pub const OPENAPI: &str = include_str!("openapi.json");

pub fn routes(state: Arc<AppState>) -> Router {
    let upload_limit = state.config.max_upload_bytes;
    let managed = Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node).put(put_node))
        .route("/v1/nodes/{id}/enroll-token", post(enroll_token))
        .route("/v1/nodes/{id}/reenroll", post(allow_reenroll))
        .route("/v1/releases", get(list_releases).post(create_release))
        .route("/v1/control-plane/{component}", put(put_control_plane))
        .route("/v1/policies", get(list_policies))
        .route(
            "/v1/policies/{name}",
            get(get_policy)
                .put(upload_policy)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/v1/policies/{name}/check",
            post(check_policy).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/tasks", get(list_tasks).post(create_task))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/runs", get(list_runs))
        .route("/v1/tasks/{id}/events", get(list_events))
        .route("/v1/tasks/{id}/{action}", post(control_task))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", delete(revoke_token))
        .route("/v1/audit", get(audit_log))
        .merge(crate::dashboard::api_routes())
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .merge(managed)
        .merge(crate::dashboard::asset_routes())
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Who presents the request's bearer token, as a management caller: `None`
/// for no token or an unknown one. Everyone is `anonymous` admin while no
/// token exists.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    if !state.access.enabled() {
        return Some(Caller {
            name: access::ANONYMOUS.into(),
            role: Role::Admin,
        });
    }
    bearer(headers).and_then(|t| state.access.authenticate(t, state.clock.now()))
}

/// Who calls and whether their role allows `method` on `route`: the
/// caller, or the name to audit (`-` for no or an unknown token) and the
/// refusal.
fn authorize(
    state: &AppState,
    method: &Method,
    route: Option<&str>,
    headers: &HeaderMap,
) -> Result<Caller, (String, ApiError)> {
    let Some(caller) = caller(state, headers) else {
        let err = if bearer(headers).is_some() {
            ApiError::unauthorized(
                "missing or wrong management token: this one is unknown or revoked",
            )
        } else {
            ApiError::unauthorized(
                "missing or wrong management token: none was sent (`Authorization: Bearer <token>`)",
            )
        };
        return Err(("-".into(), err.hint("pass --token or set FLOTILLA_TOKEN")));
    };
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let Some(need) = route.and_then(|r| access::role_of(method, r)) else {
        // Fails closed: a route nobody gave a role is served to no one.
        return Err((
            caller.name,
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "no role is defined for {method} {}; refused",
                    route.unwrap_or("this route")
                ),
            ),
        ));
    };
    if !caller.role.allows(need) {
        let err = ApiError::forbidden(format!(
            "token {} has role {}; {method} {} needs role {need}",
            caller.name,
            caller.role,
            route.unwrap_or("")
        ))
        .hint(format!(
            "use a token with role {need} (an admin makes one: flotilla token create NAME --role {need})"
        ));
        return Err((caller.name, err));
    }
    Ok(caller)
}

/// What a call is about, from its path: the values of the route's
/// parameters but `{action}` (`package@version` for releases).
fn object_of(route: &str, path: &str) -> Option<String> {
    let mut values = Vec::new();
    for (pattern, value) in route.split('/').zip(path.split('/')) {
        if pattern.starts_with('{') && pattern != "{action}" {
            values.push(value);
        }
    }
    match values.len() {
        0 => None,
        _ => Some(values.join("@")),
    }
}

/// Set on a response by a handler that made something the path does not
/// name (a task, a release, a token): the audit record's object.
#[derive(Debug, Clone)]
pub struct AuditObject(pub String);

/// The guard of every management route: who calls (401), whether their
/// role allows the route (403, see [`access::ROLES`]), and the audit record
/// of every call that is not a GET (see [`crate::audit`]): written before
/// the handler runs (a store fault answers 503 and nothing runs), its
/// outcome after.
pub async fn guard(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // A cheap clone (an `Arc<str>`); reads build no strings.
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route = route.as_ref().map(MatchedPath::as_str);
    let audited = method != Method::GET && method != Method::HEAD;
    let what = |req: &Request| {
        let path = req.uri().path().to_string();
        let object = route.and_then(|r| object_of(r, &path));
        (path, object)
    };
    let now = state.clock.now();
    let caller = match authorize(&state, &method, route, req.headers()) {
        Ok(c) => c,
        Err((who, err)) => {
            let (path, object) = what(&req);
            if audited
                && let Err(e) = state.audit.append(
                    now,
                    &who,
                    method.as_str(),
                    &path,
                    object,
                    Some(err.status.as_u16()),
                    Some(err.error.clone()),
                )
            {
                tracing::error!("the audit record of a refused call was not stored: {e}");
            }
            return err.into_response();
        }
    };
    if !audited {
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    let (path, object) = what(&req);
    let rec = match state.audit.append(
        now,
        &caller.name,
        method.as_str(),
        &path,
        object,
        None,
        None,
    ) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::store_fault(format!("writing the audit record: {e}")).into_response();
        }
    };
    req.extensions_mut().insert(caller);
    let res = next.run(req).await;
    finish_audit(&state, rec, &res);
    res
}

/// Fills in an audit record's outcome from the response.
pub fn finish_audit(state: &AppState, rec: crate::audit::AuditRecord, res: &Response) {
    let status = res.status();
    let reason = res
        .extensions()
        .get::<ErrorText>()
        .map(|e| e.0.clone())
        .or_else(|| {
            (status.is_client_error() || status.is_server_error())
                .then(|| status.canonical_reason().unwrap_or("error").to_string())
        });
    let object = res.extensions().get::<AuditObject>().map(|o| o.0.clone());
    let seq = rec.seq;
    if let Err(e) = state.audit.finish(rec, object, status.as_u16(), reason) {
        tracing::error!(seq, "the outcome of an audited call was not stored: {e}");
    }
}

/// A name for packages, policies, hooks and components: the one rule of
/// [`flotilla_model::check_name`], so a name is never a path.
pub fn valid_name(what: &str, name: &str) -> Result<(), ApiError> {
    flotilla_model::check_name(what, name).map_err(|e| ApiError::unprocessable(e.to_string()))
}

// ----- nodes -----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodeQuery {
    /// `key=value`, repeatable as a comma list.
    label: Option<String>,
    version: Option<String>,
    online: Option<bool>,
    healthy: Option<bool>,
    asset: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

fn pairs(s: &str, what: &str) -> Result<Vec<(String, String)>, ApiError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| ApiError::bad_request(format!("{what} {p:?}: expected key=value")))
        })
        .collect()
}

#[derive(Serialize)]
struct Page<T> {
    items: Vec<T>,
    total: usize,
}

async fn list_nodes(
    State(state): State<Arc<AppState>>,
    q: Result<Query<NodeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<Node>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let selector = Selector {
        labels: q
            .label
            .as_deref()
            .map(|l| pairs(l, "label"))
            .transpose()?
            .unwrap_or_default(),
        asset_trees: q.asset.iter().cloned().collect(),
        ..Selector::default()
    };
    let nodes: Vec<Node> = state
        .inventory
        .all_nodes()
        .into_iter()
        .filter(|n| selector.matches(n))
        .filter(|n| {
            q.version
                .as_deref()
                .is_none_or(|v| flotilla_version::same(&n.version, v))
        })
        .filter(|n| q.online.is_none_or(|o| n.online == o))
        .filter(|n| q.healthy.is_none_or(|h| n.healthy == h))
        .collect();
    let total = nodes.len();
    let items = nodes
        .into_iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(1000).min(10_000))
        .collect();
    Ok(Json(Page { items, total }))
}

async fn get_node(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    state
        .inventory
        .node(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))
}

async fn put_node(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut v: serde_json::Value = json(&body)?;
    match v.get("id") {
        None => v["id"] = id.clone().into(),
        Some(b) if b == &serde_json::Value::String(id.clone()) => {}
        Some(b) => {
            return Err(ApiError::unprocessable(format!(
                "the body's id {b} differs from the path's {id:?}"
            )));
        }
    }
    let node: Node = serde_json::from_value(v)
        .map_err(|e| ApiError::unprocessable(format!("invalid node: {e}")))?;
    if node.id.is_empty() || node.id.len() > 253 {
        return Err(ApiError::unprocessable("node id must be 1-253 characters"));
    }
    node.check_facts()
        .map_err(|e| ApiError::unprocessable(format!("node {id}: {e}")))?;
    let existed = state.inventory.node(&id).is_some();
    state.inventory.upsert_node(node.clone())?;
    state.store_flush()?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(node)).into_response())
}

/// How long an enrollment allowance lasts: `{"expires_seconds": N}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expiry {
    expires_seconds: Option<u64>,
}

/// The longest an enrollment token or a re-enrollment allowance may last.
const MAX_ENROLL_EXPIRY_SECONDS: u64 = 30 * 86_400;

impl Expiry {
    /// Unix ms when it ends, from the body (or `default` seconds).
    fn until(body: &[u8], now: u64, default: u64) -> Result<u64, ApiError> {
        let Expiry { expires_seconds } = json_or_default(body)?;
        let secs = expires_seconds.unwrap_or(default);
        if !(1..=MAX_ENROLL_EXPIRY_SECONDS).contains(&secs) {
            return Err(ApiError::unprocessable(format!(
                "expires_seconds must be between 1 and {MAX_ENROLL_EXPIRY_SECONDS} (30 days), not {secs}"
            )));
        }
        Ok(now + secs * 1000)
    }
}

/// `POST /v1/nodes/{id}/enroll-token`: a token that enrolls node `id` once
/// (`flotilla node token ID`). Stored hashed; a newer one replaces it.
async fn enroll_token(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    super::agents::valid_node_id(&id)?;
    let expires_at = Expiry::until(&body, state.clock.now(), 86_400)?;
    let token = state.inventory.issue_enroll_token(&id, expires_at)?;
    state.store_flush()?;
    tracing::info!(node = %id, expires_at, "enrollment token issued");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "node_id": id, "token": token, "expires_at": expires_at })),
    )
        .into_response())
}

/// `POST /v1/nodes/{id}/reenroll`: the enrolled node `id` may enroll once
/// more with the enrollment secret before the allowance expires (`flotilla
/// node reenroll ID`): a node rebuilt without its token.
async fn allow_reenroll(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    super::agents::valid_node_id(&id)?;
    let expires_at = Expiry::until(&body, state.clock.now(), 3600)?;
    if !state.inventory.is_enrolled(&id) {
        return Err(ApiError::not_found(format!(
            "node {id} is not enrolled; it enrolls with the enrollment secret or a node token, no allowance needed"
        ))
        .hint(format!("or issue it a one-time token: flotilla node token {id}")));
    }
    state.inventory.allow_reenroll(&id, expires_at)?;
    state.store_flush()?;
    tracing::info!(node = %id, expires_at, "one re-enrollment allowed");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "node_id": id, "expires_at": expires_at })),
    )
        .into_response())
}

// ----- releases -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRelease {
    pub(crate) package: String,
    pub(crate) version: String,
    #[serde(default)]
    pub(crate) kind: ReleaseKind,
    /// External artifact: its URL, with `sha256` and `size`.
    pub(crate) url: Option<String>,
    pub(crate) sha256: Option<String>,
    pub(crate) size: Option<u64>,
    /// The release's minisign signature (the `.minisig` text).
    pub(crate) signature: Option<String>,
}

/// The runner's release keys, or a fault: the config was checked at start,
/// so a key file that cannot be read now is the disk's doing.
/// The runner's release keys, read at each signed call (a rotated key file
/// takes effect without a restart; the entries were checked at start). A
/// key file the disk cannot read now is a fault, one that no longer holds a
/// key an internal error.
fn release_keys(state: &AppState) -> Result<crate::signing::ReleaseKeys, ApiError> {
    use crate::signing::PublicKeyError;
    crate::signing::ReleaseKeys::load(&state.config.release_keys).map_err(|e| match e.source {
        PublicKeyError::Unreadable { .. } => ApiError::read_fault("a release_keys file", e),
        _ => ApiError::internal(e),
    })
}

fn unsigned(package: &str, version: &str) -> ApiError {
    ApiError::unprocessable(format!(
        "release {package} {version} has no signature, and this runner requires signed releases (require_signed_releases)"
    ))
    .hint(format!(
        "sign the artifact with the trusted comment `{}` (`flotilla release sign` or `minisign -S -t`) and pass the .minisig with --signature",
        flotilla_model::signing::trusted_comment(package, version, "SHA256", 0).replace("size=0", "size=BYTES")
    ))
}

async fn create_release(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r: NewRelease = json(&body)?;
    let rec = release_record(&state, r)?;
    if let Some(existing) = state.inventory.release(&rec.package, &rec.version) {
        return Err(ApiError::conflict(format!(
            "release {} {} exists (sha256 {:?}); releases are immutable, publish a new version",
            existing.package, existing.version, existing.sha256
        )));
    }
    state.inventory.put_release(rec.clone())?;
    state.store_flush()?;
    let object = AuditObject(format!("{}@{}", rec.package, rec.version));
    let mut res = (StatusCode::CREATED, Json(rec)).into_response();
    res.extensions_mut().insert(object);
    Ok(res)
}

/// A new release as the API takes it, checked: the same rules for
/// `POST /v1/releases` and a webhook that registers its release.
pub(crate) fn release_record(state: &AppState, r: NewRelease) -> Result<ReleaseRecord, ApiError> {
    valid_name("package", &r.package)?;
    let version = flotilla_version::parse(&r.version)
        .map_err(|e| ApiError::unprocessable(format!("version {:?}: {e}", r.version)))?;
    if let Some(sha) = &r.sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::unprocessable("sha256 must be 64 hex characters"));
    }
    if let Some(url) = &r.url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ApiError::unprocessable(format!(
                "url {url:?} must be http:// or https://"
            )));
        }
        if r.sha256.is_none() || r.size.is_none_or(|s| s == 0) {
            return Err(ApiError::unprocessable(
                "a release with a url needs its sha256 and size (agents verify both)",
            ));
        }
    } else if r.sha256.is_some() || r.size.is_some() {
        return Err(ApiError::unprocessable(
            "sha256 and size come from the upload when there is no url; leave them out",
        ));
    }
    let version_text = version.to_string();
    match &r.signature {
        None if state.config.require_signed_releases => {
            return Err(unsigned(&r.package, &version_text));
        }
        None => {}
        Some(sig) if sig.len() > flotilla_model::signing::MAX_SIGNATURE_BYTES => {
            return Err(ApiError::unprocessable(
                crate::signing::SignatureError::TooLarge(sig.len()).to_string(),
            ));
        }
        // Without release_keys a signature is stored as given: the nodes
        // with trusted_keys are what checks it.
        Some(_) if state.config.release_keys.is_empty() => {}
        Some(sig) => {
            let known = r.sha256.as_deref().zip(r.size);
            release_keys(state)?
                .check(sig, &r.package, &version_text, known)
                .map_err(|e| {
                    ApiError::unprocessable(format!("release {} {version_text}: {e}", r.package))
                })?;
        }
    }
    Ok(ReleaseRecord {
        package: r.package,
        version: version.to_string(),
        kind: r.kind,
        url: r.url,
        sha256: r.sha256.map(|s| s.to_ascii_lowercase()).unwrap_or_default(),
        size: r.size.unwrap_or(0),
        created_at: state.clock.now(),
        signature: r.signature,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageQuery {
    package: Option<String>,
}

async fn list_releases(
    State(state): State<Arc<AppState>>,
    q: Result<Query<PackageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ReleaseRecord>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(state.inventory.releases_of(q.package.as_deref())))
}

/// `PUT /v1/releases/{package}/{version}/artifact`: the bytes, streamed to
/// disk and hashed. Behind [`guard`] (admin).
pub async fn upload_artifact(
    State(state): State<Arc<AppState>>,
    Path((package, version)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut rec = state.inventory.release(&package, &version).ok_or_else(|| {
        ApiError::not_found(format!("no release {package} {version}"))
            .hint("create it first: POST /v1/releases")
    })?;
    if rec.url.is_some() {
        return Err(ApiError::conflict(format!(
            "release {package} {version} is served from its url; it takes no upload"
        )));
    }
    if !rec.sha256.is_empty() {
        return Err(ApiError::conflict(format!(
            "release {package} {version} already has its artifact (sha256 {})",
            rec.sha256
        )));
    }
    // A signed release's bytes are checked against its signature as they
    // stream in; a release without one is refused here when signatures are
    // required (it may have been registered before they were).
    let keys = release_keys(&state)?;
    let signature = match &rec.signature {
        None if state.config.require_signed_releases => {
            return Err(unsigned(&package, &rec.version));
        }
        None => None,
        Some(_) if keys.is_empty() => None,
        Some(sig) => Some(keys.check(sig, &rec.package, &rec.version, None)?),
    };
    let mut verifier = match &signature {
        Some(sig) => keys.verifier(sig)?,
        None => None,
    };
    let limit = state.config.max_upload_bytes as u64;
    let dir = state.inventory.artifacts_dir().to_path_buf();
    let tmp = dir.join(format!(".upload-{}", uuid_like()));
    // The runner's disk failing to take the bytes is a fault (503), not a
    // refusal of the artifact.
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(ApiError::store_fault)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    let result: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("artifact larger than max_upload_bytes ({limit})"),
                ));
            }
            hasher.update(&chunk);
            if let Some(v) = verifier.as_mut() {
                v.update(&chunk);
            }
            file.write_all(&chunk)
                .await
                .map_err(ApiError::store_fault)?;
        }
        file.sync_all().await.map_err(ApiError::store_fault)?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    if size == 0 {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError::bad_request("the artifact is empty"));
    }
    let sha = hex::encode(hasher.finalize());
    if let Some(sig) = rec.signature.as_ref().filter(|_| !keys.is_empty()) {
        let checked = keys
            .check(sig, &rec.package, &rec.version, Some((&sha, size)))
            .and_then(|_| verifier.map_or(Ok(()), |v| v.finish()));
        if let Err(e) = checked {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError::unprocessable(format!(
                "release {package} {version}: {e}; the artifact was not stored"
            )));
        }
    }
    if let Err(e) = tokio::fs::rename(&tmp, state.inventory.artifact_file(&sha)).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(ApiError::store_fault(e));
    }
    rec.sha256 = sha;
    rec.size = size;
    state.inventory.put_release(rec.clone())?;
    state.store_flush()?;
    Ok((StatusCode::OK, Json(rec)).into_response())
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlane {
    version: String,
}

async fn put_control_plane(
    State(state): State<Arc<AppState>>,
    Path(component): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let cp: ControlPlane = json(&body)?;
    valid_name("component", &component)?;
    flotilla_version::parse(&cp.version)
        .map_err(|e| ApiError::unprocessable(format!("version {:?}: {e}", cp.version)))?;
    state.inventory.set_control_plane(&component, &cp.version)?;
    state.store_flush()?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- policies -----

async fn list_policies(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let policies = state.policies.clone();
    let out = tokio::task::spawn_blocking(move || {
        policies
            .names()
            .into_iter()
            .map(|n| match policies.get(&n) {
                Ok(Some(l)) => serde_json::to_value(l).unwrap_or_default(),
                Ok(None) => serde_json::json!({"name": n, "error": "vanished"}),
                Err(e) => serde_json::json!({"name": n, "error": e.to_string()}),
            })
            .collect()
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(out))
}

async fn get_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    valid_name("policy", &name)?;
    let policies = state.policies.clone();
    let n = name.clone();
    let got = tokio::task::spawn_blocking(move || policies.get(&n))
        .await
        .map_err(ApiError::internal)?;
    match got {
        Ok(Some(l)) => Ok(Json(l).into_response()),
        Ok(None) => Err(ApiError::not_found(format!("no policy {name}"))),
        Err(e) => Err(ApiError::policy(e)),
    }
}

async fn upload_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    valid_name("policy", &name)?;
    let policies = state.policies.clone();
    let saved = tokio::task::spawn_blocking(move || policies.save(&name, &body))
        .await
        .map_err(ApiError::internal)?;
    match saved {
        Ok(l) => Ok((StatusCode::CREATED, Json(l)).into_response()),
        // The runner's disk, not the policy: a fault, worth sending again.
        Err(e @ crate::inventory::SavePolicyError::Store { .. }) => Err(ApiError::store_fault(e)),
        Err(crate::inventory::SavePolicyError::Invalid(e)) => {
            Err(ApiError::unprocessable(e.to_string())
                .hint("run `flotilla policy check FILE` locally for details"))
        }
    }
}

async fn check_policy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    valid_name("policy", &name)?;
    let policies = state.policies.clone();
    let checked = tokio::task::spawn_blocking(move || policies.check(&name, &body))
        .await
        .map_err(ApiError::internal)?;
    match checked {
        Ok((kind, info)) => {
            Ok(Json(serde_json::json!({"kind": kind, "info": info})).into_response())
        }
        Err(e) => Err(ApiError::unprocessable(e.to_string())),
    }
}

// ----- tasks -----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateQuery {
    #[serde(default)]
    dry_run: bool,
}

/// Checks what only the runner knows: the policy loads, the release exists.
pub fn check_task(state: &AppState, spec: &TaskSpec) -> Result<(), ApiError> {
    spec.validate()
        .map_err(|e| ApiError::unprocessable(e.to_string()))?;
    state
        .policies
        .load(&spec.policy, World::empty())
        .map_err(ApiError::policy)?;
    match &spec.target {
        Target::Version(v) => match state.inventory.release(&spec.package, v) {
            Some(r) if r.ready() => Ok(()),
            Some(_) => Err(ApiError::unprocessable(format!(
                "release {} {v} has no artifact yet",
                spec.package
            ))
            .hint("upload it: flotilla release add --file")),
            None => Err(
                ApiError::unprocessable(format!("no release {} {v}", spec.package))
                    .hint("add it first: flotilla release add"),
            ),
        },
        Target::ControlPlane(c) => {
            use flotilla_policy::world::Delivery as _;
            match state.inventory.control_plane_version(c) {
                Some(_) => Ok(()),
                None => Err(ApiError::unprocessable(format!(
                    "no version known for control-plane component {c:?}"
                ))
                .hint(format!("set it: PUT /v1/control-plane/{c}"))),
            }
        }
    }
}

/// Creates a task from a spec (the API and the webhooks).
pub async fn create(state: &Arc<AppState>, spec: TaskSpec) -> Result<Task, ApiError> {
    let s = state.clone();
    let checked = spec.clone();
    tokio::task::spawn_blocking(move || check_task(&s, &checked))
        .await
        .map_err(ApiError::internal)??;
    let task = state
        .engine
        .call(move |e: &mut Engine| (e.create(spec), Vec::new()))
        .await??;
    Ok(task)
}

async fn create_task(
    State(state): State<Arc<AppState>>,
    q: Result<Query<CreateQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let spec: TaskSpec = json(&body)?;
    if q.dry_run {
        let s = state.clone();
        let out = tokio::task::spawn_blocking(move || dry_run(&s, spec))
            .await
            .map_err(ApiError::internal)??;
        return Ok(Json(out).into_response());
    }
    let task = create(&state, spec).await?;
    let object = AuditObject(task.id.clone());
    let mut res = (StatusCode::CREATED, Json(task)).into_response();
    res.extensions_mut().insert(object);
    Ok(res)
}

/// Runs the task on a copy of the current inventory with agents that all
/// succeed, on a virtual clock, and returns the plan and what would happen.
/// Nothing is stored; no agent hears of it.
fn dry_run(state: &AppState, spec: TaskSpec) -> Result<serde_json::Value, ApiError> {
    check_task(state, &spec)?;
    let start = state.clock.now();
    let clock = Arc::new(ManualClock::new(start));
    let fleet = Arc::new(MemoryFleet::new(state.inventory.all_nodes()));
    let mut engine = Engine::new(
        Arc::new(MemoryStore::new()),
        fleet.clone(),
        state.inventory.clone(),
        clock.clone(),
        state.policies.clone(),
    )?;
    let task = engine.create(spec)?;
    sim::run_on(
        &mut engine,
        &clock,
        fleet,
        &Agents::default(),
        60_000,
        30 * 86_400_000,
    )?;
    let task = engine.task(&task.id)?;
    let counts = sim::counts(&engine, &task.id)?;
    let events: Vec<_> = engine
        .events(&task.id, 0, usize::MAX)?
        .into_iter()
        .filter(|e| !e.kind.starts_with("node.") || e.kind == "node.skipped")
        .collect();
    Ok(serde_json::json!({
        "dry_run": true,
        "waves": task.waves,
        "final_state": task.state,
        "counts": counts,
        "events": events,
        "note": "simulated on the current inventory with every agent succeeding (online devices of a pull task ask every 30 s); nodes busy in other tasks are not skipped here",
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TaskListQuery {
    state: Option<String>,
}

async fn list_tasks(
    State(state): State<Arc<AppState>>,
    q: Result<Query<TaskListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = state.store.clone();
    // Heads and wave counts: a 100,000-node plan is not built to be counted.
    let tasks = tokio::task::spawn_blocking(move || store.task_list())
        .await
        .map_err(ApiError::internal)??;
    // The runs of the tasks the engine holds, counted in its memory.
    let mut live = state.engine.read(|e| e.live_counts()).await?;
    Ok(Json(
        tasks
            .into_iter()
            .filter(|(t, _)| q.state.as_deref().is_none_or(|s| t.state.name() == s))
            .map(|(t, waves)| {
                let counts = live.remove(&t.id);
                serde_json::json!({
                    "counts": counts,
                    "id": t.id, "name": t.spec.name, "package": t.spec.package,
                    "target_version": t.target_version, "state": t.state,
                    "waves": waves, "current_wave": t.current_wave,
                    "awaiting_approval": t.awaiting_approval,
                    "created_at": t.created_at, "updated_at": t.updated_at,
                })
            })
            .collect(),
    ))
}

async fn get_task(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    task_view(&state, id).await.map(Json)
}

/// A task and its runs counted by state (`GET /v1/tasks/{id}`, the
/// dashboard's live stream).
pub(crate) async fn task_view(state: &Arc<AppState>, id: String) -> Result<TaskView, ApiError> {
    // A task the engine holds is counted in its memory; reading every run
    // back from the store costs ~5 µs a run.
    let live = {
        let id = id.clone();
        state.engine.read(move |e| e.live_view(&id)).await?
    };
    if let Some((task, counts)) = live {
        return Ok(TaskView { task, counts });
    }
    let store = state.store.clone();
    let view = tokio::task::spawn_blocking(move || -> Result<TaskView, ApiError> {
        let task = store
            .task(&id)?
            .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
        let runs = store.runs(&id)?;
        Ok(TaskView {
            task,
            counts: count_states(&runs),
        })
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(view)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RunQuery {
    state: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

async fn list_runs(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<RunQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page<NodeRun>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = state.store.clone();
    let page = tokio::task::spawn_blocking(move || -> Result<Page<NodeRun>, ApiError> {
        if store.task(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no task {id}")));
        }
        let runs: Vec<NodeRun> = store
            .runs(&id)?
            .into_iter()
            .filter(|r| {
                q.state.as_deref().is_none_or(|s| {
                    r.state.name() == s
                        // The failure list: every failed state at once.
                        || (s == "failed" && r.state.failed())
                })
            })
            .collect();
        let total = runs.len();
        let items = runs
            .into_iter()
            .skip(q.offset)
            .take(q.limit.unwrap_or(1000).min(10_000))
            .collect();
        Ok(Page { items, total })
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(page))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

async fn list_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let store = state.store.clone();
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let events = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        if store.task(&id)?.is_none() {
            return Err(ApiError::not_found(format!("no task {id}")));
        }
        Ok(store.events(&id, q.from, limit)?)
    })
    .await
    .map_err(ApiError::internal)??;
    let next = events.last().map(|e| e.seq + 1).unwrap_or(q.from);
    let more = events.len() == limit;
    Ok(Json(
        serde_json::json!({ "events": events, "next": next, "more": more }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    #[serde(default)]
    reason: String,
}

async fn control_task(
    State(state): State<Arc<AppState>>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Task>, ApiError> {
    let Reason { reason } = json_or_default(&body)?;
    if !matches!(
        action.as_str(),
        "pause" | "resume" | "promote" | "cancel" | "rollback"
    ) {
        return Err(ApiError::not_found(format!(
            "no action {action:?}: use pause, resume, promote, cancel or rollback"
        )));
    }
    let task = state
        .engine
        .call(move |e: &mut Engine| {
            if e.task(&id).is_err() {
                return (Err(flotilla_engine::EngineError::NoTask(id)), Vec::new());
            }
            match action.as_str() {
                "pause" => (e.pause(&id, &reason), Vec::new()),
                "resume" => (e.resume(&id), Vec::new()),
                "promote" => (e.promote(&id), Vec::new()),
                "cancel" => (e.cancel(&id), Vec::new()),
                _ => match e.rollback(&id, &reason) {
                    Ok((t, commands)) => (Ok(t), commands),
                    Err(err) => (Err(err), Vec::new()),
                },
            }
        })
        .await??;
    Ok(Json(task))
}

// ----- tokens -----

async fn list_tokens(State(state): State<Arc<AppState>>) -> Json<Vec<access::TokenInfo>> {
    Json(state.access.list())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Role,
}

/// `POST /v1/tokens`: the secret is in this answer and nowhere else.
async fn create_token(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t: NewToken = json(&body)?;
    let now = state.clock.now();
    let token = state.access.create(&t.name, t.role, now)?;
    state.store_flush()?;
    tracing::info!(token = %t.name, role = %t.role, "management token created");
    let mut res = (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "name": t.name, "role": t.role, "token": token, "created_at": now,
        })),
    )
        .into_response();
    res.extensions_mut().insert(AuditObject(t.name));
    Ok(res)
}

async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<access::TokenInfo>, ApiError> {
    let info = state.access.revoke(&name)?;
    state.store_flush()?;
    tracing::info!(token = %name, "management token revoked");
    Ok(Json(info))
}

// ----- audit -----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/audit?after=CURSOR&limit=N`: records after the cursor (0: from
/// the oldest kept); without `after`, the newest `limit` (default 100).
async fn audit_log(
    State(state): State<Arc<AppState>>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<crate::audit::AuditPage>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > crate::audit::MAX_PAGE {
        return Err(ApiError::unprocessable(format!(
            "limit must be between 1 and {}",
            crate::audit::MAX_PAGE
        )));
    }
    let s = state.clone();
    let page = tokio::task::spawn_blocking(move || s.audit.page(q.after, limit))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(page))
}
