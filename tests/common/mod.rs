//! Helpers shared by the test suites: a small seeded generator and comparisons.
#![allow(dead_code)] // each test crate uses its own subset

pub mod device;
pub mod golden;

/// The crate's seeded generator with the draws the tests need.
pub struct Rng(ccpl::sampling::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ccpl::sampling::SplitMix64::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }
    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    /// An odd number in `lo..=hi` (`lo` odd).
    pub fn odd(&mut self, lo: usize, hi: usize) -> usize {
        lo + 2 * self.range(0, (hi - lo) / 2)
    }
    /// `len` values uniform in `[-1, 1)`.
    pub fn vec(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.symmetric()).collect()
    }
}

/// `||a - b|| / ||b||`, the crate's measure of agreement; NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    ccpl::reference::relative_error(a, b)
}

/// The NHWC copy of an NCHW buffer of shape `(b, c, h, w)`.
pub fn nchw_to_nhwc(x: &[f64], b: usize, c: usize, h: usize, w: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    out[((bi * h + hi) * w + wi) * c + ci] = x[((bi * c + ci) * h + hi) * w + wi];
                }
            }
        }
    }
    out
}
