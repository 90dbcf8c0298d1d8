//! Property tests (proptest): random shapes, features whose magnitudes span many orders, and
//! temperatures. For every input:
//!
//! - what safe code can reach (shapes, centres, plans, the reference's checks) answers or
//!   returns an error, never panics;
//! - the float64 reference gives a finite loss within its bounds and finite gradients;
//! - the kernels on the emulator, for every storage type, agree with the reference within
//!   the rounding model's tolerance at the case's temperature (`tolerance_at` of
//!   tests/common/device.rs), with no NaN, wherever the true result is representable in the
//!   storage type: one layer (`LayerPlan`) and the rows loss (`RowsPlan`) on the fused path,
//!   the whole loss of several layers (`LossPlan`: small-S layers, with a fused one in some
//!   cases) and the rows loss on the small-S path (`SmallRowsPlan`).
//!
//! Each property runs a fixed number of cases from a fixed seed, both printed (and in the
//! failure message, with the shrunk input); `PROPTEST_CASES` and `PROPTEST_RNG_SEED` replay or
//! widen a run. The emulator is slow, so its properties run on small shapes and few cases:
//! about 20 s for the whole file on a shared 2-core machine, most of it the whole loss with a
//! fused layer and the small-S rows.

mod common;

use std::ops::Range;

use ccpl::launch::CentersBuf;
use ccpl::launch::neighbor::{self, Scatter};
use ccpl::launch::small_s;
use ccpl::launch::{Buf, KernelParams, LaunchPlan, Launcher, info_nce, normalize};
use ccpl::loss::layer::{LayerPlan, LayerWorkspace};
use ccpl::loss::multi_layer::{Draw, LossPlan};
use ccpl::loss::rows::{RowsPlan, RowsWorkspace};
use ccpl::loss::small_s::SmallRowsPlan;
use ccpl::reference::LayerInput;
use ccpl::sampling::SplitMix64;
use ccpl::{Centers, Dtype, Element, FeatureShape, Layout, RowShape, Tau, reference};
use common::device::{
    Emu, RowsModel, TestCenters, TestDevice, largest, layer_model, loss_workspace, rounded,
    rows_model, scatter_model, small_rows_workspace, to_f64, tolerance_at,
};
use common::{Rng, rel_err};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Runs `property` on `cases` inputs drawn from `strategy` from `seed` (or `PROPTEST_CASES`
/// and `PROPTEST_RNG_SEED`), saying both, and panics with the shrunk failing input.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    seed: u64,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let env = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok());
    let cases = env("PROPTEST_CASES").map_or(cases, |c: u64| c as u32);
    let seed = env("PROPTEST_RNG_SEED").unwrap_or(seed);
    let replay = format!("PROPTEST_RNG_SEED={seed} PROPTEST_CASES={cases}");
    eprintln!("proptest {name}: {cases} cases from seed {seed} (replay: {replay})");
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 64,
        ..Config::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, property) {
        panic!("proptest {name} failed ({replay}): {e}");
    }
}

// ---- No panic from safe code ------------------------------------------------------------

/// Sizes a careless or hostile caller might pass: small ones, ones around the kernels' i32
/// limit, and any usize.
fn size() -> impl Strategy<Value = usize> {
    let limit = i32::MAX as usize;
    prop_oneof![0usize..12, (limit - 2)..(limit + 3), any::<usize>()]
}

/// Temperatures, good and bad: any float64 bits, and the edges of the rule.
fn any_tau() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(Tau::MIN.get()),
        Just(3e-39),
        Just(f64::MIN_POSITIVE / 2.0),
        1e-45f64..10.0,
    ]
}

/// Executes nothing: plans are only made.
struct Nothing;
impl Launcher for Nothing {
    type Error = ccpl::Error;
    fn launch<P: KernelParams>(&self, _: &LaunchPlan<P>) -> ccpl::Result<()> {
        Ok(())
    }
}

fn buf(len: usize) -> Buf {
    Buf { addr: 0x1000, len }
}

