//! Cheap previews of latents without the VAE.

use burn::prelude::*;

/// A cheap preview of SD 1.x/2.x latents without the VAE: a fixed linear map from the
/// 4 latent channels to RGB (A1111's "Approx cheap"), at latent resolution.
///
/// # Shapes
/// - `[b, 4, h, w]` to `[b, 3, h, w]` in `[0, 1]`
pub fn latent_preview(latents: &Tensor<4>) -> Tensor<4> {
    const FACTORS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let [b, c, h, w] = latents.dims();
    let device = latents.device();
    let m = Tensor::<2>::from_data(
        TensorData::new(
            FACTORS.iter().flatten().copied().collect::<Vec<f32>>(),
            [4, 3],
        ),
        &device,
    );
    let x = latents
        .clone()
        .slice([0..b, 0..c.min(4), 0..h, 0..w])
        .permute([0, 2, 3, 1])
        .reshape([b * h * w, c.min(4)]);
    let m = m.slice([0..c.min(4), 0..3]);
    let rgb = x.matmul(m).reshape([b, h, w, 3]).permute([0, 3, 1, 2]);
    ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
}
