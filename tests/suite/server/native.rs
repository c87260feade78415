//! Native jobs: create, status, Server-Sent Events, cancel within a step; the
//! queue's 429, batching and deadlines.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{TestServer, config, decode_png, keys};

fn create(s: &TestServer, body: Value) -> String {
    let r = s.post_json("/v1/jobs", &body);
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(keys(&v), ["id", "position", "status"]);
    assert!(v["status"] == "queued" || v["status"] == "running", "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn wait_final(s: &TestServer, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = s.get(&format!("/v1/jobs/{id}")).json();
        if ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn job_events_from_queue_to_result() {
    let s = TestServer::shared();
    let id = create(
        s,
        json!({"prompt": "a lighthouse", "width": 32, "height": 32, "steps": 4, "seed": 9, "n": 2, "scheduler": "euler"}),
    );
    let events = s.events(&id);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"step"), "{names:?}");
    assert!(names.contains(&"preview"), "{names:?}");
    assert_eq!(names.last(), Some(&"result"), "{names:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]) && steps.last() == Some(&4),
        "{steps:?}"
    );
    let (_, result) = events.last().unwrap();
    assert_eq!(result["images"].as_array().unwrap().len(), 2);
    assert_eq!(result["parameters"][1]["seed"], 10);
    // The tiny model has no safety checker: no verdict.
    assert!(
        result["parameters"][0]["nsfw_content_detected"].is_null(),
        "{result}"
    );
    // The finished job's status, and its events replayed as the result alone.
    let v = s.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(
        keys(&v),
        [
            "batch",
            "created",
            "error",
            "id",
            "images",
            "model",
            "parameters",
            "position",
            "status",
            "step",
            "task",
            "total"
        ]
    );
    assert_eq!(
        (
            v["status"].as_str(),
            v["step"].as_u64(),
            v["total"].as_u64()
        ),
        (Some("succeeded"), Some(4), Some(4))
    );
    assert_eq!(v["task"], "txt2img");
    decode_png(v["images"][0].as_str().unwrap(), 32, 32);
    let again = s.events(&id);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "result");
    assert_eq!(
        s.get("/v1/jobs/0123456789abcdef0123456789abcdef").status,
        404
    );
}

#[test]
fn delete_cancels_within_a_step() {
    let s = TestServer::shared();
    let id = create(
        s,
        json!({"prompt": "slow", "width": 32, "height": 32, "steps": 150}),
    );
    let start = Instant::now();
    loop {
        let v = s.get(&format!("/v1/jobs/{id}")).json();
        if v["step"].as_u64().unwrap() >= 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = s.delete(&format!("/v1/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["cancelled"], true);
    let v = wait_final(s, &id);
    assert_eq!(v["status"], "cancelled");
    assert!(v["step"].as_u64().unwrap() < 150, "stopped early: {v}");
    assert_eq!(v["error"]["kind"], "cancelled");
    let events = s.events(&id);
    assert_eq!(events.last().unwrap().0, "cancelled");
    // Cancelling again: the job is over.
    assert_eq!(
        s.delete(&format!("/v1/jobs/{id}")).json()["cancelled"],
        false
    );
}

#[test]
fn full_queue_gives_429_with_retry_after() {
    let mut c = config();
    c.limits.queue_capacity = 2;
    let s = TestServer::start(c);
    let slow = json!({"prompt": "slow", "width": 32, "height": 32, "steps": 150});
    let running = create(&s, slow.clone());
    while s.get(&format!("/v1/jobs/{running}")).json()["status"] == "queued" {
        std::thread::sleep(Duration::from_millis(10));
    }
    let waiting: Vec<String> = (0..2).map(|_| create(&s, slow.clone())).collect();
    let r = s.post_json("/v1/jobs", &slow);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.retry_after
            .as_deref()
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)
    );
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let r = s.post_json(
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "32x32"}),
    );
    assert_eq!(r.status, 429);
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "width": 32, "height": 32}),
    );
    assert_eq!(r.status, 429);
    assert!(r.json()["detail"].as_str().unwrap().contains("full"));
    // A waiting job cancelled leaves at once and frees its place.
    assert_eq!(s.delete(&format!("/v1/jobs/{}", waiting[0])).status, 200);
    assert_eq!(
        s.get(&format!("/v1/jobs/{}", waiting[0])).json()["status"],
        "cancelled"
    );
    create(
        &s,
        json!({"prompt": "fits", "width": 32, "height": 32, "steps": 2}),
    );
    for id in [&running, &waiting[1]] {
        s.delete(&format!("/v1/jobs/{id}"));
    }
}

