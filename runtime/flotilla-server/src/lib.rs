//! `flotilla serve`: the runner as an HTTP service (axum on tokio).
//!
//! - [`actor`] owns the [`Engine`](flotilla_engine::Engine) on one thread and
//!   group-commits: every job of a batch (agent reports, operator calls, the
//!   tick) is applied, the store is flushed once, and only then are callers
//!   answered and commands handed to agents.
//! - [`inventory`] keeps nodes, releases, artifacts, policies and agent tokens
//!   in the same sled database as the engine.
//! - [`connections`] accepts TCP connections and serves HTTP/1.1 on them
//!   within [`HttpLimits`], over TLS when [`tls`] is configured.
//! - [`mqtt`] carries the same agent protocol through an MQTT broker.
//! - [`agents`] serves the agent protocol ([`flotilla_model::protocol`]), [`api`] the
//!   management API, [`hooks`] the signed webhooks, [`metrics`] `/metrics`.
//!
//! Configuration: [`Config`], from a TOML file and flags.

pub mod access;
pub mod actor;
pub mod agents;
pub mod api;
pub mod audit;
mod config_error;
pub mod connections;
pub mod dashboard;
mod error;
pub mod hooks;
pub mod inventory;
pub mod metrics;
pub mod mqtt;
mod secret;
pub mod signing;
pub mod tls;

use axum::Router;
pub use config_error::ConfigError;
use flotilla_engine::Engine;
use flotilla_engine::store::Store;
use flotilla_policy::Limits;
use flotilla_policy::world::{Clock, SystemClock};
use flotilla_store_sled::SledStore;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;

/// The runner's configuration (`flotilla serve --config FILE`; flags override).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where to listen. Default `127.0.0.1:7878`.
    pub listen: SocketAddr,
    /// Data directory (sled database, artifacts, policies).
    pub data: PathBuf,
    /// Bearer token for the management API: an `admin` token named
    /// `config`. Required, of at least 32 characters, to listen on anything
    /// but loopback unless `tokens` lists an admin. `FLOTILLA_TOKEN`
    /// overrides.
    pub token: Option<String>,
    /// Named tokens with roles, listed as SHA-256 digests (`[[tokens]]`;
    /// see [`access`]).
    pub tokens: Vec<access::TokenConfig>,
    /// How many audit records are kept (the newest).
    pub audit_keep: u64,
    /// Secret agents present to enroll. Required, of at least 32 characters,
    /// to listen on anything but loopback. `FLOTILLA_ENROLL_SECRET` overrides.
    pub enroll_secret: Option<String>,
    /// How often the engine advances tasks.
    pub tick_ms: u64,
    /// A node that has not been heard from for this long is offline.
    pub offline_after_seconds: u64,
    /// Largest JSON body accepted (management API, agents, webhooks).
    pub max_body_bytes: usize,
    /// Largest artifact or policy upload accepted.
    pub max_upload_bytes: usize,
    /// Per-call policy limits.
    pub policy: PolicyLimits,
    /// Connection limits (`[http]`).
    pub http: HttpLimits,
    /// Versions of control-plane components, for `{"control-plane": X}` targets.
    pub control_plane: BTreeMap<String, String>,
    /// Webhooks that start tasks.
    pub hooks: Vec<hooks::HookConfig>,
    /// `tls = { cert, key, client_ca }` (TLS here) or `tls = "proxy"` (a
    /// TLS-terminating proxy in front). Required to listen on anything but
    /// loopback. See [`tls`].
    pub tls: Option<tls::TlsConfig>,
    /// Minisign public keys (the base64 line of a `.pub` file, or the
    /// path of one) that release signatures must verify against. Several
    /// for a key rotation. With none, a given signature is stored as given
    /// (the agents with `trusted_keys` check it).
    pub release_keys: Vec<String>,
    /// Refuse releases without a signature by one of `release_keys`.
    pub require_signed_releases: bool,
    /// `mqtt = { url = "mqtts://HOST:PORT", ... }`: agents also reach the
    /// runner through this MQTT broker (see [`mqtt`]).
    pub mqtt: Option<mqtt::MqttConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyLimits {
    pub cpu_ms: u64,
    pub memory_mib: usize,
    /// Wasm: more memory per node handed to a call (KiB).
    pub memory_per_node_kib: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        let l = Limits::default();
        PolicyLimits {
            cpu_ms: l.cpu.as_millis() as u64,
            memory_mib: l.memory_bytes >> 20,
            memory_per_node_kib: l.memory_per_node >> 10,
        }
    }
}

