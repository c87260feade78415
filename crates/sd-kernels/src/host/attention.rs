//! Flash attention on the CPU: `softmax(q kᵀ / sqrt(d)) v` computed in blocks of
//! queries and keys with an online softmax, so no `n_q x n_kv` score matrix is ever
//! held (scratch per worker: one `BLOCK_Q x BLOCK_KV` tile). Both products of a tile
//! go through the `gemm` crate; `exp` is vectorised ([`super::exp`]).

use super::exp;

/// Query rows per task (one task = one batch item, one head, one query block).
const BLOCK_Q: usize = 256;
/// Keys per tile.
const BLOCK_KV: usize = 512;

/// Sizes of one attention call. Queries are `[batch, n_q, heads * head_dim]`, keys and
/// values `[batch, n_kv, heads * head_dim]`, all row-major: the layout of the q/k/v
/// projections' outputs, so heads are read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Number of heads.
    pub heads: usize,
    /// Query positions.
    pub n_q: usize,
    /// Key / value positions.
    pub n_kv: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Causal mask: query `i` sees keys `j <= i + (n_kv - n_q)` (CLIP).
    pub causal: bool,
}

struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
}

/// Multi-head attention with scale `1 / sqrt(head_dim)`.
///
/// # Shapes
/// - `q`: `[batch, n_q, heads * head_dim]`; `k`, `v`: `[batch, n_kv, heads * head_dim]`
/// - returns `[batch, n_q, heads * head_dim]`
///
/// # Panics
/// When a slice's length does not match `shape` (a caller bug).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    let AttentionShape {
        batch,
        heads,
        n_q,
        n_kv,
        head_dim: d,
        ..
    } = shape;
    let _prof = crate::profile::scope(if n_kv == n_q {
        "attention_self"
    } else {
        "attention_cross"
    });
    let width = heads * d;
    assert_eq!(q.len(), batch * n_q * width, "attention: query length");
    assert_eq!(k.len(), batch * n_kv * width, "attention: key length");
    assert_eq!(v.len(), batch * n_kv * width, "attention: value length");
    // Every element is written by exactly one task (one head of one block of
    // queries), so the output is not zeroed first.
    let len = q.len();
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let work = batch * heads * n_q * n_kv * d;
    let parallel = |tasks: usize| tasks > 1 && work >= 1 << 18;
    #[cfg(target_arch = "x86_64")]
    if super::exp::has_avx512() && (!shape.causal || n_kv >= n_q) && !generic_only() {
        use super::attention_avx512::{QB, Scratch, block};
        let q_blocks = n_q.div_ceil(QB);
        let out_ptr = super::SharedMut::capacity(&mut out);
        let run = |scratch: &mut Scratch, task: usize| {
            let Task {
                q0,
                rows,
                q_off,
                kv_off,
            } = Task::new(task, QB, &shape);
            // SAFETY: AVX-512F is available; the task writes rows q0..q0 + rows of
            // head h of batch item b only.
            unsafe {
                block(
                    &q[q_off..],
                    &k[kv_off..],
                    &v[kv_off..],
                    out_ptr.at(q_off),
                    rows,
                    q0,
                    width,
                    shape,
                    scratch,
                )
            };
        };
        let tasks = batch * heads * q_blocks;
        super::for_each_task(tasks, parallel(tasks), || Scratch::new(d), run);
        // SAFETY: the tasks wrote every row of every head of every batch item.
        unsafe { out.set_len(len) };
        return out;
    }
    let q_blocks = n_q.div_ceil(BLOCK_Q);
    let out_ptr = super::SharedMut::capacity(&mut out);
    let tasks = batch * heads * q_blocks;
    let run = |scratch: &mut Scratch, task: usize| {
        let Task {
            q0,
            rows,
            q_off,
            kv_off,
        } = Task::new(task, BLOCK_Q, &shape);
        let out_ptr = out_ptr.at(q_off);
        attention_block(
            &q[q_off..],
            &k[kv_off..],
            &v[kv_off..],
            out_ptr,
            Block {
                rows,
                q0,
                width,
                shape,
            },
            scratch,
        );
    };
    let new_scratch = || Scratch {
        scores: vec![0.0; BLOCK_Q * BLOCK_KV],
        acc: vec![0.0; BLOCK_Q * d],
        row_max: vec![0.0; BLOCK_Q],
        row_sum: vec![0.0; BLOCK_Q],
    };
    super::for_each_task(tasks, parallel(tasks), new_scratch, run);
    // SAFETY: the tasks wrote every row of every head of every batch item.
    unsafe { out.set_len(len) };
    out
}

