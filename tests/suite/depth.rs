//! Depth Anything (transformers' `DepthAnythingForDepthEstimation`) against
//! transformers on the tiny random model of `gen/ref_depth_anything.py`: the backbone's
//! feature maps, the neck's fused maps and the predicted depth at the trained size and
//! at another (position embeddings resized), the metric head, and the whole depth
//! preprocessor (processor, model, resize back, 8-bit map).

use crate::common;

use common::{Reference, assert_close, fixture, tol};
use stable_diffusion::burn::module::Module;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::io::ComponentOptions;
use stable_diffusion::io::depth::{depth_anything_from_path, read_depth_anything_config};
use stable_diffusion::models::config::DepthEstimationType;
use stable_diffusion::models::{DepthAnythingConfig, DepthAnythingForDepthEstimation};
use stable_diffusion::pipelines::preprocess::DepthEstimator;

const REF: &str = "reference/depth_anything/depth.safetensors";

fn check_case(
    name: &str,
    model: &DepthAnythingForDepthEstimation,
    r: &Reference,
    case: &str,
    device: &Device,
) {
    let t = tol(name, 1e-4, 2e-3);
    let x = r.tensor::<4>(&format!("{case}_pixel_values"), device);
    let [_, _, h, w] = x.dims();
    let features = model.backbone.forward(x.clone());
    for (i, f) in features.iter().enumerate() {
        let key = format!("{case}_feature_maps.{i}");
        assert_close(&format!("[{name}] {key}"), f, &r.floats(&key), t);
    }
    let p = model.patch_size();
    let fused = model.neck.forward(features, h / p, w / p);
    for (i, f) in fused.iter().enumerate() {
        let key = format!("{case}_neck.{i}");
        assert_eq!(f.dims().to_vec(), r.shape(&key), "{key}");
        assert_close(&format!("[{name}] {key}"), f, &r.floats(&key), t);
    }
    let depth = model.predict_depth(x).unwrap();
    let key = format!("{case}_predicted_depth");
    assert_eq!(depth.dims().to_vec(), r.shape(&key));
    assert_close(&format!("[{name}] {key}"), &depth, &r.floats(&key), t);
}

#[test]
fn depth_anything_matches_transformers() {
    let r = Reference::open(REF);
    let dir = fixture("tiny-depth-anything");
    for (name, device) in common::devices() {
        let model = depth_anything_from_path(&dir, &device, &ComponentOptions::default()).unwrap();
        check_case(name, &model, &r, "square", &device);
        check_case(name, &model, &r, "wide", &device);
        // the same weights through the metric head (sigmoid x max_depth)
        let mut config = read_depth_anything_config(&dir.join("config.json")).unwrap();
        config.depth_estimation_type = DepthEstimationType::Metric;
        config.max_depth = Some(20.0);
        let json = serde_json::to_string(&config).unwrap();
        let config = DepthAnythingConfig::from_json(&json).unwrap();
        let metric_dir = tempfile::tempdir().unwrap();
        std::fs::write(metric_dir.path().join("config.json"), json).unwrap();
        // a weight file with its config beside it
        let weights = metric_dir.path().join("model.safetensors");
        std::fs::copy(dir.join("model.safetensors"), &weights).unwrap();
        let metric = depth_anything_from_path(&weights, &device, &Default::default()).unwrap();
        assert_eq!(config.max_depth(), 20.0);
        let x = r.tensor::<4>("wide_pixel_values", &device);
        assert_close(
            &format!("[{name}] wide_predicted_depth_metric"),
            &metric.forward(x),
            &r.floats("wide_predicted_depth_metric"),
            tol(name, 2e-3, 2e-2),
        );
    }
}

