//! Training against diffusers' recipe: two optimizer steps on the tiny U-Net
//! (`scripts/make_training_reference.py`): losses, gradients, the global gradient norm,
//! AdamW with clipping, and the EMA weights.

use stable_diffusion::burn::optim::{AdamWConfig, GradientsParams};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::{ComponentOptions, DiffusersDir};
use stable_diffusion::schedulers::SchedulerConfig;
use stable_diffusion::train::{
    Ema, LoraTrainConfig, Objective, TrainConfig, Trainer, clip_grad_norm, param_by_path,
    stable_param_ids,
};

use crate::common::{Reference, fixture};

/// Burn path of a diffusers key, and whether the weight is a linear layer's (stored
/// `[out, in]`, seen by burn as `[in, out]`).
fn burn_path(key: &str) -> String {
    key.replace("to_out.0", "to_out")
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// A parameter (or its gradient) in PyTorch layout, flattened.
fn torch_layout<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    if D == 2 {
        // Linear weights: burn's [in, out] view of [out, in].
        let [a, b] = t.dims()[..2].try_into().unwrap();
        values(t.reshape([a, b]).transpose())
    } else {
        values(t)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
    (d, m)
}

/// `torch.optim.AdamW` as the reference scripts build it (and diffusers' training
/// scripts by default): betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2.
fn diffusers_adamw() -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(1e-2)
}

fn check_param(
    label: &str,
    unet: &impl Module,
    key: &str,
    reference: &[f32],
    grads: Option<&GradientsParams>,
    rel_tol: f32,
) {
    let path = burn_path(key);
    let rank = if key.ends_with("bias") || key.contains("norm") {
        1
    } else if key.contains("conv") || key.starts_with("controlnet_") {
        4
    } else {
        2
    };
    let ours = match (rank, grads) {
        (1, None) => param_by_path::<1, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (2, None) => param_by_path::<2, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (4, None) => param_by_path::<4, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (1, Some(g)) => param_by_path::<1, _>(unet, &path)
            .and_then(|(id, _)| g.get::<1>(id))
            .map(torch_layout),
        (2, Some(g)) => param_by_path::<2, _>(unet, &path)
            .and_then(|(id, _)| g.get::<2>(id))
            .map(torch_layout),
        (_, Some(g)) => param_by_path::<4, _>(unet, &path)
            .and_then(|(id, _)| g.get::<4>(id))
            .map(torch_layout),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{label}: no parameter `{path}`"));
    let (d, m) = max_diff(&ours, reference);
    eprintln!("{label} {key}: max |ours - diffusers| = {d:.3e} (max |ref| {m:.3e})");
    assert!(
        d <= rel_tol * m.max(1e-3),
        "{label} {key}: {d} > {rel_tol} * {m}"
    );
}

const KEYS: [&str; 7] = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "mid_block.resnets.0.norm1.weight",
    "up_blocks.2.resnets.2.conv2.weight",
    "conv_out.bias",
];

#[test]
fn two_training_steps_match_diffusers() {
    let device = Device::flex().autodiff();
    let r = Reference::open("reference/training.safetensors");
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let unet = stable_param_ids(dir.unet(&device, &ComponentOptions::default()).unwrap());
    let mut objective = Objective::from_config(
        &SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap(),
    )
    .unwrap();
    let latents: Tensor<4> = r.tensor("latents", &device);
    let noise: Tensor<4> = r.tensor("noise", &device);
    let context: Tensor<3> = r.tensor("context", &device);
    let timesteps: Vec<usize> = r.ints("timesteps").iter().map(|&t| t as usize).collect();
    let t = Objective::timestep_tensor(&timesteps, &device);

    let mut optim = diffusers_adamw().init();
    let mut ema = Ema::new(&unet, 0.9999);
    let mut unet = unet;
    for step in 0..2 {
        if step == 1 {
            objective.prediction_type = stable_diffusion::schedulers::PredictionType::VPrediction;
            objective.snr_gamma = Some(5.0);
            let w = objective.weights(&timesteps);
            let (d, _) = max_diff(&w, &r.floats("snr_weights"));
            assert!(d < 1e-6, "min-SNR weights differ by {d}");
        }
        let noisy = objective.add_noise(latents.clone(), noise.clone(), &timesteps);
        let target = objective.target(latents.clone(), noise.clone(), &timesteps);
        let pred = unet.forward(noisy, t.clone(), context.clone()).unwrap();
        let loss = objective.loss(pred, target, &timesteps);
        let loss_value = loss.clone().into_scalar::<f32>();
        let ref_loss = r.floats(&format!("step{step}.loss"))[0];
        eprintln!("step {step}: loss {loss_value} (diffusers {ref_loss})");
        assert!((loss_value - ref_loss).abs() <= 1e-5 * ref_loss.abs().max(1.0));
        let grads = GradientsParams::from_grads(loss.backward(), &unet);
        for key in KEYS {
            check_param(
                &format!("step {step} grad"),
                &unet,
                key,
                &r.floats(&format!("step{step}.grad.{key}")),
                Some(&grads),
                1e-4,
            );
        }
        let ref_norm = r.floats(&format!("step{step}.grad_norm"))[0] as f64;
        let (grads, norm) = clip_grad_norm(&unet, grads, None);
        assert!(
            (norm - ref_norm).abs() <= 1e-4 * ref_norm,
            "grad norm {norm} vs {ref_norm}"
        );
        let (grads, _) = clip_grad_norm(&unet, grads, Some(0.5 * norm));
        unet = optim.step(1e-3, unet, grads);
        ema.update(&unet);
        for key in KEYS {
            check_param(
                &format!("step {step} param"),
                &unet,
                key,
                &r.floats(&format!("step{step}.param.{key}")),
                None,
                1e-4,
            );
        }
    }
    for key in KEYS {
        check_param(
            "ema",
            &ema.model,
            key,
            &r.floats(&format!("ema.{key}")),
            None,
            1e-4,
        );
    }
}

