//! The invisible watermark SDXL pictures carry: the `invisible-watermark` package's
//! `dwtDct` method as diffusers' `StableDiffusionXLWatermarker` applies it, bit for
//! bit, and a decoder for it.
//!
//! The method, as the package (0.2.0) writes it: the picture (BGR, floats in
//! `[0, 255]`) goes to YUV by OpenCV's float conversion (offset 0.5); the U channel's
//! top-left `H / 4 * 4` x `W / 4 * 4` region goes through one level of the Haar
//! DWT; in every 4x4 block of its approximation band the largest coefficient by
//! magnitude (the first, the block's corner, excluded) is quantised with step 36 to
//! an odd or even quarter step, carrying the message's next bit (the bits repeat over
//! the blocks); the band is put back by the inverse DWT (the package hands the
//! horizontal and vertical detail bands to it swapped, which this module does too)
//! and the picture goes back to BGR. Y is not marked (its scale is 0) and V is never
//! visited. Pictures under 256 pixels wide, or under 256x256 pixels in all, are left
//! alone.
//!
//! The decoder reads the same blocks of an 8-bit (or float) picture and votes each
//! bit over its blocks: a coefficient's remainder modulo 36 above 18 reads 1.

use image::RgbImage;

/// SDXL's 48-bit message (Stability AI's `WATERMARK_MESSAGE`), first bit highest.
pub const SDXL_WATERMARK_MESSAGE: u64 =
    0b1011_0011_1110_1100_1001_0000_0111_1011_1011_0001_1001_1110;

/// The message's length in bits.
const SDXL_WATERMARK_LEN: usize = 48;

/// `pywt`'s Haar filter coefficient, `1 / sqrt(2)`, in f32.
const K: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// OpenCV's float `BGR2YUV` / `YUV2BGR` constants and offset.
const R2Y: f32 = 0.299;
const G2Y: f32 = 0.587;
const B2Y: f32 = 0.114;
const B2U: f32 = 0.492;
const R2V: f32 = 0.877;
const U2B: f32 = 2.032;
const U2G: f32 = -0.395;
const V2G: f32 = -0.581;
const V2R: f32 = 1.140;
const DELTA: f32 = 0.5;

/// The `dwtDct` watermark with a message of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DwtDctWatermark {
    bits: Vec<bool>,
    /// The quantisation step of the U channel (36).
    scale: u32,
}

impl DwtDctWatermark {
    /// SDXL's: [`SDXL_WATERMARK_MESSAGE`] with the package's default step.
    pub fn sdxl() -> Self {
        let bits = (0..SDXL_WATERMARK_LEN)
            .rev()
            .map(|i| (SDXL_WATERMARK_MESSAGE >> i) & 1 == 1)
            .collect();
        Self { bits, scale: 36 }
    }

    /// A watermark carrying `bits` (at least one).
    ///
    /// # Panics
    /// No bits.
    pub fn new(bits: Vec<bool>) -> Self {
        assert!(!bits.is_empty(), "a watermark needs at least one bit");
        Self { bits, scale: 36 }
    }

    /// The message.
    pub fn bits(&self) -> &[bool] {
        &self.bits
    }

    /// Whether a picture of this size is marked: at least 256 pixels wide (diffusers'
    /// test) and 256x256 pixels in all (the package's).
    pub fn applies(width: usize, height: usize) -> bool {
        width >= 256 && width * height >= 256 * 256
    }

