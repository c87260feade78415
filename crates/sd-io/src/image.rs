//! Images in and out: PNG, JPEG and WebP in through the `image` crate (any colour
//! type), PNG out with the generation parameters in a `parameters` text chunk, in the
//! A1111 format most tools read.

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

/// Converts one image `[3, H, W]` (or `[1, 3, H, W]`) in `[0, 1]` to RGB8 bytes, rounding
/// half to even as diffusers' `numpy_to_pil` (`(x * 255).round()`) does.
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
            .map(|x| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
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
    write_png_to(BufWriter::new(file), width, height, rgb, parameters)
        .map_err(|e| IoError::io(path, std::io::Error::other(e.to_string())))
}

/// An RGB picture as PNG bytes, with the `parameters` chunk when given (what
/// [`save_rgb_png`] writes to a file).
///
/// # Errors
/// [`IoError::Unsupported`] when the PNG encoder refuses the picture (a zero side).
pub fn encode_rgb_png(
    image: &image::RgbImage,
    parameters: Option<&GenerationParameters>,
) -> Result<Vec<u8>, IoError> {
    let mut out = Vec::new();
    write_png_to(
        &mut out,
        image.width() as usize,
        image.height() as usize,
        image.as_raw(),
        parameters,
    )
    .map_err(|e| IoError::Unsupported(format!("PNG encoding: {e}")))?;
    Ok(out)
}

/// An RGB picture as JPEG bytes at `quality` (1 to 100). JPEG has no text chunk:
/// the parameters go nowhere (C2PA content credentials can carry them).
///
/// # Errors
/// [`IoError::Unsupported`] when the encoder refuses the picture.
pub fn encode_rgb_jpeg(image: &image::RgbImage, quality: u8) -> Result<Vec<u8>, IoError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode_image(image)
        .map_err(|e| IoError::Unsupported(format!("JPEG encoding: {e}")))?;
    Ok(out)
}

/// JPEG quality of pictures written as `.jpg` / `.jpeg`.
pub const JPEG_QUALITY: u8 = 95;

/// An RGB picture encoded as `format`: PNG with the `parameters` chunk, or JPEG at
/// [`JPEG_QUALITY`].
///
/// # Errors
/// As [`encode_rgb_png`] and [`encode_rgb_jpeg`].
pub fn encode_rgb(
    image: &image::RgbImage,
    format: PictureFormat,
    parameters: Option<&GenerationParameters>,
) -> Result<Vec<u8>, IoError> {
    match format {
        PictureFormat::Png => encode_rgb_png(image, parameters),
        PictureFormat::Jpeg => encode_rgb_jpeg(image, JPEG_QUALITY),
    }
}

/// The encodings pictures are written in (and C2PA manifests embedded into).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PictureFormat {
    /// PNG (a `caBX` chunk).
    Png,
    /// JPEG (APP11 segments).
    Jpeg,
}

impl PictureFormat {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }

    /// The format of encoded bytes, from their signature; `None` for anything else.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(Self::Jpeg)
        } else {
            None
        }
    }

    /// The format a file name asks for: `.jpg` / `.jpeg` JPEG, anything else PNG.
    pub fn from_path(path: impl AsRef<Path>) -> Self {
        match path
            .as_ref()
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("jpg" | "jpeg") => Self::Jpeg,
            _ => Self::Png,
        }
    }
}

fn write_png_to<W: std::io::Write>(
    out: W,
    width: usize,
    height: usize,
    rgb: &[u8],
    parameters: Option<&GenerationParameters>,
) -> Result<(), png::EncodingError> {
    let mut enc = png::Encoder::new(out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(p) = parameters {
        enc.add_itxt_chunk("parameters".to_string(), p.to_a1111())?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()
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

/// How an input image whose sides are not multiples of 8 (the VAE's factor) is
/// made to fit. Nothing is changed silently: the default refuses such an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SizeMode {
    /// Refuse an image whose sides are not multiples of the factor.
    #[default]
    Exact,
    /// Resize (Lanczos) to the nearest multiples of the factor (at least one).
    Resize,
    /// Crop to the largest multiples of the factor, centred.
    Crop,
}

/// Reads an image file: PNG, JPEG or WebP, any colour type (grey, RGBA, 16-bit).
pub fn read_image(path: impl AsRef<Path>) -> Result<image::DynamicImage, IoError> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| IoError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| IoError::io(path, e))?;
    reader.decode().map_err(|e| {
        IoError::Unsupported(format!(
            "{}: not a readable PNG, JPEG or WebP image: {e}",
            path.display()
        ))
    })
}