#[test]
fn safe_code_never_panics() {
    let dims = (size(), size(), size(), size(), size(), size());
    let lens = [size(), size(), size(), size()];
    let strategy = (dims, any_tau(), any::<bool>(), any::<u64>(), lens);
    check("safe_code_never_panics", 512, 1, strategy, |input| {
        let ((b, c, h, w, n, s), tau, nhwc, seed, lens) = input;
        let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
        // A bad tau is refused by Tau::new; the plans are probed at a good one.
        let tau = Tau::new(tau).unwrap_or_default();
        let _ = SplitMix64::new(seed).below(n as u64);
        if let Ok(shape) = FeatureShape::new(b, c, h, w, layout) {
            let _ = shape.index(lens[0], lens[1], lens[2], lens[3]);
            let _ = (shape.len(), shape.interior(), neighbor::rows_len(&shape, n));
            let _ = LayerWorkspace::lengths(&shape, n);
            let centers = CentersBuf {
                height: h,
                width: w,
                flat: buf(n),
                map: buf(lens[0]),
            };
            let _ = neighbor::neighbor_diff_normalize::<f32>(
                &shape,
                &centers,
                buf(lens[1]),
                buf(lens[2]),
                buf(lens[3]),
            );
            if let Ok(plan) = LayerPlan::new(shape, n, tau) {
                let ws = LayerWorkspace::lengths(&shape, n)
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let (feat, grad) = (buf(lens[1]), buf(lens[2]));
                let _ = plan.forward::<half::f16, _>(&Nothing, &centers, feat, feat, &ws);
                let scatter = Scatter::Deterministic;
                let _ = plan.backward::<f32, _>(&Nothing, &centers, &ws, None, grad, None, scatter);
            }
        }
        if let Ok(rows) = RowShape::new(b, s, c) {
            let _ = (rows.len(), rows.count(), rows.logits_len());
            let _ = normalize::normalize_rows::<f32>(&rows, buf(lens[0]), buf(lens[1]), buf(n));
            let _ = info_nce::info_nce_forward(&rows, buf(lens[2]), buf(lens[3]), buf(n));
            if let Ok(plan) = RowsPlan::new(rows, tau) {
                let ws = RowsWorkspace::lengths(&rows)
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let _ = plan.forward::<half::bf16, _>(&Nothing, buf(lens[0]), buf(lens[1]), &ws);
                let _ = plan.backward::<f32, _>(&Nothing, &ws, None, buf(lens[2]), None);
            }
        }
        let _ = info_nce::info_nce_loss(buf(lens[0]), buf(lens[1]), nhwc);
        // Centres: drawn (O(N) on any map) and checked, on small counts.
        let _ = Centers::sample(h, w, n % 64, seed);
        let flat: Vec<i64> = lens.iter().map(|&l| l as i64 % 4096 - 8).collect();
        let _ = Centers::from_flat(h % 4096, w % 4096, &flat);
        // The reference's checks, on buffers of the wrong (small) lengths.
        let v = vec![0.5; lens[0] % 64];
        let _ = reference::normalize_rows(&v, c % 8);
        let _ = reference::normalize_rows_backward(&v, &v, c % 8);
        let _ = reference::info_nce_forward(&v, b % 4, s % 8);
        if let Ok(rows) = RowShape::new(b % 4, s % 8, c % 8) {
            let _ = reference::similarity(&v, &v, &rows, tau);
        }
        Ok(())
    });
}

// ---- The reference --------------------------------------------------------------------

/// A layer's inputs: shape, centres, the features' magnitude and spread, the temperature.
#[derive(Debug, Clone)]
struct LayerCase {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    num_s: usize,
    layout: Layout,
    /// The largest magnitude and how many orders below it values spread ([`spread_values`]).
    exponent: f64,
    spread: f64,
    tau: Tau,
    seed: u64,
}

impl LayerCase {
    fn shape(&self) -> FeatureShape {
        FeatureShape::new(
            self.batch,
            self.channels,
            self.height,
            self.width,
            self.layout,
        )
        .unwrap()
    }
    fn centers(&self) -> Centers {
        Centers::sample(self.height, self.width, self.num_s, self.seed).unwrap()
    }
    /// Two feature maps (see [`spread_values`]).
    fn features<T: Element>(&self) -> (Vec<T>, Vec<T>) {
        let mut rng = Rng::new(self.seed);
        let len = self.shape().len();
        let (e, spread) = (self.exponent, self.spread);
        let feat_q = spread_values(&mut rng, len, e, spread);
        (feat_q, spread_values(&mut rng, len, e, spread))
    }
}

/// `len` values of magnitudes spread over `spread` orders below `10^exponent`
/// (`10^(exponent - spread u)`, u uniform in [0, 1)), random signs, rounded to `T`.
fn spread_values<T: Element>(rng: &mut Rng, len: usize, exponent: f64, spread: f64) -> Vec<T> {
    (0..len)
        .map(|_| {
            let magnitude = 10f64.powf(exponent - spread * rng.unit());
            T::from_f64(if rng.unit() < 0.5 {
                -magnitude
            } else {
                magnitude
            })
        })
        .collect()
}

