//! C2PA content credentials (the `c2pa` feature): a signed manifest in a PNG or
//! JPEG picture saying that a trained algorithm created it, with what, and how.
//!
//! [`ContentCredentials`] holds the signer (a certificate chain and its private key,
//! supplied by the user); [`ContentCredentials::sign`] embeds a manifest whose
//! `c2pa.actions.v2` assertion has one `c2pa.created` action with the IPTC digital
//! source type `trainedAlgorithmicMedia` ([`TRAINED_ALGORITHMIC_MEDIA`]), the
//! generator as its software agent, and the model and generation parameters as its
//! parameters. [`read_content_credentials`] reads a picture's manifest back and
//! validates it (signature, hashes, certificate profile, and trust when anchors are
//! given).
//!
//! The C2PA certificate profile refuses self-signed signing certificates: the chain
//! is an end-entity certificate (key usage `digitalSignature`, an extended key usage
//! such as `emailProtection` or `documentSigning`) followed by the CA that issued it.
//! [`TestCertificates::generate`] makes such a chain under a throwaway CA for trying
//! this out; nobody trusts it.
//!
//! The manifest binds the picture's bytes: any later edit, re-encoding or metadata
//! rewrite breaks the hash and reads back as invalid. It proves who signed, not
//! that the picture is harmless or that unsigned pictures are not generated.

use std::io::Cursor;
use std::path::Path;

use c2pa::{Builder, Context, Reader, SigningAlg};
use serde_json::{Value, json};

use crate::error::IoError;
use crate::image::GenerationParameters;
pub use crate::image::PictureFormat;

/// The IPTC digital source type of pictures made by a generative model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The C2PA action of a new asset.
pub const CREATED_ACTION: &str = "c2pa.created";

/// The generator named in manifests unless [`ContentCredentials::with_generator`]
/// says otherwise.
pub const GENERATOR_NAME: &str = "stable-diffusion (burn)";

fn c2pa_error(what: &str) -> impl Fn(c2pa::Error) -> IoError + '_ {
    move |e| IoError::ContentCredentials(format!("{what}: {e}"))
}

/// A signer of generated pictures: a certificate chain, its private key and the
/// generator's name.
pub struct ContentCredentials {
    signer: c2pa::BoxedSigner,
    algorithm: SigningAlg,
    generator: String,
    version: String,
}

impl std::fmt::Debug for ContentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCredentials")
            .field("algorithm", &self.algorithm)
            .field("generator", &self.generator)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The algorithms tried, in order, for a private key: the key's type decides which
/// one accepts it (P-256, P-384, P-521, RSA, Ed25519).
const ALGORITHMS: [SigningAlg; 5] = [
    SigningAlg::Es256,
    SigningAlg::Es384,
    SigningAlg::Es512,
    SigningAlg::Ps256,
    SigningAlg::Ed25519,
];

