//! Fully connected layers, `y = x wᵀ + b`, as single-threaded GEMMs (the `gemm`
//! crate) over blocks of rows, or of output columns when there are few rows, run in
//! parallel; each destination starts as the bias, so the bias add costs no pass.

use rayon::prelude::*;

use super::panel_gemm::{self, Epilogue, PackedWeight, StreamPart};

/// Fewest rows for which packing the weight into panels pays (below, the `gemm`
/// crate over the few rows is as fast).
const PANEL_MIN_ROWS: usize = 8;

/// The product through [`panel_gemm`] when the CPU and the operands allow it.
fn panel_linear(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
) -> Option<Vec<f32>> {
    if !(panel_gemm::available()
        && x.col_stride == 1
        && x.row_stride >= 0
        && rows >= PANEL_MIN_ROWS)
    {
        return None;
    }
    let packed = PackedWeight::pack(weight, d_out, d_in, bias, epilogue);
    Some(packed.matmul(x, rows))
}

/// A matrix operand: values and the element strides of its rows and columns.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// Values; element `(r, c)` is at `r * row_stride + c * col_stride`.
    pub data: &'a [f32],
    /// Stride between rows.
    pub row_stride: isize,
    /// Stride between columns.
    pub col_stride: isize,
}

/// `y = x wᵀ + b`.
///
/// # Shapes
/// - `x`: `[rows, d_in]` (any strides), `weight`: `[d_out, d_in]` as PyTorch stores it
///   (any strides), `bias`: `[d_out]`
/// - returns `[rows, d_out]`, row-major
///
/// # Panics
/// When an operand's slice is too short for its shape and strides (a caller bug).
#[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
pub fn linear(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let part = StreamPart {
        weight,
        d_out,
        bias,
        residual: None,
    };
    one(linear_many(x, rows, d_in, &[part]))
}

/// `y = x wᵀ + b + residual`: the residual add of a transformer block folded into
/// the product (the output starts as `residual + b`), so it costs no pass of its own.
///
/// # Shapes
/// As [`linear`]; `residual`: `[rows, d_out]`, row-major.
///
/// # Panics
/// As [`linear`], and when `residual` is shorter than `rows * d_out`.
#[cfg_attr(not(test), allow(dead_code))]
pub fn linear_residual(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    bias: Option<&[f32]>,
    residual: &[f32],
) -> Vec<f32> {
    let part = StreamPart {
        weight,
        d_out,
        bias,
        residual: Some(residual),
    };
    one(linear_many(x, rows, d_in, &[part]))
}

/// The only product of a one-part [`linear_many`].
#[cfg_attr(not(any(test, feature = "bench-internals")), allow(dead_code))]
fn one(mut outs: Vec<Vec<f32>>) -> Vec<f32> {
    outs.pop().expect("one output per part")
}

