//! ControlNet against diffusers (fixtures README §8b): the model's residuals at two
//! scales and in guess mode, the U-Net fed them, and every ControlNet pipeline case
//! (txt2img, start/end, guess mode, two ControlNets, img2img) through the borrowed
//! and the owning pipelines with the recorded noise. Tolerances: residuals 1e-4
//! (CPU) / 2e-3 (GPU); pipelines as the SD 1.5 ones.

use crate::common;

use common::{Case, LoadedPipeline, Reference, assert_close, devices, fixture, read_index, tol};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{AddedConditioning, ControlNet, ControlSignals, Denoiser};
use stable_diffusion::io::ComponentOptions;
use stable_diffusion::io::controlnet::{controlnet_from_dir, controlnet_from_path};
use stable_diffusion::io::image::{control_image_to_tensor, read_image};
use stable_diffusion::models::ControlNetModel;
use stable_diffusion::pipelines::ControlNetUnit;
use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};

fn controlnet(name: &str, device: &Device) -> ControlNetModel {
    controlnet_from_dir(&fixture(name), device, &ComponentOptions::default()).unwrap()
}

fn index() -> serde_json::Value {
    read_index("index_controlnet.json")
}

/// The reference inputs: sample, timesteps, prompt embeddings, control images.
fn inputs(r: &Reference, device: &Device) -> (Tensor<4>, Tensor<1>, Tensor<3>, Tensor<4>) {
    let sample = r.tensor::<4>("sample", device);
    let b = sample.dims()[0];
    let t = Tensor::<1>::full([b], 500.0, device);
    (
        sample,
        t,
        r.tensor::<3>("encoder_hidden_states", device),
        r.tensor::<4>("controlnet_cond", device),
    )
}

fn check_residuals(
    what: &str,
    out: &stable_diffusion::core::ControlResiduals,
    r: &Reference,
    prefix: &str,
    t: f32,
) {
    assert_eq!(out.down_block_res_samples.len(), 9);
    for (j, d) in out.down_block_res_samples.iter().enumerate() {
        let key = format!("{prefix}.down_{j}");
        assert_close(&format!("{what} {key}"), d, &r.floats(&key), t);
    }
    let key = format!("{prefix}.mid");
    assert_close(
        &format!("{what} {key}"),
        &out.mid_block_res_sample,
        &r.floats(&key),
        t,
    );
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let r = Reference::open("reference/controlnet/controlnet.safetensors");
    for (name, device) in devices() {
        let net = controlnet("tiny-controlnet", &device);
        let t = tol(name, 1e-4, 2e-3);
        let (sample, ts, ctx, cond) = inputs(&r, &device);
        let none = AddedConditioning::default();
        let mut seen = Vec::new();
        let out = net.forward_with_intermediates(
            sample.clone(),
            ts.clone(),
            ctx.clone(),
            cond.clone(),
            1.0,
            false,
            &none,
            |k, x| {
                let key = format!("intermediate.{k}");
                if r.has(&key) {
                    assert_close(&format!("[{name}] {key}"), x, &r.floats(&key), t);
                    seen.push(key);
                }
            },
        );
        assert_eq!(seen.len(), 3, "{seen:?}");
        check_residuals(&format!("[{name}]"), &out, &r, "scale1.0", t);
        for (scale, guess, prefix) in [(0.5, false, "scale0.5"), (1.0, true, "guess_mode")] {
            let out = ControlNet::forward(
                &net,
                sample.clone(),
                ts.clone(),
                ctx.clone(),
                cond.clone(),
                scale,
                guess,
                &none,
            )
            .unwrap();
            check_residuals(&format!("[{name}]"), &out, &r, prefix, t);
        }

        // The U-Net with and without the residuals.
        let unet = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sd15"))
            .unwrap()
            .unet(&device, &ComponentOptions::default())
            .unwrap();
        let control = ControlSignals {
            down_block_additional_residuals: Some(out_of(&out).0),
            mid_block_additional_residual: Some(out_of(&out).1),
            ..Default::default()
        };
        let with = unet
            .forward_controlled(
                sample.clone(),
                ts.clone(),
                ctx.clone(),
                &AddedConditioning::default(),
                &control,
            )
            .unwrap();
        assert_close(
            &format!("[{name}] unet_out_with_control"),
            &with,
            &r.floats("unet_out_with_control"),
            t,
        );
        let without = Denoiser::forward(&unet, sample, ts, ctx).unwrap();
        assert_close(
            &format!("[{name}] unet_out_without_control"),
            &without,
            &r.floats("unet_out_without_control"),
            t,
        );
    }
}

