//! `flotilla agent`: run the node agent (flags and an optional TOML file into
//! an [`AgentConfig`]), or manage the node's releases by hand (`versions`,
//! `install`, `downgrade`, `uninstall`).

use crate::releases::{ReleaseStore, UnpackLimits};
use crate::upgrade::Steps;
use crate::{AgentConfig, DEFAULT_WAIT_SECONDS};
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `println!` that treats a closed stdout (`flotilla-agent versions | head`) as
/// the end of output instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Runs the agent. Every flag can also come from `--config FILE` (TOML, keys
/// in snake_case: `server`, `node_id`, `install_command`, ...); flags win.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// The runner's URL, e.g. http://127.0.0.1:7878.
    #[arg(long)]
    pub server: Option<String>,
    /// This node's id in the inventory.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Where releases, backups, downloads, the token and the journal live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A TOML file with any of the settings below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A label of this node, `key=value`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// An attribute of this node, `key=value`; repeatable.
    #[arg(long = "attribute", value_name = "KEY=VALUE")]
    pub attributes: Vec<String>,
    /// The node's place in an asset tree, e.g. /plant-1/line-2.
    #[arg(long)]
    pub asset_path: Option<String>,
    /// The runner's enrollment secret (or FLOTILLA_ENROLL_SECRET).
    #[arg(long)]
    pub enroll_secret: Option<String>,
    /// Shell command run in the new release's directory after the switch.
    #[arg(long)]
    pub install_command: Option<String>,
    /// Shell command that says whether the release is healthy (exit 0).
    #[arg(long)]
    pub health_command: Option<String>,
    /// Shell command run for a restored release (default: the install command).
    #[arg(long)]
    pub restore_command: Option<String>,
    /// Seconds any one command may run before it is killed [default: 300].
    #[arg(long)]
    pub command_timeout: Option<u64>,
    /// Seconds between heartbeats [default: 10].
    #[arg(long)]
    pub heartbeat: Option<u64>,
    /// Pull mode: ask the runner for work instead of waiting for it.
    #[arg(long)]
    pub pull: bool,
    /// Pull mode: seconds between requests [default: 30].
    #[arg(long)]
    pub pull_interval: Option<u64>,
    /// Push mode: seconds a long poll is held [default: 60].
    #[arg(long)]
    pub wait: Option<u64>,
    /// Download attempts after the first [default: 5].
    #[arg(long)]
    pub download_retries: Option<u32>,
    /// A release archive may unpack to this many times its size [default: 16].
    #[arg(long)]
    pub unpack_ratio: Option<u64>,
    /// ...but always to this many bytes [default: 67108864, 64 MiB].
    #[arg(long)]
    pub unpack_min_bytes: Option<u64>,
    /// Entries (files, directories, links) a release archive may hold
    /// [default: 100000].
    #[arg(long)]
    pub unpack_max_entries: Option<u64>,
    /// Tell the runner this node is not schedulable.
    #[arg(long)]
    pub unschedulable: bool,
    /// An absolute directory a task's `backup.location` may name or lie
    /// under; repeatable. None by default: only plain names, kept under
    /// the state dir's `backups/`.
    #[arg(long = "backup-root", value_name = "DIR")]
    pub backup_roots: Vec<PathBuf>,
    /// A PEM file of CA certificates trusted for the runner's TLS
    /// certificate, beside the built-in public roots (a private CA).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate for a runner with mutual TLS; its subject
    /// CN must be this node's id.
    #[arg(long, value_name = "PATH")]
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, value_name = "PATH")]
    pub client_key: Option<PathBuf>,
    /// A minisign public key (its base64 line, or a .pub file) whose
    /// signatures this node trusts for releases; repeatable (key rotation).
    /// With any, unsigned or wrongly signed releases are refused.
    #[arg(long = "trusted-key", value_name = "KEY")]
    pub trusted_keys: Vec<String>,
    /// Take remote work that moves this node below its permanent release.
    #[arg(long)]
    pub allow_remote_downgrade: bool,
    /// Speak to the runner through an MQTT broker, e.g.
    /// mqtts://broker.example:8883: heartbeats, work, pull requests and
    /// reports go there; enrollment and downloads stay on --server.
    #[arg(long, value_name = "URL")]
    pub mqtt: Option<String>,
    /// The MQTT user name [default: the node id].
    #[arg(long, value_name = "NAME")]
    pub mqtt_username: Option<String>,
    /// A file holding this node's MQTT password (or FLOTILLA_MQTT_PASSWORD);
    /// none with a client certificate.
    #[arg(long, value_name = "PATH")]
    pub mqtt_password_file: Option<PathBuf>,
    /// The MQTT topic prefix [default: flotilla/v1].
    #[arg(long, value_name = "PREFIX")]
    pub mqtt_prefix: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List installed releases: current, permanent or old.
    Versions {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make an installed release permanent (switching to it if needed).
    Install {
        version: String,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Switch back to an older installed release and make it permanent.
    Downgrade {
        version: String,
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Delete an old release (never the current or the permanent one).
    Uninstall {
        version: String,
        #[arg(long)]
        state_dir: PathBuf,
    },
}

/// The `--config` file; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    node_id: Option<String>,
    state_dir: Option<PathBuf>,
    enroll_secret: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    asset_path: Option<String>,
    install_command: Option<String>,
    health_command: Option<String>,
    restore_command: Option<String>,
    command_timeout_seconds: Option<u64>,
    heartbeat_seconds: Option<u64>,
    pull: Option<bool>,
    pull_seconds: Option<u64>,
    wait_seconds: Option<u64>,
    download_retries: Option<u32>,
    unpack_ratio: Option<u64>,
    unpack_min_bytes: Option<u64>,
    unpack_max_entries: Option<u64>,
    schedulable: Option<bool>,
    #[serde(default)]
    backup_roots: Vec<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    allow_remote_downgrade: Option<bool>,
    mqtt: Option<String>,
    mqtt_username: Option<String>,
    mqtt_password_file: Option<PathBuf>,
    mqtt_prefix: Option<String>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(cmd) => manage(cmd),
        None => {
            let mut config = config(args.run, std::env::var("FLOTILLA_ENROLL_SECRET").ok())?;
            if let Some(m) = &mut config.mqtt
                && m.password.is_none()
                && let Ok(p) = std::env::var("FLOTILLA_MQTT_PASSWORD")
                && !p.is_empty()
            {
                m.password = Some(p);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(crate::run(config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn pairs(
    flags: Vec<String>,
    file: BTreeMap<String, String>,
    what: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = file;
    for f in flags {
        let Some((k, v)) = f.split_once('=') else {
            bail!("--{what} `{f}` is not KEY=VALUE");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out.into_iter().collect())
}

/// Flags over environment over file over defaults.
fn config(args: RunArgs, env_secret: Option<String>) -> anyhow::Result<AgentConfig> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid agent config", path.display()))?
        }
        None => FileConfig::default(),
    };
    let server = args
        .server
        .or(file.server)
        .context("--server is required (or `server` in the config file)")?;
    let node_id = args
        .node_id
        .or(file.node_id)
        .context("--node-id is required (or `node_id` in the config file)")?;
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .context("--state-dir is required (or `state_dir` in the config file)")?;
    let pull = args.pull || file.pull.unwrap_or(false);
    // Flags replace the file's list (like every other setting).
    let backup_roots = if args.backup_roots.is_empty() {
        file.backup_roots
    } else {
        args.backup_roots
    };
    for root in &backup_roots {
        let clean = root.is_absolute()
            && root
                .components()
                .all(|c| !matches!(c, Component::ParentDir | Component::CurDir));
        if !clean {
            bail!(
                "backup root {} must be an absolute path without `.` or `..`",
                root.display()
            );
        }
    }
    // Flags replace the file's list here too.
    let trusted_keys = if args.trusted_keys.is_empty() {
        file.trusted_keys
    } else {
        args.trusted_keys
    };
    let trusted_keys = crate::verify::TrustedKeys::load(&trusted_keys)?;
    let mqtt = match args.mqtt.or(file.mqtt) {
        None => None,
        Some(url) => {
            flotilla_model::protocol::mqtt::Endpoint::parse(&url)?;
            let password = match args.mqtt_password_file.or(file.mqtt_password_file) {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| {
                            format!("cannot read the MQTT password file {}", p.display())
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                ),
                None => None,
            };
            let prefix = args
                .mqtt_prefix
                .or(file.mqtt_prefix)
                .unwrap_or_else(|| flotilla_model::protocol::mqtt::DEFAULT_PREFIX.to_string());
            flotilla_model::protocol::mqtt::check_prefix(&prefix)?;
            Some(crate::mqtt::MqttConfig {
                url,
                username: args.mqtt_username.or(file.mqtt_username),
                password,
                prefix,
            })
        }
    };
    Ok(AgentConfig {
        enroll_secret: args.enroll_secret.or(env_secret).or(file.enroll_secret),
        labels: pairs(args.labels, file.labels, "label")?,
        attributes: pairs(args.attributes, file.attributes, "attribute")?,
        asset_path: args.asset_path.or(file.asset_path).unwrap_or_default(),
        schedulable: !args.unschedulable && file.schedulable.unwrap_or(true),
        steps: Steps {
            node_id: node_id.clone(),
            install_command: args.install_command.or(file.install_command),
            health_command: args.health_command.or(file.health_command),
            restore_command: args.restore_command.or(file.restore_command),
            command_timeout: Duration::from_secs(
                args.command_timeout
                    .or(file.command_timeout_seconds)
                    .unwrap_or(300),
            ),
            download_retries: args.download_retries.or(file.download_retries).unwrap_or(5),
            backup_roots,
            unpack_ratio: args
                .unpack_ratio
                .or(file.unpack_ratio)
                .unwrap_or(UnpackLimits::RATIO)
                .max(1),
            unpack_min_bytes: args
                .unpack_min_bytes
                .or(file.unpack_min_bytes)
                .unwrap_or(UnpackLimits::MIN_BYTES),
            unpack_max_entries: args
                .unpack_max_entries
                .or(file.unpack_max_entries)
                .unwrap_or(UnpackLimits::MAX_ENTRIES)
                .max(1),
            trusted_keys,
            allow_remote_downgrade: args.allow_remote_downgrade
                || file.allow_remote_downgrade.unwrap_or(false),
            ..Steps::default()
        },
        heartbeat: Duration::from_secs(
            args.heartbeat
                .or(file.heartbeat_seconds)
                .unwrap_or(10)
                .max(1),
        ),
        pull: pull.then(|| {
            Duration::from_secs(
                args.pull_interval
                    .or(file.pull_seconds)
                    .unwrap_or(30)
                    .max(1),
            )
        }),
        wait_seconds: args
            .wait
            .or(file.wait_seconds)
            .unwrap_or(DEFAULT_WAIT_SECONDS)
            .min(DEFAULT_WAIT_SECONDS),
        tls: crate::client::ClientTls {
            ca_file: args.ca_file.or(file.ca_file),
            client_cert: args.client_cert.or(file.client_cert),
            client_key: args.client_key.or(file.client_key),
        },
        server,
        node_id,
        state_dir,
        mqtt,
    })
}

fn open(state_dir: &Path) -> anyhow::Result<ReleaseStore> {
    if !state_dir.is_dir() {
        bail!(
            "{} is not an agent state directory (give the --state-dir the agent runs with)",
            state_dir.display()
        );
    }
    Ok(ReleaseStore::open(state_dir)?)
}

fn manage(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::Versions { state_dir, json } => {
            let versions = open(&state_dir)?.versions()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&versions)?);
            } else if versions.is_empty() {
                outln!("No release installed in {}.", state_dir.display());
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["VERSION", "CURRENT", "PERMANENT", "OLD"]);
                let mark = |b: bool| if b { "*" } else { "" };
                for v in &versions {
                    table.add_row([
                        v.version.as_str(),
                        mark(v.current),
                        mark(v.permanent),
                        mark(v.old),
                    ]);
                }
                outln!("{table}");
            }
        }
        AgentCommand::Install { version, state_dir } => {
            let store = open(&state_dir)?;
            let was = store.current()?;
            store.install(&version)?;
            if was.as_deref() == Some(version.as_str()) {
                outln!("Release {version} is already installed and current, making permanent.");
            } else {
                outln!("Switched to release {version}.");
            }
            outln!("Made release permanent: {version}");
        }
        AgentCommand::Downgrade { version, state_dir } => {
            let store = open(&state_dir)?;
            let current = store.current()?;
            if current.as_deref() == Some(version.as_str()) {
                bail!(
                    "release {version} is already current; `flotilla agent install {version}` makes it permanent"
                );
            }
            store.install(&version)?;
            outln!(
                "Switched from {} to {version}.",
                current.as_deref().unwrap_or("no release")
            );
            outln!("Made release permanent: {version}");
        }
        AgentCommand::Uninstall { version, state_dir } => {
            open(&state_dir)?.uninstall(&version)?;
            outln!("Uninstalled release: {version}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `examples/systemd/agent.toml` is valid and documents every key: with
    /// its commented-out keys switched on, every field of the file config is
    /// set (the destructuring below stops compiling when a field is added).
    #[test]
    fn the_example_config_file_parses_and_documents_every_key() {
        let text = include_str!("../../../examples/systemd/agent.toml");
        let as_shipped: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(as_shipped.node_id.as_deref(), Some("edge-0042"));
        let all_on: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let FileConfig {
            server,
            node_id,
            state_dir,
            enroll_secret,
            labels,
            attributes,
            asset_path,
            install_command,
            health_command,
            restore_command,
            command_timeout_seconds,
            heartbeat_seconds,
            pull,
            pull_seconds,
            wait_seconds,
            download_retries,
            unpack_ratio,
            unpack_min_bytes,
            unpack_max_entries,
            schedulable,
            backup_roots,
            ca_file,
            client_cert,
            client_key,
            trusted_keys,
            allow_remote_downgrade,
            mqtt,
            mqtt_username,
            mqtt_password_file,
            mqtt_prefix,
        } = toml::from_str(&all_on).unwrap();
        assert!(mqtt.is_some() && mqtt_username.is_some());
        assert!(mqtt_password_file.is_some() && mqtt_prefix.is_some());
        assert!(server.is_some() && node_id.is_some() && state_dir.is_some());
        assert!(enroll_secret.is_some() && asset_path.is_some());
        assert!(!labels.is_empty() && !attributes.is_empty());
        assert!(install_command.is_some() && health_command.is_some());
        assert!(restore_command.is_some() && command_timeout_seconds.is_some());
        assert!(heartbeat_seconds.is_some() && pull.is_some() && pull_seconds.is_some());
        assert!(wait_seconds.is_some() && download_retries.is_some() && schedulable.is_some());
        assert!(!backup_roots.is_empty());
        assert!(unpack_ratio.is_some() && unpack_min_bytes.is_some());
        assert!(unpack_max_entries.is_some());
        assert!(ca_file.is_some() && client_cert.is_some() && client_key.is_some());
        assert!(!trusted_keys.is_empty() && allow_remote_downgrade.is_some());
    }

    #[test]
    fn flags_override_the_file_and_the_secret_falls_back_to_env() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(
            &file,
            r#"
server = "http://127.0.0.1:1"
node_id = "from-file"
state_dir = "/tmp/x"
install_command = "true"
heartbeat_seconds = 3
pull = true
unpack_ratio = 4
labels = { tier = "edge", zone = "a" }
"#,
        )
        .unwrap();
        let args = RunArgs {
            config: Some(file),
            node_id: Some("from-flag".into()),
            labels: vec!["zone=b".into()],
            unpack_min_bytes: Some(1 << 20),
            ..RunArgs::default()
        };
        let c = config(args, Some("s3cret".into())).unwrap();
        assert_eq!(c.node_id, "from-flag");
        assert_eq!(c.server, "http://127.0.0.1:1");
        assert_eq!(c.enroll_secret.as_deref(), Some("s3cret"));
        assert_eq!(c.heartbeat, Duration::from_secs(3));
        assert_eq!(c.pull, Some(Duration::from_secs(30)));
        assert_eq!(
            c.labels,
            [
                ("tier".to_string(), "edge".to_string()),
                ("zone".into(), "b".into())
            ]
        );
        assert_eq!(c.steps.install_command.as_deref(), Some("true"));
        // The unpack cap: the file's ratio, the flag's floor, the default entries.
        assert_eq!(
            (
                c.steps.unpack_ratio,
                c.steps.unpack_min_bytes,
                c.steps.unpack_max_entries
            ),
            (4, 1 << 20, UnpackLimits::MAX_ENTRIES)
        );

        let err = config(RunArgs::default(), None).unwrap_err();
        assert!(err.to_string().contains("--server is required"), "{err}");
    }

    #[test]
    fn mqtt_settings_come_from_the_file_or_the_flags_and_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.toml");
        let pw = tmp.path().join("mqtt-password");
        std::fs::write(&pw, "s3cret-pw\n").unwrap();
        std::fs::write(
            &file,
            format!(
                "server = \"http://127.0.0.1:1\"\nnode_id = \"n1\"\nstate_dir = \"/tmp/x\"\nmqtt = \"mqtts://broker.example\"\nmqtt_password_file = {:?}\n",
                pw.display().to_string()
            ),
        )
        .unwrap();
        let args = |mqtt: Option<&str>, prefix: Option<&str>| RunArgs {
            config: Some(file.clone()),
            mqtt: mqtt.map(String::from),
            mqtt_prefix: prefix.map(String::from),
            ..RunArgs::default()
        };
        let c = config(args(None, None), None).unwrap().mqtt.unwrap();
        assert_eq!(c.url, "mqtts://broker.example");
        // The file's line end is not part of the password.
        assert_eq!(c.password.as_deref(), Some("s3cret-pw"));
        assert_eq!((c.username, c.prefix.as_str()), (None, "flotilla/v1"));
        let c = config(args(Some("mqtt://127.0.0.1:1883"), Some("site-a/v1")), None)
            .unwrap()
            .mqtt
            .unwrap();
        assert_eq!(
            (c.url.as_str(), c.prefix.as_str()),
            ("mqtt://127.0.0.1:1883", "site-a/v1")
        );
        let err = config(args(Some("http://broker"), None), None).unwrap_err();
        assert!(err.to_string().contains("mqtts://"), "{err}");
        let err = config(args(None, Some("a/#")), None).unwrap_err();
        assert!(err.to_string().contains("prefix"), "{err}");
    }

    #[test]
    fn backup_roots_come_from_the_file_or_the_flags_and_must_be_absolute() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(
            &file,
            "server = \"http://127.0.0.1:1\"\nnode_id = \"n\"\nstate_dir = \"/tmp/x\"\nbackup_roots = [\"/srv/backups\"]\n",
        )
        .unwrap();
        let args = |roots: &[&str]| RunArgs {
            config: Some(file.clone()),
            backup_roots: roots.iter().map(PathBuf::from).collect(),
            ..RunArgs::default()
        };
        let c = config(args(&[]), None).unwrap();
        assert_eq!(c.steps.backup_roots, [PathBuf::from("/srv/backups")]);
        let c = config(args(&["/mnt/a", "/mnt/b"]), None).unwrap();
        assert_eq!(c.steps.backup_roots.len(), 2);
        for bad in ["relative", "/srv/../etc", "./x"] {
            let err = config(args(&[bad]), None).unwrap_err().to_string();
            assert!(err.contains("must be an absolute path"), "{bad}: {err}");
        }
        let none = config(
            RunArgs {
                server: Some("http://127.0.0.1:1".into()),
                node_id: Some("n".into()),
                state_dir: Some("/tmp/x".into()),
                ..RunArgs::default()
            },
            None,
        )
        .unwrap();
        assert!(none.steps.backup_roots.is_empty(), "no roots by default");
    }

    #[test]
    fn install_downgrade_and_uninstall_on_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let store = crate::releases::tests::store_with(&dir, &["1.0.0", "1.0.1"]);
        let state_dir = || dir.clone();
        manage(AgentCommand::Install {
            version: "1.0.1".into(),
            state_dir: state_dir(),
        })
        .unwrap();
        assert_eq!(store.permanent().unwrap().as_deref(), Some("1.0.1"));
        assert_eq!(store.current().unwrap().as_deref(), Some("1.0.1"));

        manage(AgentCommand::Downgrade {
            version: "1.0.0".into(),
            state_dir: state_dir(),
        })
        .unwrap();
        assert_eq!(store.permanent().unwrap().as_deref(), Some("1.0.0"));
        assert_eq!(store.current().unwrap().as_deref(), Some("1.0.0"));

        let err = manage(AgentCommand::Uninstall {
            version: "1.0.0".into(),
            state_dir: state_dir(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("is the current release"), "{err}");
        manage(AgentCommand::Uninstall {
            version: "1.0.1".into(),
            state_dir: state_dir(),
        })
        .unwrap();
        assert_eq!(store.installed().unwrap(), ["1.0.0"]);
        manage(AgentCommand::Versions {
            state_dir: state_dir(),
            json: true,
        })
        .unwrap();
    }
}
