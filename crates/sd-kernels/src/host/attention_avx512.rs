//! Flash attention for CPUs with AVX-512F, computed transposed: queries run along
//! the vector lanes. For a block of 128 queries and a tile of 128 keys the scores
//! are `Sᵀ = K Qᵀ` (`[keys, queries]`), so the online softmax's per-query maximum,
//! rescaling and sums are plain lane-wise operations over rows (no horizontal
//! reductions, no scalar loop per query), and the output is accumulated as
//! `Oᵀ += Vᵀ P` (`[head_dim, queries]`) with the values broadcast from their rows
//! in place. Both products are register-tiled microkernels (6 keys x 64 queries
//! and 5 head channels x 64 queries); nothing is packed but the block's queries,
//! once, pre-scaled by `1 / sqrt(head_dim)`.
//!
//! Same arithmetic as [`super::attention`]'s generic path (f32 throughout, the
//! same `exp`), so results agree to rounding. The `gemm` crate's kernels, which
//! the generic path uses, repacked every 128 x 40 key and value tile and wasted a
//! sixth of each product on padding `head_dim = 40` to 48.

#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::attention::AttentionShape;

/// Queries per task (lanes of the transposed tiles; a multiple of 64).
pub const QB: usize = 128;
/// Keys per score tile.
const KT: usize = 128;
/// Keys per score microkernel call.
const KR: usize = 6;
/// Head channels per output microkernel call.
const DR: usize = 5;

/// Per-thread buffers of one task.
pub struct Scratch {
    /// `Qᵀ`, `[head_dim, QB]`, scaled.
    qt: Vec<f32>,
    /// `Sᵀ`, then `P`, `[KT, QB]`.
    st: Vec<f32>,
    /// `Oᵀ`, `[head_dim, QB]`.
    ot: Vec<f32>,
}

impl Scratch {
    /// Buffers for heads of width `d`.
    pub fn new(d: usize) -> Self {
        Self {
            qt: vec![0.0; d * QB],
            st: vec![0.0; KT * QB],
            ot: vec![0.0; d * QB],
        }
    }
}

/// One head's block of `rows <= QB` queries from `q0` on against all visible keys;
/// `q`, `k`, `v` start at the head's first element of the block (queries) or of
/// the sequence (keys, values), rows `width` apart; `out` likewise.
///
/// # Safety
/// AVX-512F must be available; `out` must address `rows` rows of `d` values
/// `width` apart that no one else writes meanwhile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: *mut f32,
    rows: usize,
    q0: usize,
    width: usize,
    shape: AttentionShape,
    s: &mut Scratch,
) {
    let (d, n_kv) = (shape.head_dim, shape.n_kv);
    assert!(rows <= QB && s.qt.len() >= d * QB && s.ot.len() >= d * QB);
    let offset = n_kv as isize - shape.n_q as isize;
    // Keys visible to the block's last query (all of them without a mask).
    let kv_end = if shape.causal {
        ((q0 + rows - 1) as isize + offset + 1).clamp(0, n_kv as isize) as usize
    } else {
        n_kv
    };
    assert!(
        k.len() >= (kv_end.max(1) - 1) * width + d && v.len() >= (kv_end.max(1) - 1) * width + d
    );
    assert!(q.len() >= (rows - 1) * width + d);
    let scale = 1.0 / (d as f32).sqrt();
    for dd in 0..d {
        let row = &mut s.qt[dd * QB..(dd + 1) * QB];
        for (i, e) in row.iter_mut().enumerate() {
            *e = if i < rows {
                q[i * width + dd] * scale
            } else {
                0.0
            };
        }
    }
    s.ot[..d * QB].fill(0.0);
    const G: usize = QB / 16;
    let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); G];
    let mut l = [_mm512_setzero_ps(); G];
    let mut k0 = 0;
    while k0 < kv_end {
        let kn = KT.min(kv_end - k0);
        // Sᵀ[j][i] = (k_{k0+j} · q_i) * scale
        let mut j = 0;
        while j < kn {
            let r = KR.min(kn - j);
            let krow = k[(k0 + j) * width..].as_ptr();
            for qg in 0..QB / 64 {
                let qt = s.qt[qg * 64..].as_ptr();
                let st = s.st[j * QB + qg * 64..].as_mut_ptr();
                // SAFETY: r key rows of d values, d rows of Qᵀ, r rows of Sᵀ.
                unsafe {
                    match r {
                        6 => scores::<6>(krow, width, qt, d, st),
                        5 => scores::<5>(krow, width, qt, d, st),
                        4 => scores::<4>(krow, width, qt, d, st),
                        3 => scores::<3>(krow, width, qt, d, st),
                        2 => scores::<2>(krow, width, qt, d, st),
                        _ => scores::<1>(krow, width, qt, d, st),
                    }
                }
            }
            j += r;
        }
        if shape.causal {
            // Key k0 + j is hidden from queries q0 + i with q0 + i + offset < k0 + j.
            for j in 0..kn {
                let hidden = ((k0 + j) as isize - offset - q0 as isize).clamp(0, QB as isize);
                s.st[j * QB..j * QB + hidden as usize].fill(f32::NEG_INFINITY);
            }
        }
        // Online softmax, lane-wise over the block's queries.
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); G];
        for j in 0..kn {
            let row = s.st[j * QB..].as_ptr();
            for g in 0..G {
                // SAFETY: lanes g*16.. of row j of Sᵀ.
                mx[g] = _mm512_max_ps(mx[g], unsafe { _mm512_loadu_ps(row.add(g * 16)) });
            }
        }
        let mut corr = [_mm512_setzero_ps(); G];
        for g in 0..G {
            let new = _mm512_max_ps(m[g], mx[g]);
            corr[g] = super::exp::x86_512::exp16(_mm512_sub_ps(m[g], new));
            m[g] = new;
            l[g] = _mm512_mul_ps(l[g], corr[g]);
        }
        for j in 0..kn {
            let row = s.st[j * QB..].as_mut_ptr();
            for g in 0..G {
                // SAFETY: lanes g*16.. of row j of Sᵀ.
                unsafe {
                    let p = super::exp::x86_512::exp16(_mm512_sub_ps(
                        _mm512_loadu_ps(row.add(g * 16)),
                        m[g],
                    ));
                    _mm512_storeu_ps(row.add(g * 16), p);
                    l[g] = _mm512_add_ps(l[g], p);
                }
            }
        }
        if k0 > 0 {
            for dd in 0..d {
                let row = s.ot[dd * QB..].as_mut_ptr();
                for g in 0..G {
                    // SAFETY: lanes g*16.. of row dd of Oᵀ.
                    unsafe {
                        let o = _mm512_mul_ps(_mm512_loadu_ps(row.add(g * 16)), corr[g]);
                        _mm512_storeu_ps(row.add(g * 16), o);
                    }
                }
            }
        }
        // Oᵀ[dd][i] += Σ_j v_{k0+j}[dd] · P[j][i]
        let vrow = v[k0 * width..].as_ptr();
        let mut dd = 0;
        while dd < d {
            let r = DR.min(d - dd);
            for qg in 0..QB / 64 {
                let p = s.st[qg * 64..].as_ptr();
                let ot = s.ot[dd * QB + qg * 64..].as_mut_ptr();
                // SAFETY: kn value rows (channels dd..dd + r), kn rows of P, r rows
                // of Oᵀ.
                unsafe {
                    // SAFETY: channel dd of the first value row.
                    let vr = vrow.add(dd);
                    match r {
                        5 => values::<5>(vr, width, p, kn, ot),
                        4 => values::<4>(vr, width, p, kn, ot),
                        3 => values::<3>(vr, width, p, kn, ot),
                        2 => values::<2>(vr, width, p, kn, ot),
                        _ => values::<1>(vr, width, p, kn, ot),
                    }
                }
            }
            dd += r;
        }
        k0 += kn;
    }
    // out[i][dd] = Oᵀ[dd][i] / l[i]
    let mut inv = [0.0f32; QB];
    for g in 0..G {
        let sum = l[g];
        let safe = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sum, _mm512_setzero_ps()),
            _mm512_setzero_ps(),
            _mm512_div_ps(_mm512_set1_ps(1.0), sum),
        );
        // SAFETY: lanes g*16.. of `inv`.
        unsafe { _mm512_storeu_ps(inv.as_mut_ptr().add(g * 16), safe) };
    }
    for i in 0..rows {
        for dd in 0..d {
            // SAFETY: row i of this head's output block (caller); not yet
            // initialised, so raw writes only.
            unsafe { out.add(i * width + dd).write(s.ot[dd * QB + i] * inv[i]) };
        }
    }
}

