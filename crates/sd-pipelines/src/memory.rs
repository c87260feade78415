//! A request's memory, estimated before anything is allocated, so that a request
//! that cannot fit is refused with the figures instead of meeting the OOM killer.

use sd_models::{AutoencoderKLConfig, SD3Transformer2DConfig, UNet2DConditionConfig};

/// The sizes a memory estimate needs.
#[derive(Debug, Clone, Copy)]
pub struct RunShape {
    /// Images in the batch.
    pub batch: usize,
    /// Whether the U-Net runs the unconditional half too.
    pub guidance: bool,
    /// Output height and width in pixels.
    pub height: usize,
    /// Output width in pixels.
    pub width: usize,
    /// The VAE's tile side in pixels when it decodes in tiles.
    pub vae_tile: Option<usize>,
    /// Bytes per U-Net activation value (4 for f32, 2 for f16).
    pub unet_bytes: usize,
}

/// Live U-Net activations at the first level, in units of one activation: the block's
/// temporaries, the skip connections every level keeps and the convolutions' im2col
/// buffers (9 x the input). An upper estimate from the block structure, not a
/// measurement.
const UNET_ACTIVATIONS: u64 = 34;

/// Live VAE decoder activations at its largest level, same units: input, norm output,
/// conv output, residual. docs/performance.md measured the SD 1.5 pipeline at
/// 512x512 peaking ~0.9 GB above its weights, about 3.2 of the decoder's largest
/// activation (256 channels at 512x512).
const VAE_ACTIVATIONS: u64 = 4;

/// Live SD 3 transformer activations per token, in units of its width: a joint
/// block's inputs (image and text), the norm outputs, q, k and v, the attention
/// output and its projection, the residuals and the 4x-wide feed-forward hidden
/// state with its activation. Attention on the CPU is flash attention (memory
/// linear in the tokens). An upper estimate from the block structure.
const SD3_ACTIVATIONS: u64 = 20;

/// Latent positions of a run (`H/f x W/f`).
fn latent_positions(vae: &AutoencoderKLConfig, shape: &RunShape) -> u64 {
    let f = 1u64 << vae.block_out_channels.len().saturating_sub(1).min(16);
    let (h, w) = (shape.height as u64, shape.width as u64);
    (h / f).max(1).saturating_mul((w / f).max(1))
}

/// Images through the denoiser at once (the unconditional half doubles them).
fn denoiser_batch(shape: &RunShape) -> u64 {
    (shape.batch as u64).saturating_mul(if shape.guidance { 2 } else { 1 })
}

/// Bytes a run of `shape` needs beyond the weights: the larger of the U-Net's and
/// the VAE decoder's activations, plus the output images.
pub fn estimate_bytes(
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKLConfig,
    shape: RunShape,
) -> u64 {
    let c0 = unet.block_out_channels.first().copied().unwrap_or(0) as u64;
    let unet_bytes = [
        UNET_ACTIVATIONS,
        c0,
        latent_positions(vae, &shape),
        denoiser_batch(&shape),
        shape.unet_bytes as u64,
    ]
    .into_iter()
    .fold(1u64, u64::saturating_mul);
    decoder_and_images(vae, shape, unet_bytes)
}

/// [`estimate_bytes`] for SD 3's transformer: its activations over the image's
/// patches and `text_tokens` text tokens (77 CLIP + the T5 length), width
/// `heads x head_dim`.
pub fn estimate_bytes_sd3(
    transformer: &SD3Transformer2DConfig,
    text_tokens: usize,
    vae: &AutoencoderKLConfig,
    shape: RunShape,
) -> u64 {
    let p = (transformer.patch_size as u64).max(1);
    let tokens = (latent_positions(vae, &shape) / (p * p)).saturating_add(text_tokens as u64);
    let width = (transformer.num_attention_heads as u64)
        .saturating_mul(transformer.attention_head_dim as u64);
    let transformer_bytes = [
        SD3_ACTIVATIONS,
        width,
        tokens,
        denoiser_batch(&shape),
        shape.unet_bytes as u64,
    ]
    .into_iter()
    .fold(1u64, u64::saturating_mul);
    decoder_and_images(vae, shape, transformer_bytes)
}

