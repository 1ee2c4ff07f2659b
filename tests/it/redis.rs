//! End-to-end over Redis: `flowgen serve --role api` and `--role worker` as real processes sharing
//! a real `redis-server` started on a free port, killed with SIGKILL mid-batch.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::random_model;
use super::server::{cli_image, Server};

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(dir: &Path) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // AOF with fsync on every write: the setting under which an accepted job survives anything.
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install Debian's redis-server (.ci/run does)")
            });
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.pong() {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn pong(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn role(role: &str, url: &str, model: &str, data: &Path, log: &Path, env: &[(&str, &str)]) -> Server {
    Server::spawn(&["--role", role, "--queue", url, "--model", model, "--data-dir", data.to_str().unwrap()], log, env)
}

const ENV: [(&str, &str); 4] = [
    ("FLOWGEN_QUEUE__MAX_BATCH", "16"),
    ("FLOWGEN_LIMITS__MAX_N", "16"),
    ("FLOWGEN_QUEUE__MAX_WAIT_MS", "0"),
    ("FLOWGEN_QUEUE__VISIBILITY_TIMEOUT_S", "3"),
];

#[test]
fn api_and_workers_over_redis_survive_kill_9_of_a_worker_mid_batch_and_an_api_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let redis = RedisServer::start(dir.path());
    let url = redis.url();
    let data = dir.path().join("data");
    let log = |name: &str| dir.path().join(name);
    let api = role("api", &url, &model, &data, &log("api1.log"), &ENV);
    let worker_a = role("worker", &url, &model, &data, &log("worker-a.log"), &ENV);

    // Accepted by the API, run by the worker, served by the API: the CLI's exact image.
    let quick = api.submit(json!({"labels": [3, "seven"], "seed": 10, "sampler": "heun", "steps": 4}));
    let view = api.wait(&quick, "succeeded", Duration::from_secs(60));
    assert_eq!(view["seeds"], json!([10, 11]));
    assert_eq!(api.png(&quick, 1), cli_image(&model, dir.path(), 7, 11, "heun", 4), "worker and CLI disagree");
    match ureq::post(&api.url("/v1/generations")).send_json(json!({"steps": 0})) {
        Err(ureq::Error::Status(422, resp)) => {
            assert_eq!(resp.into_json::<serde_json::Value>().unwrap()["field"], "steps")
        }
        other => panic!("expected 422, got {other:?}"),
    }

    let ids: Vec<String> = (0..5u64)
        .map(|i| api.submit(json!({"sampler": "rk4", "steps": 120, "n": 16, "label": 1, "seed": 1000 * i})))
        .collect();
    // The first job runs on worker A (the only worker); then worker B joins and A is killed mid-batch.
    api.wait(&ids[0], "running", Duration::from_secs(60));
    let worker_b = role("worker", &url, &model, &data, &log("worker-b.log"), &ENV);
    let running: Vec<bool> = ids.iter().map(|id| api.job(id)["status"] == "running").collect();
    drop(worker_a); // SIGKILL
    let killed = Instant::now();
    // And the API restarts under load: everything it accepted is in Redis.
    drop(api);
    let api = role("api", &url, &model, &data, &log("api2.log"), &ENV);
    for (i, id) in ids.iter().enumerate() {
        let view = api.wait(id, "succeeded", Duration::from_secs(180));
        // A job killed mid-run ran again (attempt 2); a job B started first and A never ran, once.
        let attempts = view["attempts"].as_u64().unwrap();
        assert!(attempts == 1 || (running[i] && attempts == 2), "job {i} ran {attempts} times: {view}");
        assert_eq!(view["images"].as_array().unwrap().len(), 16);
    }
    let taken_over = killed.elapsed();
    let rerun: Vec<usize> = (0..ids.len()).filter(|&i| api.job(&ids[i])["attempts"] == 2).collect();
    assert_eq!(rerun.len(), 1, "exactly the job running on A at the kill ran twice: {rerun:?}");
    // The interrupted job, rerun on B from its own seeds, equals a fresh run.
    let i = rerun[0];
    assert_eq!(api.png(&ids[i], 15), cli_image(&model, dir.path(), 1, 1000 * i as u64 + 15, "rk4", 120));
    let log_b = std::fs::read_to_string(log("worker-b.log")).unwrap();
    assert!(log_b.contains("took over a job whose worker died"), "{log_b}");
    eprintln!("all jobs done {taken_over:?} after the kill");
    drop(worker_b);
}

#[test]
fn a_job_whose_worker_dies_at_every_start_is_failed_after_three_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let redis = RedisServer::start(dir.path());
    let url = redis.url();
    let data = dir.path().join("data");
    let api = role("api", &url, &model, &data, &dir.path().join("api.log"), &ENV);
    let poison = api.submit(json!({"sampler": "rk4", "steps": 256, "n": 16, "seed": 1}));
    for start in 1..=3u64 {
        let worker = role("worker", &url, &model, &data, &dir.path().join(format!("w{start}.log")), &ENV);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let view = api.job(&poison);
            if view["status"] == "running" && view["attempts"] == start {
                break;
            }
            assert!(Instant::now() < deadline, "start {start}: {view}");
            std::thread::sleep(Duration::from_millis(25));
        }
        drop(worker); // SIGKILL, as the out-of-memory killer would
    }
    let worker = role("worker", &url, &model, &data, &dir.path().join("w4.log"), &ENV);
    let view = api.wait(&poison, "failed", Duration::from_secs(30));
    assert_eq!(view["attempts"], 3, "{view}");
    assert!(view["error"].as_str().unwrap().contains("queue.max_attempts"), "{view}");
    let fresh = api.submit(json!({"steps": 2, "seed": 2}));
    api.wait(&fresh, "succeeded", Duration::from_secs(60));
    let log = std::fs::read_to_string(dir.path().join("w4.log")).unwrap();
    assert!(log.contains("dead-lettered"), "{log}");
    drop(worker);
}
