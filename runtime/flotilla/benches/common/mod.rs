//! Setup the `api` and `mqtt` benches share: enrolled nodes in one running
//! task on a runner at `base`, and waiting for the task's counts.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Enrolls `n` nodes named by `node` (at 1.0.0, with the enrollment secret
/// `bench`); their tokens, in order.
pub async fn enroll(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    node: impl Fn(usize) -> String,
) -> Vec<String> {
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let r: Value = http
            .post(format!("{base}/v1/agents/enroll"))
            .json(&json!({"node_id": node(i), "secret": "bench", "version": "1.0.0"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.push(r["token"].as_str().unwrap().to_string());
    }
    tokens
}

/// Release edge 2.0.0 (a 1 KiB artifact), a policy `everyone` with every
/// hook at its default (one wave of every node) and a task over it; the
/// task's id.
pub async fn start_task(http: &reqwest::Client, base: &str) -> String {
    http.post(format!("{base}/v1/releases"))
        .json(&json!({"package": "edge", "version": "2.0.0"}))
        .send()
        .await
        .unwrap();
    http.put(format!("{base}/v1/releases/edge/2.0.0/artifact"))
        .body(vec![1u8; 1024])
        .send()
        .await
        .unwrap();
    http.put(format!("{base}/v1/policies/everyone"))
        .body("// every hook at its default: one wave of every node\n")
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let task: Value = http
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"name": "bench", "package": "edge", "target": {"version": "2.0.0"}, "policy": "everyone"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    task["id"].as_str().expect("task created").to_string()
}

/// Waits until `n` of `task`'s runs are in `state`; panics after `limit`.
pub async fn wait_counts(
    http: &reqwest::Client,
    base: &str,
    task: &str,
    state: &str,
    n: usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let t: Value = http
            .get(format!("{base}/v1/tasks/{task}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if t["counts"][state].as_u64() == Some(n as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not {n} {state}: {}",
            t["counts"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
