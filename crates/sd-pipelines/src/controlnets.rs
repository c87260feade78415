//! The owning pipeline's ControlNets and T2I-Adapters: loading them once, and
//! turning a request's [`ControlInput`]s and [`AdapterInput`]s into the units of
//! its run.

use std::path::PathBuf;

use burn::prelude::*;
use sd_core::{Adapter, ControlNet};
use sd_io::image::{control_image_to_tensor, read_image};
use sd_models::ControlNetModel;

use crate::control::{AdapterUnit, ControlNetUnit};
use crate::error::PipelineError;
use crate::hub::HubOptions;
use crate::load::ModelSource;
use crate::pipeline::StableDiffusionPipeline;
use crate::plan::RunPlan;
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
        let read = |p: &_, d: &_, o: &_| sd_io::controlnet::controlnet_from_path(p, None, d, o);
        let (name, model) = self.read_control_model(source.into(), hub, read)?;
        self.add_controlnet(name, model)
    }

    /// A control model (ControlNet or adapter) from a path or the hub, in the
    /// U-Net's dtype, and its name (the file stem, or the repository's name).
    fn read_control_model<M>(
        &self,
        source: ModelSource,
        hub: &HubOptions,
        read: impl FnOnce(
            &std::path::Path,
            &Device,
            &sd_io::ComponentOptions,
        ) -> Result<M, sd_io::IoError>,
    ) -> Result<(String, M), PipelineError> {
        let (path, name) = resolve_component(source, hub)?;
        let options = sd_io::ComponentOptions {
            dtype: Some(self.denoiser.dtype()),
            ..Default::default()
        };
        Ok((name, read(&path, &self.device, &options)?))
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
        let (unet, _) = self.denoiser.require_unet("ControlNet")?;
        let d = sd_core::Denoiser::cross_attention_dim(unet);
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
        if model.skip_channels() != unet.skip_channels() {
            return Err(mismatch(format!(
                "has residual widths {:?}, this U-Net's skip connections {:?}",
                model.skip_channels(),
                unet.skip_channels()
            )));
        }
        if model.add_embedding.is_some() != unet.add_embedding.is_some() {
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
        let loaded = self.controlnets.len();
        let images = inputs.iter_mut().map(|i| (i.controlnet, &mut i.image));
        read_inputs(images, loaded, ("control", "ControlNet"), r)?;
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
        plan: &RunPlan,
        guess_mode: bool,
    ) -> Result<Vec<ControlNetUnit<'_>>, PipelineError> {
        let size = plan.size;
        let default_scale = plan.task.default_control_scale();
        inputs
            .into_iter()
            .map(|input| {
                let model = &self.controlnets[input.controlnet].1;
                let image = self.control_tensor(input.image, size, false)?;
                Ok(ControlNetUnit {
                    model: model as &dyn ControlNet,
                    image,
                    conditioning_scale: input.scale.unwrap_or(default_scale),
                    guidance_start: input.start,
                    guidance_end: input.end,
                    guess_mode,
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
        let read = |p: &_, d: &_, o: &_| sd_io::t2i_adapter::t2i_adapter_from_path(p, None, d, o);
        let (name, model) = self.read_control_model(source.into(), hub, read)?;
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
        let loaded = self.adapters.len();
        let images = inputs.iter_mut().map(|i| (i.adapter, &mut i.image));
        read_inputs(images, loaded, ("adapter", "T2I-Adapter"), r)?;
        Ok(inputs)
    }

    /// The adapter units of a run: each image at the picture's size (grey for a
    /// one-channel adapter), as diffusers' `_preprocess_adapter_image`.
    pub(crate) fn adapter_units(
        &self,
        inputs: Vec<AdapterInput>,
        plan: &RunPlan,
    ) -> Result<Vec<AdapterUnit<'_>>, PipelineError> {
        let size = plan.size;
        inputs
            .into_iter()
            .map(|input| {
                let model = &self.adapters[input.adapter].1;
                let image = self.control_tensor(input.image, size, model.in_channels() == 1)?;
                Ok(AdapterUnit {
                    model: model as &dyn Adapter,
                    image,
                    conditioning_scale: input.scale,
                    conditioning_factor: input.factor,
                })
            })
            .collect()
    }

    /// A control image as a tensor `[1, c, H, W]` in `[0, 1]` at `(width, height)`
    /// (tensors as they are): RGB as diffusers' control image processor, or with
    /// `grey` one channel (a one-channel adapter).
    fn control_tensor(
        &self,
        image: ImageInput,
        (width, height): (usize, usize),
        grey: bool,
    ) -> Result<Tensor<4>, PipelineError> {
        let image = match image {
            ImageInput::Tensor(t) => return Ok(t),
            ImageInput::Image(im) => im,
            ImageInput::Path(p) => read_image(&p)?,
        };
        Ok(if grey {
            let fits = (image.width() as usize, image.height() as usize) == (width, height);
            let image = if fits {
                image
            } else {
                sd_io::image::lanczos(&image, width, height)
            };
            sd_io::image::mask_to_tensor(&image, &self.device)
        } else {
            control_image_to_tensor(&image, width, height, &self.device)
        })
    }
}

/// Checks a request's control inputs of one kind (`(parameter, model kind)`): each
/// names a loaded model (`loaded` of them), files are read into images, and the
/// hires fix and outpainting, which take none, are refused.
fn read_inputs<'i>(
    inputs: impl Iterator<Item = (usize, &'i mut ImageInput)>,
    loaded: usize,
    (param, kind): (&'static str, &str),
    r: &GenerationRequest<'_>,
) -> Result<(), PipelineError> {
    let mut any = false;
    for (index, image) in inputs {
        any = true;
        if index >= loaded {
            return Err(PipelineError::request(
                param,
                format!("{kind} {index} is not loaded ({loaded} loaded)"),
            ));
        }
        if let ImageInput::Path(p) = image {
            *image = ImageInput::Image(read_image(p)?);
        }
    }
    if any && (r.hires.is_some() || r.outpaint.is_some()) {
        return Err(PipelineError::request(
            param,
            format!("{kind}s with the hires fix or outpainting are not supported"),
        ));
    }
    Ok(())
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
