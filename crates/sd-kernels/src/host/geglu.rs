//! GEGLU, `a * gelu(b)` for `[a, b]` the two halves of the feed-forward's projection,
//! in one pass (burn's ops would split, evaluate erf element by element and multiply
//! in three).
//! `gelu` is the exact (erf) form; erf uses the Abramowitz-Stegun 7.1.26 polynomial
//! (absolute error below 1.5e-7), as PyTorch's vectorised CPU `erf` does.

use super::exp;

/// `o = a * gelu(b)`, element-wise (the halves of one row of the feed-forward's
/// projection; see [`super::linear::linear_geglu`]).
pub fn geglu_into(o: &mut [f32], a: &[f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if exp::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { exp::x86_512::geglu_row(o, a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if exp::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp::x86::geglu_row(o, a, b) };
    }
    geglu_row_generic(o, a, b)
}

#[inline(always)]
fn geglu_row_generic(o: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
        *o = a * gelu(*b);
    }
}

/// `x * 0.5 * (1 + erf(x / sqrt(2)))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Error function, absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let mut p = 1.061_405_4_f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp::exp(-ax * ax);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_geglu_are_accurate() {
        let mut x = -6.0f64;
        while x < 6.0 {
            let ours = erf(x as f32) as f64;
            // erf via the complementary series is not in std; compare gelu through
            // a high-precision erf from its Taylor / continued-fraction forms instead.
            let want = erf_f64(x);
            assert!((ours - want).abs() < 3e-7, "erf({x}) = {ours}, want {want}");
            x += 0.0137;
        }
        // 13 wide: one vector of eight plus a scalar remainder per row.
        let inner = 13;
        let x: Vec<f32> = (0..3 * 2 * inner).map(|i| i as f32 * 0.15 - 4.0).collect();
        let mut out = vec![0.0f32; 3 * inner];
        for (o, row) in out.chunks_mut(inner).zip(x.chunks(2 * inner)) {
            let (a, b) = row.split_at(inner);
            geglu_into(o, a, b);
        }
        for r in 0..3 {
            for i in 0..inner {
                let (a, b) = (
                    x[r * 2 * inner + i] as f64,
                    x[r * 2 * inner + inner + i] as f64,
                );
                let want = a * 0.5 * b * (1.0 + erf_f64(b / 2f64.sqrt()));
                assert!((out[r * inner + i] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }

    /// erf to ~1e-12: Taylor series near 0, continued fraction for erfc further out.
    fn erf_f64(x: f64) -> f64 {
        let ax = x.abs();
        let v = if ax < 3.0 {
            let (mut term, mut sum, mut n) = (ax, ax, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -ax * ax / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (ax + f);
            }
            1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
        };
        v.copysign(x)
    }
}
