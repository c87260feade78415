//! GGUF files (the ggml project's format: stable-diffusion.cpp's and ComfyUI-GGUF's
//! quantised checkpoints), memory-mapped: the header (versions 2 and 3), the metadata,
//! the tensor table, and each tensor dequantised to f32 on request.
//!
//! Types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K,
//! Q3_K, Q4_K, Q5_K, Q6_K, each as ggml's `dequantize_row_*` computes it (checked
//! against the `gguf` package's reference on every type: `tests/fixtures/gen/
//! gguf_types.py`). Shapes are given in PyTorch order (GGUF stores the innermost
//! axis first).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::error::IoError;

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale, 32 signed bytes.
    Q8_0,
    /// Blocks of 32: an f16 scale, 4-bit quants (offset 8).
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, 4-bit quants.
    Q4_1,
    /// Blocks of 32: an f16 scale, 5-bit quants (offset 16).
    Q5_0,
    /// Blocks of 32: f16 scale and minimum, 5-bit quants.
    Q5_1,
    /// Super-blocks of 256: 2-bit quants, 4-bit scales and minimums.
    Q2K,
    /// Super-blocks of 256: 3-bit quants, 6-bit scales.
    Q3K,
    /// Super-blocks of 256: 4-bit quants, 6-bit scales and minimums.
    Q4K,
    /// Super-blocks of 256: 5-bit quants, 6-bit scales and minimums.
    Q5K,
    /// Super-blocks of 256: 6-bit quants, 8-bit scales.
    Q6K,
}

