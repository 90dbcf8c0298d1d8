//! The temperature, validated once.

use std::fmt;

use crate::error::{Error, Result};

/// The temperature of the loss, checked by the one rule of the reference and the kernels:
/// finite, `> 0`, and `2/tau` finite in float32, so `tau >= 2/f32::MAX` (about `5.88e-39`).
///
/// Why `2/tau`: the logits are cosine similarities over `tau`, so `|L| < 1/tau`, and the
/// kernels form each row's loss in float32 as a difference of two of them, up to `2/tau` (the
/// `ln S` beside it is lost in the rounding at that scale). A smaller `tau` would give an
/// infinite loss where the true one may still fit, so it is refused instead.
///
/// Every API that takes a temperature takes a `Tau`, so none checks it again.
///
/// ```
/// use ccpl::Tau;
/// let tau = Tau::new(0.07).unwrap();
/// assert_eq!(tau, Tau::DEFAULT);
/// assert_eq!(tau.get(), 0.07);
/// assert_eq!(tau.inverse(), (1.0 / 0.07) as f32);
/// let err = Tau::new(3e-39).unwrap_err().to_string();
/// assert!(err.contains("2/tau") && err.contains("3e-39"), "{err}");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Tau(f64);

impl Tau {
    /// The paper's temperature, 0.07.
    pub const DEFAULT: Tau = Tau(0.07);

    /// The smallest temperature of the rule, `2/f32::MAX`: its float32 inverse is
    /// `f32::MAX / 2`, so a row loss of up to twice that still fits.
    pub const MIN: Tau = Tau(2.0 / f32::MAX as f64);

    /// Checks `tau` by the rule: `Err(Error::Tau)` naming the rule broken if it fails.
    pub fn new(tau: f64) -> Result<Tau> {
        match rule_broken(tau) {
            None => Ok(Tau(tau)),
            Some(_) => Err(Error::Tau(tau)),
        }
    }

    /// The temperature.
    pub const fn get(self) -> f64 {
        self.0
    }

    /// `1/tau` in float32, as the kernels take it: at most `f32::MAX / 2`, by the rule.
    pub const fn inverse(self) -> f32 {
        (1.0 / self.0) as f32
    }
}

impl Default for Tau {
    fn default() -> Self {
        Tau::DEFAULT
    }
}

impl TryFrom<f64> for Tau {
    type Error = Error;
    fn try_from(tau: f64) -> Result<Tau> {
        Tau::new(tau)
    }
}

impl From<Tau> for f64 {
    fn from(tau: Tau) -> f64 {
        tau.0
    }
}

impl fmt::Display for Tau {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_brief(f, self.0)
    }
}

/// The first rule of [`Tau`] that `tau` breaks, in words, or `None`.
pub(crate) fn rule_broken(tau: f64) -> Option<&'static str> {
    if !tau.is_finite() {
        Some("tau is not finite")
    } else if tau <= 0.0 {
        Some("tau is not > 0")
    } else if tau < Tau::MIN.0 {
        Some("2/tau overflows float32 (tau must be at least 2/f32::MAX, about 5.88e-39)")
    } else {
        None
    }
}

/// Writes `value` in a short form: as written (`0.07`) in the usual range, in scientific
/// notation (`3e-39`) outside it, where the plain form runs to hundreds of digits.
pub(crate) fn write_brief(f: &mut fmt::Formatter<'_>, value: f64) -> fmt::Result {
    if value == 0.0 || !value.is_finite() || (1e-4..1e6).contains(&value.abs()) {
        write!(f, "{value}")
    } else {
        write!(f, "{value:e}")
    }
}
