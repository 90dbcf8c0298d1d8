//! The whole loss of several layers (`LossPlan`: small-S layers, with a fused one in some
//! cases) and the rows loss on the small-S path (`SmallRowsPlan`) on the emulator against the
//! reference, for every storage type.

use super::*;

/// The loss of several layers at one temperature: small-S layers (`S = 8N` up to 160 here),
/// and in some cases a layer past `S = 512` on the fused path, each of its own magnitude.
#[derive(Debug, Clone)]
struct LossCase {
    /// Every layer's `tau` is the loss's.
    layers: Vec<LayerCase>,
}

impl LossCase {
    fn tau(&self) -> Tau {
        self.layers[0].tau
    }
}

/// One to three small-S layers (maps up to 9x9, up to 20 centres, 2 to 6 channels), with
/// `fused` a layer of 65 to 68 centres of 2 channels (S 520 to 544, the fused path) at a random place among
/// them; features up to 10^`exponents` (each layer its own), temperatures 10^`log_taus`.
fn loss_cases(
    exponents: Range<f64>,
    log_taus: Range<f64>,
    fused: bool,
) -> impl Strategy<Value = LossCase> {
    let small = layer_cases_in(1..3, 2..7, 3..10, 1..21, exponents.clone(), 0.0..1.0);
    let large = layer_cases_in(1..2, 2..3, 11..12, 65..69, exponents, 0.0..1.0);
    let layers = (
        prop::collection::vec(small, 1..4),
        large,
        any::<prop::sample::Index>(),
    );
    (layers, log_taus).prop_map(move |((mut layers, large, at), t)| {
        if fused {
            layers.insert(at.index(layers.len() + 1), large);
        }
        for l in &mut layers {
            l.tau = Tau::new(10f64.powf(t)).unwrap();
        }
        LossCase { layers }
    })
}

