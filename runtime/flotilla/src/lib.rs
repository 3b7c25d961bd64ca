//! Command-line parsing and output: clap turns arguments into the plain structs
//! below, `run` calls the library and prints tables or `--json`. The core never
//! sees clap.

/// `println!` that treats a closed stdout (`flotilla ... | head`) as the end of
/// output instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod demo;
mod policy;
pub mod policy_new;
pub mod remote;
mod serve;
mod simulate;
pub mod test;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Fleet upgrades under policies written as code"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, inspect and run policies locally.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Run a task against a fleet file with simulated agents on a virtual clock.
    Simulate(simulate::SimulateArgs),
    /// Run the runner: the HTTP API, webhooks and the agents' endpoints.
    Serve(serve::ServeArgs),
    /// Run the node agent, or manage this node's releases.
    Agent(Box<flotilla_agent::cli::AgentArgs>),
    /// Create, inspect and steer tasks on a runner (`flotilla serve`).
    Task(remote::TaskArgs),
    /// List the nodes a runner knows; issue one-time enrollment tokens and
    /// re-enrollment allowances.
    Node(remote::NodeArgs),
    /// Add and list releases on a runner.
    Release(remote::ReleaseArgs),
    /// Make, list and revoke a runner's management tokens (roles: read,
    /// operate, admin); `token digest` hashes one for the config.
    Token(remote::TokenArgs),
    /// The runner's audit log: every state-changing call and webhook.
    Audit(remote::AuditArgs),
    /// Start a runner and N agents on loopback and watch a canary rollout.
    Demo(demo::DemoArgs),
}

/// Parses the process arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Simulate(args) => simulate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Agent(args) => flotilla_agent::cli::run(*args),
        Command::Task(args) => remote::run_task(args),
        Command::Node(args) => remote::run_node(args),
        Command::Release(args) => remote::run_release(args),
        Command::Token(args) => remote::run_token(args),
        Command::Audit(args) => remote::run_audit(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
