//! API errors: a status and a JSON body `{"error": ..., "hint": ...}` that says
//! what is wrong and, where there is one, what to do next.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_engine::EngineError;
use flotilla_engine::store::StoreError;
use serde::de::DeserializeOwned;

/// An error response's message, kept on the response for the audit log.
#[derive(Debug, Clone)]
pub struct ErrorText(pub String);

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub hint: Option<String>,
    /// Seconds for a `Retry-After` header: the request was not carried out
    /// and is worth sending again (a store fault, a runner shutting down).
    pub retry_after: Option<u32>,
}

/// The error of [`ApiError::unavailable`].
pub(crate) const SHUTTING_DOWN: &str = "the runner is shutting down";

/// What a 503 asks a client to wait before it tries again.
pub const RETRY_AFTER_SECONDS: u32 = 2;

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            hint: None,
            retry_after: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn bad_request(e: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e)
    }

    pub fn unprocessable(e: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, e)
    }

    pub fn not_found(e: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, e)
    }

    pub fn conflict(e: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, e)
    }

    pub fn unauthorized(e: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, e)
    }

    pub fn forbidden(e: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, e)
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }

    pub fn unavailable() -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN);
        e.retry_after = Some(RETRY_AFTER_SECONDS);
        e
    }

    /// The store could not take a change (a disk fault): nothing of the
    /// request was acknowledged, and sending it again later is right. A
    /// fault is not a refusal: 503 with `Retry-After`, never a 4xx.
    pub fn store_fault(e: impl std::fmt::Display) -> Self {
        tracing::error!("store fault: {e}");
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the runner could not store this change ({e}); nothing was applied"),
        )
        .hint("a fault on the runner, not a problem with the request: send it again later");
        err.retry_after = Some(RETRY_AFTER_SECONDS);
        err
    }
}

impl ApiError {
    /// A policy's failure: a fault reading its stored bytes answers 503 with
    /// `Retry-After` (send it again later); anything wrong with the policy
    /// itself is a refusal (422).
    pub fn policy(e: flotilla_policy::PolicyError) -> Self {
        if !e.is_fault() {
            return ApiError::unprocessable(e.to_string());
        }
        ApiError::read_fault("a stored policy", e)
    }

    /// The runner's disk could not read `what` (a stored policy, a
    /// `release_keys` file): 503 with `Retry-After`, nothing applied.
    pub fn read_fault(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!("read fault ({what}): {e}");
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the runner could not read {what} ({e}); nothing was applied"),
        )
        .hint("a fault on the runner's disk, not a problem with the request: send it again later");
        err.retry_after = Some(RETRY_AFTER_SECONDS);
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error.clone() });
        if let Some(h) = self.hint {
            body["hint"] = h.into();
        }
        let mut res = (self.status, axum::Json(body)).into_response();
        // For the audit log: why the call was refused.
        res.extensions_mut().insert(ErrorText(self.error));
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Spec(_) => ApiError::unprocessable(e.to_string()),
            EngineError::NoTask(_) => ApiError::not_found(e.to_string()),
            EngineError::NotInTask { .. }
            | EngineError::Refused { .. }
            | EngineError::Transition { .. } => ApiError::conflict(e.to_string()),
            EngineError::NameTaken { ref task, .. } => {
                let hint = format!("see it: flotilla task show {task}");
                ApiError::conflict(e.to_string()).hint(hint)
            }
            EngineError::Active { ref task, .. } => {
                let hint = format!("see it: flotilla task show {task}");
                ApiError::conflict(e.to_string()).hint(hint)
            }
            EngineError::Downgrade { .. } => ApiError::conflict(e.to_string()),
            EngineError::Policy(e) => ApiError::policy(e),
            EngineError::Store(e) => ApiError::from(e),
        }
    }
}

/// A release's signature that does not hold is a refusal of the release.
impl From<crate::signing::SignatureError> for ApiError {
    fn from(e: crate::signing::SignatureError) -> Self {
        ApiError::unprocessable(e.to_string())
    }
}

/// A node's fact that breaks its rule (a heartbeat's, an enrollment's) is
/// a refusal of the request.
impl From<flotilla_model::facts::FactError> for ApiError {
    fn from(e: flotilla_model::facts::FactError) -> Self {
        ApiError::unprocessable(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io { .. } => ApiError::store_fault(e),
            // A record that cannot be read will not read better later, nor
            // will a value the store cannot hold.
            StoreError::Corrupt { .. } | StoreError::Invalid(_) => ApiError::internal(e),
        }
    }
}

/// Parses a JSON body with an error that names the line, column and field.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; expected JSON",
        ));
    }
    // The fast path; on failure parse again to name the field that is wrong.
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if path == "." || path.is_empty() {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body at `{path}`: {inner}")
        };
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(msg)
        } else {
            ApiError::unprocessable(msg)
        }
    })
}

/// An optional JSON body (`{}` when empty).
pub fn json_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json(body)
    }
}
