//! The agent's side of the wire contract in [`flotilla_model::protocol`]: one method per
//! route, the node token kept here and sent as `Bearer` only to the runner.

use flotilla_model::protocol::{Enroll, Enrolled, Heartbeat, MAX_WAIT_SECONDS, Report, Work};
use reqwest::{StatusCode, Url};
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

/// A call to the runner that did not work out.
#[derive(Debug, thiserror::Error)]
pub enum RunnerClientError {
    #[error("`{0}` is not a usable server URL: give one like http://127.0.0.1:7878")]
    BadUrl(String),
    /// A CA file or client certificate that cannot be used.
    #[error("{0}")]
    Tls(String),
    #[error("cannot reach the runner: {}{}", chain(.0), tls_hint(.0))]
    Unreachable(reqwest::Error),
    #[error("the runner does not accept this node's token (401); enrolling again")]
    Unauthorized,
    #[error("the runner refused the report (409): {0}")]
    Refused(String),
    #[error("the runner answered {status} to {what}: {body}")]
    Status {
        what: &'static str,
        status: StatusCode,
        body: String,
        /// What the runner's `Retry-After` asked for (a 503 for a store
        /// fault, a 429): the agent waits at least that long.
        retry_after: Option<Duration>,
    },
    /// An artifact download refused. Only the status: the body of whatever
    /// answered (an internal endpoint a runner pointed the agent at) must
    /// not travel on in the node's report.
    #[error("the artifact server answered {status}")]
    Download { status: StatusCode },
}

/// reqwest's own message hides the cause ("connection refused") in its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What to do about a TLS failure, which reqwest words for experts.
fn tls_hint(e: &reqwest::Error) -> &'static str {
    let text = chain(e);
    if text.contains("UnknownIssuer") {
        " (the runner's certificate is not issued by a CA this agent trusts: give --ca-file with the CA that issued it)"
    } else if text.contains("NotValidForName") {
        " (the runner's certificate does not name the host in --server)"
    } else if text.contains("certificate") && text.contains("required") {
        " (the runner requires a client certificate: give --client-cert and --client-key)"
    } else {
        ""
    }
}

/// The longest `Retry-After` the agent honours: a runner (or something in
/// between) asking for more must not park the agent for good.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl RunnerClientError {
    /// How long the runner asked to wait before the next try, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RunnerClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Worth trying again later (the runner down or busy), as opposed to a
    /// request the runner will keep refusing.
    pub fn is_transient(&self) -> bool {
        match self {
            RunnerClientError::Unreachable(_) => true,
            RunnerClientError::Status { status, .. } | RunnerClientError::Download { status } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// The agent's TLS files: a private CA trusted beside the built-in (Mozilla)
/// roots, and a client certificate for runners with mutual TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificate(s) (`--ca-file`).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain naming this node as its subject CN (`--client-cert`).
    pub client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key (`--client-key`).
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    fn apply(
        &self,
        mut b: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, RunnerClientError> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| {
                RunnerClientError::Tls(format!("cannot read the {what} {}: {e}", p.display()))
            })
        };
        if let Some(ca) = &self.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca, "CA file (--ca-file)")?)
                .map_err(|e| {
                    RunnerClientError::Tls(format!(
                        "the CA file (--ca-file) {} is not PEM certificates: {}",
                        ca.display(),
                        chain(&e)
                    ))
                })?;
            if certs.is_empty() {
                return Err(RunnerClientError::Tls(format!(
                    "the CA file (--ca-file) {} holds no certificate",
                    ca.display()
                )));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        match (&self.client_cert, &self.client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate (--client-cert)")?;
                pem.push(b'\n');
                pem.extend(read(key, "client key (--client-key)")?);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    RunnerClientError::Tls(format!(
                        "the client certificate {} and key {} are not a usable PEM pair: {}",
                        cert.display(),
                        key.display(),
                        chain(&e)
                    ))
                })?;
                b = b.identity(id);
            }
            _ => {
                return Err(RunnerClientError::Tls(
                    "--client-cert and --client-key go together: give both or neither".into(),
                ));
            }
        }
        Ok(b)
    }
}

pub struct RunnerClient {
    http: reqwest::Client,
    server: Url,
    node: String,
    token: RwLock<Option<String>>,
}

impl RunnerClient {
    pub fn new(server: &str, node: &str) -> Result<Self, RunnerClientError> {
        Self::with_tls(server, node, &ClientTls::default())
    }

