//! Pipeline parity with diffusers (fixtures README 4e): every case of
//! `reference/pipelines/` through the library API, with the recorded noise.

use crate::common;

use common::{Case, assert_close, fixture};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{NoiseRng, RecordedNoise, Steps};
use stable_diffusion::io::{ClipTokenizer, ComponentOptions, DiffusersDir};
use stable_diffusion::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};
use stable_diffusion::pipelines::{GenerationOptions, StableDiffusion};
use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};

struct Models {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    inpaint_unet: UNet2DConditionModel,
    vae: AutoencoderKL,
}

fn models(device: &Device) -> Models {
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let o = ComponentOptions::default();
    Models {
        tokenizer: dir.tokenizer().unwrap(),
        text_encoder: dir.text_encoder(device, &o).unwrap(),
        unet: dir.unet(device, &o).unwrap(),
        inpaint_unet: DiffusersDir::open(fixture("tiny-sd15-inpaint"))
            .unwrap()
            .unet(device, &o)
            .unwrap(),
        vae: dir.vae(device, &o).unwrap(),
    }
}

/// One case through the borrowed pipeline: the prompt embeddings (1e-4), the final
/// latents (1e-3 of their scale, every recorded draw used) and the picture (1e-3).
fn run_case(case: &Case, m: &Models, device: &Device) {
    let name = &case.name;
    let params = case.params();
    let config = SchedulerConfig::from_json(&case.scheduler_config()).unwrap();
    let scheduler =
        AnyScheduler::from_class(params["scheduler"].as_str().unwrap(), &config).unwrap();
    let inpaint = case.pipeline() == "StableDiffusionInpaintPipeline";
    let sd = tiny_sd(m, &scheduler, device, inpaint);
    let options = case.options(device);
    let embeds = sd.encode_prompt(&options).unwrap();
    assert_eq!(
        case.r.shape("prompt_embeds")[0],
        if options.guidance_scale > 1.0 { 2 } else { 1 }
    );
    assert_close(
        &format!("{name} prompt_embeds"),
        &embeds,
        &case.r.floats("prompt_embeds"),
        1e-4,
    );
    let out = case.run_composed(&sd, device);
    case.check_latents(&out.latents, 1e-3);
    let image = out.images.permute([0, 2, 3, 1]);
    let image: Tensor<4> = image.reshape([1, 32, 32, 3]);
    assert_close(
        &format!("{name} image"),
        &image,
        &case.r.floats("image"),
        1e-3,
    );
}

#[test]
fn every_pipeline_case_matches_diffusers() {
    let device = Device::flex();
    let m = models(&device);
    let cases = Case::all("index.json", "pipelines/");
    assert_eq!(cases.len(), 10);
    for case in &cases {
        run_case(case, &m, &device);
    }
}

#[test]
fn same_seed_same_result_and_sizes_are_checked() {
    let device = Device::flex();
    let m = models(&device);
    let scheduler = base_scheduler("euler-a");
    let sd = tiny_sd(&m, &scheduler, &device, false);
    let options = GenerationOptions {
        prompt: "a red fox".into(),
        steps: Steps::Count(4),
        width: 40,
        height: 24,
        batch_size: 2,
        ..Default::default()
    };
    let a = sd.txt2img(&options, &mut NoiseRng::seed(42), None).unwrap();
    let b = sd.txt2img(&options, &mut NoiseRng::seed(42), None).unwrap();
    assert_eq!(a.images.dims(), [2, 3, 24, 40]);
    assert_eq!(
        a.latents.to_data().try_to_vec::<f32>().unwrap(),
        b.latents.to_data().try_to_vec::<f32>().unwrap()
    );
    let c = sd.txt2img(&options, &mut NoiseRng::seed(43), None).unwrap();
    assert_ne!(
        a.latents.to_data().try_to_vec::<f32>().unwrap(),
        c.latents.to_data().try_to_vec::<f32>().unwrap()
    );
    let bad = GenerationOptions {
        width: 30,
        ..options.clone()
    };
    let err = sd.txt2img(&bad, &mut NoiseRng::seed(1), None).unwrap_err();
    assert!(err.to_string().contains("width"), "{err}");
    let mut steps_seen = Vec::new();
    let mut cb = |info: &stable_diffusion::pipelines::StepInfo<'_>| {
        steps_seen.push(info.step);
        let preview = stable_diffusion::pipelines::latent_preview(info.latents);
        assert_eq!(preview.dims(), [2, 3, 12, 20]);
        info.step < 1
    };
    let err = sd
        .txt2img(&options, &mut NoiseRng::seed(1), Some(&mut cb))
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(steps_seen, vec![0, 1]);
}

