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
    p = p * r + 5.000_000_1e-1;
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
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the enabled target features.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}
pub(crate) use simd_dispatch;

const LANES: usize = 8;

/// `row[i] = exp(row[i] - max)`; returns the sum of the new values.
pub fn exp_sub_sum(row: &mut [f32], max: f32) -> f32 {
    simd_dispatch!(avx2, exp_sub_sum_generic, (row: &mut [f32], max: f32) -> f32)
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
