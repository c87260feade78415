//! Bad weight files give clear errors naming the problem, never a panic: for each
//! fixture weight file a truncated copy, a copy with one tensor renamed and a copy
//! with one tensor's shape changed.

use crate::common;

use std::path::{Path, PathBuf};

use common::fixture;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::{ComponentOptions, DiffusersDir, IoError, SingleFile};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let mut perms = std::fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&target, perms).unwrap();
        }
    }
}

/// Rewrites a safetensors header through `edit`, keeping the data.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() - 1000]).unwrap();
}

fn rename_tensor(path: &Path, from: &str, to: &str) {
    edit_header(path, |h| {
        let v = h.remove(from).unwrap_or_else(|| panic!("no {from}"));
        h.insert(to.to_string(), v);
    });
}

/// Swaps the first two axes of a tensor's declared shape (same byte size).
fn reshape_tensor(path: &Path, key: &str) {
    edit_header(path, |h| {
        let shape = h[key]["shape"].as_array_mut().unwrap();
        shape.swap(0, 1);
    });
}

enum Component {
    Unet,
    Vae,
    TextEncoder,
}

fn load(dir: &Path, c: &Component, variant: Option<&str>) -> Result<(), IoError> {
    let device = Device::flex();
    let d = DiffusersDir::open(dir)?;
    let opts = ComponentOptions {
        variant: variant.map(String::from),
        ..Default::default()
    };
    match c {
        Component::Unet => d.unet(&device, &opts).map(|_| ()),
        Component::Vae => d.vae(&device, &opts).map(|_| ()),
        Component::TextEncoder => d.text_encoder(&device, &opts).map(|_| ()),
    }
}

fn check_component(
    folder: &str,
    file: &str,
    c: Component,
    variant: Option<&str>,
    key: &str,
    swappable: &str,
) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    copy_dir(&fixture(folder), &root);
    let path: PathBuf = root.join(file);
    let pristine = std::fs::read(&path).unwrap();
    load(&root, &c, variant).expect("the pristine copy loads");

    truncate(&path);
    let err = load(&root, &c, variant).unwrap_err();
    eprintln!("truncated: {err}");
    assert!(matches!(err, IoError::Safetensors { .. }), "{err}");
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );

    std::fs::write(&path, &pristine).unwrap();
    rename_tensor(&path, key, "renamed.tensor");
    let err = load(&root, &c, variant).unwrap_err();
    eprintln!("renamed: {err}");
    let IoError::Weights { report, .. } = &err else {
        panic!("expected a weights error, got {err}")
    };
    assert!(report.missing.iter().any(|k| k == key), "{err}");
    assert_eq!(report.unused, vec!["renamed.tensor".to_string()], "{err}");
    assert!(err.to_string().contains(key) && err.to_string().contains("renamed.tensor"));

    std::fs::write(&path, &pristine).unwrap();
    reshape_tensor(&path, swappable);
    let err = load(&root, &c, variant).unwrap_err();
    eprintln!("reshaped: {err}");
    let IoError::Weights { report, .. } = &err else {
        panic!("expected a weights error, got {err}")
    };
    assert_eq!(report.mismatched.len(), 1, "{err}");
    assert!(report.mismatched[0].starts_with(swappable), "{err}");
}

#[test]
fn corrupt_unet_files_are_reported() {
    check_component(
        "tiny-sd15",
        "unet/diffusion_pytorch_model.safetensors",
        Component::Unet,
        None,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
        "conv_in.weight",
    );
}

#[test]
fn corrupt_fp16_unet_files_are_reported() {
    check_component(
        "tiny-sd15",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        Component::Unet,
        Some("fp16"),
        "mid_block.resnets.1.conv2.bias",
        "up_blocks.0.resnets.0.conv1.weight",
    );
}

#[test]
fn corrupt_inpaint_unet_files_are_reported() {
    check_component(
        "tiny-sd15-inpaint",
        "unet/diffusion_pytorch_model.safetensors",
        Component::Unet,
        None,
        "conv_in.bias",
        "conv_in.weight",
    );
}

#[test]
fn corrupt_vae_files_are_reported() {
    check_component(
        "tiny-sd15",
        "vae/diffusion_pytorch_model.safetensors",
        Component::Vae,
        None,
        "decoder.mid_block.attentions.0.to_q.weight",
        "encoder.conv_out.weight",
    );
}

#[test]
fn corrupt_text_encoder_files_are_reported() {
    check_component(
        "tiny-sd15",
        "text_encoder/model.safetensors",
        Component::TextEncoder,
        None,
        "text_model.final_layer_norm.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
    );
}

