//! AUTOMATIC1111's inpainting around the model: the mask blurred and inverted as
//! asked, the masked area pre-filled (`inpainting_fill` 0), "only masked" cropping
//! (`inpaint_full_res`), and the result pasted over the original through the mask.

use image::imageops::{self, FilterType};
use image::{GrayImage, Rgb, RgbImage, Rgba, Rgba32FImage};

/// Where a generated picture goes back into the original, and through which mask.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// The original picture (at the request's size).
    pub original: RgbImage,
    /// White where the generated picture shows, the original's size.
    pub mask: GrayImage,
    /// `(x, y, width, height)` of the original the generated picture covers.
    pub region: (u32, u32, u32, u32),
}

impl Overlay {
    /// The generated picture resized into the region and blended over the original.
    pub fn apply(&self, generated: &RgbImage) -> RgbImage {
        let (x0, y0, w, h) = self.region;
        let generated = if generated.dimensions() == (w, h) {
            generated.clone()
        } else {
            imageops::resize(generated, w, h, FilterType::Lanczos3)
        };
        let mut out = self.original.clone();
        for (x, y, g) in generated.enumerate_pixels() {
            let (ox, oy) = (x0 + x, y0 + y);
            let a = f32::from(self.mask.get_pixel(ox, oy)[0]) / 255.0;
            let o = out.get_pixel(ox, oy);
            let mix = |i: usize| (f32::from(g[i]) * a + f32::from(o[i]) * (1.0 - a)).round() as u8;
            out.put_pixel(ox, oy, Rgb([mix(0), mix(1), mix(2)]));
        }
        out
    }
}

/// The mask as A1111 prepares it: inverted when asked, Gaussian-blurred by `blur`
/// pixels (PIL's radius, a standard deviation).
pub fn prepare_mask(mask: &GrayImage, invert: bool, blur: f32) -> GrayImage {
    let mut m = mask.clone();
    if invert {
        imageops::invert(&mut m);
    }
    if blur > 0.0 {
        imageops::blur(&m, blur)
    } else {
        m
    }
}

/// A1111's `fill`: the masked area painted with ever less blurred copies of what is
/// around it (radii 256, 64, 16, 4, 2, 0 composited over each other).
pub fn fill(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = image.dimensions();
    // Premultiplied colours of the unmasked pixels, in [0, 1] (the float range the
    // blur keeps to).
    let masked = Rgba32FImage::from_fn(w, h, |x, y| {
        let a = 1.0 - f32::from(mask.get_pixel(x, y)[0]) / 255.0;
        let p = image.get_pixel(x, y);
        let c = |i: usize| f32::from(p[i]) / 255.0 * a;
        Rgba([c(0), c(1), c(2), a])
    });
    let mut acc = Rgba32FImage::new(w, h);
    for (radius, repeats) in [
        (256.0, 1),
        (64.0, 1),
        (16.0, 2),
        (4.0, 4),
        (2.0, 2),
        (0.0, 1),
    ] {
        let layer = if radius > 0.0 {
            imageops::fast_blur(&masked, radius)
        } else {
            masked.clone()
        };
        for _ in 0..repeats {
            for (d, s) in acc.pixels_mut().zip(layer.pixels()) {
                // Premultiplied "over".
                let keep = 1.0 - s[3];
                *d = Rgba([
                    s[0] + d[0] * keep,
                    s[1] + d[1] * keep,
                    s[2] + d[2] * keep,
                    s[3] + d[3] * keep,
                ]);
            }
        }
    }
    RgbImage::from_fn(w, h, |x, y| {
        let p = acc.get_pixel(x, y);
        let un = |c: f32| {
            if p[3] > 0.0 {
                (c / p[3] * 255.0).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        };
        Rgb([un(p[0]), un(p[1]), un(p[2])])
    })
}

/// A1111's "only masked" crop region: the mask's bounding box grown by `padding`,
/// then grown to the picture's aspect `width : height`, inside the image;
/// `None` for an empty mask.
pub fn crop_region(
    mask: &GrayImage,
    padding: u32,
    width: u32,
    height: u32,
) -> Option<(u32, u32, u32, u32)> {
    let (iw, ih) = mask.dimensions();
    let mut bbox: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] > 0 {
            let b = bbox.get_or_insert((x, y, x, y));
            *b = (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y));
        }
    }
    let (x1, y1, x2, y2) = bbox?;
    let (mut x1, mut y1) = (
        x1.saturating_sub(padding) as f64,
        y1.saturating_sub(padding) as f64,
    );
    let (mut x2, mut y2) = (
        ((x2 + 1 + padding).min(iw)) as f64,
        ((y2 + 1 + padding).min(ih)) as f64,
    );
    let ratio = f64::from(width) / f64::from(height);
    let (cw, ch) = (x2 - x1, y2 - y1);
    if cw / ch < ratio {
        let grow = ch * ratio - cw;
        x1 -= grow / 2.0;
        x2 += grow / 2.0;
    } else {
        let grow = cw / ratio - ch;
        y1 -= grow / 2.0;
        y2 += grow / 2.0;
    }
    let shift = |a: &mut f64, b: &mut f64, limit: f64| {
        if *a < 0.0 {
            *b -= *a;
            *a = 0.0;
        }
        if *b > limit {
            *a -= *b - limit;
            *b = limit;
        }
        *a = a.max(0.0);
    };
    shift(&mut x1, &mut x2, f64::from(iw));
    shift(&mut y1, &mut y2, f64::from(ih));
    let (x, y) = (x1.round() as u32, y1.round() as u32);
    let (w, h) = (
        (x2.round() as u32 - x).max(1),
        (y2.round() as u32 - y).max(1),
    );
    Some((x, y, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    fn coverage(mask: &GrayImage) -> usize {
        mask.pixels().filter(|p| **p == Luma([255])).count()
    }

    #[test]
    fn region_grows_to_the_aspect_inside_the_image() {
        let mut m = GrayImage::new(100, 60);
        for x in 10..20 {
            for y in 10..20 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
        let (x, y, w, h) = crop_region(&m, 4, 64, 32).unwrap();
        assert!((w as f64 / h as f64 - 2.0).abs() < 0.1, "{w}x{h}");
        assert!(x <= 6 && y <= 6 && x + w <= 100 && y + h <= 60);
        assert!(crop_region(&GrayImage::new(4, 4), 0, 8, 8).is_none());
        assert_eq!(coverage(&m), 100);
    }

    #[test]
    fn fill_keeps_the_unmasked_and_paints_the_masked_from_around() {
        let image = RgbImage::from_fn(32, 32, |x, _| {
            if x < 16 {
                Rgb([200, 0, 0])
            } else {
                Rgb([0, 0, 200])
            }
        });
        let mut mask = GrayImage::new(32, 32);
        for x in 12..20 {
            for y in 0..32 {
                mask.put_pixel(x, y, Luma([255]));
            }
        }
        let filled = fill(&image, &mask);
        assert_eq!(filled.get_pixel(2, 5), &Rgb([200, 0, 0]));
        let p = filled.get_pixel(13, 16);
        assert!(p[0] > 100 && p[2] < 100, "{p:?}");
        let overlay = Overlay {
            original: image.clone(),
            mask: mask.clone(),
            region: (0, 0, 32, 32),
        };
        let out = overlay.apply(&RgbImage::from_pixel(32, 32, Rgb([0, 255, 0])));
        assert_eq!(out.get_pixel(2, 2), &Rgb([200, 0, 0]));
        assert_eq!(out.get_pixel(14, 2), &Rgb([0, 255, 0]));
    }
}
