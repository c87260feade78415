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
