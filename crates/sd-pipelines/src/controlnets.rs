//! The owning pipeline's ControlNets and T2I-Adapters: loading them once, and
//! turning a request's [`ControlInput`]s and [`AdapterInput`]s into the units of
//! its run.

use std::path::PathBuf;

use sd_core::{Adapter, ControlNet};
use sd_io::image::{control_image_to_tensor, read_image};
use sd_models::ControlNetModel;

use crate::control::{AdapterUnit, ControlNetUnit};
use crate::error::PipelineError;
use crate::hub::HubOptions;
use crate::load::ModelSource;
use crate::pipeline::{StableDiffusionPipeline, Task};
use crate::request::{AdapterInput, ControlInput, GenerationRequest, ImageInput};

impl StableDiffusionPipeline {
    /// Loads a ControlNet for later requests: a diffusers folder (its fp16 weights
    /// where it has no others) or a `.safetensors` file, in the diffusers
    /// or the original (`control_model.*`) layout, or a hub repository id
    /// (`lllyasviel/control_v11p_sd15_canny`, with the `hub` feature; the
    /// environment's hub settings). Returns its index for [`ControlInput::new`].
    ///
    /// # Errors
    /// An unreadable source, weights that do not fit, a ControlNet made for another
    /// model (its text width, latent factor or blocks differ from this U-Net's).
    pub fn load_controlnet(
        &mut self,
        source: impl Into<ModelSource>,
    ) -> Result<usize, PipelineError> {
        self.load_controlnet_with(source, &HubOptions::default())
    }

    /// [`Self::load_controlnet`] fetching hub repositories (`owner/name`, with the
    /// `hub` feature) as `hub` says.
    ///
    /// # Errors
    /// As [`Self::load_controlnet`]; a repository that cannot be fetched.
    pub fn load_controlnet_with(
        &mut self,
        source: impl Into<ModelSource>,
        hub: &HubOptions,
    ) -> Result<usize, PipelineError> {
        let (path, name) = resolve_component(source.into(), hub)?;
        let options = self.component_options();
        let model = sd_io::controlnet::controlnet_from_path(&path, None, &self.device, &options)?;
        self.add_controlnet(name, model)
    }

    /// Control models load in the U-Net's dtype.
    fn component_options(&self) -> sd_io::ComponentOptions {
        sd_io::ComponentOptions {
            dtype: Some(self.unet.conv_in.weight.dtype()),
            variant: None,
        }
    }

    /// Adds a ControlNet built by the caller; see [`Self::load_controlnet`].
    ///
    /// # Errors
    /// A ControlNet made for another model.
    pub fn add_controlnet(
        &mut self,
        name: impl Into<String>,
        model: ControlNetModel,
    ) -> Result<usize, PipelineError> {
        let name = name.into();
        let mismatch = |what: String| {
            PipelineError::request("controlnet", format!("ControlNet `{name}` {what}"))
        };
        let d = sd_core::Denoiser::cross_attention_dim(&self.unet);
        if model.cross_attention_dim() != d {
            return Err(mismatch(format!(
                "cross-attends to width {}, this U-Net to {d}",
                model.cross_attention_dim()
            )));
        }
        let f = sd_core::Autoencoder::downscale_factor(&self.vae);
        if model.downscale_factor() != f {
            return Err(mismatch(format!(
                "takes control images {}x the latents, this VAE's factor is {f}",
                model.downscale_factor()
            )));
        }
        if model.skip_channels() != self.unet.skip_channels() {
            return Err(mismatch(format!(
                "has residual widths {:?}, this U-Net's skip connections {:?}",
                model.skip_channels(),
                self.unet.skip_channels()
            )));
        }
        if model.add_embedding.is_some() != self.unet.add_embedding.is_some() {
            return Err(mismatch(
                "and this U-Net differ in SDXL's text_time conditioning".into(),
            ));
        }
        self.controlnets.push((name, model));
        Ok(self.controlnets.len() - 1)
    }

