//! Certificates for tests that run a runner over TLS, made in process with
//! rcgen: a private CA, the runner's certificate (for `localhost` and
//! `127.0.0.1`) and client certificates whose subject CN names a node.
//!
//! ```ignore
//! let pki = tls::Pki::new(dir.path(), &["node-00"]);
//! // runner config: pki.runner_toml(false), or pki.runner_toml(true) for mutual TLS
//! // agents: pki.agent_args("node-00", true); reqwest: pki.ca_cert()
//! ```
//!
//! Also the in-process tests of the listener itself: the served
//! certificate reloaded on SIGHUP, refusals of plain HTTP off loopback.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use std::path::{Path, PathBuf};

/// A private CA and the files made with it, in one directory.
pub(crate) struct Pki {
    pub(crate) dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM): `--ca-file`, `tls.client_ca`.
    pub(crate) ca: PathBuf,
    /// The runner's certificate and key (PEM).
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

impl Pki {
    /// A CA named `name`, the runner's certificate and a client
    /// certificate for each of `nodes` (`<node>.crt`, `<node>.key`), in `dir`.
    pub(crate) fn new(dir: &Path, nodes: &[&str]) -> Pki {
        Pki::named(dir, "Flotilla test CA", nodes)
    }

    pub(crate) fn named(dir: &Path, name: &str, nodes: &[&str]) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut pki = Pki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(p, key),
            ca,
            cert: dir.join("runner.crt"),
            key: dir.join("runner.key"),
        };
        let (cert, key) = pki.server_cert("runner");
        pki.cert = cert;
        pki.key = key;
        for n in nodes {
            pki.client_cert(n);
        }
        pki
    }

    /// A new server certificate for `localhost` and 127.0.0.1 with
    /// organisation `org` (tests tell certificates apart by it):
    /// `<file>.crt`, `<file>.key`.
    pub(crate) fn server_cert(&self, file: &str) -> (PathBuf, PathBuf) {
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.distinguished_name.push(DnType::OrganizationName, file);
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        self.write(file, &p)
    }

    /// A client certificate with CN `node` (`<node>.crt`, `<node>.key`).
    pub(crate) fn client_cert(&self, node: &str) -> (PathBuf, PathBuf) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, node);
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
        self.write(node, &p)
    }

    fn write(&self, file: &str, params: &CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(self.dir.join(format!("{file}.der")), cert.der()).unwrap();
        (c, k)
    }

    /// The runner's `tls = { ... }` line; with `mutual`, `client_ca` too.
    pub(crate) fn runner_toml(&self, mutual: bool) -> String {
        let ca = if mutual {
            format!(", client_ca = {:?}", self.ca)
        } else {
            String::new()
        };
        format!(
            "tls = {{ cert = {:?}, key = {:?}{ca} }}\n",
            self.cert, self.key
        )
    }

    /// The runner's `tls` setting as a value.
    pub(crate) fn runner_config(&self, mutual: bool) -> flotilla_server::tls::TlsConfig {
        flotilla_server::tls::TlsConfig::Files(flotilla_server::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: mutual.then(|| self.ca.clone()),
        })
    }

    /// An agent's flags: `--ca-file`, and with `cert` its client certificate.
    pub(crate) fn agent_args(&self, node: &str, cert: bool) -> Vec<String> {
        let mut a = vec!["--ca-file".to_string(), self.ca.display().to_string()];
        if cert {
            a.extend([
                "--client-cert".to_string(),
                self.dir.join(format!("{node}.crt")).display().to_string(),
                "--client-key".to_string(),
                self.dir.join(format!("{node}.key")).display().to_string(),
            ]);
        }
        a
    }

    /// The DER of a certificate made here, to compare with the one served.
    pub(crate) fn der(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("{file}.der"))).unwrap()
    }

    /// The CA as reqwest takes it.
    pub(crate) fn ca_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap()
    }

    /// A reqwest identity from a client certificate made by [`Pki::client_cert`].
    pub(crate) fn identity(&self, node: &str) -> reqwest::Identity {
        let mut pem = std::fs::read(self.dir.join(format!("{node}.crt"))).unwrap();
        pem.extend(std::fs::read(self.dir.join(format!("{node}.key"))).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }
}

// ----- the listener, in process -----

