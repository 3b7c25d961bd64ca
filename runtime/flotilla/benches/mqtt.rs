//! N simulated devices against one runner, over HTTP and over MQTT
//! (Mosquitto on loopback), side by side in one run (issue 19).
//!
//! For each transport and each size N (default 1,000 then 10,000):
//! - a runner (`flotilla serve`, its own process, so its RSS is its own) with
//!   N enrolled nodes in one task of one wave, every node offered;
//! - **connect**: N devices come online and get their work: over HTTP each
//!   opens its own connection (HTTP/1.1 keep-alive, written by hand: one
//!   socket per device, as agents hold them) and long-polls `work`
//!   (answered at once: the work is open); over MQTT each connects to the broker (password, ACL,
//!   persistent session) and subscribes to its `work` topic (its retained
//!   work arrives). Timed until every device has its work; at most 256
//!   connections are being opened at once (the listen backlogs).
//! - **reports**: every device sends its four reports (downloading,
//!   upgrading, verifying, succeeded) in order, all devices at once; timed
//!   until the runner has every report on disk (HTTP: every 204; MQTT: the
//!   runner's `flotilla_mqtt_messages_total{kind="report",outcome="applied"}`).
//! - **idle**: every device stays connected (HTTP: a long poll held; MQTT:
//!   its session); the runner's RSS (and the broker's) then, minus before the
//!   devices came, per device.
//!
//! Run: `cargo bench -p flotilla --bench mqtt` (`-- --devices 1000,10000`,
//! or `FLOTILLA_BENCH_DEVICES`). Needs `mosquitto` and `mosquitto_passwd`
//! (Debian: apt-get install mosquitto) and a file limit above 2N + 1000.

mod common;

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const RUNNER: &str = env!("CARGO_BIN_EXE_flotilla");
const RUNNER_USER: &str = "flotilla-runner";
const ACL: &str = include_str!("../../../examples/mqtt/mosquitto/acl");
/// Connections being opened at once.
const OPENING: usize = 256;
const STATES: [&str; 4] = ["downloading", "upgrading", "verifying", "succeeded"];

fn sizes() -> Vec<usize> {
    let args: Vec<String> = std::env::args().collect();
    let given = args
        .iter()
        .position(|a| a == "--devices")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var("FLOTILLA_BENCH_DEVICES").ok())
        .unwrap_or_else(|| "1000,10000".into());
    given
        .split(',')
        .map(|s| s.trim().parse().expect("--devices N[,N...]"))
        .collect()
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// VmRSS of a process, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn password(user: &str) -> String {
    format!("bench-{user}")
}

fn node(i: usize) -> String {
    format!("n{i:06}")
}

/// Mosquitto on a free port: every node (and the runner) with a password,
/// the example ACL.
fn broker(dir: &Path, n: usize) -> (Killed, u16) {
    let (bin, passwd) = (
        find("mosquitto").unwrap(),
        find("mosquitto_passwd").unwrap(),
    );
    let pw = dir.join("passwd");
    let mut plain = format!("{RUNNER_USER}:{}\n", password(RUNNER_USER));
    for i in 0..n {
        plain.push_str(&format!("{}:{}\n", node(i), password(&node(i))));
    }
    std::fs::write(&pw, plain).unwrap();
    let out = Command::new(passwd).arg("-U").arg(&pw).output().unwrap();
    assert!(out.status.success(), "mosquitto_passwd -U: {out:?}");
    std::fs::write(dir.join("acl"), ACL).unwrap();
    let port = free_port();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             persistence true\npersistence_location {}/\nautosave_interval 60\n\
             max_packet_size 70000\nmax_inflight_messages 10000\nmax_queued_messages 1000000\n\
             log_type error\nuser root\n",
            pw.display(),
            dir.join("acl").display(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Killed(child), port)
}

/// A runner process with `n` enrolled nodes in one offered task.
struct Runner {
    proc: Killed,
    base: String,
    tokens: Vec<String>,
    task: String,
}

async fn runner(http: &reqwest::Client, dir: &Path, n: usize, mqtt_port: Option<u16>) -> Runner {
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\ndata = {:?}\nenroll_secret = \"bench\"\n",
        dir.join("data").display().to_string()
    );
    if let Some(port) = mqtt_port {
        std::fs::write(dir.join("mqtt-password"), password(RUNNER_USER)).unwrap();
        toml.push_str(&format!(
            "mqtt = {{ url = \"mqtt://127.0.0.1:{port}\", username = {RUNNER_USER:?}, password_file = {:?} }}\n",
            dir.join("mqtt-password").display().to_string()
        ));
    }
    // Devices wait between the phases: no idle timeout during the run.
    toml.push_str(&format!(
        "[http]\nmax_connections = {}\nidle_timeout_seconds = 900\n",
        2 * n + 1000
    ));
    std::fs::write(dir.join("runner.toml"), toml).unwrap();
    let out = dir.join("runner.out");
    let child = Command::new(RUNNER)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("runner.toml"))
        .env("FLOTILLA_LOG", "warn")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("runner.log")).unwrap())
        .spawn()
        .unwrap();
    let proc = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let base = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(url) = text
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            break url.to_string();
        }
        assert!(Instant::now() < deadline, "the runner did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("  setup: enrolling {n} nodes ...");
    let tokens = common::enroll(http, &base, n, node).await;
    let task = common::start_task(http, &base).await;
    let r = Runner {
        proc,
        base,
        tokens,
        task,
    };
    r.wait_counts(http, "offered", n, Duration::from_secs(300))
        .await;
    r
}

