//! The `wasmsub` command: parses arguments, sets up logging, calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use wasmsub::cli::{client, demo, invoke, new};
use wasmsub::runtime::EngineConfig;
use wasmsub::store::QueueLimits;
use wasmsub::{Backend, HostOptions, Manifest};

/// mimalloc, not glibc malloc: with many threads making and dropping
/// instances, glibc's arenas contend and consolidate (see the workspace
/// Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run sandboxed WebAssembly event handlers next to a Dapr sidecar.
///
/// Handlers are WebAssembly components (the `wasmsub:handler` WIT world).
/// The host deduplicates events, retries failures with backoff and sends what
/// still fails to a dead-letter topic; handlers only decide.
#[derive(Parser)]
#[command(version, propagate_version = true, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  wasmsub demo                                  # the todo demo, in-process
  wasmsub new task-done --lang rust             # a handler project (rust, python or js) with its test
  wasmsub invoke task_done.wasm --event event.json    # one event through a handler, no host
  wasmsub run --manifest examples/todo/wasmsub.toml
  wasmsub publish task-created '{\"id\":1,\"title\":\"write docs\"}'
  curl -X POST localhost:3500/v1.0/publish/pubsub/task-created -H 'content-type: application/json' -d '{\"id\":2,\"title\":\"ship\"}'
  wasmsub dead-letters
  wasmsub deploy --tenant todo --handler task-created --token $TOKEN new.wasm   # hot swap
  wasmsub deploy --tenant todo --handler archived --topic task-archived --token $TOKEN archived.wasm  # new topic
  wasmsub rollback --tenant todo --handler task-created --token $TOKEN
  wasmsub status --output json | jq '.handlers[].counts'
  wasmsub publish task-created '{\"id\":3}' --id task-3       # prints the event id; again with the same id: one effect
  wasmsub state get --tenant todo --token $TOKEN 'task:3'
  curl -s localhost:3500/metrics                            # Prometheus metrics

Exit codes: 0 success, 1 failure (the message says what and where), 2 bad usage
(`invoke` adds 3 retry, 4 drop, 5 trap: see `wasmsub invoke --help`; `run` exits 130 on a
second Ctrl-C or SIGTERM, which stops at once).
Logs: RUST_LOG=debug (or wasmsub=debug) for more; WASMSUB_LOG_FORMAT=json for JSON lines.";

