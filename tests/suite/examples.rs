//! The example binaries reproduce diffusers' reference pipelines from the command
//! line (txt2img DDIM, Euler ancestral with recorded noise, img2img, inpaint), and
//! images carry their generation parameters.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{Case, Reference, fixture};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::image::{GenerationParameters, load_image, load_mask, read_parameters};

/// `target/<profile>/examples/<name>`, built by `cargo test` with the tests.
pub(crate) fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built (cargo test builds the examples)",
        path.display()
    );
    path
}

/// Runs `example_name` on case `pipelines/{case}` of the SD 1.5 index (its prompts,
/// steps, guidance, size, scheduler, initial latents and recorded noise, plus
/// `extra` flags) and compares the saved latents; the PNG carries the parameters.
fn run(example_name: &str, case: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let case = Case::open("index.json", &format!("pipelines/{case}"));
    let exe = example(example_name);
    let mut cmd = case.example_command(&exe, &fixture("tiny-sd15"), tmp.path(), None);
    cmd.args(extra);
    case.check_example(cmd, tmp.path(), 1e-3);
    let params = read_parameters(tmp.path().join("out.png"))
        .unwrap()
        .expect("parameters chunk");
    assert_eq!(params.prompt, case.text("prompt").unwrap());
    assert_eq!(params.steps, 10);
    assert_eq!((params.width, params.height), (32, 32));
}

#[test]
fn txt2img_ddim_through_the_example() {
    run("txt2img", "txt2img_ddim_10", &[]);
}

#[test]
fn txt2img_euler_ancestral_recorded_noise_through_the_example() {
    run("txt2img", "txt2img_euler_ancestral_10", &[]);
}

#[test]
fn img2img_through_the_example() {
    let image = fixture("reference/pipelines/img2img_ddim_s0.6_input.png");
    run(
        "img2img",
        "img2img_ddim_s0.6",
        &["--image", image.to_str().unwrap(), "--strength", "0.6"],
    );
}

#[test]
fn inpaint_through_the_example() {
    let image = fixture("reference/pipelines/inpaint_ddim_10_input.png");
    let mask = fixture("reference/pipelines/inpaint_ddim_10_mask.png");
    let unet = fixture("tiny-sd15-inpaint");
    run(
        "inpaint",
        "inpaint_ddim_10",
        &[
            "--image",
            image.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--unet",
            unet.to_str().unwrap(),
        ],
    );
}

#[test]
fn png_inputs_match_diffusers_preprocessing() {
    let device = Device::flex();
    let r = Reference::open("reference/pipelines/inpaint_ddim_10.safetensors");
    let image = load_image(
        fixture("reference/pipelines/inpaint_ddim_10_input.png"),
        &device,
    )
    .unwrap();
    common::assert_close(
        "image preprocessing",
        &image,
        &r.floats("input_image_preprocessed"),
        1e-6,
    );
    let mask = load_mask(
        fixture("reference/pipelines/inpaint_ddim_10_mask.png"),
        &device,
    )
    .unwrap();
    let mask = mask.greater_equal_elem(0.5).float();
    common::assert_close(
        "mask preprocessing",
        &mask,
        &r.floats("mask_preprocessed"),
        0.0,
    );
}

#[test]
fn png_parameters_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let p = GenerationParameters {
        prompt: "a red fox in snow, (masterpiece:1.2)".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: 25,
        sampler: "DPM++ 2M Karras".into(),
        cfg_scale: 7.5,
        seed: 1234567890123,
        width: 512,
        height: 768,
        model: "v1-5-pruned-emaonly".into(),
    };
    let image = Tensor::<4>::full([1, 3, 8, 16], 0.5, &Device::flex());
    let path = tmp.path().join("x.png");
    stable_diffusion::io::image::save_png(&image, 0, &path, Some(&p)).unwrap();
    assert_eq!(read_parameters(&path).unwrap(), Some(p.clone()));
    assert!(p.to_a1111().contains("\nNegative prompt: blurry, low quality\nSteps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7.5"));
}

