//! Agents over an MQTT broker (issue 19): a real Mosquitto on a loopback
//! port with per-device passwords and an ACL, the runner and agent
//! processes of [`super`], and everything that must survive on the way:
//! an offline device, a runner killed with SIGKILL, a broker restart, a
//! device that publishes on another device's topic.
//!
//! Without Mosquitto the tests print "install mosquitto" and pass, unless
//! `CI` is set: then they fail.

use super::*;
use std::net::TcpStream;

pub(crate) const RUNNER_USER: &str = "flotilla-runner";
/// Devices that have MQTT credentials (the cluster names its agents node-00, ...).
const DEVICES: usize = 12;

pub(crate) fn password(user: &str) -> String {
    format!("pw-{user}-e2e")
}

/// The ACL of `examples/mqtt/mosquitto/acl`: the runner reads and writes
/// the prefix, each device only its own topics.
const ACL: &str = include_str!("../../../examples/mqtt/mosquitto/acl");
/// The broker's config: `examples/mqtt/mosquitto/mosquitto.conf`.
const CONF: &str = include_str!("../../../examples/mqtt/mosquitto/mosquitto.conf");

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A Mosquitto broker on a free loopback port, killed when dropped.
pub(crate) struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    proc: Option<Proc>,
    bin: PathBuf,
    starts: u32,
}

impl Broker {
    /// `None` (with a message) when Mosquitto is not installed and `CI` is
    /// not set.
    pub fn start() -> Option<Broker> {
        Self::start_with_acl("")
    }

    /// With `extra` lines at the end of the ACL.
    pub fn start_with_acl(extra: &str) -> Option<Broker> {
        let (Some(bin), Some(passwd)) = (find("mosquitto"), find("mosquitto_passwd")) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "mosquitto is not installed, and CI is set: install mosquitto (apt-get install mosquitto)"
            );
            eprintln!(
                "skipped: install mosquitto to run the MQTT tests (apt-get install mosquitto)"
            );
            return None;
        };
        let tmp = tempfile::Builder::new()
            .prefix("flotilla-mosquitto")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        fs::create_dir_all(dir.join("data")).unwrap();
        let pw = dir.join("passwd");
        let users: Vec<String> = std::iter::once(RUNNER_USER.to_string())
            .chain((0..DEVICES).map(|i| format!("node-{i:02}")))
            .collect();
        for (i, user) in users.iter().enumerate() {
            let mut cmd = Command::new(&passwd);
            if i == 0 {
                cmd.arg("-c");
            }
            let out = cmd
                .arg("-b")
                .arg(&pw)
                .arg(user)
                .arg(password(user))
                .output()
                .unwrap();
            assert!(out.status.success(), "mosquitto_passwd: {out:?}");
        }
        fs::write(dir.join("acl"), format!("{ACL}\n{extra}\n")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The shipped example, on this port and these files.
        let mut conf = CONF.to_string();
        for (from, to) in [
            (
                "listener 1883 127.0.0.1",
                format!("listener {port} 127.0.0.1"),
            ),
            ("/etc/mosquitto/flotilla.passwd", pw.display().to_string()),
            (
                "/etc/mosquitto/flotilla.acl",
                dir.join("acl").display().to_string(),
            ),
            (
                "/var/lib/mosquitto/",
                format!("{}/", dir.join("data").display()),
            ),
        ] {
            assert!(
                conf.contains(from),
                "examples/mqtt/mosquitto/mosquitto.conf lost {from:?}"
            );
            conf = conf.replace(from, &to);
        }
        // Started as root (CI), Mosquitto would switch to the user
        // `mosquitto`, which cannot write its persistence file into this
        // temp dir; as any other user this line is ignored.
        conf.push_str("\nlog_dest stderr\nlog_type all\nuser root\n");
        fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let mut b = Broker {
            port,
            dir,
            _tmp: tmp,
            proc: None,
            bin,
            starts: 0,
        };
        b.start_proc();
        Some(b)
    }

    fn start_proc(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("mosquitto-{}.log", self.starts));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        let mut proc = Proc::spawn("mosquitto", &mut cmd);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = proc.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mosquitto exited ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        });
        self.proc = Some(proc);
    }

    /// SIGTERM (Mosquitto saves its persistence file), then a new broker
    /// on the same port and files.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        // It saved its sessions, queued and retained messages.
        assert!(
            self.dir.join("data/mosquitto.db").is_file(),
            "mosquitto saved no persistence file: {}",
            self.logs()
        );
        self.start_proc();
    }

    /// The log of the broker running now.
    pub fn current_log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("mosquitto-{}.log", self.starts)))
            .unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Mosquitto's logs (every message it received and sent).
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                fs::read_to_string(self.dir.join(format!("mosquitto-{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("----- mosquitto (last {} lines)", tail.len());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("mosquitto's files are in {}", self.dir.display());
            // Kept for a look: the temp dir is not removed.
            let keep = tempfile::Builder::new().tempdir().unwrap();
            let _ = std::mem::replace(&mut self._tmp, keep).keep();
        }
    }
}

