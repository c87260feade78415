//! GGUF checkpoints (issue 28) in the layouts users download, made from the tiny
//! models by `tests/fixtures/gen/gguf_models.py`: stable-diffusion.cpp's (every
//! component in one file, original names, or its renamed SDXL text encoders with
//! `in_proj` fused or split) and ComfyUI-GGUF's (the denoiser alone, no prefix,
//! tensors flattened to rows of 256 with `comfy.gguf.orig_shape.*`). Each component
//! equals the safetensors original within its type's rounding (a key mapped to the
//! wrong tensor, a wrong reshape or a missed transpose is off by the tensor's whole
//! range), and the owning pipeline generates from each file a picture close to the
//! original's.

use crate::common;

use common::fixture;
use stable_diffusion::burn::module::Module;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::{ComponentOptions, Sd3SingleFile, SingleFile};
use stable_diffusion::pipelines::{LoadOptions, ModelFamily, StableDiffusionPipeline};

fn gguf(name: &str) -> std::path::PathBuf {
    fixture(&format!("gguf/{name}"))
}

/// Each parameter of `got` within `rel` of the largest magnitude of `want`'s (a
/// block quantisation's error is a fraction of its block's range).
fn assert_within<M: Module>(what: &str, got: &M, want: &M, rel: f32) {
    let (got, want) = (
        common::module_parameters(got),
        common::module_parameters(want),
    );
    assert_eq!(got.len(), want.len(), "{what}: parameter count");
    for ((kg, g), (kw, w)) in got.iter().zip(&want) {
        assert_eq!(kg, kw, "{what}");
        let range = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= rel * range + 1e-3,
            "{what}: {kg} off by {err} (range {range})"
        );
    }
}

/// PSNR in dB of two pictures of one size.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    stable_diffusion::io::image::psnr(a, b).expect("pictures of one size")
}

