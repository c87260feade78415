//! A request's memory, estimated before anything is allocated, so that a request
//! that cannot fit is refused with the figures instead of meeting the OOM killer.

use sd_models::{AutoencoderKLConfig, UNet2DConditionConfig};

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

/// Bytes a run of `shape` needs beyond the weights: the larger of the U-Net's and
/// the VAE decoder's activations, plus the output images.
pub fn estimate_bytes(
    unet: &UNet2DConditionConfig,
    vae: &AutoencoderKLConfig,
    shape: RunShape,
) -> u64 {
    let f = 1u64 << vae.block_out_channels.len().saturating_sub(1).min(16);
    let (h, w) = (shape.height as u64, shape.width as u64);
    let latent = (h / f).max(1).saturating_mul((w / f).max(1));
    let unet_batch = (shape.batch as u64).saturating_mul(if shape.guidance { 2 } else { 1 });
    let c0 = unet.block_out_channels.first().copied().unwrap_or(0) as u64;
    let unet_bytes = [
        UNET_ACTIVATIONS,
        c0,
        latent,
        unet_batch,
        shape.unet_bytes as u64,
    ]
    .into_iter()
    .fold(1u64, u64::saturating_mul);

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
    unet_bytes.max(vae_bytes).saturating_add(images)
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
