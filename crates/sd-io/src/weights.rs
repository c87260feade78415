//! Memory-mapped weight files (safetensors, single or sharded, and GGUF) and
//! conversion of their tensors to the model's float type.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::IoError;
use crate::gguf::{self, GgmlType};

/// The metadata key under which ComfyUI-GGUF's converter records a tensor's shape
/// before it flattened the tensor to rows of 256 for quantisation.
const COMFY_ORIG_SHAPE: &str = "comfy.gguf.orig_shape.";

/// Dtype and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// The on-disk dtype (a GGUF tensor's float type; `U8` for its quantised types,
    /// which [`ggml`](Self::ggml) names).
    pub dtype: Dtype,
    /// The shape (for a GGUF tensor in PyTorch order, as the model has it).
    pub shape: Vec<usize>,
    /// The ggml type of a tensor read from a GGUF file.
    pub ggml: Option<GgmlType>,
    file: usize,
    start: usize,
    end: usize,
}

impl StoredTensor {
    /// Whether the tensor holds floats this crate converts (f16, bf16, f32, f64).
    /// GGUF tensors of every type read count as floats: they are dequantised.
    pub fn is_float(&self) -> bool {
        self.ggml.is_some()
            || matches!(
                self.dtype,
                Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
            )
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the stored data.
    pub fn stored_bytes(&self) -> usize {
        self.end - self.start
    }

    /// The stored type's name: ggml's for a GGUF tensor (`q4_k`), else the
    /// safetensors dtype (`f16`).
    pub fn type_name(&self) -> String {
        match self.ggml {
            Some(g) => g.name().to_lowercase(),
            None => format!("{:?}", self.dtype).to_lowercase(),
        }
    }

    /// Whether the stored values are ggml blocks (read by dequantising).
    pub fn is_quantized(&self) -> bool {
        self.ggml.is_some_and(GgmlType::is_quantized)
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Rows of a block-quantised matrix as 8-bit values and a scale per 32 values of a
/// row ([`WeightSource::read_blocks`]): value `(r, c)` is `values[r * cols + c] *
/// scales[r * cols / 32 + c / 32]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    /// `[rows, cols]`, row-major.
    pub values: Vec<i8>,
    /// `[rows, cols / 32]`, row-major.
    pub scales: Vec<f32>,
}

/// One or more safetensors files seen as one set of named tensors, memory-mapped:
/// reading a tensor converts it straight from the mapping, so the file is never
/// copied into RAM as a whole.
pub struct WeightSource {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, StoredTensor>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource")
            .field(
                "files",
                &self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Mmap, IoError> {
    let file = File::open(path).map_err(|e| IoError::io(path, e))?;
    // SAFETY: the mapping is read-only; as with every memory-mapped loader, the file
    // must not be truncated by another process while the model loads.
    unsafe { Mmap::map(&file) }.map_err(|e| IoError::io(path, e))
}

/// A mapped safetensors file's header and where its data starts.
fn safetensors_header(
    path: &Path,
    mmap: &Mmap,
) -> Result<(safetensors::tensor::Metadata, usize), IoError> {
    let (n, metadata) = SafeTensors::read_metadata(mmap).map_err(|e| IoError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((metadata, 8 + n))
}

/// Adds the tensors of a mapped GGUF file, file `index` (shapes restored from
/// ComfyUI-GGUF's `comfy.gguf.orig_shape.*` records), and its metadata as text.
fn add_gguf(
    path: &Path,
    mmap: &Mmap,
    index: usize,
    tensors: &mut BTreeMap<String, StoredTensor>,
    header: &mut BTreeMap<String, String>,
) -> Result<(), IoError> {
    let bad = |m: String| IoError::Unsupported(format!("{}: {m}", path.display()));
    let (_, metadata, table) = gguf::parse(mmap).map_err(bad)?;
    for (name, t) in table {
        let mut shape = t.shape;
        if let Some(orig) = metadata
            .get(&format!("{COMFY_ORIG_SHAPE}{name}"))
            .and_then(gguf::GgufValue::as_dims)
        {
            if orig.iter().product::<usize>() != shape.iter().product::<usize>() {
                return Err(bad(format!(
                    "`{COMFY_ORIG_SHAPE}{name}` records {orig:?} for a tensor of shape {shape:?}"
                )));
            }
            shape = orig;
        }
        let dtype = match t.dtype {
            GgmlType::F32 => Dtype::F32,
            GgmlType::F16 => Dtype::F16,
            GgmlType::BF16 => Dtype::BF16,
            _ => Dtype::U8,
        };
        let stored = StoredTensor {
            dtype,
            shape,
            ggml: Some(t.dtype),
            file: index,
            start: t.offset,
            end: t.offset + t.bytes,
        };
        if tensors.insert(name.clone(), stored).is_some() {
            return Err(bad(format!(
                "tensor `{name}` appears in more than one file"
            )));
        }
    }
    for (key, value) in metadata {
        if !key.starts_with(COMFY_ORIG_SHAPE) {
            header.insert(key, value.to_text());
        }
    }
    Ok(())
}

impl WeightSource {
    /// Opens one `.safetensors` or GGUF file (recognised by its magic bytes), or a
    /// sharded safetensors set through its `*.safetensors.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        let path = path.as_ref();
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_sharded(path);
        }
        Self::open_files(&[path.to_path_buf()])
    }

    /// Opens the shards listed in a `*.safetensors.index.json` (`weight_map`).
    pub fn open_sharded(index: &Path) -> Result<Self, IoError> {
        let text = std::fs::read_to_string(index).map_err(|e| IoError::io(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| IoError::Json {
            path: index.to_path_buf(),
            source: e,
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| IoError::Safetensors {
                path: index.to_path_buf(),
                message: "index has no `weight_map` object".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect();
        shards.sort();
        shards.dedup();
        let source = Self::open_files(&shards)?;
        for key in map.keys() {
            if !source.tensors.contains_key(key) {
                return Err(IoError::Safetensors {
                    path: index.to_path_buf(),
                    message: format!("`{key}` is listed in the index but in no shard"),
                });
            }
        }
        Ok(source)
    }

    /// Opens several files as one set; a key present twice is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, IoError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        let mut header = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            // GGUF is told by its magic bytes.
            if mmap.starts_with(b"GGUF") {
                add_gguf(path, &mmap, i, &mut tensors, &mut header)?;
                files.push(MappedFile {
                    path: path.clone(),
                    mmap,
                    data_start: 0,
                });
                continue;
            }
            let (metadata, data_start) = safetensors_header(path, &mmap)?;
            if let Some(m) = metadata.metadata() {
                header.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            for (name, info) in metadata.tensors() {
                let stored = StoredTensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    ggml: None,
                    file: i,
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                if tensors.insert(name.clone(), stored).is_some() {
                    return Err(IoError::Safetensors {
                        path: path.clone(),
                        message: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        Ok(Self {
            files,
            tensors,
            metadata: header,
        })
    }

    /// The string metadata of the files' headers (`__metadata__`), merged.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The files behind this source.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Every tensor, by key.
    pub fn tensors(&self) -> &BTreeMap<String, StoredTensor> {
        &self.tensors
    }

    /// Whether any tensor's key starts with `prefix` (a component's tensors present).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// One tensor's dtype and shape.
    pub fn get(&self, key: &str) -> Option<&StoredTensor> {
        self.tensors.get(key)
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        let t = self.tensors.get(key)?;
        let f = &self.files[t.file];
        debug_assert!(t.start >= f.data_start);
        f.mmap.get(t.start..t.end)
    }

    /// Drops a converted tensor's pages from the process's resident set (the file
    /// stays in the page cache): without it every page read stays resident, and
    /// loading an f16 file as f32 peaked at the f32 weights plus the whole file.
    fn release(&self, t: &StoredTensor) {
        #[cfg(unix)]
        {
            let f = &self.files[t.file];
            // SAFETY: a read-only, file-backed shared mapping: MADV_DONTNEED only drops
            // the pages from this process; the next access reads the same bytes back
            // from the file, so no reference into the mapping sees other data.
            let _ = unsafe {
                f.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    t.start,
                    t.end - t.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = t;
    }

    /// A tensor's entry and its raw bytes, or an error naming the key.
    fn stored(&self, key: &str) -> Result<(&StoredTensor, &[u8]), IoError> {
        let t = self.tensors.get(key).ok_or_else(|| IoError::NotFound {
            path: self
                .files
                .first()
                .map(|f| f.path.clone())
                .unwrap_or_default(),
            what: format!("tensor `{key}`"),
        })?;
        let bytes = self.bytes(key).ok_or_else(|| IoError::Safetensors {
            path: self.files[t.file].path.clone(),
            message: format!("data of `{key}` lies outside the file"),
        })?;
        Ok((t, bytes))
    }

    /// Reads `count` rows from `start` along the first axis of a float tensor (a part of
    /// a fused tensor), converted to `dtype`, with `shape`.
    pub fn read_float_rows(
        &self,
        key: &str,
        dtype: DType,
        shape: Vec<usize>,
        start: usize,
        count: usize,
    ) -> Result<TensorData, IoError> {
        let (t, bytes) = self.stored(key)?;
        let rows = *t.shape.first().unwrap_or(&1);
        if start + count > rows {
            return Err(IoError::Unsupported(format!(
                "rows {start}..{} of `{key}` with {rows} rows",
                start + count
            )));
        }
        if t.is_quantized() {
            // A row need not be whole blocks (ComfyUI-GGUF flattens tensors to rows
            // of 256 before quantising): dequantise all, keep the rows.
            let row = t.numel() / rows.max(1);
            let mut values = dequantized(t, bytes);
            values.truncate((start + count) * row);
            values.drain(..start * row);
            self.release(t);
            return Ok(Decoded::F32(values).into_data(dtype, shape));
        }
        let row_bytes = bytes.len() / rows.max(1);
        let bytes = &bytes[start * row_bytes..(start + count) * row_bytes];
        let data = convert(bytes, t, key, dtype, shape);
        self.release(t);
        data
    }

    /// Reads a float tensor converted to `dtype` (F32, F16 or BF16), with `shape`
    /// (which must have the stored number of elements).
    pub fn read_float(
        &self,
        key: &str,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Result<TensorData, IoError> {
        let (t, bytes) = self.stored(key)?;
        let data = convert(bytes, t, key, dtype, shape);
        self.release(t);
        data
    }

    /// Rows `start..start + count` of a GGUF matrix stored as small integers times
    /// a scale per 32 values of a row (Q8_0, Q5_0, Q4_0), as 8-bit values and their
    /// scales, for the weight to stay compressed in memory
    /// (`sd_kernels::quantized_weight_data`). `None` for other types, or rows that
    /// are not whole blocks.
    ///
    /// # Errors
    /// An unknown key or data outside the file.
    pub fn read_blocks(
        &self,
        key: &str,
        start: usize,
        count: usize,
    ) -> Result<Option<Int8Rows>, IoError> {
        let (t, bytes) = self.stored(key)?;
        let Some(ty) = t.ggml else {
            return Ok(None);
        };
        let rows = *t.shape.first().unwrap_or(&0);
        let (elems, block_bytes) = ty.block();
        let cols = t.numel() / rows.max(1);
        if rows == 0 || start + count > rows || cols % elems != 0 {
            return Ok(None);
        }
        let row_bytes = cols / elems * block_bytes;
        let rows_bytes = &bytes[start * row_bytes..(start + count) * row_bytes];
        let blocks = gguf::to_i8_blocks(ty, rows_bytes);
        self.release(t);
        Ok(blocks.map(|(values, scales)| Int8Rows { values, scales }))
    }

    /// Element `index` (row-major) of a float tensor, read alone (a GGUF block is
    /// dequantised for it); `None` for an unknown key, an index out of range or a
    /// tensor that is not a float.
    pub fn read_value(&self, key: &str, index: usize) -> Option<f32> {
        let (t, bytes) = self.stored(key).ok()?;
        if index >= t.numel() {
            return None;
        }
        if let Some(ty) = t.ggml.filter(|g| g.is_quantized()) {
            let (elems, block_bytes) = ty.block();
            let block = index / elems;
            let b = bytes.get(block * block_bytes..(block + 1) * block_bytes)?;
            let mut out = vec![0f32; elems];
            gguf::dequantize(ty, b, &mut out);
            return Some(out[index % elems]);
        }
        let width = match t.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F64 => 8,
            _ => return None,
        };
        let b = bytes.get(index * width..(index + 1) * width)?;
        decode_f64_capable(b, t.dtype).map(|d| d.into_f32()[0])
    }
}

/// A quantised GGUF tensor's values as f32.
fn dequantized(t: &StoredTensor, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; t.numel()];
    if let Some(ty) = t.ggml {
        gguf::dequantize(ty, bytes, &mut out);
    }
    out
}

fn convert(
    bytes: &[u8],
    stored: &StoredTensor,
    key: &str,
    dtype: DType,
    shape: Vec<usize>,
) -> Result<TensorData, IoError> {
    let values = if stored.is_quantized() {
        Decoded::F32(dequantized(stored, bytes))
    } else {
        decode_f64_capable(bytes, stored.dtype).ok_or_else(|| {
            IoError::Unsupported(format!(
                "tensor `{key}` has dtype {:?}, not a float",
                stored.dtype
            ))
        })?
    };
    Ok(values.into_data(dtype, shape))
}

/// Float values decoded from bytes, kept in the narrowest type that holds them.
enum Decoded {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Decoded {
    /// The values converted to `dtype` (F16, BF16, else F32) with `shape`.
    fn into_data(self, dtype: DType, shape: Vec<usize>) -> TensorData {
        match dtype {
            DType::F16 => TensorData::new(self.map_to(f16::from_f32), shape),
            DType::BF16 => TensorData::new(self.map_to(bf16::from_f32), shape),
            _ => TensorData::new(self.into_f32(), shape),
        }
    }

    fn into_f32(self) -> Vec<f32> {
        match self {
            Decoded::F32(v) => v,
            Decoded::F16(v) => v.into_iter().map(f16::to_f32).collect(),
            Decoded::BF16(v) => v.into_iter().map(bf16::to_f32).collect(),
        }
    }

    fn map_to<T>(self, from_f32: fn(f32) -> T) -> Vec<T>
    where
        T: Copy + 'static,
    {
        // Same-type copies keep the bits exactly (no f32 round trip is lossy here:
        // f16 -> f32 -> f16 and bf16 -> f32 -> bf16 are exact).
        match self {
            Decoded::F32(v) => v.into_iter().map(from_f32).collect(),
            Decoded::F16(v) => v.into_iter().map(|x| from_f32(x.to_f32())).collect(),
            Decoded::BF16(v) => v.into_iter().map(|x| from_f32(x.to_f32())).collect(),
        }
    }
}

fn decode_f64_capable(bytes: &[u8], dtype: Dtype) -> Option<Decoded> {
    Some(match dtype {
        Dtype::F32 => Decoded::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F64 => Decoded::F32(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        ),
        Dtype::F16 => Decoded::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        Dtype::BF16 => Decoded::BF16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        _ => return None,
    })
}
