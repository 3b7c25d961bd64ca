//! The web dashboard in a real browser: headless Chromium driven through
//! `chromedriver` (W3C WebDriver) on loopback.
//!
//! - a live task during a rollout by real agent processes: its progress
//!   changes without a reload, and Pause (confirmed with a reason) pauses it;
//! - a 100,000-node task from a seeded store renders in at most 1 s;
//! - a read token cannot pause: the buttons are disabled and a forced
//!   request is refused (403).
//!
//! The WebDriver client is the few W3C calls these tests need, over the
//! reqwest the tests already use (no WebDriver crate: fantoccini and
//! thirtyfour pull in a large dependency tree for a handful of calls).
//! Screenshots of every view go to `$CARGO_TARGET_DIR/dashboard-screenshots/`
//! (or `target/dashboard-screenshots/`), kept as CI artifacts.
//!
//! Without `chromium` and `chromedriver` the tests say what to install and
//! pass, unless `CI` is set: then they fail.

use crate::api::serve_on_loopback;
use crate::e2e::{AgentSpec, Cluster, LOG_INSTALL, wait_for};
use flotilla_engine::store::Store;
use flotilla_model::{Event, NodeRun, RunState, Task, TaskSpec, TaskState, Wave};
use flotilla_server::{Config, Runner};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One browser at a time: the render-time test measures alone.
static BROWSERS: Mutex<()> = Mutex::new(());

const CHROMIUM: &[&str] = &["/usr/bin/chromium", "/usr/bin/chromium-browser"];
const DRIVER: &[&str] = &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"];

