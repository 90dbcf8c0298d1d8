//! What storing a value in a storage type does to it, and the tolerance a result stored in
//! one is held to: twice its rounding model's error plus float32's share at the temperature.

use ccpl::{Dtype, Element, Tau};

use super::rel_err;

pub fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

pub fn from_f64<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// `v` rounded to `T` and back: what storing it in `T` does to it.
pub fn rounded<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

/// The largest finite value of `T` (bf16's is float32's, to its rounding).
pub fn largest<T: Dtype>() -> f64 {
    if T::SUFFIX == "f16" {
        65504.0
    } else {
        f32::MAX as f64
    }
}

/// The spec's tolerance for float32 results: relative norm error below 1e-5.
pub const F32_TOLERANCE: f64 = 1e-5;

/// Tolerance of a result stored in `T`, given `model`: the result as the algorithm would give
/// it if every value it stores in `T` were the exact value rounded once (computed by the test
/// from the reference), and `exact`, the reference. Twice the model's measured error (the
/// kernel's float arithmetic can tip a rounding to the other neighbour, and its rounding
/// errors are as many as the model's but not the same ones), plus the spec's float32
/// tolerance for the arithmetic itself. In f32 the model's error is about 1e-7, so the
/// tolerance is the spec's 1e-5, except where the result is ill-conditioned in the values
/// stored: rows of width 1 normalise to +-(1 - eps/|d|), their gradient lives in the eps part,
/// which a float32 normalised row keeps to a few bits.
pub fn tolerance(model: &[f64], exact: &[f64]) -> f64 {
    tolerance_at(model, exact, Tau::DEFAULT)
}

/// [`tolerance`] at temperature `tau`: the float32 arithmetic's share is the spec's 1e-5 at the
/// paper's tau (0.07) and above, and grows as 1/tau below it. The logits carry float32's
/// relative error times their magnitude, up to 1/tau; the softmax, and so the loss and the
/// gradients, carry that absolute error of the logits.
pub fn tolerance_at(model: &[f64], exact: &[f64], tau: Tau) -> f64 {
    2.0 * rel_err(model, exact) + F32_TOLERANCE * (Tau::DEFAULT.get() / tau.get()).max(1.0)
}

/// Tolerance of a result that is only rounded to `T` when stored: the model is the reference
/// rounded once.
pub fn stored_tolerance<T: Dtype>(exact: &[f64]) -> f64 {
    tolerance(&rounded::<T>(exact), exact)
}
