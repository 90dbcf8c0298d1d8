//! What the test suites share: seeded inputs in each storage type and comparisons.

use candle_core::{DType, Device, Result, Tensor};

/// The storage types the ops take on the CPU.
pub const CPU_DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

pub use ccpl_testkit::{Rng, SPEC_DIRECTIONS, assert_close, rel_err};

/// Seeded tensors in each storage type.
pub trait TensorRng {
    /// `len` values uniform in `[-1, 1)`.
    fn uniform(&mut self, len: usize) -> Vec<f64>;

    /// A tensor of `dims` with values uniform in `[-scale, scale)` stored in `dtype`, and those
    /// stored values exactly, as f64.
    fn tensor(
        &mut self,
        dims: &[usize],
        scale: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Vec<f64>)> {
        let v: Vec<f64> = self.uniform(dims.iter().product());
        let v: Vec<f64> = v.iter().map(|x| x * scale).collect();
        let t = Tensor::from_vec(v, dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let stored = values(&t)?;
        Ok((t, stored))
    }
}

impl TensorRng for Rng {
    fn uniform(&mut self, len: usize) -> Vec<f64> {
        self.vec(len)
    }
}

/// The elements of `t` as f64 (exactly: every storage type converts without rounding).
pub fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// `v` rounded once to `dtype`: what storing it there does.
pub fn rounded(v: &[f64], dtype: DType) -> Result<Vec<f64>> {
    values(&Tensor::new(v, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Asserts that `got` equals `want` element for element (NaN equals nothing).
pub fn assert_same(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: element {i} is {} where {} is expected (relative error of all {:.3e})",
            got[i],
            want[i],
            rel_err(got, want)
        );
    }
}
