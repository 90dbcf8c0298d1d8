//! The rows loss of a learned head on the small-S path (`SmallRowsPlan`) against the reference
//! composed stage by stage, at the edges of float's range too, and its mean of tiny row losses.

use super::*;

/// The rows loss of a learned head on the small-S path against the reference composed stage
/// by stage: odd sizes, S = 8, S past a 16-row tile, C past a 64-column tile, S = 512; every
/// type; the default upstream into q only, then 2.5 into both sides, written over NaN.
fn rows_match_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(19);
    for (b, s, c) in [
        (2, 104, 37),
        (1, 8, 3),
        (1, 72, 70),
        (3, 65, 5),
        (1, 512, 16),
    ] {
        let shape = RowShape::new(b, s, c).unwrap();
        for_each_dtype!(check_rows(dev, &shape, &mut rng, Magnitudes(3.0, 0.5)));
    }
}

/// Rows at the edges of float's range, f32 and bf16: of 1e20, whose raw products exceed it;
/// rows of q near `f32::MAX` whose norms exceed it, against rows of k of 1e-3 (their raw
/// products fit: q's rows divided by their norm are right only if that norm's reciprocal is
/// not rounded to 0). f16 near 65504 and at 1e-3, where float's products have room.
fn rows_at_extreme_magnitudes<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(29);
    let shape = RowShape::new(2, 24, 5).unwrap();
    for m in [Magnitudes(1e20, 1e20), Magnitudes(3e38, 1e-3)] {
        check_rows::<f32, D>(dev, &shape, &mut rng, m);
        check_rows::<half::bf16, D>(dev, &shape, &mut rng, m);
    }
    for m in [Magnitudes(6e4, 6e4), Magnitudes(1e-3, 1e-3)] {
        check_rows::<half::f16, D>(dev, &shape, &mut rng, m);
    }
}

/// The magnitudes of the rows of q and k in a rows case: values uniform in `[-m, m)`.
#[derive(Clone, Copy, Debug)]
struct Magnitudes(f64, f64);

fn check_rows<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    rng: &mut Rng,
    magnitudes: Magnitudes,
) {
    let label = format!(
        "{} B={} S={} C={} {magnitudes:?} on the {}",
        T::SUFFIX,
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    );
    let rows_q: Vec<T> = random(rng, shape.len(), magnitudes.0);
    let rows_k: Vec<T> = random(rng, shape.len(), magnitudes.1);
    let (q, k) = (to_f64(&rows_q), to_f64(&rows_k));
    // A row whose norm exceeds float's range has a gradient below |g| / f32::MAX, which the
    // kernels give as 0 (README, known limits): finite, not compared.
    let past_float = |rows: &[f64]| {
        let norms = reference::normalize_rows(rows, shape.width())
            .unwrap()
            .norms;
        norms.iter().any(|&n| n > f32::MAX as f64)
    };
    let plan = SmallRowsPlan::new(*shape, TAU).unwrap();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let (mut q_dev, mut k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let launcher = Counting::new(dev.launcher());
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(
        &launcher,
        dev.buf(&mut q_dev),
        dev.buf(&mut k_dev),
        &bufs,
        dev.buf(&mut counters),
    )
    .unwrap_or_else(|e| panic!("forward {label}: {e}"));
    assert_eq!(launcher.take().len(), 1, "the forward is one launch");
    let loss = dev.download(&ws.loss)[0] as f64;
    let exact = rows_model::<f64>(&q, &k, shape, TAU, 1.0);
    assert_close(
        &format!("rows loss {label}"),
        &[loss],
        &[exact.loss],
        F32_TOLERANCE,
    );

    for (upstream, both) in BACKWARDS {
        let u = upstream.unwrap_or(1.0) as f64;
        let exact = rows_model::<f64>(&q, &k, shape, TAU, u);
        let mut grad_q = dev.alloc_nan::<T>(shape.len());
        let mut grad_k = dev.alloc_nan::<T>(shape.len());
        let mut upstream_dev = dev.upload(&[upstream.unwrap_or(f32::NAN)]);
        let upstream_buf = upstream.map(|_| dev.buf(&mut upstream_dev));
        let grad_k_buf = dev.buf(&mut grad_k);
        plan.backward::<T, _>(
            &launcher,
            &bufs,
            upstream_buf,
            dev.buf(&mut grad_q),
            both.then_some(grad_k_buf),
        )
        .unwrap_or_else(|e| panic!("backward {label}: {e}"));
        assert_eq!(
            launcher.take().len(),
            1 + both as usize,
            "the backward: a scale (+ the content side)"
        );
        let got = to_f64(&dev.download(&grad_q));
        let what = format!("rows grad_rows_q upstream={u} {label}");
        if past_float(&q) {
            assert!(got.iter().all(|g| g.is_finite()), "{what}: not finite");
        } else {
            assert_close(
                &what,
                &got,
                &exact.grad_rows_q,
                stored_tolerance::<T>(&exact.grad_rows_q),
            );
        }
        let got = to_f64(&dev.download(&grad_k));
        if both {
            let what = format!("rows grad_rows_k upstream={u} {label}");
            assert_close(
                &what,
                &got,
                &exact.grad_rows_k,
                stored_tolerance::<T>(&exact.grad_rows_k),
            );
        } else {
            assert!(
                got.iter().all(|g| g.is_nan()),
                "grad_rows_k written without being asked for: {label}"
            );
        }
    }
}

/// Row losses too small for float once divided by `B S`, though their mean is a normal
/// float: 2000 images of the 16 unit vectors of 16 channels, q = k, at tau = 1/89.5, so every
/// row's loss is `log1p(15 exp(-89.5 / (1 + eps)^2))`, about 2.1e-38, and its share of the
/// mean about 6.5e-43, a subnormal of 9 bits. Summed in double, the loss is as precise as the
/// row losses.
fn tiny_row_losses<D: TestDevice>(dev: &D) {
    let (b, s) = (2000, 16);
    let shape = RowShape::new(b, s, s).unwrap();
    let tau = Tau::new(1.0 / 89.5).unwrap();
    let rows: Vec<f32> = (0..shape.len())
        .map(|e| f32::from(e / s % s == e % s))
        .collect();
    let plan = SmallRowsPlan::new(shape, tau).unwrap();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let (mut q_dev, mut k_dev) = (dev.upload(&rows), dev.upload(&rows));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<f32, _>(
        &dev.launcher(),
        dev.buf(&mut q_dev),
        dev.buf(&mut k_dev),
        &bufs,
        dev.buf(&mut counters),
    )
    .unwrap();
    // Every row's logits: L_ii = |v|^2 / tau with v = e_i / (1 + eps), the others 0; so its
    // loss is ln(exp(L_ii) + 15) - L_ii. In closed form: the reference's lse - L_ii cancels to
    // 0 in float64 here.
    let eps = ccpl::ffi::CCPL_NORM_EPS;
    let exact = (15.0 * (-1.0 / ((1.0 + eps) * (1.0 + eps) * tau.get())).exp()).ln_1p();
    assert!(exact > f32::MIN_POSITIVE as f64 && exact < 1e-36);
    let loss = dev.download(&ws.loss)[0] as f64;
    let what = format!("loss of tiny row losses on the {}", dev.name());
    let tol = tolerance_at(&[exact], &[exact], tau);
    assert_close(&what, &[loss], &[exact], tol);
}

on_every_device!(
    rows_match_reference,
    rows_at_extreme_magnitudes,
    tiny_row_losses
);
