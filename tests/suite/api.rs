//! The owning pipeline through the public API only (`stable_diffusion::prelude`), and
//! the misuses that must come back as errors, not panics or wrong pictures.

use crate::common::fixture;

use stable_diffusion::burn::tensor::DType;
use stable_diffusion::core::CoreError;
use stable_diffusion::image;
use stable_diffusion::io::image::{fit_size, image_to_tensor, read_image, read_parameters};
use stable_diffusion::prelude::*;

fn tiny(device: &Device) -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), device, &LoadOptions::default())
        .unwrap()
}

fn request(prompt: &str) -> GenerationRequest<'static> {
    GenerationRequest::new(prompt).size(32, 32).steps(3).seed(5)
}

fn values(t: &Tensor<4>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn from_pretrained_folder_and_single_file_generate_the_same() {
    let device = Device::flex();
    let folder = tiny(&device);
    assert_eq!(folder.family(), ModelFamily::Sd1);
    // sample_size 16 x the tiny VAE's factor 2.
    assert_eq!(folder.default_size(), 32);
    assert!(!folder.is_inpainting());
    // The single file carries the tiny architecture, not SD 1.5's: recognised as
    // SD 1.x, it does not fit the built-in configs, and the error lists the keys.
    let err = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15.safetensors"),
        &device,
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("shape"), "{err}");
    let with_configs = LoadOptions {
        config: Some(fixture("tiny-sd15")),
        ..Default::default()
    };
    let file = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15.safetensors"),
        &device,
        &with_configs,
    )
    .unwrap();
    let a = folder.generate(request("a red fox")).unwrap();
    let b = file.generate(request("a red fox")).unwrap();
    assert_eq!(a.images.len(), 1);
    let d = values(&a.latents)
        .iter()
        .zip(values(&b.latents))
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-4, "folder vs single file: {d}");
    let p = &a.images[0].parameters;
    assert_eq!((p.seed, p.steps, p.width, p.height), (5, 3, 32, 32));
    assert_eq!(p.model, "tiny-sd15");
}

#[test]
fn batch_image_i_is_the_single_image_of_seed_plus_i() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let batch = pipe.generate(request("a cat").num_images(2)).unwrap();
    assert_eq!(batch.images.len(), 2);
    assert_eq!(batch.latents.dims(), [2, 4, 16, 16]);
    assert_eq!(batch.images[1].parameters.seed, 6);
    let single = pipe.generate(request("a cat").seed(6)).unwrap();
    let d = values(&batch.latents)[4 * 16 * 16..]
        .iter()
        .zip(values(&single.latents))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d < 1e-4, "batch item 1 vs seed 6: {d}");
}

#[test]
fn saved_png_carries_the_parameters() {
    let device = Device::flex();
    let out = tiny(&device)
        .generate(request("café ünïcode").negative_prompt("blur"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    out.images[0].save(&path).unwrap();
    let back = read_parameters(&path).unwrap().unwrap();
    assert_eq!(back.prompt, "café ünïcode");
    assert_eq!(back, out.images[0].parameters);
}

#[test]
fn callback_sees_every_step_previews_and_cancels() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let mut seen = Vec::new();
    let out = pipe.generate(request("a dog").on_step(|s| {
        assert_eq!(s.preview().dims(), [1, 3, 16, 16]);
        seen.push((s.step, s.total));
        true
    }));
    assert!(out.is_ok());
    assert_eq!(
        seen.len(),
        4,
        "PNDM runs one more step than asked: {seen:?}"
    );
    let err = pipe
        .generate(request("a dog").on_step(|s| s.step < 1))
        .unwrap_err();
    assert!(
        matches!(err, PipelineError::Core(CoreError::Cancelled(1))),
        "{err}"
    );
}

#[test]
fn img2img_inpaint_and_outpaint_from_images() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let image = image::RgbImage::from_fn(32, 24, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 10) as u8, 90])
    });
    let out = pipe
        .generate(request("a house").init_image(image.clone(), 0.5))
        .unwrap();
    assert_eq!(out.images[0].image.dimensions(), (32, 24));
    let mask =
        image::GrayImage::from_fn(32, 24, |x, _| image::Luma([if x > 16 { 255 } else { 0 }]));
    let out = pipe
        .generate(request("a house").init_image(image.clone(), 1.0).mask(mask))
        .unwrap();
    assert_eq!(out.images[0].image.dimensions(), (32, 24));
    let extend = Extend {
        right: 8,
        ..Default::default()
    };
    let out = pipe
        .generate(request("a house").outpaint(image.clone(), extend, 4))
        .unwrap();
    assert_eq!(out.images[0].image.dimensions(), (40, 24));
    // Original pixels far from the seam come back unchanged.
    assert_eq!(out.images[0].image.get_pixel(0, 0), image.get_pixel(0, 0));
}

