//! SD 3 / SD 3.5 (issue 27): the real configs (`configs/sd3`, fixtures README 9) build
//! diffusers' parameter counts, and the components match diffusers on tiny random
//! models (`tests/fixtures/gen/ref_sd3.py`).

use crate::common;

use common::fixture;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, SD3Transformer2DConfig,
    SD3Transformer2DModel, T5Config, T5EncoderModel,
};

fn config_text(name: &str) -> String {
    std::fs::read_to_string(fixture(&format!("configs/sd3/{name}/config.json"))).unwrap()
}

fn count(name: &str) -> usize {
    let text =
        std::fs::read_to_string(fixture(&format!("configs/sd3/{name}/param_counts.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["total"].as_u64().unwrap() as usize
}

/// SD 3.5 Large, SD 3.5 Medium (MMDiT-X) and SD 3 Medium transformers, T5-v1.1-XXL,
/// the SD 3 VAE and CLIP-L / CLIP-G with projection: diffusers' counts (the
/// transformers' position table is a buffer, not counted; the T5 embedding counted
/// once).
#[test]
fn sd3_configs_give_diffusers_parameter_counts() {
    let device = Device::flex();
    for name in [
        "sd3.5-large-transformer",
        "sd3.5-medium-transformer",
        "sd3-medium-transformer",
    ] {
        let config = SD3Transformer2DConfig::from_json(&config_text(name)).unwrap();
        let model = SD3Transformer2DModel::new(&config, &device).unwrap();
        assert_eq!(model.num_params(), count(name), "{name}");
    }
    let t5 = T5Config::from_json(&config_text("t5-v1_1-xxl-encoder")).unwrap();
    let t5 = T5EncoderModel::new(&t5, &device).unwrap();
    assert_eq!(t5.num_params(), count("t5-v1_1-xxl-encoder"), "T5-XXL");
    let vae = AutoencoderKLConfig::from_json(&config_text("sd3-vae")).unwrap();
    assert_eq!(vae.shift_factor, Some(0.0609));
    let vae = AutoencoderKL::new(&vae, &device).unwrap();
    assert_eq!(vae.num_params(), count("sd3-vae"), "SD 3 VAE");
    for name in ["clip-l-text-encoder", "clip-g-text-encoder"] {
        let mut config = ClipTextConfig::from_json(&config_text(name)).unwrap();
        // SD 3 folders name the class in model_index.json.
        config.architectures = vec!["CLIPTextModelWithProjection".into()];
        let model = ClipTextModel::new(&config, &device).unwrap();
        assert_eq!(model.num_params(), count(name), "{name}");
    }
}

/// Config values the SD 3 classes cannot honour are refused by field.
#[test]
fn sd3_config_errors_name_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&config_text("sd3.5-medium-transformer")).unwrap();
    for (field, value) in [
        ("qk_norm", serde_json::json!("layer_norm")),
        ("dual_attention_layers", serde_json::json!([24])),
        ("caption_projection_dim", serde_json::json!(1000)),
        ("patch_size", serde_json::json!(0)),
    ] {
        let mut json = base.clone();
        json[field] = value;
        let err = SD3Transformer2DConfig::from_json(&json.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let mut t5: serde_json::Value =
        serde_json::from_str(&config_text("t5-v1_1-xxl-encoder")).unwrap();
    t5["feed_forward_proj"] = serde_json::json!("gated-tanh");
    let err = T5Config::from_json(&t5.to_string()).unwrap_err().to_string();
    assert!(err.contains("feed_forward_proj"), "{err}");
}
