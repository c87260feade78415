//! Health, readiness, metrics, the OpenAPI document, API keys with rate limits,
//! CORS.

use serde_json::json;

use super::{TestServer, config};
use sd_server::ApiKey;

#[test]
fn health_ready_metrics_openapi() {
    let s = TestServer::shared();
    assert_eq!(s.get("/health").json()["status"], "ok");
    let ready = s.get("/ready");
    assert_eq!(ready.status, 200);
    assert!(
        ready.json()["models_loaded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "tiny")
    );
    s.post_json(
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "32x32", "steps": 2}),
    );
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.content_type.starts_with("text/plain"));
    for name in [
        "sd_queue_depth",
        "sd_job_latency_seconds_bucket",
        "sd_steps_per_second",
        "sd_images_total",
        "sd_batch_size_bucket",
        "sd_resident_memory_bytes",
        "sd_models_loaded",
        "sd_steps_total",
    ] {
        assert!(m.body.contains(name), "metrics have {name}");
    }
    let doc = s.get("/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/images/generations",
        "/v1/images/edits",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/v1/jobs/{id}/events",
    ] {
        assert!(doc["paths"].get(path).is_some(), "OpenAPI documents {path}");
    }
    let r = s.get("/v2/nothing");
    assert_eq!(r.status, 404);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v2/nothing")
    );
}

#[test]
fn api_keys_and_rate_limits() {
    let mut c = config();
    c.api_keys = vec![
        ApiKey {
            name: "alice".into(),
            key: "alice-secret-0001".into(),
            requests_per_minute: 3,
        },
        ApiKey {
            name: "bob".into(),
            key: "bob-secret-0002".into(),
            requests_per_minute: 0,
        },
        ApiKey {
            name: "carol".into(),
            key: "carol-secret-0003".into(),
            requests_per_minute: 0,
        },
    ];
    c.cors_origins = vec!["https://app.example".into()];
    let s = TestServer::start(c);
    assert_eq!(s.get("/health").status, 200, "probes need no key");
    let r = s.get("/v1/models");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        s.get_with("/v1/models", ("authorization", "Bearer wrong-secret"))
            .status,
        401
    );
    assert_eq!(
        s.get_with(
            "/sdapi/v1/sd-models",
            ("authorization", "Bearer alice-secret-000")
        )
        .status,
        401
    );
    let r = s.get_with(
        "/sdapi/v1/options",
        ("authorization", "Basic alice-secret-0001"),
    );
    assert_eq!(r.status, 401);
    assert!(r.json()["detail"].is_string(), "A1111 shape on /sdapi");
    let alice = ("authorization", "Bearer alice-secret-0001");
    for _ in 0..3 {
        assert_eq!(s.get_with("/v1/models", alice).status, 200);
    }
    let r = s.get_with("/v1/models", alice);
    assert_eq!(r.status, 429);
    assert!(r.retry_after.is_some());
    for _ in 0..10 {
        assert_eq!(
            s.get_with("/v1/models", ("authorization", "Bearer bob-secret-0002"))
                .status,
            200
        );
    }
    // A job is seen only by the key that made it.
    let bob = ("authorization", "Bearer bob-secret-0002");
    let r = s.post_with(
        "/v1/jobs",
        bob,
        &json!({"prompt": "x", "width": 32, "height": 32, "steps": 2}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(s.get_with(&format!("/v1/jobs/{id}"), bob).status, 200);
    let carol = ("authorization", "Bearer carol-secret-0003");
    assert_eq!(s.get_with(&format!("/v1/jobs/{id}"), carol).status, 404);
    assert_eq!(s.delete_with(&format!("/v1/jobs/{id}"), carol).status, 404);
    // CORS for the configured origin only.
    let r = s.get_with("/health", ("origin", "https://app.example"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = s.get_with("/health", ("origin", "https://evil.example"));
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn cors_is_off_unless_configured() {
    let r = TestServer::shared().get_with("/health", ("origin", "https://app.example"));
    assert_eq!(r.header("access-control-allow-origin"), None);
}
