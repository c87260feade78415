//! What each weight type costs in quality (docs/quantization.md): the model converted
//! to GGUF at every type (as the `convert` example does: stable-diffusion.cpp's rule
//! for what stays unquantised), one picture generated from each with the same seed,
//! and its final latents and decoded picture compared with the f32 model's. Prints a
//! markdown table.
//!
//! ```text
//! cargo run --release --example quantization_quality -- --model tests/fixtures/tiny-sd15
//! cargo run --release --example quantization_quality -- --model /tmp/sd15-rand --width 512 --height 512 --steps 4
//! ```
//!
//! `--model` is a diffusers folder of SD 1.x / 2.x / XL (the f32 reference and the
//! configs the converted files load with).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::DiffusersDir;
use stable_diffusion::io::gguf::{GgmlType, GgufValue};
use stable_diffusion::io::gguf_convert::{ConvertInput, convert_to_gguf};
use stable_diffusion::io::image::psnr;
use stable_diffusion::prelude::{GenerationRequest, LoadOptions, StableDiffusionPipeline};

#[derive(Parser)]
#[command(about = "Latent error and picture PSNR of each GGUF weight type against f32")]
struct Args {
    /// A diffusers folder (SD 1.x / 2.x / XL).
    #[arg(long)]
    model: PathBuf,
    /// The types, comma-separated.
    #[arg(long, default_value = "f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")]
    types: String,
    /// Denoising steps (Euler, the model's scheduler).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Picture width (default: the model's).
    #[arg(long)]
    width: Option<usize>,
    /// Picture height (default: the model's).
    #[arg(long)]
    height: Option<usize>,
    /// The prompt.
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    prompt: String,
}

type AnyError = Box<dyn std::error::Error>;

/// (final latents, RGB bytes) of one picture.
fn picture(
    path: &std::path::Path,
    args: &Args,
    device: &Device,
) -> Result<(Vec<f32>, Vec<u8>), AnyError> {
    let options = LoadOptions {
        config: path.is_file().then(|| args.model.clone()),
        ..LoadOptions::default()
    };
    let pipe = StableDiffusionPipeline::from_pretrained(path, device, &options)?;
    let side = pipe.default_size();
    let request = GenerationRequest::new(args.prompt.clone())
        .size(args.width.unwrap_or(side), args.height.unwrap_or(side))
        .steps(args.steps)
        .guidance(args.guidance)
        .seed(0);
    let g = pipe.generate(request)?;
    let latents = g
        .latents
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    Ok((latents, g.images[0].image.as_raw().clone()))
}

fn run(args: &Args) -> Result<(), AnyError> {
    let device = Device::flex();
    let (want_latents, want_rgb) = picture(&args.model, args, &device)?;
    let scale = want_latents.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tmp = tempfile::tempdir()?;
    let input = ConvertInput::diffusers(&DiffusersDir::open(&args.model)?, None)?;
    println!(
        "| type | file MB | latents max abs error (of {scale:.2}) | latents RMS error | picture PSNR |"
    );
    println!("|---|---|---|---|---|");
    for name in args.types.split(',') {
        let dtype = GgmlType::from_name(name.trim())
            .ok_or_else(|| format!("--types: `{name}` is not a ggml type"))?;
        let out = tmp.path().join(format!("{name}.gguf"));
        let meta = [("general.name".to_string(), GgufValue::String(name.into()))];
        let report = convert_to_gguf(&input, &out, dtype, &meta)?;
        let (latents, rgb) = picture(&out, args, &device)?;
        let (max, sq) = latents
            .iter()
            .zip(&want_latents)
            .fold((0f32, 0f64), |(m, s), (a, b)| {
                (m.max((a - b).abs()), s + ((a - b) as f64).powi(2))
            });
        let rms = (sq / latents.len().max(1) as f64).sqrt();
        println!(
            "| {name} | {:.1} | {max:.4} | {rms:.5} | {:.1} dB |",
            report.bytes_out as f64 / 1e6,
            psnr(&rgb, &want_rgb).ok_or("pictures of different sizes")?
        );
        std::fs::remove_file(&out)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
