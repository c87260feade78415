//! 3x3, stride-1, padding-1 convolutions by Winograd's minimal filtering
//! F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016): each 4x4 block of outputs comes from a 6x6 block of inputs with 36
//! multiplications per channel pair instead of 144, so the GEMM work is a quarter of
//! im2col's.
//!
//! Per call: the filters are transformed once (`U = G g Gᵀ`, `[36, c_out, c_in]`);
//! then bands of tile rows run in parallel, each transforming its inputs
//! (`V = Bᵀ d B`, `[36, c_in, tiles]`), doing 36 single-threaded GEMMs
//! `M[ξ] = U[ξ] · V[ξ]` and transforming back (`Y = Aᵀ M A`, plus the bias). The
//! transforms use the interpolation points 0, ±1, ±2 and ∞; in f32 the results differ
//! from a direct convolution by a few 1e-6 relative (unit tests and the parity tests
//! against diffusers).
//!
//! The filter transform costs `36 · c_out · c_in` floats of scratch and is paid on
//! every call, so [`applies`] keeps Winograd to layers with enough tiles to amortise
//! it (at SD 1.5's 512x512 with guidance: the U-Net's 64x64, 32x32 and 16x16 levels,
//! and all of the VAE); the rest take im2col. Scratch comes from the kernels' pool
//! (fresh tens of MB cost more in page faults than the arithmetic).
//!
//! Measured on the 2-core EPYC (criterion `conv3x3` group, ms, im2col -> Winograd):
//! 320 ch 64x64 batch 2: 109 -> 39; 640 ch 32x32 b2: 100 -> 41; 1280 ch 16x16 b2:
//! 102 -> 73; 1280 ch 8x8 b2: 26 -> 60 (so not used there); VAE 512 ch 64x64: 150 ->
//! 48; 256 ch 256x256: 600 -> 231.

// The transforms index several small arrays by the same lane/row number.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::conv::{ConvAdd, ConvShape};

/// Output pixels per tile side.
const M: usize = 4;
/// Input pixels per tile side.
const T: usize = 6;
/// Transform-domain points per tile.
const XI: usize = T * T;
/// Bytes of `V` + `M` scratch per band.
const BAND_BYTES: usize = 32 << 20;
/// Bytes of transformed filters per block of output channels.
const FILTER_BYTES: usize = 32 << 20;
/// Fewest tiles (over the batch) for which the filter transform pays off.
const MIN_TILES: usize = 32;

/// Whether `s` is a convolution this kernel computes, and one large enough for it to
/// be faster than im2col.
pub fn applies(s: &ConvShape) -> bool {
    s.kh == 3
        && s.kw == 3
        && s.stride == [1, 1]
        && s.padding == [1; 4]
        && s.batch * s.h.div_ceil(M) * s.w.div_ceil(M) >= MIN_TILES
}

/// Tiles (or channels) transformed at once, one per SIMD lane.
const L: usize = 8;
type Lanes = [f32; L];

