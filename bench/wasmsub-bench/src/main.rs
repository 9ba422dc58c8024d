//! `wasmsub-bench`: the host's in-process benchmarks, side by side in one run
//! so the figures compare on a shared, noisy machine (docs/BENCHMARKS.md).
//! Kept out of the service crate: the `bench` feature it enables exposes
//! entry points (a reused instance, a profiled attempt) the service never has.

mod echo;
mod languages;
mod soak;
mod swap;
mod tenants;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc, not glibc malloc: with many threads making and dropping
/// instances, glibc's arenas contend and consolidate (see the workspace
/// Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure what wasmsub's host costs per event, per tenant and per swap.
#[derive(Parser)]
#[command(after_help = "Build the guests first: scripts/build-guests.sh (or scripts/demo.sh).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-event cost of a handler (default: echo) side by side: native
    /// function, reused instance, fresh instance, whole pipeline.
    Echo {
        /// The component to measure.
        #[arg(long, default_value = "target/guests/echo.wasm")]
        component: PathBuf,
        /// Events per row.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
    },
    /// Isolation between tenants: a quiet tenant's latency beside a hostile
    /// one, and host memory with many tenants loaded.
    Tenants {
        /// Directory of the built guests (scripts/build-guests.sh).
        #[arg(long, default_value = "target/guests")]
        guests: PathBuf,
        /// Quiet tenant's events per measurement.
        #[arg(long, default_value_t = 2_000)]
        events: usize,
        /// Tenants to load for the memory figure.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// How long the quiet tenant is measured alone, and again beside
        /// a self-publishing loop.
        #[arg(long, default_value_t = 60)]
        loop_seconds: u64,
    },
    /// A mixed load against a running host for a while, one line a minute
    /// (memory, publish latency, errors): scripts/soak.sh runs it.
    Soak {
        /// The host's base URL.
        #[arg(long, default_value = "http://127.0.0.1:3500")]
        url: String,
        /// The host's process id (for its resident memory).
        #[arg(long)]
        pid: u32,
        /// How long to run, in minutes.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Events per second offered.
        #[arg(long, default_value_t = 300)]
        rate: u32,
    },
    /// What a handler's language costs: size, compile, start from cache,
    /// fresh instance and end-to-end latency of the same task-created logic
    /// built from Rust, Python and JavaScript.
    Languages {
        /// LABEL=COMPONENT, repeatable (default: the three task-created
        /// builds in target/guests).
        #[arg(long = "component", value_name = "LABEL=PATH", value_parser = parse_labelled)]
        components: Vec<(String, PathBuf)>,
        /// Events per measurement.
        #[arg(long, default_value_t = 500)]
        events: usize,
    },
    /// The in-process pipeline with many deliveries in flight, on the
    /// in-memory and the embedded (fsync) store, then rounds of duplicate
    /// deliveries of the same ids.
    Throughput {
        /// The component to run.
        #[arg(long, default_value = "target/guests/echo.wasm")]
        component: PathBuf,
        /// Events per row.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Deliveries in flight, one row each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
        in_flight: Vec<usize>,
        /// Rounds of duplicates after the first deliveries.
        #[arg(long, default_value_t = 3)]
        duplicate_rounds: usize,
    },
    /// Hot swapping: cold start with and without the compile cache,
    /// deploy-to-first-event, throughput while swapping.
    Swap {
        /// Directory of the built guests.
        #[arg(long, default_value = "target/guests")]
        guests: PathBuf,
        /// Handlers for the cold-start rows.
        #[arg(long, default_value_t = 100)]
        handlers: usize,
    },
}

fn parse_labelled(spec: &str) -> Result<(String, PathBuf), String> {
    let (label, path) = spec.split_once('=').ok_or_else(|| format!("`{spec}` is not LABEL=PATH"))?;
    Ok((label.to_owned(), PathBuf::from(path)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Runtime::new().expect("starting the async runtime");
    let mut out = std::io::stdout();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Echo { component, events } => echo::run(&component, events, &mut out).await,
            Command::Tenants { guests, events, tenants, loop_seconds } => {
                tenants::noisy_neighbour(&guests, events, &mut out).await?;
                tenants::self_publishing_neighbour(&guests, loop_seconds, &mut out).await?;
                tenants::many_tenants(&guests, tenants, &mut out).await
            }
            Command::Throughput { component, events, in_flight, duplicate_rounds } => {
                throughput::run(&component, events, &in_flight, duplicate_rounds, &mut out).await
            }
            Command::Swap { guests, handlers } => swap::run(&guests, handlers, &mut out).await,
            Command::Languages { mut components, events } => {
                if components.is_empty() {
                    components = ["rust=target/guests/task_created.wasm", "python=target/guests/py_task_created.wasm", "javascript=target/guests/js_task_created.wasm"]
                        .iter()
                        .map(|spec| parse_labelled(spec).expect("a default spec"))
                        .collect();
                }
                languages::run(&components, events, &mut out).await
            }
            Command::Soak { url, pid, minutes, rate } => {
                let soak = soak::Soak { url, pid, duration: std::time::Duration::from_secs(minutes * 60), rate };
                soak::run(soak, &mut out).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
