//! SDXL against diffusers (fixtures README §8a and the SDXL part of §7): the U-Net's
//! `text_time` addition, per-level transformer depths and heads.

use crate::common;

use common::{Case, Reference, assert_close, devices, fixture, tol};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{AddedConditioning, Denoiser};
use stable_diffusion::io::{ComponentOptions, DiffusersDir};
use stable_diffusion::models::UNet2DConditionModel;

pub(crate) fn tiny_sdxl() -> DiffusersDir {
    DiffusersDir::open(fixture("tiny-sdxl")).unwrap()
}

fn check_unet(name: &str, device: &Device, unet: &UNet2DConditionModel) {
    let r = Reference::open("reference/sdxl/unet.safetensors");
    let t = tol(name, 1e-4, 1e-3);
    let sample = r.tensor::<4>("sample", device);
    let ctx = r.tensor::<3>("encoder_hidden_states", device);
    let added = AddedConditioning {
        text_embeds: Some(r.tensor::<2>("text_embeds", device)),
        time_ids: Some(r.tensor::<2>("time_ids", device)),
        ..Default::default()
    };
    for (case, ts_key) in [
        ("t999", "timestep_t999_float"),
        ("t500", "timestep_t500_float"),
        ("frac", "timestep_frac"),
    ] {
        let ts = r.tensor::<1>(ts_key, device);
        let ts = if ts.dims()[0] == 1 {
            ts.repeat_dim(0, 2)
        } else {
            ts
        };
        let out = unet
            .forward_added(sample.clone(), ts, ctx.clone(), &added)
            .unwrap();
        assert_close(
            &format!("[{name}] out_{case}"),
            &out,
            &r.floats(&format!("out_{case}")),
            t,
        );
    }
    let ts = r.tensor::<1>("timestep_t500_float", device);
    let ts = if ts.dims()[0] == 1 {
        ts.repeat_dim(0, 2)
    } else {
        ts
    };
    let aug = unet.text_time_embed(&added).unwrap();
    assert_close(
        &format!("[{name}] add_embedding"),
        &aug,
        &r.floats("intermediate_t500.add_embedding"),
        t,
    );
    let defaults = AddedConditioning {
        time_ids: Some(r.tensor::<2>("time_ids_default", device)),
        ..added.clone()
    };
    let out = unet
        .forward_added(sample.clone(), ts.clone(), ctx.clone(), &defaults)
        .unwrap();
    assert_close(
        &format!("[{name}] out_t500_default_time_ids"),
        &out,
        &r.floats("out_t500_default_time_ids"),
        t,
    );
    let mut seen = 0;
    unet.forward_added_with_intermediates(sample, ts, ctx, &added, |key, x| {
        let full = format!("intermediate_t500.{key}");
        if r.has(&full) {
            assert_close(&format!("[{name}] {key}"), x, &r.floats(&full), t);
            seen += 1;
        }
    });
    assert_eq!(seen, 9, "intermediates checked");
}

#[test]
fn sdxl_unet_matches_diffusers() {
    for (name, device) in devices() {
        let unet = tiny_sdxl()
            .unet(&device, &ComponentOptions::default())
            .unwrap();
        check_unet(name, &device, &unet);
    }
}

#[test]
fn sdxl_unet_refuses_missing_or_misshapen_added_conditioning() {
    let device = Device::flex();
    let unet = tiny_sdxl()
        .unet(&device, &ComponentOptions::default())
        .unwrap();
    let dims = unet.text_time_dims().unwrap();
    assert_eq!((dims.input_dim, dims.time_embed_dim), (80, 8));
    let sample = Tensor::<4>::zeros([1, 4, 8, 8], &device);
    let ts = Tensor::<1>::full([1], 500.0, &device);
    let ctx = Tensor::<3>::zeros([1, 77, 48], &device);
    let err = Denoiser::forward(&unet, sample.clone(), ts.clone(), ctx.clone()).unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
    let wrong = AddedConditioning {
        text_embeds: Some(Tensor::zeros([1, 32], &device)),
        time_ids: Some(Tensor::zeros([1, 5], &device)),
        ..Default::default()
    };
    let err = unet.forward_added(sample, ts, ctx, &wrong).unwrap_err();
    assert!(err.to_string().contains("add_embedding"), "{err}");
}

