//! AUTOMATIC1111's API: txt2img / img2img shapes and `info`, LoRA tags, hires fix,
//! inpainting as A1111 does it, ControlNet units, the lists, options, progress and
//! interrupt.

use std::time::Duration;

use serde_json::{Value, json};
use stable_diffusion::image::{DynamicImage, GrayImage, Luma};

use super::{TestServer, b64, config, decode_png, keys, picture, png};

fn info(v: &Value) -> Value {
    serde_json::from_str(v["info"].as_str().expect("info is a JSON string")).unwrap()
}

#[test]
fn txt2img_shape_info_and_lora_tags() {
    let s = TestServer::shared();
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a cat <lora:tiny_unet_lora_kohya:0.7>", "negative_prompt": "ugly",
                "width": 32, "height": 32, "steps": 3, "cfg_scale": 6, "seed": 42,
                "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1,
                "override_settings": {"CLIP_stop_at_last_layers": 2}, "send_images": true,
                "save_images": false, "alwayson_scripts": {}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(keys(&v), ["images", "info", "parameters"]);
    assert_eq!(v["images"].as_array().unwrap().len(), 2);
    for i in v["images"].as_array().unwrap() {
        decode_png(i.as_str().unwrap(), 32, 32);
    }
    assert_eq!(
        v["parameters"]["prompt"],
        "a cat <lora:tiny_unet_lora_kohya:0.7>"
    );
    let info = info(&v);
    for key in [
        "prompt",
        "all_prompts",
        "negative_prompt",
        "all_negative_prompts",
        "seed",
        "all_seeds",
        "subseed",
        "all_subseeds",
        "width",
        "height",
        "sampler_name",
        "cfg_scale",
        "steps",
        "batch_size",
        "restore_faces",
        "sd_model_name",
        "denoising_strength",
        "infotexts",
        "job_timestamp",
        "clip_skip",
        "index_of_first_image",
        "styles",
        "version",
    ] {
        assert!(info.get(key).is_some(), "info has {key}");
    }
    assert_eq!(info["prompt"], "a cat ");
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["cfg_scale"], 6.0);
    assert_eq!(info["steps"], 3);
    assert_eq!(info["clip_skip"], 2);
    assert_eq!(info["sd_model_name"], "tiny");
    assert!(
        info["infotexts"][0]
            .as_str()
            .unwrap()
            .contains("Sampler: Euler a")
    );
    assert_eq!(info["job_timestamp"].as_str().unwrap().len(), 14);
}

#[test]
fn defaults_are_a1111s() {
    let s = TestServer::shared();
    // 512x512 and 50 steps by default: too slow for the tiny model's test, so only
    // the parameters echo and the scheduler list are checked against A1111's.
    let r = s.post_json("/sdapi/v1/txt2img", &json!({"prompt": "x", "width": 32, "height": 32, "steps": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(info(&r.json())["sampler_name"], "DPM++ 2M Karras");
    let v = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "width": 32, "height": 32, "steps": 2}),
        )
        .json();
    assert_eq!(
        info(&v)["sampler_name"],
        "Euler",
        "sampler_index defaults to Euler"
    );
    assert_eq!(info(&v)["cfg_scale"], 7.0);
}

#[test]
fn hires_fix_doubles_the_size() {
    let s = TestServer::shared();
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a house", "width": 32, "height": 32, "steps": 2, "enable_hr": true,
                "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.6}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    decode_png(v["images"][0].as_str().unwrap(), 64, 64);
    assert_eq!(info(&v)["denoising_strength"], 0.6);
}

