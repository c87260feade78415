//! Property-based fuzzing of the request parsers: any bytes, and JSON objects made
//! of the APIs' own field names with values of every type and range, give a job or
//! a 4xx, never a panic or a 5xx.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::auth::{Client, RateLimiter};
use crate::config::{ModelConfig, ServerConfig};
use crate::error::ApiError;
use crate::queue::JobQueue;
use crate::registry::ModelRegistry;
use crate::store::JobStore;

const TINY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny-sd15"
);
const LORAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/lora");

/// Shared state over the tiny model's configuration; nothing is loaded or queued.
fn shared() -> Arc<Shared> {
    let mut model = ModelConfig::new("tiny", TINY);
    model.lora_dir = Some(LORAS.into());
    model.controlnets.insert("cn".into(), "unused".into());
    let config = ServerConfig {
        models: vec![model],
        ..ServerConfig::default()
    };
    Arc::new(Shared {
        registry: ModelRegistry::new(config.models.clone(), burn::prelude::Device::flex(), 0),
        queue: JobQueue::new(4),
        store: JobStore::new(Duration::from_secs(60)),
        limiter: RateLimiter::default(),
        options: Mutex::new(super::a1111::default_options("tiny")),
        started: Instant::now(),
        cluster: None,
        signer: Default::default(),
        config,
    })
}

type Parser = fn(&Shared, &Client, &[u8]) -> Result<(), ApiError>;

fn parsers() -> [(&'static str, Parser); 4] {
    [
        ("openai", |s, c, b| {
            super::openai::generation_spec(s, c, b).map(drop)
        }),
        ("txt2img", |s, c, b| {
            super::a1111::txt2img_spec(s, c, b).map(drop)
        }),
        ("img2img", |s, c, b| {
            super::a1111::img2img_spec(s, c, b).map(drop)
        }),
        ("native", |s, c, b| {
            super::native::job_spec(s, c, b).map(drop)
        }),
    ]
}

fn check_all(shared: &Shared, body: &[u8]) -> Result<(), TestCaseError> {
    let client = Client("fuzz".into());
    for (name, parse) in parsers() {
        if let Err(e) = parse(shared, &client, body) {
            prop_assert!(
                e.status().is_client_error(),
                "{name}: {e:?} for {}",
                String::from_utf8_lossy(body)
            );
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "model",
    "n",
    "size",
    "response_format",
    "steps",
    "guidance",
    "seed",
    "scheduler",
    "loras",
    "clip_skip",
    "width",
    "height",
    "batch_size",
    "n_iter",
    "cfg_scale",
    "sampler_name",
    "sampler_index",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "denoising_strength",
    "init_images",
    "mask",
    "mask_blur",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "resize_mode",
    "override_settings",
    "alwayson_scripts",
    "styles",
    "init_image",
    "strength",
    "hires",
    "controlnets",
    "timeout_secs",
    "restore_faces",
];

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(7),
            Just(8),
            Just(32),
            Just(10_000),
            Just(100_000)
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("".to_string()),
            Just("../../etc/passwd".to_string()),
            Just("32x32".to_string()),
            Just("0x0".to_string()),
            Just("Euler a".to_string()),
            Just("tiny".to_string()),
            Just("tiny_unet_lora_kohya".to_string()),
            Just("data:image/png;base64,AAAA".to_string()),
            Just("<lora:tiny_unet_lora_kohya:0.5> a cat".to_string()),
            "\\PC{0,40}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..4).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), value()), 0..8).prop_map(|kv| {
        let mut m: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // Keep the prompt often valid, so the checks past it are reached.
        m.entry("prompt").or_insert_with(|| json!("a red fox"));
        Value::Object(m)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_give_a_job_or_a_4xx(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_all(&shared(), &body)?;
    }

    #[test]
    fn any_field_values_give_a_job_or_a_4xx(body in object()) {
        check_all(&shared(), body.to_string().as_bytes())?;
    }
}

#[test]
fn valid_minimal_bodies_parse() {
    let s = shared();
    let c = Client("t".into());
    super::openai::generation_spec(
        &s,
        &c,
        br#"{"prompt":"a cat","size":"32x32","loras":[{"name":"tiny_unet_lora_kohya"}]}"#,
    )
    .unwrap();
    let (spec, _) = super::a1111::txt2img_spec(
        &s,
        &c,
        br#"{"prompt":"a cat <lora:tiny_unet_lora_kohya:0.5>","width":32,"height":32}"#,
    )
    .unwrap();
    assert_eq!(spec.loras, vec![("tiny_unet_lora_kohya".to_string(), 0.5)]);
    assert_eq!(spec.prompt, "a cat ");
    assert_eq!(
        (spec.steps, spec.guidance, spec.scheduler.as_deref()),
        (50, 7.0, Some("euler"))
    );
    super::native::job_spec(
        &s,
        &c,
        br#"{"prompt":"a cat","width":32,"height":32,"steps":3}"#,
    )
    .unwrap();
    // Depth Anything as a preprocessor needs the model's depth model.
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(8, 8)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let unit =
        json!({"module": "depth_anything", "model": "cn", "image": super::b64(&png.into_inner())});
    let depth = json!({"prompt": "x", "width": 32, "height": 32,
        "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    .to_string();
    let e = super::a1111::txt2img_spec(&s, &c, depth.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("depth_model"), "{e}");
    let e = super::native::job_spec(&s, &c, br#"{"prompt":"a cat","loras":[{"name":"../x"}]}"#)
        .unwrap_err();
    assert!(
        matches!(e, ApiError::NotFound { what: "lora", .. }),
        "{e:?}"
    );
}
