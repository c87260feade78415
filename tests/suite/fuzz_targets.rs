//! Fuzz targets shared by the short property-based run of the test suite (`fuzz.rs`)
//! and the long run (`examples/fuzz.rs`): each takes an arbitrary input and must come
//! back with a value or an error, never a panic.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::image;
use stable_diffusion::io::image::{GenerationParameters, read_image, read_parameters};
use stable_diffusion::io::{LoraComponent, LoraFile, WeightSource};
use stable_diffusion::models::lora::{LoraMode, apply_lora};
use stable_diffusion::prelude::*;

/// What the targets read and write: the tiny model, valid files to mutate, a scratch
/// folder.
pub struct Fixtures {
    pub pipe: StableDiffusionPipeline,
    pub safetensors: Vec<u8>,
    pub lora_kohya: Vec<u8>,
    pub lora_diffusers: Vec<u8>,
    pub png: Vec<u8>,
    pub gguf: Vec<u8>,
    pub configs: Vec<String>,
    pub scratch: tempfile::TempDir,
}

/// Loads the fixtures from `root` (`tests/fixtures`).
pub fn fixtures(root: &Path) -> Fixtures {
    let device = Device::flex();
    let model = root.join("tiny-sd15");
    let pipe = StableDiffusionPipeline::from_pretrained(&model, &device, &LoadOptions::default())
        .expect("the tiny model loads");
    let scratch = tempfile::tempdir().expect("a scratch folder");
    let png_path = scratch.path().join("valid.png");
    let params = GenerationParameters {
        prompt: "a red fox".into(),
        steps: 20,
        sampler: "Euler a".into(),
        cfg_scale: 7.5,
        seed: 1,
        width: 8,
        height: 8,
        ..Default::default()
    };
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 30]));
    stable_diffusion::io::image::save_rgb_png(&img, &png_path, Some(&params)).expect("png");
    let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    // Small valid files (a few KB), so that 100,000 mutations stay quick to write.
    let lora = |name: &str, keep: usize| shrink(&read(root.join("lora").join(name)), keep);
    let text = |p: PathBuf| std::fs::read_to_string(&p).expect("config");
    Fixtures {
        pipe,
        safetensors: small_safetensors(),
        lora_kohya: lora("tiny_unet_lora_kohya.safetensors", 6),
        lora_diffusers: lora("tiny_unet_lora_diffusers.safetensors", 4),
        png: read(png_path),
        gguf: read(root.join("gguf/types.gguf")),
        configs: vec![
            text(model.join("unet/config.json")),
            text(model.join("vae/config.json")),
            text(model.join("text_encoder/config.json")),
            text(model.join("scheduler/scheduler_config.json")),
        ],
        scratch,
    }
}

/// A valid safetensors file of one tensor per float dtype (and an integer one).
fn small_safetensors() -> Vec<u8> {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let f32s: Vec<u8> = (0..12)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let f16s: Vec<u8> = (0..6)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = (0..4)
        .flat_map(|i| half::bf16::from_f32(-(i as f32)).to_le_bytes())
        .collect();
    let i64s: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
    let views = [
        ("a.weight", TensorView::new(Dtype::F32, vec![3, 4], &f32s)),
        ("b.weight", TensorView::new(Dtype::F16, vec![2, 3], &f16s)),
        ("c.bias", TensorView::new(Dtype::BF16, vec![4], &bf16s)),
        ("ids", TensorView::new(Dtype::I64, vec![3], &i64s)),
    ]
    .map(|(k, v)| (k, v.expect("a valid view")));
    safetensors::serialize(views, None).expect("serialised")
}

/// The first `keep` tensors of a safetensors file (and its metadata).
fn shrink(bytes: &[u8], keep: usize) -> Vec<u8> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).expect("a valid file");
    let tensors = safetensors::SafeTensors::deserialize(bytes).expect("a valid file");
    let mut names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    names.sort();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = names
        .into_iter()
        .take(keep)
        .map(|n| {
            let v = tensors.tensor(&n).expect("listed");
            (n, v)
        })
        .collect();
    safetensors::serialize(views, meta.metadata().clone()).expect("serialised")
}

/// A mutation of a valid file: truncation, overwritten bytes, a new header length.
#[derive(Debug, Clone)]
pub struct Mutation {
    truncate: Option<Index>,
    writes: Vec<(Index, u8)>,
    header_len: Option<u64>,
}