/// Layers of `channels` channels, maps of 3 to `side`, features up to 10^`exponents`,
/// temperatures 10^`log_taus`.
fn layer_cases(
    channels: Range<usize>,
    side: usize,
    exponents: Range<f64>,
    log_taus: Range<f64>,
) -> impl Strategy<Value = LayerCase> {
    layer_cases_in(1..3, channels, 3..side + 1, 1..6, exponents, log_taus)
}

/// Layers of `batch` images of `channels` channels, maps of `sides` squared, `num_s` centres
/// asked for, features up to 10^`exponents`, temperatures 10^`log_taus`.
fn layer_cases_in(
    batch: Range<usize>,
    channels: Range<usize>,
    sides: Range<usize>,
    num_s: Range<usize>,
    exponents: Range<f64>,
    log_taus: Range<f64>,
) -> impl Strategy<Value = LayerCase> {
    let dims = (batch, channels, sides.clone(), sides, num_s, any::<bool>());
    let values = (exponents, 0.0f64..3.0, log_taus, any::<u64>());
    (dims, values).prop_map(
        |((b, c, h, w, num_s, nhwc), (e, spread, t, seed))| LayerCase {
            batch: b,
            channels: c,
            height: h,
            width: w,
            num_s,
            layout: if nhwc { Layout::Nhwc } else { Layout::Nchw },
            exponent: e,
            spread,
            tau: Tau::new(10f64.powf(t)).unwrap(),
            seed,
        },
    )
}

/// The float64 reference, from features of 1e-300 to 1e300 and temperatures from the rule's
/// smallest (2/f32::MAX, `Tau::MIN`) to 100: a finite loss in `[0, ln S + 2/tau]`, finite gradients.
#[test]
fn reference_is_finite_and_bounded_at_any_magnitude() {
    let cases = layer_cases(1..9, 9, -300.0..300.0, -38.23..2.0);
    check("reference_is_finite_and_bounded", 256, 2, cases, |case| {
        let (shape, centers) = (case.shape(), case.centers());
        let (feat_q, feat_k) = case.features::<f64>();
        let layer = reference::ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, case.tau, true)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bound = (centers.rows() as f64).ln() + 2.0 / case.tau.get();
        prop_assert!(
            (0.0..=bound * (1.0 + 1e-12)).contains(&layer.loss),
            "loss {} outside [0, {bound}]",
            layer.loss
        );
        let grads = layer
            .grad_feat_q
            .iter()
            .chain(layer.grad_feat_k.iter().flatten());
        prop_assert!(
            grads.clone().all(|g| g.is_finite()),
            "a gradient is not finite"
        );
        Ok(())
    });
}

// ---- The kernels on the emulator against the reference ----------------------------------

/// Whether values of these magnitudes, rounded to `T`, stay within half its range (the
/// kernels' float arithmetic may round a value at the edge past it).
fn representable<T: Dtype>(values: &[f64]) -> bool {
    values
        .iter()
        .all(|v| v.is_finite() && v.abs() <= largest::<T>() / 2.0)
}

/// Asserts `got` within `tol` of `want`, no NaN (every value finite).
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
    prop_assert!(got.iter().all(|g| g.is_finite()), "{what}: not finite");
    let err = rel_err(got, want);
    prop_assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.3e}");
    Ok(())
}

