//! Webhooks that start upgrade tasks: `POST /v1/hooks/{name}`.
//!
//! Each hook has a secret and a mapping from payload fields (JSON pointers)
//! to a task spec. A request must be signed with HMAC-SHA256 of its body:
//! GitHub's `X-Hub-Signature-256: sha256=<hex>` or `X-Flotilla-Signature:
//! sha256=<hex>`, checked in constant time.
//!
//! A signed body starts at most one task. The delivery id (`X-GitHub-Delivery`
//! or `X-Flotilla-Delivery`) is not signed, so a delivery is known by the
//! SHA-256 of its signed body as well as by its id: the same body again, with
//! a new id or none, answers 200 with the task the first delivery created
//! (`duplicate: true`). Both keys are kept in the `deliveries` tree, so a
//! restart keeps them. A task the hook maps is refused like any other (409)
//! when another active task takes the same package to the same target or when
//! it would only downgrade; `downgrade = true` in a hook's task needs
//! `allow_downgrade = true` in its config.
//!
//! ```toml
//! [[hooks]]
//! name = "github-release"
//! secret_env = "GITHUB_HOOK_SECRET"   # or secret = "..."
//! when = { "/action" = "published" }  # other events are answered 202, ignored
//! fields = { version = "/release/tag_name" }
//! task = { package = "edge-agent", policy = "canary", params = { threshold = 0.1 } }
//! # allow_downgrade = true          # only then may `task` or `fields` set downgrade
//! ```

use super::AppState;
use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use flotilla_model::TaskSpec;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub name: String,
    /// The shared secret, or...
    #[serde(default)]
    pub secret: Option<String>,
    /// ...the environment variable that holds it.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Payload fields that must have these values; other deliveries are
    /// acknowledged and ignored (GitHub sends `created`, `edited`, ...).
    #[serde(default)]
    pub when: BTreeMap<String, Value>,
    /// Task spec field → JSON pointer into the payload. `version` sets the
    /// target version; `name` defaults to `<hook>-<version>`.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// The rest of the task spec.
    #[serde(default)]
    pub task: serde_json::Map<String, Value>,
    /// Whether this hook may start a task with `downgrade: true` (set in
    /// `task` or mapped in `fields`). Off by default: a replayed or forged
    /// release event must not take a fleet back.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Register the release from the payload too, so that the release event
    /// alone starts the rollout (the agents download the artifact from its
    /// URL and check its size and sha256).
    #[serde(default)]
    pub release: Option<HookRelease>,
}

/// Where a hook finds the artifact of the release it starts: a GitHub
/// release asset chosen by name (`asset`), or JSON pointers to a URL, a
/// sha256 and a size (`url`, `sha256`, `size`) for other senders.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HookRelease {
    /// The asset's name, with at most one `*` (`edge-agent-*-arm64.tar.gz`):
    /// exactly one asset of the release must match. GitHub sends each
    /// asset's `browser_download_url`, `size` and `digest` (`sha256:...`).
    #[serde(default)]
    pub asset: Option<String>,
    /// The list of assets (default `/release/assets`, GitHub's).
    #[serde(default)]
    pub assets: Option<String>,
    /// JSON pointers, instead of `asset`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub size: Option<String>,
}

/// What a payload says about the release's artifact.
#[derive(Debug, Clone, PartialEq)]
pub struct HookArtifact {
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

/// A `[[hooks]]` entry that cannot work: the hook and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum HookConfigError {
    #[error(transparent)]
    Name(flotilla_model::NameError),
    #[error(
        "hook name {0:?} is reserved: /metrics counts deliveries to unconfigured names under it"
    )]
    Reserved(String),
    #[error("hook {0:?} has no secret: set `secret` or `secret_env` (and export that variable)")]
    NoSecret(String),
    #[error(
        "hook {hook:?}: {field}: {pointer:?} is not a JSON pointer (it starts with `/`, e.g. /release/tag_name)"
    )]
    NotAPointer {
        hook: String,
        field: String,
        pointer: String,
    },
    #[error("hook {0:?} sets `downgrade` but its config does not say `allow_downgrade = true`")]
    DowngradeNotAllowed(String),
    #[error("hook {hook:?}: release.asset {asset:?}: give a name with at most one `*`")]
    AssetPattern { hook: String, asset: String },
    #[error(
        "hook {0:?}: release: give `asset` (a GitHub release asset's name), or all of `url`, `sha256` and `size` (JSON pointers), not both"
    )]
    ReleaseShape(String),
    #[error("hook {0:?}: map `version` in `fields` or set `target` in `task`")]
    NoVersion(String),
}