impl ContentCredentials {
    /// A signer from a PEM certificate chain (the signing certificate first, then
    /// the CAs that issued it) and its PEM private key (PKCS#8). The algorithm
    /// follows the key (ES256/384/512 for P-256/384/521, PS256 for RSA, Ed25519).
    ///
    /// A probe picture is signed and validated before this returns, so a chain the
    /// C2PA profile refuses (a self-signed signing certificate, a missing key usage)
    /// or a key that does not match the certificate fails here, not at the first
    /// picture.
    ///
    /// # Errors
    /// [`IoError::ContentCredentials`] naming the problem (with the C2PA status
    /// codes the probe failed on).
    pub fn from_pem(cert_chain: &[u8], private_key: &[u8]) -> Result<Self, IoError> {
        let mut last = None;
        for algorithm in ALGORITHMS {
            match c2pa::create_signer::from_keys(cert_chain, private_key, algorithm, None) {
                Ok(signer) => {
                    let credentials = Self {
                        signer,
                        algorithm,
                        generator: GENERATOR_NAME.to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    };
                    credentials.probe()?;
                    return Ok(credentials);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(IoError::ContentCredentials(format!(
            "no signer from this certificate chain and key (ES256/384/512, PS256 and \
             Ed25519 tried; a PEM chain and a PKCS#8 PEM key are expected): {}",
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }

    /// [`Self::from_pem`] from a certificate chain file and a private key file.
    ///
    /// # Errors
    /// [`IoError::Io`] when a file cannot be read; as [`Self::from_pem`].
    pub fn from_files(
        cert_chain: impl AsRef<Path>,
        private_key: impl AsRef<Path>,
    ) -> Result<Self, IoError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| IoError::io(p, e));
        Self::from_pem(&read(cert_chain.as_ref())?, &read(private_key.as_ref())?)
    }

    /// The generator named in the manifests (claim generator and the action's
    /// software agent): an application or service names itself here.
    pub fn with_generator(mut self, name: impl Into<String>, version: impl Into<String>) -> Self {
        self.generator = name.into();
        self.version = version.into();
        self
    }

    /// The signature algorithm, as C2PA names it (`es256`, `ps256`, ...).
    pub fn algorithm(&self) -> String {
        self.algorithm.to_string()
    }

    /// The picture with a signed manifest embedded: `c2pa.created` by a trained
    /// algorithm, the generator as software agent, the model and the parameters.
    /// `picture` is an encoded PNG or JPEG (`format`); what it already carries
    /// (the A1111 `parameters` chunk) stays.
    ///
    /// # Errors
    /// [`IoError::ContentCredentials`] when the bytes are not a picture of that
    /// format or signing fails.
    pub fn sign(
        &self,
        picture: &[u8],
        format: PictureFormat,
        parameters: &GenerationParameters,
    ) -> Result<Vec<u8>, IoError> {
        let definition = json!({
            "title": title(parameters),
            "claim_generator_info": [{ "name": self.generator, "version": self.version }],
        });
        let mut builder = Builder::from_context(Context::new())
            .with_definition(definition.to_string())
            .map_err(c2pa_error("manifest"))?;
        builder
            .add_action(self.created_action(parameters))
            .map_err(c2pa_error("manifest"))?;
        let mut source = Cursor::new(picture);
        let mut dest = Cursor::new(Vec::with_capacity(picture.len() + 16 * 1024));
        builder
            .sign(self.signer.as_ref(), format.mime(), &mut source, &mut dest)
            .map_err(c2pa_error("signing"))?;
        Ok(dest.into_inner())
    }

    fn created_action(&self, p: &GenerationParameters) -> Value {
        json!({
            "action": CREATED_ACTION,
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": { "name": self.generator, "version": self.version },
            "description": format!("Generated by the diffusion model {}", p.model),
            "parameters": {
                "model": p.model,
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "steps": p.steps,
                "sampler": p.sampler,
                "cfg_scale": p.cfg_scale,
                "seed": p.seed,
                "width": p.width,
                "height": p.height,
            },
        })
    }

    /// Signs a small PNG and validates it: the certificate profile, the key and
    /// the signature are checked once, up front.
    fn probe(&self) -> Result<(), IoError> {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| IoError::ContentCredentials(format!("probe picture: {e}")))?;
        let signed = self.sign(&png, PictureFormat::Png, &GenerationParameters::default())?;
        let report = read_content_credentials(&signed, None)?.ok_or_else(|| {
            IoError::ContentCredentials("the probe picture carries no manifest".into())
        })?;
        if report.state == ValidationVerdict::Invalid {
            return Err(IoError::ContentCredentials(format!(
                "a picture signed with this certificate and key does not validate: {}",
                report.failures.join("; ")
            )));
        }
        Ok(())
    }
}

/// The manifest title: the model and the start of the prompt.
fn title(p: &GenerationParameters) -> String {
    let prompt: String = p.prompt.chars().take(60).collect();
    match (p.model.is_empty(), prompt.is_empty()) {
        (true, true) => "generated picture".to_string(),
        (false, true) => p.model.clone(),
        (true, false) => prompt,
        (false, false) => format!("{}: {prompt}", p.model),
    }
}

/// How a manifest validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationVerdict {
    /// Signature, hashes and certificate profile check out, and the signer chains
    /// to a trust anchor that was given.
    Trusted,
    /// Signature, hashes and certificate profile check out; the signer is not
    /// known to be trusted (no anchor given, or none matched).
    Valid,
    /// Something failed: the picture changed after signing, a bad signature, a
    /// certificate the profile refuses.
    Invalid,
}

/// A picture's C2PA manifest as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialReport {
    /// The verdict.
    pub state: ValidationVerdict,
    /// The failed checks (`code: explanation`), trust included.
    pub failures: Vec<String>,
    /// The manifest's title.
    pub title: Option<String>,
    /// The claim generator (`name version`).
    pub generator: Option<String>,
    /// The first action's label (`c2pa.created` for generated pictures).
    pub action: Option<String>,
    /// The first action's digital source type.
    pub digital_source_type: Option<String>,
    /// The first action's parameters (model, prompt, ... for ours).
    pub parameters: Option<Value>,
    /// The signing certificate's common name.
    pub signer: Option<String>,
    /// The signing certificate's issuer (organisation).
    pub issuer: Option<String>,
    /// The signature algorithm.
    pub algorithm: Option<String>,
    /// The whole manifest store as the C2PA SDK reports it (JSON).
    pub json: Value,
}

/// Reads and validates the C2PA manifest of an encoded PNG or JPEG picture.
/// `trust_anchors`: PEM CA certificates whose signers count as trusted (none: a
/// valid manifest reads as [`ValidationVerdict::Valid`], with
/// `signingCredential.untrusted` among the failures).
///
/// Returns `None` when the picture carries no manifest.
///
/// # Errors
/// [`IoError::ContentCredentials`] when the bytes are not a PNG or JPEG, or the
/// manifest cannot be parsed at all.
pub fn read_content_credentials(
    picture: &[u8],
    trust_anchors: Option<&str>,
) -> Result<Option<CredentialReport>, IoError> {
    let format = PictureFormat::sniff(picture)
        .ok_or_else(|| IoError::ContentCredentials("not a PNG or JPEG picture".to_string()))?;
    let mut context = Context::new();
    if let Some(anchors) = trust_anchors {
        let settings = json!({ "trust": { "user_anchors": anchors } });
        context = context
            .with_settings(settings.to_string().as_str())
            .map_err(c2pa_error("trust anchors"))?;
    }
    let reader =
        match Reader::from_context(context).with_stream(format.mime(), Cursor::new(picture)) {
            Ok(r) => r,
            Err(c2pa::Error::JumbfNotFound | c2pa::Error::ProvenanceMissing) => return Ok(None),
            Err(e) => return Err(c2pa_error("reading the manifest")(e)),
        };
    let json: Value = serde_json::from_str(&reader.json())
        .map_err(|e| IoError::ContentCredentials(format!("manifest JSON: {e}")))?;
    Ok(Some(report(&reader, json)))
}

fn report(reader: &Reader, json: Value) -> CredentialReport {
    let state = match reader.validation_state() {
        c2pa::ValidationState::Trusted => ValidationVerdict::Trusted,
        c2pa::ValidationState::Valid => ValidationVerdict::Valid,
        c2pa::ValidationState::Invalid => ValidationVerdict::Invalid,
    };
    let active = json["active_manifest"]
        .as_str()
        .and_then(|label| json["manifests"].get(label))
        .cloned()
        .unwrap_or(Value::Null);
    let action = active["assertions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| {
            a["label"]
                .as_str()
                .is_some_and(|l| l.starts_with("c2pa.actions"))
        })
        .map(|a| a["data"]["actions"][0].clone())
        .unwrap_or(Value::Null);
    let text = |v: &Value| v.as_str().map(str::to_string);
    let generator = active["claim_generator_info"][0]["name"]
        .as_str()
        .map(
            |name| match active["claim_generator_info"][0]["version"].as_str() {
                Some(v) => format!("{name} {v}"),
                None => name.to_string(),
            },
        );
    let failures = json["validation_status"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}: {}",
                s["code"].as_str().unwrap_or("?"),
                s["explanation"].as_str().unwrap_or("")
            )
        })
        .collect();
    CredentialReport {
        state,
        failures,
        title: text(&active["title"]),
        generator,
        action: text(&action["action"]),
        digital_source_type: text(&action["digitalSourceType"]),
        parameters: (!action["parameters"].is_null()).then(|| action["parameters"].clone()),
        signer: text(&active["signature_info"]["common_name"]),
        issuer: text(&active["signature_info"]["issuer"]),
        algorithm: text(&active["signature_info"]["alg"]),
        json,
    }
}