/// Both encoders and tokenizers, the prompt embedding (penultimate layers without the
/// final norm, concatenated) and the pooled embedding (te2's projection).
#[test]
fn sdxl_text_encoders_match_diffusers() {
    use stable_diffusion::core::{HiddenLayer, PromptTokenizer, TextEncoder};
    let r = Reference::open("reference/sdxl/text_encoders.safetensors");
    let dir = tiny_sdxl();
    let (tok1, tok2) = (dir.tokenizer().unwrap(), dir.tokenizer_2().unwrap());
    let ids1 = r.ints("input_ids");
    let ids2 = r.ints("input_ids_2");
    assert_ne!(ids1, ids2, "the two tokenizers pad differently");
    let prompts = ["a photograph of an astronaut riding a horse", ""];
    for (i, p) in prompts.iter().enumerate() {
        let a: Vec<i64> = tok1
            .encode_padded(p)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let b: Vec<i64> = tok2
            .encode_padded(p)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(a, ids1[i * 77..(i + 1) * 77], "tokenizer, prompt {i}");
        assert_eq!(b, ids2[i * 77..(i + 1) * 77], "tokenizer_2, prompt {i}");
    }
    for (name, device) in devices() {
        let t = tol(name, 1e-4, 1e-3);
        let o = ComponentOptions::default();
        let te1 = dir.text_encoder(&device, &o).unwrap();
        let te2 = dir.text_encoder_2(&device, &o).unwrap();
        assert!(te1.text_projection.is_none() && te2.text_projection.is_some());
        let ids1 = r.int_tensor::<2>("input_ids", &device);
        let ids2 = r.int_tensor::<2>("input_ids_2", &device);
        let a = te1.encode(ids1.clone(), HiddenLayer::SkipRaw(1)).unwrap();
        let b = te2.encode(ids2.clone(), HiddenLayer::SkipRaw(1)).unwrap();
        assert_close(
            &format!("[{name}] te1 penultimate"),
            &a.hidden_states,
            &r.floats("te1.penultimate_hidden_state"),
            t,
        );
        assert_close(
            &format!("[{name}] te2 penultimate"),
            &b.hidden_states,
            &r.floats("te2.penultimate_hidden_state"),
            t,
        );
        assert_close(
            &format!("[{name}] te2 pooler_output"),
            &b.pooled,
            &r.floats("te2.pooler_output"),
            t,
        );
        let pooled = b.text_embeds.clone().unwrap();
        assert_close(
            &format!("[{name}] te2 text_embeds"),
            &pooled,
            &r.floats("pooled_prompt_embeds"),
            t,
        );
        let embeds = Tensor::cat(vec![a.hidden_states, b.hidden_states], 2);
        assert_close(
            &format!("[{name}] prompt_embeds"),
            &embeds,
            &r.floats("prompt_embeds"),
            t,
        );
        let a = te1.encode(ids1, HiddenLayer::SkipRaw(2)).unwrap();
        let b = te2.encode(ids2, HiddenLayer::SkipRaw(2)).unwrap();
        let skip = Tensor::cat(vec![a.hidden_states, b.hidden_states], 2);
        assert_close(
            &format!("[{name}] prompt_embeds_clip_skip1"),
            &skip,
            &r.floats("prompt_embeds_clip_skip1"),
            t,
        );
    }
}

/// Every SDXL pipeline case of the fixtures (txt2img with Euler, DPM++ 2M Karras,
/// AYS timesteps, micro-conditioning and its negatives, no negative prompt (zeros),
/// Turbo-style Euler a trailing at guidance 0, img2img) through the owning pipeline
/// with the recorded noise.
#[test]
fn sdxl_pipeline_cases_match_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(pipe.family(), ModelFamily::Sdxl);
    let cases = Case::all("index_sdxl.json", "sdxl/pipelines/");
    assert_eq!(cases.len(), 9);
    for case in &cases {
        run_sdxl_case(&pipe, case);
    }
}

/// Runs one SDXL pipeline case through `pipe` with its recorded noise and checks
/// the final latents (1e-3 of their scale) and the picture (1 level in 255).
fn run_sdxl_case(pipe: &stable_diffusion::prelude::StableDiffusionPipeline, case: &Case) {
    let out = case.generate(pipe, |r| r);
    case.check_latents(&out.latents, 1e-3);
    // The picture: the VAE at scaling factor 0.13025, in 8 bits.
    case.check_image(out.images[0].image.as_raw(), 1.0);
}

