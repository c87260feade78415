//! [`DenoiserModel`]: the denoiser a pipeline owns, one variant per architecture
//! (the U-Net of SD 1.x / 2.x / XL, the MMDiT transformer of SD 3.x), with its
//! config.

use burn::tensor::DType;
use sd_core::Denoiser;
use sd_models::{
    SD3Transformer2DConfig, SD3Transformer2DModel, UNet2DConditionConfig, UNet2DConditionModel,
};

use crate::error::PipelineError;

/// The denoiser of a loaded model.
#[derive(Debug, Clone)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant, reason = "one value per pipeline")]
pub enum DenoiserModel {
    /// SD 1.x / 2.x / XL: `UNet2DConditionModel`.
    UNet {
        /// The U-Net.
        model: UNet2DConditionModel,
        /// Its config.
        config: UNet2DConditionConfig,
    },
    /// SD 3 / 3.5: `SD3Transformer2DModel`.
    Sd3 {
        /// The transformer.
        model: SD3Transformer2DModel,
        /// Its config.
        config: SD3Transformer2DConfig,
    },
}

impl DenoiserModel {
    /// The model behind the [`Denoiser`] contract.
    pub fn as_denoiser(&self) -> &dyn Denoiser {
        match self {
            Self::UNet { model, .. } => model,
            Self::Sd3 { model, .. } => model,
        }
    }

    /// The U-Net, for U-Net models.
    pub fn unet(&self) -> Option<&UNet2DConditionModel> {
        match self {
            Self::UNet { model, .. } => Some(model),
            _ => None,
        }
    }

    /// The U-Net's config, for U-Net models.
    pub fn unet_config(&self) -> Option<&UNet2DConditionConfig> {
        match self {
            Self::UNet { config, .. } => Some(config),
            _ => None,
        }
    }

    /// The SD 3 transformer, for SD 3 models.
    pub fn transformer(&self) -> Option<&SD3Transformer2DModel> {
        match self {
            Self::Sd3 { model, .. } => Some(model),
            _ => None,
        }
    }

    /// The U-Net and its config, or an error naming what asked for one (`what`:
    /// LoRA merging, ControlNets, adapters, the memory estimate).
    pub(crate) fn require_unet(
        &self,
        what: &str,
    ) -> Result<(&UNet2DConditionModel, &UNet2DConditionConfig), PipelineError> {
        match self {
            Self::UNet { model, config } => Ok((model, config)),
            Self::Sd3 { .. } => Err(PipelineError::request(
                "model",
                format!("{what} is not supported for SD 3 models yet (U-Net models only)"),
            )),
        }
    }

    /// The latent side the model was trained at (`sample_size`: 64 for SD 1.5, 128
    /// for SDXL and SD 3).
    pub fn sample_size(&self) -> usize {
        match self {
            Self::UNet { config, .. } => config.sample_size.unwrap_or(64),
            Self::Sd3 { config, .. } => config.sample_size,
        }
    }

    /// The dtype its weights are computed in.
    pub fn dtype(&self) -> DType {
        match self {
            Self::UNet { model, .. } => model.dtype(),
            Self::Sd3 { model, .. } => model.dtype(),
        }
    }
}
