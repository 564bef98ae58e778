//! Helpers shared by the crate's unit tests.

use candle_core::Tensor;

/// Largest absolute elementwise difference of two f32 tensors of one shape.
pub(crate) fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
