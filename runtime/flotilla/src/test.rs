//! `flotilla policy test`: run scenario files against their policies on the
//! virtual clock and print pass/fail per scenario, with a diff of expected
//! against actual for each failure. Non-zero exit when any scenario fails.

use anyhow::bail;
use clap::Args;
use flotilla_engine::scenario::{self, PolicyFile, Scenario, ScenarioReport};
use flotilla_policy::{PolicyError, WasmRuntime};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Scenario files, or folders searched for `*.yaml` / `*.yml`.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Run every scenario against this policy (`.wasm` or `.rhai`) instead of
    /// the one its task names.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Print one JSON document (every scenario's result) for CI.
    #[arg(long)]
    pub json: bool,
    /// Also print the task's event log and the simulated timeline of failures.
    #[arg(long, short)]
    pub verbose: bool,
}

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    run_to(args, &mut std::io::stdout().lock())
}

/// `run`, printing to `out` (tests read it).
pub fn run_to(args: TestArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let files = scenario::discover(&args.paths)?;
    if files.is_empty() {
        bail!(
            "no scenario files (*.yaml) under {}",
            args.paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let runtime = WasmRuntime::new(WasmRuntime::default_cache_dir())?;
    let progress = if !args.json && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    // Each policy is loaded (a component compiled) once for all its scenarios.
    let mut policies: HashMap<PathBuf, Result<Arc<PolicyFile>, Arc<PolicyError>>> = HashMap::new();
    let mut reports = Vec::with_capacity(files.len());
    for file in &files {
        progress.set_message(file.display().to_string());
        let report = match Scenario::load(file) {
            Err(e) => ScenarioReport::could_not_run(
                &file.display().to_string(),
                file,
                args.policy.as_deref().unwrap_or(Path::new("")),
                e.to_string(),
            ),
            Ok(s) => {
                let policy = args.policy.clone().unwrap_or_else(|| s.policy_path());
                let loaded = policies
                    .entry(policy.clone())
                    .or_insert_with(|| {
                        PolicyFile::open(&policy, &runtime)
                            .map(Arc::new)
                            .map_err(Arc::new)
                    })
                    .clone();
                match loaded {
                    Ok(source) => s.run_with(&policy, source),
                    Err(e) => s.run_failed(&policy, e.to_string()),
                }
            }
        };
        progress.inc(1);
        if !args.json {
            progress.suspend(|| print_one(out, &report, args.verbose));
        }
        reports.push(report);
    }
    progress.finish_and_clear();

    let failed = reports.iter().filter(|r| !r.passed).count();
    let passed = reports.len() - failed;
    if args.json {
        let doc = serde_json::json!({
            "passed": passed,
            "failed": failed,
            "scenarios": reports,
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let _ = writeln!(out, "\nscenarios: {passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_one(out: &mut dyn Write, r: &ScenarioReport, verbose: bool) {
    if r.passed {
        let _ = writeln!(out, "PASS {} ({})", r.name, r.path.display());
        return;
    }
    let _ = writeln!(out, "FAIL {} ({})", r.name, r.path.display());
    if let Some(e) = &r.error {
        for line in e.lines() {
            let _ = writeln!(out, "     {line}");
        }
        return;
    }
    let _ = writeln!(out, "     policy {}", r.policy.display());
    for line in r.diff.lines() {
        let _ = writeln!(out, "     {line}");
    }
    if verbose {
        let _ = writeln!(out, "     events:");
        for line in r.event_log().lines() {
            let _ = writeln!(out, "       {line}");
        }
        let _ = writeln!(out, "     simulated world:");
        for line in &r.timeline {
            let _ = writeln!(out, "       {line}");
        }
    }
}
