#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod ada_norm;
pub mod attention;
pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod controlnet;
pub mod depth_anything;
pub mod dinov2;
pub mod embeddings;
pub mod error;
pub mod joint_transformer_block;
pub mod lora;
pub mod norm;
pub mod parameters;
pub mod resnet;
pub mod safety_checker;
pub mod t2i_adapter;
pub mod t5;
pub mod transformer_2d;
pub mod transformer_sd3;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
mod unet_encoder;
pub mod vae_tiling;

pub use autoencoder_kl::AutoencoderKL;
pub use autoencoder_tiny::AutoencoderTiny;
pub use clip::ClipTextModel;
pub use config::{
    AutoencoderKLConfig, AutoencoderTinyConfig, ClipTextConfig, ControlNetConfig,
    DepthAnythingConfig, SD3Transformer2DConfig, SafetyCheckerConfig, T2IAdapterConfig, T5Config,
    UNet2DConditionConfig,
};
pub use controlnet::ControlNetModel;
pub use depth_anything::DepthAnythingForDepthEstimation;
pub use error::ConfigError;
pub use parameters::parameter_bytes;
pub use safety_checker::{SafetyCheck, StableDiffusionSafetyChecker};
pub use t2i_adapter::T2IAdapter;
pub use t5::T5EncoderModel;
pub use transformer_sd3::SD3Transformer2DModel;
pub use unet_2d_condition::UNet2DConditionModel;
pub use vae_tiling::VaeTiling;

/// Maps a burn module path of the models in this crate (`a.b.c.weight`) to the
/// diffusers / transformers weight key.
///
/// Only three names differ: `to_out` is `to_out.0` (diffusers keeps a dropout at
/// `to_out.1`), and the feed-forward's `net_0` / `net_2` are `net.0` / `net.2`. burn
/// also names the variant of an enum module (`layers.2.Block.conv.0.weight`, see
/// [`autoencoder_tiny::TinyLayer`]); those segments, capitalised, are dropped.
pub fn diffusers_key(path: &str) -> String {
    let mut out = Vec::new();
    for seg in path.split('.') {
        match seg {
            s if s.starts_with(|c: char| c.is_ascii_uppercase()) => {}
            "to_out" => {
                out.push("to_out");
                out.push("0");
            }
            "net_0" => {
                out.push("net");
                out.push("0");
            }
            "net_2" => {
                out.push("net");
                out.push("2");
            }
            s => out.push(s),
        }
    }
    out.join(".")
}

#[cfg(test)]
mod tests {
    use super::diffusers_key;

    #[test]
    fn keys_map_to_diffusers_names() {
        assert_eq!(
            diffusers_key("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.weight"),
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"
        );
        assert_eq!(
            diffusers_key("mid_block.attentions.0.transformer_blocks.0.ff.net_0.proj.bias"),
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias"
        );
        assert_eq!(diffusers_key("conv_in.weight"), "conv_in.weight");
        assert_eq!(
            diffusers_key("decoder.layers.2.Block.conv.4.Conv.weight"),
            "decoder.layers.2.conv.4.weight"
        );
    }
}
