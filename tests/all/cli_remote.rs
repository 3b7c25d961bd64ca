//! The CLI over the API (`flotilla task|node|release|policy upload`): a runner
//! in-process on loopback, driven through `flotilla_client` and the verbs'
//! library functions in `flotilla::remote`, whose output (tables or
//! JSON) is asserted on.

use clap::Parser as _;
use flotilla::remote::{
    self, ControlArgs, ReleaseAdd, ReleaseKindArg, WatchOptions, parse_spec, task_create,
};
use flotilla::{Cli, Command};
use flotilla_client::{Client, ClientError, NodeFilter, TaskAction};
use flotilla_model::{Node, TaskState};
use flotilla_server::{Config, Runner};
use flotilla_tests::workspace;
use sha2::{Digest, Sha256};
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789";

/// A runner serving on `127.0.0.1:0` in this process until [`Served::stop`].
struct Served {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

async fn serve() -> Served {
    let data = tempfile::tempdir().unwrap();
    let config = Config {
        data: data.path().to_path_buf(),
        token: Some(TOKEN.into()),
        tick_ms: 20,
        ..Config::default()
    };
    let runner = Runner::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(runner.serve(listener, async {
        let _ = stopped.await;
    }));
    Served {
        url,
        stop,
        done,
        _data: data,
    }
}

impl Served {
    fn client(&self) -> Client {
        Client::new(&self.url, Some(TOKEN.into())).unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.done)
            .await
            .expect("the runner stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

fn node(id: &str, version: &str, tier: &str, online: bool) -> Node {
    let mut n = Node::new(id, version);
    n.labels = vec![("tier".into(), tier.into()), ("region".into(), "eu".into())];
    n.online = online;
    n
}

/// Five edge nodes on 1.12, two core nodes (one offline).
async fn fleet(c: &Client) {
    for i in 1..=5 {
        c.put_node(&node(&format!("edge-{i:02}"), "1.12", "edge", true))
            .await
            .unwrap();
    }
    c.put_node(&node("core-01", "1.11", "core", true))
        .await
        .unwrap();
    c.put_node(&node("core-02", "1.12", "core", false))
        .await
        .unwrap();
}

async fn add_release(c: &Client, dir: &std::path::Path, version: &str) -> (String, u64) {
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = dir.join(format!("edgecore-{version}.tar.gz"));
    std::fs::write(&file, &bytes).unwrap();
    let add = ReleaseAdd {
        package: "edgecore".into(),
        version: version.into(),
        file: Some(file),
        url: None,
        sha256: None,
        size: None,
        kind: ReleaseKindArg::Full,
        signature: None,
    };
    let out = remote::release_add(c, &add, false, true).await.unwrap();
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sha = hex_sha256(&bytes);
    assert_eq!(rec["sha256"], sha.as_str(), "{out}");
    assert_eq!(rec["size"], bytes.len() as u64, "{out}");
    (sha, bytes.len() as u64)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const SPEC: &str = "\
name: edge-1-13
package: edgecore
target:
  version: '1.13'
scope:
  selector:
    labels: [[tier, edge]]
policy: canary
params: { threshold: 0.2, min_finished: 1, soak_seconds: 0 }
concurrency: 2
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_releases_and_nodes_through_the_cli() {
    let served = serve().await;
    let c = served.client();
    let tmp = tempfile::tempdir().unwrap();
    fleet(&c).await;

    // Release add from a file: the runner computed the same sha256 and size.
    let (sha, size) = add_release(&c, tmp.path(), "1.13").await;
    let listed = remote::release_list(&c, Some("edgecore"), false)
        .await
        .unwrap();
    assert!(listed.contains("1.13.0"), "{listed}");
    assert!(listed.contains(&sha[..12]), "{listed}");
    assert!(listed.contains(&size.to_string()), "{listed}");
    assert!(listed.contains("uploaded"), "{listed}");

    // Node list with filters.
    let edge = remote::node_list(
        &c,
        &NodeFilter {
            labels: vec![("tier".into(), "edge".into())],
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    assert!(
        edge.contains("edge-05") && !edge.contains("core-01"),
        "{edge}"
    );
    assert!(edge.contains("tier=edge,region=eu"), "{edge}");
    assert!(edge.contains("never"), "{edge}");
    let offline_core = remote::node_list(
        &c,
        &NodeFilter {
            labels: vec![("tier".into(), "core".into())],
            online: Some(false),
            ..Default::default()
        },
        true,
    )
    .await
    .unwrap();
    let page: serde_json::Value = serde_json::from_str(&offline_core).unwrap();
    assert_eq!(page["total"], 1, "{offline_core}");
    assert_eq!(page["items"][0]["id"], "core-02", "{offline_core}");
    let on_1_11 = c
        .nodes(&NodeFilter {
            version: Some("v1.11".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(on_1_11.items.len(), 1);
    assert_eq!(on_1_11.items[0].id, "core-01");

    // Dry run: the plan and the final counts, nothing stored.
    let spec = parse_spec(SPEC).unwrap();
    let plan = task_create(&c, &spec, true, false).await.unwrap();
    assert!(plan.contains("dry run of edge-1-13"), "{plan}");
    assert!(plan.contains("would end succeeded"), "{plan}");
    assert!(plan.contains("canary"), "{plan}");
    let plan_json: serde_json::Value =
        serde_json::from_str(&task_create(&c, &spec, true, true).await.unwrap()).unwrap();
    let sizes: Vec<usize> = plan_json["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["nodes"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 5, "{plan_json}");
    assert_eq!(plan_json["counts"]["succeeded"], 5, "{plan_json}");
    assert!(
        c.tasks(None).await.unwrap().is_empty(),
        "a dry run stores nothing"
    );

    // Create, list, show.
    let created = task_create(&c, &spec, false, true).await.unwrap();
    let task: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let list = remote::task_list(&c, None, false).await.unwrap();
    assert!(list.contains(&id) && list.contains("edge-1-13"), "{list}");
    // No agents run here: the first wave is handed out and waits.
    let mut planned = false;
    for _ in 0..100 {
        if !c.task(&id).await.unwrap().task.waves.is_empty() {
            planned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(planned, "the task was planned within 5 s");
    let show = remote::task_show(&c, &id, false).await.unwrap();
    assert!(show.contains(&format!("task {id} (edge-1-13)")), "{show}");
    assert!(show.contains("edgecore to 1.13"), "{show}");
    assert!(show.contains("◀ current"), "{show}");
    assert!(show.contains("total"), "{show}");
    let view = c.task(&id).await.unwrap();
    assert_eq!(view.counts.values().sum::<usize>(), 5, "{show}");

    // Pause with a reason, the paused list, resume.
    let reason = ControlArgs {
        id: id.clone(),
        reason: Some("maintenance freeze".into()),
    };
    let paused = remote::control(&c, TaskAction::Pause, &reason, false)
        .await
        .unwrap();
    assert!(paused.contains("paused (maintenance freeze)"), "{paused}");
    let paused_list = remote::task_list(&c, Some("paused"), false).await.unwrap();
    assert!(paused_list.contains(&id), "{paused_list}");
    assert_eq!(
        remote::task_list(&c, Some("succeeded"), false)
            .await
            .unwrap(),
        "no succeeded tasks"
    );
    let plain = ControlArgs {
        id: id.clone(),
        reason: None,
    };
    let resumed = remote::control(&c, TaskAction::Resume, &plain, false)
        .await
        .unwrap();
    assert!(resumed.contains(": running"), "{resumed}");
    // Resuming a running task is refused with the engine's reason.
    let refused = c.control(&id, TaskAction::Resume, None).await.unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");

    // Cancel; watch ends at once on a final state, with each wave's progress.
    let cancelled = remote::control(&c, TaskAction::Cancel, &plain, true)
        .await
        .unwrap();
    let cancelled: serde_json::Value = serde_json::from_str(&cancelled).unwrap();
    assert_eq!(cancelled["state"]["state"], "cancelled", "{cancelled}");
    let mut lines = Vec::new();
    let opts = WatchOptions {
        interval: Duration::from_millis(50),
        bars: false,
        timeout: Some(Duration::from_secs(10)),
    };
    let end = remote::watch(&c, &id, &opts, &mut |l| lines.push(l))
        .await
        .unwrap();
    assert_eq!(end.task.state, TaskState::Cancelled);
    let text = lines.join("\n");
    assert!(text.contains("task.cancelled"), "{text}");
    assert!(text.contains("wave 1 "), "{text}");

    // The run lists and the event log.
    let runs = remote::task_runs(&c, &id, Some("cancelled"), false)
        .await
        .unwrap();
    assert!(
        runs.contains("edge-0") && runs.contains("cancelled"),
        "{runs}"
    );
    assert!(!runs.contains("core-0"), "{runs}");
    let none = remote::task_runs(&c, &id, Some("succeeded"), false)
        .await
        .unwrap();
    assert_eq!(none, format!("no succeeded node runs in task {id}"));
    let events = remote::task_events(&c, &id, false).await.unwrap();
    for kind in [
        "task.created",
        "policy.plan",
        "task.paused",
        "task.cancelled",
    ] {
        assert!(events.contains(kind), "{kind} in {events}");
    }
    assert!(events.contains("maintenance freeze"), "{events}");
    let mut followed = Vec::new();
    let last = remote::follow_events(
        &c,
        &id,
        true,
        Duration::from_millis(50),
        Some(Duration::from_secs(10)),
        &mut |l| followed.push(l),
    )
    .await
    .unwrap();
    assert_eq!(last.state, TaskState::Cancelled);
    let first: serde_json::Value = serde_json::from_str(&followed[0]).unwrap();
    assert_eq!(first["kind"], "task.created");

    // Unknown ids and a missing release say so.
    let err = remote::task_show(&c, "t999999", false).await.unwrap_err();
    assert!(err.to_string().contains("no task t999999"), "{err}");
    let mut later = spec.clone();
    later.name = "edge-2-0".into();
    later.target = flotilla_model::Target::Version("2.0".into());
    let err = format!(
        "{:#}",
        task_create(&c, &later, false, false).await.unwrap_err()
    );
    assert!(err.contains("no release edgecore 2.0"), "{err}");
    assert!(
        err.contains("hint: add it first: flotilla release add"),
        "{err}"
    );

    served.stop().await;
}

/// Agents for `nodes` that enroll, then take work and report success, until
/// `stop` is set or 30 s pass.
async fn succeeding_agents(
    url: String,
    nodes: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use flotilla_agent::client::RunnerClient as AgentClient;
    use flotilla_model::protocol::{Enroll, Report, ReportState, Work};
    let mut agents = Vec::new();
    for id in &nodes {
        let a = AgentClient::new(&url, id).unwrap();
        let enrolled = a
            .enroll(&Enroll {
                node_id: id.clone(),
                secret: String::new(),
                version: "1.12".into(),
                labels: vec![("tier".into(), "edge".into())],
                attributes: Vec::new(),
                asset_path: String::new(),
                healthy: true,
                schedulable: true,
            })
            .await
            .unwrap();
        a.set_token(Some(enrolled.token));
        agents.push(a);
    }
    let mut done = std::collections::HashSet::new();
    for _ in 0..600 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        for (id, a) in nodes.iter().zip(&agents) {
            if let Ok(Some(Work::Install { task, .. })) = a.work(0).await
                && done.insert((id.clone(), task.clone()))
            {
                for state in [
                    ReportState::Downloading,
                    ReportState::Upgrading,
                    ReportState::Verifying,
                    ReportState::Succeeded,
                ] {
                    a.report(&Report {
                        task: task.clone(),
                        state,
                        detail: String::new(),
                    })
                    .await
                    .unwrap();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_rollout_to_success_then_rollback() {
    let served = serve().await;
    let c = served.client();
    let tmp = tempfile::tempdir().unwrap();
    add_release(&c, tmp.path(), "1.13").await;
    let nodes: Vec<String> = (1..=5).map(|i| format!("edge-{i:02}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agents = tokio::spawn(succeeding_agents(
        served.url.clone(),
        nodes.clone(),
        stop.clone(),
    ));
    // Enrolled before the task targets them.
    for _ in 0..100 {
        if c.nodes(&NodeFilter::default()).await.unwrap().total == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = parse_spec(SPEC).unwrap();
    let task = c.create_task(&spec).await.unwrap();

    let mut lines = Vec::new();
    let opts = WatchOptions {
        interval: Duration::from_millis(100),
        bars: false,
        timeout: Some(Duration::from_secs(30)),
    };
    let end = remote::watch(&c, &task.id, &opts, &mut |l| lines.push(l))
        .await
        .unwrap();
    let text = lines.join("\n");
    assert_eq!(end.task.state, TaskState::Succeeded, "{text}");
    assert_eq!(end.counts.get("succeeded"), Some(&5), "{text}");
    assert!(text.contains("task.succeeded"), "{text}");
    let waves = end.task.waves.len();
    let last = &end.task.waves[waves - 1];
    let done = format!(
        "wave {waves} {}: {n}/{n} done, 0 failed",
        last.name,
        n = last.nodes.len()
    );
    assert!(text.contains(&done), "{done} in {text}");
    let show = remote::task_show(&c, &task.id, false).await.unwrap();
    assert!(show.contains(": succeeded"), "{show}");
    assert!(!show.contains("◀ current"), "{show}");
    let ok = remote::task_runs(&c, &task.id, Some("succeeded"), false)
        .await
        .unwrap();
    assert!(ok.contains("5 node runs"), "{ok}");
    let failed = remote::task_runs(&c, &task.id, Some("failed"), false)
        .await
        .unwrap();
    assert_eq!(failed, format!("no failed node runs in task {}", task.id));

    // An operator rollback of the succeeded task.
    let rb = remote::control(
        &c,
        TaskAction::Rollback,
        &ControlArgs {
            id: task.id.clone(),
            reason: Some("bad release".into()),
        },
        false,
    )
    .await
    .unwrap();
    assert!(rb.contains("rolling-back (bad release)"), "{rb}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), agents)
        .await
        .unwrap()
        .unwrap();
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_tokens() {
    let served = serve().await;
    let c = served.client();
    let tmp = tempfile::tempdir().unwrap();

    // The shipped canary under a new name: the hooks it implements.
    let up = remote::policy_upload(
        &c,
        "my-canary",
        &workspace().join("policies/canary.rhai"),
        false,
    )
    .await
    .unwrap();
    assert!(up.contains("uploaded policy my-canary (rhai"), "{up}");
    assert!(up.contains("plan") && up.contains("evaluate"), "{up}");
    assert!(up.contains("no (default)"), "{up}");
    assert!(up.contains("plan calls: in order"), "{up}");
    let list = remote::policy_list(&c, false).await.unwrap();
    assert!(
        list.contains("my-canary") && list.contains("plan, evaluate"),
        "{list}"
    );

    // A broken script is refused with the loader's reason and a hint.
    let broken = tmp.path().join("broken.rhai");
    std::fs::write(&broken, "fn select(ctx, nodes) { nodes.map(|n| \n").unwrap();
    let err = remote::policy_upload(&c, "broken", &broken, false)
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("policy broken: cannot load"), "{msg}");
    assert!(msg.contains("syntax error"), "{msg}");
    assert!(
        msg.contains("hint: run `flotilla policy check FILE`"),
        "{msg}"
    );
    let list = remote::policy_list(&c, true).await.unwrap();
    assert!(!list.contains("\"broken\""), "{list}");

    // A wrong token, and none at all: refused, and the message says what to do.
    for token in [Some("wrong".to_string()), None] {
        let bad = Client::new(&served.url, token).unwrap();
        let err = remote::task_list(&bad, None, false).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("missing or wrong management token"), "{msg}");
        assert!(
            msg.contains("hint: pass --token or set FLOTILLA_TOKEN"),
            "{msg}"
        );
        let api = err.downcast_ref::<ClientError>().unwrap();
        assert_eq!(api.status(), Some(401));
    }

    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_is_not_running() {
    // A port that was free a moment ago: nothing listens there now.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let c = Client::new(&url, None).unwrap();
    let err = remote::task_list(&c, None, false).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("cannot reach the runner at {url}")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "is `flotilla serve` running at {url}? set --server or FLOTILLA_SERVER"
        )),
        "{msg}"
    );
}

#[test]
fn remote_flags_parse_after_the_verb() {
    let cli = Cli::try_parse_from([
        "flotilla",
        "task",
        "pause",
        "t000001",
        "--reason",
        "freeze",
        "--server",
        "http://10.0.0.1:7878",
        "--token",
        "abc",
        "--json",
    ])
    .unwrap();
    let Command::Task(args) = cli.command else {
        panic!("not a task command: {:?}", cli.command);
    };
    assert_eq!(args.remote.server, "http://10.0.0.1:7878");
    assert_eq!(args.remote.token.as_deref(), Some("abc"));
    assert!(args.remote.json);
    // --file and --url are exclusive; --url needs its digest and size.
    for bad in [
        &[
            "flotilla",
            "release",
            "add",
            "--package",
            "p",
            "--version",
            "1",
        ][..],
        &[
            "flotilla",
            "release",
            "add",
            "--package",
            "p",
            "--version",
            "1",
            "--url",
            "https://x/p.tgz",
        ],
        &[
            "flotilla",
            "release",
            "add",
            "--package",
            "p",
            "--version",
            "1",
            "--file",
            "a",
            "--url",
            "https://x",
            "--sha256",
            "00",
            "--size",
            "1",
        ],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
    }
    let cli = Cli::try_parse_from([
        "flotilla",
        "node",
        "list",
        "--label",
        "tier=edge",
        "--label",
        "region=eu",
        "--online",
        "false",
    ])
    .unwrap();
    assert!(matches!(cli.command, Command::Node(_)));
    assert!(Cli::try_parse_from(["flotilla", "node", "list", "--label", "tier"]).is_err());
}

/// `flotilla token create|list|revoke|digest` and `flotilla audit` against a
/// runner: a token made by the verb works with its role, is listed without
/// its secret, stops working once revoked, and each call is in the audit
/// table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_audit_verbs() {
    let s = serve().await;
    let c = s.client();
    let out = remote::token_create(&c, "ci", "operate", false)
        .await
        .unwrap();
    assert!(out.contains("shown only this once"), "{out}");
    let secret = out
        .lines()
        .find(|l| l.starts_with("flt_"))
        .expect("the secret on a line of its own")
        .to_string();
    let ci = Client::new(&s.url, Some(secret.clone())).unwrap();
    // operate: may list tasks, may not list tokens (403 naming admin)
    ci.tasks(None).await.unwrap();
    let err = remote::token_list(&ci, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs role admin"), "{err}");

    let table = remote::token_list(&c, false).await.unwrap();
    assert!(table.contains("ci") && table.contains("operate"), "{table}");
    assert!(
        table.contains("config") && table.contains("admin"),
        "{table}"
    );
    assert!(!table.contains(&secret[4..]), "{table}");
    let listed: serde_json::Value =
        serde_json::from_str(&remote::token_list(&c, true).await.unwrap()).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    let out = remote::token_revoke(&c, "ci", false).await.unwrap();
    assert!(out.contains("revoked"), "{out}");
    match ci.tasks(None).await {
        Err(ClientError::Api { status: 401, .. }) => {}
        other => panic!("a revoked token: {other:?}"),
    }
    let err = remote::token_revoke(&c, "ci", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no token named ci"), "{err}");

    // digest: what `[[tokens]]` lists
    assert_eq!(
        remote::token_digest("s3cret\n").unwrap(),
        hex_sha256(b"s3cret")
    );
    assert!(remote::token_digest(" \n").is_err());

    let table = remote::audit(&c, None, 50, false).await.unwrap();
    for want in [
        "POST /v1/tokens",
        "201 ok",
        "DELETE /v1/tokens/ci",
        "404 refused: no token named ci",
    ] {
        assert!(table.contains(want), "{want}:\n{table}");
    }
    let page: serde_json::Value =
        serde_json::from_str(&remote::audit(&c, Some(0), 1, true).await.unwrap()).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["more"], true);
    let table = remote::audit(&c, Some(0), 1, false).await.unwrap();
    assert!(table.contains("more: flotilla audit --after 1"), "{table}");

    // the verbs parse
    for args in [
        vec!["flotilla", "token", "create", "x", "--role", "read"],
        vec!["flotilla", "token", "list", "--json"],
        vec!["flotilla", "token", "revoke", "x"],
        vec!["flotilla", "token", "digest"],
        vec!["flotilla", "audit", "--limit", "5", "--after", "3"],
    ] {
        Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    assert!(Cli::try_parse_from(["flotilla", "token", "create", "x", "--role", "root"]).is_err());
    s.stop().await;
}
