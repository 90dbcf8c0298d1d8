//! The spec's semantics of the CPU reference, on cases that can be checked by hand or by a
//! direct computation written differently from the reference.

use crate::common;

use ccpl::reference::{
    LayerInput, ccp_layer_loss, ccp_loss, info_nce_backward, info_nce_forward, neighbor_diff,
    neighbor_diff_backward, normalize_rows, similarity,
};
use ccpl::{Centers, FeatureShape, Layout, RowShape, Tau, ffi};
use common::{Rng, SPEC_DIRECTIONS, chi_square_uniform, nchw_to_nhwc, rel_err};

mod draws;

#[test]
fn neighbour_convention_is_the_specs() {
    let width = 11isize;
    let spec_offsets = [
        -(width + 1),
        -width,
        -(width - 1),
        -1,
        1,
        width - 1,
        width,
        width + 1,
    ];
    for (k, &(dh, dw)) in SPEC_DIRECTIONS.iter().enumerate() {
        assert_eq!(ffi::neighbor_delta(k), (dh, dw), "direction {k}");
        assert_eq!(
            dh * width + dw,
            spec_offsets[k],
            "flat offset of direction {k}"
        );
    }
}

#[test]
fn difference_rows_of_a_3x3_map_by_hand() {
    // One image, two channels over a 3x3 map: channel 0 holds 0..8 in raster order, channel
    // 1 their squares. The only centre is the middle (value 4, square 16).
    let shape = FeatureShape::new(1, 2, 3, 3, Layout::Nchw).unwrap();
    let feat: Vec<f64> = (0..9)
        .map(f64::from)
        .chain((0..9).map(|v| f64::from(v * v)))
        .collect();
    let centers = Centers::from_flat(3, 3, &[4]).unwrap();
    let rows = neighbor_diff(&feat, &shape, &centers).unwrap();
    #[rustfmt::skip]
    let expected = [
        4.0, 16.0,   // 4 - 0  (-1,-1)
        3.0, 15.0,   // 4 - 1  (-1, 0)
        2.0, 12.0,   // 4 - 2  (-1,+1)
        1.0, 7.0,    // 4 - 3  ( 0,-1)
        -1.0, -9.0,  // 4 - 5  ( 0,+1)
        -2.0, -20.0, // 4 - 6  (+1,-1)
        -3.0, -33.0, // 4 - 7  (+1, 0)
        -4.0, -48.0, // 4 - 8  (+1,+1)
    ];
    assert_eq!(rows, expected);
}

#[test]
fn backward_scatter_of_two_overlapping_windows_by_hand() {
    // A 3x4 map, one channel, centres (1,1) and (1,2); every row's gradient is 1. A centre
    // gets +8 from its own rows and -1 as the other's neighbour; border cells get -1 per
    // window they are in.
    let shape = FeatureShape::new(1, 1, 3, 4, Layout::Nchw).unwrap();
    let centers = Centers::from_flat(3, 4, &[5, 6]).unwrap();
    let mut grad = vec![0.5; 12]; // added to, not overwritten
    neighbor_diff_backward(&[1.0; 16], &shape, &centers, &mut grad).unwrap();
    #[rustfmt::skip]
    let expected = [
        -1.0, -2.0, -2.0, -1.0,
        -1.0,  7.0,  7.0, -1.0,
        -1.0, -2.0, -2.0, -1.0,
    ];
    let added: Vec<f64> = grad.iter().map(|g| g - 0.5).collect();
    assert_eq!(added, expected);
}

/// A value different at every `(b, c, h, w)`, not affine in the position, so a wrong centre
/// or a wrong neighbour changes the difference.
fn distinct_value(b: usize, c: usize, h: usize, w: usize) -> f64 {
    let p = (h * 17 + w) as f64;
    1000.0 * b as f64 + 100.0 * c as f64 + p * p / 7.0
}

