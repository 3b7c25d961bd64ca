//! Named management tokens with roles, and the audit log, over real HTTP on
//! loopback against the in-process runner: what each role may do, 401 for
//! an unknown or revoked token and 403 naming the role needed, tokens that
//! survive a restart, every state-changing call (refused ones too) in the
//! audit log in order and paged, a store fault on the audit record refusing
//! the call, and a task that keeps the digest of the policy it was created
//! with.

use crate::api::{Harness, serve_on_loopback};
use flotilla_server::{Config, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-token-0123456789abcdef0123456789";

fn bytes(v: Value) -> Option<Vec<u8>> {
    Some(v.to_string().into_bytes())
}

async fn make_token(h: &Harness, name: &str, role: &str) -> String {
    let (s, t) = h
        .send(
            "POST",
            "/v1/tokens",
            bytes(json!({"name": name, "role": role})),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["role"], role);
    t["token"].as_str().unwrap().to_string()
}

/// A node on 1.0.0, release edge 2.0.0 with its artifact: enough for a task.
async fn fleet(h: &Harness) {
    let (s, e) = h
        .send(
            "PUT",
            "/v1/nodes/n1",
            bytes(json!({"version": "1.0.0"})),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    let (s, e) = h
        .send(
            "POST",
            "/v1/releases",
            bytes(json!({"package": "edge", "version": "2.0.0"})),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    let (s, e) = h
        .send(
            "PUT",
            "/v1/releases/edge/2.0.0/artifact",
            Some(b"artifact".to_vec()),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{e}");
}

fn task_spec(policy: &str) -> Option<Vec<u8>> {
    bytes(json!({
        "name": "up", "package": "edge", "target": {"version": "2.0.0"}, "policy": policy
    }))
}

async fn all_audit(h: &Harness, page: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    for _ in 0..1000 {
        let (s, p) = h
            .send(
                "GET",
                &format!("/v1/audit?after={after}&limit={page}"),
                None,
                Some(ADMIN),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{p}");
        let items = p["items"].as_array().unwrap();
        assert!(items.len() <= page);
        out.extend(items.iter().cloned());
        after = p["next"].as_u64().unwrap();
        if !p["more"].as_bool().unwrap() {
            return out;
        }
    }
    panic!("the audit log does not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_what_it_may_and_the_audit_log_shows_every_call() {
    let h = Harness::start(|c| c.token = Some(ADMIN.into())).await;
    let viewer = make_token(&h, "viewer", "read").await;
    let ci = make_token(&h, "ci", "operate").await;
    fleet(&h).await;

    // operate creates a task; read cannot
    let (s, e) = h
        .send("POST", "/v1/tasks", task_spec("canary"), Some(&viewer))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (s, task) = h
        .send("POST", "/v1/tasks", task_spec("canary"), Some(&ci))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{task}");
    let id = task["id"].as_str().unwrap().to_string();

    // read: lists, but cannot pause (403 naming the role needed)
    let (s, list) = h.send("GET", "/v1/tasks", None, Some(&viewer)).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1);
    let pause = bytes(json!({"reason": "look"}));
    let (s, e) = h
        .send(
            "POST",
            &format!("/v1/tasks/{id}/pause"),
            pause.clone(),
            Some(&viewer),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("viewer") && msg.contains("needs role operate"),
        "{msg}"
    );
    let (_, t) = h
        .send("GET", &format!("/v1/tasks/{id}"), None, Some(&viewer))
        .await;
    assert!(
        !t["state"].to_string().contains("paused"),
        "a refused pause paused: {t}"
    );
    // read downloads artifacts (a GET) but sees no tokens nor the audit log
    let (s, _) = h
        .send(
            "GET",
            "/v1/releases/edge/2.0.0/artifact",
            None,
            Some(&viewer),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for path in ["/v1/tokens", "/v1/audit"] {
        let (s, e) = h.send("GET", path, None, Some(&viewer)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {e}");
        assert!(e["error"].as_str().unwrap().contains("needs role admin"));
    }

    // operate: pauses, but cannot upload a policy nor make a token
    let (s, e) = h
        .send(
            "PUT",
            "/v1/policies/mine",
            Some(b"fn select(ctx, nodes) { [] }".to_vec()),
            Some(&ci),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("needs role admin"),
        "{e}"
    );
    let (s, _) = h.send("GET", "/v1/policies/mine", None, Some(&ci)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused upload stored a policy");
    let (s, e) = h
        .send(
            "POST",
            "/v1/tokens",
            bytes(json!({"name": "mine", "role": "admin"})),
            Some(&ci),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (s, t) = h
        .send("POST", &format!("/v1/tasks/{id}/pause"), pause, Some(&ci))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");

    // unknown and missing tokens: 401
    let (s, e) = h.send("GET", "/v1/tasks", None, Some("guess")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let (s, _) = h
        .send(
            "PUT",
            "/v1/control-plane/k8s",
            bytes(json!({"version": "1.0.0"})),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // admin lists (no secrets) and revokes; a revoked token gets 401
    let (s, list) = h.send("GET", "/v1/tokens", None, Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let text = list.to_string();
    assert!(
        !text.contains(&viewer[4..]) && !text.contains(&ci[4..]),
        "{text}"
    );
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ci", "config", "viewer"]);
    let (s, e) = h
        .send("DELETE", "/v1/tokens/config", None, Some(ADMIN))
        .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "the config's token is revoked there: {e}"
    );
    let (s, _) = h
        .send("DELETE", "/v1/tokens/viewer", None, Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = h.send("GET", "/v1/tasks", None, Some(&viewer)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    assert!(e["error"].as_str().unwrap().contains("revoked"), "{e}");

    // the audit log: every call but GETs, refused ones too, in order
    let log = all_audit(&h, 3).await;
    let rows: Vec<(String, String, String, u64)> = log
        .iter()
        .map(|r| {
            (
                r["who"].as_str().unwrap().to_string(),
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(&str, &str, String, u64)> = vec![
        ("config", "POST", "/v1/tokens".into(), 201),
        ("config", "POST", "/v1/tokens".into(), 201),
        ("config", "PUT", "/v1/nodes/n1".into(), 201),
        ("config", "POST", "/v1/releases".into(), 201),
        (
            "config",
            "PUT",
            "/v1/releases/edge/2.0.0/artifact".into(),
            200,
        ),
        ("viewer", "POST", "/v1/tasks".into(), 403),
        ("ci", "POST", "/v1/tasks".into(), 201),
        ("viewer", "POST", format!("/v1/tasks/{id}/pause"), 403),
        ("ci", "PUT", "/v1/policies/mine".into(), 403),
        ("ci", "POST", "/v1/tokens".into(), 403),
        ("ci", "POST", format!("/v1/tasks/{id}/pause"), 200),
        ("-", "PUT", "/v1/control-plane/k8s".into(), 401),
        ("config", "DELETE", "/v1/tokens/config".into(), 409),
        ("config", "DELETE", "/v1/tokens/viewer".into(), 200),
    ];
    let want: Vec<(String, String, String, u64)> = want
        .into_iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c, d))
        .collect();
    assert_eq!(rows, want, "{log:#?}");
    let seqs: Vec<u64> = log.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // objects and reasons
    assert_eq!(log[0]["object"], "viewer");
    assert_eq!(log[3]["object"], "edge@2.0.0");
    assert_eq!(log[4]["object"], "edge@2.0.0");
    assert_eq!(log[6]["object"], id.as_str());
    assert_eq!(log[7]["object"], id.as_str());
    assert_eq!(log[7]["outcome"], "refused");
    assert!(
        log[7]["reason"]
            .as_str()
            .unwrap()
            .contains("needs role operate"),
        "{}",
        log[7]
    );
    assert_eq!(log[8]["object"], "mine");
    assert_eq!(log[13]["object"], "viewer");
    assert_eq!(log[13]["outcome"], "ok");
    // without a cursor: the newest
    let (_, newest) = h.send("GET", "/v1/audit?limit=2", None, Some(ADMIN)).await;
    assert_eq!(newest["items"][1]["seq"], log[13]["seq"]);
    let (s, e) = h.send("GET", "/v1/audit?limit=0", None, Some(ADMIN)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_runner_refuses_a_first_token_that_is_not_admin() {
    let h = Harness::start(|_| {}).await;
    let (s, e) = h
        .send(
            "POST",
            "/v1/tokens",
            bytes(json!({"name": "ro", "role": "read"})),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, t) = h
        .send(
            "POST",
            "/v1/tokens",
            bytes(json!({"name": "root", "role": "admin"})),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    // From the first token on, the API wants one.
    let (s, _) = h.get("/v1/tasks").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h.send("GET", "/v1/tasks", None, t["token"].as_str()).await;
    assert_eq!(s, StatusCode::OK);
    for bad in [
        json!({"name": "../x", "role": "read"}),
        json!({"name": "x", "role": "root"}),
        json!({"name": "anonymous", "role": "read"}),
        json!({"name": "x"}),
    ] {
        let (s, e) = h
            .send(
                "POST",
                "/v1/tokens",
                bytes(bad.clone()),
                t["token"].as_str(),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
    }
    h.stop().await;
}

/// Serves a runner on `data` until the returned sender fires.
async fn runner_on(
    data: &std::path::Path,
    tune: impl FnOnce(&mut Config),
) -> (
    String,
    std::sync::Arc<flotilla_server::AppState>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut config = Config {
        data: data.to_path_buf(),
        tick_ms: 20,
        token: Some(ADMIN.into()),
        ..Config::default()
    };
    tune(&mut config);
    let runner = Runner::open(config).unwrap();
    let state = runner.state.clone();
    let (base, stop, served) = serve_on_loopback(runner).await;
    (base, state, stop, served)
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: &str,
) -> (StatusCode, Value) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut req = http
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn stop(stop: tokio::sync::oneshot::Sender<()>, served: tokio::task::JoinHandle<()>) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), served)
        .await
        .expect("the runner stops within 20 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_the_audit_log_survive_a_restart_and_an_audit_fault_refuses_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let (base, state, tx, served) = runner_on(dir.path(), |_| {}).await;
    let (s, t) = call(
        &base,
        "POST",
        "/v1/tokens",
        Some(json!({"name": "ci", "role": "operate"})),
        ADMIN,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let ci = t["token"].as_str().unwrap().to_string();
    // A store fault writing the audit record: 503, and nothing is done.
    state.audit.inject_fault(true);
    let (s, e) = call(
        &base,
        "POST",
        "/v1/tokens",
        Some(json!({"name": "later", "role": "read"})),
        ADMIN,
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    assert!(e["error"].as_str().unwrap().contains("audit"), "{e}");
    state.audit.inject_fault(false);
    drop(state);
    stop(tx, served).await;

    let (base, _, tx, served) = runner_on(dir.path(), |_| {}).await;
    let (s, _) = call(&base, "GET", "/v1/tasks", None, &ci).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a created token did not survive a restart"
    );
    let (_, list) = call(&base, "GET", "/v1/tokens", None, ADMIN).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ci", "config"], "the refused call made a token");
    let (s, _) = call(&base, "DELETE", "/v1/tokens/ci", None, ADMIN).await;
    assert_eq!(s, StatusCode::OK);
    let (_, log) = call(&base, "GET", "/v1/audit?after=0", None, ADMIN).await;
    let items = log["items"].as_array().unwrap();
    let seqs: Vec<u64> = items.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2], "{log}");
    assert_eq!(items[0]["object"], "ci");
    assert_eq!(items[1]["path"], "/v1/tokens/ci");
    stop(tx, served).await;

    let (base, _, tx, served) = runner_on(dir.path(), |_| {}).await;
    let (s, _) = call(&base, "GET", "/v1/tasks", None, &ci).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a revoked token came back");
    stop(tx, served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_are_audited_under_the_hook_name() {
    let hook: flotilla_server::hooks::HookConfig = toml::from_str(
        r#"
        name = "gh"
        secret = "hook-secret"
        fields = { version = "/v" }
        task = { package = "edge", policy = "canary" }
        "#,
    )
    .unwrap();
    let h = Harness::start(|c| {
        c.token = Some(ADMIN.into());
        c.hooks = vec![hook];
    })
    .await;
    fleet(&h).await;
    let body = json!({"v": "2.0.0"}).to_string();
    let sig = flotilla_server::hooks::sign(b"hook-secret", body.as_bytes());
    let res = h
        .http
        .post(h.url("/v1/hooks/gh"))
        .header("x-flotilla-signature", sig)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let task: Value = res.json().await.unwrap();
    let res = h
        .http
        .post(h.url("/v1/hooks/gh"))
        .header("x-flotilla-signature", "sha256=00")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let log = all_audit(&h, 100).await;
    let hooks: Vec<&Value> = log.iter().filter(|r| r["who"] == "hook:gh").collect();
    assert_eq!(hooks.len(), 2, "{log:#?}");
    assert_eq!(hooks[0]["status"], 201);
    assert_eq!(hooks[0]["object"], task["id"]);
    assert_eq!(hooks[1]["status"], 401);
    assert_eq!(hooks[1]["reason"], "bad signature");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_keeps_the_digest_of_the_policy_it_was_created_with() {
    let h = Harness::start(|c| c.token = Some(ADMIN.into())).await;
    fleet(&h).await;
    let v1 = std::fs::read(flotilla_tests::script("canary")).unwrap();
    let sha1 = hex::encode(Sha256::digest(&v1));
    let (s, p) = h
        .send("PUT", "/v1/policies/gate", Some(v1.clone()), Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let (s, task) = h
        .send("POST", "/v1/tasks", task_spec("gate"), Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{task}");
    assert_eq!(task["policy_sha256"], sha1.as_str());
    let id = task["id"].as_str().unwrap();
    // A new version under the same name changes nothing for the task.
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\n// v2\n");
    let (s, p) = h
        .send("PUT", "/v1/policies/gate", Some(v2), Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_ne!(p["sha256"], sha1.as_str());
    let (_, t) = h
        .send("GET", &format!("/v1/tasks/{id}"), None, Some(ADMIN))
        .await;
    assert_eq!(t["policy_sha256"], sha1.as_str(), "{t}");
    // Its policy decisions name the bytes they were made with.
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let (_, page) = h
            .send("GET", &format!("/v1/tasks/{id}/events"), None, Some(ADMIN))
            .await;
        let events = page["events"].as_array().unwrap().clone();
        if events.iter().any(|e| e["kind"] == "policy.plan") {
            break events;
        }
        assert!(Instant::now() < deadline, "no plan: {events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for e in &events {
        let kind = e["kind"].as_str().unwrap();
        if kind.starts_with("policy.") || kind == "task.created" {
            assert_eq!(e["policy_sha256"], sha1.as_str(), "{e}");
        }
    }
    h.stop().await;
}