/// One step of diffusers' ControlNet recipe (`scripts/make_controlnet_training_reference.py`):
/// the U-Net frozen, the ControlNet's loss, gradients, global norm, clipped AdamW step.
#[test]
fn controlnet_training_step_matches_diffusers() {
    check_controlnet_step(
        "reference/training_controlnet.safetensors",
        "tiny-sd15",
        "tiny-controlnet",
        &[
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "controlnet_cond_embedding.conv_in.weight",
            "controlnet_cond_embedding.blocks.1.bias",
            "controlnet_cond_embedding.conv_out.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.1.resnets.0.conv1.weight",
            "mid_block.resnets.1.norm2.weight",
            "controlnet_down_blocks.0.weight",
            "controlnet_down_blocks.8.bias",
            "controlnet_mid_block.weight",
        ],
    );
}

/// One step of diffusers' `train_controlnet_sdxl.py`
/// (`scripts/make_controlnet_training_reference.py`): tiny-sdxl's U-Net frozen,
/// the SDXL ControlNet given the text embeddings and time ids as the U-Net.
#[test]
fn sdxl_controlnet_training_step_matches_diffusers() {
    check_controlnet_step(
        "reference/training_controlnet_sdxl.safetensors",
        "tiny-sdxl",
        "tiny-controlnet-sdxl",
        &[
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "add_embedding.linear_1.weight",
            "add_embedding.linear_2.bias",
            "controlnet_cond_embedding.conv_in.weight",
            "controlnet_cond_embedding.conv_out.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.resnets.1.norm2.weight",
            "controlnet_down_blocks.0.weight",
            "controlnet_down_blocks.5.bias",
            "controlnet_mid_block.weight",
        ],
    );
}

/// Replays a ControlNet training step reference: loss, gradients of `keys`, global
/// norm, the clipped AdamW update (SDXL's `text_embeds` / `time_ids` when recorded).
fn check_controlnet_step(reference: &str, model: &str, controlnet_dir: &str, keys: &[&str]) {
    use stable_diffusion::core::AddedConditioning;
    use stable_diffusion::io::controlnet::controlnet_from_dir;
    let device = Device::flex().autodiff();
    let r = Reference::open(reference);
    let dir = DiffusersDir::open(fixture(model)).unwrap();
    let unet = dir
        .unet(&device, &ComponentOptions::default())
        .unwrap()
        .no_grad();
    let controlnet = stable_param_ids(
        controlnet_from_dir(
            &fixture(controlnet_dir),
            &device,
            &ComponentOptions::default(),
        )
        .unwrap(),
    );
    let objective = Objective::from_config(
        &SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap(),
    )
    .unwrap();
    let timesteps: Vec<usize> = r.ints("timesteps").iter().map(|&t| t as usize).collect();
    let added = if r.has("time_ids") {
        AddedConditioning {
            text_embeds: Some(r.tensor("text_embeds", &device)),
            time_ids: Some(r.tensor("time_ids", &device)),
            ..Default::default()
        }
    } else {
        AddedConditioning::default()
    };
    let loss = stable_diffusion::train::controlnet_loss(
        &objective,
        &unet,
        &controlnet,
        r.tensor("latents", &device),
        r.tensor("noise", &device),
        &timesteps,
        r.tensor("context", &device),
        added,
        r.tensor("controlnet_cond", &device),
    );
    let value = loss.clone().into_scalar::<f32>();
    let want = r.floats("loss")[0];
    eprintln!("[{controlnet_dir}] ControlNet loss {value} (diffusers {want})");
    assert!((value - want).abs() <= 1e-5 * want.abs().max(1.0));
    let grads = GradientsParams::from_grads(loss.backward(), &controlnet);
    for key in keys {
        let reference = r.floats(&format!("grad.{key}"));
        check_param("grad", &controlnet, key, &reference, Some(&grads), 1e-4);
    }
    let (grads, norm) = clip_grad_norm(&controlnet, grads, None);
    let ref_norm = r.floats("grad_norm")[0] as f64;
    assert!(
        (norm - ref_norm).abs() <= 1e-4 * ref_norm,
        "{norm} vs {ref_norm}"
    );
    let (grads, _) = clip_grad_norm(&controlnet, grads, Some(0.5 * norm));
    let mut optim = diffusers_adamw().init();
    let controlnet = optim.step(1e-3, controlnet, grads);
    for key in keys {
        let reference = r.floats(&format!("param.{key}"));
        check_param("param", &controlnet, key, &reference, None, 1e-4);
    }
}

