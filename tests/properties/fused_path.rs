//! The fused path on the emulator against the reference: one layer (`LayerPlan`) and the rows
//! loss (`RowsPlan`), for every storage type.

use super::*;

/// One layer on the emulator against the reference: the loss, and the gradients of both
/// feature maps (deterministic scatter into zeros) wherever the reference's gradients, and the
/// gradients of the difference rows the kernels store on the way, fit in `T`.
fn layer_agrees<T: Dtype>(case: &LayerCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let (shape, centers) = (case.shape(), case.centers());
    let (feat_q, feat_k) = case.features::<T>();
    let (feat_q_f64, feat_k_f64) = (to_f64(&feat_q), to_f64(&feat_k));
    let exact = reference::ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, case.tau, true)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let model = layer_model::<T>(&feat_q_f64, &feat_k_f64, &shape, &centers, case.tau, 1.0);

    let plan = LayerPlan::new(shape, centers.len(), case.tau).unwrap();
    let mut ws = layer_workspace::<T, _>(&dev, &shape, centers.len());
    let mut centers_dev = TestCenters::upload(&dev, &centers);
    let centers_buf = centers_dev.buf(&dev);
    let (mut feat_q_dev, mut feat_k_dev) = (dev.upload(&feat_q), dev.upload(&feat_k));
    let (feat_q_buf, feat_k_buf) = (dev.buf(&mut feat_q_dev), dev.buf(&mut feat_k_dev));
    let mut grad_q_dev = dev.upload(&vec![T::from_f64(0.0); shape.len()]);
    let mut grad_k_dev = dev.upload(&vec![T::from_f64(0.0); shape.len()]);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &centers_buf, feat_q_buf, feat_k_buf, &bufs)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    let scatter = Scatter::Deterministic;
    plan.backward::<T, _>(
        &dev.launcher(),
        &centers_buf,
        &bufs,
        None,
        grad_q_buf,
        Some(grad_k_buf),
        scatter,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let loss = dev.download(&ws.rows.loss)[0] as f64;
    let tol = tolerance_at(&[model.loss], &[exact.loss], case.tau);
    close(&format!("loss {}", T::SUFFIX), &[loss], &[exact.loss], tol)?;
    let zeros = vec![0.0; shape.len()];
    let sides = [
        ("q", &grad_q_dev, &exact.grad_feat_q, &model.grad_rows_q),
        (
            "k",
            &grad_k_dev,
            exact.grad_feat_k.as_ref().unwrap(),
            &model.grad_rows_k,
        ),
    ];
    for (side, got, want, grad_rows) in sides {
        if !(representable::<T>(want) && representable::<T>(grad_rows)) {
            continue; // the true gradient is beyond T's range: inf, as any overflow
        }
        let stored = scatter_model::<T>(&zeros, grad_rows, &shape, &centers, scatter);
        let what = format!("grad_feat_{side} {}", T::SUFFIX);
        close(
            &what,
            &to_f64(&dev.download(got)),
            want,
            tolerance_at(&stored, want, case.tau),
        )?;
    }
    Ok(())
}

/// Layers of 2 to 6 channels (rows of width 1 have an ill-conditioned gradient, see
/// tests/kernel_layer.rs) on maps up to 7x7, temperatures from 0.001 to 1 (f16 from 0.01:
/// gradients of 1/tau past its range otherwise), features over every magnitude the type
/// holds: f32 and bf16 from 1e-30 to 1e37, f16 from 1 to 5e4 (differences past 65504).
#[test]
fn layer_on_the_emulator_agrees_with_the_reference() {
    let wide = || layer_cases(2..7, 7, -30.0..37.0, -3.0..0.0);
    check_emulated("layer f32", 16, 3, wide(), |case| {
        layer_agrees::<f32>(&case)
    });
    check_emulated("layer bf16", 16, 4, wide(), |case| {
        layer_agrees::<half::bf16>(&case)
    });
    let f16 = layer_cases(2..7, 7, 0.0..4.7, -2.0..0.0);
    check_emulated("layer f16", 16, 5, f16, |case| {
        layer_agrees::<half::f16>(&case)
    });
}

/// The rows loss on the emulator against the reference (composed stage by stage), from rows
/// whose magnitudes span `spread` orders below 10^exponent.
fn rows_agree<T: Dtype>(case: &RowsCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let shape = case.shape();
    let (rows_q, rows_k) = case.row_pair::<T>();
    let (rows_q_f64, rows_k_f64) = (to_f64(&rows_q), to_f64(&rows_k));
    let exact = rows_model::<f64>(&rows_q_f64, &rows_k_f64, &shape, case.tau, 1.0);
    let model = rows_model::<T>(&rows_q_f64, &rows_k_f64, &shape, case.tau, 1.0);

    let plan = RowsPlan::new(shape, case.tau).unwrap();
    let mut ws = RowsWorkspace::lengths(&shape)
        .unwrap()
        .try_map(dev.nan_filled::<T>(), dev.nan_filled::<f32>())
        .unwrap();
    ws.one = dev.upload(&[1.0f32]);
    let (mut rows_q_dev, mut rows_k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let (mut grad_q_dev, mut grad_k_dev) = (
        dev.alloc_nan::<T>(shape.len()),
        dev.alloc_nan::<T>(shape.len()),
    );
    let (rows_q_buf, rows_k_buf) = (dev.buf(&mut rows_q_dev), dev.buf(&mut rows_k_dev));
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), rows_q_buf, rows_k_buf, &bufs)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    plan.backward::<T, _>(&dev.launcher(), &bufs, None, grad_q_buf, Some(grad_k_buf))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let got = RowsModel {
        loss: dev.download(&ws.loss)[0] as f64,
        grad_rows_q: to_f64(&dev.download(&grad_q_dev)),
        grad_rows_k: to_f64(&dev.download(&grad_k_dev)),
    };
    rows_outcome_agrees::<T>("rows", &got, &exact, &model, case.tau)
}

/// The rows loss (a learned head's outputs) for every storage type, same ranges as the layer.
#[test]
fn rows_on_the_emulator_agree_with_the_reference() {
    let wide = || rows_cases(-30.0..37.0, -3.0..0.0);
    check_emulated("rows f32", 16, 6, wide(), |case| rows_agree::<f32>(&case));
    check_emulated("rows bf16", 16, 7, wide(), |case| {
        rows_agree::<half::bf16>(&case)
    });
    let f16 = rows_cases(-2.0..4.7, -2.0..0.0);
    check_emulated("rows f16", 16, 8, f16, |case| {
        rows_agree::<half::f16>(&case)
    });
}
