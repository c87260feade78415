//! 2-D convolution (NCHW, groups 1, dilation 1) as im2col + GEMM in bands of output
//! rows: the bands run in parallel, each with its own im2col buffer of at most
//! `BAND_BYTES` (a 512x512 VAE layer whole would need gigabytes) and one
//! single-threaded GEMM whose initial value is the bias. 1x1 stride-1 convolutions
//! skip im2col; large 3x3 "same" convolutions go to [`super::winograd`].

use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height and width.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (rows, columns).
    pub stride: [usize; 2],
    /// Padding (top, left, bottom, right).
    pub padding: [usize; 4],
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let [pt, pl, pb, pr] = self.padding;
        (
            (self.h + pt + pb - self.kh) / self.stride[0] + 1,
            (self.w + pl + pr - self.kw) / self.stride[1] + 1,
        )
    }
}

/// Bytes of im2col scratch per band.
const BAND_BYTES: usize = 8 << 20;

/// What a convolution adds to its product besides the bias, folded into the kernel
/// so it costs no pass of its own: a ResNet block's projected time embedding (a
/// bias per image and channel) and its shortcut (a residual).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConvAdd<'a> {
    /// Added to output channel `c` of image `b`: `[batch, c_out]`.
    pub image_bias: Option<&'a [f32]>,
    /// Added element-wise: `[batch, c_out, oh, ow]`.
    pub residual: Option<&'a [f32]>,
}

impl ConvAdd<'_> {
    /// The per-(image, channel) constant: `bias[c] + image_bias[b, c]`, as a
    /// `[batch, c_out]` table (`None` when both are absent).
    pub(crate) fn bias_table(
        &self,
        bias: Option<&[f32]>,
        batch: usize,
        c_out: usize,
    ) -> Option<Vec<f32>> {
        if let Some(b) = bias {
            assert_eq!(b.len(), c_out, "conv2d: bias length");
        }
        if let Some(t) = self.image_bias {
            assert_eq!(t.len(), batch * c_out, "conv2d: image bias length");
        }
        match (bias, self.image_bias) {
            (None, None) => None,
            (Some(b), None) => Some((0..batch).flat_map(|_| b.iter().copied()).collect()),
            (None, Some(t)) => Some(t.to_vec()),
            (Some(b), Some(t)) => Some(
                t.chunks_exact(c_out)
                    .flat_map(|row| row.iter().zip(b).map(|(t, b)| t + b))
                    .collect(),
            ),
        }
    }
}

/// # Shapes
/// - `x`: `[batch, c_in, h, w]` row-major; `weight`: `[c_out, c_in, kh, kw]` row-major;
///   `bias`: `[c_out]`
/// - returns `[batch, c_out, oh, ow]`
///
/// # Panics
/// When a slice length does not match the shape, or the kernel exceeds the padded
/// input (caller bugs: the models check shapes first).
#[cfg_attr(not(test), allow(dead_code))]
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    conv2d_add(x, weight, bias, s, ConvAdd::default())
}

/// [`conv2d`] plus `add` (see [`ConvAdd`]).
///
/// # Shapes
/// As [`conv2d`]; `add.image_bias`: `[batch, c_out]`, `add.residual`: the output's.
///
/// # Panics
/// As [`conv2d`], and when an addend's length does not match.
pub fn conv2d_add(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: ConvShape,
    add: ConvAdd<'_>,
) -> Vec<f32> {
    if super::winograd::applies(&s) {
        return super::winograd::conv3x3_add(x, weight, bias, s, add);
    }
    conv2d_im2col_add(x, weight, bias, s, add)
}

/// [`conv2d`] by im2col + GEMM whatever the shape (benches compare it with
/// [`super::winograd`]); same shapes and panics.
#[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
pub fn conv2d_im2col(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    conv2d_im2col_add(x, weight, bias, s, ConvAdd::default())
}

