//! GroupNorm with its affine parameters and an optional SiLU, fused into one kernel
//! that works in place: one pass for the statistics (accumulated in f64, so large
//! groups keep full f32 accuracy), one pass that normalises, scales, shifts and
//! activates.

use rayon::prelude::*;

use super::exp::{self, simd_dispatch};

/// One GroupNorm's sizes and parameters.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormParams<'a> {
    /// Batch size.
    pub batch: usize,
    /// Channels (a multiple of `groups`).
    pub channels: usize,
    /// Groups.
    pub groups: usize,
    /// Scale, `[channels]`.
    pub weight: &'a [f32],
    /// Shift, `[channels]`.
    pub bias: &'a [f32],
    /// Added to the variance.
    pub epsilon: f64,
    /// Whether SiLU follows.
    pub silu: bool,
}

/// `y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`, then `y * sigmoid(y)`
/// when `silu`, per group of `channels / groups` channels over all `spatial` positions.
///
/// # Shapes
/// - `x`: `[batch, channels, spatial]`, row-major, overwritten with the result
///
/// # Panics
/// When the lengths do not match the sizes or `groups` does not divide `channels`
/// (a caller bug: configs are validated before models are built).
pub fn group_norm(x: &mut [f32], params: &GroupNormParams<'_>) {
    let _prof = crate::profile::scope("group_norm");
    let Some((group_len, spatial)) = layout(x.len(), params) else {
        return;
    };
    let GroupNormParams {
        channels,
        groups,
        weight,
        bias,
        epsilon,
        silu,
        ..
    } = *params;
    let per_group = channels / groups;
    x.par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(g, chunk)| {
            let c0 = (g % groups) * per_group;
            let (mean, var) = mean_var(chunk);
            for (ci, row) in chunk.chunks_mut(spatial).enumerate() {
                let (a, b) = coefficients(mean, var, epsilon, weight[c0 + ci], bias[c0 + ci]);
                affine(row, a, b, silu);
            }
        });
}

/// Checks the sizes; `None` when there is nothing to normalise, else the length of
/// one group's values and of one channel's.
fn layout(len: usize, params: &GroupNormParams<'_>) -> Option<(usize, usize)> {
    let GroupNormParams {
        batch,
        channels,
        groups,
        weight,
        bias,
        ..
    } = *params;
    assert!(
        channels.is_multiple_of(groups),
        "group_norm: groups must divide channels"
    );
    assert_eq!(weight.len(), channels, "group_norm: weight length");
    assert_eq!(bias.len(), channels, "group_norm: bias length");
    if len == 0 || batch == 0 {
        return None;
    }
    let spatial = len / (batch * channels);
    assert_eq!(len, batch * channels * spatial, "group_norm: input length");
    Some((channels / groups * spatial, spatial))
}

/// `y = x * a + b` with `a = rstd * w`, `b = bias - mean * a`: one channel's
/// normalisation and affine map.
fn coefficients(mean: f64, var: f64, epsilon: f64, w: f32, bias: f32) -> (f32, f32) {
    let rstd = 1.0 / (var + epsilon).sqrt();
    let a = rstd * w as f64;
    (a as f32, (bias as f64 - mean * a) as f32)
}

