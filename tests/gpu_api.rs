//! The safe GPU API on a real device: every wrapper of `ccpl::cuda` on the caller's stream
//! with the caller's buffers (slices and views at an offset), and `CcpLayer`, against the CPU
//! reference. Each test says loudly that it SKIPPED without a GPU, and fails instead when
//! `CCPL_REQUIRE_GPU=1`.

use crate::common;

use ccpl::cuda::CcpLayer;
use ccpl::cuda::CcpRows;
use ccpl::cuda::info_nce::{self, Side};
use ccpl::cuda::neighbor::{self, DeviceCenters, Scatter};
use ccpl::cuda::{normalize, similarity};
use ccpl::{Centers, Error, FeatureShape, Layout, RowShape, Tau, reference};
use common::Rng;
use common::assert_close;
use common::fixtures::random;
use common::models::{layer_model, rows_model, scatter_model};
use common::tolerance::{F32_TOLERANCE, to_f64, tolerance};
use cudarc::driver::CudaSlice;

mod loss_objects;

const TAU: Tau = Tau::DEFAULT;
/// Elements before and after the data in the buffers passed as views.
const PAD: usize = 5;

/// Every stage wrapper, f32, at odd sizes; inputs passed as views into larger buffers.
#[test]
fn every_wrapper_matches_reference() {
    let gpu = gpu_or_skip!("gpu_api::every_wrapper_matches_reference");
    let (kernels, stream) = (gpu.kernels(), gpu.stream());
    let mut rng = Rng::new(11);
    let shape = FeatureShape::new(2, 7, 11, 13, Layout::Nhwc).unwrap();
    let centers = Centers::sample(11, 13, 17, 3).unwrap();
    let rows = RowShape::new(2, centers.rows(), 7).unwrap();
    let device_centers = DeviceCenters::upload(stream, &centers).unwrap();
    let padded = |data: &[f32]| {
        let mut v = vec![f32::NAN; PAD];
        v.extend_from_slice(data);
        v.extend(std::iter::repeat_n(f32::NAN, PAD));
        stream.clone_htod(&v).unwrap()
    };
    let nan = |len: usize| stream.clone_htod(&vec![f32::NAN; len]).unwrap();
    let download = |s: &CudaSlice<f32>| to_f64(&stream.clone_dtoh(s).unwrap());

    // Difference rows, from a view of the feature map.
    let feat: Vec<f32> = random(&mut rng, shape.len(), 1.0);
    let feat_dev = padded(&feat);
    let mut rows_dev = nan(rows.len());
    let feat_view = feat_dev.slice(PAD..PAD + shape.len());
    neighbor::neighbor_diff(
        kernels,
        stream,
        &shape,
        &device_centers,
        &feat_view,
        &mut rows_dev,
    )
    .unwrap();
    let want_rows = reference::neighbor_diff(&feat, &shape, &centers).unwrap();
    assert_close(
        "cuda neighbor_diff",
        &download(&rows_dev),
        &want_rows,
        F32_TOLERANCE,
    );

    // Normalisation, into a view of a larger buffer.
    let mut unit_dev = nan(rows.len() + 2 * PAD);
    let mut norms_dev = nan(rows.batch() * rows.rows());
    {
        let mut unit_view = unit_dev.slice_mut(PAD..PAD + rows.len());
        normalize::normalize_rows(
            kernels,
            stream,
            &rows,
            &rows_dev,
            &mut unit_view,
            &mut norms_dev,
        )
        .unwrap();
    }
    let want_unit = reference::normalize_rows(&want_rows, 7).unwrap();
    let unit = download(&unit_dev);
    assert!(
        unit[..PAD]
            .iter()
            .chain(&unit[PAD + rows.len()..])
            .all(|v| v.is_nan())
    );
    assert_close(
        "cuda normalize_rows",
        &unit[PAD..PAD + rows.len()],
        &want_unit.rows,
        F32_TOLERANCE,
    );

    // Logits of q = these rows against k = another set.
    let k: Vec<f32> = random(&mut rng, rows.len(), 1.0);
    let k_dev = stream.clone_htod(&k).unwrap();
    let q_view = unit_dev.slice(PAD..PAD + rows.len());
    let mut logits_dev = nan(rows.logits_len());
    similarity::similarity(
        kernels,
        stream,
        &rows,
        TAU,
        &q_view,
        &k_dev,
        &mut logits_dev,
    )
    .unwrap();
    let q = to_f64(&stream.clone_dtoh(&q_view).unwrap());
    let want_logits = reference::similarity(&q, &to_f64(&k), &rows, TAU).unwrap();
    let logits = download(&logits_dev);
    assert_close("cuda similarity", &logits, &want_logits, F32_TOLERANCE);

    // InfoNCE forward, loss, backward (dq and dk).
    let count = rows.batch() * rows.rows();
    let (mut lse_dev, mut row_loss_dev, mut loss_dev) = (nan(count), nan(count), nan(1));
    info_nce::info_nce_forward(
        kernels,
        stream,
        &rows,
        &logits_dev,
        &mut lse_dev,
        &mut row_loss_dev,
    )
    .unwrap();
    info_nce::info_nce_loss(kernels, stream, &row_loss_dev, &mut loss_dev, false).unwrap();
    let want_fwd = reference::info_nce_forward(&logits, rows.batch(), rows.rows()).unwrap();
    assert_close(
        "cuda info_nce_forward",
        &download(&lse_dev),
        &want_fwd.row_lse,
        F32_TOLERANCE,
    );
    assert_close(
        "cuda info_nce_loss",
        &download(&loss_dev),
        &[want_fwd.loss],
        F32_TOLERANCE,
    );
    let upstream_dev = stream.clone_htod(&[1.5f32]).unwrap();
    let want = reference::info_nce_backward(
        &logits,
        &want_fwd.row_lse,
        &q,
        &to_f64(&k),
        &rows,
        TAU,
        1.5,
        true,
    )
    .unwrap();
    for (side, other, want) in [
        (Side::Q, &k_dev, &want.dq),
        (Side::K, &unit_dev, want.dk.as_ref().unwrap()),
    ] {
        let other_view = if side == Side::Q {
            other.slice(..)
        } else {
            other.slice(PAD..PAD + rows.len())
        };
        let mut grad_dev = nan(rows.len());
        info_nce::info_nce_backward(
            kernels,
            stream,
            &rows,
            TAU,
            side,
            &logits_dev,
            &lse_dev,
            &row_loss_dev,
            &other_view,
            &upstream_dev,
            &mut grad_dev,
        )
        .unwrap();
        assert_close(
            &format!("cuda info_nce_backward {side:?}"),
            &download(&grad_dev),
            want,
            F32_TOLERANCE,
        );
    }

    // Normalisation backward and both scatters, accumulating into a random start.
    let grad_out: Vec<f32> = random(&mut rng, rows.len(), 1.0);
    let grad_out_dev = stream.clone_htod(&grad_out).unwrap();
    let mut grad_rows_dev = nan(rows.len());
    normalize::normalize_rows_backward(
        kernels,
        stream,
        &rows,
        &rows_dev,
        &norms_dev,
        &grad_out_dev,
        &mut grad_rows_dev,
    )
    .unwrap();
    let want_grad_rows =
        reference::normalize_rows_backward(&want_rows, &to_f64(&grad_out), 7).unwrap();
    let grad_rows = download(&grad_rows_dev);
    assert_close(
        "cuda normalize_rows_backward",
        &grad_rows,
        &want_grad_rows,
        F32_TOLERANCE,
    );
    // What the scatter added to a random start, compared with the scatter itself.
    for scatter in [Scatter::Atomic, Scatter::Deterministic] {
        let start: Vec<f32> = random(&mut rng, shape.len(), 1.0);
        let mut grad_feat_dev = stream.clone_htod(&start).unwrap();
        neighbor::neighbor_diff_backward(
            kernels,
            stream,
            &shape,
            &device_centers,
            &grad_rows_dev,
            &mut grad_feat_dev,
            scatter,
        )
        .unwrap();
        let mut want = vec![0.0; shape.len()];
        reference::neighbor_diff_backward(&grad_rows, &shape, &centers, &mut want).unwrap();
        let added: Vec<f64> = download(&grad_feat_dev)
            .iter()
            .zip(&start)
            .map(|(g, &s)| g - s as f64)
            .collect();
        let what = format!("cuda neighbor_diff_backward {scatter:?}");
        assert_close(&what, &added, &want, F32_TOLERANCE);
    }

    // The difference rows normalised as they are formed, and back from the normalised rows.
    let mut unit_dev = nan(rows.len());
    let mut unit_norms_dev = nan(rows.count());
    neighbor::neighbor_diff_normalize(
        kernels,
        stream,
        &shape,
        &device_centers,
        &feat_view,
        &mut unit_dev,
        &mut unit_norms_dev,
    )
    .unwrap();
    let want_unit = reference::normalize_rows(&want_rows, 7).unwrap();
    let unit = download(&unit_dev);
    assert_close(
        "cuda neighbor_diff_normalize",
        &unit,
        &want_unit.rows,
        F32_TOLERANCE,
    );
    let what = "cuda neighbor_diff_normalize norms";
    assert_close(
        what,
        &download(&unit_norms_dev),
        &want_unit.norms,
        F32_TOLERANCE,
    );
    let mut grad_rows_dev = nan(rows.len());
    normalize::normalize_rows_backward_normalized(
        kernels,
        stream,
        &rows,
        &unit_dev,
        &unit_norms_dev,
        &grad_out_dev,
        &mut grad_rows_dev,
    )
    .unwrap();
    let what = "cuda normalize_rows_backward_normalized";
    assert_close(
        what,
        &download(&grad_rows_dev),
        &want_grad_rows,
        F32_TOLERANCE,
    );

    // Bad input is an Err before any launch, and leaves the output untouched.
    let mut short = nan(rows.len() - 1);
    let err = neighbor::neighbor_diff(
        kernels,
        stream,
        &shape,
        &device_centers,
        &feat_view,
        &mut short,
    );
    assert!(
        matches!(err, Err(Error::Length { what: "rows", .. })),
        "{err:?}"
    );
    assert!(download(&short).iter().all(|v| v.is_nan()));
}
