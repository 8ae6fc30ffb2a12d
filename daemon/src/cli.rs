//! The command-line entry point: parse, set up logging, run a node, a `certs` command,
//! `check-uf` or `register`, and turn the outcome into an exit code. `src/main.rs` is just
//! this; the end-to-end tests build the same entry point into their own binary.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::config::{CertsCommand, Cli, Command, LogFormat, RunArgs};
use crate::error::DaemonError;
use crate::userfn::check::{self, CheckOptions};
use crate::userfn::register::{self, RegisterOptions};
use crate::{certs, Node};

/// The exit code after a failed commit of the data file (EX_IOERR): the process stops at once,
/// since what the disk holds after a failed fsync is unknown.
pub const EXIT_DISK: i32 = 74;

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

/// The stop signals (SIGTERM, SIGINT), listened to from the moment this is made: a signal that
/// arrives before anyone waits is kept, not fatal.
pub(crate) struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a runtime).
    pub(crate) fn install() -> Result<Self, DaemonError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                term: signal(SignalKind::terminate())
                    .map_err(|e| DaemonError::io("installing the SIGTERM handler", e))?,
                int: signal(SignalKind::interrupt())
                    .map_err(|e| DaemonError::io("installing the SIGINT handler", e))?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// Waits for the first stop signal; its name.
    pub(crate) async fn recv(&mut self) -> Result<&'static str, DaemonError> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Ok("SIGTERM"),
                _ = self.int.recv() => Ok("SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c()
                .await
                .map_err(|e| DaemonError::io("waiting for Ctrl-C", e))?;
            Ok("Ctrl-C")
        }
    }
}

/// Waits for SIGTERM or SIGINT; the signal's name.
pub(crate) async fn wait_for_signal() -> Result<&'static str, DaemonError> {
    StopSignals::install()?.recv().await
}

fn run(args: RunArgs) -> Result<(), DaemonError> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::io("starting the async runtime", e))?;
    let result = runtime.block_on(async {
        // before anything is served: a SIGTERM as soon as the admin endpoint answers is a
        // clean stop, not the default action
        let mut signals = StopSignals::install()?;
        // a stop signal while starting (e.g. waiting for another process's data file) ends
        // the start: nothing was served yet
        let node = tokio::select! {
            node = Node::start(&args) => node?,
            signal = signals.recv() => {
                tracing::info!(signal = signal?, "stopped before the node had started");
                return Ok(());
            }
        };
        // One machine-readable line on stdout with the bound addresses; logs go to stderr.
        println!(
            "latticed {} node {} cluster {} admin {}",
            env!("CARGO_PKG_VERSION"),
            node.id.name,
            node.cluster_addr,
            node.admin_addr
        );
        // and one more once the front-end serves (after user-function discovery)
        let mut frontend = node.frontend.clone();
        tokio::spawn(async move {
            loop {
                if let Some(addr) = *frontend.borrow_and_update() {
                    println!("latticed frontend {addr}");
                    return;
                }
                if frontend.changed().await.is_err() {
                    return;
                }
            }
        });
        let signal = signals.recv().await?;
        tracing::info!(signal, "shutting down");
        node.shutdown().await;
        Ok(())
    });
    // a start that was stopped may leave a blocking task (the wait for a data file) behind:
    // do not wait for it
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn certs_command(cmd: CertsCommand) -> Result<(), DaemonError> {
    let written = match cmd {
        CertsCommand::Init { dir, force } => certs::init_ca(&dir, force)?,
        CertsCommand::Issue { dir, name, force } => certs::issue(&dir, &name, force)?,
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Runs `latticed` with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Certs(c)) => certs_command(c),
        Some(Command::CheckUf(a)) => {
            let opts = CheckOptions {
                addr: a.addr,
                timeout: a.timeout,
                service: a.service,
            };
            return check::main(opts, a.json);
        }
        Some(Command::Register(a)) => {
            init_logging(LogFormat::Text);
            return register::main(RegisterOptions {
                latticed: a.latticed,
                address: a.address,
                ttl: a.ttl,
                token_file: a.token_file,
            });
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latticed: {e}");
            ExitCode::FAILURE
        }
    }
}
