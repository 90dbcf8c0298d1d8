//! The per-layer loss (identity head) run as the crate's sequence of launch plans
//! (`plan::layer::LayerPlan`, the code the GPU path runs) against the CPU reference's
//! `ccp_layer_loss`, on the emulator and the GPU, for every storage type: the loss, and the
//! gradients of feat_q and feat_k accumulated into the caller's buffers, with the default
//! upstream gradient and one from device memory, with both scatters.

mod common;

use ccpl::plan::layer::{LayerPlan, LayerWorkspace};
use ccpl::plan::neighbor::Scatter;
use ccpl::{Centers, Dtype, FeatureShape, Layout, reference};
use common::Rng;
use common::device::{
    F32_TOLERANCE, TestCenters, TestDevice, assert_close, layer_model, random, rounds,
    scatter_model, to_f64, tolerance,
};

const TAU: f64 = 0.07;

struct Case {
    shape: FeatureShape,
    centers: Centers,
    /// A flat patch in feat_q: difference rows that are exactly zero (gradient g/eps).
    flat: bool,
}

/// Odd sizes, S = 8 with C = 1, every interior position a centre and a flat patch; on the
/// GPU S = 8192.
fn cases<D: TestDevice>(dev: &D) -> Vec<Case> {
    let mut dims = vec![
        (2, 5, 9, 11, 7, Layout::Nchw, false),
        (1, 1, 3, 3, 1, Layout::Nhwc, false),
        (2, 6, 8, 7, 30, Layout::Nhwc, true),
        (1, 7, 12, 9, 20, Layout::Nchw, false),
    ];
    if dev.large_sizes() {
        dims.push((2, 8, 67, 69, 1024, Layout::Nchw, false));
    }
    dims.into_iter()
        .enumerate()
        .map(|(i, (b, c, h, w, num_s, layout, flat))| Case {
            shape: FeatureShape::new(b, c, h, w, layout).unwrap(),
            centers: Centers::sample(h, w, num_s, 200 + i as u64).unwrap(),
            flat,
        })
        .collect()
}

fn features<T: Dtype>(rng: &mut Rng, case: &Case) -> (Vec<T>, Vec<T>) {
    let mut feat_q: Vec<T> = random(rng, case.shape.len(), 1.0);
    let feat_k: Vec<T> = random(rng, case.shape.len(), 1.0);
    if case.flat {
        // A 3x3 patch, equal in every channel and image: the window of the centre (2, 2)
        // lies inside it, so its 8 difference rows are zero.
        let s = &case.shape;
        assert!(case.centers.flat().contains(&(2 * s.width() as i32 + 2)));
        for b in 0..s.batch() {
            for c in 0..s.channels() {
                for h in 1..4.min(s.height()) {
                    for w in 1..4.min(s.width()) {
                        feat_q[s.index(b, c, h, w).unwrap()] = T::from_f64(0.5);
                    }
                }
            }
        }
    }
    (feat_q, feat_k)
}

