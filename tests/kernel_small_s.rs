//! The whole multi-layer loss (`loss::multi_layer::LossPlan`: the small-S path of
//! `kernels/small_s.cu`, mixed with the fused path for a larger layer) against the CPU
//! reference `ccp_loss`, on the emulator and the GPU, for every storage type, at odd sizes,
//! at the paper's and at the edges of float's range; the launches of a training step, counted;
//! determinism; and the rows loss of a learned head on the small-S path
//! (`loss::small_s::SmallRowsPlan`), at the edges of float's range too, and its mean of tiny
//! row losses.
//!
//! Tolerances. The small-S path computes in float from the inputs in `T` and rounds only what
//! it stores in `T`: the gradients, once, when they are added to the caller's buffer. So its
//! 16-bit rounding model is the exact result rounded once (`stored_tolerance`); f32 has the
//! spec's 1e-5, and so has the loss in every type (it is float all the way). A layer on the
//! fused path stores its rows in `T` on the way: its 16-bit model is `layer_model` with the
//! deterministic scatter, as in kernel_layer.

use crate::common;

use std::cell::RefCell;

use ccpl::launch::neighbor::Scatter;
use ccpl::launch::small_s;
use ccpl::launch::{KernelParams, LaunchPlan, Launcher};
use ccpl::loss::multi_layer::{CenterBuffers, Draw, LossPlan, LossWorkspace};
use ccpl::loss::small_s::SmallRowsPlan;
use ccpl::reference::{self, LayerInput};
use ccpl::{Centers, Dtype, FeatureShape, Layout, RowShape, Tau};
use common::Rng;
use common::assert_close;
use common::device::{Elem, TestDevice};
use common::fixtures::{loss_workspace, random, small_rows_workspace};
use common::models::{layer_model, rows_model, scatter_model};
use common::tolerance::{F32_TOLERANCE, stored_tolerance, to_f64, tolerance, tolerance_at};

mod loss_cases;
mod rows_loss;

const TAU: Tau = Tau::DEFAULT;
const SEED: u64 = 0x5eed_cc91;

/// A launcher that records the kernels it launches.
pub(crate) struct Counting<L> {
    inner: L,
    kernels: RefCell<Vec<String>>,
}

impl<L: Launcher> Counting<L> {
    pub(crate) fn new(inner: L) -> Self {
        Self {
            inner,
            kernels: RefCell::new(Vec::new()),
        }
    }
    pub(crate) fn take(&self) -> Vec<String> {
        self.kernels.take()
    }
}

impl<L: Launcher> Launcher for Counting<L> {
    type Error = L::Error;
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<(), L::Error> {
        self.kernels.borrow_mut().push(plan.kernel.clone());
        self.inner.launch(plan)
    }
}

/// One layer of a case: its shape, `num_s`, whether feat_q has a flat 3x3 patch around
/// (2, 2), one of the centres then (difference rows that are exactly zero: gradient g/eps),
/// and the magnitude of the features (uniform in `[-magnitude, magnitude)`).
#[derive(Clone, Copy)]
pub(crate) struct LayerCase {
    shape: FeatureShape,
    num_s: usize,
    flat: bool,
    magnitude: f64,
}

impl LayerCase {
    /// The case with features of magnitude `magnitude`.
    fn at(self, magnitude: f64) -> Self {
        Self { magnitude, ..self }
    }
}

pub(crate) fn layer(
    dims: (usize, usize, usize, usize),
    num_s: usize,
    layout: Layout,
    flat: bool,
) -> LayerCase {
    let (b, c, h, w) = dims;
    LayerCase {
        shape: FeatureShape::new(b, c, h, w, layout).unwrap(),
        num_s,
        flat,
        magnitude: 1.0,
    }
}

fn features<T: Dtype>(rng: &mut Rng, case: &LayerCase) -> (Vec<T>, Vec<T>) {
    let s = &case.shape;
    let mut feat_q: Vec<T> = random(rng, s.len(), case.magnitude);
    let feat_k: Vec<T> = random(rng, s.len(), case.magnitude);
    if case.flat {
        for b in 0..s.batch() {
            for c in 0..s.channels() {
                for h in 1..4 {
                    for w in 1..4 {
                        feat_q[s.index(b, c, h, w).unwrap()] = T::from_f64(0.5 * case.magnitude);
                    }
                }
            }
        }
    }
    (feat_q, feat_k)
}

