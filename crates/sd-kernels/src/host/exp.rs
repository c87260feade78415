//! Vectorised `exp` for softmax and SiLU: the Cephes single-precision polynomial
//! (max relative error ~2 ulp over the whole f32 range), written as straight-line
//! arithmetic the compiler turns into SIMD, with AVX2 selected at run time.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_MAX: f32 = 88.0;
const EXP_MIN: f32 = -87.336_55;

/// `exp(x)` for one value, branch-free. Inputs below ~-87.3 give 0 (not a denormal),
/// above ~88.4 give `f32::MAX`-range values; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let underflow = x < EXP_MIN;
    let x = x.clamp(EXP_MIN, EXP_MAX);
    // x = n ln2 + r, |r| <= ln2 / 2
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow { 0.0 } else { y * scale }
}

/// Runs `body` compiled for AVX2 + FMA when the CPU has them, else for the baseline.
macro_rules! simd_dispatch {
    ($avx2:ident, $generic:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $avx2($($arg: $ty),*) -> $ret {
                $generic($($arg),*)
            }
            if $crate::host::exp::has_avx2() {
                // SAFETY: the CPU supports the enabled target features.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}
pub(crate) use simd_dispatch;

const LANES: usize = 8;

/// Whether the explicit AVX2 + FMA kernels can run on this CPU.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the explicit AVX-512F kernels can run on this CPU.
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `row[i] = exp(row[i] - max)`; returns the sum of the new values.
pub fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { x86_512::exp_sub_sum(row, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::exp_sub_sum(row, max) };
    }
    exp_sub_sum_generic(row, max)
}

#[inline(always)]
fn exp_sub_sum_generic(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
            *v = exp(*v - max);
            *a += *v;
        }
    }
    let mut sum = 0.0;
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

/// The largest value of `row` (`-inf` when empty).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { x86_512::max(row) };
    }
    simd_dispatch!(avx2, max_generic, (row: &[f32]) -> f32)
}

#[inline(always)]
fn max_generic(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in chunks.remainder().iter().chain(acc.iter()) {
        m = if *v > m { *v } else { m };
    }
    m
}

/// `x[i] *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    simd_dispatch!(avx2, scale_generic, (x: &mut [f32], s: f32) -> ())
}

#[inline(always)]
fn scale_generic(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// Explicit AVX2 + FMA versions (the compiler does not vectorise the polynomial with
/// its float-to-int conversion on its own).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E};

    /// `exp` of eight lanes, the same polynomial as [`super::exp`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_MIN));
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX)),
            _mm256_set1_ps(EXP_MIN),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(LOG2E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
        let y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow)))
    }

    /// Horizontal sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn sum8(v: __m256) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// See [`super::exp_sub_sum`].
    #[target_feature(enable = "avx2,fma")]
    pub fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight f32.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        let mut sum = sum8(acc);
        for v in chunks.into_remainder() {
            *v = super::exp(*v - max);
            sum += *v;
        }
        sum
    }

    /// `x = x * a + b`, then `x * sigmoid(x)` when `silu`.
    #[target_feature(enable = "avx2,fma")]
    pub fn affine(x: &mut [f32], a: f32, b: f32, silu: bool) {
        let (va, vb, one) = (_mm256_set1_ps(a), _mm256_set1_ps(b), _mm256_set1_ps(1.0));
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight f32.
            unsafe {
                let mut y = _mm256_fmadd_ps(_mm256_loadu_ps(c.as_ptr()), va, vb);
                if silu {
                    let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), y));
                    y = _mm256_div_ps(y, _mm256_add_ps(one, e));
                }
                _mm256_storeu_ps(c.as_mut_ptr(), y);
            }
        }
        for v in chunks.into_remainder() {
            let y = *v * a + b;
            *v = if silu { y / (1.0 + super::exp(-y)) } else { y };
        }
    }

    /// `o = a * gelu(b)` with the erf of [`crate::host::geglu::erf`].
    #[target_feature(enable = "avx2,fma")]
    pub fn geglu_row(o: &mut [f32], a: &[f32], b: &[f32]) {
        let n = o.len().min(a.len()).min(b.len());
        let full = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let half = _mm256_set1_ps(0.5);
        let sign_mask = _mm256_set1_ps(-0.0);
        for i in (0..full).step_by(8) {
            // SAFETY: `i + 8 <= n` for all three slices.
            unsafe {
                let va = _mm256_loadu_ps(a.as_ptr().add(i));
                let vb = _mm256_loadu_ps(b.as_ptr().add(i));
                let x = _mm256_mul_ps(vb, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let ax = _mm256_andnot_ps(sign_mask, x);
                let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), ax, one));
                let mut p = _mm256_set1_ps(1.061_405_4);
                p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453_152_1));
                p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421_413_8));
                p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284_496_74));
                p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254_829_6));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
                let erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, one);
                let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign_mask, x));
                let gelu = _mm256_mul_ps(_mm256_mul_ps(half, vb), _mm256_add_ps(one, erf));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(va, gelu));
            }
        }
        for i in full..n {
            o[i] = a[i] * crate::host::geglu::gelu(b[i]);
        }
    }
}

