//! `flotilla-agent`: the node agent as its own small program, for edge devices.
//! The same flags and subcommands as `flotilla agent`, which is an alias of it.

use clap::Parser;
use flotilla_agent::cli::AgentArgs;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla-agent",
    version,
    about = "Flotilla's node agent: takes upgrade work from a runner and reports back"
)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match flotilla_agent::cli::run(Cli::parse().args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
