//! `y = x wᵀ + b` on CPUs with AVX-512F through one microkernel (12 rows x 32
//! columns, 24 accumulators) over weight panels of 32 output columns laid out
//! `[k][32]` and row tiles laid out `[k][12]`, multiplied in blocks of [`KC`] values
//! of `k` so a panel's block stays in L1 while every tile uses it. Two drivers:
//!
//! - [`PackedWeight`]: the weight packed once per call (16 x 16 register transposes),
//!   blocks of 192 rows in parallel. Used by [`super::linear::linear_geglu`]: panel
//!   `p` of a GEGLU weight holds `a`'s columns `16p..16p + 16` and the gate's same
//!   columns, so one tile yields 16 finished `a * gelu(gate)` outputs and the
//!   `2 * inner` wide projection is never written anywhere. For plain linear layers
//!   with many rows the `gemm` crate's kernels were faster (8192 x 320 -> 320: 4.9 ms
//!   against 5.6 ms here), so they keep it.
//! - [`linear_streamed`]: few rows (the text encoder's 77 tokens, the U-Net's
//!   `2 x 77` context): the weight is packed a block at a time as it streams past,
//!   read from memory once and never written back. The `gemm` crate packed the whole
//!   weight per call, which cost as much as the product.
//!
//! Measured on a 2-core AVX-512 Xeon (criterion `linear` group): GEGLU projection
//! 8192 x 320 -> 2 x 1280, 61 ms through the `gemm` crate in 64-row blocks, 52 ms
//! here; 512 x 1280 -> 2 x 5120 61 -> 54 ms with the `k` blocks; 77 x 3072 -> 768
//! 2.06 -> 1.43 ms and 77 x 768 -> 3072 1.61 -> 1.32 ms streamed.

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
    #[cfg_attr(not(test), allow(dead_code))]
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
        let avx512 = available();
        data.par_chunks_mut(d_in * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                let lanes: [Option<usize>; NR] = std::array::from_fn(|j| source(p, j));
                if avx512 {
                    // SAFETY: AVX-512F checked; the lanes' rows lie inside the weight
                    // (`source`), the panel holds d_in x 32 values.
                    unsafe { pack_lanes(weight, &lanes, 0, d_in, panel) };
                } else {
                    pack_lanes_scalar(weight, &lanes, 0..NR, 0, 0..d_in, panel);
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

    /// `out[r, :] = epilogue(x[r, :] wᵀ + b)` for `rows` rows, in parallel blocks.
    ///
    /// # Shapes
    /// - `x`: `[rows, d_in]` with unit column stride; `out`: `[rows, cols()]`
    ///
    /// # Panics
    /// When [`available`] is false, `x`'s columns are not contiguous or a slice is
    /// too short (caller bugs).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn matmul_into(&self, x: Matrix<'_>, rows: usize, out: &mut [f32]) {
        assert!(
            out.len() >= rows * self.cols,
            "panel GEMM: output too short"
        );
        self.run(x, rows, super::SharedMut::slice(out));
    }

    /// [`Self::matmul_into`] into a new `[rows, cols()]` buffer (not zeroed first:
    /// every element is written once).
    pub fn matmul(&self, x: Matrix<'_>, rows: usize) -> Vec<f32> {
        let len = rows * self.cols;
        let mut out = Vec::with_capacity(len);
        self.run(x, rows, super::SharedMut::capacity(&mut out));
        // SAFETY: `run` wrote all rows x cols values (every panel's columns of every
        // row block).
        unsafe { out.set_len(len) };
        out
    }

    /// The product into `dst`, which must hold `rows * cols()` values.
    fn run(&self, x: Matrix<'_>, rows: usize, dst: super::SharedMut) {
        assert!(available(), "panel GEMM: the CPU lacks AVX-512F");
        assert_eq!(x.col_stride, 1, "panel GEMM: x needs contiguous rows");
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
        let task = |t: usize| {
            let (rb, g) = (t / groups, t % groups);
            let (r0, p0) = (rb * MC, g * per_group);
            let n = MC.min(rows - r0);
            let panels = p0..(p0 + per_group).min(self.panels);
            let a = &x.data[(r0 as isize * x.row_stride) as usize..];
            // SAFETY: AVX-512F checked above; `a` holds `n` rows of `d_in` values
            // `row_stride` apart; the task writes rows r0..r0 + n of its panels'
            // columns only, inside `dst` (the callers' contract).
            unsafe { self.block(a, x.row_stride as usize, n, panels, dst.at(r0 * cols)) };
        };
        let tasks = row_blocks * groups;
        let parallel = tasks > 1 && rows * self.d_in * self.panels * NR >= 1 << 20;
        super::for_each_task(tasks, parallel, || (), |_, t| task(t));
    }

    /// Panel `p`'s first value (its rows are `NR` apart).
    fn panel(&self, p: usize) -> *const f32 {
        self.data[p * self.d_in * NR..].as_ptr()
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
                // SAFETY: AVX-512F (this function's); `a` holds the tile's rows.
                unsafe { pack_rows(&a[t * MR * lda..], lda, m, k, tile) };
            }
            // One tile of outputs per tile of rows: the panel is multiplied in
            // blocks of KC values of k (32 KB of the panel, kept in L1 while every
            // tile uses it), so the tiles accumulate across blocks.
            let mut out = vec![[[0.0f32; NR]; MR]; tiles];
            for p in panels {
                let (b0, ldb) = (self.panel(p), NR);
                let bias = &self.bias[p * NR..(p + 1) * NR];
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let init = if k0 == 0 { Init::Bias(bias) } else { Init::Out };
                    for (t, tile) in out.iter_mut().enumerate() {
                        let m = MR.min(n - t * MR);
                        let at = ap[t * k * MR + k0 * MR..].as_ptr();
                        // SAFETY: the tile holds k x MR values, the panel k rows of
                        // two 16-column halves `ldb` apart; rows k0..k0 + kc of both.
                        unsafe {
                            let b = b0.add(k0 * ldb);
                            tile_kernel(m, (at, b, b.add(16), ldb, kc, init, tile));
                        }
                    }
                }
                for (t, tile) in out.iter().enumerate() {
                    let m = MR.min(n - t * MR);
                    // SAFETY: rows t*MR.. t*MR + m of the block's output (caller).
                    unsafe { self.store(&tile[..m], p, dst.add(t * MR * self.cols)) };
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
            // The output may be uninitialised (`matmul`): finished values are
            // written through the raw pointer only.
            let mut geglu = [0.0f32; NR / 2];
            let row: &[f32] = match self.epilogue {
                Epilogue::Linear => &t[..w],
                Epilogue::Geglu => {
                    super::geglu::geglu_into(&mut geglu[..w], &t[..w], &t[half..half + w]);
                    &geglu[..w]
                }
            };
            // SAFETY: columns c0..c0 + w of row i (caller).
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(i * self.cols + c0), w) };
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
/// distance, `k`, what the accumulators start from, and the tile to write.
type KernelArgs<'t> = (
    *const f32,
    *const f32,
    *const f32,
    usize,
    usize,
    Init<'t>,
    &'t mut [[f32; NR]; MR],
);