    /// Marks an RGB picture `[H, W, 3]` of floats in `[0, 255]` (values beyond are
    /// kept, as diffusers marks before clamping). Returns whether it was marked (see
    /// [`Self::applies`]).
    ///
    /// # Panics
    /// `rgb.len() != width * height * 3`.
    pub fn embed(&self, rgb: &mut [f32], width: usize, height: usize) -> bool {
        assert_eq!(
            rgb.len(),
            width * height * 3,
            "an RGB picture of {width}x{height}"
        );
        if !Self::applies(width, height) {
            return false;
        }
        let (mut y, mut u, v) = to_yuv(rgb);
        let (h4, w4) = (height / 4 * 4, width / 4 * 4);
        let mut region = crop(&u, width, h4, w4);
        let mut bands = dwt2(&region, h4, w4);
        self.embed_bands(&mut bands.a, h4 / 2, w4 / 2);
        // The package passes (cA, (cV, cH, cD)) to idwt2.
        region = idwt2(&bands.a, &bands.v, &bands.h, &bands.d, h4 / 2, w4 / 2);
        for r in 0..h4 {
            u[r * width..r * width + w4].copy_from_slice(&region[r * w4..(r + 1) * w4]);
        }
        from_yuv(&mut y, &u, &v, rgb);
        true
    }

    /// Quantises the largest non-corner coefficient of every 4x4 block of the
    /// approximation band `a` (`rows` x `cols`, row-major) to carry the bits.
    fn embed_bands(&self, a: &mut [f32], rows: usize, cols: usize) {
        let scale = self.scale as f32;
        let mut num = 0;
        for bi in 0..rows / 4 {
            for bj in 0..cols / 4 {
                let bit = if self.bits[num % self.bits.len()] {
                    0.5f32
                } else {
                    0.0
                };
                let at = largest_in_block(a, cols, bi, bj);
                let val = a[at];
                let q = floor_div(val.abs(), scale);
                let marked = (q + 0.25 + bit) * scale;
                a[at] = if val >= 0.0 { marked } else { -marked };
                num += 1;
            }
        }
    }

    /// Reads the bits from an RGB picture `[H, W, 3]` of floats in `[0, 255]`: each
    /// bit's vote over its blocks (`None` for a picture the method does not mark).
    ///
    /// # Panics
    /// `rgb.len() != width * height * 3`.
    pub fn decode(&self, rgb: &[f32], width: usize, height: usize) -> Option<Vec<bool>> {
        assert_eq!(
            rgb.len(),
            width * height * 3,
            "an RGB picture of {width}x{height}"
        );
        if !Self::applies(width, height) {
            return None;
        }
        let (_, u, _) = to_yuv(rgb);
        let (h4, w4) = (height / 4 * 4, width / 4 * 4);
        let bands = dwt2(&crop(&u, width, h4, w4), h4, w4);
        let (rows, cols) = (h4 / 2, w4 / 2);
        let scale = self.scale as f32;
        let n = self.bits.len();
        let (mut ones, mut seen) = (vec![0usize; n], vec![0usize; n]);
        let mut num = 0;
        for bi in 0..rows / 4 {
            for bj in 0..cols / 4 {
                let val = bands.a[largest_in_block(&bands.a, cols, bi, bj)].abs();
                let rem = val - floor_div(val, scale) * scale;
                ones[num % n] += usize::from(rem > 0.5 * scale);
                seen[num % n] += 1;
                num += 1;
            }
        }
        // The package's vote: mean * 255 > 127.
        Some(
            ones.iter()
                .zip(&seen)
                .map(|(&o, &s)| s > 0 && (o as f64 / s as f64) * 255.0 > 127.0)
                .collect(),
        )
    }

    /// diffusers' `StableDiffusionXLWatermarker.apply_watermark` on one decoded
    /// picture `[3, H, W]` (the VAE's output, around `[-1, 1]`, not clamped): to
    /// `255 * (x / 2 + 0.5)`, marked, back to `2 * (x / 255 - 0.5)` clamped to
    /// `[-1, 1]`, in diffusers' f32 operations. Returns whether it was marked (a
    /// picture [`Self::applies`] refuses is left as it was).
    ///
    /// # Panics
    /// `chw.len() != 3 * width * height`.
    pub fn apply_to_decoded(&self, chw: &mut [f32], width: usize, height: usize) -> bool {
        let n = width * height;
        assert_eq!(chw.len(), 3 * n, "a [3, {height}, {width}] picture");
        if !Self::applies(width, height) {
            return false;
        }
        let mut rgb = vec![0f32; 3 * n];
        for c in 0..3 {
            for p in 0..n {
                rgb[p * 3 + c] = 255.0 * (chw[c * n + p] / 2.0 + 0.5);
            }
        }
        self.embed(&mut rgb, width, height);
        for c in 0..3 {
            for p in 0..n {
                chw[c * n + p] = (2.0 * (rgb[p * 3 + c] / 255.0 - 0.5)).clamp(-1.0, 1.0);
            }
        }
        true
    }

