//! The per-layer loss (identity head) run as the crate's sequence of launch plans
//! (`loss::layer::LayerPlan`, the code the GPU path runs) against the CPU reference's
//! `ccp_layer_loss`, on the emulator and the GPU, for every storage type: the loss, and the
//! gradients of feat_q and feat_k accumulated into the caller's buffers, with the default
//! upstream gradient and one from device memory, with both scatters, each gradient compared
//! directly (what was added to the buffer, against the gradient); and the same at the edges of
//! each type's range.

use crate::common;

use ccpl::launch::neighbor::Scatter;
use ccpl::loss::layer::LayerPlan;
use ccpl::{Centers, Dtype, FeatureShape, Layout, Tau, ffi, reference};
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{TestCenters, layer_workspace, random};
use common::models::{layer_model, scatter_model};
use common::tolerance::{largest, to_f64, tolerance};
use common::{Rng, rel_err};

const TAU: Tau = Tau::DEFAULT;

struct Case {
    shape: FeatureShape,
    centers: Centers,
    /// A flat patch in feat_q: difference rows that are exactly zero (gradient g/eps).
    flat: bool,
    /// The magnitude of the features: uniform in `[-scale, scale)`.
    scale: f64,
    /// One element of feat_q near the storage type's largest value.
    spike: bool,
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
            scale: 1.0,
            spike: false,
        })
        .collect()
}

fn features<T: Dtype>(rng: &mut Rng, case: &Case) -> (Vec<T>, Vec<T>) {
    let mut feat_q: Vec<T> = random(rng, case.shape.len(), case.scale);
    let feat_k: Vec<T> = random(rng, case.shape.len(), case.scale);
    if case.spike {
        // At a centre: it enters 9 of the difference rows.
        let p = case.centers.flat()[0] as usize;
        let (h, w) = (p / case.shape.width(), p % case.shape.width());
        feat_q[case.shape.index(0, 0, h, w).unwrap()] = T::from_f64(0.9 * largest::<T>());
    }
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
        "{} {:?} B={} C={} H={} W={} S={}{}{}{} on the {}",
        T::SUFFIX,
        shape.layout(),
        shape.batch(),
        shape.channels(),
        shape.height(),
        shape.width(),
        centers.rows(),
        if case.flat { " flat" } else { "" },
        if case.scale != 1.0 {
            format!(" scale {:e}", case.scale)
        } else {
            String::new()
        },
        if case.spike { " spike" } else { "" },
        dev.name()
    );

    let plan = LayerPlan::new(*shape, centers.len(), TAU).unwrap();
    let mut ws = layer_workspace::<T, _>(dev, shape, centers.len());
    let mut centers_dev = TestCenters::upload(dev, centers);
    let mut feat_q_dev = dev.upload(&feat_q);
    let mut feat_k_dev = dev.upload(&feat_k);
    let centers_buf = centers_dev.buf(dev);
    let (feat_q_buf, feat_k_buf) = (dev.buf(&mut feat_q_dev), dev.buf(&mut feat_k_dev));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &centers_buf, feat_q_buf, feat_k_buf, &bufs)
        .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    let loss = dev.download(&ws.rows.loss)[0] as f64;
    // The rounding model of what the kernels store in T (f32 included: see `tolerance`).
    let model = |u: f64| layer_model::<T>(&feat_q_f64, &feat_k_f64, shape, centers, TAU, u);
    let tol = tolerance(&[model(1.0).loss], &[exact.loss]);
    assert_close(&format!("layer loss {label}"), &[loss], &[exact.loss], tol);

    // Backward twice from the same forward, each gradient compared directly (its own relative
    // error, not that of its sum with a start that could hide it): the default upstream (1)
    // with the deterministic scatter into zeros; then 2.5 from device memory with the atomic
    // one, added to a random start of the gradient's own size (what was added, got - start,
    // compared with the gradient).
    for (upstream, scatter) in [
        (None, Scatter::Deterministic),
        (Some(2.5f32), Scatter::Atomic),
    ] {
        let u = upstream.unwrap_or(1.0) as f64;
        let model = model(u);
        let sides = [
            ("q", &exact.grad_feat_q, &model.grad_rows_q),
            ("k", exact.grad_feat_k.as_ref().unwrap(), &model.grad_rows_k),
        ]
        .map(|(side, grad, grad_rows)| {
            let want: Vec<f64> = grad.iter().map(|g| u * g).collect();
            let size = if upstream.is_none() { 0.0 } else { rms(&want) };
            let start: Vec<T> = random(rng, shape.len(), size);
            (side, want, grad_rows, start)
        });
        let mut grad_q_dev = dev.upload(&sides[0].3);
        let mut grad_k_dev = dev.upload(&sides[1].3);
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
        let feats = [&feat_q_f64, &feat_k_f64];
        for (((side, want, grad_rows, start), got_dev), feat) in
            sides.iter().zip([&grad_q_dev, &grad_k_dev]).zip(feats)
        {
            let start = to_f64(start);
            let added = |sum: Vec<f64>| -> Vec<f64> {
                sum.iter().zip(&start).map(|(s, a)| s - a).collect()
            };
            let got = added(to_f64(&dev.download(got_dev)));
            let what = format!("layer grad_feat_{side} upstream={u} {scatter:?} {label}");
            if shape.channels() == 1 {
                let bound = width_one_bound::<T>(feat, shape, centers, u);
                assert_within_bound(&what, &got, want, &bound, &start, rounding::<T>());
            } else {
                let stored = scatter_model::<T>(&start, grad_rows, shape, centers, scatter);
                let tol = tolerance(&added(stored), want);
                assert_close(&what, &got, want, tol);
            }
        }
    }
}

