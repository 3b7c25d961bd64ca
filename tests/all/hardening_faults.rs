//! Issue 13, point 10: a fault is not a refusal. A store commit or flush
//! that fails while the runner applies an agent's report or an operator's
//! call answers 503 with `Retry-After` and acknowledges nothing; the report
//! sent again once the store is back is applied exactly once.

use crate::api::serve_on_loopback;
use flotilla_engine::store::{Store, StoreError};
use flotilla_model::protocol::Enrolled;
use flotilla_model::{Event, NodeRun, Task};
use flotilla_server::{Config, Runner};
use flotilla_store_sled::SledStore;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ENROLL: &str = "enroll-secret";

/// The runner's sled store with commits and flushes that fail on demand.
struct Faulty {
    inner: Arc<SledStore>,
    commits_fail: AtomicBool,
    flushes_fail: AtomicBool,
}

impl Faulty {
    fn check(&self, fail: &AtomicBool) -> Result<(), StoreError> {
        if fail.load(Ordering::SeqCst) {
            Err(StoreError::io(
                "injected fault",
                std::io::Error::from_raw_os_error(28), // ENOSPC
            ))
        } else {
            Ok(())
        }
    }
}

impl Store for Faulty {
    fn commit(&self, task: &Task, runs: &[NodeRun], events: &[Event]) -> Result<(), StoreError> {
        self.check(&self.commits_fail)?;
        self.inner.commit(task, runs, events)
    }
    fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.inner.task(id)
    }
    fn tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.inner.tasks()
    }
    fn runs(&self, task_id: &str) -> Result<Vec<NodeRun>, StoreError> {
        self.inner.runs(task_id)
    }
    fn run(&self, task_id: &str, node_id: &str) -> Result<Option<NodeRun>, StoreError> {
        self.inner.run(task_id, node_id)
    }
    fn events(&self, task_id: &str, from_seq: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.inner.events(task_id, from_seq, limit)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.check(&self.flushes_fail)?;
        self.inner.flush()
    }
}