    /// Marks an 8-bit picture (through floats, rounded back).
    pub fn embed_image(&self, image: &mut RgbImage) -> bool {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut rgb: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
        if !self.embed(&mut rgb, w, h) {
            return false;
        }
        for (o, v) in image.iter_mut().zip(rgb) {
            *o = v.round().clamp(0.0, 255.0) as u8;
        }
        true
    }

    /// Reads the bits from an 8-bit picture.
    pub fn decode_image(&self, image: &RgbImage) -> Option<Vec<bool>> {
        let rgb: Vec<f32> = image.as_raw().iter().map(|&v| f32::from(v)).collect();
        self.decode(&rgb, image.width() as usize, image.height() as usize)
    }

    /// The share of `read`'s bits that differ from the message.
    pub fn bit_error_rate(&self, read: &[bool]) -> f64 {
        let wrong = self.bits.iter().zip(read).filter(|(a, b)| a != b).count();
        let missing = self.bits.len().saturating_sub(read.len());
        (wrong + missing) as f64 / self.bits.len() as f64
    }
}

/// The first coefficient of largest magnitude among the 15 of block `(bi, bj)` after
/// its corner (numpy's `argmax` over the flattened block's `[1:]`).
fn largest_in_block(a: &[f32], cols: usize, bi: usize, bj: usize) -> usize {
    let at = |p: usize| (bi * 4 + p / 4) * cols + bj * 4 + p % 4;
    let mut best = at(1);
    for p in 2..16 {
        if a[at(p)].abs() > a[best].abs() {
            best = at(p);
        }
    }
    best
}

/// numpy's float32 floor division (`npy_divmodf`'s quotient).
fn floor_div(a: f32, b: f32) -> f32 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div == 0.0 {
        return 0.0f32.copysign(a / b);
    }
    let mut floor = div.floor();
    if div - floor > 0.5 {
        floor += 1.0;
    }
    floor
}

/// OpenCV's float `BGR2YUV` of an RGB picture: the Y, U and V planes.
fn to_yuv(rgb: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = rgb.len() / 3;
    let (mut y, mut u, mut v) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for p in rgb.chunks_exact(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let yy = b.mul_add(B2Y, g.mul_add(G2Y, r * R2Y));
        y.push(yy);
        u.push((b - yy).mul_add(B2U, DELTA));
        v.push((r - yy).mul_add(R2V, DELTA));
    }
    (y, u, v)
}

/// OpenCV's float `YUV2BGR` into an RGB picture.
fn from_yuv(y: &mut [f32], u: &[f32], v: &[f32], rgb: &mut [f32]) {
    for (((p, &yy), &uu), &vv) in rgb.chunks_exact_mut(3).zip(y.iter()).zip(u).zip(v) {
        let (du, dv) = (uu - DELTA, vv - DELTA);
        p[2] = du.mul_add(U2B, yy);
        p[1] = dv.mul_add(V2G, du.mul_add(U2G, yy));
        p[0] = dv.mul_add(V2R, yy);
    }
}

/// The top-left `rows` x `cols` of a plane `width` wide.
fn crop(plane: &[f32], width: usize, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| plane[r * width..r * width + cols].iter().copied())
        .collect()
}

/// One level of `pywt.dwt2(x, 'haar')`: the approximation and the horizontal,
/// vertical and diagonal details, each `rows / 2` x `cols / 2`.
struct Bands {
    a: Vec<f32>,
    h: Vec<f32>,
    v: Vec<f32>,
    d: Vec<f32>,
}

