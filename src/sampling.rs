//! Centres: the positions whose 3x3 neighbourhoods give the difference rows.

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
    /// the interior, with a seeded generator: the same seed gives the same centres.
    pub fn sample(height: usize, width: usize, num_s: usize, seed: u64) -> Result<Self> {
        check_map(height, width)?;
        if num_s == 0 {
            return Err(Error::NoCenters);
        }
        let (ih, iw) = (height - 2, width - 2);
        let n = num_s.min(ih * iw);
        // Partial Fisher-Yates over the interior positions: the first n slots are the draw.
        let mut pool: Vec<i32> = (0..ih * iw)
            .map(|i| ((i / iw + 1) * width + i % iw + 1) as i32)
            .collect();
        let mut rng = SplitMix64::new(seed);
        for i in 0..n {
            let j = i + rng.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(n);
        Ok(Self {
            height,
            width,
            flat: pool,
        })
    }

    /// Takes centres given by the caller (flat indices `h*W + w`), checking that each lies in
    /// the interior and none repeats.
    pub fn from_flat(height: usize, width: usize, flat: &[i64]) -> Result<Self> {
        check_map(height, width)?;
        if flat.is_empty() {
            return Err(Error::NoCenters);
        }
        let mut seen = vec![false; height * width];
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
            if std::mem::replace(&mut seen[p as usize], true) {
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
/// assert!(rng.below(10) < 10);
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
    /// Uniform in `0..n` (`n > 0`), without modulo bias (rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let r = self.next_u64();
            if r < zone {
                return r % n;
            }
        }
    }
    /// Uniform in `[0, 1)`, 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
