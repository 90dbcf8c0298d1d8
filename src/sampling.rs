//! Centres: the positions whose 3x3 neighbourhoods give the difference rows.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::shape::FeatureShape;

/// The centres of one layer: distinct interior positions of an `H x W` map, as flat indices
/// `h*W + w` in sampling order. The same centres serve every image of the batch and both
/// feature maps of the layer.
///
/// ```
/// use ccpl::Centers;
/// let c = Centers::sample(32, 32, 8, 42).unwrap();
/// assert_eq!(c.len(), 8);
/// assert_eq!(c.rows(), 64); // S = 8N difference rows
/// // Clamped to the interior, (H-2)(W-2) = 1 here:
/// assert_eq!(Centers::sample(3, 3, 8, 0).unwrap().len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Centers {
    height: usize,
    width: usize,
    flat: Vec<i32>,
}

impl Centers {
    /// Draws `N = min(num_s, (H-2)(W-2))` distinct centres uniformly without replacement from
    /// the interior, in random order, with a seeded generator: the same seed gives the same
    /// centres. Time and memory are `O(N)`, whatever the size of the map.
    pub fn sample(height: usize, width: usize, num_s: usize, seed: u64) -> Result<Self> {
        check_map(height, width)?;
        if num_s == 0 {
            return Err(Error::NoCenters);
        }
        let (ih, iw) = (height - 2, width - 2);
        let total = ih * iw;
        let n = num_s.min(total);
        // A partial Fisher-Yates shuffle of the interior positions 0..total, whose first n
        // slots are the draw (uniform, in random order). Only the slots a swap has touched
        // differ from the identity; they live in `moved`, so nothing is O(total).
        let mut moved: HashMap<usize, usize> = HashMap::with_capacity(2 * n);
        let mut rng = SplitMix64::new(seed);
        let mut flat = Vec::with_capacity(n);
        for i in 0..n {
            let remaining = (total - i) as u64; // >= 1: i < n <= total
            let j = i + rng.below(remaining).unwrap_or(0) as usize;
            let at_i = moved.get(&i).copied().unwrap_or(i);
            let at_j = moved.insert(j, at_i).unwrap_or(j);
            // Position at_j of the interior, as a flat index of the map (< H*W, within i32).
            flat.push(((at_j / iw + 1) * width + at_j % iw + 1) as i32);
        }
        Ok(Self {
            height,
            width,
            flat,
        })
    }

    /// The centres the device sampler draws (the small-S path of
    /// [`CcpLoss`](crate::cuda::CcpLoss), `kernels/philox.cuh`) for layer `layer` at step `step`
    /// under `seed`, word for word: `N = min(num_s, (H-2)(W-2))` distinct interior positions,
    /// uniform without replacement, in random order. Position `i` is drawn uniformly from the
    /// interior (Lemire's unbiased multiply-shift on the words of [`CenterStream`]) and drawn
    /// again while it equals an earlier one, which makes it uniform among the positions not
    /// drawn before.
    ///
    /// ```
    /// use ccpl::Centers;
    /// let a = Centers::philox(64, 64, 8, 7, 0, 1).unwrap();
    /// let b = Centers::philox(64, 64, 8, 7, 1, 1).unwrap(); // the next step
    /// assert_eq!(a.len(), 8);
    /// assert_ne!(a, b);
    /// ```
    pub fn philox(
        height: usize,
        width: usize,
        num_s: usize,
        seed: u64,
        step: u64,
        layer: u32,
    ) -> Result<Self> {
        check_map(height, width)?;
        if num_s == 0 {
            return Err(Error::NoCenters);
        }
        let (inner_width, interior) = (width - 2, (height - 2) * (width - 2));
        let n = num_s.min(interior);
        let mut stream = CenterStream::new(seed, step, layer);
        let mut seen = std::collections::HashSet::with_capacity(n);
        let mut flat = Vec::with_capacity(n);
        while flat.len() < n {
            // The interior is below 2^31 positions (check_map).
            let v = stream.below(interior as u32) as usize;
            let pos = ((v / inner_width + 1) * width + v % inner_width + 1) as i32;
            if seen.insert(pos) {
                flat.push(pos);
            }
        }
        Ok(Self {
            height,
            width,
            flat,
        })
    }

    /// Takes centres given by the caller (flat indices `h*W + w`), checking that each lies in
    /// the interior and none repeats.
    pub fn from_flat(height: usize, width: usize, flat: &[i64]) -> Result<Self> {
        check_map(height, width)?;
        if flat.is_empty() {
            return Err(Error::NoCenters);
        }
        let mut seen = HashSet::with_capacity(flat.len());
        let mut out = Vec::with_capacity(flat.len());
        for (index, &p) in flat.iter().enumerate() {
            let inside = p >= 0 && (p as u64) < (height * width) as u64 && {
                let (h, w) = (p as usize / width, p as usize % width);
                (1..=height - 2).contains(&h) && (1..=width - 2).contains(&w)
            };
            if !inside {
                return Err(Error::CenterOutsideInterior {
                    index,
                    flat: p,
                    height,
                    width,
                });
            }
            if !seen.insert(p) {
                return Err(Error::CenterRepeated { index, flat: p });
            }
            out.push(p as i32);
        }
        Ok(Self {
            height,
            width,
            flat: out,
        })
    }