/// The size an image of `width x height` gets under `mode`: unchanged when its sides
/// are multiples of `factor`, else rounded (resize) or floored (crop) to multiples.
///
/// # Errors
/// An empty image; under [`SizeMode::Exact`] a size that does not fit; under
/// [`SizeMode::Crop`] an image smaller than `factor` on a side.
pub fn fitted_size(
    width: usize,
    height: usize,
    factor: usize,
    mode: SizeMode,
) -> Result<(usize, usize), IoError> {
    let f = factor.max(1);
    let (w, h) = (width, height);
    if w == 0 || h == 0 {
        return Err(IoError::Unsupported(format!(
            "image of {w}x{h} pixels is empty"
        )));
    }
    if w.is_multiple_of(f) && h.is_multiple_of(f) {
        return Ok((w, h));
    }
    match mode {
        SizeMode::Exact => Err(IoError::Unsupported(format!(
            "image of {w}x{h} pixels: the sides must be multiples of {f}; \
             ask for SizeMode::Resize or SizeMode::Crop"
        ))),
        SizeMode::Resize => {
            let round = |v: usize| (v.saturating_add(f / 2) / f).max(1) * f;
            Ok((round(w), round(h)))
        }
        SizeMode::Crop => {
            let (cw, ch) = (w / f * f, h / f * f);
            if cw == 0 || ch == 0 {
                return Err(IoError::Unsupported(format!(
                    "image of {w}x{h} pixels is smaller than {f} on a side"
                )));
            }
            Ok((cw, ch))
        }
    }
}

/// Makes an image's sides multiples of `factor` as `mode` says.
///
/// # Errors
/// [`IoError::Unsupported`] under [`SizeMode::Exact`] for a size that does not fit,
/// or for an image smaller than `factor` on a side under [`SizeMode::Crop`].
pub fn fit_size(
    image: image::DynamicImage,
    factor: usize,
    mode: SizeMode,
) -> Result<image::DynamicImage, IoError> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (fw, fh) = fitted_size(w, h, factor, mode)?;
    Ok(if (fw, fh) == (w, h) {
        image
    } else if mode == SizeMode::Crop {
        let (x, y) = ((w - fw) / 2, (h - fh) / 2);
        image.crop_imm(x as u32, y as u32, fw as u32, fh as u32)
    } else {
        lanczos(&image, fw, fh)
    })
}

/// A Lanczos resize as diffusers' image processors make it (PIL's `LANCZOS`): 8-bit
/// pictures through [`crate::pil_resize`] to the bit, deeper ones with the `image`
/// crate's Lanczos3 at their own precision.
pub fn lanczos(image: &image::DynamicImage, width: usize, height: usize) -> image::DynamicImage {
    use crate::pil_resize::{PilFilter, pil_resize};
    let (w, h) = (width as u32, height as u32);
    match image {
        image::DynamicImage::ImageRgb8(rgb) => pil_resize(rgb, w, h, PilFilter::Lanczos).into(),
        image::DynamicImage::ImageLuma8(_) | image::DynamicImage::ImageRgba8(_) => {
            pil_resize(&image.to_rgb8(), w, h, PilFilter::Lanczos).into()
        }
        _ => image.resize_exact(w, h, image::imageops::FilterType::Lanczos3),
    }
}