#[test]
fn optimizer_steps_lower_the_loss_on_a_fixed_batch() {
    let device = Device::flex().autodiff();
    let r = Reference::open("reference/training.safetensors");
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let mut unet = dir.unet(&device, &ComponentOptions::default()).unwrap();
    let objective = Objective::from_config(
        &SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap(),
    )
    .unwrap();
    let latents: Tensor<4> = r.tensor("latents", &device);
    let noise: Tensor<4> = r.tensor("noise", &device);
    let context: Tensor<3> = r.tensor("context", &device);
    let timesteps = [300usize, 600];
    let t = Tensor::<1>::from_floats([300.0, 600.0], &device);
    let mut optim = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let noisy = objective.add_noise(latents.clone(), noise.clone(), &timesteps);
        let target = objective.target(latents.clone(), noise.clone(), &timesteps);
        let loss = objective.loss(
            unet.forward(noisy, t.clone(), context.clone()).unwrap(),
            target,
            &timesteps,
        );
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &unet);
        unet = optim.step(1e-3, unet, grads);
    }
    eprintln!("losses on a fixed batch: {losses:?}");
    assert!(losses[1] < losses[0], "one step lowers the loss");
    assert!(losses[4] < 0.7 * losses[0], "five steps lower it further");
}

/// Four 32x32 images of coloured squares with captions.
fn tiny_data_set(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
        ("yellow", [230, 220, 30]),
    ];
    for (i, (name, rgb)) in colours.iter().enumerate() {
        let mut px = vec![240u8; 32 * 32 * 3];
        for y in 8..24 {
            for x in 8..24 {
                px[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3].copy_from_slice(rgb);
            }
        }
        let path = dir.join(format!("{i:02}.png"));
        stable_diffusion::io::image::write_png_rgb8(&path, 32, 32, &px, None).unwrap();
        std::fs::write(dir.join(format!("{i:02}.txt")), format!("a {name} square")).unwrap();
    }
}

fn train_config(data: &std::path::Path, output: &std::path::Path) -> TrainConfig {
    TrainConfig::from_json(&format!(
        r#"{{
            "model": {model:?}, "data": {data:?}, "output": {output:?},
            "resolution": 32, "batch_size": 2, "gradient_accumulation": 2, "max_steps": 4,
            "learning_rate": 1e-3,
            "lr_schedule": {{"kind": "cosine", "warmup_steps": 1, "total_steps": 4}},
            "ema_decay": 0.99, "snr_gamma": 5.0, "random_flip": true,
            "checkpoint_every": 2, "validation_images": 1, "validation_every": 2,
            "sample_prompts": ["a red square", "a blue square"], "sample_every": 2,
            "sample_steps": 2, "log_every": 1, "seed": 3, "caption_dropout": 0.5
        }}"#,
        model = fixture("tiny-sd15"),
    ))
    .unwrap()
}

fn unet_values(unet: &stable_diffusion::models::UNet2DConditionModel) -> Vec<f32> {
    let (_, w) = param_by_path::<4, _>(unet, "conv_in.weight").unwrap();
    let (_, q) = param_by_path::<2, _>(
        unet,
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    )
    .unwrap();
    let mut v = values(w);
    v.extend(values(q));
    v
}

