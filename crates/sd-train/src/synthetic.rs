//! The synthetic captioned data set of the demo model — shapes x colours x positions x
//! backgrounds, captioned "a red circle on a white background, top left" — and the
//! deterministic classifier that measures whether a generated image matches its
//! prompt.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::TrainError;

/// Shapes drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled upward triangle.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Shape colours: caption word and RGB.
pub const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [235, 215, 40]),
];

/// Backgrounds: caption word and RGB.
pub const BACKGROUNDS: [(&str, [u8; 3]); 3] = [
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
    ("gray", [128, 128, 128]),
];

/// Positions: caption words and the centre as a fraction of the image side.
pub const POSITIONS: [(&str, [f32; 2]); 5] = [
    ("top left", [0.3, 0.3]),
    ("top right", [0.7, 0.3]),
    ("bottom left", [0.3, 0.7]),
    ("bottom right", [0.7, 0.7]),
    ("center", [0.5, 0.5]),
];

/// One picture of the data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// The shape.
    pub shape: Shape,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`BACKGROUNDS`].
    pub background: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
    /// Shape size as a fraction of the image side (0.3 to 0.4 in the data set).
    pub size: f32,
    /// Offset of the centre, as a fraction of the side (within +-0.04).
    pub jitter: [f32; 2],
}

impl Scene {
    /// "a red circle on a white background, top left".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background, {}",
            COLOURS[self.colour].0,
            self.shape.name(),
            BACKGROUNDS[self.background].0,
            POSITIONS[self.position].0
        )
    }

    /// Draws the scene, `side` x `side` RGB bytes (4x4 supersampled edges).
    pub fn render(&self, side: usize) -> Vec<u8> {
        let bg = BACKGROUNDS[self.background].1;
        let fg = COLOURS[self.colour].1;
        let [px, py] = POSITIONS[self.position].1;
        let (cx, cy) = (
            (px + self.jitter[0]) * side as f32,
            (py + self.jitter[1]) * side as f32,
        );
        let r = self.size * side as f32 / 2.0;
        let inside = |x: f32, y: f32| -> bool {
            let (dx, dy) = (x - cx, y - cy);
            match self.shape {
                Shape::Circle => dx * dx + dy * dy <= r * r,
                Shape::Square => dx.abs() <= r * 0.9 && dy.abs() <= r * 0.9,
                Shape::Triangle => {
                    // Apex up, base down, inscribed in the circle of radius r.
                    let top = cy - r;
                    let bottom = cy + r * 0.7;
                    if y < top || y > bottom {
                        return false;
                    }
                    let half = (y - top) / (bottom - top) * r * 1.1;
                    dx.abs() <= half
                }
            }
        };
        let mut out = vec![0u8; side * side * 3];
        const SS: usize = 4;
        for y in 0..side {
            for x in 0..side {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let fx = x as f32 + (sx as f32 + 0.5) / SS as f32;
                        let fy = y as f32 + (sy as f32 + 0.5) / SS as f32;
                        hits += inside(fx, fy) as usize;
                    }
                }
                let a = hits as f32 / (SS * SS) as f32;
                for c in 0..3 {
                    out[(y * side + x) * 3 + c] =
                        (bg[c] as f32 * (1.0 - a) + fg[c] as f32 * a).round() as u8;
                }
            }
        }
        out
    }

    /// The scene's control image for the demo ControlNet, `side` x `side` RGB bytes: a
    /// white disc on black where the shape is (its centre and size; neither its
    /// outline nor its colour), edges 4x4 supersampled.
    pub fn control_blob(&self, side: usize) -> Vec<u8> {
        let [px, py] = POSITIONS[self.position].1;
        let (cx, cy) = (
            (px + self.jitter[0]) * side as f32,
            (py + self.jitter[1]) * side as f32,
        );
        let r = self.size * side as f32 / 2.0;
        let mut out = vec![0u8; side * side * 3];
        const SS: usize = 4;
        for y in 0..side {
            for x in 0..side {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let dx = x as f32 + (sx as f32 + 0.5) / SS as f32 - cx;
                        let dy = y as f32 + (sy as f32 + 0.5) / SS as f32 - cy;
                        hits += (dx * dx + dy * dy <= r * r) as usize;
                    }
                }
                let v = (255.0 * hits as f32 / (SS * SS) as f32).round() as u8;
                out[(y * side + x) * 3..(y * side + x) * 3 + 3].copy_from_slice(&[v; 3]);
            }
        }
        out
    }

    /// Every combination of shape, colour, background and position, with random
    /// size and jitter from `rng`.
    pub fn all(rng: &mut StdRng) -> Vec<Scene> {
        let mut v = Vec::new();
        for shape in Shape::ALL {
            for colour in 0..COLOURS.len() {
                for background in 0..BACKGROUNDS.len() {
                    for position in 0..POSITIONS.len() {
                        v.push(Scene {
                            shape,
                            colour,
                            background,
                            position,
                            size: rng.random_range(0.3..0.4),
                            jitter: [rng.random_range(-0.04..0.04), rng.random_range(-0.04..0.04)],
                        });
                    }
                }
            }
        }
        v
    }
}