/// The whole loss on the emulator (`LossPlan`, the centres given) against the reference
/// `ccp_loss`: the loss, and the gradients of both sides of every layer (the default upstream
/// into zeros: compared directly), wherever the exact gradient and that of the difference
/// rows fit in `T`. The small-S layers compute in float from the inputs in `T`: their model
/// is the exact result rounded once; a fused layer's is `layer_model`'s.
fn loss_agrees<T: Dtype>(case: &LossCase) -> Result<(), TestCaseError> {
    let tau = case.tau();
    let dev = Emu::new(case.layers[0].seed);
    let shapes: Vec<_> = case.layers.iter().map(|l| (l.shape(), l.num_s)).collect();
    let plan = LossPlan::new(&shapes, tau).map_err(failed)?;
    let centers: Vec<Centers> = case.layers.iter().map(|l| l.centers()).collect();
    let feats: Vec<(Vec<T>, Vec<T>)> = case.layers.iter().map(|l| l.features()).collect();

    let mut ws = loss_workspace::<T, Emu>(&dev, &plan, 0);
    for (own, c) in ws.centers.iter_mut().zip(&centers) {
        own.flat = dev.upload(c.flat());
        own.map = dev.upload(&c.center_map());
    }
    let mut feats_dev: Vec<_> = feats
        .iter()
        .map(|(q, k)| (dev.upload(q), dev.upload(k)))
        .collect();
    let mut grads_dev: Vec<_> = shapes
        .iter()
        .map(|(s, _)| {
            let zeros = vec![T::from_f64(0.0); s.len()];
            (dev.upload(&zeros), dev.upload(&zeros))
        })
        .collect();
    let feat_bufs: Vec<_> = feats_dev
        .iter_mut()
        .map(|(q, k)| (dev.buf(q), dev.buf(k)))
        .collect();
    let grad_q: Vec<_> = grads_dev.iter_mut().map(|(q, _)| dev.buf(q)).collect();
    let grad_k: Vec<_> = grads_dev.iter_mut().map(|(_, k)| dev.buf(k)).collect();
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), &feat_bufs, &bufs, Draw::Given)
        .map_err(failed)?;
    plan.backward::<T, _>(&dev.launcher(), &bufs, None, &grad_q, Some(&grad_k))
        .map_err(failed)?;

    let inputs: Vec<LayerInput<'_, T>> = case
        .layers
        .iter()
        .zip(&feats)
        .zip(&centers)
        .map(|((l, (q, k)), c)| LayerInput {
            feat_q: q,
            feat_k: k,
            shape: l.shape(),
            centers: c.clone(),
        })
        .collect();
    let (exact_loss, exact) = reference::ccp_loss(&inputs, tau, true).map_err(failed)?;
    let models: Vec<RowsModel> = (0..shapes.len())
        .map(|l| {
            let (q, k) = (to_f64(&feats[l].0), to_f64(&feats[l].1));
            let shape = &shapes[l].0;
            if plan.is_small(l) {
                layer_model::<f64>(&q, &k, shape, &centers[l], tau, 1.0)
            } else {
                layer_model::<T>(&q, &k, shape, &centers[l], tau, 1.0)
            }
        })
        .collect();
    let model_loss: f64 = models.iter().map(|m| m.loss).sum();
    let loss = dev.download(&ws.loss)[0] as f64;
    let tol = tolerance_at(&[model_loss], &[exact_loss], tau);
    close(&format!("loss {}", T::SUFFIX), &[loss], &[exact_loss], tol)?;
    for (l, ((shape, _), model)) in shapes.iter().zip(&models).enumerate() {
        let zeros = vec![0.0; shape.len()];
        let sides = [
            (
                "q",
                &grads_dev[l].0,
                &exact[l].grad_feat_q,
                &model.grad_rows_q,
            ),
            (
                "k",
                &grads_dev[l].1,
                exact[l].grad_feat_k.as_ref().unwrap(),
                &model.grad_rows_k,
            ),
        ];
        for (side, got, want, grad_rows) in sides {
            if !(representable::<T>(want) && representable::<T>(grad_rows)) {
                continue; // the true gradient is beyond T's range: inf, as any overflow
            }
            let stored = if plan.is_small(l) {
                rounded::<T>(want)
            } else {
                let scatter = Scatter::Deterministic;
                scatter_model::<T>(&zeros, grad_rows, shape, &centers[l], scatter)
            };
            let what = format!("layer {l} grad_feat_{side} {}", T::SUFFIX);
            let got = to_f64(&dev.download(got));
            close(&what, &got, want, tolerance_at(&stored, want, tau))?;
        }
    }
    Ok(())
}

/// The whole loss for every storage type: f32 and bf16 from features of 1e-30 to 1e37, f16
/// from 1 to 5e4 (differences past 65504), temperatures from 0.001 to 1 (f16 from 0.01); small-S
/// layers, then a few cases with a fused layer among them (about 0.7 s each on the emulator in
/// f32, 1.6 s in the 16-bit types, against 0.1 s for a case of small-S layers).
#[test]
fn loss_on_the_emulator_agrees_with_the_reference() {
    let wide = |fused| loss_cases(-30.0..37.0, -3.0..0.0, fused);
    let f16 = |fused| loss_cases(0.0..4.7, -2.0..0.0, fused);
    // Per storage type: its cases and seed, of small-S layers, then with a fused layer.
    let runs = [
        (
            "",
            false,
            [("f32", 16, 9), ("bf16", 16, 10), ("f16", 16, 11)],
        ),
        (
            ", a fused layer",
            true,
            [("f32", 2, 17), ("bf16", 1, 18), ("f16", 1, 19)],
        ),
    ];
    for (what, fused, per_dtype) in runs {
        for (name, cases, seed) in per_dtype {
            let strategy = if name == "f16" {
                f16(fused)
            } else {
                wide(fused)
            };
            let name_of_run = format!("loss {name}{what}");
            ccpl::dispatch_dtype!(name, T => check_emulated(&name_of_run, cases, seed, strategy, |case| {
                loss_agrees::<T>(&case)
            }), other => unreachable!("{other} is a storage type's name"));
        }
    }
}