impl HookRelease {
    fn check(&self, hook: &str) -> Result<(), HookConfigError> {
        let pointers = [&self.url, &self.sha256, &self.size];
        match (&self.asset, pointers.iter().filter(|p| p.is_some()).count()) {
            (Some(a), 0) if a.matches('*').count() <= 1 && !a.is_empty() => Ok(()),
            (Some(a), 0) => Err(HookConfigError::AssetPattern {
                hook: hook.to_string(),
                asset: a.clone(),
            }),
            (None, 3) => Ok(()),
            _ => Err(HookConfigError::ReleaseShape(hook.to_string())),
        }
    }

    /// The artifact a payload names, or what is missing or wrong in it.
    pub fn artifact(&self, payload: &Value) -> Result<HookArtifact, ApiError> {
        let bad = |m: String| ApiError::unprocessable(m);
        let (url, sha256, size) = match &self.asset {
            Some(pattern) => {
                let at = self.assets.as_deref().unwrap_or("/release/assets");
                let assets = payload
                    .pointer(at)
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad(format!("the payload has no list of assets at {at}")))?;
                let named: Vec<&Value> = assets
                    .iter()
                    .filter(|a| a["name"].as_str().is_some_and(|n| glob(pattern, n)))
                    .collect();
                let asset = match named.as_slice() {
                    [one] => *one,
                    [] => {
                        let names: Vec<&str> =
                            assets.iter().filter_map(|a| a["name"].as_str()).collect();
                        return Err(bad(format!(
                            "no asset of the release is named {pattern:?} (it has: {})",
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        )));
                    }
                    many => {
                        return Err(bad(format!(
                            "{} assets match {pattern:?}: make release.asset name exactly one",
                            many.len()
                        )));
                    }
                };
                let name = asset["name"].as_str().unwrap_or_default();
                let digest = asset["digest"].as_str().ok_or_else(|| {
                    bad(format!(
                        "asset {name} has no `digest` (sha256:...): the agents could not verify it"
                    ))
                })?;
                let sha = digest.strip_prefix("sha256:").ok_or_else(|| {
                    bad(format!(
                        "asset {name}: digest {digest:?} is not sha256:<hex>"
                    ))
                })?;
                (
                    asset["browser_download_url"].clone(),
                    Value::String(sha.to_string()),
                    asset["size"].clone(),
                )
            }
            None => {
                let field = |ptr: &Option<String>, what: &str| {
                    let ptr = ptr.as_deref().unwrap_or_default();
                    payload
                        .pointer(ptr)
                        .cloned()
                        .ok_or_else(|| bad(format!("the payload has no {what} at {ptr}")))
                };
                (
                    field(&self.url, "artifact url")?,
                    field(&self.sha256, "sha256")?,
                    field(&self.size, "size")?,
                )
            }
        };
        let url = url
            .as_str()
            .ok_or_else(|| bad("the artifact's url is not a string".into()))?;
        let sha256 = sha256
            .as_str()
            .ok_or_else(|| bad("the artifact's sha256 is not a string".into()))?;
        let size = size
            .as_u64()
            .filter(|s| *s > 0)
            .ok_or_else(|| bad("the artifact's size is not a positive number".into()))?;
        Ok(HookArtifact {
            url: url.to_string(),
            sha256: sha256.to_ascii_lowercase(),
            size,
        })
    }
}

