//! `y = x wᵀ + b` with the weight packed once per call into panels of 32 output
//! columns, blocks of 192 rows of `x` copied into 12-row tiles, and an AVX-512
//! microkernel (12 rows x 32 columns, 24 accumulators). Used by
//! [`super::linear::linear_geglu`] on CPUs with AVX-512F.
//!
//! What it is for: the GEGLU feed-forward's `a * gelu(gate)` applied to each finished
//! tile. Panel `p` of a GEGLU weight holds `a`'s columns `16p..16p + 16` and the
//! gate's same columns, so one tile yields 16 finished outputs and the `2 * inner`
//! wide projection is never written anywhere; the weight is packed once per call
//! and shared by the threads (the `gemm` crate packs it again in every parallel
//! block). For plain linear layers the `gemm` crate's kernels were faster (8192 x
//! 320 -> 320: 4.9 ms against 5.6 ms here), so they keep it.
//!
//! Measured on a 2-core AVX-512 Xeon: GEGLU projection 8192 x 320 -> 2 x 1280, 61 ms
//! through the `gemm` crate in 64-row blocks, 52 ms here (criterion `linear` group).

#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::linear::Matrix;

/// Output columns per panel (two 16-lane registers).
pub const NR: usize = 32;
/// Rows per microkernel tile.
const MR: usize = 12;
/// Rows per parallel task (a block of `x` re-read from L2 for every panel).
const MC: usize = 192;

/// Whether this CPU runs the AVX-512 kernel.
#[inline]
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What a tile's accumulators become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = x wᵀ + b`: `n` output columns.
    Linear,
    /// GEGLU: the weight has `2 * inner` rows (`a` then the gate); `y = a * gelu(gate)`
    /// with `inner` output columns.
    Geglu,
}

/// A weight `[d_out, d_in]` (PyTorch's layout, any strides) packed into panels:
/// panel `p` holds, for each `k` in `0..d_in`, the 32 values of its output columns
/// (zero for columns past the end), contiguous.
pub struct PackedWeight {
    data: Vec<f32>,
    /// Bias laid out like the panels' columns (zeros where none).
    bias: Vec<f32>,
    d_in: usize,
    /// Output columns the caller sees (`d_out`, or `inner` for GEGLU).
    cols: usize,
    panels: usize,
    epilogue: Epilogue,
}

