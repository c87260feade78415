//! The SD 1.x/2.x safety checker against diffusers (`gen/ref_safety_checker.py`: a
//! tiny random `StableDiffusionSafetyChecker` and its `CLIPImageProcessor`): the
//! processor's pixel values from 8-bit pictures, the CLIP vision tower's pooled
//! output, the projected embeddings, the concept similarities and the flags over
//! pictures that trip it through a special-care concept, directly, and not at all.

use crate::common::{Reference, assert_close, devices, fixture, tol};

use stable_diffusion::burn::prelude::*;
use stable_diffusion::image;
use stable_diffusion::io::ComponentOptions;
use stable_diffusion::io::safety_checker::{ClipImageProcessor, safety_checker_from_dir};
use stable_diffusion::models::StableDiffusionSafetyChecker;

fn picture(r: &Reference, k: usize) -> image::RgbImage {
    let shape = r.shape(&format!("picture_{k}"));
    let bytes = r.bytes(&format!("picture_{k}")).to_vec();
    image::RgbImage::from_raw(shape[1] as u32, shape[0] as u32, bytes).unwrap()
}

#[test]
fn safety_checker_matches_diffusers() {
    let r = Reference::open("reference/safety_checker/checker.safetensors");
    let processor = ClipImageProcessor::from_file(&fixture(
        "tiny-safety-checker/feature_extractor/preprocessor_config.json",
    ))
    .unwrap();
    for (name, device) in devices() {
        let checker = safety_checker_from_dir(
            &fixture("tiny-safety-checker/safety_checker"),
            &device,
            &ComponentOptions::default(),
        )
        .unwrap();
        let pictures: Vec<_> = (0..3).map(|k| picture(&r, k)).collect();
        for (k, p) in pictures.iter().enumerate() {
            let x = processor
                .preprocess(std::slice::from_ref(p), &device)
                .unwrap();
            let key = format!("pixel_values_{k}");
            assert_close(&format!("[{name}] {key}"), &x, &r.floats(&key), 1e-5);
        }
        let pixels = processor.preprocess(&pictures, &device).unwrap();
        let t = tol(name, 1e-4, 2e-3);
        let (pooled, embeds) = checker.embed(pixels.clone()).unwrap();
        assert_close(
            &format!("[{name}] pooled_output"),
            &pooled,
            &r.floats("pooled_output"),
            t,
        );
        assert_close(
            &format!("[{name}] image_embeds"),
            &embeds,
            &r.floats("image_embeds"),
            t,
        );
        let special = StableDiffusionSafetyChecker::cosine_distance(
            embeds.clone(),
            checker.special_care_embeds.val(),
        );
        let concepts =
            StableDiffusionSafetyChecker::cosine_distance(embeds, checker.concept_embeds.val());
        assert_close(
            &format!("[{name}] special_cos_dist"),
            &special,
            &r.floats("special_cos_dist"),
            t,
        );
        assert_close(
            &format!("[{name}] cos_dist"),
            &concepts,
            &r.floats("cos_dist"),
            t,
        );
        let check = checker.check(pixels).unwrap();
        let want: Vec<bool> = r.floats("has_nsfw").iter().map(|&f| f == 1.0).collect();
        assert_eq!(check.nsfw, want, "[{name}] flags");
        assert_eq!(want, [true, true, false]);
        // Picture 0 trips a special-care concept, which makes concept scores 0.01
        // stricter for it.
        assert!(check.special_scores[0].iter().any(|&s| s > 0.0));
        assert!(
            check.special_scores[1..]
                .iter()
                .flatten()
                .all(|&s| s <= 0.0)
        );
    }
}

/// The real checker's config (`CompVis/stable-diffusion-safety-checker`: CLIP
/// ViT-L/14, projection 768) builds diffusers' parameter count.
#[test]
fn the_real_safety_checker_config_builds_diffusers_parameter_count() {
    use stable_diffusion::burn::module::Module;
    use stable_diffusion::models::SafetyCheckerConfig;
    let device = Device::flex();
    let config = SafetyCheckerConfig::clip_vit_l_14();
    let checker = StableDiffusionSafetyChecker::new(&config, &device).unwrap();
    assert_eq!(checker.num_params(), 303_981_588);
    let err = SafetyCheckerConfig::from_json(
        r#"{"vision_config": {"hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 4}, "projection_dim": 16}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
}

/// Copies `tiny-sd15` and the tiny checker into one pipeline folder, as diffusers'
/// SD 1.x folders ship them.
fn folder_with_checker(root: &std::path::Path) -> std::path::PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = root.join("sd15-with-checker");
    copy(&fixture("tiny-sd15"), &dir);
    copy(&fixture("tiny-safety-checker"), &dir);
    dir
}

/// The owning pipeline loads `safety_checker/` with `feature_extractor/` as
/// diffusers does, runs it on every picture (flagged ones black, the verdict in
/// `nsfw_content_detected`), and leaves it out only when asked.
#[test]
fn the_pipeline_runs_the_checker_and_blacks_out_flagged_pictures() {
    use stable_diffusion::burn::module::Param;
    use stable_diffusion::prelude::*;
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    let dir = folder_with_checker(tmp.path());
    let request = || {
        GenerationRequest::new("a lighthouse")
            .size(32, 32)
            .steps(2)
            .seed(5)
            .num_images(2)
    };
    let mut pipe =
        StableDiffusionPipeline::from_pretrained(&dir, &device, &LoadOptions::default()).unwrap();
    let checker = pipe
        .safety_checker()
        .cloned()
        .expect("loaded from the folder");
    let out = pipe.generate(request()).unwrap();
    // The verdicts are the checker's on the pictures as made.
    let plain = StableDiffusionPipeline::from_pretrained(
        &dir,
        &device,
        &LoadOptions {
            safety_checker: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(plain.safety_checker().is_none());
    let unchecked = plain.generate(request()).unwrap();
    assert!(
        unchecked
            .images
            .iter()
            .all(|i| i.nsfw_content_detected.is_none())
    );
    let mut pictures: Vec<_> = unchecked.images.iter().map(|i| i.image.clone()).collect();
    let flags = checker.run(&mut pictures, &device).unwrap();
    for (i, image) in out.images.iter().enumerate() {
        assert_eq!(image.nsfw_content_detected, Some(flags[i]));
        assert_eq!(image.image, pictures[i], "image {i}");
    }
    // Thresholds every picture passes, and ones every picture trips.
    for (threshold, flagged) in [(2.0f32, false), (-2.0, true)] {
        let mut strict = checker.clone();
        strict.model.concept_embeds_weights =
            Param::from_tensor(Tensor::full([17], threshold, &device));
        pipe.set_safety_checker(Some(strict));
        let out = pipe.generate(request()).unwrap();
        for image in &out.images {
            assert_eq!(image.nsfw_content_detected, Some(flagged));
            assert_eq!(image.image.iter().all(|&v| v == 0), flagged);
        }
    }
    // Asked for where there is none: an error.
    let err = StableDiffusionPipeline::from_pretrained(
        fixture("tiny-sd15"),
        &device,
        &LoadOptions {
            safety_checker: Some(true),
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("safety_checker"), "{err}");
}