impl Broker {
    /// The runner's `mqtt` setting for this broker, an inline TOML table
    /// (its password is written beside the broker's files).
    pub fn runner_mqtt(&self) -> String {
        let pw = self.dir.join("runner-mqtt-password");
        fs::write(&pw, password(RUNNER_USER)).unwrap();
        format!(
            "{{ url = {:?}, username = {RUNNER_USER:?}, password_file = {:?} }}",
            self.url(),
            pw.display().to_string()
        )
    }

    /// The same, parsed: what a runner in this process is given.
    pub fn runner_config(&self) -> flotilla_server::mqtt::MqttConfig {
        let table: toml::Table = toml::from_str(&format!("mqtt = {}", self.runner_mqtt())).unwrap();
        table["mqtt"].clone().try_into().unwrap()
    }
}

/// A runner that speaks MQTT through `broker` beside HTTP.
fn runner_toml(broker: &Broker) -> String {
    format!(
        "enroll_secret = {SECRET:?}\nmqtt = {}\n",
        broker.runner_mqtt()
    )
}

/// The flags of an agent over MQTT: the broker, its password file.
fn agent_mqtt(c: &Cluster, broker: &Broker, i: usize, extra: &[&str]) -> AgentSpec {
    let id = format!("node-{i:02}");
    let pw = c.path().join(format!("{id}.mqtt-password"));
    fs::write(&pw, password(&id)).unwrap();
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    extra.extend([
        "--mqtt".into(),
        broker.url(),
        "--mqtt-password-file".into(),
        pw.display().to_string(),
    ]);
    AgentSpec {
        extra,
        ..AgentSpec::default()
    }
}

/// A broker, a runner on it and `n` agents over MQTT, enrolled.
fn mqtt_cluster(n: usize, install: Option<&str>, extra: &[&str]) -> Option<(Broker, Cluster)> {
    let broker = Broker::start()?;
    let toml = runner_toml(&broker);
    let mut c = Cluster::start_with(&toml);
    for i in 0..n {
        let mut spec = agent_mqtt(&c, &broker, i, extra);
        if let Some(cmd) = install {
            spec.install = cmd.to_string();
        }
        c.add_agent(spec);
    }
    c.wait_enrolled();
    Some((broker, c))
}

/// How many lines of the runner's log mention `what`.
fn runner_log_count(c: &Cluster, what: &str) -> usize {
    fs::read_to_string(c.path().join("runner.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

#[test]
fn a_rollout_over_mqtt_succeeds_on_every_agent_process() {
    let Some((_broker, c)) = mqtt_cluster(6, None, &[]) else {
        return;
    };
    c.release("1.1.0", 0);
    let task = c.task("mqtt-rollout", "1.1.0", json!({}));
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 6)]));
    for a in &c.agents {
        assert_eq!(installs(&a.dir), ["install 1.1.0"], "{}", a.id);
        assert_eq!(permanent(&a.dir).as_deref(), Some("1.1.0"), "{}", a.id);
        // Nothing went over the HTTP agent routes but the enrollment (and
        // the artifact).
        let log = fs::read_to_string(c.path().join(format!("{}.log", a.id))).unwrap();
        assert!(log.contains("connected to the MQTT broker"), "{log}");
    }
    // Heartbeats over MQTT carry the new version to the inventory.
    wait_for("every node to say 1.1.0", Duration::from_secs(10), || {
        (0..c.agents.len())
            .all(|i| c.node(i)["version"] == "1.1.0")
            .then_some(())
    });
    assert!(runner_log_count(&c, "connected to the MQTT broker") >= 1);
}