/// One layer on the emulator against the reference: the loss, and the gradients of both
/// feature maps (deterministic scatter into zeros) wherever the reference's gradients, and the
/// gradients of the difference rows the kernels store on the way, fit in `T`.
fn layer_agrees<T: Dtype>(case: &LayerCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let (shape, centers) = (case.shape(), case.centers());
    let (feat_q, feat_k) = case.features::<T>();
    let (feat_q_f64, feat_k_f64) = (to_f64(&feat_q), to_f64(&feat_k));
    let exact = reference::ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, case.tau, true)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let model = layer_model::<T>(&feat_q_f64, &feat_k_f64, &shape, &centers, case.tau, 1.0);

    let plan = LayerPlan::new(shape, centers.len(), case.tau).unwrap();
    let mut ws = LayerWorkspace::lengths(&shape, centers.len())
        .unwrap()
        .try_map(
            |&n| Ok::<_, ()>(dev.alloc_nan::<T>(n)),
            |&n| Ok(dev.alloc_nan::<f32>(n)),
        )
        .unwrap();
    ws.rows.one = dev.upload(&[1.0f32]);
    let mut centers_dev = TestCenters::upload(&dev, &centers);
    let centers_buf = centers_dev.buf(&dev);
    let (mut feat_q_dev, mut feat_k_dev) = (dev.upload(&feat_q), dev.upload(&feat_k));
    let (feat_q_buf, feat_k_buf) = (dev.buf(&mut feat_q_dev), dev.buf(&mut feat_k_dev));
    let mut grad_q_dev = dev.upload(&vec![T::from_f64(0.0); shape.len()]);
    let mut grad_k_dev = dev.upload(&vec![T::from_f64(0.0); shape.len()]);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &centers_buf, feat_q_buf, feat_k_buf, &bufs)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    let scatter = Scatter::Deterministic;
    plan.backward::<T, _>(
        &dev.launcher(),
        &centers_buf,
        &bufs,
        None,
        grad_q_buf,
        Some(grad_k_buf),
        scatter,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let loss = dev.download(&ws.rows.loss)[0] as f64;
    let tol = tolerance_at(&[model.loss], &[exact.loss], case.tau);
    close(&format!("loss {}", T::SUFFIX), &[loss], &[exact.loss], tol)?;
    let zeros = vec![0.0; shape.len()];
    let sides = [
        ("q", &grad_q_dev, &exact.grad_feat_q, &model.grad_rows_q),
        (
            "k",
            &grad_k_dev,
            exact.grad_feat_k.as_ref().unwrap(),
            &model.grad_rows_k,
        ),
    ];
    for (side, got, want, grad_rows) in sides {
        if !(representable::<T>(want) && representable::<T>(grad_rows)) {
            continue; // the true gradient is beyond T's range: inf, as any overflow
        }
        let stored = scatter_model::<T>(&zeros, grad_rows, &shape, &centers, scatter);
        let what = format!("grad_feat_{side} {}", T::SUFFIX);
        close(
            &what,
            &to_f64(&dev.download(got)),
            want,
            tolerance_at(&stored, want, case.tau),
        )?;
    }
    Ok(())
}

/// Layers of 2 to 6 channels (rows of width 1 have an ill-conditioned gradient, see
/// tests/kernel_layer.rs) on maps up to 7x7, temperatures from 0.001 to 1 (f16 from 0.01:
/// gradients of 1/tau past its range otherwise), features over every magnitude the type
/// holds: f32 and bf16 from 1e-30 to 1e37, f16 from 1 to 5e4 (differences past 65504).
#[test]
fn layer_on_the_emulator_agrees_with_the_reference() {
    let wide = || layer_cases(2..7, 7, -30.0..37.0, -3.0..0.0);
    check("layer f32", 16, 3, wide(), |case| {
        layer_agrees::<f32>(&case)
    });
    check("layer bf16", 16, 4, wide(), |case| {
        layer_agrees::<half::bf16>(&case)
    });
    let f16 = layer_cases(2..7, 7, 0.0..4.7, -2.0..0.0);
    check("layer f16", 16, 5, f16, |case| {
        layer_agrees::<half::f16>(&case)
    });
}

/// Row matrices of a projection head's outputs: shape, magnitude, temperature.
#[derive(Debug, Clone)]
struct RowsCase {
    batch: usize,
    rows: usize,
    width: usize,
    exponent: f64,
    spread: f64,
    tau: Tau,
    seed: u64,
}

fn rows_cases(exponents: Range<f64>, log_taus: Range<f64>) -> impl Strategy<Value = RowsCase> {
    rows_cases_in(8usize..80, 2..40, exponents, log_taus)
}

/// Row matrices of 1 or 2 images of `rows` rows of `widths` columns, values up to
/// 10^`exponents`, temperatures 10^`log_taus`.
fn rows_cases_in(
    rows: impl Strategy<Value = usize>,
    widths: Range<usize>,
    exponents: Range<f64>,
    log_taus: Range<f64>,
) -> impl Strategy<Value = RowsCase> {
    let dims = (1usize..3, rows, widths);
    let values = (exponents, 0.0f64..3.0, log_taus, any::<u64>());
    (dims, values).prop_map(|((batch, rows, width), (e, spread, t, seed))| RowsCase {
        batch,
        rows,
        width,
        exponent: e,
        spread,
        tau: Tau::new(10f64.powf(t)).unwrap(),
        seed,
    })
}

