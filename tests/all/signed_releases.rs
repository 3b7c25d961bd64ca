//! Issue 14, point 2 at the runner: `release_keys` and
//! `require_signed_releases` refuse unsigned or wrongly signed releases at
//! upload (422 naming the problem, nothing stored), and a signature is
//! stored with its release and handed to the agents with the work. The
//! node's own check is in `e2e::signed` and the agent's unit tests.

use crate::api::Harness;
use flotilla_model::signing::trusted_comment;
use flotilla_server::{Config, Runner};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::process::Command;

/// A minisign key pair made in process: its public key line and the pair.
pub(crate) fn keypair() -> (String, minisign::KeyPair) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    (kp.pk.to_base64(), kp)
}

/// A `.minisig` of `bytes` with `comment` as its trusted comment.
pub(crate) fn sign(kp: &minisign::KeyPair, bytes: &[u8], comment: &str) -> String {
    minisign::sign(Some(&kp.pk), &kp.sk, bytes, Some(comment), None)
        .unwrap()
        .into_string()
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `bytes` signed as release `package` `version`.
pub(crate) fn sign_release(
    kp: &minisign::KeyPair,
    package: &str,
    version: &str,
    bytes: &[u8],
) -> String {
    sign(
        kp,
        bytes,
        &trusted_comment(package, version, &sha256(bytes), bytes.len() as u64),
    )
}

async fn create(h: &Harness, version: &str, signature: Option<&str>) -> (StatusCode, Value) {
    let mut body = json!({"package": "edge", "version": version});
    if let Some(s) = signature {
        body["signature"] = json!(s);
    }
    h.post("/v1/releases", body).await
}

async fn upload(h: &Harness, version: &str, bytes: &[u8]) -> (StatusCode, Value) {
    h.send(
        "PUT",
        &format!("/v1/releases/edge/{version}/artifact"),
        Some(bytes.to_vec()),
        None,
    )
    .await
}

async fn stored(h: &Harness, version: &str) -> Option<Value> {
    let (_, list) = h.get("/v1/releases?package=edge").await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == version)
        .cloned()
}