fn find(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// `None` (and a message) when the browser is not installed; panics under CI.
fn tools() -> Option<(PathBuf, PathBuf)> {
    match (find(CHROMIUM), find(DRIVER)) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            let msg = "the dashboard's browser tests need Chromium and its WebDriver: install chromium chromium-driver (apt-get install chromium chromium-driver)";
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| flotilla_tests::workspace().join("target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ----- a minimal W3C WebDriver client -----

/// `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session; closed (and its driver killed) when dropped.
struct Browser {
    rt: Arc<tokio::runtime::Runtime>,
    http: reqwest::Client,
    session: String,
    driver: Driver,
    _profile: tempfile::TempDir,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(rt: Arc<tokio::runtime::Runtime>, chromium: &Path, driver: &Path) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let status = format!("{}/status", driver.url);
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            rt.block_on(async {
                let r = http.get(&status).send().await.ok()?;
                let v: Value = r.json().await.ok()?;
                (v["value"]["ready"] == true).then_some(())
            })
        });
        let profile = tempfile::Builder::new()
            .prefix("flotilla-chromium")
            .tempdir()
            .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let v: Value = rt.block_on(async {
            http.post(format!("{}/session", driver.url))
                .json(&caps)
                .send()
                .await
                .expect("chromedriver answers")
                .json()
                .await
                .unwrap()
        });
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {v}"))
            .to_string();
        Browser {
            rt,
            http,
            session,
            driver,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver.url, self.session);
        self.rt.block_on(async {
            let mut req = self.http.request(method.parse().unwrap(), &url);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
            let ok = res.status().is_success();
            let v: Value = res.json().await.unwrap();
            assert!(ok, "WebDriver {method} {path}: {v}");
            v["value"].clone()
        })
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Runs an async `script`: it calls `arguments[arguments.length - 1]`
    /// with its result.
    fn js_async(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` every 50 ms until it returns something truthy.
    fn wait_js(&self, what: &str, timeout: Duration, script: &str) -> Value {
        wait_for(what, timeout, || {
            let v = self.js(script, json!([]));
            match &v {
                Value::Null | Value::Bool(false) => None,
                Value::String(s) if s.is_empty() => None,
                _ => Some(v),
            }
        })
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn window(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// A PNG of the whole page (the window grown to the page's height, at
    /// most 4000 px, for the shot) under [`screenshots_dir`].
    fn screenshot(&self, name: &str) {
        let size = self.js(
            "return [window.outerWidth, window.outerHeight, document.documentElement.scrollHeight]",
            json!([]),
        );
        let (w, h, page) = (
            size[0].as_u64().unwrap() as u32,
            size[1].as_u64().unwrap() as u32,
            size[2].as_u64().unwrap() as u32,
        );
        if page + 100 > h {
            self.window(w, (page + 100).min(4000));
        }
        let v = self.call("GET", "/screenshot", None);
        if page + 100 > h {
            self.window(w, h);
        }
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v.as_str().unwrap(),
        )
        .expect("a WebDriver screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        let path = screenshots_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// The browser console's messages since the last call: (level, text).
    fn console(&self) -> Vec<(String, String)> {
        let v = self.call("POST", "/se/log", Some(json!({"type": "browser"})));
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["level"].as_str().unwrap_or("").to_string(),
                            m["message"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Panics on a script error or a Content-Security-Policy violation in
    /// the console.
    fn assert_clean_console(&self) {
        let bad: Vec<_> = self
            .console()
            .into_iter()
            .filter(|(_, m)| {
                m.contains("Content Security Policy")
                    || m.contains("Uncaught")
                    || m.contains("TypeError")
            })
            .collect();
        assert!(bad.is_empty(), "the browser console: {bad:?}");
    }

    /// Signs in through the dashboard's token dialog.
    fn sign_in(&self, token: &str) {
        self.wait_js(
            "the token dialog",
            Duration::from_secs(10),
            "return document.getElementById('login').open",
        );
        self.type_into("#login-token", token);
        self.click("#login-ok");
        self.wait_js(
            "the dialog to close",
            Duration::from_secs(10),
            "return !document.getElementById('login').open",
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.driver.url, self.session);
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), self.http.delete(&url).send()).await
        });
    }
}

// ----- a runner with a seeded task -----

const ADMIN: &str = "dashboard-admin-token-0123456789abcdef";

/// A runner in process whose store holds one task `id` over `n` nodes,
/// in `state`, its runs spread over the run states (or all downloading).
struct Seeded {
    rt: Arc<tokio::runtime::Runtime>,
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Seeded {
    fn start(id: &str, n: usize, state: TaskState, mixed: bool) -> Seeded {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data: dir.path().join("data"),
            tick_ms: 100,
            token: Some(ADMIN.into()),
            ..Config::default()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let spec: TaskSpec = serde_json::from_value(json!({
            "name": "big-rollout", "package": "edge", "target": {"version": "2.0.0"},
            "policy": "canary", "node_timeout_seconds": 3600,
        }))
        .unwrap();
        let ids: Vec<String> = (0..n).map(|i| format!("node-{i:06}")).collect();
        let cuts = [n / 100, n / 10, n / 2, n];
        let names = ["canary", "10%", "50%", "rest"];
        let mut waves = Vec::new();
        let mut lo = 0;
        for (cut, name) in cuts.iter().zip(names) {
            waves.push(Wave {
                name: name.into(),
                nodes: ids[lo..(*cut).max(lo)].to_vec(),
                concurrency: 0,
                soak_seconds: 60,
                needs_approval: false,
            });
            lo = (*cut).max(lo);
        }
        let wave_of = |i: usize| cuts.iter().position(|c| i < *c).unwrap_or(3) as u32;
        let runs: Vec<NodeRun> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let wave = wave_of(i);
                let mut r = NodeRun::new(id.clone(), "1.0.0", now);
                r.attempts = 1;
                r.started_at = Some(now);
                r.state = if !mixed {
                    RunState::Downloading { wave }
                } else if wave < 2 {
                    match i % 29 {
                        0 => RunState::FailedRolledBack {
                            wave,
                            error: "health check failed".into(),
                        },
                        1 => RunState::TimedOut { wave },
                        _ => RunState::Succeeded { wave },
                    }
                } else if wave == 2 {
                    match i % 7 {
                        0 => RunState::Downloading { wave },
                        1 => RunState::Upgrading { wave },
                        2 => RunState::Verifying { wave },
                        3 => RunState::Succeeded { wave },
                        _ => RunState::Queued { wave },
                    }
                } else {
                    RunState::Queued { wave }
                };
                r
            })
            .collect();
        let task = Task {
            id: id.into(),
            spec,
            state,
            target_version: Some("2.0.0".into()),
            waves,
            plan_rev: 1,
            current_wave: 2,
            soak_until: None,
            awaiting_approval: false,
            draining: false,
            policy_sha256: None,
            created_at: now - 3_600_000,
            updated_at: now,
        };
        let ev = |seq: u64, kind: &str, detail: &str| Event {
            seq,
            at: now - 3_600_000 + seq * 60_000,
            node: None,
            kind: kind.into(),
            detail: detail.into(),
            policy_sha256: kind.starts_with("policy.").then(|| "ab".repeat(32)),
        };
        let events = vec![
            ev(0, "task.created", "big-rollout"),
            ev(1, "policy.plan", &format!("{n} selected in 4 waves")),
            ev(2, "wave.start", "wave 1 (canary)"),
            ev(3, "policy.verdict", "wave 1: proceed"),
            ev(4, "wave.start", "wave 2 (10%)"),
            ev(5, "policy.verdict", "wave 2: proceed"),
            ev(6, "wave.start", "wave 3 (50%)"),
        ];
        // A long log when mixed: 3,000 node events, then one more decision.
        let mut events = events;
        if mixed {
            for k in 0..3000u64 {
                let mut e = ev(7 + k, "node.succeeded", "succeeded");
                e.at = now - 1_000_000 + k;
                e.node = Some(ids[(k as usize) % n].clone());
                events.push(e);
            }
            let mut e = ev(3007, "policy.admit", "deferred until 1767225600000");
            e.at = now - 1000;
            events.push(e);
        }
        let runner = Runner::open_with_store(config, move |sled| {
            sled.commit(&task, &runs, &events).unwrap();
            sled.flush().unwrap();
            sled
        })
        .unwrap();
        let (base, stop, served) = rt.block_on(serve_on_loopback(runner));
        Seeded {
            rt,
            base,
            stop: Some(stop),
            served: Some(served),
            _dir: dir,
        }
    }

    fn send(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        self.rt.block_on(async {
            let http = reqwest::Client::new();
            let mut req = http
                .request(method.parse().unwrap(), format!("{}{path}", self.base))
                .bearer_auth(token)
                .timeout(Duration::from_secs(30));
            if let Some(b) = body {
                req = req.json(&b);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json().await.unwrap_or(Value::Null))
        })
    }
}

impl Drop for Seeded {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.served.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), j).await });
        }
    }
}

// ----- the tests -----

#[test]
fn a_live_task_updates_without_a_reload_and_pause_pauses_it() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    let _one = BROWSERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start();
    // Slow installs, one node at a time: the rollout lasts long enough to
    // watch it move and to pause it half-way.
    for _ in 0..6 {
        c.add_agent(AgentSpec {
            install: format!("sleep 1; {LOG_INSTALL}"),
            ..AgentSpec::default()
        });
    }
    c.wait_enrolled();
    c.release("1.1.0", 0);
    let task = c.task("dash-live", "1.1.0", json!({"concurrency": 1}));

    let rt = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let b = Browser::start(rt, &chromium, &driver);
    // The runner is open (no token configured): no dialog, the caller is
    // the anonymous admin.
    b.goto(&format!("{}/#/tasks/{task}", c.url()));
    b.wait_js(
        "the task view to render",
        Duration::from_secs(20),
        "return document.getElementById('main').dataset.rendered",
    );
    // A mark that a reload would wipe.
    b.js("window.__noReload = 'still here'; return null", json!([]));
    let succeeded = "const li = document.querySelector('#legend li[data-state=succeeded]'); \
         return li ? parseInt(li.textContent.split(': ')[1], 10) : 0";
    let first = b.js(succeeded, json!([])).as_i64().unwrap();
    let seen = wait_for(
        "the grid to show more nodes succeeded, live",
        Duration::from_secs(60),
        || {
            let n = b.js(succeeded, json!([])).as_i64().unwrap();
            (n > first).then_some(n)
        },
    );
    assert!(seen < 6, "the rollout ended before it could be paused");
    b.screenshot("task-live");

    // Pause through the button, confirming with a reason.
    b.wait_js(
        "Pause to be enabled",
        Duration::from_secs(10),
        "return !document.getElementById('btn-pause').disabled",
    );
    b.click("#btn-pause");
    b.wait_js(
        "the confirm dialog",
        Duration::from_secs(10),
        "return document.getElementById('confirm').open",
    );
    b.screenshot("task-confirm-pause");
    b.type_into("#confirm-reason", "watching the canary from the dashboard");
    b.click("#confirm-ok");
    let view = c.wait_task(&task, &["paused"], Duration::from_secs(20));
    assert_eq!(
        view["state"]["reason"], "watching the canary from the dashboard",
        "{view}"
    );
    // The page follows without a reload.
    b.wait_js(
        "the page to show the task paused",
        Duration::from_secs(20),
        "return document.querySelector('#task-state .badge.paused')",
    );
    b.wait_js(
        "the pause event in the log",
        Duration::from_secs(20),
        "return document.querySelector('#events tr[data-kind=\"task.paused\"]')",
    );
    assert_eq!(
        b.js("return window.__noReload", json!([])),
        "still here",
        "the page was reloaded"
    );
    b.screenshot("task-paused");
    b.assert_clean_console();

    // From the counts to the nodes in a state.
    b.click("#counts-table tr[data-state=succeeded] a");
    b.wait_js(
        "the task's succeeded nodes",
        Duration::from_secs(20),
        "return document.querySelector('#runs tr[data-node]')",
    );
    b.screenshot("task-nodes-by-state");

    // The other views, for the record.
    b.goto(&format!("{}/#/tasks", c.url()));
    b.wait_js(
        "the task list",
        Duration::from_secs(20),
        "return document.querySelector('#tasks tr[data-task]')",
    );
    b.screenshot("tasks");
    b.goto(&format!("{}/#/nodes?online=true", c.url()));
    b.wait_js(
        "the node list",
        Duration::from_secs(20),
        "return document.querySelectorAll('#nodes tr[data-node]').length === 6",
    );
    b.screenshot("nodes");
    b.goto(&format!("{}/#/nodes/node-00", c.url()));
    b.wait_js(
        "a node's history",
        Duration::from_secs(20),
        "return document.querySelector('#history tbody tr')",
    );
    b.screenshot("node-history");
    b.goto(&format!("{}/#/releases", c.url()));
    b.wait_js(
        "the releases",
        Duration::from_secs(20),
        "return document.querySelector('#releases tbody tr')",
    );
    b.screenshot("releases");
    b.goto(&format!("{}/#/policies", c.url()));
    b.wait_js(
        "the policies",
        Duration::from_secs(20),
        "return document.querySelector('#policies tbody tr')",
    );
    b.screenshot("policies");
    b.goto(&format!("{}/#/policies/canary", c.url()));
    b.wait_js(
        "a policy's source",
        Duration::from_secs(20),
        "const s = document.getElementById('policy-source'); return s && s.textContent.includes('fn ')",
    );
    b.screenshot("policy-source");
    b.goto(&format!("{}/#/plan", c.url()));
    b.wait_js(
        "the plan view",
        Duration::from_secs(20),
        "return document.getElementById('main').dataset.rendered",
    );
    // A window that opens in one to two hours: the plan waits for it.
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600
        + 2)
        % 24;
    let spec = json!({"name": "dash-plan", "package": "app", "target": {"version": "1.1.0"},
        "policy": "canary", "node_timeout_seconds": 60,
        "params": {"schedule": {"windows": [
            {"cron": format!("0 {hour} * * *"), "duration_minutes": 120, "timezone": "UTC"}]}}});
    b.js(
        "document.getElementById('plan-spec').value = arguments[0]; return null",
        json!([spec.to_string()]),
    );
    b.click("#plan-run");
    b.wait_js(
        "the simulated timeline",
        Duration::from_secs(30),
        "return document.querySelector('#plan-timeline rect') && document.getElementById('plan-summary')",
    );
    let summary = b.js(
        "return document.getElementById('plan-summary').textContent",
        json!([]),
    );
    assert!(
        summary.as_str().unwrap().contains("for its first window")
            && summary.as_str().unwrap().contains("succeeded"),
        "{summary}"
    );
    b.screenshot("plan-preview");
    b.assert_clean_console();
    // A phone.
    b.window(390, 844);
    b.goto(&format!("{}/#/tasks/{task}", c.url()));
    b.wait_js(
        "the task view on a phone",
        Duration::from_secs(20),
        "return document.getElementById('main').dataset.rendered",
    );
    let overflow = b.js(
        "return document.documentElement.scrollWidth - window.innerWidth",
        json!([]),
    );
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the task view scrolls sideways on a phone by {overflow} px"
    );
    b.screenshot("task-phone");
    b.assert_clean_console();
}

#[test]
fn a_100k_node_task_view_renders_within_a_second() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    let _one = BROWSERS.lock().unwrap_or_else(|e| e.into_inner());
    let n = 100_000;
    let seeded = Seeded::start(
        "t-big",
        n,
        TaskState::Paused("seeded for the dashboard test".into()),
        true,
    );
    let (s, view) = seeded.send("GET", "/v1/tasks/t-big", ADMIN, None);
    assert_eq!(s, 200, "{view}");
    let total: u64 = view["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, n as u64);

    let b = Browser::start(seeded.rt.clone(), &chromium, &driver);
    b.goto(&format!("{}/#/tasks", seeded.base));
    b.sign_in(ADMIN);
    b.wait_js(
        "the task list",
        Duration::from_secs(20),
        "return document.querySelector('#tasks tr[data-task]')",
    );
    // Warm: the first load of the view in this browser (assets cached).
    let mut times = Vec::new();
    for round in 0..3 {
        // A full page load: the measure starts at navigation (performance
        // timeOrigin) and ends when the grid is drawn (`data-rendered`).
        b.goto("about:blank");
        b.goto(&format!("{}/#/tasks/t-big", seeded.base));
        let ms = b.wait_js(
            "the 100,000-node grid",
            Duration::from_secs(30),
            "const m = document.getElementById('main'); \
             if (!m || !m.dataset.rendered) return null; \
             if (!window.__renderedAt) window.__renderedAt = performance.now(); \
             return window.__renderedAt",
        );
        let cells = b.js(
            "const c = document.getElementById('grid'); return c.width * c.height",
            json!([]),
        );
        assert!(cells.as_u64().unwrap() >= n as u64, "{cells}");
        eprintln!(
            "round {round}: 100,000-node task view rendered at {ms} ms after navigation start"
        );
        times.push(ms.as_f64().unwrap());
    }
    let legend = b.js(
        "return [...document.querySelectorAll('#legend li')].map(li => li.textContent).join('; ')",
        json!([]),
    );
    assert!(legend.as_str().unwrap().contains("succeeded: "), "{legend}");
    // A tooltip names a cell's node and state in words.
    let tip = b.js(
        "const c = document.getElementById('grid'); const r = c.getBoundingClientRect(); \
         c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + 1, clientY: r.top + 1, bubbles: true})); \
         return document.getElementById('tooltip').textContent",
        json!([]),
    );
    let tip = tip.as_str().unwrap();
    assert!(
        tip.starts_with("node-00000") && tip.ends_with(" of 100000)"),
        "{tip}"
    );
    // Every decision stays in the log; node events are capped at 1,000.
    let rows = b.wait_js(
        "the whole log",
        Duration::from_secs(20),
        "const d = document.querySelectorAll('#events tr.decision').length; \
         const n = document.querySelectorAll('#events tr.node-event').length; \
         return d === 8 ? [d, n] : null",
    );
    assert_eq!(rows, json!([8, 1000]));
    // The keyboard walks the cells and names them.
    let named = b.js(
        "const c = document.getElementById('grid'); c.focus(); \
         c.dispatchEvent(new KeyboardEvent('keydown', {key: 'Home', bubbles: true})); \
         c.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowRight', bubbles: true})); \
         return document.getElementById('cell-info').textContent",
        json!([]),
    );
    assert!(
        named
            .as_str()
            .unwrap()
            .starts_with("node-000001: timed-out, wave 1 (cell 2 of 100000)"),
        "{named}"
    );
    b.screenshot("task-100k");
    b.assert_clean_console();
    let best = times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        best <= 1000.0,
        "the 100,000-node task view took {times:?} ms (budget 1000 ms)"
    );
}

#[test]
fn a_read_token_cannot_pause() {
    let Some((chromium, driver)) = tools() else {
        return;
    };
    let _one = BROWSERS.lock().unwrap_or_else(|e| e.into_inner());
    let seeded = Seeded::start("t-small", 12, TaskState::Running, false);
    let (s, made) = seeded.send(
        "POST",
        "/v1/tokens",
        ADMIN,
        Some(json!({"name": "viewer", "role": "read"})),
    );
    assert_eq!(s, 201, "{made}");
    let read = made["token"].as_str().unwrap().to_string();

    let b = Browser::start(seeded.rt.clone(), &chromium, &driver);
    b.goto(&format!("{}/#/tasks/t-small", seeded.base));
    b.wait_js(
        "the token dialog",
        Duration::from_secs(10),
        "return document.getElementById('login').open",
    );
    assert_eq!(
        b.js(
            "return document.getElementById('login-error').textContent",
            json!([])
        ),
        "",
        "a first visit is asked, not scolded"
    );
    b.screenshot("sign-in");
    // A wrong token is refused in the dialog, which stays open.
    b.type_into("#login-token", "flt_not-a-real-token");
    b.click("#login-ok");
    b.wait_js(
        "the refusal",
        Duration::from_secs(10),
        "return document.getElementById('login-error').textContent.includes('unknown or revoked')",
    );
    assert_eq!(
        b.js("return document.getElementById('login').open", json!([])),
        true
    );
    b.js(
        "document.getElementById('login-token').value = ''; return null",
        json!([]),
    );
    b.sign_in(&read);
    b.wait_js(
        "the task view",
        Duration::from_secs(20),
        "return document.querySelector('#task-state .badge.running')",
    );
    let disabled = b.js(
        "return ['pause','resume','promote','cancel','rollback'].map(a => document.getElementById('btn-' + a).disabled)",
        json!([]),
    );
    assert_eq!(disabled, json!([true, true, true, true, true]));
    let title = b.js(
        "return document.getElementById('btn-pause').title",
        json!([]),
    );
    assert!(title.as_str().unwrap().contains("operate"), "{title}");
    assert_eq!(
        b.js(
            "return document.getElementById('who').textContent",
            json!([])
        ),
        "viewer (read)"
    );
    // Clicking the disabled button opens nothing.
    b.click("#btn-pause");
    assert_eq!(
        b.js("return document.getElementById('confirm').open", json!([])),
        false
    );
    b.screenshot("task-read-token");
    // A request forced from the page with the same token is refused.
    let forced = b.js_async(
        "const done = arguments[arguments.length - 1]; \
         fetch('/v1/tasks/t-small/pause', {method: 'POST', \
           headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('flotilla.token'), 'Content-Type': 'application/json'}, \
           body: JSON.stringify({reason: 'forced'})}) \
         .then(r => r.json().then(b => done([r.status, b.error])), e => done(['fetch failed', String(e)]))",
        json!([]),
    );
    assert_eq!(forced[0], 403, "{forced}");
    assert!(
        forced[1].as_str().unwrap().contains("needs role operate"),
        "{forced}"
    );
    let (_, view) = seeded.send("GET", "/v1/tasks/t-small", ADMIN, None);
    assert_eq!(view["state"]["state"], "running", "{view}");
    // The token is in session storage, never in the URL.
    let url = b.call("GET", "/url", None);
    assert!(!url.as_str().unwrap().contains(&read), "{url}");

    // The browser enforces the CSP: an inline script put into the page
    // (what an injection would try) does not run, and says so.
    let _ = b.console();
    let ran = b.js(
        "const s = document.createElement('script'); s.textContent = 'window.__injected = 1'; \
         document.body.append(s); return window.__injected === 1",
        json!([]),
    );
    assert_eq!(ran, false, "an inline script ran despite the CSP");
    wait_for(
        "the CSP violation in the console",
        Duration::from_secs(10),
        || {
            b.console()
                .into_iter()
                .any(|(_, m)| m.contains("Content Security Policy"))
                .then_some(())
        },
    );

    // The same page with an operate token: Pause is enabled.
    let (s, op) = seeded.send(
        "POST",
        "/v1/tokens",
        ADMIN,
        Some(json!({"name": "oncall", "role": "operate"})),
    );
    assert_eq!(s, 201, "{op}");
    b.click("#signout");
    b.sign_in(op["token"].as_str().unwrap());
    b.wait_js(
        "Pause enabled for an operate token",
        Duration::from_secs(20),
        "const b = document.getElementById('btn-pause'); return b && !b.disabled",
    );
}

// ----- the dashboard's routes without a browser -----

impl Seeded {
    /// Status, headers and body bytes.
    fn raw(&self, path: &str, token: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        self.rt.block_on(async {
            let mut req = reqwest::Client::new()
                .get(format!("{}{path}", self.base))
                .timeout(Duration::from_secs(30));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            (status, headers, res.bytes().await.unwrap().to_vec())
        })
    }

    fn token(&self, name: &str, role: &str) -> String {
        let (s, made) = self.send(
            "POST",
            "/v1/tokens",
            ADMIN,
            Some(json!({"name": name, "role": role})),
        );
        assert_eq!(s, 201, "{made}");
        made["token"].as_str().unwrap().to_string()
    }
}

#[test]
fn the_dashboard_is_served_with_a_strict_content_security_policy() {
    let seeded = Seeded::start("t-small", 3, TaskState::Running, false);
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard/", "text/html"),
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        // Served without a token: the assets hold no data.
        let (s, h, body) = seeded.raw(path, None);
        assert_eq!(s, 200, "{path}");
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        if kind == "text/html" {
            // No inline script: every <script> has a src.
            let html = String::from_utf8(body).unwrap();
            for tag in html.split("<script").skip(1) {
                assert!(
                    tag.trim_start().starts_with("src="),
                    "inline script in {path}"
                );
            }
            // No inline handler (` onclick=`).
            for (i, _) in html.match_indices(" on") {
                let rest = &html[i + 3..];
                let word = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(0);
                assert!(
                    !rest[word..].starts_with('='),
                    "an inline handler in {path}"
                );
            }
        } else if kind == "text/javascript" {
            let js = String::from_utf8(body).unwrap();
            // Nothing the runner returns becomes markup.
            assert!(!js.contains("innerHTML") && !js.contains("eval("), "{path}");
        }
    }
    let (s, _, _) = seeded.raw("/dashboard/other.js", None);
    assert_eq!(s, 404);
}

#[test]
fn the_dashboard_reads_are_guarded_bounded_and_check_their_input() {
    let seeded = Seeded::start("t-small", 12, TaskState::Running, false);
    let read = seeded.token("viewer", "read");
    let guarded = [
        "/v1/whoami",
        "/v1/tasks/t-small/live",
        "/v1/tasks/t-small/grid",
        "/v1/tasks/t-small/grid/nodes",
        "/v1/nodes/node-000000/history",
        "/v1/policies/canary/source",
    ];
    for path in guarded {
        let (s, _, body) = seeded.raw(path, None);
        assert_eq!(s, 401, "{path}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("token"),
            "{path}: {v}"
        );
        let (s, _, _) = seeded.raw(path, Some("not-a-token"));
        assert_eq!(s, 401, "{path}");
    }
    let (s, me) = seeded.send("GET", "/v1/whoami", &read, None);
    assert_eq!((s, me), (200, json!({"name": "viewer", "role": "read"})));

    // The grid: one byte per run, in node-id order; the states by name.
    let (s, h, bytes) = seeded.raw("/v1/tasks/t-small/grid", Some(&read));
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/octet-stream");
    let states: Vec<&str> = h["x-flotilla-states"]
        .to_str()
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(states.len(), 16);
    assert_eq!(bytes.len(), 12);
    assert!(
        bytes.iter().all(|b| states[*b as usize] == "downloading"),
        "{bytes:?}"
    );
    let (s, nodes) = seeded.send("GET", "/v1/tasks/t-small/grid/nodes", &read, None);
    assert_eq!(s, 200, "{nodes}");
    let ids: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(ids.len(), 12);
    assert_eq!(nodes["waves"].as_array().unwrap().len(), 12);
    // 12 nodes: no canary (1% of 12), 10% (1), 50% (5), the rest (6).
    assert_eq!(nodes["waves"][0], 1, "{nodes}");
    assert_eq!(nodes["waves"][11], 3, "{nodes}");
    assert_eq!(nodes["plan_rev"], 1);
    for bad in [
        "/v1/tasks/nope/grid",
        "/v1/tasks/nope/grid/nodes",
        "/v1/tasks/nope/live",
        "/v1/tasks/a%2F..%2Fb/grid",
        &format!("/v1/tasks/{}/grid", "x".repeat(300)),
    ] {
        let (s, _, body) = seeded.raw(bad, Some(&read));
        assert_eq!(s, 404, "{bad}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].is_string(), "{bad}: {v}");
    }

    // A node's history, bounded.
    let (s, hist) = seeded.send("GET", "/v1/nodes/node-000003/history", &read, None);
    assert_eq!(s, 200, "{hist}");
    assert_eq!(hist["items"][0]["task"], "t-small");
    assert_eq!(hist["items"][0]["run"]["state"]["state"], "downloading");
    for (q, status) in [
        ("?limit=0", 422),
        ("?limit=501", 422),
        ("?limit=x", 400),
        ("?other=1", 400),
    ] {
        let (s, v) = seeded.send(
            "GET",
            &format!("/v1/nodes/node-000003/history{q}"),
            &read,
            None,
        );
        assert_eq!(s, status, "{q}: {v}");
    }
    let (s, _) = seeded.send("GET", "/v1/nodes/never-seen/history", &read, None);
    assert_eq!(s, 404);

    // A Rhai policy's source; names are never paths.
    let (s, src) = seeded.send("GET", "/v1/policies/canary/source", &read, None);
    assert_eq!(s, 200, "{src}");
    assert_eq!(src["kind"], "rhai");
    assert!(src["source"].as_str().unwrap().contains("fn "), "{src}");
    for (name, status) in [("nope", 404), ("Upper", 422), ("..%2Fsecret", 422)] {
        let (s, v) = seeded.send("GET", &format!("/v1/policies/{name}/source"), &read, None);
        assert_eq!(s, status, "{name}: {v}");
    }

    // A dry run starts a simulation: operate, not read.
    let (s, v) = seeded.send(
        "POST",
        "/v1/tasks?dry_run=true",
        &read,
        Some(json!({"name": "x", "package": "edge", "target": {"version": "2.0.0"}, "policy": "canary"})),
    );
    assert_eq!(s, 403, "{v}");

    // The live stream: the task (waves without their node lists), then its
    // events; at most 16 streams a token and 64 in all.
    let others: Vec<String> = (1..=4)
        .map(|i| seeded.token(&format!("viewer{i}"), "read"))
        .collect();
    seeded.rt.block_on(async {
        let http = reqwest::Client::new();
        let open = |token: &str| {
            http.get(format!("{}/v1/tasks/t-small/live", seeded.base))
                .bearer_auth(token)
                .send()
        };
        let mut first = open(&read).await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["content-type"], "text/event-stream");
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !(text.contains("event: task") && text.contains("event: events")) {
            let chunk = tokio::time::timeout_at(deadline, first.chunk())
                .await
                .expect("the first events within 20 s")
                .unwrap()
                .expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let task_line = text
            .lines()
            .skip_while(|l| *l != "event: task")
            .nth(1)
            .unwrap();
        let task: Value = serde_json::from_str(task_line.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(task["id"], "t-small");
        assert_eq!(task["counts"]["downloading"], 12);
        assert!(task["waves"][0].get("nodes").is_none(), "{task}");
        assert_eq!(task["waves"][3]["size"], 6);
        let mut held = vec![first];
        for _ in 1..16 {
            let r = open(&read).await.unwrap();
            assert_eq!(r.status(), 200);
            held.push(r);
        }
        // One token cannot take every place.
        let refused = open(&read).await.unwrap();
        assert_eq!(refused.status(), 429);
        assert!(refused.headers().contains_key("retry-after"));
        let v: Value = refused.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("16 live streams"),
            "{v}"
        );
        for t in &others[..3] {
            for _ in 0..16 {
                let r = open(t).await.unwrap();
                assert_eq!(r.status(), 200);
                held.push(r);
            }
        }
        assert_eq!(held.len(), 64);
        let refused = open(&others[3]).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert!(refused.headers().contains_key("retry-after"));
        let v: Value = refused.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("64 live streams"),
            "{v}"
        );
        // A closed stream gives its places back (the token's and the
        // runner's).
        drop(held.remove(0));
        let mut tries = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = open(&read).await.unwrap();
            if r.status() == 200 {
                break;
            }
            tries += 1;
            assert!(tries < 100, "a closed stream's place was never freed");
        }
    });
}

#[test]
fn a_runner_shuts_down_promptly_with_live_streams_open() {
    let mut seeded = Seeded::start("t-small", 3, TaskState::Running, false);
    let rt = seeded.rt.clone();
    let base = seeded.base.clone();
    let mut stream = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!("{base}/v1/tasks/t-small/live"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    });
    rt.block_on(async {
        let first = tokio::time::timeout(Duration::from_secs(20), stream.chunk()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
    });
    let t0 = std::time::Instant::now();
    let _ = seeded.stop.take().unwrap().send(());
    let served = seeded.served.take().unwrap();
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), served).await });
    assert!(done.is_ok(), "the runner did not stop within 20 s");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the runner took {:?} to stop with a live stream open",
        t0.elapsed()
    );
    // The stream ended with the runner.
    let rest = rt.block_on(async {
        let mut n = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await {
                Ok(Ok(Some(_))) if n < 100 => n += 1,
                other => return other.map(|r| r.map(|c| c.is_none())),
            }
        }
    });
    assert!(
        matches!(rest, Ok(Ok(true)) | Ok(Err(_))),
        "the stream outlived the runner: {rest:?}"
    );
}
