//! The ways to a picture sooner through the owning pipeline: the tiny autoencoder as
//! preview and final decoder, and the hires fix.

use crate::common::{Case, fixture, values};

use stable_diffusion::core::CoreError;
use stable_diffusion::prelude::*;

fn tiny_with_taesd(device: &Device) -> StableDiffusionPipeline {
    let options = LoadOptions {
        tiny_vae: Some(fixture("tiny-taesd")),
        ..Default::default()
    };
    StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), device, &options).unwrap()
}

fn request(prompt: &str) -> GenerationRequest<'static> {
    GenerationRequest::new(prompt)
        .size(32, 32)
        .steps(3)
        .seed(11)
}

#[test]
fn the_tiny_autoencoder_decodes_previews_and_on_request_the_picture() {
    let device = Device::flex();
    let pipe = tiny_with_taesd(&device);
    let taesd = pipe.tiny_vae().unwrap();
    let mut previews = 0;
    let mut last_preview = None;
    let out = pipe
        .generate(request("a fox").tiny_decoder(true).on_step(|s| {
            assert!(s.has_preview_decoder());
            // Full size, not the cheap preview's latent size.
            let p = s.preview();
            assert_eq!(p.dims(), [1, 3, 32, 32]);
            assert_eq!(s.cheap_preview().dims(), [1, 3, 16, 16]);
            last_preview = Some(p);
            previews += 1;
            true
        }))
        .unwrap();
    assert_eq!(previews, 4);
    // The picture is TAESD's decode of the final latents (scaling factor 1), which
    // is also the last preview.
    let decoded = (taesd.decode(out.latents.clone()).unwrap() / 2.0 + 0.5).clamp(0.0, 1.0);
    let expected: Vec<u8> = values(&decoded.clone().permute([0, 2, 3, 1]))
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    let got = out.images[0].image.as_raw();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "tiny-decoded picture differs by {worst}");
    let last = values(&last_preview.unwrap());
    let dec = values(&decoded);
    assert!(last.iter().zip(&dec).all(|(a, b)| (a - b).abs() < 1e-6));
    // The same request with the VAE gives the same latents, another picture.
    let full = pipe.generate(request("a fox")).unwrap();
    assert_eq!(values(&full.latents), values(&out.latents));
    assert_ne!(full.images[0].image.as_raw(), got);
    // Latents to pictures without composing by hand: the same two pictures.
    let tiny = pipe.decode_latents(out.latents.clone(), true).unwrap();
    assert_eq!(tiny[0].as_raw(), got);
    let vae = pipe.decode_latents(out.latents, false).unwrap();
    assert_eq!(vae[0].as_raw(), full.images[0].image.as_raw());
}

#[test]
fn tiny_decoder_without_a_tiny_autoencoder_is_an_error() {
    let device = Device::flex();
    let mut pipe = tiny_with_taesd(&device);
    pipe.set_tiny_vae(None).unwrap();
    let err = pipe
        .generate(request("a fox").tiny_decoder(true))
        .unwrap_err();
    assert!(err.to_string().contains("tiny autoencoder"), "{err}");
    let latents = Tensor::<4>::zeros([1, 4, 4, 4], &device);
    let err = pipe.decode_latents(latents, true).unwrap_err();
    assert!(err.to_string().contains("tiny autoencoder"), "{err}");
    // Previews fall back to the cheap one.
    pipe.generate(request("a fox").on_step(|s| {
        assert!(!s.has_preview_decoder());
        assert_eq!(s.preview().dims(), [1, 3, 16, 16]);
        true
    }))
    .unwrap();
}