fn refused(what: &str, (status, body): (StatusCode, Value), needle: &str) {
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
    let text = body.to_string();
    assert!(text.contains(needle), "{what}: {needle:?} not in {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_refuses_unsigned_and_wrongly_signed_releases_with_422_and_stores_nothing() {
    let (pub_line, kp) = keypair();
    let (_, stranger) = keypair();
    let h = Harness::start(|c| {
        c.release_keys = vec![pub_line.clone()];
        c.require_signed_releases = true;
    })
    .await;
    let bytes = b"edge 2.0.0 artifact".to_vec();

    refused(
        "unsigned",
        create(&h, "2.0.0", None).await,
        "has no signature",
    );
    refused(
        "unknown key",
        create(
            &h,
            "2.0.0",
            Some(&sign_release(&stranger, "edge", "2.0.0", &bytes)),
        )
        .await,
        "not among the runner's release_keys",
    );
    refused(
        "another version",
        create(
            &h,
            "2.0.0",
            Some(&sign_release(&kp, "edge", "1.0.0", &bytes)),
        )
        .await,
        "version 1.0.0 (not 2.0.0)",
    );
    refused(
        "another package",
        create(
            &h,
            "2.0.0",
            Some(&sign_release(&kp, "core", "2.0.0", &bytes)),
        )
        .await,
        "package core (not edge)",
    );
    refused(
        "not a flotilla comment",
        create(&h, "2.0.0", Some(&sign(&kp, &bytes, "timestamp:1"))).await,
        "not a flotilla release's",
    );
    refused(
        "not a signature",
        create(&h, "2.0.0", Some("untrusted comment: x\nRWQ\n")).await,
        "not a minisign signature",
    );
    assert!(
        stored(&h, "2.0.0").await.is_none(),
        "a refused release was stored"
    );

    // Registered with a good signature: only the signed bytes are taken.
    let good = sign_release(&kp, "edge", "2.0.0", &bytes);
    let (s, r) = create(&h, "2.0.0", Some(&good)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let mut swapped = bytes.clone();
    swapped[0] ^= 1;
    refused(
        "other bytes of the same size",
        upload(&h, "2.0.0", &swapped).await,
        "the signature's trusted comment names another release",
    );
    refused(
        "other bytes of another size",
        upload(&h, "2.0.0", b"short").await,
        "size",
    );
    assert_eq!(stored(&h, "2.0.0").await.unwrap()["sha256"], "");
    let (s, r) = upload(&h, "2.0.0", &bytes).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let rec = stored(&h, "2.0.0").await.unwrap();
    assert_eq!(rec["sha256"], sha256(&bytes));
    assert_eq!(
        rec["signature"], good,
        "the signature is stored with the release"
    );

    // A trusted comment edited to name other bytes: the comment matches the
    // upload, the signature does not verify over it.
    let forged_bytes = b"edge 2.1.0 but not what was signed".to_vec();
    let honest = sign_release(&kp, "edge", "2.1.0", b"the bytes that were signed");
    let mut lines: Vec<String> = honest.lines().map(str::to_string).collect();
    lines[2] = format!(
        "trusted comment: {}",
        trusted_comment(
            "edge",
            "2.1.0",
            &sha256(&forged_bytes),
            forged_bytes.len() as u64
        )
    );
    let (s, r) = create(&h, "2.1.0", Some(&lines.join("\n"))).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    refused(
        "a forged comment",
        upload(&h, "2.1.0", &forged_bytes).await,
        "bad signature",
    );
    assert_eq!(stored(&h, "2.1.0").await.unwrap()["sha256"], "");

    // A URL release: the comment must name its sha256 and size.
    let url = |v: &str, sig: &str, sha: &str| {
        json!({"package": "edge", "version": v, "url": "https://example.invalid/a.tar.gz",
               "sha256": sha, "size": bytes.len(), "signature": sig})
    };
    let (s, r) = h
        .post(
            "/v1/releases",
            url(
                "3.0.0",
                &sign_release(&kp, "edge", "3.0.0", &bytes),
                &sha256(b"x"),
            ),
        )
        .await;
    refused("a url release's other sha256", (s, r), "sha256");
    let (s, r) = h
        .post(
            "/v1/releases",
            url(
                "3.0.0",
                &sign_release(&kp, "edge", "3.0.0", &bytes),
                &sha256(&bytes),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_but_no_requirement_an_unsigned_release_passes_and_a_given_signature_must_verify()
{
    let (pub_line, _) = keypair();
    let (_, stranger) = keypair();
    let h = Harness::start(|c| c.release_keys = vec![pub_line.clone()]).await;
    let bytes = b"edge 2.0.0".to_vec();
    let (s, r) = create(&h, "2.0.0", None).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, r) = upload(&h, "2.0.0", &bytes).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    refused(
        "a signature by another key",
        create(
            &h,
            "2.1.0",
            Some(&sign_release(&stranger, "edge", "2.1.0", &bytes)),
        )
        .await,
        "not among the runner's release_keys",
    );
}

#[test]
fn release_keys_are_checked_when_the_runner_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |keys: Vec<String>, require: bool| {
        Runner::open(Config {
            data: tmp.path().join("data"),
            release_keys: keys,
            require_signed_releases: require,
            ..Config::default()
        })
        .err()
        .map(|e| e.to_string())
    };
    let err = open(Vec::new(), true).expect("required without keys");
    assert!(err.contains("needs at least one key"), "{err}");
    let err = open(vec!["not-a-key".into()], false).expect("a bad key");
    assert!(err.contains("release_keys[0]"), "{err}");
}

/// A signature made by the `minisign` CLI (installed by .ci/run) is taken:
/// the format the docs tell users to sign with in CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_made_by_the_minisign_cli_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("minisign")
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("the minisign CLI is needed for this test (apt-get install minisign): {e}")
            });
        assert!(out.status.success(), "minisign {args:?}: {out:?}");
    };
    run(&["-G", "-W", "-p", "release.pub", "-s", "release.key"]);
    let bytes = b"edge 2.0.0 from CI".to_vec();
    std::fs::write(tmp.path().join("edge.tar.gz"), &bytes).unwrap();
    let comment = trusted_comment("edge", "2.0.0", &sha256(&bytes), bytes.len() as u64);
    run(&[
        "-S",
        "-s",
        "release.key",
        "-m",
        "edge.tar.gz",
        "-t",
        &comment,
        "-x",
        "edge.minisig",
    ]);
    // The key as a .pub file path, as the docs show.
    let pub_file = tmp.path().join("release.pub").display().to_string();
    let h = Harness::start(|c| {
        c.release_keys = vec![pub_file];
        c.require_signed_releases = true;
    })
    .await;
    let sig = std::fs::read_to_string(tmp.path().join("edge.minisig")).unwrap();
    let (s, r) = create(&h, "2.0.0", Some(&sig)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, r) = upload(&h, "2.0.0", &bytes).await;
    assert_eq!(s, StatusCode::OK, "{r}");
}

