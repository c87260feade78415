//! SD 3 / SD 3.5 (issue 27): the real configs (`configs/sd3`, fixtures README 9) build
//! diffusers' parameter counts, and the components match diffusers on tiny random
//! models (`tests/fixtures/gen/ref_sd3.py`).

use crate::common;

use common::{Reference, assert_close, devices, fixture, tol};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::Autoencoder;
use stable_diffusion::io::{ComponentOptions, DiffusersDir, sd3::sd3_transformer_from_dir};
use stable_diffusion::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, SD3Transformer2DConfig,
    SD3Transformer2DModel, T5Config, T5EncoderModel,
};
use stable_diffusion::pipelines::{Sd3Conditioner, StableDiffusion, TextConditioner};
use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};

fn config_text(name: &str) -> String {
    std::fs::read_to_string(fixture(&format!("configs/sd3/{name}/config.json"))).unwrap()
}

fn count(name: &str) -> usize {
    let text =
        std::fs::read_to_string(fixture(&format!("configs/sd3/{name}/param_counts.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["total"].as_u64().unwrap() as usize
}

/// SD 3.5 Large, SD 3.5 Medium (MMDiT-X) and SD 3 Medium transformers, T5-v1.1-XXL,
/// the SD 3 VAE and CLIP-L / CLIP-G with projection: diffusers' counts (the
/// transformers' position table is a buffer, not counted; the T5 embedding counted
/// once).
#[test]
fn sd3_configs_give_diffusers_parameter_counts() {
    let device = Device::flex();
    for name in [
        "sd3.5-large-transformer",
        "sd3.5-medium-transformer",
        "sd3-medium-transformer",
    ] {
        let config = SD3Transformer2DConfig::from_json(&config_text(name)).unwrap();
        let model = SD3Transformer2DModel::new(&config, &device).unwrap();
        assert_eq!(model.num_params(), count(name), "{name}");
    }
    let t5 = T5Config::from_json(&config_text("t5-v1_1-xxl-encoder")).unwrap();
    let t5 = T5EncoderModel::new(&t5, &device).unwrap();
    assert_eq!(t5.num_params(), count("t5-v1_1-xxl-encoder"), "T5-XXL");
    let vae = AutoencoderKLConfig::from_json(&config_text("sd3-vae")).unwrap();
    assert_eq!(vae.shift_factor, Some(0.0609));
    let vae = AutoencoderKL::new(&vae, &device).unwrap();
    assert_eq!(vae.num_params(), count("sd3-vae"), "SD 3 VAE");
    for name in ["clip-l-text-encoder", "clip-g-text-encoder"] {
        let mut config = ClipTextConfig::from_json(&config_text(name)).unwrap();
        // SD 3 folders name the class in model_index.json.
        config.architectures = vec!["CLIPTextModelWithProjection".into()];
        let model = ClipTextModel::new(&config, &device).unwrap();
        assert_eq!(model.num_params(), count(name), "{name}");
    }
}

/// Config values the SD 3 classes cannot honour are refused by field.
#[test]
fn sd3_config_errors_name_the_field() {
    let base: serde_json::Value =
        serde_json::from_str(&config_text("sd3.5-medium-transformer")).unwrap();
    for (field, value) in [
        ("qk_norm", serde_json::json!("layer_norm")),
        ("dual_attention_layers", serde_json::json!([24])),
        ("caption_projection_dim", serde_json::json!(1000)),
        ("patch_size", serde_json::json!(0)),
    ] {
        let mut json = base.clone();
        json[field] = value;
        let err = SD3Transformer2DConfig::from_json(&json.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let mut t5: serde_json::Value =
        serde_json::from_str(&config_text("t5-v1_1-xxl-encoder")).unwrap();
    t5["feed_forward_proj"] = serde_json::json!("gated-tanh");
    let err = T5Config::from_json(&t5.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("feed_forward_proj"), "{err}");
}

fn components() -> Reference {
    Reference::open("reference/sd3/components.safetensors")
}

/// The tiny T5 encoder (40 tokens: every bucket kind, the far ones clamped) against
/// transformers' `T5EncoderModel` last hidden state.
#[test]
fn t5_encoder_matches_transformers() {
    let r = components();
    let dir = DiffusersDir::open(fixture("tiny-sd3")).unwrap();
    for (name, device) in devices() {
        let t5 = dir
            .text_encoder_3(&device, &ComponentOptions::default())
            .unwrap();
        let out = t5
            .forward(r.int_tensor::<2>("t5.input_ids", &device))
            .unwrap();
        assert_close(
            &format!("[{name}] t5"),
            &out,
            &r.floats("t5.last_hidden_state"),
            tol(name, 1e-4, 1e-3),
        );
    }
}

/// The SD 3 style (tiny-sd3) and SD 3.5 Medium style (MMDiT-X, q/k RMS norm)
/// transformers on non-square 8x12 latents (a crop of the 24x24 position table)
/// at two timesteps, whole and with block 1 skipped, against diffusers.
#[test]
fn sd3_transformers_match_diffusers() {
    let r = components();
    for (name, device) in devices() {
        let sample = r.tensor::<4>("transformer.sample", &device);
        let context = r.tensor::<3>("transformer.encoder_hidden_states", &device);
        let pooled = r.tensor::<2>("transformer.pooled_projections", &device);
        let t = r.tensor::<1>("transformer.timestep", &device);
        for (key, dir) in [
            ("sd3", fixture("tiny-sd3/transformer")),
            ("sd35", fixture("tiny-sd35-transformer")),
        ] {
            let model =
                sd3_transformer_from_dir(&dir, &device, &ComponentOptions::default()).unwrap();
            for (skip, suffix) in [(&[][..], "out"), (&[1][..], "out_skip1")] {
                let out = model
                    .forward(
                        sample.clone(),
                        t.clone(),
                        context.clone(),
                        pooled.clone(),
                        skip,
                    )
                    .unwrap();
                assert_close(
                    &format!("[{name}] {key} {suffix}"),
                    &out,
                    &r.floats(&format!("transformer.{key}.{suffix}")),
                    tol(name, 1e-4, 2e-3),
                );
            }
        }
    }
}

/// The 16-channel SD 3 VAE: decode through `unscale_latents` (divide by 1.5305, add
/// 0.0609) and encode's mean through `scale_latents`, against diffusers.
#[test]
fn sd3_vae_matches_diffusers() {
    let r = components();
    let dir = DiffusersDir::open(fixture("tiny-sd3")).unwrap();
    for (name, device) in devices() {
        let vae = dir.vae(&device, &ComponentOptions::default()).unwrap();
        assert_eq!((vae.latent_channels(), vae.shift_factor()), (16, 0.0609));
        let z = vae.unscale_latents(r.tensor::<4>("vae.latents", &device));
        let t = tol(name, 1e-4, 2e-3);
        assert_close(
            &format!("[{name}] decoded"),
            &vae.decode(z).unwrap(),
            &r.floats("vae.decoded"),
            t,
        );
        let mean = vae
            .encode(r.tensor::<4>("vae.image", &device))
            .unwrap()
            .mode();
        assert_close(
            &format!("[{name}] mean"),
            &mean,
            &r.floats("vae.encode_mean"),
            t,
        );
        let scaled = vae.scale_latents(mean);
        assert_close(
            &format!("[{name}] scaled"),
            &scaled,
            &r.floats("vae.scaled_mean"),
            t,
        );
    }
}

/// Bad inputs to the transformer are errors naming the input, never a panic.
#[test]
fn sd3_transformer_refuses_bad_inputs() {
    let device = Device::flex();
    let model = sd3_transformer_from_dir(
        &fixture("tiny-sd3/transformer"),
        &device,
        &ComponentOptions::default(),
    )
    .unwrap();
    let ok = |b: usize, c: usize, h: usize, w: usize| Tensor::<4>::zeros([b, c, h, w], &device);
    let t = Tensor::<1>::from_floats([500.0], &device);
    let ctx = Tensor::<3>::zeros([1, 4, 96], &device);
    let pooled = Tensor::<2>::zeros([1, 80], &device);
    let err = |s, t, c, p, skip: &[usize]| model.forward(s, t, c, p, skip).unwrap_err().to_string();
    assert!(err(ok(1, 4, 8, 8), t.clone(), ctx.clone(), pooled.clone(), &[]).contains("sample"));
    assert!(err(ok(1, 16, 7, 8), t.clone(), ctx.clone(), pooled.clone(), &[]).contains("patch"));
    assert!(
        err(
            ok(1, 16, 50, 8),
            t.clone(),
            ctx.clone(),
            pooled.clone(),
            &[]
        )
        .contains("at most 48")
    );
    let wide = Tensor::<3>::zeros([1, 4, 95], &device);
    assert!(
        err(ok(1, 16, 8, 8), t.clone(), wide, pooled.clone(), &[])
            .contains("encoder_hidden_states")
    );
    let narrow = Tensor::<2>::zeros([1, 79], &device);
    assert!(err(ok(1, 16, 8, 8), t.clone(), ctx.clone(), narrow, &[]).contains("pooled"));
    assert!(err(ok(1, 16, 8, 8), t, ctx, pooled, &[3]).contains("skip_layers"));
}

/// The tiny SD 3 folder's parts, owned for a test.
struct Sd3Parts {
    tokenizer: stable_diffusion::io::ClipTokenizer,
    text_encoder: ClipTextModel,
    tokenizer_2: stable_diffusion::io::ClipTokenizer,
    text_encoder_2: ClipTextModel,
    tokenizer_3: stable_diffusion::io::T5Tokenizer,
    text_encoder_3: T5EncoderModel,
    transformer: SD3Transformer2DModel,
    vae: AutoencoderKL,
}

impl Sd3Parts {
    fn load(device: &Device, transformer: Option<&str>) -> Self {
        let dir = DiffusersDir::open(fixture("tiny-sd3")).unwrap();
        let o = ComponentOptions::default();
        let transformer_dir = transformer.map_or(fixture("tiny-sd3/transformer"), fixture);
        Self {
            tokenizer: dir.tokenizer().unwrap(),
            text_encoder: dir.text_encoder(device, &o).unwrap(),
            tokenizer_2: dir.tokenizer_2().unwrap(),
            text_encoder_2: dir.text_encoder_2(device, &o).unwrap(),
            tokenizer_3: dir.tokenizer_3().unwrap(),
            text_encoder_3: dir.text_encoder_3(device, &o).unwrap(),
            transformer: sd3_transformer_from_dir(&transformer_dir, device, &o).unwrap(),
            vae: dir.vae(device, &o).unwrap(),
        }
    }

    fn composed<'a>(
        &'a self,
        scheduler: &'a dyn stable_diffusion::core::Scheduler,
        t5: bool,
        device: &Device,
    ) -> StableDiffusion<'a> {
        let conditioner = TextConditioner::Sd3(Sd3Conditioner {
            clip_l: (&self.tokenizer, &self.text_encoder),
            clip_g: (&self.tokenizer_2, &self.text_encoder_2),
            t5: t5.then_some((
                &self.tokenizer_3 as &dyn stable_diffusion::core::PromptTokenizer,
                &self.text_encoder_3 as &dyn stable_diffusion::core::SequenceEncoder,
            )),
            joint_attention_dim: self.transformer.joint_attention_dim(),
        });
        StableDiffusion {
            conditioner,
            unet: &self.transformer,
            vae: &self.vae,
            decoder: None,
            preview_decoder: None,
            watermark: None,
            scheduler,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            device: device.clone(),
        }
    }
}

/// diffusers' `StableDiffusion3Pipeline` on the tiny SD 3 model
/// (`gen/ref_sd3_pipeline.py`): Euler, second and third prompts with negatives and
/// clip skip, no T5 (zeros), no guidance with a 20-token T5, skip-layer guidance on
/// the MMDiT-X transformer, Heun, DPM++ 2M on flow sigmas. The prompt embeddings,
/// pooled embeddings, final latents and pictures match.
///
/// On wgpu (Mesa's lavapipe in CI, the slowest device) only `WGPU_CASES` run: they
/// take every op the encoders, both transformers, the VAE and the inpainting blend
/// use; the other cases vary schedulers and prompts, which the CPU run covers.
#[test]
fn sd3_pipelines_match_diffusers() {
    const WGPU_CASES: [&str; 3] = [
        "sd3_pipelines/txt2img_euler",
        "sd3_pipelines/skip_layer_guidance_mmditx",
        "sd3_pipelines/inpaint_strength_07",
    ];
    for (name, device) in devices() {
        let t = tol(name, 1e-3, 1e-2);
        for case in common::Case::all("index_sd3_pipelines.json", "") {
            if name == "wgpu" && !WGPU_CASES.contains(&case.name.as_str()) {
                continue;
            }
            let opts = &case.params()["options"];
            let parts = Sd3Parts::load(&device, opts["transformer"].as_str());
            let config = SchedulerConfig::from_json(&case.scheduler_config()).unwrap();
            let class = case.params()["scheduler_class"].as_str().unwrap();
            let scheduler = AnyScheduler::from_class(class, &config).unwrap();
            let t5 = !opts["drop_t5"].as_bool().unwrap_or(false);
            let sd = parts.composed(&scheduler, t5, &device);
            let options = case.options(&device);
            let cfg = sd.uses_cfg(options.guidance_scale);
            let embeds = sd.conditioner.encode(&options, cfg, &device).unwrap();
            assert_close(
                &format!("[{name}] {} prompt_embeds", case.name),
                &embeds.embeds,
                &case.r.floats("prompt_embeds"),
                tol(name, 1e-4, 1e-3),
            );
            assert_close(
                &format!("[{name}] {} pooled", case.name),
                &embeds.pooled.unwrap(),
                &case.r.floats("pooled_projections"),
                tol(name, 1e-4, 1e-3),
            );
            let out = case.run_composed(&sd, &device);
            case.check_latents(&out.latents, t);
            let (_, _, picture) = stable_diffusion::io::image::to_rgb8(&out.images, 0);
            case.check_image(&picture, tol(name, 1.0, 3.0));
        }
    }
}

/// The owning pipeline recognises the tiny SD 3 folder (family, default size, the
/// three encoders) and runs the diffusers cases from requests: txt2img, second and
/// third prompts, skip-layer guidance (with the MMDiT-X transformer swapped in via
/// the composed path only), Heun, DPM++ 2M flow, img2img and inpainting.
#[test]
fn sd3_folder_loads_and_generates_as_diffusers() {
    use stable_diffusion::pipelines::{LoadOptions, ModelFamily, StableDiffusionPipeline};
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd3"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(pipe.family(), ModelFamily::Sd3);
    assert_eq!(pipe.default_size(), 16 * 2);
    assert!(pipe.unet().is_none() && pipe.denoiser().transformer().is_some());
    assert!(pipe.text_encoders().text_encoder_3().is_some());
    let mut checked = 0;
    for case in common::Case::all("index_sd3_pipelines.json", "") {
        let opts = &case.params()["options"];
        if opts["transformer"].is_string() || opts["drop_t5"].as_bool() == Some(true) {
            continue;
        }
        let generation = case.generate(&pipe, |r| r);
        let picture = &generation.images[0];
        case.check_image(picture.image.as_raw(), 1.0);
        checked += 1;
    }
    assert_eq!(checked, 9);
}
