//! `flotilla policy new`: each language's project, generated into a temp dir
//! outside this workspace, builds and passes its scenario as generated.

use flotilla::policy_new::{Lang, create};
use flotilla::test::{TestArgs, run_to};
use flotilla_policy::build::{Interpreted, build_interpreted};
use flotilla_tests::workspace;
use std::path::Path;
use std::process::{Command, ExitCode};

fn scenarios_pass(dir: &Path) {
    let mut out = Vec::new();
    let code = run_to(
        TestArgs {
            paths: vec![dir.join("scenarios")],
            policy: None,
            json: false,
            verbose: false,
        },
        &mut out,
    )
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(out.contains("1 passed, 0 failed"), "{out}");
}

#[test]
fn new_rhai_python_and_js_projects_pass_their_scenario_as_generated() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!tmp.path().starts_with(workspace()));
    let dir = tmp.path().join("edge-rhai");
    create(&dir, "edge-rhai", Lang::Rhai, None).unwrap();
    assert!(dir.join("README.md").is_file());
    scenarios_pass(&dir);

    for (name, lang, tool) in [
        ("edge-py", Lang::Python, Interpreted::Python),
        ("edge-js", Lang::Js, Interpreted::JavaScript),
    ] {
        let dir = tmp.path().join(name);
        create(&dir, name, lang, None).unwrap();
        // The README's build command, by the same pinned tool.
        let built = build_interpreted(tool, &dir, &dir.join("wit"), &dir.join("out"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::copy(&built, dir.join("policy.wasm")).unwrap();
        scenarios_pass(&dir);
    }

    // Refusals change nothing.
    let err = create(&dir, "edge-rhai", Lang::Rhai, None).unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");
    let err = create(&tmp.path().join("x"), "Bad_Name", Lang::Rhai, None).unwrap_err();
    assert!(err.to_string().contains("invalid policy name"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

/// A standalone crate (its own workspace) that depends on flotilla-sdk by
/// path: its `cargo test` builds the guest with a `guest` profile the crate
/// does not define, and links the crate natively (a cdylib the SDK must not
/// export the component's hooks from). With this workspace's lock file and
/// target dir, only the path crates build again (~20 s warm, not 20 min);
/// cargo does not hold the target dir's lock while tests run.
#[test]
fn new_rust_project_builds_and_passes_its_scenario_outside_the_workspace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("edge-rust");
    create(
        &dir,
        "edge-rust",
        Lang::Rust,
        Some(&workspace().join("sdk")),
    )
    .unwrap();
    // Same dependency versions as this workspace and the same dev profile
    // (the template's), in its target dir: the runner's crates are not built
    // a second time.
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let ours = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    for block in [
        "[profile.dev.package.\"*\"]\nopt-level = 2\ndebug = false\n",
        "[profile.dev]\ndebug = \"line-tables-only\"\n",
    ] {
        assert!(ours.contains(block) && manifest.contains(block), "{block}");
    }
    std::fs::copy(workspace().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["test", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("test scenarios_pass ... ok")
            || String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