/// The error of rounding `x` to `T`: at most `unit * |x| + tiny` (its unit roundoff, and its
/// smallest subnormal where `x` underflows).
#[derive(Clone, Copy)]
struct Rounding {
    unit: f64,
    tiny: f64,
}

fn rounding<T: Dtype>() -> Rounding {
    let (unit, tiny) = match T::SUFFIX {
        "f16" => (2f64.powi(-11), 2f64.powi(-24)),
        "bf16" => (2f64.powi(-8), 2f64.powi(-133)),
        _ => (2f64.powi(-24), 2f64.powi(-149)),
    };
    Rounding { unit, tiny }
}

/// A bound on the error of the feature gradient where the rows have width 1 (C = 1). Such a
/// row normalises to +-(1 - eps/(|d| + eps)): the loss depends on |d| only through that eps
/// part, and so does its gradient (`g eps/(n+eps)^2` with `g` the gradient of the normalised
/// row). `g = sum_j G_ij k_j / (B S tau)` cancels to that eps part when the k_j share a sign
/// (the G_ij of a row sum to 0), and float32 logits resolve it only to their own error, about
/// 2^-23/tau: the result is ill-conditioned, its relative error O(1) in any float32
/// implementation. The bound is the forward error: `gamma sum_j |G_ij| |k_j| / (B S tau)`,
/// at most `2 gamma / (B S tau)` (`sum_j |G_ij| <= 2`, `|k_j| < 1`), with gamma from the
/// rounding of the normalised rows and G in T, the logits and the sum over S, times
/// `eps/(n+eps)^2`, added up over the rows the scatter adds into each element.
fn width_one_bound<T: Dtype>(
    feat: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    upstream: f64,
) -> Vec<f64> {
    let s = centers.rows();
    let gamma =
        2.0 * (2.0 * rounding::<T>().unit + 2f64.powi(-23) / TAU.get() + s as f64 * 2f64.powi(-24));
    let per_g = 2.0 * gamma * upstream.abs() / ((shape.batch() * s) as f64 * TAU.get());
    let rows = reference::neighbor_diff(feat, shape, centers).unwrap();
    let norms = reference::normalize_rows(&rows, 1).unwrap().norms;
    let eps = ffi::CCPL_NORM_EPS;
    let row_bound: Vec<f64> = norms
        .iter()
        .map(|n| per_g * eps / (n + eps).powi(2))
        .collect();
    // Each row adds into its centre and its neighbour: both get its bound.
    let mut bound = vec![0.0; shape.len()];
    let (n, w) = (centers.len(), shape.width());
    for b in 0..shape.batch() {
        for (x, &p) in centers.flat().iter().enumerate() {
            let (h, wp) = (p as usize / w, p as usize % w);
            for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
                let r = row_bound[b * s + k * n + x];
                let (dh, dw) = ffi::neighbor_delta(k);
                let (nh, nw) = (h.wrapping_add_signed(dh), wp.wrapping_add_signed(dw));
                bound[shape.index(b, 0, h, wp).unwrap()] += r;
                bound[shape.index(b, 0, nh, nw).unwrap()] += r;
            }
        }
    }
    bound
}