#[test]
fn input_sizes_not_multiples_of_8_are_refused_unless_asked() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let odd = image::RgbImage::from_pixel(30, 21, image::Rgb([200, 10, 10]));
    let err = pipe
        .generate(request("x").init_image(odd.clone(), 0.5))
        .unwrap_err();
    assert!(err.to_string().contains("multiples of 8"), "{err}");
    let resized = pipe
        .generate(
            request("x")
                .init_image(odd.clone(), 0.5)
                .size_mode(SizeMode::Resize),
        )
        .unwrap();
    assert_eq!(resized.images[0].image.dimensions(), (32, 24));
    let cropped = pipe
        .generate(request("x").init_image(odd, 0.5).size_mode(SizeMode::Crop))
        .unwrap();
    assert_eq!(cropped.images[0].image.dimensions(), (24, 16));
}

#[test]
fn images_of_every_colour_type_and_format_are_read() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let rgb = image::RgbImage::from_pixel(16, 8, image::Rgb([255, 0, 0]));
    let cases: Vec<(&str, image::DynamicImage)> = vec![
        ("rgb.png", rgb.clone().into()),
        (
            "rgba.png",
            image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
                16,
                8,
                image::Rgba([255, 0, 0, 10]),
            )),
        ),
        (
            "grey.png",
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
                16,
                8,
                image::Luma([255]),
            )),
        ),
        (
            "deep.png",
            image::DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
                16,
                8,
                image::Rgb([65535u16, 0, 0]),
            )),
        ),
        ("photo.jpg", rgb.clone().into()),
        ("photo.webp", rgb.into()),
    ];
    for (name, img) in cases {
        let path = dir.path().join(name);
        img.save(&path).unwrap();
        let back = read_image(&path).unwrap();
        let t = image_to_tensor(&back, &device);
        assert_eq!(t.dims(), [1, 3, 8, 16], "{name}");
        let v = values(&t);
        let red = v[0];
        assert!(red > 0.95, "{name}: red channel {red}");
        if name != "grey.png" {
            assert!(v[8 * 16] < -0.9, "{name}: green channel {}", v[8 * 16]);
        }
    }
    let err = read_image(dir.path().join("missing.png")).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
    let odd = image::DynamicImage::ImageRgb8(image::RgbImage::new(7, 7));
    assert!(fit_size(odd.clone(), 8, SizeMode::Exact).is_err());
    assert!(fit_size(odd, 8, SizeMode::Crop).is_err());
}

#[test]
fn bad_requests_are_errors() {
    let device = Device::flex();
    let pipe = tiny(&device);
    for g in [f64::NAN, f64::INFINITY] {
        let err = pipe.generate(request("x").guidance(g)).unwrap_err();
        assert!(err.to_string().contains("guidance"), "{g}: {err}");
    }
    let err = pipe.generate(request("x").size(30, 32)).unwrap_err();
    assert!(err.to_string().contains("width"), "{err}");
    let err = pipe.generate(request("x").num_images(0)).unwrap_err();
    assert!(err.to_string().contains("num_images"), "{err}");
    let err = pipe.generate(request("x").steps(0)).unwrap_err();
    assert!(err.to_string().contains("steps"), "{err}");
    let err = pipe.generate(request("x").clip_skip(5)).unwrap_err();
    assert!(err.to_string().contains("clip_skip"), "{err}");
    let mask = image::GrayImage::new(32, 32);
    let err = pipe.generate(request("x").mask(mask)).unwrap_err();
    assert!(err.to_string().contains("init image"), "{err}");
    let err = pipe.generate(request("x").scheduler("dpm2")).unwrap_err();
    assert!(err.to_string().contains("unknown scheduler"), "{err}");
    // Flow Heun is SD 3's: an SD 1.5 model refuses it by name.
    let err = pipe.generate(request("x").scheduler("heun")).unwrap_err();
    assert!(err.to_string().contains("does not apply"), "{err}");
    let err = pipe
        .generate(request("x").scheduler("euler").eta(0.5))
        .unwrap_err();
    assert!(err.to_string().contains("ddim"), "{err}");
    assert!(
        pipe.generate(request("x").scheduler("ddim").eta(0.5))
            .is_ok()
    );
    let err = pipe
        .generate(
            request("x")
                .scheduler("pndm")
                .sigma_schedule(SigmaSchedule::AlignYourSteps(AysPreset::Sd15)),
        )
        .unwrap_err();
    assert!(err.to_string().contains("dpmpp-2m"), "{err}");
}

