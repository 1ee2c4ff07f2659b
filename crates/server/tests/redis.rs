//! The Redis backend against a real `redis-server` (each test starts its own on a free port):
//! API and worker processes' states in one test process, with fake engines.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use flowgen_server::config::Role;
use flowgen_server::redis_backend::{RedisBackend, RedisSettings};
use flowgen_server::testing::FakeEngine;
use flowgen_server::{app, AppState, Engine, Models, ServerConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A private redis-server on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // The probe listener is dropped before redis-server binds the port.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        RedisServer::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install Debian's redis-server (.ci/run does)")
            });
        let server = RedisServer { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let client = redis::Client::open(server.url()).unwrap();
            if let Ok(mut con) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    state: Arc<AppState>,
    fake: Arc<FakeEngine>,
}

fn config(redis: &RedisServer, prefix: &str, role: Role) -> ServerConfig {
    let mut config = ServerConfig::default();
    config.server.role = role;
    config.queue.url = redis.url();
    config.queue.redis_prefix = prefix.into();
    config.queue.max_wait_ms = 0;
    config.queue.visibility_timeout_s = 2;
    config.validate().unwrap();
    config
}

async fn node(config: ServerConfig, fake: FakeEngine) -> Node {
    let fake = Arc::new(fake);
    let state = flowgen_server::start(config, Models::new(vec![fake.clone() as Arc<dyn Engine>])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.is_ready() {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fake.clear_batches();
    Node { state, fake }
}

fn prefix() -> String {
    format!("t{}", &uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

async fn call(state: &Arc<AppState>, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app(state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn submit(api: &Node, body: Value) -> String {
    let (status, bytes) = call(&api.state, "POST", "/v1/generations", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&bytes));
    let view: Value = serde_json::from_slice(&bytes).unwrap();
    view["id"].as_str().unwrap().to_string()
}

async fn view(api: &Node, id: &str) -> Value {
    let (status, bytes) = call(&api.state, "GET", &format!("/v1/generations/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
    serde_json::from_slice(&bytes).unwrap()
}

async fn wait_for(api: &Node, id: &str, status: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = view(api, id).await;
        if v["status"] == status {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} is {} after {limit:?}, wanted {status}: {v}", v["status"]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_accepts_a_worker_runs_and_the_api_serves_the_png_and_sse() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let api = node(config(&redis, &prefix, Role::Api), FakeEngine::new("fake", Duration::ZERO)).await;
    let worker = node(config(&redis, &prefix, Role::Worker), FakeEngine::new("fake", Duration::from_millis(5))).await;
    let id = submit(&api, json!({"labels": [3, 4], "seed": 9, "steps": 4})).await;
    // SSE through the API sees the job through to its end.
    let (status, events) = call(&api.state, "GET", &format!("/v1/generations/{id}/events"), None).await;
    assert_eq!(status, StatusCode::OK);
    let events = String::from_utf8_lossy(&events).to_string();
    assert!(events.contains("event: succeeded"), "{events}");
    let done = wait_for(&api, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!((done["attempts"].as_u64(), done["nfe"].as_u64(), done["step"].as_u64()), (Some(1), Some(4), Some(4)));
    let (status, png) = call(&api.state, "GET", &format!("/v1/generations/{id}/images/1"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (image, _) = flowgen_engine::image::Image::from_png(&png).unwrap();
    assert_eq!(image, worker.fake.image_for(10, 4), "the API serves the worker's image for seed 10, label 4");
    assert_eq!(worker.fake.batches(), vec![vec![9, 10]]);
    assert!(api.fake.batches().is_empty(), "the API process runs nothing");
    // The same validation contract as the embedded server.
    let (status, bytes) = call(&api.state, "POST", "/v1/generations", Some(json!({"steps": 0}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{}", String::from_utf8_lossy(&bytes));
    // Listing and deleting go through Redis too.
    let (_, list) = call(&api.state, "GET", "/v1/generations?status=succeeded", None).await;
    let list: Value = serde_json::from_slice(&list).unwrap();
    assert_eq!(list["data"][0]["id"], id.as_str());
    let (status, _) = call(&api.state, "DELETE", &format!("/v1/generations/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&api.state, "GET", &format!("/v1/generations/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The worker serves probes and metrics only.
    let resp = flowgen_server::routes::worker_app(worker.state.clone())
        .oneshot(Request::builder().uri("/v1/generations").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_share_the_streams_and_no_job_runs_twice() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let mut cfg = config(&redis, &prefix, Role::Api);
    cfg.queue.max_batch = 4;
    cfg.limits.max_n = 4;
    let api = node(cfg.clone(), FakeEngine::new("fake", Duration::ZERO)).await;
    cfg.server.role = Role::Worker;
    let a = node(cfg.clone(), FakeEngine::new("fake", Duration::from_millis(3))).await;
    let b = node(cfg, FakeEngine::new("fake", Duration::from_millis(3))).await;
    let mut ids = Vec::new();
    for i in 0..40u64 {
        ids.push(
            submit(&api, json!({"seed": 100 * i, "steps": 5, "priority": if i % 3 == 0 { "high" } else { "normal" }}))
                .await,
        );
    }
    for id in &ids {
        let v = wait_for(&api, id, "succeeded", Duration::from_secs(30)).await;
        assert_eq!(v["attempts"], 1, "{v}");
    }
    let mut seeds: Vec<u64> = a.fake.batches().into_iter().chain(b.fake.batches()).flatten().collect();
    seeds.sort_unstable();
    let expected: Vec<u64> = (0..40u64).map(|i| 100 * i).collect();
    assert_eq!(seeds, expected, "every job ran exactly once across both workers");
    let (na, nb) = (a.fake.batches().len(), b.fake.batches().len());
    assert!(na > 0 && nb > 0, "both workers ran batches: {na} and {nb}");
    assert!(na + nb < 40, "jobs claimed together ran in shared batches: {} batches", na + nb);
    assert_eq!(api.state.queue.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_panics_the_engine_three_times_is_dead_lettered_and_the_others_succeed() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let api = node(config(&redis, &prefix, Role::Api), FakeEngine::new("fake", Duration::ZERO)).await;
    let mut fake = FakeEngine::new("fake", Duration::from_millis(1));
    fake.panic_label = Some(7);
    let worker = node(config(&redis, &prefix, Role::Worker), fake).await;
    let poison = submit(&api, json!({"label": 7, "seed": 1, "steps": 3})).await;
    let good: Vec<String> = futures_like(&api, 5).await;
    let failed = wait_for(&api, &poison, "failed", Duration::from_secs(30)).await;
    assert_eq!(failed["attempts"], 3, "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("panic") && error.contains("queue.max_attempts"), "{error}");
    for id in &good {
        wait_for(&api, id, "succeeded", Duration::from_secs(30)).await;
    }
    let panics = worker.fake.batches().iter().filter(|b| b.contains(&1)).count();
    assert!(panics >= 3, "the poison job ran at least three times (alone or in a batch): {panics}");
    // The dead-letter stream holds it with its error.
    let settings = RedisSettings::from_config(&config(&redis, &prefix, Role::Api), "probe".into());
    let jobs = Arc::new(flowgen_server::jobs::Jobs::new(1, 1, 1, Arc::new(flowgen_server::metrics::Metrics::new())));
    let probe = RedisBackend::open(settings, jobs, Arc::new(flowgen_server::metrics::Metrics::new())).unwrap();
    let dead = probe.dead_letters().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, poison);
    assert!(dead[0].1.contains("panic"), "{dead:?}");
}

async fn futures_like(api: &Node, n: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(submit(api, json!({"label": 2, "seed": 50 + i, "steps": 3})).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_through_the_api_stops_a_job_running_on_a_worker() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let api = node(config(&redis, &prefix, Role::Api), FakeEngine::new("fake", Duration::ZERO)).await;
    let worker = node(config(&redis, &prefix, Role::Worker), FakeEngine::new("fake", Duration::from_millis(20))).await;
    let id = submit(&api, json!({"seed": 1, "steps": 200})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.fake.current_step() < 3 {
        assert!(Instant::now() < deadline, "the job never started on the worker");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running = view(&api, &id).await;
    assert_eq!(running["status"], "running");
    assert!(running["step"].as_u64().unwrap() >= 1, "progress reaches the API: {running}");
    let (status, _) = call(&api.state, "POST", &format!("/v1/generations/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.fake.stopped_at().is_empty() {
        assert!(Instant::now() < deadline, "the worker never stopped the cancelled job");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = worker.fake.stopped_at()[0];
    assert!(stopped < 100, "stopped at step {stopped} of 200");
    assert_eq!(view(&api, &id).await["status"], "cancelled");
    // The worker goes on with the next job.
    let next = submit(&api, json!({"seed": 2, "steps": 2})).await;
    wait_for(&api, &next, "succeeded", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_admission_limits_and_idempotency_hold_across_api_processes() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let mut cfg = config(&redis, &prefix, Role::Api);
    cfg.queue.capacity = 3;
    let first = node(cfg.clone(), FakeEngine::new("fake", Duration::ZERO)).await;
    let second = node(cfg, FakeEngine::new("fake", Duration::ZERO)).await;
    // No worker: jobs stay queued. Capacity counts both API processes' jobs.
    submit(&first, json!({"seed": 1})).await;
    submit(&second, json!({"seed": 2})).await;
    let keyed = |state: &Arc<AppState>, seed: u64| {
        let state = state.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/generations")
                .header(header::CONTENT_TYPE, "application/json")
                .header("idempotency-key", "k-1")
                .body(Body::from(json!({"seed": seed}).to_string()))
                .unwrap();
            let resp = app(state).oneshot(req).await.unwrap();
            let status = resp.status();
            let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            (status, body)
        }
    };
    let (status, body) = keyed(&first.state, 3).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // The other API process replays the same key to the same job.
    let (status, replay) = keyed(&second.state, 3).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["id"], body["id"]);
    let (status, conflict) = keyed(&second.state, 4).await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    let (status, full) = call(&second.state, "POST", "/v1/generations", Some(json!({"seed": 5}))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{}", String::from_utf8_lossy(&full));
    assert!(String::from_utf8_lossy(&full).contains("queue is full (3 jobs)"));
    assert_eq!(first.state.queue.queued(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_is_503_while_redis_is_down_and_200_again_when_it_is_back() {
    let redis = RedisServer::start();
    let port = redis.port;
    let prefix = prefix();
    let api = node(config(&redis, &prefix, Role::Api), FakeEngine::new("fake", Duration::ZERO)).await;
    let worker = node(config(&redis, &prefix, Role::Worker), FakeEngine::new("fake", Duration::ZERO)).await;
    drop(redis);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.state.is_ready() {
        assert!(Instant::now() < deadline, "still ready with Redis down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = call(&api.state, "POST", "/v1/generations", Some(json!({"seed": 1}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&body));
    let _back = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.state.is_ready() {
        assert!(Instant::now() < deadline, "not ready again after Redis came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A Redis that came back empty: the worker makes the consumer group again and runs the job.
    let id = submit(&api, json!({"seed": 2})).await;
    wait_for(&api, &id, "succeeded", Duration::from_secs(15)).await;
    assert!(worker.state.is_ready());
}
