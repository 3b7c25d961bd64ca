//! The runner's HTTP API over real HTTP on loopback: every endpoint's happy
//! path and its bad-input paths, auth, and a webhook-triggered rollout end to
//! end against agents simulated in the test (speaking the real protocol).

use flotilla_model::protocol::{Enrolled, Work};
use flotilla_server::hooks::{HookConfig, sign};
use flotilla_server::{Config, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub(crate) const ENROLL: &str = "enroll-secret";

/// Serves `runner` on 127.0.0.1 (a free port) until the sender is used or
/// dropped: its base URL, the stop sender and the serving task. The one way
/// the in-process API tests start a runner.
pub(crate) async fn serve_on_loopback(
    runner: Runner,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        runner
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (base, tx, served)
}

pub(crate) struct Harness {
    base: String,
    pub(crate) http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub(crate) async fn start(tune: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data: dir.path().join("data"),
            tick_ms: 20,
            enroll_secret: Some(ENROLL.into()),
            ..Config::default()
        };
        tune(&mut config);
        let runner = Runner::open(config).unwrap();
        let (base, tx, served) = serve_on_loopback(runner).await;
        Harness {
            base,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stop: Some(tx),
            served: Some(served),
            _dir: dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(b) = body {
            req = req.body(b);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let bytes = res.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub(crate) async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send("GET", path, None, None).await
    }

    /// `/metrics` as text.
    pub(crate) async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        text.as_str()
            .expect("metrics are text, not JSON")
            .to_string()
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send("POST", path, Some(body.to_string().into_bytes()), None)
            .await
    }

    pub(crate) async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send("PUT", path, Some(body.to_string().into_bytes()), None)
            .await
    }

    /// A release with an uploaded artifact.
    pub(crate) async fn release(&self, package: &str, version: &str, bytes: &[u8]) {
        let (s, _) = self
            .post(
                "/v1/releases",
                json!({"package": package, "version": version}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, r) = self
            .send(
                "PUT",
                &format!("/v1/releases/{package}/{version}/artifact"),
                Some(bytes.to_vec()),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{r}");
    }

    pub(crate) async fn enroll(&self, node: &str, version: &str) -> String {
        let (s, body) = self
            .post(
                "/v1/agents/enroll",
                json!({"node_id": node, "secret": ENROLL, "version": version, "labels": [["tier", "edge"]]}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        serde_json::from_value::<Enrolled>(body).unwrap().token
    }

    pub(crate) async fn stop(mut self) {
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

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

fn spec(name: &str, policy: &str, version: &str) -> Value {
    json!({"name": name, "package": "edge", "target": {"version": version}, "policy": policy})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_releases_and_policies() {
    let h = Harness::start(|c| {
        c.max_body_bytes = 64 * 1024;
        c.max_upload_bytes = 4096;
    })
    .await;

    // ops
    let (s, body) = h.get("/healthz").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, Some("ok\n")));
    let (s, doc) = h.get("/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    for path in [
        "/v1/nodes",
        "/v1/releases/{package}/{version}/artifact",
        "/v1/policies/{name}",
        "/v1/tasks/{id}/events",
        "/v1/tasks/{id}/{action}",
        "/v1/hooks/{name}",
        "/v1/agents/{node}/report",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }

    // nodes
    let (s, n) = h
        .put(
            "/v1/nodes/n1",
            json!({"version": "1.2.0", "labels": [["region", "eu"]]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{n}");
    assert_eq!(n["id"], "n1");
    let (s, _) = h.put("/v1/nodes/n1", json!({"version": "1.2.1"})).await;
    assert_eq!(s, StatusCode::OK);
    h.put(
        "/v1/nodes/n2",
        json!({"version": "1.3.0", "labels": [["region", "us"]]}),
    )
    .await;
    let (s, n) = h.get("/v1/nodes/n1").await;
    assert_eq!((s, n["version"].as_str()), (StatusCode::OK, Some("1.2.1")));
    let (_, page) = h.get("/v1/nodes?label=region=us").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], "n2");
    let (_, page) = h.get("/v1/nodes?version=v1.2.1").await;
    assert_eq!(page["items"][0]["id"], "n1");
    // bad input changes nothing
    let (s, e) = h
        .send(
            "PUT",
            "/v1/nodes/n1",
            Some(b"{\"version\": ".to_vec()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert!(error_of(&e).contains("invalid JSON"), "{e}");
    let (s, e) = h.put("/v1/nodes/n1", json!({"id": "n9"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, e) = h.put("/v1/nodes/n1", json!({"version": "banana"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (_, n) = h.get("/v1/nodes/n1").await;
    assert_eq!(n["version"], "1.2.1", "a refused update changed the node");
    let (s, _) = h.get("/v1/nodes/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, e) = h.get("/v1/nodes?label=oops").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let big = json!({"version": "1.0.0", "labels": [["k", "x".repeat(100_000)]]});
    let (s, _) = h.put("/v1/nodes/n3", big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _) = h.get("/v1/nodes/n3").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // releases
    h.release("edge", "1.3.0", b"artifact bytes").await;
    let (_, list) = h.get("/v1/releases?package=edge").await;
    assert_eq!(list[0]["size"], 14);
    assert_eq!(list[0]["sha256"].as_str().unwrap().len(), 64);
    let (s, e) = h
        .post(
            "/v1/releases",
            json!({"package": "edge", "version": "v1.3"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, e) = h
        .post("/v1/releases", json!({"package": "edge", "version": "2.0.0", "url": "https://x/y", "sha256": "abc", "size": 3}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, e) = h
        .post(
            "/v1/releases",
            json!({"package": "edge", "version": "2.0.0", "url": "https://x/y"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(error_of(&e).contains("sha256"), "{e}");
    let (s, e) = h
        .post(
            "/v1/releases",
            json!({"package": "Edge!", "version": "2.0.0"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, e) = h
        .post(
            "/v1/releases",
            json!({"package": "edge", "version": "2.0.0", "colour": "red"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(error_of(&e).contains("colour"), "{e}");
    let (s, _) = h
        .send(
            "PUT",
            "/v1/releases/edge/9.9.9/artifact",
            Some(b"x".to_vec()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .send(
            "PUT",
            "/v1/releases/edge/1.3.0/artifact",
            Some(b"again".to_vec()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    h.post(
        "/v1/releases",
        json!({"package": "edge", "version": "1.4.0"}),
    )
    .await;
    let (s, _) = h
        .send(
            "PUT",
            "/v1/releases/edge/1.4.0/artifact",
            Some(vec![7u8; 5000]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (_, list) = h.get("/v1/releases?package=edge").await;
    let r14 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "1.4.0")
        .unwrap();
    assert_eq!(r14["sha256"], "", "a refused upload left a digest");
    let (s, _) = h.get("/v1/releases/edge/1.3.0/artifact").await;
    assert_eq!(
        s,
        StatusCode::OK,
        "no token configured: operators may download"
    );

    // policies
    let script = std::fs::read(flotilla_tests::script("canary")).unwrap();
    let (s, p) = h
        .send("PUT", "/v1/policies/my-canary", Some(script), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(p["kind"], "rhai");
    let (_, list) = h.get("/v1/policies").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"my-canary") && names.contains(&"canary"),
        "{names:?}"
    );
    let (s, e) = h
        .send(
            "PUT",
            "/v1/policies/broken",
            Some(b"fn plan(ctx, nodes) { [".to_vec()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, _) = h.get("/v1/policies/broken").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a broken policy was stored");
    let (s, e) = h
        .send(
            "PUT",
            "/v1/policies/bin",
            Some(vec![0, 159, 146, 150]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, c) = h
        .send(
            "POST",
            "/v1/policies/x/check",
            Some(b"fn evaluate(ctx, r) { #{ proceed: () } }".to_vec()),
            None,
        )
        .await;
    assert!(
        s == StatusCode::OK || s == StatusCode::UNPROCESSABLE_ENTITY,
        "{c}"
    );
    let (s, e) = h
        .send("PUT", "/v1/policies/Bad%20Name", Some(b"".to_vec()), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, _) = h
        .put("/v1/control-plane/cloudcore", json!({"version": "1.13.0"}))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .put("/v1/control-plane/cloudcore", json!({"version": "soon"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_lifecycle_and_bad_input() {
    let h = Harness::start(|_| {}).await;
    for i in 0..6 {
        h.put(&format!("/v1/nodes/n{i}"), json!({"version": "1.0.0"}))
            .await;
    }
    h.release("edge", "1.1.0", b"v1.1").await;

    // refused at creation, nothing stored
    let (s, e) = h
        .post("/v1/tasks", spec("t-a", "no-such-policy", "1.1.0"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(error_of(&e).contains("no such policy"), "{e}");
    let (s, e) = h.post("/v1/tasks", spec("t-a", "canary", "9.0.0")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(
        e["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("release add"),
        "{e}"
    );
    let (s, e) = h
        .post("/v1/tasks", spec("Not_A_Name", "canary", "1.1.0"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let mut extra = spec("t-a", "canary", "1.1.0");
    extra["concurrencyy"] = 3.into();
    let (s, e) = h.post("/v1/tasks", extra).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(error_of(&e).contains("concurrencyy"), "{e}");
    let (s, e) = h
        .send("POST", "/v1/tasks", Some(b"{not json".to_vec()), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "a refused task was stored"
    );

    // dry run: the plan, nothing stored
    let mut s1 = spec("t-a", "canary", "1.1.0");
    s1["params"] = json!({"approval": true});
    let (s, plan) = h.post("/v1/tasks?dry_run=true", s1.clone()).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["dry_run"], true);
    let sizes: Vec<usize> = plan["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["nodes"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 6, "{plan}");
    assert_eq!(sizes[0], 1, "canary wave first: {plan}");
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(list.as_array().unwrap().len(), 0, "a dry run was stored");
    // A pull task's dry run has the online devices ask (issue 17.6): it
    // ends, instead of "would end running".
    let mut pull = spec("t-pull", "canary", "1.1.0");
    pull["method"] = json!("pull");
    let (s, plan) = h.post("/v1/tasks?dry_run=true", pull).await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["final_state"]["state"], "succeeded", "{plan}");

    // create, then operate
    let (s, t) = h.post("/v1/tasks", s1).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    // the engine starts it and offers the canary node
    let deadline = Instant::now() + Duration::from_secs(10);
    let task = loop {
        let (_, t) = h.get(&format!("/v1/tasks/{id}")).await;
        if t["counts"]["offered"] == 1 {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the canary was never offered: {t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        task["state"]["state"].as_str().or(task["state"].as_str()),
        Some("running"),
        "{task}"
    );
    let (_, runs) = h.get(&format!("/v1/tasks/{id}/runs?state=offered")).await;
    assert_eq!(runs["total"], 1);
    // The list counts the stored plan's waves without the node ids.
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    assert_eq!(
        list[0]["waves"],
        task["waves"].as_array().unwrap().len(),
        "{list}"
    );
    assert_eq!(list[0]["waves"], sizes.len(), "{list}");
    // the live task's runs in the metrics (counted by the engine)
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"flotilla_node_runs{state="offered"} 1"#),
        "{metrics}"
    );
    let counted: i64 = metrics
        .lines()
        .filter(|l| l.starts_with("flotilla_node_runs{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(counted, 6, "{metrics}");
    let (s, e) = h.get(&format!("/v1/tasks/{id}/runs?bogus=1")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");

    let (s, t) = h
        .post(&format!("/v1/tasks/{id}/pause"), json!({"reason": "lunch"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert!(t.to_string().contains("lunch"), "{t}");
    let (s, e) = h.post(&format!("/v1/tasks/{id}/promote"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, _) = h
        .send("POST", &format!("/v1/tasks/{id}/resume"), None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = h.post(&format!("/v1/tasks/{id}/explode"), json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    let (s, e) = h.post("/v1/tasks/t999999/pause", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    let (s, t) = h.post(&format!("/v1/tasks/{id}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let (s, e) = h.post(&format!("/v1/tasks/{id}/resume"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, e) = h.post(&format!("/v1/tasks/{id}/rollback"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (_, list) = h.get("/v1/tasks?state=cancelled").await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    // events, paged
    let (_, page1) = h.get(&format!("/v1/tasks/{id}/events?limit=3")).await;
    assert_eq!(page1["events"].as_array().unwrap().len(), 3);
    assert_eq!(page1["more"], true);
    let next = page1["next"].as_u64().unwrap();
    let (_, page2) = h
        .get(&format!("/v1/tasks/{id}/events?from={next}&limit=1000"))
        .await;
    let all: Vec<&Value> = page1["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["events"].as_array().unwrap())
        .collect();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"], i as u64, "events are contiguous across pages");
    }
    assert!(all.iter().any(|e| e["kind"] == "task.cancelled"));
    let (s, _) = h.get("/v1/tasks/nope/events").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_management_and_agents() {
    let h = Harness::start(|c| c.token = Some("mgmt".into())).await;
    let (s, _) = h.get("/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = h.get("/v1/tasks").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, _) = h.send("GET", "/v1/tasks", None, Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h.send("GET", "/v1/tasks", None, Some("mgmt")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .send("PUT", "/v1/nodes/x", Some(b"{}".to_vec()), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // agents: enrollment secret, then a token per node
    let (s, e) = h
        .post(
            "/v1/agents/enroll",
            json!({"node_id": "a1", "secret": "guess"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, _) = h.send("GET", "/v1/nodes/a1", None, Some("mgmt")).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a refused enrollment registered the node"
    );
    let t1 = h.enroll("a1", "1.0.0").await;
    let t2 = h.enroll("a2", "1.0.0").await;
    let hb = json!({"version": "1.0.1"}).to_string().into_bytes();
    let (s, _) = h
        .send(
            "POST",
            "/v1/agents/a1/heartbeat",
            Some(hb.clone()),
            Some(&t1),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, e) = h
        .send(
            "POST",
            "/v1/agents/a1/heartbeat",
            Some(hb.clone()),
            Some(&t2),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (s, _) = h
        .send("POST", "/v1/agents/a1/heartbeat", Some(hb.clone()), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .send("POST", "/v1/agents/a1/heartbeat", Some(hb), Some("mgmt"))
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the management token is not a node token"
    );
    let (_, n) = h.send("GET", "/v1/nodes/a1", None, Some("mgmt")).await;
    assert_eq!(n["version"], "1.0.1");
    // metrics: bad ones are refused whole, and the node is left as it was
    for (bad, why) in [
        (
            json!({"version": "9.9.9", "metrics": {"Load": 1.0}}),
            "name \"Load\"",
        ),
        (
            json!({"version": "9.9.9", "metrics": {"load1": "high"}}),
            "metrics.load1",
        ),
        (
            json!({"version": "9.9.9", "metrics": (0..65).map(|i| (format!("m{i}"), json!(1.0))).collect::<serde_json::Map<_, _>>()}),
            "at most 64",
        ),
    ] {
        let (s, e) = h
            .send(
                "POST",
                "/v1/agents/a1/heartbeat",
                Some(bad.to_string().into_bytes()),
                Some(&t1),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
        assert!(e["error"].as_str().unwrap().contains(why), "{bad}: {e}");
    }
    let (_, n) = h.send("GET", "/v1/nodes/a1", None, Some("mgmt")).await;
    assert_eq!(
        n["version"], "1.0.1",
        "a refused heartbeat changed the node"
    );
    let good = json!({"version": "1.0.1", "metrics": {"load1": 0.5, "mem_available_ratio": 0.8}});
    let (s, e) = h
        .send(
            "POST",
            "/v1/agents/a1/heartbeat",
            Some(good.to_string().into_bytes()),
            Some(&t1),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{e}");
    // a report for a node in no task, and malformed reports
    let r = json!({"task": "t000001", "state": "succeeded"})
        .to_string()
        .into_bytes();
    let (s, e) = h
        .send("POST", "/v1/agents/a1/report", Some(r), Some(&t1))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let bad = json!({"task": "t1", "state": "done"})
        .to_string()
        .into_bytes();
    let (s, e) = h
        .send("POST", "/v1/agents/a1/report", Some(bad), Some(&t1))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, _) = h
        .send("GET", "/v1/agents/a1/work?wait=0", None, Some(&t1))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // artifacts: a node token or the management token
    let (s, _) = h.get("/v1/releases/edge/1.0.0/artifact").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    h.stop().await;

    // no token on a public address is refused
    let refused = Runner::open(Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        data: tempfile::tempdir().unwrap().path().join("d"),
        ..Config::default()
    });
    let err = refused.err().expect("refused").to_string();
    assert!(err.contains("without a management token"), "{err}");
}

/// Simulated agents: take pushed work, report each step, succeed.
async fn agents_until_done(
    h: &Harness,
    tokens: &[(String, String)],
    task: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        for (node, token) in tokens {
            let res = h
                .http
                .get(h.url(&format!("/v1/agents/{node}/work?wait=0")))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            if res.status() != StatusCode::OK {
                continue;
            }
            let work: Work = res.json().await.unwrap();
            let Work::Install {
                task: t,
                version,
                artifact,
                ..
            } = work
            else {
                panic!("unexpected {work:?}");
            };
            // The artifact is there and matches its digest.
            let url = h.url(&artifact.url);
            let bytes = h
                .http
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(bytes.len() as u64, artifact.size);
            for state in ["downloading", "upgrading", "verifying", "succeeded"] {
                let (s, e) = h
                    .send(
                        "POST",
                        &format!("/v1/agents/{node}/report"),
                        Some(json!({"task": t, "state": state}).to_string().into_bytes()),
                        Some(token),
                    )
                    .await;
                assert_eq!(s, StatusCode::NO_CONTENT, "{node} {state}: {e}");
            }
            let hb = json!({"version": version}).to_string().into_bytes();
            h.send(
                "POST",
                &format!("/v1/agents/{node}/heartbeat"),
                Some(hb),
                Some(token),
            )
            .await;
        }
        let (_, t) = h.get(&format!("/v1/tasks/{task}")).await;
        let state = t["state"]["state"]
            .as_str()
            .or(t["state"].as_str())
            .unwrap_or("")
            .to_string();
        if !matches!(state.as_str(), "scheduled" | "running") {
            return t;
        }
        assert!(Instant::now() < deadline, "task did not finish: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_release_webhook_starts_a_rollout() {
    let hook: HookConfig = toml::from_str(
        r#"
        name = "github-release"
        secret = "hook-secret"
        when = { "/action" = "published" }
        fields = { version = "/release/tag_name" }
        task = { package = "edge", policy = "canary", concurrency = 4 }
        "#,
    )
    .unwrap();
    let h = Harness::start(|c| c.hooks = vec![hook]).await;
    let mut tokens = Vec::new();
    for i in 0..10 {
        let node = format!("edge-{i:02}");
        let t = h.enroll(&node, "1.3.0").await;
        tokens.push((node, t));
    }
    h.release("edge", "1.4.0", &[42u8; 1000]).await;

    let payload = json!({"action": "published", "release": {"tag_name": "v1.4.0"}}).to_string();
    let post = |body: String, sig: Option<String>, delivery: &str| {
        let mut req = h
            .http
            .post(h.url("/v1/hooks/github-release"))
            .header("X-GitHub-Delivery", delivery)
            .body(body);
        if let Some(s) = sig {
            req = req.header("X-Hub-Signature-256", s);
        }
        req.send()
    };
    // unsigned and badly signed: 401, no task
    let r = post(payload.clone(), None, "d-1").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = post(
        payload.clone(),
        Some(sign(b"wrong", payload.as_bytes())),
        "d-1",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    // a mapped field missing: 422 naming it
    let partial = json!({"action": "published", "release": {}}).to_string();
    let r = post(
        partial.clone(),
        Some(sign(b"hook-secret", partial.as_bytes())),
        "d-2",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert!(error_of(&e).contains("release.tag_name"), "{e}");
    // another kind of event: acknowledged, ignored
    let created = json!({"action": "created", "release": {"tag_name": "v1.4.0"}}).to_string();
    let r = post(
        created.clone(),
        Some(sign(b"hook-secret", created.as_bytes())),
        "d-3",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // signed: a task; the same delivery again: the same task
    let r = post(
        payload.clone(),
        Some(sign(b"hook-secret", payload.as_bytes())),
        "d-4",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let task: Value = r.json().await.unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    assert_eq!(task["spec"]["name"], "github-release-v1-4-0");
    for _ in 0..2 {
        let r = post(
            payload.clone(),
            Some(sign(b"hook-secret", payload.as_bytes())),
            "d-4",
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let again: Value = r.json().await.unwrap();
        assert_eq!(again["task"], id.as_str());
    }
    let (_, list) = h.get("/v1/tasks").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "a redelivery created a second task"
    );
    let (s, _) = h.post("/v1/hooks/nope", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let done = agents_until_done(&h, &tokens, &id, Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["succeeded"], 10, "{done}");
    let (_, nodes) = h.get("/v1/nodes?version=1.4.0").await;
    assert_eq!(nodes["total"], 10);

    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"flotilla_tasks{state="succeeded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"flotilla_webhook_deliveries_total{hook="github-release",outcome="unauthorized"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_policy_call_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_agent_reports_total 40"),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_hands_out_open_work_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let open =
        |data: std::path::PathBuf| async move { Harness::start(move |c| c.data = data).await };
    let h = open(data.clone()).await;
    let token = h.enroll("n1", "1.0.0").await;
    h.release("edge", "2.0.0", b"two").await;
    let (s, t) = h.post("/v1/tasks", spec("up", "canary", "2.0.0")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let res = h
        .http
        .get(h.url("/v1/agents/n1/work?wait=10"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let first: Work = res.json().await.unwrap();
    h.stop().await;

    let h = open(data).await;
    let res = h
        .http
        .get(h.url("/v1/agents/n1/work?wait=0"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the token and the open work survive a restart"
    );
    let again: Work = res.json().await.unwrap();
    assert_eq!(again, first);
    h.stop().await;
}

/// `examples/github-release/`: the shipped config and payload start a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_github_release_example_starts_a_rollout() {
    let dir = flotilla_tests::workspace().join("examples/github-release");
    let example = Config::from_file(&dir.join("runner.toml")).unwrap();
    example.check().unwrap();
    let h = Harness::start(|c| c.hooks = example.hooks.clone()).await;
    // No release is added first (issue 17.9): the delivery registers it.
    let payload = std::fs::read(dir.join("payload.json")).unwrap();
    let send = || {
        h.http
            .post(h.url("/v1/hooks/github-release"))
            .header("X-GitHub-Event", "release")
            .header("X-GitHub-Delivery", "example-1")
            .header("X-Hub-Signature-256", sign(b"change-me", &payload))
            .body(payload.clone())
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let task: Value = r.json().await.unwrap();
    assert_eq!(task["spec"]["name"], "github-release-v1-4-0");
    assert_eq!(task["spec"]["package"], "edge-agent");
    assert_eq!(task["spec"]["policy"], "canary");
    assert_eq!(task["spec"]["params"]["threshold"], 0.1);
    let (s, rel) = h.get("/v1/releases?package=edge-agent").await;
    assert_eq!(s, StatusCode::OK, "{rel}");
    assert_eq!(rel.as_array().unwrap().len(), 1, "{rel}");
    assert_eq!(rel[0]["version"], "1.4.0");
    assert_eq!(
        rel[0]["url"],
        "https://github.com/example/edge-agent/releases/download/v1.4.0/edge-agent-1.4.0-linux-amd64.tar.gz"
    );
    assert_eq!(
        rel[0]["sha256"],
        "9f2c1b7e4c0a5d3e8f6a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6"
    );
    assert_eq!(rel[0]["size"], 5242880);
    let r = send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "GitHub redelivers: the same task"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_marked_offline_and_back_online_by_its_next_heartbeat() {
    let h = Harness::start(|c| c.offline_after_seconds = 1).await;
    let token = h.enroll("quiet", "1.0.0").await;
    let beat = || async {
        let (s, e) = h
            .send(
                "POST",
                "/v1/agents/quiet/heartbeat",
                Some(json!({"version": "1.0.0"}).to_string().into_bytes()),
                Some(&token),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{e}");
    };
    beat().await;
    let online = || async {
        let (_, n) = h.send("GET", "/v1/nodes/quiet", None, Some("mgmt")).await;
        n["online"].as_bool().unwrap()
    };
    assert!(online().await);
    // The sweep runs every half of `offline_after`; give it a few rounds.
    let mut offline = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if !online().await {
            offline = true;
            break;
        }
    }
    assert!(offline, "silent for 4 s with offline_after_seconds = 1");
    beat().await;
    assert!(online().await, "a heartbeat brings the node back");
    h.stop().await;
}

/// Many agents report at once (several batches in the engine and the
/// flusher at a time): every report is answered 204, a report with another
/// node's token is refused and changes nothing, and what was acknowledged
/// is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reports_are_all_applied_and_survive_a_restart() {
    const NODES: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let open =
        |data: std::path::PathBuf| async move { Harness::start(move |c| c.data = data).await };
    let h = open(data.clone()).await;
    let mut tokens = Vec::new();
    for i in 0..NODES {
        let node = format!("n{i:02}");
        let token = h.enroll(&node, "1.0.0").await;
        tokens.push((node, token));
    }
    h.release("edge", "2.0.0", b"two").await;
    let (s, p) = h
        .send(
            "PUT",
            "/v1/policies/everyone",
            Some(b"// every hook at its default: one wave of every node\n".to_vec()),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let (s, t) = h.post("/v1/tasks", spec("all", "everyone", "2.0.0")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, t) = h.get(&format!("/v1/tasks/{id}")).await;
        if t["counts"]["offered"].as_u64() == Some(NODES as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "not every node offered: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (http, base, task) = (h.http.clone(), h.base.clone(), id.clone());
    let report = move |node: String, token: String, state: &'static str| {
        let http = http.clone();
        let url = format!("{base}/v1/agents/{node}/report");
        let body = json!({"task": task, "state": state}).to_string();
        async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            (node, state, res.status())
        }
    };
    // Another node's token: refused, and n00 stays offered until its own
    // reports come.
    let (_, _, s) = report("n00".into(), tokens[1].1.clone(), "downloading").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, run) = h.get(&format!("/v1/tasks/{id}/runs?state=offered")).await;
    assert_eq!(run["total"].as_u64(), Some(NODES as u64), "{run}");

    let mut agents = tokio::task::JoinSet::new();
    for (node, token) in tokens.clone() {
        let report = report.clone();
        agents.spawn(async move {
            let mut out = Vec::new();
            for state in ["downloading", "upgrading", "verifying", "succeeded"] {
                out.push(report(node.clone(), token.clone(), state).await);
            }
            out
        });
    }
    let mut answered = 0;
    while let Some(out) = agents.join_next().await {
        for (node, state, status) in out.unwrap() {
            assert_eq!(status, StatusCode::NO_CONTENT, "{node} {state}");
            answered += 1;
        }
    }
    assert_eq!(answered, NODES * 4);
    h.stop().await;

    let h = open(data).await;
    let (_, t) = h.get(&format!("/v1/tasks/{id}")).await;
    assert_eq!(
        t["counts"]["succeeded"].as_u64(),
        Some(NODES as u64),
        "{}",
        t["counts"]
    );
    h.stop().await;
}
