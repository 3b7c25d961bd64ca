//! The wire contract between the runner and its node agents (JSON over HTTP).
//! Both sides use these types, so they cannot drift apart.
//!
//! | call | route | auth |
//! |---|---|---|
//! | enroll | `POST /v1/agents/enroll` ([`Enroll`] → [`Enrolled`]) | enrollment secret in the body |
//! | heartbeat | `POST /v1/agents/{node}/heartbeat` ([`Heartbeat`] → 204) | `Bearer <node token>` |
//! | work (push) | `GET /v1/agents/{node}/work?wait=SECONDS` → 200 [`Work`] or 204 | node token |
//! | ask (pull) | `POST /v1/agents/{node}/request` → 200 [`Work`] or 204 | node token |
//! | report | `POST /v1/agents/{node}/report` ([`Report`] → 204, 409 when refused) | node token |
//! | artifact | `GET /v1/releases/{package}/{version}/artifact` (honours `Range`) | node token |
//!
//! Push: the runner keeps a node's open work until the agent reports on it, so
//! an agent that reconnects after a crash or an offline spell gets it again
//! (`work` is idempotent; the agent keys what it does on `task` + `version`).
//! The long poll returns at once when work is waiting and otherwise after
//! `wait` seconds (at most [`MAX_WAIT_SECONDS`]) with 204.
//!
//! The same types also travel over an MQTT broker ([`mqtt`]): heartbeats,
//! reports and pull requests on the node's own topics, work on its `work`
//! topic. Enrollment and artifact downloads stay on HTTPS.

use crate::{Backup, ReleaseKind, RunEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest a `work` long poll is held open.
pub const MAX_WAIT_SECONDS: u64 = 60;

/// An agent introduces its node and asks for a node token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enroll {
    pub node_id: String,
    /// The runner's enrollment secret (configured on the runner).
    pub secret: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, deserialize_with = "crate::pairs::deserialize")]
    pub labels: Vec<(String, String)>,
    #[serde(default, deserialize_with = "crate::pairs::deserialize")]
    pub attributes: Vec<(String, String)>,
    #[serde(default)]
    pub asset_path: String,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default = "yes")]
    pub schedulable: bool,
}

impl Enroll {
    /// The node's facts follow [`crate::facts`]; an error names the field.
    pub fn check(&self) -> Result<(), crate::facts::FactError> {
        crate::facts::check_all(
            &self.version,
            &self.labels,
            &self.attributes,
            &self.asset_path,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// Bearer token for every later call of this node (and only this node).
    pub token: String,
}

/// What the agent says about its node every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The version the node runs now (its current release).
    pub version: String,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default = "yes")]
    pub schedulable: bool,
    /// Metrics of the node now (`load1`, `mem_available_ratio`, or anything
    /// a policy reads through `status.metric`); each heartbeat replaces the
    /// last set. See [`Heartbeat::check`] for the limits.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// At most this many metrics in one heartbeat.
pub const MAX_METRICS: usize = 64;

impl Heartbeat {
    /// The version follows [`crate::facts::check_version`]; metric names are
    /// 1–64 characters of `[a-z0-9_.-]`, values finite, at most
    /// [`MAX_METRICS`] of them.
    pub fn check(&self) -> Result<(), crate::facts::FactError> {
        use crate::facts::FactProblem;
        crate::facts::check_version("version", &self.version)?;
        if self.metrics.len() > MAX_METRICS {
            return Err(FactProblem::TooMany {
                given: self.metrics.len(),
                max: MAX_METRICS,
            }
            .at("metrics"));
        }
        for (name, value) in &self.metrics {
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
            if !ok_name {
                let shown: String = name.chars().take(64).collect();
                return Err(FactProblem::BadMetricName(shown).at("metrics"));
            }
            if !value.is_finite() {
                return Err(FactProblem::NotFinite(*value).at(format!("metrics.{name}")));
            }
        }
        Ok(())
    }
}

/// Work for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Work {
    /// Download, back up, install, verify `artifact`.
    Install {
        task: String,
        package: String,
        version: String,
        artifact: Artifact,
        backup: Backup,
        /// `false`: a trial; the node returns to its permanent release on
        /// restart until the release is made permanent.
        permanent: bool,
    },
    /// Put `version` back (a task rollback).
    Restore {
        task: String,
        package: String,
        version: String,
    },
    /// Make the trial release `version` permanent: its wave proved healthy
    /// (EMQX `install` after `upgrade --no-permanent`). Answered with
    /// `made_permanent`.
    MakePermanent {
        task: String,
        package: String,
        version: String,
    },
}