#[test]
fn training_runs_checkpoints_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data_set(&data);

    // Straight through.
    let out_a = tmp.path().join("a");
    let trainer = Trainer::new(train_config(&data, &out_a), Device::flex()).unwrap();
    assert_eq!(
        trainer.sizes(),
        (6, 1),
        "3 training images, flipped too; 1 held out"
    );
    let mut rows = Vec::new();
    let a = trainer.run(|p| rows.push(p.row)).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter()
            .all(|r| r.loss.is_finite() && r.grad_norm.is_finite())
    );
    assert_eq!(
        rows[0].lr, 0.0,
        "warm-up starts at 0 as diffusers' schedules do"
    );
    assert!(rows[1].val_loss.is_some() && rows[3].val_loss.is_some());
    for f in [
        "log.csv",
        "loss.png",
        "samples/step-000002.png",
        "samples/step-000004.png",
        "checkpoint-2/unet/diffusion_pytorch_model.safetensors",
        "checkpoint-4/ema_unet/config.json",
        "checkpoint-4/optimizer.bpk",
        "checkpoint-4/trainer_state.json",
        "model/model_index.json",
        "model/unet/diffusion_pytorch_model.safetensors",
        "model/vae/config.json",
    ] {
        assert!(out_a.join(f).exists(), "{f} written");
    }
    let log = stable_diffusion::train::monitor::read_log(&out_a.join("log.csv")).unwrap();
    assert_eq!(log.len(), 4);
    // The exported pipeline loads, with the EMA U-Net.
    let exported = DiffusersDir::open(out_a.join("model")).unwrap();
    let u = exported
        .unet(&Device::flex(), &ComponentOptions::default())
        .unwrap();
    assert_eq!(unet_values(&u), unet_values(&a.unet));

    // Interrupted after two steps, then resumed from checkpoint-2.
    let out_b = tmp.path().join("b");
    let mut half = train_config(&data, &out_b);
    half.max_steps = 2;
    Trainer::new(half, Device::flex())
        .unwrap()
        .run(|_| {})
        .unwrap();
    let b = Trainer::new(train_config(&data, &out_b), Device::flex())
        .unwrap()
        .run(|_| {})
        .unwrap();
    let (va, vb) = (unet_values(&a.unet), unet_values(&b.unet));
    let (d, _) = max_diff(&vb, &va);
    eprintln!("resumed vs uninterrupted: max |diff| = {d:.3e}");
    assert!(
        d <= 1e-6,
        "a resumed run continues as an uninterrupted one ({d})"
    );
    let log_b = stable_diffusion::train::monitor::read_log(&out_b.join("log.csv")).unwrap();
    assert_eq!(
        log_b.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

/// A LoRA run of the tiny SD 1.5 with `train_text_encoder`: both file layouts hold the
/// U-Net's 88 layers and the text encoder's q, k, v, out projections, and the saved
/// U-Net layers reproduce the trained U-Net.
#[test]
fn lora_training_writes_loras_our_pipelines_and_diffusers_read() {
    use stable_diffusion::io::{LoraComponent, LoraFile, LoraFormat};
    use stable_diffusion::models::lora::{LoraMode, apply_lora};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data_set(&data);
    let out = tmp.path().join("lora");
    let mut config = train_config(&data, &out);
    config.lora = Some(LoraTrainConfig {
        rank: 2,
        alpha: 2.0,
        train_text_encoder: true,
    });
    config.max_steps = 3;
    config.ema_decay = None;
    config.sample_prompts.clear();
    let trainer = Trainer::new(config, Device::flex()).unwrap();
    let trained = trainer.run(|_| {}).unwrap();
    let base = DiffusersDir::open(fixture("tiny-sd15"))
        .unwrap()
        .unet(&Device::flex(), &ComponentOptions::default())
        .unwrap();
    for (file, format) in [
        ("pytorch_lora_weights.safetensors", LoraFormat::Diffusers),
        ("lora_kohya.safetensors", LoraFormat::Kohya),
    ] {
        let lora = LoraFile::open(out.join(file)).unwrap();
        assert_eq!(lora.format(), format);
        let w = lora.weights_for(LoraComponent::Unet, &base).unwrap();
        assert_eq!(w.len(), 88);
        // The text encoder trained too (`train_text_encoder`): its q, k, v, out
        // projections in every layer.
        let te = lora
            .weights_for(LoraComponent::TextEncoder, &trained.text_encoders[0])
            .unwrap();
        assert_eq!(
            te.len(),
            4 * trained.text_encoders[0].text_model.encoder.layers.len()
        );
        assert!(
            w.layers.values().any(|l| l.up.iter().any(|v| *v != 0.0)),
            "trained"
        );
        let adapted = apply_lora(base.clone(), &[(&w, 1.0)], LoraMode::Merge).unwrap();
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 4, 16, 16], &device);
        let t = Tensor::<1>::from_floats([500.0], &device);
        let ctx = Tensor::<3>::ones([1, 77, 32], &device).mul_scalar(0.1);
        let ya = adapted.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
        let yt = trained.unet.forward(x, t, ctx).unwrap();
        let d = (ya - yt).abs().max().into_scalar::<f32>();
        assert!(
            d < 1e-5,
            "{file}: the saved LoRA reproduces the trained model ({d})"
        );
    }
}

