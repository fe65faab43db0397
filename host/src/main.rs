//! The `switchboard` command: run the gateway, check a config, check a plugin file, and the
//! operator's commands against a running gateway (`cli`).

mod cli;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard::{
    catalog,
    config::{Config, LogFormat},
    gateway,
};
use tracing_subscriber::EnvFilter;

// glibc's allocator was about a sixth of the gateway's CPU under load (arena locks and
// consolidation passes); mimalloc cut the CPU per reply by about a tenth. Adapters keep their
// own allocator: what crosses the ABI is freed through the vtable of whoever allocated it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Have the allocator commit its arena as it is used. Committed eagerly (its default on
/// Linux) and advised as transparent huge pages, the arena doubled the idle gateway's RSS.
/// The arena is reserved by the first allocation, before `main`: this runs earlier, among
/// the executable's initialisers.
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

extern "C" fn tune_allocator() {
    // `mi_option_arena_eager_commit` in mimalloc.h (v3); the crate names only some options.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: sets a plain integer option; nothing else runs yet.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
}

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A gateway between chat platforms and AI agents, with hot-reloadable channel adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. SIGUSR1 or SIGHUP reloads the config; SIGTERM or SIGINT stops
    /// gracefully; SIGUSR2 (or `POST /restart`) stops gracefully and starts the binary again.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file, including each channel's adapter config; lists every problem.
    /// An environment variable a `*_env` key names that is unset is a warning (its value is
    /// never printed).
    CheckConfig {
        config: PathBuf,
        /// Count unset environment variables as errors (exit 1), not warnings.
        #[arg(long)]
        strict: bool,
    },
    /// Load a plugin file, print its manifest as JSON, and validate adapter configs
    /// (each `--validate` is the JSON of one channel's adapter keys). With `--conformance`, run
    /// the adapter conformance checks against it instead (see docs/plugin-guide.md); exit code
    /// 0 when every check passes, 1 when one fails, 2 when the file or config cannot be used.
    CheckPlugin {
        file: PathBuf,
        #[arg(long)]
        validate: Vec<String>,
        /// Read more configs to validate from stdin, as a JSON array of strings (what the
        /// gateway's probes do: a command line is readable by every local user).
        #[arg(long)]
        validate_stdin: bool,
        /// Run the conformance checks against the library, in a child process: a crash or a
        /// hang of the plugin is reported as a failure of the check it happened in.
        #[arg(long, conflicts_with_all = ["validate", "validate_stdin"])]
        conformance: bool,
        /// With --conformance: the channel instance table to build the adapter from (TOML, the
        /// keys under `[channels.<id>]`); without it, the plugin's sample config. Secrets it
        /// names are never read: the check answers every secret with a placeholder.
        #[arg(long, requires = "conformance")]
        config: Option<PathBuf>,
        /// With --conformance: print the report as JSON.
        #[arg(long, requires = "conformance")]
        json: bool,
        /// With --conformance: how long one call into the adapter may take before it counts
        /// as hung (the gateway's default adapter_call_timeout_ms).
        #[arg(long, requires = "conformance", default_value_t = 10_000)]
        call_timeout_ms: u64,
        /// The child process of --conformance (internal).
        #[arg(long, hide = true)]
        conformance_child: bool,
    },
    #[command(flatten)]
    Admin(cli::AdminCommand),
}

