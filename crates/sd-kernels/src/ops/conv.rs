//! 2-D convolutions, with a per-image bias and a residual folded in.

#[cfg(feature = "flex")]
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

/// `conv.forward(x)`: on the CPU backend im2col + GEMMs in parallel bands of rows
/// (with the `flex` feature); elsewhere (and for configurations it does not cover:
/// groups, dilation, `Same` padding) burn's op.
///
/// # Shapes
/// - `[b, c_in, h, w]` to `[b, c_out, oh, ow]`
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv_forward_add(conv, x, None, None)
}

/// `conv.forward(x) + image_bias[b, c] + residual`: a ResNet block's time embedding
/// and shortcut folded into its convolutions on the CPU backend (no pass of their
/// own); elsewhere burn's ops.
///
/// # Shapes
/// - `x`: `[b, c_in, h, w]`; `image_bias`: `[b, c_out]`; `residual` and output:
///   `[b, c_out, oh, ow]`
pub fn conv_forward_add(
    conv: &Conv2d,
    x: Tensor<4>,
    image_bias: Option<Tensor<2>>,
    residual: Option<Tensor<4>>,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if crate::host::applies(&x)
        && let Some(y) = host_conv(conv, &x, image_bias.as_ref(), residual.as_ref())
    {
        return y;
    }
    let mut y = burn_conv(conv, x);
    if let Some(t) = image_bias {
        let [b, c] = t.dims();
        y = y + t.reshape([b, c, 1, 1]);
    }
    match residual {
        Some(r) => r + y,
        None => y,
    }
}

/// Bytes of upsampled input above which [`upsample_conv_forward`] works in bands.
const UPSAMPLE_BAND_BYTES: usize = 32 << 20;

/// `conv(nearest_upsample(x, size))`, diffusers' `Upsample2D`. When the upsampled
/// input would be large (a VAE decoder's last upsampler: 256 channels at 512x512,
/// 268 MB in f32; 1 GB at 1024x1024) and the conv is 3x3 with stride 1 and padding
/// 1, the conv runs over bands of output rows, each upsampling only the input rows
/// it reads (with one row of overlap each side), and writes into the output, so the
/// upsampled tensor never exists whole. The values are the plain composition's.
///
/// # Shapes
/// - `x`: `[b, c_in, h, w]` to `[b, c_out, size[0], size[1]]`
pub fn upsample_conv_forward(conv: &Conv2d, x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [b, c, h, _] = x.dims();
    let bytes = b * c * size[0] * size[1] * x.dtype().size();
    let rows = (UPSAMPLE_BAND_BYTES / (b * c * size[1] * x.dtype().size()).max(1)).max(2);
    if bytes <= UPSAMPLE_BAND_BYTES || size[0] != 2 * h || !banded_conv_applies(conv) {
        return conv_forward(conv, upsample_nearest(x, size));
    }
    upsample_conv_in_bands(conv, x, size, rows & !1)
}

/// Whether `conv` is a 3x3 conv with stride 1 and padding 1 (each output row reads
/// the three input rows around it).
fn banded_conv_applies(conv: &Conv2d) -> bool {
    use burn::nn::PaddingConfig2d;
    conv.kernel_size == [3, 3]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && matches!(conv.padding, PaddingConfig2d::Explicit(1, 1, 1, 1))
}

/// [`upsample_conv_forward`] over bands of `band` output rows (even): output rows
/// `o0..o1` read upsampled rows `o0 - 1..=o1`, that is input rows `o0/2 - 1..=o1/2`;
/// the conv's own zero padding stands for the rows past the image, and the rows
/// computed from the overlap are dropped.
pub(crate) fn upsample_conv_in_bands(
    conv: &Conv2d,
    x: Tensor<4>,
    size: [usize; 2],
    band: usize,
) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let c_out = conv.weight.dims()[0];
    let oh = size[0];
    let mut out = output_for(&x, [b, c_out, oh, size[1]]);
    for o0 in (0..oh).step_by(band.max(2)) {
        let o1 = (o0 + band).min(oh);
        let (i0, i1) = ((o0 / 2).saturating_sub(1), (o1 / 2 + 1).min(h));
        let rows = upsample_nearest(
            x.clone().slice([0..b, 0..c, i0..i1, 0..w]),
            [2 * (i1 - i0), size[1]],
        );
        // The upsampled rows o0 - 1 ..= o1 that exist, from the band's first row 2 * i0.
        let (u0, u1) = (o0.saturating_sub(1), (o1 + 1).min(oh));
        let rows = rows.slice([0..b, 0..c, u0 - 2 * i0..u1 - 2 * i0, 0..size[1]]);
        let y = conv_forward(conv, rows);
        let skip = o0 - u0;
        out = out.slice_assign(
            [0..b, 0..c_out, o0..o1, 0..size[1]],
            y.slice([0..b, 0..c_out, skip..skip + (o1 - o0), 0..size[1]]),
        );
    }
    out
}

/// A tensor of `shape` in `x`'s dtype and device, to be written over. On the CPU
/// backend a zeroed `Vec<f32>` (fresh pages from the system) taken over as it is:
/// burn's `empty` there copies its buffer once to align it, which for a moment holds
/// twice the output (512 MB at a VAE decoder's 512x512 level).
fn output_for(x: &Tensor<4>, shape: [usize; 4]) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if crate::host::applies(x) {
        return crate::host::from_vec(vec![0.0; shape.iter().product()], shape, &x.device());
    }
    Tensor::empty(shape, (&x.device(), x.dtype()))
}