#[test]
fn a_pull_task_over_mqtt_gives_each_asking_device_the_release() {
    let Some((_broker, c)) = mqtt_cluster(3, None, &["--pull", "--pull-interval", "1"]) else {
        return;
    };
    c.release("1.1.0", 0);
    let task = c.task("mqtt-pull", "1.1.0", json!({"method": "pull"}));
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 3)]));
    for a in &c.agents {
        assert_eq!(installs(&a.dir), ["install 1.1.0"], "{}", a.id);
    }
}

#[test]
fn an_offline_device_gets_its_work_when_it_reconnects() {
    let Some((_broker, mut c)) = mqtt_cluster(3, None, &[]) else {
        return;
    };
    c.release("1.1.0", 0);
    // node-00 (the canary) goes away just before the task starts; the
    // runner still counts it online for a few seconds and hands it work,
    // which waits at the broker.
    let away = 0;
    c.agents[away].proc.take().unwrap().kill();
    let task = c.task("mqtt-offline", "1.1.0", json!({}));
    wait_for("node-00's run to start", Duration::from_secs(20), || {
        let run = c.runs(&task).remove("node-00")?;
        (!matches!(run.state, RunState::Pending | RunState::Queued { .. })).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(installs(&c.agents[away].dir), Vec::<String>::new());
    c.start_agent(away);
    let run = c.wait_run(&task, away, Duration::from_secs(60));
    assert!(matches!(run.state, RunState::Succeeded { .. }), "{run:?}");
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(60));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 3)]));
    assert_eq!(installs(&c.agents[away].dir), ["install 1.1.0"]);
}

#[test]
fn a_runner_killed_mid_rollout_over_mqtt_loses_nothing_and_upgrades_nothing_twice() {
    let slow = format!("sleep 0.3; {LOG_INSTALL}");
    let Some((_broker, mut c)) = mqtt_cluster(8, Some(&slow), &[]) else {
        return;
    };
    c.release("1.1.0", 0);
    let task = c.task("mqtt-crash", "1.1.0", json!({"concurrency": 2}));
    let succeeded = |c: &Cluster| {
        c.api
            .try_get(&format!("/v1/tasks/{task}"))
            .map(|v| v["counts"]["succeeded"].as_u64().unwrap_or(0))
    };
    let mut kills = Vec::new();
    for at in [0, 1, 3] {
        let seen = wait_for(
            &format!("{at} nodes to succeed"),
            Duration::from_secs(60),
            || succeeded(&c).filter(|&s| s >= at),
        );
        c.kill_runner();
        kills.push(seen);
        // Reports published meanwhile wait at the broker for the runner's
        // persistent session.
        std::thread::sleep(Duration::from_millis(700));
        c.start_runner();
    }
    assert!(
        kills.iter().any(|&s| s < 8),
        "every kill came after the rollout: {kills:?}"
    );
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(90));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 8)]));
    each_installed_once(&c, "1.1.0");
    eprintln!("killed the runner at {kills:?} succeeded nodes");
}

#[test]
fn a_broker_restart_mid_rollout_loses_nothing_and_upgrades_nothing_twice() {
    let slow = format!("sleep 0.3; {LOG_INSTALL}");
    let Some((mut broker, c)) = mqtt_cluster(8, Some(&slow), &[]) else {
        return;
    };
    c.release("1.1.0", 0);
    let task = c.task("mqtt-broker-restart", "1.1.0", json!({"concurrency": 2}));
    let succeeded = |c: &Cluster| {
        c.api
            .try_get(&format!("/v1/tasks/{task}"))
            .map(|v| v["counts"]["succeeded"].as_u64().unwrap_or(0))
    };
    let mut restarts = Vec::new();
    for at in [1, 4] {
        let seen = wait_for(
            &format!("{at} nodes to succeed"),
            Duration::from_secs(60),
            || succeeded(&c).filter(|&s| s >= at),
        );
        broker.restart();
        restarts.push(seen);
    }
    let view = c.wait_task(&task, &["succeeded"], Duration::from_secs(120));
    assert_eq!(counts(&view), BTreeMap::from([("succeeded".into(), 8)]));
    each_installed_once(&c, "1.1.0");
    eprintln!("restarted the broker at {restarts:?} succeeded nodes");
}