impl Work {
    pub fn task(&self) -> &str {
        match self {
            Work::Install { task, .. }
            | Work::Restore { task, .. }
            | Work::MakePermanent { task, .. } => task,
        }
    }
}

/// Where and what to download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Absolute URL, or a path on the runner (`/v1/releases/...`) to resolve
    /// against the server URL.
    pub url: String,
    /// Lowercase hex.
    pub sha256: String,
    /// Bytes; the agent refuses to download more.
    pub size: u64,
    #[serde(default)]
    pub kind: ReleaseKind,
    /// The release's minisign signature (the `.minisig` text), when it has
    /// one. An agent with `trusted_keys` refuses work without it. Absent
    /// from older runners' work (and ignored by older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A step or the outcome of a node's work, for the task named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub task: String,
    pub state: ReportState,
    /// Why, for failures and rejections.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    Downloading,
    Upgrading,
    Verifying,
    Succeeded,
    FailedRolledBack,
    FailedRollbackFailed,
    Rejected,
    /// A `restore` finished.
    RolledBack,
    /// A `make-permanent` finished.
    MadePermanent,
}

impl Report {
    /// The engine event this report stands for.
    pub fn event(&self) -> RunEvent {
        let detail = || {
            if self.detail.is_empty() {
                "no detail given".to_string()
            } else {
                self.detail.clone()
            }
        };
        match self.state {
            ReportState::Downloading => RunEvent::Downloading,
            ReportState::Upgrading => RunEvent::Upgrading,
            ReportState::Verifying => RunEvent::Verifying,
            ReportState::Succeeded => RunEvent::Succeeded,
            ReportState::FailedRolledBack => RunEvent::FailedRolledBack { error: detail() },
            ReportState::FailedRollbackFailed => RunEvent::FailedRollbackFailed { error: detail() },
            ReportState::Rejected => RunEvent::Rejected { reason: detail() },
            ReportState::RolledBack => RunEvent::RolledBack,
            ReportState::MadePermanent => RunEvent::MadePermanent,
        }
    }
}

fn yes() -> bool {
    true
}

/// The topics of the MQTT transport, under one prefix (default
/// [`mqtt::DEFAULT_PREFIX`]):
///
/// | topic | from → to | payload |
/// |---|---|---|
/// | `{prefix}/nodes/{id}/heartbeat` | node → runner, QoS 1 | [`Heartbeat`] |
/// | `{prefix}/nodes/{id}/report` | node → runner, QoS 1 | [`Report`] |
/// | `{prefix}/nodes/{id}/request` | node → runner, QoS 1 | empty (pull: "any work for me?") |
/// | `{prefix}/nodes/{id}/work` | runner → node, QoS 1, retained | [`Work`], or empty: no open work |
///
/// The node id in the topic is the only identity a message carries: the
/// broker must let a device publish only on its own topics and read only its
/// own `work` (see `examples/mqtt/`). The runner reads node topics through a
/// shared subscription (`$share/{group}/...`), so several runner processes
/// can split them.
pub mod mqtt {
    /// The default topic prefix.
    pub const DEFAULT_PREFIX: &str = "flotilla/v1";
    /// The default shared-subscription group of the runners.
    pub const DEFAULT_SHARE_GROUP: &str = "flotilla";
    /// The largest payload either side accepts: a report's `detail` and a
    /// heartbeat's metrics fit many times over.
    pub const MAX_PAYLOAD: usize = 64 * 1024;