/// Where one task (one batch item, one head, one block of queries) works: tasks run
/// over blocks of `block` queries, then heads, then batch items.
struct Task {
    /// First query of the block.
    q0: usize,
    /// Queries in the block.
    rows: usize,
    /// Offset of the block's first query (and output) element of the head.
    q_off: usize,
    /// Offset of the head's first key / value element.
    kv_off: usize,
}

impl Task {
    fn new(task: usize, block: usize, s: &AttentionShape) -> Self {
        let q_blocks = s.n_q.div_ceil(block);
        let (bh, qb) = (task / q_blocks, task % q_blocks);
        let (b, h) = (bh / s.heads, bh % s.heads);
        let width = s.heads * s.head_dim;
        let q0 = qb * block;
        Self {
            q0,
            rows: block.min(s.n_q - q0),
            q_off: (b * s.n_q + q0) * width + h * s.head_dim,
            kv_off: b * s.n_kv * width + h * s.head_dim,
        }
    }
}

/// Whether to skip the AVX-512 kernel (for the tests, which compare both paths).
fn generic_only() -> bool {
    #[cfg(test)]
    {
        GENERIC_ONLY.with(|g| g.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

#[cfg(test)]
thread_local! {
    static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct Block {
    rows: usize,
    q0: usize,
    width: usize,
    shape: AttentionShape,
}

/// One head's block of `rows` queries against all keys. `q`, `k`, `v` start at the
/// block's first element of the head; rows are `width` apart.
fn attention_block(q: &[f32], k: &[f32], v: &[f32], out: *mut f32, blk: Block, s: &mut Scratch) {
    let Block {
        rows,
        q0,
        width,
        shape,
    } = blk;
    let (d, n_kv) = (shape.head_dim, shape.n_kv);
    let scale = 1.0 / (d as f32).sqrt();
    let offset = n_kv as isize - shape.n_q as isize;
    // Keys visible to query row `i` of the block (all of them without a causal mask).
    let visible = |i: usize| -> usize {
        if shape.causal {
            ((q0 + i) as isize + offset + 1).clamp(0, n_kv as isize) as usize
        } else {
            n_kv
        }
    };
    let kv_end = visible(rows - 1);
    s.acc[..rows * d].fill(0.0);
    s.row_max[..rows].fill(f32::NEG_INFINITY);
    s.row_sum[..rows].fill(0.0);
    let mut k0 = 0;
    while k0 < kv_end {
        let cols = BLOCK_KV.min(kv_end - k0);
        // scores[i, j] = scale * q_i · k_{k0 + j}
        // SAFETY: all pointers address `rows x d`, `cols x d` and `rows x cols`
        // matrices inside their slices with the strides given.
        unsafe {
            super::Gemm {
                m: rows,
                n: cols,
                k: d,
                dst: s.scores.as_mut_ptr(),
                dst_rs: BLOCK_KV as isize,
                accumulate: false,
                lhs: q.as_ptr(),
                lhs_rs: width as isize,
                lhs_cs: 1,
                rhs: k.as_ptr().add(k0 * width),
                rhs_rs: 1,
                rhs_cs: width as isize,
                scale,
            }
            .run();
        }
        for i in 0..rows {
            let row = &mut s.scores[i * BLOCK_KV..i * BLOCK_KV + cols];
            let valid = visible(i).saturating_sub(k0).min(cols);
            row[valid..].fill(0.0);
            if valid == 0 {
                continue;
            }
            let row = &mut row[..valid];
            let old_max = s.row_max[i];
            let new_max = old_max.max(exp::max(row));
            let sum = exp::exp_sub_sum(row, new_max);
            if old_max != f32::NEG_INFINITY && old_max != new_max {
                let correction = exp::exp(old_max - new_max);
                exp::scale(&mut s.acc[i * d..(i + 1) * d], correction);
                s.row_sum[i] *= correction;
            }
            s.row_sum[i] += sum;
            s.row_max[i] = new_max;
        }
        // acc += p · v[k0..k0 + cols]
        // SAFETY: as above.
        unsafe {
            super::Gemm {
                m: rows,
                n: d,
                k: cols,
                dst: s.acc.as_mut_ptr(),
                dst_rs: d as isize,
                accumulate: true,
                lhs: s.scores.as_ptr(),
                lhs_rs: BLOCK_KV as isize,
                lhs_cs: 1,
                rhs: v.as_ptr().add(k0 * width),
                rhs_rs: width as isize,
                rhs_cs: 1,
                scale: 1.0,
            }
            .run();
        }
        k0 += cols;
    }
    for i in 0..rows {
        let inv = if s.row_sum[i] > 0.0 {
            1.0 / s.row_sum[i]
        } else {
            0.0
        };
        let acc = &s.acc[i * d..(i + 1) * d];
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: row `i` of this head in the output (not yet initialised: raw
            // writes only).
            unsafe { out.add(i * width + c).write(a * inv) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention in f64 for comparison.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let w = s.heads * s.head_dim;
        let mut out = vec![0.0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.n_q {
                    let qi = &q[(b * s.n_q + i) * w + h * s.head_dim..][..s.head_dim];
                    let limit = if s.causal {
                        (i as isize + s.n_kv as isize - s.n_q as isize + 1).max(0) as usize
                    } else {
                        s.n_kv
                    };
                    let scores: Vec<f64> = (0..limit.min(s.n_kv))
                        .map(|j| {
                            let kj = &k[(b * s.n_kv + j) * w + h * s.head_dim..][..s.head_dim];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (s.head_dim as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..s.head_dim {
                        let acc: f64 = e
                            .iter()
                            .enumerate()
                            .map(|(j, p)| p * v[(b * s.n_kv + j) * w + h * s.head_dim + c] as f64)
                            .sum();
                        out[(b * s.n_q + i) * w + h * s.head_dim + c] = (acc / z) as f32;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .map(|x| x * 3.0)
            .collect()
    }

    /// Both paths (the AVX-512 one where the CPU has it, and the generic one)
    /// against the f64 reference.
    fn check(shape: AttentionShape) {
        let w = shape.heads * shape.head_dim;
        let q = data(shape.batch * shape.n_q * w, 1);
        let k = data(shape.batch * shape.n_kv * w, 2);
        let v = data(shape.batch * shape.n_kv * w, 3);
        let want = reference(&q, &k, &v, shape);
        for generic in [false, true] {
            GENERIC_ONLY.with(|g| g.set(generic));
            // The flag is read once, on this thread, before any task starts.
            let ours = attention(&q, &k, &v, shape);
            GENERIC_ONLY.with(|g| g.set(false));
            let worst = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            // Outputs are averages of values in [-3, 3]; sums of up to 160 products
            // in f32 leave a few 1e-5.
            assert!(
                worst < 5e-5,
                "{shape:?} generic={generic}: max error {worst}"
            );
        }
    }

    #[test]
    fn matches_reference_across_block_edges() {
        for (n_q, n_kv) in [
            (1, 1),
            (77, 77),
            (300, 77),
            (129, 513),
            (257, 300),
            (100, 140),
        ] {
            for causal in [false, true] {
                check(AttentionShape {
                    batch: 2,
                    heads: 3,
                    n_q,
                    n_kv,
                    head_dim: 8,
                    causal,
                });
            }
        }
        for (head_dim, n_q, n_kv) in [(40, 64, 64), (64, 200, 77), (80, 256, 256), (160, 64, 77)] {
            check(AttentionShape {
                batch: 1,
                heads: 2,
                n_q,
                n_kv,
                head_dim,
                causal: false,
            });
        }
    }
}
