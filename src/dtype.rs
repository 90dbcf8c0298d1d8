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

/// The names of the storage types, each its [`Dtype::SUFFIX`], in the order
/// [`dispatch_dtype!`](crate::dispatch_dtype) tries them: a caller that runs something for
/// every storage type loops over these.
pub const STORAGE_NAMES: [&str; 3] = ["f32", "f16", "bf16"];

/// Evaluates `$body` with the type alias `$t` bound to the element type named by `$name` (a
/// `&str`: `"f32"`, `"f16"` or `"bf16"`, each [`Dtype::SUFFIX`]), or `$fallback` with `$other`
/// bound to any other name. With `f64,` before the fallback, `"f64"` is taken too (the CPU
/// reference's type, not a [`Dtype`]). `$body` is expanded once per type, so it may call
/// generic code with `$t`; every arm, `$fallback` included, has the type of `$body`.
///
/// A framework names its types its own way and passes ccpl's name: candle's
/// `DType::as_str()` gives it, and the Python package maps each torch dtype to it
/// (`python/ccpl/_common.py`). The error of an unknown name is the caller's `$fallback`, so
/// each integration keeps its own error type. This is the one list of the element types: a
/// new storage type is added here.
///
/// ```
/// use ccpl::{Dtype, Error, Result, dispatch_dtype};
///
/// fn suffix(name: &str) -> Result<&'static str> {
///     dispatch_dtype!(name, T => Ok(T::SUFFIX), other => Err(Error::Dtype(other.to_string())))
/// }
/// fn size(name: &str) -> Result<usize> {
///     dispatch_dtype!(name, T => Ok(size_of::<T>()), f64, other => Err(Error::Dtype(other.to_string())))
/// }
/// assert_eq!(suffix("bf16"), Ok("bf16"));
/// assert!(suffix("f64").is_err());
/// assert_eq!(size("f64"), Ok(8));
/// for name in ccpl::dtype::STORAGE_NAMES {
///     assert_eq!(suffix(name), Ok(name));
/// }
/// ```
#[macro_export]
macro_rules! dispatch_dtype {
    ($name:expr, $t:ident => $body:expr, f64, $other:ident => $fallback:expr $(,)?) => {
        match $name {
            "f64" => {
                type $t = f64;
                $body
            }
            name => $crate::dispatch_dtype!(name, $t => $body, $other => $fallback),
        }
    };
    ($name:expr, $t:ident => $body:expr, $other:ident => $fallback:expr $(,)?) => {
        match $name {
            "f32" => {
                type $t = f32;
                $body
            }
            "f16" => {
                type $t = $crate::half::f16;
                $body
            }
            "bf16" => {
                type $t = $crate::half::bf16;
                $body
            }
            $other => $fallback,
        }
    };
}
