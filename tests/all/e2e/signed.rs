//! Issue 14, points 2-4 with real agent processes: a node with
//! `--trusted-key` installs a release signed by that key and refuses, with
//! nothing unpacked or run, an unsigned one, one signed by another key, one
//! whose trusted comment names another version and one whose artifact was
//! swapped on the runner after signing; a node refuses a remote downgrade
//! unless its own config allows it, and a task's rollback to the release it
//! just left stays possible.
//!
//! The runner here has no `release_keys`: it takes whatever it is given, as
//! a careless or compromised runner would, so the node's check is what is
//! tested. Everything runs over TLS with a private CA, as a fleet would
//! (`tls_cluster`).

use super::*;
use crate::signed_releases::{keypair, sign_release};
use crate::tls::Pki;

/// A runner serving TLS with a certificate of a private CA, and the flags
/// that make an agent trust that CA. The directory of the CA goes with the
/// cluster (dropped after it).
fn tls_cluster() -> (Cluster, tempfile::TempDir, Vec<String>) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(pki_dir.path(), &[]);
    let c = Cluster::start_tls(
        &format!("enroll_secret = {SECRET:?}\n{}", pki.runner_toml(false)),
        Some(&pki.ca),
    );
    assert!(c.url().starts_with("https://"), "{}", c.url());
    let flags = pki.agent_args("", false);
    (c, pki_dir, flags)
}

/// Registers `version` with `signature` (if any) and uploads `bytes`.
fn add_release(c: &Cluster, version: &str, bytes: &[u8], signature: Option<String>) {
    let mut body = json!({"package": PACKAGE, "version": version});
    if let Some(s) = signature {
        body["signature"] = json!(s);
    }
    c.api.post("/v1/releases", body);
    c.api.put(
        &format!("/v1/releases/{PACKAGE}/{version}/artifact"),
        bytes.to_vec(),
    );
}