/// What a kernel call's accumulators start from.
#[derive(Clone, Copy)]
enum Init<'t> {
    /// The same 32 values (the panel's bias) in every row.
    Bias(&'t [f32]),
    /// The output tile's current values (a later block of `k`).
    Out,
}

/// [`kernel`] for the first `m` (1..=12) rows of a tile.
///
/// # Safety
/// As for [`kernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_kernel(m: usize, args: KernelArgs<'_>) {
    // SAFETY: forwarded to the caller.
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
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(_: usize, _: KernelArgs<'_>) {
    unreachable!("panel GEMM needs x86-64 AVX-512F")
}

/// `out[r] = bias + Σ_k a[k][r] · [b0[k], b1[k]]` for the first `R` rows of a tile.
///
/// # Safety
/// AVX-512F must be available; `a` must hold `k * MR` values, `b0` and `b1` `k` rows
/// of 16 values `ldb` apart; `bias` 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const R: usize>((a, b0, b1, ldb, k, init, out): KernelArgs<'_>) {
    use std::arch::x86_64::*;
    // SAFETY: every address below is inside the operands (caller).
    unsafe {
        let (mut acc0, mut acc1) = match init {
            Init::Bias(bias) => {
                debug_assert!(bias.len() >= NR);
                (
                    [_mm512_loadu_ps(bias.as_ptr()); R],
                    [_mm512_loadu_ps(bias.as_ptr().add(16)); R],
                )
            }
            Init::Out => (
                std::array::from_fn(|r| _mm512_loadu_ps(out[r].as_ptr())),
                std::array::from_fn(|r| _mm512_loadu_ps(out[r].as_ptr().add(16))),
            ),
        };
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

/// Most rows for which [`linear_streamed`] is used: its weight panels are packed once
/// per call and used by every row while they sit in L2, which pays when the rows are
/// few (the text encoder's 77 tokens, the U-Net's `2 x 77` context) and the
/// weight's packing would otherwise cost as much as the product.
pub const STREAMED_MAX_ROWS: usize = 256;

/// Depth of the blocks of `k` [`linear_streamed`] multiplies at a time, so the
/// panel's block (32 KB) and a tile's (12 KB) stay in L1.
pub const KC: usize = 256;

/// One product of [`linear_streamed`]: `x wᵀ + b (+ residual)`.
#[derive(Debug, Clone, Copy)]
pub struct StreamPart<'a> {
    /// `[d_out, d_in]`, any strides.
    pub weight: Matrix<'a>,
    /// Output columns.
    pub d_out: usize,
    /// `[d_out]`.
    pub bias: Option<&'a [f32]>,
    /// `[rows, d_out]`, row-major.
    pub residual: Option<&'a [f32]>,
}

