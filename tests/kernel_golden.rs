//! The PyTorch goldens (`tests/golden`, see tools/make_goldens.py) through the kernels: each
//! case's loss and both gradients by the crate's launch plans in float32
//! (`loss::layer::LayerPlan`, the code the GPU path runs), with both scatters, on the
//! emulator and the GPU, within the spec's float32 tolerance.

use crate::common;

use ccpl::launch::neighbor::Scatter;
use ccpl::loss::layer::LayerPlan;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{TestCenters, layer_workspace};
use common::golden::{self, GoldenCase};
use common::tolerance::{F32_TOLERANCE, to_f64};

/// The kernels' loss and gradients of feat_q and feat_k for one case, in f32.
fn run<D: TestDevice>(dev: &D, case: &GoldenCase, scatter: Scatter) -> (f64, Vec<f64>, Vec<f64>) {
    let (shape, centers) = case.inputs().unwrap();
    let plan = LayerPlan::new(shape, centers.len(), case.tau).unwrap();
    let mut ws = layer_workspace::<f32, _>(dev, &shape, centers.len());
    let mut centers_dev = TestCenters::upload(dev, &centers);
    let centers_buf = centers_dev.buf(dev);
    let mut feat_q = dev.upload(&case.feat_q);
    let mut feat_k = dev.upload(&case.feat_k);
    let mut grad_q = dev.upload(&vec![0.0f32; shape.len()]);
    let mut grad_k = dev.upload(&vec![0.0f32; shape.len()]);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    let launcher = dev.launcher();
    let (q, k) = (dev.buf(&mut feat_q), dev.buf(&mut feat_k));
    plan.forward::<f32, _>(&launcher, &centers_buf, q, k, &bufs)
        .unwrap();
    let (gq, gk) = (dev.buf(&mut grad_q), dev.buf(&mut grad_k));
    plan.backward::<f32, _>(&launcher, &centers_buf, &bufs, None, gq, Some(gk), scatter)
        .unwrap();
    let loss = dev.download(&ws.rows.loss)[0] as f64;
    (
        loss,
        to_f64(&dev.download(&grad_q)),
        to_f64(&dev.download(&grad_k)),
    )
}

fn kernels_match_pytorch_goldens<D: TestDevice>(dev: &D) {
    let cases = golden::load_dir(&golden::golden_dir()).unwrap_or_else(|e| panic!("{e}"));
    for (case, scatter) in cases
        .iter()
        .flat_map(|c| [(c, Scatter::Deterministic), (c, Scatter::Atomic)])
    {
        let (loss, grad_q, grad_k) = run(dev, case, scatter);
        let what = |q: &str| {
            format!(
                "golden {} {q} {scatter:?} on the {}",
                case.name(),
                dev.name()
            )
        };
        assert_close(&what("loss"), &[loss], &[case.loss], F32_TOLERANCE);
        assert_close(
            &what("grad_feat_q"),
            &grad_q,
            &case.grad_feat_q,
            F32_TOLERANCE,
        );
        assert_close(
            &what("grad_feat_k"),
            &grad_k,
            &case.grad_feat_k,
            F32_TOLERANCE,
        );
    }
}

on_every_device!(kernels_match_pytorch_goldens);
