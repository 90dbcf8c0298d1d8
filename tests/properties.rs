//! Property tests (proptest): random shapes, features whose magnitudes span many orders, and
//! temperatures. For every input:
//!
//! - what safe code can reach (shapes, centres, plans, the reference's checks) answers or
//!   returns an error, never panics;
//! - the float64 reference gives a finite loss within its bounds and finite gradients;
//! - the kernels on the emulator, for every storage type, agree with the reference within
//!   the rounding model's tolerance at the case's temperature (`tolerance_at` of
//!   tests/common/tolerance.rs), with no NaN, wherever the true result is representable in the
//!   storage type: one layer (`LayerPlan`) and the rows loss (`RowsPlan`) on the fused path,
//!   the whole loss of several layers (`LossPlan`: small-S layers, with a fused one in some
//!   cases) and the rows loss on the small-S path (`SmallRowsPlan`).
//!
//! Each property runs a fixed number of cases from a fixed seed, both printed (and in the
//! failure message, with the shrunk input); `PROPTEST_CASES` and `PROPTEST_RNG_SEED` replay or
//! widen a run. The emulator is slow, so its properties run on small shapes and few cases:
//! about 20 s for the whole file on a shared 2-core machine, most of it the whole loss with a
//! fused layer and the small-S rows.

use crate::common;

use std::ops::Range;

use ccpl::launch::CentersBuf;
use ccpl::launch::neighbor::{self, Scatter};
use ccpl::launch::small_s;
use ccpl::launch::{KernelParams, LaunchPlan, Launcher, info_nce, normalize};
use ccpl::loss::layer::{LayerPlan, LayerWorkspace};
use ccpl::loss::multi_layer::{Draw, LossPlan};
use ccpl::loss::rows::{RowsPlan, RowsWorkspace};
use ccpl::loss::small_s::SmallRowsPlan;
use ccpl::reference::LayerInput;
use ccpl::sampling::SplitMix64;
use ccpl::{Centers, Dtype, Element, FeatureShape, Layout, RowShape, Tau, reference};
use common::buf;
use common::device::{Emu, TestDevice};
use common::fixtures::{TestCenters, layer_workspace, loss_workspace, small_rows_workspace};
use common::models::{RowsModel, layer_model, rows_model, scatter_model};
use common::tolerance::{largest, rounded, to_f64, tolerance_at};
use common::{Rng, rel_err};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

mod fused_path;
mod safe_code;
mod small_s_path;

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

/// [`check`] of a property of the kernels on the emulator: a quarter of the `cases` (at least
/// 2) under its sanitizer, whose checks are of accesses, which the drawn shapes decide, at
/// about three times the cost of a case.
fn check_emulated<S: Strategy>(
    name: &str,
    cases: u32,
    seed: u64,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let sanitized = Emu::new(seed).sanitized();
    let cases = if sanitized { (cases / 4).max(2) } else { cases };
    check(name, cases, seed, strategy, property);
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
        spread_pair(self.seed, self.shape().len(), self.exponent, self.spread)
    }
}

/// Two sets of `len` values (see [`spread_values`]), drawn from `seed`.
fn spread_pair<T: Element>(seed: u64, len: usize, exponent: f64, spread: f64) -> (Vec<T>, Vec<T>) {
    let mut rng = Rng::new(seed);
    let first = spread_values(&mut rng, len, exponent, spread);
    (first, spread_values(&mut rng, len, exponent, spread))
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

impl RowsCase {
    fn shape(&self) -> RowShape {
        RowShape::new(self.batch, self.rows, self.width).unwrap()
    }
    /// Both sides' rows (see [`spread_values`]).
    fn row_pair<T: Element>(&self) -> (Vec<T>, Vec<T>) {
        spread_pair(self.seed, self.shape().len(), self.exponent, self.spread)
    }
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

/// An error as a failed case.
fn failed(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}
