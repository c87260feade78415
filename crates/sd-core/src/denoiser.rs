//! The denoiser contract (the U-Net of Stable Diffusion).

use burn::prelude::*;

use crate::control::ControlSignals;
use crate::error::CoreError;

/// A model predicting noise (or `v`, or `x0`, as its scheduler's `prediction_type`
/// says) from noisy latents, timesteps and text conditioning.
pub trait Denoiser {
    /// One forward pass.
    ///
    /// # Shapes
    /// - `sample`: `[batch, in_channels, h, w]` latents (already scaled by the scheduler)
    /// - `timesteps`: `[batch]`, float, may be fractional (Karras / AYS sigmas)
    /// - `encoder_hidden_states`: `[batch, seq_len, cross_attention_dim]`
    /// - output: `[batch, out_channels, h, w]`, in the dtype of `sample`
    ///
    /// # Errors
    /// [`CoreError::Shape`] when the inputs do not fit the model (channels other than
    /// [`Self::in_channels`], a timestep count or conditioning batch other than the
    /// sample's, a conditioning width other than [`Self::cross_attention_dim`]).
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>, CoreError>;

    /// [`Self::forward`] with conditioning beyond the text ([`AddedConditioning`]).
    /// The default takes none: empty conditioning runs [`Self::forward`], anything
    /// else is an error.
    ///
    /// # Errors
    /// As [`Self::forward`]; [`CoreError::Shape`] for conditioning the model does not
    /// take or of the wrong shape.
    fn forward_added(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &AddedConditioning,
    ) -> Result<Tensor<4>, CoreError> {
        check_added_conditioning(self, sample.dims()[0], added)?;
        self.forward(sample, timesteps, encoder_hidden_states)
    }

    /// [`Self::forward_added`] with the signals of control models (ControlNet
    /// residuals, T2I-Adapter features) added inside the network. The default takes
    /// none: empty signals run [`Self::forward_added`], anything else is an error.
    ///
    /// # Errors
    /// As [`Self::forward_added`]; [`CoreError::Shape`] for signals the model does
    /// not take or that do not fit its blocks.
    fn forward_controlled(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &AddedConditioning,
        control: &ControlSignals,
    ) -> Result<Tensor<4>, CoreError> {
        check_control_signals(self, control)?;
        self.forward_added(sample, timesteps, encoder_hidden_states, added)
    }

    /// The width of the guidance-scale embedding the model takes as
    /// [`AddedConditioning::timestep_cond`] (LCM-distilled U-Nets'
    /// `time_cond_proj_dim`); `None` for models guided by classifier-free guidance.
    fn time_cond_proj_dim(&self) -> Option<usize> {
        None
    }

    /// For SDXL-style denoisers (`addition_embed_type: "text_time"`): the sizes of
    /// the pooled text embedding and time ids they need in [`AddedConditioning`].
    fn text_time_dims(&self) -> Option<TextTimeDims> {
        None
    }

    /// For denoisers conditioned on a pooled text embedding alone (SD 3's
    /// `pooled_projections`, given as [`AddedConditioning::text_embeds`]): its width.
    fn pooled_projection_dim(&self) -> Option<usize> {
        None
    }

    /// [`Self::forward_added`] with the blocks `skip_layers` passed over (SD 3.5's
    /// skip-layer guidance). The default skips nothing and refuses a non-empty list.
    ///
    /// # Errors
    /// As [`Self::forward_added`]; [`CoreError::Unsupported`] where the denoiser has
    /// no skippable blocks, [`CoreError::InvalidArgument`] for a block it lacks.
    fn forward_skipping(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &AddedConditioning,
        skip_layers: &[usize],
    ) -> Result<Tensor<4>, CoreError> {
        if !skip_layers.is_empty() {
            return Err(CoreError::Unsupported(
                "skip-layer guidance needs a transformer denoiser (SD 3.x)".into(),
            ));
        }
        self.forward_added(sample, timesteps, encoder_hidden_states, added)
    }

    /// Whether [`Self::forward_controlled`] adds control signals
    /// ([`ControlSignals`]); `false` by default.
    fn takes_control_residuals(&self) -> bool {
        false
    }

    /// What the latents' sides must be multiples of (the SD 3 transformer's patch
    /// side; 1 for U-Nets).
    fn sample_multiple(&self) -> usize {
        1
    }

    /// Channels expected in `sample` (4, or 9 for an inpainting U-Net).
    fn in_channels(&self) -> usize;

    /// Channels of the prediction (4 for SD latents).
    fn out_channels(&self) -> usize;

    /// Width of the conditioning the model cross-attends to.
    fn cross_attention_dim(&self) -> usize;
}

/// Conditioning a denoiser takes beyond the text (diffusers' `timestep_cond` and
/// `added_cond_kwargs`): what the model itself is conditioned on. Control models'
/// signals travel apart, as [`ControlSignals`].
#[derive(Debug, Clone, Default)]
pub struct AddedConditioning {
    /// The embedded guidance scale `[batch, time_cond_proj_dim]` of LCM-distilled
    /// U-Nets (`get_guidance_scale_embedding(guidance_scale - 1)`).
    pub timestep_cond: Option<Tensor<2>>,
    /// SDXL's pooled text embedding `[batch, d]` (`text_embeds`).
    pub text_embeds: Option<Tensor<2>>,
    /// SDXL's micro-conditioning `[batch, n]` (`time_ids`: original size, crop
    /// corner, target size, each height first; the refiner: an aesthetic score
    /// instead of the target size).
    pub time_ids: Option<Tensor<2>>,
}

