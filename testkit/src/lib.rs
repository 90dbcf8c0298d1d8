//! What the tests and benches of the workspace share: a seeded generator, the measure of
//! agreement and its assertion, Pearson's chi-square. Plain slices of `f64` and no dependency
//! on `ccpl`, so that `ccpl`'s own tests and benches can use it without the crate depending
//! on itself.

/// SplitMix64 (Steele, Lea, Flood 2014), the generator of `ccpl::sampling::SplitMix64`: the
/// same seed gives the same stream here, with the draws tests and benches need.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`, 53 random bits.
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

/// `||a - b|| / ||b||`, the measure of agreement of `ccpl::reference::relative_error`: NaN or
/// infinity anywhere gives infinity, and so does any difference from an all-zero `b`.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut a.iter().zip(b).map(|(x, y)| x - y));
    let scale = norm(&mut b.iter().copied());
    if scale != 0.0 {
        diff / scale
    } else if diff == 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
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