/// Nearest-neighbour upsampling of `x` to `size`.
fn upsample_nearest(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    use burn::nn::interpolate::{Interpolate2dConfig, InterpolateMode};
    Interpolate2dConfig::new()
        .with_output_size(Some(size))
        .with_mode(InterpolateMode::Nearest)
        .init()
        .forward(x)
}

/// burn's `conv.forward(x)`, its parameters cast to `x`'s dtype where stored
/// narrower (half-precision weights under f32 activations).
fn burn_conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let dtype = x.dtype();
    if conv.weight.val().dtype() == dtype
        && conv.bias.as_ref().is_none_or(|b| b.val().dtype() == dtype)
    {
        return conv.forward(x);
    }
    let mut cast = conv.clone();
    cast.weight = cast.weight.map(|w| w.cast(dtype));
    cast.bias = cast.bias.map(|b| b.map(|b| b.cast(dtype)));
    cast.forward(x)
}

#[cfg(feature = "flex")]
fn host_conv(
    conv: &Conv2d,
    x: &Tensor<4>,
    image_bias: Option<&Tensor<2>>,
    residual: Option<&Tensor<4>>,
) -> Option<Tensor<4>> {
    use crate::host::conv::{ConvAdd, ConvShape, conv2d_add};
    use crate::host::{with_view, with_weight_view};
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Same => return None,
    };
    if conv.groups != 1 || conv.dilation != [1, 1] {
        return None;
    }
    let weight = conv.weight.val();
    let [c_out, c_in, kh, kw] = weight.dims();
    let [batch, xc, h, w] = x.dims();
    if xc != c_in || h + padding[0] + padding[2] < kh || w + padding[1] + padding[3] < kw {
        return None;
    }
    let shape = ConvShape {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride: conv.stride,
        padding,
    };
    let bias = conv.bias.as_ref().map(|b| b.val());
    let (oh, ow) = shape.out_hw();
    // A contiguous view of an optional addend, `Some(None)` when absent, `None`
    // when it cannot be read in place (then the generic path runs).
    fn view<const D: usize, R>(
        t: Option<&Tensor<D>>,
        shape: [usize; D],
        f: impl FnOnce(Option<&[f32]>) -> Option<R>,
    ) -> Option<R> {
        match t {
            None => f(None),
            Some(t) => {
                let len = shape.iter().product();
                with_view(t, |v| {
                    if v.is_contiguous(&shape) {
                        f(Some(&v.data[..len]))
                    } else {
                        None
                    }
                })
                .flatten()
            }
        }
    }
    let run = |xs: &[f32], ws: &[f32]| {
        view(image_bias, [batch, c_out], |ib| {
            view(residual, [batch, c_out, oh, ow], |res| {
                let add = ConvAdd {
                    image_bias: ib,
                    residual: res,
                };
                match &bias {
                    Some(b) => with_view(b, |bv| {
                        (bv.strides[0] == 1)
                            .then(|| conv2d_add(xs, ws, Some(&bv.data[..c_out]), shape, add))
                    })
                    .flatten(),
                    None => Some(conv2d_add(xs, ws, None, shape, add)),
                }
            })
        })
    };
    let out = with_weight_view(&weight, |wv| {
        if !wv.is_contiguous(&[c_out, c_in, kh, kw]) {
            return None;
        }
        let ws = &wv.data[..c_out * c_in * kh * kw];
        let n = batch * c_in * h * w;
        with_view(x, |xv| {
            if xv.is_contiguous(&[batch, c_in, h, w]) {
                run(&xv.data[..n], ws)
            } else {
                run(&crate::host::into_vec(x.clone()), ws)
            }
        })
        .flatten()
    })
    .flatten()?;
    Some(crate::host::from_vec(
        out,
        [batch, c_out, oh, ow],
        &x.device(),
    ))
}

#[cfg(test)]
mod tests {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::prelude::*;

    use super::*;

    /// Bands of 2 to 14 output rows (the first and last bands at the image's edges,
    /// an odd input height; im2col and, at 40x40, Winograd convolutions) give the
    /// plain upsample-then-conv's values.
    #[test]
    fn upsampling_in_bands_matches_the_whole() {
        let device = Device::flex();
        for ([b, c, h, w], bands) in [
            ([2, 3, 7, 5], [2, 4, 6, 14]),
            ([1, 8, 20, 20], [2, 8, 12, 40]),
        ] {
            let conv = Conv2dConfig::new([c, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device);
            let x = Tensor::<4>::random([b, c, h, w], burn::tensor::Distribution::Default, &device);
            let size = [2 * h, 2 * w];
            let whole = conv_forward(&conv, upsample_nearest(x.clone(), size));
            for band in bands {
                let banded = upsample_conv_in_bands(&conv, x.clone(), size, band);
                assert_eq!(banded.dims(), [b, 4, 2 * h, 2 * w]);
                let err: f32 = (banded - whole.clone()).abs().max().into_scalar();
                assert!(err < 1e-5, "{h}x{w}, band {band}: {err}");
            }
        }
    }
}