impl Runner {
    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    async fn wait_counts(&self, http: &reqwest::Client, state: &str, n: usize, limit: Duration) {
        common::wait_counts(http, &self.base, &self.task, state, n, limit).await;
    }

    /// The runner's count of reports it applied from MQTT.
    async fn mqtt_applied(&self, http: &reqwest::Client) -> usize {
        let text = http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "flotilla_mqtt_messages_total{kind=\"report\",outcome=\"applied\"} ",
                )?
                .trim()
                .parse()
                .ok()
            })
            .unwrap_or(0)
    }
}

/// What one run measured.
struct Figures {
    connect: Duration,
    reports: Duration,
    /// RSS growth per device once all are connected with their work.
    runner_kb_per_device: f64,
    /// ... and at the end (after the reports, the devices idle).
    runner_end_kb_per_device: f64,
    broker_kb_per_device: Option<f64>,
}

/// Waits until the process holds at least `n` more descriptors than `base`
/// (the devices' connections are in), at most 60 s.
async fn wait_fds(pid: u32, base: usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(pid) < base + n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the allocator settle before RSS is read.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One HTTP/1.1 keep-alive connection, as an agent holds it.
struct Conn {
    io: tokio::io::BufStream<tokio::net::TcpStream>,
    host: String,
}

impl Conn {
    async fn open(host: &str) -> Conn {
        let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
        Conn {
            io: tokio::io::BufStream::new(tcp),
            host: host.to_string(),
        }
    }

    /// Sends a request and reads the status and body of its answer.
    async fn call(&mut self, method: &str, path: &str, token: &str, body: &str) -> u16 {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.io.write_all(head.as_bytes()).await.unwrap();
        self.io.write_all(body.as_bytes()).await.unwrap();
        self.io.flush().await.unwrap();
        let mut line = String::new();
        self.io.read_line(&mut line).await.unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.io.read_line(&mut line).await.unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut rest = vec![0u8; length];
        self.io.read_exact(&mut rest).await.unwrap();
        status
    }
}

async fn over_http(n: usize, dir: &Path) -> Figures {
    let setup = reqwest::Client::new();
    let r = runner(&setup, dir, n, None).await;
    let before_kb = rss_kb(r.pid());
    let fds = open_fds(r.pid());
    let host = r.base.trim_start_matches("http://").to_string();
    let with_work = Arc::new(AtomicUsize::new(0));
    let reported = Arc::new(AtomicUsize::new(0));
    let polling = Arc::new(AtomicUsize::new(0));
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let opening = Arc::new(Semaphore::new(OPENING));
    let start = Instant::now();
    let mut devices = Vec::with_capacity(n);
    for (i, token) in r.tokens.iter().enumerate() {
        let (with_work, reported, polling, opening, mut go) = (
            with_work.clone(),
            reported.clone(),
            polling.clone(),
            opening.clone(),
            go.clone(),
        );
        let (token, task, host) = (token.clone(), r.task.clone(), host.clone());
        let id = node(i);
        devices.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await.unwrap();
            let mut conn = Conn::open(&host).await;
            drop(permit);
            let work = format!("/v1/agents/{id}/work?wait=60");
            assert_eq!(conn.call("GET", &work, &token, "").await, 200);
            with_work.fetch_add(1, Ordering::SeqCst);
            let _ = go.wait_for(|g| *g).await;
            let report = format!("/v1/agents/{id}/report");
            for s in STATES {
                let body = json!({"task": task, "state": s}).to_string();
                assert_eq!(conn.call("POST", &report, &token, &body).await, 204);
            }
            reported.fetch_add(1, Ordering::SeqCst);
            // Idle: the long poll, held (no work left).
            polling.fetch_add(1, Ordering::SeqCst);
            let _ = conn.call("GET", &work, &token, "").await;
        }));
    }
    let wait = |count: Arc<AtomicUsize>, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        while count.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} {what}",
                count.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    wait(with_work, "with work").await;
    let connect = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected_kb = rss_kb(r.pid());
    let start = Instant::now();
    go_tx.send(true).unwrap();
    wait(reported, "reported").await;
    let reports = start.elapsed();
    r.wait_counts(&setup, "succeeded", n, Duration::from_secs(60))
        .await;
    wait(polling, "polling").await;
    wait_fds(r.pid(), fds, n).await;
    let after_kb = rss_kb(r.pid());
    for d in devices {
        d.abort();
    }
    Figures {
        connect,
        reports,
        runner_kb_per_device: (connected_kb as f64 - before_kb as f64) / n as f64,
        runner_end_kb_per_device: (after_kb as f64 - before_kb as f64) / n as f64,
        broker_kb_per_device: None,
    }
}