#[test]
fn img2img_and_inpainting_only_masked() {
    let s = TestServer::shared();
    let init = b64(&png(DynamicImage::ImageRgb8(picture())));
    let r = s.post_json(
        "/sdapi/v1/img2img",
        &json!({"init_images": [init], "prompt": "a painting", "width": 32, "height": 32, "steps": 4,
                "denoising_strength": 0.5, "seed": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(keys(&v), ["images", "info", "parameters"]);
    assert_eq!(
        v["parameters"]["init_images"],
        Value::Null,
        "pictures are not echoed"
    );
    decode_png(v["images"][0].as_str().unwrap(), 32, 32);
    // A mask over the top-left 8x8 corner; "only masked" repaints a crop and pastes
    // it back: far from the mask the picture is the init image.
    let mask = GrayImage::from_fn(32, 32, |x, y| Luma([if x < 8 && y < 8 { 255 } else { 0 }]));
    for (full_res, fill) in [(true, 0), (false, 1)] {
        let r = s.post_json(
            "/sdapi/v1/img2img",
            &json!({"init_images": [init], "mask": b64(&png(DynamicImage::ImageLuma8(mask.clone()))),
                    "prompt": "a hole", "width": 32, "height": 32, "steps": 4, "denoising_strength": 0.9,
                    "mask_blur": 1, "inpainting_fill": fill, "inpaint_full_res": full_res,
                    "inpaint_full_res_padding": 4}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let out = decode_png(r.json()["images"][0].as_str().unwrap(), 32, 32).to_rgb8();
        assert_eq!(
            out.get_pixel(28, 28),
            picture().get_pixel(28, 28),
            "unmasked pixels kept"
        );
        assert_eq!(out.get_pixel(4, 28), picture().get_pixel(4, 28));
    }
}

#[test]
fn controlnet_units_in_the_extensions_shape() {
    let s = TestServer::shared();
    let control = b64(&png(DynamicImage::ImageRgb8(picture())));
    let unit = |model: &str, module: &str| {
        json!({"enabled": true, "module": module, "model": model, "weight": 0.8, "image": control,
               "guidance_start": 0.0, "guidance_end": 0.8, "control_mode": "Balanced",
               "threshold_a": 100, "threshold_b": 200, "processor_res": 512, "pixel_perfect": false})
    };
    let body = |u: Value| {
        json!({"prompt": "a bird", "width": 32, "height": 32, "steps": 2,
               "alwayson_scripts": {"controlnet": {"args": [u, {"enabled": false, "model": "None"}]}}})
    };
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &body(unit("tiny-cn [d14c016b]", "canny")),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    decode_png(r.json()["images"][0].as_str().unwrap(), 32, 32);
    let r = s.post_json("/sdapi/v1/txt2img", &body(unit("tiny-cn", "none")));
    assert_eq!(r.status, 200, "{}", r.body);
    // Depth Anything (the model's configured depth model) on the generation thread.
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &body(unit("tiny-cn", "depth_anything")),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &body(unit("control_v11p_sd15_canny", "canny")),
    );
    assert_eq!(r.status, 404);
    assert_eq!(keys(&r.json()), ["body", "detail", "error", "errors"]);
    assert!(r.json()["detail"].as_str().unwrap().contains("tiny-cn"));
    let r = s.post_json("/sdapi/v1/txt2img", &body(unit("tiny-cn", "openpose_full")));
    assert_eq!(r.status, 400);
}

#[test]
fn lists_in_a1111_shape() {
    let s = TestServer::shared();
    let models = s.get("/sdapi/v1/sd-models").json();
    assert_eq!(models.as_array().unwrap().len(), 2);
    assert_eq!(
        keys(&models[0]),
        [
            "config",
            "filename",
            "hash",
            "model_name",
            "sha256",
            "title"
        ]
    );
    assert_eq!(models[0]["title"], "tiny");
    let samplers = s.get("/sdapi/v1/samplers").json();
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    for n in [
        "Euler a",
        "Euler",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DDIM",
        "LMS",
    ] {
        assert!(names.contains(&n), "{n}");
    }
    assert_eq!(keys(&samplers[0]), ["aliases", "name", "options"]);
    let schedulers = s.get("/sdapi/v1/schedulers").json();
    assert_eq!(
        keys(&schedulers[0]),
        [
            "aliases",
            "default_rho",
            "label",
            "name",
            "need_inner_model"
        ]
    );
    assert!(
        schedulers
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["label"] == "Karras")
    );
    let loras = s.get("/sdapi/v1/loras").json();
    let names: Vec<&str> = loras
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"tiny_unet_lora_kohya"), "{names:?}");
    assert_eq!(keys(&loras[0]), ["alias", "metadata", "name", "path"]);
    assert!(
        !loras[0]["path"].as_str().unwrap().contains('/'),
        "no server paths shown"
    );
}

#[test]
fn options_switch_among_configured_models_only() {
    let s = TestServer::start(config());
    assert_eq!(
        s.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        "tiny"
    );
    let r = s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny-file [abcdef]", "some_ui_option": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        s.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        "tiny-file"
    );
    let r = s.post_json(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "width": 32, "height": 32, "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(info(&r.json())["sd_model_name"], "tiny-file");
    for bad in ["../tiny", "/etc/passwd", "v1-5-pruned.safetensors"] {
        let r = s.post_json("/sdapi/v1/options", &json!({"sd_model_checkpoint": bad}));
        assert_eq!(r.status, 404, "{bad}: {}", r.body);
    }
    assert_eq!(
        s.get("/sdapi/v1/options").json()["sd_model_checkpoint"],
        "tiny-file"
    );
}

#[test]
fn progress_shows_the_running_job_and_interrupt_stops_it() {
    let s = TestServer::start(config());
    let idle = s.get("/sdapi/v1/progress").json();
    assert_eq!(
        keys(&idle),
        [
            "current_image",
            "eta_relative",
            "progress",
            "state",
            "textinfo"
        ]
    );
    assert_eq!(idle["progress"], 0.0);
    assert_eq!(
        keys(&idle["state"]),
        [
            "interrupted",
            "job",
            "job_count",
            "job_no",
            "job_timestamp",
            "sampling_step",
            "sampling_steps",
            "skipped",
            "stopping_generation"
        ]
    );
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            s.post_json(
                "/sdapi/v1/txt2img",
                &json!({"prompt": "x", "width": 32, "height": 32, "steps": 150}),
            )
        });
        let mut seen = None;
        for _ in 0..400 {
            let p = s.get("/sdapi/v1/progress").json();
            if p["progress"].as_f64().unwrap() > 0.0 && p["current_image"].is_string() {
                seen = Some(p);
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let p = seen.expect("progress while running");
        assert!(p["progress"].as_f64().unwrap() < 1.0);
        assert!(p["eta_relative"].as_f64().unwrap() >= 0.0);
        assert_eq!(p["state"]["sampling_steps"], 150);
        assert_eq!(p["state"]["job_count"], 1);
        decode_preview(p["current_image"].as_str().unwrap());
        assert_eq!(s.post_json("/sdapi/v1/interrupt", &json!({})).status, 200);
        // As A1111: the interrupted request answers with the pictures of its latents so far.
        let reply = long.join().unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        let v = reply.json();
        decode_png(v["images"][0].as_str().unwrap(), 32, 32);
        assert_eq!(info(&v)["steps"], 150);
        let id = p["state"]["job"].as_str().unwrap();
        let job = s.get(&format!("/v1/jobs/{id}")).json();
        assert!(job["step"].as_u64().unwrap() < 150, "stopped early: {job}");
    });
}

fn decode_preview(text: &str) {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    let img = stable_diffusion::image::load_from_memory(&bytes).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (32, 32),
        "TAESD previews at full size"
    );
}

#[test]
fn a_client_that_goes_away_cancels_its_job() {
    let s = TestServer::start(config());
    let base = s.base.clone();
    let client = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(1500)))
            .build()
            .into();
        agent
            .post(format!("{base}/sdapi/v1/txt2img"))
            .send(
                json!({"prompt": "x", "width": 64, "height": 64, "steps": 150})
                    .to_string()
                    .as_bytes(),
            )
            .is_err()
    });
    // The running job's id, from A1111's progress.
    let mut id = String::new();
    for _ in 0..400 {
        let p = s.get("/sdapi/v1/progress?skip_current_image=true").json();
        if let Some(job) = p["state"]["job"].as_str().filter(|j| !j.is_empty()) {
            id = job.to_string();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!id.is_empty(), "the job ran");
    assert!(client.join().unwrap(), "the client gave up");
    let mut status = json!(null);
    for _ in 0..400 {
        status = s.get(&format!("/v1/jobs/{id}")).json();
        if status["status"] != "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(status["status"], "cancelled", "{status}");
    assert!(status["step"].as_u64().unwrap() < 150);
}