    /// The flat indices, in sampling order.
    pub fn flat(&self) -> &[i32] {
        &self.flat
    }
    /// Number of centres `N`.
    pub fn len(&self) -> usize {
        self.flat.len()
    }
    /// Never true: there is at least one centre.
    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }
    /// Number of difference rows per image, `S = 8N`.
    pub fn rows(&self) -> usize {
        crate::ffi::CCPL_NUM_NEIGHBORS as usize * self.flat.len()
    }
    /// Height of the map the centres belong to.
    pub fn height(&self) -> usize {
        self.height
    }
    /// Width of the map the centres belong to.
    pub fn width(&self) -> usize {
        self.width
    }
    /// For each of the `H*W` positions, the index of the centre there, or -1: the inverse
    /// map the deterministic backward scatter uses.
    pub fn center_map(&self) -> Vec<i32> {
        let mut map = vec![-1; self.height * self.width];
        for (x, &p) in self.flat.iter().enumerate() {
            map[p as usize] = x as i32;
        }
        map
    }
    /// Checks that these centres belong to a map of `shape`'s height and width.
    pub fn check_shape(&self, shape: &FeatureShape) -> Result<()> {
        if (self.height, self.width) == (shape.height(), shape.width()) {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "centres were drawn for a {}x{} map, the feature map is {}x{}",
                self.height,
                self.width,
                shape.height(),
                shape.width()
            )))
        }
    }
}

fn check_map(height: usize, width: usize) -> Result<()> {
    if height < 3 || width < 3 {
        return Err(Error::NoInterior { height, width });
    }
    if height
        .checked_mul(width)
        .is_none_or(|hw| hw > i32::MAX as usize)
    {
        return Err(Error::Shape(format!(
            "{height}x{width} map exceeds the i32 range of the kernels"
        )));
    }
    Ok(())
}

/// SplitMix64 (Steele, Lea, Flood 2014): the small, well-mixed seeded generator behind
/// [`Centers::sample`]; public so tests, benches and examples make their data with it too.
///
/// ```
/// let mut rng = ccpl::sampling::SplitMix64::new(7);
/// let u = rng.unit();
/// assert!((0.0..1.0).contains(&u));
/// assert!(rng.below(10).unwrap() < 10);
/// assert_eq!(rng.below(0), None); // 0..0 is empty
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator for `seed`: the same seed gives the same sequence.
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
    /// Uniform in `0..n`, without modulo bias (rejection); `None` when `n == 0`, an empty
    /// range.
    pub fn below(&mut self, n: u64) -> Option<u64> {
        let zone = u64::MAX - u64::MAX.checked_rem(n)?;
        loop {
            let r = self.next_u64();
            if r < zone {
                return Some(r % n);
            }
        }
    }
    /// Uniform in `[0, 1)`, 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011): the 4 words of the counter-based
/// generator at `counter` under `key`, as the device computes them (`kernels/philox.cuh`).
///
/// ```
/// // Random123's known answer for the zero counter and key.
/// assert_eq!(
///     ccpl::sampling::philox4x32_10([0; 4], [0; 2]),
///     [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
/// );
/// ```
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c0 as u64;
        let p1 = 0xCD9E_8D57u64 * c2 as u64;
        (c0, c1, c2, c3) = (
            (p1 >> 32) as u32 ^ c1 ^ k0,
            p1 as u32,
            (p0 >> 32) as u32 ^ c3 ^ k1,
            p0 as u32,
        );
        k0 = k0.wrapping_add(0x9E37_79B9);
        k1 = k1.wrapping_add(0xBB67_AE85);
    }
    [c0, c1, c2, c3]
}

/// The stream of 32-bit words the device draws one layer's centres from at one step: word
/// `w` is word `w % 4` of [`philox4x32_10`] at the counter `(step low, step high, layer,
/// w / 4)` under the key `(seed low, seed high)`. Counter-based: a step needs no state but
/// its number, and different layers and steps read disjoint counters.
#[derive(Debug, Clone)]
pub struct CenterStream {
    counter: [u32; 4],
    key: [u32; 2],
    words: [u32; 4],
    next: usize,
}

impl CenterStream {
    /// The stream of layer `layer` at step `step` under `seed`.
    pub fn new(seed: u64, step: u64, layer: u32) -> Self {
        Self {
            counter: [step as u32, (step >> 32) as u32, layer, 0],
            key: [seed as u32, (seed >> 32) as u32],
            words: [0; 4],
            next: 4,
        }
    }

    /// The next word.
    pub fn word(&mut self) -> u32 {
        if self.next == 4 {
            self.words = philox4x32_10(self.counter, self.key);
            self.counter[3] = self.counter[3].wrapping_add(1);
            self.next = 0;
        }
        self.next += 1;
        self.words[self.next - 1]
    }

    /// Uniform in `0..n` (`n > 0`, an interior's size), without bias: Lemire's
    /// multiply-shift, with rejection of the low products below `2^32 mod n`.
    fn below(&mut self, n: u32) -> u32 {
        let mut m = self.word() as u64 * n as u64;
        if (m as u32) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u32) < threshold {
                m = self.word() as u64 * n as u64;
            }
        }
        (m >> 32) as u32
    }
}