#[test]
fn a_request_too_large_for_memory_is_refused_before_allocating() {
    if stable_diffusion::pipelines::memory::available_bytes().is_none() {
        return;
    }
    let device = Device::flex();
    let pipe = tiny(&device);
    let err = pipe
        .generate(GenerationRequest::new("x").size(16384, 16384).steps(1))
        .unwrap_err();
    match err {
        PipelineError::OutOfMemory {
            needed_bytes,
            available_bytes,
            ..
        } => assert!(needed_bytes > available_bytes),
        other => panic!("expected OutOfMemory, got {other}"),
    }
}

#[test]
fn a_missing_source_is_an_error() {
    let device = Device::flex();
    // `owner/name` reads as a hub repository: offline, over an empty cache, so that
    // no test reaches the internet.
    let cache = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        hub: stable_diffusion::pipelines::HubOptions {
            cache_dir: Some(cache.path().to_path_buf()),
            offline: Some(true),
            ..Default::default()
        },
        ..Default::default()
    };
    for source in ["no/such-model", "no-such-folder", "weights/x.safetensors"] {
        let err = StableDiffusionPipeline::from_pretrained(source, &device, &options)
            .err()
            .unwrap();
        assert!(err.to_string().contains(source), "{source}: {err}");
    }
}

#[test]
fn component_misuse_is_an_error() {
    let device = Device::flex();
    let pipe = tiny(&device);
    // More ids than positions; a clip skip past the layers.
    let ids = Tensor::<2, Int>::zeros([1, 78], &device);
    let err = pipe
        .text_encoder()
        .unwrap()
        .encode(ids, HiddenLayer::Last)
        .unwrap_err();
    assert!(matches!(err, CoreError::Shape { .. }), "{err}");
    let ids = Tensor::<2, Int>::zeros([1, 77], &device);
    let err = pipe
        .text_encoder()
        .unwrap()
        .encode(ids, HiddenLayer::Skip(5))
        .unwrap_err();
    assert!(err.to_string().contains("clip_skip"), "{err}");
    // U-Net channels, timesteps against the batch, conditioning width.
    let unet = pipe.unet().unwrap();
    let ctx = Tensor::<3>::zeros([1, 77, 32], &device);
    let x = Tensor::<4>::zeros([1, 3, 4, 4], &device);
    let t = Tensor::<1>::zeros([1], &device);
    assert!(Denoiser::forward(unet, x, t.clone(), ctx.clone()).is_err());
    let x = Tensor::<4>::zeros([1, 4, 4, 4], &device);
    let t2 = Tensor::<1>::zeros([2], &device);
    let err = Denoiser::forward(unet, x.clone(), t2, ctx.clone()).unwrap_err();
    assert!(err.to_string().contains("timesteps"), "{err}");
    let wide = Tensor::<3>::zeros([1, 77, 48], &device);
    assert!(Denoiser::forward(unet, x.clone(), t.clone(), wide).is_err());
    assert!(Denoiser::forward(unet, x.clone(), t.clone(), ctx.clone()).is_ok());
    // The methods a user reaches by default are the checked ones (the trait's).
    let t2 = Tensor::<1>::zeros([2], &device);
    let err = unet.forward(x.clone(), t2, ctx.clone()).unwrap_err();
    assert!(err.to_string().contains("timesteps"), "{err}");
    let three = Tensor::<4>::zeros([1, 3, 4, 4], &device);
    assert!(unet.forward(three, t.clone(), ctx.clone()).is_err());
    assert_eq!(unet.forward(x, t, ctx).unwrap().dims(), [1, 4, 4, 4]);
    let te = pipe.text_encoder().unwrap();
    let err = te
        .forward(Tensor::<2, Int>::zeros([1, 78], &device), HiddenLayer::Last)
        .unwrap_err();
    assert!(matches!(err, CoreError::Shape { .. }), "{err}");
    // VAE sizes not multiples of the factor; latents with other channels.
    let vae = pipe.vae();
    let err = vae
        .encode(Tensor::<4>::zeros([1, 3, 13, 16], &device))
        .unwrap_err();
    assert!(err.to_string().contains("multiples"), "{err}");
    assert!(
        vae.decode(Tensor::<4>::zeros([1, 3, 2, 2], &device))
            .is_err()
    );
}

