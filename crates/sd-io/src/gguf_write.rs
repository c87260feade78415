//! Writing GGUF files: ggml's reference quantisers (`quantize_row_*_ref`, byte for
//! byte: checked against the `gguf` package's ports in `tests/fixtures/gen/
//! gguf_quants.py`), stable-diffusion.cpp's rule for which tensors a conversion
//! quantises, and a writer that streams tensors one at a time, so a model is never
//! held whole in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::IoError;
use crate::gguf::{GgmlType, GgufValue};

/// GGUF's default data alignment.
const ALIGNMENT: usize = 32;

/// Whether [`quantize`] writes `dtype`.
pub fn can_quantize(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
    )
}

/// `x` (a whole number of `dtype` blocks, row-major) in `dtype`'s bytes, as ggml's
/// reference quantisers write them.
///
/// # Errors
/// [`IoError::Unsupported`] for a type [`can_quantize`] refuses or a length that is
/// not whole blocks.
pub fn quantize(dtype: GgmlType, x: &[f32]) -> Result<Vec<u8>, IoError> {
    let (elems, size) = dtype.block();
    if !can_quantize(dtype) || !x.len().is_multiple_of(elems) {
        return Err(IoError::Unsupported(format!(
            "quantising {} values to {}",
            x.len(),
            dtype.name()
        )));
    }
    let mut out = Vec::with_capacity(x.len() / elems * size);
    for b in x.chunks_exact(elems) {
        match dtype {
            GgmlType::F32 => out.extend_from_slice(&b[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16::from_f32(b[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(b[0]).to_le_bytes()),
            GgmlType::Q8_0 => q8_0(b, &mut out),
            GgmlType::Q4_0 | GgmlType::Q5_0 => q_0(dtype == GgmlType::Q5_0, b, &mut out),
            _ => q_1(dtype == GgmlType::Q5_1, b, &mut out),
        }
    }
    Ok(out)
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// `quantize_row_q8_0_ref`: d = amax / 127, q = round(x / d).
fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Packs 32 quants of 4 or 5 bits: low nibbles of j and j + 16 share byte j; the
/// fifth bits go to a u32 (`qh`) before them.
fn pack(q: &[u8; 32], five: bool, out: &mut Vec<u8>) {
    if five {
        let mut qh = 0u32;
        for j in 0..16 {
            qh |= u32::from((q[j] & 0x10) >> 4) << j;
            qh |= u32::from((q[j + 16] & 0x10) >> 4) << (j + 16);
        }
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
}

/// `quantize_row_q4_0_ref` / `q5_0`: d = (the value of largest magnitude) / -8
/// (-16), q = min(15 (31), trunc(x / d + 8.5 (16.5))).
fn q_0(five: bool, b: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let (levels, top) = if five { (-16.0, 31) } else { (-8.0, 15) };
    let d = max / levels;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let mut q = [0u8; 32];
    for (qj, v) in q.iter_mut().zip(b) {
        *qj = ((v * id - levels + 0.5) as i8).min(top) as u8;
    }
    pack(&q, five, out);
}

/// `quantize_row_q4_1_ref` / `q5_1`: d = (max - min) / 15 (31), m = min,
/// q = min(15, trunc((x - min) / d + 0.5)) (Q5_1: no clamp, as ggml).
fn q_1(five: bool, b: &[f32], out: &mut Vec<u8>) {
    let min = b.iter().fold(f32::MAX, |m, &v| m.min(v));
    let max = b.iter().fold(f32::MIN, |m, &v| m.max(v));
    let d = (max - min) / if five { 31.0 } else { 15.0 };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let mut q = [0u8; 32];
    for (qj, v) in q.iter_mut().zip(b) {
        let x = (v - min) * id + 0.5;
        *qj = if five {
            x as u8
        } else {
            (x as i8).min(15) as u8
        };
    }
    pack(&q, five, out);
}

/// The type stable-diffusion.cpp's conversion gives a tensor when asked for
/// `wanted` (`ModelLoader::tensor_should_be_converted`): kept as stored (`stored`)
/// when its innermost size is not whole blocks, for biases and scales, embeddings
/// (token, position, time, label, patch and context embedders) and FLUX / MMDiT
/// input and output layers; `wanted` otherwise.
pub fn sd_cpp_tensor_type(
    name: &str,
    shape: &[usize],
    stored: GgmlType,
    wanted: GgmlType,
) -> GgmlType {
    let inner = shape.last().copied().unwrap_or(1);
    let keep = (wanted.is_quantized() && !inner.is_multiple_of(wanted.block().0))
        || name.ends_with(".bias")
        || name.ends_with(".scale")
        || [
            "img_in.",
            "txt_in.",
            "time_in.",
            "vector_in.",
            "guidance_in.",
            "final_layer.",
            "x_embedder.",
            "t_embedder.",
            "y_embedder.",
            "pos_embed",
            "context_embedder.",
            "time_embed.",
            "label_emb.",
            "embedding",
        ]
        .iter()
        .any(|s| name.contains(s));
    if keep { stored } else { wanted }
}

/// One tensor to write: its name, PyTorch shape and type; its values come when the
/// writer reaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// The tensor's name.
    pub name: String,
    /// Its shape, outermost first.
    pub shape: Vec<usize>,
    /// The type it is written in.
    pub dtype: GgmlType,
}

impl TensorPlan {
    /// Bytes of the tensor's data in its type.
    pub fn bytes(&self) -> usize {
        let (elems, size) = self.dtype.block();
        self.shape.iter().product::<usize>() / elems * size
    }
}

/// Writes a GGUF v3 file: `metadata`, then each planned tensor's values, asked of
/// `values` one tensor at a time (f32, row-major) and quantised as planned.
///
/// # Errors
/// I/O errors; a tensor whose values do not fill its shape, or a type the
/// quantiser refuses, as [`IoError::Unsupported`].
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    plan: &[TensorPlan],
    mut values: impl FnMut(&TensorPlan) -> Result<Vec<f32>, IoError>,
) -> Result<(), IoError> {
    let io = |e| IoError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        put_value(&mut head, value);
    }
    let mut offset = 0usize;
    for t in plan {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.dtype.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
    w.write_all(&head).map_err(io)?;
    for t in plan {
        let x = values(t)?;
        if x.len() != t.shape.iter().product::<usize>() {
            return Err(IoError::Unsupported(format!(
                "`{}`: {} values for shape {:?}",
                t.name,
                x.len(),
                t.shape
            )));
        }
        let bytes = quantize(t.dtype, &x)?;
        w.write_all(&bytes).map_err(io)?;
        let pad = bytes.len().next_multiple_of(ALIGNMENT) - bytes.len();
        w.write_all(&[0u8; ALIGNMENT][..pad]).map_err(io)?;
    }
    w.flush().map_err(io)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's GGUF type id and body: u32 4, i32 5, f32 6, bool 7, string 8, array 9,
/// u64 10, i64 11 (integers written 32-bit where they fit; floats as f32). An
/// array's elements take its first element's type.
fn body(v: &GgufValue) -> (u32, Vec<u8>) {
    match v {
        GgufValue::Uint(x) => match u32::try_from(*x) {
            Ok(x) => (4, x.to_le_bytes().to_vec()),
            Err(_) => (10, x.to_le_bytes().to_vec()),
        },
        GgufValue::Int(x) => match i32::try_from(*x) {
            Ok(x) => (5, x.to_le_bytes().to_vec()),
            Err(_) => (11, x.to_le_bytes().to_vec()),
        },
        GgufValue::Float(x) => (6, (*x as f32).to_le_bytes().to_vec()),
        GgufValue::Bool(x) => (7, vec![u8::from(*x)]),
        GgufValue::String(s) => {
            let mut b = Vec::new();
            put_string(&mut b, s);
            (8, b)
        }
        GgufValue::Array(items) => {
            let bodies: Vec<(u32, Vec<u8>)> = items.iter().map(body).collect();
            let kind = bodies.first().map_or(4, |(k, _)| *k);
            let mut b = kind.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for (_, item) in bodies {
                b.extend_from_slice(&item);
            }
            (9, b)
        }
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    let (kind, b) = body(v);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&b);
}

/// Where [`write_gguf`] puts a converted file when no name is given: beside `src`,
/// `{stem}-{type}.gguf`.
pub fn default_output(src: &Path, dtype: GgmlType) -> PathBuf {
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    src.with_file_name(format!("{stem}-{}.gguf", dtype.name().to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn written_files_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.gguf");
        let plan = vec![
            TensorPlan {
                name: "a.weight".into(),
                shape: vec![2, 64],
                dtype: GgmlType::Q8_0,
            },
            TensorPlan {
                name: "b.bias".into(),
                shape: vec![3],
                dtype: GgmlType::F32,
            },
        ];
        let metadata = vec![
            ("general.name".to_string(), GgufValue::String("x".into())),
            (
                "dims".to_string(),
                GgufValue::Array(vec![GgufValue::Uint(2), GgufValue::Uint(64)]),
            ),
        ];
        let a: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) / 10.0).collect();
        write_gguf(&path, &metadata, &plan, |t| {
            Ok(if t.name == "b.bias" {
                vec![1.0, 2.0, 3.0]
            } else {
                a.clone()
            })
        })
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.metadata()["general.name"], GgufValue::String("x".into()));
        assert_eq!(f.metadata()["dims"].as_dims(), Some(vec![2, 64]));
        assert_eq!(f.tensors()["a.weight"].shape, vec![2, 64]);
        assert_eq!(f.dequantize("b.bias").unwrap(), vec![1.0, 2.0, 3.0]);
        let back = f.dequantize("a.weight").unwrap();
        let err = back
            .iter()
            .zip(&a)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 6.4 / 127.0, "{err}");
    }

    /// Byte for byte as the `gguf` package's ports of ggml's reference quantisers
    /// (`tests/fixtures/gen/gguf_quants.py`).
    #[test]
    fn quantisers_match_ggml() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf/quants.gguf");
        let f = GgufFile::open(path).unwrap();
        let input = f.dequantize("input").unwrap();
        for (name, t) in f.tensors() {
            if name == "input" {
                continue;
            }
            let ours = quantize(t.dtype, &input).unwrap();
            let theirs = f.raw(name).unwrap();
            let first = ours.iter().zip(theirs).position(|(a, b)| a != b);
            assert_eq!(first, None, "{name}: first differing byte");
            assert_eq!(ours.len(), theirs.len(), "{name}");
        }
    }

    #[test]
    fn sd_cpp_rules() {
        let q = GgmlType::Q4_0;
        let f = GgmlType::F16;
        let t = |n: &str, s: &[usize]| sd_cpp_tensor_type(n, s, f, q);
        assert_eq!(t("model.diffusion_model.out.2.weight", &[4, 320, 3, 3]), f);
        assert_eq!(t("a.attn1.to_q.weight", &[320, 320]), q);
        assert_eq!(t("a.attn1.to_q.bias", &[320]), f);
        assert_eq!(
            t("model.diffusion_model.time_embed.0.weight", &[1280, 320]),
            f
        );
        assert_eq!(t("x.token_embedding.weight", &[49408, 768]), f);
        assert!(quantize(GgmlType::Q4K, &[0.0; 256]).is_err());
        assert!(quantize(GgmlType::Q8_0, &[0.0; 31]).is_err());
    }
}
