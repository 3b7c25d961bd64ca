//! The runner's MQTT transport (`mqtt = { url = "mqtts://HOST:PORT", ... }`):
//! the same protocol as the agents' HTTP routes, through a broker that holds
//! the devices' connections ([`flotilla_model::protocol::mqtt`] has the
//! topics).
//!
//! - **In:** one connection subscribes to every node's `heartbeat`,
//!   `report` and `request` topics through a shared subscription
//!   (`$share/{share_group}/...`). Each message goes through the same
//!   ingest function as its HTTP route ([`crate::agents`]), with the node
//!   taken from the topic: the broker's ACL is what makes a device unable
//!   to publish on another's topics.
//! - **Acknowledged when durable:** acks are manual. A message is acked
//!   (PUBACK) only once its ingest is done: a report once the store has it,
//!   as the HTTP 204. Acks go out in the order the messages came. A store
//!   fault is retried here and the message stays unacked meanwhile, so a
//!   runner that dies first gets it again from the broker (the session is
//!   persistent). A message that is refused (malformed, too big, from an
//!   unknown node, a report the engine refuses) is acked and logged: it
//!   would be refused the same way every time it came again, so acking it
//!   loses nothing, and not acking it would have the broker send it forever
//!   (and, acks going out in order, hold every ack after it). The same for
//!   an internal error (500: a record the store cannot read), logged as an
//!   error: it fails the same way each time.
//! - **Out:** each node's open work (the [`Outbox`](crate::agents::Outbox))
//!   is the retained message of its `work` topic, QoS 1, republished when it
//!   changes and all of it after each (re)connect; empty when the node has
//!   none. A device that was offline gets it from its persistent session or,
//!   if the broker kept nothing, as the retained message when it subscribes.

use crate::agents::{ingest_heartbeat, ingest_report, ingest_request, valid_node_id};
use crate::error::{ApiError, json};
use crate::{AppState, ConfigError};
use flotilla_model::protocol::mqtt::{self, Endpoint, Kind};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `mqtt = { url = "mqtts://broker:8883", ... }` in the runner's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtts://HOST[:PORT]`; `mqtt://` only to a broker on loopback.
    pub url: String,
    /// The runner's client id; its session is persistent, so reports sent
    /// while the runner is down wait for it at the broker. Default
    /// `flotilla-runner`. Each runner process needs its own.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// The runner's MQTT user name.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding its password (or `FLOTILLA_MQTT_PASSWORD`).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for the broker, beside the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate and key, for brokers that want one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Topic prefix, default `flotilla/v1`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The shared-subscription group runners split the nodes' messages in
    /// (default `flotilla`); empty: a plain subscription.
    #[serde(default = "default_group")]
    pub share_group: String,
    /// Messages larger than this are dropped (default 64 KiB).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_client_id() -> String {
    "flotilla-runner".into()
}
fn default_prefix() -> String {
    mqtt::DEFAULT_PREFIX.into()
}
fn default_group() -> String {
    mqtt::DEFAULT_SHARE_GROUP.into()
}
fn default_max_payload() -> usize {
    mqtt::MAX_PAYLOAD
}

/// Messages being ingested at once (acks still go out in order).
const IN_FLIGHT: usize = 4096;
/// Incoming packets larger than this break the connection (rumqttc's own
/// cap); the broker's `max_packet_size` must be below it, or one oversized
/// message would be redelivered and break it again and again.
const MAX_PACKET: usize = 1 << 20;

