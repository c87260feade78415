//! Converts a checkpoint to GGUF, as stable-diffusion.cpp's `sd -M convert` does:
//! every component in one file under the original names, each tensor in `--type`
//! unless stable-diffusion.cpp's rule keeps it (biases, embeddings, tensors whose
//! rows are not whole blocks). The file loads here, in stable-diffusion.cpp and in
//! the `gguf` Python package.
//!
//! ```text
//! cargo run --release --example convert -- v1-5-pruned-emaonly.safetensors --type q8_0
//! cargo run --release --example convert -- weights/sdxl-base --type q4_0 --out sdxl-q4_0.gguf
//! ```
//!
//! SRC is a single file (`.safetensors` or GGUF: names kept) or a diffusers folder
//! of SD 1.x / 2.x / XL (renamed to the original names). Types written: f32, f16,
//! bf16, q8_0, q5_1, q5_0, q4_1, q4_0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stable_diffusion::io::gguf::{GgmlType, GgufValue};
use stable_diffusion::io::gguf_convert::{ConvertInput, convert_to_gguf};
use stable_diffusion::io::gguf_write::default_output;
use stable_diffusion::io::{DiffusersDir, IoError, WeightSource};

#[derive(Parser)]
#[command(about = "Convert a Stable Diffusion checkpoint to GGUF")]
struct Args {
    /// A single file (.safetensors or .gguf) or a diffusers folder.
    src: PathBuf,
    /// The type of the quantised tensors.
    #[arg(long = "type", default_value = "q8_0")]
    dtype: String,
    /// Where to write (default: beside SRC, `{stem}-{type}.gguf`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A diffusers folder's weight variant (`fp16`).
    #[arg(long)]
    variant: Option<String>,
}

fn run(args: &Args) -> Result<(), IoError> {
    let dtype = GgmlType::from_name(&args.dtype)
        .ok_or_else(|| IoError::Unsupported(format!("--type {}: not a ggml type", args.dtype)))?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_output(&args.src, dtype));
    let input = if args.src.is_dir() {
        ConvertInput::diffusers(&DiffusersDir::open(&args.src)?, args.variant.as_deref())?
    } else {
        ConvertInput::single_file(WeightSource::open(&args.src)?)
    };
    let metadata = vec![
        (
            "general.quantization_version".to_string(),
            GgufValue::Uint(2),
        ),
        (
            "general.name".to_string(),
            GgufValue::String(
                args.src
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
            ),
        ),
    ];
    let start = std::time::Instant::now();
    let report = convert_to_gguf(&input, &out, dtype, &metadata)?;
    let types: Vec<String> = report
        .tensors_by_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    eprintln!(
        "wrote {}: {} tensors ({}), {:.1} MB of {:.1} MB, in {:.1} s{}",
        out.display(),
        input.entries.len(),
        types.join(", "),
        report.bytes_out as f64 / 1e6,
        report.bytes_in as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!("; left out {} non-float tensors", report.skipped.len())
        }
    );
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