    /// The loaded ControlNets' names, in index order.
    pub fn controlnet_names(&self) -> impl Iterator<Item = &str> {
        self.controlnets.iter().map(|(n, _)| n.as_str())
    }

    /// Reads the control images of a request (files become images) and, for a text
    /// to image request without a size, takes the first one's size rounded down to
    /// a multiple of 8, as diffusers does.
    pub(crate) fn read_control_images(
        &self,
        r: &mut GenerationRequest<'_>,
    ) -> Result<Vec<ControlInput>, PipelineError> {
        let mut inputs = std::mem::take(&mut r.control);
        for input in &mut inputs {
            if input.controlnet >= self.controlnets.len() {
                return Err(PipelineError::request(
                    "control",
                    format!(
                        "ControlNet {} is not loaded ({} loaded)",
                        input.controlnet,
                        self.controlnets.len()
                    ),
                ));
            }
            if let ImageInput::Path(p) = &input.image {
                input.image = ImageInput::Image(read_image(p)?);
            }
        }
        if !inputs.is_empty() && (r.hires.is_some() || r.outpaint.is_some()) {
            return Err(PipelineError::request(
                "control",
                "ControlNet with the hires fix or outpainting is not supported",
            ));
        }
        let size = inputs.first().and_then(|i| match &i.image {
            ImageInput::Image(im) => Some((im.width() as usize, im.height() as usize)),
            ImageInput::Tensor(t) => Some((t.dims()[3], t.dims()[2])),
            ImageInput::Path(_) => None,
        });
        if let Some((w, h)) = size
            && r.width.is_none()
            && r.height.is_none()
            && r.init_image.is_none()
        {
            r.width = Some(w / 8 * 8);
            r.height = Some(h / 8 * 8);
        }
        Ok(inputs)
    }