/// What a `text_time` denoiser (SDXL) takes: `text_embeds` width plus time ids times
/// `time_embed_dim` must make `input_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeDims {
    /// `projection_class_embeddings_input_dim`.
    pub input_dim: usize,
    /// `addition_time_embed_dim`.
    pub time_embed_dim: usize,
}

/// Checks [`AddedConditioning`] against what a denoiser takes.
///
/// # Errors
/// [`CoreError::Shape`] naming the input that does not fit.
pub fn check_added_conditioning(
    denoiser: &(impl Denoiser + ?Sized),
    batch: usize,
    added: &AddedConditioning,
) -> Result<(), CoreError> {
    match denoiser.pooled_projection_dim() {
        Some(d) => check_pooled(d, batch, added)?,
        None => check_text_time(denoiser.text_time_dims(), batch, added)?,
    }
    match (&added.timestep_cond, denoiser.time_cond_proj_dim()) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(CoreError::shape(
            "timestep_cond",
            "the denoiser takes no timestep condition (no time_cond_proj_dim)",
        )),
        (Some(c), Some(d)) if c.dims() != [batch, d] => Err(CoreError::shape(
            "timestep_cond",
            format!("shape {:?}, expected [{batch}, {d}]", c.dims()),
        )),
        _ => Ok(()),
    }
}

/// Checks that a denoiser given non-empty [`ControlSignals`] takes them.
///
/// # Errors
/// [`CoreError::Shape`] naming the signal.
pub fn check_control_signals(
    denoiser: &(impl Denoiser + ?Sized),
    control: &ControlSignals,
) -> Result<(), CoreError> {
    if !control.is_empty() && !denoiser.takes_control_residuals() {
        return Err(CoreError::shape(
            "down_block_additional_residuals",
            "the denoiser takes no ControlNet residuals or adapter features",
        ));
    }
    Ok(())
}

/// A pooled-only denoiser's conditioning: `text_embeds` `[batch, d]`, no time ids.
fn check_pooled(d: usize, batch: usize, added: &AddedConditioning) -> Result<(), CoreError> {
    if added.time_ids.is_some() {
        return Err(CoreError::shape(
            "time_ids",
            "the denoiser takes a pooled embedding alone, no time ids",
        ));
    }
    match &added.text_embeds {
        None => Err(CoreError::shape(
            "text_embeds",
            format!("this denoiser (SD 3) needs the pooled text embedding [{batch}, {d}]"),
        )),
        Some(te) if te.dims() != [batch, d] => Err(CoreError::shape(
            "text_embeds",
            format!("shape {:?}, expected [{batch}, {d}]", te.dims()),
        )),
        Some(_) => Ok(()),
    }
}

fn check_text_time(
    dims: Option<TextTimeDims>,
    batch: usize,
    added: &AddedConditioning,
) -> Result<(), CoreError> {
    match (dims, &added.text_embeds, &added.time_ids) {
        (None, None, None) => Ok(()),
        (None, _, _) => Err(CoreError::shape(
            "text_embeds",
            "the denoiser takes no pooled text embedding or time ids (no text_time addition)",
        )),
        (Some(_), None, _) | (Some(_), _, None) => Err(CoreError::shape(
            "text_embeds",
            "this denoiser (addition_embed_type text_time, SDXL) needs text_embeds and time_ids",
        )),
        (Some(d), Some(te), Some(ids)) => {
            let [tb, tw] = te.dims();
            let [ib, n] = ids.dims();
            if tb != batch || ib != batch {
                return Err(CoreError::shape(
                    "text_embeds",
                    format!("batches {tb} and {ib}, the sample's is {batch}"),
                ));
            }
            if tw + n * d.time_embed_dim != d.input_dim {
                return Err(CoreError::shape(
                    "text_embeds",
                    format!(
                        "{tw} + {n} time ids x {} != add_embedding's input {}",
                        d.time_embed_dim, d.input_dim
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// Checks the inputs of [`Denoiser::forward`] against a denoiser's sizes; the check
/// implementations run before their forward pass.
///
/// # Errors
/// [`CoreError::Shape`] naming the first input that does not fit.
pub fn check_denoiser_inputs(
    denoiser: &(impl Denoiser + ?Sized),
    sample: [usize; 4],
    timesteps: [usize; 1],
    encoder_hidden_states: [usize; 3],
) -> Result<(), CoreError> {
    let [b, c, _, _] = sample;
    if c != denoiser.in_channels() {
        return Err(CoreError::shape(
            "sample",
            format!(
                "{c} channels, the denoiser takes {}",
                denoiser.in_channels()
            ),
        ));
    }
    if timesteps[0] != b {
        return Err(CoreError::shape(
            "timesteps",
            format!("{} timesteps for a batch of {b}", timesteps[0]),
        ));
    }
    let [cb, _, d] = encoder_hidden_states;
    if cb != b {
        return Err(CoreError::shape(
            "encoder_hidden_states",
            format!("batch {cb}, the sample's is {b}"),
        ));
    }
    if d != denoiser.cross_attention_dim() {
        return Err(CoreError::shape(
            "encoder_hidden_states",
            format!(
                "width {d}, the denoiser cross-attends to {}",
                denoiser.cross_attention_dim()
            ),
        ));
    }
    Ok(())
}