/// `pywt.dwt2(x, 'haar')` of an even-sided plane, in pywt's order of operations
/// (along the rows' pairs first, then the columns'), in f32.
fn dwt2(x: &[f32], rows: usize, cols: usize) -> Bands {
    let (r2, c2) = (rows / 2, cols / 2);
    // Along axis 0: low and high of each pair of rows.
    let mut lo = vec![0f32; r2 * cols];
    let mut hi = vec![0f32; r2 * cols];
    for i in 0..r2 {
        for c in 0..cols {
            let (p, q) = (x[2 * i * cols + c], x[(2 * i + 1) * cols + c]);
            lo[i * cols + c] = p * K + q * K;
            hi[i * cols + c] = p * K + q * -K;
        }
    }
    let pairs = |src: &[f32], sign: f32| -> Vec<f32> {
        let mut out = vec![0f32; r2 * c2];
        for i in 0..r2 {
            for j in 0..c2 {
                let (p, q) = (src[i * cols + 2 * j], src[i * cols + 2 * j + 1]);
                out[i * c2 + j] = p * K + q * (sign * K);
            }
        }
        out
    };
    Bands {
        a: pairs(&lo, 1.0),
        v: pairs(&lo, -1.0),
        h: pairs(&hi, 1.0),
        d: pairs(&hi, -1.0),
    }
}

/// `pywt.idwt2((a, (h, v, d)), 'haar')` of bands `rows` x `cols`: along the columns
/// first (`a` with `v`, `h` with `d`), then the rows.
fn idwt2(a: &[f32], h: &[f32], v: &[f32], d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let up_cols = |lo: &[f32], hi: &[f32]| -> Vec<f32> {
        let mut out = vec![0f32; rows * cols * 2];
        for i in 0..rows {
            for j in 0..cols {
                let (l, hh) = (lo[i * cols + j], hi[i * cols + j]);
                out[i * 2 * cols + 2 * j] = l * K + hh * K;
                out[i * 2 * cols + 2 * j + 1] = l * K + hh * -K;
            }
        }
        out
    };
    let low = up_cols(a, v);
    let high = up_cols(h, d);
    let w = cols * 2;
    let mut out = vec![0f32; rows * 2 * w];
    for i in 0..rows {
        for c in 0..w {
            let (l, hh) = (low[i * w + c], high[i * w + c]);
            out[2 * i * w + c] = l * K + hh * K;
            out[(2 * i + 1) * w + c] = l * K + hh * -K;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdxl_message_is_stability_ais() {
        let wm = DwtDctWatermark::sdxl();
        let text: String = wm
            .bits()
            .iter()
            .map(|&b| if b { '1' } else { '0' })
            .collect();
        assert_eq!(text, "101100111110110010010000011110111011000110011110");
    }

    #[test]
    fn floor_division_is_numpys() {
        assert_eq!(floor_div(71.9, 36.0), 1.0);
        assert_eq!(floor_div(72.0, 36.0), 2.0);
        assert_eq!(floor_div(0.0, 36.0), 0.0);
        assert_eq!(floor_div(35.999_996, 36.0), 0.0);
    }

    #[test]
    fn haar_round_trips_with_the_bands_in_place() {
        let x: Vec<f32> = (0..64).map(|i| (i * 37 % 23) as f32).collect();
        let b = dwt2(&x, 8, 8);
        let back = idwt2(&b.a, &b.h, &b.v, &b.d, 4, 4);
        for (p, q) in x.iter().zip(&back) {
            assert!((p - q).abs() < 1e-4);
        }
    }

    #[test]
    fn small_pictures_are_left_alone() {
        let wm = DwtDctWatermark::sdxl();
        let mut rgb = vec![100.0; 248 * 256 * 3];
        assert!(!wm.embed(&mut rgb, 248, 256));
        assert!(rgb.iter().all(|&v| v == 100.0));
        assert!(wm.decode(&rgb, 248, 256).is_none());
    }
}
