//! Issue 13, points 2-4, over real HTTP on loopback with an in-process
//! runner: a signed webhook body starts at most one task and never a silent
//! downgrade; a second active task for the same package and target is
//! refused; an enrolled node id cannot be taken over (operator-allowed
//! re-enrollment and one-time node tokens instead); backup locations and
//! policy names cannot leave their directories.

use crate::api::serve_on_loopback;
use flotilla_client::Client;
use flotilla_model::protocol::{Enrolled, Work};
use flotilla_server::hooks::{HookConfig, sign};
use flotilla_server::{Config, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ENROLL: &str = "enroll-secret";
const MGMT: &str = "mgmt-token";
const HOOK_SECRET: &[u8] = b"hook-secret";

struct Harness {
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// A runner on `data` (kept by the caller, so a second harness on the
    /// same directory is a restart).
    async fn start(data: &Path, tune: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config {
            data: data.to_path_buf(),
            tick_ms: 20,
            token: Some(MGMT.into()),
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
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the management token unless `token` says otherwise
    /// (`Some("")`: none at all).
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        match token.unwrap_or(MGMT) {
            "" => {}
            t => req = req.bearer_auth(t),
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let bytes = res.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send("GET", path, None, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send("POST", path, Some(body), None).await
    }

    async fn release(&self, version: &str) {
        let (s, r) = self
            .post(
                "/v1/releases",
                json!({"package": "edge", "version": version}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        let res = self
            .http
            .put(self.url(&format!("/v1/releases/edge/{version}/artifact")))
            .bearer_auth(MGMT)
            .body(format!("edge {version}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    /// `everyone`: every hook at its default, one wave of every node.
    async fn everyone_policy(&self) {
        let res = self
            .http
            .put(self.url("/v1/policies/everyone"))
            .bearer_auth(MGMT)
            .body("// one wave of every node\n")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }

    /// Enrolls with `secret` and, when given, the node's current token.
    async fn enroll_as(
        &self,
        node: &str,
        secret: &str,
        bearer: Option<&str>,
        tier: &str,
    ) -> (StatusCode, Value) {
        let body = json!({
            "node_id": node, "secret": secret, "version": "1.0.0",
            "labels": [["tier", tier]],
        });
        self.send(
            "POST",
            "/v1/agents/enroll",
            Some(body),
            Some(bearer.unwrap_or("")),
        )
        .await
    }

    async fn enroll(&self, node: &str, version: &str) -> String {
        let body = json!({"node_id": node, "secret": ENROLL, "version": version});
        let (s, body) = self
            .send("POST", "/v1/agents/enroll", Some(body), Some(""))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        serde_json::from_value::<Enrolled>(body).unwrap().token
    }

    async fn heartbeat(&self, node: &str, token: &str) -> StatusCode {
        let (s, _) = self
            .send(
                "POST",
                &format!("/v1/agents/{node}/heartbeat"),
                Some(json!({"version": "1.0.0"})),
                Some(token),
            )
            .await;
        s
    }

    /// Posts `body` to the hook, signed, with a delivery id when given.
    async fn deliver(&self, body: &str, delivery: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(self.url("/v1/hooks/gh"))
            .header("X-Hub-Signature-256", sign(HOOK_SECRET, body.as_bytes()))
            .body(body.to_string());
        if let Some(d) = delivery {
            req = req.header("X-GitHub-Delivery", d);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn tasks(&self) -> Vec<Value> {
        let (s, list) = self.get("/v1/tasks").await;
        assert_eq!(s, StatusCode::OK, "{list}");
        list.as_array().unwrap().clone()
    }

    /// Each node's version, without a leading `v`.
    async fn versions(&self) -> BTreeMap<String, String> {
        let (_, page) = self.get("/v1/nodes").await;
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                // A hook's target is the tag as released (`v1.4.0`).
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["version"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches('v')
                        .to_string(),
                )
            })
            .collect()
    }

    async fn stop(mut self) {
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

fn error_of(v: &Value) -> String {
    format!(
        "{} {}",
        v["error"].as_str().unwrap_or_default(),
        v["hint"].as_str().unwrap_or_default()
    )
}

fn hook(extra: &str) -> HookConfig {
    toml::from_str(&format!(
        r#"
        name = "gh"
        secret = "hook-secret"
        when = {{ "/action" = "published" }}
        fields = {{ version = "/release/tag_name" }}
        task = {{ package = "edge", policy = "everyone" }}
        {extra}
        "#
    ))
    .unwrap()
}

fn release_payload(tag: &str) -> String {
    json!({"action": "published", "release": {"tag_name": tag}}).to_string()
}

fn api_spec(name: &str, version: &str) -> Value {
    json!({"name": name, "package": "edge", "target": {"version": version}, "policy": "everyone"})
}

fn state_of(task: &Value) -> String {
    task["state"]["state"]
        .as_str()
        .or(task["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Agents that take pushed work, report every step, succeed, and heartbeat
/// the version they installed; until `task` ends.
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
            let Work::Install {
                task: t, version, ..
            } = res.json().await.unwrap()
            else {
                panic!("only installs are expected here");
            };
            for state in ["downloading", "upgrading", "verifying", "succeeded"] {
                let (s, e) = h
                    .send(
                        "POST",
                        &format!("/v1/agents/{node}/report"),
                        Some(json!({"task": t, "state": state})),
                        Some(token),
                    )
                    .await;
                assert_eq!(s, StatusCode::NO_CONTENT, "{node} {state}: {e}");
            }
            let (s, _) = h
                .send(
                    "POST",
                    &format!("/v1/agents/{node}/heartbeat"),
                    Some(json!({"version": version})),
                    Some(token),
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT);
        }
        let (_, t) = h.get(&format!("/v1/tasks/{task}")).await;
        if !matches!(state_of(&t).as_str(), "scheduled" | "running") {
            return t;
        }
        assert!(Instant::now() < deadline, "task did not finish: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn enroll_fleet(h: &Harness, ids: &[&str], version: &str) -> Vec<(String, String)> {
    let mut tokens = Vec::new();
    for id in ids {
        tokens.push((id.to_string(), h.enroll(id, version).await));
    }
    tokens
}

// ----- point 2: webhook replay -----

/// 500 deliveries of one signed body, each with a new delivery id (every
/// tenth with none), 25 at a time: one task, every other answer 200 naming
/// it; after a restart the body is still known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signed_body_starts_one_task_whatever_its_delivery_ids() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let h = Harness::start(&data, |c| c.hooks = vec![hook("")]).await;
    h.everyone_policy().await;
    enroll_fleet(&h, &["e1", "e2", "e3"], "1.3.0").await;
    h.release("1.4.0").await;
    let body = release_payload("v1.4.0");

    let mut answers: BTreeMap<u16, usize> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for round in 0..20 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..25 {
            let n = round * 25 + i;
            let (http, url, body) = (h.http.clone(), h.url("/v1/hooks/gh"), body.clone());
            batch.spawn(async move {
                let mut req = http
                    .post(url)
                    .header("X-Hub-Signature-256", sign(HOOK_SECRET, body.as_bytes()))
                    .body(body);
                if n % 10 != 0 {
                    req = req.header("X-GitHub-Delivery", format!("delivery-{n}"));
                }
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                let v: Value = res.json().await.unwrap();
                (status, v)
            });
        }
        while let Some(r) = batch.join_next().await {
            let (status, v) = r.unwrap();
            *answers.entry(status).or_default() += 1;
            match status {
                201 => named.insert(v["id"].as_str().unwrap().to_string()),
                200 => {
                    assert_eq!(v["duplicate"], true, "{v}");
                    named.insert(v["task"].as_str().unwrap().to_string())
                }
                _ => panic!("{status}: {v}"),
            };
        }
    }
    assert_eq!(answers, BTreeMap::from([(200, 499), (201, 1)]));
    assert_eq!(named.len(), 1, "every answer names the one task: {named:?}");
    assert_eq!(
        h.tasks().await.len(),
        1,
        "500 deliveries made more than one task"
    );
    let task = named.into_iter().next().unwrap();
    h.stop().await;

    // The digest is stored with the deliveries: a restart keeps it.
    let h = Harness::start(&data, |c| c.hooks = vec![hook("")]).await;
    for delivery in [Some("after-restart"), None] {
        let (s, v) = h.deliver(&body, delivery).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            (v["task"].as_str(), &v["duplicate"]),
            (Some(&*task), &json!(true))
        );
    }
    assert_eq!(h.tasks().await.len(), 1);
    h.stop().await;
}

/// The fleet moves 1.3.0 → 1.4.0 (webhook) → 1.5.0 (API). The captured
/// 1.4.0 delivery replayed (new id, no id) is a duplicate; a freshly signed
/// 1.4.0 body is refused because every node runs newer; a node still on
/// 1.3.0 is upgraded by such a task while the newer ones are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_release_never_rolls_the_fleet_back() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |c| c.hooks = vec![hook("")]).await;
    h.everyone_policy().await;
    let tokens = enroll_fleet(&h, &["e1", "e2", "e3"], "1.3.0").await;
    h.release("1.4.0").await;
    h.release("1.5.0").await;

    let captured = release_payload("v1.4.0");
    let (s, t) = h.deliver(&captured, Some("d-1")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let first = t["id"].as_str().unwrap().to_string();
    let done = agents_until_done(&h, &tokens, &first, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
    let (s, t) = h.post("/v1/tasks", api_spec("to-1-5", "1.5.0")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let done = agents_until_done(
        &h,
        &tokens,
        t["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");

    // The captured bytes, replayed: the first task, nothing new.
    for delivery in [Some("d-replayed"), None] {
        let (s, v) = h.deliver(&captured, delivery).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["task"], first.as_str(), "{v}");
    }
    // Signed anew (a new body): refused, every node runs newer than 1.4.0.
    let resigned =
        json!({"action": "published", "release": {"tag_name": "v1.4.0", "id": 2}}).to_string();
    let (s, e) = h.deliver(&resigned, Some("d-2")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains("downgrade"), "{e}");
    assert_eq!(h.tasks().await.len(), 2, "a refused delivery made a task");

    // A node that is still behind: the task upgrades it and skips the rest.
    let mut tokens = tokens;
    tokens.push(("late".into(), h.enroll("late", "1.3.0").await));
    let mixed =
        json!({"action": "published", "release": {"tag_name": "v1.4.0", "id": 3}}).to_string();
    let (s, t) = h.deliver(&mixed, Some("d-3")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let done = agents_until_done(&h, &tokens, &id, Duration::from_secs(30)).await;
    assert_eq!(
        (&done["counts"]["succeeded"], &done["counts"]["skipped"]),
        (&json!(1), &json!(3)),
        "{done}"
    );
    let (_, runs) = h.get(&format!("/v1/tasks/{id}/runs?state=skipped")).await;
    for r in runs["items"].as_array().unwrap() {
        assert!(
            r.to_string().contains("newer-than-target"),
            "a newer node skipped for another reason: {r}"
        );
    }
    let versions = h.versions().await;
    for node in ["e1", "e2", "e3"] {
        assert_eq!(
            versions[node], "1.5.0",
            "{node} was rolled back: {versions:?}"
        );
    }
    assert_eq!(versions["late"], "1.4.0");
    h.stop().await;
}

/// Downgrade stays a feature: an API task that says `downgrade: true` takes
/// the fleet back; without it the same task is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_task_with_downgrade_true_still_downgrades() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |_| {}).await;
    h.everyone_policy().await;
    let tokens = enroll_fleet(&h, &["e1", "e2"], "1.5.0").await;
    h.release("1.4.0").await;
    let (s, e) = h.post("/v1/tasks", api_spec("back", "1.4.0")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains("downgrade: true"), "{e}");
    assert!(h.tasks().await.is_empty());

    let mut spec = api_spec("back", "1.4.0");
    spec["downgrade"] = true.into();
    let (s, t) = h.post("/v1/tasks", spec).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["spec"]["downgrade"], true, "{t}");
    let done = agents_until_done(
        &h,
        &tokens,
        t["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    let versions = h.versions().await;
    assert!(versions.values().all(|v| v == "1.4.0"), "{versions:?}");
    h.stop().await;
}

/// A hook may start a downgrade only when its config says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_downgrades_only_when_its_config_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = hook("");
    refused.task.insert("downgrade".into(), true.into());
    let err = Runner::open(Config {
        data: dir.path().join("refused"),
        hooks: vec![refused],
        ..Config::default()
    })
    .err()
    .expect("a hook that downgrades without allow_downgrade is a config error")
    .to_string();
    assert!(err.contains("allow_downgrade"), "{err}");

    let mut allowed = hook("allow_downgrade = true");
    allowed.task.insert("downgrade".into(), true.into());
    let h = Harness::start(&dir.path().join("data"), |c| c.hooks = vec![allowed]).await;
    h.everyone_policy().await;
    let tokens = enroll_fleet(&h, &["e1"], "1.5.0").await;
    h.release("1.4.0").await;
    let (s, t) = h.deliver(&release_payload("v1.4.0"), Some("d-1")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let done = agents_until_done(
        &h,
        &tokens,
        t["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert_eq!(h.versions().await["e1"], "1.4.0");
    h.stop().await;
}

/// One active task per package and target: the second is refused naming
/// the first, through the API and a hook, also when 20 race; once the first
/// ended, a new one is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_active_task_for_the_same_package_and_target_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |c| c.hooks = vec![hook("")]).await;
    h.everyone_policy().await;
    enroll_fleet(&h, &["e1", "e2"], "1.3.0").await;
    h.release("1.4.0").await;
    h.release("1.4.1").await;

    let mut racing = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (http, url) = (h.http.clone(), h.url("/v1/tasks"));
        racing.spawn(async move {
            let res = http
                .post(url)
                .bearer_auth(MGMT)
                .body(api_spec(&format!("race-{i}"), "1.4.0").to_string())
                .send()
                .await
                .unwrap();
            (res.status(), res.json::<Value>().await.unwrap())
        });
    }
    let mut created = Vec::new();
    let mut refused = Vec::new();
    while let Some(r) = racing.join_next().await {
        let (s, v) = r.unwrap();
        match s {
            StatusCode::CREATED => created.push(v["id"].as_str().unwrap().to_string()),
            StatusCode::CONFLICT => refused.push(v),
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(created.len(), 1, "racing creates: {created:?}");
    let first = &created[0];
    for e in &refused {
        assert!(error_of(e).contains(first.as_str()), "{e}");
    }
    let (s, e) = h.post("/v1/tasks", api_spec("again", "v1.4")).await;
    assert_eq!(s, StatusCode::CONFLICT, "`v1.4` is the same target: {e}");
    let (s, e) = h.deliver(&release_payload("v1.4.0"), Some("d-1")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains(first.as_str()), "{e}");
    // Another target of the same package is another task.
    let (s, t) = h.post("/v1/tasks", api_spec("patch", "1.4.1")).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(h.tasks().await.len(), 2);

    let (s, t) = h
        .post(&format!("/v1/tasks/{first}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let (s, t) = h.deliver(&release_payload("v1.4.0"), Some("d-1")).await;
    assert_eq!(s, StatusCode::CREATED, "once the first ended: {t}");
    h.stop().await;
}

// ----- point 3: enrollment takeover -----

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits (bounded) until the runner's clock passed `at` (Unix ms).
async fn until_past(at: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while now_ms() <= at {
        assert!(Instant::now() < deadline, "the clock did not reach {at}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn labels_of(h: &Harness, node: &str) -> Value {
    let (s, n) = h.get(&format!("/v1/nodes/{node}")).await;
    assert_eq!(s, StatusCode::OK, "{n}");
    n["labels"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_node_id_cannot_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |_| {}).await;
    let (s, v) = h.enroll_as("n1", ENROLL, None, "edge").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t1 = v["token"].as_str().unwrap().to_string();

    // The shared secret alone: 409, the real node's token and labels stay.
    let (s, e) = h.enroll_as("n1", ENROLL, None, "evil").await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains("flotilla node reenroll n1"), "{e}");
    let (s, e) = h
        .enroll_as("n1", ENROLL, Some("fln_not-the-token"), "evil")
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(h.heartbeat("n1", &t1).await, StatusCode::NO_CONTENT);
    assert_eq!(labels_of(&h, "n1").await, json!([["tier", "edge"]]));

    // The node itself (its current token): a new token, the old one is gone.
    let (s, v) = h.enroll_as("n1", ENROLL, Some(&t1), "edge-2").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t2 = v["token"].as_str().unwrap().to_string();
    assert_eq!(h.heartbeat("n1", &t2).await, StatusCode::NO_CONTENT);
    assert_eq!(h.heartbeat("n1", &t1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(labels_of(&h, "n1").await, json!([["tier", "edge-2"]]));
    // ... and still the secret first.
    let (s, e) = h.enroll_as("n1", "guess", Some(&t2), "edge").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");

    // An operator allows it once.
    let (s, e) = h
        .send("POST", "/v1/nodes/n1/reenroll", Some(json!({})), Some(""))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "operators only: {e}");
    let (s, a) = h
        .post("/v1/nodes/n1/reenroll", json!({"expires_seconds": 3600}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert!(a["expires_at"].as_u64().unwrap() > now_ms());
    let (s, v) = h.enroll_as("n1", ENROLL, None, "rebuilt").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t3 = v["token"].as_str().unwrap().to_string();
    assert_eq!(h.heartbeat("n1", &t2).await, StatusCode::UNAUTHORIZED);
    assert_eq!(h.heartbeat("n1", &t3).await, StatusCode::NO_CONTENT);
    let (s, e) = h.enroll_as("n1", ENROLL, None, "evil").await;
    assert_eq!(s, StatusCode::CONFLICT, "the allowance is used up: {e}");
    assert_eq!(labels_of(&h, "n1").await, json!([["tier", "rebuilt"]]));

    // An allowance that expired is no allowance.
    let (s, a) = h
        .post("/v1/nodes/n1/reenroll", json!({"expires_seconds": 1}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    until_past(a["expires_at"].as_u64().unwrap()).await;
    let (s, e) = h.enroll_as("n1", ENROLL, None, "evil").await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert!(error_of(&e).contains("expired"), "{e}");
    assert_eq!(h.heartbeat("n1", &t3).await, StatusCode::NO_CONTENT);

    // Bad requests change nothing.
    for (path, body, want) in [
        ("/v1/nodes/ghost/reenroll", json!({}), StatusCode::NOT_FOUND),
        (
            "/v1/nodes/n1/reenroll",
            json!({"expires_seconds": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/nodes/n1/reenroll",
            json!({"expires_seconds": 400 * 86_400}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/nodes/n1/reenroll",
            json!({"expires": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (s, e) = h.post(path, body.clone()).await;
        assert_eq!(s, want, "{path} {body}: {e}");
    }
    let (s, e) = h.enroll_as("n1", ENROLL, None, "evil").await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_token_enrolls_its_node_once() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |_| {}).await;
    let (s, v) = h.post("/v1/nodes/n2/enroll-token", json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["node_id"], "n2");
    let day = 24 * 3600 * 1000;
    let expires = v["expires_at"].as_u64().unwrap();
    assert!(
        expires > now_ms() + day - 60_000 && expires <= now_ms() + day,
        "{v}"
    );

    // Not for another node id.
    let (s, e) = h.enroll_as("n3", &token, None, "edge").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    // Its node, once.
    let (s, v) = h.enroll_as("n2", &token, None, "edge").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t2 = v["token"].as_str().unwrap().to_string();
    let (s, e) = h.enroll_as("n2", &token, None, "evil").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a node token works once: {e}");
    assert_eq!(h.heartbeat("n2", &t2).await, StatusCode::NO_CONTENT);
    assert_eq!(labels_of(&h, "n2").await, json!([["tier", "edge"]]));

    // A node token is an operator's word: it re-enrolls an enrolled node.
    let (_, v) = h
        .post("/v1/nodes/n2/enroll-token", json!({"expires_seconds": 60}))
        .await;
    let again = v["token"].as_str().unwrap().to_string();
    let (s, v) = h.enroll_as("n2", &again, None, "rebuilt").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.heartbeat("n2", &t2).await, StatusCode::UNAUTHORIZED);

    // A newer token replaces an older one; an expired one is refused.
    let (_, old) = h.post("/v1/nodes/n4/enroll-token", json!({})).await;
    let (_, new) = h
        .post("/v1/nodes/n4/enroll-token", json!({"expires_seconds": 1}))
        .await;
    let (s, e) = h
        .enroll_as("n4", old["token"].as_str().unwrap(), None, "edge")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    until_past(new["expires_at"].as_u64().unwrap()).await;
    let (s, e) = h
        .enroll_as("n4", new["token"].as_str().unwrap(), None, "edge")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    assert!(error_of(&e).contains("expired"), "{e}");
    let (s, _) = h.get("/v1/nodes/n4").await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a refused enrollment registered the node"
    );

    let (s, e) = h.post("/v1/nodes/bad%20id/enroll-token", json!({})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, _) = h
        .send(
            "POST",
            "/v1/nodes/n5/enroll-token",
            Some(json!({})),
            Some(""),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    h.stop().await;
}

/// `flotilla node token` and `flotilla node reenroll` through the CLI's
/// library functions (what `flotilla node ...` prints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_token_and_reenroll_from_the_cli() {
    use clap::Parser as _;
    use flotilla::remote::{self, NodeCommand};
    use flotilla::{Cli, Command};

    let cli =
        Cli::try_parse_from(["flotilla", "node", "token", "edge-7", "--expires", "2h"]).unwrap();
    let Command::Node(args) = cli.command else {
        panic!("not a node command");
    };
    assert!(
        matches!(&args.command, NodeCommand::Token { id, expires } if id == "edge-7" && *expires == Duration::from_secs(7200)),
        "{:?}",
        args.command
    );
    let cli = Cli::try_parse_from(["flotilla", "node", "reenroll", "edge-7"]).unwrap();
    let Command::Node(args) = cli.command else {
        panic!("not a node command");
    };
    assert!(
        matches!(&args.command, NodeCommand::Reenroll { id, expires } if id == "edge-7" && *expires == Duration::from_secs(3600)),
        "{:?}",
        args.command
    );

    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |_| {}).await;
    let c = Client::new(&h.base, Some(MGMT.into())).unwrap();
    let out = remote::node_token(&c, "edge-7", Duration::from_secs(3600), false)
        .await
        .unwrap();
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("flne_"))
        .unwrap_or_else(|| panic!("no token in {out:?}"))
        .to_string();
    assert!(out.contains("edge-7"), "{out}");
    let (s, v) = h.enroll_as("edge-7", &token, None, "edge").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = h.enroll_as("edge-7", ENROLL, None, "evil").await;
    assert_eq!(s, StatusCode::CONFLICT);

    let out = remote::node_reenroll(&c, "edge-7", Duration::from_secs(600), true)
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node_id"], "edge-7", "{out}");
    let (s, v) = h.enroll_as("edge-7", ENROLL, None, "rebuilt").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let err = remote::node_reenroll(&c, "nobody", Duration::from_secs(600), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not enrolled"), "{err}");
    h.stop().await;
}

// ----- point 4: paths -----

/// Backup locations: a plain name or a normalised absolute path; anything
/// else is 422 and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_locations_are_a_name_or_a_clean_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(&dir.path().join("data"), |_| {}).await;
    h.everyone_policy().await;
    enroll_fleet(&h, &["e1"], "1.3.0").await;
    h.release("1.4.0").await;
    let with = |loc: &str| {
        let mut s = api_spec("b", "1.4.0");
        s["backup"] = json!({"location": loc});
        s
    };
    for bad in [
        "../../outside",
        "..",
        ".",
        "",
        "a/b",
        "nightly/",
        "/srv/../etc",
        "/srv/./backups",
        "/srv//backups",
        "/srv/backups/",
        "back\nup",
        "/srv/back\0up",
    ] {
        let (s, e) = h.post("/v1/tasks", with(bad)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}: {e}");
        assert!(error_of(&e).contains("backup"), "{bad:?}: {e}");
    }
    assert!(
        h.tasks().await.is_empty(),
        "a refused backup location was stored"
    );
    for good in ["nightly", "before-1.4_x", "/srv/backups", "/"] {
        let (s, e) = h.post("/v1/tasks?dry_run=true", with(good)).await;
        assert_eq!(s, StatusCode::OK, "{good:?}: {e}");
    }
    h.stop().await;
}

/// Policy names: one rule on every route and in a task spec; a script
/// outside the policies directory is never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_names_never_leave_the_policies_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let h = Harness::start(&data, |_| {}).await;
    enroll_fleet(&h, &["e1"], "1.3.0").await;
    h.release("1.4.0").await;
    // A script where `../../outside/evil` from the policies dir points.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("evil.rhai"), "let x = 1;\n").unwrap();
    std::fs::write(data.join("evil.rhai"), "let x = 1;\n").unwrap();
    assert!(
        data.join("policies")
            .join("../../outside/evil.rhai")
            .is_file()
    );

    for name in [
        "../../outside/evil",
        "../evil",
        "/etc/passwd",
        "Evil",
        ".hidden",
        "",
    ] {
        let mut spec = api_spec("p", "1.4.0");
        spec["policy"] = name.into();
        let (s, e) = h.post("/v1/tasks", spec.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{name:?}: {e}");
        assert!(error_of(&e).contains("policy"), "{name:?}: {e}");
        let (s, e) = h.post("/v1/tasks?dry_run=true", spec).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{name:?}: {e}");
    }
    assert!(h.tasks().await.is_empty());
    for path in [
        "/v1/policies/..%2F..%2Foutside%2Fevil",
        "/v1/policies/..%2Fevil",
        "/v1/policies/.evil",
    ] {
        let (s, e) = h.get(path).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "GET {path}: {e}");
        let (s, e) = h
            .send(
                "POST",
                &format!("{path}/check"),
                Some(json!("let x = 1;")),
                None,
            )
            .await;
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "POST {path}/check: {e}"
        );
    }
    h.stop().await;
}
