//! The rows loss (`loss::rows::RowsPlan`: normalisation, fused InfoNCE, mean, and
//! the backward through both into the rows) against the CPU reference composed stage by
//! stage, on the emulator and the GPU, for every storage type, with the default upstream
//! gradient and one from device memory, for one side and for both.

use crate::common;

use ccpl::loss::rows::{RowsPlan, RowsWorkspace};
use ccpl::{Dtype, RowShape, Tau, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{random, row_shapes};
use common::models::rows_model;
use common::tolerance::{F32_TOLERANCE, largest, to_f64, tolerance};

const TAU: Tau = Tau::DEFAULT;

/// `(B, S, C)`: odd sizes, S = 8, S past a tile, C over one 64-column tile; on the GPU
/// S = 8192 and C = 257. Not C = 1: a row of width 1 normalises to +-1 whatever its length,
/// so its gradient is eps-sized and its relative error says nothing (kernel_normalize and
/// kernel_info_nce_fused test C = 1 stage by stage).
fn shapes<D: TestDevice>(dev: &D) -> Vec<RowShape> {
    row_shapes(
        dev,
        &[(2, 104, 37), (1, 8, 3), (1, 72, 70)],
        &[(1, 8192, 16), (2, 1000, 257)],
    )
}

/// The rows' magnitude and the temperature of a check.
#[derive(Debug, Clone, Copy)]
struct Regime {
    /// Rows of q uniform in `[-3 scale, 3 scale)`, of k in `[-scale/2, scale/2)`.
    scale: f64,
    /// One element of q near the storage type's largest value.
    spike: bool,
    tau: Tau,
}

const PLAIN: Regime = Regime {
    scale: 1.0,
    spike: false,
    tau: TAU,
};

/// A rows loss's workspace of `T` on a device.
type Workspace<T, D> = RowsWorkspace<<D as TestDevice>::Mem<T>, <D as TestDevice>::Mem<f32>>;

/// The rows loss's plan at `tau` and its workspace on `dev`, after a forward of `rows_q`
/// against `rows_k` (the loss in `ws.loss`, the default upstream gradient in `ws.one`).
fn forward<T: Dtype, D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    tau: Tau,
    rows_q: &[T],
    rows_k: &[T],
    label: &str,
) -> (RowsPlan, Workspace<T, D>) {
    let plan = RowsPlan::new(*shape, tau).unwrap();
    let mut ws = RowsWorkspace::lengths(shape)
        .unwrap()
        .try_map(dev.nan_filled::<T>(), dev.nan_filled::<f32>())
        .unwrap();
    ws.one = dev.upload(&[1.0f32]);
    let (mut rows_q_dev, mut rows_k_dev) = (dev.upload(rows_q), dev.upload(rows_k));
    let (rows_q_buf, rows_k_buf) = (dev.buf(&mut rows_q_dev), dev.buf(&mut rows_k_dev));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), rows_q_buf, rows_k_buf, &bufs)
        .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    (plan, ws)
}