/// `name` matches `pattern` (at most one `*`, any run of characters).
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.len() >= head.len() + tail.len() && name.starts_with(head) && name.ends_with(tail)
        }
    }
}

impl HookConfig {
    pub fn check(&self) -> Result<(), HookConfigError> {
        flotilla_model::check_name("hook", &self.name).map_err(HookConfigError::Name)?;
        if self.name == super::metrics::UNKNOWN_HOOK {
            return Err(HookConfigError::Reserved(self.name.clone()));
        }
        if self.secret().is_none() {
            return Err(HookConfigError::NoSecret(self.name.clone()));
        }
        for (field, ptr) in self.fields.iter().chain(self.when.keys().map(|p| (p, p))) {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                return Err(HookConfigError::NotAPointer {
                    hook: self.name.clone(),
                    field: field.clone(),
                    pointer: ptr.clone(),
                });
            }
        }
        if !self.allow_downgrade
            && (self.task.get("downgrade") == Some(&Value::Bool(true))
                || self.fields.contains_key("downgrade"))
        {
            return Err(HookConfigError::DowngradeNotAllowed(self.name.clone()));
        }
        if let Some(r) = &self.release {
            r.check(&self.name)?;
        }
        if !self.fields.contains_key("version") && !self.task.contains_key("target") {
            return Err(HookConfigError::NoVersion(self.name.clone()));
        }
        Ok(())
    }

    fn secret(&self) -> Option<String> {
        self.secret.clone().filter(|s| !s.is_empty()).or_else(|| {
            self.secret_env
                .as_deref()
                .and_then(|v| std::env::var(v).ok())
                .filter(|s| !s.is_empty())
        })
    }

    /// Builds the task spec from a payload, or says which field is missing.
    pub fn spec(&self, payload: &Value) -> Result<Option<TaskSpec>, ApiError> {
        for (ptr, want) in &self.when {
            if payload.pointer(ptr) != Some(want) {
                return Ok(None);
            }
        }
        let mut spec = self.task.clone();
        let mut version = None;
        for (field, ptr) in &self.fields {
            let v = payload.pointer(ptr).filter(|v| !v.is_null()).ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "the payload has no `{}` (JSON pointer {ptr}), needed for the task's `{field}`",
                    ptr.trim_start_matches('/').replace('/', ".")
                ))
            })?;
            if field == "version" {
                let s = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                flotilla_version::parse(&s).map_err(|e| {
                    ApiError::unprocessable(format!(
                        "payload field {ptr} = {s:?} is not a version: {e}"
                    ))
                })?;
                spec.insert("target".into(), serde_json::json!({ "version": s }));
                version = Some(s);
            } else {
                spec.insert(field.clone(), v.clone());
            }
        }
        if !spec.contains_key("name") {
            let v = version.as_deref().unwrap_or("release");
            spec.insert("name".into(), task_name(&self.name, v).into());
        }
        let spec: TaskSpec = serde_json::from_value(Value::Object(spec)).map_err(|e| {
            ApiError::unprocessable(format!(
                "hook {}: the mapped task spec is invalid: {e}",
                self.name
            ))
        })?;
        if spec.downgrade && !self.allow_downgrade {
            return Err(ApiError::unprocessable(format!(
                "hook {}: the task would be a downgrade, and this hook may not start one",
                self.name
            ))
            .hint("set `allow_downgrade = true` in the hook's config to allow it"));
        }
        Ok(Some(spec))
    }
}

/// `<hook>-<version>` as a task name (a DNS label).
fn task_name(hook: &str, version: &str) -> String {
    let raw = format!("{hook}-{version}").to_ascii_lowercase();
    let mut s: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.truncate(63);
    s.trim_matches('-').to_string()
}