/// Writes `copies` renderings (different sizes and jitters) of every combination,
/// `side` pixels square, as `NNNNN.png` + `NNNNN.txt` into `dir`; returns the count.
pub fn write_data_set(
    dir: &Path,
    side: usize,
    copies: usize,
    seed: u64,
) -> Result<usize, TrainError> {
    write_scenes(dir, side, copies, seed, false)
}

/// [`write_data_set`] plus each picture's [`Scene::control_blob`] as
/// `dir/conditioning/NNNNN.png`: the layout of ControlNet training
/// (`TrainConfig::controlnet`); returns the count.
pub fn write_control_data_set(
    dir: &Path,
    side: usize,
    copies: usize,
    seed: u64,
) -> Result<usize, TrainError> {
    write_scenes(dir, side, copies, seed, true)
}

fn write_scenes(
    dir: &Path,
    side: usize,
    copies: usize,
    seed: u64,
    control: bool,
) -> Result<usize, TrainError> {
    let cond = dir.join("conditioning");
    let made = if control { &cond } else { dir };
    std::fs::create_dir_all(made).map_err(|e| TrainError::file(made, e))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    for _ in 0..copies {
        for scene in Scene::all(&mut rng) {
            let name = format!("{n:05}.png");
            let path = dir.join(&name);
            sd_io::image::write_png_rgb8(&path, side, side, &scene.render(side), None)?;
            let txt = path.with_extension("txt");
            std::fs::write(&txt, scene.caption()).map_err(|e| TrainError::file(&txt, e))?;
            if control {
                let blob = scene.control_blob(side);
                sd_io::image::write_png_rgb8(&cond.join(&name), side, side, &blob, None)?;
            }
            n += 1;
        }
    }
    Ok(n)
}

/// What the classifier sees in an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Classified {
    /// Nearest [`COLOURS`] entry to the foreground's median colour.
    pub colour: usize,
    /// Shape from the fill ratio of the foreground's bounding box.
    pub shape: Shape,
    /// Nearest [`POSITIONS`] entry to the foreground's centroid.
    pub position: usize,
    /// Foreground share of the image.
    pub coverage: f32,
}

fn dist2(a: [f32; 3], b: [u8; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i] as f32).powi(2)).sum()
}

