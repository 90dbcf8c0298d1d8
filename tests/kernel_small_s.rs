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

mod common;

use std::cell::RefCell;

use ccpl::launch::neighbor::Scatter;
use ccpl::launch::small_s;
use ccpl::launch::{KernelParams, LaunchPlan, Launcher};
use ccpl::loss::multi_layer::{CenterBuffers, Draw, LossPlan};
use ccpl::loss::small_s::SmallRowsPlan;
use ccpl::reference::{self, LayerInput};
use ccpl::{Centers, Dtype, FeatureShape, Layout, RowShape, Tau};
use common::Rng;
use common::device::{
    Elem, F32_TOLERANCE, TestDevice, assert_close, layer_model, loss_workspace, random, rows_model,
    scatter_model, small_rows_workspace, stored_tolerance, to_f64, tolerance, tolerance_at,
};

const TAU: Tau = Tau::DEFAULT;
const SEED: u64 = 0x5eed_cc91;

/// A launcher that records the kernels it launches.
struct Counting<L> {
    inner: L,
    kernels: RefCell<Vec<String>>,
}

impl<L: Launcher> Counting<L> {
    fn new(inner: L) -> Self {
        Self {
            inner,
            kernels: RefCell::new(Vec::new()),
        }
    }
    fn take(&self) -> Vec<String> {
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
struct LayerCase {
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

fn layer(
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
/// the host model of the device's draw at step 0 (sampled).
fn case_centers(cases: &[LayerCase], draw: Draw) -> Vec<Centers> {
    cases
        .iter()
        .enumerate()
        .map(|(l, case)| {
            let s = &case.shape;
            if draw == Draw::Sample {
                return Centers::philox(s.height(), s.width(), case.num_s, SEED, 0, l as u32)
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
struct Run {
    kernels: Vec<Vec<String>>,
    loss: f32,
    grads: Vec<Vec<(Vec<f64>, Vec<f64>)>>,
}

/// A backward: the upstream gradient (`None`: the default, 1) and whether the content side
/// gets a gradient too.
type Backward = (Option<f32>, bool);

/// The backwards a case runs: the default upstream into zeroed gradients of q only (the
/// gradient itself, compared directly), then 2.5 from device memory into random starts of
/// both sides (the accumulation, and the content side).
const BACKWARDS: [Backward; 2] = [(None, false), (Some(2.5), true)];

/// A training step's backward only: the default upstream into zeroed gradients of q.
const TRAINING_STEP: [Backward; 1] = [(None, false)];

/// The default upstream into zeroed gradients of both sides: both compared directly (a start
/// of about 1 would hide gradients far from 1).
const BOTH_SIDES: [Backward; 1] = [(None, true)];

/// What a run of the loss is given: each layer's features and centres, where the centres come
/// from, the backwards and the starts of their gradients.
struct Inputs<'a, T> {
    feats: &'a [(Vec<T>, Vec<T>)],
    centers: &'a [Centers],
    draw: Draw,
    backwards: &'a [Backward],
    starts: &'a [Vec<(Vec<T>, Vec<T>)>],
}

/// A forward with the inputs' centres (written into the workspace when given; drawn on the
/// device otherwise, and checked against them: they are then the host model's), then the
/// backwards into the starts.
fn run<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &LossPlan,
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
    let mut ws = loss_workspace::<T, D>(dev, plan, SEED);
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
    if draw == Draw::Sample {
        let counters = dev.download(&ws.counters);
        assert_eq!(
            small_s::counters_step(&counters),
            1,
            "{label}: the step advanced once"
        );
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

/// The case against the reference; returns the run (for its launches).
fn check_case<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    cases: &[LayerCase],
    draw: Draw,
    backwards: &[Backward],
    rng: &mut Rng,
    name: &str,
) -> Run {
    let label = format!("{name} {} on the {}", T::SUFFIX, dev.name());
    let layers: Vec<(FeatureShape, usize)> = cases.iter().map(|c| (c.shape, c.num_s)).collect();
    let plan = LossPlan::new(&layers, TAU).unwrap();
    let centers = case_centers(cases, draw);
    let feats: Vec<(Vec<T>, Vec<T>)> = cases.iter().map(|c| features::<T>(rng, c)).collect();
    let starts = starts::<T>(rng, cases, backwards);
    let given = Inputs {
        feats: &feats,
        centers: &centers,
        draw,
        backwards,
        starts: &starts,
    };
    let got = run::<T, D>(dev, &plan, &given, &label);

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
    got
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

/// Odd sizes on the small-S path, centres given: S = 8 with C = 1; S past one 16-row tile and
/// C past one 64-column tile; S = 512, the largest; one launch for all of them, every type.
/// S = 240 with a flat patch (NHWC), f32 and bf16. Then the centres drawn on the device, with a
/// layer of S = 520 on the fused path in the same loss: f32 (the fused path's 16-bit numerics
/// are kernel_layer's), every type where large sizes are practical, with larger maps too.
fn loss_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(11);
    let small = [
        layer((2, 5, 9, 11), 7, Layout::Nchw, false),
        layer((1, 1, 3, 3), 1, Layout::Nhwc, false),
        layer((1, 70, 12, 9), 9, Layout::Nchw, false),
        layer((3, 4, 10, 10), 64, Layout::Nchw, false),
    ];
    check_case_all(
        dev,
        &small,
        Draw::Given,
        &mut rng,
        "small-S layers, centres given",
    );
    let flat = [layer((2, 6, 8, 7), 30, Layout::Nhwc, true)];
    check_case_all(
        dev,
        &flat,
        Draw::Given,
        &mut rng,
        "a flat patch, centres given",
    );
    let mixed = [
        layer((1, 3, 11, 11), 65, Layout::Nchw, false),
        layer((2, 5, 9, 11), 7, Layout::Nhwc, false),
    ];
    let name = "a fused and a small-S layer, drawn";
    if dev.large_sizes() {
        check_case_all(dev, &mixed, Draw::Sample, &mut rng, name);
        let large = [
            layer((4, 96, 40, 40), 64, Layout::Nchw, false),
            layer((2, 300, 20, 24), 33, Layout::Nhwc, false),
            layer((1, 64, 60, 60), 200, Layout::Nchw, false),
        ];
        check_case_all(dev, &large, Draw::Sample, &mut rng, "larger maps, drawn");
    } else {
        check_case::<f32, D>(dev, &mixed, Draw::Sample, &BACKWARDS, &mut rng, name);
    }
}

/// Features at the edges of float's range, every layer in one launch: near `f32::MAX`, where
/// centre minus neighbour exceeds it; of 1e20, whose difference rows' raw products exceed it;
/// of 1e-25, far below eps (their rows normalise to about 0, their gradients are g/eps). f32
/// and bf16 (which share float's range); f16 at its own edges (features near 65504, whose
/// differences exceed it, and of 1e-3).
fn extreme_magnitudes<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(23);
    let float_range = [
        layer((1, 3, 5, 6), 3, Layout::Nchw, false).at(3e38),
        layer((2, 5, 6, 5), 4, Layout::Nhwc, false).at(1e20),
        layer((1, 4, 7, 5), 5, Layout::Nchw, false).at(1e-25),
    ];
    let name = "features at the edges of float's range";
    check_case::<f32, D>(dev, &float_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
    check_case::<half::bf16, D>(dev, &float_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
    let f16_range = [
        layer((1, 3, 5, 6), 3, Layout::Nchw, false).at(6e4),
        layer((1, 4, 7, 5), 5, Layout::Nhwc, false).at(1e-3),
    ];
    let name = "features at the edges of f16's range";
    check_case::<half::f16, D>(dev, &f16_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
}

/// The paper's configuration: B = 8, num_s = 8, relu2_1 128x128x128, relu3_1 256x64x64,
/// relu4_1 512x32x32 (NCHW), tau 0.07. A training step (the centres drawn on the device, the
/// forward, the backward into zeroed gradients) is three launches; against the reference in
/// f32, and in bf16 where large sizes are practical (the GPU; the emulator with
/// `CCPL_EMU_LARGE=1`): the odd sizes check every type and every backward.
fn paper_configuration<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(2022);
    let cases = [(128, 128), (256, 64), (512, 32)]
        .map(|(c, side)| layer((8, c, side, side), 8, Layout::Nchw, false));
    let name = "paper configuration";
    let f32_run = check_case::<f32, D>(dev, &cases, Draw::Sample, &TRAINING_STEP, &mut rng, name);
    if dev.large_sizes() {
        check_case::<half::bf16, D>(dev, &cases, Draw::Sample, &TRAINING_STEP, &mut rng, name);
    }
    let step: Vec<&String> = f32_run.kernels[0]
        .iter()
        .chain(&f32_run.kernels[1])
        .collect();
    println!(
        "launches per step at the paper configuration: {}",
        step.len()
    );
    assert_eq!(
        step,
        [
            "small_s_gather_f32",
            "small_s_rows_f32",
            "small_s_scatter_f32"
        ],
        "a training step: draw and gather, the rows' loss and gradient, the scatter"
    );
    assert!(step.len() <= 4);
    let plan = LossPlan::new(&cases.map(|c| (c.shape, c.num_s)), TAU).unwrap();
    let bytes = plan.workspace().unwrap().bytes::<f32>();
    println!("workspace at the paper configuration: {bytes} bytes");
    // Four float row matrices (B, S, C) per layer (rows and gradients of both sides), the
    // centres and their maps, the row statistics and both sides' norms.
    let (b, s, channels) = (8, 64, 128 + 256 + 512);
    let maps = 128 * 128 + 64 * 64 + 32 * 32;
    let expected = 4 * (4 * b * s * channels)
        + 4 * (4 * b * s * 3)
        + 4 * 3
        + 4 * (3 * 8 + maps)
        + 4 * small_s::COUNTERS
        + 4 * 2;
    assert_eq!(bytes, expected);
}

/// The same step twice, scheduled differently (the emulator draws a new schedule for every
/// launch): the same bits.
fn step_is_deterministic<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(5);
    let cases = [
        layer((2, 37, 13, 17), 20, Layout::Nchw, false),
        layer((3, 9, 7, 7), 25, Layout::Nhwc, false),
    ];
    let plan = LossPlan::new(&cases.map(|c| (c.shape, c.num_s)), TAU).unwrap();
    let feats: Vec<(Vec<f32>, Vec<f32>)> = cases.iter().map(|c| features(&mut rng, c)).collect();
    let centers = case_centers(&cases, Draw::Sample);
    let starts = starts::<f32>(&mut rng, &cases, &BACKWARDS);
    let label = format!("determinism on the {}", dev.name());
    let inputs = Inputs {
        feats: &feats,
        centers: &centers,
        draw: Draw::Sample,
        backwards: &BACKWARDS,
        starts: &starts,
    };
    let (a, b) = (
        run::<f32, D>(dev, &plan, &inputs, &label),
        run::<f32, D>(dev, &plan, &inputs, &label),
    );
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{label}: loss");
    let bits = |r: &Run| -> Vec<u64> {
        r.grads
            .iter()
            .flatten()
            .flat_map(|(q, k)| q.iter().chain(k))
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&a) == bits(&b),
        "{label}: gradients differ between runs"
    );
}

/// The rows loss of a learned head on the small-S path against the reference composed stage
/// by stage: odd sizes, S = 8, S past a 16-row tile, C past a 64-column tile, S = 512; every
/// type; the default upstream into q only, then 2.5 into both sides, written over NaN.
fn rows_match_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(19);
    for (b, s, c) in [
        (2, 104, 37),
        (1, 8, 3),
        (1, 72, 70),
        (3, 65, 5),
        (1, 512, 16),
    ] {
        let shape = RowShape::new(b, s, c).unwrap();
        for_each_dtype!(check_rows(dev, &shape, &mut rng, Magnitudes(3.0, 0.5)));
    }
}

/// Rows at the edges of float's range, f32 and bf16: of 1e20, whose raw products exceed it;
/// rows of q near `f32::MAX` whose norms exceed it, against rows of k of 1e-3 (their raw
/// products fit: q's rows divided by their norm are right only if that norm's reciprocal is
/// not rounded to 0). f16 near 65504 and at 1e-3, where float's products have room.
fn rows_at_extreme_magnitudes<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(29);
    let shape = RowShape::new(2, 24, 5).unwrap();
    for m in [Magnitudes(1e20, 1e20), Magnitudes(3e38, 1e-3)] {
        check_rows::<f32, D>(dev, &shape, &mut rng, m);
        check_rows::<half::bf16, D>(dev, &shape, &mut rng, m);
    }
    for m in [Magnitudes(6e4, 6e4), Magnitudes(1e-3, 1e-3)] {
        check_rows::<half::f16, D>(dev, &shape, &mut rng, m);
    }
}

/// The magnitudes of the rows of q and k in a rows case: values uniform in `[-m, m)`.
#[derive(Clone, Copy, Debug)]
struct Magnitudes(f64, f64);

fn check_rows<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    rng: &mut Rng,
    magnitudes: Magnitudes,
) {
    let label = format!(
        "{} B={} S={} C={} {magnitudes:?} on the {}",
        T::SUFFIX,
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    );
    let rows_q: Vec<T> = random(rng, shape.len(), magnitudes.0);
    let rows_k: Vec<T> = random(rng, shape.len(), magnitudes.1);
    let (q, k) = (to_f64(&rows_q), to_f64(&rows_k));
    // A row whose norm exceeds float's range has a gradient below |g| / f32::MAX, which the
    // kernels give as 0 (README, known limits): finite, not compared.
    let past_float = |rows: &[f64]| {
        let norms = reference::normalize_rows(rows, shape.width())
            .unwrap()
            .norms;
        norms.iter().any(|&n| n > f32::MAX as f64)
    };
    let plan = SmallRowsPlan::new(*shape, TAU).unwrap();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let (mut q_dev, mut k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let launcher = Counting::new(dev.launcher());
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(
        &launcher,
        dev.buf(&mut q_dev),
        dev.buf(&mut k_dev),
        &bufs,
        dev.buf(&mut counters),
    )
    .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    assert_eq!(launcher.take().len(), 1, "the forward is one launch");
    let loss = dev.download(&ws.loss)[0] as f64;
    let exact = rows_model::<f64>(&q, &k, shape, TAU, 1.0);
    assert_close(
        &format!("rows loss {label}"),
        &[loss],
        &[exact.loss],
        F32_TOLERANCE,
    );

    for (upstream, both) in BACKWARDS {
        let u = upstream.unwrap_or(1.0) as f64;
        let exact = rows_model::<f64>(&q, &k, shape, TAU, u);
        let mut grad_q = dev.alloc_nan::<T>(shape.len());
        let mut grad_k = dev.alloc_nan::<T>(shape.len());
        let mut upstream_dev = dev.upload(&[upstream.unwrap_or(f32::NAN)]);
        let upstream_buf = upstream.map(|_| dev.buf(&mut upstream_dev));
        let grad_k_buf = dev.buf(&mut grad_k);
        plan.backward::<T, _>(
            &launcher,
            &bufs,
            upstream_buf,
            dev.buf(&mut grad_q),
            both.then_some(grad_k_buf),
        )
        .unwrap_or_else(|e| panic!("backward {label}: {e}"));
        assert_eq!(
            launcher.take().len(),
            1 + both as usize,
            "the backward: a scale (+ the content side)"
        );
        let got = to_f64(&dev.download(&grad_q));
        let what = format!("rows grad_rows_q upstream={u} {label}");
        if past_float(&q) {
            assert!(got.iter().all(|g| g.is_finite()), "{what}: not finite");
        } else {
            assert_close(
                &what,
                &got,
                &exact.grad_rows_q,
                stored_tolerance::<T>(&exact.grad_rows_q),
            );
        }
        let got = to_f64(&dev.download(&grad_k));
        if both {
            let what = format!("rows grad_rows_k upstream={u} {label}");
            assert_close(
                &what,
                &got,
                &exact.grad_rows_k,
                stored_tolerance::<T>(&exact.grad_rows_k),
            );
        } else {
            assert!(
                got.iter().all(|g| g.is_nan()),
                "grad_rows_k written without being asked for: {label}"
            );
        }
    }
}

/// Row losses too small for float once divided by `B S`, though their mean is a normal
/// float: 2000 images of the 16 unit vectors of 16 channels, q = k, at tau = 1/89.5, so every
/// row's loss is `log1p(15 exp(-89.5 / (1 + eps)^2))`, about 2.1e-38, and its share of the
/// mean about 6.5e-43, a subnormal of 9 bits. Summed in double, the loss is as precise as the
/// row losses.
fn tiny_row_losses<D: TestDevice>(dev: &D) {
    let (b, s) = (2000, 16);
    let shape = RowShape::new(b, s, s).unwrap();
    let tau = Tau::new(1.0 / 89.5).unwrap();
    let rows: Vec<f32> = (0..shape.len())
        .map(|e| f32::from(e / s % s == e % s))
        .collect();
    let plan = SmallRowsPlan::new(shape, tau).unwrap();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let (mut q_dev, mut k_dev) = (dev.upload(&rows), dev.upload(&rows));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<f32, _>(
        &dev.launcher(),
        dev.buf(&mut q_dev),
        dev.buf(&mut k_dev),
        &bufs,
        dev.buf(&mut counters),
    )
    .unwrap();
    // Every row's logits: L_ii = |v|^2 / tau with v = e_i / (1 + eps), the others 0; so its
    // loss is ln(exp(L_ii) + 15) - L_ii. In closed form: the reference's lse - L_ii cancels to
    // 0 in float64 here.
    let eps = ccpl::ffi::CCPL_NORM_EPS;
    let exact = (15.0 * (-1.0 / ((1.0 + eps) * (1.0 + eps) * tau.get())).exp()).ln_1p();
    assert!(exact > f32::MIN_POSITIVE as f64 && exact < 1e-36);
    let loss = dev.download(&ws.loss)[0] as f64;
    let what = format!("loss of tiny row losses on the {}", dev.name());
    let tol = tolerance_at(&[exact], &[exact], tau);
    assert_close(&what, &[loss], &[exact], tol);
}

on_every_device!(
    loss_matches_reference,
    extreme_magnitudes,
    paper_configuration,
    step_is_deterministic,
    rows_match_reference,
    rows_at_extreme_magnitudes,
    tiny_row_losses
);
