//! SDXL's invisible watermark against the `invisible-watermark` package as diffusers'
//! `StableDiffusionXLWatermarker` runs it (`gen/ref_watermark.py`): the marked
//! pictures bit for bit, the message read back from PNG and JPEG (quality 90) files.

use crate::common::fixture;

use stable_diffusion::burn::tensor::DType;
use stable_diffusion::image;
use stable_diffusion::io::WeightSource;
use stable_diffusion::io::watermark::DwtDctWatermark;

fn reference() -> WeightSource {
    WeightSource::open(fixture("reference/watermark/watermark.safetensors")).unwrap()
}

/// A `[1, 3, H, W]` float tensor as its values and `(W, H)`.
fn picture(r: &WeightSource, key: &str) -> (Vec<f32>, usize, usize) {
    let shape = r.get(key).unwrap().shape.clone();
    let values = r.read_float(key, DType::F32, shape.clone()).unwrap();
    (values.try_to_vec::<f32>().unwrap(), shape[3], shape[2])
}

/// diffusers' postprocess of `[3, H, W]` in `[-1, 1]` to 8-bit RGB `[H, W, 3]`.
fn to_u8(chw: &[f32], w: usize, h: usize) -> Vec<u8> {
    let n = w * h;
    (0..n * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let x = (chw[c * n + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            (x * 255.0).round_ties_even() as u8
        })
        .collect()
}

#[test]
fn sdxl_watermark_embedding_is_bit_identical_to_diffusers() {
    let r = reference();
    let wm = DwtDctWatermark::sdxl();
    let bits: Vec<bool> = r
        .read_float("bits", DType::F32, vec![48])
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&b| b == 1.0)
        .collect();
    assert_eq!(wm.bits(), bits.as_slice());
    for k in 0..2 {
        let (mut x, w, h) = picture(&r, &format!("in_{k}"));
        assert!(wm.apply_to_decoded(&mut x, w, h));
        if k == 0 {
            let (want, _, _) = picture(&r, "out_0");
            let differ = x.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{w}x{h}: {differ} float values differ");
        }
        let got = to_u8(&x, w, h);
        let want = r.bytes(&format!("out_{k}_u8")).unwrap();
        let differ = got.iter().zip(want.iter()).filter(|(a, b)| a != b).count();
        eprintln!(
            "{w}x{h}: {differ} of {} 8-bit values differ from diffusers'",
            got.len()
        );
        assert_eq!(differ, 0, "{w}x{h}");
    }
    let (mut small, w, h) = picture(&r, "small_in");
    let before = small.clone();
    assert!(!wm.apply_to_decoded(&mut small, w, h));
    assert_eq!(small, before);
}

#[test]
fn sdxl_watermark_reads_back_after_png_and_jpeg() {
    let r = reference();
    let wm = DwtDctWatermark::sdxl();
    for k in 0..2 {
        let (mut x, w, h) = picture(&r, &format!("in_{k}"));
        let unmarked = image::RgbImage::from_raw(w as u32, h as u32, to_u8(&x, w, h)).unwrap();
        wm.apply_to_decoded(&mut x, w, h);
        let marked = image::RgbImage::from_raw(w as u32, h as u32, to_u8(&x, w, h)).unwrap();
        let png = roundtrip(&marked, image::ImageFormat::Png);
        let ber_png = wm.bit_error_rate(&wm.decode_image(&png).unwrap());
        let jpeg = roundtrip(&marked, image::ImageFormat::Jpeg);
        let ber_jpeg = wm.bit_error_rate(&wm.decode_image(&jpeg).unwrap());
        let ber_none = wm.bit_error_rate(&wm.decode_image(&unmarked).unwrap());
        // The package's own decoder on diffusers' files, recorded by the generator.
        let python = |key: &str| -> f64 {
            let read: Vec<bool> = r
                .read_float(key, DType::F32, vec![48])
                .unwrap()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|&b| b == 1.0)
                .collect();
            wm.bit_error_rate(&read)
        };
        eprintln!(
            "{w}x{h}: bit error rate PNG {ber_png:.3}, JPEG 90 {ber_jpeg:.3}, unmarked {ber_none:.3}; \
             the package's decoder PNG {:.3}, JPEG 90 {:.3}",
            python(&format!("png_bits_{k}")),
            python(&format!("jpeg90_bits_{k}"))
        );
        assert!(ber_png <= 0.05, "{w}x{h} PNG: {ber_png}");
        assert!(
            ber_none >= 0.2,
            "{w}x{h}: an unmarked picture reads as marked ({ber_none})"
        );
    }
}

