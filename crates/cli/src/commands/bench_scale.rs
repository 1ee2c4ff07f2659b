//! `flowgen bench serve --workers 1,2`: the same load against real processes, one API and N
//! workers sharing a private `redis-server`, and the per-job overhead of the queue.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::bench::{count_succeeded, drive_clients, percentile, ServeBenchArgs};

/// One worker count's figures.
#[derive(Serialize, Debug)]
pub struct ScaleOutRow {
    pub workers: usize,
    pub images_per_s: f64,
    /// Over the raw engine's images/s in the same run.
    pub ratio: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    /// One single-image job at a time: submit to succeeded (SSE), less the engine's own time.
    pub queue_overhead_p50_ms: f64,
    pub queue_overhead_p90_ms: f64,
    pub succeeded: usize,
    pub failed: usize,
    pub lost: usize,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_redis(dir: &Path) -> Result<(Proc, String)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (--workers needs Redis installed, e.g. Debian's redis-server)")?;
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, format!("redis://127.0.0.1:{port}/0")))
}

/// `flowgen serve --role ROLE` as a child process, once `/ready` answers; its base URL.
fn start_role(role: &str, queue: &str, args: &ServeBenchArgs, model: &Path, dir: &Path) -> Result<(Proc, String)> {
    let exe = std::env::current_exe().context("finding the flowgen binary")?;
    let log = std::fs::File::create(dir.join(format!("{role}-{}.log", free_port()?)))?;
    let mut child = Command::new(exe)
        .args(["serve", "--role", role, "--queue", queue, "--listen", "127.0.0.1:0", "--device", &args.device])
        .arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("FLOWGEN_MODEL")
        .env("FLOWGEN_QUEUE__MAX_BATCH", args.max_batch.to_string())
        .env("FLOWGEN_QUEUE__MAX_WAIT_MS", args.max_wait_ms.to_string())
        .env("FLOWGEN_QUEUE__CAPACITY", args.jobs.max(256).to_string())
        .env("FLOWGEN_QUEUE__MAX_QUEUED_PER_KEY", args.jobs.max(64).to_string())
        .env("FLOWGEN_LIMITS__MAX_N", args.n.max(16).min(args.max_batch).to_string())
        .env("FLOWGEN_LIMITS__MAX_STEPS", args.steps.max(256).to_string())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting flowgen serve --role {role}"))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.as_mut() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let proc = Proc(child);
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("flowgen serve --role {role} did not start: {line:?} (logs in {})", dir.display()))?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ureq::get(&format!("{base}/ready")).call().is_err() {
        if Instant::now() > deadline {
            bail!("flowgen serve --role {role} never became ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, base))
}

/// Submit-to-succeeded time of one-image jobs run one at a time, less each one's inference time.
pub(super) fn queue_overhead(base: &str, args: &ServeBenchArgs, samples: usize) -> Result<Vec<f64>> {
    let agent: ureq::Agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).build();
    let mut overheads = Vec::with_capacity(samples);
    for i in 0..samples {
        let body = serde_json::json!({"labels": [i % 10], "n": 1, "seed": 1_000_000 + i, "sampler": args.sampler, "steps": args.steps});
        let started = Instant::now();
        let created: serde_json::Value = agent.post(&format!("{base}/v1/generations")).send_json(body)?.into_json()?;
        let id = created["id"].as_str().context("no id in the 202 response")?.to_string();
        let events = agent.get(&format!("{base}/v1/generations/{id}/events")).call()?;
        for line in BufReader::new(events.into_reader()).lines() {
            if line?.starts_with("event: succeeded") {
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let view: serde_json::Value = agent.get(&format!("{base}/v1/generations/{id}")).call()?.into_json()?;
        let inference = view["inference_seconds"].as_f64().context("no inference_seconds")?;
        overheads.push(1000.0 * (elapsed - inference));
    }
    overheads.sort_by(f64::total_cmp);
    Ok(overheads)
}

/// The load of `args` against one API and each of `counts` workers, a fresh Redis each time.
pub fn run(
    args: &ServeBenchArgs,
    counts: &[usize],
    model: &Path,
    classes: u32,
    raw_rate: f64,
) -> Result<Vec<ScaleOutRow>> {
    let mut rows = Vec::new();
    for &workers in counts {
        let dir = tempfile::tempdir().context("temporary directory")?;
        let (_redis, url) = start_redis(dir.path())?;
        let (_api, base) = start_role("api", &url, args, model, dir.path())?;
        let mut _workers = Vec::new();
        for _ in 0..workers {
            _workers.push(start_role("worker", &url, args, model, dir.path())?.0);
        }
        eprintln!("{workers} worker(s) behind {base} on {url}");
        let clock = Instant::now();
        let results = drive_clients(args, &base, classes);
        let wall = clock.elapsed().as_secs_f64();
        let succeeded = count_succeeded(&base, &results.ids)?;
        let overhead = queue_overhead(&base, args, 20)?;
        let mut lat = results.latencies.clone();
        lat.sort_by(f64::total_cmp);
        let images_per_s = (succeeded * args.n) as f64 / wall;
        let row = ScaleOutRow {
            workers,
            images_per_s,
            ratio: images_per_s / raw_rate,
            latency_p50_s: percentile(&lat, 50.0),
            latency_p99_s: percentile(&lat, 99.0),
            queue_overhead_p50_ms: percentile(&overhead, 50.0),
            queue_overhead_p90_ms: percentile(&overhead, 90.0),
            succeeded,
            failed: results.failures.len(),
            lost: args.jobs - succeeded - results.failures.len(),
        };
        eprintln!(
            "{workers} worker(s): {:.2} images/s ({:.3} of the raw engine), {} succeeded, {} failed, {} lost",
            row.images_per_s, row.ratio, row.succeeded, row.failed, row.lost
        );
        rows.push(row);
    }
    Ok(rows)
}

pub fn print(rows: &[ScaleOutRow]) {
    println!("\n| workers (Redis) | images/s | / raw engine | latency p50 / p99 (s) | queue overhead p50 / p90 (ms) | succeeded / failed / lost |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.3} | {:.3} / {:.3} | {:.1} / {:.1} | {} / {} / {} |",
            r.workers,
            r.images_per_s,
            r.ratio,
            r.latency_p50_s,
            r.latency_p99_s,
            r.queue_overhead_p50_ms,
            r.queue_overhead_p90_ms,
            r.succeeded,
            r.failed,
            r.lost
        );
    }
}
