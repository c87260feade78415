//! SD 2.x single files keep the text encoder in OpenCLIP's layout
//! (`cond_stage_model.model.*`, fused q/k/v). A file in that layout made from the tiny
//! fixture's weights must give the same text-encoder outputs as the diffusers folder.

use crate::common;

use std::collections::BTreeMap;

use common::{Reference, assert_close, fixture};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::HiddenLayer;
use stable_diffusion::io::{ComponentOptions, IoError, SingleFile};

fn f32s(st: &safetensors::SafeTensors<'_>, key: &str) -> (Vec<usize>, Vec<f32>) {
    let v = st.tensor(key).unwrap();
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (v.shape().to_vec(), data)
}

/// Writes the tiny model as an SD 2.x-style single file, `extra_layer` adding an
/// unused 6th resblock as OpenCLIP's 24th layer would be.
fn write_open_clip_checkpoint(path: &std::path::Path, extra_layer: bool, drop: Option<&str>) {
    let te_bytes = std::fs::read(fixture("tiny-sd15/text_encoder/model.safetensors")).unwrap();
    let te = safetensors::SafeTensors::deserialize(&te_bytes).unwrap();
    let mut out: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let p = "cond_stage_model.model.";
    out.insert(
        format!("{p}token_embedding.weight"),
        f32s(&te, "text_model.embeddings.token_embedding.weight"),
    );
    out.insert(
        format!("{p}positional_embedding"),
        f32s(&te, "text_model.embeddings.position_embedding.weight"),
    );
    for leaf in ["weight", "bias"] {
        out.insert(
            format!("{p}ln_final.{leaf}"),
            f32s(&te, &format!("text_model.final_layer_norm.{leaf}")),
        );
    }
    let layers = if extra_layer { 6 } else { 5 };
    for i in 0..layers {
        let src = i.min(4);
        let l = format!("text_model.encoder.layers.{src}.");
        let b = format!("{p}transformer.resblocks.{i}.");
        for leaf in ["weight", "bias"] {
            let mut shape = Vec::new();
            let mut fused = Vec::new();
            for q in ["q_proj", "k_proj", "v_proj"] {
                let (s, v) = f32s(&te, &format!("{l}self_attn.{q}.{leaf}"));
                shape = s;
                fused.extend(v);
            }
            shape[0] *= 3;
            out.insert(format!("{b}attn.in_proj_{leaf}"), (shape, fused));
            for (from, to) in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                out.insert(
                    format!("{b}{to}.{leaf}"),
                    f32s(&te, &format!("{l}{from}.{leaf}")),
                );
            }
        }
    }
    out.insert(
        format!("{p}text_projection"),
        (vec![32, 32], vec![0.0; 32 * 32]),
    );
    out.insert(format!("{p}logit_scale"), (vec![], vec![1.0]));
    if let Some(d) = drop {
        out.remove(d);
    }
    // U-Net and VAE from the SD 1.5-layout fixture (f16, kept as is).
    let ckpt_bytes = std::fs::read(fixture("tiny-sd15.safetensors")).unwrap();
    let ckpt = safetensors::SafeTensors::deserialize(&ckpt_bytes).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = out
        .into_iter()
        .map(|(k, (s, v))| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    for (k, v) in ckpt.tensors() {
        if !k.starts_with("cond_stage_model.") {
            views.push((k, v));
        }
    }
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn open_clip_single_file_text_encoder_matches_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sd2-style.safetensors");
    write_open_clip_checkpoint(&path, true, None);
    let device = Device::flex();
    let ckpt = SingleFile::open_with_configs(&path, fixture("tiny-sd15")).unwrap();
    let te = ckpt
        .text_encoder(&device, &ComponentOptions::default())
        .unwrap();
    let r = Reference::open("reference/text_encoder.safetensors");
    let ids = r.int_tensor::<2>("input_ids", &device);
    let out = te.forward(ids.clone(), HiddenLayer::Last).unwrap();
    assert_close(
        "open_clip last_hidden_state",
        &out.hidden_states,
        &r.floats("last_hidden_state"),
        1e-4,
    );
    assert_close(
        "open_clip pooler_output",
        &out.pooled,
        &r.floats("pooler_output"),
        1e-4,
    );
    let skip = te.forward(ids, HiddenLayer::Skip(1)).unwrap();
    assert_close(
        "open_clip clip skip",
        &skip.hidden_states,
        &r.floats("penultimate_hidden_state_final_ln"),
        1e-4,
    );
    // The U-Net and VAE of the same file still load.
    ckpt.unet(&device, &ComponentOptions::default()).unwrap();
    ckpt.vae(&device, &ComponentOptions::default()).unwrap();
}

#[test]
fn open_clip_missing_fused_tensor_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.safetensors");
    let key = "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight";
    write_open_clip_checkpoint(&path, false, Some(key));
    let ckpt = SingleFile::open_with_configs(&path, fixture("tiny-sd15")).unwrap();
    let err = ckpt
        .text_encoder(&Device::flex(), &ComponentOptions::default())
        .unwrap_err();
    let IoError::Weights { report, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(report.missing, vec![key.to_string()], "{err}");
}
