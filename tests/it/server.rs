//! End-to-end: `flowgen serve` as a real process on port 0 with a real (random-weights) model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowgen_engine::image::Image;
use serde_json::{json, Value};

use super::{flowgen, flowgen_bin, random_model};

pub(crate) struct Server {
    pub(crate) child: Child,
    base: String,
}

impl Server {
    pub(crate) fn start(model: &str, data_dir: &Path, log: &Path, env: &[(&str, &str)]) -> Server {
        Server::spawn(&["--data-dir", data_dir.to_str().unwrap(), "--model", model], log, env)
    }

    /// `flowgen serve --listen 127.0.0.1:0` with `args`, once it is ready.
    pub(crate) fn spawn(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(flowgen_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
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

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn submit(&self, body: Value) -> String {
        let resp = ureq::post(&self.url("/v1/generations")).send_json(body).unwrap();
        assert_eq!(resp.status(), 202);
        let view: Value = resp.into_json().unwrap();
        view["id"].as_str().unwrap().to_string()
    }

    pub(crate) fn job(&self, id: &str) -> Value {
        ureq::get(&self.url(&format!("/v1/generations/{id}"))).call().unwrap().into_json().unwrap()
    }

    pub(crate) fn wait(&self, id: &str, status: &str, limit: Duration) -> Value {
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

    pub(crate) fn png(&self, id: &str, index: usize) -> Image {
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
pub(crate) fn cli_image(model: &str, dir: &Path, label: u32, seed: u64, sampler: &str, steps: usize) -> Image {
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
    assert!(report["image_get_p50_ms"].as_f64().unwrap() > 0.0, "image downloads are timed: {report}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("server / raw"));
}

/// A connection that sends half a request head and then nothing.
fn slow_client(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    stream
}

/// Whether the server has closed `stream` (end of file or a reset), waiting at most `wait`.
fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// One request on a fresh connection; what came back before the server closed it.
fn raw_exchange(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if !request.is_empty() {
        stream.write_all(request.as_bytes()).unwrap();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

#[test]
fn slow_clients_past_the_connection_cap_leave_probes_answering_and_sigterm_ends_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let data = dir.path().join("data");
    let env = [
        ("FLOWGEN_SERVER__MAX_CONNECTIONS", "4"),
        ("FLOWGEN_SERVER__HEADER_TIMEOUT_S", "5"),
        ("FLOWGEN_SERVER__BODY_TIMEOUT_S", "2"),
        ("FLOWGEN_SERVER__SHUTDOWN_GRACE_S", "2"),
        ("FLOWGEN_QUEUE__MAX_WAIT_MS", "0"),
    ];
    let server = Server::start(&model, &data, &dir.path().join("serve.log"), &env);
    let addr = server.base.trim_start_matches("http://").to_string();
    let health = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let post = "POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    // Let the pooled connections of the readiness polls time out first, so the counts below are exact.
    std::thread::sleep(Duration::from_secs(6));

    // Slow clients take every full slot: probes still answer on the overflow, the API says 503.
    let mut slow: Vec<TcpStream> = (0..4).map(|_| slow_client(&addr)).collect();
    // Poll rather than sleep: on a loaded machine the server may take a while to accept them all.
    let refused = poll_exchange(&addr, post, "HTTP/1.1 503 Service Unavailable", Duration::from_secs(3));
    assert_eq!(status_line(&refused), "HTTP/1.1 503 Service Unavailable", "{refused}");
    assert_eq!(status_line(&raw_exchange(&addr, health)), "HTTP/1.1 200 OK");
    assert!(refused.contains("server.max_connections"), "{refused}");
    // Past the overflow too: an immediate 503, without reading the request.
    let mut overflow: Vec<TcpStream> = (0..64).map(|_| slow_client(&addr)).collect();
    let refused = poll_exchange(&addr, "", "HTTP/1.1 503 Service Unavailable", Duration::from_secs(3));
    assert_eq!(status_line(&refused), "HTTP/1.1 503 Service Unavailable", "{refused}");
    assert!(refused.contains("too many open connections"), "{refused}");

    // The header timeout frees every slot, and the API answers again.
    for stream in slow.iter_mut().chain(overflow.iter_mut()) {
        assert!(closed_by_server(stream, Duration::from_secs(9)), "a slow client kept its connection");
    }
    let accepted = raw_exchange(&addr, post);
    assert_eq!(status_line(&accepted), "HTTP/1.1 202 Accepted", "{accepted}");

    // A body that trickles in is cut off with 408.
    let mut trickle = TcpStream::connect(&addr).unwrap();
    trickle
        .write_all(b"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"n\":")
        .unwrap();
    trickle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1024];
    let n = trickle.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_line(&answer), "HTTP/1.1 408 Request Timeout", "{answer}");

    // SIGTERM with a long batch running, slow clients, an idle keep-alive and an open event stream:
    // the process still ends within the grace period plus a few seconds.
    let heavy: Vec<String> =
        (0..3).map(|i| server.submit(json!({"sampler": "rk4", "steps": 256, "n": 16, "seed": i}))).collect();
    server.wait(&heavy[0], "running", Duration::from_secs(60));
    let mut events = TcpStream::connect(&addr).unwrap();
    write!(events, "GET /v1/generations/{}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", heavy[2]).unwrap();
    let mut keep_alive = TcpStream::connect(&addr).unwrap();
    keep_alive.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let _slow: Vec<TcpStream> = (0..3).map(|_| slow_client(&addr)).collect();
    events.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = events.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"), "the event stream is open");
    let mut server = server;
    let signalled = Instant::now();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(15), "server still running 15 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?} with a 2 s grace period");
    eprintln!("SIGTERM to exit: {took:?}");

    // Nothing accepted was lost: the interrupted batch and the queued jobs finish after a restart.
    drop(server);
    let server = Server::start(&model, &data, &dir.path().join("serve2.log"), &[]);
    for id in &heavy {
        server.wait(id, "succeeded", Duration::from_secs(300));
    }
}

/// `raw_exchange` again until its status line is `want` or `within` has passed; the last answer.
fn poll_exchange(addr: &str, request: &str, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let answer = raw_exchange(addr, request);
        if status_line(&answer) == want || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every job of the caller, following the listing's cursor.
fn list_all(server: &Server, query: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let mut url = server.url(&format!("/v1/generations?limit=500{query}"));
        if let Some(last) = all.last() {
            url.push_str(&format!("&after={}", last["id"].as_str().unwrap()));
        }
        let page: Value = ureq::get(&url).call().unwrap().into_json().unwrap();
        all.extend(page["data"].as_array().unwrap().iter().cloned());
        if page["has_more"] == false {
            return all;
        }
    }
}

#[test]
fn two_thousand_clients_closing_right_after_their_post_leave_no_slot_key_or_job_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let env = [
        // Room for every one of them: any request admitted is journaled, its client already gone.
        ("FLOWGEN_QUEUE__CAPACITY", "4096"),
        ("FLOWGEN_QUEUE__MAX_QUEUED_PER_KEY", "4096"),
        ("FLOWGEN_QUEUE__MAX_WAIT_MS", "0"),
    ];
    let server = Server::start(&model, &dir.path().join("data"), &dir.path().join("serve.log"), &env);
    let addr = server.base.trim_start_matches("http://").to_string();
    let body = r#"{"sampler": "euler", "steps": 2}"#;
    // Each client sends a whole POST and closes at once, never reading the answer.
    for i in 0..2000 {
        let mut stream = TcpStream::connect(&addr).unwrap();
        let request = format!(
            "POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nIdempotency-Key: close-{i}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    // Whatever was accepted runs to its end; nothing stays queued or running, no slot stays
    // reserved, and memory holds nothing (the journal has it all). The server may still be reading
    // requests from its accept backlog after the last client left, so a late one can be admitted
    // after an all-done poll: wait until the listing, /ready and the gauges agree, and the listing
    // stopped growing. A leaked slot or entry keeps a gauge above 0 and ends at the deadline.
    let gauges = ["flowgen_admissions_in_flight 0", "flowgen_live_jobs 0", "flowgen_queue_depth 0"];
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut seen = usize::MAX;
    let jobs = loop {
        let jobs = list_all(&server, "");
        let ready: Value = ureq::get(&server.url("/ready")).call().unwrap().into_json().unwrap();
        let metrics = ureq::get(&server.url("/metrics")).call().unwrap().into_string().unwrap();
        let idle = gauges.iter().all(|g| metrics.lines().any(|l| l == *g));
        let done = ready["queued"] == 0 && jobs.iter().all(|j| j["status"] == "succeeded");
        if idle && done && jobs.len() == seen {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "still live after 240 s: {} jobs not succeeded, gauges {:?}",
            jobs.iter().filter(|j| j["status"] != "succeeded").count(),
            metrics.lines().filter(|l| gauges.iter().any(|g| l.starts_with(&g[..g.len() - 2]))).collect::<Vec<_>>()
        );
        seen = jobs.len();
        std::thread::sleep(Duration::from_millis(500));
    };
    // A request the server had not admitted when its client left is dropped whole; one it had
    // admitted is journaled and runs.
    assert!(!jobs.is_empty(), "some closed clients' requests were admitted");
    let fresh = server.submit(serde_json::from_str(body).unwrap());
    server.wait(&fresh, "succeeded", Duration::from_secs(60));
    // Each key that was journaled replays to its job; each that was not starts a job (never a 500).
    let mut replayed = 0;
    for i in (0..2000).step_by(41) {
        let resp = ureq::post(&server.url("/v1/generations"))
            .set("Idempotency-Key", &format!("close-{i}"))
            .set("Content-Type", "application/json")
            .send_string(body)
            .unwrap_or_else(|e| panic!("replaying key close-{i}: {e}"));
        let status = resp.status();
        let view: Value = resp.into_json().unwrap();
        if status == 200 {
            assert!(jobs.iter().any(|j| j["id"] == view["id"]), "replayed to an unknown job: {view}");
            replayed += 1;
        } else {
            assert_eq!(status, 202, "{view}");
        }
    }
    eprintln!("{} of 2000 closed clients' jobs were accepted and ran; {replayed} keys replayed", jobs.len());
}

#[test]
fn a_job_that_takes_the_process_down_at_every_start_fails_after_three_and_the_server_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(dir.path());
    let data = dir.path().join("data");
    let env = [("FLOWGEN_QUEUE__MAX_WAIT_MS", "0")];
    // SIGKILL while it runs is what the kernel's out-of-memory killer does to the process.
    let server = Server::start(&model, &data, &dir.path().join("serve0.log"), &env);
    let poison = server.submit(json!({"sampler": "rk4", "steps": 256, "n": 16, "seed": 1}));
    server.wait(&poison, "running", Duration::from_secs(60));
    drop(server);
    for start in 1..3 {
        let server = Server::start(&model, &data, &dir.path().join(format!("serve{start}.log")), &env);
        let view = server.wait(&poison, "running", Duration::from_secs(60));
        assert_eq!(view["attempts"], start + 1, "start {start}: {view}");
        drop(server);
    }
    // The fourth start does not run it again: it fails, saying why, and everything else is served.
    let server = Server::start(&model, &data, &dir.path().join("serve3.log"), &env);
    let view = server.job(&poison);
    assert_eq!((view["status"].as_str(), view["attempts"].as_u64()), (Some("failed"), Some(3)), "{view}");
    assert!(view["error"].as_str().unwrap().contains("queue.max_attempts = 3"), "{view}");
    let fresh = server.submit(json!({"steps": 2, "seed": 2}));
    server.wait(&fresh, "succeeded", Duration::from_secs(60));
    let log = std::fs::read_to_string(dir.path().join("serve3.log")).unwrap();
    assert!(log.contains("poison"), "the start logs the poison job: {log}");
}

#[test]
fn flowturbo_through_the_server_matches_the_cli_and_journals_the_canonical_plan() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let made = flowgen(&[
        "model",
        "init-random",
        "--out",
        model.to_str().unwrap(),
        "--seed",
        "5",
        "--refiner",
        "flowturbo:h1p2r2",
    ]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let model = model.to_str().unwrap().to_string();
    // The CLI with plain `--sampler flowturbo`: the model's recommended plan, its own 5 steps.
    let out = dir.path().join("cli");
    let run = flowgen(&[
        "generate",
        "--model",
        &model,
        "--label",
        "3",
        "--n",
        "1",
        "--seed",
        "10",
        "--sampler",
        "flowturbo",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let cli = Image::from_png(&std::fs::read(out.join("000.png")).unwrap()).unwrap().0;

    let server = Server::start(&model, &dir.path().join("data"), &dir.path().join("serve.log"), &[]);
    let models: Value = ureq::get(&server.url("/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["sampler_plans"]["flowturbo"], "flowturbo:H1P2R2", "{models}");
    assert_eq!(models["data"][0]["networks"], json!(["refiner"]));
    let id = server.submit(json!({"label": 3, "seed": 10, "sampler": "FlowTurbo"}));
    let view = server.wait(&id, "succeeded", Duration::from_secs(60));
    assert_eq!((view["sampler"].as_str(), view["steps"].as_u64()), (Some("flowturbo:H1P2R2"), Some(5)), "{view}");
    assert_eq!(server.png(&id, 0), cli, "server and CLI disagree");
    // An explicit plan runs as given; a step count that is not the plan's is refused by name.
    let id = server.submit(json!({"label": 1, "sampler": "flowturbo:H2P1R1"}));
    assert_eq!(server.wait(&id, "succeeded", Duration::from_secs(60))["steps"], 4);
    for (body, field, needle) in [
        (json!({"sampler": "flowturbo:H1P2R2", "steps": 7}), "steps", "runs 5 steps, not 7"),
        (json!({"sampler": "flowturbo:H1Q2"}), "sampler", "not H, P or R"),
    ] {
        match ureq::post(&server.url("/v1/generations")).send_json(body.clone()) {
            Err(ureq::Error::Status(422, resp)) => {
                let err: Value = resp.into_json().unwrap();
                assert_eq!(err["field"], field, "{body}: {err}");
                assert!(err.to_string().contains(needle), "{body}: {err}");
            }
            other => panic!("{body}: expected 422, got {other:?}"),
        }
    }
}

#[test]
fn a_blockwise_model_serves_euler_and_fra_by_name_and_records_their_costs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let made = flowgen(&["model", "init-random", "--out", model.to_str().unwrap(), "--seed", "3", "--blockwise"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let model = model.to_str().unwrap().to_string();
    // The CLI: 8 FRA steps over 4 segments run the trunk at 4 and the FRN at 4; the manifest
    // records both counts and the GFLOPs they cost, below Euler's with the trunk at every step.
    let manifest = |sampler: &str| -> Value {
        let out = dir.path().join(sampler);
        let run = flowgen(&[
            "generate",
            "--model",
            &model,
            "--label",
            "0-3",
            "--n",
            "4",
            "--seed",
            "2",
            "--sampler",
            sampler,
            "--steps",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{sampler}: {}", String::from_utf8_lossy(&run.stderr));
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
    };
    let fra = manifest("fra");
    let euler = manifest("euler");
    let text = fra.to_string();
    assert!(text.contains("\"frn\":4") && text.contains("\"velocity\":4"), "{fra}");
    let gflops = |m: &Value| m["images"][0]["gflops"].as_f64().unwrap_or_else(|| panic!("no gflops in {m}"));
    assert!(gflops(&fra) < gflops(&euler), "fra {} vs euler {}", gflops(&fra), gflops(&euler));

    // The server: the same samplers by name, and the same image as the CLI for the same seed.
    let server = Server::start(&model, &dir.path().join("data"), &dir.path().join("serve.log"), &[]);
    let id = server.submit(json!({"label": 0, "seed": 2, "sampler": "FRA", "steps": 8}));
    let view = server.wait(&id, "succeeded", Duration::from_secs(60));
    assert_eq!(view["sampler"], "fra", "{view}");
    let cli = Image::from_png(&std::fs::read(dir.path().join("fra").join("000.png")).unwrap()).unwrap().0;
    assert_eq!(server.png(&id, 0), cli, "server and CLI disagree");
    let id = server.submit(json!({"label": 1, "sampler": "heun", "steps": 4}));
    server.wait(&id, "succeeded", Duration::from_secs(60));
}
