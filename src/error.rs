//! The crate's one error type.

use std::fmt;

/// Everything that can go wrong in this crate. Bad input is reported before any work is done.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A shape that cannot be used: a zero or too large dimension, mismatched shapes.
    Shape(String),
    /// A buffer whose length does not match the shape it is used with.
    Length {
        /// The argument, e.g. `"feat_q"`.
        what: &'static str,
        /// The length the shapes call for.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The batch has no image (`B == 0`).
    EmptyBatch,
    /// `H < 3` or `W < 3`: the feature map has no interior position, so no centre.
    NoInterior {
        /// Height of the feature map.
        height: usize,
        /// Width of the feature map.
        width: usize,
    },
    /// A centre outside the interior `1 <= h <= H-2, 1 <= w <= W-2` (or off the map).
    CenterOutsideInterior {
        /// Position of the centre in the list.
        index: usize,
        /// Its flat index `h*W + w`.
        flat: i64,
        /// Height of the feature map.
        height: usize,
        /// Width of the feature map.
        width: usize,
    },
    /// The same centre twice: centres are drawn without replacement.
    CenterRepeated {
        /// Position of the second occurrence in the list.
        index: usize,
        /// Its flat index.
        flat: i64,
    },
    /// No centres (the list is empty or `num_s == 0`).
    NoCenters,
    /// The temperature (the value given) breaks the rule of [`Tau`](crate::Tau); the message
    /// says which part.
    Tau(f64),
    /// Storage type not supported by the call.
    Dtype(String),
    /// No usable GPU: no CUDA driver, no device, or the device could not be opened.
    NoGpu(String),
    /// The crate was built without its CUDA kernels (no CUDA compiler at build time).
    KernelsNotBuilt(&'static str),
    /// An error reported by the CUDA driver.
    Cuda(String),
    /// A backward was asked for before any forward filled what it reads.
    BackwardBeforeForward,
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(msg) => write!(f, "bad shape: {msg}"),
            Error::Length {
                what,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "bad length of {what}: expected {expected} elements, got {actual}"
                )
            }
            Error::EmptyBatch => write!(f, "empty batch: B must be at least 1"),
            Error::NoInterior { height, width } => write!(
                f,
                "feature map {height}x{width} has no interior (H and W must be at least 3)"
            ),
            Error::CenterOutsideInterior {
                index,
                flat,
                height,
                width,
            } => write!(
                f,
                "centre {index} (flat index {flat}) is outside the interior 1..={} x 1..={} of a {height}x{width} map",
                height.saturating_sub(2),
                width.saturating_sub(2)
            ),
            Error::CenterRepeated { index, flat } => {
                write!(
                    f,
                    "centre {index} (flat index {flat}) repeats an earlier centre"
                )
            }
            Error::NoCenters => write!(f, "no centres: at least one is needed"),
            Error::Tau(tau) => {
                write!(f, "bad tau ")?;
                crate::tau::write_brief(f, *tau)?;
                match crate::tau::rule_broken(*tau) {
                    Some(rule) => write!(f, ": {rule}"),
                    None => Ok(()),
                }
            }
            Error::Dtype(msg) => write!(f, "unsupported dtype: {msg}"),
            Error::NoGpu(msg) => write!(f, "no GPU: {msg}"),
            Error::KernelsNotBuilt(why) => write!(f, "CUDA kernels were not built: {why}"),
            Error::Cuda(msg) => write!(f, "CUDA error: {msg}"),
            Error::BackwardBeforeForward => write!(f, "backward called before forward"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

/// Checks that a buffer named `what` holds `expected` elements: `Err(Error::Length)` if not.
/// Public for the framework integrations, which check their tensors the crate's way.
pub fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            actual,
        })
    }
}