fn out_of(o: &stable_diffusion::core::ControlResiduals) -> (Vec<Tensor<4>>, Tensor<4>) {
    (
        o.down_block_res_samples.clone(),
        o.mid_block_res_sample.clone(),
    )
}

#[test]
fn residuals_that_do_not_fit_are_errors() {
    let device = Device::flex();
    let r = Reference::open("reference/controlnet/controlnet.safetensors");
    let net = controlnet("tiny-controlnet", &device);
    let (sample, ts, ctx, cond) = inputs(&r, &device);
    let none = AddedConditioning::default();
    // A control image at latent size, not image size.
    let small = cond.clone().narrow(2, 0, 16).narrow(3, 0, 16);
    let err = ControlNet::forward(
        &net,
        sample.clone(),
        ts.clone(),
        ctx.clone(),
        small,
        1.0,
        false,
        &none,
    )
    .unwrap_err();
    assert!(err.to_string().contains("controlnet_cond"), "{err}");
    let out = ControlNet::forward(
        &net,
        sample.clone(),
        ts.clone(),
        ctx.clone(),
        cond,
        1.0,
        false,
        &none,
    )
    .unwrap();
    let unet = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sd15"))
        .unwrap()
        .unet(&device, &ComponentOptions::default())
        .unwrap();
    let mut fewer = out.down_block_res_samples.clone();
    fewer.pop();
    let control = ControlSignals {
        down_block_additional_residuals: Some(fewer),
        ..Default::default()
    };
    let err = unet
        .forward_controlled(
            sample.clone(),
            ts.clone(),
            ctx.clone(),
            &AddedConditioning::default(),
            &control,
        )
        .unwrap_err();
    assert!(err.to_string().contains("8 residuals for 9"), "{err}");
    let control = ControlSignals {
        mid_block_additional_residual: Some(out.down_block_res_samples[0].clone()),
        ..Default::default()
    };
    let err = unet
        .forward_controlled(sample, ts, ctx, &AddedConditioning::default(), &control)
        .unwrap_err();
    assert!(err.to_string().contains("mid_block"), "{err}");
}

/// A case's control images, read from the PNGs as the pipeline does, checked
/// against diffusers' preprocessing.
fn control_images(r: &Reference, case: &serde_json::Value, device: &Device) -> Vec<Tensor<4>> {
    let pngs: Vec<String> = match &case["params"]["control_png"] {
        serde_json::Value::String(s) => vec![s.clone()],
        v => v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
    };
    let n = pngs.len();
    pngs.iter()
        .enumerate()
        .map(|(k, png)| {
            let image = read_image(fixture(&format!("reference/{png}"))).unwrap();
            let t = control_image_to_tensor(&image, 32, 32, device);
            let key = if n == 1 {
                "control_image_preprocessed".to_string()
            } else {
                format!("control_image_preprocessed_{k}")
            };
            assert_close(&format!("{png} {key}"), &t, &r.floats(&key), 1e-6);
            t
        })
        .collect()
}

fn scales(call: &serde_json::Value, n: usize) -> Vec<f64> {
    match &call["controlnet_conditioning_scale"] {
        serde_json::Value::Array(a) => a.iter().map(|s| s.as_f64().unwrap()).collect(),
        s => vec![s.as_f64().unwrap(); n],
    }
}