/// Long prompts and A1111 weighting for SDXL (`gen/ref_sdxl_long_prompts.py`: A1111's
/// procedure over both encoders written out with transformers, the embeddings given to
/// `StableDiffusionXLPipeline`): a two-window weighted prompt with a weighted negative,
/// weighting alone with the zeroed negative, a long prompt without guidance.
#[test]
fn sdxl_long_prompts_and_weighting_match_a1111_through_diffusers() {
    use stable_diffusion::prelude::*;
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &Device::flex(),
        &LoadOptions::default(),
    )
    .unwrap();
    run_sdxl_index(&pipe, "index_sdxl_long.json", 3);
}

/// SDXL's second prompt (`gen/ref_sdxl_prompt_2.py`): different `prompt_2` and
/// `negative_prompt_2`; a `negative_prompt_2` that diffusers never reads (no negative
/// prompt: zeros); an empty `prompt_2` standing for the prompt.
#[test]
fn sdxl_prompt_2_and_negative_prompt_2_match_diffusers() {
    use stable_diffusion::prelude::*;
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &Device::flex(),
        &LoadOptions::default(),
    )
    .unwrap();
    run_sdxl_index(&pipe, "index_sdxl_prompt_2.json", 3);
}

/// A second prompt is for a second text encoder: a model with one refuses it by
/// name; the refiner, as diffusers, encodes the first prompt with its one encoder
/// and ignores `prompt_2`.
#[test]
fn prompt_2_is_refused_with_one_encoder_and_ignored_by_the_refiner() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let sd15 = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let request = || GenerationRequest::new("a cat").size(32, 32).steps(2);
    let err = sd15
        .validate(&request().prompt_2("a dog"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt_2"), "{err}");
    let err = sd15
        .generate(request().negative_prompt_2("blur"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("negative_prompt_2"), "{err}");
    let refiner = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl-refiner"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(refiner.text_encoder().is_none() && refiner.text_encoder_2().is_some());
    let plain = refiner.encode_prompt(&request()).unwrap();
    let with_2 = refiner
        .encode_prompt(&request().prompt_2("a dog").negative_prompt_2("blur"))
        .unwrap();
    plain
        .embeds
        .to_data()
        .assert_eq(&with_2.embeds.to_data(), true);
    // The base model reads it.
    let base = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let a = base.encode_prompt(&request()).unwrap();
    let b = base.encode_prompt(&request().prompt_2("a dog")).unwrap();
    assert_eq!(a.embeds.dims(), b.embeds.dims());
    let diff = (a.embeds - b.embeds).abs().max().into_scalar::<f32>();
    assert!(diff > 1e-3, "prompt_2 changed nothing ({diff})");
}

/// Runs every case of `reference/{file}` through `pipe` ([`run_sdxl_case`]); the index
/// holds `expected` cases.
fn run_sdxl_index(
    pipe: &stable_diffusion::prelude::StableDiffusionPipeline,
    file: &str,
    expected: usize,
) {
    let cases = Case::all(file, "");
    assert_eq!(cases.len(), expected, "{file}");
    for case in &cases {
        run_sdxl_case(pipe, case);
    }
}

/// Runs every case of the refiner's index (`gen/ref_sdxl_refiner.py`) through `pipe`.
fn check_refiner_cases(pipe: &stable_diffusion::prelude::StableDiffusionPipeline) {
    assert_eq!(pipe.family(), stable_diffusion::prelude::ModelFamily::Sdxl);
    run_sdxl_index(pipe, "index_sdxl_refiner.json", 2);
}

/// The SDXL refiner's layout (made by `gen/ref_sdxl_refiner.py`): a folder with only
/// `text_encoder_2` / `tokenizer_2`, a U-Net over that encoder's width with the
/// aesthetic-score time ids, `force_zeros_for_empty_prompt` false. Both cases, the
/// hand-over's second half from the base's latents (`denoising_start` 0.7) and image
/// to image at strength 0.3, match `StableDiffusionXLImg2ImgPipeline`.
#[test]
fn sdxl_refiner_matches_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl-refiner"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    check_refiner_cases(&pipe);
}

/// The refiner as an original single file (`gen/refiner_single_file.py`: the OpenCLIP
/// encoder alone under `conditioner.embedders.0.model.`, as in
/// `sd_xl_refiner_1.0.safetensors`) with the tiny folder's configs: the same cases
/// match. Without the configs it is recognised as the refiner (built-in refiner 1.0
/// U-Net, no first text encoder), whose real shapes the tiny file lacks: an error
/// naming them.
#[test]
fn sdxl_refiner_single_file_matches_diffusers() {
    use stable_diffusion::io::SingleFile;
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let options = LoadOptions {
        config: Some(fixture("tiny-sdxl-refiner")),
        ..Default::default()
    };
    let file = fixture("tiny-sdxl-refiner.safetensors");
    let pipe = StableDiffusionPipeline::from_pretrained(&file, &device, &options).unwrap();
    check_refiner_cases(&pipe);

    let ckpt = SingleFile::open(&file).unwrap();
    assert!(ckpt.is_sdxl() && ckpt.text_encoder_2_only());
    assert_eq!(
        ckpt.unet_config().block_out_channels,
        [384, 768, 1536, 1536]
    );
    assert_eq!(
        ckpt.unet_config().projection_class_embeddings_input_dim,
        Some(2560)
    );
    let err = ckpt
        .text_encoder(&device, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no first text encoder"), "{err}");
    let err = StableDiffusionPipeline::from_pretrained(&file, &device, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shape"), "{err}");
}

/// The single-file SDXL checkpoint (SGM layout: `conditioner.embedders.0/1`, the
/// OpenCLIP encoder's fused `in_proj` and transposed `text_projection`) with the tiny
/// folder's configs, as diffusers' `from_single_file(config=...)`: the same picture.
#[test]
fn sdxl_single_file_matches_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let options = LoadOptions {
        config: Some(fixture("tiny-sdxl")),
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl.safetensors"),
        &device,
        &options,
    )
    .unwrap();
    assert_eq!(pipe.family(), ModelFamily::Sdxl);
    let case = Case::open("index_sdxl.json", "sdxl/pipelines/txt2img_euler_7_g5");
    run_sdxl_case(&pipe, &case);
    // Without the tiny configs it is taken for SDXL base 1.0, whose shapes it lacks:
    // an error listing them, not a panic.
    let err = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl.safetensors"),
        &device,
        &LoadOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("shape"), "{err}");
}

/// The base-to-refiner hand-over, with the base's own components in both halves:
/// txt2img stopping at `denoising_end` 0.7 (7 of 10 Euler steps), its latents
/// continued by image to image from `denoising_start` 0.7 (3 steps, no noise added),
/// each matching diffusers.
#[test]
fn sdxl_base_to_refiner_handover_matches_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let end = Case::open("index_fast.json", "pipelines_fast/sdxl_denoising_end_0.7");
    let start = Case::open("index_fast.json", "pipelines_fast/sdxl_denoising_start_0.7");
    let (r_end, r_start) = (&end.r, &start.r);
    let scheduler = SchedulerChoice::Config(end.scheduler_config());
    let request = || {
        GenerationRequest::new("a red fox in the snow")
            .negative_prompt("blurry")
            .guidance(5.0)
            .steps(10)
            .scheduler_choice(scheduler.clone())
    };
    let mut steps = Vec::new();
    let base = pipe
        .generate(
            request()
                .size(32, 32)
                .init_latents(r_end.tensor::<4>("init_latents", &device))
                .denoising_end(0.7)
                .on_step(|s| {
                    steps.push(s.timestep);
                    true
                }),
        )
        .unwrap();
    let want: Vec<f64> = r_end
        .floats("timesteps")
        .iter()
        .map(|&t| t as f64)
        .collect();
    assert_eq!(steps, want, "the base stops after 7 steps");
    end.check_latents(&base.latents, 1e-3);
    let mut steps = Vec::new();
    let refined = pipe
        .generate(
            request()
                .init_latents(base.latents.clone())
                .denoising_start(0.7)
                .on_step(|s| {
                    steps.push(s.timestep);
                    true
                }),
        )
        .unwrap();
    let want: Vec<f64> = r_start
        .floats("timesteps")
        .iter()
        .map(|&t| t as f64)
        .collect();
    assert_eq!(steps, want, "the refiner runs the remaining 3 steps");
    start.check_latents(&refined.latents, 1e-3);
    // Misuse: a start without latents, a fraction outside (0, 1).
    let err = pipe.generate(request().denoising_start(0.7)).unwrap_err();
    assert!(err.to_string().contains("init_latents"), "{err}");
    let err = pipe
        .generate(request().size(32, 32).denoising_end(1.5))
        .unwrap_err();
    assert!(err.to_string().contains("denoising_end"), "{err}");
}

