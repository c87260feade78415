//! Training against diffusers' recipe: two optimizer steps on the tiny U-Net
//! (`scripts/make_training_reference.py`): losses, gradients, the global gradient norm,
//! AdamW with clipping, and the EMA weights.

use stable_diffusion::burn::optim::{AdamWConfig, GradientsParams};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::{ComponentOptions, DiffusersDir};
use stable_diffusion::schedulers::SchedulerConfig;
use stable_diffusion::train::{Ema, Objective, clip_grad_norm, param_by_path, stable_param_ids};

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
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
    (d, m)
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
    let rank = if key.ends_with("bias") || key.contains("norm") { 1 } else if key.contains("conv") { 4 } else { 2 };
    let ours = match (rank, grads) {
        (1, None) => param_by_path::<1, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (2, None) => param_by_path::<2, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (4, None) => param_by_path::<4, _>(unet, &path).map(|(_, t)| torch_layout(t)),
        (1, Some(g)) => param_by_path::<1, _>(unet, &path).and_then(|(id, _)| g.get::<1>(id)).map(torch_layout),
        (2, Some(g)) => param_by_path::<2, _>(unet, &path).and_then(|(id, _)| g.get::<2>(id)).map(torch_layout),
        (_, Some(g)) => param_by_path::<4, _>(unet, &path).and_then(|(id, _)| g.get::<4>(id)).map(torch_layout),
        _ => None,
    }
    .unwrap_or_else(|| panic!("{label}: no parameter `{path}`"));
    let (d, m) = max_diff(&ours, reference);
    eprintln!("{label} {key}: max |ours - diffusers| = {d:.3e} (max |ref| {m:.3e})");
    assert!(d <= rel_tol * m.max(1e-3), "{label} {key}: {d} > {rel_tol} * {m}");
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
    let mut objective =
        Objective::from_config(&SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap())
            .unwrap();
    let latents: Tensor<4> = r.tensor("latents", &device);
    let noise: Tensor<4> = r.tensor("noise", &device);
    let context: Tensor<3> = r.tensor("context", &device);
    let timesteps: Vec<usize> = r.ints("timesteps").iter().map(|&t| t as usize).collect();
    let t = Tensor::<1>::from_floats(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>().as_slice(),
        &device,
    );

    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(1e-2)
        .init();
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
        let pred = unet.forward(noisy, t.clone(), context.clone());
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
        assert!((norm - ref_norm).abs() <= 1e-4 * ref_norm, "grad norm {norm} vs {ref_norm}");
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
        check_param("ema", &ema.model, key, &r.floats(&format!("ema.{key}")), None, 1e-4);
    }
}