/// Every ControlNet pipeline case through the borrowed pipeline.
#[test]
fn controlnet_pipeline_cases_match_diffusers() {
    let device = Device::flex();
    let index = index();
    let nets: Vec<ControlNetModel> = index["models"]["controlnet"]["controlnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| controlnet(n.as_str().unwrap(), &device))
        .collect();
    let models = LoadedPipeline::open(fixture("tiny-sd15"), &device);
    let cases = Case::all("index_controlnet.json", "controlnet/pipelines/");
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let (name, r) = (&case.name, &case.r);
        let params = case.params();
        let call = case.call();
        let config = SchedulerConfig::from_json(&case.scheduler_config()).unwrap();
        let scheduler =
            AnyScheduler::from_class(params["scheduler"].as_str().unwrap(), &config).unwrap();
        let mut sd = models.sd();
        sd.scheduler = &scheduler;
        let images = control_images(r, &case.entry, &device);
        let which: Vec<usize> = params["controlnets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_u64().unwrap() as usize)
            .collect();
        let s = scales(call, which.len());
        for (k, (&net, image)) in which.iter().zip(images).enumerate() {
            let mut unit = ControlNetUnit::new(&nets[net], image);
            unit.conditioning_scale = s[k];
            unit.guidance_start = call["control_guidance_start"].as_f64().unwrap_or(0.0);
            unit.guidance_end = call["control_guidance_end"].as_f64().unwrap_or(1.0);
            unit.guess_mode = call["guess_mode"].as_bool().unwrap_or(false);
            // diffusers' per-step scales: scale x keep.
            let want = r.floats(&format!("controlnet{k}.conditioning_scales"));
            let got: Vec<f32> = (0..want.len())
                .map(|i| (unit.conditioning_scale * unit.keep(i, want.len())) as f32)
                .collect();
            assert_eq!(got, want, "{name} controlnet{k} scales");
            sd.controlnets.push(unit);
        }
        let out = case.run_composed(&sd, &device);
        case.check_latents(&out.latents, 1e-3);
        let image: Tensor<4> = out.images.permute([0, 2, 3, 1]);
        assert_close(&format!("{name} image"), &image, &r.floats("image"), 1e-3);
    }
}

/// The owning pipeline: ControlNets loaded with the model, control images given as
/// files, the task's default scale (0.8 for image to image) and the control
/// image's size as the picture's.
#[test]
fn owning_pipeline_runs_controlnet_cases() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let options = LoadOptions {
        controlnets: vec![fixture("tiny-controlnet"), fixture("tiny-controlnet_1")],
        ..Default::default()
    };
    let pipe =
        StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), &device, &options).unwrap();
    assert_eq!(
        pipe.controlnet_names().collect::<Vec<_>>(),
        ["tiny-controlnet", "tiny-controlnet_1"]
    );
    for name in [
        "controlnet/pipelines/txt2img_ddim_7_multi",
        "controlnet/pipelines/img2img_ddim_s0.7",
    ] {
        let case = Case::open("index_controlnet.json", name);
        let call = case.call();
        // The control images' (or init image's) size is the picture's.
        let mut req = case.request_sized_by_inputs(&device);
        let pngs = &case.params()["control_png"];
        if name.ends_with("multi") {
            let s = scales(call, 2);
            for k in 0..2 {
                let png = fixture(&format!("reference/{}", pngs[k].as_str().unwrap()));
                req = req.control(ControlInput::new(k, png).scale(s[k]));
            }
        } else {
            let png = fixture(&format!("reference/{}", pngs.as_str().unwrap()));
            req = req.control(ControlInput::new(0, png));
        }
        let out = pipe.generate(req).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.images[0].image.dimensions(), (32, 32));
        case.check_latents(&out.latents, 1e-3);
    }
}