/// Verifies `sha256=<hex>` against the HMAC of `body` (constant time).
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `sha256=<hex>` of `body` (for clients and tests).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/hooks/{name}", post(hook))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_body_bytes,
        ))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), audited))
        .with_state(state)
}

/// Every delivery gets an audit record under `hook:NAME` (see
/// [`crate::audit`]), written before it is handled: a store fault there
/// answers 503 and handles nothing.
async fn audited(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    let rec = match state.audit.append(
        state.clock.now(),
        &format!("hook:{name}"),
        req.method().as_str(),
        &path,
        None,
        None,
        None,
    ) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::store_fault(format!("writing the audit record: {e}")).into_response();
        }
    };
    let res = next.run(req).await;
    super::api::finish_audit(&state, rec, &res);
    res
}

#[derive(Serialize, Deserialize)]
struct Delivered {
    task: String,
}

async fn hook(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let outcome = handle(&state, &name, &headers, &body).await;
    let label = match &outcome {
        Ok((s, _)) if *s == StatusCode::CREATED => "created",
        Ok((s, _)) if *s == StatusCode::ACCEPTED => "ignored",
        Ok(_) => "duplicate",
        Err(e) if e.status == StatusCode::UNAUTHORIZED => "unauthorized",
        Err(e) if e.status == StatusCode::NOT_FOUND => "unknown-hook",
        Err(e) if e.status.is_client_error() => "invalid",
        Err(_) => "error",
    };
    let configured = state.config.hooks.iter().any(|h| h.name == name);
    state
        .metrics
        .webhook(configured.then_some(name.as_str()), label);
    let (status, body) = outcome?;
    let task = body["task"]
        .as_str()
        .or_else(|| body["id"].as_str())
        .map(str::to_string);
    let mut res = (status, Json(body)).into_response();
    if let Some(t) = task {
        res.extensions_mut().insert(super::api::AuditObject(t));
    }
    Ok(res)
}