/// SDXL's VAE (`scaling_factor` 0.13025): decode with its intermediates, encode.
#[test]
fn sdxl_vae_matches_diffusers() {
    for (name, device) in crate::common::devices() {
        let vae = tiny_sdxl()
            .vae(&device, &ComponentOptions::default())
            .unwrap();
        assert_eq!(
            stable_diffusion::core::Autoencoder::scaling_factor(&vae),
            0.13025
        );
        crate::models::check_vae(name, &device, &vae, "reference/sdxl/vae.safetensors");
    }
}

/// SDXL inpainting (made by `gen/ref_sdxl_inpaint.py`): a 9-channel SDXL inpainting
/// U-Net at strength 1, and tiny-sdxl's own 4-channel U-Net with the known region
/// blended back at strength 0.75, through the owning pipeline.
#[test]
fn sdxl_inpainting_matches_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    for (name, unet) in [
        (
            "sdxl_inpaint/inpaint9_euler_7_g5",
            Some(fixture("tiny-sdxl-inpaint")),
        ),
        ("sdxl_inpaint/blend4_euler_7_g5_s0.75", None),
    ] {
        let options = LoadOptions {
            unet,
            ..Default::default()
        };
        let pipe =
            StableDiffusionPipeline::from_pretrained(fixture("tiny-sdxl"), &device, &options)
                .unwrap();
        assert_eq!(pipe.family(), ModelFamily::Sdxl);
        let case = Case::open("index_sdxl_inpaint.json", name);
        let out = case.generate(&pipe, |r| r);
        case.check_latents(&out.latents, 1e-3);
    }
}