/// Classifies an RGB image: the background is the median colour of the border; the
/// foreground is every pixel farther than 60 from it; the colour is the nearest
/// palette colour of the foreground's median; a foreground whose top quarter is
/// under 0.6 times as wide as its bottom quarter is a triangle, else one filling
/// more than 0.89 of its bounding box is a square (a disc fills pi/4), else a circle. `None` when there is no foreground (under 1% of the image).
pub fn classify(rgb: &[u8], side: usize) -> Option<Classified> {
    let px = |x: usize, y: usize| -> [f32; 3] {
        let i = (y * side + x) * 3;
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    let median = |mut v: Vec<[f32; 3]>| -> [f32; 3] {
        let mut out = [0.0; 3];
        for (c, o) in out.iter_mut().enumerate() {
            v.sort_by(|a, b| a[c].total_cmp(&b[c]));
            *o = v[v.len() / 2][c];
        }
        out
    };
    let mut border = Vec::new();
    for i in 0..side {
        border.extend([px(i, 0), px(i, side - 1), px(0, i), px(side - 1, i)]);
    }
    let bg = median(border);
    let mut fg = Vec::new();
    let mut row_count = vec![0usize; side];
    let (mut x0, mut y0, mut x1, mut y1) = (side, side, 0, 0);
    let (mut sx, mut sy) = (0.0, 0.0);
    for (y, count) in row_count.iter_mut().enumerate() {
        for x in 0..side {
            let p = px(x, y);
            let d: f32 = (0..3).map(|c| (p[c] - bg[c]).powi(2)).sum();
            if d > 60.0 * 60.0 {
                fg.push(p);
                *count += 1;
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
                sx += x as f32 + 0.5;
                sy += y as f32 + 0.5;
            }
        }
    }
    let n = fg.len();
    if n * 100 < side * side {
        return None;
    }
    let (cx, cy) = (sx / n as f32 / side as f32, sy / n as f32 / side as f32);
    let m = median(fg);
    let colour = (0..COLOURS.len())
        .min_by(|&a, &b| dist2(m, COLOURS[a].1).total_cmp(&dist2(m, COLOURS[b].1)))
        .unwrap();
    let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
    let fill = n as f32 / bbox;
    // Mean row width in the top and bottom quarters of the box: a triangle is
    // narrow at the top and wide at the bottom; circles and squares are symmetric.
    let h = y1 - y0 + 1;
    let q = (h / 4).max(1);
    let mean = |rows: std::ops::Range<usize>| -> f32 {
        let n = rows.len().max(1) as f32;
        rows.map(|y| row_count[y] as f32).sum::<f32>() / n
    };
    let taper = mean(y0..y0 + q) / mean(y1 + 1 - q..y1 + 1).max(1.0);
    let shape = if taper < 0.6 {
        Shape::Triangle
    } else if fill > 0.89 {
        Shape::Square
    } else {
        Shape::Circle
    };
    let position = (0..POSITIONS.len())
        .min_by(|&a, &b| {
            let d = |p: [f32; 2]| (p[0] - cx).powi(2) + (p[1] - cy).powi(2);
            d(POSITIONS[a].1).total_cmp(&d(POSITIONS[b].1))
        })
        .unwrap();
    Some(Classified {
        colour,
        shape,
        position,
        coverage: n as f32 / (side * side) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_reads_every_rendered_scene() {
        let mut rng = StdRng::seed_from_u64(1);
        for side in [64, 32] {
            for scene in Scene::all(&mut rng) {
                let c = classify(&scene.render(side), side).expect("a foreground");
                assert_eq!(c.colour, scene.colour, "{} at {side}", scene.caption());
                assert_eq!(c.shape, scene.shape, "{} at {side}", scene.caption());
                assert_eq!(c.position, scene.position, "{} at {side}", scene.caption());
            }
        }
    }

    #[test]
    fn captions_read_as_the_issue_says() {
        let s = Scene {
            shape: Shape::Circle,
            colour: 0,
            background: 2,
            position: 0,
            size: 0.35,
            jitter: [0.0; 2],
        };
        assert_eq!(s.caption(), "a red circle on a gray background, top left");
    }

    #[test]
    fn control_blobs_sit_where_the_shapes_are() {
        let mut rng = StdRng::seed_from_u64(5);
        for scene in Scene::all(&mut rng).iter().step_by(7) {
            let blob = scene.control_blob(64);
            // White on black: the classifier reads the blob's centroid as the position.
            let c = classify(&blob, 64).expect("a blob");
            assert_eq!(c.position, scene.position, "{}", scene.caption());
        }
        let dir = std::env::temp_dir().join(format!("sd-control-set-{}", std::process::id()));
        let n = write_control_data_set(&dir, 16, 1, 3).unwrap();
        assert_eq!(n, 180);
        assert!(dir.join("conditioning/00179.png").exists());
        assert!(dir.join("00179.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_blank_image_has_no_foreground() {
        assert!(classify(&vec![128u8; 32 * 32 * 3], 32).is_none());
    }
}

/// Prompt-match figures of a model over the data set's captions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MatchReport {
    /// Images generated.
    pub images: usize,
    /// Images whose colour and shape both match the prompt (the headline figure).
    pub colour_and_shape: usize,
    /// Colour matches.
    pub colour: usize,
    /// Shape matches.
    pub shape: usize,
    /// Position matches.
    pub position: usize,
}

impl MatchReport {
    /// Counts one image `rgb` (`side` pixels square) meant to show `scene`.
    pub fn add(&mut self, scene: &Scene, rgb: &[u8], side: usize) {
        self.images += 1;
        if let Some(c) = classify(rgb, side) {
            let colour = c.colour == scene.colour;
            let shape = c.shape == scene.shape;
            self.colour += colour as usize;
            self.shape += shape as usize;
            self.position += (c.position == scene.position) as usize;
            self.colour_and_shape += (colour && shape) as usize;
        }
    }

    /// The share of images matching colour and shape.
    pub fn rate(&self) -> f64 {
        self.colour_and_shape as f64 / self.images.max(1) as f64
    }
}

impl std::fmt::Display for MatchReport {
    /// "colour+shape 81.0% (colour 90.0%, shape 85.0%, position 70.0%) over 120 images".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |k: usize| 100.0 * k as f64 / self.images.max(1) as f64;
        write!(
            f,
            "colour+shape {:.1}% (colour {:.1}%, shape {:.1}%, position {:.1}%) over {} images",
            pct(self.colour_and_shape),
            pct(self.colour),
            pct(self.shape),
            pct(self.position),
            self.images
        )
    }
}

/// The scenes the measurements draw, `n` of them: every combination in a fixed
/// shuffled order, cycled through.
fn evaluation_scenes(n: usize) -> Vec<Scene> {
    use rand::seq::SliceRandom;
    let mut rng = StdRng::seed_from_u64(2024);
    let mut scenes = Scene::all(&mut rng);
    scenes.shuffle(&mut rng);
    scenes.iter().copied().cycle().take(n).collect()
}

/// Generates `n` images with `sd` for the data set's captions (cycled through in a
/// fixed shuffled order, seed `i` for the `i`-th image), `side` pixels, and
/// classifies each against its prompt.
pub fn prompt_match(
    sd: &sd_pipelines::StableDiffusion<'_>,
    n: usize,
    steps: usize,
    guidance: f64,
    side: usize,
) -> Result<MatchReport, TrainError> {
    let mut report = MatchReport::default();
    for (i, scene) in evaluation_scenes(n).into_iter().enumerate() {
        let options = sd_pipelines::GenerationOptions {
            prompt: scene.caption(),
            steps: sd_core::Steps::Count(steps),
            guidance_scale: guidance,
            width: side,
            height: side,
            ..Default::default()
        };
        let out = sd.txt2img(&options, &mut sd_core::NoiseRng::seed(i as u64), None)?;
        let (_, _, rgb) = sd_io::image::to_rgb8(&out.images, 0);
        report.add(&scene, &rgb, side);
    }
    Ok(report)
}

/// Generates `n` images for the data set's captions (the fixed shuffled order of
/// [`prompt_match`], seed `i` for the `i`-th image), each with its scene's
/// [`Scene::control_blob`], through `generate(caption, control image, seed)`
/// (returning the picture's RGB bytes, `side` pixels square), and classifies each:
/// `position` is the share that lands where the control image puts it.
///
/// # Errors
/// What `generate` returns.
pub fn control_match(
    n: usize,
    side: usize,
    mut generate: impl FnMut(&str, image::RgbImage, u64) -> Result<Vec<u8>, TrainError>,
) -> Result<MatchReport, TrainError> {
    let mut report = MatchReport::default();
    for (i, scene) in evaluation_scenes(n).into_iter().enumerate() {
        let blob = image::RgbImage::from_raw(side as u32, side as u32, scene.control_blob(side))
            .expect("side x side RGB bytes");
        let rgb = generate(&scene.caption(), blob, i as u64)?;
        report.add(&scene, &rgb, side);
    }
    Ok(report)
}

/// Encodes every scene of the data set (a fresh rendering, `side` pixels) with `vae`,
/// decodes the posterior mean and classifies the result against the scene: how much
/// of the prompt the latent space keeps, an upper bound for a U-Net trained on it.
///
/// # Errors
/// The VAE's shape errors (`side` not a multiple of 8).
pub fn reconstruction_match(
    vae: &sd_models::AutoencoderKL,
    side: usize,
) -> Result<MatchReport, sd_core::CoreError> {
    use burn::prelude::*;
    use sd_core::Autoencoder;
    let device = vae.encoder.conv_in.weight.val().device();
    let mut rng = StdRng::seed_from_u64(7);
    let scenes = Scene::all(&mut rng);
    let mut report = MatchReport::default();
    for chunk in scenes.chunks(16) {
        let pixels: Vec<f32> = chunk
            .iter()
            .flat_map(|s| s.render(side))
            .map(|v| v as f32 / 127.5 - 1.0)
            .collect();
        let x = Tensor::<4>::from_data(
            TensorData::new(pixels, [chunk.len(), side, side, 3]),
            &device,
        )
        .permute([0, 3, 1, 2]);
        let mean = vae.encode(x)?.mean;
        let images = (vae.decode(mean)? + 1.0) / 2.0;
        for (i, scene) in chunk.iter().enumerate() {
            let (_, _, rgb) = sd_io::image::to_rgb8(&images, i);
            report.add(scene, &rgb, side);
        }
    }
    Ok(report)
}
