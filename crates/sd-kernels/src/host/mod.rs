//! Hand-written CPU kernels for the hot spots of Stable Diffusion, used when a tensor
//! lives on burn's CPU backend (`flex`) without autodiff.
//!
//! burn's generic CPU ops run one pass over memory per op and evaluate `exp` one
//! element at a time; these kernels fuse what the models do back to back and use
//! vectorised `exp`:
//! - [`attention`]: tiled attention with online softmax (flash attention) reading
//!   queries, keys and values in the `[batch, n, heads * head_dim]` layout the
//!   projections produce, so no head permutation is ever copied; memory is linear in
//!   the sequence length; on AVX-512 CPUs computed transposed, queries along the
//!   lanes (`attention_avx512`);
//! - [`group_norm`]: GroupNorm with the affine parameters and an optional SiLU in one
//!   pass (two reads, one write), in place;
//! - [`conv`]: convolutions as im2col + GEMM in bands of output rows run in parallel,
//!   and [`winograd`]: large 3x3 ones by Winograd's F(4x4, 3x3), a quarter of the
//!   multiplications;
//! - [`linear`]: `x wᵀ + b` as blocks of rows (or of columns, for few rows) run in
//!   parallel, the bias as the GEMMs' initial value, the weight read in place
//!   (burn's CPU matmul reached about half this throughput here); on AVX-512 CPUs
//!   few rows stream the weight through [`panel_gemm::linear_streamed`]; and the
//!   GEGLU feed-forward's projection fused with [`geglu`]'s `a * gelu(b)` (on
//!   AVX-512 CPUs in the epilogue of [`panel_gemm`]'s microkernel);
//! - [`activation`]: CLIP's `quick_gelu` and OpenCLIP's `gelu` in place;
//! - [`crate::profile`]: opt-in time per kernel (`bench --profile`).
//!
//! On any other device (GPU, autodiff for training) the models use burn's ops; the
//! results agree to f32 rounding (the parity tests run both).

pub mod activation;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod attention_avx512;
pub mod conv;
pub mod exp;
pub mod geglu;
pub mod group_norm;
pub mod linear;
pub mod panel_gemm;
mod quantized;

pub mod winograd;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

/// A borrowed view of a tensor's values on the CPU backend: the storage from the
/// first element on, and the element strides of each axis.
pub(crate) struct HostView<'a> {
    /// Values from the tensor's first element on.
    pub data: &'a [f32],
    /// Stride of each axis, in elements.
    pub strides: Vec<isize>,
}

impl HostView<'_> {
    /// Whether the view is row-major contiguous.
    pub fn is_contiguous(&self, shape: &[usize]) -> bool {
        let mut expected = 1isize;
        for (d, s) in shape.iter().zip(&self.strides).rev() {
            if *d != 1 && *s != expected {
                return false;
            }
            expected *= *d as isize;
        }
        true
    }
}

