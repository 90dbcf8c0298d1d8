//! Each op on candle's CPU backend against ccpl's float64 reference, in every storage type, on
//! random inputs of odd sizes: the loss, the gradients candle's autograd hands back (with an
//! upstream gradient of 2.5, to the generated side always and to the content side exactly when
//! candle tracks it), inputs of any stride and offset, and the errors of bad inputs.
//!
//! On the CPU an op is the reference evaluated on the stored input values, its results rounded
//! once to the storage type. So each result must EQUAL the reference's rounded to the dtype:
//! any difference is a fault of the glue (a wrong buffer, offset, side or scale), not rounding.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use ccpl::{Centers, FeatureShape, Layout, RowShape, Tau, reference};
use ccpl_candle::{ccp_layer_loss, neighbor_diff, rows_loss};
use common::{CPU_DTYPES, Rng, TensorRng, assert_same, rounded, values};

const UPSTREAM: f64 = 2.5;

/// `(B, C, H, W, num_s)`: odd sizes; the whole interior as centres (windows overlap, so the
/// scatter adds up); a 3x3 map (one centre, S = 8); a single image.
const MAPS: [(usize, usize, usize, usize, usize); 3] =
    [(2, 5, 7, 9, 13), (1, 3, 3, 3, 4), (3, 4, 5, 6, 100)];

/// `(B, S, C)` of the rows loss: odd sizes, S = 8, C = 1.
const ROWS: [(usize, usize, usize); 3] = [(2, 24, 7), (1, 8, 3), (3, 16, 1)];

/// `loss * UPSTREAM` backward; the gradients of `q` and, when given, `k`.
fn grads(loss: &Tensor, q: &Tensor, k: Option<&Tensor>) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let grads = (loss * UPSTREAM)?.backward()?;
    let q = values(grads.get(q).expect("the generated side gets a gradient"))?;
    let k = k.map(|k| {
        values(
            grads
                .get(k)
                .expect("a tracked content side gets a gradient"),
        )
    });
    Ok((q, k.transpose()?))
}

/// `UPSTREAM` times a reference gradient, rounded to `dtype`: what the op hands candle.
fn scaled(grad: &[f64], dtype: DType) -> Result<Vec<f64>> {
    rounded(
        &grad.iter().map(|g| g * UPSTREAM).collect::<Vec<_>>(),
        dtype,
    )
}

/// `t` as a variable whose gradient candle's autograd computes when `track`, else as it is.
fn tracked(t: Tensor, track: bool) -> Result<Tensor> {
    Ok(if track {
        Var::from_tensor(&t)?.into_inner()
    } else {
        t
    })
}

/// A scalar loss of the ops against the reference's: the loss rounded to `dtype`, then the
/// gradients of `loss * UPSTREAM` with respect to `q` (always tracked) and `k` (when tracked),
/// named `names`, against the reference's scaled and rounded.
fn loss_and_grads_match(
    label: &str,
    loss: &Tensor,
    dtype: DType,
    (q, k): (&Tensor, Option<&Tensor>),
    names: [&str; 2],
    (want_loss, want_q, want_k): (f64, &[f64], Option<&[f64]>),
) -> Result<()> {
    assert_eq!(loss.dims(), &[] as &[usize], "{label}");
    assert_eq!(loss.dtype(), dtype, "{label}");
    let got = values(loss)?;
    assert_same(
        &format!("loss {label}"),
        &got,
        &rounded(&[want_loss], dtype)?,
    );
    let (grad_q, grad_k) = grads(loss, q, k)?;
    let want_q = scaled(want_q, dtype)?;
    assert_same(&format!("grad {} {label}", names[0]), &grad_q, &want_q);
    if let (Some(got), Some(want)) = (grad_k, want_k) {
        let want = scaled(want, dtype)?;
        assert_same(&format!("grad {} {label}", names[1]), &got, &want);
    }
    Ok(())
}

