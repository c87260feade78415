//! What a run trains and writes: the U-Net, whole or with LoRA factors, and, with
//! `lora.train_text_encoder` (diffusers' `--train_text_encoder`), LoRA factors on the
//! text encoder(s) too (`q_proj`, `k_proj`, `v_proj`, `out_proj`); or a ControlNet
//! next to the frozen U-Net.

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;
use sd_io::{ComponentOptions, DiffusersDir, LoraComponent, LoraFile, LoraFormat, LoraToSave};
use sd_models::lora::{
    LoraConfig, LoraTargets, attach_trainable_lora, extract_lora, load_lora_factors,
};
use sd_models::{
    ClipTextModel, ControlNetConfig, ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel,
};

use crate::controlnet::ControlNetTrainConfig;

use crate::error::TrainError;
use crate::optim::stable_param_ids;
use crate::trainer::LoraTrainConfig;

/// The models a run trains (one module for the optimizer, gradient clipping and EMA).
#[derive(Module, Debug)]
pub struct TrainedModels {
    /// The U-Net: trained whole, or frozen with trainable LoRA factors.
    pub unet: UNet2DConditionModel,
    /// The text encoders with trainable LoRA factors (`[text_encoder]`, SDXL:
    /// `[text_encoder, text_encoder_2]`); empty when they are not trained.
    pub text_encoders: Vec<ClipTextModel>,
    /// ControlNet training: the ControlNet (the U-Net is then frozen).
    pub controlnet: Option<ControlNetModel>,
}

/// The config of the ControlNet a run trains: `init`'s, or a copy of the U-Net's
/// encoder (`ControlNetModel::from_unet`) with the given control-image channels.
///
/// # Errors
/// An `init` whose config cannot be read.
pub fn controlnet_config(
    c: &ControlNetTrainConfig,
    unet_config: &UNet2DConditionConfig,
) -> Result<ControlNetConfig, TrainError> {
    Ok(match &c.init {
        Some(p) if p.is_dir() => sd_io::controlnet::read_controlnet_config(&p.join("config.json"))?,
        Some(p) => sd_io::controlnet::controlnet_config_from_file(p)?,
        None => {
            let mut config = ControlNetConfig {
                unet: unet_config.clone(),
                conditioning_embedding_out_channels: c.conditioning_embedding_out_channels.clone(),
                ..ControlNetConfig::default()
            };
            config.mirror_up_blocks();
            config
        }
    })
}

/// The LoRA components of the text encoders, in [`TrainedModels::text_encoders`] order.
const TEXT_ENCODER_COMPONENTS: [(LoraComponent, &str); 2] = [
    (LoraComponent::TextEncoder, "text_encoder"),
    (LoraComponent::TextEncoder2, "text_encoder_2"),
];

fn lora_config(l: &LoraTrainConfig, targets: LoraTargets) -> LoraConfig {
    LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        targets,
    }
}

/// Attaches trainable factors to `model` and, from a saved file, sets them.
fn with_lora<M: Module>(
    model: M,
    config: &LoraConfig,
    saved: Option<(&LoraFile, LoraComponent)>,
) -> Result<M, TrainError> {
    let model = attach_trainable_lora(model, config)?;
    Ok(match saved {
        Some((file, component)) => {
            let weights = file.weights_for(component, &model)?;
            load_lora_factors(model, &weights)?
        }
        None => model,
    })
}

