//! Helpers shared by the crate's unit tests.

use candle_core::Tensor;

/// Largest absolute elementwise difference of two f32 tensors of one shape.
pub(crate) fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
    crate::max_abs_diff(a, b).unwrap()
}