fn main() -> ExitCode {
    switchboard::upgrade::remember_start_path();
    let cli = Cli::parse();
    match cli.command {
        Command::Admin(command) => cli::run(command),
        Command::CheckPlugin { file, conformance_child: true, .. } => switchboard::conformance::run_child(&file),
        Command::CheckPlugin { file, conformance: true, config, json, call_timeout_ms, .. } => {
            let request = switchboard::conformance::Request {
                file,
                config,
                call_timeout: std::time::Duration::from_millis(call_timeout_ms),
            };
            let report = switchboard::conformance::check(&switchboard::upgrade::running_binary(), &request);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.render());
            }
            ExitCode::from(report.exit_code())
        }
        Command::CheckPlugin { file, mut validate, validate_stdin, .. } => {
            if validate_stdin {
                let mut input = String::new();
                let read = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input);
                match read.map_err(|e| e.to_string()).and_then(|_| {
                    serde_json::from_str::<Vec<String>>(&input).map_err(|e| format!("not a JSON array of strings: {e}"))
                }) {
                    Ok(configs) => validate.extend(configs),
                    Err(e) => {
                        eprintln!("error: --validate-stdin: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            let report = catalog::check_plugin(&file, &validate);
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            if report.error.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::CheckConfig { config, strict } => {
            let Some(format) = log_format_or_exit(None) else { return ExitCode::FAILURE };
            init_logging(format);
            match runtime(1).and_then(|rt| rt.block_on(check_config(config, strict))) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            // The config is read before logging and the runtime start: it says how to log and
            // how many threads to give the runtime. Reading it logs nothing.
            let loaded = Config::load(&config);
            let Some(format) = log_format_or_exit(loaded.as_ref().ok().map(|c| c.gateway.log_format)) else {
                return ExitCode::FAILURE;
            };
            init_logging(format);
            let started = loaded.map_err(anyhow::Error::from).and_then(|loaded| {
                runtime(loaded.gateway.io_threads()).and_then(|rt| {
                    let outcome = rt.block_on(run(config, loaded));
                    // The stop kept its deadline and stored what it had to; nothing left on the
                    // runtime (a task still waiting on a hung adapter) may hold the process.
                    rt.shutdown_background();
                    outcome
                })
            });
            match started {
                Ok(gateway::Exit::Stopped) => ExitCode::SUCCESS,
                Ok(gateway::Exit::Failed(reason)) => {
                    eprintln!("error: {reason}");
                    ExitCode::from(3)
                }
                Ok(gateway::Exit::Restart) => {
                    let error = switchboard::upgrade::exec();
                    tracing::error!("cannot start the gateway again: {error}");
                    eprintln!("error: cannot start the gateway again: {error}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Libraries whose trace output shows what goes over the wire, headers included
/// (tungstenite traces the whole upgrade request, `Authorization: Bearer …` too): their
/// trace events are never written, whatever `SWITCHBOARD_LOG` asks for.
const WIRE_TRACING_TARGETS: &[&str] =
    &["tungstenite", "tokio_tungstenite", "hyper", "hyper_util", "reqwest", "h2", "rustls"];

/// The log format: `SWITCHBOARD_LOG_FORMAT` wins over the config's `gateway.log_format`
/// (logging starts before a config could say anything, and an operator may override it);
/// `None` after saying why, for a value that is neither.
fn log_format_or_exit(configured: Option<LogFormat>) -> Option<LogFormat> {
    match std::env::var("SWITCHBOARD_LOG_FORMAT") {
        Ok(name) => LogFormat::from_name(name.trim()).or_else(|| {
            eprintln!("error: SWITCHBOARD_LOG_FORMAT: expected one of {}, got {name:?}", LogFormat::NAMES.join(", "));
            None
        }),
        Err(_) => Some(configured.unwrap_or_default()),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{
        filter::{filter_fn, FilterExt},
        fmt,
        layer::SubscriberExt,
        util::SubscriberInitExt,
        Layer,
    };
    let wanted = EnvFilter::try_from_env("SWITCHBOARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let no_wire_traces = filter_fn(|meta| {
        *meta.level() != tracing::Level::TRACE || !WIRE_TRACING_TARGETS.iter().any(|t| meta.target().starts_with(t))
    });
    let lines = fmt::layer().with_ansi(false).with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => lines.boxed(),
        // One object per line with the event's fields (session, channel, generation,
        // message_id, …) at the top level beside timestamp, level, target and message.
        LogFormat::Json => lines.json().flatten_event(true).with_current_span(false).with_span_list(false).boxed(),
    };
    tracing_subscriber::registry().with(layer.with_filter(wanted.and(no_wire_traces))).init();
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<gateway::Exit> {
    tracing::info!(io_threads = tokio::runtime::Handle::current().metrics().num_workers(), "async runtime started");
    // The admin socket lives in the state dir: a state dir that cannot be made is said as such.
    gateway::prepare_state_dir(&config.gateway.state_dir)?;
    let admin = switchboard::admin::Listeners::bind(&config.gateway).await?;
    Ok(gateway::run(config_path, switchboard::upgrade::running_binary(), admin, shutdown_signal()).await?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn check_config(config_path: PathBuf, strict: bool) -> anyhow::Result<ExitCode> {
    let (config, mut errors) = Config::load_best_effort(&config_path);
    if let Some(config) = config {
        // Snapshots of the plugin files go to a private temporary directory: a check must
        // not write into the state directory of a gateway that may be running.
        let mut catalog = catalog::Catalog::new(
            config.plugins.dir.clone(),
            switchboard::upgrade::running_binary(),
            &std::env::temp_dir(),
        )
        .context("cannot make a temporary directory for the plugin checks")?;
        if let Err(more) = gateway::resolve(&config, &mut catalog).await {
            errors.extend(more);
            errors.sort();
            errors.dedup();
        }
    }
    let references = switchboard::env_refs::referenced(&config_path);
    let unset = switchboard::env_refs::unset(&references).into_iter().map(|r| switchboard::config::ConfigError {
        key_path: r.key_path.clone(),
        message: format!("the environment variable {} is not set", r.variable),
    });
    let warnings: Vec<_> = if strict {
        errors.extend(unset);
        Vec::new()
    } else {
        unset.collect()
    };
    if errors.is_empty() {
        println!("{}: OK{}", config_path.display(), warning_count(&warnings));
    } else {
        println!("{}: {} problem(s){}", config_path.display(), errors.len(), warning_count(&warnings));
        for error in &errors {
            println!("  {error}");
        }
    }
    for warning in &warnings {
        println!("  warning: {warning}");
    }
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn warning_count<T>(warnings: &[T]) -> String {
    match warnings.len() {
        0 => String::new(),
        1 => ", 1 warning (--strict makes it an error)".into(),
        n => format!(", {n} warnings (--strict makes them errors)"),
    }
}
