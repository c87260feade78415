//! Prints what a Stable Diffusion checkpoint holds: each component's class,
//! parameter count, on-disk dtypes and size.
//!
//! ```text
//! cargo run --release --example inspect -- PATH [--json]
//! ```
//!
//! PATH is a diffusers folder, a folder of configs only (the parameters are counted
//! from the models the configs build), or a single-file checkpoint: `.safetensors`,
//! or GGUF as stable-diffusion.cpp and ComfyUI-GGUF write it (ggml types shown).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::ldm::{TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX};
use stable_diffusion::io::model::component_weights;
use stable_diffusion::io::sd3::{read_sd3_transformer_config, read_t5_config};
use stable_diffusion::io::{DiffusersDir, IoError, SingleFile, WeightSource};
use stable_diffusion::models::{
    AutoencoderKL, ClipTextModel, SD3Transformer2DModel, T5EncoderModel, UNet2DConditionModel,
};

#[derive(Parser)]
#[command(
    about = "Inspect a Stable Diffusion checkpoint (diffusers folder, configs folder or single file)"
)]
struct Args {
    /// Diffusers folder, folder of config.json files, or single-file checkpoint.
    path: PathBuf,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

struct Row {
    component: &'static str,
    class: String,
    params: u64,
    dtypes: Vec<String>,
    bytes: u64,
    source: String,
}

fn weight_summary(source: &WeightSource, prefix: &str) -> (u64, Vec<String>, u64) {
    let mut params = 0u64;
    let mut bytes = 0u64;
    let mut dtypes = BTreeSet::new();
    for (key, t) in source.tensors() {
        if key.starts_with(prefix) {
            if !key.ends_with("position_ids") {
                params += t.numel() as u64;
            }
            bytes += t.stored_bytes() as u64;
            dtypes.insert(t.type_name());
        }
    }
    (params, dtypes.into_iter().collect(), bytes)
}

fn class_of(config: &Path, default: &str) -> String {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|j| {
            j.get("_class_name")
                .and_then(|c| c.as_str().map(String::from))
                .or_else(|| j.get("architectures")?.get(0)?.as_str().map(String::from))
        })
        .unwrap_or_else(|| default.to_string())
}

fn inspect_dir(path: &Path) -> Result<Vec<Row>, IoError> {
    let dir = DiffusersDir::open(path)?;
    let device = Device::flex();
    let mut rows = Vec::new();
    let components: [(&'static str, &str); 6] = [
        ("unet", "UNet2DConditionModel"),
        ("transformer", "SD3Transformer2DModel"),
        ("vae", "AutoencoderKL"),
        ("text_encoder", "CLIPTextModel"),
        ("text_encoder_2", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "T5EncoderModel"),
    ];
    // The index names each component's class (SD 3's CLIP-L has a projection).
    let indexed = |component: &str| -> Option<String> {
        let index = dir.model_index().ok()??;
        index.get(component)?.get(1)?.as_str().map(String::from)
    };
    for (component, default_class) in components {
        let config = path.join(component).join("config.json");
        if !config.exists() {
            continue;
        }
        // Parameters are initialised lazily, so counting them costs no memory.
        let params = match component {
            "unet" => {
                UNet2DConditionModel::new(&dir.unet_config()?, &device).map(|m| m.num_params())
            }
            "vae" => AutoencoderKL::new(&dir.vae_config()?, &device).map(|m| m.num_params()),
            "transformer" => {
                SD3Transformer2DModel::new(&read_sd3_transformer_config(&config)?, &device)
                    .map(|m| m.num_params())
            }
            "text_encoder_3" => {
                T5EncoderModel::new(&read_t5_config(&config)?, &device).map(|m| m.num_params())
            }
            "text_encoder" => {
                let mut c = dir.text_encoder_config()?;
                if indexed(component).as_deref() == Some("CLIPTextModelWithProjection") {
                    c.architectures = vec!["CLIPTextModelWithProjection".into()];
                }
                ClipTextModel::new(&c, &device).map(|m| m.num_params())
            }
            _ => ClipTextModel::new(&dir.text_encoder_2_config()?, &device).map(|m| m.num_params()),
        }
        .map_err(|source| IoError::Config {
            path: config.clone(),
            source,
        })? as u64;
        let weights = match component {
            "unet" => dir.unet_weights(None),
            "vae" => dir.vae_weights(None),
            "text_encoder" => dir.text_encoder_weights(None),
            "transformer" => {
                component_weights(&path.join(component), "diffusion_pytorch_model", None)
            }
            _ => component_weights(&path.join(component), "model", None),
        };
        let (dtypes, bytes, source) = match weights {
            Ok(w) => {
                let s = WeightSource::open(&w)?;
                let (_, dtypes, bytes) = weight_summary(&s, "");
                (dtypes, bytes, w.display().to_string())
            }
            Err(IoError::NotFound { .. }) => (Vec::new(), 0, "config only".to_string()),
            Err(e) => return Err(e),
        };
        rows.push(Row {
            component,
            class: indexed(component).unwrap_or_else(|| class_of(&config, default_class)),
            params,
            dtypes,
            bytes,
            source,
        });
    }
    if rows.is_empty() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
            what: "unet/, transformer/, vae/ or text_encoder/ with a config.json".into(),
        });
    }
    Ok(rows)
}