    /// The units of a run: each input's ControlNet with its image at the picture's
    /// size and the task's default scale where the input sets none.
    pub(crate) fn control_units(
        &self,
        inputs: Vec<ControlInput>,
        task: &Task,
        r: &GenerationRequest<'_>,
    ) -> Result<Vec<ControlNetUnit<'_>>, PipelineError> {
        let options = self.options(r);
        let (width, height, default_scale) = match task {
            Task::Img2Img(image, _) => (image.dims()[3], image.dims()[2], 0.8),
            Task::Inpaint(image, _, _) => (image.dims()[3], image.dims()[2], 0.5),
            _ => (options.width, options.height, 1.0),
        };
        inputs
            .into_iter()
            .map(|input| {
                let model = &self.controlnets[input.controlnet].1;
                let image = match input.image {
                    ImageInput::Tensor(t) => t,
                    ImageInput::Image(im) => {
                        control_image_to_tensor(&im, width, height, &self.device)
                    }
                    ImageInput::Path(p) => {
                        control_image_to_tensor(&read_image(&p)?, width, height, &self.device)
                    }
                };
                Ok(ControlNetUnit {
                    model: model as &dyn ControlNet,
                    image,
                    conditioning_scale: input.scale.unwrap_or(default_scale),
                    guidance_start: input.start,
                    guidance_end: input.end,
                    guess_mode: r.guess_mode,
                })
            })
            .collect()
    }

    /// Loads a T2I-Adapter (a diffusers folder, e.g. a download of
    /// `TencentARC/t2iadapter_canny_sd15v2`, a single `.safetensors` file in the
    /// diffusers or the original TencentARC layout, or the hub repository id with the
    /// `hub` feature) for later requests; returns its index for [`AdapterInput::new`].
    ///
    /// # Errors
    /// An unreadable folder or file, weights that do not fit.
    pub fn load_adapter(&mut self, source: impl Into<ModelSource>) -> Result<usize, PipelineError> {
        self.load_adapter_with(source, &HubOptions::default())
    }

    /// [`Self::load_adapter`] fetching hub repositories (`owner/name`, with the `hub`
    /// feature) as `hub` says.
    ///
    /// # Errors
    /// As [`Self::load_adapter`]; a repository that cannot be fetched.
    pub fn load_adapter_with(
        &mut self,
        source: impl Into<ModelSource>,
        hub: &HubOptions,
    ) -> Result<usize, PipelineError> {
        let (path, name) = resolve_component(source.into(), hub)?;
        let options = self.component_options();
        let model = sd_io::t2i_adapter::t2i_adapter_from_path(&path, None, &self.device, &options)?;
        self.adapters.push((name, model));
        Ok(self.adapters.len() - 1)
    }

    /// The loaded T2I-Adapters' names, in index order.
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.adapters.iter().map(|(n, _)| n.as_str())
    }

    /// Reads a request's adapter images (files become images) and checks the
    /// indices.
    pub(crate) fn read_adapter_images(
        &self,
        r: &mut GenerationRequest<'_>,
    ) -> Result<Vec<AdapterInput>, PipelineError> {
        let mut inputs = std::mem::take(&mut r.adapters);
        for input in &mut inputs {
            if input.adapter >= self.adapters.len() {
                return Err(PipelineError::request(
                    "adapter",
                    format!(
                        "T2I-Adapter {} is not loaded ({} loaded)",
                        input.adapter,
                        self.adapters.len()
                    ),
                ));
            }
            if let ImageInput::Path(p) = &input.image {
                input.image = ImageInput::Image(read_image(p)?);
            }
        }
        if !inputs.is_empty() && (r.hires.is_some() || r.outpaint.is_some()) {
            return Err(PipelineError::request(
                "adapter",
                "T2I-Adapters with the hires fix or outpainting are not supported",
            ));
        }
        Ok(inputs)
    }

    /// The adapter units of a run: each image at the picture's size (grey for a
    /// one-channel adapter), as diffusers' `_preprocess_adapter_image`.
    pub(crate) fn adapter_units(
        &self,
        inputs: Vec<AdapterInput>,
        task: &Task,
        r: &GenerationRequest<'_>,
    ) -> Result<Vec<AdapterUnit<'_>>, PipelineError> {
        let options = self.options(r);
        let (width, height) = match task {
            Task::Img2Img(image, _) | Task::Inpaint(image, _, _) => {
                (image.dims()[3], image.dims()[2])
            }
            _ => (options.width, options.height),
        };
        inputs
            .into_iter()
            .map(|input| {
                let model = &self.adapters[input.adapter].1;
                let image = match input.image {
                    ImageInput::Tensor(t) => t,
                    ImageInput::Image(im) if model.in_channels() == 1 => {
                        let im = if (im.width() as usize, im.height() as usize) == (width, height) {
                            im
                        } else {
                            sd_io::image::lanczos(&im, width, height)
                        };
                        sd_io::image::mask_to_tensor(&im, &self.device)
                    }
                    ImageInput::Image(im) => {
                        control_image_to_tensor(&im, width, height, &self.device)
                    }
                    ImageInput::Path(p) => {
                        control_image_to_tensor(&read_image(&p)?, width, height, &self.device)
                    }
                };
                Ok(AdapterUnit {
                    model: model as &dyn Adapter,
                    image,
                    conditioning_scale: input.scale,
                    conditioning_factor: input.factor,
                })
            })
            .collect()
    }
}

/// A control model's local path and name: the path and its file stem, or the hub
/// repository fetched into the cache and its name.
fn resolve_component(
    source: ModelSource,
    hub: &HubOptions,
) -> Result<(PathBuf, String), PipelineError> {
    Ok(match source {
        ModelSource::Path(path) => {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (path, name)
        }
        ModelSource::Hub { repo, revision } => {
            let name = repo.rsplit('/').next().unwrap_or(&repo).to_string();
            (
                crate::hub::download_component(&repo, revision.as_deref(), hub, None)?,
                name,
            )
        }
    })
}