/// The rows loss on the small-S path (`SmallRowsPlan`, what `CcpRows` runs up to S = 512) on
/// the emulator against the reference: the loss, and both sides' gradients (upstream 1 or
/// 2.5 from device memory, written over NaN), compared directly; the model of a gradient is
/// the exact one rounded once (the path computes in float from the rows in `T`).
fn small_rows_agree<T: Dtype>(case: &RowsCase) -> Result<(), TestCaseError> {
    let dev = Emu::new(case.seed);
    let shape = case.shape();
    let (rows_q, rows_k) = case.row_pair::<T>();
    let upstream = if case.seed.is_multiple_of(2) {
        1.0
    } else {
        2.5
    };
    let exact = rows_model::<f64>(
        &to_f64(&rows_q),
        &to_f64(&rows_k),
        &shape,
        case.tau,
        upstream,
    );

    let plan = SmallRowsPlan::new(shape, case.tau).map_err(failed)?;
    let (mut ws, mut counters) = small_rows_workspace(&dev, &plan);
    let mut upstream_dev = dev.upload(&[upstream as f32]);
    let (mut rows_q_dev, mut rows_k_dev) = (dev.upload(&rows_q), dev.upload(&rows_k));
    let (mut grad_q_dev, mut grad_k_dev) = (
        dev.alloc_nan::<T>(shape.len()),
        dev.alloc_nan::<T>(shape.len()),
    );
    let (rows_q_buf, rows_k_buf) = (dev.buf(&mut rows_q_dev), dev.buf(&mut rows_k_dev));
    let counters_buf = dev.buf(&mut counters);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    plan.forward::<T, _>(&dev.launcher(), rows_q_buf, rows_k_buf, &bufs, counters_buf)
        .map_err(failed)?;
    let (grad_q_buf, grad_k_buf) = (dev.buf(&mut grad_q_dev), dev.buf(&mut grad_k_dev));
    let upstream_buf = (upstream != 1.0).then(|| dev.buf(&mut upstream_dev));
    plan.backward::<T, _>(
        &dev.launcher(),
        &bufs,
        upstream_buf,
        grad_q_buf,
        Some(grad_k_buf),
    )
    .map_err(failed)?;

    let got = RowsModel {
        loss: dev.download(&ws.loss)[0] as f64,
        grad_rows_q: to_f64(&dev.download(&grad_q_dev)),
        grad_rows_k: to_f64(&dev.download(&grad_k_dev)),
    };
    // The path computes in float: the loss as exact as float holds it, each gradient the
    // exact one rounded once to T.
    let model = RowsModel {
        loss: exact.loss,
        grad_rows_q: rounded::<T>(&exact.grad_rows_q),
        grad_rows_k: rounded::<T>(&exact.grad_rows_k),
    };
    rows_outcome_agrees::<T>("small rows", &got, &exact, &model, case.tau)
}

/// The small-S rows loss for every storage type: shapes of 1 to 100 rows an image (several
/// 16-row tiles, more than one 64-column tile of the other side) and 2 to 70 columns (more than
/// one 64-column tile); the value and temperature ranges of the fused rows loss. (S = 512, the
/// largest, is tests/kernel_small_s.rs's: 3.5 s a case here.)
#[test]
fn small_rows_on_the_emulator_agree_with_the_reference() {
    let wide = || rows_cases_in(1usize..101, 2..71, -30.0..37.0, -3.0..0.0);
    check_emulated("small rows f32", 24, 12, wide(), |case| {
        small_rows_agree::<f32>(&case)
    });
    check_emulated("small rows bf16", 24, 13, wide(), |case| {
        small_rows_agree::<half::bf16>(&case)
    });
    let f16 = rows_cases_in(1usize..101, 2..71, -2.0..4.7, -2.0..0.0);
    check_emulated("small rows f16", 24, 14, f16, |case| {
        small_rows_agree::<half::f16>(&case)
    });
}