async fn handle(
    state: &Arc<AppState>,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiError> {
    let hook = state
        .config
        .hooks
        .iter()
        .find(|h| h.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no hook {name:?} is configured")))?;
    let secret = hook
        .secret()
        .ok_or_else(|| ApiError::internal(format!("hook {name}: its secret is not set")))?;
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let signature = header("x-hub-signature-256").or_else(|| header("x-flotilla-signature"));
    match signature {
        None => {
            return Err(ApiError::unauthorized(
                "unsigned request: send X-Hub-Signature-256 or X-Flotilla-Signature (sha256=<hex HMAC of the body>)",
            ));
        }
        Some(sig) if !verify(secret.as_bytes(), body, sig) => {
            return Err(ApiError::unauthorized("bad signature"));
        }
        Some(_) => {}
    }
    let payload: Value = super::error::json(body)?;
    // Keys of this delivery: the digest of the signed body (hook names have
    // no `:`, so it cannot collide with an id key) and the id, if sent.
    let mut keys = vec![format!(
        "sha256:{name}:{}",
        hex::encode(Sha256::digest(body))
    )];
    if let Some(d) = header("x-github-delivery").or_else(|| header("x-flotilla-delivery")) {
        keys.push(format!("{name}/{d}"));
    }
    if let Some(task) = known(&state.inventory.deliveries, &keys)? {
        return Ok((StatusCode::OK, duplicate(&task)));
    }
    let Some(spec) = hook.spec(&payload)? else {
        return Ok((
            StatusCode::ACCEPTED,
            serde_json::json!({ "ignored": "the payload does not match this hook's `when`" }),
        ));
    };
    if let Some(release) = &hook.release {
        register_release(state, release, &payload, &spec)?;
    }
    let s = state.clone();
    let checked = spec.clone();
    tokio::task::spawn_blocking(move || super::api::check_task(&s, &checked))
        .await
        .map_err(ApiError::internal)??;
    // Check and create on the engine thread: two racing redeliveries are
    // serialised there, so only one creates a task.
    let deliveries = state.inventory.deliveries.clone();
    let created = state
        .engine
        .call(move |engine| {
            match known(&deliveries, &keys) {
                Ok(Some(task)) => return (Ok(Err(task)), Vec::new()),
                Ok(None) => {}
                Err(e) => return (Err(e), Vec::new()),
            }
            let task = match engine.create(spec) {
                Ok(t) => t,
                Err(e) => return (Err(ApiError::from(e)), Vec::new()),
            };
            let seen = Delivered {
                task: task.id.clone(),
            };
            for key in &keys {
                if let Err(e) = deliveries.put(key, &seen) {
                    return (Err(ApiError::from(e)), Vec::new());
                }
            }
            (Ok(Ok(task)), Vec::new())
        })
        .await??;
    match created {
        Ok(task) => {
            tracing::info!(hook = name, task = %task.id, "webhook created a task");
            Ok((
                StatusCode::CREATED,
                serde_json::to_value(&task).map_err(ApiError::internal)?,
            ))
        }
        Err(existing) => Ok((StatusCode::OK, duplicate(&existing))),
    }
}

/// Registers the release a delivery names (a URL release), unless the same
/// one is there already (a redelivery after a refused task). A release of
/// that version with another artifact is a conflict: releases are immutable.
fn register_release(
    state: &AppState,
    release: &HookRelease,
    payload: &Value,
    spec: &TaskSpec,
) -> Result<(), ApiError> {
    let flotilla_model::Target::Version(version) = &spec.target else {
        return Err(ApiError::unprocessable(
            "a hook that registers its release needs a target version (map `version` in `fields`)",
        ));
    };
    let artifact = release.artifact(payload)?;
    let rec = super::api::release_record(
        state,
        super::api::NewRelease {
            package: spec.package.clone(),
            version: version.clone(),
            kind: Default::default(),
            url: Some(artifact.url),
            sha256: Some(artifact.sha256),
            size: Some(artifact.size),
            // A signed release is added with its signature by an operator;
            // a runner that requires signatures refuses this one (422).
            signature: None,
        },
    )?;
    match state.inventory.release(&rec.package, &rec.version) {
        Some(existing)
            if existing.url == rec.url
                && existing.sha256 == rec.sha256
                && existing.size == rec.size =>
        {
            Ok(())
        }
        Some(existing) => Err(ApiError::conflict(format!(
            "release {} {} exists with another artifact (sha256 {:?}); releases are immutable, publish a new version",
            existing.package, existing.version, existing.sha256
        ))),
        None => {
            tracing::info!(package = rec.package, version = rec.version, url = ?rec.url, "webhook registered a release");
            state.inventory.put_release(rec)?;
            state.store_flush()
        }
    }
}

/// The task an earlier delivery with any of `keys` created.
fn known(
    deliveries: &flotilla_store_sled::Kv,
    keys: &[String],
) -> Result<Option<String>, ApiError> {
    for key in keys {
        if let Some(d) = deliveries.get::<Delivered>(key)? {
            return Ok(Some(d.task));
        }
    }
    Ok(None)
}

fn duplicate(task: &str) -> Value {
    serde_json::json!({ "task": task, "duplicate": true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_reject() {
        let sig = sign(b"s3cret", b"{}");
        assert!(verify(b"s3cret", b"{}", &sig));
        assert!(!verify(b"other", b"{}", &sig));
        assert!(!verify(b"s3cret", b"{ }", &sig));
        assert!(!verify(b"s3cret", b"{}", sig.trim_start_matches("sha256=")));
        assert!(!verify(b"s3cret", b"{}", "sha256=zz"));
        // GitHub's documented example.
        assert!(verify(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        ));
    }

    fn hook() -> HookConfig {
        toml::from_str(
            r#"
            name = "gh"
            secret = "x"
            when = { "/action" = "published" }
            fields = { version = "/release/tag_name" }
            task = { package = "edge", policy = "canary" }
            "#,
        )
        .unwrap()
    }

    #[test]
    fn no_hook_may_take_the_label_of_unconfigured_names() {
        let mut h = hook();
        h.name = crate::metrics::UNKNOWN_HOOK.into();
        assert!(matches!(h.check(), Err(HookConfigError::Reserved(_))));
    }

    #[test]
    fn a_payload_maps_to_a_task_or_names_what_is_missing() {
        let h = hook();
        h.check().unwrap();
        let spec = h
            .spec(&serde_json::json!({"action": "published", "release": {"tag_name": "v1.4.0"}}))
            .unwrap()
            .unwrap();
        assert_eq!(spec.name, "gh-v1-4-0");
        assert_eq!(spec.package, "edge");
        assert!(
            h.spec(&serde_json::json!({"action": "created"}))
                .unwrap()
                .is_none()
        );
        let err = h
            .spec(&serde_json::json!({"action": "published", "release": {}}))
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.error.contains("release.tag_name"), "{}", err.error);
    }

    #[test]
    fn a_release_asset_is_found_by_name_or_refused_saying_why() {
        let mut h = hook();
        h.release = Some(HookRelease {
            asset: Some("edge-*-arm64.tar.gz".into()),
            ..Default::default()
        });
        h.check().unwrap();
        let asset = |name: &str, digest: Value| {
            serde_json::json!({"name": name, "size": 10, "digest": digest,
                "browser_download_url": format!("https://example.com/{name}")})
        };
        let payload = |assets: Vec<Value>| serde_json::json!({"action": "published", "release": {"tag_name": "v2.0.0", "assets": assets}});
        let r = h.release.as_ref().unwrap();
        let a = r
            .artifact(&payload(vec![
                asset("edge-2.0.0-amd64.tar.gz", "sha256:AA".into()),
                asset("edge-2.0.0-arm64.tar.gz", "sha256:BB".into()),
            ]))
            .unwrap();
        assert_eq!(
            a,
            HookArtifact {
                url: "https://example.com/edge-2.0.0-arm64.tar.gz".into(),
                sha256: "bb".into(),
                size: 10
            }
        );
        let none = r
            .artifact(&payload(vec![asset("edge.zip", "sha256:AA".into())]))
            .unwrap_err();
        assert!(none.error.contains("it has: edge.zip"), "{}", none.error);
        let two = r
            .artifact(&payload(vec![
                asset("edge-1-arm64.tar.gz", "sha256:AA".into()),
                asset("edge-2-arm64.tar.gz", "sha256:AA".into()),
            ]))
            .unwrap_err();
        assert!(two.error.contains("2 assets match"), "{}", two.error);
        let undigested = r
            .artifact(&payload(vec![asset("edge-2-arm64.tar.gz", Value::Null)]))
            .unwrap_err();
        assert!(
            undigested.error.contains("no `digest`"),
            "{}",
            undigested.error
        );
        // Both ways at once, or half of the pointers: refused at config time.
        h.release.as_mut().unwrap().url = Some("/url".into());
        assert!(h.check().unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn a_hook_sets_downgrade_only_when_its_config_allows_it() {
        let payload = serde_json::json!({
            "action": "published", "release": {"tag_name": "v1.4.0"}, "down": true
        });
        let mut h = hook();
        h.task.insert("downgrade".into(), true.into());
        assert!(
            h.check()
                .unwrap_err()
                .to_string()
                .contains("allow_downgrade = true")
        );
        h.allow_downgrade = true;
        h.check().unwrap();
        assert!(h.spec(&payload).unwrap().unwrap().downgrade);

        // Mapped from the payload: refused at config time and per delivery.
        let mut h = hook();
        h.fields.insert("downgrade".into(), "/down".into());
        assert!(matches!(
            h.check(),
            Err(HookConfigError::DowngradeNotAllowed(_))
        ));
        let err = h.spec(&payload).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.error.contains("downgrade"), "{}", err.error);
        assert!(!hook().spec(&payload).unwrap().unwrap().downgrade);
    }
}