#[test]
fn bad_input_gives_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let o = out.to_str().unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "txt2img",
            vec!["--width", "30", "--steps", "2", "--out", o],
            "width",
        ),
        (
            "txt2img",
            vec!["--model", "/nonexistent/model", "--out", o],
            "no such file",
        ),
        (
            "txt2img",
            vec!["--scheduler", "heun-karras", "--steps", "2", "--out", o],
            "unknown scheduler",
        ),
        (
            "img2img",
            vec!["--image", "/nonexistent.png", "--out", o],
            "nonexistent.png",
        ),
    ];
    for (ex, args, needle) in cases {
        let output = Command::new(example(ex)).args(&args).output().unwrap();
        assert!(!output.status.success(), "{ex} {args:?} should fail");
        let err = String::from_utf8_lossy(&output.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{ex} {args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let img = fixture("reference/pipelines/img2img_ddim_s0.6_input.png");
    let output = Command::new(example("img2img"))
        .args([
            "--image",
            img.to_str().unwrap(),
            "--strength",
            "1.5",
            "--steps",
            "2",
            "--out",
            o,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("strength"),
        "{err}"
    );
}

/// The `inspect` example's JSON rows for a fixture.
fn inspect_rows(rel: &str) -> Vec<serde_json::Value> {
    let out = Command::new(example("inspect"))
        .args([fixture(rel).to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// SD 3.5 Medium's real configs laid out as its diffusers folder
/// (`configs/sd35-medium`, no weights): the transformer, VAE, both CLIP encoders and
/// T5-XXL with diffusers' counts and the index's classes.
#[test]
fn inspect_reports_sd35_medium() {
    let lines = inspect_rows("configs/sd35-medium");
    let row = |c: &str| lines.iter().find(|l| l["component"] == c).unwrap().clone();
    for (component, class, params) in [
        ("transformer", "SD3Transformer2DModel", 2_243_171_520u64),
        ("vae", "AutoencoderKL", 83_819_683),
        ("text_encoder", "CLIPTextModelWithProjection", 123_650_304),
        ("text_encoder_2", "CLIPTextModelWithProjection", 694_659_840),
        ("text_encoder_3", "T5EncoderModel", 4_762_310_656),
    ] {
        assert_eq!(
            row(component)["params"].as_u64().unwrap(),
            params,
            "{component}"
        );
        assert_eq!(row(component)["class"], class, "{component}");
    }
}

/// SD 3 single files: the MMDiT-X file's transformer counted from the config its
/// tensors give (the folder model's count), the components `tiny-sd3.safetensors`
/// holds, and a config the tensors cannot tell said rather than guessed.
#[test]
fn inspect_reports_sd3_single_files() {
    let rows = inspect_rows("tiny-sd35-mmditx.safetensors");
    let config = stable_diffusion::io::sd3::read_sd3_transformer_config(&fixture(
        "tiny-sd35-transformer/config.json",
    ))
    .unwrap();
    let params = stable_diffusion::models::SD3Transformer2DModel::new(
        &config,
        &stable_diffusion::burn::prelude::Device::flex(),
    )
    .unwrap()
    .num_params() as u64;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0]["class"],
        "SD3Transformer2DModel (3 blocks, MMDiT-X)"
    );
    assert_eq!(rows[0]["params"].as_u64(), Some(params));
    let rows = inspect_rows("tiny-sd3.safetensors");
    let components: Vec<_> = rows
        .iter()
        .map(|r| r["component"].as_str().unwrap())
        .collect();
    assert_eq!(components, ["transformer", "vae", "text_encoder_3"]);
    assert!(
        rows[0]["class"]
            .as_str()
            .unwrap()
            .contains("give a config folder"),
        "{}",
        rows[0]["class"]
    );
}

/// GGUF files: stable-diffusion.cpp's (components by their prefixes, its renamed
/// SDXL encoder) and ComfyUI-GGUF's U-Net alone, with the ggml types stored.
#[test]
fn inspect_reports_gguf_files() {
    let rows = inspect_rows("gguf/tiny-sdxl-sdcpp-q4_0.gguf");
    let components: Vec<_> = rows
        .iter()
        .map(|r| r["component"].as_str().unwrap())
        .collect();
    assert_eq!(
        components,
        ["unet", "vae", "text_encoder", "text_encoder_2"]
    );
    assert!(rows[0]["dtypes"].to_string().contains("q4_0"), "{rows:?}");
    let rows = inspect_rows("gguf/tiny-sd15-unet-comfy-q4_k.gguf");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["component"], "unet");
    assert_eq!(rows[0]["params"].as_u64(), Some(1_388_548));
    assert!(rows[0]["dtypes"].to_string().contains("q4_k"), "{rows:?}");
}

#[test]
fn inspect_reports_classes_and_parameter_counts() {
    let lines = inspect_rows("configs/sd15");
    let params = |c: &str| {
        lines.iter().find(|l| l["component"] == c).unwrap()["params"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(params("unet"), 859_520_964);
    assert_eq!(params("vae"), 83_653_863);
    assert_eq!(params("text_encoder"), 123_060_480);

    let out = Command::new(example("inspect"))
        .args([fixture("tiny-sd15.safetensors").to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let unet = lines.iter().find(|l| l["component"] == "unet").unwrap();
    assert_eq!(unet["params"].as_u64().unwrap(), 1_388_548);
    assert_eq!(unet["dtypes"], serde_json::json!(["f16"]));
    assert_eq!(unet["class"], "UNet2DConditionModel");

    // SDXL base 1.0's configs: diffusers' parameter counts, both text encoders.
    let lines = inspect_rows("configs/sdxl");
    let row = |c: &str| lines.iter().find(|l| l["component"] == c).unwrap().clone();
    assert_eq!(row("unet")["params"].as_u64().unwrap(), 2_567_463_684);
    assert_eq!(row("vae")["params"].as_u64().unwrap(), 83_653_863);
    assert_eq!(row("text_encoder")["params"].as_u64().unwrap(), 123_060_480);
    assert_eq!(
        row("text_encoder_2")["params"].as_u64().unwrap(),
        694_659_840
    );
    assert_eq!(
        row("text_encoder_2")["class"],
        "CLIPTextModelWithProjection"
    );
}

#[test]
fn outpaint_and_interpolate_examples_write_their_files() {
    let tmp = tempfile::tempdir().unwrap();
    let img = fixture("reference/pipelines/img2img_ddim_s0.6_input.png");
    let out = tmp.path().join("wide.png");
    let o = Command::new(example("outpaint"))
        .args([
            "--image",
            img.to_str().unwrap(),
            "--right",
            "16",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read_parameters(&out).unwrap().is_some());

    let anim = tmp.path().join("morph.png");
    let o = Command::new(example("interpolate"))
        .args([
            "--prompt",
            "a cat",
            "--prompt-b",
            "a dog",
            "--frames",
            "3",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            anim.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for k in 0..3 {
        assert!(tmp.path().join(format!("morph_{k:03}.png")).exists());
    }
    let bytes = std::fs::read(&anim).unwrap();
    assert!(bytes.windows(4).any(|w| w == b"acTL"), "animated PNG");

    let o = Command::new(example("custom_loop"))
        .args([
            "--steps",
            "2",
            "--out",
            tmp.path().join("loop.png").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The preview animation (TAESD-decoded frames), the tiny decoder and the hires fix
/// from the command line.
#[test]
fn txt2img_writes_a_preview_animation_with_tiny_decoder_and_hires_fix() {
    use stable_diffusion::image::AnimationDecoder;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fox.png");
    let gif = tmp.path().join("fox.gif");
    let o = Command::new(example("txt2img"))
        .args(["--model", fixture("tiny-sd15").to_str().unwrap()])
        .args(["--tiny-vae", fixture("tiny-taesd").to_str().unwrap()])
        .args([
            "--vae-decoder",
            "tiny",
            "--preview-out",
            gif.to_str().unwrap(),
        ])
        .args([
            "--steps",
            "2",
            "--scheduler",
            "euler",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .args([
            "--hires-scale",
            "2",
            "--hires-steps",
            "2",
            "--hires-strength",
            "0.5",
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let image = stable_diffusion::image::open(&out).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    let file = std::io::BufReader::new(std::fs::File::open(&gif).unwrap());
    let frames = stable_diffusion::image::codecs::gif::GifDecoder::new(file)
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    // Two first-pass steps and one of the second pass (strength 0.5 of 2 steps).
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].buffer().dimensions(), (64, 64));
    let o = Command::new(example("txt2img"))
        .args(["--model", fixture("tiny-sd15").to_str().unwrap()])
        .args(["--vae-decoder", "tiny", "--steps", "2"])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tiny autoencoder"), "{err}");
}

/// DreamBooth-style LoRA fine-tune from 5 uncaptioned images with the `train`
/// example, with prior preservation (class images generated first), then generation
/// with the result through `txt2img --lora`.
#[test]
fn train_example_fine_tunes_a_lora_that_txt2img_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("subject");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..5u8 {
        let mut px = vec![250u8; 32 * 32 * 3];
        for y in 6 + i as usize..22 {
            for x in 10..26 {
                px[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3].copy_from_slice(&[200, 40 + 30 * i, 60]);
            }
        }
        stable_diffusion::io::image::write_png_rgb8(
            &data.join(format!("{i}.png")),
            32,
            32,
            &px,
            None,
        )
        .unwrap();
    }
    let out = tmp.path().join("run");
    let o = Command::new(example("train"))
        .args(["--model", fixture("tiny-sd15").to_str().unwrap()])
        .args(["--data", data.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(["--instance-prompt", "a photo of sks block"])
        .args([
            "--lora-rank",
            "4",
            "--resolution",
            "32",
            "--max-steps",
            "2",
            "--every",
            "1",
        ])
        .args(["--sample-prompt", "a photo of sks block"])
        .args(["--class-data", tmp.path().join("class").to_str().unwrap()])
        .args([
            "--class-prompt",
            "a photo of a block",
            "--num-class-images",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "log.csv",
        "loss.png",
        "samples/step-000002.png",
        "checkpoint-2/trainer_state.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let img = tmp.path().join("sks.png");
    let o = Command::new(example("txt2img"))
        .args(["--model", fixture("tiny-sd15").to_str().unwrap()])
        .args([
            "--lora",
            &format!("{}:0.7", out.join("lora_kohya.safetensors").display()),
        ])
        .args([
            "--prompt",
            "a photo of sks block",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .args(["--out", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("merged at strength 0.7"));
    assert!(img.exists());
}

/// LCM-LoRA in 4 steps through `txt2img` (`--lora`, `--scheduler lcm`, guidance 1),
/// replaying the reference's initial latents and noise: the final latents match
/// diffusers (`reference/pipelines_fast/lcm_lora_lcm4`).
#[test]
fn lcm_lora_in_four_steps_through_the_example() {
    let tmp = tempfile::tempdir().unwrap();
    let case = Case::open("index_fast.json", "pipelines_fast/lcm_lora_lcm4");
    assert_eq!(case.noise_count(), 3);
    let exe = example("txt2img");
    let mut cmd = case.example_command(&exe, &fixture("tiny-sd15"), tmp.path(), Some("lcm"));
    let lora = fixture("lora/lcm_lora_kohya.safetensors");
    cmd.arg("--lora").arg(lora);
    case.check_example(cmd, tmp.path(), 1e-3);
    let params = read_parameters(tmp.path().join("out.png"))
        .unwrap()
        .unwrap();
    assert_eq!((params.steps, params.sampler.as_str()), (4, "LCM"));
}

/// `txt2img --refiner`: the base stops at `--refiner-start` and the refiner (here the
/// tiny SDXL itself) finishes from its latents, as diffusers' hand-over does.
#[test]
fn sdxl_refiner_handover_through_the_example() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Case::open("index_fast.json", "pipelines_fast/sdxl_denoising_end_0.7");
    let refined = Case::open("index_fast.json", "pipelines_fast/sdxl_denoising_start_0.7");
    let model = fixture("tiny-sdxl");
    let exe = example("txt2img");
    let mut cmd = base.example_command(&exe, &model, tmp.path(), Some("euler"));
    cmd.arg("--refiner").arg(&model);
    cmd.args(["--refiner-start", "0.7"]);
    refined.check_example(cmd, tmp.path(), 1e-3);
}

/// SDXL's second prompts through `txt2img` (`--prompt-2`, `--negative-prompt-2`):
/// every case of `gen/ref_sdxl_prompt_2.py` matches diffusers.
#[test]
fn sdxl_prompt_2_through_the_example() {
    let cases = Case::all("index_sdxl_prompt_2.json", "");
    assert_eq!(cases.len(), 3);
    let exe = example("txt2img");
    for case in &cases {
        let tmp = tempfile::tempdir().unwrap();
        let cmd = case.example_command(&exe, &fixture("tiny-sdxl"), tmp.path(), None);
        case.check_example(cmd, tmp.path(), 1e-3);
    }
}

/// The controlnet example: two ControlNets with their own scales reproduce
/// diffusers' MultiControlNet case; Canny and OpenPose preprocessing write their
/// control images, with a T2I-Adapter alongside.
#[test]
fn controlnet_example_runs_multi_controlnet_and_preprocessors() {
    let tmp = tempfile::tempdir().unwrap();
    let case = Case::open(
        "index_controlnet.json",
        "controlnet/pipelines/txt2img_ddim_7_multi",
    );
    let f = |p: &str| fixture(p).to_str().unwrap().to_string();
    let exe = example("controlnet");
    let mut cmd = case.example_command(&exe, &fixture("tiny-sd15"), tmp.path(), None);
    cmd.args(["--controlnet", &f("tiny-controlnet")])
        .args([
            "--control-image",
            &f("reference/controlnet/control_edge.png"),
        ])
        .args(["--controlnet", &f("tiny-controlnet_1")])
        .args([
            "--control-image",
            &f("reference/controlnet/control_depth.png"),
        ])
        .args(["--control-scale", "1.0", "--control-scale", "0.6"]);
    case.check_example(cmd, tmp.path(), 1e-3);

    // Canny edges of a picture, and an OpenPose skeleton, as control images.
    let out = tmp.path().join("pose.png");
    let mut k = vec![0.0f64; 54];
    for (i, (x, y)) in [(0usize, (16.0, 6.0)), (1, (16.0, 14.0)), (2, (10.0, 14.0))] {
        k[3 * i] = x;
        k[3 * i + 1] = y;
        k[3 * i + 2] = 1.0;
    }
    let pose = tmp.path().join("pose.json");
    std::fs::write(
        &pose,
        serde_json::json!({"canvas_width": 32, "canvas_height": 32,
                           "people": [{"pose_keypoints_2d": k}]})
        .to_string(),
    )
    .unwrap();
    let control = tmp.path().join("control.png");
    let output = Command::new(example("controlnet"))
        .args([
            "--model",
            &f("tiny-sd15"),
            "--prompt",
            "a dancer",
            "--steps",
            "2",
        ])
        .args(["--controlnet", &f("tiny-controlnet")])
        .args([
            "--control-image",
            &f("reference/controlnet/pipelines/img2img_ddim_s0.7_input.png"),
        ])
        .args(["--preprocess", "canny"])
        .args(["--controlnet", &f("tiny-controlnet_1")])
        .args(["--control-image", pose.to_str().unwrap()])
        .args(["--preprocess", "pose"])
        .args(["--adapter", &f("tiny-t2i-adapter")])
        .args([
            "--adapter-image",
            &f("reference/controlnet/pipelines/img2img_ddim_s0.7_input.png"),
        ])
        .args(["--adapter-preprocess", "depth"])
        .args(["--depth-model", &f("tiny-depth-anything")])
        .args(["--adapter-scale", "0.8"])
        .args(["--save-control", control.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for i in 0..2 {
        let p = tmp.path().join(format!("control-{i}.png"));
        let img = stable_diffusion::io::image::read_image(&p).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32), "{}", p.display());
    }
    let image = stable_diffusion::io::image::read_image(&out).unwrap();
    assert_eq!((image.width(), image.height()), (32, 32));
    // depth without a depth model: a clear error
    let output = Command::new(example("controlnet"))
        .args([
            "--model",
            &f("tiny-sd15"),
            "--prompt",
            "a room",
            "--steps",
            "1",
        ])
        .args(["--controlnet", &f("tiny-controlnet")])
        .args([
            "--control-image",
            &f("reference/controlnet/control_edge.png"),
        ])
        .args(["--preprocess", "depth"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--depth-model"), "{err}");
}

/// `bench --component write` makes a loadable random-weight folder from configs (here
/// the tiny SDXL's), and `--component picture --sizes` times it at several sizes in one
/// process: what `scripts/gpu-check.sh` runs at real size on a GPU.
#[test]
fn bench_writes_a_random_model_and_times_pictures_at_several_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("random-sdxl");
    let out = Command::new(example("bench"))
        .args(["--component", "write", "--f16", "--config"])
        .arg(fixture("tiny-sdxl"))
        .arg("--out")
        .arg(&folder)
        .arg("--tokenizer-files")
        .arg(fixture("tokenizer"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        folder
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    assert!(folder.join("tokenizer_2/vocab.json").exists());
    let out = Command::new(example("bench"))
        .args([
            "--component",
            "picture",
            "--device",
            "cpu",
            "--f16",
            "--json",
        ])
        .args(["--sizes", "32,48x32", "--steps", "3", "--runs", "1"])
        .arg("--model")
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "one row per size");
    assert_eq!(
        (rows[1]["width"].as_u64(), rows[1]["height"].as_u64()),
        (Some(48), Some(32))
    );
    for r in &rows {
        assert_eq!(r["steps"], 3);
        assert!(r["one_step_s"].as_f64().unwrap() > 0.0);
        assert!(r["median_s"].as_f64().unwrap() > 0.0);
    }
}

/// With the `cuda` feature on a machine without an NVIDIA driver (CI), asking for
/// the CUDA device is an error that says so, from the library and from the
/// examples, not a panic or a hang.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if std::env::var("SD_TEST_CUDA").is_ok_and(|v| v == "1") {
        stable_diffusion::core::check_device(&Device::cuda(0)).unwrap();
        return;
    }
    match stable_diffusion::core::check_device(&Device::cuda(0)) {
        Ok(()) => eprintln!("a CUDA device answered: this machine has a GPU"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("not usable"), "{text}");
            let out = Command::new(example("txt2img"))
                .args(["--device", "cuda", "--prompt", "x", "--out"])
                .arg(std::env::temp_dir().join("never-written.png"))
                .output()
                .unwrap();
            assert!(!out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("is not usable"), "{stderr}");
        }
    }
}

/// SD 3 through `txt2img`: the tiny SD 3 folder with second and third prompts,
/// negatives and clip skip, and with a 20-token T5 and no guidance (`--prompt-3`,
/// `--negative-prompt-3`, `--max-sequence-length`), against diffusers; `--shift`
/// changes the run (and is refused for an SD 1.5 model).
#[test]
fn sd3_through_the_example() {
    let exe = example("txt2img");
    for name in [
        "sd3_pipelines/prompts_2_3_and_negatives_clip_skip",
        "sd3_pipelines/no_cfg_short_t5",
    ] {
        let case = Case::open("index_sd3_pipelines.json", name);
        let tmp = tempfile::tempdir().unwrap();
        let cmd = case.example_command(&exe, &fixture("tiny-sd3"), tmp.path(), None);
        case.check_example(cmd, tmp.path(), 1e-3);
    }
    let case = Case::open("index_sd3_pipelines.json", "sd3_pipelines/txt2img_euler");
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = case.example_command(&exe, &fixture("tiny-sd3"), tmp.path(), Some("euler"));
    cmd.args(["--shift", "1.5"]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = std::process::Command::new(&exe)
        .args([
            "--model",
            fixture("tiny-sd15").to_str().unwrap(),
            "--steps",
            "1",
        ])
        .args(["--width", "32", "--height", "32", "--shift", "3"])
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("shift"));
}
