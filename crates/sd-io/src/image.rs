//! Images in and out: PNG files with the generation parameters in a `parameters`
//! text chunk, in the A1111 format most tools read.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use burn::prelude::*;

use crate::error::IoError;

/// How an image was generated (A1111's `parameters` text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationParameters {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty for none).
    pub negative_prompt: String,
    /// Denoising steps.
    pub steps: usize,
    /// Sampler name ("Euler a", "DPM++ 2M Karras", ...).
    pub sampler: String,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Seed.
    pub seed: u64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Model name.
    pub model: String,
}

impl GenerationParameters {
    /// The A1111 text: prompt, `Negative prompt: ...`, then `Steps: .., Sampler: .., ...`.
    pub fn to_a1111(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        ));
        s
    }

    /// Parses the A1111 text (unknown settings are ignored).
    pub fn parse_a1111(text: &str) -> Option<Self> {
        let (body, settings) = text.rsplit_once('\n').unwrap_or(("", text));
        if !settings.starts_with("Steps: ") {
            return None;
        }
        let mut p = Self::default();
        match body.split_once("\nNegative prompt: ") {
            Some((prompt, neg)) => {
                p.prompt = prompt.to_string();
                p.negative_prompt = neg.to_string();
            }
            None => match body.strip_prefix("Negative prompt: ") {
                Some(neg) => p.negative_prompt = neg.to_string(),
                None => p.prompt = body.to_string(),
            },
        }
        for item in settings.split(", ") {
            let Some((k, v)) = item.split_once(": ") else {
                continue;
            };
            match k {
                "Steps" => p.steps = v.parse().ok()?,
                "Sampler" => p.sampler = v.to_string(),
                "CFG scale" => p.cfg_scale = v.parse().ok()?,
                "Seed" => p.seed = v.parse().ok()?,
                "Size" => {
                    let (w, h) = v.split_once('x')?;
                    p.width = w.parse().ok()?;
                    p.height = h.parse().ok()?;
                }
                "Model" => p.model = v.to_string(),
                _ => {}
            }
        }
        Some(p)
    }
}

/// Converts one image `[3, H, W]` (or `[1, 3, H, W]`) in `[0, 1]` to RGB8 bytes.
pub fn to_rgb8(image: &Tensor<4>, index: usize) -> (usize, usize, Vec<u8>) {
    let [_, c, h, w] = image.dims();
    let one = image.clone().slice([index..index + 1, 0..c, 0..h, 0..w]);
    let v = one
        .permute([0, 2, 3, 1])
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    (
        w,
        h,
        v.iter()
            .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect(),
    )
}

/// Writes image `index` of a `[b, 3, H, W]` batch in `[0, 1]` as a PNG, with the
/// generation parameters in a `parameters` text chunk.
pub fn save_png(
    images: &Tensor<4>,
    index: usize,
    path: impl AsRef<Path>,
    parameters: Option<&GenerationParameters>,
) -> Result<(), IoError> {
    let (w, h, rgb) = to_rgb8(images, index);
    write_png_rgb8(path.as_ref(), w, h, &rgb, parameters)
}

/// Writes RGB8 pixels as a PNG with an optional `parameters` chunk.
pub fn write_png_rgb8(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    parameters: Option<&GenerationParameters>,
) -> Result<(), IoError> {
    let file = File::create(path).map_err(|e| IoError::io(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let bad = |e: png::EncodingError| IoError::io(path, std::io::Error::other(e.to_string()));
    if let Some(p) = parameters {
        enc.add_itxt_chunk("parameters".to_string(), p.to_a1111())
            .map_err(bad)?;
    }
    let mut writer = enc.write_header().map_err(bad)?;
    writer.write_image_data(rgb).map_err(bad)?;
    writer.finish().map_err(bad)
}

fn decode(path: &Path) -> Result<(png::OutputInfo, Vec<u8>, Option<String>), IoError> {
    let file = File::open(path).map_err(|e| IoError::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let bad = |e: png::DecodingError| {
        IoError::Unsupported(format!("{}: not a readable PNG: {e}", path.display()))
    };
    let mut reader = decoder.read_info().map_err(bad)?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let params = meta
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            meta.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        });
    Ok((info, buf, params))
}

/// Reads the A1111 `parameters` chunk of a PNG, if any.
pub fn read_parameters(path: impl AsRef<Path>) -> Result<Option<GenerationParameters>, IoError> {
    let (_, _, text) = decode(path.as_ref())?;
    Ok(text.and_then(|t| GenerationParameters::parse_a1111(&t)))
}

fn channels(info: &png::OutputInfo) -> usize {
    match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => 3,
    }
}

/// Loads a PNG as `[1, 3, H, W]` in `[-1, 1]` (diffusers' image preprocessing).
pub fn load_image(path: impl AsRef<Path>, device: &Device) -> Result<Tensor<4>, IoError> {
    let (info, buf, _) = decode(path.as_ref())?;
    let (w, h, c) = (info.width as usize, info.height as usize, channels(&info));
    let mut out = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            let px = &buf[(y * w + x) * c..(y * w + x + 1) * c];
            for ch in 0..3 {
                let v = if c < 3 { px[0] } else { px[ch] };
                out[ch * h * w + y * w + x] = v as f32 / 255.0 * 2.0 - 1.0;
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [1, 3, h, w]),
        device,
    ))
}

/// Loads a PNG mask as `[1, 1, H, W]` in `[0, 1]` (white = repaint; luminance of
/// colour masks).
pub fn load_mask(path: impl AsRef<Path>, device: &Device) -> Result<Tensor<4>, IoError> {
    let (info, buf, _) = decode(path.as_ref())?;
    let (w, h, c) = (info.width as usize, info.height as usize, channels(&info));
    let out: Vec<f32> = (0..h * w)
        .map(|i| {
            let px = &buf[i * c..(i + 1) * c];
            let v = if c >= 3 {
                0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32
            } else {
                px[0] as f32
            };
            v / 255.0
        })
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(out, [1, 1, h, w]),
        device,
    ))
}

/// Writes frames (each `(width, height, rgb8)`, all the same size) as an animated PNG
/// (APNG) that loops forever, `delay_ms` per frame.
pub fn save_apng(
    path: impl AsRef<Path>,
    frames: &[(usize, usize, Vec<u8>)],
    delay_ms: u16,
    parameters: Option<&GenerationParameters>,
) -> Result<(), IoError> {
    let path = path.as_ref();
    let Some((w, h, _)) = frames.first() else {
        return Err(IoError::Unsupported(
            "an animation needs at least one frame".into(),
        ));
    };
    if frames.iter().any(|(fw, fh, _)| fw != w || fh != h) {
        return Err(IoError::Unsupported(
            "animation frames differ in size".into(),
        ));
    }
    let file = File::create(path).map_err(|e| IoError::io(path, e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), *w as u32, *h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let bad = |e: png::EncodingError| IoError::io(path, std::io::Error::other(e.to_string()));
    enc.set_animated(frames.len() as u32, 0).map_err(bad)?;
    enc.set_frame_delay(delay_ms, 1000).map_err(bad)?;
    if let Some(p) = parameters {
        enc.add_itxt_chunk("parameters".to_string(), p.to_a1111())
            .map_err(bad)?;
    }
    let mut writer = enc.write_header().map_err(bad)?;
    for (_, _, rgb) in frames {
        writer.write_image_data(rgb).map_err(bad)?;
    }
    writer.finish().map_err(bad)
}
