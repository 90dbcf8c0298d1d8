//! `kernels/normalize.cu` against the CPU reference, on the emulator and the GPU, for every
//! storage type: the normalised rows and their norms, and the backward, including rows that
//! are exactly zero (finite gradient `g/eps`, never NaN) and tiny ones.

use crate::common;

use ccpl::launch::normalize;
use ccpl::{Dtype, RowShape, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{random, row_shapes};
use common::models::normalize_backward_from_normalized;
use common::tolerance::{F32_TOLERANCE, largest, rounded, stored_tolerance, to_f64, tolerance};

/// Odd widths, C = 1, S = 8, a wide row; on the GPU S = 8192 and C = 4099.
fn shapes<D: TestDevice>(dev: &D) -> Vec<RowShape> {
    row_shapes(
        dev,
        &[(2, 24, 37), (1, 8, 1), (3, 16, 300), (1, 40, 33)],
        &[(1, 8192, 65), (2, 40, 4099)],
    )
}

/// Random rows with row 0 (and row 5 when there is one) exactly zero and row 3 tiny.
fn rows<T: Dtype>(rng: &mut Rng, shape: &RowShape) -> Vec<T> {
    let c = shape.width();
    let mut rows: Vec<T> = random(rng, shape.len(), 1.0);
    let count = shape.batch() * shape.rows();
    for r in [0, 5].into_iter().filter(|&r| r < count) {
        rows[r * c..(r + 1) * c].fill(T::from_f64(0.0));
    }
    if count > 3 {
        for v in &mut rows[3 * c..4 * c] {
            *v = T::from_f64(v.to_f64() * 1e-3);
        }
    }
    rows
}

fn zero_rows(shape: &RowShape) -> Vec<usize> {
    [0, 5]
        .into_iter()
        .filter(|&r| r < shape.batch() * shape.rows())
        .collect()
}

fn name<T: Dtype, D: TestDevice>(dev: &D, what: &str, s: &RowShape) -> String {
    format!(
        "{what} {} B={} S={} C={} on the {}",
        T::SUFFIX,
        s.batch(),
        s.rows(),
        s.width(),
        dev.name()
    )
}

/// `normalize_rows` of `rows` on `dev`, its outputs written over NaN: the buffers of the
/// rows, of the normalised rows and of the norms.
fn forward_on<T: Dtype, D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    rows: &[T],
) -> (D::Mem<T>, D::Mem<T>, D::Mem<f32>) {
    let mut rows_dev = dev.upload(rows);
    let mut out_dev = dev.alloc_nan::<T>(shape.len());
    let mut norms_dev = dev.alloc_nan::<f32>(shape.count());
    let (rows_buf, out_buf) = (dev.buf(&mut rows_dev), dev.buf(&mut out_dev));
    let norms_buf = dev.buf(&mut norms_dev);
    dev.run(&normalize::normalize_rows::<T>(shape, rows_buf, out_buf, norms_buf).unwrap());
    (rows_dev, out_dev, norms_dev)
}

fn check_normalize_rows<T: Dtype, D: TestDevice>(dev: &D, shape: &RowShape, rng: &mut Rng) {
    let rows = rows::<T>(rng, shape);
    let want = reference::normalize_rows(&to_f64(&rows), shape.width()).unwrap();
    let (_, out_dev, norms_dev) = forward_on(dev, shape, &rows);
    let out = to_f64(&dev.download(&out_dev));
    let norms = to_f64(&dev.download(&norms_dev));
    let what = name::<T, D>(dev, "normalize_rows", shape);
    assert_close(&what, &out, &want.rows, stored_tolerance::<T>(&want.rows));
    assert_close(&format!("{what} norms"), &norms, &want.norms, F32_TOLERANCE);
    for r in zero_rows(shape) {
        let row = &out[r * shape.width()..(r + 1) * shape.width()];
        assert!(
            row.iter().all(|&v| v == 0.0),
            "{what}: zero row {r} gave {row:?}"
        );
    }
}

fn normalize_rows_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(3);
    for shape in shapes(dev) {
        for_each_dtype!(check_normalize_rows(dev, &shape, &mut rng));
    }
}

/// Largest relative spacing of `T` (its unit roundoff times 2).
fn epsilon<T: Dtype>() -> f64 {
    match T::SUFFIX {
        "f16" => 2f64.powi(-10),
        "bf16" => 2f64.powi(-7),
        _ => 2f64.powi(-23),
    }
}