impl PackedWeight {
    /// Packs `weight` (`[d_out, d_in]`) and `bias` (`[d_out]`). For
    /// [`Epilogue::Geglu`], `d_out` is `2 * inner`.
    ///
    /// # Panics
    /// When `d_out` is odd for GEGLU, or an operand is too short (caller bugs).
    pub fn pack(
        weight: Matrix<'_>,
        d_out: usize,
        d_in: usize,
        bias: Option<&[f32]>,
        epilogue: Epilogue,
    ) -> Self {
        let (cols, half) = match epilogue {
            Epilogue::Linear => (d_out, NR),
            Epilogue::Geglu => {
                assert!(d_out.is_multiple_of(2), "GEGLU weight: odd row count");
                (d_out / 2, NR / 2)
            }
        };
        let panels = cols.div_ceil(half);
        // Weight row (output column) feeding lane `j` of panel `p`, if any.
        let source = move |p: usize, j: usize| -> Option<usize> {
            match epilogue {
                Epilogue::Linear => Some(p * NR + j).filter(|&c| c < cols),
                Epilogue::Geglu => {
                    let c = p * half + j % half;
                    (c < cols).then_some(if j < half { c } else { cols + c })
                }
            }
        };
        let bias = (0..panels * NR)
            .map(|i| match (bias, source(i / NR, i % NR)) {
                (Some(b), Some(o)) => b[o],
                _ => 0.0,
            })
            .collect();
        let mut data = super::take_scratch(panels * d_in * NR);
        data.par_chunks_mut(d_in * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                // k outer: the 32 source rows are read as 32 sequential streams (one
                // cache line serves 16 k) and the panel is written sequentially.
                let src: [Option<isize>; NR] =
                    std::array::from_fn(|j| source(p, j).map(|o| o as isize * weight.row_stride));
                for (k, dst) in panel.chunks_exact_mut(NR).enumerate() {
                    let kc = k as isize * weight.col_stride;
                    for (d, s) in dst.iter_mut().zip(&src) {
                        *d = match s {
                            Some(row) => weight.data[(row + kc) as usize],
                            None => 0.0,
                        };
                    }
                }
            });
        Self {
            data,
            bias,
            d_in,
            cols,
            panels,
            epilogue,
        }
    }

    /// Output columns of the product.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out[r, :] = epilogue(x[r, :] wᵀ + b)` for `rows` rows, in parallel blocks.
    ///
    /// # Shapes
    /// - `x`: `[rows, d_in]` with unit column stride; `out`: `[rows, cols()]`
    ///
    /// # Panics
    /// When [`available`] is false, `x`'s columns are not contiguous or a slice is
    /// too short (caller bugs).
    pub fn matmul_into(&self, x: Matrix<'_>, rows: usize, out: &mut [f32]) {
        assert!(available(), "panel GEMM: the CPU lacks AVX-512F");
        assert_eq!(x.col_stride, 1, "panel GEMM: x needs contiguous rows");
        assert!(
            out.len() >= rows * self.cols,
            "panel GEMM: output too short"
        );
        if rows > 0 {
            let last = (rows - 1) as isize * x.row_stride + self.d_in as isize;
            assert!(
                x.row_stride >= 0 && x.data.len() as isize >= last,
                "panel GEMM: input too short"
            );
        }
        let cols = self.cols;
        let row_blocks = rows.div_ceil(MC);
        // Few rows (the text encoder's 77): split the panels too, so both cores work.
        let threads = rayon::current_num_threads().max(1);
        let groups = (2 * threads)
            .div_ceil(row_blocks.max(1))
            .clamp(1, self.panels);
        let per_group = self.panels.div_ceil(groups);
        let dst = super::SharedMut(out.as_mut_ptr());
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let (r0, p0) = (rb * MC, g * per_group);
            let n = MC.min(rows - r0);
            let panels = p0..(p0 + per_group).min(self.panels);
            let a = &x.data[(r0 as isize * x.row_stride) as usize..];
            // SAFETY: AVX-512F checked above; `a` holds `n` rows of `d_in` values
            // `row_stride` apart; the task writes rows r0..r0 + n of its panels'
            // columns only, inside `out` (asserts above).
            unsafe { self.block(a, x.row_stride as usize, n, panels, dst.at(r0 * cols)) };
        };
        let tasks = row_blocks * groups;
        if tasks > 1 && rows * self.d_in * self.panels * NR >= 1 << 20 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }

    /// Panel `p`'s two 16-column halves and the distance between their rows.
    fn panel(&self, p: usize) -> (*const f32, *const f32, usize) {
        let b = self.data[p * self.d_in * NR..].as_ptr();
        // SAFETY: the panel's second half, inside the panel.
        (b, unsafe { b.add(16) }, NR)
    }

    /// One block of `n <= MC` rows against `panels`; `dst` is the block's first
    /// output row. The block's rows are first copied into tiles of `MR` rows laid out
    /// `[k][MR]`, so the kernel broadcasts from one pointer at fixed offsets.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block(
        &self,
        a: &[f32],
        lda: usize,
        n: usize,
        panels: std::ops::Range<usize>,
        dst: *mut f32,
    ) {
        let k = self.d_in;
        let tiles = n.div_ceil(MR);
        A_TILES.with_borrow_mut(|ap| {
            if ap.len() < tiles * k * MR {
                ap.resize(tiles * k * MR, 0.0);
            }
            for t in 0..tiles {
                let m = MR.min(n - t * MR);
                let tile = &mut ap[t * k * MR..(t + 1) * k * MR];
                for r in 0..m {
                    let row = &a[(t * MR + r) * lda..(t * MR + r) * lda + k];
                    for (kk, v) in row.iter().enumerate() {
                        tile[kk * MR + r] = *v;
                    }
                }
            }
            let mut out = [[0.0f32; NR]; MR];
            for p in panels {
                let (b0, b1, ldb) = self.panel(p);
                let bias = &self.bias[p * NR..(p + 1) * NR];
                for t in 0..tiles {
                    let m = MR.min(n - t * MR);
                    let at = ap[t * k * MR..].as_ptr();
                    let args = (at, b0, b1, ldb, k, bias, &mut out);
                    // SAFETY: the tile holds k x MR values, the panel k rows of two
                    // 16-column halves `ldb` apart.
                    unsafe {
                        match m {
                            12 => kernel::<12>(args),
                            11 => kernel::<11>(args),
                            10 => kernel::<10>(args),
                            9 => kernel::<9>(args),
                            8 => kernel::<8>(args),
                            7 => kernel::<7>(args),
                            6 => kernel::<6>(args),
                            5 => kernel::<5>(args),
                            4 => kernel::<4>(args),
                            3 => kernel::<3>(args),
                            2 => kernel::<2>(args),
                            _ => kernel::<1>(args),
                        }
                    }
                    // SAFETY: rows t*MR.. t*MR + m of the block's output (caller).
                    unsafe { self.store(&out[..m], p, dst.add(t * MR * self.cols)) };
                }
            }
        });
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn block(&self, _: &[f32], _: usize, _: usize, _: std::ops::Range<usize>, _: *mut f32) {
        unreachable!("panel GEMM needs x86-64 AVX-512F")
    }

    /// Writes a finished tile of panel `p` into the rows at `dst` (`cols` apart).
    ///
    /// # Safety
    /// `dst` must address `tile.len()` rows of `cols` values, written by no one else.
    #[inline(always)]
    unsafe fn store(&self, tile: &[[f32; NR]], p: usize, dst: *mut f32) {
        let (c0, w, half) = match self.epilogue {
            Epilogue::Linear => (p * NR, NR.min(self.cols - p * NR), 0),
            Epilogue::Geglu => (p * NR / 2, (NR / 2).min(self.cols - p * NR / 2), NR / 2),
        };
        for (i, t) in tile.iter().enumerate() {
            // SAFETY: columns c0..c0 + w of row i (caller).
            let o = unsafe { std::slice::from_raw_parts_mut(dst.add(i * self.cols + c0), w) };
            match self.epilogue {
                Epilogue::Linear => o.copy_from_slice(&t[..w]),
                Epilogue::Geglu => super::geglu::geglu_into(o, &t[..w], &t[half..half + w]),
            }
        }
    }
}

