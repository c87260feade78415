//! Canny edges (`imageproc`'s: a Gaussian blur with sigma 1.4, Sobel gradients,
//! non-maximum suppression and hysteresis), white on black, the input of the canny
//! ControlNets.

use image::{DynamicImage, RgbImage};

use crate::error::PipelineError;

/// The Canny edges of `image` as a white-on-black RGB image of its size. Gradient
/// strengths above `high` are edges, those between `low` and `high` are edges where
/// they touch one (the annotators' defaults are 100 and 200; strengths reach about
/// 1140).
///
/// # Errors
/// Thresholds that are not finite, negative, or `low > high`.
pub fn canny(image: &DynamicImage, low: f32, high: f32) -> Result<RgbImage, PipelineError> {
    if !(low.is_finite() && high.is_finite() && low >= 0.0 && low <= high) {
        return Err(PipelineError::request(
            "canny",
            format!("thresholds {low} and {high}: need 0 <= low <= high"),
        ));
    }
    let edges = imageproc::edges::canny(&image.to_luma8(), low, high);
    Ok(DynamicImage::ImageLuma8(edges).to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_square_has_edges_on_its_outline_only() {
        let mut img = image::GrayImage::new(64, 64);
        for y in 16..48 {
            for x in 16..48 {
                img.put_pixel(x, y, image::Luma([255]));
            }
        }
        let edges = canny(&DynamicImage::ImageLuma8(img), 100.0, 200.0).unwrap();
        assert_eq!(edges.dimensions(), (64, 64));
        let on = |x: u32, y: u32| edges.get_pixel(x, y).0 == [255, 255, 255];
        assert!((14..18).any(|x| on(x, 32)), "left side");
        assert!(!on(32, 32), "inside");
        assert!(!on(2, 2), "outside");
        assert!(canny(&DynamicImage::new_rgb8(8, 8), 200.0, 100.0).is_err());
    }
}