fn check_rows<T: Dtype, D: TestDevice>(dev: &D, shape: &RowShape, regime: Regime, rng: &mut Rng) {
    // Rows of a projection head: any scale, not normalised.
    let mut rows_q: Vec<T> = random(rng, shape.len(), 3.0 * regime.scale);
    let rows_k: Vec<T> = random(rng, shape.len(), 0.5 * regime.scale);
    if regime.spike {
        rows_q[1] = T::from_f64(0.9 * largest::<T>());
    }
    let (rows_q_f64, rows_k_f64) = (to_f64(&rows_q), to_f64(&rows_k));
    let label = format!(
        "{} B={} S={} C={} {regime:?} on the {}",
        T::SUFFIX,
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    );
    let tau = regime.tau;
    let (plan, mut ws) = forward(dev, shape, tau, &rows_q, &rows_k, &label);
    let loss = dev.download(&ws.loss)[0] as f64;
    let exact = rows_model::<f64>(&rows_q_f64, &rows_k_f64, shape, tau, 1.0);
    let model = rows_model::<T>(&rows_q_f64, &rows_k_f64, shape, tau, 1.0);
    let tol = tolerance(&[model.loss], &[exact.loss]);
    assert_close(&format!("rows loss {label}"), &[loss], &[exact.loss], tol);

    // Backward twice from the same forward: the default upstream (1) into q only, then 2.5
    // from device memory into both; the gradients are written over NaN.
    for (upstream, both) in [(None, false), (Some(2.5f32), true)] {
        let u = upstream.unwrap_or(1.0) as f64;
        let exact = rows_model::<f64>(&rows_q_f64, &rows_k_f64, shape, tau, u);
        let model = rows_model::<T>(&rows_q_f64, &rows_k_f64, shape, tau, u);
        let mut grad_q_dev = dev.alloc_nan::<T>(shape.len());
        let mut grad_k_dev = dev.alloc_nan::<T>(shape.len());
        let mut upstream_dev = dev.upload(&[upstream.unwrap_or(f32::NAN)]);
        let upstream_buf = upstream.map(|_| dev.buf(&mut upstream_dev));
        let grad_k_buf = dev.buf(&mut grad_k_dev);
        let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
        plan.backward::<T, _>(
            &dev.launcher(),
            &bufs,
            upstream_buf,
            dev.buf(&mut grad_q_dev),
            both.then_some(grad_k_buf),
        )
        .unwrap_or_else(|e| panic!("backward {label}: {e}"));
        let got = to_f64(&dev.download(&grad_q_dev));
        let what = format!("rows grad_rows_q upstream={u} {label}");
        let tol = tolerance(&model.grad_rows_q, &exact.grad_rows_q);
        assert_close(&what, &got, &exact.grad_rows_q, tol);
        let got = to_f64(&dev.download(&grad_k_dev));
        if both {
            let what = format!("rows grad_rows_k upstream={u} {label}");
            let tol = tolerance(&model.grad_rows_k, &exact.grad_rows_k);
            assert_close(&what, &got, &exact.grad_rows_k, tol);
        } else {
            assert!(
                got.iter().all(|g| g.is_nan()),
                "grad_rows_k written without being asked for: {label}"
            );
        }
    }
}

fn rows_loss_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(18);
    for shape in shapes(dev) {
        for_each_dtype!(check_rows(dev, &shape, PLAIN, &mut rng));
    }
}

/// Rows of 1e20 (their squares past float's range), one element near the storage type's
/// largest value, and a temperature of 1e-37 (row losses of about 4e36, whose float32 sum over
/// the 208 rows, 8e38, passes f32::MAX while their mean fits; gradients near 1e34, beyond
/// f16's range, so f16 is left out there).
fn rows_loss_at_extreme_scales<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(19);
    let shape = RowShape::new(2, 104, 37).unwrap();
    let regime = |scale, spike, tau| Regime { scale, spike, tau };
    for regime in [regime(1e20, false, TAU), regime(1.0, true, TAU)] {
        check_rows::<f32, D>(dev, &shape, regime, &mut rng);
        check_rows::<half::bf16, D>(dev, &shape, regime, &mut rng);
    }
    check_rows::<half::f16, D>(dev, &shape, regime(1.0, true, TAU), &mut rng);
    let low = Tau::new(1e-37).unwrap();
    check_rows::<f32, D>(dev, &shape, regime(1.0, false, low), &mut rng);
    check_rows::<half::bf16, D>(dev, &shape, regime(1.0, false, low), &mut rng);
}

/// At the smallest temperature of the rule (`Tau::MIN`, `2/tau = f32::MAX`) the largest row
/// loss fits: every row of q along one axis, and so every key but the first, which points the
/// other way, so that row 0's loss is `2/tau` (less a few eps) plus `ln 7`. The loss is finite
/// and the reference's. Below it (3e-39) that row loss overflowed float32; `Tau` refuses it.
fn rows_loss_at_the_smallest_tau<D: TestDevice>(dev: &D) {
    let shape = RowShape::new(1, 8, 2).unwrap();
    let axis = |row: usize, sign: f32| [sign, 0.0].map(|v| v * (1 + row) as f32);
    let rows_q: Vec<f32> = (0..8).flat_map(|r| axis(r, 1.0)).collect();
    let rows_k: Vec<f32> = (0..8)
        .flat_map(|r| axis(r, if r == 0 { -1.0 } else { 1.0 }))
        .collect();
    let label = format!("rows loss at tau {} on the {}", Tau::MIN, dev.name());
    let (_, ws) = forward(dev, &shape, Tau::MIN, &rows_q, &rows_k, &label);
    let loss = dev.download(&ws.loss)[0] as f64;
    let exact = reference::rows_loss(&rows_q, &rows_k, &shape, Tau::MIN, false).unwrap();
    assert!(exact.loss > f32::MAX as f64 / 8.5, "{label}: {exact:?}");
    assert_close(&label, &[loss], &[exact.loss], F32_TOLERANCE);
}

on_every_device!(
    rows_loss_matches_reference,
    rows_loss_at_extreme_scales,
    rows_loss_at_the_smallest_tau
);
