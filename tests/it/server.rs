//! End-to-end: `flowgen serve` as a real process on port 0 with a real (random-weights) model.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowgen_engine::image::Image;
use serde_json::{json, Value};

use super::{flowgen, flowgen_bin, random_model};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(model: &str, data_dir: &Path, log: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(flowgen_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap(), "--model", model])
            .env_remove("FLOWGEN_MODEL")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                panic!("no address in {line:?}; log: {}", std::fs::read_to_string(log).unwrap_or_default())
            })
            .to_string();
        let server = Server { child, base };
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&server.url("/ready")).call().is_err() {
            assert!(Instant::now() < deadline, "server never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn submit(&self, body: Value) -> String {
        let resp = ureq::post(&self.url("/v1/generations")).send_json(body).unwrap();
        assert_eq!(resp.status(), 202);
        let view: Value = resp.into_json().unwrap();
        view["id"].as_str().unwrap().to_string()
    }

    fn job(&self, id: &str) -> Value {
        ureq::get(&self.url(&format!("/v1/generations/{id}"))).call().unwrap().into_json().unwrap()
    }

    fn wait(&self, id: &str, status: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let view = self.job(id);
            if view["status"] == status {
                return view;
            }
            assert!(Instant::now() < deadline, "job {id} is {} after {limit:?}, wanted {status}", view["status"]);
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn png(&self, id: &str, index: usize) -> Image {
        let mut bytes = Vec::new();
        ureq::get(&self.url(&format!("/v1/generations/{id}/images/{index}")))
            .call()
            .unwrap()
            .into_reader()
            .read_to_end(&mut bytes)
            .unwrap();
        Image::from_png(&bytes).unwrap().0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI's image for (label, seed) with the same sampler settings: the server must match it.
fn cli_image(model: &str, dir: &Path, label: u32, seed: u64, sampler: &str, steps: usize) -> Image {
    let out = dir.join(format!("cli-{label}-{seed}"));
    let run = flowgen(&[
        "generate",
        "--model",
        model,
        "--label",
        &label.to_string(),
        "--n",
        "1",
        "--seed",
        &seed.to_string(),
        "--sampler",
        sampler,
        "--steps",
        &steps.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    Image::from_png(&std::fs::read(out.join("000.png")).unwrap()).unwrap().0
}

#[test]
fn serve_submit_poll_fetch_then_survive_kill_9_with_every_job_done_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let data = dir.path().join("data");
    // One job per batch, slow enough that a kill lands mid-queue.
    let env =
        [("FLOWGEN_QUEUE__MAX_BATCH", "16"), ("FLOWGEN_LIMITS__MAX_N", "16"), ("FLOWGEN_QUEUE__MAX_WAIT_MS", "0")];
    let server = Server::start(&model, &data, &dir.path().join("serve1.log"), &env);

    let quick = server.submit(json!({"labels": [3, "seven"], "seed": 10, "sampler": "heun", "steps": 4}));
    let view = server.wait(&quick, "succeeded", Duration::from_secs(60));
    assert_eq!(view["seeds"], json!([10, 11]));
    assert_eq!(server.png(&quick, 1), cli_image(&model, dir.path(), 7, 11, "heun", 4), "server and CLI disagree");
    let bad = ureq::post(&server.url("/v1/generations")).send_json(json!({"steps": 0}));
    match bad {
        Err(ureq::Error::Status(422, resp)) => assert_eq!(resp.into_json::<Value>().unwrap()["field"], "steps"),
        other => panic!("expected 422, got {other:?}"),
    }

    let ids: Vec<String> = (0..5u64)
        .map(|i| server.submit(json!({"sampler": "rk4", "steps": 120, "n": 16, "label": 1, "seed": 1000 * i})))
        .collect();
    // Kill once the first job is done and the second is running: queued ones are still waiting.
    server.wait(&ids[0], "succeeded", Duration::from_secs(120));
    server.wait(&ids[1], "running", Duration::from_secs(120));
    let before: Vec<Value> = ids.iter().map(|id| server.job(id)).collect();
    drop(server); // SIGKILL
    assert_eq!(before[0]["attempts"], 1);
    assert!(before.iter().any(|v| v["status"] == "queued"), "nothing was queued at the kill: {before:?}");

    let server = Server::start(&model, &data, &dir.path().join("serve2.log"), &env);
    assert_eq!(server.png(&quick, 0), cli_image(&model, dir.path(), 3, 10, "heun", 4), "a finished result survives");
    for (i, id) in ids.iter().enumerate() {
        let view = server.wait(id, "succeeded", Duration::from_secs(180));
        let expected_attempts = match before[i]["status"].as_str().unwrap() {
            "succeeded" => 1,
            "running" => 2,
            _ => 1,
        };
        assert_eq!(view["attempts"], expected_attempts, "job {i} ran {} times: {view}", view["attempts"]);
        assert_eq!(view["images"].as_array().unwrap().len(), 16);
    }
    // The job interrupted mid-run was rerun from its own seeds: identical to a fresh run.
    let interrupted = before.iter().position(|v| v["status"] == "running").unwrap();
    assert_eq!(
        server.png(&ids[interrupted], 15),
        cli_image(&model, dir.path(), 1, 1000 * interrupted as u64 + 15, "rk4", 120)
    );

    // SIGTERM drains and exits cleanly.
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit after SIGTERM: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bench_serve_reports_throughput_against_the_raw_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let report = dir.path().join("bench.json");
    let out = flowgen(&[
        "bench",
        "serve",
        "--model",
        &model,
        "--clients",
        "4",
        "--jobs",
        "12",
        "--n",
        "2",
        "--steps",
        "4",
        "--max-batch",
        "8",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(
        (report["succeeded"].as_u64(), report["failed"].as_u64(), report["lost"].as_u64()),
        (Some(12), Some(0), Some(0))
    );
    assert!(report["raw_engine_images_per_s"].as_f64().unwrap() > 0.0 && report["ratio"].as_f64().unwrap() > 0.0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("server / raw"));
}