/// SDXL's fp16-fix VAE (`madebyollin/sdxl-vae-fp16-fix`: SDXL's VAE layout with
/// `force_upcast: false`) as a drop-in: with `LoadOptions::vae_dtype` f16 it runs in
/// f16 and decodes the SDXL VAE reference within the f16 tolerance (5e-2); SDXL's own
/// VAE (`force_upcast` true) stays f32 under the same options where it would compute
/// in f16 (GPUs), as diffusers upcasts it. On the CPU only the weights are f16 (the
/// VAE computes in f32), so both take f16 weights there.
#[test]
fn sdxl_fp16_fix_vae_runs_in_f16_and_the_upcast_vae_stays_f32() {
    use stable_diffusion::burn::tensor::DType;
    use stable_diffusion::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let vae_dir = tmp.path().join("vae");
    std::fs::create_dir_all(&vae_dir).unwrap();
    std::fs::copy(
        fixture("tiny-sdxl/vae/diffusion_pytorch_model.safetensors"),
        vae_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture("tiny-sdxl/vae/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_ne!(config["force_upcast"], false);
    config["force_upcast"] = false.into();
    std::fs::write(vae_dir.join("config.json"), config.to_string()).unwrap();
    for (name, device) in crate::common::devices() {
        if !device.supports_dtype(DType::F16) {
            eprintln!("[{name}] no f16: skipped");
            continue;
        }
        let load = |vae: Option<std::path::PathBuf>| {
            StableDiffusionPipeline::from_pretrained(
                fixture("tiny-sdxl"),
                &device,
                &LoadOptions {
                    vae_dtype: Some(DType::F16),
                    vae,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let upcast = load(None);
        let dtype = |p: &StableDiffusionPipeline| p.vae().decoder.conv_in.weight.val().dtype();
        let weight_only = stable_diffusion::io::half_weights_only(&device);
        assert_eq!(
            dtype(&upcast),
            if weight_only { DType::F16 } else { DType::F32 },
            "[{name}] force_upcast keeps f32 where the VAE would compute in f16"
        );
        let fix = load(Some(vae_dir.clone()));
        assert_eq!(
            dtype(&fix),
            DType::F16,
            "[{name}] the fp16-fix VAE runs in f16"
        );
        let r = Reference::open("reference/sdxl/vae.safetensors");
        let vae = fix.vae();
        let z = r.tensor::<4>("decode_in_latents", &device)
            / stable_diffusion::core::Autoencoder::scaling_factor(vae);
        let out = vae.decode(z).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        let what = format!("[{name}] fp16-fix VAE decode in f16");
        assert_close(&what, &out, &r.floats("decode_out"), 5e-2);
    }
}