#[test]
fn scheduler_indices_past_the_end_are_errors() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let config = pipe.scheduler_config().clone();
    let x = Tensor::<4>::zeros([1, 4, 2, 2], &device);
    for name in ["ddim", "euler", "euler-a", "dpmpp-2m", "lms", "pndm"] {
        let s = AnyScheduler::from_name(name, &config).unwrap();
        let mut run = s.start(&Steps::Count(4)).unwrap();
        let n = run.len();
        let past = |e: CoreError| matches!(e, CoreError::StepOutOfRange { .. });
        assert!(past(run.timestep(n).unwrap_err()), "{name}");
        assert!(
            past(run.scale_model_input(x.clone(), n).unwrap_err()),
            "{name}"
        );
        assert!(
            past(run.add_noise(x.clone(), x.clone(), n).unwrap_err()),
            "{name}"
        );
        let mut noise = NoiseRng::seed(0);
        assert!(
            past(run.step(x.clone(), n, x.clone(), &mut noise).unwrap_err()),
            "{name}"
        );
        let other = Tensor::<4>::zeros([1, 4, 2, 3], &device);
        assert!(run.step(other, 0, x.clone(), &mut noise).is_err(), "{name}");
    }
}

/// Half-precision weights for every component on the CPU: the linear and convolution
/// weights are stored f16 (the VAE's too, though its config asks diffusers for the
/// f32 upcast: on the CPU it computes in f32) and the picture stays the f32 one's.
#[test]
fn half_precision_weights_on_the_cpu_keep_the_picture() {
    use stable_diffusion::models::parameter_bytes;
    let device = Device::flex();
    let options = LoadOptions {
        unet_dtype: Some(DType::F16),
        text_encoder_dtype: Some(DType::F16),
        vae_dtype: Some(DType::F16),
        ..Default::default()
    };
    let half =
        StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), &device, &options).unwrap();
    let full = tiny(&device);
    let encoder =
        |p: &StableDiffusionPipeline| parameter_bytes(p.text_encoders().text_encoder().unwrap());
    // The tiny text encoder is mostly its (f32) token embeddings.
    let (h, f) = (encoder(&half), encoder(&full));
    assert!(h < f, "text encoder: {h} bytes in f16, {f} in f32");
    let (h, f) = (parameter_bytes(half.vae()), parameter_bytes(full.vae()));
    assert!(h * 10 < f * 7, "VAE: {h} bytes in f16, {f} in f32");
    let picture = |p: &StableDiffusionPipeline| p.generate(request("a boat")).unwrap().images;
    let (h, f) = (picture(&half), picture(&full));
    assert_eq!(h[0].image.dimensions(), (32, 32));
    let psnr = stable_diffusion::io::image::psnr(h[0].image.as_raw(), f[0].image.as_raw());
    assert!(psnr.is_none_or(|db| db > 35.0), "{psnr:?} dB");
}

#[test]
fn lcm_runs_in_four_steps_by_name() {
    let device = Device::flex();
    let pipe = tiny(&device);
    let mut timesteps = Vec::new();
    let out = pipe
        .generate(
            request("a fox")
                .scheduler("lcm")
                .steps(4)
                .guidance(1.0)
                .on_step(|s| {
                    timesteps.push(s.timestep);
                    true
                }),
        )
        .unwrap();
    assert_eq!(timesteps, [999.0, 759.0, 499.0, 259.0]);
    assert_eq!(out.images[0].parameters.sampler, "LCM");
    // More steps than the distillation grid has is an error, not a panic.
    let err = pipe
        .generate(request("a fox").scheduler("lcm").steps(51))
        .unwrap_err();
    assert!(
        err.to_string().contains("original_inference_steps"),
        "{err}"
    );
}
