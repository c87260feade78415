//! SD 3 / SD 3.5 original single files (issue 27): the MMDiT in its original naming
//! (fused `qkv`, swapped final modulations), the VAE and T5 as the files hold them,
//! made by `tests/fixtures/gen/sd3_single_file.py` and checked there with diffusers'
//! `from_single_file`. Here: every parameter equals the folder's, the transformers
//! match diffusers' outputs, the configs read from the tensors equal the folders',
//! and the owning pipeline generates diffusers' pictures from the file with the CLIP
//! encoders from the config folder or from files of their own.

use crate::common;

use common::{Reference, assert_close, fixture};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::sd3::read_sd3_transformer_config;
use stable_diffusion::io::sd3_single_file::{
    CLIP_G_PREFIX, CLIP_L_PREFIX, TextEncoderFile, recognise_text_encoder_file,
};
use stable_diffusion::io::{ComponentOptions, DiffusersDir, Sd3SingleFile, WeightSource};
use stable_diffusion::pipelines::{LoadOptions, ModelFamily, StableDiffusionPipeline};

fn assert_same<M: stable_diffusion::burn::module::Module>(what: &str, a: &M, b: &M) {
    let (a, b) = (common::module_parameters(a), common::module_parameters(b));
    assert_eq!(a.len(), b.len(), "{what}: parameter count");
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb, "{what}");
        assert!(va == vb, "{what}: {ka} differs");
    }
}

/// The MMDiT-X transformer alone under `model.diffusion_model.`: its
/// config comes from the tensors (dual attention layers, RMS q/k norms, head width
/// from `ln_q`, the position table's side) and its parameters and outputs equal the
/// folder's and diffusers'.
#[test]
fn mmditx_single_file_reads_its_config_and_weights() {
    let device = Device::flex();
    let file = Sd3SingleFile::open(fixture("tiny-sd35-mmditx.safetensors")).unwrap();
    let dir = fixture("tiny-sd35-transformer");
    let expected = read_sd3_transformer_config(&dir.join("config.json")).unwrap();
    assert_eq!(file.transformer_config(), &expected);
    let opts = ComponentOptions::default();
    let from_file = file.transformer(&device, &opts).unwrap();
    let from_dir =
        stable_diffusion::io::sd3::sd3_transformer_from_dir(&dir, &device, &opts).unwrap();
    assert_same("MMDiT-X", &from_file, &from_dir);
    let r = Reference::open("reference/sd3/components.safetensors");
    let out = from_file
        .forward(
            r.tensor::<4>("transformer.sample", &device),
            r.tensor::<1>("transformer.timestep", &device),
            r.tensor::<3>("transformer.encoder_hidden_states", &device),
            r.tensor::<2>("transformer.pooled_projections", &device),
            &[],
        )
        .unwrap();
    assert_close(
        "mmditx from file",
        &out,
        &r.floats("transformer.sd35.out"),
        1e-4,
    );
}

/// `tiny-sd3.safetensors` with the folder's configs: MMDiT, VAE and T5 equal the
/// folder's; it holds no CLIP encoder. CLIP-L / CLIP-G written into a copy under
/// `text_encoders.clip_{l,g}.transformer.` load from there, and from files of their
/// own, equal to the folder's.
#[test]
fn sd3_single_file_components_equal_the_folders() {
    let device = Device::flex();
    let opts = ComponentOptions::default();
    let folder = DiffusersDir::open(fixture("tiny-sd3")).unwrap();
    let path = fixture("tiny-sd3.safetensors");
    let file = Sd3SingleFile::open_with_configs(&path, folder.root()).unwrap();
    assert_eq!(file.has_text_encoders(), [false, false, true]);
    assert!(file.has_vae());
    assert_same(
        "transformer",
        &file.transformer(&device, &opts).unwrap(),
        &folder.sd3_transformer(&device, &opts).unwrap(),
    );
    assert_same(
        "vae",
        &file.vae(&device, &opts).unwrap(),
        &folder.vae(&device, &opts).unwrap(),
    );
    let t5_config = stable_diffusion::io::sd3::read_t5_config(
        &folder.root().join("text_encoder_3/config.json"),
    )
    .unwrap();
    assert_same(
        "t5",
        &file
            .text_encoder_3(&t5_config, &device, &opts)
            .unwrap()
            .unwrap(),
        &folder.text_encoder_3(&device, &opts).unwrap(),
    );
    let clip_l = folder.text_encoder(&device, &opts).unwrap();
    let clip_g = folder.text_encoder_2(&device, &opts).unwrap();
    let configs = ["text_encoder", "text_encoder_2"].map(|c| {
        stable_diffusion::io::model::with_projection(
            stable_diffusion::io::model::read_text_encoder_config(
                &folder.root().join(c).join("config.json"),
            )
            .unwrap(),
        )
    });
    assert!(
        file.clip_text_encoder(0, &configs[0], &device, &opts)
            .unwrap()
            .is_none()
    );
    // Files of their own, as ComfyUI keeps them, recognised by their tensors.
    for (i, expected) in [&clip_l, &clip_g].into_iter().enumerate() {
        let own = folder
            .root()
            .join(["text_encoder", "text_encoder_2"][i])
            .join("model.safetensors");
        let kind = recognise_text_encoder_file(&WeightSource::open(&own).unwrap());
        assert_eq!(
            kind,
            Some(TextEncoderFile::Clip {
                width: configs[i].hidden_size
            })
        );
        let model = stable_diffusion::io::sd3_single_file::clip_text_encoder_from_file(
            &own,
            &configs[i],
            &device,
            &opts,
        )
        .unwrap();
        assert_same("clip from its own file", &model, expected);
    }
    let t5_own = folder.root().join("text_encoder_3/model.safetensors");
    assert_eq!(
        recognise_text_encoder_file(&WeightSource::open(&t5_own).unwrap()),
        Some(TextEncoderFile::T5)
    );
    // A copy that includes both CLIP encoders under `text_encoders.*`.
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("tiny-sd3-incl-clips.safetensors");
    write_with_clips(&path, &folder, &full);
    let file = Sd3SingleFile::open_with_configs(&full, folder.root()).unwrap();
    assert_eq!(file.has_text_encoders(), [true, true, true]);
    for (i, expected) in [&clip_l, &clip_g].into_iter().enumerate() {
        let model = file
            .clip_text_encoder(i, &configs[i], &device, &opts)
            .unwrap()
            .unwrap();
        assert_same("clip from text_encoders.*", &model, expected);
    }
}