async fn over_mqtt(n: usize, dir: &Path) -> Figures {
    let (broker, port) = broker(dir, n);
    let setup = reqwest::Client::new();
    let r = runner(&setup, dir, n, Some(port)).await;
    let before_kb = rss_kb(r.pid());
    let broker_before_kb = rss_kb(broker.0.id());
    let connected = Arc::new(AtomicUsize::new(0));
    let with_work = Arc::new(AtomicUsize::new(0));
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let opening = Arc::new(Semaphore::new(OPENING));
    let start = Instant::now();
    let mut devices = Vec::with_capacity(n);
    for i in 0..n {
        let id = node(i);
        let (connected, with_work, opening, mut go) = (
            connected.clone(),
            with_work.clone(),
            opening.clone(),
            go.clone(),
        );
        let task = r.task.clone();
        devices.push(tokio::spawn(async move {
            let permit = opening.acquire_owned().await.unwrap();
            let mut opts = rumqttc::MqttOptions::new(&id, "127.0.0.1", port);
            opts.set_credentials(&id, password(&id))
                .set_clean_session(false)
                .set_keep_alive(Duration::from_secs(300));
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 8);
            let mut permit = Some(permit);
            let mut has_work = false;
            let work = format!("flotilla/v1/nodes/{id}/work");
            let report = format!("flotilla/v1/nodes/{id}/report");
            loop {
                tokio::select! {
                    e = events.poll() => match e {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            permit.take();
                            connected.fetch_add(1, Ordering::SeqCst);
                            client.try_subscribe(&work, rumqttc::QoS::AtLeastOnce).unwrap();
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                            if !has_work && !p.payload.is_empty() =>
                        {
                            has_work = true;
                            with_work.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("{id}: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    },
                    Ok(()) = go.changed() => {
                        for s in STATES {
                            let body = json!({"task": task, "state": s}).to_string();
                            client
                                .publish(&report, rumqttc::QoS::AtLeastOnce, false, body.into_bytes())
                                .await
                                .unwrap();
                        }
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while with_work.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} connected, {} with work",
            connected.load(Ordering::SeqCst),
            with_work.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected_kb = rss_kb(r.pid());
    let broker_connected_kb = rss_kb(broker.0.id());
    let start = Instant::now();
    go_tx.send(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let applied = r.mqtt_applied(&setup).await;
        if applied >= 4 * n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{applied} of {} reports applied",
            4 * n
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reports = start.elapsed();
    r.wait_counts(&setup, "succeeded", n, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kb = rss_kb(r.pid());
    for d in devices {
        d.abort();
    }
    drop(broker);
    Figures {
        connect,
        reports,
        runner_kb_per_device: (connected_kb as f64 - before_kb as f64) / n as f64,
        runner_end_kb_per_device: (after_kb as f64 - before_kb as f64) / n as f64,
        broker_kb_per_device: Some(
            (broker_connected_kb as f64 - broker_before_kb as f64) / n as f64,
        ),
    }
}

fn main() {
    if find("mosquitto").is_none() || find("mosquitto_passwd").is_none() {
        println!("mqtt bench skipped: install mosquitto (Debian: apt-get install mosquitto)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for n in sizes() {
        for transport in ["http", "mqtt"] {
            eprintln!("{transport}, {n} devices:");
            let dir = tempfile::tempdir().unwrap();
            let f = rt.block_on(async {
                match transport {
                    "http" => over_http(n, dir.path()).await,
                    _ => over_mqtt(n, dir.path()).await,
                }
            });
            eprintln!(
                "  connect all {:.2} s, {:.0} reports/s, runner RSS/device {:.2} kB (end {:.2} kB), broker {:?} kB",
                f.connect.as_secs_f64(),
                (4 * n) as f64 / f.reports.as_secs_f64(),
                f.runner_kb_per_device,
                f.runner_end_kb_per_device,
                f.broker_kb_per_device
            );
            rows.push((n, transport, f));
        }
    }
    println!(
        "N devices against one runner on loopback (HTTP long polls vs MQTT through Mosquitto)"
    );
    println!(
        "(RSS per device: growth from before the devices came to all connected with their work; \"end\": after the reports, devices idle)"
    );
    println!(
        "{:>7}  {:<5} {:>12} {:>11} {:>18} {:>18} {:>18}",
        "devices",
        "via",
        "connect all",
        "reports/s",
        "runner RSS/dev",
        "runner end/dev",
        "broker RSS/dev"
    );
    for (n, transport, f) in rows {
        println!(
            "{:>7}  {:<5} {:>10.2} s {:>11.0} {:>15.2} kB {:>15.2} kB {:>18}",
            n,
            transport,
            f.connect.as_secs_f64(),
            (4 * n) as f64 / f.reports.as_secs_f64(),
            f.runner_kb_per_device,
            f.runner_end_kb_per_device,
            f.broker_kb_per_device
                .map_or("-".to_string(), |b| format!("{b:.2} kB")),
        );
    }
}
