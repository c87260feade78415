//! C2PA content credentials end to end: the examples sign what they write
//! (`--c2pa-cert` / `--c2pa-key`, PNG and JPEG), the `provenance` example reads the
//! manifest back (trusted given the test CA), the server signs its pictures. Without
//! the `c2pa` feature the flags fail by name before any weight is read.

use std::process::Command;

use crate::examples::example;

/// The demo model at 2 steps: quick, and enough to have a picture to sign.
const DEMO_ARGS: [&str; 6] = ["--prompt", "a red circle", "--steps", "2", "--seed", "5"];

#[cfg(feature = "c2pa")]
mod signed {
    use super::*;
    use stable_diffusion::io::content_credentials::{
        CREATED_ACTION, TRAINED_ALGORITHMIC_MEDIA, TestCertificates, ValidationVerdict,
        read_content_credentials,
    };

    fn write_certs(dir: &std::path::Path) -> (TestCertificates, [std::path::PathBuf; 3]) {
        let certs = TestCertificates::generate("suite signer").unwrap();
        let paths = [
            dir.join("chain.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem"),
        ];
        std::fs::write(&paths[0], &certs.cert_chain).unwrap();
        std::fs::write(&paths[1], &certs.private_key).unwrap();
        std::fs::write(&paths[2], &certs.ca_cert).unwrap();
        (certs, paths)
    }

    /// `txt2img --c2pa-cert --c2pa-key` writes a signed PNG (its parameters chunk
    /// kept) and a signed JPEG; each reads back valid, trusted with the CA, with
    /// `c2pa.created` by `trainedAlgorithmicMedia`, the example as generator and
    /// the demo model and prompt as parameters; `provenance` prints it.
    #[test]
    fn the_examples_sign_png_and_jpeg_and_provenance_reads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (certs, [chain, key, ca]) = write_certs(tmp.path());
        for name in ["signed.png", "signed.jpg"] {
            let out = tmp.path().join(name);
            let status = Command::new(example("txt2img"))
                .args(DEMO_ARGS)
                .args(["--c2pa-cert".as_ref(), chain.as_os_str()])
                .args(["--c2pa-key".as_ref(), key.as_os_str()])
                .args(["--out".as_ref(), out.as_os_str()])
                .status()
                .unwrap();
            assert!(status.success(), "{name}");
            let bytes = std::fs::read(&out).unwrap();
            let r = read_content_credentials(&bytes, Some(&certs.ca_cert))
                .unwrap()
                .expect("a manifest");
            assert_eq!(
                r.state,
                ValidationVerdict::Trusted,
                "{name}: {:?}",
                r.failures
            );
            assert_eq!(r.action.as_deref(), Some(CREATED_ACTION));
            assert_eq!(
                r.digital_source_type.as_deref(),
                Some(TRAINED_ALGORITHMIC_MEDIA)
            );
            assert!(
                r.generator.as_deref().unwrap().contains("txt2img example"),
                "{:?}",
                r.generator
            );
            let p = r.parameters.unwrap();
            assert_eq!(p["model"], "demo-shapes", "{p}");
            assert_eq!(p["prompt"], "a red circle", "{p}");
            assert_eq!(p["seed"], 5, "{p}");
        }
        let png = tmp.path().join("signed.png");
        let parameters = stable_diffusion::io::image::read_parameters(&png).unwrap();
        assert_eq!(parameters.unwrap().prompt, "a red circle");
        let out = Command::new(example("provenance"))
            .args(["--c2pa-trust".as_ref(), ca.as_os_str()])
            .arg(&png)
            .arg(tmp.path().join("signed.jpg"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("C2PA: Trusted").count(), 2, "{text}");
        assert!(text.contains("trainedAlgorithmicMedia"), "{text}");
        assert!(text.contains("\"prompt\":\"a red circle\""), "{text}");
        // Without the anchor: valid, and the missing trust said.
        let out = Command::new(example("provenance"))
            .arg(&png)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("C2PA: Valid"), "{text}");
        assert!(text.contains("signingCredential.untrusted"), "{text}");
    }

    /// A key that is not the certificate's fails before the model loads.
    #[test]
    fn a_mismatched_key_fails_before_generating() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, [chain, _, _]) = write_certs(tmp.path());
        let other = TestCertificates::generate("other").unwrap();
        let key = tmp.path().join("other.pem");
        std::fs::write(&key, &other.private_key).unwrap();
        let out = tmp.path().join("never.png");
        let result = Command::new(example("txt2img"))
            .args(DEMO_ARGS)
            .args(["--c2pa-cert".as_ref(), chain.as_os_str()])
            .args(["--c2pa-key".as_ref(), key.as_os_str()])
            .args(["--out".as_ref(), out.as_os_str()])
            .output()
            .unwrap();
        assert!(!result.status.success());
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(err.contains("content credentials"), "{err}");
        assert!(!out.exists());
    }

    /// The server signs every picture it returns when given `c2pa_cert` and
    /// `c2pa_key`.
    #[test]
    fn the_server_signs_its_pictures() {
        use base64::Engine;
        let tmp = tempfile::tempdir().unwrap();
        let (certs, [chain, key, _]) = write_certs(tmp.path());
        let s = crate::server::TestServer::start(sd_server::ServerConfig {
            c2pa_cert: Some(chain),
            c2pa_key: Some(key),
            ..crate::server::config()
        });
        let r = s.post_json(
            "/v1/images/generations",
            &serde_json::json!({"prompt": "a lighthouse", "size": "32x32", "steps": 2,
                                "response_format": "b64_json"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let b64 = r.json()["data"][0]["b64_json"]
            .as_str()
            .unwrap()
            .to_string();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let report = read_content_credentials(&png, Some(&certs.ca_cert))
            .unwrap()
            .expect("a manifest");
        assert_eq!(
            report.state,
            ValidationVerdict::Trusted,
            "{:?}",
            report.failures
        );
        assert!(report.generator.unwrap().starts_with("sd-server"));
        assert_eq!(report.parameters.unwrap()["prompt"], "a lighthouse");
    }
}

/// Without the `c2pa` feature, `--c2pa-cert` says which feature is missing
/// instead of writing an unsigned picture.
#[cfg(not(feature = "c2pa"))]
#[test]
fn without_the_feature_the_flags_fail_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never.png");
    let result = Command::new(example("txt2img"))
        .args(DEMO_ARGS)
        .args(["--c2pa-cert", "chain.pem", "--c2pa-key", "key.pem"])
        .args(["--out".as_ref(), out.as_os_str()])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.contains("`c2pa` feature"), "{err}");
    assert!(!out.exists());
}
