//! `/metrics` in the Prometheus text format: tasks by state, node runs by
//! state (counted at scrape time), policy call latency, webhook outcomes,
//! agent reports and enrollments, MQTT messages and the broker connection.

use super::AppState;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use flotilla_engine::count_states;
use flotilla_engine::store::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The `hook` label of deliveries to names no hook is configured under (so
/// no hook may be named this).
pub const UNKNOWN_HOOK: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabel {
    hook: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MqttLabel {
    kind: String,
    outcome: String,
}

pub struct Metrics {
    registry: Registry,
    tasks: Family<StateLabel, Gauge>,
    runs: Family<StateLabel, Gauge>,
    policy: Family<HookLabel, Histogram>,
    webhooks: Family<WebhookLabel, Counter>,
    reports: Counter,
    enrollments: Family<OutcomeLabel, Counter>,
    mqtt: Family<MqttLabel, Counter>,
    mqtt_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let tasks = Family::<StateLabel, Gauge>::default();
        let runs = Family::<StateLabel, Gauge>::default();
        let policy = Family::<HookLabel, Histogram>::new_with_constructor(|| {
            // 10 µs .. ~5 s
            Histogram::new(exponential_buckets(1e-5, 4.0, 10))
        });
        let webhooks = Family::<WebhookLabel, Counter>::default();
        let reports = Counter::default();
        let enrollments = Family::<OutcomeLabel, Counter>::default();
        let mqtt = Family::<MqttLabel, Counter>::default();
        let mqtt_connected = Gauge::default();
        registry.register(
            "mqtt_messages",
            "Messages from nodes over MQTT by kind and outcome (applied, refused, dropped, retried)",
            mqtt.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while the runner is connected to its MQTT broker and subscribed",
            mqtt_connected.clone(),
        );
        registry.register("tasks", "Tasks by state", tasks.clone());
        registry.register(
            "node_runs",
            "Node runs of active tasks by state",
            runs.clone(),
        );
        registry.register(
            "policy_call_seconds",
            "Latency of policy hook calls",
            policy.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by outcome",
            webhooks.clone(),
        );
        registry.register(
            "agent_reports",
            "Agent status reports applied",
            reports.clone(),
        );
        registry.register(
            "enrollments",
            "Agent enrollments by outcome",
            enrollments.clone(),
        );
        Metrics {
            registry,
            tasks,
            runs,
            policy,
            webhooks,
            reports,
            enrollments,
            mqtt,
            mqtt_connected,
        }
    }

    /// A message from a node over MQTT. Both labels are from fixed sets
    /// (never input): a kind of [`flotilla_model::protocol::mqtt::Kind`] or
    /// `unknown`; `applied`, `refused`, `dropped` or `retried`.
    pub fn mqtt_message(&self, kind: &'static str, outcome: &'static str) {
        self.mqtt
            .get_or_create(&MqttLabel {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn mqtt_connected(&self, up: bool) {
        self.mqtt_connected.set(i64::from(up));
    }

    /// `hook` is a policy hook's name (`select`, `verdict`, ...), never input.
    pub fn policy_call(&self, hook: &'static str, took: Duration) {
        self.policy
            .get_or_create(&HookLabel { hook: hook.into() })
            .observe(took.as_secs_f64());
    }

    /// A webhook delivery to `hook`, a configured hook's name; `None` for a
    /// name no hook has. Those share the one series [`UNKNOWN_HOOK`]: label
    /// values come from the config, never from a request, so made-up names
    /// cannot grow `/metrics`.
    pub fn webhook(&self, hook: Option<&str>, outcome: &'static str) {
        self.webhooks
            .get_or_create(&WebhookLabel {
                hook: hook.unwrap_or(UNKNOWN_HOOK).into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn reports(&self, n: usize) {
        self.reports.inc_by(n as u64);
    }

    pub fn enroll(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "refused" };
        self.enrollments
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Sets the gauges and renders everything: tasks from the store, runs
    /// of active tasks from `live` (the engine's counts of the tasks it
    /// holds, by task id), else from the store.
    pub fn render(
        &self,
        store: &dyn Store,
        live: &BTreeMap<String, BTreeMap<String, usize>>,
    ) -> Result<String, flotilla_engine::store::StoreError> {
        let mut tasks: BTreeMap<String, i64> = BTreeMap::new();
        let mut runs: BTreeMap<String, i64> = BTreeMap::new();
        for t in store.task_heads()? {
            *tasks.entry(t.state.name().to_string()).or_default() += 1;
            if t.state.active() {
                let counts = match live.get(&t.id) {
                    Some(c) => c.clone(),
                    None => count_states(&store.runs(&t.id)?),
                };
                for (state, n) in counts {
                    *runs.entry(state).or_default() += n as i64;
                }
            }
        }
        self.tasks.clear();
        self.runs.clear();
        for (state, n) in tasks {
            self.tasks.get_or_create(&StateLabel { state }).set(n);
        }
        for (state, n) in runs {
            self.runs.get_or_create(&StateLabel { state }).set(n);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).map_err(|e| {
            flotilla_engine::store::StoreError::Invalid(format!("encoding metrics: {e}"))
        })?;
        Ok(out)
    }
}

pub fn routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, super::ApiError> {
    let live = state.engine.read(|e| e.live_counts()).await?;
    let s = state.clone();
    let text = tokio::task::spawn_blocking(move || s.metrics.render(&*s.store, &live))
        .await
        .map_err(super::ApiError::internal)??;
    Ok((
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}
