//! LoRA: files made by diffusers (its own layout and kohya's) applied to the tiny
//! U-Net match diffusers' adapted outputs (`scripts/make_training_reference.py`),
//! merged and on the fly; zero-initialised LoRA changes nothing; saved LoRAs and
//! checkpoints read back identically.

use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::io::{
    ComponentOptions, DiffusersDir, LoraComponent, LoraFile, LoraFormat, LoraToSave, save_lora,
    save_unet,
};
use stable_diffusion::models::UNet2DConditionModel;
use stable_diffusion::models::lora::{
    LoraConfig, LoraMode, LoraTargets, apply_lora, attach_trainable_lora, extract_lora, merge_lora,
};

use crate::common::{Reference, fixture};

fn unet(device: &Device) -> UNet2DConditionModel {
    DiffusersDir::open(fixture("tiny-sd15"))
        .unwrap()
        .unet(device, &ComponentOptions::default())
        .unwrap()
}

fn inputs(device: &Device) -> (Tensor<4>, Tensor<1>, Tensor<3>) {
    let r = Reference::open("reference/training.safetensors");
    let t: Vec<f32> = r.ints("timesteps").iter().map(|&t| t as f32).collect();
    (
        r.tensor("latents", device),
        Tensor::<1>::from_floats(t.as_slice(), device),
        r.tensor("context", device),
    )
}

fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn diffusers_and_kohya_loras_match_diffusers() {
    let device = Device::flex();
    let r = Reference::open("reference/lora.safetensors");
    let adapted: Tensor<4> = r.tensor("adapted", &device);
    let base: Tensor<4> = r.tensor("base", &device);
    let (x, t, ctx) = inputs(&device);
    let model = unet(&device);
    let out = model.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    assert!(max_diff(out, base.clone()) < 1e-5);
    for (file, format) in [
        (
            "lora/tiny_unet_lora_diffusers.safetensors",
            LoraFormat::Diffusers,
        ),
        ("lora/tiny_unet_lora_kohya.safetensors", LoraFormat::Kohya),
    ] {
        let lora = LoraFile::open(fixture(file)).unwrap();
        assert_eq!(lora.format(), format);
        let weights = lora.weights_for(LoraComponent::Unet, &model).unwrap();
        assert_eq!(
            weights.len(),
            11 * 2 * 4,
            "{file}: every attention projection"
        );
        for mode in [LoraMode::Merge, LoraMode::OnTheFly] {
            let m = apply_lora(model.clone(), &[(&weights, 1.0)], mode).unwrap();
            let y = m.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
            let d = max_diff(y, adapted.clone());
            eprintln!("{file} {mode:?}: max |ours - diffusers| = {d:.3e}");
            assert!(d < 1e-5, "{file} {mode:?}: {d}");
        }
        // Strength 0 is the base model.
        let m = apply_lora(model.clone(), &[(&weights, 0.0)], LoraMode::OnTheFly).unwrap();
        let d = max_diff(
            m.forward(x.clone(), t.clone(), ctx.clone()).unwrap(),
            base.clone(),
        );
        assert!(d < 1e-5);
    }
}

#[test]
fn lora_for_another_model_is_a_clear_error() {
    let device = Device::flex();
    let lora = LoraFile::open(fixture("lora/tiny_unet_lora_kohya.safetensors")).unwrap();
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let te = dir
        .text_encoder(&device, &ComponentOptions::default())
        .unwrap();
    // The U-Net layers do not name text-encoder modules.
    let err = lora
        .weights_for(LoraComponent::Unet, &te)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("name weights this model does not have"),
        "{err}"
    );
    assert!(!lora.has(LoraComponent::TextEncoder));
}