/// The larger of the denoiser's and the VAE decoder's activations, plus the output
/// images.
fn decoder_and_images(vae: &AutoencoderKLConfig, shape: RunShape, denoiser_bytes: u64) -> u64 {
    let (h, w) = (shape.height as u64, shape.width as u64);
    let full = h.saturating_mul(w);
    let pixels = match shape.vae_tile {
        Some(t) => (t as u64).saturating_mul(t as u64).min(full),
        None => full,
    };
    // The decoder's level `i` (from full resolution) holds `boc[i]` channels at
    // `pixels / 4^i`, and its upsampled output `boc[i]` channels at `pixels / 4^(i-1)`.
    let boc = &vae.block_out_channels;
    let largest = boc
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let level = pixels >> (2 * i.saturating_sub(1)).min(62);
            (c as u64).saturating_mul(level)
        })
        .max()
        .unwrap_or(0);
    let vae_bytes = largest.saturating_mul(VAE_ACTIVATIONS * 4);
    let images = [shape.batch as u64, 3 * 4 * 3, full]
        .into_iter()
        .fold(1u64, u64::saturating_mul);
    denoiser_bytes.max(vae_bytes).saturating_add(images)
}

/// The memory the system can still hand out (Linux `MemAvailable`); `None` where it
/// is not known, and the check is then skipped.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> (UNet2DConditionConfig, AutoencoderKLConfig) {
        let unet = UNet2DConditionConfig::from_json(sd_io::model::builtin_configs::SD15_UNET)
            .expect("config");
        let vae = AutoencoderKLConfig::from_json(sd_io::model::builtin_configs::SD15_VAE)
            .expect("config");
        (unet, vae)
    }

    #[test]
    fn sd15_512_needs_about_a_gigabyte() {
        let (unet, vae) = configs();
        let shape = RunShape {
            batch: 1,
            guidance: true,
            height: 512,
            width: 512,
            vae_tile: None,
            unet_bytes: 4,
        };
        let gib = estimate_bytes(&unet, &vae, shape) as f64 / (1u64 << 30) as f64;
        assert!((0.3..3.0).contains(&gib), "{gib} GiB");
    }

    /// SD 3.5 Medium at 1024x1024 with guidance: 4096 patches + 333 text tokens,
    /// 1536 wide, two images through the transformer: about 1 GiB, under the VAE's
    /// untiled decode (about 4 GiB), which sets the estimate.
    #[test]
    fn sd35_medium_1024_is_estimated() {
        // stabilityai/stable-diffusion-3.5-medium's transformer/config.json.
        let transformer = SD3Transformer2DConfig::from_json(
            r#"{"attention_head_dim": 64, "caption_projection_dim": 1536,
                "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
                "num_layers": 24, "out_channels": 16, "patch_size": 2,
                "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                "qk_norm": "rms_norm", "sample_size": 128}"#,
        )
        .expect("config");
        let vae = AutoencoderKLConfig::from_json(sd_io::sd3_single_file::builtin_configs::SD3_VAE)
            .expect("config");
        let shape = RunShape {
            batch: 1,
            guidance: true,
            height: 1024,
            width: 1024,
            vae_tile: None,
            unet_bytes: 4,
        };
        let gib =
            estimate_bytes_sd3(&transformer, 77 + 256, &vae, shape) as f64 / (1u64 << 30) as f64;
        eprintln!("SD 3.5 Medium 1024x1024 CFG: {gib:.2} GiB");
        assert!((1.0..8.0).contains(&gib), "{gib} GiB");
        let bigger = RunShape { batch: 4, ..shape };
        assert!(
            estimate_bytes_sd3(&transformer, 333, &vae, bigger)
                > estimate_bytes_sd3(&transformer, 333, &vae, shape)
        );
    }

    #[test]
    fn tiling_bounds_the_decoder() {
        let (unet, vae) = configs();
        let shape = |vae_tile| RunShape {
            batch: 1,
            guidance: false,
            height: 4096,
            width: 4096,
            vae_tile,
            unet_bytes: 4,
        };
        assert!(
            estimate_bytes(&unet, &vae, shape(Some(512)))
                < estimate_bytes(&unet, &vae, shape(None))
        );
    }
}