/// The rows loss on the emulator against the reference (composed stage by stage), from rows
/// whose magnitudes span `spread` orders below 10^exponent.
fn rows_agree<T: Dtype>(case: &RowsCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let shape = RowShape::new(case.batch, case.rows, case.width).unwrap();
    let mut rng = Rng::new(case.seed);
    let (e, spread) = (case.exponent, case.spread);
    let rows_q: Vec<T> = spread_values(&mut rng, shape.len(), e, spread);
    let rows_k: Vec<T> = spread_values(&mut rng, shape.len(), e, spread);
    let (rows_q_f64, rows_k_f64) = (to_f64(&rows_q), to_f64(&rows_k));
    let exact = rows_model::<f64>(&rows_q_f64, &rows_k_f64, &shape, case.tau, 1.0);
    let model = rows_model::<T>(&rows_q_f64, &rows_k_f64, &shape, case.tau, 1.0);

    let plan = RowsPlan::new(shape, case.tau).unwrap();
    let mut ws = RowsWorkspace::lengths(&shape)
        .unwrap()
        .try_map(
            |&n| Ok::<_, ()>(dev.alloc_nan::<T>(n)),
            |&n| Ok(dev.alloc_nan::<f32>(n)),
        )
        .unwrap();
    ws.one = dev.upload(&[1.0f32]);
    let (mut rows_q_dev, mut rows_k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let (mut grad_q_dev, mut grad_k_dev) = (
        dev.alloc_nan::<T>(shape.len()),
        dev.alloc_nan::<T>(shape.len()),
    );
    let (rows_q_buf, rows_k_buf) = (dev.buf(&mut rows_q_dev), dev.buf(&mut rows_k_dev));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), rows_q_buf, rows_k_buf, &bufs)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    plan.backward::<T, _>(&dev.launcher(), &bufs, None, grad_q_buf, Some(grad_k_buf))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let got = RowsModel {
        loss: dev.download(&ws.loss)[0] as f64,
        grad_rows_q: to_f64(&dev.download(&grad_q_dev)),
        grad_rows_k: to_f64(&dev.download(&grad_k_dev)),
    };
    rows_outcome_agrees::<T>("rows", &got, &exact, &model, case.tau)
}

/// A rows loss's outcome (`got`) against the exact one: the loss, and each side's gradient
/// where the storage type holds it, each within the tolerance of its model (`model`: what
/// the computation's roundings give at best).
fn rows_outcome_agrees<T: Dtype>(
    what: &str,
    got: &RowsModel,
    exact: &RowsModel,
    model: &RowsModel,
    tau: Tau,
) -> Result<(), TestCaseError> {
    let tol = tolerance_at(&[model.loss], &[exact.loss], tau);
    close(
        &format!("{what} loss {}", T::SUFFIX),
        &[got.loss],
        &[exact.loss],
        tol,
    )?;
    let sides = [
        (
            "q",
            &got.grad_rows_q,
            &exact.grad_rows_q,
            &model.grad_rows_q,
        ),
        (
            "k",
            &got.grad_rows_k,
            &exact.grad_rows_k,
            &model.grad_rows_k,
        ),
    ];
    for (side, got, want, stored) in sides {
        if !representable::<T>(want) {
            continue;
        }
        let label = format!("{what} grad_rows_{side} {}", T::SUFFIX);
        close(&label, got, want, tolerance_at(stored, want, tau))?;
    }
    Ok(())
}

/// The rows loss (a learned head's outputs) for every storage type, same ranges as the layer.
#[test]
fn rows_on_the_emulator_agree_with_the_reference() {
    let wide = || rows_cases(-30.0..37.0, -3.0..0.0);
    check("rows f32", 16, 6, wide(), |case| rows_agree::<f32>(&case));
    check("rows bf16", 16, 7, wide(), |case| {
        rows_agree::<half::bf16>(&case)
    });
    let f16 = rows_cases(-2.0..4.7, -2.0..0.0);
    check("rows f16", 16, 8, f16, |case| {
        rows_agree::<half::f16>(&case)
    });
}

// ---- The whole loss (small-S and fused layers) and the small-S rows loss ---------------