/// Explicit AVX-512F versions of the attention softmax and GEGLU helpers: the same
/// polynomials as the AVX2 ones, sixteen lanes at a time.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_512 {
    use std::arch::x86_64::*;

    use super::{EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E};

    /// `exp` of sixteen lanes, the same polynomial as [`super::exp`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_MIN));
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX)),
            _mm512_set1_ps(EXP_MIN),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
            _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
        let y = _mm512_add_ps(y, _mm512_set1_ps(1.0));
        let pow = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let e = _mm512_mul_ps(y, _mm512_castsi512_ps(pow));
        _mm512_mask_mov_ps(e, underflow, _mm512_setzero_ps())
    }

    /// See [`super::exp_sub_sum`].
    #[target_feature(enable = "avx512f")]
    pub fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
        let m = _mm512_set1_ps(max);
        let mut acc = _mm512_setzero_ps();
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            // SAFETY: `c` holds sixteen f32.
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), m));
                _mm512_storeu_ps(c.as_mut_ptr(), e);
                acc = _mm512_add_ps(acc, e);
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask: __mmask16 = (1u32 << rest.len()).wrapping_sub(1) as u16;
            // SAFETY: the masked lanes are the remainder's elements only.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
                let e = exp16(_mm512_sub_ps(v, m));
                _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, e);
                acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mask, e));
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// See [`super::max`].
    #[target_feature(enable = "avx512f")]
    pub fn max(row: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            // SAFETY: `c` holds sixteen f32.
            acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let mut m = _mm512_reduce_max_ps(acc);
        for v in chunks.remainder() {
            m = if *v > m { *v } else { m };
        }
        m
    }

    /// `x = x * sigmoid(1.702 x)` in place (CLIP's `quick_gelu`).
    #[target_feature(enable = "avx512f")]
    pub fn quick_gelu_row(x: &mut [f32]) {
        let n = x.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            // SAFETY: the masked lanes lie inside the slice.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
                let e = exp16(_mm512_mul_ps(v, _mm512_set1_ps(-1.702)));
                let y = _mm512_div_ps(v, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), mask, y);
            }
            i += 16;
        }
    }

    /// `o = a * gelu(b)` with the erf of [`crate::host::geglu::erf`].
    #[target_feature(enable = "avx512f")]
    pub fn geglu_row(o: &mut [f32], a: &[f32], b: &[f32]) {
        let n = o.len().min(a.len()).min(b.len());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            // SAFETY: the masked lanes lie inside all three slices.
            unsafe {
                let va = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(i));
                let vb = _mm512_maskz_loadu_ps(mask, b.as_ptr().add(i));
                let x = _mm512_mul_ps(vb, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
                let ax = _mm512_abs_ps(x);
                let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.327_591_1), ax, one));
                let mut p = _mm512_set1_ps(1.061_405_4);
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453_152_1));
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421_413_8));
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284_496_74));
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254_829_6));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
                let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, one);
                // erf takes x's sign: flip where x < 0.
                let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
                let erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
                let gelu = _mm512_mul_ps(
                    _mm512_mul_ps(_mm512_set1_ps(0.5), vb),
                    _mm512_add_ps(one, erf),
                );
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), mask, _mm512_mul_ps(va, gelu));
            }
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, std) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - std) / std).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn row_helpers() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = max(&row);
        assert_eq!(m, row.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let expected: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
        let sum = exp_sub_sum(&mut row, m);
        for (a, b) in row.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-6 * b.max(1.0), "{a} vs {b}");
        }
        assert!((sum - expected.iter().sum::<f32>()).abs() < 1e-5);
        scale(&mut row, 2.0);
        assert!((row[0] - 2.0 * expected[0]).abs() < 1e-6);
    }
}