impl MqttConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        let e = Endpoint::parse(&self.url)?;
        if !e.tls && !e.is_loopback() {
            return Err(ConfigError::PlainMqtt {
                url: self.url.clone(),
            });
        }
        mqtt::check_prefix(&self.prefix)?;
        let ok_group = self
            .share_group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok_group || self.share_group.len() > 64 {
            return Err(ConfigError::ShareGroup(self.share_group.clone()));
        }
        if self.client_id.is_empty() || self.client_id.len() > 128 {
            return Err(ConfigError::ClientId);
        }
        if !(1024..=MAX_PACKET / 2).contains(&self.max_payload_bytes) {
            return Err(ConfigError::OutOfRange {
                key: "mqtt.max_payload_bytes".into(),
                min: 1024,
                max: (MAX_PACKET / 2) as u64,
            });
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(ConfigError::ClientCertWithoutKey);
        }
        Ok(())
    }

    /// The client options: reads the password and TLS files (so a runner
    /// whose files are wrong refuses to start).
    pub fn options(&self) -> anyhow::Result<MqttOptions> {
        let e = Endpoint::parse(&self.url)?;
        let mut opts = MqttOptions::new(&self.client_id, &e.host, e.port);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(1000)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let password = match &self.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("mqtt.password_file {}: {e}", p.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => std::env::var("FLOTILLA_MQTT_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
        };
        if let Some(user) = &self.username {
            opts.set_credentials(user, password.unwrap_or_default());
        }
        if e.tls {
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
                self.tls()?,
            ))));
        }
        Ok(opts)
    }

    /// rustls with ring: the public roots and `ca_file`; the client
    /// certificate when given.
    fn tls(&self) -> anyhow::Result<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &self.ca_file {
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("mqtt.ca_file {}: {e}", ca.display()))?;
            anyhow::ensure!(
                !certs.is_empty(),
                "mqtt.ca_file {} holds no certificate",
                ca.display()
            );
            for c in certs {
                roots.add(c)?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        Ok(match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| anyhow::anyhow!("mqtt.client_cert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| anyhow::anyhow!("mqtt.client_key {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        })
    }
}

/// What became of one message.
enum Outcome {
    /// Done (or refused for good): ack it.
    Ack,
    /// The runner is stopping: leave it unacked for the next one.
    Keep,
}

/// Runs the transport until the task is aborted (at shutdown). Fails only
/// on a configuration that cannot work (files unreadable), before
/// connecting.
pub async fn run(state: Arc<AppState>, config: MqttConfig) -> anyhow::Result<()> {
    let opts = config.options()?;
    let (client, mut events) = AsyncClient::new(opts, 4096);
    let group = (!config.share_group.is_empty()).then_some(config.share_group.as_str());
    let filters: Vec<_> = Kind::ALL
        .iter()
        .map(|k| {
            rumqttc::SubscribeFilter::new(mqtt::filter(&config.prefix, *k, group), QoS::AtLeastOnce)
        })
        .collect();
    state.outbox.track_changes();
    let config = Arc::new(config);
    // Received messages, in order, to the ingest loop (which acks them in
    // the same order). Unbounded so that this loop never waits: it must keep
    // reading the broker's acks of our own publishes and sending our acks
    // (rumqttc stops taking requests while its outgoing window is full, and
    // the acks queue behind them), or the two would wait on each other. What
    // it holds is bounded by the broker's in-flight window for this session
    // (`max_inflight_messages` on Mosquitto, `max_inflight` on EMQX).
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Publish>();
    let ingest = tokio::spawn(ingest_loop(
        state.clone(),
        config.clone(),
        client.clone(),
        rx,
    ));
    let publish = tokio::spawn(publish_loop(state.clone(), config.clone(), client.clone()));
    let _stop = AbortOnDrop(vec![ingest, publish]);
    let mut failures = 0u32;
    // Subscribing after each connect, without waiting for room in the
    // client's queue (this loop must never wait but in `poll`, which is
    // what empties that queue): tried again after each event until it fits.
    let mut subscribe = false;
    loop {
        if subscribe {
            match client.try_subscribe_many(filters.clone()) {
                Ok(()) => subscribe = false,
                Err(rumqttc::ClientError::TryRequest(_)) => {}
                Err(e) => {
                    tracing::error!("mqtt subscribe: {e}");
                    subscribe = false;
                }
            }
        }
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                tracing::info!(
                    broker = config.url,
                    session = ack.session_present,
                    "connected to the MQTT broker"
                );
                subscribe = true;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(
                        "the MQTT broker refused a subscription of the runner: check its ACL (the runner reads {}/nodes/+/{{heartbeat,report,request}})",
                        config.prefix
                    );
                }
                state.metrics.mqtt_connected(true);
                // Subscribed (first, so that the nodes' messages flow): now
                // every open work again, in case the broker lost the
                // retained messages (a restart without persistence).
                state.outbox.mark_all_changed();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                state.metrics.mqtt_connected(false);
                failures += 1;
                let pause =
                    Duration::from_millis(250 << failures.min(7)).min(Duration::from_secs(30));
                tracing::warn!(broker = config.url, error = %e, "MQTT connection failed; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
            }
        }
    }
    Ok(())
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Ingests messages concurrently (the engine batches reports that arrive
/// together into one flush) and acks them in arrival order as each prefix
/// is done. Never waits for room in the client's queue: acks that do not
/// fit yet wait here, in order.
async fn ingest_loop(
    state: Arc<AppState>,
    config: Arc<MqttConfig>,
    client: AsyncClient,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Publish>,
) {
    let mut pending = FuturesOrdered::new();
    let mut acks: std::collections::VecDeque<Publish> = Default::default();
    let mut retry = tokio::time::interval(Duration::from_millis(5));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Some(p) = acks.front() {
            match client.try_ack(p) {
                Ok(()) => {
                    acks.pop_front();
                }
                Err(rumqttc::ClientError::TryRequest(_)) => break,
                Err(e) => {
                    tracing::warn!("mqtt ack: {e}");
                    acks.pop_front();
                }
            }
        }
        tokio::select! {
            received = rx.recv(), if pending.len() < IN_FLIGHT => match received {
                Some(p) => {
                    let (state, config) = (state.clone(), config.clone());
                    pending.push_back(async move {
                        let outcome = ingest(&state, &config, &p).await;
                        (p, outcome)
                    });
                }
                None => break,
            },
            Some((p, outcome)) = pending.next(), if !pending.is_empty() => match outcome {
                Outcome::Ack => acks.push_back(p),
                Outcome::Keep => {}
            },
            _ = retry.tick(), if !acks.is_empty() => {}
        }
    }
}

