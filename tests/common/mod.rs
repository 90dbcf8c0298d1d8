//! Helpers shared by the test suites: a small seeded generator and comparisons.
#![allow(dead_code)] // each test crate uses its own subset

pub mod device;
pub mod golden;

/// SplitMix64: a tiny seeded generator, so the tests need no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 {
        if diff == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        diff / norm
    }
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