/// `st[r][0..64] = Σ_dd k_r[dd] · qt[dd][0..64]` for `R` key rows `width` apart;
/// `qt` and `st` rows are `QB` apart.
///
/// # Safety
/// AVX-512F; the operands as described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores<const R: usize>(
    k: *const f32,
    width: usize,
    qt: *const f32,
    d: usize,
    st: *mut f32,
) {
    // SAFETY: the caller's.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let kr: [*const f32; R] = std::array::from_fn(|r| k.add(r * width));
        for dd in 0..d {
            let qrow = qt.add(dd * QB);
            let q = [
                _mm512_loadu_ps(qrow),
                _mm512_loadu_ps(qrow.add(16)),
                _mm512_loadu_ps(qrow.add(32)),
                _mm512_loadu_ps(qrow.add(48)),
            ];
            for r in 0..R {
                let kv = _mm512_set1_ps(*kr[r].add(dd));
                for c in 0..4 {
                    acc[r][c] = _mm512_fmadd_ps(kv, q[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..4 {
                _mm512_storeu_ps(st.add(r * QB + c * 16), acc[r][c]);
            }
        }
    }
}

/// `ot[t][0..64] += Σ_j v_j[t] · p[j][0..64]` for `R` channels of `kn` value rows
/// `width` apart; `p` and `ot` rows are `QB` apart.
///
/// # Safety
/// AVX-512F; the operands as described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn values<const R: usize>(
    v: *const f32,
    width: usize,
    p: *const f32,
    kn: usize,
    ot: *mut f32,
) {
    // SAFETY: the caller's.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for t in 0..R {
            for c in 0..4 {
                acc[t][c] = _mm512_loadu_ps(ot.add(t * QB + c * 16));
            }
        }
        let mut vr = v;
        let mut pr = p;
        for _ in 0..kn {
            let pv = [
                _mm512_loadu_ps(pr),
                _mm512_loadu_ps(pr.add(16)),
                _mm512_loadu_ps(pr.add(32)),
                _mm512_loadu_ps(pr.add(48)),
            ];
            for t in 0..R {
                let x = _mm512_set1_ps(*vr.add(t));
                for c in 0..4 {
                    acc[t][c] = _mm512_fmadd_ps(x, pv[c], acc[t][c]);
                }
            }
            vr = vr.add(width);
            pr = pr.add(QB);
        }
        for t in 0..R {
            for c in 0..4 {
                _mm512_storeu_ps(ot.add(t * QB + c * 16), acc[t][c]);
            }
        }
    }
}