/// Copies `src`'s tensors and the folder's CLIP encoders (prefixed as SD 3 files
/// that include them) into `dst`.
fn write_with_clips(src: &std::path::Path, folder: &DiffusersDir, dst: &std::path::Path) {
    use safetensors::tensor::TensorView;
    let sources = [
        (String::new(), WeightSource::open(src).unwrap()),
        (
            CLIP_L_PREFIX.to_string(),
            WeightSource::open(folder.root().join("text_encoder/model.safetensors")).unwrap(),
        ),
        (
            CLIP_G_PREFIX.to_string(),
            WeightSource::open(folder.root().join("text_encoder_2/model.safetensors")).unwrap(),
        ),
    ];
    let mut views = Vec::new();
    for (prefix, source) in &sources {
        for (key, t) in source.tensors() {
            let view =
                TensorView::new(t.dtype, t.shape.clone(), source.bytes(key).unwrap()).unwrap();
            views.push((format!("{prefix}{key}"), view));
        }
    }
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

/// The owning pipeline recognises the single file as SD 3 and generates diffusers'
/// `txt2img_euler` picture from it (`from_single_file(config=folder)`), with the
/// CLIP encoders from the config folder and, again, from files of their own; without
/// a config folder the missing encoders and T5's tokenizer are named.
#[test]
fn sd3_single_file_generates_as_diffusers() {
    let device = Device::flex();
    let folder = fixture("tiny-sd3");
    let path = fixture("tiny-sd3.safetensors");
    let case = common::Case::open("index_sd3_pipelines.json", "sd3_pipelines/txt2img_euler");
    let own = |c: &str| folder.join(c).join("model.safetensors");
    for text_encoder_files in [vec![], vec![own("text_encoder"), own("text_encoder_2")]] {
        let options = LoadOptions {
            config: Some(folder.clone()),
            text_encoder_files,
            ..LoadOptions::default()
        };
        let pipe = StableDiffusionPipeline::from_pretrained(&path, &device, &options).unwrap();
        assert_eq!(pipe.family(), ModelFamily::Sd3);
        assert!(pipe.text_encoders().text_encoder_3().is_some());
        let generation = case.generate(&pipe, |r| r);
        case.check_image(generation.images[0].image.as_raw(), 1.0);
    }
    // No config folder: the tiny MMDiT has no `ln_q` to tell its 16-wide heads by.
    let err = StableDiffusionPipeline::from_pretrained(&path, &device, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("give a config folder"), "{err}");
    // The MMDiT-X file's config comes from its tensors; the built-in (real) CLIP-L
    // config then wants a 768-wide encoder, which nothing gives.
    let mmditx = fixture("tiny-sd35-mmditx.safetensors");
    let err = StableDiffusionPipeline::from_pretrained(&mmditx, &device, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no CLIP-L text encoder (768 wide)"), "{err}");
    // A file that is no text encoder is named.
    let options = LoadOptions {
        text_encoder_files: vec![fixture("tiny-sd35-mmditx.safetensors")],
        ..LoadOptions::default()
    };
    let err = StableDiffusionPipeline::from_pretrained(&mmditx, &device, &options)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a CLIP"), "{err}");
}

/// SD 3 LoRAs (`gen/ref_sd3_lora.py`): a random LoRA on every kind of transformer
/// layer (attention, feed-forwards, modulations incl. the swapped ones, context
/// embedder, output) and on CLIP-L, in diffusers' layout (`transformer.` /
/// `text_encoder.`, PEFT factors, alpha in the metadata) and in kohya's SD 3 layout
/// (original fused `qkv` modules, `lora_te1_`), merged at load and given per
/// request: each gives diffusers' `load_lora_weights` picture.
#[test]
fn sd3_loras_match_diffusers() {
    use stable_diffusion::pipelines::LoraSpec;
    let device = Device::flex();
    let case = common::Case::open("index_sd3_lora.json", "sd3_lora/txt2img_lora");
    let files = ["tiny_sd3_lora_diffusers", "tiny_sd3_lora_kohya"]
        .map(|f| fixture(&format!("lora/{f}.safetensors")));
    for file in &files {
        let options = LoadOptions {
            loras: vec![LoraSpec {
                path: file.clone(),
                strength: 1.0,
            }],
            ..LoadOptions::default()
        };
        let pipe = StableDiffusionPipeline::from_pretrained(fixture("tiny-sd3"), &device, &options)
            .unwrap();
        let generation = case.generate(&pipe, |r| r);
        case.check_latents(&generation.latents, 1e-3);
        case.check_image(generation.images[0].image.as_raw(), 1.0);
    }
    let pipe = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd3"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let generation = case.generate(&pipe, |r| r.lora(files[1].clone(), 1.0));
    case.check_image(generation.images[0].image.as_raw(), 1.0);
}