    /// [`RunnerClient::new`] with a private CA and/or a client certificate.
    pub fn with_tls(server: &str, node: &str, tls: &ClientTls) -> Result<Self, RunnerClientError> {
        let mut server =
            Url::parse(server).map_err(|_| RunnerClientError::BadUrl(server.to_string()))?;
        if !matches!(server.scheme(), "http" | "https") || server.cannot_be_a_base() {
            return Err(RunnerClientError::BadUrl(server.to_string()));
        }
        // Routes are joined below the given path, so `http://h/base` works too.
        if !server.path().ends_with('/') {
            let p = format!("{}/", server.path());
            server.set_path(&p);
        }
        let http = tls
            .apply(reqwest::Client::builder())?
            .connect_timeout(Duration::from_secs(10))
            // Longer than the longest long poll; a stalled download fails after this.
            .read_timeout(Duration::from_secs(MAX_WAIT_SECONDS + 30))
            // Below the runner's idle timeout (30 s by default), so a pooled
            // connection is never reused just as the runner closes it.
            .pool_idle_timeout(Duration::from_secs(20))
            .user_agent(concat!("flotilla-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(RunnerClientError::Unreachable)?;
        Ok(Self {
            http,
            server,
            node: node.to_string(),
            token: RwLock::new(None),
        })
    }

    pub fn token(&self) -> Option<String> {
        self.token.read().expect("token lock").clone()
    }

    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().expect("token lock") = token;
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.server.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn node_url(&self, route: &str) -> Url {
        self.url(&["v1", "agents", &self.node, route])
    }

    /// An artifact URL: absolute, or a path on the runner.
    pub fn resolve(&self, url: &str) -> Result<Url, RunnerClientError> {
        if url.starts_with('/') {
            let mut u = self.server.clone();
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            u.set_path(&format!(
                "{}{}",
                self.server.path().trim_end_matches('/'),
                path
            ));
            u.set_query((!query.is_empty()).then_some(query));
            Ok(u)
        } else {
            Url::parse(url).map_err(|_| RunnerClientError::BadUrl(url.to_string()))
        }
    }

    fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.token() {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RunnerClientError> {
        let resp = req.send().await.map_err(RunnerClientError::Unreachable)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // Seconds only (the HTTP-date form is not worth a date parser here).
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(500).collect();
        Err(match status {
            StatusCode::UNAUTHORIZED if what != "enroll" => RunnerClientError::Unauthorized,
            StatusCode::CONFLICT if what == "report" => RunnerClientError::Refused(body),
            _ => RunnerClientError::Status {
                what,
                status,
                body,
                retry_after,
            },
        })
    }

    pub async fn enroll(&self, enroll: &Enroll) -> Result<Enrolled, RunnerClientError> {
        let req = self
            .http
            .post(self.url(&["v1", "agents", "enroll"]))
            .timeout(Duration::from_secs(30))
            .json(enroll);
        let resp = self.send("enroll", req).await?;
        resp.json().await.map_err(RunnerClientError::Unreachable)
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), RunnerClientError> {
        let req = self
            .http
            .post(self.node_url("heartbeat"))
            .timeout(Duration::from_secs(30))
            .json(hb);
        self.send("heartbeat", self.authed(req)).await.map(drop)
    }

    /// Push: waits up to `wait` seconds for work.
    pub async fn work(&self, wait: u64) -> Result<Option<Work>, RunnerClientError> {
        let wait = wait.min(MAX_WAIT_SECONDS);
        let mut url = self.node_url("work");
        url.query_pairs_mut().append_pair("wait", &wait.to_string());
        let req = self.http.get(url).timeout(Duration::from_secs(wait + 30));
        let resp = self.send("work", self.authed(req)).await?;
        Self::work_body(resp).await
    }

    /// Pull: asks for the node's next upgrade.
    pub async fn request(&self) -> Result<Option<Work>, RunnerClientError> {
        let req = self
            .http
            .post(self.node_url("request"))
            .timeout(Duration::from_secs(30));
        let resp = self.send("request", self.authed(req)).await?;
        Self::work_body(resp).await
    }

    async fn work_body(resp: reqwest::Response) -> Result<Option<Work>, RunnerClientError> {
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json()
            .await
            .map(Some)
            .map_err(RunnerClientError::Unreachable)
    }

    pub async fn report(&self, report: &Report) -> Result<(), RunnerClientError> {
        let req = self
            .http
            .post(self.node_url("report"))
            .timeout(Duration::from_secs(30))
            .json(report);
        self.send("report", self.authed(req)).await.map(drop)
    }

    /// Starts an artifact download at byte `offset`. The node token goes
    /// along only when the artifact is on the runner itself.
    pub async fn artifact(
        &self,
        url: &Url,
        offset: u64,
    ) -> Result<reqwest::Response, RunnerClientError> {
        let mut req = self.http.get(url.clone());
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        if url.origin() == self.server.origin() {
            req = self.authed(req);
        }
        let resp = req.send().await.map_err(RunnerClientError::Unreachable)?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        // The body is not read at all: dropping the response closes it.
        Err(match status {
            StatusCode::UNAUTHORIZED => RunnerClientError::Unauthorized,
            _ => RunnerClientError::Download { status },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_artifact_paths_resolve_against_the_server() {
        let c = RunnerClient::new("http://127.0.0.1:7878/base", "edge 1").unwrap();
        assert_eq!(
            c.node_url("work").as_str(),
            "http://127.0.0.1:7878/base/v1/agents/edge%201/work"
        );
        assert_eq!(
            c.resolve("/v1/releases/edge/1.0.1/artifact")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:7878/base/v1/releases/edge/1.0.1/artifact"
        );
        assert_eq!(
            c.resolve("https://cdn.example/edge.tar.gz")
                .unwrap()
                .as_str(),
            "https://cdn.example/edge.tar.gz"
        );
        assert!(matches!(
            RunnerClient::new("not a url", "n"),
            Err(RunnerClientError::BadUrl(_))
        ));
    }
}
