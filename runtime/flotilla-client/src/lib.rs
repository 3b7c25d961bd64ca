//! A typed async client for the runner's management API (`/v1`, see
//! `server/openapi.json`): what the `flotilla task|node|release|policy` verbs
//! and scripts in Rust call. Every call returns the decoded model type or a
//! [`ClientError`] that carries the server's `error` and `hint`.

use flotilla_model::ReleaseKind;
use flotilla_model::ReleaseRecord;
pub use flotilla_model::{AuditPage, AuditRecord, TaskView};
use flotilla_model::{Event, Node, NodeRun, PolicyInfo, Task, TaskSpec, TaskState, Wave};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The runner's address when none is given (`flotilla serve`'s default).
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

/// What went wrong talking to the runner.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the runner at {url}: {reason}\nhint: is `flotilla serve` running at {url}? set --server or FLOTILLA_SERVER"
    )]
    Unreachable { url: String, reason: String },
    /// The runner answered with an error status and its `{"error", "hint"}` body.
    #[error("{}{}", .error, .hint.as_deref().map(|h| format!("\nhint: {h}")).unwrap_or_default())]
    Api {
        status: u16,
        error: String,
        hint: Option<String>,
    },
    /// The runner answered something this client does not understand.
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
    /// Any other transport failure (the message includes the cause).
    #[error("request to {url} failed: {}", chain(.err))]
    Http { url: String, err: reqwest::Error },
    #[error("invalid server URL {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    BadServer(String),
}

impl ClientError {
    /// The HTTP status for [`ClientError::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One page of a list (`items` and the `total` before paging).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
}

/// A task as `GET /v1/tasks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskListing {
    pub id: String,
    pub name: String,
    pub package: String,
    pub target_version: Option<String>,
    pub state: TaskState,
    /// Number of waves planned.
    pub waves: usize,
    pub current_wave: u32,
    pub awaiting_approval: bool,
    pub created_at: u64,
    pub updated_at: u64,
}

/// What a dry run (`POST /v1/tasks?dry_run=true`) says would happen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    pub dry_run: bool,
    pub waves: Vec<Wave>,
    pub final_state: TaskState,
    pub counts: BTreeMap<String, usize>,
    pub events: Vec<Event>,
    #[serde(default)]
    pub note: String,
}

/// A page of a task's event log; ask again `from` = `next` for more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub next: u64,
    pub more: bool,
}

/// A policy as the runner lists it; `error` instead of `info` when it no
/// longer loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default)]
    pub builtin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<PolicyInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Filters of `GET /v1/nodes`; `None` / empty = any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFilter {
    /// `(key, value)` pairs a node must all carry.
    pub labels: Vec<(String, String)>,
    pub version: Option<String>,
    pub online: Option<bool>,
    pub healthy: Option<bool>,
}

/// A token that enrolls one node id once (`POST /v1/nodes/{id}/enroll-token`);
/// the agent presents it as its enrollment secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    pub node_id: String,
    pub token: String,
    /// Unix ms.
    pub expires_at: u64,
}

/// An enrolled node's leave to enroll once more (`POST /v1/nodes/{id}/reenroll`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reenrollment {
    pub node_id: String,
    /// Unix ms.
    pub expires_at: u64,
}

/// A release to register (`POST /v1/releases`): without `url` the artifact
/// is uploaded afterwards; with it, `sha256` and `size` are required.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewRelease {
    pub package: String,
    pub version: String,
    pub kind: ReleaseKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The release's minisign signature (the `.minisig` text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A management token as the runner lists it (`GET /v1/tokens`): never
/// the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub name: String,
    /// `read`, `operate` or `admin`.
    pub role: String,
    /// `config` (from the runner's config) or `stored` (revocable).
    pub source: String,
    /// Unix ms.
    pub created_at: Option<u64>,
    /// Unix ms, to the minute.
    pub last_used: Option<u64>,
}

