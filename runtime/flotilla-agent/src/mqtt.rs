//! The agent's MQTT transport (`--mqtt URL`): heartbeats, reports and pull
//! requests published on the node's own topics, work read from its `work`
//! topic ([`flotilla_model::protocol::mqtt`]). Enrollment and artifact
//! downloads stay on HTTPS ([`crate::client`]).
//!
//! The session is persistent (`clean_session = false`, the node id as the
//! client id), so work the runner publishes while the device is offline is
//! queued by the broker; the runner also keeps each node's open work as the
//! retained message of its `work` topic, and this process subscribes anew
//! each time it starts (and whenever the broker lost the session), so it
//! gets the open work even when the broker kept nothing for it. An empty
//! retained message means "no open work".
//!
//! A report counts as delivered once the client holds it for the broker
//! (QoS 1: retried until the broker acknowledges it, across reconnects). If
//! it is lost anyway (the process dies first, a broker without
//! persistence restarts), the runner still has the work open and sends it
//! again, and the journal re-reports the outcome without redoing it.

use crate::client::ClientTls;
use flotilla_model::protocol::mqtt::{self, Endpoint, Kind};
use flotilla_model::protocol::{Heartbeat, Report, Work};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How the agent reaches its broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// `mqtts://HOST:PORT` (or `mqtt://` on loopback).
    pub url: String,
    /// The MQTT user name; default: the node id.
    pub username: Option<String>,
    /// The MQTT password (from `--mqtt-password-file` or
    /// `FLOTILLA_MQTT_PASSWORD`); none with client certificates.
    pub password: Option<String>,
    /// Topic prefix; default [`mqtt::DEFAULT_PREFIX`].
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("the CA file (--ca-file) {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file (--ca-file) {} holds no certificate", path.display())]
    NoCa { path: PathBuf },
    #[error("the CA file {}: {source}", path.display())]
    CaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{0}")]
    Tls(#[source] rustls::Error),
    #[error("the client certificate {}: {source}", path.display())]
    ClientCert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the client key {}: {source}", path.display())]
    ClientKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the client certificate and key: {0}")]
    ClientPair(#[source] rustls::Error),
    #[error("--client-cert and --client-key go together: give both or neither")]
    HalfPair,
    #[error(
        "refusing plain MQTT to {url}: the node's credentials would cross the network in clear; use mqtts://"
    )]
    Plain { url: String },
    #[error(transparent)]
    Setting(#[from] mqtt::SettingError),
    #[error("the MQTT client stopped: {0}")]
    Closed(#[source] rumqttc::ClientError),
}

/// The node's open work as last published by the runner.
#[derive(Default)]
struct Slot {
    work: Mutex<Option<Work>>,
    changed: Notify,
}

pub struct MqttLink {
    client: AsyncClient,
    prefix: String,
    node: String,
    slot: Arc<Slot>,
    events: tokio::task::JoinHandle<()>,
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// A rustls client configuration (ring): the public roots and `--ca-file`,
/// and `--client-cert`/`--client-key` when given.
fn tls_config(tls: &ClientTls) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &tls.ca_file {
        let certs: Vec<_> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|source| MqttError::CaFile {
                path: ca.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(MqttError::NoCa { path: ca.clone() });
        }
        for c in certs {
            roots.add(c).map_err(|source| MqttError::CaCertificate {
                path: ca.clone(),
                source,
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(MqttError::Tls)?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|source| MqttError::ClientCert {
                    path: cert.clone(),
                    source,
                })?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|source| MqttError::ClientKey {
                path: key.clone(),
                source,
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(MqttError::ClientPair)
        }
        _ => Err(MqttError::HalfPair),
    }
}

impl MqttLink {
    /// Connects (in the background, retrying) to the broker of `config` as
    /// `node`; must run inside a tokio runtime.
    pub fn start(config: &MqttConfig, node: &str, tls: &ClientTls) -> Result<Self, MqttError> {
        let endpoint = Endpoint::parse(&config.url)?;
        mqtt::check_prefix(&config.prefix)?;
        if !endpoint.tls && !endpoint.is_loopback() {
            return Err(MqttError::Plain {
                url: config.url.clone(),
            });
        }
        let mut opts = MqttOptions::new(node, &endpoint.host, endpoint.port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(30))
            // The broker caps what reaches us too; this bounds our memory.
            .set_max_packet_size(mqtt::MAX_PAYLOAD + 1024, mqtt::MAX_PAYLOAD + 1024);
        let username = config.username.clone().unwrap_or_else(|| node.to_string());
        opts.set_credentials(username, config.password.clone().unwrap_or_default());
        if endpoint.tls {
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
                tls_config(tls)?,
            ))));
        }
        let (client, mut events) = AsyncClient::new(opts, 64);
        let slot = Arc::new(Slot::default());
        let work_topic = mqtt::work_topic(&config.prefix, node);
        let events = {
            let (client, slot, url) = (client.clone(), slot.clone(), config.url.clone());
            tokio::spawn(async move {
                let mut subscribed = false;
                let mut failures = 0u32;
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            failures = 0;
                            tracing::info!(
                                broker = url,
                                session = ack.session_present,
                                "connected to the MQTT broker"
                            );
                            // Each process subscribes once (the retained open
                            // work comes with it), and again if the broker
                            // lost the session.
                            if !subscribed || !ack.session_present {
                                subscribed =
                                    client.try_subscribe(&work_topic, QoS::AtLeastOnce).is_ok();
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) if p.topic == work_topic => {
                            take_work(&slot, &p.payload);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            tracing::warn!(
                                topic = p.topic,
                                "a message on a topic this node did not ask for; ignored"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            failures += 1;
                            let pause = Duration::from_secs(1 << failures.min(5));
                            tracing::warn!(broker = url, error = %e, "MQTT connection failed; retrying in {pause:?}");
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            })
        };
        Ok(MqttLink {
            client,
            prefix: config.prefix.clone(),
            node: node.to_string(),
            slot,
            events,
        })
    }

    fn topic(&self, kind: Kind) -> String {
        mqtt::topic(&self.prefix, &self.node, kind)
    }

    /// Best effort, like HTTP heartbeats: dropped when the client's queue
    /// is full (the broker unreachable for a while).
    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<(), MqttError> {
        let body = serde_json::to_vec(hb).expect("a heartbeat serialises");
        self.client
            .try_publish(self.topic(Kind::Heartbeat), QoS::AtLeastOnce, false, body)
            .map_err(MqttError::Closed)
    }

    /// Hands the report to the client (QoS 1; it retries until the broker
    /// has it). Waits while the client's queue is full.
    pub async fn report(&self, report: &Report) -> Result<(), MqttError> {
        let body = serde_json::to_vec(report).expect("a report serialises");
        self.client
            .publish(self.topic(Kind::Report), QoS::AtLeastOnce, false, body)
            .await
            .map_err(MqttError::Closed)
    }

    /// Push: the open work, waiting up to `wait` for some.
    pub async fn work(&self, wait: Duration) -> Option<Work> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(w) = self.slot.work.lock().expect("slot").take() {
                return Some(w);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.slot.work.lock().expect("slot").take();
            }
        }
    }

    /// Pull: asks the runner, which answers on the `work` topic; waits up
    /// to `wait` for it.
    pub async fn request(&self, wait: Duration) -> Result<Option<Work>, MqttError> {
        if let Some(w) = self.slot.work.lock().expect("slot").take() {
            return Ok(Some(w));
        }
        self.client
            .publish(
                self.topic(Kind::Request),
                QoS::AtLeastOnce,
                false,
                Vec::new(),
            )
            .await
            .map_err(MqttError::Closed)?;
        Ok(self.work(wait).await)
    }
}