#[test]
fn vae_training_lowers_the_reconstruction_error() {
    use stable_diffusion::train::synthetic::Scene;
    use stable_diffusion::train::vae::{VaeTrainConfig, latent_scaling_factor, train_vae};
    let device = Device::flex();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let images: Vec<Tensor<4>> = Scene::all(&mut rng)
        .iter()
        .take(8)
        .map(|s| {
            let v: Vec<f32> = s
                .render(32)
                .iter()
                .map(|&b| b as f32 / 127.5 - 1.0)
                .collect();
            Tensor::<3>::from_data(TensorData::new(v, [32, 32, 3]), &device)
                .permute([2, 0, 1])
                .unsqueeze::<4>()
        })
        .collect();
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let vae = dir
        .vae(&device.clone().autodiff(), &ComponentOptions::default())
        .unwrap();
    let mut rec = Vec::new();
    let config = VaeTrainConfig {
        steps: 6,
        batch_size: 4,
        learning_rate: 1e-3,
        kl_weight: 1e-6,
        seed: 0,
    };
    let vae = train_vae(vae, &images, &config, |_, r, kl| {
        assert!(r.is_finite() && kl.is_finite());
        rec.push(r)
    });
    eprintln!("VAE reconstruction error: {rec:?}");
    assert!(rec[5] < rec[0], "training lowers the reconstruction error");
    let s = latent_scaling_factor(&vae, &images);
    assert!(s.is_finite() && s > 0.0);
}

#[test]
fn prompt_match_runs_the_pipeline_and_the_classifier() {
    use stable_diffusion::train::synthetic::prompt_match;
    let p = crate::common::LoadedPipeline::open(fixture("tiny-sd15"), &Device::flex());
    let r = prompt_match(&p.sd(), 3, 2, 7.5, 32).unwrap();
    assert_eq!(r.images, 3);
    assert!(r.colour_and_shape <= r.colour.min(r.shape));
}

/// A LoRA factor (`{module}.down` / `.up`, PyTorch `[rank, in]` / `[out, rank]`) or its
/// gradient, flattened.
fn lora_factor<M: Module>(model: &M, key: &str, grads: Option<&GradientsParams>) -> Vec<f32> {
    let (module, which) = key.rsplit_once('.').unwrap();
    let path = format!("{}.weight.lora.factors.0.{which}", burn_path(module));
    let (id, t) = param_by_path::<2, _>(model, &path).unwrap_or_else(|| panic!("no {path}"));
    match grads {
        None => values(t),
        Some(g) => values(
            g.get::<2>(id)
                .unwrap_or_else(|| panic!("no gradient for {path}")),
        ),
    }
}

fn assert_close(label: &str, got: &[f32], want: &[f32], rel: f32) {
    let (d, m) = max_diff(got, want);
    eprintln!("{label}: max diff {d:.3e} (scale {m:.3e})");
    assert!(
        d <= rel * m.max(1e-6),
        "{label}: differs by {d} (scale {m})"
    );
}

