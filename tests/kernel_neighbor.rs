//! `kernels/neighbor.cu` against the CPU reference, on the emulator and the GPU, for every
//! storage type and both layouts: the difference rows, the difference rows normalised as they
//! are formed (at every magnitude the storage type holds, where the differences themselves
//! exceed it), and the backward scatter (atomic and deterministic) accumulating into the
//! caller's buffer.

use crate::common;

use ccpl::launch::neighbor::{self, Scatter};
use ccpl::{Centers, Dtype, FeatureShape, Layout, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{TestCenters, random};
use common::models::scatter_model;
use common::tolerance::{stored_tolerance, to_f64, tolerance};

/// A feature map and its centres.
struct Case {
    shape: FeatureShape,
    centers: Centers,
}

/// Odd sizes (multiples of nothing), S = 8 with C = 1, every interior position a centre
/// (windows overlap everywhere), and on the GPU S = 8192.
fn cases<D: TestDevice>(dev: &D, layout: Layout) -> Vec<Case> {
    let mut dims = vec![
        (2, 5, 7, 9, 9),
        (1, 1, 3, 3, 1),
        (3, 3, 6, 5, 12),
        (1, 7, 11, 13, 17),
    ];
    if dev.large_sizes() {
        dims.push((2, 67, 67, 69, 1024));
    }
    dims.into_iter()
        .enumerate()
        .map(|(i, (b, c, h, w, num_s))| Case {
            shape: FeatureShape::new(b, c, h, w, layout).unwrap(),
            centers: Centers::sample(h, w, num_s, 100 + i as u64).unwrap(),
        })
        .collect()
}

fn name<T: Dtype, D: TestDevice>(dev: &D, what: &str, case: &Case) -> String {
    let s = &case.shape;
    format!(
        "{what} {} {:?} B={} C={} H={} W={} S={} on the {}",
        T::SUFFIX,
        s.layout(),
        s.batch(),
        s.channels(),
        s.height(),
        s.width(),
        case.centers.rows(),
        dev.name()
    )
}

fn check_neighbor_diff<T: Dtype, D: TestDevice>(dev: &D, case: &Case, rng: &mut Rng) {
    let feat: Vec<T> = random(rng, case.shape.len(), 1.0);
    let want = reference::neighbor_diff(&feat, &case.shape, &case.centers).unwrap();
    let mut feat_dev = dev.upload(&feat);
    let mut rows_dev = dev.alloc_nan::<T>(want.len());
    let mut centers = TestCenters::upload(dev, &case.centers);
    let plan = neighbor::neighbor_diff::<T>(
        &case.shape,
        &centers.buf(dev),
        dev.buf(&mut feat_dev),
        dev.buf(&mut rows_dev),
    );
    let got = dev.run_and_read(plan, &rows_dev);
    let what = name::<T, D>(dev, "neighbor_diff", case);
    assert_close(&what, &got, &want, stored_tolerance::<T>(&want));
}

fn neighbor_diff_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(1);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for case in cases(dev, layout) {
            for_each_dtype!(check_neighbor_diff(dev, &case, &mut rng));
        }
    }
}

/// Runs the backward scatter of `grad_rows` into a copy of `initial` on `dev`.
/// Features uniform in `[-scale, scale)`, with a flat 3x3 patch at the top left (zero rows for
/// the centre (1, 1) when it is one).
fn features<T: Dtype>(rng: &mut Rng, shape: &FeatureShape, scale: f64) -> Vec<T> {
    let mut feat: Vec<T> = random(rng, shape.len(), scale);
    for b in 0..shape.batch() {
        for c in 0..shape.channels() {
            for (h, w) in (0..3).flat_map(|h| (0..3).map(move |w| (h, w))) {
                feat[shape.index(b, c, h, w).unwrap()] = T::from_f64(0.5 * scale);
            }
        }
    }
    feat
}

fn check_neighbor_diff_normalize<T: Dtype, D: TestDevice>(
    dev: &D,
    case: &Case,
    scale: f64,
    rng: &mut Rng,
) {
    let (shape, centers) = (&case.shape, &case.centers);
    let feat = features::<T>(rng, shape, scale);
    let diff = reference::neighbor_diff(&feat, shape, centers).unwrap();
    let want = reference::normalize_rows(&diff, shape.channels()).unwrap();
    let rows_len = neighbor::rows_len(shape, centers.len()).unwrap();
    let num_rows = rows_len / shape.channels();
    let mut feat_dev = dev.upload(&feat);
    let mut out_dev = dev.alloc_nan::<T>(rows_len);
    let mut norms_dev = dev.alloc_nan::<f32>(num_rows);
    let mut centers_dev = TestCenters::upload(dev, centers);
    let plan = neighbor::neighbor_diff_normalize::<T>(
        shape,
        &centers_dev.buf(dev),
        dev.buf(&mut feat_dev),
        dev.buf(&mut out_dev),
        dev.buf(&mut norms_dev),
    )
    .unwrap();
    dev.run(&plan);
    let what = format!(
        "{} scale {scale:e}",
        name::<T, D>(dev, "neighbor_diff_normalize", case)
    );
    let out = to_f64(&dev.download(&out_dev));
    assert_close(&what, &out, &want.rows, stored_tolerance::<T>(&want.rows));
    // Norms past float32's range are stored as inf; the others to float32's precision.
    let norms = to_f64(&dev.download(&norms_dev));
    let (mut got, mut expected) = (Vec::new(), Vec::new());
    for (&g, &n) in norms.iter().zip(&want.norms) {
        if n > f32::MAX as f64 {
            assert_eq!(g, f64::INFINITY, "{what}: norm {n:e}");
        } else {
            got.push(g);
            expected.push(n);
        }
    }
    assert_close(
        &format!("{what} norms"),
        &got,
        &expected,
        common::tolerance::F32_TOLERANCE,
    );
}