use flotilla_server::{Config, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Serves `runner` on 127.0.0.1 over TLS until the sender is used or
/// dropped: its `https://` base URL, the stop sender and the serving task.
pub(crate) async fn serve_tls_on_loopback(
    runner: Runner,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    assert!(runner.tls.is_some(), "the runner has no tls files");
    let (http_base, tx, served) = crate::api::serve_on_loopback(runner).await;
    (http_base.replacen("http://", "https://", 1), tx, served)
}

fn client(pki: &Pki, node: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(pki.ca_cert())
        .timeout(Duration::from_secs(20));
    if let Some(n) = node {
        b = b.identity(pki.identity(n));
    }
    b.build().unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn a_public_listener_without_tls_is_refused_unless_a_proxy_is_declared() {
    let long = "0123456789abcdef".repeat(4);
    let dir = tempfile::tempdir().unwrap();
    let open = |tls: Option<flotilla_server::tls::TlsConfig>, name: &str| {
        Runner::open(Config {
            listen: "0.0.0.0:0".parse().unwrap(),
            data: dir.path().join(name),
            token: Some(long.clone()),
            enroll_secret: Some(long.clone()),
            tls,
            ..Config::default()
        })
        .map(drop)
        .map_err(|e| e.to_string())
    };
    let err = open(None, "plain").unwrap_err();
    assert!(err.contains("without TLS"), "{err}");
    assert!(err.contains("tls = { cert = "), "says what to set: {err}");
    assert!(
        err.contains(r#"tls = \"proxy\""#) || err.contains(r#"tls = "proxy""#),
        "{err}"
    );
    assert!(
        !dir.path().join("plain").exists(),
        "refused before anything is opened"
    );
    open(Some(flotilla_server::tls::TlsConfig::Proxy), "proxy").unwrap();
    let pki = Pki::new(&dir.path().join("pki"), &[]);
    open(Some(pki.runner_config(false)), "native").unwrap();
    // A missing file stops the start, naming it.
    let mut missing = pki.runner_config(false);
    if let flotilla_server::tls::TlsConfig::Files(f) = &mut missing {
        f.key = dir.path().join("nope.key");
    }
    let err = open(Some(missing), "missing").unwrap_err();
    assert!(
        err.contains("cannot read the key") && err.contains("nope.key"),
        "{err}"
    );

    // Loopback stays allowed without TLS (tests, the demo).
    Runner::open(Config {
        data: dir.path().join("loopback"),
        ..Config::default()
    })
    .unwrap();

    // The binary: the reason on stderr, a failure exit, nothing listening.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-e2e"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path().join("bin"))
        .env("FLOTILLA_TOKEN", &long)
        .env("FLOTILLA_ENROLL_SECRET", &long)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("without TLS") && stderr.contains("proxy"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_binds_every_agent_route_to_the_certificates_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), &["a1", "a2"]);
    let runner = Runner::open(Config {
        data: dir.path().join("data"),
        tick_ms: 20,
        enroll_secret: Some(crate::api::ENROLL.into()),
        token: Some("mgmt".into()),
        tls: Some(pki.runner_config(true)),
        ..Config::default()
    })
    .unwrap();
    let (base, stop, served) = serve_tls_on_loopback(runner).await;
    let (a1, a2, none) = (
        client(&pki, Some("a1")),
        client(&pki, Some("a2")),
        client(&pki, None),
    );
    let enroll =
        |node: &str| json!({"node_id": node, "secret": crate::api::ENROLL, "version": "1.0.0"});
    let url = |p: &str| format!("{base}{p}");

    // Enrollment: only as the certificate's node.
    let (s, e) = send(a1.post(url("/v1/agents/enroll")).json(&enroll("a2"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("names node a1; it cannot act for node a2"),
        "{e}"
    );
    let (s, e) = send(none.post(url("/v1/agents/enroll")).json(&enroll("a1"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(e["hint"].as_str().unwrap().contains("--client-cert"), "{e}");
    let (s, t1) = send(a1.post(url("/v1/agents/enroll")).json(&enroll("a1"))).await;
    assert_eq!(s, StatusCode::OK, "{t1}");
    let t1 = t1["token"].as_str().unwrap().to_string();
    let (s, t2) = send(a2.post(url("/v1/agents/enroll")).json(&enroll("a2"))).await;
    assert_eq!(s, StatusCode::OK, "{t2}");

    // a1's token with a2's certificate (or none) acts for nobody.
    let hb = json!({"version": "1.0.0"});
    for (who, c) in [("a2's certificate", &a2), ("no certificate", &none)] {
        for (method, path, body) in [
            ("POST", "/v1/agents/a1/heartbeat", Some(hb.clone())),
            ("GET", "/v1/agents/a1/work?wait=0", None),
            ("POST", "/v1/agents/a1/request", None),
            (
                "POST",
                "/v1/agents/a1/report",
                Some(json!({"task": "t1", "state": "downloading"})),
            ),
            ("GET", "/v1/releases/edge/1.0.0/artifact", None),
        ] {
            let mut req = c
                .request(method.parse().unwrap(), url(path))
                .bearer_auth(&t1);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let (s, e) = send(req).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path} with {who}: {e}");
        }
    }
    let (s, e) = send(
        a1.post(url("/v1/agents/a1/heartbeat"))
            .bearer_auth(&t1)
            .json(&hb),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{e}");

    // The management API needs its token, not a client certificate.
    let (s, nodes) = send(none.get(url("/v1/nodes")).bearer_auth("mgmt")).await;
    assert_eq!(s, StatusCode::OK, "{nodes}");
    assert_eq!(nodes["items"].as_array().unwrap().len(), 2);
    let (s, _) = send(none.get(url("/healthz"))).await;
    assert_eq!(s, StatusCode::OK);

    // A certificate from another CA fails the handshake.
    let stranger = Pki::named(&dir.path().join("other"), "another CA", &["a1"]);
    let foreign = reqwest::Client::builder()
        .add_root_certificate(pki.ca_cert())
        .identity(stranger.identity("a1"))
        .build()
        .unwrap();
    let err = foreign.get(url("/healthz")).send().await;
    assert!(err.is_err(), "{err:?}");

    let _ = stop.send(());
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_finish_its_tls_handshake_is_closed_at_the_header_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), &[]);
    let mut config = Config {
        data: dir.path().join("data"),
        tls: Some(pki.runner_config(false)),
        ..Config::default()
    };
    config.http.header_read_timeout_seconds = 1;
    config.http.idle_timeout_seconds = 30;
    let runner = Runner::open(config).unwrap();
    let (base, stop, served) = serve_tls_on_loopback(runner).await;
    let addr = base.trim_start_matches("https://").to_string();

    // Silent, and a trickle of a ClientHello: both closed after ~1 s, not
    // the 30 s idle timeout.
    for trickle in [false, true] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let t0 = Instant::now();
        if trickle {
            s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        }
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "trickle={trickle}: still open after 10 s");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "trickle={trickle}: closed after {took:?}"
        );
    }
    // And the listener still serves TLS.
    let (s, _) = send(client(&pki, None).get(format!("{base}/healthz"))).await;
    assert_eq!(s, StatusCode::OK);
    let _ = stop.send(());
    served.await.unwrap();
}