/// One step of diffusers' SDXL LoRA recipe replayed from `r`
/// (`scripts/make_sdxl_training_reference.py`): `predict(model, noisy, t)` for the
/// recorded latents noised at timesteps 100 and 700 against the recorded noise (the
/// tiny SDXL's scheduler); the loss, the gradients of `keys` (read by `factor`), the
/// global norm clipped at 1 and the AdamW-updated (lr 1e-3, weight decay 1e-2) values
/// of `keys`, each checked against the reference (`loss`, `grad.{key}`, `grad_norm`,
/// `param.{key}`).
fn check_sdxl_recipe_step<M: Module>(
    r: &Reference,
    device: &Device,
    model: M,
    predict: impl Fn(&M, Tensor<4>, Tensor<1>) -> Tensor<4>,
    factor: impl Fn(&M, &str, Option<&GradientsParams>) -> Vec<f32>,
    keys: &[String],
) {
    let dir = DiffusersDir::open(fixture("tiny-sdxl")).unwrap();
    let objective = Objective::from_config(
        &SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap(),
    )
    .unwrap();
    let latents: Tensor<4> = r.tensor("latents", device);
    let noise: Tensor<4> = r.tensor("noise", device);
    let timesteps: Vec<usize> = r.floats("timesteps").iter().map(|&t| t as usize).collect();
    assert_eq!(timesteps, [100, 700]);
    let t = Tensor::<1>::from_floats([100.0, 700.0], device);
    let noisy = objective.add_noise(latents.clone(), noise.clone(), &timesteps);
    let target = objective.target(latents, noise, &timesteps);
    let loss = objective.loss(predict(&model, noisy, t), target, &timesteps);
    assert_close(
        "loss",
        &[loss.clone().into_scalar::<f32>()],
        &r.floats("loss"),
        1e-5,
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    for k in keys {
        assert_close(
            &format!("grad {k}"),
            &factor(&model, k, Some(&grads)),
            &r.floats(&format!("grad.{k}")),
            1e-4,
        );
    }
    let (grads, norm) = clip_grad_norm(&model, grads, Some(1.0));
    assert_close("grad norm", &[norm as f32], &r.floats("grad_norm"), 1e-4);
    let mut optim = diffusers_adamw().init();
    let model = optim.step(1e-3, model, grads);
    for k in keys {
        assert_close(
            &format!("param {k}"),
            &factor(&model, k, None),
            &r.floats(&format!("param.{k}")),
            1e-4,
        );
    }
}

/// SDXL LoRA training as diffusers' `train_text_to_image_lora_sdxl.py`
/// (`scripts/make_sdxl_training_reference.py`, the tiny SDXL): the trainer prepares
/// the data folder's 32x40 picture as the recipe does (both encoders' penultimate
/// states, the pooled embedding, time ids from the file's size and the centre crop,
/// the VAE's moments); one LoRA step from the recipe's saved initial LoRA gives its
/// loss, global gradient norm, gradients and AdamW-updated factors. Then a short run
/// writes a LoRA that the SDXL pipeline loads.
#[test]
fn sdxl_lora_training_step_matches_diffusers() {
    use stable_diffusion::io::{LoraComponent, LoraFile};
    use stable_diffusion::models::lora::{
        LoraConfig, LoraTargets, attach_trainable_lora, load_lora_factors,
    };
    let r = Reference::open("reference/training_sdxl.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let mut config = train_config(&fixture("training_sdxl/data"), &tmp.path().join("run"));
    config.model = fixture("tiny-sdxl");
    config.cache_latents = true;
    config.center_crop = true;
    config.random_flip = false;
    config.validation_images = 0;
    config.caption_dropout = 0.0;
    config.batch_size = 1;
    config.gradient_accumulation = 1;
    config.ema_decay = None;
    config.max_steps = 2;
    config.checkpoint_every = 2;
    config.sample_prompts = vec!["a red circle".into()];
    config.lora = Some(LoraTrainConfig {
        rank: 4,
        alpha: 4.0,
        train_text_encoder: false,
    });
    let trainer = Trainer::new(config, Device::flex()).unwrap();
    let (cond, moments) = trainer.prepared(0).unwrap();
    assert_close(
        "prompt_embeds",
        &values(cond.embedding.clone()),
        &r.floats("prompt_embeds"),
        1e-5,
    );
    let pooled = cond.pooled.clone().unwrap();
    assert_close(
        "pooled",
        &values(pooled),
        &r.floats("pooled_prompt_embeds"),
        1e-5,
    );
    assert_eq!(
        values(cond.time_ids.clone().unwrap()),
        r.floats("add_time_ids")
    );
    let c = moments.dims()[1] / 2;
    let mut parts = moments.split(c, 1);
    assert_close(
        "moments logvar",
        &values(parts.pop().unwrap()),
        &r.floats("moments_logvar"),
        1e-4,
    );
    assert_close(
        "moments mean",
        &values(parts.pop().unwrap()),
        &r.floats("moments_mean"),
        1e-4,
    );

    // One step of the recipe from its initial LoRA.
    let device = Device::flex().autodiff();
    let dir = DiffusersDir::open(fixture("tiny-sdxl")).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 4.0,
        targets: LoraTargets::unet_attention(),
    };
    let unet = attach_trainable_lora(
        dir.unet(&device, &ComponentOptions::default()).unwrap(),
        &lora,
    )
    .unwrap();
    let initial = LoraFile::open(fixture(
        "training_sdxl/initial_lora/pytorch_lora_weights.safetensors",
    ))
    .unwrap()
    .weights_for(LoraComponent::Unet, &unet)
    .unwrap();
    let unet = stable_param_ids(load_lora_factors(unet, &initial).unwrap());
    const MODULES: [&str; 4] = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.0.transformer_blocks.2.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0",
    ];
    let keys = || {
        MODULES
            .iter()
            .flat_map(|m| [format!("{m}.down"), format!("{m}.up")])
    };
    for k in keys() {
        assert_eq!(
            lora_factor(&unet, &k, None),
            r.floats(&format!("initial.{k}")),
            "{k}"
        );
    }
    let keys: Vec<String> = keys().collect();
    let row = |k: &str| r.tensor::<2>(k, &device).repeat_dim(0, 2);
    let added = stable_diffusion::core::AddedConditioning {
        text_embeds: Some(row("pooled_prompt_embeds")),
        time_ids: Some(row("add_time_ids")),
        ..Default::default()
    };
    let context = r.tensor::<3>("prompt_embeds", &device).repeat_dim(0, 2);
    check_sdxl_recipe_step(
        &r,
        &device,
        unet,
        |unet, noisy, t| {
            unet.forward_added_with_intermediates(noisy, t, context.clone(), &added, |_, _| {})
        },
        lora_factor,
        &keys,
    );

    // A short run: an SDXL LoRA (and a sample grid through the SDXL pipeline) that the
    // pipeline loads.
    trainer.run(|_| {}).unwrap();
    let file = tmp.path().join("run/pytorch_lora_weights.safetensors");
    assert!(tmp.path().join("run/samples/step-000002.png").exists());
    use stable_diffusion::prelude::*;
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &Device::flex(),
        &LoadOptions {
            loras: vec![LoraSpec {
                path: file,
                strength: 1.0,
            }],
            ..Default::default()
        },
    )
    .unwrap();
    let out = pipe
        .generate(GenerationRequest::new("a red circle").size(32, 32).steps(2))
        .unwrap();
    assert_eq!(out.images.len(), 1);
}