#[test]
fn rows_are_direction_major_centre_minus_neighbour() {
    let (batch, channels, height, width) = (2, 3, 6, 7);
    // Centres in no particular order, touching the interior's edges.
    let flat = [2 * 7 + 3, 7 + 1, 4 * 7 + 5, 3 * 7 + 1, 7 + 5];
    let centers = Centers::from_flat(height, width, &flat).unwrap();
    let n = flat.len();
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let shape = FeatureShape::new(batch, channels, height, width, layout).unwrap();
        let mut feat = vec![0.0; shape.len()];
        for b in 0..batch {
            for c in 0..channels {
                for h in 0..height {
                    for w in 0..width {
                        feat[shape.index(b, c, h, w).unwrap()] = distinct_value(b, c, h, w);
                    }
                }
            }
        }
        let rows = neighbor_diff(&feat, &shape, &centers).unwrap();
        assert_eq!(rows.len(), batch * 8 * n * channels);
        for b in 0..batch {
            for (k, &(dh, dw)) in SPEC_DIRECTIONS.iter().enumerate() {
                for (x, &p) in flat.iter().enumerate() {
                    let (h, w) = ((p / width as i64) as usize, (p % width as i64) as usize);
                    let (nh, nw) = (
                        h.checked_add_signed(dh).unwrap(),
                        w.checked_add_signed(dw).unwrap(),
                    );
                    for c in 0..channels {
                        let expected = distinct_value(b, c, h, w) - distinct_value(b, c, nh, nw);
                        let r = k * n + x;
                        assert_eq!(
                            rows[(b * 8 * n + r) * channels + c],
                            expected,
                            "{layout:?} b{b} k{k} x{x} c{c}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn layouts_agree() {
    let mut rng = Rng::new(10);
    let (b, c, h, w) = (2, 5, 7, 9);
    let nchw = FeatureShape::new(b, c, h, w, Layout::Nchw).unwrap();
    let nhwc = nchw.with_layout(Layout::Nhwc);
    let centers = Centers::sample(h, w, 13, 3).unwrap();
    let (q, k) = (rng.vec(nchw.len()), rng.vec(nchw.len()));
    let (q_t, k_t) = (nchw_to_nhwc(&q, b, c, h, w), nchw_to_nhwc(&k, b, c, h, w));

    assert_eq!(
        neighbor_diff(&q, &nchw, &centers).unwrap(),
        neighbor_diff(&q_t, &nhwc, &centers).unwrap()
    );

    let grad_rows = rng.vec(b * centers.rows() * c);
    let (mut g_nchw, mut g_nhwc) = (vec![0.0; nchw.len()], vec![0.0; nchw.len()]);
    neighbor_diff_backward(&grad_rows, &nchw, &centers, &mut g_nchw).unwrap();
    neighbor_diff_backward(&grad_rows, &nhwc, &centers, &mut g_nhwc).unwrap();
    assert_eq!(nchw_to_nhwc(&g_nchw, b, c, h, w), g_nhwc);

    let a = ccp_layer_loss(&q, &k, &nchw, &centers, Tau::DEFAULT, true).unwrap();
    let t = ccp_layer_loss(&q_t, &k_t, &nhwc, &centers, Tau::DEFAULT, true).unwrap();
    assert_eq!(a.loss, t.loss);
    assert_eq!(nchw_to_nhwc(&a.grad_feat_q, b, c, h, w), t.grad_feat_q);
    assert_eq!(
        nchw_to_nhwc(&a.grad_feat_k.unwrap(), b, c, h, w),
        t.grad_feat_k.unwrap()
    );
}

#[test]
fn f32_input_is_read_exactly() {
    let mut rng = Rng::new(11);
    let shape = FeatureShape::new(2, 3, 5, 7, Layout::Nhwc).unwrap();
    let centers = Centers::sample(5, 7, 6, 1).unwrap();
    let q32: Vec<f32> = rng.vec(shape.len()).iter().map(|&v| v as f32).collect();
    let k32: Vec<f32> = rng.vec(shape.len()).iter().map(|&v| v as f32).collect();
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let from_f32 = ccp_layer_loss(&q32, &k32, &shape, &centers, Tau::DEFAULT, true).unwrap();
    let from_f64 = ccp_layer_loss(
        &widen(&q32),
        &widen(&k32),
        &shape,
        &centers,
        Tau::DEFAULT,
        true,
    )
    .unwrap();
    assert_eq!(from_f32, from_f64);
}

#[test]
fn info_nce_equals_a_direct_log_softmax() {
    let mut rng = Rng::new(12);
    let (batch, s) = (3, 7);
    let logits: Vec<f64> = rng.vec(batch * s * s).iter().map(|v| 4.0 * v).collect();
    let forward = info_nce_forward(&logits, batch, s).unwrap();
    let (mut direct_rows, mut original_rows) = (Vec::new(), Vec::new());
    for b in 0..batch {
        for i in 0..s {
            let row = &logits[(b * s + i) * s..][..s];
            // -log softmax(row)[i], computed naively (these logits are small).
            let sum: f64 = row.iter().map(|l| l.exp()).sum();
            direct_rows.push(-(row[i].exp() / sum).ln());
            // The original's form: cross-entropy with target 0 over [positive, negatives].
            let mut cat = vec![row[i]];
            cat.extend(
                row.iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &l)| l),
            );
            let sum_cat: f64 = cat.iter().map(|l| l.exp()).sum();
            original_rows.push(sum_cat.ln() - cat[0]);
        }
    }
    assert!(rel_err(&forward.row_loss, &direct_rows) < 1e-14);
    assert!(rel_err(&forward.row_loss, &original_rows) < 1e-14);
    let mean = direct_rows.iter().sum::<f64>() / (batch * s) as f64;
    assert!((forward.loss - mean).abs() < 1e-14 * mean.abs());
    for (r, (lse, loss)) in forward.row_lse.iter().zip(&forward.row_loss).enumerate() {
        let (b, i) = (r / s, r % s);
        assert!(
            (lse - loss - logits[(b * s + i) * s + i]).abs() < 1e-14,
            "row {r}: lse - loss is not L_ii"
        );
    }
}

#[test]
fn info_nce_of_equal_logits_is_log_s_however_large() {
    // A row of S equal logits: softmax is 1/S, the row loss ln S, the lse c + ln S. With c
    // = 1000, a logsumexp without the max subtracted gives inf.
    let s = 4;
    for c in [0.0, 100.0, 1000.0, -1000.0] {
        let forward = info_nce_forward(&vec![c; 2 * s * s], 2, s).unwrap();
        for (lse, loss) in forward.row_lse.iter().zip(&forward.row_loss) {
            assert!(
                (lse - (c + (s as f64).ln())).abs() < 1e-12,
                "c = {c}: lse {lse}"
            );
            assert!(
                (loss - (s as f64).ln()).abs() < 1e-12,
                "c = {c}: row loss {loss}"
            );
        }
        assert!((forward.loss - (s as f64).ln()).abs() < 1e-12);
    }
}

#[test]
fn loss_and_gradients_are_finite_at_tau_001() {
    // feat_q = feat_k: the diagonal logits are ||v||^2 / tau, about 100.
    let mut rng = Rng::new(13);
    let shape = FeatureShape::new(2, 7, 9, 9, Layout::Nchw).unwrap();
    let centers = Centers::sample(9, 9, 20, 5).unwrap();
    let feat = rng.vec(shape.len());
    let rows = RowShape::new(2, centers.rows(), 7).unwrap();
    let v = normalize_rows(&neighbor_diff(&feat, &shape, &centers).unwrap(), 7).unwrap();
    let logits = similarity(&v.rows, &v.rows, &rows, Tau::new(0.01).unwrap()).unwrap();
    let largest = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        largest > 99.0,
        "logits should reach about 100, largest {largest}"
    );

    let loss_at = |tau: f64, grad_k: bool| {
        ccp_layer_loss(
            &feat,
            &feat,
            &shape,
            &centers,
            Tau::new(tau).unwrap(),
            grad_k,
        )
        .unwrap()
    };
    let out = loss_at(0.01, true);
    assert!(out.loss.is_finite() && out.loss >= 0.0, "loss {}", out.loss);
    assert!(
        out.grad_feat_q
            .iter()
            .chain(out.grad_feat_k.as_ref().unwrap())
            .all(|g| g.is_finite())
    );
    // Random features of independent rows: the loss is far from 0 at tau=1 but the positives
    // dominate at tau=0.01, so the loss must drop.
    let warm = loss_at(1.0, false);
    assert!(
        out.loss < warm.loss,
        "tau 0.01 {} vs tau 1 {}",
        out.loss,
        warm.loss
    );
}

#[test]
fn zero_rows_give_finite_gradients() {
    // feat_q flat: every row of q is zero, every logit 0, so the loss is ln S exactly and the
    // gradient of each zero row is dq / eps (finite), with dq = G k / tau, G = (1/S - I)/(B S).
    let mut rng = Rng::new(14);
    let (batch, channels, tau) = (2, 3, Tau::DEFAULT);
    let shape = FeatureShape::new(batch, channels, 5, 7, Layout::Nchw).unwrap();
    let centers = Centers::sample(5, 7, 4, 9).unwrap();
    let s = centers.rows();
    let feat_q = vec![0.25; shape.len()];
    let feat_k = rng.vec(shape.len());
    let out = ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, tau, true).unwrap();
    assert!(
        (out.loss - (s as f64).ln()).abs() < 1e-12,
        "loss {} vs ln S",
        out.loss
    );
    assert!(out.grad_feat_q.iter().all(|g| g.is_finite()));
    assert!(
        out.grad_feat_q.iter().any(|&g| g != 0.0),
        "a zero row still passes g/eps back"
    );
    // dk = G^T q / tau = 0 since q = 0.
    assert!(out.grad_feat_k.unwrap().iter().all(|&g| g == 0.0));

    // The expected gradient, built from the formula above.
    let k = normalize_rows(&neighbor_diff(&feat_k, &shape, &centers).unwrap(), channels)
        .unwrap()
        .rows;
    let mut grad_rows = vec![0.0; k.len()];
    for b in 0..batch {
        for i in 0..s {
            for j in 0..s {
                let g = (1.0 / s as f64 - if i == j { 1.0 } else { 0.0 }) / (batch * s) as f64;
                for c in 0..channels {
                    grad_rows[(b * s + i) * channels + c] +=
                        g * k[(b * s + j) * channels + c] / tau.get() / ffi::CCPL_NORM_EPS;
                }
            }
        }
    }
    let mut expected = vec![0.0; shape.len()];
    neighbor_diff_backward(&grad_rows, &shape, &centers, &mut expected).unwrap();
    assert!(rel_err(&out.grad_feat_q, &expected) < 1e-12);

    // A map flat on its left part only: some rows zero, some not, all gradients finite.
    let mut partly_flat = rng.vec(shape.len());
    for (i, v) in partly_flat.iter_mut().enumerate() {
        if i % 7 < 4 {
            *v = 1.0;
        }
    }
    let centers = Centers::from_flat(5, 7, &[8, 15, 22, 12]).unwrap();
    let out = ccp_layer_loss(
        &partly_flat,
        &partly_flat,
        &shape,
        &centers,
        Tau::new(0.01).unwrap(),
        true,
    )
    .unwrap();
    assert!(out.loss.is_finite());
    assert!(
        out.grad_feat_q
            .iter()
            .chain(out.grad_feat_k.as_ref().unwrap())
            .all(|g| g.is_finite())
    );

    // Both flat: everything zero, loss ln S.
    let out = ccp_layer_loss(&feat_q, &feat_q, &shape, &centers, tau, true).unwrap();
    assert!((out.loss - ((8 * 4) as f64).ln()).abs() < 1e-12);
    assert!(
        out.grad_feat_q
            .iter()
            .chain(out.grad_feat_k.as_ref().unwrap())
            .all(|&g| g == 0.0)
    );
}

/// The loss is scale-invariant in the features (eps aside: 1e-7 against norms of about 1
/// here, and less the larger the scale), so features multiplied by any power of ten whose
/// norms float64 holds give the same loss, and gradients divided by that power: the norm's
/// sum of squares must not overflow (1e155 and up squares past float64's range). (Small
/// scales are not scale-invariant: there eps dominates the norm.)
#[test]
fn loss_and_gradients_at_any_scale_float64_holds() {
    let shape = FeatureShape::new(2, 5, 6, 7, Layout::Nhwc).unwrap();
    let centers = Centers::sample(6, 7, 6, 11).unwrap();
    let mut rng = Rng::new(12);
    // Features of magnitude 1e50: eps is 1e-57 of the norms, far below float64's precision.
    let big = |rng: &mut Rng| {
        rng.vec(shape.len())
            .iter()
            .map(|v| v * 1e50)
            .collect::<Vec<_>>()
    };
    let (feat_q, feat_k) = (big(&mut rng), big(&mut rng));
    let base = ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, Tau::DEFAULT, true).unwrap();
    for exponent in [100, 155, 200, 250] {
        let scale = 10f64.powi(exponent - 50);
        let scaled = |f: &[f64]| f.iter().map(|v| v * scale).collect::<Vec<_>>();
        let got = ccp_layer_loss(
            &scaled(&feat_q),
            &scaled(&feat_k),
            &shape,
            &centers,
            Tau::DEFAULT,
            true,
        )
        .unwrap();
        let what = format!("features x 1e{exponent}");
        assert!(
            (got.loss - base.loss).abs() < 1e-12,
            "{what}: {} vs {}",
            got.loss,
            base.loss
        );
        let unscaled = |g: &[f64]| g.iter().map(|v| v * scale).collect::<Vec<_>>();
        let err_q = rel_err(&unscaled(&got.grad_feat_q), &base.grad_feat_q);
        let err_k = rel_err(
            &unscaled(got.grad_feat_k.as_ref().unwrap()),
            base.grad_feat_k.as_ref().unwrap(),
        );
        assert!(
            err_q < 1e-12 && err_k < 1e-12,
            "{what}: gradients off by {err_q:.2e}, {err_k:.2e}"
        );
    }
    // One element near float64's largest value in a row of ordinary ones: the row's norm is
    // that element, its normalised row about (1, 0, ...).
    let mut row = vec![0.25; 4];
    row[1] = 1e308;
    let normalized = normalize_rows(&row, 4).unwrap();
    assert_eq!(normalized.norms[0], 1e308);
    assert!((normalized.rows[1] - 1.0).abs() < 1e-15 && normalized.rows[0] > 0.0);
}

