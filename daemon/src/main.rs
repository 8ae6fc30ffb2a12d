//! The `latticed` binary: parses the command line, sets up logging, runs a node or a `certs`
//! command, and turns failures into a message and an exit code.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use latticed::config::{CertsCommand, Cli, Command, LogFormat, RunArgs};
use latticed::{certs, Node};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|_| "SIGINT").context("waiting for SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let node = Node::start(&args).await?;
        println!(
            "latticed {} node {} cluster {} admin {}",
            env!("CARGO_PKG_VERSION"),
            node.id.name,
            node.cluster_addr,
            node.admin_addr
        );
        let signal = wait_for_signal().await?;
        tracing::info!(signal, "shutting down");
        node.shutdown().await;
        Ok(())
    })
}

fn certs_command(cmd: CertsCommand) -> anyhow::Result<()> {
    let written = match cmd {
        CertsCommand::Init { dir, force } => certs::init_ca(&dir, force)?,
        CertsCommand::Issue { dir, name, force } => certs::issue(&dir, &name, force)?,
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Certs(c)) => certs_command(c),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latticed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
