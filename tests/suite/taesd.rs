//! The tiny autoencoder (diffusers' `AutoencoderTiny`, TAESD) against diffusers
//! (fixtures README §8c; tolerance 1e-4 on the CPU, 2e-3 on the GPU).

use crate::common;

use common::{Reference, assert_close, fixture, tol};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::Autoencoder;
use stable_diffusion::io::ComponentOptions;
use stable_diffusion::io::model::tiny_vae_from_dir;
use stable_diffusion::models::AutoencoderTiny;

fn taesd(device: &Device) -> AutoencoderTiny {
    tiny_vae_from_dir(&fixture("tiny-taesd"), device, &ComponentOptions::default()).unwrap()
}

#[test]
fn tiny_autoencoder_decodes_as_diffusers() {
    for (name, device) in crate::common::devices() {
        let vae = taesd(&device);
        let r = Reference::open("reference/taesd/taesd.safetensors");
        let t = tol(name, 1e-4, 2e-3);
        assert_eq!(vae.scaling_factor(), 1.0);
        assert_eq!(vae.downscale_factor(), 2);
        let z = r.tensor::<4>("decode_in_latents", &device);
        let mut checked = 0;
        let first = z.clone().narrow(0, 0, 1);
        vae.decode_with_intermediates(first, |i, x| {
            let key = format!("intermediate.decoder.layers.{i}");
            if r.has(&key) {
                assert_close(&format!("[{name}] {key}"), x, &r.floats(&key), t);
                checked += 1;
            }
        });
        assert_eq!(checked, 5);
        let out = vae.decode(z).unwrap();
        assert_close(
            &format!("[{name}] decode_out"),
            &out,
            &r.floats("decode_out"),
            t,
        );
        let image01 = (out / 2.0 + 0.5).clamp(0.0, 1.0);
        assert_close(
            &format!("[{name}] decode_image01"),
            &image01,
            &r.floats("decode_image01"),
            t,
        );
    }
}

#[test]
fn tiny_autoencoder_encodes_as_diffusers() {
    for (name, device) in crate::common::devices() {
        let vae = taesd(&device);
        let r = Reference::open("reference/taesd/taesd.safetensors");
        let t = tol(name, 1e-4, 2e-3);
        let image = r.tensor::<4>("encode_in_image", &device);
        let mut checked = 0;
        vae.encode_with_intermediates(image.clone().narrow(0, 0, 1), |i, x| {
            let key = format!("intermediate.encoder.layers.{i}");
            if r.has(&key) {
                assert_close(&format!("[{name}] {key}"), x, &r.floats(&key), t);
                checked += 1;
            }
        });
        assert_eq!(checked, 4);
        let dist = vae.encode(image).unwrap();
        assert!(!dist.is_random(), "TAESD encodes deterministically");
        let latents = dist.mode();
        assert_close(
            &format!("[{name}] encode_latents"),
            &latents,
            &r.floats("encode_latents"),
            t,
        );
        let scaled = vae.scale_latents(latents);
        assert_close(
            &format!("[{name}] scaled_latents"),
            &scaled,
            &r.floats("scaled_latents"),
            t,
        );
        // The byte round trip uses the reference's bytes (rounding at .5 may differ).
        let bytes = r.int_tensor::<4>("scaled_latents_uint8", &device).float();
        let unscaled = vae.unscale_latents(bytes / 255.0);
        assert_close(
            &format!("[{name}] roundtrip_latents"),
            &unscaled,
            &r.floats("roundtrip_latents"),
            t,
        );
        let out = vae.decode(unscaled).unwrap();
        assert_close(
            &format!("[{name}] roundtrip_out"),
            &out,
            &r.floats("roundtrip_out"),
            t,
        );
    }
}

#[test]
fn tiny_autoencoder_refuses_bad_input() {
    let device = Device::flex();
    let vae = taesd(&device);
    assert!(
        vae.decode(Tensor::<4>::zeros([1, 3, 8, 8], &device))
            .is_err()
    );
    assert!(
        vae.encode(Tensor::<4>::zeros([1, 3, 7, 8], &device))
            .is_err()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"upsample_fn":"bilinear"}"#,
    )
    .unwrap();
    let e = tiny_vae_from_dir(dir.path(), &device, &ComponentOptions::default()).unwrap_err();
    assert!(e.to_string().contains("upsample_fn"), "{e}");
}