/// A throwaway CA and a signing certificate it issued, in PEM, for trying content
/// credentials out and for tests: the chain passes the C2PA certificate profile,
/// and nothing trusts the CA unless given it as an anchor.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    /// The signing certificate followed by the CA's (what [`ContentCredentials`]
    /// takes).
    pub cert_chain: String,
    /// The signing key (PKCS#8, P-256).
    pub private_key: String,
    /// The CA's certificate (a trust anchor for [`read_content_credentials`]).
    pub ca_cert: String,
}

impl TestCertificates {
    /// A fresh P-256 CA and an ES256 signing certificate named `common_name`
    /// (key usage `digitalSignature`, extended key usage `emailProtection`).
    ///
    /// # Errors
    /// [`IoError::ContentCredentials`] when the certificates cannot be made.
    pub fn generate(common_name: &str) -> Result<Self, IoError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        };
        let fail = |e: rcgen::Error| IoError::ContentCredentials(format!("test certificate: {e}"));
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca.distinguished_name
            .push(DnType::CommonName, format!("{common_name} test CA"));
        ca.distinguished_name
            .push(DnType::OrganizationName, "untrusted test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut signing = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        signing
            .distinguished_name
            .push(DnType::CommonName, common_name);
        signing
            .distinguished_name
            .push(DnType::OrganizationName, "untrusted test signer");
        signing.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        signing.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
        signing.use_authority_key_identifier_extension = true;
        let cert = signing.signed_by(&key, &issuer).map_err(fail)?;
        Ok(Self {
            cert_chain: format!("{}{}", cert.pem(), ca_cert.pem()),
            private_key: key.serialize_pem(),
            ca_cert: ca_cert.pem(),
        })
    }

    /// A signer from these certificates.
    ///
    /// # Errors
    /// As [`ContentCredentials::from_pem`].
    pub fn credentials(&self) -> Result<ContentCredentials, IoError> {
        ContentCredentials::from_pem(self.cert_chain.as_bytes(), self.private_key.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameters() -> GenerationParameters {
        GenerationParameters {
            prompt: "a lighthouse at dusk".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler".into(),
            cfg_scale: 7.5,
            seed: 42,
            width: 64,
            height: 48,
            model: "tiny-sd".into(),
        }
    }

    fn picture(format: image::ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn png_with_parameters() -> Vec<u8> {
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 7]));
        crate::image::encode_rgb_png(&img, Some(&parameters())).unwrap()
    }

    #[test]
    fn signed_png_reads_back_valid_apart_from_trust() {
        let certs = TestCertificates::generate("sd-io test signer").unwrap();
        let credentials = certs.credentials().unwrap();
        assert_eq!(credentials.algorithm(), "es256");
        let png = png_with_parameters();
        let signed = credentials
            .sign(&png, PictureFormat::Png, &parameters())
            .unwrap();
        let report = read_content_credentials(&signed, None).unwrap().unwrap();
        assert_eq!(
            report.state,
            ValidationVerdict::Valid,
            "{:?}",
            report.failures
        );
        assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
        assert!(report.failures[0].starts_with("signingCredential.untrusted"));
        assert_eq!(report.action.as_deref(), Some(CREATED_ACTION));
        assert_eq!(
            report.digital_source_type.as_deref(),
            Some(TRAINED_ALGORITHMIC_MEDIA)
        );
        assert_eq!(report.signer.as_deref(), Some("sd-io test signer"));
        assert_eq!(
            report.generator,
            Some(format!("{GENERATOR_NAME} {}", env!("CARGO_PKG_VERSION")))
        );
        let p = report.parameters.unwrap();
        assert_eq!(p["model"], "tiny-sd");
        assert_eq!(p["prompt"], "a lighthouse at dusk");
        assert_eq!(p["seed"], 42);
        assert_eq!(p["cfg_scale"], 7.5);
        assert_eq!(
            report.title.as_deref(),
            Some("tiny-sd: a lighthouse at dusk")
        );
        // The A1111 chunk is still there, and the pixels unchanged.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signed.png");
        std::fs::write(&path, &signed).unwrap();
        assert_eq!(
            crate::image::read_parameters(&path).unwrap(),
            Some(parameters())
        );
        let a = image::load_from_memory(&png).unwrap();
        let b = image::load_from_memory(&signed).unwrap();
        assert_eq!(a.to_rgb8(), b.to_rgb8());
    }

    #[test]
    fn signed_jpeg_reads_back_valid_and_trusted_with_its_anchor() {
        let certs = TestCertificates::generate("jpeg signer").unwrap();
        let credentials = certs
            .credentials()
            .unwrap()
            .with_generator("my service", "2.1");
        let jpeg = picture(image::ImageFormat::Jpeg);
        let signed = credentials
            .sign(&jpeg, PictureFormat::Jpeg, &parameters())
            .unwrap();
        assert_eq!(PictureFormat::sniff(&signed), Some(PictureFormat::Jpeg));
        let report = read_content_credentials(&signed, None).unwrap().unwrap();
        assert_eq!(
            report.state,
            ValidationVerdict::Valid,
            "{:?}",
            report.failures
        );
        assert_eq!(report.generator.as_deref(), Some("my service 2.1"));
        let trusted = read_content_credentials(&signed, Some(&certs.ca_cert))
            .unwrap()
            .unwrap();
        assert_eq!(
            trusted.state,
            ValidationVerdict::Trusted,
            "{:?}",
            trusted.failures
        );
        assert!(trusted.failures.is_empty(), "{:?}", trusted.failures);
        // Another CA does not vouch for it.
        let other = TestCertificates::generate("other").unwrap();
        let untrusted = read_content_credentials(&signed, Some(&other.ca_cert))
            .unwrap()
            .unwrap();
        assert_eq!(untrusted.state, ValidationVerdict::Valid);
    }

    #[test]
    fn an_edited_picture_reads_back_invalid() {
        let credentials = TestCertificates::generate("edit")
            .unwrap()
            .credentials()
            .unwrap();
        let png = picture(image::ImageFormat::Png);
        let mut signed = credentials
            .sign(&png, PictureFormat::Png, &parameters())
            .unwrap();
        // Flip a byte of the image data (the IDAT chunk's compressed pixels).
        let idat = signed.windows(4).position(|w| w == b"IDAT").unwrap();
        signed[idat + 12] ^= 0x55;
        let report = read_content_credentials(&signed, None).unwrap().unwrap();
        assert_eq!(
            report.state,
            ValidationVerdict::Invalid,
            "{:?}",
            report.failures
        );
        assert!(
            report
                .failures
                .iter()
                .any(|f| f.starts_with("assertion.dataHash.mismatch")),
            "{:?}",
            report.failures
        );
    }

    #[test]
    fn pictures_without_a_manifest_and_other_bytes() {
        assert!(
            read_content_credentials(&picture(image::ImageFormat::Png), None)
                .unwrap()
                .is_none()
        );
        assert!(
            read_content_credentials(&picture(image::ImageFormat::Jpeg), None)
                .unwrap()
                .is_none()
        );
        let err = read_content_credentials(b"GIF89a....", None).unwrap_err();
        assert!(err.to_string().contains("not a PNG or JPEG"), "{err}");
        let credentials = TestCertificates::generate("x")
            .unwrap()
            .credentials()
            .unwrap();
        let err = credentials
            .sign(
                b"\x89PNG\r\n\x1a\nnot really",
                PictureFormat::Png,
                &parameters(),
            )
            .unwrap_err();
        assert!(matches!(err, IoError::ContentCredentials(_)), "{err}");
    }

    #[test]
    fn refused_chains_and_keys_fail_up_front() {
        let certs = TestCertificates::generate("a").unwrap();
        let other = TestCertificates::generate("b").unwrap();
        // A key that is not the certificate's.
        let err =
            ContentCredentials::from_pem(certs.cert_chain.as_bytes(), other.private_key.as_bytes())
                .unwrap_err();
        assert!(matches!(err, IoError::ContentCredentials(_)), "{err}");
        // Not PEM at all.
        let err = ContentCredentials::from_pem(b"not a certificate", b"not a key").unwrap_err();
        assert!(err.to_string().contains("no signer"), "{err}");
        // Missing files name the file.
        let err = ContentCredentials::from_files("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn format_from_names_and_bytes() {
        assert_eq!(PictureFormat::from_path("a/b.JPG"), PictureFormat::Jpeg);
        assert_eq!(PictureFormat::from_path("a/b.jpeg"), PictureFormat::Jpeg);
        assert_eq!(PictureFormat::from_path("a/b.png"), PictureFormat::Png);
        assert_eq!(PictureFormat::from_path("a/b"), PictureFormat::Png);
        assert_eq!(
            PictureFormat::sniff(&picture(image::ImageFormat::Png)),
            Some(PictureFormat::Png)
        );
        assert_eq!(PictureFormat::sniff(b"RIFF"), None);
    }
}