#[test]
fn long_prompts_and_weighting() {
    let device = Device::flex();
    let m = models(&device);
    let scheduler = base_scheduler("ddim");
    let sd = tiny_sd(&m, &scheduler, &device, false);
    let plain = GenerationOptions {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: Some("blurry".into()),
        ..Default::default()
    };
    let base = sd.encode_prompt(&plain).unwrap();
    // Off by default; on, a short prompt gives the same embeddings as diffusers.
    for (long, weighting) in [(true, false), (false, true), (true, true)] {
        let o = GenerationOptions {
            long_prompts: long,
            prompt_weighting: weighting,
            ..plain.clone()
        };
        let e = sd.encode_prompt(&o).unwrap();
        assert_eq!(
            e.to_data().try_to_vec::<f32>().unwrap(),
            base.to_data().try_to_vec::<f32>().unwrap(),
            "long={long} weighting={weighting}"
        );
    }
    // A weight of 1 is neutral; another weight changes the embeddings.
    let neutral = GenerationOptions {
        prompt: "a photograph of an (astronaut:1.0) riding a horse".into(),
        prompt_weighting: true,
        ..plain.clone()
    };
    let e = sd.encode_prompt(&neutral).unwrap();
    assert_eq!(
        e.to_data().try_to_vec::<f32>().unwrap(),
        base.to_data().try_to_vec::<f32>().unwrap()
    );
    let heavy = GenerationOptions {
        prompt: "a photograph of an (astronaut:1.5) riding a horse".into(),
        ..neutral.clone()
    };
    assert_ne!(
        sd.encode_prompt(&heavy)
            .unwrap()
            .to_data()
            .try_to_vec::<f32>()
            .unwrap(),
        base.to_data().try_to_vec::<f32>().unwrap()
    );
    // 100 words: two windows for the prompt, the negative padded to two as well.
    let long_prompt = vec!["horse"; 100].join(" ");
    let o = GenerationOptions {
        prompt: long_prompt.clone(),
        long_prompts: true,
        ..plain.clone()
    };
    assert_eq!(sd.encode_prompt(&o).unwrap().dims(), [2, 154, 32]);
    let truncated = GenerationOptions {
        prompt: long_prompt,
        ..plain.clone()
    };
    assert_eq!(sd.encode_prompt(&truncated).unwrap().dims(), [2, 77, 32]);
    // And the U-Net takes the longer context.
    let out = sd
        .txt2img(
            &GenerationOptions {
                steps: Steps::Count(2),
                width: 32,
                height: 32,
                ..o
            },
            &mut NoiseRng::seed(3),
            None,
        )
        .unwrap();
    assert_eq!(out.images.dims(), [1, 3, 32, 32]);
}

fn tiny_sd<'a>(
    m: &'a Models,
    scheduler: &'a AnyScheduler,
    device: &Device,
    inpaint: bool,
) -> StableDiffusion<'a> {
    StableDiffusion {
        conditioner: stable_diffusion::pipelines::TextConditioner::clip(
            &m.tokenizer,
            &m.text_encoder,
        ),
        unet: if inpaint { &m.inpaint_unet } else { &m.unet },
        vae: &m.vae,
        decoder: None,
        preview_decoder: None,
        watermark: None,
        scheduler,
        controlnets: Vec::new(),
        adapters: Vec::new(),
        device: device.clone(),
    }
}

fn base_scheduler(name: &str) -> AnyScheduler {
    let config = SchedulerConfig::from_json(
        &std::fs::read_to_string(fixture("tiny-sd15/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    AnyScheduler::from_name(name, &config).unwrap()
}

#[test]
fn outpainting_keeps_the_original_pixels() {
    use stable_diffusion::pipelines::Extend;
    let device = Device::flex();
    let m = models(&device);
    let scheduler = base_scheduler("ddim");
    let image = stable_diffusion::io::image::load_image(
        fixture("reference/pipelines/img2img_ddim_s0.6_input.png"),
        &device,
    )
    .unwrap();
    let extend = Extend {
        left: 8,
        right: 16,
        top: 0,
        bottom: 8,
    };
    let seam = 4;
    for inpaint_unet in [false, true] {
        let sd = tiny_sd(&m, &scheduler, &device, inpaint_unet);
        let options = GenerationOptions {
            prompt: "a horse".into(),
            steps: Steps::Count(3),
            ..Default::default()
        };
        let out = sd
            .outpaint(
                &options,
                image.clone(),
                extend,
                seam,
                &mut NoiseRng::seed(5),
                None,
            )
            .unwrap();
        assert_eq!(out.images.dims(), [1, 3, 40, 56]);
        let got = out.images.to_data().try_to_vec::<f32>().unwrap();
        let orig = (image.clone() / 2.0 + 0.5)
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        let (mut kept, mut changed) = (0, 0);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let (cy, cx) = (y, x + 8);
                    let g = got[c * 40 * 56 + cy * 56 + cx];
                    let o = orig[c * 32 * 32 + y * 32 + x];
                    let far = x >= seam && x + seam < 32 && y + seam < 32;
                    if far {
                        assert!(
                            (g - o).abs() < 1e-6,
                            "pixel ({c},{y},{x}) changed: {g} vs {o}"
                        );
                        kept += 1;
                    }
                }
            }
            // The new right-hand area is generated, not a copy of the edge.
            for y in 0..40 {
                for x in 40..56 {
                    let g = got[c * 40 * 56 + y * 56 + x];
                    let edge = orig[c * 32 * 32 + y.min(31) * 32 + 31];
                    if (g - edge).abs() > 1e-3 {
                        changed += 1;
                    }
                }
            }
        }
        assert!(
            kept > 2000 && changed > 100,
            "kept {kept}, changed {changed}"
        );
    }
    let sd = tiny_sd(&m, &scheduler, &device, false);
    let err = sd
        .outpaint(
            &GenerationOptions::default(),
            image,
            Extend {
                left: 5,
                ..Default::default()
            },
            4,
            &mut NoiseRng::seed(1),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("left"), "{err}");
}

