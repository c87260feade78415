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