struct Runner0 {
    base: String,
    state: Arc<flotilla_server::AppState>,
    http: reqwest::Client,
    store: Arc<Faulty>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Runner0 {
    async fn start() -> Runner0 {
        Self::start_with(None).await
    }

    /// With agents also over the MQTT broker `mqtt`, if given.
    async fn start_with(mqtt: Option<flotilla_server::mqtt::MqttConfig>) -> Runner0 {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data: dir.path().join("data"),
            tick_ms: 20,
            enroll_secret: Some(ENROLL.into()),
            mqtt,
            ..Config::default()
        };
        let mut faulty = None;
        let runner = Runner::open_with_store(config, |sled| {
            let f = Arc::new(Faulty {
                inner: sled,
                commits_fail: AtomicBool::new(false),
                flushes_fail: AtomicBool::new(false),
            });
            faulty = Some(f.clone());
            f
        })
        .unwrap();
        let state = runner.state.clone();
        let (base, tx, served) = serve_on_loopback(runner).await;
        Runner0 {
            base,
            state,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            store: faulty.unwrap(),
            stop: Some(tx),
            served: Some(served),
            _dir: dir,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.body(b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn json(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let res = self
            .send(method, path, body.map(|b| b.to_string().into_bytes()), None)
            .await;
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Enrolls `node` (at 1.0.0) with the enrollment secret; its token.
    async fn enroll(&self, node: &str) -> String {
        let (s, body) = self
            .json(
                "POST",
                "/v1/agents/enroll",
                Some(json!({"node_id": node, "secret": ENROLL, "version": "1.0.0"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        serde_json::from_value::<Enrolled>(body).unwrap().token
    }

    /// Release edge 2.0.0 with its artifact, a one-wave Rhai policy and a
    /// task `name` that upgrades every node to it; the task's id.
    async fn start_edge_task(&self, name: &str) -> String {
        let (s, _) = self
            .json(
                "POST",
                "/v1/releases",
                Some(json!({"package": "edge", "version": "2.0.0"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let res = self
            .send(
                "PUT",
                "/v1/releases/edge/2.0.0/artifact",
                Some(b"two".to_vec()),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        let res = self
            .send(
                "PUT",
                "/v1/policies/everyone",
                Some(b"// one wave of every node\n".to_vec()),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let spec = json!({"name": name, "package": "edge", "target": {"version": "2.0.0"}, "policy": "everyone"});
        let (s, t) = self.json("POST", "/v1/tasks", Some(spec)).await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        t["id"].as_str().unwrap().to_string()
    }

    async fn stop(mut self) {
        self.store.commits_fail.store(false, Ordering::SeqCst);
        self.store.flushes_fail.store(false, Ordering::SeqCst);
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("the runner stops within 20 s")
                .unwrap();
        }
    }
}

/// A 503 that asks to be retried, and says it was a fault.
/// PUTs the canary script as the policy `name`.
async fn upload_canary(h: &crate::api::Harness, name: &str) -> reqwest::Response {
    let script = std::fs::read(flotilla_tests::script("canary")).unwrap();
    h.http
        .put(h.url(&format!("/v1/policies/{name}")))
        .body(script)
        .send()
        .await
        .unwrap()
}

fn assert_fault(res: &reqwest::Response, what: &str) {
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: a store fault must answer 503"
    );
    let after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    assert!(after.is_some_and(|s| s >= 1), "{what}: no Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_fault_answers_503_and_the_retried_report_is_applied_once() {
    let r = Runner0::start().await;
    let mut tokens = Vec::new();
    for node in ["n1", "n2"] {
        tokens.push(r.enroll(node).await);
    }
    let id = r.start_edge_task("up").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, t) = r.json("GET", &format!("/v1/tasks/{id}"), None).await;
        if t["counts"]["offered"].as_u64() == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "not offered: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = |node: &'static str, token: String, state: &'static str| {
        let body = json!({"task": id, "state": state}).to_string().into_bytes();
        let r = &r;
        async move {
            r.send(
                "POST",
                &format!("/v1/agents/{node}/report"),
                Some(body),
                Some(&token),
            )
            .await
        }
    };
    let events_of = |node: &'static str, kind: &'static str| {
        let r = &r;
        let id = id.clone();
        async move {
            let (s, ev) = r
                .json("GET", &format!("/v1/tasks/{id}/events?limit=5000"), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{ev}");
            ev["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["node"] == node && e["kind"] == kind)
                .count()
        }
    };

    // A commit that fails: 503 + Retry-After, not a 409 the agent would
    // take as final.
    r.store.commits_fail.store(true, Ordering::SeqCst);
    let res = report("n1", tokens[0].clone(), "succeeded").await;
    assert_fault(&res, "a report whose commit failed");
    // An operator's call under the same fault is not acknowledged either.
    let res = r
        .send("POST", &format!("/v1/tasks/{id}/pause"), None, None)
        .await;
    assert_fault(&res, "a pause whose commit failed");
    r.store.commits_fail.store(false, Ordering::SeqCst);
    let res = r
        .send("POST", &format!("/v1/tasks/{id}/resume"), None, None)
        .await;
    let status = res.status();
    assert!(
        status.is_success() || status == StatusCode::CONFLICT,
        "resume: {status}"
    );
    assert_eq!(events_of("n1", "node.succeeded").await, 0);
    // The agent's retry, the store back: taken and applied once.
    let res = report("n1", tokens[0].clone(), "succeeded").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(events_of("n1", "node.succeeded").await, 1);

    // A flush that fails after the commit went in: still 503, and the
    // retry is taken (204) and not applied a second time.
    r.store.flushes_fail.store(true, Ordering::SeqCst);
    let res = report("n2", tokens[1].clone(), "succeeded").await;
    assert_fault(&res, "a report whose flush failed");
    let res = r
        .send("POST", &format!("/v1/tasks/{id}/pause"), None, None)
        .await;
    assert_fault(&res, "a pause whose flush failed");
    r.store.flushes_fail.store(false, Ordering::SeqCst);
    let res = report("n2", tokens[1].clone(), "succeeded").await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(events_of("n2", "node.succeeded").await, 1);
    assert_eq!(events_of("n1", "node.succeeded").await, 1);
    r.stop().await;
}

/// Issue 19: over MQTT too, nothing is acknowledged before it is durable.
/// A report that arrives while the store's flushes fail is not acked (no
/// PUBACK reaches the broker) and not applied; once the store is back, the
/// runner's own retry applies it once and only then acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_report_is_acked_only_once_the_store_has_it() {
    use crate::e2e::mqtt::{Broker, password};
    let Some(broker) = Broker::start() else {
        return;
    };
    let r = Runner0::start_with(Some(broker.runner_config())).await;
    let node = "node-00";
    r.enroll(node).await;
    let id = r.start_edge_task("up").await;
    let counts = |state: &'static str| {
        let (r, id) = (&r, id.clone());
        async move {
            let (_, t) = r.json("GET", &format!("/v1/tasks/{id}"), None).await;
            t["counts"][state].as_u64().unwrap_or(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while counts("offered").await != 1 {
        assert!(Instant::now() < deadline, "not offered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The device's report, while every flush fails.
    r.store.flushes_fail.store(true, Ordering::SeqCst);
    let mut opts = rumqttc::MqttOptions::new("node-00-device", "127.0.0.1", broker.port);
    opts.set_credentials(node, password(node));
    let (device, mut events) = rumqttc::AsyncClient::new(opts, 16);
    let pump = tokio::spawn(async move {
        for _ in 0..100_000 {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let body = json!({"task": id, "state": "succeeded"}).to_string();
    device
        .publish(
            "flotilla/v1/nodes/node-00/report",
            rumqttc::QoS::AtLeastOnce,
            false,
            body.into_bytes(),
        )
        .await
        .unwrap();
    // The broker hands it to the runner ...
    let to_runner = "Sending PUBLISH to flotilla-runner (d0, q1, r0, m";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mid = loop {
        let logs = broker.logs();
        let mid = logs.lines().find_map(|l| {
            let rest = l.split(to_runner).nth(1)?;
            let (mid, topic) = rest.split_once(", ")?;
            topic
                .starts_with("'flotilla/v1/nodes/node-00/report'")
                .then(|| mid.to_string())
        });
        if let Some(m) = mid {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the report never reached the runner"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let acked = format!("Received PUBACK from flotilla-runner (Mid: {mid},");
    // ... which retries it and does not ack it while the store fails.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !broker.logs().contains(&acked),
        "acked before it was stored"
    );
    assert_eq!(counts("succeeded").await, 0);
    // The store back: applied once, then acked.
    r.store.flushes_fail.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !broker.logs().contains(&acked) {
        assert!(
            Instant::now() < deadline,
            "never acked after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counts("succeeded").await, 1);
    pump.abort();
    r.stop().await;
}

/// Issue 19: 10,000 nodes' reports over MQTT in one burst, each final one
/// clearing the node's retained work (a publish of the runner's own): the
/// runner's event loop must keep reading while its ingest is full, or its
/// acks and its publishes wait on each other (the mqtt bench stalled so at
/// 10,000 devices). Every report is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_every_nodes_reports_over_mqtt_is_all_applied() {
    burst_of_reports(false).await;
}

/// The same after the broker restarts while the runner publishes the
/// nodes' work: the runner reconnects with its client's queue full and must
/// subscribe again without waiting for room in it. The reports are sent once
/// it has: Mosquitto 2.0.11 drops what devices publish between its restart
/// and the runner's new SUBSCRIBE (its restored session gets none of it);
/// real agents send those outcomes again when the runner republishes their
/// open work, which this client does not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_the_runner_publishes_work_for_every_node_loses_nothing() {
    burst_of_reports(true).await;
}

async fn burst_of_reports(restart_broker: bool) {
    use crate::e2e::mqtt::{Broker, password};
    const NODES: usize = 10_000;
    // A fleet's worth of reports from one client: node-11 may write every
    // node's report topic here (the broker's ACL is not what is tested).
    let Some(mut broker) =
        Broker::start_with_acl("user node-11\ntopic write flotilla/v1/nodes/+/report")
    else {
        return;
    };
    let r = Runner0::start_with(Some(broker.runner_config())).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let node = |i: usize| format!("b{i:05}");
    for i in 0..NODES {
        r.state
            .inventory
            .upsert_node(flotilla_model::Node {
                last_seen: now,
                ..flotilla_model::Node::new(node(i), "1.0.0")
            })
            .unwrap();
    }
    let id = r.start_edge_task("burst").await;
    let counts = |state: &'static str| {
        let (r, id) = (&r, id.clone());
        async move {
            let (_, t) = r.json("GET", &format!("/v1/tasks/{id}"), None).await;
            t["counts"][state].as_u64().unwrap_or(0) as usize
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts("offered").await != NODES {
        assert!(Instant::now() < deadline, "not all offered");
        tokio::time::sleep(Duration::from_millis(if restart_broker { 1 } else { 50 })).await;
    }
    if restart_broker {
        // The runner is publishing 10,000 nodes' work now.
        broker.restart();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !broker
            .current_log()
            .contains("Received SUBSCRIBE from flotilla-runner")
        {
            assert!(
                Instant::now() < deadline,
                "the runner did not subscribe again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut opts = rumqttc::MqttOptions::new("fleet-burst", "127.0.0.1", broker.port);
    opts.set_credentials("node-11", password("node-11"))
        .set_inflight(10_000);
    let (fleet, mut events) = rumqttc::AsyncClient::new(opts, 1024);
    let pump = tokio::spawn(async move {
        for _ in 0..10_000_000 {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    for state in ["downloading", "upgrading", "verifying", "succeeded"] {
        for i in 0..NODES {
            let body = json!({"task": id, "state": state}).to_string();
            fleet
                .publish(
                    format!("flotilla/v1/nodes/{}/report", node(i)),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    body.into_bytes(),
                )
                .await
                .unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = counts("succeeded").await;
        if done == NODES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {NODES} succeeded after 120 s: the runner stopped taking reports"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pump.abort();
    r.stop().await;
}

/// Issue 15, point 7: the runner's disk failing to store an upload is a
/// fault (503 with `Retry-After`), not a refusal of the policy (422) nor a
/// permanent error (500); nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_fault_storing_an_upload_answers_503_not_a_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let h = crate::api::Harness::start(|c| c.data = data.clone()).await;
    // The folders uploads are written to become files: every write fails.
    for dir in ["policies", "artifacts"] {
        let dir = data.join(dir);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, "").unwrap();
    }

    let res = upload_canary(&h, "mine").await;
    assert_fault(&res, "a policy upload the disk cannot store");
    let body: Value = res.json().await.unwrap();
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("could not store"), "{body}");
    // While the folder is broken, reading the policy is a fault too.
    let res = h.http.get(h.url("/v1/policies/mine")).send().await.unwrap();
    assert_fault(&res, "reading a policy from a folder the disk cannot read");
    // Nothing was stored: with the folder back, there is no such policy.
    let dir = data.join("policies");
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let (s, _) = h.get("/v1/policies/mine").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing stored");

    let (s, r) = h
        .post(
            "/v1/releases",
            json!({"package": "edge", "version": "1.0.0"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let res = h
        .http
        .put(h.url("/v1/releases/edge/1.0.0/artifact"))
        .body(b"the release".to_vec())
        .send()
        .await
        .unwrap();
    assert_fault(&res, "an artifact upload the disk cannot store");
    let (s, _) = h.get("/v1/releases/edge/1.0.0/artifact").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "no artifact stored");
}

/// A stored policy the disk cannot read is a fault, not "no such policy":
/// creating a task with it, and reading it, answer 503 with Retry-After and
/// store nothing (before, the read error was taken for a missing file: the
/// task was refused with 422 "no such policy", the policy listed as 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_policy_the_disk_cannot_read_answers_503_not_no_such_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let h = crate::api::Harness::start(|c| c.data = data.clone()).await;
    h.put("/v1/nodes/n0", json!({"version": "1.0.0"})).await;
    h.release("edge", "1.1.0", b"v1.1").await;
    let res = upload_canary(&h, "mine").await;
    assert!(res.status().is_success(), "{}", res.status());

    // The stored script becomes something that cannot be read as a file
    // (a directory: reading it fails with EISDIR, as root ignores modes).
    let stored = data.join("policies/mine.rhai");
    std::fs::remove_file(&stored).unwrap();
    std::fs::create_dir(&stored).unwrap();

    let spec =
        json!({"name": "t-a", "package": "edge", "target": {"version": "1.1.0"}, "policy": "mine"});
    let res = h
        .http
        .post(h.url("/v1/tasks"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_fault(&res, "a task whose stored policy cannot be read");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap_or_default().contains("mine"),
        "{body}"
    );
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "nothing stored");

    let res = h.http.get(h.url("/v1/policies/mine")).send().await.unwrap();
    assert_fault(&res, "reading a stored policy the disk cannot read");

    // Back on the disk: the same call goes through.
    std::fs::remove_dir(&stored).unwrap();
    std::fs::write(
        &stored,
        std::fs::read(flotilla_tests::script("canary")).unwrap(),
    )
    .unwrap();
    let (s, t) = h.post("/v1/tasks", spec).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    h.stop().await;
}