#[test]
fn controlnet_requests_that_cannot_run_are_errors() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let mut pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let png = fixture("reference/controlnet/control_edge.png");
    let err = pipe
        .generate(
            GenerationRequest::new("x")
                .steps(1)
                .control(ControlInput::new(0, png.clone())),
        )
        .unwrap_err();
    assert!(err.to_string().contains("not loaded"), "{err}");
    pipe.load_controlnet(fixture("tiny-controlnet")).unwrap();
    let err = pipe
        .generate(
            GenerationRequest::new("x")
                .steps(2)
                .control(ControlInput::new(0, png.clone()).guidance_range(0.8, 0.2)),
        )
        .unwrap_err();
    assert!(err.to_string().contains("control_guidance_start"), "{err}");

    // A ControlNet for another model (the tiny SDXL's U-Net widths) is refused.
    let mut xl = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let err = xl.load_controlnet(fixture("tiny-controlnet")).unwrap_err();
    assert!(
        err.to_string().contains("ControlNet `tiny-controlnet`"),
        "{err}"
    );

    // Files that are not full ControlNets are named.
    let dir = std::env::temp_dir().join(format!("sd-controlnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lora = dir.join("control-lora.safetensors");
    let t = stable_diffusion::io::save::NamedTensor {
        key: "lora_controlnet".into(),
        shape: vec![1],
        values: vec![0.0],
    };
    stable_diffusion::io::write_safetensors(
        &lora,
        &[t],
        stable_diffusion::burn::tensor::DType::F32,
        &Default::default(),
    )
    .unwrap();
    let err = controlnet_from_path(&lora, None, &device, &ComponentOptions::default()).unwrap_err();
    assert!(err.to_string().contains("control-LoRA"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The original single-file layout (`control_model.*`, fp16; written by
/// `gen/controlnet_single_file.py` and checked there with diffusers'
/// `from_single_file`) gives the folder's residuals.
#[test]
fn single_file_controlnet_matches_its_folder() {
    use stable_diffusion::io::controlnet::read_controlnet_config;
    let device = Device::flex();
    let r = Reference::open("reference/controlnet/controlnet.safetensors");
    let config = read_controlnet_config(&fixture("tiny-controlnet/config.json")).unwrap();
    let file = fixture("tiny-controlnet.safetensors");
    let net =
        controlnet_from_path(&file, Some(&config), &device, &ComponentOptions::default()).unwrap();
    let (sample, ts, ctx, cond) = inputs(&r, &device);
    let out = ControlNet::forward(
        &net,
        sample,
        ts,
        ctx,
        cond,
        1.0,
        false,
        &AddedConditioning::default(),
    )
    .unwrap();
    check_residuals("[single file]", &out, &r, "scale1.0", 1e-4);
    // Without a config the tiny widths are not a known family: a clear error.
    let err = controlnet_from_path(&file, None, &device, &ComponentOptions::default()).unwrap_err();
    assert!(err.to_string().contains("pass its config"), "{err}");
}

/// A real-size SD 1.5 ControlNet file is recognised from its tensors' shapes: the
/// config read off a file holding only the tensors that decide it equals the real
/// `control_v11p_sd15_*` config.
#[test]
fn single_file_config_is_recognised_at_real_size() {
    use stable_diffusion::io::controlnet::{controlnet_config_from_file, read_controlnet_config};
    use stable_diffusion::io::save::NamedTensor;
    let dir = std::env::temp_dir().join(format!("sd-cn-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = |key: &str, shape: &[usize]| NamedTensor {
        key: format!("control_model.{key}"),
        shape: shape.to_vec(),
        values: vec![0.0; shape.iter().product()],
    };
    let mut tensors = vec![
        t("input_blocks.0.0.weight", &[320, 4, 3, 3]),
        t(
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            &[320, 768],
        ),
        t("input_hint_block.0.weight", &[16, 3, 3, 3]),
    ];
    for (i, (o, c)) in [
        (16, 16),
        (32, 16),
        (32, 32),
        (96, 32),
        (96, 96),
        (256, 96),
        (320, 256),
    ]
    .into_iter()
    .enumerate()
    {
        tensors.push(t(
            &format!("input_hint_block.{}.weight", 2 * (i + 1)),
            &[o, c, 3, 3],
        ));
    }
    let path = dir.join("control_sd15.safetensors");
    stable_diffusion::io::write_safetensors(
        &path,
        &tensors,
        stable_diffusion::burn::tensor::DType::F16,
        &Default::default(),
    )
    .unwrap();
    let got = controlnet_config_from_file(&path).unwrap();
    let want = read_controlnet_config(&fixture("configs/controlnet-sd15/config.json")).unwrap();
    let (g, w) = (&got.unet, &want.unet);
    assert_eq!(g.block_out_channels, w.block_out_channels);
    assert_eq!(g.down_block_types, w.down_block_types);
    assert_eq!(g.in_channels, w.in_channels);
    assert_eq!(g.blocks().unwrap(), w.blocks().unwrap());
    assert_eq!(g.use_linear_projection, w.use_linear_projection);
    assert_eq!(g.addition_embed_type, w.addition_embed_type);
    assert_eq!(
        got.conditioning_embedding_out_channels,
        want.conditioning_embedding_out_channels
    );
    assert_eq!(got.conditioning_channels, want.conditioning_channels);
    assert_eq!(got.downscale_factor(), 8);
    std::fs::remove_dir_all(&dir).ok();
}

/// An SDXL ControlNet (the `text_time` conditioning too; made by
/// `gen/ref_controlnet_sdxl.py`): residuals at scale 1 and in guess mode, and the
/// SDXL U-Net fed them.
#[test]
fn sdxl_controlnet_residuals_match_diffusers() {
    let r = Reference::open("reference/controlnet_sdxl/controlnet.safetensors");
    for (name, device) in devices() {
        let t = tol(name, 1e-4, 2e-3);
        let net = controlnet("tiny-controlnet-sdxl", &device);
        let sample = r.tensor::<4>("sample", &device);
        let ts = Tensor::<1>::full([2], 500.0, &device);
        let ctx = r.tensor::<3>("encoder_hidden_states", &device);
        let cond = r.tensor::<4>("controlnet_cond", &device);
        let added = AddedConditioning {
            text_embeds: Some(r.tensor::<2>("text_embeds", &device)),
            time_ids: Some(r.tensor::<2>("time_ids", &device)),
            ..Default::default()
        };
        let mut residuals = None;
        for (guess, prefix) in [(false, "scale1.0"), (true, "guess_mode")] {
            let out = ControlNet::forward(
                &net,
                sample.clone(),
                ts.clone(),
                ctx.clone(),
                cond.clone(),
                1.0,
                guess,
                &added,
            )
            .unwrap();
            let n = out.down_block_res_samples.len();
            for (j, d) in out.down_block_res_samples.iter().enumerate() {
                let key = format!("{prefix}.down_{j}");
                assert_close(&format!("[{name}] sdxl {key}"), d, &r.floats(&key), t);
            }
            assert_eq!(n, 9);
            let key = format!("{prefix}.mid");
            assert_close(
                &format!("[{name}] sdxl {key}"),
                &out.mid_block_res_sample,
                &r.floats(&key),
                t,
            );
            residuals.get_or_insert(out);
        }
        // Without the added conditioning an SDXL ControlNet refuses to run.
        let err = ControlNet::forward(
            &net,
            sample.clone(),
            ts.clone(),
            ctx.clone(),
            cond,
            1.0,
            false,
            &AddedConditioning::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("text_embeds"), "{err}");
        let unet = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sdxl"))
            .unwrap()
            .unet(&device, &ComponentOptions::default())
            .unwrap();
        let (down, mid) = out_of(&residuals.unwrap());
        let control = ControlSignals {
            down_block_additional_residuals: Some(down),
            mid_block_additional_residual: Some(mid),
            ..Default::default()
        };
        let with = unet
            .forward_controlled(sample, ts, ctx, &added, &control)
            .unwrap();
        assert_close(
            &format!("[{name}] sdxl unet_out_with_control"),
            &with,
            &r.floats("unet_out_with_control"),
            t,
        );
    }
}

/// SDXL ControlNet pipelines (scale 0.7; guess mode with control_guidance_end)
/// through the owning SDXL pipeline with the recorded noise.
#[test]
fn sdxl_controlnet_pipeline_cases_match_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let mut pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let net = pipe
        .load_controlnet(fixture("tiny-controlnet-sdxl"))
        .unwrap();
    let cases = Case::all("index_controlnet_sdxl.json", "controlnet_sdxl/pipelines/");
    assert_eq!(cases.len(), 2);
    for case in &cases {
        let call = case.call();
        let mut input = ControlInput::new(net, case.control_png(0)).scale(0.7);
        if let Some(end) = call["control_guidance_end"].as_f64() {
            input = input.guidance_range(0.0, end);
        }
        assert_eq!(case.noise_count(), 0);
        let req = case
            .request(&device)
            .guess_mode(call["guess_mode"].as_bool().unwrap_or(false))
            .control(input);
        let out = pipe
            .generate(req)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(out.images[0].image.dimensions(), (32, 32));
        assert_eq!(case.r.floats("controlnet0.conditioning_scales").len(), 7);
        case.check_latents(&out.latents, 1e-3);
    }
}

/// diffusers' `ControlNetModel.from_unet`: the encoder half copied (own parameter
/// ids), the output convs zero, so a fresh ControlNet adds nothing.
#[test]
fn controlnet_from_unet_starts_as_a_no_op() {
    let device = Device::flex();
    let dir = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let unet = dir.unet(&device, &ComponentOptions::default()).unwrap();
    let config = dir.unet_config().unwrap();
    let net = ControlNetModel::from_unet(&unet, &config, &[16, 32], &device).unwrap();
    assert_ne!(net.conv_in.weight.id, unet.conv_in.weight.id);
    let w = |t: Tensor<4>| t.to_data().try_to_vec::<f32>().unwrap();
    assert_eq!(w(net.conv_in.weight.val()), w(unet.conv_in.weight.val()));
    let r = Reference::open("reference/controlnet/controlnet.safetensors");
    let (sample, ts, ctx, cond) = inputs(&r, &device);
    let out = ControlNet::forward(
        &net,
        sample,
        ts,
        ctx,
        cond,
        1.0,
        false,
        &AddedConditioning::default(),
    )
    .unwrap();
    for d in out
        .down_block_res_samples
        .iter()
        .chain([&out.mid_block_res_sample])
    {
        assert_eq!(d.clone().abs().max().into_scalar::<f32>(), 0.0);
    }
    // A config that does not describe the U-Net is refused.
    let mut other = config.clone();
    other.block_out_channels = vec![32, 64, 64];
    assert!(ControlNetModel::from_unet(&unet, &other, &[16, 32], &device).is_err());
}

/// A ControlNet made by `from_unet` and saved with `save_controlnet` is a diffusers
/// folder: its config has `ControlNetModel`'s keys only, and it reloads to the same
/// residuals.
#[test]
fn saved_controlnet_reloads() {
    use stable_diffusion::io::controlnet::read_controlnet_config;
    let device = Device::flex();
    let net = controlnet("tiny-controlnet", &device);
    let config = read_controlnet_config(&fixture("tiny-controlnet/config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    stable_diffusion::io::save_controlnet(
        &net,
        &config,
        dir.path(),
        stable_diffusion::burn::tensor::DType::F32,
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
    let original: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-controlnet/config.json")).unwrap(),
    )
    .unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&saved), keys(&original));
    let again = controlnet_from_dir(dir.path(), &device, &ComponentOptions::default()).unwrap();
    let r = Reference::open("reference/controlnet/controlnet.safetensors");
    let (sample, ts, ctx, cond) = inputs(&r, &device);
    let out = ControlNet::forward(
        &again,
        sample,
        ts,
        ctx,
        cond,
        1.0,
        false,
        &AddedConditioning::default(),
    )
    .unwrap();
    check_residuals("[saved]", &out, &r, "scale1.0", 1e-4);
}

/// T2I-Adapters (made by `gen/ref_t2i_adapter.py`): the full and the light
/// adapter's features, and tiny-sd15's U-Net fed the full one's as
/// `down_intrablock_additional_residuals`.
#[test]
fn t2i_adapter_features_match_diffusers() {
    use stable_diffusion::core::Adapter;
    use stable_diffusion::io::controlnet::t2i_adapter_from_dir;
    let r = Reference::open("reference/t2i_adapter/adapter.safetensors");
    for (name, device) in devices() {
        let t = tol(name, 1e-4, 2e-3);
        let image = r.tensor::<4>("image", &device);
        for (dir, prefix) in [
            ("tiny-t2i-adapter", "full"),
            ("tiny-t2i-adapter-light", "light"),
        ] {
            let adapter =
                t2i_adapter_from_dir(&fixture(dir), &device, &ComponentOptions::default()).unwrap();
            let features = adapter.features(image.clone()).unwrap();
            assert_eq!(features.len(), 3);
            for (j, f) in features.iter().enumerate() {
                let key = format!("{prefix}.features_{j}");
                assert_close(&format!("[{name}] {key}"), f, &r.floats(&key), t);
            }
            let err = adapter
                .features(image.clone().narrow(2, 0, 31))
                .unwrap_err();
            assert!(err.to_string().contains("multiples"), "{err}");
        }
        let adapter =
            t2i_adapter_from_dir(&fixture("tiny-t2i-adapter"), &device, &Default::default())
                .unwrap();
        let features: Vec<Tensor<4>> = adapter
            .features(image)
            .unwrap()
            .into_iter()
            .map(|f| f * 0.8)
            .collect();
        let unet = stable_diffusion::io::DiffusersDir::open(fixture("tiny-sd15"))
            .unwrap()
            .unet(&device, &ComponentOptions::default())
            .unwrap();
        let sample = r.tensor::<4>("sample", &device);
        let ts = Tensor::<1>::full([2], 500.0, &device);
        let ctx = r.tensor::<3>("encoder_hidden_states", &device);
        let mut wrong = features.clone();
        wrong.swap(0, 2);
        let control = ControlSignals {
            down_intrablock_additional_residuals: Some(wrong),
            ..Default::default()
        };
        let err = unet
            .forward_controlled(
                sample.clone(),
                ts.clone(),
                ctx.clone(),
                &AddedConditioning::default(),
                &control,
            )
            .unwrap_err();
        assert!(err.to_string().contains("feature 0"), "{err}");
        let control = ControlSignals {
            down_intrablock_additional_residuals: Some(features),
            ..Default::default()
        };
        let out = unet
            .forward_controlled(sample, ts, ctx, &AddedConditioning::default(), &control)
            .unwrap();
        assert_close(
            &format!("[{name}] unet_out_with_adapter"),
            &out,
            &r.floats("unet_out_with_adapter"),
            t,
        );
    }
}

/// T2I-Adapters as original TencentARC single files (`gen/t2i_adapter_single_file.py`:
/// the full adapter's flat `body.{n}` list, the light one's `body.{l}.body.{j}`), with
/// no config: the config recognised from the tensors is the folder's, the features
/// equal the folder's exactly and match diffusers'. Handed to the ControlNet loader,
/// the file is named for what it is.
#[test]
fn t2i_adapter_single_files_match_their_folders() {
    use stable_diffusion::core::Adapter;
    use stable_diffusion::io::controlnet::{read_t2i_adapter_config, t2i_adapter_from_dir};
    use stable_diffusion::io::t2i_adapter::t2i_adapter_from_path;
    let r = Reference::open("reference/t2i_adapter/adapter.safetensors");
    let device = Device::flex();
    let image = r.tensor::<4>("image", &device);
    for (name, prefix) in [
        ("tiny-t2i-adapter", "full"),
        ("tiny-t2i-adapter-light", "light"),
    ] {
        let opts = ComponentOptions::default();
        let folder = t2i_adapter_from_dir(&fixture(name), &device, &opts).unwrap();
        let file = fixture(&format!("{name}.safetensors"));
        let single = t2i_adapter_from_path(&file, None, &device, &opts).unwrap();
        let config = read_t2i_adapter_config(&fixture(&format!("{name}/config.json"))).unwrap();
        let with_config = t2i_adapter_from_path(&file, Some(&config), &device, &opts).unwrap();
        let a = folder.features(image.clone()).unwrap();
        for other in [&single, &with_config] {
            let b = other.features(image.clone()).unwrap();
            assert_eq!(a.len(), b.len());
            for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(
                    x.to_data().try_to_vec::<f32>().unwrap(),
                    y.to_data().try_to_vec::<f32>().unwrap(),
                    "{name} feature {j}"
                );
                let key = format!("{prefix}.features_{j}");
                assert_close(&format!("{name} file {key}"), y, &r.floats(&key), 1e-4);
            }
        }
        let err =
            stable_diffusion::io::controlnet::controlnet_from_path(&file, None, &device, &opts)
                .unwrap_err()
                .to_string();
        assert!(err.contains("T2I-Adapter"), "{err}");
    }
}

/// diffusers' `StableDiffusionAdapterPipeline` case (DDIM 7 steps, scale 0.8)
/// through the owning pipeline, the control image read from its PNG; the adapter
/// loaded from its folder and from its original single file.
#[test]
fn t2i_adapter_pipeline_case_matches_diffusers() {
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let case = Case::open(
        "index_t2i_adapter.json",
        "t2i_adapter/pipelines/txt2img_ddim_7",
    );
    for source in ["tiny-t2i-adapter", "tiny-t2i-adapter.safetensors"] {
        let options = LoadOptions {
            adapters: vec![fixture(source)],
            ..Default::default()
        };
        let pipe =
            StableDiffusionPipeline::from_pretrained(fixture("tiny-sd15"), &device, &options)
                .unwrap();
        // named by the file's stem, as ControlNets
        assert_eq!(
            pipe.adapter_names().collect::<Vec<_>>(),
            ["tiny-t2i-adapter"]
        );
        let req = case
            .request(&device)
            .adapter(AdapterInput::new(0, case.control_png(0)).scale(0.8));
        let out = pipe.generate(req).unwrap();
        eprintln!("adapter from {source}:");
        case.check_latents(&out.latents, 1e-3);
    }
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions {
            adapters: vec![fixture("tiny-t2i-adapter")],
            ..Default::default()
        },
    )
    .unwrap();
    let err = pipe
        .generate(GenerationRequest::new("x").adapter(AdapterInput::new(3, fixture("x.png"))))
        .unwrap_err();
    assert!(err.to_string().contains("not loaded"), "{err}");
}

/// An SDXL T2I-Adapter (`full_adapter_xl`, made by `gen/ref_t2i_adapter_sdxl.py`):
/// its features (the last goes to the mid block) and
/// `StableDiffusionXLAdapterPipeline` with `adapter_conditioning_factor` 0.6 through
/// the owning SDXL pipeline.
#[test]
fn sdxl_t2i_adapter_case_matches_diffusers() {
    use stable_diffusion::core::Adapter;
    use stable_diffusion::io::controlnet::t2i_adapter_from_dir;
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let r = Reference::open("reference/t2i_adapter_sdxl/adapter.safetensors");
    let adapter = t2i_adapter_from_dir(
        &fixture("tiny-t2i-adapter-sdxl"),
        &device,
        &ComponentOptions::default(),
    )
    .unwrap();
    let features = adapter.features(r.tensor::<4>("image", &device)).unwrap();
    assert_eq!(features.len(), 4);
    for (j, f) in features.iter().enumerate() {
        let key = format!("features_{j}");
        assert_close(&format!("sdxl adapter {key}"), f, &r.floats(&key), 1e-4);
    }
    let mut pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let i = pipe.load_adapter(fixture("tiny-t2i-adapter-sdxl")).unwrap();
    let case = Case::open(
        "index_t2i_adapter_sdxl.json",
        "t2i_adapter_sdxl/pipelines/txt2img_euler_7_g5",
    );
    let req = case.request(&device).adapter(
        AdapterInput::new(i, case.control_png(0))
            .scale(0.9)
            .conditioning_factor(0.6),
    );
    let out = pipe.generate(req).unwrap();
    case.check_latents(&out.latents, 1e-3);
}
