//! `kernels/info_nce.cu` against the CPU reference, on the emulator and the GPU: the row
//! logsumexp and losses (no overflow at tau = 0.01, precise when the diagonal dominates),
//! their mean (written or accumulated), and the backward into q (and k), for every storage
//! type, with the upstream gradient read from device memory.

use crate::common;

use ccpl::launch::info_nce::{self, Side};
use ccpl::{Dtype, RowShape, Tau, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{self, Regime, Rows, label, row_shapes, unit_rows};
use common::tolerance::{F32_TOLERANCE, from_f64, stored_tolerance, to_f64};

/// `(B, S, C)`: odd sizes, S = 8 with C = 1, S past a tile; on the GPU S = 8192.
fn shapes<D: TestDevice>(dev: &D) -> Vec<RowShape> {
    row_shapes(
        dev,
        &[(2, 104, 37), (1, 8, 1), (1, 72, 70)],
        &[(1, 8192, 3), (2, 1000, 129)],
    )
}

/// The temperatures and row relations each shape is checked with: tau = 0.01 gives logits
/// near +-100 (overflow without the max shift). Rows of width 1 normalise to +-1, so k close
/// to q means k = q, ties in every row and a gradient that is 0 up to e^-200: a case that
/// tells nothing about precision, left out.
fn regimes<D: TestDevice>(dev: &D, shape: &RowShape) -> Vec<(Tau, Rows)> {
    fixtures::regimes(dev, shape, &[Tau::DEFAULT, Tau::new(0.01).unwrap()])
}

/// The logits as the similarity kernel stores them (float32), and as f64.
fn logits(q: &[f64], k: &[f64], shape: &RowShape, tau: Tau) -> (Vec<f32>, Vec<f64>) {
    let exact = reference::similarity(q, k, shape, tau).unwrap();
    let stored: Vec<f32> = from_f64(&exact);
    let as_f64 = to_f64(&stored);
    (stored, as_f64)
}

fn check_forward<D: TestDevice>(dev: &D, shape: &RowShape, tau: Tau, rows: Rows, rng: &mut Rng) {
    let (q, k) = unit_rows::<f32>(rng, shape, rows);
    let (logits_f32, logits_f64) = logits(&q, &k, shape, tau);
    let want = reference::info_nce_forward(&logits_f64, shape.batch(), shape.rows()).unwrap();
    let count = shape.batch() * shape.rows();
    let mut logits_dev = dev.upload(&logits_f32);
    let mut lse_dev = dev.alloc_nan::<f32>(count);
    let mut row_loss_dev = dev.alloc_nan::<f32>(count);
    let plan = info_nce::info_nce_forward(
        shape,
        dev.buf(&mut logits_dev),
        dev.buf(&mut lse_dev),
        dev.buf(&mut row_loss_dev),
    )
    .unwrap();
    dev.run(&plan);
    let what = label(dev, shape, tau, rows);
    let lse = to_f64(&dev.download(&lse_dev));
    assert_close(
        &format!("info_nce_forward lse {what}"),
        &lse,
        &want.row_lse,
        F32_TOLERANCE,
    );
    let row_loss = to_f64(&dev.download(&row_loss_dev));
    let loss_what = format!("info_nce_forward row_loss {what}");
    assert_close(&loss_what, &row_loss, &want.row_loss, F32_TOLERANCE);

    // The mean, written over NaN, then added to a value already there.
    let mut loss_dev = dev.alloc_nan::<f32>(1);
    for (accumulate, start) in [(false, 0.0), (true, want.loss)] {
        let plan = info_nce::info_nce_loss(
            dev.buf(&mut row_loss_dev),
            dev.buf(&mut loss_dev),
            accumulate,
        )
        .unwrap();
        dev.run(&plan);
        let loss = dev.download(&loss_dev)[0] as f64;
        let what = format!("info_nce_loss accumulate={accumulate} {what}");
        assert_close(&what, &[loss], &[start + want.loss], F32_TOLERANCE);
    }
}

fn info_nce_forward_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(6);
    for shape in shapes(dev) {
        for (tau, rows) in regimes(dev, &shape) {
            check_forward(dev, &shape, tau, rows, &mut rng);
        }
    }
}

/// The upstream gradient the backward scales by, as a graph above the loss would give it.
const UPSTREAM: f32 = 0.75;