/// [`group_norm`] out of place: `dst` receives the result and `src` is only read, so a
/// tensor that is still needed (a residual) is not copied first. `dst` may be
/// uninitialised (a new buffer's spare capacity); all of it is written.
///
/// # Shapes
/// - `src`, `dst`: `[batch, channels, spatial]`, row-major
///
/// # Panics
/// As [`group_norm`], and when `dst` and `src` differ in length.
pub fn group_norm_into(
    src: &[f32],
    dst: &mut [std::mem::MaybeUninit<f32>],
    params: &GroupNormParams<'_>,
) {
    let _prof = crate::profile::scope("group_norm");
    assert_eq!(src.len(), dst.len(), "group_norm: output length");
    let Some((group_len, spatial)) = layout(src.len(), params) else {
        return;
    };
    let GroupNormParams {
        channels,
        groups,
        weight,
        bias,
        epsilon,
        silu,
        ..
    } = *params;
    let per_group = channels / groups;
    dst.par_chunks_mut(group_len)
        .zip(src.par_chunks(group_len))
        .enumerate()
        .for_each(|(g, (out, chunk))| {
            let c0 = (g % groups) * per_group;
            let (mean, var) = mean_var(chunk);
            for (ci, (o, row)) in out
                .chunks_mut(spatial)
                .zip(chunk.chunks(spatial))
                .enumerate()
            {
                let (a, b) = coefficients(mean, var, epsilon, weight[c0 + ci], bias[c0 + ci]);
                // One channel's row (a few KB): copied, then transformed while in L1.
                for (d, v) in o.iter_mut().zip(row) {
                    d.write(*v);
                }
                // SAFETY: every element of `o` was just written.
                let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                affine(o, a, b, silu);
            }
        });
}

fn mean_var(x: &[f32]) -> (f64, f64) {
    simd_dispatch!(avx2, mean_var_generic, (x: &[f32]) -> (f64, f64))
}

#[inline(always)]
fn mean_var_generic(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v) / n;
    let m = mean as f32;
    (mean, lane_sum(x, |v| (v - m) * (v - m)) / n)
}

/// `Σ f(x_i)`: eight f32 lanes over runs of 1024 values, each run folded into f64, so
/// the sum vectorises and stays accurate for large groups.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut sum = 0.0f64;
    for run in x.chunks(1024) {
        let mut acc = [0.0f32; 8];
        let mut chunks = run.chunks_exact(8);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += f(*v);
            }
        }
        sum += acc.iter().map(|v| *v as f64).sum::<f64>()
            + chunks.remainder().iter().map(|v| f(*v) as f64).sum::<f64>();
    }
    sum
}

fn affine(x: &mut [f32], a: f32, b: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if exp::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp::x86::affine(x, a, b, silu) };
    }
    affine_generic(x, a, b, silu)
}

#[inline(always)]
fn affine_generic(x: &mut [f32], a: f32, b: f32, silu: bool) {
    if silu {
        for v in x {
            let y = *v * a + b;
            *v = y / (1.0 + exp::exp(-y));
        }
    } else {
        for v in x {
            *v = *v * a + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_computation() {
        let (batch, channels, groups, spatial) = (2, 6, 3, 37);
        let x: Vec<f32> = (0..batch * channels * spatial)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 3.0)
            .collect();
        let weight: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 * 0.1).collect();
        let bias: Vec<f32> = (0..channels).map(|c| c as f32 * -0.2).collect();
        for silu in [false, true] {
            let params = GroupNormParams {
                batch,
                channels,
                groups,
                weight: &weight,
                bias: &bias,
                epsilon: 1e-5,
                silu,
            };
            let mut ours = x.clone();
            group_norm(&mut ours, &params);
            let mut out_of_place = Vec::with_capacity(x.len());
            group_norm_into(
                &x,
                &mut out_of_place.spare_capacity_mut()[..x.len()],
                &params,
            );
            // SAFETY: group_norm_into wrote all x.len() values.
            unsafe { out_of_place.set_len(x.len()) };
            assert_eq!(ours, out_of_place);
            let per = channels / groups * spatial;
            for (g, chunk) in x.chunks(per).enumerate() {
                let n = chunk.len() as f64;
                let mean = chunk.iter().map(|v| *v as f64).sum::<f64>() / n;
                let var = chunk
                    .iter()
                    .map(|v| (*v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for (i, v) in chunk.iter().enumerate() {
                    let c = (g % groups) * (channels / groups) + i / spatial;
                    let mut y = (*v as f64 - mean) / (var + 1e-5).sqrt() * weight[c] as f64
                        + bias[c] as f64;
                    if silu {
                        y /= 1.0 + (-y).exp();
                    }
                    let got = ours[g * per + i] as f64;
                    assert!((got - y).abs() < 2e-6, "silu={silu} {got} vs {y}");
                }
            }
        }
    }
}