/// An error as a failed case.
fn failed(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The loss of several layers at one temperature: small-S layers (`S = 8N` up to 160 here),
/// and in some cases a layer past `S = 512` on the fused path, each of its own magnitude.
#[derive(Debug, Clone)]
struct LossCase {
    /// Every layer's `tau` is the loss's.
    layers: Vec<LayerCase>,
}

impl LossCase {
    fn tau(&self) -> Tau {
        self.layers[0].tau
    }
}

/// One to three small-S layers (maps up to 9x9, up to 20 centres, 2 to 6 channels), with
/// `fused` a layer of 65 to 68 centres of 2 channels (S 520 to 544, the fused path) at a random place among
/// them; features up to 10^`exponents` (each layer its own), temperatures 10^`log_taus`.
fn loss_cases(
    exponents: Range<f64>,
    log_taus: Range<f64>,
    fused: bool,
) -> impl Strategy<Value = LossCase> {
    let small = layer_cases_in(1..3, 2..7, 3..10, 1..21, exponents.clone(), 0.0..1.0);
    let large = layer_cases_in(1..2, 2..3, 11..12, 65..69, exponents, 0.0..1.0);
    let layers = (
        prop::collection::vec(small, 1..4),
        large,
        any::<prop::sample::Index>(),
    );
    (layers, log_taus).prop_map(move |((mut layers, large, at), t)| {
        if fused {
            layers.insert(at.index(layers.len() + 1), large);
        }
        for l in &mut layers {
            l.tau = Tau::new(10f64.powf(t)).unwrap();
        }
        LossCase { layers }
    })
}

/// The whole loss on the emulator (`LossPlan`, the centres given) against the reference
/// `ccp_loss`: the loss, and the gradients of both sides of every layer (the default upstream
/// into zeros: compared directly), wherever the exact gradient and that of the difference
/// rows fit in `T`. The small-S layers compute in float from the inputs in `T`: their model
/// is the exact result rounded once; a fused layer's is `layer_model`'s.
fn loss_agrees<T: Dtype>(case: &LossCase) -> Result<(), TestCaseError> {
    let tau = case.tau();
    let dev = Emu::new(case.layers[0].seed);
    let shapes: Vec<_> = case.layers.iter().map(|l| (l.shape(), l.num_s)).collect();
    let plan = LossPlan::new(&shapes, tau).map_err(failed)?;
    let centers: Vec<Centers> = case.layers.iter().map(|l| l.centers()).collect();
    let feats: Vec<(Vec<T>, Vec<T>)> = case.layers.iter().map(|l| l.features()).collect();

    let mut ws = loss_workspace::<T, Emu>(&dev, &plan, 0);
    for (own, c) in ws.centers.iter_mut().zip(&centers) {
        own.flat = dev.upload(c.flat());
        own.map = dev.upload(&c.center_map());
    }
    let mut feats_dev: Vec<_> = feats
        .iter()
        .map(|(q, k)| (dev.upload(q), dev.upload(k)))
        .collect();
    let mut grads_dev: Vec<_> = shapes
        .iter()
        .map(|(s, _)| {
            let zeros = vec![T::from_f64(0.0); s.len()];
            (dev.upload(&zeros), dev.upload(&zeros))
        })
        .collect();
    let feat_bufs: Vec<_> = feats_dev
        .iter_mut()
        .map(|(q, k)| (dev.buf(q), dev.buf(k)))
        .collect();
    let grad_q: Vec<_> = grads_dev.iter_mut().map(|(q, _)| dev.buf(q)).collect();
    let grad_k: Vec<_> = grads_dev.iter_mut().map(|(_, k)| dev.buf(k)).collect();
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &feat_bufs, &bufs, Draw::Given)
        .map_err(failed)?;
    plan.backward::<T, _>(&dev.launcher(), &bufs, None, &grad_q, Some(&grad_k))
        .map_err(failed)?;

    let inputs: Vec<LayerInput<'_, T>> = case
        .layers
        .iter()
        .zip(&feats)
        .zip(&centers)
        .map(|((l, (q, k)), c)| LayerInput {
            feat_q: q,
            feat_k: k,
            shape: l.shape(),
            centers: c.clone(),
        })
        .collect();
    let (exact_loss, exact) = reference::ccp_loss(&inputs, tau, true).map_err(failed)?;
    let models: Vec<RowsModel> = (0..shapes.len())
        .map(|l| {
            let (q, k) = (to_f64(&feats[l].0), to_f64(&feats[l].1));
            let shape = &shapes[l].0;
            if plan.is_small(l) {
                layer_model::<f64>(&q, &k, shape, &centers[l], tau, 1.0)
            } else {
                layer_model::<T>(&q, &k, shape, &centers[l], tau, 1.0)
            }
        })
        .collect();
    let model_loss: f64 = models.iter().map(|m| m.loss).sum();
    let loss = dev.download(&ws.loss)[0] as f64;
    let tol = tolerance_at(&[model_loss], &[exact_loss], tau);
    close(&format!("loss {}", T::SUFFIX), &[loss], &[exact_loss], tol)?;
    for (l, ((shape, _), model)) in shapes.iter().zip(&models).enumerate() {
        let zeros = vec![0.0; shape.len()];
        let sides = [
            (
                "q",
                &grads_dev[l].0,
                &exact[l].grad_feat_q,
                &model.grad_rows_q,
            ),
            (
                "k",
                &grads_dev[l].1,
                exact[l].grad_feat_k.as_ref().unwrap(),
                &model.grad_rows_k,
            ),
        ];
        for (side, got, want, grad_rows) in sides {
            if !(representable::<T>(want) && representable::<T>(grad_rows)) {
                continue; // the true gradient is beyond T's range: inf, as any overflow
            }
            let stored = if plan.is_small(l) {
                rounded::<T>(want)
            } else {
                let scatter = Scatter::Deterministic;
                scatter_model::<T>(&zeros, grad_rows, shape, &centers[l], scatter)
            };
            let what = format!("layer {l} grad_feat_{side} {}", T::SUFFIX);
            let got = to_f64(&dev.download(got));
            close(&what, &got, want, tolerance_at(&stored, want, tau))?;
        }
    }
    Ok(())
}

