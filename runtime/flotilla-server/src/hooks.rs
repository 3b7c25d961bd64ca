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
}

impl HookConfig {
    pub fn check(&self) -> Result<(), String> {
        super::api::valid_name("hook", &self.name).map_err(|e| e.error)?;
        if self.name == super::metrics::UNKNOWN_HOOK {
            return Err(format!(
                "hook name {:?} is reserved: /metrics counts deliveries to unconfigured names under it",
                self.name
            ));
        }
        if self.secret().is_none() {
            return Err(format!(
                "hook {:?} has no secret: set `secret` or `secret_env` (and export that variable)",
                self.name
            ));
        }
        for (field, ptr) in self.fields.iter().chain(self.when.keys().map(|p| (p, p))) {
            if !ptr.is_empty() && !ptr.starts_with('/') {
                return Err(format!(
                    "hook {:?}: {field}: {ptr:?} is not a JSON pointer (it starts with `/`, e.g. /release/tag_name)",
                    self.name
                ));
            }
        }
        if !self.allow_downgrade
            && (self.task.get("downgrade") == Some(&Value::Bool(true))
                || self.fields.contains_key("downgrade"))
        {
            return Err(format!(
                "hook {:?} sets `downgrade` but its config does not say `allow_downgrade = true`",
                self.name
            ));
        }
        if !self.fields.contains_key("version") && !self.task.contains_key("target") {
            return Err(format!(
                "hook {:?}: map `version` in `fields` or set `target` in `task`",
                self.name
            ));
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
        assert!(h.check().unwrap_err().contains("reserved"));
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
    fn a_hook_sets_downgrade_only_when_its_config_allows_it() {
        let payload = serde_json::json!({
            "action": "published", "release": {"tag_name": "v1.4.0"}, "down": true
        });
        let mut h = hook();
        h.task.insert("downgrade".into(), true.into());
        assert!(h.check().unwrap_err().contains("allow_downgrade = true"));
        h.allow_downgrade = true;
        h.check().unwrap();
        assert!(h.spec(&payload).unwrap().unwrap().downgrade);

        // Mapped from the payload: refused at config time and per delivery.
        let mut h = hook();
        h.fields.insert("downgrade".into(), "/down".into());
        assert!(h.check().unwrap_err().contains("allow_downgrade"));
        let err = h.spec(&payload).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.error.contains("downgrade"), "{}", err.error);
        assert!(!hook().spec(&payload).unwrap().unwrap().downgrade);
    }
}
