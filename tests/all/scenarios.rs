//! Every shipped policy's scenarios pass, through `flotilla policy test` (the
//! CLI's function, printing into a buffer), through the library, and for the
//! Rust components through `flotilla_sdk::testing`; a scenario that expects
//! the wrong thing fails with a diff that shows what differed.

use flotilla::test::{TestArgs, run_to};
use flotilla_engine::scenario::{self, Scenario};
use flotilla_policy::WasmRuntime;
use flotilla_tests::{component, workspace};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn shipped() -> Vec<PathBuf> {
    vec![
        workspace().join("policies/scenarios"),
        workspace().join("examples/first-policy.yaml"),
    ]
}

fn cli(paths: Vec<PathBuf>, json: bool) -> (ExitCode, String) {
    let mut out = Vec::new();
    let code = run_to(
        TestArgs {
            paths,
            policy: None,
            json,
            verbose: false,
        },
        &mut out,
    )
    .unwrap();
    (code, String::from_utf8(out).unwrap())
}

#[test]
fn every_shipped_scenario_passes_through_the_cli() {
    let files = scenario::discover(&shipped()).unwrap();
    let (code, out) = cli(shipped(), false);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains(&format!("scenarios: {} passed, 0 failed", files.len())),
        "{out}"
    );
    for policy in [
        "canary",
        "kubeedge",
        "enos-ota",
        "hot-patch",
        "cluster",
        "thresholds",
        "local-window",
    ] {
        let dir = format!("scenarios/{policy}/");
        assert!(
            out.lines()
                .any(|l| l.starts_with("PASS ") && l.contains(&dir)),
            "no scenario of {policy} passed:\n{out}"
        );
    }
}

#[test]
fn every_shipped_scenario_passes_through_the_library() {
    let runtime = WasmRuntime::new(None).unwrap();
    let files = scenario::discover(&shipped()).unwrap();
    assert!(files.len() >= 12, "{files:?}");
    for file in files {
        let report = Scenario::load(&file).unwrap().run(&runtime, None);
        assert!(report.passed, "{}", report.explain());
    }
}

#[test]
fn rust_components_pass_their_scenarios_through_the_sdk() {
    for (package, scenarios) in [
        ("canary", "policies/scenarios/canary"),
        ("first-policy", "examples/first-policy.yaml"),
    ] {
        let reports = flotilla_sdk::testing::run_scenarios(
            &component(package),
            &[workspace().join(scenarios)],
        )
        .unwrap();
        assert!(!reports.is_empty());
        for r in reports {
            assert!(r.passed, "{package}: {}", r.explain());
            assert!(r.policy.extension().is_some_and(|e| e == "wasm"));
        }
    }
}

/// The canary abort scenario, expecting the wrong wave, count and node state.
fn wrong_expectations(policy: &Path) -> String {
    let right = std::fs::read_to_string(
        workspace().join("policies/scenarios/canary/failing-wave-aborts.yaml"),
    )
    .unwrap();
    let wrong = right
        .replace("../../canary.rhai", &policy.display().to_string())
        .replace("succeeded: 7", "succeeded: 8")
        .replace("n10: cancelled", "n10: succeeded");
    assert_ne!(right, wrong);
    wrong
}

#[test]
fn a_wrong_expectation_fails_with_the_difference() {
    let policy = workspace().join("policies/canary.rhai");
    let dir = std::env::temp_dir().join(format!("flotilla-scenarios-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.yaml");
    std::fs::write(&file, wrong_expectations(&policy)).unwrap();

    // The library: a failed report whose diff shows both sides.
    let report = Scenario::load(&file)
        .unwrap()
        .run(&WasmRuntime::new(None).unwrap(), None);
    assert!(!report.passed);
    let explained = report.explain();
    for line in [
        "-count succeeded: 8",
        "+count succeeded: 7",
        "-node n10: succeeded",
        "+node n10: cancelled",
    ] {
        assert!(
            explained.contains(line),
            "missing {line:?} in:\n{explained}"
        );
    }
    // Checks that held are context, not differences.
    assert!(
        explained.contains("\n count failed-rolled-back: 2"),
        "{explained}"
    );
    assert_eq!(report.mismatches.len(), 2, "{:?}", report.mismatches);

    // The CLI: FAIL, the diff, a non-zero exit.
    let (code, out) = cli(vec![file.clone()], false);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("FAIL wrong"), "{out}");
    assert!(out.contains("+count succeeded: 7"), "{out}");
    assert!(out.contains("scenarios: 0 passed, 1 failed"), "{out}");

    // --json for CI.
    let (code, out) = cli(vec![file], true);
    assert_eq!(code, ExitCode::FAILURE);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["failed"], 1);
    assert_eq!(doc["scenarios"][0]["passed"], false);
    assert_eq!(doc["scenarios"][0]["mismatches"][0]["what"], "node n10");
    assert_eq!(doc["scenarios"][0]["mismatches"][0]["actual"], "cancelled");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_typo_in_a_scenario_fails_it_with_the_line() {
    let dir = std::env::temp_dir().join(format!("flotilla-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("typo.yaml");
    std::fs::write(
        &file,
        "task:\n  name: t\n  package: p\n  target: {version: '1'}\n  policy: x.rhai\nexpect:\n  tsk: succeeded\n",
    )
    .unwrap();
    let (code, out) = cli(vec![file], false);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("unknown field `tsk`"), "{out}");
    assert!(out.contains("line 7"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The canary's Python and JavaScript twins pass the canary's scenarios.
#[test]
fn python_and_javascript_canaries_pass_the_canary_scenarios() {
    for name in ["canary-py", "canary-js"] {
        let wasm = flotilla_tests::interpreted(name);
        let reports = flotilla_sdk::testing::run_scenarios(
            &wasm,
            &[workspace().join("policies/scenarios/canary")],
        )
        .unwrap();
        assert!(reports.len() >= 3, "{name}: {}", reports.len());
        for r in &reports {
            assert!(r.passed, "{name}:\n{}", r.explain());
        }
    }
}
