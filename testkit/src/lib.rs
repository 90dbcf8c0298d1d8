//! What the tests and benches of the workspace share: a seeded generator, the measure of
//! agreement and its assertion, Pearson's chi-square, over plain slices of `f64`. The generator
//! and the measure are the crate's own (`ccpl::sampling::SplitMix64`,
//! `ccpl::reference::relative_error`), with the draws and the checks tests need around them.

use ccpl::sampling::SplitMix64;

/// The crate's SplitMix64 generator, with the draws tests and benches need: the same seed
/// gives the same stream as `ccpl::sampling::SplitMix64`.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `[0, 1)`, 53 random bits.
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
    /// An integer in `lo..=hi`, which may be negative.
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
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

/// `||a - b|| / ||b||`, the crate's measure of agreement (`ccpl::reference::relative_error`:
/// NaN or infinity anywhere gives infinity, and so does any difference from an all-zero `b`),
/// for vectors that must be of one length.
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

/// Pearson's statistic of observed counts against expected ones.
pub fn chi_square(observed: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(
        observed.len(),
        expected.len(),
        "observed and expected differ in length"
    );
    observed
        .iter()
        .zip(expected)
        .map(|(o, e)| (o - e) * (o - e) / e)
        .sum()
}

/// Pearson's statistic of observed counts against equal expected counts.
pub fn chi_square_uniform(counts: &[u64]) -> f64 {
    let observed: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let expected = observed.iter().sum::<f64>() / counts.len() as f64;
    chi_square(&observed, &vec![expected; counts.len()])
}

/// The spec's directions, k = 0..7, as `(dh, dw)`: raster order of the 3x3 window without
/// its centre. Written out here, not read from the crate, so that the crate's convention (and
/// every integration's use of it) is checked against the spec's table.
pub const SPEC_DIRECTIONS: [(isize, isize); 8] = [
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
];
