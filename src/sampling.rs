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
