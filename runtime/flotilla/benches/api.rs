//! Agent status reports over HTTP on loopback, persisted (budget: ≥ 20,000
//! reports/s and ≥ 50 % of a bare axum handler that does no work).
//!
//! One run, one load generator, two servers side by side:
//! - the runner (`flotilla_server::Runner`, sled in a temp dir): N enrolled
//!   nodes in one running task, each sending its four reports (downloading,
//!   upgrading, verifying, succeeded) to `POST /v1/agents/{node}/report` with
//!   its node token; every report is parsed, authenticated, applied by the
//!   engine and flushed to disk before the 204;
//! - a bare axum server whose handler reads the body and answers 204.
//!
//! The client is reqwest over keep-alive connections, C requests in flight.
//! Run: `cargo bench -p flotilla --bench api` (`-- --nodes N --conns C`).

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

fn main() {
    let nodes = arg("--nodes", 10_000);
    let conns = arg("--conns", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let runner = Runner::open(Config {
            data: dir.path().join("data"),
            enroll_secret: Some("bench".into()),
            ..Config::default()
        })
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(runner.serve(listener, async {
            let _ = stopped.await;
        }));

        // The bare handler.
        let bare = axum::Router::new().route(
            "/v1/agents/{node}/report",
            axum::routing::post(|_body: axum::body::Bytes| async { axum::http::StatusCode::NO_CONTENT }),
        );
        let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_base = format!("http://{}", bare_listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(bare_listener, bare).await.unwrap() });

        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(conns)
            .build()
            .unwrap();
        // Setup: enroll, a release, a policy with one wave of everyone.
        eprintln!("setup: enrolling {nodes} nodes ...");
        let mut tokens = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let node = format!("n{i:06}");
            let r: serde_json::Value = client
                .post(format!("{base}/v1/agents/enroll"))
                .json(&json!({"node_id": node, "secret": "bench", "version": "1.0.0"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            tokens.push((node, r["token"].as_str().unwrap().to_string()));
        }
        let post = |path: &str, body: serde_json::Value| {
            client.post(format!("{base}{path}")).json(&body).send()
        };
        post("/v1/releases", json!({"package": "edge", "version": "2.0.0"})).await.unwrap();
        client
            .put(format!("{base}/v1/releases/edge/2.0.0/artifact"))
            .body(vec![1u8; 1024])
            .send()
            .await
            .unwrap();
        client
            .put(format!("{base}/v1/policies/everyone"))
            .body("// every hook at its default: one wave of every node\n")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
        let task: serde_json::Value = post(
            "/v1/tasks",
            json!({"name": "bench", "package": "edge", "target": {"version": "2.0.0"}, "policy": "everyone"}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let id = task["id"].as_str().expect("task created").to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t: serde_json::Value = client
                .get(format!("{base}/v1/tasks/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if t["counts"]["offered"].as_u64() == Some(nodes as u64) {
                break;
            }
            assert!(Instant::now() < deadline, "not every node was offered: {}", t["counts"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let jobs = |base: &str| -> Vec<Vec<(String, String, String)>> {
            tokens
                .iter()
                .map(|(node, token)| {
                    ["downloading", "upgrading", "verifying", "succeeded"]
                        .iter()
                        .map(|s| {
                            (
                                format!("{base}/v1/agents/{node}/report"),
                                token.clone(),
                                json!({"task": id, "state": s}).to_string(),
                            )
                        })
                        .collect()
                })
                .collect()
        };
        let reports = nodes * 4;
        // Warm the bare path's connections, then measure both in one run.
        load(&client, jobs(&bare_base).into_iter().take(conns).collect(), conns).await;
        let bare_time = load(&client, jobs(&bare_base), conns).await;
        let ours_time = load(&client, jobs(&base), conns).await;

        let t: serde_json::Value = client
            .get(format!("{base}/v1/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(t["counts"]["succeeded"].as_u64(), Some(nodes as u64), "{}", t["counts"]);

        let rate = |d: Duration| reports as f64 / d.as_secs_f64();
        let (ours, bare) = (rate(ours_time), rate(bare_time));
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
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    });
}
