//! Inputs and buffers the kernel tests set up on a device: random values, the workspaces of
//! the multi-layer and the small-S rows loss, the centres, unit rows.

use ccpl::launch::CentersBuf;
use ccpl::launch::small_s;
use ccpl::loss::layer::LayerWorkspace;
use ccpl::loss::multi_layer::{LossPlan, LossWorkspace};
use ccpl::loss::small_s::{
    SampledRowsPlan, SampledRowsWorkspace, SmallRowsPlan, SmallRowsWorkspace,
};
use ccpl::{Centers, Dtype, Element, FeatureShape, RowShape, Tau, reference};

use super::Rng;
use super::device::{Elem, TestDevice};
use super::tolerance::{from_f64, to_f64};

/// Values uniform in `[-scale, scale)`, rounded to `T`: a kernel's input and, exactly, the
/// reference's.
pub fn random<T: Element>(rng: &mut super::Rng, len: usize, scale: f64) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f64(scale * rng.symmetric()))
        .collect()
}

/// The workspace of `plan` (`LossPlan`) on a device: NaN wherever a launch writes before it
/// reads; the centre maps without centres (-1), the sampler at step 0 under `seed`, `1.0` where
/// a default upstream gradient lives.
pub fn loss_workspace<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &LossPlan,
    seed: u64,
) -> LossWorkspace<D::Mem<T>, D::Mem<f32>, D::Mem<i32>> {
    let lengths = plan.workspace().unwrap();
    let mut ws = lengths
        .try_map(dev.nan_filled::<T>(), dev.nan_filled::<f32>(), |&n| {
            Ok(dev.upload(&vec![0i32; n]))
        })
        .unwrap();
    for (c, len) in ws.centers.iter_mut().zip(&lengths.centers) {
        c.map = dev.upload(&vec![-1i32; len.map]);
    }
    ws.counters = dev.upload(&small_s::counters(seed, 0));
    ws.one = dev.upload(&[1.0f32]);
    for fused in &mut ws.fused {
        fused.rows.one = dev.upload(&[1.0f32]);
    }
    ws
}

/// The small-S rows loss's workspace on a device, all float32.
pub type SmallRowsMem<D> =
    SmallRowsWorkspace<<D as TestDevice>::Mem<f32>, <D as TestDevice>::Mem<f32>>;

/// The workspace of `plan` (`SmallRowsPlan`) on a device, NaN wherever a launch writes before
/// it reads and `1.0` where the default upstream gradient lives, and its launch counters.
pub fn small_rows_workspace<D: TestDevice>(
    dev: &D,
    plan: &SmallRowsPlan,
) -> (SmallRowsMem<D>, D::Mem<i32>) {
    let mut ws = plan
        .workspace()
        .unwrap()
        .try_map(dev.nan_filled::<f32>(), dev.nan_filled::<f32>())
        .unwrap();
    ws.one = dev.upload(&[1.0f32]);
    (ws, dev.upload(&[0i32; small_s::COUNTERS]))
}

/// The workspace of `plan` (`SampledRowsPlan`) on a device as its owner sets it before the
/// first step: no centres (zeros, every map entry -1), the sampler at `step` under `seed`.
pub fn sampled_rows_workspace<D: TestDevice>(
    dev: &D,
    plan: &SampledRowsPlan,
    seed: u64,
    step: u64,
) -> SampledRowsWorkspace<D::Mem<i32>> {
    let lengths = plan.workspace().unwrap();
    SampledRowsWorkspace {
        counters: dev.upload(&small_s::counters(seed, step)),
        centers: dev.upload(&vec![0i32; lengths.centers]),
        maps: dev.upload(&vec![-1i32; lengths.maps]),
    }
}

/// A layer's workspace on a device, its rows in `T`.
pub type LayerMem<T, D> = LayerWorkspace<<D as TestDevice>::Mem<T>, <D as TestDevice>::Mem<f32>>;

/// The workspace of a layer of `shape` with `n` centres on a device, its rows in `T`: NaN
/// wherever a launch writes before it reads, `1.0` where the default upstream gradient lives.
pub fn layer_workspace<T: Elem + Element, D: TestDevice>(
    dev: &D,
    shape: &FeatureShape,
    n: usize,
) -> LayerMem<T, D> {
    let mut ws = LayerWorkspace::lengths(shape, n)
        .unwrap()
        .try_map(dev.nan_filled::<T>(), dev.nan_filled::<f32>())
        .unwrap();
    ws.rows.one = dev.upload(&[1.0f32]);
    ws
}