/// `--train_text_encoder` for SDXL (`scripts/make_sdxl_training_reference.py`, part
/// 2): LoRA factors on the U-Net and on both text encoders, loaded from the recipe's
/// saved initial LoRA (transformers 5 writes the first encoder's keys without
/// `text_model.`, in diffusers' `lora_linear_layer` naming); the caption encoded with
/// gradients through `CaptionEncoder::encode_with`; loss, gradients of factors of the
/// U-Net and of both encoders, the global norm and the AdamW step match. Then a run
/// with `train_text_encoder` writes a LoRA with all three components, which the SDXL
/// pipeline loads.
#[test]
fn sdxl_text_encoder_lora_training_step_matches_diffusers() {
    use stable_diffusion::io::{LoraComponent, LoraFile};
    use stable_diffusion::train::{CaptionEncoder, Conditioning, TrainedModels};
    let r = Reference::open("reference/training_sdxl_te.safetensors");
    let device = Device::flex().autodiff();
    let lora = LoraTrainConfig {
        rank: 4,
        alpha: 4.0,
        train_text_encoder: true,
    };
    let initial = fixture("training_sdxl/initial_lora_te/pytorch_lora_weights.safetensors");
    let models =
        TrainedModels::load(&fixture("tiny-sdxl"), Some(&lora), Some(&initial), &device).unwrap();
    assert_eq!(models.text_encoders.len(), 2);
    let unet_modules = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.0.transformer_blocks.2.attn2.to_k",
    ];
    let te_modules = [
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_model.encoder.layers.1.self_attn.out_proj",
    ];
    let mut watch = Vec::new();
    for (model, modules) in [
        ("unet", &unet_modules),
        ("te1", &te_modules),
        ("te2", &te_modules),
    ] {
        for m in modules.iter() {
            for which in ["down", "up"] {
                watch.push((model, format!("{m}.{which}")));
            }
        }
    }
    let factor =
        |models: &TrainedModels, model: &str, key: &str, g: Option<&GradientsParams>| match model {
            "unet" => lora_factor(&models.unet, key, g),
            "te1" => lora_factor(&models.text_encoders[0], key, g),
            _ => lora_factor(&models.text_encoders[1], key, g),
        };
    for (model, key) in &watch {
        assert_eq!(
            factor(&models, model, key, None),
            r.floats(&format!("initial.{model}.{key}")),
            "initial {model} {key}"
        );
    }
    let dir = DiffusersDir::open(fixture("tiny-sdxl")).unwrap();
    let captions = CaptionEncoder::from_dir(&dir, &Device::flex()).unwrap();
    let cond = captions
        .encode_with(
            "a red circle on a blue square",
            &models.text_encoders,
            &device,
        )
        .unwrap()
        .with_time_ids((40, 32), (4, 0), (32, 32));
    assert_close(
        "prompt_embeds",
        &values(cond.embedding.clone()),
        &r.floats("prompt_embeds"),
        1e-5,
    );
    assert_close(
        "pooled",
        &values(cond.pooled.clone().unwrap()),
        &r.floats("pooled_prompt_embeds"),
        1e-5,
    );
    let (context, added) = Conditioning::batch(&[cond.clone(), cond]);
    let keys: Vec<String> = watch.iter().map(|(m, k)| format!("{m}.{k}")).collect();
    check_sdxl_recipe_step(
        &r,
        &device,
        models,
        |models, noisy, t| {
            models.unet.forward_added_with_intermediates(
                noisy,
                t,
                context.clone(),
                &added,
                |_, _| {},
            )
        },
        |models, key, grads| {
            let (model, key) = key.split_once('.').unwrap();
            factor(models, model, key, grads)
        },
        &keys,
    );

    // A run that trains the text encoders too writes all three components.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = train_config(&fixture("training_sdxl/data"), &tmp.path().join("run"));
    config.model = fixture("tiny-sdxl");
    config.validation_images = 0;
    config.caption_dropout = 0.5;
    config.batch_size = 1;
    config.gradient_accumulation = 1;
    config.max_steps = 2;
    config.sample_prompts = vec!["a red circle".into()];
    config.lora = Some(lora);
    let trainer = Trainer::new(config, Device::flex()).unwrap();
    let trained = trainer.run(|_| {}).unwrap();
    let file = LoraFile::open(tmp.path().join("run/pytorch_lora_weights.safetensors")).unwrap();
    for (component, model) in [
        (LoraComponent::TextEncoder, &trained.text_encoders[0]),
        (LoraComponent::TextEncoder2, &trained.text_encoders[1]),
    ] {
        let w = file.weights_for(component, model).unwrap();
        assert!(!w.layers.is_empty(), "{component:?} saved");
    }
    use stable_diffusion::prelude::*;
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sdxl"),
        &Device::flex(),
        &LoadOptions {
            loras: vec![LoraSpec {
                path: tmp.path().join("run/pytorch_lora_weights.safetensors"),
                strength: 1.0,
            }],
            ..Default::default()
        },
    )
    .unwrap();
    pipe.generate(GenerationRequest::new("a red circle").size(32, 32).steps(2))
        .unwrap();
}