#[test]
fn zero_initialised_lora_changes_nothing_and_merging_equals_on_the_fly() {
    let device = Device::flex();
    let (x, t, ctx) = inputs(&device);
    let model = unet(&device);
    let base = model.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    let config = LoraConfig {
        rank: 4,
        alpha: 4.0,
        targets: LoraTargets::unet_attention(),
    };
    let trainable = attach_trainable_lora(model.clone(), &config).unwrap();
    let y = trainable
        .forward(x.clone(), t.clone(), ctx.clone())
        .unwrap();
    assert_eq!(
        max_diff(y, base.clone()),
        0.0,
        "up = 0 leaves the outputs as they were"
    );

    // Give the up factors values, as training would, then compare merge and on-the-fly.
    let mut weights = extract_lora(&trainable, &config);
    assert_eq!(weights.len(), 11 * 2 * 4);
    for (i, layer) in weights.layers.values_mut().enumerate() {
        for (j, v) in layer.up.iter_mut().enumerate() {
            *v = (((i * 31 + j * 7) % 13) as f32 - 6.0) * 0.01;
        }
    }
    let on_the_fly = apply_lora(model.clone(), &[(&weights, 0.8)], LoraMode::OnTheFly).unwrap();
    let merged = apply_lora(model.clone(), &[(&weights, 0.8)], LoraMode::Merge).unwrap();
    let a = on_the_fly
        .forward(x.clone(), t.clone(), ctx.clone())
        .unwrap();
    let b = merged.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    let c = merge_lora(on_the_fly.clone())
        .forward(x.clone(), t.clone(), ctx.clone())
        .unwrap();
    assert!(max_diff(a.clone(), base) > 1e-3, "the LoRA acts");
    assert!(max_diff(a.clone(), b) < 1e-5, "merged equals on the fly");
    assert!(max_diff(a, c) < 1e-5, "materialised equals on the fly");
    // Applying on the fly twice is refused.
    assert!(apply_lora(on_the_fly, &[(&weights, 1.0)], LoraMode::OnTheFly).is_err());

    // Both file layouts read back what was written.
    let dir = tempfile::tempdir().unwrap();
    for format in [LoraFormat::Kohya, LoraFormat::Diffusers] {
        let path = dir.path().join(format!("{format:?}.safetensors"));
        save_lora(
            &path,
            &[LoraToSave::new(LoraComponent::Unet, &weights, &model)],
            format,
            DType::F32,
        )
        .unwrap();
        let back = LoraFile::open(&path).unwrap();
        assert_eq!(back.format(), format);
        let read = back.weights_for(LoraComponent::Unet, &model).unwrap();
        assert_eq!(read.layers.len(), weights.layers.len());
        for (k, l) in &weights.layers {
            let r = &read.layers[k];
            assert_eq!((r.rank, r.fan_in, r.fan_out), (l.rank, l.fan_in, l.fan_out));
            assert_eq!(r.down, l.down, "{format:?} {k}");
            assert_eq!(r.up, l.up, "{format:?} {k}");
            assert_eq!(r.alpha, Some(4.0));
        }
    }
}

#[test]
fn saved_checkpoint_reloads_bit_identically() {
    let device = Device::flex();
    let dir = DiffusersDir::open(fixture("tiny-sd15")).unwrap();
    let model = dir.unet(&device, &ComponentOptions::default()).unwrap();
    let config = dir.unet_config().unwrap();
    let out = tempfile::tempdir().unwrap();
    save_unet(&model, &config, out.path().join("unet"), DType::F32).unwrap();
    // The same keys, shapes and bytes as diffusers' own file.
    let ours = stable_diffusion::io::WeightSource::open(
        out.path().join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let theirs = stable_diffusion::io::WeightSource::open(fixture(
        "tiny-sd15/unet/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    assert_eq!(
        ours.tensors().keys().collect::<Vec<_>>(),
        theirs.tensors().keys().collect::<Vec<_>>()
    );
    for (k, t) in theirs.tensors() {
        assert_eq!(ours.get(k).unwrap().shape, t.shape, "{k}");
        let a = ours.read_float(k, DType::F32, t.shape.clone()).unwrap();
        let b = theirs.read_float(k, DType::F32, t.shape.clone()).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes(), "{k}");
    }
    let reloaded = stable_diffusion::io::model::unet_from_dir(
        &out.path().join("unet"),
        &device,
        &ComponentOptions::default(),
    )
    .unwrap();
    let (x, t, ctx) = inputs(&device);
    let a = model.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    let b = reloaded.forward(x, t, ctx).unwrap();
    assert_eq!(max_diff(a, b), 0.0);
}