impl GgmlType {
    /// Every type this reader knows.
    pub const ALL: [Self; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The type of ggml's numeric id, if this reader knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's numeric id of the type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
        }
    }

    /// The type named as ggml and stable-diffusion.cpp name it (`q4_k`, `Q8_0`,
    /// `f16`; any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Whether the type is a block quantisation (not F32, F16 or BF16).
    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// ggml's name of the type (`Q4_K`, `F16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// (elements, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer (u8 to u64).
    Uint(u64),
    /// Any signed integer (i8 to i64).
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as text: strings as they are, numbers and booleans printed, arrays
    /// as `[a, b]`.
    pub fn to_text(&self) -> String {
        match self {
            Self::Uint(v) => v.to_string(),
            Self::Int(v) => v.to_string(),
            Self::Float(v) => v.to_string(),
            Self::Bool(v) => v.to_string(),
            Self::String(v) => v.clone(),
            Self::Array(items) => {
                let items: Vec<String> = items.iter().map(Self::to_text).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }

    /// An array of non-negative integers (a shape), if the value is one.
    pub fn as_dims(&self) -> Option<Vec<usize>> {
        let Self::Array(items) = self else {
            return None;
        };
        items
            .iter()
            .map(|v| match v {
                Self::Uint(d) => usize::try_from(*d).ok(),
                Self::Int(d) => usize::try_from(*d).ok(),
                _ => None,
            })
            .collect()
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Its type.
    pub dtype: GgmlType,
    /// Its shape in PyTorch order (outermost first).
    pub shape: Vec<usize>,
    /// Byte offset in the file.
    pub offset: usize,
    /// Bytes.
    pub bytes: usize,
}

/// A memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, GgufTensor>,
}

/// Reads the header, metadata and tensor table.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.at))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count or length, bounded by what is left of the file.
    fn len(&mut self, per_item: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.data.len() - self.at) as u64;
        if n.saturating_mul(per_item.max(1) as u64) > left {
            return Err(format!(
                "a count of {n} at byte {} runs past the file",
                self.at - 8
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len(1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue, String> {
        let b = |c: &mut Self, n: usize| -> Result<u64, String> {
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(c.take(n)?);
            Ok(u64::from_le_bytes(v))
        };
        let signed = |v: u64, bits: u32| ((v << (64 - bits)) as i64) >> (64 - bits);
        Ok(match kind {
            0 => GgufValue::Uint(b(self, 1)?),
            1 => GgufValue::Int(signed(b(self, 1)?, 8)),
            2 => GgufValue::Uint(b(self, 2)?),
            3 => GgufValue::Int(signed(b(self, 2)?, 16)),
            4 => GgufValue::Uint(b(self, 4)?),
            5 => GgufValue::Int(signed(b(self, 4)?, 32)),
            6 => GgufValue::Float(f32::from_bits(b(self, 4)? as u32) as f64),
            7 => GgufValue::Bool(b(self, 1)? != 0),
            8 => GgufValue::String(self.string()?),
            9 if depth < 4 => {
                let inner = self.u32()?;
                let n = self.len(1)?;
                let items = (0..n)
                    .map(|_| self.value(inner, depth + 1))
                    .collect::<Result<_, _>>()?;
                GgufValue::Array(items)
            }
            10 => GgufValue::Uint(b(self, 8)?),
            11 => GgufValue::Int(b(self, 8)? as i64),
            12 => GgufValue::Float(f64::from_bits(b(self, 8)?)),
            other => return Err(format!("metadata value type {other} is not GGUF's")),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file (versions 2 and 3).
    ///
    /// # Errors
    /// [`IoError::Io`] when it cannot be read; [`IoError::Unsupported`] for another
    /// format or version, a truncated or inconsistent header, or a tensor type this
    /// reader does not know (named).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| IoError::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath while mapped is
        // the same hazard as with safetensors' maps, which this crate accepts.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| IoError::io(path, e))?;
        let bad = |m: String| IoError::Unsupported(format!("{}: {m}", path.display()));
        let (version, metadata, tensors) = parse(&map).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The metadata by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, GgufTensor> {
        &self.tensors
    }

    /// A tensor's stored bytes.
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensors.get(name)?;
        self.map.get(t.offset..t.offset + t.bytes)
    }

    /// A tensor's values as f32, row-major in its PyTorch shape.
    ///
    /// # Errors
    /// [`IoError::Unsupported`] for an unknown name.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, IoError> {
        let t = self.tensors.get(name).ok_or_else(|| {
            IoError::Unsupported(format!("{}: no tensor `{name}`", self.path.display()))
        })?;
        let bytes = &self.map[t.offset..t.offset + t.bytes];
        let mut out = vec![0f32; t.shape.iter().product()];
        dequantize(t.dtype, bytes, &mut out);
        Ok(out)
    }
}

pub(crate) type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    BTreeMap<String, GgufTensor>,
);

/// Parses a GGUF file's bytes: version, metadata, tensor table (absolute offsets).
pub(crate) fn parse(data: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { data, at: 0 };
    if c.take(4).ok() != Some(b"GGUF".as_slice()) {
        return Err("not a GGUF file (no `GGUF` magic)".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (2 and 3 are read)"));
    }
    let n_tensors = c.len(24)?;
    let n_kv = c.len(12)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let kind = c.u32()?;
        metadata.insert(key, c.value(kind, 0)?);
    }
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let dims = c.u32()? as usize;
        if dims > 8 {
            return Err(format!("tensor `{name}` has {dims} dimensions"));
        }
        let mut shape = (0..dims)
            .map(|_| c.u64().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        shape.reverse();
        let id = c.u32()?;
        let dtype = GgmlType::from_id(id).ok_or_else(|| {
            format!("tensor `{name}` has ggml type {id}, which this reader does not know")
        })?;
        let offset = c.u64()? as usize;
        infos.push((name, shape, dtype, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        Some(GgufValue::Uint(a)) if *a > 0 && a.is_power_of_two() => *a as usize,
        None => 32,
        Some(other) => return Err(format!("general.alignment {other:?}")),
    };
    let start = c.at.div_ceil(alignment) * alignment;
    let mut tensors = BTreeMap::new();
    for (name, shape, dtype, offset) in infos {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let (elems, block_bytes) = dtype.block();
        let bytes = numel
            .filter(|n| n % elems == 0)
            .and_then(|n| (n / elems).checked_mul(block_bytes))
            .ok_or_else(|| {
                format!("tensor `{name}`: shape {shape:?} is not whole {dtype:?} blocks")
            })?;
        let at = start
            .checked_add(offset)
            .filter(|a| a.checked_add(bytes).is_some_and(|e| e <= data.len()));
        let at = at.ok_or_else(|| format!("tensor `{name}` runs past the end of the file"))?;
        tensors.insert(
            name,
            GgufTensor {
                dtype,
                shape,
                offset: at,
                bytes,
            },
        );
    }
    Ok((version, metadata, tensors))
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The blocks of a type whose values are small integers times one scale per 32
/// (Q8_0, Q5_0, Q4_0) as 8-bit values, in order, and their scales: what burn's
/// quantized tensors hold ([`crate::WeightSource::read_blocks`]). `None` for other
/// types (offsets, as Q4_1's, or sub-block scales, as the K-quants').
pub(crate) fn to_i8_blocks(dtype: GgmlType, bytes: &[u8]) -> Option<(Vec<i8>, Vec<f32>)> {
    if !matches!(dtype, GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0) {
        return None;
    }
    let (elems, size) = dtype.block();
    let blocks = bytes.len() / size;
    let mut values = vec![0i8; blocks * elems];
    let mut scales = Vec::with_capacity(blocks);
    let mut y = [0f32; 32];
    for (b, v) in bytes.chunks_exact(size).zip(values.chunks_exact_mut(elems)) {
        let d = half(b, 0);
        scales.push(d);
        match dtype {
            GgmlType::Q8_0 => {
                for (j, v) in v.iter_mut().enumerate() {
                    *v = b[2 + j] as i8;
                }
            }
            _ => {
                // The integers back from the dequantised values (exact: small
                // integers times a power-of-two-free f16 scale round-trip in f32).
                dequantize(dtype, b, &mut y);
                for (v, y) in v.iter_mut().zip(&y) {
                    *v = if d == 0.0 { 0 } else { (y / d).round() as i8 };
                }
            }
        }
    }
    Some((values, scales))
}

/// Dequantises (ggml's `dequantize_row_*`) whole blocks of `dtype` from `bytes` into `out` (its length in elements).
pub(crate) fn dequantize(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (elems, size) = dtype.block();
    for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(elems)) {
        match dtype {
            GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => y[0] = half(b, 0),
            GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            GgmlType::Q8_0 => {
                let d = half(b, 0);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = (b[2 + j] as i8) as f32 * d;
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => q4(dtype == GgmlType::Q4_1, b, y),
            GgmlType::Q5_0 | GgmlType::Q5_1 => q5(dtype == GgmlType::Q5_1, b, y),
            GgmlType::Q2K => q2_k(b, y),
            GgmlType::Q3K => q3_k(b, y),
            GgmlType::Q4K | GgmlType::Q5K => q45_k(dtype == GgmlType::Q5K, b, y),
            GgmlType::Q6K => q6_k(b, y),
        }
    }
}

fn q4(with_min: bool, b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let (m, qs) = if with_min {
        (half(b, 2), &b[4..20])
    } else {
        (0.0, &b[2..18])
    };
    for j in 0..16 {
        let (lo, hi) = ((qs[j] & 0xF) as i32, (qs[j] >> 4) as i32);
        if with_min {
            y[j] = lo as f32 * d + m;
            y[j + 16] = hi as f32 * d + m;
        } else {
            y[j] = (lo - 8) as f32 * d;
            y[j + 16] = (hi - 8) as f32 * d;
        }
    }
}

fn q5(with_min: bool, b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let (m, at) = if with_min { (half(b, 2), 4) } else { (0.0, 2) };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as i32;
        let h1 = ((qh >> (j + 12)) & 0x10) as i32;
        let (x0, x1) = ((qs[j] & 0xF) as i32 | h0, (qs[j] >> 4) as i32 | h1);
        if with_min {
            y[j] = x0 as f32 * d + m;
            y[j + 16] = x1 as f32 * d + m;
        } else {
            y[j] = (x0 - 16) as f32 * d;
            y[j + 16] = (x1 - 16) as f32 * d;
        }
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (half(b, 80), half(b, 82));
    let (mut is, mut o) = (0, 0);
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for half_block in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
                for l in 0..16 {
                    y[o] = dl * ((q[l + 16 * half_block] >> shift) & 3) as f32 - ml;
                    o += 1;
                }
            }
        }
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hm, qs, raw) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = half(b, 108);
    let w =
        |i: usize| u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]);
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let scales: Vec<i8> = aux
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .map(|v| v as i8)
        .collect();
    let (mut is, mut o, mut m) = (0, 0, 1u8);
    for n in 0..2 {
        let q = &qs[n * 32..n * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for half_block in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let i = l + 16 * half_block;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let high = if hm[i] & m != 0 { 0 } else { 4 };
                    y[o] = dl * (low - high) as f32;
                    o += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q45_k(five: bool, b: &[u8], y: &mut [f32]) {
    let (d, min, scales) = (half(b, 0), half(b, 2), &b[4..16]);
    let (qh, ql) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    let (mut u1, mut u2) = (1u8, 2u8);
    for (k, j) in (0..256).step_by(64).enumerate() {
        let q = &ql[32 * k..32 * k + 32];
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        for l in 0..32 {
            let (h1, h2) = if five {
                (
                    (if qh[l] & u1 != 0 { 16 } else { 0 }),
                    (if qh[l] & u2 != 0 { 16 } else { 0 }),
                )
            } else {
                (0, 0)
            };
            y[j + l] = d1 * ((q[l] & 0xF) as i32 + h1) as f32 - m1;
            y[j + 32 + l] = d2 * ((q[l] >> 4) as i32 + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&b[64 * n..64 * n + 64], &b[128 + 32 * n..128 + 32 * n + 32]);
        let sc = |i: usize| (b[192 + 8 * n + i] as i8) as f32;
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc(is) * q1 as f32;
            y[l + 32] = d * sc(is + 2) * q2 as f32;
            y[l + 64] = d * sc(is + 4) * q3 as f32;
            y[l + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gguf")
            .join(name)
    }

    /// Every type against the `gguf` package's reference dequantiser, the metadata
    /// of every kind, PyTorch-order shapes.
    #[test]
    fn every_type_dequantises_as_ggml() {
        let file = GgufFile::open(fixture("types.gguf")).unwrap();
        assert_eq!(file.version(), 3);
        let md = file.metadata();
        assert_eq!(md["test.string"], GgufValue::String("a red fox".into()));
        assert_eq!(md["test.u32"], GgufValue::Uint(123_456));
        assert_eq!(md["test.i32"], GgufValue::Int(-7));
        assert_eq!(md["test.f32"], GgufValue::Float(0.5));
        assert_eq!(md["test.bool"], GgufValue::Bool(true));
        assert_eq!(md["test.u64"], GgufValue::Uint(1 << 40));
        assert_eq!(
            md["test.strings"],
            GgufValue::Array(
                ["clip_l", "clip_g", "t5xxl"]
                    .map(|s| GgufValue::String(s.into()))
                    .to_vec()
            )
        );
        let expected = crate::WeightSource::open(fixture("types_expected.safetensors")).unwrap();
        assert_eq!(file.tensors().len(), expected.tensors().len());
        for (name, t) in file.tensors() {
            let e = expected.get(name).unwrap();
            assert_eq!(t.shape, e.shape, "{name}");
            let want = expected
                .read_float(name, burn::tensor::DType::F32, e.shape.clone())
                .unwrap()
                .try_into_vec::<f32>()
                .unwrap();
            let got = file.dequantize(name).unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-6,
                "{name} ({:?}): relative error {worst}",
                t.dtype
            );
        }
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let not = dir.path().join("x.gguf");
        std::fs::write(&not, b"GGML....").unwrap();
        let err = GgufFile::open(&not).unwrap_err().to_string();
        assert!(err.contains("no `GGUF` magic"), "{err}");
        let whole = std::fs::read(fixture("types.gguf")).unwrap();
        for cut in [10, 100, 1000, whole.len() - 100] {
            std::fs::write(&not, &whole[..cut]).unwrap();
            let err = GgufFile::open(&not).unwrap_err().to_string();
            assert!(
                err.contains("truncated") || err.contains("past"),
                "{cut}: {err}"
            );
        }
        let mut v1 = whole.clone();
        v1[4] = 1;
        std::fs::write(&not, &v1).unwrap();
        let err = GgufFile::open(&not).unwrap_err().to_string();
        assert!(err.contains("version 1"), "{err}");
    }
}