/// The whole loss for every storage type: f32 and bf16 from features of 1e-30 to 1e37, f16
/// from 1 to 5e4 (differences past 65504), temperatures from 0.001 to 1 (f16 from 0.01); small-S
/// layers, then a few cases with a fused layer among them (about 0.7 s each on the emulator in
/// f32, 1.6 s in the 16-bit types, against 0.1 s for a case of small-S layers).
#[test]
fn loss_on_the_emulator_agrees_with_the_reference() {
    let wide = |fused| loss_cases(-30.0..37.0, -3.0..0.0, fused);
    let f16 = |fused| loss_cases(0.0..4.7, -2.0..0.0, fused);
    check("loss f32", 16, 9, wide(false), |case| {
        loss_agrees::<f32>(&case)
    });
    check("loss bf16", 16, 10, wide(false), |case| {
        loss_agrees::<half::bf16>(&case)
    });
    check("loss f16", 16, 11, f16(false), |case| {
        loss_agrees::<half::f16>(&case)
    });
    check("loss f32, a fused layer", 2, 17, wide(true), |case| {
        loss_agrees::<f32>(&case)
    });
    check("loss bf16, a fused layer", 1, 18, wide(true), |case| {
        loss_agrees::<half::bf16>(&case)
    });
    check("loss f16, a fused layer", 1, 19, f16(true), |case| {
        loss_agrees::<half::f16>(&case)
    });
}