/// An image as `[1, 3, H, W]` in `[-1, 1]` (diffusers' image preprocessing). Grey
/// images are repeated over RGB, alpha is dropped (as PIL's `convert("RGB")`), 16-bit
/// and float images keep their precision.
pub fn image_to_tensor(image: &image::DynamicImage, device: &Device) -> Tensor<4> {
    let rgb = image.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (i, px) in rgb.pixels().enumerate() {
        for ch in 0..3 {
            out[ch * h * w + i] = px.0[ch] * 2.0 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(out, [1, 3, h, w]), device)
}

/// A ControlNet control image as `[1, 3, H, W]` in `[0, 1]` (diffusers' control
/// image processor: RGB, not normalised to `[-1, 1]`), resized to `width` x
/// `height` with Lanczos ([`lanczos`]) when it has another size.
pub fn control_image_to_tensor(
    image: &image::DynamicImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Tensor<4> {
    let resized;
    let image = if (image.width() as usize, image.height() as usize) == (width, height) {
        image
    } else {
        resized = lanczos(image, width, height);
        &resized
    };
    image_to_tensor(image, device) / 2.0 + 0.5
}

/// A mask image as `[1, 1, H, W]` in `[0, 1]` (white = repaint; the luminance of
/// colour masks, Rec. 601 as PIL's `convert("L")`).
pub fn mask_to_tensor(image: &image::DynamicImage, device: &Device) -> Tensor<4> {
    let rgb = image.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let out: Vec<f32> = rgb
        .pixels()
        .map(|p| 0.299 * p.0[0] + 0.587 * p.0[1] + 0.114 * p.0[2])
        .collect();
    Tensor::from_data(TensorData::new(out, [1, 1, h, w]), device)
}

/// Images `[b, 3, H, W]` in `[0, 1]` as 8-bit RGB images.
pub fn tensor_to_images(images: &Tensor<4>) -> Vec<image::RgbImage> {
    let b = images.dims()[0];
    (0..b)
        .map(|i| {
            let (w, h, rgb) = to_rgb8(images, i);
            image::RgbImage::from_raw(w as u32, h as u32, rgb)
                .unwrap_or_else(|| image::RgbImage::new(w as u32, h as u32))
        })
        .collect()
}

/// Writes an RGB image as a PNG with an optional A1111 `parameters` chunk.
pub fn save_rgb_png(
    image: &image::RgbImage,
    path: impl AsRef<Path>,
    parameters: Option<&GenerationParameters>,
) -> Result<(), IoError> {
    write_png_rgb8(
        path.as_ref(),
        image.width() as usize,
        image.height() as usize,
        image.as_raw(),
        parameters,
    )
}

/// Loads an image file (PNG, JPEG or WebP) as `[1, 3, H, W]` in `[-1, 1]`.
pub fn load_image(path: impl AsRef<Path>, device: &Device) -> Result<Tensor<4>, IoError> {
    Ok(image_to_tensor(&read_image(path)?, device))
}

/// Loads a mask file as `[1, 1, H, W]` in `[0, 1]` (white = repaint).
pub fn load_mask(path: impl AsRef<Path>, device: &Device) -> Result<Tensor<4>, IoError> {
    Ok(mask_to_tensor(&read_image(path)?, device))
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

/// Writes frames (all the same size) as an animated GIF that loops forever,
/// `delay_ms` per frame (GIF's 256-colour palette per frame; for exact colours use
/// [`save_apng`]).
pub fn save_gif(
    path: impl AsRef<Path>,
    frames: &[image::RgbImage],
    delay_ms: u16,
) -> Result<(), IoError> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let path = path.as_ref();
    let Some(first) = frames.first() else {
        return Err(IoError::Unsupported(
            "an animation needs at least one frame".into(),
        ));
    };
    if frames.iter().any(|f| f.dimensions() != first.dimensions()) {
        return Err(IoError::Unsupported(
            "animation frames differ in size".into(),
        ));
    }
    let bad = |e: image::ImageError| IoError::io(path, std::io::Error::other(e.to_string()));
    let file = File::create(path).map_err(|e| IoError::io(path, e))?;
    let mut enc = GifEncoder::new_with_speed(BufWriter::new(file), 10);
    enc.set_repeat(Repeat::Infinite).map_err(bad)?;
    let delay = image::Delay::from_numer_denom_ms(u32::from(delay_ms), 1);
    for f in frames {
        let rgba = image::DynamicImage::ImageRgb8(f.clone()).into_rgba8();
        enc.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
            .map_err(bad)?;
    }
    Ok(())
}

/// PSNR in dB of two 8-bit pictures of the same size (any channel layout, as
/// long as both share it); `None` when their lengths differ or they are empty.
/// Identical pictures give a finite ~168 dB (the error is floored at 1e-12).
pub fn psnr(a: &[u8], b: &[u8]) -> Option<f64> {
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    Some(10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10())
}

#[cfg(test)]
mod animation_tests {
    use super::save_gif;

    #[test]
    fn gif_frames_round_trip_and_mismatched_sizes_are_refused() {
        use image::AnimationDecoder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gif");
        let frames: Vec<image::RgbImage> = (0..3u8)
            .map(|i| image::RgbImage::from_pixel(8, 4, image::Rgb([i * 100, 0, 255])))
            .collect();
        save_gif(&path, &frames, 120).unwrap();
        let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let decoded = image::codecs::gif::GifDecoder::new(file)
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap();
        assert_eq!(decoded.len(), 3);
        assert_eq!(decoded[2].buffer().get_pixel(1, 1).0, [200, 0, 255, 255]);
        let mixed = vec![frames[0].clone(), image::RgbImage::new(4, 4)];
        assert!(save_gif(&path, &mixed, 120).is_err());
        assert!(save_gif(&path, &[], 120).is_err());
    }
}