#[test]
fn hires_fix_doubles_the_size_in_two_passes() {
    let device = Device::flex();
    let pipe = tiny_with_taesd(&device);
    for upscaler in [
        HiresUpscaler::Latent,
        HiresUpscaler::LatentNearest,
        HiresUpscaler::LatentBicubic,
        HiresUpscaler::Lanczos,
    ] {
        let mut passes: Vec<(usize, usize, [usize; 4])> = Vec::new();
        let hires = HiresFix {
            scale: 2.0,
            strength: 0.5,
            steps: Some(4),
            upscaler,
        };
        let out = pipe
            .generate(
                request("a fox")
                    .scheduler("euler")
                    .hires_fix(hires)
                    .on_step(|s| {
                        passes.push((s.step, s.total, s.latents.dims()));
                        true
                    }),
            )
            .unwrap();
        assert_eq!(out.images[0].image.dimensions(), (64, 64), "{upscaler:?}");
        assert_eq!(out.latents.dims(), [1, 4, 32, 32]);
        // 3 steps at 32x32, then the last 2 of 4 at 64x64 (strength 0.5).
        let small = passes.iter().filter(|p| p.2 == [1, 4, 16, 16]).count();
        let large: Vec<_> = passes.iter().filter(|p| p.2 == [1, 4, 32, 32]).collect();
        assert_eq!(small, 3, "{upscaler:?}: {passes:?}");
        assert_eq!(large.len(), 2, "{upscaler:?}: {passes:?}");
        assert_eq!((large[0].0, large[0].1), (2, 4));
        let again = pipe
            .generate(request("a fox").scheduler("euler").hires_fix(hires))
            .unwrap();
        assert_eq!(again.images[0].image, out.images[0].image, "reproducible");
    }
}

#[test]
fn hires_fix_misuse_is_an_error() {
    let device = Device::flex();
    let pipe = tiny_with_taesd(&device);
    let bad_scale = HiresFix {
        scale: 0.5,
        ..Default::default()
    };
    let err = pipe
        .validate(&request("x").hires_fix(bad_scale))
        .unwrap_err();
    assert!(err.to_string().contains("hires scale"), "{err}");
    let no_step = HiresFix {
        strength: 0.01,
        steps: Some(3),
        ..Default::default()
    };
    let err = pipe.validate(&request("x").hires_fix(no_step)).unwrap_err();
    assert!(err.to_string().contains("no step"), "{err}");
    let image = Tensor::<4>::zeros([1, 3, 32, 32], &device);
    let err = pipe
        .validate(
            &request("x")
                .init_image(image, 0.5)
                .hires_fix(HiresFix::default()),
        )
        .unwrap_err();
    assert!(err.to_string().contains("text-to-image"), "{err}");
    // A target too large for memory is refused before the first pass.
    let huge = HiresFix {
        scale: 400.0,
        ..Default::default()
    };
    let err = pipe
        .generate(
            GenerationRequest::new("x")
                .size(160, 160)
                .steps(4)
                .hires_fix(huge),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            PipelineError::OutOfMemory { .. }
                | PipelineError::Core(CoreError::InvalidArgument { .. })
        ),
        "{err}"
    );
}

/// A pipeline case of `reference/index_fast.json` (made by
/// `tests/fixtures/gen/ref_fast_sampling.py`).
fn fast_case(name: &str) -> Case {
    Case::open("index_fast.json", &format!("pipelines_fast/{name}"))
}