/// `y_i = x w_iᵀ + b_i (+ residual_i)` for few rows (at most [`STREAMED_MAX_ROWS`])
/// and one or more weights (attention's `q`, `k` and `v`): `x` is copied once into
/// 12-row tiles, then each thread walks its share of all the weights' 32-column
/// panels, packing [`KC`] rows of `k` of one panel at a time into L1 (16 x 16
/// register transposes when the weight is stored as PyTorch stores it; read in
/// place when it is stored input-major) and multiplying every tile by them. Each
/// weight is read from memory exactly once and nothing of it is written back.
///
/// Returns `None` when the CPU lacks AVX-512F or `x`'s columns are not contiguous.
///
/// # Shapes
/// - `x`: `[rows, d_in]`; each part as [`StreamPart`] says; returns one
///   `[rows, part.d_out]` buffer per part
pub fn linear_streamed(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    parts: &[StreamPart<'_>],
) -> Option<Vec<Vec<f32>>> {
    if !available()
        || x.col_stride != 1
        || x.row_stride < 0
        || rows == 0
        || parts.iter().any(|p| p.d_out == 0)
    {
        return None;
    }
    let k = d_in;
    // Rows spread evenly over the fewest tiles (77 rows: 7 tiles of 11, no idle
    // lanes), each laid out with MR rows.
    let tiles = rows.div_ceil(MR);
    let tile_rows = rows.div_ceil(tiles);
    let mut a_tiles = vec![0.0f32; tiles * k * MR];
    let pack_tile = |(t, tile): (usize, &mut [f32])| {
        let m = tile_rows.min(rows - t * tile_rows);
        let a = &x.data[(t * tile_rows) * x.row_stride as usize..];
        // SAFETY: AVX-512F checked above; `a` holds the tile's `m` rows.
        unsafe { pack_rows(a, x.row_stride as usize, m, k, tile) };
    };
    // In parallel only when it outweighs handing the work to the pool's threads.
    if rows * k >= 1 << 17 {
        a_tiles
            .par_chunks_mut(k * MR)
            .enumerate()
            .for_each(pack_tile);
    } else {
        a_tiles.chunks_mut(k * MR).enumerate().for_each(pack_tile);
    }
    // Every part's panels in one list: (part, first output column).
    let panel_list: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..p.d_out).step_by(NR).map(move |c0| (i, c0)))
        .collect();
    let padded_bias: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| {
            let mut padded = vec![0.0f32; p.d_out.div_ceil(NR) * NR];
            if let Some(b) = p.bias {
                padded[..p.d_out].copy_from_slice(&b[..p.d_out]);
            }
            padded
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| Vec::with_capacity(rows * p.d_out))
        .collect();
    let dsts: Vec<super::SharedMut> = outs.iter_mut().map(super::SharedMut::capacity).collect();
    let panels = panel_list.len();
    let work: usize = parts.iter().map(|p| rows * d_in * p.d_out).sum();
    let threads = rayon::current_num_threads().max(1);
    // Several groups per thread so a slow core does not hold the others up.
    let per_group = panels.div_ceil(4 * threads).max(1);
    let groups = panels.div_ceil(per_group);
    let task = |g: usize| {
        let range = g * per_group..((g + 1) * per_group).min(panels);
        PANEL.with_borrow_mut(|buf| {
            if buf.len() < KC * NR {
                buf.resize(KC * NR, 0.0);
            }
            let mut tile_out = vec![[[0.0f32; NR]; MR]; tiles];
            for &(part, c0) in &panel_list[range] {
                let StreamPart {
                    weight,
                    d_out,
                    residual,
                    ..
                } = parts[part];
                let dst = &dsts[part];
                let width = NR.min(d_out - c0);
                // In place when the weight is input-major and the panel whole.
                let in_place = weight.row_stride == 1 && width == NR;
                let bias = &padded_bias[part][c0..c0 + NR];
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    // The panel's rows k0..k0 + kc, packed into `buf` (L1) unless
                    // read in place.
                    let (b, ldb) = if in_place {
                        let at = c0 as isize + k0 as isize * weight.col_stride;
                        (
                            weight.data[at as usize..].as_ptr(),
                            weight.col_stride as usize,
                        )
                    } else {
                        let lanes = std::array::from_fn(|j| (j < width).then_some(c0 + j));
                        // SAFETY: AVX-512F checked above; rows c0..c0 + width exist.
                        unsafe { pack_lanes(weight, &lanes, k0, kc, buf) };
                        (buf.as_ptr(), NR)
                    };
                    for t in 0..tiles {
                        let m = tile_rows.min(rows - t * tile_rows);
                        let at = a_tiles[t * k * MR + k0 * MR..].as_ptr();
                        let init = if k0 == 0 { Init::Bias(bias) } else { Init::Out };
                        // SAFETY: AVX-512F checked above; the tile holds kc x MR
                        // values from k0 on, the panel kc rows of 32 values `ldb`
                        // apart.
                        unsafe {
                            let args = (at, b, b.add(16), ldb, kc, init, &mut tile_out[t]);
                            tile_kernel(m, args);
                        }
                    }
                }
                for (t, tile) in tile_out.iter().enumerate() {
                    let m = tile_rows.min(rows - t * tile_rows);
                    for (i, row) in tile[..m].iter().enumerate() {
                        let o = (t * tile_rows + i) * d_out + c0;
                        // SAFETY: columns c0..c0 + width of row t * tile_rows + i, written
                        // by this task only, inside the rows x d_out buffer.
                        unsafe {
                            let out = dst.at(o);
                            match residual {
                                Some(r) => {
                                    for (j, v) in row[..width].iter().enumerate() {
                                        out.add(j).write(v + r[o + j]);
                                    }
                                }
                                None => std::ptr::copy_nonoverlapping(row.as_ptr(), out, width),
                            }
                        }
                    }
                }
            }
        });
    };
    super::for_each_task(groups, groups > 1 && work >= 1 << 18, || (), |_, g| task(g));
    for (out, part) in outs.iter_mut().zip(parts) {
        // SAFETY: every element was written by exactly one task above (each
        // part's panels cover its columns, each tile its rows).
        unsafe { out.set_len(rows * part.d_out) };
    }
    Some(outs)
}