impl PolicyLimits {
    pub fn limits(&self) -> Limits {
        Limits {
            cpu: Duration::from_millis(self.cpu_ms),
            memory_bytes: self.memory_mib << 20,
            memory_per_node: self.memory_per_node_kib << 10,
            ..Limits::default()
        }
    }
}

/// What one network peer can hold of the runner: connections and time.
/// See [`connections`] for how each limit is applied.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Connections open at once. At the cap a new connection closes the one
    /// that has waited longest for a request; when none is waiting, new
    /// connections wait to be accepted.
    pub max_connections: usize,
    /// Time from the first byte of a request head to its end.
    pub header_read_timeout_seconds: u64,
    /// A connection waiting for a request, or whose client stopped reading
    /// its response, is closed after this long without a byte.
    pub idle_timeout_seconds: u64,
    /// Time a request has to be answered (its body read, its handler run).
    /// The agents' long poll (which waits up to 60 s by design) and artifact
    /// uploads are exempt; their bodies still may not stall for
    /// `idle_timeout_seconds`.
    pub request_timeout_seconds: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 10_000,
            header_read_timeout_seconds: 10,
            idle_timeout_seconds: 30,
            request_timeout_seconds: 30,
        }
    }
}

impl HttpLimits {
    fn check(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::TooSmall {
                key: "http.max_connections",
                min: 1,
            });
        }
        for (name, v) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("request_timeout_seconds", self.request_timeout_seconds),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(ConfigError::OutOfRange {
                    key: format!("http.{name}"),
                    min: 1,
                    max: 3600,
                });
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            data: default_data_dir(),
            token: None,
            tokens: Vec::new(),
            audit_keep: audit::DEFAULT_KEEP,
            enroll_secret: None,
            tick_ms: 250,
            offline_after_seconds: 30,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 1 << 30,
            policy: PolicyLimits::default(),
            http: HttpLimits::default(),
            control_plane: BTreeMap::new(),
            hooks: Vec::new(),
            tls: None,
            release_keys: Vec::new(),
            require_signed_releases: false,
            mqtt: None,
        }
    }
}

fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "flotilla")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("flotilla-data"))
}

impl Config {
    /// Reads a TOML file; unknown keys are errors (a typo must not be ignored).
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Applies the environment (`FLOTILLA_TOKEN`, `FLOTILLA_ENROLL_SECRET`).
    pub fn with_env(mut self) -> Config {
        if let Ok(t) = std::env::var("FLOTILLA_TOKEN")
            && !t.is_empty()
        {
            self.token = Some(t);
        }
        if let Ok(s) = std::env::var("FLOTILLA_ENROLL_SECRET")
            && !s.is_empty()
        {
            self.enroll_secret = Some(s);
        }
        self
    }