/// Asserts `|got - want| <= bound + 9 (rounding of |want| + |start|)` element by element: the
/// bound, and the roundings of the stored rows and the (at most 9) additions into a buffer
/// starting at `start`.
fn assert_within_bound(
    what: &str,
    got: &[f64],
    want: &[f64],
    bound: &[f64],
    start: &[f64],
    rounding: Rounding,
) {
    let mut worst: f64 = 0.0;
    for (i, (((g, w), b), s)) in got.iter().zip(want).zip(bound).zip(start).enumerate() {
        let allowed = b + 9.0 * (rounding.unit * (w.abs() + s.abs()) + rounding.tiny);
        let err = (g - w).abs();
        assert!(
            err <= allowed,
            "{what}: element {i}: got {g:e}, want {w:e}, bound {allowed:e}"
        );
        worst = worst.max(err / allowed);
    }
    eprintln!(
        "measured {what}: rel err {:.3e}, worst element at {worst:.2} of its bound",
        rel_err(got, want)
    );
}

/// Root mean square of `v`.
fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
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

/// Features at the edges of each storage type's range: f16 features of 50,000, whose
/// differences (up to 100,000) f16 cannot hold; f32 and bf16 features of 1e30 (squares past
/// float's range) and of 1e38 (differences past f32::MAX; with C = 2 their norms still fit); one
/// element near the type's largest value in maps of ordinary features. The loss and the
/// gradients as at scale 1, against the reference, within the rounding model's tolerance.
fn layer_loss_at_extreme_scales<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(9);
    let case = |dims: (usize, usize, usize, usize, usize), scale: f64, spike: bool| {
        let (b, c, h, w, num_s) = dims;
        Case {
            shape: FeatureShape::new(b, c, h, w, Layout::Nchw).unwrap(),
            centers: Centers::sample(h, w, num_s, 300).unwrap(),
            flat: false,
            scale,
            spike,
        }
    };
    let (wide, narrow) = ((2, 5, 9, 11, 7), (2, 2, 7, 6, 9));
    check_layer::<half::f16, D>(dev, &case(wide, 5e4, false), &mut rng);
    check_layer::<half::f16, D>(dev, &case(wide, 1.0, true), &mut rng);
    check_layer::<f32, D>(dev, &case(wide, 1e30, false), &mut rng);
    check_layer::<f32, D>(dev, &case(narrow, 1e38, false), &mut rng);
    check_layer::<f32, D>(dev, &case(wide, 1.0, true), &mut rng);
    check_layer::<half::bf16, D>(dev, &case(wide, 1e30, false), &mut rng);
    check_layer::<half::bf16, D>(dev, &case(wide, 1.0, true), &mut rng);
}

on_every_device!(layer_loss_matches_reference, layer_loss_at_extreme_scales);
