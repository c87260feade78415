//! Image-caption data sets: a folder of images, each with a caption in a `.txt` file of
//! the same stem (`cat.png` + `cat.txt`), the convention of kohya's scripts and most
//! fine-tuning tools.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::imageops::FilterType;

use crate::error::TrainError;

/// One training example: an image file and its caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The image (PNG or JPEG).
    pub image: PathBuf,
    /// The caption.
    pub caption: String,
}

/// Image extensions read.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Lists the examples of `dir`, sorted by file name. An image without a caption file
/// gets `default_caption` (a DreamBooth instance prompt), or is an error without one.
pub fn read_folder(dir: &Path, default_caption: Option<&str>) -> Result<Vec<Example>, TrainError> {
    let err = |message: String| TrainError::Data {
        path: dir.to_path_buf(),
        message,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| err(e.to_string()))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    images.sort();
    if images.is_empty() {
        return Err(err("no .png / .jpg images".into()));
    }
    images
        .into_iter()
        .map(|image| {
            let txt = image.with_extension("txt");
            let caption = if txt.exists() {
                std::fs::read_to_string(&txt)
                    .map_err(|e| err(format!("{}: {e}", txt.display())))?
                    .trim()
                    .to_string()
            } else if let Some(c) = default_caption {
                c.to_string()
            } else {
                return Err(err(format!(
                    "{} has no caption file {}",
                    image.display(),
                    txt.display()
                )));
            };
            Ok(Example { image, caption })
        })
        .collect()
}

/// A training picture as the model sees it, with where it came from (SDXL's
/// micro-conditioning).
#[derive(Debug, Clone)]
pub struct TrainingImage {
    /// `[1, 3, resolution, resolution]`, values in `[-1, 1]`.
    pub pixels: Tensor<4>,
    /// The file's size `(height, width)` before resizing (SDXL's `original_size`).
    pub original_size: (usize, usize),
    /// The crop's top-left corner `(top, left)` in the resized picture (SDXL's
    /// `crops_coords_top_left`).
    pub crop_top_left: (usize, usize),
}

/// Python's `round(n / 2)` (half to even), as torchvision's `CenterCrop` places it.
fn half_rounded_to_even(n: usize) -> usize {
    let half = n / 2;
    if n % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Loads an image, resizes its shorter side to `resolution` (bilinear with
/// antialiasing, the longer side truncated, as torchvision's `Resize`) and crops
/// `resolution` x `resolution` from the centre (placed as torchvision's `CenterCrop`)
/// or the top-left corner without `center_crop`, optionally mirrored.
///
/// # Shapes
/// - output: `[1, 3, resolution, resolution]`, values in `[-1, 1]`
pub fn load_training_image(
    path: &Path,
    resolution: usize,
    center_crop: bool,
    flip: bool,
    device: &Device,
) -> Result<Tensor<4>, TrainError> {
    Ok(load_training_image_with_sizes(path, resolution, center_crop, flip, device)?.pixels)
}

/// [`load_training_image`], with the original size and the crop corner.
pub fn load_training_image_with_sizes(
    path: &Path,
    resolution: usize,
    center_crop: bool,
    flip: bool,
    device: &Device,
) -> Result<TrainingImage, TrainError> {
    let err = |message: String| TrainError::Data {
        path: path.to_path_buf(),
        message,
    };
    if resolution == 0 || !resolution.is_multiple_of(8) {
        return Err(TrainError::Config(format!(
            "resolution {resolution} is not a positive multiple of 8"
        )));
    }
    let img = image::open(path).map_err(|e| err(e.to_string()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let short = w.min(h);
    let (nw, nh) = if w <= h {
        (resolution, h * resolution / short)
    } else {
        (w * resolution / short, resolution)
    };
    let img = if (nw, nh) != (w, h) {
        image::imageops::resize(&img, nw as u32, nh as u32, FilterType::Triangle)
    } else {
        img
    };
    let (x0, y0) = if center_crop {
        (
            half_rounded_to_even(nw - resolution),
            half_rounded_to_even(nh - resolution),
        )
    } else {
        (0, 0)
    };
    let mut v = vec![0f32; 3 * resolution * resolution];
    for y in 0..resolution {
        for x in 0..resolution {
            let sx = if flip { resolution - 1 - x } else { x };
            let p = img.get_pixel((x0 + sx) as u32, (y0 + y) as u32);
            for c in 0..3 {
                v[c * resolution * resolution + y * resolution + x] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(TrainingImage {
        pixels: Tensor::from_data(TensorData::new(v, [1, 3, resolution, resolution]), device),
        original_size: (h, w),
        crop_top_left: (y0, x0),
    })
}

#[cfg(test)]
mod tests {
    use super::half_rounded_to_even;

    #[test]
    fn center_crop_corner_rounds_half_to_even_as_python() {
        // round(0.5) = 0, round(1.5) = 2, round(2.5) = 2, round(3.5) = 4.
        let got: Vec<usize> = [0, 1, 2, 3, 4, 5, 7, 8].map(half_rounded_to_even).to_vec();
        assert_eq!(got, [0, 0, 1, 2, 2, 2, 4, 4]);
    }
}