#[test]
fn info_nce_backward_rows_sum_to_zero_for_equal_keys() {
    // With every k_j equal, dq_i = sum_j G_ij k / tau = 0 since each row of G sums to 0.
    let (batch, s, width) = (2, 5, 3);
    let shape = RowShape::new(batch, s, width).unwrap();
    let mut rng = Rng::new(15);
    let q = rng.vec(shape.len());
    let k: Vec<f64> = (0..batch * s).flat_map(|_| [0.6, -0.8, 0.0]).collect();
    let logits = similarity(&q, &k, &shape, Tau::new(0.5).unwrap()).unwrap();
    let forward = info_nce_forward(&logits, batch, s).unwrap();
    let grads = info_nce_backward(
        &logits,
        &forward.row_lse,
        &q,
        &k,
        &shape,
        Tau::new(0.5).unwrap(),
        1.0,
        true,
    )
    .unwrap();
    assert!(grads.dq.iter().all(|g| g.abs() < 1e-15), "{:?}", grads.dq);
    assert!(grads.dk.unwrap().iter().any(|g| g.abs() > 1e-3));
}

#[test]
fn ccp_loss_is_the_sum_of_its_layers() {
    let mut rng = Rng::new(16);
    let shapes = [
        FeatureShape::new(2, 3, 9, 9, Layout::Nchw).unwrap(),
        FeatureShape::new(2, 5, 7, 5, Layout::Nhwc).unwrap(),
        FeatureShape::new(2, 7, 5, 5, Layout::Nchw).unwrap(),
    ];
    let feats: Vec<(Vec<f64>, Vec<f64>)> = shapes
        .iter()
        .map(|s| (rng.vec(s.len()), rng.vec(s.len())))
        .collect();
    let layers: Vec<LayerInput<'_, f64>> = shapes
        .iter()
        .zip(&feats)
        .enumerate()
        .map(|(i, (shape, (q, k)))| LayerInput {
            feat_q: q,
            feat_k: k,
            shape: *shape,
            centers: Centers::sample(shape.height(), shape.width(), 8, i as u64).unwrap(),
        })
        .collect();
    for want_grad_k in [false, true] {
        let (total, per_layer) = ccp_loss(&layers, Tau::DEFAULT, want_grad_k).unwrap();
        assert_eq!(per_layer.len(), layers.len());
        let mut sum = 0.0;
        for (layer, out) in layers.iter().zip(&per_layer) {
            let alone = ccp_layer_loss(
                layer.feat_q,
                layer.feat_k,
                &layer.shape,
                &layer.centers,
                Tau::DEFAULT,
                want_grad_k,
            )
            .unwrap();
            assert_eq!(&alone, out);
            assert_eq!(out.grad_feat_k.is_some(), want_grad_k);
            sum += alone.loss;
        }
        assert_eq!(total, sum);
        assert!(total > per_layer[0].loss, "every layer's loss is positive");
    }
}