/// Calls `f` with a borrowed view of `x` (no copy, whatever its layout) when `x` is an
/// f32 tensor of the CPU backend with non-negative strides; `None` otherwise.
pub(crate) fn with_view<const D: usize, R>(
    x: &Tensor<D>,
    f: impl FnOnce(HostView<'_>) -> R,
) -> Option<R> {
    use burn_dispatch::{BackendTensor, DispatchTensorKind};
    let bridge = x.clone().into_bridge();
    let (_, dispatch) = bridge.as_parts();
    let DispatchTensorKind::Flex(BackendTensor::Float(t)) = &dispatch.kind else {
        return None;
    };
    if t.dtype() != DType::F32 || t.layout().strides().iter().any(|s| *s < 0) {
        return None;
    }
    let data: &[f32] = t.storage::<f32>();
    let data = &data[t.layout().start_offset()..];
    Some(f(HostView {
        data,
        strides: t.layout().strides().to_vec(),
    }))
}

/// Calls `f` with an f32 view of a weight of the CPU backend: f32 weights in place
/// (as [`with_view`]), f16 and bf16 ones widened into a pooled scratch buffer with
/// the same strides (the span they cover, converted in parallel), so the kernels
/// compute in f32 from half-precision storage; 8-bit matrices (see
/// [`crate::quantized_weight_data`]) dequantised there. `None` for other dtypes, devices
/// or negative strides.
pub(crate) fn with_weight_view<const D: usize, R>(
    w: &Tensor<D>,
    f: impl FnOnce(HostView<'_>) -> R,
) -> Option<R> {
    use burn_dispatch::{BackendTensor, DispatchTensorKind};
    if w.dtype() == DType::F32 {
        return with_view(w, f);
    }
    let bridge = w.clone().into_bridge();
    let (_, dispatch) = bridge.as_parts();
    if let DispatchTensorKind::Flex(BackendTensor::Quantized(q)) = &dispatch.kind {
        let dims = w.dims();
        let buf = quantized::dequantize_rows(q, w.dtype(), &dims)?;
        let r = f(HostView {
            data: &buf,
            strides: vec![1, dims[0] as isize],
        });
        give_scratch(buf);
        return Some(r);
    }
    let DispatchTensorKind::Flex(BackendTensor::Float(t)) = &dispatch.kind else {
        return None;
    };
    let layout = t.layout();
    if layout.strides().iter().any(|s| *s < 0) {
        return None;
    }
    let dims = w.dims();
    let span = if dims.contains(&0) {
        0
    } else {
        1 + dims
            .iter()
            .zip(layout.strides())
            .map(|(d, s)| (d - 1) * *s as usize)
            .sum::<usize>()
    };
    let start = layout.start_offset();
    let mut buf = take_scratch(span);
    match t.dtype() {
        DType::F16 => widen(&t.storage::<half::f16>()[start..start + span], &mut buf),
        DType::BF16 => widen(&t.storage::<half::bf16>()[start..start + span], &mut buf),
        _ => {
            give_scratch(buf);
            return None;
        }
    }
    let r = f(HostView {
        data: &buf,
        strides: layout.strides().to_vec(),
    });
    give_scratch(buf);
    Some(r)
}

/// [`with_weight_view`] for several weights at once.
pub(crate) fn with_weight_views<const D: usize, R>(
    tensors: &[Tensor<D>],
    f: impl FnOnce(&[HostView<'_>]) -> R,
) -> Option<R> {
    nested_views(tensors, true, f)
}

/// Half-precision values to f32, in parallel chunks (`half`'s conversion uses the
/// CPU's F16C instructions where it has them).
fn widen<T>(src: &[T], dst: &mut [f32])
where
    T: Copy + Send + Sync,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// Whether `x` alone references its storage (so it can be overwritten in place
/// without a copy), and `x` back.
pub(crate) fn is_unique<const D: usize>(x: Tensor<D>) -> (bool, Tensor<D>) {
    use burn_dispatch::{BackendTensor, DispatchTensorKind};
    let bridge = x.into_bridge();
    let unique = {
        let (_, dispatch) = bridge.as_parts();
        matches!(&dispatch.kind, DispatchTensorKind::Flex(BackendTensor::Float(t)) if t.is_unique())
    };
    (unique, Tensor::from_bridge(bridge))
}

/// [`with_view`] for several tensors at once: `f` gets their views in order; `None`
/// when any of them is not an f32 tensor of the CPU backend.
pub(crate) fn with_views<const D: usize, R>(
    tensors: &[Tensor<D>],
    f: impl FnOnce(&[HostView<'_>]) -> R,
) -> Option<R> {
    nested_views(tensors, false, f)
}

/// The views of `tensors` held together for `f`: through [`with_weight_view`]
/// (half-precision weights widened) when `widen`, else [`with_view`].
fn nested_views<const D: usize, R>(
    tensors: &[Tensor<D>],
    widen: bool,
    f: impl FnOnce(&[HostView<'_>]) -> R,
) -> Option<R> {
    fn nest<const D: usize, R>(
        tensors: &[Tensor<D>],
        widen: bool,
        held: Vec<HostView<'_>>,
        f: &mut dyn FnMut(&[HostView<'_>]) -> R,
    ) -> Option<R> {
        let Some((t, rest)) = tensors.split_first() else {
            return Some(f(&held));
        };
        let next = move |v: HostView<'_>| {
            // The views so far and this one, at the shorter of their lifetimes.
            let mut all = Vec::with_capacity(held.len() + 1);
            all.extend(held);
            all.push(v);
            nest(rest, widen, all, f)
        };
        if widen {
            with_weight_view(t, next).flatten()
        } else {
            with_view(t, next).flatten()
        }
    }
    let mut f = Some(f);
    nest(tensors, widen, Vec::new(), &mut |views: &[HostView<
        '_,
    >]| {
        (f.take().expect("called once"))(views)
    })
}

/// Runs `run(scratch, i)` for every `i` in `0..tasks`: in parallel when `parallel`
/// (each worker with its own `init()` scratch), else in order on this thread with
/// one scratch.
pub(crate) fn for_each_task<S>(
    tasks: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    run: impl Fn(&mut S, usize) + Sync + Send,
) {
    use rayon::prelude::*;
    if parallel {
        (0..tasks).into_par_iter().for_each_init(init, run);
    } else {
        let mut scratch = init();
        (0..tasks).for_each(|t| run(&mut scratch, t));
    }
}

/// One single-threaded f32 GEMM, `dst = scale * lhs · rhs (+ dst when accumulate)`,
/// every operand given by its first element and (row, column) strides; `dst` is
/// row-major with row stride `dst_rs`. The one call shape every kernel here uses.
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: *mut f32,
    pub dst_rs: isize,
    pub accumulate: bool,
    pub lhs: *const f32,
    pub lhs_rs: isize,
    pub lhs_cs: isize,
    pub rhs: *const f32,
    pub rhs_rs: isize,
    pub rhs_cs: isize,
    pub scale: f32,
}

impl Gemm {
    /// # Safety
    /// Every pointer must address its whole matrix with the strides given, and `dst`
    /// must not be written concurrently by anyone else.
    pub unsafe fn run(self) {
        // SAFETY: forwarded to the caller.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                self.dst,
                1,
                self.dst_rs,
                self.accumulate,
                self.lhs,
                self.lhs_cs,
                self.lhs_rs,
                self.rhs,
                self.rhs_cs,
                self.rhs_rs,
                1.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
}

/// A raw output buffer shared by parallel tasks that write disjoint elements: its
/// start and length, so that [`SharedMut::at`] only ever points into it. Writing
/// through the pointers stays `unsafe` at the writer, who guarantees the writes are
/// disjoint and happen while the buffer lives.
pub(crate) struct SharedMut {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: the wrapper only hands out pointers; writers guarantee disjoint writes
// within the buffer's lifetime.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Over a slice.
    pub fn slice(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Over a vector's whole capacity (values past its length are uninitialised:
    /// write them before reading, then `set_len`).
    pub fn capacity(buf: &mut Vec<f32>) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.capacity(),
        }
    }

    /// The pointer at `offset` (a method, so closures capture the whole wrapper).
    /// Computing it is safe (`wrapping_add`: no assumption about the allocation);
    /// writing through it is the caller's `unsafe`, within `len` (checked in debug
    /// builds).
    #[inline]
    pub fn at(&self, offset: usize) -> *mut f32 {
        debug_assert!(
            offset <= self.len,
            "offset {offset} past a buffer of {}",
            self.len
        );
        self.ptr.wrapping_add(offset)
    }
}

/// Whether `device` is burn's CPU backend without autodiff, where these kernels run.
pub fn is_host(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn_dispatch::DispatchDevice::Flex(_))
}

/// Whether `x` is an f32 tensor on the CPU backend (the kernels' domain).
pub(crate) fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && is_host(&x.device())
}

/// `f` over the values of `x` in place when `x` alone references them, contiguously
/// from the start of its buffer; else over a contiguous copy. The values of burn's
/// own CPU outputs sit in 64-byte aligned buffers that `into_vec` cannot take over
/// as a `Vec<f32>`, so it copies them (268 MB at a VAE decoder's 512x512 level).
///
/// # Shapes
/// - any; output the same
pub(crate) fn map_in_place<const D: usize>(x: Tensor<D>, f: impl FnOnce(&mut [f32])) -> Tensor<D> {
    use burn::tensor::kind::BridgeTensor;
    use burn_dispatch::{BackendTensor, DispatchTensorKind};
    let (dims, device) = (x.dims(), x.device());
    let len: usize = dims.iter().product();
    let (_, mut dispatch) = x.into_bridge().into_parts();
    if let DispatchTensorKind::Flex(BackendTensor::Float(t)) = &mut dispatch.kind
        && t.dtype() == DType::F32
        && t.layout().is_contiguous()
        && t.layout().start_offset() == 0
        && let Some(values) = t.try_storage_mut::<f32>()
        && values.len() >= len
    {
        f(&mut values[..len]);
        return Tensor::from_bridge(BridgeTensor::float(dispatch));
    }
    let mut values = into_vec(Tensor::<D>::from_bridge(BridgeTensor::float(dispatch)));
    f(&mut values);
    from_vec(values, dims, &device)
}

/// The tensor's values as an owned, contiguous `Vec<f32>` (no copy only when the
/// tensor is contiguous, not shared and in a buffer allocated as a `Vec<f32>`, as
/// [`from_vec`] makes; see [`map_in_place`]).
pub(crate) fn into_vec<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    let data = x.into_data();
    match data.try_into_vec::<f32>() {
        Ok(v) => v,
        Err(e) => unreachable!("f32 tensor on the CPU backend: {e:?}"),
    }
}

/// A tensor of `shape` on `device` from row-major values.
pub(crate) fn from_vec<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Scratch buffers kept between kernel calls. Fresh allocations of tens of MB cost
/// a page fault per 4 KiB on first touch (zeroing included), which measured as much
/// as the arithmetic of a Winograd convolution; reusing mapped buffers avoids it.
/// At most [`POOL_BUFFERS`] buffers and [`POOL_BYTES`] are kept; contents are stale,
/// never zeroed.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Buffers the scratch pool keeps (a Winograd convolution of a half-precision
/// weight holds four at once: the widened weight and its `U`, `V`, `M`).
const POOL_BUFFERS: usize = 4;

/// Bytes the scratch pool keeps: the largest widened weight of SD 1.5 / SDXL (a 3x3
/// conv of 2560 to 1280 channels, 118 MB in f32) with a Winograd convolution's
/// three 32 MB buffers. Buffers grown without bound (4 of up to 188 MB each, kept
/// from the U-Net while the VAE decoded) were ~0.5 GB of a 512x512 picture's peak.
const POOL_BYTES: usize = 256 << 20;

/// A scratch buffer of `len` floats (stale contents): the smallest pooled buffer
/// that is large enough, else a fresh one of exactly `len` (pooled buffers are not
/// grown: a grown `Vec` keeps up to twice what it holds).
pub(crate) fn take_scratch(len: usize) -> Vec<f32> {
    let pooled = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity())
            .map(|i| pool.swap_remove(i))
    };
    let mut v = pooled.unwrap_or_else(|| Vec::with_capacity(len));
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v.truncate(len);
    v
}

/// Drops every pooled buffer ([`crate::release_scratch`]).
pub(crate) fn release_scratch() {
    let drained = std::mem::take(&mut *POOL.lock().unwrap_or_else(|e| e.into_inner()));
    drop(drained);
}

/// Returns a buffer from [`take_scratch`] to the pool; past [`POOL_BUFFERS`] or
/// [`POOL_BYTES`] the smallest buffers are dropped first (the large ones cost the
/// most to fault in again), then the largest while the bytes are still over.
pub(crate) fn give_scratch(v: Vec<f32>) {
    let bytes = |b: &Vec<f32>| b.capacity() * size_of::<f32>();
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    pool.sort_unstable_by_key(|b| std::cmp::Reverse(b.capacity()));
    pool.truncate(POOL_BUFFERS);
    while pool.iter().map(bytes).sum::<usize>() > POOL_BYTES {
        pool.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use burn::prelude::*;

    use super::map_in_place;

    /// A tensor alone over its values is changed in place; a shared one is copied
    /// first, and its other reference keeps the old values.
    #[test]
    fn maps_in_place_only_what_is_not_shared() {
        let device = Device::flex();
        let x = Tensor::<2>::ones([3, 4], &device) * 2.0;
        let y = map_in_place(x, |v| v.iter_mut().for_each(|v| *v += 1.0));
        assert_eq!(y.to_data().try_to_vec::<f32>().unwrap(), vec![3.0; 12]);
        let z = map_in_place(y.clone(), |v| v.iter_mut().for_each(|v| *v = 0.0));
        assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), vec![3.0; 12]);
        assert_eq!(z.into_data().try_to_vec::<f32>().unwrap(), vec![0.0; 12]);
    }
}