/// An SD 3 / 3.5 original single file: the MMDiT (its config read from the
/// tensors, its parameters counted as diffusers builds it), the VAE and whichever
/// text encoders it holds.
fn inspect_sd3_file(path: &Path, prefix: &str) -> Result<Vec<Row>, IoError> {
    use stable_diffusion::io::sd3_single_file::{
        self as sd3, CLIP_G_PREFIX, CLIP_L_PREFIX, T5XXL_PREFIX,
    };
    let source = WeightSource::open(path)?;
    let (stored, dtypes, bytes) = weight_summary(&source, prefix);
    // The parameters as diffusers counts them (the `pos_embed` buffer is stored too);
    // a config the tensors cannot tell (no `ln_q`, heads not 64 wide) is said.
    let (params, class) = match stable_diffusion::io::Sd3SingleFile::open(path) {
        Ok(file) => {
            let c = file.transformer_config();
            let n = SD3Transformer2DModel::new(c, &Device::flex())
                .map_err(|source| IoError::Config {
                    path: path.to_path_buf(),
                    source,
                })?
                .num_params() as u64;
            let x = if c.dual_attention_layers.is_empty() {
                ""
            } else {
                ", MMDiT-X"
            };
            (
                n,
                format!("SD3Transformer2DModel ({} blocks{x})", c.num_layers),
            )
        }
        Err(e) => (stored, format!("SD3Transformer2DModel (stored; {e})")),
    };
    let mut rows = vec![Row {
        component: "transformer",
        class,
        params,
        dtypes,
        bytes,
        source: format!(
            "{} ({}*)",
            path.display(),
            if prefix.is_empty() {
                ""
            } else {
                sd3::MMDIT_PREFIX
            }
        ),
    }];
    for (component, class, p) in [
        ("vae", "AutoencoderKL", VAE_PREFIX),
        ("text_encoder", "CLIPTextModelWithProjection", CLIP_L_PREFIX),
        (
            "text_encoder_2",
            "CLIPTextModelWithProjection",
            CLIP_G_PREFIX,
        ),
        ("text_encoder_3", "T5EncoderModel", T5XXL_PREFIX),
    ] {
        let (params, dtypes, bytes) = weight_summary(&source, p);
        if params > 0 {
            rows.push(Row {
                component,
                class: class.to_string(),
                params,
                dtypes,
                bytes,
                source: format!("{} ({p}*)", path.display()),
            });
        }
    }
    Ok(rows)
}

fn inspect_file(path: &Path) -> Result<Vec<Row>, IoError> {
    if path
        .extension()
        .is_some_and(|e| e == "safetensors" || e == "gguf")
        && let Some(prefix) =
            stable_diffusion::io::sd3_single_file::mmdit_prefix(&WeightSource::open(path)?)
    {
        return inspect_sd3_file(path, prefix);
    }
    let ckpt = SingleFile::open(path)?;
    let source = ckpt.source();
    let mut rows = Vec::new();
    // A U-Net alone (ComfyUI-GGUF) has no prefix.
    let unet_prefix = if source.get("input_blocks.0.0.weight").is_some() {
        ""
    } else {
        UNET_PREFIX
    };
    for (component, class, prefix) in [
        ("unet", "UNet2DConditionModel", unet_prefix),
        ("vae", "AutoencoderKL", VAE_PREFIX),
        ("text_encoder", "CLIPTextModel", TEXT_ENCODER_PREFIX),
        (
            "text_encoder",
            "OpenCLIP (SD 2.x)",
            "cond_stage_model.model.",
        ),
        (
            "text_encoder",
            "CLIPTextModel (SDXL)",
            stable_diffusion::io::model::SDXL_TEXT_ENCODER_PREFIX,
        ),
        (
            "text_encoder_2",
            "OpenCLIP bigG (SDXL)",
            stable_diffusion::io::model::SDXL_TEXT_ENCODER_2_PREFIX,
        ),
        (
            "text_encoder_2",
            "CLIPTextModelWithProjection (SDXL, stable-diffusion.cpp names)",
            stable_diffusion::io::model::SD_CPP_TEXT_ENCODER_2_PREFIX,
        ),
        (
            "text_encoder_2",
            "OpenCLIP bigG (SDXL refiner)",
            stable_diffusion::io::model::SDXL_REFINER_TEXT_ENCODER_PREFIX,
        ),
    ] {
        let (params, dtypes, bytes) = weight_summary(source, prefix);
        if params > 0 {
            rows.push(Row {
                component,
                class: class.to_string(),
                params,
                dtypes,
                bytes,
                source: format!("{} ({prefix}*)", path.display()),
            });
        }
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rows = if args.path.is_dir() {
        inspect_dir(&args.path)
    } else {
        inspect_file(&args.path)
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for r in rows {
        if args.json {
            let line = serde_json::json!({
                "component": r.component,
                "class": r.class,
                "params": r.params,
                "dtypes": r.dtypes,
                "bytes": r.bytes,
                "source": r.source,
            });
            println!("{line}");
        } else {
            println!(
                "{:<14} {:<27} {:>14} params  {:<10} {:>10.1} MB  {}",
                r.component,
                r.class,
                r.params,
                if r.dtypes.is_empty() {
                    "-".to_string()
                } else {
                    r.dtypes.join(",")
                },
                r.bytes as f64 / 1e6,
                r.source
            );
        }
    }
    ExitCode::SUCCESS
}