fn conv2d_im2col_add(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: ConvShape,
    add: ConvAdd<'_>,
) -> Vec<f32> {
    let _prof = crate::profile::scope(if s.kh == 1 && s.kw == 1 {
        "conv1x1"
    } else {
        "conv_im2col"
    });
    let ConvShape {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        stride,
        padding,
    } = s;
    assert_eq!(x.len(), batch * c_in * h * w, "conv2d: input length");
    let k = c_in * kh * kw;
    assert_eq!(weight.len(), c_out * k, "conv2d: weight length");
    assert!(
        h + padding[0] + padding[2] >= kh && w + padding[1] + padding[3] >= kw,
        "conv2d: kernel larger than input"
    );
    let (oh, ow) = s.out_hw();
    let plane = oh * ow;
    // The GEMMs accumulate onto the output's initial value: the residual plus the
    // bias of each (image, channel) plane, or zeros.
    let table = add.bias_table(bias, batch, c_out);
    let mut out = match add.residual {
        Some(r) => {
            assert_eq!(r.len(), batch * c_out * plane, "conv2d: residual length");
            r.to_vec()
        }
        None => vec![0.0f32; batch * c_out * plane],
    };
    if let Some(t) = &table {
        let fresh = add.residual.is_none();
        out.par_chunks_mut(plane).enumerate().for_each(|(i, o)| {
            if fresh {
                o.fill(t[i]);
            } else {
                o.iter_mut().for_each(|v| *v += t[i]);
            }
        });
    }
    let pointwise = kh == 1 && kw == 1 && stride == [1, 1] && padding == [0; 4];
    // Bands of output rows run in parallel, each a single-threaded GEMM with its own
    // im2col buffer: no synchronisation inside the GEMM, and each band's working set
    // stays in cache.
    let threads = rayon::current_num_threads().max(1);
    let band_rows = (BAND_BYTES / 4 / (k * ow).max(1))
        .min(oh.div_ceil(threads))
        .clamp(1, oh);
    let bands: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..oh).step_by(band_rows).map(move |oy0| (b, oy0)))
        .collect();
    let out_ptr = super::SharedMut::capacity(&mut out);
    let run = |col: &mut Vec<f32>, &(b, oy0): &(usize, usize)| {
        let rows = band_rows.min(oh - oy0);
        let n = rows * ow;
        let xb = &x[b * c_in * h * w..(b + 1) * c_in * h * w];
        let (rhs, rhs_rs): (&[f32], usize) = if pointwise {
            (&xb[oy0 * ow..], plane)
        } else {
            col.resize(k * n, 0.0);
            im2col(xb, &mut col[..k * n], s, oy0, rows, ow);
            (&col[..k * n], n)
        };
        // SAFETY: dst is the [c_out, n] block at column oy0 * ow of image b's [c_out,
        // plane] output (row stride `plane`), disjoint between bands; lhs the
        // [c_out, k] weight; rhs the [k, n] columns (row stride `rhs_rs`).
        unsafe {
            super::Gemm {
                m: c_out,
                n,
                k,
                dst: out_ptr.at(b * c_out * plane + oy0 * ow),
                dst_rs: plane as isize,
                accumulate: true,
                lhs: weight.as_ptr(),
                lhs_rs: k as isize,
                lhs_cs: 1,
                rhs: rhs.as_ptr(),
                rhs_rs: rhs_rs as isize,
                rhs_cs: 1,
                scale: 1.0,
            }
            .run();
        }
    };
    bands.par_iter().for_each_init(Vec::new, run);
    out
}