/// ControlNet training in the trainer (`TrainConfig::controlnet`, diffusers'
/// `train_controlnet.py` recipe, whose loss and step `controlnet_training_step_matches_diffusers`
/// checks): the tiny data set with an outline per picture in `data/conditioning/`, a
/// ControlNet copied from the tiny SD 1.5 U-Net. The U-Net stays as it was, the
/// ControlNet's zero convolutions learn, checkpoints (with EMA) and the exported
/// diffusers folder are written, an interrupted run resumes exactly, and the exported
/// ControlNet draws through the pipeline.
#[test]
fn controlnet_training_runs_checkpoints_resumes_and_exports() {
    use stable_diffusion::train::ControlNetTrainConfig;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_data_set(&data);
    std::fs::create_dir_all(data.join("conditioning")).unwrap();
    for i in 0..4 {
        // A white outline of the square on black, where the picture has it.
        let mut px = vec![0u8; 32 * 32 * 3];
        for y in 8..24 {
            for x in 8..24 {
                if y == 8 || y == 23 || x == 8 || x == 23 {
                    px[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3].copy_from_slice(&[255; 3]);
                }
            }
        }
        let path = data.join(format!("conditioning/{i:02}.png"));
        stable_diffusion::io::image::write_png_rgb8(&path, 32, 32, &px, None).unwrap();
    }
    let config = |out: &str, steps: usize| {
        let mut c = train_config(&data, &tmp.path().join(out));
        c.controlnet = Some(ControlNetTrainConfig {
            conditioning_embedding_out_channels: vec![16, 32],
            ..Default::default()
        });
        c.caption_dropout = 0.0;
        c.max_steps = steps;
        c
    };
    let cn_values = |m: &stable_diffusion::train::TrainedModels| {
        let cn = m.controlnet.as_ref().unwrap();
        let (_, w) = param_by_path::<4, _>(cn, "controlnet_mid_block.weight").unwrap();
        let (_, c) = param_by_path::<4, _>(cn, "controlnet_down_blocks.0.weight").unwrap();
        let mut v = values(w);
        v.extend(values(c));
        v
    };
    let a = Trainer::new(config("a", 4), Device::flex())
        .unwrap()
        .run(|_| {})
        .unwrap();
    let base = DiffusersDir::open(fixture("tiny-sd15"))
        .unwrap()
        .unet(&Device::flex(), &ComponentOptions::default())
        .unwrap();
    assert_eq!(
        unet_values(&a.unet),
        unet_values(&base),
        "the U-Net is frozen"
    );
    assert!(
        cn_values(&a).iter().any(|v| *v != 0.0),
        "the zero convolutions learned"
    );
    let out_a = tmp.path().join("a");
    for f in [
        "samples/step-000002.png",
        "checkpoint-2/controlnet/config.json",
        "checkpoint-4/controlnet/diffusion_pytorch_model.safetensors",
        "checkpoint-4/ema_controlnet/config.json",
        "controlnet/config.json",
        "controlnet/diffusion_pytorch_model.safetensors",
    ] {
        assert!(out_a.join(f).exists(), "{f} written");
    }

    // Interrupted after two steps, then resumed.
    Trainer::new(config("b", 2), Device::flex())
        .unwrap()
        .run(|_| {})
        .unwrap();
    let b = Trainer::new(config("b", 4), Device::flex())
        .unwrap()
        .run(|_| {})
        .unwrap();
    let (d, _) = max_diff(&cn_values(&b), &cn_values(&a));
    assert!(
        d <= 1e-6,
        "a resumed ControlNet run continues exactly ({d})"
    );

    // The exported folder is a ControlNet the pipeline uses.
    use stable_diffusion::prelude::*;
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &Device::flex(),
        &LoadOptions {
            controlnets: vec![out_a.join("controlnet")],
            ..Default::default()
        },
    )
    .unwrap();
    pipe.generate(
        GenerationRequest::new("a red square")
            .size(32, 32)
            .steps(2)
            .control(ControlInput::new(0, data.join("conditioning/00.png"))),
    )
    .unwrap();
}