#[derive(Subcommand)]
enum Command {
    /// Serve handlers. Behind a Dapr sidecar when --dapr-http-port (or
    /// DAPR_HTTP_PORT, which `dapr run` and the sidecar injector set) is
    /// given; otherwise on the embedded broker and store, with Dapr's publish
    /// API on --listen.
    #[command(after_help = "\
Examples:
  wasmsub run --manifest examples/todo/wasmsub.toml                 # embedded broker and store, port 3500
  wasmsub run -m wasmsub.toml --data-dir /var/lib/wasmsub --watch   # deploy a component when its file changes
  dapr run --app-id todo --app-port 3000 --dapr-http-port 3500 --resources-path components -- \\
      wasmsub run -m wasmsub.toml                                    # behind a sidecar (DAPR_HTTP_PORT is set)

Stopping: Ctrl-C or SIGTERM drains (up to 30 s; /readyz says the host is stopping); a second one
exits at once with 130. Exit codes: 0 stopped, 1 failure (the message says what and where), 2 bad usage.")]
    Run {
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        dapr: DaprArgs,
        /// Address of the HTTP server. Default: 127.0.0.1:3500 (embedded),
        /// 0.0.0.0:$APP_PORT (behind Dapr).
        #[arg(long, env = "WASMSUB_LISTEN")]
        listen: Option<SocketAddr>,
        /// Bearer token for the admin API's deploy and rollback; without one,
        /// those endpoints are disabled.
        #[arg(long, env = "WASMSUB_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Deploy a handler's component file as its new version when the
        /// file changes (hot swap by copying a file).
        #[arg(long, env = "WASMSUB_WATCH")]
        watch: bool,
    },
    /// Check a manifest and load every component it names, then exit.
    Check {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run one event through a handler component, as the host would, and
    /// print what it answered, wrote, published and logged.
    ///
    /// The component runs on the host's runtime, in the same sandbox and
    /// with the same limits (a tenant's defaults, or a manifest tenant's
    /// with --manifest), against an in-memory store seeded with --state.
    /// Nothing is committed or published anywhere. One attempt: no retry and
    /// no dead letter; the report says what the host would do next. Guest
    /// text is escaped; --output json gives it as written.
    #[command(after_help = "\
Examples:
  wasmsub invoke task_created.wasm --event task.json        # a CloudEvent, or JSON data to wrap in one
  echo '{\"id\":7,\"title\":\"try\"}' | wasmsub invoke task_created.wasm --event -
  wasmsub invoke recorder.wasm --event event.json --state count:k=41 --output json | jq .state_writes
  wasmsub invoke task_created.wasm --event task.json -m wasmsub.toml --tenant todo   # that tenant's limits

Exit codes: 0 success, 3 retry, 4 drop, 5 trap or limit hit, 1 failure (the host's, or a file that
cannot be read or loaded; the message says which), 2 bad usage.")]
    Invoke {
        /// The handler component (`.wasm`).
        component: PathBuf,
        /// The event: a structured CloudEvent (JSON with `specversion`), or
        /// JSON data to wrap in one; `-` reads it from stdin.
        #[arg(long, value_name = "FILE|-")]
        event: PathBuf,
        /// The topic it arrived on (default: the event's `topic` attribute,
        /// else `invoke`).
        #[arg(long)]
        topic: Option<String>,
        /// The attempt number the handler sees (above 1: a retry).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: u32,
        /// Seed the tenant's state with KEY=VALUE (repeatable).
        #[arg(long = "state", value_name = "KEY=VALUE", value_parser = invoke::parse_state_arg)]
        state: Vec<(String, String)>,
        /// Seed the tenant's state from a JSON object: string values as
        /// their text, other values as their JSON text (--state wins).
        #[arg(long, value_name = "FILE")]
        state_file: Option<PathBuf>,
        /// A topic the handler may publish to (repeatable; default: any).
        #[arg(long = "publish-topic", value_name = "TOPIC", conflicts_with = "manifest")]
        publish_topics: Vec<String>,
        /// Run as a tenant of this manifest: its limits, capabilities,
        /// publish topics and state namespace.
        #[arg(long, short)]
        manifest: Option<PathBuf>,
        /// The manifest's tenant (needed when it has several).
        #[arg(long, requires = "manifest")]
        tenant: Option<String>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Write a new handler project: the handler, its test, a sample event, a
    /// manifest to run it, and the WIT contract this binary speaks.
    #[command(after_help = "\
Examples:
  wasmsub new task-done --lang rust && cd task-done && cargo test
  wasmsub new task-done --lang python --dir handlers/task-done
  wasmsub new task-done --lang js")]
    New {
        /// The handler's name: also its topic, crate or module name
        /// (lowercase letters, digits and `-`).
        name: String,
        /// The language.
        #[arg(long, value_enum, default_value_t = new::Lang::Rust)]
        lang: new::Lang,
        /// Where to write it (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Publish an event through a running host's (or Dapr sidecar's)
    /// publish API, as a CloudEvent whose id is printed.
    Publish {
        /// The topic to publish to.
        topic: String,
        /// The payload (JSON by default); `@FILE` reads it from a file.
        data: String,
        /// The pub/sub component.
        #[arg(long, default_value = "pubsub")]
        pubsub: String,
        /// The payload's media type (the event's `datacontenttype`).
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// The event id (default: a new UUID). Publishing twice with the
        /// same id sends the same event: the host runs it once.
        #[arg(long)]
        id: Option<String>,
        /// The event's CloudEvents `type`.
        #[arg(long = "type", default_value = "com.dapr.event.sent")]
        event_type: String,
        /// Base URL of the host or sidecar.
        #[arg(long, env = "WASMSUB_URL", default_value = "http://127.0.0.1:3500", value_parser = base_url)]
        url: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Deploy a new version of a handler to a running host, without a
    /// restart (the host must have an admin token).
    Deploy {
        #[command(flatten)]
        target: TargetArgs,
        /// Create the handler (if the host has none by that name) for this
        /// topic; the host subscribes to it without a restart.
        #[arg(long)]
        topic: Option<String>,
        /// The pub/sub component of --topic.
        #[arg(long, default_value = "pubsub")]
        pubsub: String,
        /// The component file.
        component: PathBuf,
    },
    /// Return a handler to its previous version.
    Rollback {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Tenants, handlers, their versions and per-handler counts.
    Status {
        /// Base URL of the host's HTTP server.
        #[arg(long, env = "WASMSUB_URL", default_value = "http://127.0.0.1:3500", value_parser = base_url)]
        url: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// List the dead letters a running host has recorded (newest last).
    DeadLetters {
        /// Base URL of the host's HTTP server.
        #[arg(long, env = "WASMSUB_URL", default_value = "http://127.0.0.1:3500", value_parser = base_url)]
        url: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Read a tenant's committed state from a running host (admin token).
    #[command(subcommand)]
    State(StateCommand),
    /// Print a shell completion script: `wasmsub completions bash >
    /// ~/.local/share/bash-completion/completions/wasmsub`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run the todo demo in-process: sample events, a duplicate, a flaky and a
    /// poison one, and what happened to each.
    Demo {
        /// The demo's manifest.
        #[arg(long, short, default_value = "examples/todo/wasmsub.toml")]
        manifest: PathBuf,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print the value a tenant's handlers committed under KEY (the bytes
    /// as written; escaped on a terminal).
    Get {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The state key, as the handler wrote it.
        key: String,
        /// Base URL of the host's HTTP server.
        #[arg(long, env = "WASMSUB_URL", default_value = "http://127.0.0.1:3500", value_parser = base_url)]
        url: String,
        /// The host's admin token.
        #[arg(long, env = "WASMSUB_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(clap::Args)]
struct OutputArg {
    /// `text` for people, `json` for scripts.
    #[arg(long, short, value_enum, default_value_t = client::Output::Text)]
    output: client::Output,
}

#[derive(clap::Args)]
struct TargetArgs {
    /// The tenant that owns the handler.
    #[arg(long)]
    tenant: String,
    /// The handler's name (in the manifest, or created by `deploy --topic`).
    #[arg(long)]
    handler: String,
    /// Base URL of the host's HTTP server.
    #[arg(long, env = "WASMSUB_URL", default_value = "http://127.0.0.1:3500", value_parser = base_url)]
    url: String,
    /// The host's admin token (`run --admin-token`).
    #[arg(long, env = "WASMSUB_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(clap::Args)]
struct DaprArgs {
    /// The sidecar's HTTP port: run as a Dapr app behind it.
    #[arg(long, env = "DAPR_HTTP_PORT")]
    dapr_http_port: Option<u16>,
    /// The sidecar's gRPC port, for streaming subscriptions to topics that
    /// handlers deployed at runtime need.
    #[arg(long, env = "DAPR_GRPC_PORT")]
    dapr_grpc_port: Option<u16>,
    /// The port Dapr delivers events to (`--app-port` of daprd).
    #[arg(long, env = "APP_PORT", default_value_t = 3000)]
    app_port: u16,
    /// The Dapr state store for idempotency records, tenant state and outbox.
    #[arg(long, env = "WASMSUB_STATE_STORE", default_value = "statestore")]
    state_store: String,
}

#[derive(clap::Args)]
struct HostArgs {
    /// The manifest: tenants, handlers, limits (see README).
    #[arg(long, short, env = "WASMSUB_MANIFEST", default_value = "wasmsub.toml")]
    manifest: PathBuf,
    /// Directory of the embedded idempotency/state store.
    #[arg(long, env = "WASMSUB_DATA_DIR", default_value = ".wasmsub")]
    data_dir: PathBuf,
    /// Instance pool size: the most events handled at once across tenants.
    #[arg(long, env = "WASMSUB_INSTANCE_SLOTS", default_value_t = EngineConfig::default().instance_slots)]
    instance_slots: u32,
    /// Fresh instances made ahead of the attempts that will use them, in
    /// all (at most 2 per handler; 0: every attempt makes its own). Each
    /// still serves one event; it takes a pool slot and its start-up memory.
    #[arg(long, env = "WASMSUB_READY_INSTANCES", default_value_t = EngineConfig::default().ready_instances)]
    ready_instances: u32,
    /// Deliveries admitted at once (default: twice --instance-slots); past
    /// it the broker is answered RETRY instead of the host queueing them.
    #[arg(long, env = "WASMSUB_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Messages the embedded broker's queue holds before publishers get 429.
    #[arg(long, env = "WASMSUB_QUEUE_MAX_MESSAGES", default_value_t = QueueLimits::default().max_messages)]
    queue_max_messages: usize,
    /// MiB of message bodies the embedded broker's queue holds before publishers get 429.
    #[arg(long, env = "WASMSUB_QUEUE_MAX_MIB", default_value_t = QueueLimits::default().max_bytes >> 20)]
    queue_max_mib: usize,
    /// MiB of the embedded store's page cache (part of the host's memory bound).
    #[arg(long, env = "WASMSUB_STORE_CACHE_MIB", default_value_t = HostOptions::embedded(".".into()).store_cache_bytes >> 20)]
    store_cache_mib: usize,
}

impl HostArgs {
    fn load(&self) -> anyhow::Result<(Manifest, HostOptions)> {
        let manifest = Manifest::load(&self.manifest)?;
        let engine = EngineConfig { instance_slots: self.instance_slots, ready_instances: self.ready_instances, ..EngineConfig::default() };
        let options = HostOptions {
            engine,
            max_in_flight: self.max_in_flight,
            queue_limits: QueueLimits { max_messages: self.queue_max_messages, max_bytes: self.queue_max_mib << 20 },
            store_cache_bytes: self.store_cache_mib << 20,
            ..HostOptions::embedded(self.data_dir.clone())
        };
        Ok((manifest, options))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (traces, log_writer) = match init_tracing() {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(execute(cli.command));
    // Sends the spans still batched before the process ends.
    if let Some(provider) = traces
        && let Err(error) = provider.shutdown()
    {
        eprintln!("warning: could not send the last traces: {error}");
    }
    // Every log line is written before the final error line.
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<invoke::Unsuccessful>() {
            // `invoke` printed its report; the code says how the handler answered.
            Some(unsuccessful) => ExitCode::from(unsuccessful.code),
            None => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { host, dapr, listen, admin_token, watch } => {
            let (manifest, mut options) = host.load()?;
            options.admin_token = admin_token;
            options.watch = watch;
            let listen = match dapr.dapr_http_port {
                Some(port) => {
                    options.backend = Backend::Dapr {
                        sidecar_url: format!("http://127.0.0.1:{port}"),
                        state_store: dapr.state_store,
                        grpc_url: dapr.dapr_grpc_port.map(|grpc| format!("http://127.0.0.1:{grpc}")),
                    };
                    listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], dapr.app_port)))
                }
                None => listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3500))),
            };
            tracing::info!(backend = ?options.backend, %listen, "starting");
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
            wasmsub::run(listener, manifest, options, shutdown_signal()).await
        }
        Command::Check { host } => {
            let (manifest, options) = host.load()?;
            let handlers = wasmsub::check(&manifest, &options)?;
            println!("{}: manifest OK, {handlers} handler(s) loaded", host.manifest.display());
            Ok(())
        }
        Command::Invoke { component, event, topic, attempt, state, state_file, publish_topics, manifest, tenant, output } => {
            let invocation = invoke::Invocation { component, event, topic, attempt, state, state_file, publish_topics, manifest, tenant };
            invoke::run(invocation, output.output).await
        }
        Command::New { name, lang, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let files = new::create(&dir, &name, lang)?;
            println!("wrote {} files to {}; next:\n{}", files.len(), dir.display(), new::next_steps(&dir, lang));
            Ok(())
        }
        Command::Publish { topic, data, pubsub, content_type, id, event_type, url, output } => {
            let body = match data.strip_prefix('@') {
                Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
                None => data.into_bytes(),
            };
            if wasmsub::cloudevent::is_json_media_type(&content_type)
                && let Err(error) = serde_json::from_slice::<serde_json::Value>(&body)
            {
                anyhow::bail!("the data is not valid JSON ({error}); send text with --content-type text/plain");
            }
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let event = client::envelope(&id, &event_type, &body, &content_type);
            client::publish(&url, &pubsub, &topic, event, output.output).await
        }
        Command::DeadLetters { url, output } => client::print_dead_letters(&url, output.output).await,
        Command::State(StateCommand::Get { tenant, key, url, token, output }) => client::print_state(&url, &token, &tenant, &key, output.output).await,
        Command::Deploy { target, topic, pubsub, component } => {
            let bytes = std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
            let placement = topic.map(|topic| (pubsub, topic));
            client::deploy(&target.url, &target.token, &target.tenant, &target.handler, placement, bytes).await
        }
        Command::Rollback { target } => client::rollback(&target.url, &target.token, &target.tenant, &target.handler).await,
        Command::Status { url, output } => client::print_status(&url, output.output).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "wasmsub", &mut script);
            client::emit(&String::from_utf8_lossy(&script))
        }
        Command::Demo { manifest } => demo::run(&manifest, &mut std::io::stdout()).await,
    }
}

/// Logs to stderr, and spans to an OpenTelemetry collector when the
/// `OTEL_*` variables ask for it (the provider is returned so that `main`
/// can flush it at the end). RUST_LOG filters the logs only: the host's
/// spans are exported whatever the log level.
///
/// Log lines are formatted on the event's path but written by a thread of
/// their own, so a slow stderr (a pipe a log shipper drains late) does not
/// stall events. Nothing is dropped: if that thread falls
/// `LOG_LINES_BUFFERED` lines behind, logging waits for it. Dropping the
/// returned guard writes what is still buffered; a process killed with
/// SIGKILL loses what its writer had not written yet.
fn init_tracing() -> anyhow::Result<(Option<wasmsub::telemetry::TracerProvider>, tracing_appender::non_blocking::WorkerGuard)> {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn,cranelift=warn"));
    let json = std::env::var("WASMSUB_LOG_FORMAT").is_ok_and(|f| f == "json");
    // Colours only for a person at a terminal, never into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_LINES_BUFFERED)
        .lossy(false)
        .thread_name("wasmsub-log-writer")
        .finish(std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let logs = if json { logs.json().boxed() } else { logs.boxed() };
    let provider = if wasmsub::telemetry::traces_requested(|name| std::env::var(name).ok()) {
        Some(wasmsub::telemetry::otlp_provider()?)
    } else {
        None
    };
    let host_spans = tracing_subscriber::filter::Targets::new().with_target("wasmsub", tracing::Level::INFO);
    let traces = provider.as_ref().map(|provider| wasmsub::telemetry::layer(provider).with_filter(host_spans));
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(traces).init();
    Ok((provider, guard))
}

/// Log lines the writer thread may fall behind by before logging waits:
/// enough for a burst of a few thousand events, a bounded few MiB.
const LOG_LINES_BUFFERED: usize = 16_384;

/// A host or sidecar address for the client commands: an http(s) URL, so a
/// missing scheme is caught here with a hint, not by the HTTP client.
fn base_url(text: &str) -> Result<String, String> {
    if text.starts_with("http://") || text.starts_with("https://") {
        Ok(text.to_owned())
    } else {
        Err(format!("`{text}` is not an http(s) URL; add the scheme, e.g. http://{text}"))
    }
}

/// Ctrl-C or SIGTERM (what Kubernetes sends) starts a graceful stop; a
/// second one ends the process at once (safe: nothing uncommitted is
/// acknowledged, so what was in progress is delivered again).
async fn shutdown_signal() {
    stop_signal().await;
    tracing::info!("shutdown requested; finishing events in progress (a second Ctrl-C or SIGTERM stops at once)");
    tokio::spawn(async {
        stop_signal().await;
        // The log writer is not flushed on this path: say it on stderr.
        eprintln!("second stop signal: exiting now; events in progress are delivered again after a restart");
        std::process::exit(130);
    });
}

/// The next Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