/// The centres a case uses: the host's draw with (2, 2) first for a flat patch (given), or
/// the host model of the device's draw at `step` (sampled).
fn case_centers(cases: &[LayerCase], draw: Draw, step: u64) -> Vec<Centers> {
    cases
        .iter()
        .enumerate()
        .map(|(l, case)| {
            let s = &case.shape;
            if draw == Draw::Sample {
                return Centers::philox(s.height(), s.width(), case.num_s, SEED, step, l as u32)
                    .unwrap();
            }
            let drawn = Centers::sample(s.height(), s.width(), case.num_s, 300 + l as u64).unwrap();
            let patch = (2 * s.width() + 2) as i64;
            let mut flat: Vec<i64> = case.flat.then_some(patch).into_iter().collect();
            flat.extend(
                drawn
                    .flat()
                    .iter()
                    .map(|&p| p as i64)
                    .filter(|&p| !case.flat || p != patch),
            );
            flat.truncate(drawn.len());
            Centers::from_flat(s.height(), s.width(), &flat).unwrap()
        })
        .collect()
}

/// What a run of the loss leaves: the loss and, per backward, each layer's gradients.
pub(crate) struct Run {
    kernels: Vec<Vec<String>>,
    loss: f32,
    grads: Vec<Vec<(Vec<f64>, Vec<f64>)>>,
}

/// A backward: the upstream gradient (`None`: the default, 1) and whether the content side
/// gets a gradient too.
pub(crate) type Backward = (Option<f32>, bool);

/// The backwards a case runs: the default upstream into zeroed gradients of q only (the
/// gradient itself, compared directly), then 2.5 from device memory into random starts of
/// both sides (the accumulation, and the content side).
pub(crate) const BACKWARDS: [Backward; 2] = [(None, false), (Some(2.5), true)];

/// A training step's backward only: the default upstream into zeroed gradients of q.
const TRAINING_STEP: [Backward; 1] = [(None, false)];

/// The default upstream into zeroed gradients of both sides: both compared directly (a start
/// of about 1 would hide gradients far from 1).
pub(crate) const BOTH_SIDES: [Backward; 1] = [(None, true)];

/// What a run of the loss is given: each layer's features and centres, where the centres come
/// from, the backwards and the starts of their gradients.
struct Inputs<'a, T> {
    feats: &'a [(Vec<T>, Vec<T>)],
    centers: &'a [Centers],
    draw: Draw,
    backwards: &'a [Backward],
    starts: &'a [Vec<(Vec<T>, Vec<T>)>],
}

/// The loss's workspace on a device, its rows in `T`.
type LossMem<T, D> = LossWorkspace<
    <D as TestDevice>::Mem<T>,
    <D as TestDevice>::Mem<f32>,
    <D as TestDevice>::Mem<i32>,
>;

/// A forward at `step` on `ws` with the inputs' centres (written into the workspace when
/// given; drawn on the device otherwise, and checked against them: they are then the host
/// model's), then the backwards into the starts. The counters afterwards: the seed kept, the
/// step advanced when drawn, and no finished block left counted (the next step's launches
/// count from 0).
fn run<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &LossPlan,
    ws: &mut LossMem<T, D>,
    step: u64,
    inputs: &Inputs<'_, T>,
    label: &str,
) -> Run {
    let Inputs {
        feats,
        centers,
        draw,
        backwards,
        starts,
    } = *inputs;
    if draw == Draw::Given {
        for (c, own) in centers.iter().zip(&mut ws.centers) {
            *own = CenterBuffers {
                flat: dev.upload(c.flat()),
                map: dev.upload(&c.center_map()),
            };
        }
    }
    let mut feats_dev: Vec<(D::Mem<T>, D::Mem<T>)> = feats
        .iter()
        .map(|(q, k)| (dev.upload(q), dev.upload(k)))
        .collect();
    let feat_bufs: Vec<_> = feats_dev
        .iter_mut()
        .map(|(q, k)| (dev.buf(q), dev.buf(k)))
        .collect();
    let launcher = Counting::new(dev.launcher());
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&launcher, &feat_bufs, &bufs, draw)
        .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    let mut kernels = vec![launcher.take()];
    let mut grads = Vec::new();
    for (&(upstream, both), starts) in backwards.iter().zip(starts) {
        let mut grads_dev: Vec<(D::Mem<T>, D::Mem<T>)> = starts
            .iter()
            .map(|(q, k)| (dev.upload(q), dev.upload(k)))
            .collect();
        let mut upstream_dev = dev.upload(&[upstream.unwrap_or(f32::NAN)]);
        let upstream_buf = upstream.map(|_| dev.buf(&mut upstream_dev));
        let grad_q: Vec<_> = grads_dev.iter_mut().map(|(q, _)| dev.buf(q)).collect();
        let grad_k: Vec<_> = grads_dev.iter_mut().map(|(_, k)| dev.buf(k)).collect();
        plan.backward::<T, _>(
            &launcher,
            &bufs,
            upstream_buf,
            &grad_q,
            both.then_some(&grad_k[..]),
        )
        .unwrap_or_else(|e| panic!("backward {label}: {e}"));
        kernels.push(launcher.take());
        grads.push(
            grads_dev
                .iter()
                .map(|(q, k)| (to_f64(&dev.download(q)), to_f64(&dev.download(k))))
                .collect(),
        );
    }
    let next = step + u64::from(draw == Draw::Sample);
    assert_eq!(
        dev.download(&ws.counters),
        small_s::counters(SEED, next),
        "{label}: the counters after the step (seed, step {next}, no block counted)"
    );
    if draw == Draw::Sample {
        for (l, c) in centers.iter().enumerate() {
            let got = dev.download(&ws.centers[l].flat);
            assert_eq!(
                got,
                c.flat(),
                "{label}: layer {l}: the device drew the host model's centres"
            );
            let map = dev.download(&ws.centers[l].map);
            assert_eq!(
                map,
                c.center_map(),
                "{label}: layer {l}: the map follows the centres"
            );
        }
    }
    Run {
        kernels,
        loss: dev.download(&ws.loss)[0],
        grads,
    }
}

