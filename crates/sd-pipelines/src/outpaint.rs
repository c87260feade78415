//! Outpainting: the canvas extended by edge replication, the new area inpainted and
//! blended over a seam.

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource};

use crate::composed::{
    GenerationOptions, GenerationOutput, StableDiffusion, StepCallback, invalid,
};

/// Pixels added on each side by [`StableDiffusion::outpaint`] (multiples of 8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extend {
    /// Added columns on the left.
    pub left: usize,
    /// Added columns on the right.
    pub right: usize,
    /// Added rows on top.
    pub top: usize,
    /// Added rows at the bottom.
    pub bottom: usize,
}

impl Extend {
    /// Checks every side is a multiple of 8 and at least one is not 0.
    ///
    /// # Errors
    /// [`CoreError::InvalidArgument`] naming the side.
    pub fn check(&self) -> Result<(), CoreError> {
        for (name, v) in [
            ("left", self.left),
            ("right", self.right),
            ("top", self.top),
            ("bottom", self.bottom),
        ] {
            if !v.is_multiple_of(8) {
                return Err(invalid(name, format!("{v} is not a multiple of 8")));
            }
        }
        if self.left + self.right + self.top + self.bottom == 0 {
            return Err(invalid("extend", "extend at least one side"));
        }
        Ok(())
    }
}

/// The outpainting blend weight of each canvas pixel (`ch x cw`, the original
/// `h x w` placed at `e.left, e.top`): 1 in the new area, falling linearly to 0 over
/// `seam` pixels into the original, 0 beyond.
pub fn outpaint_alpha(
    ch: usize,
    cw: usize,
    h: usize,
    w: usize,
    e: Extend,
    seam: usize,
) -> Vec<f32> {
    let mut alpha = vec![0f32; ch * cw];
    for y in 0..ch {
        for x in 0..cw {
            let inside = y >= e.top && y < e.top + h && x >= e.left && x < e.left + w;
            alpha[y * cw + x] = if !inside {
                1.0
            } else {
                let mut d = usize::MAX;
                if e.left > 0 {
                    d = d.min(x - e.left);
                }
                if e.right > 0 {
                    d = d.min(e.left + w - 1 - x);
                }
                if e.top > 0 {
                    d = d.min(y - e.top);
                }
                if e.bottom > 0 {
                    d = d.min(e.top + h - 1 - y);
                }
                if d >= seam {
                    0.0
                } else {
                    (seam - d) as f32 / (seam + 1) as f32
                }
            };
        }
    }
    alpha
}

/// `x` `[1, 3, h, w]` padded by `e` with its edge pixels repeated.
fn replicate_edges(x: Tensor<4>, e: Extend) -> Tensor<4> {
    let [_, _, h, _] = x.dims();
    let mut x = x;
    if e.left > 0 {
        let strip = x
            .clone()
            .slice([0..1, 0..3, 0..h, 0..1])
            .repeat_dim(3, e.left);
        x = Tensor::cat(vec![strip, x], 3);
    }
    if e.right > 0 {
        let wx = x.dims()[3];
        let strip = x
            .clone()
            .slice([0..1, 0..3, 0..h, wx - 1..wx])
            .repeat_dim(3, e.right);
        x = Tensor::cat(vec![x, strip], 3);
    }
    let cw = x.dims()[3];
    if e.top > 0 {
        let strip = x
            .clone()
            .slice([0..1, 0..3, 0..1, 0..cw])
            .repeat_dim(2, e.top);
        x = Tensor::cat(vec![strip, x], 2);
    }
    if e.bottom > 0 {
        let hx = x.dims()[2];
        let strip = x
            .clone()
            .slice([0..1, 0..3, hx - 1..hx, 0..cw])
            .repeat_dim(2, e.bottom);
        x = Tensor::cat(vec![x, strip], 2);
    }
    x
}

impl StableDiffusion<'_> {
    /// Outpainting: extends `image` (`[1, 3, H, W]` in `[-1, 1]`) by `extend` pixels
    /// (multiples of 8) filled by edge replication, inpaints the new area plus a seam of
    /// `seam` pixels into the original, and blends linearly over the seam. Original
    /// pixels farther than `seam` from the new area come back unchanged.
    ///
    /// # Errors
    /// An image that is not one RGB image, sides that are not multiples of 8, and as
    /// [`Self::inpaint`].
    pub fn outpaint(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        extend: Extend,
        seam: usize,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let [n, c, h, w] = image.dims();
        if c != 3 || n != 1 {
            return Err(invalid(
                "image",
                format!(
                    "shape {:?}, expected one RGB image [1, 3, H, W]",
                    image.dims()
                ),
            ));
        }
        extend.check()?;
        let (ch, cw) = (
            h + extend.top + extend.bottom,
            w + extend.left + extend.right,
        );
        let x = replicate_edges(image, extend);
        let alpha = outpaint_alpha(ch, cw, h, w, extend, seam);
        let mask: Vec<f32> = alpha
            .iter()
            .map(|&a| if a > 0.0 { 1.0 } else { 0.0 })
            .collect();
        let alpha = Tensor::<4>::from_data(TensorData::new(alpha, [1, 1, ch, cw]), &self.device);
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [1, 1, ch, cw]), &self.device);
        let o = GenerationOptions {
            width: cw,
            height: ch,
            ..options.clone()
        };
        let out = self.inpaint(&o, x.clone(), mask, 1.0, noise, callback)?;
        let b = out.images.dims()[0];
        let original = (x / 2.0 + 0.5).repeat_dim(0, b);
        let alpha = alpha.repeat_dim(0, b);
        let keep = alpha.clone().neg().add_scalar(1.0);
        let images = out.images * alpha + original * keep;
        Ok(GenerationOutput {
            latents: out.latents,
            images,
        })
    }
}
