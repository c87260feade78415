//! 8-bit weight matrices on the CPU backend: the values as burn's quantized tensor
//! holds them (one `i8` each) with an f32 scale per block of rows, dequantised into
//! pooled scratch as the kernels read them.

use burn::tensor::DType;
use burn::tensor::quantization::global_scale_dtype;
use burn_dispatch::backends::flex::FlexQTensor;
use rayon::prelude::*;

use super::take_scratch;

/// The f32 values of a `[rows, cols]` quantized matrix whose blocks are `[b, 1]`
/// (`b` rows of one column share a scale, as [`crate::quantized_weight_data`] lays
/// them out), column-major (strides `[1, rows]`: a linear layer's `[d_in, d_out]`
/// weight laid out as PyTorch's `[d_out, d_in]`, as the f32 and f16 weights are) in
/// a pooled scratch buffer (give it back with `give_scratch`). `None` for other
/// block shapes, two-level scales or non-contiguous values.
pub(crate) fn dequantize_rows(q: &FlexQTensor, dtype: DType, dims: &[usize]) -> Option<Vec<f32>> {
    let DType::QFloat(scheme) = dtype else {
        return None;
    };
    let &[rows, cols] = dims else {
        return None;
    };
    let block = scheme.block_size()?.to_dim_vec(2);
    let b = usize::from(block[0]);
    if block[1] != 1 || b == 0 || rows % b != 0 || global_scale_dtype(&scheme).is_some() {
        return None;
    }
    let t = q.tensor();
    let (start, end) = t.layout().contiguous_offsets()?;
    let values = &t.storage::<i8>()[start..end];
    let scales = q.scales();
    if values.len() != rows * cols || scales.len() != rows / b * cols {
        return None;
    }
    // Tiles of `TILE` columns: each row of the tile is read as one short run and
    // written into `TILE` column streams.
    const TILE: usize = 16;
    let mut buf = take_scratch(rows * cols);
    buf.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile, out)| {
            let c0 = tile * TILE;
            let width = out.len() / rows;
            for r in 0..rows {
                let v = &values[r * cols + c0..r * cols + c0 + width];
                let s = &scales[(r / b) * cols + c0..(r / b) * cols + c0 + width];
                for (j, (&x, &scale)) in v.iter().zip(s).enumerate() {
                    out[j * rows + r] = f32::from(x) * scale;
                }
            }
        });
    Some(buf)
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::LinearConfig;
    use burn::prelude::*;

    use crate::ops::linear_forward;
    use crate::quantized_weight_data;

    /// A `[64, 24]` weight of 8-bit values with a scale per 32 rows of a column.
    fn weight(device: &Device) -> (Tensor<2>, Vec<f32>) {
        let (rows, cols) = (64, 24);
        let values: Vec<i8> = (0..rows * cols).map(|i| ((i * 37) % 255) as i8).collect();
        let scales: Vec<f32> = (0..2 * cols).map(|i| 0.001 * (i + 1) as f32).collect();
        let expected = (0..rows * cols)
            .map(|i| f32::from(values[i]) * scales[(i / cols / 32) * cols + i % cols])
            .collect();
        let data = quantized_weight_data(values, &scales, [rows, cols], 32);
        (Tensor::from_data(data, device), expected)
    }

    #[test]
    fn dequantises_as_burn_does() {
        let device = Device::flex();
        let (w, expected) = weight(&device);
        let burn: Vec<f32> = w.clone().dequantize().into_data().try_to_vec().unwrap();
        assert_eq!(burn, expected);
        let dtype = w.dtype();
        let bridge = w.into_bridge();
        let (_, dispatch) = bridge.as_parts();
        let burn_dispatch::DispatchTensorKind::Flex(burn_dispatch::BackendTensor::Quantized(q)) =
            &dispatch.kind
        else {
            panic!("a quantized flex tensor");
        };
        let ours = super::dequantize_rows(q, dtype, &[64, 24]).unwrap();
        for (i, e) in expected.iter().enumerate() {
            let (r, c) = (i / 24, i % 24);
            assert_eq!(ours[c * 64 + r], *e, "({r}, {c})");
        }
    }

    #[test]
    fn a_linear_layer_computes_with_its_8_bit_weight() {
        let device = Device::flex();
        let (w, expected) = weight(&device);
        let mut q = LinearConfig::new(64, 24).init(&device);
        q.weight = Param::from_tensor(w);
        let mut f = q.clone();
        f.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(expected, [64, 24]),
            &device,
        ));
        let x = Tensor::<3>::random([2, 5, 64], burn::tensor::Distribution::Default, &device);
        let d = (linear_forward(&q, x.clone()) - linear_forward(&f, x))
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(d < 1e-5, "{d}");
    }
}
