//! OpenAI's images API: response shapes field by field.

use serde_json::json;
use stable_diffusion::image::DynamicImage;

use super::{TestServer, decode_png, keys, picture, png, transparent_right};

#[test]
fn generations_in_openai_shape() {
    let s = TestServer::shared();
    let r = s.post_json(
        "/v1/images/generations",
        &json!({"prompt": "a red fox", "n": 2, "size": "32x32", "response_format": "b64_json",
                "model": "tiny", "seed": 7, "steps": 2, "guidance": 5.0, "scheduler": "DPM++ 2M Karras",
                "negative_prompt": "blurry", "loras": [{"name": "tiny_unet_lora_kohya", "weight": 0.5}],
                "user": "someone", "quality": "standard"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("application/json"));
    let v = r.json();
    assert_eq!(keys(&v), ["created", "data"]);
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        assert_eq!(keys(d), ["b64_json", "revised_prompt"]);
        assert_eq!(d["revised_prompt"], "a red fox");
        decode_png(d["b64_json"].as_str().unwrap(), 32, 32);
    }
    assert_ne!(
        data[0]["b64_json"], data[1]["b64_json"],
        "image i is seed + i"
    );
}

#[test]
fn same_seed_same_picture() {
    let s = TestServer::shared();
    let body = json!({"prompt": "a cat", "size": "32x32", "seed": 11, "steps": 2});
    let a = s.post_json("/v1/images/generations", &body).json();
    let b = s.post_json("/v1/images/generations", &body).json();
    assert_eq!(a["data"][0]["b64_json"], b["data"][0]["b64_json"]);
}

fn multipart(fields: &[(&str, &str)], files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "sd-server-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (name, bytes) in files {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png\r\n\r\n")
                .as_bytes(),
        );
        body.extend(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn edits_img2img_and_inpainting() {
    let s = TestServer::shared();
    let image = png(DynamicImage::ImageRgb8(picture()));
    // img2img: an opaque picture, no mask.
    let (ct, body) = multipart(
        &[
            ("prompt", "an oil painting"),
            ("steps", "4"),
            ("strength", "0.5"),
            ("seed", "3"),
        ],
        &[("image", image.clone())],
    );
    let r = s.post("/v1/images/edits", &ct, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(keys(&v), ["created", "data"]);
    decode_png(v["data"][0]["b64_json"].as_str().unwrap(), 32, 32);
    // Inpainting: the mask's transparent half is repainted, at a size asked for.
    let mask = png(DynamicImage::ImageRgba8(transparent_right()));
    let (ct, body) = multipart(
        &[
            ("prompt", "a dog"),
            ("n", "2"),
            ("size", "32x32"),
            ("steps", "3"),
        ],
        &[("image", image.clone()), ("mask", mask)],
    );
    let r = s.post("/v1/images/edits", &ct, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    // No mask, but a picture with transparent pixels: they are the edit region.
    let (ct, body) = multipart(
        &[("prompt", "a dog"), ("steps", "2")],
        &[("image", png(DynamicImage::ImageRgba8(transparent_right())))],
    );
    assert_eq!(s.post("/v1/images/edits", &ct, &body).status, 200);
    // Without a picture: 400 naming the field.
    let (ct, body) = multipart(&[("prompt", "a dog")], &[]);
    let r = s.post("/v1/images/edits", &ct, &body);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "image");
}

#[test]
fn models_list() {
    let v = TestServer::shared().get("/v1/models").json();
    assert_eq!(keys(&v), ["data", "object"]);
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny-file"]);
    for m in v["data"].as_array().unwrap() {
        assert_eq!(keys(m), ["created", "id", "object", "owned_by"]);
        assert_eq!(m["object"], "model");
    }
}

#[test]
fn errors_in_openai_shape() {
    let r = TestServer::shared().post_json(
        "/v1/images/generations",
        &json!({"prompt": "x", "model": "dall-e-3"}),
    );
    assert_eq!(r.status, 404);
    let e = &r.json()["error"];
    assert_eq!(keys(e), ["code", "message", "param", "type"]);
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "model_not_found");
    assert!(
        e["message"].as_str().unwrap().contains("dall-e-3")
            && e["message"].as_str().unwrap().contains("tiny")
    );
}
