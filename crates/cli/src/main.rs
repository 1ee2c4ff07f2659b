//! `flowgen`: generate images with flow-matching models.

mod commands;

// Tensor ops allocate and free large buffers every step; glibc hands them back to the kernel and
// pays a page fault per 4 KiB on reuse (a third of CPU training time), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flowgen", version, about = "Flow-matching image generation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a model directory into PNG files, a grid and a manifest.
    Generate(commands::generate::GenerateArgs),
    /// Train the autoencoder, the velocity models and the evaluation classifier on MNIST.
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Measure a model: FD vs the val split, class accuracy, solver error, NFE, speed.
    Eval(commands::eval::EvalArgs),
    /// Create or inspect model directories.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Serve the HTTP API: queued jobs, batching, progress, cancellation, a crash-safe journal.
    Serve(commands::serve::ServeArgs),
    /// Search step schedules and store them in a model directory (BOSS).
    #[command(subcommand)]
    Schedule(commands::schedule::ScheduleCommand),
    /// Benchmarks that need a running system (the HTTP server under load).
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

/// mimalloc's `mi_option_purge_delay`: index 15 in both the v2 and v3 option enums, just before
/// `use_numa_nodes`, which libmimalloc-sys exports (it does not export this one).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

fn main() -> std::process::ExitCode {
    // Never hand freed pages back to the kernel: CPU training reallocates the same large buffers
    // every step, and re-faulting them cost a fifth of the step time.
    // SAFETY: setting a mimalloc option is a plain store, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    // A server's log is its record of jobs; other commands speak through progress bars.
    let default_filter = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Model(cmd) => commands::model::run(cmd),
        Command::Train(cmd) => commands::train::run(cmd),
        Command::Eval(args) => commands::eval::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Bench(cmd) => commands::bench::run(cmd),
        Command::Schedule(cmd) => commands::schedule::run(cmd),
    }
}
