//! The rows loss of a learned head's layers in one plan on the small-S path
//! (`loss::small_s::SmallRowsPlan::layers`: one launch forward, one or two backward, over
//! every layer) against each layer's reference, over two steps on one workspace; its limits
//! and its buffers' checks. (One layer's rows loss, at odd sizes and the edges of float's
//! range, is `kernel_small_s`.)
//!
//! Tolerances: as one layer's, the exact result rounded once for the gradients
//! (`stored_tolerance`), the spec's 1e-5 for the losses (float all the way).

use crate::common;
use crate::kernel_small_s::{BACKWARDS, Counting};

use ccpl::launch::small_s::{COUNTERS, MAX_LAYERS, MAX_ROWS};
use ccpl::launch::{Buf, KernelParams, LaunchPlan, Launcher};
use ccpl::loss::small_s::{SmallRowsPlan, SmallRowsWorkspace};
use ccpl::{Dtype, Error, RowShape, Tau};
use common::device::{Elem, TestDevice};
use common::fixtures::{random, small_rows_workspace};
use common::models::rows_model;
use common::tolerance::{F32_TOLERANCE, stored_tolerance, to_f64};
use common::{Rng, assert_close, buf};

const TAU: Tau = Tau::DEFAULT;

/// Layers of different `(B, S, C')`: S past a 16-row tile with C past a 64-column tile, odd
/// sizes, the smallest S.
const LAYERS: [(usize, usize, usize); 3] = [(2, 24, 5), (1, 72, 70), (3, 8, 3)];

fn shapes() -> Vec<RowShape> {
    LAYERS
        .iter()
        .map(|&(b, s, c)| RowShape::new(b, s, c).unwrap())
        .collect()
}

/// Every layer's loss and gradients against its own reference, float32 and bfloat16, over
/// two steps on one workspace: the loss is the sum of the layers' (each in
/// `ws.small.layer_loss`), the backward's one buffer holds each layer's gradient at the sum
/// of the earlier layers' lengths.
fn layers_match_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(43);
    check_layers::<f32, D>(dev, &mut rng);
    check_layers::<half::bf16, D>(dev, &mut rng);
}

fn check_layers<T: Dtype + Elem, D: TestDevice>(dev: &D, rng: &mut Rng) {
    let shapes = shapes();
    let plan = SmallRowsPlan::layers(&shapes, TAU).unwrap();
    let total: usize = shapes.iter().map(RowShape::len).sum();
    assert_eq!((plan.len(), plan.total_len()), (shapes.len(), total));
    let starts: Vec<usize> = shapes
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.len();
            Some(start)
        })
        .collect();
    let (mut ws, mut counters) = small_rows_workspace(dev, &plan);
    let bufs = ws.map_mut(|m| dev.buf(m), |m| dev.buf(m));
    let launcher = Counting::new(dev.launcher());
    for step in 0..2 {
        let label = format!("{} step {step} on the {}", T::SUFFIX, dev.name());
        let rows: Vec<(Vec<T>, Vec<T>)> = shapes
            .iter()
            .map(|s| (random(rng, s.len(), 3.0), random(rng, s.len(), 0.5)))
            .collect();
        let mut rows_dev: Vec<_> = rows
            .iter()
            .map(|(q, k)| (dev.upload(q), dev.upload(k)))
            .collect();
        let row_bufs: Vec<(Buf, Buf)> = rows_dev
            .iter_mut()
            .map(|(q, k)| (dev.buf(q), dev.buf(k)))
            .collect();
        plan.forward_layers::<T, _>(&launcher, &row_bufs, &bufs, dev.buf(&mut counters))
            .unwrap_or_else(|e| panic!("forward {label}: {e}"));
        assert_eq!(
            launcher.take().len(),
            1,
            "{label}: the forward is one launch"
        );
        assert_eq!(
            dev.download(&counters),
            [0; COUNTERS],
            "{label}: the last block leaves no finished block counted"
        );
        let model = |u: f64| -> Vec<_> {
            rows.iter()
                .zip(&shapes)
                .map(|((q, k), s)| rows_model::<f64>(&to_f64(q), &to_f64(k), s, TAU, u))
                .collect()
        };
        let exact = model(1.0);
        let layer_loss = to_f64(&dev.download(&ws.small.layer_loss));
        let losses: Vec<f64> = exact.iter().map(|m| m.loss).collect();
        assert_close(
            &format!("layer losses {label}"),
            &layer_loss,
            &losses,
            F32_TOLERANCE,
        );
        let loss = dev.download(&ws.loss)[0] as f64;
        let sum = losses.iter().sum::<f64>();
        assert_close(&format!("loss {label}"), &[loss], &[sum], F32_TOLERANCE);

        for (upstream, both) in BACKWARDS {
            let u = upstream.unwrap_or(1.0) as f64;
            let exact = model(u);
            let mut grad_q = dev.alloc_nan::<T>(total);
            let mut grad_k = dev.alloc_nan::<T>(total);
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
                "{label}: the backward of every layer: a scale (+ the content side)"
            );
            let (got_q, got_k) = (
                to_f64(&dev.download(&grad_q)),
                to_f64(&dev.download(&grad_k)),
            );
            for (l, (s, m)) in shapes.iter().zip(&exact).enumerate() {
                let part = starts[l]..starts[l] + s.len();
                let sides = [
                    ("q", &got_q[part.clone()], &m.grad_rows_q),
                    ("k", &got_k[part], &m.grad_rows_k),
                ];
                for (side, got, want) in &sides[..1 + both as usize] {
                    let what = format!("layer {l} grad_rows_{side} upstream={u} {label}");
                    assert_close(&what, got, want, stored_tolerance::<T>(want));
                }
            }
            if !both {
                assert!(
                    got_k.iter().all(|g| g.is_nan()),
                    "{label}: grad_rows_k written without being asked for"
                );
            }
        }
    }
}