/// A canary task to `version` over node `i` only.
fn task_for(c: &Cluster, i: usize, version: &str, extra: Value) -> String {
    let mut spec = json!({"scope": {"selector": {"ids": [c.agents[i].id]}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    c.task(
        &format!("to-{}-{i}", version.replace('.', "-")),
        version,
        spec,
    )
}

/// Node `i` was left as it was: still on 1.0.0, no release `version`
/// unpacked, no command run, no download kept.
fn untouched(c: &Cluster, i: usize, version: &str) {
    let dir = &c.agents[i].dir;
    assert_eq!(current(dir).as_deref(), Some("1.0.0"), "{}", c.agents[i].id);
    assert_eq!(permanent(dir).as_deref(), Some("1.0.0"));
    assert!(
        !dir.join("releases").join(version).exists(),
        "{version} was unpacked on {}",
        c.agents[i].id
    );
    let left: Vec<_> = fs::read_dir(dir.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(installs(dir).is_empty(), "{:?}", installs(dir));
    assert_eq!(fs::read_dir(dir.join("downloads")).unwrap().count(), 0);
}

fn rejected(run: &NodeRun) -> &str {
    match &run.state {
        RunState::Rejected { reason, .. } => reason,
        other => panic!("expected rejected, got {other:?}"),
    }
}

#[test]
fn a_node_installs_only_releases_signed_by_its_keys_and_naming_themselves() {
    let (pub_line, key) = keypair();
    let (_, stranger) = keypair();
    let (mut c, _pki, tls) = tls_cluster();
    for _ in 0..5 {
        let mut extra = vec!["--trusted-key".into(), pub_line.clone()];
        extra.extend(tls.iter().cloned());
        c.add_agent(AgentSpec {
            extra,
            ..AgentSpec::default()
        });
    }
    c.wait_enrolled();

    let good = artifact("1.1.0", 0);
    add_release(
        &c,
        "1.1.0",
        &good,
        Some(sign_release(&key, PACKAGE, "1.1.0", &good)),
    );
    let unsigned = artifact("1.2.0", 0);
    add_release(&c, "1.2.0", &unsigned, None);
    let by_stranger = artifact("1.3.0", 0);
    add_release(
        &c,
        "1.3.0",
        &by_stranger,
        Some(sign_release(&stranger, PACKAGE, "1.3.0", &by_stranger)),
    );
    // A genuine signature of these very bytes, as another version.
    let other_version = artifact("1.4.0", 0);
    add_release(
        &c,
        "1.4.0",
        &other_version,
        Some(sign_release(&key, PACKAGE, "1.9.0", &other_version)),
    );
    // Signed and uploaded, then swapped on the runner's disk for bytes of
    // the same size.
    let swapped = artifact("1.5.0", 0);
    add_release(
        &c,
        "1.5.0",
        &swapped,
        Some(sign_release(&key, PACKAGE, "1.5.0", &swapped)),
    );
    let file = c
        .path()
        .join("runner-data")
        .join("artifacts")
        .join(sha256(&swapped));
    assert!(
        file.is_file(),
        "{} is where the runner keeps it",
        file.display()
    );
    let mut evil = artifact("1.5.0", 0);
    let at = evil.len() - 40;
    evil[at] ^= 0xff;
    assert_eq!(evil.len(), swapped.len());
    fs::write(&file, &evil).unwrap();

    let tasks: Vec<String> = ["1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"]
        .iter()
        .enumerate()
        .map(|(i, v)| task_for(&c, i, v, json!({})))
        .collect();
    let runs: Vec<NodeRun> = (0..5)
        .map(|i| c.wait_run(&tasks[i], i, Duration::from_secs(60)))
        .collect();

    assert!(
        matches!(runs[0].state, RunState::Succeeded { .. }),
        "{:?}",
        runs[0].state
    );
    let dir = &c.agents[0].dir;
    assert_eq!(current(dir).as_deref(), Some("1.1.0"));
    assert_eq!(installs(dir), ["install 1.1.0"]);

    let why = rejected(&runs[1]);
    assert!(why.starts_with("no signature"), "{why}");
    untouched(&c, 1, "1.2.0");
    let why = rejected(&runs[2]);
    assert!(why.starts_with("unknown key id"), "{why}");
    untouched(&c, 2, "1.3.0");
    let why = rejected(&runs[3]);
    assert!(
        why.starts_with("comment mismatch") && why.contains("version 1.9.0 (not 1.4.0)"),
        "{why}"
    );
    untouched(&c, 3, "1.4.0");
    // The swapped bytes fail the digest (and would fail the signature).
    let RunState::FailedRolledBack { error, .. } = &runs[4].state else {
        panic!(
            "expected the swapped artifact refused, got {:?}",
            runs[4].state
        );
    };
    assert!(error.contains("sha256 mismatch"), "{error}");
    untouched(&c, 4, "1.5.0");

    // A rollback of the signed task to the release it just left (older
    // than the node's permanent 1.1.0 now) is the node's own history.
    c.api.post(
        &format!("/v1/tasks/{}/rollback", tasks[0]),
        json!({"reason": "test"}),
    );
    c.wait_task(&tasks[0], &["rolled-back"], Duration::from_secs(30));
    assert_eq!(installs(dir), ["install 1.1.0", "restore 1.0.0"]);
    assert_eq!(current(dir).as_deref(), Some("1.0.0"));
}

#[test]
fn a_remote_downgrade_is_refused_unless_the_nodes_own_config_allows_it() {
    let (mut c, _pki, tls) = tls_cluster();
    let refusing = c.add_agent(AgentSpec {
        extra: tls.clone(),
        ..AgentSpec::default()
    });
    let mut extra = vec!["--allow-remote-downgrade".to_string()];
    extra.extend(tls.iter().cloned());
    let allowing = c.add_agent(AgentSpec {
        extra,
        ..AgentSpec::default()
    });
    c.wait_enrolled();
    c.release("0.9.0", 0);
    // One wave of both nodes: a refusal on one does not hold up the other.
    c.api.put(
        "/v1/policies/everyone",
        b"// one wave of every node\n".to_vec(),
    );
    let task = c.task(
        "downgrade",
        "0.9.0",
        json!({"downgrade": true, "policy": "everyone"}),
    );
    let run = c.wait_run(&task, refusing, Duration::from_secs(60));
    let why = rejected(&run);
    assert!(
        why.contains("remote downgrade refused")
            && why.contains("permanent release 1.0.0")
            && why.contains("older 0.9.0"),
        "{why}"
    );
    untouched(&c, refusing, "0.9.0");
    let run = c.wait_run(&task, allowing, Duration::from_secs(60));
    assert!(
        matches!(run.state, RunState::Succeeded { .. }),
        "{:?}",
        run.state
    );
    let dir = &c.agents[allowing].dir;
    assert_eq!(current(dir).as_deref(), Some("0.9.0"));
    assert_eq!(installs(dir), ["install 0.9.0"]);
}