/// Several products of the same rows, `[x w_iᵀ + b_i (+ residual_i)]` (attention's
/// `q`, `k`, `v`): on AVX-512 CPUs with few rows one streamed pass over all the
/// weights ([`panel_gemm::linear_streamed`]), else [`linear`] per weight.
///
/// # Shapes
/// - `x`: `[rows, d_in]`; each part as [`linear_residual`]'s operands; returns one
///   `[rows, part.d_out]` buffer per part
///
/// # Panics
/// As [`linear`], for any part.
pub fn linear_many(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    parts: &[StreamPart<'_>],
) -> Vec<Vec<f32>> {
    let _prof = crate::profile::scope("linear");
    for p in parts {
        check(x, rows, d_in, p.weight, p.d_out, p.bias);
        if let Some(r) = p.residual {
            assert!(r.len() >= rows * p.d_out, "linear: residual too short");
        }
    }
    if (PANEL_MIN_ROWS..=panel_gemm::STREAMED_MAX_ROWS).contains(&rows)
        && let Some(outs) = panel_gemm::linear_streamed(x, rows, d_in, parts)
    {
        return outs;
    }
    parts
        .iter()
        .map(|p| linear_gemm(x, rows, d_in, p.weight, p.d_out, p.bias, p.residual))
        .collect()
}

/// One product through the `gemm` crate (operands checked by the caller).
fn linear_gemm(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let len = rows * d_out;
    // With a bias or a residual the output starts as their sum (the GEMMs accumulate
    // onto it); without, the GEMMs run with `accumulate` off and write every
    // element, so the buffer is not zeroed first (that cost a pass over 10-40 MB per
    // call).
    let mut out = match (bias, residual) {
        (None, None) => Vec::with_capacity(len),
        (Some(b), None) => b.repeat(rows),
        (None, Some(r)) => r[..len].to_vec(),
        (Some(b), Some(r)) => {
            let mut v = Vec::with_capacity(len);
            for row in r[..len].chunks_exact(d_out) {
                v.extend(row.iter().zip(b).map(|(r, b)| r + b));
            }
            v
        }
    };
    let ptr = super::SharedMut::capacity(&mut out);
    let threads = rayon::current_num_threads().max(1);
    let accumulate = bias.is_some() || residual.is_some();
    if len == 0 {
        // Nothing to compute.
    } else if rows * d_in * d_out < 1 << 20 || threads == 1 {
        // SAFETY: `out` has room for rows x d_out values (capacity or length).
        unsafe { linear_into(ptr.at(0), x, rows, d_in, weight, d_out, accumulate) };
    } else if rows >= 2 * threads
        // Every single-threaded GEMM packs both of its operands. Blocks of rows
        // each pack the whole weight; blocks of columns each pack the whole input:
        // split the operand whose copies cost less (one task per thread, so nothing
        // is packed more often than needed).
        && threads * d_out * d_in + rows * d_in <= threads * rows * d_in + d_out * d_in
    {
        let block = rows.div_ceil(threads);
        (0..rows.div_ceil(block)).into_par_iter().for_each(|i| {
            let r0 = i * block;
            let x_block = Matrix {
                data: &x.data[(r0 as isize * x.row_stride) as usize..],
                ..x
            };
            let n = block.min(rows - r0);
            // SAFETY: rows r0..r0 + n of the output, disjoint between tasks.
            unsafe {
                linear_into(
                    ptr.at(r0 * d_out),
                    x_block,
                    n,
                    d_in,
                    weight,
                    d_out,
                    accumulate,
                )
            };
        });
    } else {
        // Few rows (the text encoder's 77 tokens): split the output columns instead,
        // so each thread packs only its share of the weight.
        let cols = d_out.div_ceil(threads);
        (0..threads).into_par_iter().for_each(|t| {
            let c0 = t * cols;
            if c0 >= d_out {
                return;
            }
            let n = cols.min(d_out - c0);
            // SAFETY: column block c0..c0 + n of the [rows, d_out] output, disjoint
            // between threads; the weight rows c0..c0 + n.
            unsafe {
                super::Gemm {
                    m: rows,
                    n,
                    k: d_in,
                    dst: ptr.at(c0),
                    dst_rs: d_out as isize,
                    accumulate,
                    lhs: x.data.as_ptr(),
                    lhs_rs: x.row_stride,
                    lhs_cs: x.col_stride,
                    rhs: weight.data.as_ptr().offset(c0 as isize * weight.row_stride),
                    rhs_rs: weight.col_stride,
                    rhs_cs: weight.row_stride,
                    scale: 1.0,
                }
                .run();
            }
        });
    }
    // SAFETY: every path above wrote all rows x d_out values (or there are none).
    unsafe { out.set_len(len) };
    out
}

fn check(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    bias: Option<&[f32]>,
) {
    let extent = |m: &Matrix<'_>, r: usize, c: usize| {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * m.row_stride as usize + (c - 1) * m.col_stride as usize + 1
        }
    };
    assert!(
        x.data.len() >= extent(&x, rows, d_in),
        "linear: input too short"
    );
    assert!(
        weight.data.len() >= extent(&weight, d_out, d_in),
        "linear: weight too short"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), d_out, "linear: bias length");
    }
}

/// GEGLU feed-forward input: `y = a * gelu(b)` where `[a, b] = x wᵀ + bias`, computed
/// in blocks of rows through a per-thread scratch, so the `2 * inner` wide
/// projection is never materialised.
///
/// # Shapes
/// - `x`: `[rows, d_in]`, `weight`: `[2 * inner, d_in]`, `bias`: `[2 * inner]`
/// - returns `[rows, inner]`
pub fn linear_geglu(
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    inner: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let _prof = crate::profile::scope("linear_geglu");
    let d_out = 2 * inner;
    check(x, rows, d_in, weight, d_out, bias);
    if let Some(out) = panel_linear(x, rows, d_in, weight, d_out, bias, Epilogue::Geglu) {
        return out;
    }
    let mut out = vec![0.0f32; rows * inner];
    let block = 64;
    out.par_chunks_mut(block * inner).enumerate().for_each_init(
        || vec![0.0f32; block * d_out],
        |scratch, (i, dst)| {
            let r0 = i * block;
            let n_rows = dst.len() / inner;
            let x_block = Matrix {
                data: &x.data[(r0 as isize * x.row_stride) as usize..],
                ..x
            };
            let h = &mut scratch[..n_rows * d_out];
            if let Some(b) = bias {
                for row in h.chunks_mut(d_out) {
                    row.copy_from_slice(b);
                }
            }
            // SAFETY: `h` holds n_rows x d_out values (the bias when there is one).
            unsafe {
                linear_into(
                    h.as_mut_ptr(),
                    x_block,
                    n_rows,
                    d_in,
                    weight,
                    d_out,
                    bias.is_some(),
                )
            };
            for (o, row) in dst.chunks_mut(inner).zip(h.chunks(d_out)) {
                let (a, b) = row.split_at(inner);
                super::geglu::geglu_into(o, a, b);
            }
        },
    );
    out
}