/// Publishes each changed node's open work as the retained message of its
/// `work` topic (empty: none).
async fn publish_loop(state: Arc<AppState>, config: Arc<MqttConfig>, client: AsyncClient) {
    loop {
        for node in state.outbox.take_changed().await {
            let payload = match state.outbox.get(&node) {
                Some(w) => serde_json::to_vec(&w).expect("work serialises"),
                None => Vec::new(),
            };
            let topic = mqtt::work_topic(&config.prefix, &node);
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
                tracing::warn!(node, "mqtt publish of work: {e}");
            }
        }
    }
}

/// One message from a node: checked as hostile input, then handed to the
/// same ingest function as its HTTP route. A fault (5xx: the store) is
/// retried until it passes or the runner stops.
async fn ingest(state: &AppState, config: &MqttConfig, p: &Publish) -> Outcome {
    let (node, kind) = match check(state, config, p) {
        Ok(v) => v,
        Err(why) => {
            tracing::warn!(topic = %shown(&p.topic), bytes = p.payload.len(), "mqtt message dropped: {why}");
            let kind = mqtt::parse(&config.prefix, &p.topic).map_or("unknown", |(_, k)| k.as_str());
            state.metrics.mqtt_message(kind, "dropped");
            return Outcome::Ack;
        }
    };
    let mut pause = Duration::from_millis(500);
    loop {
        let result = match kind {
            Kind::Heartbeat => json(&p.payload).and_then(|hb| ingest_heartbeat(state, node, hb)),
            Kind::Report => match json(&p.payload) {
                Ok(r) => {
                    let r = ingest_report(state, node, r).await;
                    // A refused report may come from a stale retained
                    // message (the runner died before clearing it): publish
                    // what is open for the node now.
                    if r.as_ref().is_err_and(|e| e.status.is_client_error()) {
                        state.outbox.mark_changed([node]);
                    }
                    r
                }
                Err(e) => Err(e),
            },
            Kind::Request => match ingest_request(state, node).await {
                // Sent (again) on its work topic, where the node waits.
                Ok(Some(_)) => {
                    state.outbox.mark_changed([node]);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                state.metrics.mqtt_message(kind.as_str(), "applied");
                return Outcome::Ack;
            }
            // A fault (503: the store could not take it, the runner stops):
            // worth another try. A 500 (a record the store cannot read)
            // will not pass later: retrying it would hold every later ack.
            Err(e) if e.status == axum::http::StatusCode::SERVICE_UNAVAILABLE => {
                if e.error == crate::error::SHUTTING_DOWN {
                    return Outcome::Keep;
                }
                state.metrics.mqtt_message(kind.as_str(), "retried");
                tracing::warn!(
                    node,
                    kind = kind.as_str(),
                    "mqtt message not stored ({}); retrying in {pause:?}",
                    e.error
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            Err(ApiError { error, status, .. }) => {
                state.metrics.mqtt_message(kind.as_str(), "refused");
                if status.is_server_error() {
                    tracing::error!(
                        node,
                        kind = kind.as_str(),
                        "mqtt message failed for good, dropped: {error}"
                    );
                } else {
                    tracing::warn!(node, kind = kind.as_str(), "mqtt message refused: {error}");
                }
                return Outcome::Ack;
            }
        }
    }
}

/// Why a message from the broker is dropped before it is read.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("{bytes} bytes, more than mqtt.max_payload_bytes ({max})")]
    TooLarge { bytes: usize, max: usize },
    #[error(transparent)]
    Topic(#[from] mqtt::TopicError),
    /// The node id in the topic, refused as over HTTP.
    #[error("{0}")]
    NodeId(String),
    #[error("a retained message (nodes must not retain)")]
    Retained,
    #[error("a request carries no payload")]
    RequestWithPayload,
    #[error("no node {0} is enrolled")]
    NotEnrolled(String),
}

/// The node a message is from and its kind, or why it is dropped.
fn check<'p>(
    state: &AppState,
    config: &MqttConfig,
    p: &'p Publish,
) -> Result<(&'p str, Kind), Dropped> {
    if p.payload.len() > config.max_payload_bytes {
        return Err(Dropped::TooLarge {
            bytes: p.payload.len(),
            max: config.max_payload_bytes,
        });
    }
    let (node, kind) = mqtt::parse(&config.prefix, &p.topic)?;
    valid_node_id(node).map_err(|e| Dropped::NodeId(e.error))?;
    // Nodes never retain: a retained message is one replayed to every new
    // subscriber.
    if p.retain {
        return Err(Dropped::Retained);
    }
    if kind == Kind::Request && !p.payload.iter().all(u8::is_ascii_whitespace) {
        return Err(Dropped::RequestWithPayload);
    }
    if state.inventory.node(node).is_none() {
        return Err(Dropped::NotEnrolled(node.to_string()));
    }
    Ok((node, kind))
}

fn shown(topic: &str) -> String {
    topic.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config with `extra` keys, checked; the TOML itself must parse.
    fn config(extra: &str) -> Result<MqttConfig, ConfigError> {
        let c: MqttConfig =
            toml::from_str(&format!("url = \"mqtts://broker.example\"\n{extra}")).unwrap();
        c.check().map(|()| c)
    }

    #[test]
    fn the_config_refuses_what_cannot_be_safe_or_work() {
        let c = config("").unwrap();
        assert_eq!(
            (
                c.client_id.as_str(),
                c.prefix.as_str(),
                c.share_group.as_str()
            ),
            ("flotilla-runner", "flotilla/v1", "flotilla")
        );
        let plain: MqttConfig = toml::from_str("url = \"mqtt://broker.example\"").unwrap();
        assert!(matches!(plain.check(), Err(ConfigError::PlainMqtt { .. })));
        assert!(plain.check().unwrap_err().to_string().contains("mqtts://"));
        let local: MqttConfig = toml::from_str("url = \"mqtt://127.0.0.1:1883\"").unwrap();
        assert!(local.check().is_ok());
        // Each refusal names the key that is wrong, in its text too.
        for (extra, key) in [
            ("prefix = \"a/#\"", "mqtt.prefix"),
            ("share_group = \"a/b\"", "mqtt.share_group"),
            ("max_payload_bytes = 10", "mqtt.max_payload_bytes"),
            ("client_cert = \"c.pem\"", "mqtt.client_cert"),
        ] {
            let err = config(extra).unwrap_err();
            assert_eq!(err.key(), key, "{err}");
            let shown = key.trim_start_matches("mqtt.");
            assert!(err.to_string().contains(shown), "{err}");
        }
        assert!(
            config("client_cert = \"c.pem\"")
                .unwrap_err()
                .to_string()
                .contains("together")
        );
        let typo =
            toml::from_str::<MqttConfig>("url = \"mqtts://broker.example\"\npasswrd_file = \"x\"");
        assert!(typo.unwrap_err().to_string().contains("unknown field"));
    }
}
