//! Every backward of the CPU reference against finite differences of its forward, in f64,
//! on random inputs of odd sizes, both layouts, several temperatures.
//!
//! Derivatives are taken with the 4-point central stencil
//! `f'(0) ~ (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h` (truncation O(h^4)), with steps scaled
//! to the curvature of each function (tau for the logits, the row norm for the normalisation).
//! Errors are `||fd - analytic|| / ||fd||` over the checked coordinates or directions. A wrong
//! gradient (a sign, a missing term, G for G^T, a wrong neighbour) gives an error of order 1,
//! far above the tolerances below, which come from the errors measured on these cases.

use crate::common;

use ccpl::reference::{
    ccp_layer_loss, info_nce_backward, info_nce_forward, neighbor_diff, neighbor_diff_backward,
    normalize_rows, normalize_rows_backward, rows_loss, similarity,
};
use ccpl::{Centers, FeatureShape, Layout, RowShape, Tau, ffi};
use common::{Rng, rel_err};

const TAUS: [f64; 4] = [0.01, 0.07, 0.5, 1.0];
const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nhwc];

// Tolerances: about 100x the largest error measured over every case of each test (seeded, so
// the cases are fixed), far below the O(1) error of a wrong term.
/// `neighbor_diff_backward` is linear, the stencil exact: measured 3.7e-13 (rounding).
const TOL_NEIGHBOR: f64 = 4e-11;
/// `normalize_rows_backward` on ordinary rows and rows with norms near eps (3e-7, 1e-7,
/// 2e-8: where `n` and `n + eps` differ, so a misplaced eps shows): measured 3.2e-12.
const TOL_NORMALIZE: f64 = 3e-10;
/// A zero row: the derivative there is `I/eps`, but the function's next term
/// `-d ||d|| / eps^2` is not smooth, so the stencil's error is of order `h/eps` (1e-9 with
/// `h = 1e-9 eps`): measured 6.7e-10.
const TOL_NORMALIZE_ZERO_ROW: f64 = 7e-8;
/// `info_nce_backward` (through `similarity`) w.r.t. q and k, upstream 1, -2.5, 0.3:
/// measured 3.5e-10.
const TOL_INFO_NCE: f64 = 4e-8;
/// `rows_loss` (rows of a head: any scale) w.r.t. both row matrices, every coordinate:
/// measured 4.6e-10.
const TOL_ROWS: f64 = 5e-8;
/// End-to-end `ccp_layer_loss` w.r.t. feat_q and feat_k: measured 1.3e-8 (a directional
/// derivative at tau = 0.01, where the loss is large and the step small: rounding); 2.6e-10
/// on the every-coordinate case.
const TOL_LAYER: f64 = 1e-6;

/// Derivative at 0 of `f` by the 4-point central stencil with step `h`.
fn central_diff(f: impl Fn(f64) -> f64, h: f64) -> f64 {
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h)
}

/// Finite-difference partial derivatives of `loss` at `x` for the given coordinates.
fn fd_coords(loss: &impl Fn(&[f64]) -> f64, x: &[f64], coords: &[usize], h: f64) -> Vec<f64> {
    coords
        .iter()
        .map(|&i| {
            central_diff(
                |t| {
                    let mut y = x.to_vec();
                    y[i] += t;
                    loss(&y)
                },
                h,
            )
        })
        .collect()
}

