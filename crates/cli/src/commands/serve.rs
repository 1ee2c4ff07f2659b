//! `flowgen serve`: the HTTP API over one or more model directories.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use flowgen_engine::{device::parse_device, EngineHandle, ModelConfig, Pipeline};
use flowgen_server::engine::ConfigOnly;
use flowgen_server::{Engine, Models, Overrides, Role, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one); overrides server.listen.
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the job journal; overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML file layered over the built-in defaults (see config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model directory to serve (repeatable; the first is the default). Overrides models.paths.
    #[arg(long = "model")]
    models: Vec<PathBuf>,
    /// cpu, cuda, cuda:N or auto; overrides models.device.
    #[arg(long)]
    device: Option<String>,
    /// all (API and engine, the default), api (accepts and serves jobs, loads no weights) or
    /// worker (runs jobs from --queue); overrides server.role (FLOWGEN_SERVER__ROLE).
    #[arg(long)]
    role: Option<Role>,
    /// Shared job queue, redis://HOST:PORT[/DB]; overrides queue.url (FLOWGEN_QUEUE__URL).
    #[arg(long)]
    queue: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut models = args.models.clone();
    if models.is_empty() && args.config.is_none() && std::env::var_os("FLOWGEN_MODELS__PATHS").is_none() {
        // No model named anywhere: the shipped default, found the way `generate` finds it.
        models.push(super::default_model_dir()?);
    }
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        models,
        device: args.device,
        role: args.role,
        queue: args.queue,
    };
    let config = ServerConfig::load(args.config.as_deref(), &overrides).context("invalid configuration")?;
    let mut engines: Vec<Arc<dyn Engine>> = Vec::new();
    if config.server.role.runs_engine() {
        let device = parse_device(&config.models.device).context("models.device")?;
        for dir in &config.models.paths {
            let pipeline = Pipeline::load(dir, &device).with_context(|| format!("loading model {}", dir.display()))?;
            engines.push(Arc::new(EngineHandle::spawn(pipeline, 2)?));
        }
    } else {
        // An API process validates against each model's configuration and loads no weights.
        for dir in &config.models.paths {
            let model = ModelConfig::load(dir).with_context(|| format!("reading model {}", dir.display()))?;
            engines.push(Arc::new(ConfigOnly::new(model)));
        }
    }
    let role = config.server.role;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.server.listen)
            .await
            .with_context(|| format!("binding server.listen = {}", config.server.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let names: Vec<String> = engines.iter().map(|e| e.config().name.clone()).collect();
        let data_dir = config.server.data_dir.clone();
        let state = flowgen_server::start(config, Models::new(engines)).await.context("starting the server")?;
        // One line on stdout that scripts and tests wait for.
        println!(
            "flowgen serving http://{addr} role={} models={} data_dir={}",
            role.as_str(),
            names.join(","),
            data_dir.display()
        );
        std::io::stdout().flush().ok();
        flowgen_server::serve(listener, state, shutdown_signal()).await.context("serving")?;
        println!("flowgen stopped");
        Ok(())
    });
    // A batch still running past the grace period is on a blocking thread: do not wait for it (it
    // reruns from the journal at the next start).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