fn check_backward<T: Dtype, D: TestDevice>(dev: &D, case: Regime, rng: &mut Rng) {
    let Regime { shape, tau, rows } = case;
    let (q, k) = case.unit_rows::<T>(rng);
    let (logits_f32, logits_f64) = logits(&q, &k, shape, tau);
    let forward = reference::info_nce_forward(&logits_f64, shape.batch(), shape.rows()).unwrap();
    let want = reference::info_nce_backward(
        &logits_f64,
        &forward.row_lse,
        &q,
        &k,
        shape,
        tau,
        UPSTREAM as f64,
        true,
    )
    .unwrap();
    let mut logits_dev = dev.upload(&logits_f32);
    let mut lse_dev = dev.upload(&from_f64::<f32>(&forward.row_lse));
    let mut row_loss_dev = dev.upload(&from_f64::<f32>(&forward.row_loss));
    let mut upstream_dev = dev.upload(&[UPSTREAM]);
    for (side, other, want) in [
        (Side::Q, &k, &want.dq),
        (Side::K, &q, want.dk.as_ref().unwrap()),
    ] {
        let mut other_dev = dev.upload(&from_f64::<T>(other));
        let mut grad_dev = dev.alloc_nan::<T>(shape.len());
        let plan = info_nce::info_nce_backward::<T>(
            shape,
            tau,
            side,
            dev.buf(&mut logits_dev),
            dev.buf(&mut lse_dev),
            dev.buf(&mut row_loss_dev),
            dev.buf(&mut other_dev),
            dev.buf(&mut upstream_dev),
            dev.buf(&mut grad_dev),
        );
        let got = dev.run_and_read(plan, &grad_dev);
        let what = format!(
            "info_nce_backward {side:?} {} {}",
            T::SUFFIX,
            label(dev, shape, tau, rows)
        );
        assert_close(&what, &got, want, stored_tolerance::<T>(want));
    }
}

fn info_nce_backward_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(7);
    for shape in shapes(dev) {
        for (tau, rows) in regimes(dev, &shape) {
            let case = Regime {
                shape: &shape,
                tau,
                rows,
            };
            for_each_dtype!(check_backward(dev, case, &mut rng));
        }
    }
}

/// `info_nce_loss` of `row_loss` on `dev`, and their exact mean.
fn loss_and_exact_mean<D: TestDevice>(dev: &D, row_loss: &[f32]) -> (f64, f64) {
    let want = to_f64(row_loss).iter().sum::<f64>() / row_loss.len() as f64;
    let mut row_loss_dev = dev.upload(row_loss);
    let mut loss_dev = dev.alloc_nan::<f32>(1);
    let plan =
        info_nce::info_nce_loss(dev.buf(&mut row_loss_dev), dev.buf(&mut loss_dev), false).unwrap();
    dev.run(&plan);
    (dev.download(&loss_dev)[0] as f64, want)
}

/// The mean over a million equal row losses: a plain float sum per thread drifts by about
/// 4e-5 here, its roundings all leaning the same way (the kernel sums in double).
fn info_nce_loss_is_precise_over_a_million_rows<D: TestDevice>(dev: &D) {
    let row_loss = vec![2.3f32; 1_000_003];
    let (loss, want) = loss_and_exact_mean(dev, &row_loss);
    let what = format!("info_nce_loss of 1000003 rows on the {}", dev.name());
    assert_close(&what, &[loss], &[want], F32_TOLERANCE);
}

/// Row losses near 2/tau at a low temperature (tau = 1e-36 gives logits up to 1e36): their
/// float32 sum overflows (5000 x 4e35 = 2e39 > 3.4e38) where their mean fits.
fn info_nce_loss_mean_does_not_overflow<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(9);
    let row_loss: Vec<f32> = (0..5000)
        .map(|_| (4e35 * (1.0 + rng.unit())) as f32)
        .collect();
    let (loss, want) = loss_and_exact_mean(dev, &row_loss);
    let what = format!(
        "info_nce_loss of 5000 row losses near 6e35 on the {}",
        dev.name()
    );
    assert_close(&what, &[loss], &[want], F32_TOLERANCE);
}

on_every_device!(
    info_nce_forward_matches_reference,
    info_nce_backward_matches_reference,
    info_nce_loss_is_precise_over_a_million_rows,
    info_nce_loss_mean_does_not_overflow
);