/// Fills `col` (`[c_in * kh * kw, rows * ow]`) with the input patches of output rows
/// `oy0..oy0 + rows`, zeros where the kernel reads padding.
fn im2col(x: &[f32], col: &mut [f32], s: ConvShape, oy0: usize, rows: usize, ow: usize) {
    let ConvShape {
        h,
        w,
        kh,
        kw,
        stride,
        padding,
        ..
    } = s;
    let n = rows * ow;
    col.chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
        let src = &x[c * h * w..(c + 1) * h * w];
        for (oy, drow) in (oy0..oy0 + rows).zip(dst.chunks_mut(ow)) {
            let iy = (oy * stride[0] + ky) as isize - padding[0] as isize;
            if iy < 0 || iy >= h as isize {
                drow.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * w..(iy as usize + 1) * w];
            let off = kx as isize - padding[1] as isize;
            if stride[1] == 1 {
                // Valid output columns: 0 <= ox + off < w.
                let lo = (-off).clamp(0, ow as isize) as usize;
                let hi = (w as isize - off).clamp(0, ow as isize) as usize;
                drow[..lo].fill(0.0);
                if hi > lo {
                    let start = (lo as isize + off) as usize;
                    drow[lo..hi].copy_from_slice(&srow[start..start + (hi - lo)]);
                }
                drow[hi.max(lo)..].fill(0.0);
            } else {
                for (ox, d) in drow.iter_mut().enumerate() {
                    let ix = (ox * stride[1]) as isize + off;
                    *d = if ix >= 0 && ix < w as isize {
                        srow[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(x: &[f32], wt: &[f32], bias: &[f32], s: ConvShape) -> Vec<f32> {
        let (oh, ow) = s.out_hw();
        let mut out = vec![0.0f32; s.batch * s.c_out * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.c_in {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy =
                                        (oy * s.stride[0] + ky) as isize - s.padding[0] as isize;
                                    let ix =
                                        (ox * s.stride[1] + kx) as isize - s.padding[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    acc += x[((b * s.c_in + ci) * s.h + iy as usize) * s.w
                                        + ix as usize]
                                        as f64
                                        * wt[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx] as f64;
                                }
                            }
                        }
                        out[((b * s.c_out + co) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_direct_convolution() {
        let cases = [
            (3, [1, 1], [1, 1, 1, 1]),
            (3, [2, 2], [0, 0, 1, 1]),
            (3, [2, 2], [1, 1, 1, 1]),
            (1, [1, 1], [0, 0, 0, 0]),
        ];
        for (k, stride, padding) in cases {
            let s = ConvShape {
                batch: 2,
                c_in: 5,
                h: 9,
                w: 7,
                c_out: 6,
                kh: k,
                kw: k,
                stride,
                padding,
            };
            let x: Vec<f32> = (0..2 * 5 * 9 * 7)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let wt: Vec<f32> = (0..6 * 5 * k * k)
                .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..6).map(|i| i as f32 * 0.1).collect();
            let ours = conv2d(&x, &wt, Some(&bias), s);
            let want = direct(&x, &wt, &bias, s);
            assert_eq!(ours.len(), want.len());
            for (a, b) in ours.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "k={k} stride={stride:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn folds_image_bias_and_residual_into_both_paths() {
        // 16x16 (Winograd applies) and 5x7 (im2col), 3x3 same padding.
        for (h, w) in [(16, 16), (5, 7)] {
            let s = ConvShape {
                batch: 2,
                c_in: 3,
                h,
                w,
                c_out: 4,
                kh: 3,
                kw: 3,
                stride: [1, 1],
                padding: [1; 4],
            };
            let x: Vec<f32> = (0..2 * 3 * h * w)
                .map(|i| (i % 11) as f32 * 0.1 - 0.5)
                .collect();
            let wt: Vec<f32> = (0..4 * 3 * 9)
                .map(|i| (i % 7) as f32 * 0.05 - 0.1)
                .collect();
            let bias = [0.1, -0.2, 0.3, 0.0];
            let image_bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.25).collect();
            let residual: Vec<f32> = (0..2 * 4 * h * w).map(|i| (i % 5) as f32).collect();
            let plain = conv2d(&x, &wt, Some(&bias), s);
            let add = ConvAdd {
                image_bias: Some(&image_bias),
                residual: Some(&residual),
            };
            for fused in [
                conv2d_add(&x, &wt, Some(&bias), s, add),
                conv2d_im2col_add(&x, &wt, Some(&bias), s, add),
            ] {
                for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
                    let want = p + image_bias[i / (h * w)] + residual[i];
                    assert!((f - want).abs() < 1e-5, "{h}x{w} [{i}]: {f} vs {want}");
                }
            }
        }
    }
}
