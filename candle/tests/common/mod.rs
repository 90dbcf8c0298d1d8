//! What the test suites share: seeded inputs in each storage type and comparisons.
#![allow(dead_code)] // each test crate uses its own subset

use candle_core::{DType, Device, Result, Tensor};
use ccpl::sampling::SplitMix64;

/// The storage types the ops take on the CPU.
pub const CPU_DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::F16, DType::BF16];

/// The crate's seeded generator.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
    pub fn seed(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// `len` values uniform in `[-1, 1)`.
    pub fn vec(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| 2.0 * self.0.unit() - 1.0).collect()
    }
    /// A tensor of `dims` with values uniform in `[-scale, scale)` stored in `dtype`, and those
    /// stored values exactly, as f64.
    pub fn tensor(
        &mut self,
        dims: &[usize],
        scale: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Vec<f64>)> {
        let len = dims.iter().product();
        let v: Vec<f64> = self.vec(len).iter().map(|x| x * scale).collect();
        let t = Tensor::from_vec(v, dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let stored = values(&t)?;
        Ok((t, stored))
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

/// `||a - b|| / ||b||`, the crate's measure of agreement; NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    ccpl::reference::relative_error(a, b)
}

/// Asserts `||got - want|| / ||want|| <= tol` and reports the measured error (run with
/// `--nocapture` to see every measurement).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = rel_err(got, want);
    eprintln!("measured {what}: rel err {err:.3e} (tolerance {tol:.3e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.3e}");
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