impl Drop for PackedWeight {
    fn drop(&mut self) {
        super::give_scratch(std::mem::take(&mut self.data));
    }
}

thread_local! {
    /// Each thread's copy of the current block's rows, in kernel tiles.
    static A_TILES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Kernel operands: a tile of `a` (`[k][MR]`), the panel's halves and their row
/// distance, `k`, the panel's bias, and the tile to write.
type KernelArgs<'t> = (
    *const f32,
    *const f32,
    *const f32,
    usize,
    usize,
    &'t [f32],
    &'t mut [[f32; NR]; MR],
);

/// `out[r] = bias + Σ_k a[k][r] · [b0[k], b1[k]]` for the first `R` rows of a tile.
///
/// # Safety
/// AVX-512F must be available; `a` must hold `k * MR` values, `b0` and `b1` `k` rows
/// of 16 values `ldb` apart; `bias` 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const R: usize>((a, b0, b1, ldb, k, bias, out): KernelArgs<'_>) {
    use std::arch::x86_64::*;
    debug_assert!(bias.len() >= NR);
    // SAFETY: every address below is inside the operands (caller).
    unsafe {
        let mut acc0 = [_mm512_loadu_ps(bias.as_ptr()); R];
        let mut acc1 = [_mm512_loadu_ps(bias.as_ptr().add(16)); R];
        let (mut a, mut b0, mut b1) = (a, b0, b1);
        for _ in 0..k {
            let w0 = _mm512_loadu_ps(b0);
            let w1 = _mm512_loadu_ps(b1);
            for r in 0..R {
                let x = _mm512_set1_ps(*a.add(r));
                acc0[r] = _mm512_fmadd_ps(x, w0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(x, w1, acc1[r]);
            }
            a = a.add(MR);
            b0 = b0.add(ldb);
            b1 = b1.add(ldb);
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc0[r]);
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), acc1[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_direct_product() {
        if !available() {
            return;
        }
        for (rows, d_in, d_out) in [(1, 3, 5), (13, 40, 33), (200, 64, 70), (25, 320, 96)] {
            let x = data(rows * (d_in + 3), 1);
            let w = data(d_out * d_in, 2);
            let b = data(d_out, 3);
            let xm = Matrix {
                data: &x,
                row_stride: (d_in + 3) as isize,
                col_stride: 1,
            };
            let wm = Matrix {
                data: &w,
                row_stride: d_in as isize,
                col_stride: 1,
            };
            let direct = |r: usize, o: usize| -> f32 {
                (0..d_in)
                    .map(|i| x[r * (d_in + 3) + i] * w[o * d_in + i])
                    .sum::<f32>()
                    + b[o]
            };
            let packed = PackedWeight::pack(wm, d_out, d_in, Some(&b), Epilogue::Linear);
            let mut y = vec![f32::NAN; rows * d_out];
            packed.matmul_into(xm, rows, &mut y);
            for r in 0..rows {
                for o in 0..d_out {
                    let want = direct(r, o);
                    let got = y[r * d_out + o];
                    let tol = 1e-5 * want.abs().max(10.0);
                    assert!((got - want).abs() < tol, "({r}, {o}): {got} vs {want}");
                }
            }
            if d_out % 2 == 0 {
                let inner = d_out / 2;
                let packed = PackedWeight::pack(wm, d_out, d_in, Some(&b), Epilogue::Geglu);
                let mut y = vec![f32::NAN; rows * inner];
                packed.matmul_into(xm, rows, &mut y);
                for r in 0..rows {
                    for o in 0..inner {
                        let want = direct(r, o) * super::super::geglu::gelu(direct(r, inner + o));
                        let got = y[r * inner + o];
                        // Relative: the products reach a few hundred here.
                        let tol = 1e-5 * want.abs().max(10.0);
                        assert!(
                            (got - want).abs() < tol,
                            "geglu ({r}, {o}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
