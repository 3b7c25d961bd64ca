//! Agent status reports over HTTP on loopback, persisted (budget: ≥ 20,000
//! reports/s and ≥ 50 % of a bare axum handler that does no work).
//!
//! One run, one load generator, two servers side by side:
//! - the runner (`flotilla_server::Runner`, sled in a temp dir): N enrolled
//!   nodes in one running task, each sending its four reports (downloading,
//!   upgrading, verifying, succeeded) to `POST /v1/agents/{node}/report` with
//!   its node token; every report is parsed, authenticated, applied by the
//!   engine and flushed to disk before the 204;
//! - the same runner over TLS (its own `tls = { cert, key }`, a certificate
//!   from a private CA made in process; another data dir and fleet), so the
//!   ratio says what TLS costs on keep-alive connections;
//! - a bare axum server whose handler reads the body and answers 204.
//!
//! The client is reqwest over keep-alive connections, C requests in flight.
//! Run: `cargo bench -p flotilla --bench api` (`-- --nodes N --conns C`).

mod common;

use flotilla_server::{Config, Runner};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `jobs` (url, token, body) with `conns` in flight; returns the time taken.
async fn load(
    client: &reqwest::Client,
    jobs: Vec<Vec<(String, String, String)>>,
    conns: usize,
) -> Duration {
    let jobs = Arc::new(std::sync::Mutex::new(jobs));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..conns {
        let jobs = jobs.clone();
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            loop {
                // A node's reports go in order, one node per worker at a time.
                let Some(seq) = jobs.lock().unwrap().pop() else {
                    break;
                };
                for (url, token, body) in seq {
                    let res = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("request");
                    let status = res.status();
                    let _ = res.bytes().await;
                    assert_eq!(status.as_u16(), 204, "{url}");
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    start.elapsed()
}

/// A runner with `nodes` enrolled nodes in one running task, every node offered.
struct Fleet {
    base: String,
    tokens: Vec<(String, String)>,
    task: String,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn fleet(
    client: &reqwest::Client,
    nodes: usize,
    tls: Option<flotilla_server::tls::TlsConfig>,
) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let runner = Runner::open(Config {
        data: dir.path().join("data"),
        enroll_secret: Some("bench".into()),
        tls,
        ..Config::default()
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(runner.serve(listener, async {
        let _ = stopped.await;
    }));
    // Setup: enroll, a release, a policy with one wave of everyone.
    eprintln!("setup ({scheme}): enrolling {nodes} nodes ...");
    let node = |i: usize| format!("n{i:06}");
    let tokens: Vec<(String, String)> = common::enroll(client, &base, nodes, node)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, token)| (node(i), token))
        .collect();
    let id = common::start_task(client, &base).await;
    common::wait_counts(
        client,
        &base,
        &id,
        "offered",
        nodes,
        Duration::from_secs(120),
    )
    .await;
    Fleet {
        base,
        tokens,
        task: id,
        stop,
        served,
        _dir: dir,
    }
}

impl Fleet {
    /// Each node's four reports, to `base` (this runner or the bare handler).
    fn jobs(&self, base: &str) -> Vec<Vec<(String, String, String)>> {
        self.tokens
            .iter()
            .map(|(node, token)| {
                ["downloading", "upgrading", "verifying", "succeeded"]
                    .iter()
                    .map(|s| {
                        (
                            format!("{base}/v1/agents/{node}/report"),
                            token.clone(),
                            json!({"task": self.task, "state": s}).to_string(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Every node succeeded; then the runner stops.
    async fn finish(self, client: &reqwest::Client, nodes: usize) {
        let t: serde_json::Value = client
            .get(format!("{}/v1/tasks/{}", self.base, self.task))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            t["counts"]["succeeded"].as_u64(),
            Some(nodes as u64),
            "{}",
            t["counts"]
        );
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
    }
}

/// A private CA and the runner's certificate for 127.0.0.1, in `dir`.
fn certificates(dir: &std::path::Path) -> (flotilla_server::tls::TlsConfig, reqwest::Certificate) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("runner.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("runner.key"), key.serialize_pem()).unwrap();
    (
        flotilla_server::tls::TlsConfig::Files(flotilla_server::tls::TlsFiles {
            cert: dir.join("runner.crt"),
            key: dir.join("runner.key"),
            client_ca: None,
        }),
        reqwest::Certificate::from_pem(ca_cert.pem().as_bytes()).unwrap(),
    )
}

fn main() {
    let nodes = arg("--nodes", 10_000);
    let conns = arg("--conns", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = tempfile::tempdir().unwrap();
        let (tls, ca) = certificates(pki.path());
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(conns)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let plain = fleet(&client, nodes, None).await;
        let over_tls = fleet(&client, nodes, Some(tls)).await;

        // The bare handler.
        let bare = axum::Router::new().route(
            "/v1/agents/{node}/report",
            axum::routing::post(|_body: axum::body::Bytes| async { axum::http::StatusCode::NO_CONTENT }),
        );
        let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_base = format!("http://{}", bare_listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(bare_listener, bare).await.unwrap() });

        let reports = nodes * 4;
        // Warm the bare path's connections, then measure all three in one run.
        load(&client, plain.jobs(&bare_base).into_iter().take(conns).collect(), conns).await;
        let bare_time = load(&client, plain.jobs(&bare_base), conns).await;
        let ours_time = load(&client, plain.jobs(&plain.base), conns).await;
        let tls_time = load(&client, over_tls.jobs(&over_tls.base), conns).await;
        plain.finish(&client, nodes).await;
        over_tls.finish(&client, nodes).await;

        let rate = |d: Duration| reports as f64 / d.as_secs_f64();
        let (ours, bare, tls) = (rate(ours_time), rate(bare_time), rate(tls_time));
        println!("agent reports over HTTP on loopback: {reports} reports from {nodes} nodes, {conns} in flight");
        println!(
            "  bare axum handler     {:>9.0} reports/s  ({:.2} s)",
            bare,
            bare_time.as_secs_f64()
        );
        println!(
            "  flotilla, persisted   {:>9.0} reports/s  ({:.2} s)  budget >= 20000/s: {}",
            ours,
            ours_time.as_secs_f64(),
            if ours >= 20_000.0 { "met" } else { "NOT met" }
        );
        println!(
            "  ratio                 {:>9.1} %          budget >= 50 %: {}",
            100.0 * ours / bare,
            if ours >= 0.5 * bare { "met" } else { "NOT met" }
        );
        println!(
            "  flotilla over TLS     {:>9.0} reports/s  ({:.2} s)  keep-alive, TLS 1.3, ring",
            tls,
            tls_time.as_secs_f64()
        );
        println!(
            "  TLS ratio             {:>9.1} % of plain HTTP, {:.1} % of bare",
            100.0 * tls / ours,
            100.0 * tls / bare
        );
    });
}
