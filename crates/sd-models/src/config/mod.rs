//! diffusers / transformers `config.json` structs.
//!
//! Each struct accepts every field the real SD 1.x / 2.x configs carry (unknown extra
//! fields are ignored, as diffusers does) and `validate` rejects the values this crate
//! cannot honour with an error naming the field.

mod clip;
mod controlnet;
mod depth_anything;
mod one_or_many;
mod safety_checker;
mod sd3_transformer;
mod t2i_adapter;
mod t5;
mod unet;
mod vae;
mod vae_tiny;

pub use clip::{ClipActivation, ClipTextConfig};
pub use controlnet::ControlNetConfig;
pub use depth_anything::{
    DepthAnythingConfig, DepthEstimationType, Dinov2Config, ReassembleResize, reassemble_resize,
};
pub use one_or_many::OneOrMany;
pub use safety_checker::{ClipVisionConfig, SafetyCheckerConfig};
pub use sd3_transformer::SD3Transformer2DConfig;
pub use t2i_adapter::{AdapterType, T2IAdapterConfig};
pub use t5::{T5Activation, T5Config};
pub use unet::{DownBlockType, ResolvedUNetBlocks, UNet2DConditionConfig, UpBlockType};
pub use vae::AutoencoderKLConfig;
pub use vae_tiny::AutoencoderTinyConfig;
