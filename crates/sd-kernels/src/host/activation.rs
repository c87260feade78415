//! Element-wise activations in place, in parallel chunks: CLIP's `quick_gelu`
//! (`x * sigmoid(1.702 x)`) and the exact `gelu` of OpenCLIP, one pass each (burn's
//! ops take three passes for `quick_gelu` and evaluate `exp` one element at a time).

use rayon::prelude::*;

use super::{exp, geglu};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `x = x * sigmoid(1.702 x)`, in place.
pub fn quick_gelu(x: &mut [f32]) {
    let _prof = crate::profile::scope("activation");
    x.par_chunks_mut(CHUNK).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if exp::has_avx512() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp::x86_512::quick_gelu_row(c) };
        }
        for v in c {
            *v = quick_gelu_scalar(*v);
        }
    });
}

/// `x * sigmoid(1.702 x)`, the reference the vector paths follow.
#[inline(always)]
pub fn quick_gelu_scalar(x: f32) -> f32 {
    x / (1.0 + exp::exp(-1.702 * x))
}

/// `x = gelu(x)` (the erf form), in place.
pub fn gelu(x: &mut [f32]) {
    let _prof = crate::profile::scope("activation");
    const ONES: [f32; 256] = [1.0; 256];
    x.par_chunks_mut(CHUNK).for_each(|c| {
        let mut copy = [0.0f32; 256];
        for part in c.chunks_mut(256) {
            let n = part.len();
            copy[..n].copy_from_slice(part);
            geglu::geglu_into(part, &ONES[..n], &copy[..n]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_their_definitions() {
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 7e-4).collect();
        let mut q = xs.clone();
        quick_gelu(&mut q);
        let mut g = xs.clone();
        gelu(&mut g);
        for ((x, q), g) in xs.iter().zip(&q).zip(&g) {
            let x64 = *x as f64;
            let want_q = x64 / (1.0 + (-1.702 * x64).exp());
            assert!(
                (*q as f64 - want_q).abs() < 2e-6 * want_q.abs().max(1.0),
                "quick_gelu({x})"
            );
            let want_g = x64 * 0.5 * (1.0 + libm_erf(x64 / std::f64::consts::SQRT_2));
            assert!(
                (*g as f64 - want_g).abs() < 1e-6 * x64.abs().max(1.0),
                "gelu({x})"
            );
        }
    }

    /// erf by its Taylor series / continued fraction is overkill here: a tight
    /// numerical integral of exp(-t^2) suffices for the test's 1e-6.
    fn libm_erf(x: f64) -> f64 {
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }
}