/// The same case generated from `file` and from `original` (both with `config`).
fn psnr_of_pictures(
    case: &common::Case,
    file: &std::path::Path,
    original: &std::path::Path,
    config: &str,
) -> f64 {
    let device = Device::flex();
    let options = LoadOptions {
        config: Some(fixture(config)),
        ..LoadOptions::default()
    };
    let picture = |path: &std::path::Path| {
        let pipe = StableDiffusionPipeline::from_pretrained(path, &device, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        case.generate(&pipe, |r| r).images[0].image.as_raw().clone()
    };
    psnr(&picture(file), &picture(original))
}

/// stable-diffusion.cpp's Q8_0 SD 1.5 file: U-Net, VAE and CLIP within Q8_0's
/// rounding of the original single file's, and the pipeline's picture close to it.
#[test]
fn sdcpp_sd15_gguf_loads_every_component() {
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let file =
        SingleFile::open_with_configs(gguf("tiny-sd15-sdcpp-q8_0.gguf"), fixture("tiny-sd15"))
            .unwrap();
    let original =
        SingleFile::open_with_configs(fixture("tiny-sd15.safetensors"), fixture("tiny-sd15"))
            .unwrap();
    assert!(file.has_text_encoders() && file.has_vae());
    let q8 = 1.0 / 100.0;
    assert_within(
        "unet",
        &file.unet(&device, &opts).unwrap(),
        &original.unet(&device, &opts).unwrap(),
        q8,
    );
    assert_within(
        "vae",
        &file.vae(&device, &opts).unwrap(),
        &original.vae(&device, &opts).unwrap(),
        q8,
    );
    assert_within(
        "text_encoder",
        &file.text_encoder(&device, &opts).unwrap(),
        &original.text_encoder(&device, &opts).unwrap(),
        q8,
    );
    let case = common::Case::open("index.json", "pipelines/txt2img_euler_10");
    let db = psnr_of_pictures(
        &case,
        &gguf("tiny-sd15-sdcpp-q8_0.gguf"),
        &fixture("tiny-sd15.safetensors"),
        "tiny-sd15",
    );
    assert!(db > 30.0, "Q8_0 picture PSNR {db:.1} dB");
}

/// On the CPU, GGUF's Q8_0 and Q4_0 linear weights stay 8-bit (9 bits a value with
/// their scales, against 32 expanded) and compute exactly as their expanded values:
/// the final latents of the two loads agree to f32 rounding.
#[test]
fn quantized_weights_stay_compressed_on_the_cpu() {
    use stable_diffusion::models::parameter_bytes;
    let device = Device::flex();
    for (file, config, case) in [
        (
            "tiny-sd15-sdcpp-q8_0.gguf",
            "tiny-sd15",
            "pipelines/txt2img_euler_10",
        ),
        (
            "tiny-sdxl-sdcpp-q4_0.gguf",
            "tiny-sdxl",
            "sdxl/pipelines/txt2img_euler_7_g5",
        ),
    ] {
        let load = |dequantize_weights| {
            let options = LoadOptions {
                config: Some(fixture(config)),
                dequantize_weights,
                ..LoadOptions::default()
            };
            StableDiffusionPipeline::from_pretrained(gguf(file), &device, &options).unwrap()
        };
        let (kept, expanded) = (load(false), load(true));
        let bytes = |p: &StableDiffusionPipeline| parameter_bytes(p.unet().unwrap());
        assert!(
            bytes(&kept) * 10 < bytes(&expanded) * 8,
            "{file}: {} bytes kept, {} expanded",
            bytes(&kept),
            bytes(&expanded)
        );
        let index = if case.starts_with("sdxl") {
            "index_sdxl.json"
        } else {
            "index.json"
        };
        let case = common::Case::open(index, case);
        let latents = |p: &StableDiffusionPipeline| case.generate(p, |r| r).latents;
        let (a, b) = (latents(&kept), latents(&expanded));
        let d = (a.clone() - b.clone()).abs().max().into_scalar::<f32>();
        let scale = b.abs().max().into_scalar::<f32>();
        assert!(
            d <= 1e-4 * scale,
            "{file}: latents differ by {d} (of {scale})"
        );
        if config != "tiny-sd15" {
            continue;
        }
        // A LoRA applies on top of the 8-bit weights, per use (from a request).
        let lora = fixture("lora/tiny_unet_lora_kohya.safetensors");
        let with_lora =
            |p: &StableDiffusionPipeline| case.generate(p, |r| r.lora(lora.clone(), 1.0)).latents;
        let (c, e) = (with_lora(&kept), with_lora(&expanded));
        let d = (c.clone() - e).abs().max().into_scalar::<f32>();
        assert!(
            d <= 1e-4 * scale,
            "{file} with a LoRA: latents differ by {d}"
        );
        let changed = (c.clone() - a).abs().max().into_scalar::<f32>();
        assert!(
            changed > 1e-3 * scale,
            "the LoRA changes the result ({changed})"
        );
        // Merged at load: the merged weights are f16.
        let options = LoadOptions {
            config: Some(fixture(config)),
            loras: vec![stable_diffusion::pipelines::LoraSpec {
                path: lora.clone(),
                strength: 1.0,
            }],
            ..LoadOptions::default()
        };
        let merged = StableDiffusionPipeline::from_pretrained(gguf(file), &device, &options);
        let m = latents(&merged.unwrap());
        let d = (m - c).abs().max().into_scalar::<f32>();
        assert!(d <= 1e-2 * scale, "{file} with a LoRA merged at load: {d}");
    }
}

/// stable-diffusion.cpp's renamed SDXL encoders: CLIP ViT-L under
/// `cond_stage_model.transformer.`, OpenCLIP bigG in transformers' names under
/// `cond_stage_model.1.transformer.` with the fused `in_proj` and OpenCLIP's
/// `text_projection` (read transposed), in Q4_0; and an older file with q, k, v
/// apart.
#[test]
fn sdcpp_sdxl_gguf_reads_the_renamed_text_encoders() {
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let original =
        SingleFile::open_with_configs(fixture("tiny-sdxl.safetensors"), fixture("tiny-sdxl"))
            .unwrap();
    let file =
        SingleFile::open_with_configs(gguf("tiny-sdxl-sdcpp-q4_0.gguf"), fixture("tiny-sdxl"))
            .unwrap();
    assert!(file.is_sdxl() && !file.text_encoder_2_only());
    let q4 = 1.0 / 7.0;
    assert_within(
        "text_encoder",
        &file.text_encoder(&device, &opts).unwrap(),
        &original.text_encoder(&device, &opts).unwrap(),
        q4,
    );
    let te2 = original.text_encoder_2(&device, &opts).unwrap();
    assert_within(
        "text_encoder_2 (fused in_proj)",
        &file.text_encoder_2(&device, &opts).unwrap(),
        &te2,
        q4,
    );
    assert_within(
        "unet",
        &file.unet(&device, &opts).unwrap(),
        &original.unet(&device, &opts).unwrap(),
        q4,
    );
    let split = SingleFile::open_with_configs(
        gguf("tiny-sdxl-sdcpp-clip-g-split.gguf"),
        fixture("tiny-sdxl"),
    )
    .unwrap();
    assert_within(
        "text_encoder_2 (q, k, v apart)",
        &split.text_encoder_2(&device, &opts).unwrap(),
        &te2,
        q4,
    );
    // Recognised as SDXL without a config folder too.
    let file = SingleFile::open(gguf("tiny-sdxl-sdcpp-q4_0.gguf")).unwrap();
    assert!(file.is_sdxl() && !file.text_encoder_2_only());
}

/// ComfyUI-GGUF's U-Net alone in Q4_K, flattened tensors restored to their shapes;
/// the pipeline takes the text encoders and VAE from the config folder, and without
/// one says so.
#[test]
fn comfy_unet_gguf_loads_with_the_folder_around_it() {
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let path = gguf("tiny-sd15-unet-comfy-q4_k.gguf");
    let file = SingleFile::open_with_configs(&path, fixture("tiny-sd15")).unwrap();
    assert!(!file.has_text_encoders() && !file.has_vae());
    let original =
        SingleFile::open_with_configs(fixture("tiny-sd15.safetensors"), fixture("tiny-sd15"))
            .unwrap();
    assert_within(
        "unet",
        &file.unet(&device, &opts).unwrap(),
        &original.unet(&device, &opts).unwrap(),
        1.0 / 7.0,
    );
    let case = common::Case::open("index.json", "pipelines/txt2img_euler_10");
    let db = psnr_of_pictures(&case, &path, &fixture("tiny-sd15.safetensors"), "tiny-sd15");
    assert!(db > 20.0, "Q4_K picture PSNR {db:.1} dB");
    let err = StableDiffusionPipeline::from_pretrained(&path, &device, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("U-Net alone") && err.contains("--config"),
        "{err}"
    );
}

/// ComfyUI-GGUF's SD 3 MMDiT alone in Q8_0: its config read from the tensors (the
/// position table's side from its quantised values) equals the folder's, and the
/// pipeline generates with the rest from the folder.
#[test]
fn comfy_sd3_gguf_loads_with_the_folder_around_it() {
    let device = Device::flex();
    let path = gguf("tiny-sd3-comfy-q8_0.gguf");
    let folder = fixture("tiny-sd3");
    let file = Sd3SingleFile::open_with_configs(&path, &folder).unwrap();
    let original =
        Sd3SingleFile::open_with_configs(fixture("tiny-sd3.safetensors"), &folder).unwrap();
    assert_eq!(file.transformer_config(), original.transformer_config());
    let opts = ComponentOptions::default();
    assert_within(
        "transformer",
        &file.transformer(&device, &opts).unwrap(),
        &original.transformer(&device, &opts).unwrap(),
        1.0 / 100.0,
    );
    let case = common::Case::open("index_sd3_pipelines.json", "sd3_pipelines/txt2img_euler");
    let options = LoadOptions {
        config: Some(folder.clone()),
        ..LoadOptions::default()
    };
    let pipe = StableDiffusionPipeline::from_pretrained(&path, &device, &options).unwrap();
    assert_eq!(pipe.family(), ModelFamily::Sd3);
    let got = case.generate(&pipe, |r| r).images[0].image.as_raw().clone();
    let want = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd3.safetensors"),
        &device,
        &options,
    )
    .unwrap();
    let want = case.generate(&want, |r| r).images[0].image.as_raw().clone();
    let db = psnr(&got, &want);
    assert!(db > 30.0, "Q8_0 SD 3 picture PSNR {db:.1} dB");
}