thread_local! {
    /// Each thread's packed weight panel for [`linear_streamed`].
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies `m <= MR` rows of `k` values (rows `lda` apart in `a`) into `tile` laid
/// out `[k][MR]`, the layout the kernel broadcasts from: whole blocks of 16 values
/// by register transposes (lanes past `m` get zeros), the rest one value at a time.
///
/// # Safety
/// AVX-512F must be available; `a` must hold the `m` rows, `tile` `k * MR` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(a: &[f32], lda: usize, m: usize, k: usize, tile: &mut [f32]) {
    static ZEROS: [f32; 16] = [0.0; 16];
    let whole = k / 16 * 16;
    for k0 in (0..whole).step_by(16) {
        let src: [*const f32; 16] = std::array::from_fn(|i| {
            if i < m {
                a[i * lda + k0..i * lda + k0 + 16].as_ptr()
            } else {
                ZEROS.as_ptr()
            }
        });
        // SAFETY: 16 values behind each source; the tile's rows k0..k0 + 16 of MR
        // values (the first 12 lanes stored).
        unsafe { transpose16(src, tile[k0 * MR..].as_mut_ptr(), MR, 0x0fff) };
    }
    for r in 0..m {
        let row = &a[r * lda..r * lda + k];
        for kk in whole..k {
            tile[kk * MR + r] = row[kk];
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_rows(_: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("panel GEMM needs x86-64 AVX-512F")
}

/// Packs columns `k0..k0 + kc` of the weight rows feeding each of a panel's 32
/// lanes (`None`: zeros) into `buf` as `[kc][32]`. Halves of 16 lanes fed by rows
/// with unit column stride go through 16 x 16 register transposes.
///
/// # Safety
/// AVX-512F must be available; every row in `lanes` and columns `k0..k0 + kc` must
/// lie inside `weight`, `buf` hold `kc * 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_lanes(
    weight: Matrix<'_>,
    lanes: &[Option<usize>; NR],
    k0: usize,
    kc: usize,
    buf: &mut [f32],
) {
    let whole = kc / 16 * 16;
    for half in 0..2 {
        let rows = &lanes[half * 16..half * 16 + 16];
        if weight.col_stride != 1 || rows.iter().any(Option::is_none) {
            pack_lanes_scalar(weight, lanes, half * 16..half * 16 + 16, k0, 0..kc, buf);
            continue;
        }
        let base: [isize; 16] = std::array::from_fn(|i| {
            rows[i].unwrap_or(0) as isize * weight.row_stride + k0 as isize
        });
        for kk in (0..whole).step_by(16) {
            // SAFETY: 16 rows of 16 values from column k0 + kk (caller), 16 rows of
            // 16 panel values at offset kk * 32 + 16 * half.
            unsafe {
                let src: [*const f32; 16] =
                    std::array::from_fn(|i| weight.data.as_ptr().offset(base[i] + kk as isize));
                transpose16(src, buf.as_mut_ptr().add(kk * NR + half * 16), NR, 0xffff);
            }
        }
        pack_lanes_scalar(weight, lanes, half * 16..half * 16 + 16, k0, whole..kc, buf);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_lanes(_: Matrix<'_>, _: &[Option<usize>; NR], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("panel GEMM needs x86-64 AVX-512F")
}

/// [`pack_lanes`] one value at a time, for lanes `lanes_packed` and panel rows
/// `rows` of the block starting at column `k0`.
fn pack_lanes_scalar(
    weight: Matrix<'_>,
    lanes: &[Option<usize>; NR],
    lanes_packed: std::ops::Range<usize>,
    k0: usize,
    rows: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    for kk in rows {
        let col = (k0 + kk) as isize * weight.col_stride;
        for j in lanes_packed.clone() {
            buf[kk * NR + j] = match lanes[j] {
                Some(o) => weight.data[(o as isize * weight.row_stride + col) as usize],
                None => 0.0,
            };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose16(_: [*const f32; 16], _: *mut f32, _: usize, _: u16) {
    unreachable!("panel GEMM needs x86-64 AVX-512F")
}

/// Writes the transpose of the 16 x 16 block whose rows start at `src` to `dst`
/// (rows `ld` apart): `dst[j * ld + i] = src[i][j]` for the lanes `i` set in
/// `lanes`.
///
/// # Safety
/// AVX-512F must be available; each `src[i]` must address 16 values, `dst` 16 rows,
/// `ld` apart, of the lanes set in `lanes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(src: [*const f32; 16], dst: *mut f32, ld: usize, lanes: u16) {
    use std::arch::x86_64::*;
    // SAFETY: addresses as documented (caller).
    unsafe {
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src[i]));
        // Pairs of rows interleaved within 128-bit lanes.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Four rows' element j in each 128-bit lane.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
        }
        // 128-bit lanes gathered across row groups.
        let mut v = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            v[j] = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            v[4 + j] = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            v[8 + j] = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            v[12 + j] = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
        }
        for j in 0..8 {
            let lo = _mm512_shuffle_f32x4::<0x88>(v[j], v[8 + j]);
            let hi = _mm512_shuffle_f32x4::<0xDD>(v[j], v[8 + j]);
            _mm512_mask_storeu_ps(dst.add(j * ld), lanes, lo);
            _mm512_mask_storeu_ps(dst.add((j + 8) * ld), lanes, hi);
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