/// A message on the node's `work` topic: the open work (replacing what was
/// there), or empty for none. Anything else is logged and ignored.
fn take_work(slot: &Slot, payload: &[u8]) {
    let next = if payload.is_empty() {
        None
    } else if payload.len() > mqtt::MAX_PAYLOAD {
        tracing::warn!(bytes = payload.len(), "work message too large; ignored");
        return;
    } else {
        match serde_json::from_slice::<Work>(payload) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "a work message that is not work; ignored");
                return;
            }
        }
    };
    *slot.work.lock().expect("slot") = next;
    slot.changed.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_messages_replace_the_slot_and_junk_is_ignored() {
        let slot = Slot::default();
        let w = Work::Restore {
            task: "t1".into(),
            package: "p".into(),
            version: "1.0.0".into(),
        };
        take_work(&slot, &serde_json::to_vec(&w).unwrap());
        assert_eq!(slot.work.lock().unwrap().as_ref(), Some(&w));
        take_work(&slot, b"{not json");
        assert_eq!(slot.work.lock().unwrap().as_ref(), Some(&w));
        take_work(&slot, &vec![b' '; mqtt::MAX_PAYLOAD + 1]);
        assert_eq!(slot.work.lock().unwrap().as_ref(), Some(&w));
        take_work(&slot, b"");
        assert!(slot.work.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn plain_mqtt_off_loopback_is_refused() {
        let cfg = |url: &str| MqttConfig {
            url: url.into(),
            username: None,
            password: None,
            prefix: mqtt::DEFAULT_PREFIX.into(),
        };
        let tls = ClientTls::default();
        let e = MqttLink::start(&cfg("mqtt://broker.example"), "n1", &tls)
            .err()
            .unwrap();
        assert!(e.to_string().contains("mqtts://"), "{e}");
        assert!(MqttLink::start(&cfg("mqtt://127.0.0.1:1"), "n1", &tls).is_ok());
        assert!(MqttLink::start(&cfg("mqtts://127.0.0.1:1"), "n1", &tls).is_ok());
    }
}
