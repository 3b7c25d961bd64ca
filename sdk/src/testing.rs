//! Test a Rust policy from `cargo test`, the way `flotilla policy test` tests
//! it from the shell: build this crate's component for `wasm32-wasip2`, load
//! it, run scenario files through the real engine on a virtual clock, and fail
//! with a diff of expected against actual.
//!
//! Native only, behind the `testing` feature: add
//! `flotilla-sdk = { version = "...", features = ["testing"] }` to the policy
//! crate's `[dev-dependencies]` and write
//!
//! ```ignore
//! #[test]
//! fn scenarios_pass() {
//!     flotilla_sdk::assert_scenarios!("scenarios");
//! }
//! ```
//!
//! Each scenario's `task.policy` is ignored: the crate's own component runs
//! instead, so a Rhai twin and its Rust port can share their scenarios.

use flotilla_engine::scenario::{self, PolicyFile, Scenario, ScenarioError};
use flotilla_policy::build::{BuildError, build_component, workspace_root};
use flotilla_policy::{PolicyError, WasmRuntime};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use flotilla_engine::scenario::ScenarioReport;

/// Why the scenarios could not be run at all (a scenario that fails is a
/// failed [`ScenarioReport`], not this).
#[derive(Debug)]
pub enum TestingError {
    /// `cargo build` of the component failed (cargo's output is in it).
    Build(BuildError),
    /// A scenario path that cannot be read.
    Scenarios(ScenarioError),
    /// No `*.yaml` under the paths given.
    NoScenarios(Vec<PathBuf>),
    /// The policy does not load (or the Wasm runtime does not start).
    Policy(PolicyError),
}

impl std::fmt::Display for TestingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestingError::Build(e) => e.fmt(f),
            TestingError::Scenarios(e) => e.fmt(f),
            TestingError::NoScenarios(paths) => {
                write!(f, "no scenario files (*.yaml) under {paths:?}")
            }
            TestingError::Policy(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TestingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TestingError::Scenarios(e) => Some(e),
            TestingError::Policy(e) => Some(e),
            TestingError::Build(e) => Some(e),
            TestingError::NoScenarios(_) => None,
        }
    }
}

/// The component of `package` (a crate in the workspace around
/// `manifest_dir`), built once per test process with the `guest` profile
/// into `<workspace>/target/guests`.
pub fn component(manifest_dir: &Path, package: &str) -> Result<PathBuf, TestingError> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(package) {
        return Ok(p.clone());
    }
    let path =
        build_component(&workspace_root(manifest_dir), package).map_err(TestingError::Build)?;
    built.insert(package.to_string(), path.clone());
    Ok(path)
}

/// Runs every scenario under `paths` (files, or folders of `*.yaml`) against
/// `policy` (a `.wasm` or `.rhai` file). A scenario that does not parse is a
/// failed report, not a panic.
pub fn run_scenarios(
    policy: &Path,
    paths: &[PathBuf],
) -> Result<Vec<ScenarioReport>, TestingError> {
    let files = scenario::discover(paths).map_err(TestingError::Scenarios)?;
    if files.is_empty() {
        return Err(TestingError::NoScenarios(paths.to_vec()));
    }
    let runtime =
        WasmRuntime::new(WasmRuntime::default_cache_dir()).map_err(TestingError::Policy)?;
    let source = Arc::new(PolicyFile::open(policy, &runtime).map_err(TestingError::Policy)?);
    Ok(files
        .iter()
        .map(|f| match Scenario::load(f) {
            Ok(s) => s.run_with(policy, source.clone()),
            Err(e) => {
                ScenarioReport::could_not_run(&f.display().to_string(), f, policy, e.to_string())
            }
        })
        .collect())
}

/// Builds the crate's component, runs the scenarios under `paths` (relative
/// to `manifest_dir`) against it, and panics with every failure's diff.
/// [`assert_scenarios!`](crate::assert_scenarios) fills in the crate.
pub fn assert_scenarios(manifest_dir: &Path, package: &str, paths: &[&str]) {
    let wasm = component(manifest_dir, package).unwrap_or_else(|e| panic!("{e}"));
    let paths: Vec<PathBuf> = paths.iter().map(|p| manifest_dir.join(p)).collect();
    let reports = run_scenarios(&wasm, &paths).unwrap_or_else(|e| panic!("{e}"));
    let failures: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(ScenarioReport::explain)
        .collect();
    if !failures.is_empty() {
        panic!(
            "{} of {} scenarios failed:\n\n{}",
            failures.len(),
            reports.len(),
            failures.join("\n")
        );
    }
}

/// `assert_scenarios!("scenarios", "more/x.yaml")`: runs scenario files or
/// folders (relative to the calling crate) against the calling crate's
/// component and panics with a diff for each failure.
#[macro_export]
macro_rules! assert_scenarios {
    ($($path:expr),+ $(,)?) => {
        $crate::testing::assert_scenarios(
            ::std::path::Path::new(env!("CARGO_MANIFEST_DIR")),
            env!("CARGO_PKG_NAME"),
            &[$($path),+],
        )
    };
}
