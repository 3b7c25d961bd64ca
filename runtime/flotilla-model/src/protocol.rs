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
    pub fn check(&self) -> Result<(), String> {
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
    pub fn check(&self) -> Result<(), String> {
        crate::facts::check_version("version", &self.version)?;
        if self.metrics.len() > MAX_METRICS {
            return Err(format!(
                "metrics: {} given, at most {MAX_METRICS}",
                self.metrics.len()
            ));
        }
        for (name, value) in &self.metrics {
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
            if !ok_name {
                let shown: String = name.chars().take(64).collect();
                return Err(format!(
                    "metrics: name {shown:?} must be 1-64 characters of a-z, 0-9, '_', '.', '-'"
                ));
            }
            if !value.is_finite() {
                return Err(format!("metrics.{name}: {value} is not a finite number"));
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
        assert!(hb(&[("", 1.0)]).check().unwrap_err().contains("1-64"));
        assert!(hb(&[("CPU", 1.0)]).check().unwrap_err().contains("\"CPU\""));
        assert!(
            hb(&[("cpu", f64::NAN)])
                .check()
                .unwrap_err()
                .contains("finite")
        );
        let many: Vec<(String, f64)> = (0..65).map(|i| (format!("m{i}"), 1.0)).collect();
        let many: Vec<(&str, f64)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert!(hb(&many).check().unwrap_err().contains("at most 64"));
        // Old agents send none: still a heartbeat.
        let old: Heartbeat = serde_json::from_str(r#"{"version": "1"}"#).unwrap();
        assert!(old.metrics.is_empty() && old.check().is_ok());
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