/// Runs the `convert` example.
fn run_convert(src: &std::path::Path, dtype: &str, out: &std::path::Path) -> std::process::Output {
    std::process::Command::new(crate::examples::example("convert"))
        .args([src.to_str().unwrap(), "--type", dtype, "--out"])
        .arg(out)
        .output()
        .unwrap()
}

/// Runs the `convert` example, which must succeed.
fn convert(src: &std::path::Path, dtype: &str, out: &std::path::Path) {
    let status = run_convert(src, dtype, out);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// GGUF out: the `convert` example writes a single file (names kept) and a diffusers
/// folder (renamed to the original names, VAE attention as 1x1 convolutions, the
/// second encoder under stable-diffusion.cpp's names) as GGUF; each loads back
/// within its type's rounding of the source, and the picture stays close.
#[test]
fn converted_files_load_back() {
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let tmp = tempfile::tempdir().unwrap();
    let sd15 = tmp.path().join("sd15-q8_0.gguf");
    convert(&fixture("tiny-sd15.safetensors"), "q8_0", &sd15);
    let file = SingleFile::open_with_configs(&sd15, fixture("tiny-sd15")).unwrap();
    let original =
        SingleFile::open_with_configs(fixture("tiny-sd15.safetensors"), fixture("tiny-sd15"))
            .unwrap();
    assert_within(
        "unet",
        &file.unet(&device, &opts).unwrap(),
        &original.unet(&device, &opts).unwrap(),
        1.0 / 100.0,
    );
    let case = common::Case::open("index.json", "pipelines/txt2img_euler_10");
    let db = psnr_of_pictures(&case, &sd15, &fixture("tiny-sd15.safetensors"), "tiny-sd15");
    assert!(db > 30.0, "converted Q8_0 picture PSNR {db:.1} dB");

    let sdxl = tmp.path().join("sdxl-q4_0.gguf");
    convert(&fixture("tiny-sdxl"), "q4_0", &sdxl);
    let file = SingleFile::open_with_configs(&sdxl, fixture("tiny-sdxl")).unwrap();
    let dir = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sdxl")).unwrap();
    let q4 = 1.0 / 7.0;
    assert_within(
        "unet",
        &file.unet(&device, &opts).unwrap(),
        &dir.unet(&device, &opts).unwrap(),
        q4,
    );
    assert_within(
        "vae",
        &file.vae(&device, &opts).unwrap(),
        &dir.vae(&device, &opts).unwrap(),
        q4,
    );
    assert_within(
        "text_encoder",
        &file.text_encoder(&device, &opts).unwrap(),
        &dir.text_encoder(&device, &opts).unwrap(),
        q4,
    );
    assert_within(
        "text_encoder_2",
        &file.text_encoder_2(&device, &opts).unwrap(),
        &dir.text_encoder_2(&device, &opts).unwrap(),
        q4,
    );
    // K-quants are read, not yet written.
    let out = run_convert(
        &fixture("tiny-sd15.safetensors"),
        "q4_k",
        &tmp.path().join("x.gguf"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("writing Q4_K"));
}

/// A T5 encoder GGUF in llama.cpp's names (the T5-XXL files ComfyUI users keep beside
/// SD 3 checkpoints) is recognised as T5 and loads within Q8_0's rounding of the
/// folder's encoder; the SD 3 pipeline takes it as a text encoder file.
#[test]
fn llama_cpp_t5_gguf_loads_as_text_encoder_3() {
    use stable_diffusion::io::sd3_single_file::{
        TextEncoderFile, recognise_text_encoder_file, t5_encoder_from_file,
    };
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let path = gguf("tiny-t5-q8_0.gguf");
    let source = stable_diffusion::io::WeightSource::open(&path).unwrap();
    assert_eq!(
        recognise_text_encoder_file(&source),
        Some(TextEncoderFile::T5)
    );
    let config =
        stable_diffusion::io::sd3::read_t5_config(&fixture("tiny-sd3/text_encoder_3/config.json"))
            .unwrap();
    let from_gguf = t5_encoder_from_file(&path, &config, &device, &opts).unwrap();
    let from_dir = t5_encoder_from_file(
        fixture("tiny-sd3/text_encoder_3/model.safetensors"),
        &config,
        &device,
        &opts,
    )
    .unwrap();
    assert_within("t5", &from_gguf, &from_dir, 1.0 / 100.0);
    let options = LoadOptions {
        config: Some(fixture("tiny-sd3")),
        text_encoder_files: vec![path],
        ..LoadOptions::default()
    };
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd3.safetensors"),
        &device,
        &options,
    )
    .unwrap();
    assert!(pipe.text_encoders().text_encoder_3().is_some());
}

/// The quality example converts the model to each type, generates, and prints one
/// table row per type with its PSNR against f32 (docs/quantization.md's table).
#[test]
fn quantization_quality_prints_a_row_per_type() {
    let out = std::process::Command::new(crate::examples::example("quantization_quality"))
        .args(["--model", fixture("tiny-sd15").to_str().unwrap()])
        .args(["--types", "q8_0,q4_0", "--steps", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("| q")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    for row in rows {
        let db: f64 = row
            .rsplit('|')
            .nth(1)
            .and_then(|c| c.trim().strip_suffix(" dB"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{row}"));
        assert!(db > 25.0, "{row}");
    }
}