#[test]
fn interpolation_endpoints_equal_plain_generations() {
    use stable_diffusion::core::NoiseSource;
    let device = Device::flex();
    let m = models(&device);
    let scheduler = base_scheduler("euler");
    let sd = tiny_sd(&m, &scheduler, &device, false);
    let a = GenerationOptions {
        prompt: "a red circle".into(),
        steps: Steps::Count(3),
        width: 32,
        height: 32,
        ..Default::default()
    };
    let b = GenerationOptions {
        prompt: "a blue square".into(),
        ..a.clone()
    };
    let na = NoiseRng::seed(1).normal([1, 4, 16, 16], &device).unwrap();
    let nb = NoiseRng::seed(2).normal([1, 4, 16, 16], &device).unwrap();
    let frames = sd
        .interpolate(
            stable_diffusion::pipelines::Endpoints {
                a: &a,
                b: &b,
                noise_a: na.clone(),
                noise_b: nb.clone(),
            },
            4,
            &mut NoiseRng::seed(0),
            None,
        )
        .unwrap();
    assert_eq!(frames.len(), 4);
    let plain = |o: &GenerationOptions, n: &Tensor<4>| {
        let o = GenerationOptions {
            init_latents: Some(n.clone()),
            ..o.clone()
        };
        sd.txt2img(&o, &mut NoiseRng::seed(0), None)
            .unwrap()
            .latents
            .to_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let first = frames[0].latents.to_data().try_to_vec::<f32>().unwrap();
    let last = frames[3].latents.to_data().try_to_vec::<f32>().unwrap();
    assert_eq!(first, plain(&a, &na));
    assert_eq!(last, plain(&b, &nb));
    let mid = frames[1].latents.to_data().try_to_vec::<f32>().unwrap();
    assert_ne!(mid, first);
    // slerp keeps the noise norm (unlike lerp, which shrinks it).
    let s = stable_diffusion::pipelines::slerp(na.clone(), nb.clone(), 0.5);
    let norm = |t: &Tensor<4>| (t.clone() * t.clone()).sum().into_scalar::<f32>().sqrt();
    assert!(
        (norm(&s) / norm(&na) - 1.0).abs() < 0.05,
        "{} vs {}",
        norm(&s),
        norm(&na)
    );
}

#[test]
fn wrong_inputs_are_errors_not_panics() {
    let device = Device::flex();
    let m = models(&device);
    let scheduler = base_scheduler("ddim");
    let sd = tiny_sd(&m, &scheduler, &device, true);
    let image = Tensor::<4>::zeros([1, 3, 32, 32], &device);
    let o = GenerationOptions {
        steps: Steps::Count(2),
        ..Default::default()
    };
    let err = sd
        .inpaint(
            &o,
            image.clone(),
            Tensor::zeros([1, 1, 16, 32], &device),
            1.0,
            &mut NoiseRng::seed(0),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let err = sd
            .inpaint(
                &o,
                image.clone(),
                Tensor::zeros([1, 1, 32, 32], &device),
                strength,
                &mut NoiseRng::seed(0),
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains("strength"), "{strength}: {err}");
    }
    // A 9-channel U-Net cannot do txt2img.
    let err = sd.txt2img(&o, &mut NoiseRng::seed(0), None).unwrap_err();
    assert!(err.to_string().contains("9"), "{err}");
    // A recording that runs out is an error.
    let plain = tiny_sd(&m, &scheduler, &device, false);
    let err = plain
        .txt2img(
            &GenerationOptions {
                width: 32,
                height: 32,
                ..o.clone()
            },
            &mut RecordedNoise::new(Vec::new()),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("noise"), "{err}");
}