/// `flotilla release sign` with a password-less key made by the minisign
/// CLI (`-G -W`): the signature verifies with `minisign -V` and names the
/// release in its trusted comment (the version normalised).
#[test]
fn flotilla_release_sign_makes_a_signature_the_minisign_cli_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |prog: &str, args: &[&str]| {
        let out = Command::new(prog)
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap_or_else(|e| panic!("{prog} (the minisign CLI: apt-get install minisign): {e}"));
        assert!(out.status.success(), "{prog} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("minisign", &["-G", "-W", "-p", "k.pub", "-s", "k.key"]);
    let bytes = b"edge 1.4 artifact".to_vec();
    std::fs::write(tmp.path().join("edge.tar.gz"), &bytes).unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_flotilla-e2e"),
        &[
            "release",
            "sign",
            "--key",
            "k.key",
            "edge.tar.gz",
            "--package",
            "edge",
            "--version",
            "1.4",
        ],
    );
    assert!(out.contains("edge.tar.gz.minisig"), "{out}");
    run(
        "minisign",
        &[
            "-V",
            "-p",
            "k.pub",
            "-m",
            "edge.tar.gz",
            "-x",
            "edge.tar.gz.minisig",
        ],
    );
    let sig = std::fs::read_to_string(tmp.path().join("edge.tar.gz.minisig")).unwrap();
    assert_eq!(
        flotilla_model::signing::signature_comment(&sig),
        Some(trusted_comment("edge", "1.4.0", &sha256(&bytes), bytes.len() as u64).as_str())
    );
}

/// A `release_keys` file the disk cannot read while the runner runs (it is
/// read at each signed call, so a rotated key takes effect without a
/// restart) is a fault: 503 with `Retry-After`, nothing stored, and the same
/// call goes through once the file is back. Answered 500 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_key_file_the_disk_cannot_read_answers_503_not_500() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, kp) = keypair();
    let key_file = tmp.path().join("release.pub");
    let pub_file = kp.pk.to_box().unwrap().into_string();
    std::fs::write(&key_file, &pub_file).unwrap();
    let h = Harness::start(|c| {
        c.release_keys = vec![key_file.display().to_string()];
        c.require_signed_releases = true;
    })
    .await;
    let bytes = b"edge 2.1.0".to_vec();
    let sig = sign_release(&kp, "edge", "2.1.0", &bytes);

    std::fs::remove_file(&key_file).unwrap();
    std::fs::create_dir(&key_file).unwrap(); // reading it fails (EISDIR)
    let res = h
        .http
        .post(h.url("/v1/releases"))
        .json(&json!({"package": "edge", "version": "2.1.0", "signature": sig}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert!(stored(&h, "2.1.0").await.is_none(), "stored on a fault");

    std::fs::remove_dir(&key_file).unwrap();
    std::fs::write(&key_file, &pub_file).unwrap();
    let (s, r) = create(&h, "2.1.0", Some(&sig)).await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, r) = upload(&h, "2.1.0", &bytes).await;
    assert_eq!(s, StatusCode::OK, "{r}");
}
