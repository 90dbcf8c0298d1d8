//! Element types: what the CPU reference reads and what the kernels store.

use half::{bf16, f16};

/// A scalar the CPU reference accepts (it computes in `f64` whatever the input).
pub trait Element: Copy + Send + Sync + 'static {
    /// The value as `f64`, exactly.
    fn to_f64(self) -> f64;
    /// The nearest value of this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
}

impl Element for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}
impl Element for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl Element for f16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}
impl Element for bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A storage type of the kernels: `f32`, `f16` or `bf16` (they accumulate in `f32`).
pub trait Dtype:
    Element + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + sealed::Sealed
{
    /// Suffix of the kernel entry points for this type: `neighbor_diff_{SUFFIX}`.
    const SUFFIX: &'static str;
}
impl Dtype for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Dtype for f16 {
    const SUFFIX: &'static str = "f16";
}
impl Dtype for bf16 {
    const SUFFIX: &'static str = "bf16";
}
