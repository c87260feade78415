//! Malformed and hostile requests: each gets a 4xx with a clear message in its API's
//! error shape, never a 5xx, and the server keeps answering.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use super::{TestServer, b64, picture, png};

const JSON: &str = "application/json";

/// (what, path, content type, body, expected status)
fn cases() -> Vec<(&'static str, &'static str, &'static str, Vec<u8>, u16)> {
    let garbage_b64 = "!!!not base64!!!";
    let not_an_image = b64(b"these bytes are no picture at all");
    let init = b64(&png(stable_diffusion::image::DynamicImage::ImageRgb8(
        picture(),
    )));
    let j = |v: Value| v.to_string().into_bytes();
    let oai = "/v1/images/generations";
    let t2i = "/sdapi/v1/txt2img";
    let i2i = "/sdapi/v1/img2img";
    let jobs = "/v1/jobs";
    vec![
        ("bad JSON", oai, JSON, b"{\"prompt\": ".to_vec(), 400),
        ("not JSON at all", oai, JSON, b"prompt=a cat".to_vec(), 400),
        ("JSON array", oai, JSON, j(json!(["a cat"])), 400),
        ("empty body", oai, JSON, Vec::new(), 400),
        ("missing prompt", oai, JSON, j(json!({"n": 1})), 400),
        ("prompt a number", oai, JSON, j(json!({"prompt": 5})), 400),
        ("empty prompt", oai, JSON, j(json!({"prompt": ""})), 400),
        ("blank prompt", jobs, JSON, j(json!({"prompt": "   "})), 400),
        ("prompt too long", oai, JSON, j(json!({"prompt": "a".repeat(5000)})), 400),
        ("n 0", oai, JSON, j(json!({"prompt": "x", "n": 0})), 400),
        ("n 10000", oai, JSON, j(json!({"prompt": "x", "n": 10000})), 400),
        ("n a string", oai, JSON, j(json!({"prompt": "x", "n": "two"})), 400),
        ("n fractional", oai, JSON, j(json!({"prompt": "x", "n": 1.5})), 400),
        ("size 0", oai, JSON, j(json!({"prompt": "x", "size": "0x0"})), 400),
        ("size 7", oai, JSON, j(json!({"prompt": "x", "size": "7x7"})), 400),
        ("size 100000", oai, JSON, j(json!({"prompt": "x", "size": "100000x100000"})), 400),
        ("size words", oai, JSON, j(json!({"prompt": "x", "size": "large"})), 400),
        ("response_format url", oai, JSON, j(json!({"prompt": "x", "response_format": "url"})), 400),
        ("unknown model", oai, JSON, j(json!({"prompt": "x", "model": "sd-9"})), 404),
        ("model path traversal", oai, JSON, j(json!({"prompt": "x", "model": "../../etc/passwd"})), 404),
        ("unknown scheduler", oai, JSON, j(json!({"prompt": "x", "scheduler": "heun++"})), 400),
        ("unknown LoRA", oai, JSON, j(json!({"prompt": "x", "loras": [{"name": "nope"}]})), 404),
        ("LoRA path traversal", jobs, JSON, j(json!({"prompt": "x", "loras": [{"name": "../lora/tiny_unet_lora_kohya"}]})), 404),
        ("negative steps", oai, JSON, j(json!({"prompt": "x", "steps": -5})), 400),
        ("zero steps", jobs, JSON, j(json!({"prompt": "x", "steps": 0})), 400),
        ("steps 1e9", jobs, JSON, j(json!({"prompt": "x", "steps": 1_000_000_000})), 400),
        ("guidance 1e999", oai, JSON, b"{\"prompt\":\"x\",\"guidance\":1e999}".to_vec(), 400),
        ("guidance NaN", oai, JSON, b"{\"prompt\":\"x\",\"guidance\":NaN}".to_vec(), 400),
        ("guidance Infinity", jobs, JSON, b"{\"prompt\":\"x\",\"guidance\":Infinity}".to_vec(), 400),
        ("guidance negative", jobs, JSON, j(json!({"prompt": "x", "guidance": -3})), 400),
        ("unknown native field", jobs, JSON, j(json!({"prompt": "x", "stepz": 3})), 400),
        ("width without height", jobs, JSON, j(json!({"prompt": "x", "width": 64})), 400),
        ("mask without image", jobs, JSON, j(json!({"prompt": "x", "mask": init.clone()})), 400),
        ("init image garbage base64", jobs, JSON, j(json!({"prompt": "x", "init_image": garbage_b64})), 400),
        ("init image not a picture", jobs, JSON, j(json!({"prompt": "x", "init_image": not_an_image.clone()})), 400),
        ("strength 0", jobs, JSON, j(json!({"prompt": "x", "init_image": init.clone(), "strength": 0.0})), 400),
        ("strength 2", jobs, JSON, j(json!({"prompt": "x", "init_image": init.clone(), "strength": 2.0})), 400),
        ("unknown ControlNet", jobs, JSON, j(json!({"prompt": "x", "controlnets": [{"name": "canny", "image": init.clone()}]})), 404),
        ("A1111 width 7", t2i, JSON, j(json!({"prompt": "x", "width": 7, "height": 64})), 400),
        ("A1111 width 0", t2i, JSON, j(json!({"prompt": "x", "width": 0})), 400),
        ("A1111 negative steps", t2i, JSON, j(json!({"prompt": "x", "steps": -1, "width": 32, "height": 32})), 400),
        ("A1111 batch 10000", t2i, JSON, j(json!({"prompt": "x", "batch_size": 100, "n_iter": 100})), 400),
        ("A1111 batch overflow", t2i, JSON, j(json!({"prompt": "x", "batch_size": i64::MAX, "n_iter": i64::MAX})), 400),
        ("A1111 unknown sampler", t2i, JSON, j(json!({"prompt": "x", "sampler_name": "DPM2"})), 400),
        ("A1111 unknown schedule", t2i, JSON, j(json!({"prompt": "x", "sampler_name": "Euler", "scheduler": "SGM Uniform"})), 400),
        ("A1111 LoRA tag unknown", t2i, JSON, j(json!({"prompt": "x <lora:missing:1>", "width": 32, "height": 32})), 404),
        ("A1111 LoRA tag bad weight", t2i, JSON, j(json!({"prompt": "x <lora:tiny_unet_lora_kohya:lots>"})), 400),
        ("A1111 LoRA tag traversal", t2i, JSON, j(json!({"prompt": "<lora:../../x:1>", "width": 32, "height": 32})), 404),
        ("A1111 steps a string", t2i, JSON, j(json!({"prompt": "x", "steps": "many"})), 400),
        ("A1111 restore faces", t2i, JSON, j(json!({"prompt": "x", "restore_faces": true})), 400),
        ("A1111 hires scale 100", t2i, JSON, j(json!({"prompt": "x", "width": 32, "height": 32, "enable_hr": true, "hr_scale": 100})), 400),
        ("A1111 hires upscaler", t2i, JSON, j(json!({"prompt": "x", "width": 32, "height": 32, "enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+"})), 400),
        ("A1111 override unknown model", t2i, JSON, j(json!({"prompt": "x", "override_settings": {"sd_model_checkpoint": "../x"}})), 404),
        ("A1111 ControlNet args not a list", t2i, JSON, j(json!({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": 5}}})), 400),
        ("A1111 ControlNet image garbage", t2i, JSON, j(json!({"prompt": "x", "width": 32, "height": 32, "alwayson_scripts": {"controlnet": {"args": [{"model": "tiny-cn", "image": garbage_b64}]}}})), 400),
        ("img2img without images", i2i, JSON, j(json!({"prompt": "x"})), 400),
        ("img2img garbage base64", i2i, JSON, j(json!({"prompt": "x", "init_images": [garbage_b64]})), 400),
        ("img2img data URL not a picture", i2i, JSON, j(json!({"prompt": "x", "init_images": [format!("data:image/png;base64,{not_an_image}")]})), 400),
        ("img2img mask garbage", i2i, JSON, j(json!({"prompt": "x", "init_images": [init.clone()], "mask": garbage_b64, "width": 32, "height": 32})), 400),
        ("img2img inpainting fill 2", i2i, JSON, j(json!({"prompt": "x", "init_images": [init.clone()], "mask": init.clone(), "inpainting_fill": 2, "width": 32, "height": 32})), 400),
        ("img2img resize mode 3", i2i, JSON, j(json!({"prompt": "x", "init_images": [init.clone()], "resize_mode": 3, "width": 32, "height": 32})), 400),
        ("options model traversal", "/sdapi/v1/options", JSON, j(json!({"sd_model_checkpoint": "../../weights"})), 404),
        ("options clip skip 99", "/sdapi/v1/options", JSON, j(json!({"CLIP_stop_at_last_layers": 99})), 400),
        ("edits not multipart", "/v1/images/edits", JSON, j(json!({"prompt": "x"})), 400),
        ("edits image not a picture", "/v1/images/edits", "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nnot a png\r\n--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b--\r\n".to_vec(), 400),
        ("edits broken multipart", "/v1/images/edits", "multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: garbage".to_vec(), 400),
        ("edits n not a number", "/v1/images/edits", "multipart/form-data; boundary=b",
            format!("--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n{}\r\n--b\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\nmany\r\n--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b--\r\n",
                String::from_utf8_lossy(&png(stable_diffusion::image::DynamicImage::ImageRgb8(picture())))).into_bytes(), 400),
    ]
}

#[test]
fn malformed_requests_get_4xx_with_a_message() {
    let s = TestServer::shared();
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for (what, path, content_type, body, expected) in cases {
        let r = s.post(path, content_type, &body);
        assert_eq!(r.status, expected, "{what}: {}", r.body);
        let v = r.json();
        let message = if path.starts_with("/sdapi") {
            assert!(
                v["error"].is_string() && v["errors"].is_string(),
                "{what}: A1111 shape {v}"
            );
            v["detail"].as_str().unwrap().to_string()
        } else {
            assert!(v["error"]["type"].is_string(), "{what}: OpenAI shape {v}");
            v["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(
            message.len() > 5,
            "{what}: a clear message, got `{message}`"
        );
        assert!(
            !message.contains("/work/") && !message.contains("fixtures"),
            "{what}: no server paths in `{message}`"
        );
    }
    // Still answering, and still generating.
    assert_eq!(s.get("/health").status, 200);
    let r = s.post_json(
        "/v1/images/generations",
        &json!({"prompt": "still here", "size": "32x32", "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn a_50_mb_body_gets_413() {
    let s = TestServer::shared();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let len = 50 << 20;
    write!(stream, "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n").unwrap();
    // The server answers before reading it all; writing the rest may fail then.
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..50 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(text.contains("over the limit"), "{text}");
    // Without a length: streamed past the limit.
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn hostile_paths_and_methods() {
    let s = TestServer::shared();
    for path in [
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%00",
        "/sdapi/v1/../../etc/passwd",
    ] {
        let r = s.get(path);
        assert!((400..500).contains(&r.status), "{path}: {}", r.status);
    }
    let r = s.delete("/v1/jobs/not-a-job");
    assert_eq!(r.status, 404);
    let r = s.get("/v1/images/generations");
    assert_eq!(r.status, 405);
}