/// Every magnitude `T` holds, up to where the differences (twice the scale) exceed it: f16
/// features of 50,000 (differences up to 100,000, past f16's 65,504), f32 and bf16 features
/// from 1e-30 to 1e38 (squares overflow float from about 1.8e19, differences past f32::MAX
/// from 1.7e38).
fn scales<T: Dtype>() -> Vec<f64> {
    match T::SUFFIX {
        "f16" => vec![1e-3, 1.0, 5e4],
        _ => vec![1e-30, 1.0, 1e20, 3e37, 3e38],
    }
}

fn neighbor_diff_normalize_matches_reference<D: TestDevice>(dev: &D) {
    fn at_every_scale<T: Dtype, D: TestDevice>(dev: &D, case: &Case, rng: &mut Rng) {
        for scale in scales::<T>() {
            check_neighbor_diff_normalize::<T, D>(dev, case, scale, rng);
        }
    }
    let mut rng = Rng::new(21);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for case in cases(dev, layout) {
            for_each_dtype!(at_every_scale(dev, &case, &mut rng));
        }
    }
}

fn scatter<T: Dtype, D: TestDevice>(
    dev: &D,
    case: &Case,
    grad_rows: &[T],
    initial: &[T],
    scatter: Scatter,
) -> Vec<T> {
    let mut rows_dev = dev.upload(grad_rows);
    let mut feat_dev = dev.upload(initial);
    let mut centers = TestCenters::upload(dev, &case.centers);
    let plan = neighbor::neighbor_diff_backward::<T>(
        &case.shape,
        &centers.buf(dev),
        dev.buf(&mut rows_dev),
        dev.buf(&mut feat_dev),
        scatter,
    )
    .unwrap();
    dev.run(&plan);
    dev.download(&feat_dev)
}

fn check_neighbor_diff_backward<T: Dtype, D: TestDevice>(dev: &D, case: &Case, rng: &mut Rng) {
    let rows_len = neighbor::rows_len(&case.shape, case.centers.len()).unwrap();
    let grad_rows: Vec<T> = random(rng, rows_len, 1.0);
    // A non-zero starting gradient: the scatter adds to what the caller's buffer holds. What
    // it added (the result minus the start) is compared with the scatter itself.
    let initial: Vec<T> = random(rng, case.shape.len(), 1.0);
    let (grad_rows_f64, initial_f64) = (to_f64(&grad_rows), to_f64(&initial));
    let added =
        |sum: &[f64]| -> Vec<f64> { sum.iter().zip(&initial_f64).map(|(s, a)| s - a).collect() };
    let mut want = vec![0.0; case.shape.len()];
    reference::neighbor_diff_backward(&grad_rows_f64, &case.shape, &case.centers, &mut want)
        .unwrap();
    let model = |scatter| {
        let sum = scatter_model::<T>(
            &initial_f64,
            &grad_rows_f64,
            &case.shape,
            &case.centers,
            scatter,
        );
        added(&sum)
    };

    let got = to_f64(&scatter(dev, case, &grad_rows, &initial, Scatter::Atomic));
    let what = name::<T, D>(dev, "neighbor_diff_backward atomic", case);
    let tol = tolerance(&model(Scatter::Atomic), &want);
    assert_close(&what, &added(&got), &want, tol);

    let first = scatter(dev, case, &grad_rows, &initial, Scatter::Deterministic);
    let what = name::<T, D>(dev, "neighbor_diff_backward deterministic", case);
    let tol = tolerance(&model(Scatter::Deterministic), &want);
    assert_close(&what, &added(&to_f64(&first)), &want, tol);
    // On the emulator the second run is scheduled by another seed.
    let second = scatter(dev, case, &grad_rows, &initial, Scatter::Deterministic);
    let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&first) == bits(&second),
        "{what}: two runs differ in their bits"
    );
}

fn neighbor_diff_backward_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(2);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        for case in cases(dev, layout) {
            for_each_dtype!(check_neighbor_diff_backward(dev, &case, &mut rng));
        }
    }
}

on_every_device!(
    neighbor_diff_matches_reference,
    neighbor_diff_normalize_matches_reference,
    neighbor_diff_backward_matches_reference
);
