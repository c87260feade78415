//! Content credentials on the pictures the server returns: with `c2pa_cert` and
//! `c2pa_key` configured (and the `c2pa` feature built in), every finished picture's
//! PNG carries a signed C2PA manifest (`c2pa.created` by a trained algorithm, the
//! server as software agent, the model and parameters), made by the worker that
//! generated it.

use std::path::Path;

use crate::config::ServerConfig;
use crate::error::{ApiError, ConfigError};

/// The generator the manifests name.
pub const GENERATOR: &str = "sd-server";

/// Signs the server's pictures, or passes them through when no certificate is
/// configured.
#[derive(Debug, Default)]
pub struct PictureSigner {
    #[cfg(feature = "c2pa")]
    credentials: Option<sd_io::content_credentials::ContentCredentials>,
}

impl PictureSigner {
    /// The signer `config` asks for: none without `c2pa_cert` / `c2pa_key`. The
    /// certificate and key are read and checked (a probe picture is signed and
    /// validated) here, at start-up.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] (`c2pa_cert`) when only one of the two is given,
    /// when they are refused, or when the server was built without the `c2pa`
    /// feature.
    pub fn from_config(config: &ServerConfig) -> Result<Self, ConfigError> {
        match (&config.c2pa_cert, &config.c2pa_key) {
            (None, None) => Ok(Self::default()),
            (Some(cert), Some(key)) => Self::load(cert, key),
            _ => Err(invalid("give both `c2pa_cert` and `c2pa_key`, or neither")),
        }
    }

    #[cfg(feature = "c2pa")]
    fn load(cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        let credentials = sd_io::content_credentials::ContentCredentials::from_files(cert, key)
            .map_err(|e| invalid(&e.to_string()))?
            .with_generator(GENERATOR, env!("CARGO_PKG_VERSION"));
        tracing::info!(
            certificate = %cert.display(),
            algorithm = %credentials.algorithm(),
            "pictures carry C2PA content credentials"
        );
        Ok(Self {
            credentials: Some(credentials),
        })
    }

    #[cfg(not(feature = "c2pa"))]
    fn load(_cert: &Path, _key: &Path) -> Result<Self, ConfigError> {
        Err(invalid(
            "this server was built without the `c2pa` feature (cargo build --features c2pa)",
        ))
    }

    /// Whether pictures are signed.
    pub fn is_signing(&self) -> bool {
        #[cfg(feature = "c2pa")]
        return self.credentials.is_some();
        #[cfg(not(feature = "c2pa"))]
        false
    }

    /// The PNG with a signed manifest, or unchanged when not signing.
    ///
    /// # Errors
    /// [`ApiError::Internal`] when signing fails.
    pub fn sign_png(
        &self,
        png: Vec<u8>,
        parameters: &sd_io::image::GenerationParameters,
    ) -> Result<Vec<u8>, ApiError> {
        #[cfg(feature = "c2pa")]
        if let Some(c) = &self.credentials {
            return c
                .sign(&png, sd_io::image::PictureFormat::Png, parameters)
                .map_err(|e| ApiError::Internal(e.to_string()));
        }
        let _ = parameters;
        Ok(png)
    }
}

fn invalid(message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: "c2pa_cert".to_string(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_pair_is_refused() {
        let config = ServerConfig {
            c2pa_cert: Some("cert.pem".into()),
            ..ServerConfig::default()
        };
        let err = PictureSigner::from_config(&config).unwrap_err();
        assert!(
            err.to_string().contains("both `c2pa_cert` and `c2pa_key`"),
            "{err}"
        );
        let signer = PictureSigner::from_config(&ServerConfig::default()).unwrap();
        assert!(!signer.is_signing());
        let png = vec![1, 2, 3];
        let out = signer
            .sign_png(png.clone(), &sd_io::image::GenerationParameters::default())
            .unwrap();
        assert_eq!(out, png);
    }

    #[cfg(not(feature = "c2pa"))]
    #[test]
    fn without_the_feature_a_certificate_is_refused_by_name() {
        let config = ServerConfig {
            c2pa_cert: Some("cert.pem".into()),
            c2pa_key: Some("key.pem".into()),
            ..ServerConfig::default()
        };
        let err = PictureSigner::from_config(&config).unwrap_err();
        assert!(err.to_string().contains("`c2pa` feature"), "{err}");
    }

    #[cfg(feature = "c2pa")]
    #[test]
    fn configured_pictures_are_signed() {
        let dir = tempfile::tempdir().unwrap();
        let certs = sd_io::content_credentials::TestCertificates::generate("server").unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &certs.cert_chain).unwrap();
        std::fs::write(&key, &certs.private_key).unwrap();
        let config = ServerConfig {
            c2pa_cert: Some(cert),
            c2pa_key: Some(key.clone()),
            ..ServerConfig::default()
        };
        let signer = PictureSigner::from_config(&config).unwrap();
        assert!(signer.is_signing());
        let png = sd_io::image::encode_rgb_png(&image::RgbImage::new(16, 16), None).unwrap();
        let parameters = sd_io::image::GenerationParameters {
            model: "demo-shapes".into(),
            ..Default::default()
        };
        let signed = signer.sign_png(png, &parameters).unwrap();
        let report = sd_io::content_credentials::read_content_credentials(&signed, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            report.generator,
            Some(format!("{GENERATOR} {}", env!("CARGO_PKG_VERSION")))
        );
        // A key that is not the certificate's is refused at start-up.
        let other = sd_io::content_credentials::TestCertificates::generate("other").unwrap();
        std::fs::write(&key, &other.private_key).unwrap();
        let err = PictureSigner::from_config(&config).unwrap_err();
        assert!(
            err.to_string().starts_with("configuration `c2pa_cert`"),
            "{err}"
        );
    }
}