    /// What a node publishes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Heartbeat,
        Report,
        Request,
    }

    impl Kind {
        pub const ALL: [Kind; 3] = [Kind::Heartbeat, Kind::Report, Kind::Request];

        pub fn as_str(self) -> &'static str {
            match self {
                Kind::Heartbeat => "heartbeat",
                Kind::Report => "report",
                Kind::Request => "request",
            }
        }
    }

    /// A prefix is 1-128 characters, with no wildcard, no `$` at its start,
    /// no empty level and no trailing `/`.
    pub fn check_prefix(prefix: &str) -> Result<(), SettingError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 128
            && !prefix.starts_with('$')
            && !prefix.contains(['+', '#', '\0'])
            && prefix.split('/').all(|l| !l.is_empty());
        if ok {
            Ok(())
        } else {
            Err(SettingError::Prefix(prefix.to_string()))
        }
    }

    /// A broker URL or topic prefix in a runner's or agent's settings that
    /// cannot be used.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum SettingError {
        #[error(
            "mqtt prefix {0:?} must be 1-128 characters of non-empty topic levels, without + # or a leading $"
        )]
        Prefix(String),
        #[error("mqtt URL {url:?} {why}: give one like mqtts://broker.example:8883")]
        Url { url: String, why: &'static str },
    }

    /// A topic a node published on that is not one of a node's topics.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum TopicError {
        #[error("topic {topic:?} is not under {prefix}/nodes/")]
        NotUnder { topic: String, prefix: String },
        #[error("topic {0:?} has no kind")]
        NoKind(String),
        #[error("topic {topic:?}: unknown kind {kind:?}")]
        UnknownKind { topic: String, kind: String },
    }

    /// A broker's address: `mqtts://HOST[:PORT]` (TLS, port 8883 by
    /// default) or `mqtt://HOST[:PORT]` (plain, 1883; loopback or a test).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Endpoint {
        pub tls: bool,
        pub host: String,
        pub port: u16,
    }

    impl Endpoint {
        pub fn parse(url: &str) -> Result<Endpoint, SettingError> {
            let bad = |why: &'static str| SettingError::Url {
                url: url.to_string(),
                why,
            };
            let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
                (true, r)
            } else if let Some(r) = url.strip_prefix("mqtt://") {
                (false, r)
            } else {
                return Err(bad("must start with mqtts:// or mqtt://"));
            };
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
                return Err(bad("must be a host and an optional port, nothing else"));
            }
            let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed ["))?;
                (h, after.strip_prefix(':'))
            } else {
                match rest.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (rest, None),
                }
            };
            let port = match port {
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("has a port that is not 1-65535"))?,
                None if tls => 8883,
                None => 1883,
            };
            if host.is_empty() {
                return Err(bad("has no host"));
            }
            Ok(Endpoint {
                tls,
                host: host.to_string(),
                port,
            })
        }

        /// Plain MQTT to anything but loopback would carry credentials in clear.
        pub fn is_loopback(&self) -> bool {
            self.host == "localhost"
                || self
                    .host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }

    /// `{prefix}/nodes/{node}/{kind}`.
    pub fn topic(prefix: &str, node: &str, kind: Kind) -> String {
        format!("{prefix}/nodes/{node}/{}", kind.as_str())
    }

    /// `{prefix}/nodes/{node}/work`.
    pub fn work_topic(prefix: &str, node: &str) -> String {
        format!("{prefix}/nodes/{node}/work")
    }

    /// The runner's subscription filter for `kind`: `{prefix}/nodes/+/{kind}`,
    /// shared in `group` when one is given.
    pub fn filter(prefix: &str, kind: Kind, group: Option<&str>) -> String {
        match group {
            Some(g) => format!("$share/{g}/{prefix}/nodes/+/{}", kind.as_str()),
            None => format!("{prefix}/nodes/+/{}", kind.as_str()),
        }
    }

    /// The node and kind of a topic a node published on, or why it is none.
    /// The node id is checked later, as over HTTP.
    pub fn parse<'t>(prefix: &str, topic: &'t str) -> Result<(&'t str, Kind), TopicError> {
        let shown = || topic.chars().take(200).collect::<String>();
        let rest = topic
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("/nodes/"))
            .ok_or_else(|| TopicError::NotUnder {
                topic: shown(),
                prefix: prefix.to_string(),
            })?;
        let (node, kind) = rest
            .split_once('/')
            .ok_or_else(|| TopicError::NoKind(shown()))?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| TopicError::UnknownKind {
                topic: shown(),
                kind: kind.to_string(),
            })?;
        Ok((node, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_metrics_are_checked() {
        let hb = |m: &[(&str, f64)]| Heartbeat {
            version: "1".into(),
            healthy: true,
            schedulable: true,
            metrics: m.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        };
        assert!(
            hb(&[("load1", 0.3), ("disk.free_ratio", 0.5)])
                .check()
                .is_ok()
        );
        let err = |m: &[(&str, f64)]| hb(m).check().unwrap_err().to_string();
        assert!(err(&[("", 1.0)]).contains("1-64"));
        assert!(err(&[("CPU", 1.0)]).contains("\"CPU\""));
        assert_eq!(
            err(&[("cpu", f64::NAN)]),
            "metrics.cpu: NaN is not a finite number"
        );
        let many: Vec<(String, f64)> = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
        let many: Vec<(&str, f64)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(err(&many), "metrics: 65 given, at most 64");
        // Old agents send none: still a heartbeat.
        let old: Heartbeat = serde_json::from_str(r#"{"version": "1"}"#).unwrap();
        assert!(old.metrics.is_empty() && old.check().is_ok());
    }

    #[test]
    fn mqtt_topics_round_trip_and_strangers_are_named() {
        use mqtt::{Kind, parse, topic};
        let t = topic("flotilla/v1", "edge-1", Kind::Report);
        assert_eq!(t, "flotilla/v1/nodes/edge-1/report");
        assert_eq!(parse("flotilla/v1", &t).unwrap(), ("edge-1", Kind::Report));
        assert!(
            parse("flotilla/v1", "flotilla/v1/nodes/edge-1/work")
                .unwrap_err()
                .to_string()
                .contains("unknown kind")
        );
        assert!(parse("flotilla/v1", "other/nodes/a/report").is_err());
        assert!(parse("flotilla/v1", "flotilla/v1/nodes/a").is_err());
        // A node id with a `/` is left for the id check to refuse.
        assert_eq!(
            parse("p", "p/nodes/a/b/report").unwrap_err().to_string(),
            "topic \"p/nodes/a/b/report\": unknown kind \"b/report\""
        );
        assert_eq!(
            mqtt::filter("p", Kind::Heartbeat, Some("g")),
            "$share/g/p/nodes/+/heartbeat"
        );
        assert!(mqtt::check_prefix("flotilla/v1").is_ok());
        let e = mqtt::Endpoint::parse("mqtts://broker.example").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port),
            (true, "broker.example", 8883)
        );
        let e = mqtt::Endpoint::parse("mqtt://127.0.0.1:18830").unwrap();
        assert_eq!((e.tls, e.port, e.is_loopback()), (false, 18830, true));
        let e = mqtt::Endpoint::parse("mqtts://[::1]:1").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 1));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://u:p@h",
            "mqtt://h/x",
        ] {
            assert!(mqtt::Endpoint::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", "$SYS", "a/+/b", "a/#", "a//b", "a/"] {
            assert!(mqtt::check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn work_is_tagged_by_action() {
        let w = Work::Restore {
            task: "t000001".into(),
            package: "edge".into(),
            version: "1.2.0".into(),
        };
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(json["action"], "restore");
        assert_eq!(serde_json::from_value::<Work>(json).unwrap(), w);
    }

    #[test]
    fn a_signature_travels_in_the_artifact_and_older_json_still_reads() {
        // An older runner's work: no signature field.
        let old: Work = serde_json::from_str(
            r#"{"action":"install","task":"t1","package":"edge","version":"2.0.0",
                "artifact":{"url":"/a","sha256":"ab","size":1},
                "backup":"default","permanent":true}"#,
        )
        .unwrap();
        let Work::Install { artifact, .. } = &old else {
            panic!("{old:?}")
        };
        assert_eq!(artifact.signature, None);
        // None is left out, so an older agent sees the JSON it knows.
        let json = serde_json::to_value(&old).unwrap();
        assert!(json["artifact"].get("signature").is_none(), "{json}");
        let mut signed = old.clone();
        if let Work::Install { artifact, .. } = &mut signed {
            artifact.signature = Some("untrusted comment: x\n...".into());
        }
        let json = serde_json::to_value(&signed).unwrap();
        assert_eq!(json["artifact"]["signature"], "untrusted comment: x\n...");
        assert_eq!(serde_json::from_value::<Work>(json).unwrap(), signed);
    }

    #[test]
    fn a_report_maps_to_its_engine_event() {
        let r: Report = serde_json::from_str(
            r#"{"task":"t1","state":"failed_rolled_back","detail":"install exited 3"}"#,
        )
        .unwrap();
        assert_eq!(
            r.event(),
            RunEvent::FailedRolledBack {
                error: "install exited 3".into()
            }
        );
        assert!(serde_json::from_str::<Report>(r#"{"task":"t1","state":"done"}"#).is_err());
    }
}