/// The starts of the backwards' gradients: zeros for the default upstream, else values in
/// [-1, 1).
fn starts<T: Dtype>(
    rng: &mut Rng,
    cases: &[LayerCase],
    backwards: &[Backward],
) -> Vec<Vec<(Vec<T>, Vec<T>)>> {
    backwards
        .iter()
        .map(|&(upstream, _)| {
            cases
                .iter()
                .map(|c| {
                    let n = c.shape.len();
                    if upstream.is_some() {
                        (random(rng, n, 1.0), random(rng, n, 1.0))
                    } else {
                        (vec![T::from_f64(0.0); n], vec![T::from_f64(0.0); n])
                    }
                })
                .collect()
        })
        .collect()
}

/// The case against the reference at step 0 on a new workspace; returns the run (for its
/// launches).
fn check_case<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    cases: &[LayerCase],
    draw: Draw,
    backwards: &[Backward],
    rng: &mut Rng,
    name: &str,
) -> Run {
    let mut runs = check_steps::<T, D>(dev, cases, &[draw], 0, backwards, rng, name);
    runs.pop().unwrap()
}

/// The case against the reference at each step of `draws` in turn (where its centres come
/// from), on one workspace whose sampler starts at step `first`, as consecutive training steps
/// run: new features each step and, drawn, that step's centres. Returns the runs.
pub(crate) fn check_steps<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    cases: &[LayerCase],
    draws: &[Draw],
    first: u64,
    backwards: &[Backward],
    rng: &mut Rng,
    name: &str,
) -> Vec<Run> {
    let layers: Vec<(FeatureShape, usize)> = cases.iter().map(|c| (c.shape, c.num_s)).collect();
    let plan = LossPlan::new(&layers, TAU).unwrap();
    let mut ws = loss_workspace::<T, D>(dev, &plan, SEED);
    ws.counters = dev.upload(&small_s::counters(SEED, first));
    let mut runs = Vec::new();
    let mut step = first;
    for &draw in draws {
        let label = format!(
            "{name} {} step {step} ({draw:?}) on the {}",
            T::SUFFIX,
            dev.name()
        );
        let centers = case_centers(cases, draw, step);
        let feats: Vec<(Vec<T>, Vec<T>)> = cases.iter().map(|c| features::<T>(rng, c)).collect();
        let starts = starts::<T>(rng, cases, backwards);
        let given = Inputs {
            feats: &feats,
            centers: &centers,
            draw,
            backwards,
            starts: &starts,
        };
        let got = run::<T, D>(dev, &plan, &mut ws, step, &given, &label);

        let inputs: Vec<LayerInput<'_, T>> = cases
            .iter()
            .zip(&feats)
            .zip(&centers)
            .map(|((c, (q, k)), centers)| LayerInput {
                feat_q: q,
                feat_k: k,
                shape: c.shape,
                centers: centers.clone(),
            })
            .collect();
        let (exact_loss, exact) = reference::ccp_loss(&inputs, TAU, true).unwrap();
        // The fused layers' 16-bit rounding model (the small-S layers' loss is float).
        let fused_model = |l: usize, u: f64| {
            let (q, k) = (to_f64(&feats[l].0), to_f64(&feats[l].1));
            layer_model::<T>(&q, &k, &cases[l].shape, &centers[l], TAU, u)
        };
        let tol = if (0..cases.len()).any(|l| !plan.is_small(l)) {
            let model: f64 = (0..cases.len())
                .map(|l| {
                    if plan.is_small(l) {
                        exact[l].loss
                    } else {
                        fused_model(l, 1.0).loss
                    }
                })
                .sum();
            tolerance(&[model], &[exact_loss])
        } else {
            F32_TOLERANCE
        };
        assert_close(
            &format!("loss {label}"),
            &[got.loss as f64],
            &[exact_loss],
            tol,
        );

        for ((&(upstream, both), starts), grads) in backwards.iter().zip(&starts).zip(&got.grads) {
            let u = upstream.unwrap_or(1.0) as f64;
            for (l, c) in cases.iter().enumerate() {
                let sides = [
                    ("q", &grads[l].0, &starts[l].0, &exact[l].grad_feat_q, true),
                    (
                        "k",
                        &grads[l].1,
                        &starts[l].1,
                        exact[l].grad_feat_k.as_ref().unwrap(),
                        both,
                    ),
                ];
                for (side, got, start, grad, asked) in sides {
                    let start = to_f64(start);
                    if !asked {
                        assert_eq!(
                            got, &start,
                            "{label}: grad_feat_{side} written without being asked for"
                        );
                        continue;
                    }
                    let (q, k) = (to_f64(&feats[l].0), to_f64(&feats[l].1));
                    let feat = if side == "q" { &q } else { &k };
                    let want = match past_float_rows(feat, &c.shape, &centers[l]) {
                        None => start.iter().zip(grad).map(|(s, g)| s + u * g).collect(),
                        Some(past) => {
                            // The exact gradients of the difference rows, those of the rows past
                            // float's range as the kernels give them (0, README: known limits).
                            let exact = layer_model::<f64>(&q, &k, &c.shape, &centers[l], TAU, u);
                            let mut rows = if side == "q" {
                                exact.grad_rows_q
                            } else {
                                exact.grad_rows_k
                            };
                            let width = c.shape.channels();
                            for (row, g) in rows.chunks_mut(width).enumerate() {
                                if past[row] {
                                    g.fill(0.0);
                                }
                            }
                            let scatter = Scatter::Deterministic;
                            scatter_model::<f64>(&start, &rows, &c.shape, &centers[l], scatter)
                        }
                    };
                    let tol = if plan.is_small(l) {
                        stored_tolerance::<T>(&want)
                    } else {
                        let m = fused_model(l, u);
                        let rows = if side == "q" {
                            &m.grad_rows_q
                        } else {
                            &m.grad_rows_k
                        };
                        let stored = scatter_model::<T>(
                            &start,
                            rows,
                            &c.shape,
                            &centers[l],
                            Scatter::Deterministic,
                        );
                        tolerance(&stored, &want)
                    };
                    let what = format!("layer {l} grad_feat_{side} upstream={u} {label}");
                    assert_close(&what, got, &want, tol);
                }
            }
        }
        runs.push(got);
        step += u64::from(draw == Draw::Sample);
    }
    runs
}

/// Which difference rows of `feat` have a norm past float's range, when any has: their
/// gradient, below `|g| / f32::MAX`, comes out as 0 (README, known limits).
fn past_float_rows(feat: &[f64], shape: &FeatureShape, centers: &Centers) -> Option<Vec<bool>> {
    let rows = reference::neighbor_diff(feat, shape, centers).unwrap();
    let norms = reference::normalize_rows(&rows, shape.channels())
        .unwrap()
        .norms;
    let past: Vec<bool> = norms.iter().map(|&n| n > f32::MAX as f64).collect();
    past.contains(&true).then_some(past)
}

/// Every storage type, except f16 where a layer has a flat patch: its gradient g/1e-7 is past
/// f16's range (65504).
fn check_case_all<D: TestDevice>(
    dev: &D,
    cases: &[LayerCase],
    draw: Draw,
    rng: &mut Rng,
    name: &str,
) {
    check_case::<f32, D>(dev, cases, draw, &BACKWARDS, rng, name);
    check_case::<half::bf16, D>(dev, cases, draw, &BACKWARDS, rng, name);
    if !cases.iter().any(|c| c.flat) {
        check_case::<half::f16, D>(dev, cases, draw, &BACKWARDS, rng, name);
    }
}