impl Mutation {
    pub fn apply(&self, valid: &[u8]) -> Vec<u8> {
        let mut b = valid.to_vec();
        for (at, v) in &self.writes {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] = *v;
            }
        }
        if let Some(n) = self.header_len
            && b.len() >= 8
        {
            b[..8].copy_from_slice(&n.to_le_bytes());
        }
        if let Some(t) = &self.truncate {
            let keep = t.index(b.len() + 1);
            b.truncate(keep);
        }
        b
    }
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    (
        proptest::option::weighted(0.3, any::<Index>()),
        proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        proptest::option::weighted(0.2, prop_oneof![any::<u64>(), 0u64..4096, Just(u64::MAX)]),
    )
        .prop_map(|(truncate, writes, header_len)| Mutation {
            truncate,
            writes,
            header_len,
        })
}

/// A safetensors file with a well-formed header of arbitrary entries (dtypes,
/// shapes and offsets that may not agree with each other or with the data).
pub fn synthetic_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        "[a-z._]{1,12}",
        prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("F64"),
            Just("I64"),
            Just("U8"),
            Just("BOOL"),
            Just("Q4")
        ],
        proptest::collection::vec(prop_oneof![0usize..5, Just(usize::MAX / 2)], 0..4),
        (0usize..80, 0usize..80),
    );
    (proptest::collection::vec(entry, 0..4), 0usize..96).prop_map(|(entries, data_len)| {
        let fields: Vec<String> = entries
            .iter()
            .map(|(name, dtype, shape, (a, b))| {
                format!(
                    "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{a},{b}]}}"
                )
            })
            .collect();
        let header = format!("{{{}}}", fields.join(","));
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend((0..data_len).map(|i| (i * 7) as u8));
        out
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("scratch write");
    path
}

/// Opens arbitrary bytes as safetensors and reads every tensor as f32.
pub fn safetensors(f: &Fixtures, bytes: &[u8]) {
    let path = write(f.scratch.path(), "fuzz.safetensors", bytes);
    if let Ok(source) = WeightSource::open(&path) {
        let tensors: Vec<(String, Vec<usize>)> = source
            .tensors()
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        for (key, shape) in tensors {
            let _ = source.read_float(&key, DType::F32, shape);
        }
    }
}

/// Parses arbitrary text as every config kind and builds what parses (models are
/// built with lazily initialised parameters, so nothing large is allocated).
pub fn config(f: &Fixtures, text: &str) {
    use stable_diffusion::models::{AutoencoderKLConfig, ClipTextConfig, UNet2DConditionConfig};
    let device = f.pipe.device();
    if let Ok(c) = UNet2DConditionConfig::from_json(text) {
        let _ = UNet2DConditionModel::new(&c, device);
    }
    if let Ok(c) = AutoencoderKLConfig::from_json(text) {
        let _ = AutoencoderKL::new(&c, device);
    }
    if let Ok(c) = ClipTextConfig::from_json(text) {
        let _ = ClipTextModel::new(&c, device);
    }
    if let Ok(c) = SchedulerConfig::from_json(text)
        && let Ok(s) = AnyScheduler::from_config(&c)
    {
        for n in [0, 1, 3, 1001] {
            let _ = s.start(&Steps::Count(n));
        }
    }
}

/// Replaces the value of one field of a valid config by an arbitrary JSON value.
pub fn mutated_config() -> impl Strategy<Value = (usize, Index, String)> {
    let value = prop_oneof![
        Just("null".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("NaN".to_string()),
        Just("[]".to_string()),
        Just("[0, 0]".to_string()),
        Just("[18446744073709551615]".to_string()),
        Just("\"café\"".to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        "[a-zA-Z0-9_ ]{0,8}".prop_map(|s| format!("\"{s}\"")),
        proptest::collection::vec(0u32..5000, 0..5).prop_map(|v| format!("{v:?}")),
    ];
    (0usize..4, any::<Index>(), value)
}

/// The text of config `which` with the value of its `field`-th key replaced.
pub fn apply_config_mutation(f: &Fixtures, which: usize, field: &Index, value: &str) -> String {
    let text = &f.configs[which % f.configs.len()];
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(
        &stable_diffusion::schedulers::config::sanitize_json(text),
    ) else {
        return text.clone();
    };
    if map.is_empty() {
        return text.clone();
    }
    let key = map
        .keys()
        .nth(field.index(map.len()))
        .cloned()
        .unwrap_or_default();
    map.insert(key, serde_json::Value::Null);
    let json = serde_json::Value::Object(map).to_string();
    // Put the raw value where the null went (it may not be valid JSON, e.g. NaN).
    json.replacen("null", value, 1)
}

/// Opens arbitrary bytes as a LoRA file and applies what it holds to the tiny model.
pub fn lora(f: &Fixtures, bytes: &[u8]) {
    let path = write(f.scratch.path(), "fuzz_lora.safetensors", bytes);
    let Ok(file) = LoraFile::open(&path) else {
        return;
    };
    if let Some(unet) = f.pipe.unet()
        && file.has(LoraComponent::Unet)
        && let Ok(w) = file.weights_for(LoraComponent::Unet, unet)
    {
        let _ = apply_lora(unet.clone(), &[(&w, 0.5)], LoraMode::Merge);
    }
    if let Some(te) = f.pipe.text_encoder()
        && file.has(LoraComponent::TextEncoder)
        && let Ok(w) = file.weights_for(LoraComponent::TextEncoder, te)
    {
        let _ = apply_lora(te.clone(), &[(&w, 0.5)], LoraMode::Merge);
    }
}

/// Opens arbitrary bytes as a GGUF file and dequantises every tensor it lists.
pub fn gguf(f: &Fixtures, bytes: &[u8]) {
    let path = write(f.scratch.path(), "fuzz.gguf", bytes);
    let Ok(file) = stable_diffusion::io::gguf::GgufFile::open(&path) else {
        return;
    };
    for name in file.tensors().keys() {
        let _ = file.dequantize(name);
    }
}

/// Reads arbitrary bytes as an image with generation parameters, and parses
/// arbitrary text as A1111 parameters.
pub fn png(f: &Fixtures, bytes: &[u8], text: &str) {
    let path = write(f.scratch.path(), "fuzz.png", bytes);
    let _ = read_parameters(&path);
    let _ = read_image(&path);
    let _ = GenerationParameters::parse_a1111(text);
}

/// Parameters whose A1111 text reads back the same.
pub fn parameters() -> impl Strategy<Value = GenerationParameters> {
    let text = "[a-zA-Z0-9 ,()é:!]{0,30}";
    (
        text,
        text,
        0usize..200,
        "[A-Za-z0-9+]{1,8}( [A-Za-z0-9+]{1,8}){0,2}",
        (-1e6f64..1e6),
        any::<u64>(),
        (0usize..5000, 0usize..5000),
        "[A-Za-z0-9_.-]{0,16}",
    )
        .prop_map(
            |(prompt, negative_prompt, steps, sampler, cfg_scale, seed, (width, height), model)| {
                GenerationParameters {
                    prompt,
                    negative_prompt,
                    steps,
                    sampler,
                    cfg_scale,
                    seed,
                    width,
                    height,
                    model,
                }
            },
        )
}

/// An arbitrary request: sizes, steps, guidance, images, masks, margins, schedulers.
#[derive(Debug, Clone)]
pub struct RequestInput {
    size: Option<(usize, usize)>,
    steps: usize,
    guidance: f64,
    images: usize,
    clip_skip: Option<usize>,
    scheduler: Option<&'static str>,
    eta: Option<f64>,
    init: Option<((u32, u32), f64)>,
    mask: Option<(u32, u32)>,
    outpaint: Option<([usize; 4], usize)>,
    fit: u8,
}

pub fn request_input() -> impl Strategy<Value = RequestInput> {
    let float = prop_oneof![
        -2.0f64..12.0,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-0.0),
        Just(1.0)
    ];
    let side = prop_oneof![0usize..72, Just(usize::MAX / 4)];
    (
        (
            proptest::option::of((side.clone(), side)),
            0usize..5,
            float.clone(),
            0usize..3,
        ),
        (
            proptest::option::of(0usize..8),
            proptest::option::of(prop_oneof![
                Just("ddim"),
                Just("euler"),
                Just("euler-a"),
                Just("dpmpp-2m-karras"),
                Just("lms"),
                Just("pndm"),
                Just("heun")
            ]),
            proptest::option::of(float.clone()),
        ),
        (
            proptest::option::of(((0u32..50, 0u32..50), float)),
            proptest::option::of((0u32..50, 0u32..50)),
            proptest::option::of(([0usize..20, 0usize..20, 0usize..20, 0usize..20], 0usize..12)),
            0u8..3,
        ),
    )
        .prop_map(
            |(
                (size, steps, guidance, images),
                (clip_skip, scheduler, eta),
                (init, mask, outpaint, fit),
            )| {
                RequestInput {
                    size,
                    steps,
                    guidance,
                    images,
                    clip_skip,
                    scheduler,
                    eta,
                    init,
                    mask,
                    outpaint,
                    fit,
                }
            },
        )
}

/// The request an input describes.
pub fn request(input: &RequestInput) -> GenerationRequest<'static> {
    let mut r = GenerationRequest::new("a red fox")
        .steps(input.steps)
        .guidance(input.guidance)
        .num_images(input.images)
        .seed(3)
        .size_mode(match input.fit {
            0 => SizeMode::Exact,
            1 => SizeMode::Resize,
            _ => SizeMode::Crop,
        });
    if let Some((w, h)) = input.size {
        r = r.size(w, h);
    }
    if let Some(k) = input.clip_skip {
        r = r.clip_skip(k);
    }
    if let Some(s) = input.scheduler {
        r = r.scheduler(s);
    }
    if let Some(eta) = input.eta {
        r = r.eta(eta);
    }
    let image = |(w, h): (u32, u32)| image::RgbImage::from_pixel(w, h, image::Rgb([90, 30, 200]));
    if let Some((dims, strength)) = input.init {
        r = r.init_image(image(dims), strength);
    }
    if let Some((w, h)) = input.mask {
        r = r.mask(image::GrayImage::from_pixel(w, h, image::Luma([255])));
    }
    if let Some(([left, right, top, bottom], seam)) = input.outpaint {
        let extend = Extend {
            left,
            right,
            top,
            bottom,
        };
        r = r.outpaint(image(input.init.map_or((16, 16), |i| i.0)), extend, seam);
    }
    r
}

/// Validates an arbitrary request (no model run).
pub fn validate(f: &Fixtures, input: &RequestInput) {
    let _ = f.pipe.validate(&request(input));
}

/// Requests that are mostly valid (sizes in multiples of 8, finite guidance), so that
/// most of them run the model end to end.
pub fn valid_request_input() -> impl Strategy<Value = RequestInput> {
    let side = (1usize..6).prop_map(|k| k * 8);
    let dims = (side.clone(), side.clone()).prop_map(|(w, h)| (w as u32, h as u32));
    (
        (
            proptest::option::of((side.clone(), side)),
            2usize..4,
            -1.0f64..9.0,
            1usize..3,
        ),
        (
            proptest::option::weighted(0.2, 0usize..5),
            proptest::option::of(prop_oneof![
                Just("ddim"),
                Just("euler"),
                Just("euler-a"),
                Just("dpmpp-2m-karras"),
                Just("lms"),
                Just("pndm")
            ]),
        ),
        (
            proptest::option::weighted(0.5, (dims.clone(), 0.5f64..=1.0)),
            proptest::option::weighted(0.3, any::<bool>()),
            proptest::option::weighted(0.2, ([0usize..3, 0..3, 0..3, 0..3], 0usize..9)),
        ),
    )
        .prop_map(
            |((size, steps, guidance, images), (clip_skip, scheduler), (init, mask, outpaint))| {
                // A mask the init image's size; outpainting without a mask.
                let mask = init
                    .and(mask)
                    .filter(|_| outpaint.is_none())
                    .map(|_| init.map_or((16, 16), |i| i.0));
                RequestInput {
                    size,
                    steps,
                    guidance,
                    images,
                    clip_skip,
                    scheduler,
                    eta: None,
                    init,
                    mask,
                    outpaint: outpaint.map(|(m, seam)| {
                        // At least one side grows.
                        let m = if m == [0; 4] { [0, 1, 0, 0] } else { m };
                        (m.map(|k| k * 8), seam)
                    }),
                    fit: 0,
                }
            },
        )
}

/// Whether a request ran, was refused with an error, or was too large to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ran,
    Refused,
    Skipped,
}

/// Runs an arbitrary request whose size is small enough to be quick.
pub fn generate(f: &Fixtures, input: &RequestInput) -> Outcome {
    let small = |(w, h): (usize, usize)| w <= 48 && h <= 48;
    if input.size.is_some_and(|s| !small(s)) || input.images > 2 || input.steps > 3 {
        return Outcome::Skipped;
    }
    match f.pipe.generate(request(input)) {
        Ok(out) => {
            assert_eq!(
                out.images.len(),
                input.images,
                "one picture per image asked"
            );
            Outcome::Ran
        }
        Err(_) => Outcome::Refused,
    }
}
