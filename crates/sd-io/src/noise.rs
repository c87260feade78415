//! Recorded noise: the draws of a diffusers run (`noise_000`, `noise_001`, ... in a
//! safetensors file, as the fixtures' generators write them), replayed by
//! [`RecordedNoise`] so that a run here takes the same random numbers.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::DType;
use sd_core::RecordedNoise;

use crate::error::IoError;
use crate::weights::WeightSource;

/// The key of draw `i`: `noise_000`, `noise_001`, ...
pub fn noise_key(i: usize) -> String {
    format!("noise_{i:03}")
}

/// The recorded draws of `source` in order, as `[b, c, h, w]` tensors on `device`
/// (none when it holds no `noise_000`).
///
/// # Errors
/// A draw that does not have four axes, or unreadable data.
pub fn recorded_noise_tensors(
    source: &WeightSource,
    device: &Device,
) -> Result<Vec<Tensor<4>>, IoError> {
    let mut tensors = Vec::new();
    for i in 0.. {
        let key = noise_key(i);
        let Some(t) = source.get(&key) else {
            break;
        };
        if t.shape.len() != 4 {
            return Err(IoError::Unsupported(format!(
                "recorded noise `{key}` has shape {:?}, 4 axes expected",
                t.shape
            )));
        }
        let shape = t.shape.clone();
        tensors.push(Tensor::from_data(
            source.read_float(&key, DType::F32, shape)?,
            device,
        ));
    }
    Ok(tensors)
}

/// The recorded noise of a safetensors file, ready to replay.
///
/// # Errors
/// An unreadable file, or as [`recorded_noise_tensors`].
pub fn read_recorded_noise(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<RecordedNoise, IoError> {
    let source = WeightSource::open(path.as_ref())?;
    Ok(RecordedNoise::new(recorded_noise_tensors(&source, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_read_in_order_until_the_first_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.safetensors");
        let bytes = |v: f32| -> Vec<u8> { (0..4).flat_map(|_| v.to_le_bytes()).collect() };
        let (a, b, c) = (bytes(1.0), bytes(2.0), bytes(3.0));
        fn view(b: &[u8], shape: Vec<usize>) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, b).unwrap()
        }
        let views = vec![
            ("noise_000".to_string(), view(&a, vec![1, 1, 2, 2])),
            ("noise_001".to_string(), view(&b, vec![1, 1, 2, 2])),
            ("noise_003".to_string(), view(&c, vec![1, 1, 2, 2])),
        ];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let device = Device::flex();
        let source = WeightSource::open(&path).unwrap();
        let draws = recorded_noise_tensors(&source, &device).unwrap();
        assert_eq!(draws.len(), 2);
        assert_eq!(
            draws[1].clone().into_data().try_to_vec::<f32>().unwrap(),
            [2.0; 4]
        );
        let noise = read_recorded_noise(&path, &device).unwrap();
        assert_eq!(noise.remaining(), 2);
        let bad = dir.path().join("bad.safetensors");
        safetensors::serialize_to_file(
            vec![("noise_000".to_string(), view(&a, vec![4]))],
            None,
            &bad,
        )
        .unwrap();
        let err = read_recorded_noise(&bad, &device).unwrap_err().to_string();
        assert!(err.contains("4 axes"), "{err}");
    }
}