/// A device's own MQTT client (node-00's credentials), outside any agent.
struct Device {
    rt: tokio::runtime::Runtime,
    client: rumqttc::AsyncClient,
    /// The topics of the messages it received.
    received: std::sync::mpsc::Receiver<String>,
}

impl Device {
    fn connect(broker: &Broker, user: &str) -> Device {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts =
            rumqttc::MqttOptions::new(format!("{user}-intruder"), "127.0.0.1", broker.port);
        opts.set_credentials(user, password(user))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
        let (tx, received) = std::sync::mpsc::channel();
        rt.spawn(async move {
            // Bounded like every loop here; far above what a test sends.
            for _ in 0..10_000_000 {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(p.topic);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Device {
            rt,
            client,
            received,
        }
    }

    fn publish(&self, topic: &str, payload: &Value) {
        let body = serde_json::to_vec(payload).unwrap();
        self.rt
            .block_on(
                self.client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, body),
            )
            .unwrap();
        // Let the event loop send it.
        self.rt
            .block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
    }

    /// Subscribes to `topic`; the topic of the first message that arrives
    /// within `wait`, if one does.
    fn read(&self, topic: &str, wait: Duration) -> Vec<String> {
        self.rt
            .block_on(self.client.subscribe(topic, rumqttc::QoS::AtLeastOnce))
            .unwrap();
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(t) = self.received.recv_timeout(left) {
                got.push(t);
            }
            if !got.is_empty() {
                break;
            }
        }
        got
    }
}

#[test]
fn a_device_publishing_on_another_devices_topic_is_refused_by_the_broker() {
    let Some((broker, mut c)) = mqtt_cluster(2, None, &[]) else {
        return;
    };
    // Both agents stop: their heartbeats cannot hide what the intruder does.
    for a in &mut c.agents {
        a.proc.take().unwrap().stop();
    }
    let before = c.node(1)["version"].clone();
    assert_eq!(before, "1.0.0");
    let intruder = Device::connect(&broker, "node-00");
    // On node-01's topic first, then on its own: when its own shows, the
    // other had its chance to arrive.
    for _ in 0..3 {
        intruder.publish(
            "flotilla/v1/nodes/node-01/heartbeat",
            &json!({"version": "6.6.6"}),
        );
        intruder.publish(
            "flotilla/v1/nodes/node-01/report",
            &json!({"task": "t000001", "state": "succeeded"}),
        );
    }
    intruder.publish(
        "flotilla/v1/nodes/node-00/heartbeat",
        &json!({"version": "7.7.7"}),
    );
    wait_for("node-00's own heartbeat", Duration::from_secs(10), || {
        (c.node(0)["version"] == "7.7.7").then_some(())
    });
    assert_eq!(
        c.node(1)["version"],
        before,
        "the runner took a spoofed heartbeat"
    );
    // It cannot read another device's work either: node-01 (the canary)
    // gets work, retained on its topic; node-01 itself reads it there,
    // node-00 reads nothing (Mosquitto grants the subscription and
    // delivers nothing).
    c.release("1.1.0", 0);
    let task = c.task("mqtt-acl", "1.1.0", json!({}));
    wait_for("a run to be offered", Duration::from_secs(20), || {
        c.runs(&task)
            .values()
            .any(|r| matches!(r.state, RunState::Offered { .. }))
            .then_some(())
    });
    let offered = c
        .runs(&task)
        .into_iter()
        .find(|(_, r)| matches!(r.state, RunState::Offered { .. }))
        .unwrap()
        .0;
    let other = if offered == "node-00" {
        "node-01"
    } else {
        "node-00"
    };
    let work = format!("flotilla/v1/nodes/{offered}/work");
    let snoop = Device::connect(&broker, other);
    assert_eq!(
        snoop.read(&work, Duration::from_secs(2)),
        Vec::<String>::new()
    );
    let owner = Device::connect(&broker, &offered);
    assert_eq!(
        owner.read(&work, Duration::from_secs(10)).first(),
        Some(&work)
    );
    // The runner never saw the spoofed messages: nothing about node-01 in its log.
    let log = fs::read_to_string(c.path().join("runner.log")).unwrap_or_default();
    assert!(!log.contains("node-01/"), "{log}");
}

/// The value of the `flotilla_mqtt_messages_total` series with these labels.
fn mqtt_count(c: &Cluster, kind: &str, outcome: &str) -> u64 {
    let text = c
        .api
        .send(c.api.http.get(format!("{}/metrics", c.url())))
        .map(|(_, v)| v.as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let series = format!("flotilla_mqtt_messages_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hostile_messages_are_dropped_and_acked_without_wedging_the_runner() {
    let Some((broker, mut c)) = mqtt_cluster(1, None, &[]) else {
        return;
    };
    c.agents[0].proc.take().unwrap().stop();
    let dev = Device::connect(&broker, "node-00");
    let own = |kind: &str| format!("flotilla/v1/nodes/node-00/{kind}");
    // Over the runner's 64 KiB (under the broker's cap).
    let big = json!({"version": "1.0.0", "pad": "x".repeat(66_000)});
    dev.publish(&own("heartbeat"), &big);
    // Not JSON; JSON of the wrong shape; a version the runner refuses.
    let raw = |topic: &str, body: &[u8], retain: bool| {
        dev.rt
            .block_on(
                dev.client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, retain, body.to_vec()),
            )
            .unwrap();
    };
    raw(&own("heartbeat"), b"{not json", false);
    raw(
        &own("report"),
        br#"{"task": "t1", "state": "exploded"}"#,
        false,
    );
    raw(&own("heartbeat"), br#"{"version": "1.0.0\u0007"}"#, false);
    // A retained report (the runner's established subscription gets it
    // with the retain flag cleared, so the engine refuses it: no such task)
    // and a request with a body.
    raw(
        &own("report"),
        br#"{"task": "t1", "state": "succeeded"}"#,
        true,
    );
    raw(&own("request"), b"give me everything", false);
    // Then a good heartbeat: the runner is still taking messages.
    dev.publish(&own("heartbeat"), &json!({"version": "3.1.4"}));
    wait_for("the good heartbeat", Duration::from_secs(20), || {
        (c.node(0)["version"] == "3.1.4").then_some(())
    });
    assert_eq!(
        mqtt_count(&c, "heartbeat", "dropped"),
        1,
        "the oversized one"
    );
    assert_eq!(
        mqtt_count(&c, "heartbeat", "refused"),
        2,
        "bad JSON, bad version"
    );
    assert_eq!(
        mqtt_count(&c, "report", "refused"),
        2,
        "a state that is none, no such task"
    );
    assert_eq!(
        mqtt_count(&c, "request", "dropped"),
        1,
        "a request with a body"
    );
    assert!(mqtt_count(&c, "heartbeat", "applied") >= 1);
    // Clear the retained report so no later subscriber gets it.
    raw(&own("report"), b"", true);
}

/// More messages at once than the runner's ingest holds (4,096 in flight,
/// 4,096 queued), each going through the engine and a flush (reports, here
/// on a task that does not exist, so each is refused after the engine saw
/// it): the runner must keep acking while its event loop waits for room, so
/// the burst is all taken.
#[test]
fn a_burst_larger_than_the_runners_queues_is_all_taken() {
    let Some((broker, mut c)) = mqtt_cluster(1, None, &[]) else {
        return;
    };
    c.agents[0].proc.take().unwrap().stop();
    let dev = Device::connect(&broker, "node-00");
    let burst = 20_000;
    dev.rt.block_on(async {
        for i in 0..burst {
            let body = json!({"task": format!("t-none-{i}"), "state": "downloading"}).to_string();
            dev.client
                .publish(
                    "flotilla/v1/nodes/node-00/report",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    body.into_bytes(),
                )
                .await
                .unwrap();
        }
    });
    wait_for("the whole burst taken", Duration::from_secs(120), || {
        (mqtt_count(&c, "report", "refused") >= burst).then_some(())
    });
    // And the runner still takes messages.
    dev.publish(
        "flotilla/v1/nodes/node-00/heartbeat",
        &json!({"version": "2.7.1"}),
    );
    wait_for(
        "a heartbeat after the burst",
        Duration::from_secs(20),
        || (c.node(0)["version"] == "2.7.1").then_some(()),
    );
}
