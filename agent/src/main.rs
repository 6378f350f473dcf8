//! The `periscope` command line: parse arguments, load the config, run.

use clap::{Parser, Subcommand};
use periscope::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "periscope", version, about = "A node agent for observability: metrics, traces, logs and CPU profiles")]
struct Cli {
    /// Config file (YAML). Without it, $PERISCOPE_CONFIG, else the embedded default config.
    #[arg(long, short, global = true, env = "PERISCOPE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Run the agent plus a synthetic workload (services `feed` and `users`) sent to its own
    /// OTLP receiver, with logs in <data_dir>/demo.
    Demo {
        /// Requests (traces) per second.
        #[arg(long, default_value_t = periscope::demo::DEFAULT_RATE)]
        rate: u32,
    },
    /// Check a config file; errors name the key and line. Exit code 1 on error.
    Validate,
    /// Print the effective config, defaults filled in, as YAML.
    PrintConfig,
}

fn main() -> ExitCode {
    periscope::memory::configure();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if matches!(command, Command::Validate) && cli.config.is_none() {
        eprintln!("periscope validate: give the file to check with --config FILE");
        return ExitCode::from(2);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("periscope: {errors}");
            return ExitCode::from(1);
        }
    };
    match command {
        Command::Validate => {
            let shown = cli.config.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            println!("{shown}: ok");
            ExitCode::SUCCESS
        }
        Command::PrintConfig => {
            print!("{}", config.to_yaml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config, None),
        Command::Demo { rate } => {
            let mut config = config;
            match periscope::demo::prepare(&mut config, rate) {
                Ok(setup) => run(config, Some(setup)),
                Err(e) => {
                    eprintln!("periscope demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn run(config: Config, demo: Option<periscope::demo::Setup>) -> ExitCode {
    periscope::telemetry::logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("periscope").build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("periscope: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let workload = tokio_util::sync::CancellationToken::new();
    if let Some(setup) = demo {
        runtime.spawn(periscope::demo::run(setup, workload.clone()));
    }
    let shutdown = async move {
        shutdown_signal().await;
        // The workload stops first, so the agent's flush has nothing more coming.
        workload.cancel();
    };
    match runtime.block_on(periscope::app::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("periscope: {e}");
            ExitCode::from(1)
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