/// A token just made (`POST /v1/tokens`): the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub role: String,
    pub token: String,
    /// Unix ms.
    pub created_at: u64,
}

/// An operator action on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAction {
    Pause,
    Resume,
    Promote,
    Cancel,
    Rollback,
}

impl TaskAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskAction::Pause => "pause",
            TaskAction::Resume => "resume",
            TaskAction::Promote => "promote",
            TaskAction::Cancel => "cancel",
            TaskAction::Rollback => "rollback",
        }
    }
}

/// A connection to one runner.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `server` is the runner's base URL (`http://127.0.0.1:7878`); `token`
    /// the management token, when the runner has one.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        Self::with_ca(server, token, None)
    }

    /// [`Client::new`] that also trusts the CA certificates in `ca_pem` (PEM,
    /// a private CA) for the runner's TLS certificate, beside the built-in
    /// public roots.
    pub fn with_ca(
        server: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Client, ClientError> {
        let base = server.trim().trim_end_matches('/').to_string();
        let host = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            return Err(ClientError::BadServer(server.to_string()));
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(pem) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|err| ClientError::Http {
                    url: base.clone(),
                    err,
                })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|err| ClientError::Http {
            url: base.clone(),
            err,
        })?;
        Ok(Client {
            base,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    fn transport(&self, url: &str, e: reqwest::Error) -> ClientError {
        if e.is_connect() {
            // The innermost cause is the useful one ("Connection refused").
            let mut src: &dyn std::error::Error = &e;
            while let Some(s) = src.source() {
                src = s;
            }
            ClientError::Unreachable {
                url: self.base.clone(),
                reason: src.to_string(),
            }
        } else {
            ClientError::Http {
                url: url.to_string(),
                err: e,
            }
        }
    }

    /// Sends, and turns an error status into [`ClientError::Api`].
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = req.build().map_err(|e| ClientError::Http {
            url: self.base.clone(),
            err: e,
        })?;
        let url = req.url().to_string();
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| self.transport(&url, e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            hint: Option<String>,
        }
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                error: b.error,
                hint: b.hint,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                error: format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
                ),
                hint: None,
            },
        })
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(req).await?;
        let url = resp.url().to_string();
        let body = resp.bytes().await.map_err(|e| self.transport(&url, e))?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.decode(self.request(reqwest::Method::GET, path)).await
    }

    /// `GET /healthz`: the runner answers.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::GET, "/healthz"))
            .await
            .map(drop)
    }

    // ----- tasks -----

    pub async fn create_task(&self, spec: &TaskSpec) -> Result<Task, ClientError> {
        self.decode(self.request(reqwest::Method::POST, "/v1/tasks").json(spec))
            .await
    }

    /// Simulates the task on the runner's current inventory; nothing is stored.
    pub async fn dry_run(&self, spec: &TaskSpec) -> Result<DryRun, ClientError> {
        self.decode(
            self.request(reqwest::Method::POST, "/v1/tasks?dry_run=true")
                .json(spec),
        )
        .await
    }

    /// Tasks, optionally only those in `state` (`running`, `paused`, ...).
    pub async fn tasks(&self, state: Option<&str>) -> Result<Vec<TaskListing>, ClientError> {
        let mut req = self.request(reqwest::Method::GET, "/v1/tasks");
        if let Some(s) = state {
            req = req.query(&[("state", s)]);
        }
        self.decode(req).await
    }

    pub async fn task(&self, id: &str) -> Result<TaskView, ClientError> {
        self.get(&format!("/v1/tasks/{}", seg(id))).await
    }

    /// One page of a task's node runs; `state` `failed` is every failed state.
    pub async fn runs(
        &self,
        id: &str,
        state: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<Page<NodeRun>, ClientError> {
        let mut req = self
            .request(reqwest::Method::GET, &format!("/v1/tasks/{}/runs", seg(id)))
            .query(&[("offset", offset), ("limit", limit)]);
        if let Some(s) = state {
            req = req.query(&[("state", s)]);
        }
        self.decode(req).await
    }

    /// Every node run of a task (paged through), optionally filtered by state.
    pub async fn all_runs(
        &self,
        id: &str,
        state: Option<&str>,
    ) -> Result<Page<NodeRun>, ClientError> {
        const PAGE: usize = 10_000;
        let mut out = self.runs(id, state, 0, PAGE).await?;
        // Bounded by the total the first page reported.
        while out.items.len() < out.total {
            let next = self.runs(id, state, out.items.len(), PAGE).await?;
            if next.items.is_empty() {
                break;
            }
            out.items.extend(next.items);
        }
        Ok(out)
    }

    /// Events of a task from sequence number `from`, at most `limit`.
    pub async fn events(
        &self,
        id: &str,
        from: u64,
        limit: usize,
    ) -> Result<EventPage, ClientError> {
        self.decode(
            self.request(
                reqwest::Method::GET,
                &format!("/v1/tasks/{}/events", seg(id)),
            )
            .query(&[("from", from), ("limit", limit as u64)]),
        )
        .await
    }

    /// Pause, resume, promote, cancel or roll back a task.
    pub async fn control(
        &self,
        id: &str,
        action: TaskAction,
        reason: Option<&str>,
    ) -> Result<Task, ClientError> {
        let body = serde_json::json!({ "reason": reason.unwrap_or_default() });
        self.decode(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/tasks/{}/{}", seg(id), action.as_str()),
            )
            .json(&body),
        )
        .await
    }

    // ----- nodes -----

    pub async fn nodes(&self, filter: &NodeFilter) -> Result<Page<Node>, ClientError> {
        let mut q: Vec<(&str, String)> = vec![("limit", "10000".into())];
        if !filter.labels.is_empty() {
            let labels: Vec<String> = filter
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            q.push(("label", labels.join(",")));
        }
        if let Some(v) = &filter.version {
            q.push(("version", v.clone()));
        }
        if let Some(o) = filter.online {
            q.push(("online", o.to_string()));
        }
        if let Some(h) = filter.healthy {
            q.push(("healthy", h.to_string()));
        }
        self.decode(self.request(reqwest::Method::GET, "/v1/nodes").query(&q))
            .await
    }

    pub async fn node(&self, id: &str) -> Result<Node, ClientError> {
        self.get(&format!("/v1/nodes/{}", seg(id))).await
    }

    /// Registers or replaces a node's inventory record.
    pub async fn put_node(&self, node: &Node) -> Result<Node, ClientError> {
        self.decode(
            self.request(
                reqwest::Method::PUT,
                &format!("/v1/nodes/{}", seg(&node.id)),
            )
            .json(node),
        )
        .await
    }

    /// A one-time enrollment token for node `id`, valid for `expires`
    /// (whole seconds, at least one).
    pub async fn enroll_token(
        &self,
        id: &str,
        expires: Duration,
    ) -> Result<EnrollToken, ClientError> {
        self.decode(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/nodes/{}/enroll-token", seg(id)),
            )
            .json(&serde_json::json!({ "expires_seconds": expires.as_secs().max(1) })),
        )
        .await
    }

    /// Lets the enrolled node `id` enroll once more within `expires`.
    pub async fn allow_reenroll(
        &self,
        id: &str,
        expires: Duration,
    ) -> Result<Reenrollment, ClientError> {
        self.decode(
            self.request(
                reqwest::Method::POST,
                &format!("/v1/nodes/{}/reenroll", seg(id)),
            )
            .json(&serde_json::json!({ "expires_seconds": expires.as_secs().max(1) })),
        )
        .await
    }

    // ----- releases -----

    pub async fn releases(&self, package: Option<&str>) -> Result<Vec<ReleaseRecord>, ClientError> {
        let mut req = self.request(reqwest::Method::GET, "/v1/releases");
        if let Some(p) = package {
            req = req.query(&[("package", p)]);
        }
        self.decode(req).await
    }

    pub async fn create_release(&self, r: &NewRelease) -> Result<ReleaseRecord, ClientError> {
        self.decode(self.request(reqwest::Method::POST, "/v1/releases").json(r))
            .await
    }

    /// Uploads a release's artifact; the runner computes its sha256 and size.
    /// `body` may be a stream ([`reqwest::Body::wrap_stream`]); `len` is sent
    /// as `Content-Length` when known.
    pub async fn upload_artifact(
        &self,
        package: &str,
        version: &str,
        body: reqwest::Body,
        len: Option<u64>,
    ) -> Result<ReleaseRecord, ClientError> {
        let mut req = self
            .request(
                reqwest::Method::PUT,
                &format!("/v1/releases/{}/{}/artifact", seg(package), seg(version)),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        if let Some(n) = len {
            req = req.header(reqwest::header::CONTENT_LENGTH, n);
        }
        self.decode(req).await
    }

    // ----- tokens and the audit log -----

    /// Makes a management token `name` with `role` (`read`, `operate`,
    /// `admin`); its secret is in the answer only.
    pub async fn create_token(&self, name: &str, role: &str) -> Result<NewToken, ClientError> {
        self.decode(
            self.request(reqwest::Method::POST, "/v1/tokens")
                .json(&serde_json::json!({ "name": name, "role": role })),
        )
        .await
    }

    pub async fn tokens(&self) -> Result<Vec<TokenEntry>, ClientError> {
        self.get("/v1/tokens").await
    }

    pub async fn revoke_token(&self, name: &str) -> Result<TokenEntry, ClientError> {
        self.decode(self.request(
            reqwest::Method::DELETE,
            &format!("/v1/tokens/{}", seg(name)),
        ))
        .await
    }

    /// Audit records after `after` (0: from the oldest kept), or with
    /// `after` `None` the newest `limit`.
    pub async fn audit(&self, after: Option<u64>, limit: usize) -> Result<AuditPage, ClientError> {
        let mut req = self
            .request(reqwest::Method::GET, "/v1/audit")
            .query(&[("limit", limit)]);
        if let Some(a) = after {
            req = req.query(&[("after", a)]);
        }
        self.decode(req).await
    }

    // ----- policies -----

    pub async fn policies(&self) -> Result<Vec<PolicyEntry>, ClientError> {
        self.get("/v1/policies").await
    }

    /// Uploads a `.wasm` component or a `.rhai` script under `name`; the
    /// runner loads it first and refuses one that does not load.
    pub async fn upload_policy(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<PolicyEntry, ClientError> {
        self.decode(
            self.request(reqwest::Method::PUT, &format!("/v1/policies/{}", seg(name)))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes),
        )
        .await
    }
}

/// An error and its causes on one line (reqwest's own message is terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        src = s.source();
    }
    out
}

/// Percent-encodes one path segment (ids and names are usually plain already).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_checked() {
        assert_eq!(
            Client::new("http://127.0.0.1:7878/", None).unwrap().base(),
            "http://127.0.0.1:7878"
        );
        for bad in ["127.0.0.1:7878", "ftp://x", "http://", "http:///p"] {
            assert!(
                matches!(Client::new(bad, None), Err(ClientError::BadServer(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn api_errors_show_the_hint() {
        let e = ClientError::Api {
            status: 401,
            error: "missing or wrong management token".into(),
            hint: Some("pass --token or set FLOTILLA_TOKEN".into()),
        };
        assert_eq!(
            e.to_string(),
            "missing or wrong management token\nhint: pass --token or set FLOTILLA_TOKEN"
        );
        assert_eq!(e.status(), Some(401));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("edge-01.a_b"), "edge-01.a_b");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
    }
}