/// The rows loss on the small-S path (`SmallRowsPlan`, what `CcpRows` runs up to S = 512) on
/// the emulator against the reference: the loss, and both sides' gradients (upstream 1 or
/// 2.5 from device memory, written over NaN), compared directly; the model of a gradient is
/// the exact one rounded once (the path computes in float from the rows in `T`).
fn small_rows_agree<T: Dtype>(case: &RowsCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let shape = RowShape::new(case.batch, case.rows, case.width).unwrap();
    let mut rng = Rng::new(case.seed);
    let (e, spread) = (case.exponent, case.spread);
    let rows_q: Vec<T> = spread_values(&mut rng, shape.len(), e, spread);
    let rows_k: Vec<T> = spread_values(&mut rng, shape.len(), e, spread);
    let upstream = if case.seed.is_multiple_of(2) {
        1.0
    } else {
        2.5
    };
    let exact = rows_model::<f64>(
        &to_f64(&rows_q),
        &to_f64(&rows_k),
        &shape,
        case.tau,
        upstream,
    );

    let plan = SmallRowsPlan::new(shape, case.tau).map_err(failed)?;
    let (mut ws, mut counters) = small_rows_workspace(&dev, &plan);
    let mut upstream_dev = dev.upload(&[upstream as f32]);
    let (mut rows_q_dev, mut rows_k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let (mut grad_q_dev, mut grad_k_dev) = (
        dev.alloc_nan::<T>(shape.len()),
        dev.alloc_nan::<T>(shape.len()),
    );
    let (rows_q_buf, rows_k_buf) = (dev.buf(&mut rows_q_dev), dev.buf(&mut rows_k_dev));
    let counters_buf = dev.buf(&mut counters);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), rows_q_buf, rows_k_buf, &bufs, counters_buf)
        .map_err(failed)?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    let upstream_buf = (upstream != 1.0).then(|| dev.buf(&mut upstream_dev));
    plan.backward::<T, _>(
        &dev.launcher(),
        &bufs,
        upstream_buf,
        grad_q_buf,
        Some(grad_k_buf),
    )
    .map_err(failed)?;

    let got = RowsModel {
        loss: dev.download(&ws.loss)[0] as f64,
        grad_rows_q: to_f64(&dev.download(&grad_q_dev)),
        grad_rows_k: to_f64(&dev.download(&grad_k_dev)),
    };
    // The path computes in float: the loss as exact as float holds it, each gradient the
    // exact one rounded once to T.
    let model = RowsModel {
        loss: exact.loss,
        grad_rows_q: rounded::<T>(&exact.grad_rows_q),
        grad_rows_k: rounded::<T>(&exact.grad_rows_k),
    };
    rows_outcome_agrees::<T>("small rows", &got, &exact, &model, case.tau)
}

/// The small-S rows loss for every storage type: shapes of 1 to 100 rows an image (several
/// 16-row tiles, more than one 64-column tile of the other side) and 2 to 70 columns (more than
/// one 64-column tile); the value and temperature ranges of the fused rows loss. (S = 512, the
/// largest, is tests/kernel_small_s.rs's: 3.5 s a case here.)
#[test]
fn small_rows_on_the_emulator_agree_with_the_reference() {
    let wide = || rows_cases_in(1usize..101, 2..71, -30.0..37.0, -3.0..0.0);
    check("small rows f32", 24, 12, wide(), |case| {
        small_rows_agree::<f32>(&case)
    });
    check("small rows bf16", 24, 13, wide(), |case| {
        small_rows_agree::<half::bf16>(&case)
    });
    let f16 = rows_cases_in(1usize..101, 2..71, -2.0..4.7, -2.0..0.0);
    check("small rows f16", 24, 14, f16, |case| {
        small_rows_agree::<half::f16>(&case)
    });
}

/// The small-S plans from sizes, lengths and temperatures a careless or hostile caller might
/// pass: an answer or an error, never a panic.
#[test]
fn small_s_plans_never_panic() {
    let dims = (size(), size(), size(), size(), size(), size());
    let lens = [size(), size(), size(), size()];
    let strategy = (dims, any_tau(), any::<bool>(), 1usize..10, lens);
    check("small_s_plans_never_panic", 512, 15, strategy, |input| {
        let ((b, c, h, w, n, s), tau, nhwc, layers, lens) = input;
        let tau = Tau::new(tau).unwrap_or_default();
        let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
        if let Ok(shape) = FeatureShape::new(b, c, h, w, layout)
            && let Ok(plan) = LossPlan::new(&vec![(shape, n); layers], tau)
        {
            let lengths = plan.workspace().unwrap();
            let _ = lengths.bytes::<half::f16>();
            let ws = lengths
                .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)), |&l| Ok(buf(l)))
                .unwrap();
            let feats = vec![(buf(lens[0]), buf(lens[1])); layers];
            let grads = vec![buf(lens[2]); layers];
            let _ = plan.forward::<f32, _>(&Nothing, &feats, &ws, Draw::Sample);
            let _ = plan.backward::<half::bf16, _>(&Nothing, &ws, None, &grads, None);
        }
        if let Ok(rows) = RowShape::new(b, s, c) {
            let _ = small_s::rows_blocks(&rows);
            if let Ok(plan) = SmallRowsPlan::new(rows, tau) {
                let ws = plan
                    .workspace()
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let (q, k) = (buf(lens[0]), buf(lens[1]));
                let _ = plan.forward::<half::f16, _>(&Nothing, q, k, &ws, buf(lens[2]));
                let _ = plan.backward::<f32, _>(&Nothing, &ws, None, buf(lens[3]), Some(q));
            }
        }
        let _ = small_s::scale::<f32>(n, buf(lens[0]), (buf(lens[1]), buf(lens[2])), None);
        Ok(())
    });
}