    /// Refuses configurations that would be unsafe or cannot work. Called
    /// by [`Runner::open`], so before anything listens.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback()
            && (self.token.is_some() || !self.tokens.iter().any(|t| t.role == access::Role::Admin))
        {
            secret::check(
                "a management token",
                "token",
                "FLOTILLA_TOKEN",
                self.token.as_deref(),
                self.listen,
            )?;
        }
        if !self.listen.ip().is_loopback() {
            secret::check(
                "an enrollment secret",
                "enroll_secret",
                "FLOTILLA_ENROLL_SECRET",
                self.enroll_secret.as_deref(),
                self.listen,
            )?;
            if self.tls.is_none() {
                return Err(ConfigError::NoTls {
                    listen: self.listen,
                });
            }
        }
        self.http.check()?;
        if let Some(m) = &self.mqtt {
            m.check()?;
        }
        if self.tick_ms == 0 || self.tick_ms > 60_000 {
            return Err(ConfigError::OutOfRange {
                key: "tick_ms".into(),
                min: 1,
                max: 60_000,
            });
        }
        let mut token_names = std::collections::BTreeSet::new();
        if self.token.is_some() {
            token_names.insert(access::CONFIG_TOKEN_NAME);
        }
        for t in &self.tokens {
            t.check()?;
            if !token_names.insert(t.name.as_str()) {
                return Err(ConfigError::TokenTwice(t.name.clone()));
            }
        }
        if !(1..=100_000_000).contains(&self.audit_keep) {
            return Err(ConfigError::OutOfRange {
                key: "audit_keep".into(),
                min: 1,
                max: 100_000_000,
            });
        }
        let keys = signing::ReleaseKeys::load(&self.release_keys)?;
        if self.require_signed_releases && keys.is_empty() {
            return Err(ConfigError::SignedWithoutKeys);
        }
        let mut names = std::collections::BTreeSet::new();
        for h in &self.hooks {
            h.check()?;
            if !names.insert(h.name.as_str()) {
                return Err(ConfigError::HookTwice(h.name.clone()));
            }
        }
        Ok(())
    }
}

/// Everything a request handler can reach.
pub struct AppState {
    pub config: Config,
    pub store: Arc<SledStore>,
    /// The store as the engine writes it and handlers flush it: `store`
    /// itself, or a wrapper a test put around it (see [`Runner::open_with_store`]).
    pub durable: Arc<dyn Store>,
    pub inventory: Arc<inventory::Inventory>,
    pub engine: actor::EngineHandle,
    pub outbox: Arc<agents::Outbox>,
    pub metrics: Arc<metrics::Metrics>,
    pub clock: Arc<dyn Clock>,
    pub policies: Arc<inventory::PolicyDir>,
    /// The management tokens and their roles.
    pub access: access::Tokens,
    /// The audit log.
    pub audit: audit::Audit,
    /// The dashboard's live streams open (at most
    /// [`dashboard::MAX_LIVE_STREAMS`], and
    /// [`dashboard::MAX_LIVE_STREAMS_PER_CALLER`] a token).
    pub live_streams: Arc<dashboard::LiveStreams>,
    /// Set when the runner starts shutting down: long responses (the live
    /// streams) end, so the graceful shutdown does not wait for them.
    pub closing: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    /// Makes what a handler just wrote durable before it answers.
    pub fn store_flush(&self) -> Result<(), ApiError> {
        self.durable.flush().map_err(ApiError::from)
    }
}

/// A runner built and ready to serve (tests use it in-process).
pub struct Runner {
    pub state: Arc<AppState>,
    pub router: Router,
    /// The TLS configuration in force (`tls = { cert, key, ... }`); reloaded
    /// on SIGHUP while serving.
    pub tls: Option<Arc<tls::TlsState>>,
    actor: Option<actor::ActorThread>,
}

impl Runner {
    /// Opens the data directory, resumes every active task, and builds the router.
    pub fn open(config: Config) -> anyhow::Result<Runner> {
        Self::open_with_store(config, |sled| sled)
    }

