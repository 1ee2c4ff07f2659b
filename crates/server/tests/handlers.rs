//! Handler tests through `oneshot` with a fake engine: fast and deterministic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use flowgen_server::api::JobStatus;
use flowgen_server::testing::FakeEngine;
use flowgen_server::{app, AppState, Engine, Models, Overrides, ServerConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Harness {
    state: Arc<AppState>,
    fake: Arc<FakeEngine>,
    _dir: tempfile::TempDir,
}

async fn harness(step_ms: u64, configure: impl FnOnce(&mut ServerConfig, &mut FakeEngine)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::default();
    config.server.data_dir = dir.path().to_path_buf();
    config.queue.max_wait_ms = 0;
    let mut fake = FakeEngine::new("fake", Duration::from_millis(step_ms));
    configure(&mut config, &mut fake);
    config.validate().unwrap();
    let fake = Arc::new(fake);
    let state = flowgen_server::start(config, Models::new(vec![fake.clone() as Arc<dyn Engine>])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.is_ready() {
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fake.clear_batches();
    Harness { state, fake, _dir: dir }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(h: &Harness, method: &str, uri: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app(h.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

async fn submit(h: &Harness, body: Value) -> String {
    let r = call(h, "POST", "/v1/generations", Some(body), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

/// A job's view as clients see it: from memory while live, from the journal once it ended.
async fn job_view(h: &Harness, id: &str) -> flowgen_server::api::JobView {
    h.state.find(id).await.unwrap().unwrap_or_else(|| panic!("job {id} unknown")).1
}

async fn wait_for(h: &Harness, id: &str, status: JobStatus) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = job_view(h, id).await;
        if view.status == status {
            return serde_json::to_value(view).unwrap();
        }
        assert!(Instant::now() < deadline, "job {id} stuck at {:?}, wanted {status:?}", view.status);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_poll_and_fetch_png() {
    let h = harness(1, |_, _| {}).await;
    let body = json!({"labels": [7, "three"], "seed": 40, "steps": 3, "guidance_interval": [0.25, 1.0]});
    let r = call(&h, "POST", "/v1/generations", Some(body), &[]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(r.headers[header::LOCATION], format!("/v1/generations/{id}"));
    assert_eq!(r.json()["seeds"], json!([40, 41]));
    wait_for(&h, &id, JobStatus::Succeeded).await;
    let view = call(&h, "GET", &format!("/v1/generations/{id}"), None, &[]).await.json();
    assert_eq!(view["status"], "succeeded");
    assert_eq!(view["step"], 3);
    assert_eq!(view["images"].as_array().unwrap().len(), 2);
    assert!(view["inference_seconds"].as_f64().is_some() && view["queue_seconds"].as_f64().is_some());
    let png = call(&h, "GET", &format!("/v1/generations/{id}/images/1"), None, &[]).await;
    assert_eq!(png.status, StatusCode::OK);
    assert_eq!(png.headers[header::CONTENT_TYPE], "image/png");
    let (image, meta) = flowgen_engine::image::Image::from_png(&png.body).unwrap();
    assert_eq!(image, h.fake.image_for(41, 3));
    assert!(meta.contains(&("seed".to_string(), "41".to_string())), "{meta:?}");
    assert!(meta.contains(&("guidance_interval".to_string(), "0.25,1".to_string())), "{meta:?}");
    assert_eq!(view["guidance_interval"], json!([0.25, 1.0]));
    assert_eq!(
        call(&h, "GET", &format!("/v1/generations/{id}/images/2"), None, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(call(&h, "GET", "/v1/generations/gen_nope", None, &[]).await.status, StatusCode::NOT_FOUND);
    let r = call(&h, "POST", "/v1/generations/gen_nope/cancel", None, &[]).await;
    assert_eq!((r.status, r.json()["error_type"].clone()), (StatusCode::NOT_FOUND, json!("not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_named_with_its_limit() {
    let h = harness(1, |_, _| {}).await;
    let cases = [
        (json!({"n": 0}), "n", "between 1 and 16"),
        (json!({"n": 17}), "n", "between 1 and 16"),
        (json!({"n": "two"}), "n", "invalid type"),
        (json!({"steps": 0}), "steps", "between 1 and 256"),
        (json!({"steps": 100000}), "steps", "256"),
        (json!({"guidance": -1.0}), "guidance", "between 0 and 20"),
        (json!({"guidance": 50}), "guidance", "20"),
        (json!({"n": 2.5}), "n", "whole number"),
        (json!({"seed": 9_007_199_254_740_992u64}), "seed", "2^53 - 1"),
        (json!({"guidance_interval": [0.0, 1.5]}), "guidance_interval", "0 <= lo <= hi <= 1"),
        (json!({"guidance_interval": [0.5]}), "guidance_interval", ""),
        (json!({"labels": [12]}), "labels[0]", "out of range"),
        (json!({"labels": ["banana"]}), "labels[0]", "banana"),
        (json!({"labels": []}), "labels", "empty"),
        (json!({"label": 3, "labels": [4]}), "labels", "not both"),
        (json!({"sampler": "magic"}), "sampler", "euler"),
        (json!({"schedule": "/etc/passwd"}), "schedule", "uniform"),
        (json!({"schedule": "0,0.7,0.5,1"}), "schedule", ""),
        (json!({"priority": "urgent"}), "priority", "high, normal, low"),
        (json!({"model": "nope"}), "model", "fake"),
        (json!({"colour": "red"}), "colour", "unknown field"),
    ];
    for (body, field, needle) in cases {
        let r = call(&h, "POST", "/v1/generations", Some(body.clone()), &[]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let err = r.json();
        assert_eq!(err["error_type"], "validation", "{body}");
        assert_eq!(err["field"], field, "{body}: {err}");
        assert!(err["error"].as_str().unwrap().contains(needle), "{body}: {err}");
    }
    assert!(h.fake.batches().is_empty(), "nothing invalid ran");
    // JSON Schema's integers include 2.0; an interval may be given in either order.
    let id = submit(&h, json!({"n": 2.0, "seed": 5.0, "steps": 3.0, "guidance_interval": [0.6, 0.2]})).await;
    let view = job_view(&h, &id).await;
    assert_eq!((view.n, view.seeds.clone(), view.steps), (2, vec![5, 6], 3));
    assert_eq!(view.guidance_interval, Some([0.2, 0.6]));
    h.state.queue.cancel(&id).unwrap();
    // An empty JSON body is malformed; a body of no declared type is refused before parsing.
    let r = call(&h, "POST", "/v1/generations", None, &[("content-type", "application/json")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = call(&h, "POST", "/v1/generations", None, &[]).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(h.state.jobs.queued(), 0, "nothing invalid was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_protect_v1_but_not_health_and_jobs_are_private() {
    let h = harness(1, |c, _| c.auth.api_keys = vec!["key-alice-123".into(), "key-bob-4567".into()]).await;
    let r = call(&h, "POST", "/v1/generations", Some(json!({})), &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
    let r = call(&h, "GET", "/v1/models", None, &[("authorization", "Bearer key-alice-124")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for open in ["/health", "/metrics", "/openapi.json", "/ready"] {
        assert_eq!(call(&h, "GET", open, None, &[]).await.status, StatusCode::OK, "{open}");
    }
    let alice = [("authorization", "Bearer key-alice-123")];
    let r = call(&h, "POST", "/v1/generations", Some(json!({"label": 1})), &alice).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(call(&h, "GET", &format!("/v1/generations/{id}"), None, &alice).await.status, StatusCode::OK);
    let bob = [("authorization", "Bearer key-bob-4567")];
    let r = call(&h, "GET", &format!("/v1/generations/{id}"), None, &bob).await;
    assert_eq!((r.status, r.json()["error_type"].clone()), (StatusCode::FORBIDDEN, json!("forbidden")));
    assert_eq!(
        call(&h, "POST", &format!("/v1/generations/{id}/cancel"), None, &bob).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_rate_limits_429() {
    let h = harness(1, |c, _| {
        c.server.body_limit_bytes = 1024;
        c.auth.rate_limit_per_minute = 1;
        c.auth.rate_limit_burst = 2;
    })
    .await;
    let big = json!({"schedule": "0,".repeat(600) + "1"});
    let r = call(&h, "POST", "/v1/generations", Some(big), &[]).await;
    assert_eq!((r.status, r.json()["error_type"].clone()), (StatusCode::PAYLOAD_TOO_LARGE, json!("too_large")));
    // The 413 above spent one token of the burst of 2.
    assert_eq!(call(&h, "POST", "/v1/generations", Some(json!({})), &[]).await.status, StatusCode::ACCEPTED);
    let r = call(&h, "POST", "/v1/generations", Some(json!({})), &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let h = harness(1, |c, _| c.queue.capacity = 2).await;
    h.fake.pause();
    let running = submit(&h, json!({"steps": 1})).await;
    wait_for(&h, &running, JobStatus::Running).await;
    submit(&h, json!({"steps": 2})).await;
    submit(&h, json!({"steps": 3})).await;
    let r = call(&h, "POST", "/v1/generations", Some(json!({"steps": 4})), &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json()["error_type"], "overloaded");
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    h.fake.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_at_once_and_running_without_hurting_batch_mates() {
    let h = harness(2, |c, _| c.queue.max_wait_ms = 300).await;
    h.fake.pause();
    // Two compatible jobs within the batching window share one batch.
    let doomed = submit(&h, json!({"label": 1, "seed": 10, "steps": 4})).await;
    let mate = submit(&h, json!({"label": 2, "seed": 20, "steps": 4})).await;
    wait_for(&h, &doomed, JobStatus::Running).await;
    wait_for(&h, &mate, JobStatus::Running).await;
    let queued = submit(&h, json!({"label": 3, "seed": 30, "steps": 5})).await;
    let r = call(&h, "POST", &format!("/v1/generations/{queued}/cancel"), None, &[]).await;
    assert_eq!((r.status, r.json()["status"].clone()), (StatusCode::OK, json!("cancelled")));
    let r = call(&h, "POST", &format!("/v1/generations/{doomed}/cancel"), None, &[]).await;
    assert_eq!((r.status, r.json()["status"].clone()), (StatusCode::OK, json!("cancelled")));
    h.fake.resume();
    wait_for(&h, &mate, JobStatus::Succeeded).await;
    let png = call(&h, "GET", &format!("/v1/generations/{mate}/images/0"), None, &[]).await;
    assert_eq!(flowgen_engine::image::Image::from_png(&png.body).unwrap().0, h.fake.image_for(20, 2));
    assert_eq!(job_view(&h, &doomed).await.status, JobStatus::Cancelled);
    assert_eq!(
        call(&h, "GET", &format!("/v1/generations/{doomed}/images/0"), None, &[]).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(h.fake.batches(), vec![vec![10, 20]], "the cancelled queued job never ran");
    let r = call(&h, "POST", &format!("/v1/generations/{mate}/cancel"), None, &[]).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "a finished job cannot be cancelled");

    // A running job alone stops within a step of the cancel, and the engine takes the next job.
    let long = submit(&h, json!({"steps": 256, "seed": 99})).await;
    wait_for(&h, &long, JobStatus::Running).await;
    while job_view(&h, &long).await.step < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(call(&h, "POST", &format!("/v1/generations/{long}/cancel"), None, &[]).await.status, StatusCode::OK);
    let step_at_cancel = h.fake.current_step();
    let next = submit(&h, json!({"steps": 1, "seed": 100})).await;
    wait_for(&h, &next, JobStatus::Succeeded).await;
    let stopped = h.fake.stopped_at();
    assert_eq!(stopped.len(), 1);
    assert!(
        stopped[0] <= step_at_cancel + 1 && stopped[0] < 256,
        "stopped at step {} after a cancel at {step_at_cancel}",
        stopped[0]
    );
}

/// Read SSE events (name, data) until a final one.
async fn read_events(h: &Harness, id: &str) -> Vec<(String, Value)> {
    let req = Request::get(format!("/v1/generations/{id}/events")).body(Body::empty()).unwrap();
    let resp = app(h.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut events = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let name = block.lines().find_map(|l| l.strip_prefix("event:")).map(|s| s.trim().to_string());
            let data =
                block.lines().find_map(|l| l.strip_prefix("data:")).map(|s| serde_json::from_str(s.trim()).unwrap());
            if let (Some(name), Some(data)) = (name, data) {
                events.push((name, data));
            }
        }
        if events.last().is_some_and(|(n, _)| ["succeeded", "failed", "cancelled"].contains(&n.as_str())) {
            break;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reports_queued_started_progress_then_done_in_order() {
    let h = harness(15, |_, _| {}).await;
    h.fake.pause();
    let blocker = submit(&h, json!({"steps": 1, "seed": 1})).await;
    wait_for(&h, &blocker, JobStatus::Running).await;
    let id = submit(&h, json!({"steps": 6, "seed": 2})).await;
    let reader = {
        let h2 = Harness { state: h.state.clone(), fake: h.fake.clone(), _dir: tempfile::tempdir().unwrap() };
        let id = id.clone();
        tokio::spawn(async move { read_events(&h2, &id).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.fake.resume();
    let events = reader.await.unwrap();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(events[0].1["queue_position"], 0);
    assert_eq!(names.get(1), Some(&"started"), "{names:?}");
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    let steps: Vec<u64> =
        events.iter().filter(|(n, _)| n == "progress").map(|(_, d)| d["step"].as_u64().unwrap()).collect();
    assert!(!steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]), "{names:?} {steps:?}");
    assert!(events.iter().filter(|(n, _)| n == "progress").all(|(_, d)| d["total"] == 6));
    assert_eq!(events.last().unwrap().1["images"].as_array().unwrap().len(), 1);
    // A late subscriber gets the current (final) state at once.
    let late = read_events(&h, &id).await;
    assert_eq!(late.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_job() {
    let h = harness(1, |_, _| {}).await;
    let key = [("idempotency-key", "order-42")];
    let a = call(&h, "POST", "/v1/generations", Some(json!({"label": 5, "seed": 1})), &key).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let b = call(&h, "POST", "/v1/generations", Some(json!({"label": 5, "seed": 1})), &key).await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(a.json()["id"], b.json()["id"]);
    let c = call(&h, "POST", "/v1/generations", Some(json!({"label": 6, "seed": 1})), &key).await;
    assert_eq!((c.status, c.json()["error_type"].clone()), (StatusCode::CONFLICT, json!("conflict")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_then_fifo_and_compatible_jobs_batch_with_unchanged_seeds() {
    let h = harness(1, |_, _| {}).await;
    h.fake.pause();
    let blocker = submit(&h, json!({"steps": 9, "seed": 1000})).await;
    wait_for(&h, &blocker, JobStatus::Running).await;
    // Different step counts keep these apart; priority decides the order.
    let low = submit(&h, json!({"steps": 2, "seed": 300, "priority": "low"})).await;
    let normal = submit(&h, json!({"steps": 3, "seed": 200})).await;
    let high = submit(&h, json!({"steps": 4, "seed": 100, "priority": "high"})).await;
    let view = call(&h, "GET", &format!("/v1/generations/{low}"), None, &[]).await.json();
    assert_eq!(view["queue_position"], 2);
    // Compatible with `normal`: joins its batch; two images each keep their own seeds.
    let joiner = submit(&h, json!({"steps": 3, "seed": 500, "n": 2, "labels": [4, 8]})).await;
    // Another guidance interval is another batch.
    let apart = submit(&h, json!({"steps": 3, "seed": 600, "guidance_interval": [0.2, 1.0]})).await;
    h.fake.resume();
    for id in [&low, &normal, &high, &joiner, &apart] {
        wait_for(&h, id, JobStatus::Succeeded).await;
    }
    assert_eq!(h.fake.batches(), vec![vec![1000], vec![100], vec![200, 500, 501], vec![600], vec![300]]);
    for (i, (seed, label)) in [(500u64, 4u32), (501, 8)].into_iter().enumerate() {
        let png = call(&h, "GET", &format!("/v1/generations/{joiner}/images/{i}"), None, &[]).await;
        assert_eq!(flowgen_engine::image::Image::from_png(&png.body).unwrap().0, h.fake.image_for(seed, label));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_error_or_panic_fails_only_its_job() {
    let h = harness(1, |c, fake| {
        c.queue.max_wait_ms = 200;
        fake.fail_label = Some(3);
        fake.panic_label = Some(9);
    })
    .await;
    let bad = submit(&h, json!({"label": 3, "seed": 1})).await;
    let panics = submit(&h, json!({"label": 9, "seed": 2})).await;
    let good = submit(&h, json!({"label": 4, "seed": 3})).await;
    let failed = wait_for(&h, &bad, JobStatus::Failed).await;
    assert!(failed["error"].as_str().unwrap().contains("fails on this label"));
    let panicked = wait_for(&h, &panics, JobStatus::Failed).await;
    assert!(panicked["error"].as_str().unwrap().contains("panic"), "{panicked}");
    wait_for(&h, &good, JobStatus::Succeeded).await;
    let after = submit(&h, json!({"label": 5})).await;
    wait_for(&h, &after, JobStatus::Succeeded).await;
    let metrics = String::from_utf8(call(&h, "GET", "/metrics", None, &[]).await.body).unwrap();
    assert!(metrics.contains("flowgen_failures_total{kind=\"panic\"} 1"), "{metrics}");
    assert!(metrics.contains("flowgen_failures_total{kind=\"invalid\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_endpoint_models_and_docs() {
    let h = harness(1, |_, _| {}).await;
    let r = call(&h, "POST", "/v1/images/generations", Some(json!({"prompt": "seven", "n": 2, "seed": 7})), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let data = r.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 2);
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(data[1]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(flowgen_engine::image::Image::from_png(&png).unwrap().0, h.fake.image_for(8, 7));
    let r = call(&h, "POST", "/v1/images/generations", Some(json!({"prompt": "a banana"})), &[]).await;
    assert_eq!((r.status, r.json()["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!("prompt")));
    let r = call(&h, "POST", "/v1/images/generations", Some(json!({"prompt": "7", "size": "1024x1024"})), &[]).await;
    assert_eq!(r.json()["field"], "size");
    let models = call(&h, "GET", "/v1/models", None, &[]).await.json();
    assert_eq!(models["data"][0]["id"], "fake");
    assert_eq!(models["limits"]["max_n"], 16);
    let spec = call(&h, "GET", "/openapi.json", None, &[]).await.json();
    for path in ["/v1/generations", "/v1/generations/{id}/events", "/v1/images/generations", "/metrics"] {
        assert!(spec["paths"].get(path).is_some(), "{path} missing from the OpenAPI document");
    }
    for method in ["get", "post"] {
        assert!(spec["paths"]["/v1/generations"].get(method).is_some(), "{method} /v1/generations undocumented");
    }
    let docs = call(&h, "GET", "/docs", None, &[]).await;
    assert_eq!(docs.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_jobs_and_readiness_turns_503() {
    let h = harness(1, |_, _| {}).await;
    assert_eq!(call(&h, "GET", "/ready", None, &[]).await.status, StatusCode::OK);
    h.state.begin_drain();
    let r = call(&h, "GET", "/ready", None, &[]).await;
    assert_eq!((r.status, r.json()["status"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!("draining")));
    let r = call(&h, "POST", "/v1/generations", Some(json!({})), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(call(&h, "GET", "/health", None, &[]).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_requeues_journaled_jobs_and_keeps_results() {
    let dir = tempfile::tempdir().unwrap();
    let configure = |c: &mut ServerConfig, _: &mut FakeEngine| c.server.data_dir = dir.path().to_path_buf();
    let (done, waiting);
    {
        let h = harness(1, configure).await;
        done = submit(&h, json!({"seed": 1})).await;
        wait_for(&h, &done, JobStatus::Succeeded).await;
        h.state.begin_drain();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Journaled directly, as if accepted just before a crash.
        waiting = "gen_restored".to_string();
        let store = flowgen_server::store::Store::open(dir.path()).unwrap();
        let spec = flowgen_server::api::validate(
            &serde_json::from_value(json!({"seed": 5, "label": 2})).unwrap(),
            &h.state.models,
            &h.state.config.limits,
        )
        .unwrap();
        let job = flowgen_server::store::StoredJob {
            status: JobStatus::Running,
            started_ms: Some(0),
            attempts: 1,
            ..flowgen_server::store::StoredJob::accepted(&waiting, "anonymous", spec, 0)
        };
        store.insert(&job).unwrap();
        store.mark_running(std::slice::from_ref(&waiting), 0).unwrap();
    }
    let h = harness(1, configure).await;
    let view = wait_for(&h, &waiting, JobStatus::Succeeded).await;
    assert_eq!(view["attempts"], 2);
    let png = call(&h, "GET", &format!("/v1/generations/{waiting}/images/0"), None, &[]).await;
    assert_eq!(flowgen_engine::image::Image::from_png(&png.body).unwrap().0, h.fake.image_for(5, 2));
    assert_eq!(call(&h, "GET", &format!("/v1/generations/{done}/images/0"), None, &[]).await.status, StatusCode::OK);
    assert_eq!(job_view(&h, &done).await.attempts, 1, "a finished job is not rerun");
}

#[test]
fn config_file_documents_the_defaults_and_bad_keys_are_named() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
    let loaded = ServerConfig::load(Some(&shipped), &Overrides::default()).unwrap();
    assert_eq!(loaded, ServerConfig::default(), "config/default.toml and the built-in defaults disagree");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[queue]\nmax_batch = 0\n").unwrap();
    let err = ServerConfig::load(Some(&bad), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("queue.max_batch"), "{err}");
    std::fs::write(&bad, "[queue]\nmax_bach = 3\n").unwrap();
    let err = ServerConfig::load(Some(&bad), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("max_bach"), "{err}");
    std::fs::write(&bad, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let err = ServerConfig::load(Some(&bad), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("server.listen"), "{err}");
    let flags = Overrides { listen: Some("0.0.0.0:9000".into()), ..Default::default() };
    assert_eq!(ServerConfig::load(Some(&shipped), &flags).unwrap().server.listen, "0.0.0.0:9000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_unless_an_origin_is_configured() {
    let preflight = |h: &Harness| {
        let req = Request::builder()
            .method("OPTIONS")
            .uri("/v1/generations")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap();
        app(h.state.clone()).oneshot(req)
    };
    let closed = harness(1, |_, _| {}).await;
    let resp = preflight(&closed).await.unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    let open = harness(1, |c, _| c.server.cors_origins = vec!["https://app.example.com".into()]).await;
    let resp = preflight(&open).await.unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example.com");
}

#[test]
fn jobs_journaled_before_guidance_intervals_run_with_the_model_interval() {
    let old = json!({"model": "fake", "labels": [1], "seeds": [5], "sampler": "euler", "steps": 3,
        "guidance": 1.5, "schedule": "uniform", "priority": "normal"});
    let spec: flowgen_server::api::JobSpec = serde_json::from_value(old).unwrap();
    assert_eq!(spec.settings.guidance_interval, None);
    let mut cfg = flowgen_engine::random_model::tiny_latent_config("fake");
    cfg.guidance.interval = (0.1, 0.9);
    assert_eq!(spec.settings.to_settings(&cfg).unwrap().guidance_interval, (0.1, 0.9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_shows_only_the_callers_jobs_newest_first_by_status_and_in_pages() {
    let h = harness(1, |c, _| c.auth.api_keys = vec!["key-alice-123".into(), "key-bob-4567".into()]).await;
    let (alice, bob) = ([("authorization", "Bearer key-alice-123")], [("authorization", "Bearer key-bob-4567")]);
    h.fake.pause();
    let mut ids = Vec::new();
    // Different step counts: no two of these share a batch.
    for seed in 0..5 {
        let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": seed, "steps": 2 + seed})), &alice).await;
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": 9})), &bob).await;
    let bobs = r.json()["id"].as_str().unwrap().to_string();
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let list = |r: &Reply| -> Vec<String> {
        r.json()["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
    };

    let r = call(&h, "GET", "/v1/generations", None, &alice).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(list(&r), newest_first);
    assert_eq!(r.json()["has_more"], false);
    assert_eq!(list(&call(&h, "GET", "/v1/generations", None, &bob).await), vec![bobs.clone()]);

    // Pages of two, following the cursor.
    let mut seen = Vec::new();
    let mut uri = "/v1/generations?limit=2".to_string();
    loop {
        let r = call(&h, "GET", &uri, None, &alice).await;
        let page = list(&r);
        assert!(page.len() <= 2);
        seen.extend(page.clone());
        if r.json()["has_more"] == false {
            break;
        }
        uri = format!("/v1/generations?limit=2&after={}", page.last().unwrap());
    }
    assert_eq!(seen, newest_first);

    // The first job runs (the fake engine is paused), the rest wait; cancel one of them.
    wait_for(&h, &ids[0], JobStatus::Running).await;
    assert_eq!(
        call(&h, "POST", &format!("/v1/generations/{}/cancel", ids[4]), None, &alice).await.status,
        StatusCode::OK
    );
    let queued = list(&call(&h, "GET", "/v1/generations?status=queued", None, &alice).await);
    assert_eq!(queued, vec![ids[3].clone(), ids[2].clone(), ids[1].clone()]);
    let r = call(&h, "GET", "/v1/generations?status=running,cancelled", None, &alice).await;
    assert_eq!(list(&r), vec![ids[4].clone(), ids[0].clone()]);

    for (uri, field, needle) in [
        ("/v1/generations?status=done", "status", "queued, running"),
        ("/v1/generations?limit=0", "limit", "between 1 and 500"),
        ("/v1/generations?limit=many", "limit", "between 1 and 500"),
        ("/v1/generations?sort=asc", "sort", "unknown query parameter"),
    ] {
        let r = call(&h, "GET", uri, None, &alice).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}");
        assert_eq!(r.json()["field"], field, "{uri}");
        assert!(r.json()["error"].as_str().unwrap().contains(needle), "{uri}: {}", r.json());
    }
    // A cursor naming no job of the caller (unknown, expired, or another key's) is not found.
    for uri in ["/v1/generations?after=gen_nope".to_string(), format!("/v1/generations?after={bobs}")] {
        let r = call(&h, "GET", &uri, None, &alice).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}");
        assert!(r.json()["error"].as_str().unwrap().contains("among your jobs"), "{uri}: {}", r.json());
    }
    h.fake.resume();
}

/// A fake model with a stored schedule and a preset, as a model directory would declare them.
fn with_assets(_: &mut ServerConfig, fake: &mut FakeEngine) {
    let cfg = fake.config_mut();
    cfg.schedules.insert("boss-3".into(), vec![0.0, 0.2, 0.6, 1.0]);
    let fast = flowgen_engine::config::Preset { sampler: Some("euler".into()), steps: Some(2), ..Default::default() };
    cfg.presets.insert("fast".into(), fast);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samplers_schedules_and_presets_are_canonical_and_named_never_paths() {
    let h = harness(1, with_assets).await;
    // A parameterised sampler is journaled and shown in canonical form; an adaptive one has no steps.
    let id = submit(&h, json!({"sampler": "Dormand-Prince:atol=1e-3, rtol=1e-3", "steps": 7, "seed": 1})).await;
    let view = wait_for(&h, &id, JobStatus::Succeeded).await;
    // Without a max_nfe of its own, the adaptive plan gets the server's cap (limits.max_nfe).
    assert_eq!(view["sampler"], "dopri5:rtol=1e-3,atol=1e-3,max_nfe=1000");
    assert_eq!((view["steps"].as_u64(), view["schedule"].as_str()), (Some(0), Some("uniform")));
    let png = call(&h, "GET", &format!("/v1/generations/{id}/images/0"), None, &[]).await;
    let (_, text) = flowgen_engine::image::Image::from_png(&png.body).unwrap();
    assert!(text.contains(&("sampler".to_string(), "dopri5:rtol=1e-3,atol=1e-3,max_nfe=1000".to_string())), "{text:?}");

    // A stored schedule by name fixes the steps; a preset fills what the request leaves out.
    let id = submit(&h, json!({"schedule": "boss-3", "sampler": "euler"})).await;
    let view = wait_for(&h, &id, JobStatus::Succeeded).await;
    assert_eq!((view["schedule"].as_str(), view["steps"].as_u64()), (Some("boss-3"), Some(3)));
    let id = submit(&h, json!({"preset": "fast"})).await;
    let view = wait_for(&h, &id, JobStatus::Succeeded).await;
    assert_eq!((view["sampler"].as_str(), view["steps"].as_u64()), (Some("euler"), Some(2)));

    let rejected = |body: Value, field: &'static str, says: &'static str| {
        let h = &h;
        async move {
            let r = call(h, "POST", "/v1/generations", Some(body.clone()), &[]).await;
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", String::from_utf8_lossy(&r.body));
            let err = r.json();
            assert_eq!(err["field"], field, "{body}: {err}");
            assert!(err["error"].as_str().unwrap().contains(says), "{body}: {err}");
        }
    };
    let schedule_file = h._dir.path().join("boss.json");
    std::fs::write(&schedule_file, "[0, 0.5, 1]").unwrap();
    rejected(json!({"schedule": schedule_file.display().to_string()}), "schedule", "boss-3").await;
    rejected(json!({"schedule": "../../etc/passwd"}), "schedule", "stored schedule").await;
    rejected(json!({"sampler": "dopri5", "schedule": "boss-3"}), "schedule", "adaptive").await;
    rejected(json!({"sampler": "dopri5:rtol=0"}), "sampler", "rtol").await;
    rejected(json!({"sampler": "euler:order=2"}), "sampler", "unknown parameter").await;
    rejected(json!({"preset": "turbo"}), "preset", "fast").await;
    rejected(json!({"sampler": "dopri5:max_nfe=5000"}), "sampler", "limits.max_nfe").await;

    let models = call(&h, "GET", "/v1/models", None, &[]).await.json();
    let model = &models["data"][0];
    assert_eq!((model["presets"].clone(), model["schedules"].clone()), (json!(["fast"]), json!(["boss-3"])));
    assert_eq!(model["default_sampler"], "heun");
    assert_eq!(
        (models["limits"]["max_nfe"].as_u64(), models["limits"]["max_queued_per_key"].as_u64()),
        (Some(1000), Some(64))
    );
    assert!(models["samplers"].as_array().unwrap().contains(&json!("dopri5[:rtol=R,atol=A,max_nfe=M]")), "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_written_by_the_previous_release_runs_after_the_upgrade() {
    // The schema and job JSON exactly as release c18c223 wrote them: sampler by family name
    // only ("dopri5"), steps kept for adaptive samplers, guidance_interval absent in older jobs.
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("jobs.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
                idempotency_key TEXT, request_hash TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
                created_ms INTEGER NOT NULL, started_ms INTEGER, finished_ms INTEGER, error TEXT, nfe INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0, inference_ms INTEGER);
             CREATE TABLE images (job_id TEXT NOT NULL, idx INTEGER NOT NULL, png BLOB NOT NULL, PRIMARY KEY (job_id, idx));",
        )
        .unwrap();
        let old_jobs = [
            (
                "gen_old_dopri",
                r#"{"model":"fake","labels":[4],"seeds":[9],"sampler":"dopri5","steps":8,"guidance":1.5,"guidance_interval":[0.0,1.0],"schedule":"uniform","priority":"normal"}"#,
                "queued",
            ),
            (
                "gen_old_heun",
                r#"{"model":"fake","labels":[1,2],"seeds":[3,4],"sampler":"heun","steps":3,"guidance":1.5,"schedule":"0,0.5,0.75,1","priority":"high"}"#,
                "running",
            ),
        ];
        for (id, spec, status) in old_jobs {
            conn.execute(
                "INSERT INTO jobs (id, owner, request_hash, spec, status, created_ms) VALUES (?1, 'anonymous', '', ?2, ?3, 1)",
                rusqlite::params![id, spec, status],
            )
            .unwrap();
        }
    }
    let h = harness(1, |c, _| c.server.data_dir = dir.path().to_path_buf()).await;
    let dopri = wait_for(&h, "gen_old_dopri", JobStatus::Succeeded).await;
    assert_eq!(dopri["sampler"], "dopri5:rtol=1e-5,atol=1e-5,max_nfe=2000");
    let heun = wait_for(&h, "gen_old_heun", JobStatus::Succeeded).await;
    assert_eq!((heun["sampler"].as_str(), heun["steps"].as_u64()), (Some("heun"), Some(3)));
    assert_eq!(heun["schedule"], "0,0.5,0.75,1");
    let png = call(&h, "GET", "/v1/generations/gen_old_heun/images/1", None, &[]).await;
    assert_eq!(flowgen_engine::image::Image::from_png(&png.body).unwrap().0, h.fake.image_for(4, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_and_webp_are_served_with_their_type_and_settings() {
    let h = harness(1, |_, _| {}).await;
    for (format, content_type, magic) in [
        ("jpeg", "image/jpeg", &b"\xFF\xD8\xFF\xE1"[..]),
        ("webp", "image/webp", &b"RIFF"[..]),
        ("png", "image/png", &b"\x89PNG"[..]),
    ] {
        let id =
            submit(&h, json!({"output_format": format, "label": 3, "seed": 8, "sampler": "euler", "steps": 2})).await;
        let view = wait_for(&h, &id, JobStatus::Succeeded).await;
        assert_eq!(view["output_format"], format);
        let image = call(&h, "GET", &format!("/v1/generations/{id}/images/0"), None, &[]).await;
        assert_eq!(image.status, StatusCode::OK);
        assert_eq!(image.headers[header::CONTENT_TYPE], content_type);
        assert!(image.body.starts_with(magic), "{format}: {:?}", &image.body[..8]);
        if format != "png" {
            // The settings travel in the file's XMP packet.
            let text = String::from_utf8_lossy(&image.body);
            assert!(text.contains("flowgen:sampler=\"euler\"") && text.contains("flowgen:seed=\"8\""), "{format}");
        }
    }
    let id = submit(&h, json!({"output_format": "jpeg", "output_compression": 40, "seed": 1})).await;
    assert_eq!(wait_for(&h, &id, JobStatus::Succeeded).await["output_format"], "jpeg");
    for (body, field) in [
        (json!({"output_format": "gif"}), "output_format"),
        (json!({"output_format": "jpeg", "output_compression": 0}), "output_compression"),
    ] {
        let r = call(&h, "POST", "/v1/generations", Some(body.clone()), &[]).await;
        assert_eq!((r.status, r.json()["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, json!(field)), "{body}");
    }
    // A quality for a lossless format is ignored, as OpenAI-compatible servers do.
    submit(&h, json!({"output_format": "png", "output_compression": 50})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_at_every_crash_fails_after_max_attempts_and_the_server_serves_on() {
    // What the journal holds when the process died under a job again and again: status running,
    // one attempt counted per start. "poison" was started 3 times, "survivor" twice.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = flowgen_server::store::Store::open(dir.path()).unwrap();
        let h = harness(1, |c, _| c.server.data_dir = dir.path().to_path_buf()).await;
        h.state.begin_drain();
        for (id, attempts, seed) in [("gen_poison", 3, 1), ("gen_survivor", 2, 2)] {
            let body = serde_json::from_value(json!({"seed": seed, "label": 4})).unwrap();
            let spec = flowgen_server::api::validate(&body, &h.state.models, &h.state.config.limits).unwrap();
            store.insert(&flowgen_server::store::StoredJob::accepted(id, "anonymous", spec, 0)).unwrap();
            for _ in 0..attempts {
                store.mark_running(&[id.to_string()], 0).unwrap();
            }
        }
    }
    let h = harness(1, |c, _| c.server.data_dir = dir.path().to_path_buf()).await;
    let poison = wait_for(&h, "gen_poison", JobStatus::Failed).await;
    assert_eq!(poison["attempts"], 3);
    assert!(poison["error"].as_str().unwrap().contains("queue.max_attempts = 3"), "{poison}");
    let survivor = wait_for(&h, "gen_survivor", JobStatus::Succeeded).await;
    assert_eq!(survivor["attempts"], 3, "a job below the cap gets its third start");
    let fresh = submit(&h, json!({"seed": 9})).await;
    wait_for(&h, &fresh, JobStatus::Succeeded).await;
    assert!(h.fake.batches().iter().all(|seeds| !seeds.contains(&1)), "the poison job never ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_larger_than_a_lowered_max_batch_fails_at_start_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = harness(1, |c, _| c.server.data_dir = dir.path().to_path_buf()).await;
        h.state.begin_drain();
        let store = flowgen_server::store::Store::open(dir.path()).unwrap();
        for (id, n) in [("gen_big", 8), ("gen_small", 2)] {
            let body = serde_json::from_value(json!({"seed": 1, "n": n})).unwrap();
            let spec = flowgen_server::api::validate(&body, &h.state.models, &h.state.config.limits).unwrap();
            store.insert(&flowgen_server::store::StoredJob::accepted(id, "anonymous", spec, 0)).unwrap();
        }
    }
    // Restarted with a smaller batch limit than the one the big job was accepted under.
    let h = harness(1, |c, _| {
        c.server.data_dir = dir.path().to_path_buf();
        c.queue.max_batch = 4;
        c.limits.max_n = 4;
    })
    .await;
    let big = wait_for(&h, "gen_big", JobStatus::Failed).await;
    assert!(big["error"].as_str().unwrap().contains("queue.max_batch is now 4"), "{big}");
    wait_for(&h, "gen_small", JobStatus::Succeeded).await;
    let fresh = submit(&h, json!({"seed": 9, "n": 4})).await;
    wait_for(&h, &fresh, JobStatus::Succeeded).await;
    assert_eq!(journal(&h).load("gen_big").unwrap().unwrap().status, JobStatus::Failed, "the journal agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_routes_refuse_bodies_not_sent_as_json() {
    let h = harness(1, |_, _| {}).await;
    let body = json!({"seed": 1}).to_string();
    for (uri, content_type) in [
        ("/v1/generations", Some("text/plain")),
        ("/v1/generations", Some("application/x-www-form-urlencoded")),
        ("/v1/generations", None),
        ("/v1/images/generations", Some("text/plain;charset=UTF-8")),
    ] {
        let mut req = Request::builder().method("POST").uri(uri);
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        let resp = app(h.state.clone()).oneshot(req.body(Body::from(body.clone())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{uri} {content_type:?}");
        let err: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(
            (err["error_type"].as_str(), err["field"].as_str()),
            (Some("unsupported_media_type"), Some("Content-Type"))
        );
    }
    assert_eq!(h.state.queue.queued(), 0, "nothing was queued");
    // A charset parameter is fine.
    let req = Request::builder()
        .method("POST")
        .uri("/v1/generations")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(body))
        .unwrap();
    assert_eq!(app(h.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::ACCEPTED);
}

fn journal(h: &Harness) -> &flowgen_server::store::Store {
    h.state.journal.as_ref().unwrap()
}

/// Memory and journal agree: every live journaled job is in memory with the journal's status, and
/// no job that ended is. A claim marks its jobs running in memory a moment before its journal
/// write lands, and a job leaves memory a moment after its end lands, so allow that moment.
async fn assert_memory_follows_journal(h: &Harness) -> Vec<flowgen_server::store::StoredJob> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stored = journal(h).load_all().unwrap();
        let mut disagreement = None;
        for job in &stored {
            let memory = h.state.jobs.view(&job.id).map(|(_, v)| v.status);
            let expected = (!job.status.is_final()).then_some(job.status);
            if memory != expected {
                disagreement = Some(format!("job {}: memory {memory:?}, journal {:?}", job.id, job.status));
            }
        }
        let live = stored.iter().filter(|j| !j.status.is_final()).count();
        if disagreement.is_none() && h.state.jobs.live() != live {
            disagreement = Some(format!("{} jobs in memory, {live} live in the journal", h.state.jobs.live()));
        }
        let queued = stored.iter().filter(|j| j.status == JobStatus::Queued).count();
        if disagreement.is_none() && h.state.queue.queued() != queued {
            disagreement = Some(format!("{} queued in memory, {queued} in the journal", h.state.queue.queued()));
        }
        match disagreement {
            None => return stored,
            Some(what) if Instant::now() > deadline => panic!("memory does not follow the journal: {what}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Poll a request once (it reaches the journal write on a blocking thread), then drop it, as a
/// client closing its connection or a request timeout does.
async fn drop_after_first_poll(h: &Harness, body: Value, headers: &[(&str, &str)]) {
    let mut req =
        Request::builder().method("POST").uri("/v1/generations").header(header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let fut = app(h.state.clone()).oneshot(req.body(Body::from(body.to_string())).unwrap());
    let _ = tokio::time::timeout(Duration::ZERO, fut).await;
}

async fn settle(h: &Harness) {
    // The journal writes of dropped requests finish on blocking threads; wait until they have.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = journal(h).load_all().unwrap().len();
        if now == last {
            return;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_dropped_half_way_leave_no_slot_key_or_unknown_job_behind() {
    let h = harness(1, |c, _| {
        c.queue.capacity = 4096;
        c.queue.max_queued_per_key = 4096;
    })
    .await;
    h.fake.pause();
    for i in 0..2000 {
        let key = format!("drop-{i}");
        drop_after_first_poll(&h, json!({"seed": i, "steps": 2}), &[("idempotency-key", &key)]).await;
    }
    settle(&h).await;
    let stored = assert_memory_follows_journal(&h).await;
    // Each key that was journaled replays to its job (never a 500); the others start afresh.
    let mut replayed = 0;
    for i in (0..2000).step_by(97) {
        let key = format!("drop-{i}");
        let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": i, "steps": 2})), &[("idempotency-key", &key)])
            .await;
        let known = stored.iter().find(|j| j.idempotency_key.as_deref() == Some(key.as_str()));
        match known {
            Some(job) => {
                assert_eq!((r.status, r.json()["id"].as_str()), (StatusCode::OK, Some(job.id.as_str())), "{key}");
                replayed += 1;
            }
            None => assert_eq!(r.status, StatusCode::ACCEPTED, "{key}"),
        }
    }
    assert!(replayed > 0, "some dropped requests were journaled");
    h.fake.resume();

    // The journal refusing the write while the client is gone: slot and key are released.
    let small = harness(1, |c, _| c.queue.capacity = 1).await;
    journal(&small).refuse_writes(true).unwrap();
    for i in 0..50 {
        drop_after_first_poll(&small, json!({"seed": i}), &[("idempotency-key", &format!("refused-{i}"))]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = call(&small, "POST", "/v1/generations", Some(json!({"seed": 1})), &[]).await;
    assert_eq!((r.status, r.json()["error_type"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")));
    assert_eq!(call(&small, "GET", "/ready", None, &[]).await.json()["status"], "journal_unwritable");
    journal(&small).refuse_writes(false).unwrap();
    let r =
        call(&small, "POST", "/v1/generations", Some(json!({"seed": 1})), &[("idempotency-key", "refused-7")]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "the one slot is free and the key unused");
    assert_eq!(call(&small, "GET", "/ready", None, &[]).await.status, StatusCode::OK);
    assert_memory_follows_journal(&small).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_dropped_half_way_leave_no_job_running() {
    let h = harness(1, |c, _| {
        c.queue.capacity = 1024;
        c.queue.max_queued_per_key = 1024;
    })
    .await;
    h.fake.pause();
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(submit(&h, json!({"seed": i, "steps": 2})).await);
    }
    for id in &ids {
        let req =
            Request::builder().method("POST").uri(format!("/v1/generations/{id}/cancel")).body(Body::empty()).unwrap();
        let _ = tokio::time::timeout(Duration::ZERO, app(h.state.clone()).oneshot(req)).await;
    }
    h.fake.resume();
    settle(&h).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut views = Vec::new();
        for id in &ids {
            views.push(job_view(&h, id).await.status);
        }
        if views.iter().all(|s| s.is_final()) {
            break;
        }
        assert!(Instant::now() < deadline, "jobs left unfinished: {views:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = assert_memory_follows_journal(&h).await;
    assert!(stored.iter().filter(|j| j.status == JobStatus::Cancelled).count() >= 190, "the cancels took effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_follows_the_journal_when_its_writes_fail_and_recovers_with_it() {
    let h = harness(1, |_, _| {}).await;
    h.fake.pause();
    let id = submit(&h, json!({"seed": 3, "steps": 3})).await;
    wait_for(&h, &id, JobStatus::Running).await;
    journal(&h).refuse_writes(true).unwrap();
    h.fake.resume();
    // The job is done but its success cannot be journaled: it stays running, as the journal says.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.state.jobs.view(&id).unwrap().1.status, JobStatus::Running, "still live in memory");
    assert_eq!(journal(&h).load(&id).unwrap().unwrap().status, JobStatus::Running);
    let ready = call(&h, "GET", "/ready", None, &[]).await;
    assert_eq!(
        (ready.status, ready.json()["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("journal_unwritable"))
    );
    journal(&h).refuse_writes(false).unwrap();
    let done = wait_for(&h, &id, JobStatus::Succeeded).await;
    assert_eq!(done["images"].as_array().unwrap().len(), 1);
    let png = call(&h, "GET", &format!("/v1/generations/{id}/images/0"), None, &[]).await;
    assert_eq!(flowgen_engine::image::Image::from_png(&png.body).unwrap().0, h.fake.image_for(3, 0));
    assert_eq!(call(&h, "GET", "/ready", None, &[]).await.status, StatusCode::OK);
    assert_memory_follows_journal(&h).await;

    // A panic's text stays in the log; the job says what happened and where to look.
    let h = harness(1, |_, fake| fake.panic_label = Some(9)).await;
    let id = submit(&h, json!({"label": 9})).await;
    let failed = wait_for(&h, &id, JobStatus::Failed).await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("server log") && !error.contains("fake engine panics"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_can_neither_fill_the_queue_nor_jump_it() {
    let (alice, bob, vip) = ("key-alice-123", "key-bob-4567", "key-vip-8910");
    let h = harness(1, |c, _| {
        c.auth.api_keys = vec![alice.into(), bob.into(), vip.into()];
        c.auth.high_priority_keys = vec![vip.into()];
        c.queue.max_queued_per_key = 3;
        c.queue.max_batch = 1;
        c.limits.max_n = 1;
    })
    .await;
    let post = |key: &'static str, body: Value| {
        let h = &h;
        async move {
            let auth = format!("Bearer {key}");
            call(h, "POST", "/v1/generations", Some(body), &[("authorization", &auth)]).await
        }
    };
    h.fake.pause();
    let first = post(alice, json!({"seed": 10})).await.json()["id"].as_str().unwrap().to_string();
    wait_for(&h, &first, JobStatus::Running).await;
    for seed in [11, 12, 13] {
        assert_eq!(post(alice, json!({"seed": seed})).await.status, StatusCode::ACCEPTED);
    }
    let over = post(alice, json!({"seed": 14})).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(over.headers.contains_key(header::RETRY_AFTER));
    assert!(over.json()["error"].as_str().unwrap().contains("queue.max_queued_per_key = 3"), "{}", over.json());
    for seed in [21, 22] {
        assert_eq!(post(bob, json!({"seed": seed})).await.status, StatusCode::ACCEPTED);
    }
    assert_eq!(post(bob, json!({"seed": 23, "priority": "high"})).await.status, StatusCode::FORBIDDEN);
    assert_eq!(post(vip, json!({"seed": 30, "priority": "high"})).await.status, StatusCode::ACCEPTED);
    h.fake.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.fake.batches().len() < 7 {
        assert!(Instant::now() < deadline, "{:?}", h.fake.batches());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // High first; then alice and bob take turns, each in their own order.
    let order: Vec<u64> = h.fake.batches().into_iter().flatten().collect();
    assert_eq!(order, [10, 30, 11, 21, 12, 22, 13]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_host_names_reach_the_api() {
    let h = harness(1, |_, _| {}).await;
    let body = Some(json!({"seed": 1}));
    let rebinding = call(&h, "POST", "/v1/generations", body.clone(), &[("host", "attacker.example:8080")]).await;
    assert_eq!(rebinding.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(
        (rebinding.json()["error_type"].as_str(), rebinding.json()["field"].as_str()),
        (Some("misdirected"), Some("Host"))
    );
    assert!(rebinding.json()["error"].as_str().unwrap().contains("server.allowed_hosts"));
    let read = call(&h, "GET", "/v1/generations", None, &[("host", "attacker.example")]).await;
    assert_eq!(read.status, StatusCode::MISDIRECTED_REQUEST, "reads are refused too");
    assert_eq!(h.state.queue.queued(), 0);
    for host in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
        let r = call(&h, "POST", "/v1/generations", body.clone(), &[("host", host)]).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{host}");
    }
    let named = harness(1, |c, _| c.server.allowed_hosts = vec!["flowgen.internal".into()]).await;
    let r = call(&named, "POST", "/v1/generations", body.clone(), &[("host", "flowgen.internal:8080")]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = call(&named, "GET", "/v1/models", None, &[("host", "other.internal")]).await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_flight_do_not_hold_up_commits() {
    let h = harness(1, |_, _| {}).await;
    let done = submit(&h, json!({"seed": 1})).await;
    wait_for(&h, &done, JobStatus::Succeeded).await;
    // Every read connection busy in a read transaction, as slow image downloads keep them.
    let held: Vec<_> = (0..flowgen_server::store::READERS).map(|_| journal(&h).hold_read().unwrap()).collect();
    let started = Instant::now();
    h.fake.pause();
    let id = submit(&h, json!({"seed": 2, "n": 2})).await;
    // Watched through its live channel: a finished job's status is read from the journal.
    let mut events = h.state.jobs.subscribe(&id).unwrap();
    h.fake.resume();
    let status = tokio::time::timeout(Duration::from_secs(5), events.wait_for(|s| s.status.is_final()))
        .await
        .expect("the job ended within 5 s though every reader was busy")
        .map(|s| s.status)
        .unwrap();
    assert_eq!(status, JobStatus::Succeeded);
    eprintln!("accepted, run and committed in {:?} with every reader busy", started.elapsed());
    drop(held);
    let png = call(&h, "GET", &format!("/v1/generations/{id}/images/1"), None, &[]).await;
    assert_eq!(png.status, StatusCode::OK);
    assert_eq!(journal(&h).load(&id).unwrap().unwrap().status.as_str(), "succeeded");
}

/// Every id on every page of the caller's listing, newest first.
async fn list_all(h: &Harness, query: &str, limit: usize, headers: &[(&str, &str)]) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let mut uri = format!("/v1/generations?limit={limit}{query}");
        if let Some(last) = all.last() {
            uri.push_str(&format!("&after={}", last["id"].as_str().unwrap()));
        }
        let r = call(h, "GET", &uri, None, headers).await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        let page = r.json()["data"].as_array().unwrap().clone();
        assert!(page.len() <= limit);
        all.extend(page);
        if r.json()["has_more"] == false {
            return all;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_leave_memory_and_the_journal_serves_them_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let configure = |c: &mut ServerConfig, _: &mut FakeEngine| {
        c.server.data_dir = dir.path().to_path_buf();
        c.queue.max_batch = 4;
        c.limits.max_n = 4;
    };
    let h = harness(1, configure).await;
    // 120 jobs with three step counts (so several batches), one with an Idempotency-Key.
    let keyed =
        call(&h, "POST", "/v1/generations", Some(json!({"seed": 0, "steps": 2})), &[("idempotency-key", "k-0")])
            .await
            .json()["id"]
            .as_str()
            .unwrap()
            .to_string();
    let mut ids = vec![keyed.clone()];
    for seed in 1..120 {
        ids.push(submit(&h, json!({"seed": seed, "steps": 2 + seed % 3, "n": 1 + (seed % 2)})).await);
    }
    let live_view = job_view(&h, &ids[119]).await;
    for id in &ids {
        wait_for(&h, id, JobStatus::Succeeded).await;
    }
    // Memory holds what is live, and nothing is.
    assert_memory_follows_journal(&h).await;
    assert_eq!(h.state.jobs.live(), 0, "finished jobs left memory");

    // What clients see of a finished job is what they saw while it ran, plus how it ended.
    let done = call(&h, "GET", &format!("/v1/generations/{}", ids[119]), None, &[]).await.json();
    assert_eq!(
        (done["status"].as_str(), done["step"].clone(), done["total"].clone()),
        (Some("succeeded"), json!(4), json!(4))
    );
    for field in ["model", "labels", "seeds", "sampler", "steps", "guidance", "schedule", "created_at_ms", "n"] {
        assert_eq!(done[field], serde_json::to_value(&live_view).unwrap()[field], "{field}");
    }
    assert_eq!(done["images"].as_array().unwrap().len(), 2);
    assert!(done["nfe"].as_u64().unwrap() > 0 && done["finished_at_ms"].as_i64().is_some());
    let png = call(&h, "GET", &format!("/v1/generations/{}/images/1", ids[119]), None, &[]).await;
    assert_eq!((png.status, png.headers[header::CONTENT_TYPE].to_str().unwrap()), (StatusCode::OK, "image/png"));
    // A late subscriber gets the end at once, with the full view.
    let events = read_events(&h, &ids[5]).await;
    let (name, data) = events.last().unwrap();
    assert_eq!(
        (name.as_str(), data["id"].as_str(), data["images"].as_array().map(Vec::len)),
        ("succeeded", Some(ids[5].as_str()), Some(2))
    );
    // Cancelling a finished job is a conflict, as before.
    let r = call(&h, "POST", &format!("/v1/generations/{}/cancel", ids[3]), None, &[]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Its Idempotency-Key still replays it, and refuses a different body.
    let r =
        call(&h, "POST", "/v1/generations", Some(json!({"seed": 0, "steps": 2})), &[("idempotency-key", "k-0")]).await;
    assert_eq!(
        (r.status, r.json()["id"].as_str(), r.json()["status"].as_str()),
        (StatusCode::OK, Some(keyed.as_str()), Some("succeeded"))
    );
    let r =
        call(&h, "POST", "/v1/generations", Some(json!({"seed": 1, "steps": 2})), &[("idempotency-key", "k-0")]).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // Listings come from the journal, newest first, in pages, with live jobs among them.
    h.fake.pause();
    let running = submit(&h, json!({"seed": 500})).await;
    let queued = submit(&h, json!({"seed": 501, "steps": 9})).await;
    wait_for(&h, &running, JobStatus::Running).await;
    let all = list_all(&h, "", 7, &[]).await;
    let listed: Vec<&str> = all.iter().map(|j| j["id"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.extend([running.as_str(), queued.as_str()]);
    expected.reverse();
    assert_eq!(listed, expected);
    assert_eq!((all[0]["status"].as_str(), all[0]["queue_position"].as_u64()), (Some("queued"), Some(0)));
    assert_eq!(all[1]["status"], "running");
    let live = list_all(&h, "&status=queued,running", 500, &[]).await;
    assert_eq!(live.len(), 2);
    assert_eq!(h.state.jobs.live(), 2);
    h.fake.resume();
    wait_for(&h, &queued, JobStatus::Succeeded).await;

    // After a restart only live jobs are loaded; the rest is read from the journal as before.
    h.state.begin_drain();
    drop(h);
    let h = harness(1, configure).await;
    assert_eq!(h.state.jobs.live(), 0);
    assert_eq!(list_all(&h, "&status=succeeded", 500, &[]).await.len(), 122);
    assert_eq!(call(&h, "GET", &format!("/v1/generations/{}", ids[0]), None, &[]).await.json()["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_storing_its_most_jobs_gets_429_until_one_is_deleted_or_expires() {
    let keys = |c: &mut ServerConfig| c.auth.api_keys = vec!["key-alice-123".into(), "key-bob-4567".into()];
    let h = harness(1, |c, _| {
        keys(c);
        c.queue.max_stored_per_key = 3;
        c.queue.max_queued_per_key = 3;
    })
    .await;
    let (alice, bob) = ([("authorization", "Bearer key-alice-123")], [("authorization", "Bearer key-bob-4567")]);
    let mut mine = Vec::new();
    for seed in 0..3 {
        let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": seed})), &alice).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        mine.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for id in &mine {
        wait_for(&h, id, JobStatus::Succeeded).await;
    }
    let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": 9})), &alice).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("queue.max_stored_per_key = 3") && message.contains("DELETE"), "{message}");
    let retry: u64 = r.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((86_390..=86_400).contains(&retry), "Retry-After {retry}: when the first result expires");
    // Another key is not affected.
    assert_eq!(call(&h, "POST", "/v1/generations", Some(json!({"seed": 9})), &bob).await.status, StatusCode::ACCEPTED);
    // Deleting: not another key's job, not twice; its images go with it.
    let uri = format!("/v1/generations/{}", mine[0]);
    assert_eq!(call(&h, "DELETE", &uri, None, &bob).await.status, StatusCode::FORBIDDEN);
    assert_eq!(call(&h, "DELETE", &uri, None, &alice).await.status, StatusCode::NO_CONTENT);
    assert_eq!(call(&h, "DELETE", &uri, None, &alice).await.status, StatusCode::NOT_FOUND);
    assert_eq!(call(&h, "GET", &uri, None, &alice).await.status, StatusCode::NOT_FOUND);
    assert_eq!(call(&h, "GET", &format!("{uri}/images/0"), None, &alice).await.status, StatusCode::NOT_FOUND);
    assert_eq!(journal(&h).load(&mine[0]).unwrap().map(|j| j.id), None);
    // The freed place takes one job, and a live job cannot be deleted.
    h.fake.pause();
    let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": 10})), &alice).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let live = r.json()["id"].as_str().unwrap().to_string();
    let r = call(&h, "DELETE", &format!("/v1/generations/{live}"), None, &alice).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.json()["error"].as_str().unwrap().contains("cancel it"), "{}", r.json());
    assert_eq!(
        call(&h, "POST", "/v1/generations", Some(json!({"seed": 11})), &alice).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.fake.resume();
    wait_for(&h, &live, JobStatus::Succeeded).await;

    // Expiry frees places too.
    let h = harness(1, |c, _| {
        c.queue.max_stored_per_key = 2;
        c.queue.max_queued_per_key = 2;
        c.queue.result_ttl_s = 1;
    })
    .await;
    for seed in 0..2 {
        let id = submit(&h, json!({"seed": seed})).await;
        wait_for(&h, &id, JobStatus::Succeeded).await;
    }
    let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": 2})), &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers[header::RETRY_AFTER].to_str().unwrap().parse::<u64>().unwrap() <= 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&h, "POST", "/v1/generations", Some(json!({"seed": 2})), &[]).await;
        if r.status == StatusCode::ACCEPTED {
            break;
        }
        assert!(Instant::now() < deadline, "expired jobs still count against the key: {}", r.json());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