on_every_device!(layers_match_reference);

/// A launcher for plans that must be refused before any launch.
struct Refusing;

impl Launcher for Refusing {
    type Error = Error;
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> ccpl::Result<()> {
        panic!("{} launched from a refused input", plan.kernel)
    }
}

/// 1 to `MAX_LAYERS` layers of `S` at most `MAX_ROWS`; a buffer of another length is refused
/// naming it, a pair of rows too few or a workspace of fewer layers too, before any launch.
#[test]
fn layers_check_their_limits_and_buffers() {
    let shapes = shapes();
    let layers = |shapes: &[RowShape]| SmallRowsPlan::layers(shapes, TAU);
    let wide = RowShape::new(1, MAX_ROWS + 1, 3).unwrap();
    for refused in [&[][..], &[shapes[0]; MAX_LAYERS + 1], &[shapes[0], wide]] {
        let err = layers(refused);
        assert!(matches!(err, Err(Error::Shape(_))), "{refused:?}: {err:?}");
    }
    assert_eq!(layers(&[shapes[2]; MAX_LAYERS]).unwrap().len(), MAX_LAYERS);

    let plan = layers(&shapes).unwrap();
    let ws = plan
        .workspace()
        .unwrap()
        .try_map(|&n| Ok::<_, Error>(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    let rows: Vec<(Buf, Buf)> = shapes
        .iter()
        .map(|s| (buf(s.len()), buf(s.len())))
        .collect();
    let forward = |rows: &[(Buf, Buf)], ws: &SmallRowsWorkspace<Buf, Buf>, counters: Buf| {
        plan.forward_layers::<f32, _>(&Refusing, rows, ws, counters)
            .unwrap_err()
    };
    let counters = buf(COUNTERS);
    let err = forward(&rows[..2], &ws, counters);
    assert!(
        matches!(&err, Error::Shape(m) if m.contains("pairs")),
        "{err:?}"
    );
    let mut short = rows.clone();
    short[1].1.len -= 1;
    let err = forward(&short, &ws, counters);
    assert!(
        matches!(err, Error::Length { what: "rows_k", .. }),
        "{err:?}"
    );
    let err = forward(&rows, &ws, buf(COUNTERS - 1));
    assert!(
        matches!(
            err,
            Error::Length {
                what: "counters",
                ..
            }
        ),
        "{err:?}"
    );
    // The workspace of the first layer alone.
    let small = SmallRowsPlan::new(shapes[0], TAU)
        .unwrap()
        .workspace()
        .unwrap()
        .try_map(|&n| Ok::<_, Error>(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    let err = forward(&rows, &small, counters);
    assert!(
        matches!(&err, Error::Shape(m) if m.contains("rows_q")),
        "{err:?}"
    );

    let total = plan.total_len();
    let backward = |upstream: Buf, grad_q: usize, grad_k: Option<usize>| {
        plan.backward::<f32, _>(&Refusing, &ws, Some(upstream), buf(grad_q), grad_k.map(buf))
            .unwrap_err()
    };
    let err = backward(buf(1), total - 1, None);
    assert!(
        matches!(
            err,
            Error::Length {
                what: "grad_rows_q",
                ..
            }
        ),
        "{err:?}"
    );
    let err = backward(buf(1), total, Some(total + 1));
    assert!(
        matches!(
            err,
            Error::Length {
                what: "grad_rows_k",
                ..
            }
        ),
        "{err:?}"
    );
    let err = backward(buf(2), total, Some(total));
    assert!(
        matches!(
            err,
            Error::Length {
                what: "upstream",
                ..
            }
        ),
        "{err:?}"
    );
}