    /// [`Runner::open`] with the engine's store (and the flushes that
    /// acknowledge changes) passed through `wrap`: tests inject store faults
    /// with it. The inventory keeps the sled store itself.
    #[doc(hidden)]
    pub fn open_with_store(
        config: Config,
        wrap: impl FnOnce(Arc<SledStore>) -> Arc<dyn Store>,
    ) -> anyhow::Result<Runner> {
        config.check()?;
        // The files are read before anything is opened or bound.
        let tls = match config.tls.as_ref().and_then(tls::TlsConfig::files) {
            Some(files) => Some(Arc::new(tls::TlsState::load(files)?)),
            None => None,
        };
        if let Some(m) = &config.mqtt {
            m.options()?;
        }
        std::fs::create_dir_all(&config.data).map_err(|e| {
            anyhow::anyhow!("cannot create data dir {}: {e}", config.data.display())
        })?;
        let store = Arc::new(SledStore::open(&config.data.join("db"))?);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let metrics = Arc::new(metrics::Metrics::new());
        let inventory = Arc::new(inventory::Inventory::open(
            &store,
            &config.data,
            config.control_plane.clone(),
        )?);
        let policies = Arc::new(inventory::PolicyDir::new(
            config.data.join("policies"),
            config.policy.limits(),
            metrics.clone(),
        )?);
        let access = access::Tokens::open(&store, config.token.as_deref(), &config.tokens)?;
        let audit = audit::Audit::open(&store, config.audit_keep)?;
        let durable = wrap(store.clone());
        let engine = Engine::new(
            durable.clone(),
            inventory.fleet(),
            inventory.clone(),
            clock.clone(),
            policies.clone(),
        )?;
        let outbox = Arc::new(agents::Outbox::default());
        let (handle, thread) = actor::spawn(
            engine,
            durable.clone(),
            outbox.clone(),
            inventory.clone(),
            Duration::from_millis(config.tick_ms),
            metrics.clone(),
        );
        let state = Arc::new(AppState {
            config,
            store,
            durable,
            inventory,
            engine: handle,
            outbox,
            metrics,
            clock,
            policies,
            access,
            audit,
            live_streams: Arc::new(dashboard::LiveStreams::new()),
            closing: tokio::sync::watch::Sender::new(false),
        });
        let router = router(state.clone());
        Ok(Runner {
            state,
            router,
            tls,
            actor: Some(thread),
        })
    }

    /// Serves on `listener` until `shutdown` resolves; then stops the engine
    /// after its last batch and flushes the store.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let sweeper = tokio::spawn(agents::sweep_offline(self.state.clone()));
        let mqtt = self.state.config.mqtt.clone().map(|config| {
            let state = self.state.clone();
            tokio::spawn(async move {
                if let Err(e) = mqtt::run(state, config).await {
                    tracing::error!("the MQTT transport stopped: {e:#}");
                }
            })
        });
        let reloader = self
            .tls
            .clone()
            .map(|tls| tokio::spawn(tls::reload_on_sighup(tls)));
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            state.closing.send_replace(true);
        };
        connections::serve(
            listener,
            self.router.clone(),
            self.state.config.http,
            self.tls.clone(),
            shutdown,
        )
        .await?;
        if let Some(r) = reloader {
            r.abort();
        }
        sweeper.abort();
        // The sweeper holds the state (and so the store): wait until it is
        // gone. So does the MQTT transport; what it has not acked yet the
        // broker sends again to the next runner.
        let _ = sweeper.await;
        if let Some(m) = mqtt {
            m.abort();
            let _ = m.await;
        }
        self.shutdown();
        Ok(())
    }

    /// Stops the engine thread and flushes the store.
    pub fn shutdown(&mut self) {
        if let Some(actor) = self.actor.take() {
            self.state.engine.stop();
            actor.join();
        }
        if let Err(e) = self.state.durable.flush() {
            tracing::error!("flushing the store at shutdown: {e}");
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Every route of the runner. Each must answer within the request timeout
/// but the agents' long poll and artifact uploads, and no request body may
/// stall for the idle timeout.
pub fn router(state: Arc<AppState>) -> Router {
    let http = state.config.http;
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        Duration::from_secs(http.request_timeout_seconds),
    );
    Router::new()
        .merge(api::routes(state.clone()))
        .merge(agents::routes(state.clone()))
        .merge(hooks::routes(state.clone()))
        .merge(metrics::routes(state.clone()))
        .layer(timeout)
        .merge(agents::long_routes(state))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(http.idle_timeout_seconds),
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests, flushing the store");
}