fn check_normalize_rows_backward<T: Dtype, D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    rng: &mut Rng,
) {
    let rows = rows::<T>(rng, shape);
    let grad_out: Vec<T> = random(rng, shape.len(), 1.0);
    let rows_f64 = to_f64(&rows);
    let want =
        reference::normalize_rows_backward(&rows_f64, &to_f64(&grad_out), shape.width()).unwrap();
    // The forward's norms as the kernel stores them (float32).
    let norms: Vec<f32> = reference::normalize_rows(&rows_f64, shape.width())
        .unwrap()
        .norms
        .iter()
        .map(|&n| n as f32)
        .collect();
    let mut rows_dev = dev.upload(&rows);
    let mut norms_dev = dev.upload(&norms);
    let mut grad_out_dev = dev.upload(&grad_out);
    let mut grad_rows_dev = dev.alloc_nan::<T>(shape.len());
    let plan = normalize::normalize_rows_backward::<T>(
        shape,
        dev.buf(&mut rows_dev),
        dev.buf(&mut norms_dev),
        dev.buf(&mut grad_out_dev),
        dev.buf(&mut grad_rows_dev),
    );
    let got = dev.run_and_read(plan, &grad_rows_dev);
    let what = name::<T, D>(dev, "normalize_rows_backward", shape);

    // Zero rows: g/eps, about 1e7 times the others, so they are checked on their own,
    // element by element against the reference stored in T (f16 overflows to +-inf there:
    // g/1e-7 exceeds its range).
    let zero = zero_rows(shape);
    let c = shape.width();
    for &r in &zero {
        let want_t = rounded::<T>(&want[r * c..(r + 1) * c]);
        for (i, (&g, &w)) in got[r * c..(r + 1) * c].iter().zip(&want_t).enumerate() {
            let ok = if w.is_finite() {
                (g - w).abs() <= 2.0 * epsilon::<T>() * w.abs()
            } else {
                g == w
            };
            assert!(ok, "{what}: zero row {r}, element {i}: got {g}, want {w}");
        }
    }
    let (mut got_rest, mut want_rest) = (Vec::new(), Vec::new());
    for r in (0..shape.batch() * shape.rows()).filter(|r| !zero.contains(r)) {
        got_rest.extend_from_slice(&got[r * c..(r + 1) * c]);
        want_rest.extend_from_slice(&want[r * c..(r + 1) * c]);
    }
    if !want_rest.is_empty() {
        let tol = stored_tolerance::<T>(&want_rest);
        assert_close(&what, &got_rest, &want_rest, tol);
    }
}

fn normalize_rows_backward_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(4);
    for shape in shapes(dev) {
        for_each_dtype!(check_normalize_rows_backward(dev, &shape, &mut rng));
    }
}

/// Rows at `scale`, row 1 with one element near T's largest value (its norm is that element,
/// its normalised row about (1, 0, ...)), the rows normalised, then back through the
/// normalisation from the rows and from the normalised rows (what the losses keep): squares of
/// float32 overflow from about 1.8e19 and underflow below about 1e-19, so all of this checks
/// the norm taken at scale.
fn check_at_scale<T: Dtype, D: TestDevice>(dev: &D, shape: &RowShape, scale: f64, rng: &mut Rng) {
    let c = shape.width();
    let mut rows: Vec<T> = random(rng, shape.len(), scale);
    rows[c] = T::from_f64(0.9 * largest::<T>());
    let rows_f64 = to_f64(&rows);
    let want = reference::normalize_rows(&rows_f64, c).unwrap();
    let what = format!(
        "{} scale {scale:e}",
        name::<T, D>(dev, "normalize_rows", shape)
    );
    let (mut rows_dev, mut out_dev, mut norms_dev) = forward_on(dev, shape, &rows);
    let out = to_f64(&dev.download(&out_dev));
    assert_close(&what, &out, &want.rows, stored_tolerance::<T>(&want.rows));
    let norms = to_f64(&dev.download(&norms_dev));
    assert_close(&format!("{what} norms"), &norms, &want.norms, F32_TOLERANCE);

    let grad_out: Vec<T> = random(rng, shape.len(), 1.0);
    let grad_out_f64 = to_f64(&grad_out);
    let exact = reference::normalize_rows_backward(&rows_f64, &grad_out_f64, c).unwrap();
    // From the normalised rows: the model rounds them to T, as the forward stored them.
    let model = rounded::<T>(&normalize_backward_from_normalized(
        &rounded::<T>(&want.rows),
        &want.norms,
        &grad_out_f64,
        c,
    ));
    let mut grad_out_dev = dev.upload(&grad_out);
    for (normalized, saved) in [(false, &mut rows_dev), (true, &mut out_dev)] {
        let mut grad_rows_dev = dev.alloc_nan::<T>(shape.len());
        let plan = if normalized {
            normalize::normalize_rows_backward_normalized::<T>
        } else {
            normalize::normalize_rows_backward::<T>
        };
        let plan = plan(
            shape,
            dev.buf(saved),
            dev.buf(&mut norms_dev),
            dev.buf(&mut grad_out_dev),
            dev.buf(&mut grad_rows_dev),
        );
        let got = dev.run_and_read(plan, &grad_rows_dev);
        let tol = if normalized {
            tolerance(&model, &exact)
        } else {
            stored_tolerance::<T>(&exact)
        };
        assert_close(
            &format!("{what} backward normalized={normalized}"),
            &got,
            &exact,
            tol,
        );
    }
}

fn normalize_rows_at_any_scale<D: TestDevice>(dev: &D) {
    fn at_every_scale<T: Dtype, D: TestDevice>(dev: &D, shape: &RowShape, rng: &mut Rng) {
        let scales = match T::SUFFIX {
            "f16" => vec![1e-4, 3e4],
            _ => vec![1e-30, 1e20, 1e30],
        };
        for scale in scales {
            check_at_scale::<T, D>(dev, shape, scale, rng);
        }
    }
    let mut rng = Rng::new(5);
    for (b, s, c) in [(2, 8, 37), (1, 8, 1), (1, 9, 70)] {
        let shape = RowShape::new(b, s, c).unwrap();
        for_each_dtype!(at_every_scale(dev, &shape, &mut rng));
    }
}

on_every_device!(
    normalize_rows_matches_reference,
    normalize_rows_at_any_scale,
    normalize_rows_backward_matches_reference
);