/// Centres in device memory: the flat indices and the inverse map.
pub struct TestCenters<D: TestDevice> {
    height: usize,
    width: usize,
    flat: D::Mem<i32>,
    map: D::Mem<i32>,
}

impl<D: TestDevice> TestCenters<D> {
    pub fn upload(dev: &D, centers: &Centers) -> Self {
        Self {
            height: centers.height(),
            width: centers.width(),
            flat: dev.upload(centers.flat()),
            map: dev.upload(&centers.center_map()),
        }
    }
    /// The plans' view of them; valid while `self` lives.
    pub fn buf(&mut self, dev: &D) -> CentersBuf {
        CentersBuf {
            height: self.height,
            width: self.width,
            flat: dev.buf(&mut self.flat),
            map: dev.buf(&mut self.map),
        }
    }
}

/// How the rows of an InfoNCE test relate: independent (the loss is about log S), or k close
/// to q (the diagonal dominates its row by about 10: the row losses are about S e^-10, and
/// P_ii - 1 is that small too, which a float `exp(L_ii - lse) - 1` would get wrong).
#[derive(Debug, Clone, Copy)]
pub enum Rows {
    Random,
    Aligned,
}

/// One check of the InfoNCE kernels: rows of `shape` related as `rows`, at `tau`.
#[derive(Debug, Clone, Copy)]
pub struct Regime<'a> {
    pub shape: &'a RowShape,
    pub tau: Tau,
    pub rows: Rows,
}

impl Regime<'_> {
    /// Unit rows `q` and `k` of this regime, as f64 of values exact in `T`.
    pub fn unit_rows<T: Dtype>(&self, rng: &mut Rng) -> (Vec<f64>, Vec<f64>) {
        unit_rows::<T>(rng, self.shape, self.rows)
    }
}

/// Each of `taus` with random rows, then the default temperature with aligned rows where the
/// rows are wider than 1 (rows of width 1 normalise to +-1, so aligned rows would be equal).
/// Under the emulator's sanitizer, the first of them only: the kernels access the same
/// addresses at every temperature and for any rows, and the checks are of accesses.
pub fn regimes<D: TestDevice>(dev: &D, shape: &RowShape, taus: &[Tau]) -> Vec<(Tau, Rows)> {
    let mut regimes: Vec<_> = taus.iter().map(|&tau| (tau, Rows::Random)).collect();
    if dev.sanitized() {
        regimes.truncate(1);
    } else if shape.width() > 1 {
        regimes.push((Tau::DEFAULT, Rows::Aligned));
    }
    regimes
}

/// The row shapes `(B, S, C)` of `dims`, and of `large` too where the device runs large sizes.
pub fn row_shapes<D: TestDevice>(
    dev: &D,
    dims: &[(usize, usize, usize)],
    large: &[(usize, usize, usize)],
) -> Vec<RowShape> {
    let large = if dev.large_sizes() { large } else { &[] };
    dims.iter()
        .chain(large)
        .map(|&(b, s, c)| RowShape::new(b, s, c).unwrap())
        .collect()
}

/// Unit rows `q` and `k` as f64 of values exact in `T`.
pub fn unit_rows<T: Dtype>(rng: &mut Rng, shape: &RowShape, rows: Rows) -> (Vec<f64>, Vec<f64>) {
    let q = rng.vec(shape.len());
    let k: Vec<f64> = match rows {
        Rows::Random => rng.vec(shape.len()),
        Rows::Aligned => q.iter().map(|v| v + 0.3 * rng.symmetric()).collect(),
    };
    let unit = |v: &[f64]| {
        let n = reference::normalize_rows(v, shape.width()).unwrap().rows;
        to_f64(&from_f64::<T>(&n))
    };
    (unit(&q), unit(&k))
}

/// A test case's name in failure messages.
pub fn label<D: TestDevice>(dev: &D, shape: &RowShape, tau: Tau, rows: Rows) -> String {
    format!(
        "B={} S={} C={} tau={tau} {rows:?} on the {}",
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    )
}