#[test]
fn compatible_jobs_share_a_batch_and_match_alone() {
    let mut c = config();
    c.max_batch = 4;
    let s = TestServer::start(c);
    let job = |prompt: &str, seed: u64| json!({"prompt": prompt, "width": 32, "height": 32, "steps": 3, "seed": seed, "scheduler": "euler-a"});
    let alone = create(&s, job("a fox", 21));
    let alone = wait_final(&s, &alone);
    assert_eq!(alone["batch"], 1);
    let blocker = create(
        &s,
        json!({"prompt": "first", "width": 32, "height": 32, "steps": 100}),
    );
    while s.get(&format!("/v1/jobs/{blocker}")).json()["status"] == "queued" {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ids: Vec<String> = [("a fox", 21), ("a cat", 22), ("a dog", 23)]
        .iter()
        .map(|(p, seed)| create(&s, job(p, *seed)))
        .collect();
    let other = create(
        &s,
        json!({"prompt": "other size", "width": 40, "height": 32, "steps": 3}),
    );
    let results: Vec<Value> = ids.iter().map(|id| wait_final(&s, id)).collect();
    for r in &results {
        assert_eq!(r["status"], "succeeded");
        assert_eq!(r["batch"], 3, "the three compatible jobs ran together: {r}");
    }
    assert_eq!(wait_final(&s, &other)["batch"], 1);
    let a = decode_png(alone["images"][0].as_str().unwrap(), 32, 32).to_rgb8();
    let b = decode_png(results[0]["images"][0].as_str().unwrap(), 32, 32).to_rgb8();
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(
        worst <= 2,
        "batched picture differs from the one made alone by {worst}"
    );
}

#[test]
fn a_job_past_its_deadline_fails() {
    let s = TestServer::shared();
    let id = create(
        s,
        json!({"prompt": "slow", "width": 32, "height": 32, "steps": 150, "timeout_secs": 0.3}),
    );
    let v = wait_final(s, &id);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["kind"], "deadline");
}

/// SDXL's second prompts travel to the pipeline: a model with one text encoder
/// refuses them by name (the job fails with the pipeline's words).
#[test]
fn a_second_prompt_reaches_the_pipeline() {
    let s = TestServer::shared();
    // The job may fail before the reply is written: its status then says so.
    let r = s.post_json(
        "/v1/jobs",
        &json!({"prompt": "a lighthouse", "prompt_2": "an oil painting", "width": 32, "height": 32, "steps": 2}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let v = wait_final(s, r.json()["id"].as_str().unwrap());
    assert_eq!(v["status"], "failed", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("prompt_2"), "{v}");
}

/// SD 3 through the native API: a tiny SD 3 model takes `prompt_3`,
/// `max_sequence_length`, `shift` and skip-layer guidance; an SD 1.5 model refuses
/// `prompt_3` by name.
#[test]
fn sd3_settings_reach_the_pipeline() {
    use sd_server::{ModelConfig, ServerConfig};
    let sd3 = TestServer::start(ServerConfig {
        models: vec![ModelConfig::new(
            "tiny-sd3",
            crate::common::fixture("tiny-sd3").to_string_lossy(),
        )],
        ..ServerConfig::default()
    });
    let r = sd3.post_json(
        "/v1/jobs",
        &json!({"prompt": "a lighthouse", "prompt_3": "a red fox in the rain", "width": 32,
               "height": 32, "steps": 3, "guidance": 4.5, "max_sequence_length": 32,
               "shift": 2.0, "skip_layer_guidance": [1], "slg_start": 0.0, "slg_stop": 1.0}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = wait_final(&sd3, &id);
    assert_eq!(v["status"], "succeeded", "{v}");
    let s = TestServer::shared();
    let r = s.post_json(
        "/v1/jobs",
        &json!({"prompt": "a lighthouse", "prompt_3": "an oil painting", "width": 32, "height": 32, "steps": 2}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let v = wait_final(s, r.json()["id"].as_str().unwrap());
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("prompt_3"),
        "{v}"
    );
}
