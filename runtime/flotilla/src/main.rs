//! The `flotilla` binary: logging setup, then the CLI layer.

use std::process::ExitCode;

/// Counts each thread's allocations: what holds a Rhai policy hook to the
/// memory cap of a Wasm instance (`flotilla_policy::alloc`).
#[global_allocator]
static ALLOC: flotilla_policy::alloc::Counting = flotilla_policy::alloc::Counting;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    flotilla::main()
}