/// `Bᵀ d` for one column (or `d B` for one row) of 6x6 input tiles, lane-wise.
#[inline(always)]
fn input_1d(d: &[Lanes; T]) -> [Lanes; T] {
    let mut o = [[0.0; L]; T];
    for l in 0..L {
        let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
        o[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        o[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        o[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        o[3][l] = -2.0 * (d1 - d3) - d2 + d4;
        o[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        o[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    o
}

/// `G g` for one column (or `g Gᵀ` for one row) of 3x3 filters, lane-wise.
#[inline(always)]
fn filter_1d(g: &[Lanes; 3]) -> [Lanes; T] {
    const Q: f32 = 1.0 / 4.0;
    const S: f32 = 1.0 / 6.0;
    const TW: f32 = 1.0 / 12.0;
    const TF: f32 = 1.0 / 24.0;
    let mut o = [[0.0; L]; T];
    for l in 0..L {
        let (g0, g1, g2) = (g[0][l], g[1][l], g[2][l]);
        o[0][l] = Q * g0;
        o[1][l] = -S * (g0 + g1 + g2);
        o[2][l] = -S * (g0 - g1 + g2);
        o[3][l] = TF * g0 + TW * g1 + S * g2;
        o[4][l] = TF * g0 - TW * g1 + S * g2;
        o[5][l] = g2;
    }
    o
}

/// `Aᵀ m` for one column (or `m A` for one row) of 6x6 product tiles, lane-wise.
#[inline(always)]
fn output_1d(m: &[Lanes; T]) -> [Lanes; M] {
    let mut o = [[0.0; L]; M];
    for l in 0..L {
        let (s12, d12) = (m[1][l] + m[2][l], m[1][l] - m[2][l]);
        let (s34, d34) = (m[3][l] + m[4][l], m[3][l] - m[4][l]);
        o[0][l] = m[0][l] + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m[5][l];
    }
    o
}

/// Writes the first `n` lanes to `dst`: all eight as one fixed-size copy (vector
/// moves) in the common case, since a variable-length copy calls `memcpy`, which
/// cost 9 % of a U-Net step for these 32-byte copies.
///
/// # Safety
/// `dst` must be valid for `n` writes.
#[inline(always)]
unsafe fn store_lanes(lanes: &Lanes, dst: *mut f32, n: usize) {
    // SAFETY: the caller's.
    unsafe {
        match n {
            L => dst.cast::<Lanes>().write_unaligned(*lanes),
            // Rows of 4 tiles (16x16 images).
            4 => dst
                .cast::<[f32; 4]>()
                .write_unaligned([lanes[0], lanes[1], lanes[2], lanes[3]]),
            _ => std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n),
        }
    }
}

/// `U[ξ][k][c] = (G g_kc Gᵀ)[ξ]`, `[36, c_out, c_in]`; lanes are 8 input channels.
/// `weight` holds the `c_out` filters `[c_out, c_in, 3, 3]` to transform, `u` at least
/// `36 * c_out * c_in` floats.
fn transform_filters(weight: &[f32], c_out: usize, c_in: usize, u: &mut [f32]) {
    let plane = c_out * c_in;
    assert!(u.len() >= XI * plane && weight.len() >= c_out * c_in * 9);
    let ptr = super::SharedMut::slice(u);
    (0..c_out).into_par_iter().for_each(|k| {
        for c0 in (0..c_in).step_by(L) {
            let n = L.min(c_in - c0);
            // g[ky][kx][lane]
            let mut g = [[[0.0f32; L]; 3]; 3];
            for l in 0..n {
                let at = (k * c_in + c0 + l) * 9;
                for ky in 0..3 {
                    for kx in 0..3 {
                        g[ky][kx][l] = weight[at + ky * 3 + kx];
                    }
                }
            }
            let cols: [[Lanes; T]; 3] =
                std::array::from_fn(|kx| filter_1d(&[g[0][kx], g[1][kx], g[2][kx]]));
            for i in 0..T {
                let row = filter_1d(&[cols[0][i], cols[1][i], cols[2][i]]);
                for (j, lanes) in row.iter().enumerate() {
                    // SAFETY: elements (i*6+j, k, c0..c0+n) of u; each k is
                    // written by one task.
                    unsafe { store_lanes(lanes, ptr.at((i * T + j) * plane + k * c_in + c0), n) };
                }
            }
        }
    });
}

/// Writes `V[ξ][c][p]` of input channel `c` for the band of global tile rows
/// `g0..g0 + rows` (tile row `g` is row `g % tiles_h` of image `g / tiles_h`), `p =
/// (g - g0) * tiles_w + tx`; lanes are 8 neighbouring tiles of a row.
///
/// # Safety
/// `v` must address the band's `[36, c_in, rows * tiles_w]` scratch; channel `c`'s
/// elements must not be written by anyone else meanwhile.
unsafe fn transform_inputs(
    x: &[f32],
    v: *mut f32,
    s: &ConvShape,
    c: usize,
    g0: usize,
    rows: usize,
) {
    let (h, w, c_in) = (s.h, s.w, s.c_in);
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let p_n = rows * tw;
    {
        for r in 0..rows {
            let (b, ty) = ((g0 + r) / th, (g0 + r) % th);
            let src = &x[(b * c_in + c) * h * w..(b * c_in + c + 1) * h * w];
            let y0 = (ty * M) as isize - 1;
            for tx0 in (0..tw).step_by(L) {
                let n = L.min(tw - tx0);
                let x0 = (tx0 * M) as isize - 1;
                // d[i][j][lane]: input (y0 + i, x0 + 4 * lane + j), zero outside.
                let mut d = [[[0.0f32; L]; T]; T];
                let interior = x0 >= 0 && x0 as usize + M * (L - 1) + T <= w;
                for (i, di) in d.iter_mut().enumerate() {
                    let y = y0 + i as isize;
                    if y < 0 || y >= h as isize {
                        continue;
                    }
                    let row = &src[y as usize * w..(y as usize + 1) * w];
                    if interior {
                        let row = &row[x0 as usize..];
                        for (j, dij) in di.iter_mut().enumerate() {
                            for (l, e) in dij.iter_mut().enumerate() {
                                *e = row[M * l + j];
                            }
                        }
                    } else {
                        for (j, dij) in di.iter_mut().enumerate() {
                            for (l, e) in dij.iter_mut().enumerate().take(n) {
                                let xx = x0 + (M * l + j) as isize;
                                if xx >= 0 && xx < w as isize {
                                    *e = row[xx as usize];
                                }
                            }
                        }
                    }
                }
                let cols: [[Lanes; T]; T] =
                    std::array::from_fn(|j| input_1d(&std::array::from_fn(|i| d[i][j])));
                let p = r * tw + tx0;
                for i in 0..T {
                    let out = input_1d(&std::array::from_fn(|j| cols[j][i]));
                    for (j, lanes) in out.iter().enumerate() {
                        let at = ((i * T + j) * c_in + c) * p_n + p;
                        // SAFETY: within the scratch, channel c's part (caller).
                        unsafe { store_lanes(lanes, v.add(at), n) };
                    }
                }
            }
        }
    }
}

/// Adds the bias (`table[b, k]`) and the residual (same layout as `out`), if any, to
/// `Aᵀ M A` of output channel `k`'s tiles in the band of global tile rows
/// `g0..g0 + rows` and writes them into `out` (`[batch, c_out, h, w]`); `M`
/// (`[36, kn, tiles]`) holds output channels `block = (k0, kn)`.
///
/// # Safety
/// `out` must address the whole output; channel `k`'s planes must not be written by
/// anyone else in these rows.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_outputs(
    m: &[f32],
    out: *mut f32,
    (table, residual): (&[f32], Option<&[f32]>),
    s: &ConvShape,
    k: usize,
    block: (usize, usize),
    g0: usize,
    rows: usize,
) {
    let (h, w, c_out) = (s.h, s.w, s.c_out);
    // M holds output channels k0..k0 + kn.
    let (k0, kn) = block;
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let p_n = rows * tw;
    for r in 0..rows {
        let (b, ty) = ((g0 + r) / th, (g0 + r) % th);
        let plane_at = (b * c_out + k) * h * w;
        // SAFETY: the plane of (b, k) (caller).
        let out = unsafe { out.add(plane_at) };
        let bias = table[b * c_out + k];
        let residual = residual.map(|r| &r[plane_at..plane_at + h * w]);
        let oy0 = ty * M;
        for tx0 in (0..tw).step_by(L) {
            let n = L.min(tw - tx0);
            let p = r * tw + tx0;
            let load = |xi: usize| -> Lanes {
                let at = (xi * kn + k - k0) * p_n + p;
                // Fixed-size copies (vector moves; a variable length calls memcpy).
                let mut lanes = [0.0; L];
                match n {
                    L => lanes = m[at..at + L].try_into().expect("L lanes"),
                    4 => lanes[..4].copy_from_slice(&m[at..at + 4]),
                    _ => lanes[..n].copy_from_slice(&m[at..at + n]),
                }
                lanes
            };
            let cols: [[Lanes; M]; T] =
                std::array::from_fn(|j| output_1d(&std::array::from_fn(|i| load(i * T + j))));
            for i in 0..M.min(h - oy0) {
                let row = output_1d(&std::array::from_fn(|j| cols[j][i]));
                let y = oy0 + i;
                for l in 0..n {
                    let ox0 = (tx0 + l) * M;
                    for (j, lanes) in row.iter().enumerate().take(M.min(w - ox0)) {
                        let at = y * w + ox0 + j;
                        let v = lanes[l] + bias;
                        let v = match residual {
                            Some(r) => v + r[at],
                            None => v,
                        };
                        // SAFETY: (y, ox0 + j) is inside the plane (caller).
                        unsafe { *out.add(at) = v };
                    }
                }
            }
        }
    }
}

/// # Shapes
/// - `x`: `[batch, c_in, h, w]`; `weight`: `[c_out, c_in, 3, 3]`; `bias`: `[c_out]`
/// - returns `[batch, c_out, h, w]`
///
/// # Panics
/// When `s` is not a 3x3 stride-1 padding-1 convolution or a slice length does not
/// match it (caller bugs).
#[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
pub fn conv3x3(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    conv3x3_add(x, weight, bias, s, ConvAdd::default())
}

/// [`conv3x3`] plus `add` (see [`ConvAdd`]), added as the output tiles are
/// transformed back.
///
/// # Panics
/// As [`conv3x3`], and when an addend's length does not match.
pub fn conv3x3_add(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: ConvShape,
    add: ConvAdd<'_>,
) -> Vec<f32> {
    let ConvShape {
        batch,
        c_in,
        h,
        w,
        c_out,
        ..
    } = s;
    let _prof = crate::profile::scope("conv3x3_winograd");
    assert!(
        s.kh == 3 && s.kw == 3 && s.stride == [1, 1] && s.padding == [1; 4],
        "winograd: 3x3 stride 1 padding 1 only"
    );
    assert_eq!(x.len(), batch * c_in * h * w, "winograd: input length");
    assert_eq!(weight.len(), c_out * c_in * 9, "winograd: weight length");
    // bias[c] + image_bias[b, c], per image and channel.
    let table = add
        .bias_table(bias, batch, c_out)
        .unwrap_or_else(|| vec![0.0; batch * c_out]);
    if let Some(r) = add.residual {
        assert_eq!(r.len(), batch * c_out * h * w, "winograd: residual length");
    }
    let (th, tw) = (h.div_ceil(M), w.div_ceil(M));
    let tiles = batch * th * tw;
    // Output channels in blocks whose transformed filters (4x the weights) fit the
    // budget; tile rows (over the batch) in bands whose V and M fit it. With one band,
    // V is transformed once for all blocks. The work inside runs in parallel.
    let k_block = (FILTER_BYTES / (XI * c_in * 4)).clamp(1, c_out);
    let per_row = XI * (c_in + k_block) * tw * 4;
    let band_rows = (BAND_BYTES / per_row.max(1)).clamp(1, batch * th);
    let one_band = band_rows == batch * th;
    let plane = h * w;
    // Every element is written below (each output channel's tiles cover its planes),
    // so the output is not zeroed first (a pass over up to 1 GB for the VAE's last
    // layers).
    let len = batch * c_out * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_ptr = super::SharedMut::capacity(&mut out);
    let band_p = band_rows * tw;
    let mut u = super::take_scratch(XI * k_block * c_in);
    let mut v = super::take_scratch(XI * c_in * band_p);
    let mut m = super::take_scratch(XI * k_block * band_p);
    for k0 in (0..c_out).step_by(k_block) {
        let kn = k_block.min(c_out - k0);
        transform_filters(
            &weight[k0 * c_in * 9..(k0 + kn) * c_in * 9],
            kn,
            c_in,
            &mut u,
        );
        for g0 in (0..batch * th).step_by(band_rows) {
            let rows = band_rows.min(batch * th - g0);
            let p_n = rows * tw;
            if !(one_band && k0 > 0) {
                let v_ptr = super::SharedMut::capacity(&mut v);
                // SAFETY: each channel writes its own elements of the band's V.
                (0..c_in)
                    .into_par_iter()
                    .for_each(|c| unsafe { transform_inputs(x, v_ptr.at(0), &s, c, g0, rows) });
            }
            let m_ptr = super::SharedMut::capacity(&mut m);
            let (u, v) = (&u, &v);
            (0..XI).into_par_iter().for_each(|xi| {
                // SAFETY: m[xi] is the [kn, p_n] block of the band's M, written by this
                // task only; u[xi] the [kn, c_in] filters; v[xi] the [c_in, p_n] inputs.
                unsafe {
                    super::Gemm {
                        m: kn,
                        n: p_n,
                        k: c_in,
                        dst: m_ptr.at(xi * kn * p_n),
                        dst_rs: p_n as isize,
                        accumulate: false,
                        lhs: u.as_ptr().add(xi * kn * c_in),
                        lhs_rs: c_in as isize,
                        lhs_cs: 1,
                        rhs: v.as_ptr().add(xi * c_in * p_n),
                        rhs_rs: p_n as isize,
                        rhs_cs: 1,
                        scale: 1.0,
                    }
                    .run();
                }
            });
            let m = &m;
            (k0..k0 + kn).into_par_iter().for_each(|k| {
                // SAFETY: channel k's planes, this band's rows only.
                unsafe {
                    transform_outputs(
                        m,
                        out_ptr.at(0),
                        (&table, add.residual),
                        &s,
                        k,
                        (k0, kn),
                        g0,
                        rows,
                    )
                }
            });
        }
    }
    debug_assert!(tiles > 0 || len == 0);
    // SAFETY: the loops above wrote all `len` elements (every band of tile rows of
    // every block of output channels, each tile clipped to the plane).
    unsafe { out.set_len(len) };
    for buffer in [u, v, m] {
        super::give_scratch(buffer);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(x: &[f32], wt: &[f32], bias: &[f32], s: ConvShape) -> Vec<f64> {
        let mut out = vec![0.0f64; s.batch * s.c_out * s.h * s.w];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..s.h {
                    for ox in 0..s.w {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let iy = (oy + ky) as isize - 1;
                                    let ix = (ox + kx) as isize - 1;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    acc += x[((b * s.c_in + ci) * s.h + iy as usize) * s.w
                                        + ix as usize]
                                        as f64
                                        * wt[((co * s.c_in + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((b * s.c_out + co) * s.h + oy) * s.w + ox] = acc;
                    }
                }
            }
        }
        out
    }

    fn shape(batch: usize, c_in: usize, h: usize, w: usize, c_out: usize) -> ConvShape {
        ConvShape {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            padding: [1; 4],
        }
    }

    #[test]
    fn matches_a_direct_convolution() {
        // Sizes that are and are not multiples of the tile, one tile, several bands.
        for s in [
            shape(2, 5, 9, 7, 6),
            shape(1, 3, 4, 4, 2),
            shape(2, 8, 16, 12, 4),
            shape(1, 2, 1, 5, 3),
            shape(1, 4, 33, 30, 5),
        ] {
            let x: Vec<f32> = (0..s.batch * s.c_in * s.h * s.w)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let wt: Vec<f32> = (0..s.c_out * s.c_in * 9)
                .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..s.c_out).map(|i| i as f32 * 0.1).collect();
            let ours = conv3x3(&x, &wt, Some(&bias), s);
            let want = direct(&x, &wt, &bias, s);
            let scale = want.iter().fold(1.0f64, |a, b| a.max(b.abs()));
            for (a, b) in ours.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * scale,
                    "{s:?}: {a} vs {b} (scale {scale})"
                );
            }
            let no_bias = conv3x3(&x, &wt, None, s);
            for (i, (a, c)) in no_bias.iter().zip(&ours).enumerate() {
                let k = (i / (s.h * s.w)) % s.c_out;
                assert!((a + bias[k] - c).abs() <= 1e-5 * scale as f32);
            }
        }
    }

    #[test]
    fn applies_to_large_same_convolutions_only() {
        assert!(applies(&shape(2, 320, 64, 64, 320)));
        assert!(applies(&shape(1, 512, 512, 512, 512)));
        assert!(applies(&shape(2, 1280, 16, 16, 1280)));
        assert!(!applies(&shape(2, 1280, 8, 8, 1280)));
        let mut strided = shape(1, 64, 64, 64, 64);
        strided.stride = [2, 2];
        strided.padding = [0, 0, 1, 1];
        assert!(!applies(&strided));
    }
}