/// The depth preprocessor end to end: the processor's input (Pillow's 8-bit bicubic
/// resize, to the bit), the depth at the picture's size and the ControlNet map.
#[test]
fn depth_preprocessor_matches_transformers() {
    let r = Reference::open(REF);
    let device = Device::flex();
    let estimator = DepthEstimator::from_pretrained(
        fixture("tiny-depth-anything"),
        &device,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(estimator.processor().size.height, 56);
    let [h, w, _] = <[usize; 3]>::try_from(r.shape("image")).unwrap();
    let bytes: Vec<u8> = r.floats("image").iter().map(|v| *v as u8).collect();
    let image = stable_diffusion::image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap();
    let pixel_values = estimator.processor().pixel_values(&image, &device);
    assert_eq!(pixel_values.dims().to_vec(), r.shape("image_pixel_values"));
    assert_close(
        "image_pixel_values",
        &pixel_values,
        &r.floats("image_pixel_values"),
        1e-6,
    );
    let depth = estimator.model().predict_depth(pixel_values).unwrap();
    assert_close(
        "image_predicted_depth",
        &depth,
        &r.floats("image_predicted_depth"),
        1e-4,
    );
    let depth = estimator.predict_depth(&image).unwrap();
    assert_eq!(depth.dims(), [h, w]);
    assert_close("image_depth", &depth, &r.floats("image_depth"), 1e-4);
    let map = estimator
        .depth_map(&stable_diffusion::image::DynamicImage::ImageRgb8(image))
        .unwrap();
    assert_eq!((map.width() as usize, map.height() as usize), (w, h));
    let control = r.floats("image_control");
    let mut worst = 0f32;
    let mut mean = 0f32;
    for (p, c) in map.pixels().zip(&control) {
        assert!(p.0[0] == p.0[1] && p.0[1] == p.0[2], "grey");
        let d = (p.0[0] as f32 - c).abs();
        worst = worst.max(d);
        mean += d / control.len() as f32;
    }
    // truncation to 8 bits: a value a hair from a level may land on either side
    eprintln!("image_control: max {worst} levels, mean {mean:.4}");
    assert!(
        worst <= 1.0 && mean <= 0.05,
        "control map off by {worst} (mean {mean})"
    );
}

/// Config values the model cannot honour are refused naming the field.
#[test]
fn depth_config_errors_name_the_field() {
    for (json, field) in [
        (
            r#"{"backbone_config": {"use_swiglu_ffn": true}}"#,
            "use_swiglu_ffn",
        ),
        (
            r#"{"reassemble_factors": [4, 2.5, 1, 0.5]}"#,
            "reassemble_factors",
        ),
        (r#"{"neck_hidden_sizes": [48, 96]}"#, "neck_hidden_sizes"),
        (
            r#"{"backbone_config": {"hidden_size": 100}}"#,
            "num_attention_heads",
        ),
        (r#"{"backbone": "vitb16"}"#, "backbone"),
        (r#"{"head_in_index": 7}"#, "head_in_index"),
    ] {
        let err = DepthAnythingConfig::from_json(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
    // the real small model's config parses with the defaults
    let small = DepthAnythingConfig::from_json(
        r#"{"backbone_config": {"hidden_size": 384, "image_size": 518, "num_attention_heads": 6,
            "out_indices": [9, 10, 11, 12], "patch_size": 14, "reshape_hidden_states": false},
            "neck_hidden_sizes": [48, 96, 192, 384], "reassemble_hidden_size": 384}"#,
    )
    .unwrap();
    assert_eq!(small.backbone_config.num_hidden_layers, 12);
}

/// The Depth Anything V2 small, base and large configs (`gen/depth_anything_configs.py`,
/// the hub's values) build transformers' parameter counts, less the pre-training
/// `mask_token` (24.8 M, 97.5 M, 335.3 M).
#[test]
fn depth_anything_v2_configs_give_transformers_parameter_counts() {
    let device = Device::flex();
    for size in ["small", "base", "large"] {
        let dir = fixture(&format!("configs/depth-anything-v2-{size}"));
        let config = read_depth_anything_config(&dir.join("config.json")).unwrap();
        let counts: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("param_counts.json")).unwrap())
                .unwrap();
        // parameters are initialised lazily: counting allocates nothing
        let model = DepthAnythingForDepthEstimation::new(&config, &device).unwrap();
        assert_eq!(
            model.num_params() as u64,
            counts["without_mask_token"].as_u64().unwrap(),
            "{size}"
        );
    }
    // no backbone_config: transformers' default backbone (ViT-S/14 at 518, layers 9-12)
    let default = DepthAnythingConfig::from_json("{}").unwrap();
    assert_eq!(
        default.backbone_config.feature_layers().unwrap(),
        [9, 10, 11, 12]
    );
    assert_eq!(default.backbone_config.hidden_size, 384);
}

/// `pil_resize` is Pillow's `Image.resize` to the bit: bicubic, bilinear and Lanczos,
/// down, up, and down one way while up the other.
#[test]
fn pil_resize_matches_pillow() {
    use stable_diffusion::io::pil_resize::{PilFilter, pil_resize};
    let r = Reference::open(REF);
    let [h, w, _] = <[usize; 3]>::try_from(r.shape("image")).unwrap();
    let bytes: Vec<u8> = r.floats("image").iter().map(|v| *v as u8).collect();
    let image = stable_diffusion::image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap();
    for (name, filter) in [
        ("bicubic", PilFilter::Bicubic),
        ("bilinear", PilFilter::Bilinear),
        ("lanczos", PilFilter::Lanczos),
    ] {
        for (ow, oh) in [(30, 17), (100, 80), (90, 20)] {
            let key = format!("pil_{name}_{ow}x{oh}");
            let got = pil_resize(&image, ow, oh, filter);
            let want = r.floats(&key);
            let worst = got
                .as_raw()
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f32 - b).abs())
                .fold(0f32, f32::max);
            assert_eq!(worst, 0.0, "{key}: off by {worst}");
        }
    }
}