#[test]
fn layer_loss_matches_reference() -> Result<()> {
    let mut rng = Rng::new(12);
    for (b, c, h, w, num_s) in MAPS {
        for dtype in CPU_DTYPES {
            for track_k in [false, true] {
                let label = format!("{dtype:?} B={b} C={c} H={h} W={w} track_k={track_k}");
                let dims = [b, c, h, w];
                let shape = FeatureShape::new(b, c, h, w, Layout::Nchw).unwrap();
                let centers = Centers::sample(h, w, num_s, rng.next_u64()).unwrap();
                let (feat_q, q) = rng.tensor(&dims, 1.0, dtype, &Device::Cpu)?;
                let (feat_k, k) = rng.tensor(&dims, 1.0, dtype, &Device::Cpu)?;
                let (feat_q, feat_k) = (tracked(feat_q, true)?, tracked(feat_k, track_k)?);
                let want =
                    reference::ccp_layer_loss(&q, &k, &shape, &centers, Tau::DEFAULT, track_k)
                        .unwrap();

                let loss = ccp_layer_loss(&feat_q, &feat_k, &centers, 0.07)?;
                loss_and_grads_match(
                    &label,
                    &loss,
                    dtype,
                    (&feat_q, track_k.then_some(&feat_k)),
                    ["feat_q", "feat_k"],
                    (want.loss, &want.grad_feat_q, want.grad_feat_k.as_deref()),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn rows_loss_matches_reference() -> Result<()> {
    let mut rng = Rng::new(13);
    for (b, s, c) in ROWS {
        for dtype in CPU_DTYPES {
            for track_k in [false, true] {
                let label = format!("{dtype:?} B={b} S={s} C={c} track_k={track_k}");
                let shape = RowShape::new(b, s, c).unwrap();
                // Rows of a projection head: any scale, not normalised.
                let (rows_q, q) = rng.tensor(&[b, s, c], 3.0, dtype, &Device::Cpu)?;
                let (rows_k, k) = rng.tensor(&[b, s, c], 0.5, dtype, &Device::Cpu)?;
                let (rows_q, rows_k) = (tracked(rows_q, true)?, tracked(rows_k, track_k)?);
                let want =
                    reference::rows_loss(&q, &k, &shape, Tau::new(0.2).unwrap(), track_k).unwrap();

                let loss = rows_loss(&rows_q, &rows_k, 0.2)?;
                loss_and_grads_match(
                    &label,
                    &loss,
                    dtype,
                    (&rows_q, track_k.then_some(&rows_k)),
                    ["rows_q", "rows_k"],
                    (want.loss, &want.grad_rows_q, want.grad_rows_k.as_deref()),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn neighbor_diff_matches_reference() -> Result<()> {
    let mut rng = Rng::new(14);
    for (b, c, h, w, num_s) in MAPS {
        for dtype in CPU_DTYPES {
            let label = format!("{dtype:?} B={b} C={c} H={h} W={w}");
            let shape = FeatureShape::new(b, c, h, w, Layout::Nchw).unwrap();
            let centers = Centers::sample(h, w, num_s, rng.next_u64()).unwrap();
            let (feat, f) = rng.tensor(&[b, c, h, w], 1.0, dtype, &Device::Cpu)?;
            let feat = tracked(feat, true)?;

            let rows = neighbor_diff(&feat, &centers)?;
            assert_eq!(rows.dims(), &[b, centers.rows(), c], "{label}");
            assert_eq!(rows.dtype(), dtype, "{label}");
            let want = reference::neighbor_diff(&f, &shape, &centers).unwrap();
            assert_same(
                &format!("rows {label}"),
                &values(&rows)?,
                &rounded(&want, dtype)?,
            );

            // d(sum(rows * weights))/d(rows) = weights (exact in the dtype): the backward is
            // their scatter into the feature map.
            let (weights, wv) = rng.tensor(rows.dims(), 1.0, dtype, &Device::Cpu)?;
            let grads = (&rows * &weights)?.sum_all()?.backward()?;
            let got = values(grads.get(&feat).expect("feat gets a gradient"))?;
            let mut want = vec![0.0; shape.len()];
            reference::neighbor_diff_backward(&wv, &shape, &centers, &mut want).unwrap();
            assert_same(&format!("grad feat {label}"), &got, &rounded(&want, dtype)?);
        }
    }
    Ok(())
}

/// Only the sides candle tracks get a gradient: the content side alone, the generated side
/// alone, and with the content side detached the generated side's gradient is the same as
/// with it tracked (asking for the content side's changes nothing else).
#[test]
fn gradients_reach_the_tracked_sides() -> Result<()> {
    let mut rng = Rng::new(15);
    let centers = Centers::sample(6, 7, 9, rng.next_u64()).unwrap();
    let (q, _) = rng.tensor(&[2, 3, 6, 7], 1.0, DType::F32, &Device::Cpu)?;
    let (k, _) = rng.tensor(&[2, 3, 6, 7], 1.0, DType::F32, &Device::Cpu)?;
    let (vq, vk) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?);

    let only_k = ccp_layer_loss(&q, &vk, &centers, 0.07)?.backward()?;
    assert!(only_k.get(&q).is_none() && only_k.get(&vk).is_some());
    let only_q = ccp_layer_loss(&vq, &k, &centers, 0.07)?.backward()?;
    assert!(only_q.get(&vq).is_some() && only_q.get(&k).is_none());
    let both = ccp_layer_loss(&vq, &vk, &centers, 0.07)?.backward()?;
    let detached = ccp_layer_loss(&vq, &vk.as_tensor().detach(), &centers, 0.07)?.backward()?;
    assert_same(
        "grad feat_q with feat_k detached",
        &values(detached.get(&vq).unwrap())?,
        &values(both.get(&vq).unwrap())?,
    );
    assert_same(
        "grad feat_k alone and with feat_q",
        &values(only_k.get(&vk).unwrap())?,
        &values(both.get(&vk).unwrap())?,
    );
    let none = ccp_layer_loss(&q, &k, &centers, 0.07)?;
    assert_same(
        "loss untracked",
        &values(&none)?,
        &values(&ccp_layer_loss(&vq, &vk, &centers, 0.07)?)?,
    );
    Ok(())
}

/// The forward keeps what the backward reads, not consumed by it: a second backward of the
/// same graph gives the same gradients.
#[test]
fn backward_twice_gives_the_same_gradients() -> Result<()> {
    let mut rng = Rng::new(17);
    let centers = Centers::sample(6, 7, 9, rng.next_u64()).unwrap();
    let q = Var::from_tensor(&rng.tensor(&[2, 3, 6, 7], 1.0, DType::F32, &Device::Cpu)?.0)?;
    let k = Var::from_tensor(&rng.tensor(&[2, 3, 6, 7], 1.0, DType::F32, &Device::Cpu)?.0)?;
    let rows = |t: &Tensor| neighbor_diff(t, &centers);
    let losses = [
        ccp_layer_loss(&q, &k, &centers, 0.07)?,
        rows_loss(&rows(&q)?, &rows(&k)?, 0.07)?,
    ];
    for loss in losses {
        let (first, second) = (loss.backward()?, loss.backward()?);
        for v in [&q, &k] {
            let (a, b) = (first.get(v).unwrap(), second.get(v).unwrap());
            assert_same("second backward", &values(b)?, &values(a)?);
        }
    }
    Ok(())
}

/// A feature map stored channels-last and viewed as `(B, C, H, W)` (strided), or a slice of a
/// larger batch (offset), gives the loss and gradients of its contiguous copy; the gradient
/// reaches the variable it was viewed from in that variable's layout.
#[test]
fn inputs_of_any_stride_and_offset() -> Result<()> {
    let mut rng = Rng::new(16);
    let (b, c, h, w) = (2, 5, 6, 7);
    let centers = Centers::sample(h, w, 11, rng.next_u64()).unwrap();
    let (k, _) = rng.tensor(&[b, c, h, w], 1.0, DType::F32, &Device::Cpu)?;
    let (q, _) = rng.tensor(&[b, c, h, w], 1.0, DType::F32, &Device::Cpu)?;
    let vq = Var::from_tensor(&q)?;
    let loss = ccp_layer_loss(&vq, &k, &centers, 0.07)?;
    let want_grad = values(loss.backward()?.get(&vq).unwrap())?;

    // Channels last, viewed as NCHW.
    let nhwc = Var::from_tensor(&q.permute((0, 2, 3, 1))?.contiguous()?)?;
    let view = nhwc.permute((0, 3, 1, 2))?;
    assert!(!view.is_contiguous());
    let got = ccp_layer_loss(&view, &k, &centers, 0.07)?;
    assert_same("loss of a strided view", &values(&got)?, &values(&loss)?);
    let grad = got.backward()?.get(&nhwc).unwrap().permute((0, 3, 1, 2))?;
    assert_same("grad of a strided view", &values(&grad)?, &want_grad);

    // The last B images of a batch of B + 1.
    let (first, _) = rng.tensor(&[1, c, h, w], 1.0, DType::F32, &Device::Cpu)?;
    let batch = Var::from_tensor(&Tensor::cat(&[&first, &q], 0)?)?;
    let slice = batch.narrow(0, 1, b)?;
    let got = ccp_layer_loss(&slice, &k, &centers, 0.07)?;
    assert_same("loss of an offset slice", &values(&got)?, &values(&loss)?);
    let grad = got.backward()?.get(&batch).unwrap().clone();
    assert_same(
        "grad of the image outside the slice",
        &values(&grad.narrow(0, 0, 1)?)?,
        &vec![0.0; c * h * w],
    );
    assert_same(
        "grad of an offset slice",
        &values(&grad.narrow(0, 1, b)?)?,
        &want_grad,
    );

    // The rows loss and the neighbour differences on a strided view of the rows / features.
    let rows_q = Var::from_tensor(&rng.tensor(&[2, 16, 9], 1.0, DType::F32, &Device::Cpu)?.0)?;
    let rows_k = rng
        .tensor(&[2, 16, 9], 1.0, DType::F32, &Device::Cpu)?
        .0
        .transpose(1, 2)?;
    let loss = rows_loss(&rows_q.transpose(1, 2)?, &rows_k, 0.07)?;
    let want = rows_loss(
        &rows_q.transpose(1, 2)?.contiguous()?,
        &rows_k.contiguous()?,
        0.07,
    )?;
    assert_same(
        "rows loss of strided views",
        &values(&loss)?,
        &values(&want)?,
    );
    let rows = neighbor_diff(&view, &centers)?;
    let want = neighbor_diff(&q, &centers)?;
    assert_same(
        "neighbour rows of a strided view",
        &values(&rows)?,
        &values(&want)?,
    );
    Ok(())
}

/// The message of `result`'s error, which must be one.
fn message(result: Result<Tensor>) -> String {
    match result {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.shape()),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `result` is an error naming `op` and saying `problem`.
#[track_caller]
fn assert_error(result: Result<Tensor>, op: &str, problem: &str) {
    let msg = message(result);
    assert!(
        msg.contains(&format!("ccpl_candle::{op}")) && msg.contains(problem),
        "error of {op} should name it and say {problem:?}: {msg}"
    );
}

#[test]
fn bad_inputs_give_errors_that_name_the_problem() -> Result<()> {
    let dev = Device::Cpu;
    let feat = Tensor::zeros((2, 3, 6, 7), DType::F32, &dev)?;
    let centers = Centers::sample(6, 7, 4, 1).unwrap();
    let rows = Tensor::zeros((2, 8, 5), DType::F32, &dev)?;

    // ccp_layer_loss
    let layer = |q: &Tensor, k: &Tensor, c: &Centers, tau| ccp_layer_loss(q, k, c, tau);
    assert_error(
        layer(&rows, &rows, &centers, 0.07),
        "ccp_layer_loss",
        "feat_q must be (B, C, H, W)",
    );
    let other = Tensor::zeros((2, 3, 6, 8), DType::F32, &dev)?;
    assert_error(
        layer(&feat, &other, &centers, 0.07),
        "ccp_layer_loss",
        "same shape",
    );
    let f16 = feat.to_dtype(DType::F16)?;
    assert_error(
        layer(&feat, &f16, &centers, 0.07),
        "ccp_layer_loss",
        "same dtype",
    );
    let ints = feat.to_dtype(DType::U32)?;
    assert_error(layer(&ints, &ints, &centers, 0.07), "ccp_layer_loss", "U32");
    let elsewhere = Centers::sample(7, 6, 4, 1).unwrap();
    assert_error(
        layer(&feat, &feat, &elsewhere, 0.07),
        "ccp_layer_loss",
        "centres were drawn for a 7x6 map",
    );
    // The crate's one tau rule, whose message names the rule broken.
    for (tau, rule) in [
        (0.0, "tau is not > 0"),
        (-1.0, "tau is not > 0"),
        (f64::NAN, "tau is not finite"),
        (f64::INFINITY, "tau is not finite"),
        (1e-40, "2/tau overflows float32"),
    ] {
        assert_error(layer(&feat, &feat, &centers, tau), "ccp_layer_loss", rule);
    }
    let flat = Tensor::zeros((2, 3, 2, 7), DType::F32, &dev)?;
    let small = Centers::sample(3, 7, 1, 1).unwrap();
    assert_error(
        layer(&flat, &flat, &small, 0.07),
        "ccp_layer_loss",
        "no interior",
    );
    let empty = Tensor::zeros((0, 3, 6, 7), DType::F32, &dev)?;
    assert_error(
        layer(&empty, &empty, &centers, 0.07),
        "ccp_layer_loss",
        "empty batch",
    );

    // rows_loss
    assert_error(
        rows_loss(&feat, &feat, 0.07),
        "rows_loss",
        "q_rows must be (B, S, C)",
    );
    let wider = Tensor::zeros((2, 8, 6), DType::F32, &dev)?;
    assert_error(rows_loss(&rows, &wider, 0.07), "rows_loss", "same shape");
    let bf16 = rows.to_dtype(DType::BF16)?;
    assert_error(rows_loss(&bf16, &rows, 0.07), "rows_loss", "same dtype");
    let no_width = Tensor::zeros((2, 8, 0), DType::F32, &dev)?;
    assert_error(
        rows_loss(&no_width, &no_width, 0.07),
        "rows_loss",
        "must be at least 1",
    );
    assert_error(
        rows_loss(&rows, &rows, f64::NAN),
        "rows_loss",
        "tau is not finite",
    );

    // neighbor_diff
    assert_error(
        neighbor_diff(&rows, &centers),
        "neighbor_diff",
        "feat must be (B, C, H, W)",
    );
    assert_error(
        neighbor_diff(&other, &centers),
        "neighbor_diff",
        "centres were drawn for a 6x7 map, the feature map is 6x8",
    );
    assert_error(
        neighbor_diff(&feat.to_dtype(DType::I64)?, &centers),
        "neighbor_diff",
        "I64",
    );
    Ok(())
}