/// `image` through an in-memory file of `format` (JPEG at quality 90).
fn roundtrip(image: &image::RgbImage, format: image::ImageFormat) -> image::RgbImage {
    let mut bytes = Vec::new();
    match format {
        image::ImageFormat::Jpeg => {
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90);
            enc.encode_image(image).unwrap();
        }
        f => image
            .write_to(&mut std::io::Cursor::new(&mut bytes), f)
            .unwrap(),
    }
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// The owning pipeline marks SDXL's pictures by default (diffusers'
/// `add_watermarker`), not SD 1.5's; both can be switched, explicitly.
#[test]
fn sdxl_pictures_carry_the_watermark_by_default() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let wm = DwtDctWatermark::sdxl();
    let load = |model: &str, watermark: Option<bool>| {
        let options = LoadOptions {
            watermark,
            ..Default::default()
        };
        StableDiffusionPipeline::from_pretrained(fixture(model), &device, &options).unwrap()
    };
    let read = |pipe: &StableDiffusionPipeline| -> f64 {
        let request = GenerationRequest::new("a lighthouse")
            .size(256, 256)
            .steps(1)
            .seed(3);
        let out = pipe.generate(request).unwrap();
        wm.bit_error_rate(&wm.decode_image(&out.images[0].image).unwrap())
    };
    let sdxl = load("tiny-sdxl", None);
    assert_eq!(sdxl.watermark(), Some(&wm));
    let ber = read(&sdxl);
    eprintln!("tiny-sdxl at 256x256: bit error rate {ber:.3}");
    assert!(ber <= 0.1, "{ber}");
    assert!(load("tiny-sdxl", Some(false)).watermark().is_none());
    assert!(load("tiny-sd15", None).watermark().is_none());
    let sd15 = load("tiny-sd15", Some(true));
    let ber = read(&sd15);
    eprintln!("tiny-sd15 with the watermark asked for: bit error rate {ber:.3}");
    assert!(ber <= 0.1, "{ber}");
}

/// The `provenance` example reads a marked picture's parameters and mark, and says
/// when a picture has none.
#[test]
fn the_provenance_example_reports_the_mark() {
    use stable_diffusion::io::image::{GenerationParameters, save_rgb_png};
    let tmp = tempfile::tempdir().unwrap();
    let (mut x, w, h) = picture(&reference(), "in_0");
    let plain = image::RgbImage::from_raw(w as u32, h as u32, to_u8(&x, w, h)).unwrap();
    DwtDctWatermark::sdxl().apply_to_decoded(&mut x, w, h);
    let marked = image::RgbImage::from_raw(w as u32, h as u32, to_u8(&x, w, h)).unwrap();
    let parameters = GenerationParameters {
        prompt: "a lighthouse".into(),
        negative_prompt: String::new(),
        steps: 4,
        sampler: "Euler".into(),
        cfg_scale: 5.0,
        seed: 3,
        width: w,
        height: h,
        model: "tiny-sdxl".into(),
    };
    let (a, b) = (tmp.path().join("marked.png"), tmp.path().join("plain.png"));
    save_rgb_png(&marked, &a, Some(&parameters)).unwrap();
    save_rgb_png(&plain, &b, None).unwrap();
    let out = std::process::Command::new(crate::examples::example("provenance"))
        .args([&a, &b])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (first, second) = text.split_once("plain.png").unwrap();
    assert!(
        first.contains("a lighthouse") && first.contains("watermark: present"),
        "{text}"
    );
    assert!(
        second.contains("parameters: none") && second.contains("not found"),
        "{text}"
    );
}