/// The model loaded in f16 (`from_pretrained_with`): f32 depth out, within f16's
/// precision of transformers' f32.
#[test]
fn depth_anything_runs_in_f16() {
    use stable_diffusion::burn::tensor::DType;
    let r = Reference::open(REF);
    let device = Device::flex();
    let options = ComponentOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let estimator = DepthEstimator::from_pretrained_with(
        fixture("tiny-depth-anything"),
        &device,
        &Default::default(),
        &options,
    )
    .unwrap();
    assert_eq!(
        estimator.model().head.conv3.weight.val().dtype(),
        DType::F16
    );
    let depth = estimator
        .model()
        .predict_depth(r.tensor::<4>("wide_pixel_values", &device))
        .unwrap();
    assert_eq!(depth.dtype(), DType::F32);
    assert_close(
        "f16 wide_predicted_depth",
        &depth,
        &r.floats("wide_predicted_depth"),
        1e-2,
    );
}

/// A metric model's control map is reversed (near white, as for relative depth).
#[test]
fn metric_depth_maps_keep_near_white() {
    use stable_diffusion::pipelines::preprocess::DepthImageProcessorConfig;
    let dir = fixture("tiny-depth-anything");
    let device = Device::flex();
    let mut config = read_depth_anything_config(&dir.join("config.json")).unwrap();
    config.depth_estimation_type = DepthEstimationType::Metric;
    config.max_depth = Some(20.0);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let model = depth_anything_from_path(tmp.path(), &device, &Default::default()).unwrap();
    assert!(model.is_metric());
    let processor = DepthImageProcessorConfig {
        size: stable_diffusion::pipelines::preprocess::ProcessorSize {
            height: 56,
            width: 56,
        },
        ..Default::default()
    };
    let estimator = DepthEstimator::new(model, processor, &device);
    let picture = stable_diffusion::image::RgbImage::from_fn(40, 30, |x, y| {
        stable_diffusion::image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
    });
    let depth: Vec<f32> = estimator
        .predict_depth(&picture)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let map = estimator
        .depth_map(&stable_diffusion::image::DynamicImage::ImageRgb8(picture))
        .unwrap();
    let far = (0..depth.len())
        .max_by(|&a, &b| depth[a].total_cmp(&depth[b]))
        .unwrap();
    let near = (0..depth.len())
        .min_by(|&a, &b| depth[a].total_cmp(&depth[b]))
        .unwrap();
    assert_eq!(map.as_raw()[3 * far], 0, "the farthest point is black");
    assert_eq!(map.as_raw()[3 * near], 255, "the nearest point is white");
}