/// Finite-difference directional derivatives of `loss` at `x` along each of `dirs`.
fn fd_directions(loss: &impl Fn(&[f64]) -> f64, x: &[f64], dirs: &[Vec<f64>], h: f64) -> Vec<f64> {
    dirs.iter()
        .map(|v| {
            central_diff(
                |t| {
                    loss(
                        &x.iter()
                            .zip(v)
                            .map(|(xi, vi)| xi + t * vi)
                            .collect::<Vec<_>>(),
                    )
                },
                h,
            )
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A random feature shape with odd `H`, `W`, and centres on it (at most `max_n` of them).
fn random_case(rng: &mut Rng, layout: Layout, max_n: usize) -> (FeatureShape, Centers) {
    let shape = FeatureShape::new(
        rng.range(2, 3),
        rng.odd(3, 7),
        rng.odd(5, 9),
        rng.odd(5, 9),
        layout,
    )
    .unwrap();
    let n = rng.range(1, shape.interior().min(max_n));
    let centers = Centers::sample(shape.height(), shape.width(), n, rng.next_u64()).unwrap();
    (shape, centers)
}

/// Asserts that a finite-difference error `err` of `case` is below `tol`, and keeps the
/// largest in `worst` (each test reports it).
fn keep_worst(worst: &mut f64, err: f64, tol: f64, case: std::fmt::Arguments) {
    assert!(err < tol, "{case}: error {err:e}");
    *worst = worst.max(err);
}

#[test]
fn neighbor_diff_backward_matches_finite_differences() {
    let mut rng = Rng::new(1);
    let mut worst: f64 = 0.0;
    for layout in LAYOUTS {
        for case in 0..2 {
            // The last case takes every interior position as a centre: maximal overlap.
            let (shape, centers) = random_case(&mut rng, layout, usize::MAX);
            let centers = if case == 1 {
                Centers::sample(shape.height(), shape.width(), shape.interior(), 7).unwrap()
            } else {
                centers
            };
            let feat = rng.vec(shape.len());
            let weights = rng.vec(shape.batch() * centers.rows() * shape.channels());
            let loss = |f: &[f64]| dot(&weights, &neighbor_diff(f, &shape, &centers).unwrap());

            // The backward adds to what grad_feat holds.
            let start = rng.vec(shape.len());
            let mut grad = start.clone();
            neighbor_diff_backward(&weights, &shape, &centers, &mut grad).unwrap();
            let grad: Vec<f64> = grad.iter().zip(&start).map(|(g, s)| g - s).collect();

            let all: Vec<usize> = (0..shape.len()).collect();
            let fd = fd_coords(&loss, &feat, &all, 1e-2);
            let err = rel_err(&grad, &fd);
            let case = format_args!("{shape:?} N={}", centers.len());
            keep_worst(&mut worst, err, TOL_NEIGHBOR, case);
        }
    }
    eprintln!("neighbor_diff_backward: worst FD error {worst:e}");
}

/// Rows of width `width`: ordinary ones, ones with a norm near eps, and one zero row.
fn mixed_rows(rng: &mut Rng, width: usize) -> Vec<f64> {
    let mut rows = Vec::new();
    for scale in [1.0, 3.0, 0.05, 3e-7, 1e-7, 2e-8, 0.0] {
        rows.extend(rng.vec(width).iter().map(|x| x * scale));
    }
    rows
}

#[test]
fn normalize_rows_backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    let (mut worst, mut worst_zero): (f64, f64) = (0.0, 0.0);
    for width in [3, 5, 7] {
        let rows = mixed_rows(&mut rng, width);
        let upstream = rng.vec(rows.len());
        let grad = normalize_rows_backward(&rows, &upstream, width).unwrap();
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "non-finite gradient: {grad:?}"
        );

        // Rows are independent: each row is checked on its own loss, with a step scaled to
        // its norm (the length over which the normalisation bends).
        for ((d, g), analytic) in rows
            .chunks(width)
            .zip(upstream.chunks(width))
            .zip(grad.chunks(width))
        {
            let loss = |d: &[f64]| dot(g, &normalize_rows(d, width).unwrap().rows);
            let norm = dot(d, d).sqrt();
            let all: Vec<usize> = (0..width).collect();
            if norm > 0.0 {
                let err = rel_err(analytic, &fd_coords(&loss, d, &all, 1e-4 * norm));
                assert!(
                    err < TOL_NORMALIZE,
                    "width {width}, norm {norm:e}: error {err:e}"
                );
                worst = worst.max(err);
            } else {
                // At d = 0 the derivative is I/eps: the spec's g/eps, exactly.
                let expected: Vec<f64> = g.iter().map(|x| x / ffi::CCPL_NORM_EPS).collect();
                assert_eq!(analytic, &expected[..], "zero row: gradient is not g/eps");
                let err = rel_err(
                    analytic,
                    &fd_coords(&loss, d, &all, 1e-9 * ffi::CCPL_NORM_EPS),
                );
                assert!(
                    err < TOL_NORMALIZE_ZERO_ROW,
                    "width {width}, zero row: error {err:e}"
                );
                worst_zero = worst_zero.max(err);
            }
        }
    }
    eprintln!("normalize_rows_backward: worst FD error {worst:e}, zero rows {worst_zero:e}");
}

/// Rows of unit norm, like the normalised rows InfoNCE sees.
fn unit_rows(rng: &mut Rng, count: usize, width: usize) -> Vec<f64> {
    let rows = rng.vec(count * width);
    normalize_rows(&rows, width).unwrap().rows
}

#[test]
fn info_nce_backward_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let mut worst: f64 = 0.0;
    for tau in TAUS.map(|t| Tau::new(t).unwrap()) {
        for upstream in [1.0, -2.5, 0.3] {
            let shape = RowShape::new(rng.range(2, 3), rng.odd(3, 11), rng.odd(3, 7)).unwrap();
            let (q, k) = (
                unit_rows(&mut rng, shape.batch() * shape.rows(), shape.width()),
                unit_rows(&mut rng, shape.batch() * shape.rows(), shape.width()),
            );
            let loss = |q: &[f64], k: &[f64]| {
                let logits = similarity(q, k, &shape, tau).unwrap();
                upstream
                    * info_nce_forward(&logits, shape.batch(), shape.rows())
                        .unwrap()
                        .loss
            };
            let logits = similarity(&q, &k, &shape, tau).unwrap();
            let forward = info_nce_forward(&logits, shape.batch(), shape.rows()).unwrap();
            let backward = |want_dk: bool| {
                let row_lse = &forward.row_lse;
                info_nce_backward(&logits, row_lse, &q, &k, &shape, tau, upstream, want_dk).unwrap()
            };
            let grads = backward(true);
            let dk = grads.dk.expect("dk was asked for");

            let all: Vec<usize> = (0..shape.len()).collect();
            let h = 1e-3 * tau.get();
            let err_q = rel_err(&grads.dq, &fd_coords(&|q: &[f64]| loss(q, &k), &q, &all, h));
            let err_k = rel_err(&dk, &fd_coords(&|k: &[f64]| loss(&q, k), &k, &all, h));
            assert!(
                err_q < TOL_INFO_NCE && err_k < TOL_INFO_NCE,
                "{shape:?} tau {tau} upstream {upstream}: dq {err_q:e}, dk {err_k:e}"
            );
            worst = worst.max(err_q).max(err_k);

            // dq does not depend on whether dk is asked for.
            let without = backward(false);
            assert_eq!(without.dq, grads.dq);
            assert!(without.dk.is_none());
        }
    }
    eprintln!("info_nce_backward: worst FD error {worst:e}");
}