#[test]
fn corrupt_single_file_checkpoints_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let load_all = |p: &Path| -> Result<(), IoError> {
        let ckpt = SingleFile::open_with_configs(p, fixture("tiny-sd15"))?;
        ckpt.unet(&device, &opts)?;
        ckpt.vae(&device, &opts)?;
        ckpt.text_encoder(&device, &opts)?;
        Ok(())
    };
    let pristine = std::fs::read(fixture("tiny-sd15.safetensors")).unwrap();

    std::fs::write(&path, &pristine).unwrap();
    truncate(&path);
    let err = load_all(&path).unwrap_err();
    assert!(matches!(err, IoError::Safetensors { .. }), "{err}");

    let key = "first_stage_model.decoder.mid.attn_1.q.weight";
    std::fs::write(&path, &pristine).unwrap();
    rename_tensor(
        &path,
        key,
        "first_stage_model.decoder.mid.attn_1.query.weight",
    );
    let err = load_all(&path).unwrap_err();
    eprintln!("{err}");
    let IoError::Weights {
        component, report, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(component, "vae");
    assert_eq!(report.missing, vec![key.to_string()]);
    assert_eq!(
        report.unused,
        vec!["first_stage_model.decoder.mid.attn_1.query.weight".to_string()]
    );

    let key = "model.diffusion_model.input_blocks.0.0.weight";
    std::fs::write(&path, &pristine).unwrap();
    reshape_tensor(&path, key);
    let err = load_all(&path).unwrap_err();
    eprintln!("{err}");
    let IoError::Weights {
        component, report, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(component, "unet");
    assert!(report.mismatched[0].starts_with(key), "{err}");
}

#[test]
fn missing_files_and_pickles_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let err = DiffusersDir::open(tmp.path().join("nope")).unwrap_err();
    assert!(matches!(err, IoError::NotFound { .. }), "{err}");
    let dir = DiffusersDir::open(tmp.path()).unwrap();
    let err = dir
        .unet(&Device::flex(), &ComponentOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    let ckpt = tmp.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not really").unwrap();
    let err = SingleFile::open(&ckpt).unwrap_err();
    assert!(matches!(err, IoError::Unsupported(_)), "{err}");
    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\xff\xff\xff\xff\xff\xff\xff\xffxx").unwrap();
    let err = SingleFile::open(&garbage).unwrap_err();
    assert!(matches!(err, IoError::Safetensors { .. }), "{err}");
}

#[test]
fn int_tensor_in_place_of_a_float_is_a_dtype_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    copy_dir(&fixture("tiny-sd15"), &root);
    let path = root.join("vae/diffusion_pytorch_model.safetensors");
    edit_header(&path, |h| {
        // Same byte size: 4 x f32 = 2 x i64.
        let t = h.get_mut("post_quant_conv.bias").unwrap();
        t["dtype"] = "I64".into();
        t["shape"] = serde_json::json!([2]);
    });
    let err = load(&root, &Component::Vae, None).unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains("post_quant_conv.bias: dtype I64"),
        "{err}"
    );
}

/// Rewrites a safetensors file with every float tensor converted by `convert`
/// (`dtype` is the new on-disk dtype), or split into shards.
fn rewrite(
    path: &Path,
    out: &Path,
    dtype: safetensors::Dtype,
    convert: impl Fn(f32) -> Vec<u8>,
    keep: impl Fn(&str) -> bool,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if !keep(&name) {
            continue;
        }
        let vals: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let b: Vec<u8> = vals.iter().flat_map(|v| convert(*v)).collect();
        data.push((name, view.shape().to_vec(), b));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, out).unwrap();
}

#[test]
fn sharded_weights_load_like_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    copy_dir(&fixture("tiny-sd15"), &root);
    let unet = root.join("unet");
    let whole = unet.join("diffusion_pytorch_model.safetensors");
    let f32le = |v: f32| v.to_le_bytes().to_vec();
    rewrite(
        &whole,
        &unet.join("part-1.safetensors"),
        safetensors::Dtype::F32,
        f32le,
        |k| k.starts_with("down_blocks"),
    );
    rewrite(
        &whole,
        &unet.join("part-2.safetensors"),
        safetensors::Dtype::F32,
        f32le,
        |k| !k.starts_with("down_blocks"),
    );
    let bytes = std::fs::read(&whole).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = st
        .names()
        .into_iter()
        .map(|k| {
            let f = if k.starts_with("down_blocks") {
                "part-1.safetensors"
            } else {
                "part-2.safetensors"
            };
            (k.to_string(), serde_json::Value::from(f))
        })
        .collect();
    std::fs::remove_file(&whole).unwrap();
    std::fs::remove_file(unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let device = Device::flex();
    let dir = DiffusersDir::open(&root).unwrap();
    assert!(
        dir.unet_weights(None)
            .unwrap()
            .to_string_lossy()
            .ends_with(".index.json")
    );
    let unet = dir.unet(&device, &ComponentOptions::default()).unwrap();
    let r = common::Reference::open("reference/unet.safetensors");
    let out = unet
        .forward(
            r.tensor::<4>("sample", &device),
            r.tensor::<1>("timestep_t500_float", &device),
            r.tensor::<3>("encoder_hidden_states", &device),
        )
        .unwrap();
    common::assert_close("sharded unet out_t500", &out, &r.floats("out_t500"), 1e-4);
}

#[test]
fn bf16_weights_are_converted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("model");
    copy_dir(&fixture("tiny-sd15"), &root);
    let path = root.join("vae/diffusion_pytorch_model.safetensors");
    let original = root.join("vae/original.safetensors");
    std::fs::rename(&path, &original).unwrap();
    rewrite(
        &original,
        &path,
        safetensors::Dtype::BF16,
        |v| half::bf16::from_f32(v).to_le_bytes().to_vec(),
        |_| true,
    );
    std::fs::remove_file(&original).unwrap();
    let device = Device::flex();
    let vae = DiffusersDir::open(&root)
        .unwrap()
        .vae(&device, &ComponentOptions::default())
        .unwrap();
    let w = vae.encoder.conv_in.weight.val();
    assert_eq!(w.dtype(), stable_diffusion::burn::tensor::DType::F32);
    // Every value is exactly the bf16 rounding of the f32 original.
    let src = common::Reference::open("tiny-sd15/vae/diffusion_pytorch_model.safetensors");
    let want: Vec<f32> = src
        .floats("encoder.conv_in.weight")
        .into_iter()
        .map(|v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(w.to_data().try_to_vec::<f32>().unwrap(), want);
}