/// Runs a fast case through the owning pipeline with its recorded noise, the request
/// changed by `request`; returns the final latents' largest difference relative to
/// their largest magnitude.
fn run_fast_case(
    pipe: &StableDiffusionPipeline,
    name: &str,
    request: impl FnOnce(GenerationRequest<'static>) -> GenerationRequest<'static>,
) -> f32 {
    let case = fast_case(name);
    let d = case.latents_error(&case.generate(pipe, request).latents);
    eprintln!("{name}: final latents max diff {d:.3e} of their scale");
    d
}

#[test]
fn lcm_lora_in_four_steps_matches_diffusers_in_both_layouts() {
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    for file in ["lcm_lora_kohya.safetensors", "lcm_lora_peft.safetensors"] {
        let lora = fixture(&format!("lora/{file}"));
        let d = run_fast_case(&pipe, "lcm_lora_lcm4", |r| r.lora(lora.clone(), 1.0));
        assert!(d < 1e-3, "{file}: LCM-LoRA 4-step latents differ by {d}");
        let d = run_fast_case(&pipe, "lcm_lora_tcd4", |r| {
            r.lora(lora.clone(), 1.0).eta(0.3)
        });
        assert!(d < 1e-3, "{file}: TCD 4-step latents differ by {d}");
    }
    // Without the LoRA the run is another one.
    let d = run_fast_case(&pipe, "lcm_lora_lcm4", |r| r);
    assert!(d > 1e-2, "the LoRA changes the result ({d})");
}

#[test]
fn guidance_embedding_lcm_unet_matches_diffusers() {
    let device = Device::flex();
    let r = fast_case("w_embedding").r;
    let w = r.tensor::<1>("w", &device);
    let emb = stable_diffusion::models::embeddings::guidance_scale_embedding(w, 32);
    crate::common::assert_close("w embedding", &emb, &r.floats("embedding"), 1e-5);

    let options = LoadOptions {
        unet: Some(fixture("tiny-lcm-unet")),
        ..Default::default()
    };
    let pipe =
        StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), &device, &options).unwrap();
    assert_eq!(pipe.unet().unwrap().time_cond_proj_dim(), Some(32));
    // Guidance 8 is embedded: one U-Net pass per step, no negative prompt batch.
    let d = run_fast_case(&pipe, "lcm_unet_w8", |r| r);
    assert!(d < 1e-3, "guidance-embedding LCM latents differ by {d}");
    // Another scale is another picture.
    let d = run_fast_case(&pipe, "lcm_unet_w8", |r| r.guidance(2.0));
    assert!(d > 1e-3, "the embedded scale matters ({d})");
}

#[test]
fn sdxl_lcm_lora_in_four_steps_matches_diffusers() {
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    for file in [
        "lcm_lora_sdxl_kohya.safetensors",
        "lcm_lora_sdxl_peft.safetensors",
    ] {
        let lora = fixture(&format!("lora/{file}"));
        let d = run_fast_case(&pipe, "sdxl_lcm_lora_lcm4", |r| r.lora(lora.clone(), 1.0));
        assert!(
            d < 1e-3,
            "{file}: SDXL LCM-LoRA 4-step latents differ by {d}"
        );
    }
}

/// An SDXL LoRA as kohya's sd-scripts writes it: U-Net layers in the original naming
/// (`lora_unet_input_blocks_4_1_...`) and both text encoders (`lora_te1_`,
/// `lora_te2_`), with classifier-free guidance so both encoders' LoRAs matter.
#[test]
fn sdxl_kohya_lora_with_both_text_encoders_matches_diffusers() {
    let device = Device::flex();
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let lora = fixture("lora/sdxl_kohya_lora.safetensors");
    let file = stable_diffusion::io::LoraFile::open(&lora).unwrap();
    use stable_diffusion::io::LoraComponent;
    assert!(file.has(LoraComponent::TextEncoder) && file.has(LoraComponent::TextEncoder2));
    let neg = |r: GenerationRequest<'static>| r.negative_prompt("blurry");
    let d = run_fast_case(&pipe, "sdxl_kohya_lora_euler4", |r| {
        neg(r).lora(lora.clone(), 1.0)
    });
    assert!(d < 1e-3, "SDXL kohya LoRA latents differ by {d}");
    let d = run_fast_case(&pipe, "sdxl_kohya_lora_euler4", neg);
    assert!(d > 1e-3, "the LoRA changes the result ({d})");
    // Merged at load, the same.
    let options = LoadOptions {
        loras: vec![LoraSpec {
            path: lora.clone(),
            strength: 1.0,
        }],
        ..Default::default()
    };
    let merged =
        StableDiffusionPipeline::from_pretrained(fixture("tiny-sdxl"), &device, &options).unwrap();
    let d = run_fast_case(&merged, "sdxl_kohya_lora_euler4", neg);
    assert!(d < 1e-3, "merged at load: {d}");
    // A second-encoder LoRA on an SD 1.5 model is a clear error.
    let sd15 = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let err = sd15
        .generate(
            GenerationRequest::new("x")
                .size(32, 32)
                .steps(1)
                .lora(lora, 1.0),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("lora") || err.to_string().contains("LoRA"),
        "{err}"
    );
}
