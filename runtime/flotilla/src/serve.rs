//! `flotilla serve`: the runner as a service.

use clap::Args;
use flotilla_server::{Config, Runner, shutdown_signal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (sled database, artifacts, policies).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7878).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// TOML config file (token, enroll_secret, tls, hooks, limits, ...).
    /// On SIGHUP the runner reads its TLS files again.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    }
    .with_env();
    if let Some(d) = args.data {
        config.data = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    // A descriptor per connection: the usual soft limit (1024) is far
    // below a fleet's, the hard one is what the service manager granted.
    flotilla_server::connections::raise_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listen = config.listen;
        let data = config.data.clone();
        let scheme = match config.tls.as_ref().and_then(|t| t.files()) {
            Some(_) => "https",
            None => "http",
        };
        let runner = Runner::open(config)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr()?;
        // One line on stdout that scripts (and `flotilla demo`) can wait for.
        outln!(
            "flotilla listening on {scheme}://{addr} (data in {})",
            data.display()
        );
        outln!("dashboard at {scheme}://{addr}/");
        runner.serve(listener, shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
