//! The real SD 1.5 and SD 2.1 configs build models with diffusers' exact parameter
//! counts, and unsupported config values are rejected naming the field.

use crate::common;

use common::fixture;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::DiffusersDir;
use stable_diffusion::models::{
    AutoencoderKL, ClipTextModel, ConfigError, UNet2DConditionConfig, UNet2DConditionModel,
};

fn check_counts(name: &str) {
    let dir = DiffusersDir::open(fixture(&format!("configs/{name}"))).unwrap();
    let text =
        std::fs::read_to_string(fixture(&format!("configs/{name}/param_counts.json"))).unwrap();
    let counts: serde_json::Value = serde_json::from_str(&text).unwrap();
    let device = Device::flex();
    // Parameters are initialised lazily: counting does not allocate ~1 B floats.
    let unet = UNet2DConditionModel::new(&dir.unet_config().unwrap(), &device).unwrap();
    assert_eq!(
        unet.num_params() as u64,
        counts["unet"].as_u64().unwrap(),
        "{name} unet"
    );
    let vae = AutoencoderKL::new(&dir.vae_config().unwrap(), &device).unwrap();
    assert_eq!(
        vae.num_params() as u64,
        counts["vae"].as_u64().unwrap(),
        "{name} vae"
    );
    let te = ClipTextModel::new(&dir.text_encoder_config().unwrap(), &device).unwrap();
    assert_eq!(
        te.num_params() as u64,
        counts["text_encoder"].as_u64().unwrap(),
        "{name} text encoder"
    );
}

#[test]
fn sd15_configs_give_diffusers_parameter_counts() {
    check_counts("sd15");
}

#[test]
fn sd21_configs_give_diffusers_parameter_counts() {
    check_counts("sd21");
}

/// The built-in SDXL refiner 1.0 U-Net config (taken when a refiner single file is
/// opened without configs) builds diffusers' parameter count for it: 2,259,526,660
/// (`UNet2DConditionModel.from_config` on the meta device, diffusers 0.42.1).
#[test]
fn builtin_sdxl_refiner_unet_gives_diffusers_parameter_count() {
    let config = UNet2DConditionConfig::from_json(
        stable_diffusion::io::model::builtin_configs::SDXL_REFINER_UNET,
    )
    .unwrap();
    let unet = UNet2DConditionModel::new(&config, &Device::flex()).unwrap();
    assert_eq!(unet.num_params(), 2_259_526_660);
}

#[test]
fn tiny_model_parameter_counts() {
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let device = Device::flex();
    let unet = UNet2DConditionModel::new(&dir.unet_config().unwrap(), &device).unwrap();
    assert_eq!(unet.num_params(), 1_388_548);
    let vae = AutoencoderKL::new(&dir.vae_config().unwrap(), &device).unwrap();
    assert_eq!(vae.num_params(), 843_847);
    let te = ClipTextModel::new(&dir.text_encoder_config().unwrap(), &device).unwrap();
    assert_eq!(te.num_params(), 1_617_529);
}

fn unet_error(patch: serde_json::Value) -> String {
    let text = std::fs::read_to_string(fixture("configs/sd15/unet/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        json[k] = v.clone();
    }
    UNet2DConditionConfig::from_json(&json.to_string())
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

#[test]
fn unsupported_unet_values_name_the_field() {
    let cases = [
        (
            serde_json::json!({"addition_embed_type": "text_time"}),
            "addition_embed_type",
        ),
        (
            serde_json::json!({"class_embed_type": "timestep"}),
            "class_embed_type",
        ),
        (
            serde_json::json!({"resnet_time_scale_shift": "scale_shift"}),
            "resnet_time_scale_shift",
        ),
        (
            serde_json::json!({"attention_head_dim": [8, 8]}),
            "attention_head_dim",
        ),
        (
            serde_json::json!({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}),
            "mid_block_type",
        ),
        (serde_json::json!({"norm_num_groups": 7}), "norm_num_groups"),
        (
            serde_json::json!({"only_cross_attention": true}),
            "only_cross_attention",
        ),
        (serde_json::json!({"act_fn": "gelu"}), "act_fn"),
    ];
    for (patch, field) in cases {
        let err = unet_error(patch.clone());
        assert!(err.contains(&format!("`{field}`")), "{patch}: {err}");
    }
    let err = unet_error(serde_json::json!({"down_block_types": ["SimpleCrossAttnDownBlock2D"]}));
    assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
}

#[test]
fn harmless_unknown_fields_are_accepted() {
    let text = std::fs::read_to_string(fixture("configs/sd21/unet/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["some_future_field"] = serde_json::json!(123);
    UNet2DConditionConfig::from_json(&json.to_string()).unwrap();
    let e: Result<_, ConfigError> = UNet2DConditionConfig::from_json("{not json");
    assert!(e.is_err());
}
