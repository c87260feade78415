//! What a module's parameters take in memory.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

/// The bytes a module's float parameters take in memory, each at its own dtype
/// (an f16 weight two bytes a value, an f32 norm four): the figure that loading in
/// half precision (sd-io's `LoadOptions::dtype`) halves for the weight matrices.
pub fn parameter_bytes<M: Module>(module: &M) -> usize {
    struct Sum(usize);
    impl ModuleVisitor for Sum {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val();
            self.0 += t.shape().num_elements() * t.dtype().size();
        }
    }
    let mut sum = Sum(0);
    module.visit(&mut sum);
    sum.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::DType;

    #[test]
    fn counts_each_parameter_at_its_dtype() {
        let device = Device::flex();
        let linear = LinearConfig::new(4, 3).init(&device);
        assert_eq!(parameter_bytes(&linear), (4 * 3 + 3) * 4);
        let half = linear.map(&mut cast_all(DType::F16));
        assert_eq!(parameter_bytes(&half), (4 * 3 + 3) * 2);
    }

    /// Every float parameter to `dtype`.
    fn cast_all(dtype: DType) -> impl burn::module::ModuleMapper {
        struct Cast(DType);
        impl burn::module::ModuleMapper for Cast {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let dtype = self.0;
                param.map(|t| t.cast(dtype))
            }
        }
        Cast(dtype)
    }
}