/// One single-threaded GEMM `dst = x wᵀ (+ dst when accumulate)` into `dst`
/// (`[rows, d_out]`, prefilled with the bias by the callers that have one).
///
/// # Safety
/// `dst` must address `rows * d_out` values (initialised when `accumulate`) that no
/// one else touches meanwhile; `x` and `weight` must cover their shapes.
unsafe fn linear_into(
    dst: *mut f32,
    x: Matrix<'_>,
    rows: usize,
    d_in: usize,
    weight: Matrix<'_>,
    d_out: usize,
    accumulate: bool,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        super::Gemm {
            m: rows,
            n: d_out,
            k: d_in,
            dst,
            dst_rs: d_out as isize,
            accumulate,
            lhs: x.data.as_ptr(),
            lhs_rs: x.row_stride,
            lhs_cs: x.col_stride,
            rhs: weight.data.as_ptr(),
            rhs_rs: weight.col_stride,
            rhs_cs: weight.row_stride,
            scale: 1.0,
        }
        .run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_product_for_both_weight_layouts() {
        // Small (one GEMM), many rows (row blocks), few rows (the streamed panel
        // kernel on AVX-512 CPUs: partial panels, k tails, transposed and in-place
        // panels), rows past the streamed kernel's limit (column blocks).
        for (rows, d_in, d_out) in [
            (37, 19, 23),
            (600, 64, 40),
            (77, 128, 130),
            (77, 40, 64),
            (300, 64, 1000),
        ] {
            check_product(rows, d_in, d_out);
        }
    }

    fn check_product(rows: usize, d_in: usize, d_out: usize) {
        let x: Vec<f32> = (0..rows * d_in)
            .map(|i| (i % 13) as f32 * 0.1 - 0.6)
            .collect();
        let w: Vec<f32> = (0..d_out * d_in)
            .map(|i| (i % 7) as f32 * 0.2 - 0.5)
            .collect();
        let b: Vec<f32> = (0..d_out).map(|i| i as f32 * 0.01).collect();
        let wt: Vec<f32> = (0..d_in * d_out)
            .map(|k| w[(k % d_out) * d_in + k / d_out])
            .collect();
        let xm = Matrix {
            data: &x,
            row_stride: d_in as isize,
            col_stride: 1,
        };
        let row_major = Matrix {
            data: &w,
            row_stride: d_in as isize,
            col_stride: 1,
        };
        let transposed = Matrix {
            data: &wt,
            row_stride: 1,
            col_stride: d_out as isize,
        };
        for weight in [row_major, transposed] {
            for bias in [None, Some(b.as_slice())] {
                let y = linear(xm, rows, d_in, weight, d_out, bias);
                for r in 0..rows {
                    for o in 0..d_out {
                        let want: f32 = (0..d_in)
                            .map(|i| x[r * d_in + i] * w[o * d_in + i])
                            .sum::<f32>()
                            + bias.map_or(0.0, |b| b[o]);
                        let got = y[r * d_out + o];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{rows}x{d_in}->{d_out} ({r}, {o})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn many_products_equal_one_at_a_time() {
        let d_in = 40;
        for rows in [77, 300] {
            let x: Vec<f32> = (0..rows * d_in)
                .map(|i| (i % 13) as f32 * 0.1 - 0.6)
                .collect();
            let xm = Matrix {
                data: &x,
                row_stride: d_in as isize,
                col_stride: 1,
            };
            let ws: Vec<Vec<f32>> = [64, 33, 96]
                .iter()
                .map(|&d_out| {
                    (0..d_out * d_in)
                        .map(|i| (i % 7) as f32 * 0.2 - 0.5)
                        .collect()
                })
                .collect();
            let bias: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
            let residual: Vec<f32> = (0..rows * 96).map(|i| (i % 5) as f32).collect();
            let parts: Vec<StreamPart<'_>> = ws
                .iter()
                .zip([64, 33, 96])
                .enumerate()
                .map(|(i, (w, d_out))| StreamPart {
                    weight: Matrix {
                        data: w,
                        row_stride: d_in as isize,
                        col_stride: 1,
                    },
                    d_out,
                    bias: (i == 0).then_some(bias.as_slice()),
                    residual: (i == 2).then_some(residual.as_slice()),
                })
                .collect();
            let many = linear_many(xm, rows, d_in, &parts);
            for (p, got) in parts.iter().zip(&many) {
                let want = match p.residual {
                    Some(r) => linear_residual(xm, rows, d_in, p.weight, p.d_out, p.bias, r),
                    None => linear(xm, rows, d_in, p.weight, p.d_out, p.bias),
                };
                assert_eq!(got, &want, "{rows} rows, {} outputs", p.d_out);
            }
        }
    }
}