/// The rows loss of a learned head's outputs, with respect to both row matrices, every
/// coordinate; rows of any scale (not normalised).
#[test]
fn rows_loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(5);
    let mut worst: f64 = 0.0;
    for tau in TAUS.map(|t| Tau::new(t).unwrap()) {
        let shape = RowShape::new(rng.range(1, 3), rng.odd(3, 11), rng.odd(1, 7)).unwrap();
        let scale = 0.1 + 3.0 * rng.unit();
        let q: Vec<f64> = rng.vec(shape.len()).iter().map(|v| v * scale).collect();
        let k = rng.vec(shape.len());
        let loss = |q: &[f64], k: &[f64]| {
            let q = normalize_rows(q, shape.width()).unwrap().rows;
            let k = normalize_rows(k, shape.width()).unwrap().rows;
            let logits = similarity(&q, &k, &shape, tau).unwrap();
            info_nce_forward(&logits, shape.batch(), shape.rows())
                .unwrap()
                .loss
        };
        let out = rows_loss(&q, &k, &shape, tau, true).unwrap();
        assert_eq!(out.loss, loss(&q, &k));
        let grad_k = out.grad_rows_k.expect("grad_rows_k was asked for");
        let smallest = [&q, &k]
            .iter()
            .flat_map(|r| normalize_rows(r, shape.width()).unwrap().norms)
            .fold(f64::INFINITY, f64::min);
        let h = 1e-3 * tau.get().min(smallest);
        let all: Vec<usize> = (0..shape.len()).collect();
        let err_q = rel_err(
            &out.grad_rows_q,
            &fd_coords(&|q: &[f64]| loss(q, &k), &q, &all, h),
        );
        let err_k = rel_err(&grad_k, &fd_coords(&|k: &[f64]| loss(&q, k), &k, &all, h));
        assert!(
            err_q < TOL_ROWS && err_k < TOL_ROWS,
            "{shape:?} tau {tau}: grad q {err_q:e}, grad k {err_k:e}"
        );
        worst = worst.max(err_q).max(err_k);
        // The gradient of q does not depend on whether k's is asked for.
        let without = rows_loss(&q, &k, &shape, tau, false).unwrap();
        assert_eq!(without.grad_rows_q, out.grad_rows_q);
        assert!(without.grad_rows_k.is_none());
    }
    eprintln!("rows_loss: worst FD error {worst:e}");
}

/// The layer's loss by the forward stages alone (the backward is what is being checked).
fn layer_loss(
    feat_q: &[f64],
    feat_k: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
) -> f64 {
    let rows = RowShape::new(shape.batch(), centers.rows(), shape.channels()).unwrap();
    let q = normalize_rows(
        &neighbor_diff(feat_q, shape, centers).unwrap(),
        rows.width(),
    )
    .unwrap();
    let k = normalize_rows(
        &neighbor_diff(feat_k, shape, centers).unwrap(),
        rows.width(),
    )
    .unwrap();
    let logits = similarity(&q.rows, &k.rows, &rows, tau).unwrap();
    info_nce_forward(&logits, rows.batch(), rows.rows())
        .unwrap()
        .loss
}