impl TrainedModels {
    /// The models to train from the base folder `model`, on `device` (an autodiff
    /// device to train), parameter ids stable across runs. `weights` resumes: a
    /// checkpoint's `unet/` folder (full fine-tuning) or LoRA file.
    ///
    /// # Errors
    /// Missing or mismatched weights; a LoRA file without the components trained.
    pub fn load(
        model: &Path,
        lora: Option<&LoraTrainConfig>,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let options = ComponentOptions::default();
        let dir = DiffusersDir::open(model)?;
        let Some(l) = lora else {
            let unet = match weights {
                Some(w) => sd_io::model::unet_from_dir(w, device, &options)?,
                None => dir.unet(device, &options)?,
            };
            return Ok(stable_param_ids(Self {
                unet,
                text_encoders: Vec::new(),
                controlnet: None,
            }));
        };
        let file = weights.map(LoraFile::open).transpose()?;
        let saved = |c| file.as_ref().map(|f| (f, c));
        let unet = with_lora(
            dir.unet(device, &options)?,
            &lora_config(l, LoraTargets::unet_attention()),
            saved(LoraComponent::Unet),
        )?;
        let mut text_encoders = Vec::new();
        if l.train_text_encoder {
            let te = lora_config(l, LoraTargets::text_encoder_attention());
            for (component, name) in TEXT_ENCODER_COMPONENTS {
                if !dir.has(name) {
                    continue;
                }
                let encoder = match component {
                    LoraComponent::TextEncoder2 => dir.text_encoder_2(device, &options)?,
                    _ => dir.text_encoder(device, &options)?,
                };
                text_encoders.push(with_lora(encoder, &te, saved(component))?);
            }
        }
        Ok(stable_param_ids(Self {
            unet,
            text_encoders,
            controlnet: None,
        }))
    }

    /// ControlNet training: the base folder's U-Net, frozen, and the ControlNet to
    /// train (from `weights`, a checkpoint's folder, to resume; else `c.init`; else a
    /// copy of the U-Net's encoder with zero convolutions), on `device`.
    ///
    /// # Errors
    /// Missing or mismatched weights; a U-Net a ControlNet cannot copy.
    pub fn load_controlnet(
        model: &Path,
        c: &ControlNetTrainConfig,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let options = ComponentOptions::default();
        let dir = DiffusersDir::open(model)?;
        let unet = dir.unet(device, &options)?.no_grad();
        let controlnet = match (weights, &c.init) {
            (Some(w), _) => sd_io::controlnet::controlnet_from_dir(w, device, &options)?,
            (None, Some(init)) => {
                sd_io::controlnet::controlnet_from_path(init, None, device, &options)?
            }
            (None, None) => ControlNetModel::from_unet(
                &unet,
                &dir.unet_config()?,
                &c.conditioning_embedding_out_channels,
                device,
            )
            .map_err(|e| TrainError::Config(e.to_string()))?,
        };
        Ok(stable_param_ids(Self {
            unet,
            text_encoders: Vec::new(),
            controlnet: Some(controlnet),
        }))
    }

    /// Writes the weights as `dir/{name}`: the ControlNet folder (with its config),
    /// the U-Net folder (full fine-tuning), or the LoRA layers of every trained model in the diffusers layout (and
    /// `dir/lora_kohya.safetensors` with `kohya_too`).
    ///
    /// # Errors
    /// Files that cannot be written.
    pub fn save(
        &self,
        unet_config: &UNet2DConditionConfig,
        lora: Option<&LoraTrainConfig>,
        controlnet_config: Option<&ControlNetConfig>,
        dir: &Path,
        name: &str,
        kohya_too: bool,
    ) -> Result<(), TrainError> {
        if let (Some(cn), Some(config)) = (&self.controlnet, controlnet_config) {
            sd_io::save_controlnet(cn, config, dir.join(name), DType::F32)?;
            return Ok(());
        }
        let Some(l) = lora else {
            sd_io::save_unet(&self.unet, unet_config, dir.join(name), DType::F32)?;
            return Ok(());
        };
        let unet_weights = extract_lora(&self.unet, &lora_config(l, LoraTargets::unet_attention()));
        let te = lora_config(l, LoraTargets::text_encoder_attention());
        let te_weights: Vec<_> = self
            .text_encoders
            .iter()
            .map(|m| extract_lora(m, &te))
            .collect();
        let mut parts = vec![LoraToSave::new(
            LoraComponent::Unet,
            &unet_weights,
            &self.unet,
        )];
        for ((model, weights), (component, _)) in self
            .text_encoders
            .iter()
            .zip(&te_weights)
            .zip(TEXT_ENCODER_COMPONENTS)
        {
            parts.push(LoraToSave::new(component, weights, model));
        }
        sd_io::save_lora(dir.join(name), &parts, LoraFormat::Diffusers, DType::F32)?;
        if kohya_too {
            sd_io::save_lora(
                dir.join("lora_kohya.safetensors"),
                &parts,
                LoraFormat::Kohya,
                DType::F32,
            )?;
        }
        Ok(())
    }
}
