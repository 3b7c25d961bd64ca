//! The runner's edge against a network peer that means harm: connections
//! that send nothing or crawl, crowds of idle sockets, stalled requests,
//! oversized and hostile agent input, metric series from made-up names, and
//! short secrets on a public address. Each test is an attack that worked
//! before the runner was hardened.

use super::api::{ENROLL, Harness};
use flotilla_server::{Config, HttpLimits, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tune_http(tune: impl FnOnce(&mut HttpLimits)) -> impl FnOnce(&mut Config) {
    move |c| tune(&mut c.http)
}

async fn connect(h: &Harness) -> TcpStream {
    TcpStream::connect(h.url("").trim_start_matches("http://"))
        .await
        .unwrap()
}

/// How long until the runner closes `s` (end of stream or reset), reading
/// and dropping whatever it answers meanwhile; `None` if still open after
/// `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + within).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A request on a new connection (a new client), timed.
async fn fresh(
    h: &Harness,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let start = Instant::now();
    let mut req = client.request(method.parse().unwrap(), h.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    res.bytes().await.unwrap();
    (status, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let d = HttpLimits::default();
    assert!(
        d.idle_timeout_seconds <= 30 && d.header_read_timeout_seconds <= d.idle_timeout_seconds,
        "by default an idle connection is closed within 30 s: {d:?}"
    );
    let h = Harness::start(tune_http(|l| {
        l.header_read_timeout_seconds = 1;
        l.idle_timeout_seconds = 2;
    }))
    .await;

    // Opened, nothing sent: the idle clock (2 s), not the header one (1 s).
    let mut s = connect(&h).await;
    let took = closed_within(&mut s, Duration::from_secs(6))
        .await
        .expect("an idle connection is closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // Kept alive after a request: closed once idle for the idle timeout.
    let mut s = connect(&h).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: runner\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let took = closed_within(&mut s, Duration::from_secs(6))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // An idle connection does not hold up a graceful stop.
    let mut idle = connect(&h).await;
    let stopped = Instant::now();
    h.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(2))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_dropped() {
    let h = Harness::start(tune_http(|l| {
        l.header_read_timeout_seconds = 1;
        l.idle_timeout_seconds = 30;
    }))
    .await;
    let s = connect(&h).await;
    let (mut read, mut write) = s.into_split();
    // One header line every 2 s, never the blank line that ends the head.
    let crawler = tokio::spawn(async move {
        let mut lines = vec!["GET /healthz HTTP/1.1\r\n".to_string()];
        lines.extend((0..5).map(|i| format!("X-Slow-{i}: yes\r\n")));
        for line in lines {
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(6), read.read(&mut buf))
        .await
        .expect("the slow client is dropped")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    crawler.abort();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_lock_out_healthz_or_enrollment() {
    // Both ends of every socket live in this process: two descriptors each.
    let limit = flotilla_server::connections::raise_file_limit().unwrap_or(4096);
    let crowd = 1500.min(limit.saturating_sub(256) / 2);
    assert!(crowd >= 500, "file limit {limit} is too low for this test");

    // Far below the cap: the crowd just sits there.
    let h = Harness::start(|_| {}).await;
    let mut idle = Vec::with_capacity(crowd);
    for _ in 0..crowd {
        idle.push(connect(&h).await);
    }
    let (s, took) = fresh(&h, "GET", "/healthz", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "{crowd} idle sockets: /healthz took {took:?}"
    );
    let enroll = json!({"node_id": "n1", "secret": ENROLL, "version": "1.0.0"});
    let (s, took) = fresh(&h, "POST", "/v1/agents/enroll", Some(enroll)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "{crowd} idle sockets: enrollment took {took:?}"
    );
    drop(idle);
    h.stop().await;

    // At the cap: an idle socket makes room; a long poll in progress keeps its place.
    let h = Harness::start(tune_http(|l| l.max_connections = 64)).await;
    let token = h.enroll("n1", "1.0.0").await;
    let enrolled_seen = h.get("/v1/nodes/n1").await.1["last_seen"].as_u64().unwrap();
    // The poll marks the node seen: distinct from the enrollment's millisecond.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let poll = {
        let url = h.url("/v1/agents/n1/work?wait=3");
        tokio::spawn(async move {
            let started = Instant::now();
            let res = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (res.status(), started.elapsed())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.get("/v1/nodes/n1").await.1["last_seen"].as_u64() == Some(enrolled_seen) {
        assert!(Instant::now() < deadline, "the long poll did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(connect(&h).await);
    }
    let (s, took) = fresh(&h, "GET", "/healthz", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "at the cap: /healthz took {took:?}"
    );
    let enroll = json!({"node_id": "n2", "secret": ENROLL, "version": "1.0.0"});
    let (s, took) = fresh(&h, "POST", "/v1/agents/enroll", Some(enroll)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        took < Duration::from_secs(2),
        "at the cap: enrollment took {took:?}"
    );
    let (s, waited) = poll.await.unwrap();
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        waited >= Duration::from_millis(2500),
        "the long poll was cut: {waited:?}"
    );
    // The oldest idle sockets made room: at most the cap are still open.
    let mut open = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(20)).await.is_none() {
            open += 1;
        }
    }
    assert!(
        open <= 64,
        "{open} of 200 idle sockets still open with a cap of 64"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_times_out_but_the_long_poll_may_wait() {
    let h = Harness::start(tune_http(|l| l.request_timeout_seconds = 1)).await;
    let token = h.enroll("n1", "1.0.0").await;

    // A body promised and never sent: 408 after the request timeout.
    let mut s = connect(&h).await;
    s.write_all(
        b"POST /v1/agents/enroll HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"node_id\"",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 408");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // The long poll is exempt: it waits the 3 s it asked for.
    let started = Instant::now();
    let res = h
        .http
        .get(h.url("/v1/agents/n1/work?wait=3"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_hook_names_do_not_grow_metrics() {
    let h = Harness::start(|_| {}).await;
    let before = h.metrics().await.len();
    for i in 0..3000 {
        let res = h
            .http
            .post(h.url(&format!("/v1/hooks/made-up-{i}")))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
    let text = h.metrics().await;
    assert!(
        text.len() < before + 300,
        "/metrics grew from {before} to {} bytes",
        text.len()
    );
    assert!(text.contains(r#"hook="unknown""#), "{text}");
    assert!(!text.contains("made-up"), "{text}");
    h.stop().await;
}

/// The status line the runner answers to a POST that announces 560 KiB and
/// sends 80 KiB of it. (A client that writes it all before reading may see
/// the connection reset instead: the runner does not read what it refuses.)
async fn oversized(h: &Harness, path: &str, token: &str) -> String {
    let mut s = connect(h).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: runner\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        560 * 1024
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(&vec![b' '; 80 * 1024]).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_routes_cap_bodies_and_refuse_hostile_facts() {
    let h = Harness::start(|c| c.max_body_bytes = 64 * 1024).await;
    let token = h.enroll("n1", "1.0.0").await;

    // 560 KiB bodies on the agents' routes: 413, as everywhere else.
    for route in ["enroll", "n1/heartbeat", "n1/report"] {
        let status = oversized(&h, &format!("/v1/agents/{route}"), &token).await;
        assert!(status.starts_with("HTTP/1.1 413"), "{route}: {status:?}");
    }

    // A 60 KB version with ANSI escapes and CRLF: 422 naming the field, nothing stored.
    let hostile = format!(
        "1.0.0\u{1b}[2J\u{1b}[31mPWNED\r\nX-Injected: yes\r\n{}",
        "9".repeat(60_000)
    );
    let (s, e) = h
        .post(
            "/v1/agents/enroll",
            json!({"node_id": "evil", "secret": ENROLL, "version": hostile}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let error = e["error"].as_str().unwrap();
    assert!(
        error.starts_with("version:") && error.len() < 300,
        "{error}"
    );
    let (s, _) = h.get("/v1/nodes/evil").await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a refused enrollment stores nothing"
    );

    for (field, enroll) in [
        (
            "labels.tier",
            json!({"labels": [["tier", "edge\u{1b}[0m"]]}),
        ),
        ("labels", json!({"labels": [["bad key", "v"]]})),
        (
            "attributes",
            json!({"attributes": (0..65).map(|i| (format!("k{i}"), "v")).collect::<Vec<_>>()}),
        ),
        ("asset_path", json!({"asset_path": "/site-1\r\n/rack-2"})),
        ("version", json!({"version": "latest"})),
    ] {
        let mut body = enroll;
        body["node_id"] = "evil".into();
        body["secret"] = ENROLL.into();
        let (s, e) = h.post("/v1/agents/enroll", body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {e}");
        assert!(
            e["error"].as_str().unwrap().starts_with(field),
            "{field}: {e}"
        );
    }
    let (s, _) = h.get("/v1/nodes/evil").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A heartbeat is held to the same rules; the stored version stays.
    let (s, e) = h
        .send(
            "POST",
            "/v1/agents/n1/heartbeat",
            Some(json!({"version": hostile}).to_string().into_bytes()),
            Some(&token),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e["error"].as_str().unwrap().starts_with("version:"), "{e}");
    let (_, n) = h.get("/v1/nodes/n1").await;
    assert_eq!(n["version"], "1.0.0");

    // And so is an operator's PUT of a node.
    let (s, e) = h
        .put("/v1/nodes/n9", json!({"labels": [["zone", "a\nb"]]}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    h.stop().await;
}

#[test]
fn a_public_listener_refuses_short_secrets_before_it_binds() {
    let long = "0123456789abcdef".repeat(4);
    let open = |token: &str, secret: &str| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let r = Runner::open(Config {
            listen: "0.0.0.0:0".parse().unwrap(),
            data: data.clone(),
            token: Some(token.into()),
            enroll_secret: Some(secret.into()),
            tls: Some(flotilla_server::tls::TlsConfig::Proxy),
            ..Config::default()
        });
        (r.err().map(|e| e.to_string()), data.exists())
    };
    let (err, opened) = open("x", &long);
    let err = err.expect("a 1-character token is refused");
    assert!(err.contains("management token of 1 characters"), "{err}");
    assert!(err.contains("openssl rand -hex 32"), "{err}");
    assert!(!opened, "refused before the data directory is opened");
    let (err, _) = open(&long, "y");
    assert!(err.expect("refused").contains("enrollment secret"));
    let (err, _) = open(&long[..32], &long[..32]);
    assert!(err.is_none(), "{err:?}");

    // The binary: a non-zero exit and the reason, with nothing listening.
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-e2e"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(data.path().join("d"))
        .env("FLOTILLA_TOKEN", "short")
        .env("FLOTILLA_ENROLL_SECRET", &long)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`flotilla serve` with a short token is still running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("at least 32") && stderr.contains("openssl rand -hex 32"),
        "{stderr}"
    );
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(!data.path().join("d").exists());
}

/// A runner process started with a file limit of 256, killed on drop.
struct LowLimitRunner {
    child: std::process::Child,
    addr: String,
    _data: tempfile::TempDir,
}

impl LowLimitRunner {
    fn start() -> LowLimitRunner {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let data = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-e2e"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data.path().join("d"))
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_ENROLL_SECRET")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 256, 256)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        else {
            let _ = child.kill();
            panic!("the runner did not start: {line:?}");
        };
        LowLimitRunner {
            addr: addr.to_string(),
            child,
            _data: data,
        }
    }

    /// One request on a new connection: its status line and how long it took.
    fn request(&self, head: &str, body: &str) -> (String, Duration) {
        use std::io::{Read as _, Write as _};
        let start = Instant::now();
        let addr = self.addr.parse().unwrap();
        let mut s = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => return (format!("no connection: {e}"), start.elapsed()),
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "{head}\r\nHost: runner\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        (
            answer.lines().next().unwrap_or("").to_string(),
            start.elapsed(),
        )
    }
}

impl Drop for LowLimitRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn with_a_file_limit_of_256_a_crowd_of_idle_sockets_does_not_lock_out_healthz() {
    let runner = LowLimitRunner::start();
    let addr: std::net::SocketAddr = runner.addr.parse().unwrap();
    let (mut crowd, mut refused) = (Vec::new(), 0);
    while crowd.len() < 1500 && refused < 20 {
        // A runner that stops accepting (as one did at its file limit) lets
        // the backlog fill, and then a connect waits: give up on those soon.
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => crowd.push(s),
            Err(_) => refused += 1,
        }
    }
    let (status, took) = runner.request("GET /healthz HTTP/1.1", "");
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "{status:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "/healthz took {took:?}");
    let (status, took) = runner.request(
        "POST /v1/agents/enroll HTTP/1.1",
        r#"{"node_id": "n1", "secret": "", "version": "1.0.0"}"#,
    );
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "{status:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "enrollment took {took:?}");
    assert!(
        crowd.len() > 1000,
        "only {} idle sockets opened",
        crowd.len()
    );
}