/// A finite-difference step for a layer: the loss bends over lengths of tau (logits) and of
/// the smallest difference row's norm (normalisation).
fn layer_step(
    feat_q: &[f64],
    feat_k: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
) -> f64 {
    let norms = |f: &[f64]| {
        normalize_rows(&neighbor_diff(f, shape, centers).unwrap(), shape.channels())
            .unwrap()
            .norms
    };
    let smallest = norms(feat_q)
        .into_iter()
        .chain(norms(feat_k))
        .fold(f64::INFINITY, f64::min);
    1e-3 * tau.get().min(smallest)
}

/// The end-to-end gradient of one layer with respect to `feat_q` and `feat_k`, on random
/// coordinates and random unit directions (which involve every coordinate).
#[test]
fn ccp_layer_loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(4);
    let mut worst: f64 = 0.0;
    for layout in LAYOUTS {
        for tau in TAUS.map(|t| Tau::new(t).unwrap()) {
            let (shape, centers) = random_case(&mut rng, layout, 12);
            let (feat_q, feat_k) = (rng.vec(shape.len()), rng.vec(shape.len()));
            let out = ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, tau, true).unwrap();
            let grad_k = out.grad_feat_k.clone().expect("grad_feat_k was asked for");
            let loss_q = |f: &[f64]| layer_loss(f, &feat_k, &shape, &centers, tau);
            let loss_k = |f: &[f64]| layer_loss(&feat_q, f, &shape, &centers, tau);

            let coords: Vec<usize> = (0..12).map(|_| rng.range(0, shape.len() - 1)).collect();
            let dirs: Vec<Vec<f64>> = (0..3)
                .map(|_| unit_rows(&mut rng, 1, shape.len()))
                .collect();
            let h = layer_step(&feat_q, &feat_k, &shape, &centers, tau);
            let pick = |g: &[f64]| coords.iter().map(|&i| g[i]).collect::<Vec<_>>();
            let along = |g: &[f64]| dirs.iter().map(|v| dot(g, v)).collect::<Vec<_>>();
            let errors = [
                rel_err(
                    &pick(&out.grad_feat_q),
                    &fd_coords(&loss_q, &feat_q, &coords, h),
                ),
                rel_err(
                    &along(&out.grad_feat_q),
                    &fd_directions(&loss_q, &feat_q, &dirs, h),
                ),
                rel_err(&pick(&grad_k), &fd_coords(&loss_k, &feat_k, &coords, h)),
                rel_err(&along(&grad_k), &fd_directions(&loss_k, &feat_k, &dirs, h)),
            ];
            for err in errors {
                let case =
                    format_args!("{shape:?} N={} tau {tau}, errors {errors:?}", centers.len());
                keep_worst(&mut worst, err, TOL_LAYER, case);
            }
        }
    }
    eprintln!("ccp_layer_loss: worst FD error {worst:e}");
}

/// Every coordinate of a small layer whose centres fill the interior, both layouts.
#[test]
fn ccp_layer_loss_full_gradient_on_a_filled_interior() {
    let mut rng = Rng::new(5);
    let mut worst: f64 = 0.0;
    for layout in LAYOUTS {
        let shape = FeatureShape::new(2, 3, 5, 5, layout).unwrap();
        let centers = Centers::sample(5, 5, usize::MAX, 11).unwrap();
        assert_eq!(centers.len(), shape.interior());
        let (feat_q, feat_k) = (rng.vec(shape.len()), rng.vec(shape.len()));
        let tau = Tau::DEFAULT;
        let out = ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, tau, true).unwrap();
        let loss_q = |f: &[f64]| layer_loss(f, &feat_k, &shape, &centers, tau);
        let loss_k = |f: &[f64]| layer_loss(&feat_q, f, &shape, &centers, tau);
        let all: Vec<usize> = (0..shape.len()).collect();
        let h = layer_step(&feat_q, &feat_k, &shape, &centers, tau);
        let err_q = rel_err(&out.grad_feat_q, &fd_coords(&loss_q, &feat_q, &all, h));
        let err_k = rel_err(
            out.grad_feat_k.as_ref().unwrap(),
            &fd_coords(&loss_k, &feat_k, &all, h),
        );
        assert!(
            err_q < TOL_LAYER && err_k < TOL_LAYER,
            "{layout:?}: q {err_q:e}, k {err_k:e}"
        );
        worst = worst.max(err_q).max(err_k);
    }
    eprintln!("ccp_layer_loss (every coordinate): worst FD error {worst:e}");
}