fn check_layer<T: Dtype, D: TestDevice>(dev: &D, case: &Case, rng: &mut Rng) {
    let (shape, centers) = (&case.shape, &case.centers);
    let (feat_q, feat_k) = features::<T>(rng, case);
    let (feat_q_f64, feat_k_f64) = (to_f64(&feat_q), to_f64(&feat_k));
    let exact = reference::ccp_layer_loss(&feat_q, &feat_k, shape, centers, TAU, true).unwrap();
    let label = format!(
        "{} {:?} B={} C={} H={} W={} S={}{} on the {}",
        T::SUFFIX,
        shape.layout(),
        shape.batch(),
        shape.channels(),
        shape.height(),
        shape.width(),
        centers.rows(),
        if case.flat { " flat" } else { "" },
        dev.name()
    );

    let plan = LayerPlan::new(*shape, centers.len(), TAU).unwrap();
    let mut ws = LayerWorkspace::lengths(shape, centers.len())
        .unwrap()
        .try_map(
            |&n| Ok::<_, ()>(dev.alloc_nan::<T>(n)),
            |&n| Ok(dev.alloc_nan::<f32>(n)),
        )
        .unwrap();
    ws.rows.one = dev.upload(&[1.0f32]);
    let mut centers_dev = TestCenters::upload(dev, centers);
    let mut feat_q_dev = dev.upload(&feat_q);
    let mut feat_k_dev = dev.upload(&feat_k);
    let centers_buf = centers_dev.buf(dev);
    let (feat_q_buf, feat_k_buf) = (dev.buf(&mut feat_q_dev), dev.buf(&mut feat_k_dev));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &centers_buf, feat_q_buf, feat_k_buf, &bufs)
        .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    let loss = dev.download(&ws.rows.loss)[0] as f64;
    // The rounding model, for the 16-bit types only (f32 has the spec's tolerance).
    let model = |u: f64| {
        rounds::<T>().then(|| layer_model::<T>(&feat_q_f64, &feat_k_f64, shape, centers, TAU, u))
    };
    let tol = model(1.0).map_or(F32_TOLERANCE, |m| tolerance::<T>(&[m.loss], &[exact.loss]));
    assert_close(&format!("layer loss {label}"), &[loss], &[exact.loss], tol);

    // Backward twice from the same forward: the default upstream (1) with the deterministic
    // scatter, then 2.5 from device memory with the atomic one; each into a random start.
    for (upstream, scatter) in [
        (None, Scatter::Deterministic),
        (Some(2.5f32), Scatter::Atomic),
    ] {
        let u = upstream.unwrap_or(1.0) as f64;
        let model = model(u);
        let start_q: Vec<T> = random(rng, shape.len(), 0.0);
        let start_k: Vec<T> = random(rng, shape.len(), 0.0);
        let mut grad_q_dev = dev.upload(&start_q);
        let mut grad_k_dev = dev.upload(&start_k);
        let mut upstream_dev = dev.upload(&[upstream.unwrap_or(f32::NAN)]);
        let upstream_buf = upstream.map(|_| dev.buf(&mut upstream_dev));
        let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
        plan.backward::<T, _>(
            &dev.launcher(),
            &centers_buf,
            &bufs,
            upstream_buf,
            dev.buf(&mut grad_q_dev),
            Some(dev.buf(&mut grad_k_dev)),
            scatter,
        )
        .unwrap_or_else(|e| panic!("backward {label}: {e}"));
        let sides = [
            ("q", &grad_q_dev, &start_q, &exact.grad_feat_q),
            (
                "k",
                &grad_k_dev,
                &start_k,
                exact.grad_feat_k.as_ref().unwrap(),
            ),
        ];
        for (side, got_dev, start, grad) in sides {
            let start = to_f64(start);
            let want: Vec<f64> = start
                .iter()
                .zip(grad.iter())
                .map(|(s, g)| s + u * g)
                .collect();
            let tol = model.as_ref().map_or(F32_TOLERANCE, |m| {
                let grad_rows = if side == "q" {
                    &m.grad_rows_q
                } else {
                    &m.grad_rows_k
                };
                let stored = scatter_model::<T>(&start, grad_rows, shape, centers, scatter);
                tolerance::<T>(&stored, &want)
            });
            let got = to_f64(&dev.download(got_dev));
            let what = format!("layer grad_feat_{side} upstream={u} {scatter:?} {label}");
            assert_close(&what, &got, &want, tol);
        }
    }
}

/// Every storage type, except: flat patches give gradients of g/1e-7, beyond the range of f16
/// (65504), so they are checked in f32 and bf16 only; S = 8192 (the reference alone takes
/// seconds there) in f32 only, the kernel tests covering every type at that size.
fn check_layer_all<D: TestDevice>(dev: &D, case: &Case, rng: &mut Rng) {
    check_layer::<f32, D>(dev, case, rng);
    if case.centers.rows() < 8192 {
        check_layer::<half::bf16, D>(dev, case, rng);
        if !case.flat {
            check_layer::<half::f16, D>(dev, case, rng);
        }
    }
}

fn layer_loss_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(8);
    for case in cases(dev) {
        check_layer_all(dev, &case, &mut rng);
    }
}

on_every_device!(layer_loss_matches_reference);
