//! `kernels/info_nce_fused.cu` against the CPU reference, on the emulator and the GPU: the
//! row logsumexp and losses of the logits `q kᵀ / tau` computed on the chip (no overflow at
//! tau = 0.01, precise when the diagonal dominates), and the backward into q and k with the
//! logits recomputed, for every storage type; and the fused path against the materialised
//! one (similarity + info_nce) on the same device. f16/bf16 run on tensor cores (WMMA; the
//! emulator's portable nvcuda::wmma), whose second product takes G rounded to T: the
//! tolerance is measured on a model that rounds G as the kernel does.

use crate::common;

use ccpl::launch::info_nce::{self, Side};
use ccpl::launch::{Buf, KernelParams, LaunchPlan, info_nce_fused, similarity};
use ccpl::{Dtype, RowShape, Tau, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{self, Regime, Rows, label, row_shapes};
use common::models::fused_backward_model;
use common::tolerance::{F32_TOLERANCE, from_f64, rounded, stored_tolerance, to_f64, tolerance};

/// `(B, S, C)`: odd sizes, S = 8 with C = 1, S not a multiple of the 64-row tile, C over one
/// 64-column tile, C = 520 (a long reduction: tensor cores' truncation would bias the logits
/// by about 1e-5 of their size if the kernels chained it in one accumulator); on the GPU
/// S = 8192 too.
fn shapes<D: TestDevice>(dev: &D) -> Vec<RowShape> {
    row_shapes(
        dev,
        &[
            (2, 104, 37),
            (1, 8, 1),
            (1, 72, 70),
            (3, 65, 5),
            (1, 40, 520),
        ],
        &[(1, 8192, 3), (2, 1000, 129), (1, 700, 520)],
    )
}

/// Temperatures and row relations per shape: tau = 0.01 gives logits near +-100. Rows of
/// width 1 normalise to +-1, so aligned rows would be equal: left out (see kernel_info_nce).
fn regimes<D: TestDevice>(dev: &D, shape: &RowShape) -> Vec<(Tau, Rows)> {
    let taus = [
        Tau::DEFAULT,
        Tau::new(0.01).unwrap(),
        Tau::new(0.5).unwrap(),
    ];
    fixtures::regimes(dev, shape, &taus)
}

/// The upstream gradient the backward scales by, read from device memory.
const UPSTREAM: f32 = 0.75;

/// The device's outputs of one path (fused or materialised): row statistics and gradients.
struct Outputs {
    row_lse: Vec<f64>,
    row_loss: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
}

/// The buffers of one path on a device: both sides' rows in `T`, the row statistics and the
/// upstream gradient.
struct Buffers<T: Dtype, D: TestDevice> {
    q: D::Mem<T>,
    k: D::Mem<T>,
    lse: D::Mem<f32>,
    row_loss: D::Mem<f32>,
    upstream: D::Mem<f32>,
}

impl<T: Dtype, D: TestDevice> Buffers<T, D> {
    /// The rows rounded to `T`, and the row statistics `stats` (NaN-filled for the forward to
    /// write when there are none).
    fn upload(
        dev: &D,
        shape: &RowShape,
        (q, k): (&[f64], &[f64]),
        stats: Option<(&[f64], &[f64])>,
    ) -> Self {
        let count = shape.batch() * shape.rows();
        let stat = |given: Option<&[f64]>| match given {
            Some(values) => dev.upload(&from_f64::<f32>(values)),
            None => dev.alloc_nan::<f32>(count),
        };
        Self {
            q: dev.upload(&from_f64::<T>(q)),
            k: dev.upload(&from_f64::<T>(k)),
            lse: stat(stats.map(|(lse, _)| lse)),
            row_loss: stat(stats.map(|(_, row_loss)| row_loss)),
            upstream: dev.upload(&[UPSTREAM]),
        }
    }

    /// The fused backward into `side` from these rows and statistics.
    fn fused_backward(&mut self, dev: &D, shape: &RowShape, tau: Tau, side: Side) -> Vec<f64> {
        let (q, k) = (dev.buf(&mut self.q), dev.buf(&mut self.k));
        let (lse, row_loss) = (dev.buf(&mut self.lse), dev.buf(&mut self.row_loss));
        let upstream = dev.buf(&mut self.upstream);
        gradient::<T, D, _>(dev, shape.len(), |grad| {
            info_nce_fused::info_nce_fused_backward::<T>(
                shape, tau, side, q, k, lse, row_loss, upstream, grad,
            )
        })
    }

    /// The row statistics on the device with the gradients `dq` and `dk`.
    fn outputs(&self, dev: &D, (dq, dk): (Vec<f64>, Vec<f64>)) -> Outputs {
        Outputs {
            row_lse: to_f64(&dev.download(&self.lse)),
            row_loss: to_f64(&dev.download(&self.row_loss)),
            dq,
            dk,
        }
    }
}

/// A gradient of `len` elements in `T`, NaN-filled, then written by the plan `plan` makes for
/// its buffer.
fn gradient<T: Dtype, D: TestDevice, P: KernelParams>(
    dev: &D,
    len: usize,
    plan: impl FnOnce(Buf) -> ccpl::Result<LaunchPlan<P>>,
) -> Vec<f64> {
    let mut grad_dev = dev.alloc_nan::<T>(len);
    dev.run(&plan(dev.buf(&mut grad_dev)).unwrap());
    to_f64(&dev.download(&grad_dev))
}

/// The two paths to the same InfoNCE loss and gradients.
#[derive(Clone, Copy)]
enum Path {
    /// info_nce_fused_forward, info_nce_fused_backward.
    Fused,
    /// similarity, info_nce_forward, info_nce_backward.
    Materialised,
}

/// `path` on the device: the forward, then the backward into both sides; outputs NaN-filled
/// first.
fn run<T: Dtype, D: TestDevice>(
    dev: &D,
    path: Path,
    shape: &RowShape,
    tau: Tau,
    (q, k): (&[f64], &[f64]),
) -> Outputs {
    let mut bufs = Buffers::<T, D>::upload(dev, shape, (q, k), None);
    let grads = match path {
        Path::Fused => {
            let forward = info_nce_fused::info_nce_fused_forward::<T>(
                shape,
                tau,
                dev.buf(&mut bufs.q),
                dev.buf(&mut bufs.k),
                dev.buf(&mut bufs.lse),
                dev.buf(&mut bufs.row_loss),
            )
            .unwrap();
            dev.run(&forward);
            let dq = bufs.fused_backward(dev, shape, tau, Side::Q);
            (dq, bufs.fused_backward(dev, shape, tau, Side::K))
        }
        Path::Materialised => {
            let mut logits_dev = dev.alloc_nan::<f32>(shape.logits_len());
            let (q, k, logits) = (
                dev.buf(&mut bufs.q),
                dev.buf(&mut bufs.k),
                dev.buf(&mut logits_dev),
            );
            let (lse, row_loss) = (dev.buf(&mut bufs.lse), dev.buf(&mut bufs.row_loss));
            let upstream = dev.buf(&mut bufs.upstream);
            dev.run(&similarity::similarity::<T>(shape, tau, q, k, logits).unwrap());
            dev.run(&info_nce::info_nce_forward(shape, logits, lse, row_loss).unwrap());
            let grad = |side, other| {
                gradient::<T, D, _>(dev, shape.len(), |grad| {
                    info_nce::info_nce_backward::<T>(
                        shape, tau, side, logits, lse, row_loss, other, upstream, grad,
                    )
                })
            };
            (grad(Side::Q, k), grad(Side::K, q))
        }
    };
    bufs.outputs(dev, grads)
}

/// The reference on the exact logits of the rows, and the rounding model of the fused
/// backward in `T`.
struct Expected {
    forward: reference::InfoNceForward,
    dq: Vec<f64>,
    dk: Vec<f64>,
    model_dq: Vec<f64>,
    model_dk: Vec<f64>,
}

/// The reference, and the backward as the kernels compute it with every value they store in
/// `T` rounded once, exact otherwise: G as [`fused_backward_model`] rounds it, then the result.
fn expected<T: Dtype>(shape: &RowShape, tau: Tau, q: &[f64], k: &[f64]) -> Expected {
    let logits = reference::similarity(q, k, shape, tau).unwrap();
    let forward = reference::info_nce_forward(&logits, shape.batch(), shape.rows()).unwrap();
    let upstream = UPSTREAM as f64;
    let grads =
        reference::info_nce_backward(&logits, &forward.row_lse, q, k, shape, tau, upstream, true)
            .unwrap();
    let (model_dq, model_dk) =
        fused_backward_model::<T>(&logits, &forward, q, k, shape, tau, upstream);
    Expected {
        forward,
        dq: grads.dq,
        dk: grads.dk.unwrap(),
        model_dq: rounded::<T>(&model_dq),
        model_dk: rounded::<T>(&model_dk),
    }
}

/// The fused kernels against the reference on the exact logits of the same (T-exact) rows:
/// the statistics to the float32 tolerance for every T (the inputs are exact, the arithmetic
/// float), the gradients to the tolerance measured on the rounding model. On tensor cores the
/// arithmetic is float with truncation: each block of products loses up to about 5 float
/// ulps of its largest term, all toward zero (the emulator models it per architecture), so
/// one accumulator chained over C drifts low by about 2.5 ulps per block: the loss of aligned
/// rows at C = 520 came out 3.0e-5 off on the sm_90 model with one accumulator. The kernels sum
/// each 32-deep stage in fresh fragments and add the stages in float (tile_mma.cuh): the
/// truncation is then a few ulps of one stage, unbiased across stages, and the float32
/// tolerance holds (1.4e-6 at C = 520 on the sm_90 model; the sm_75 model passes too).
fn check_fused<T: Dtype, D: TestDevice>(dev: &D, case: Regime, rng: &mut Rng) {
    let Regime { shape, tau, rows } = case;
    let (q, k) = case.unit_rows::<T>(rng);
    let want = expected::<T>(shape, tau, &q, &k);
    let got = run::<T, D>(dev, Path::Fused, shape, tau, (&q, &k));
    let what = format!("{} {}", T::SUFFIX, label(dev, shape, tau, rows));
    let forward = |name| format!("info_nce_fused_forward {name} {what}");
    let (row_lse, row_loss) = (&want.forward.row_lse, &want.forward.row_loss);
    assert_close(&forward("lse"), &got.row_lse, row_lse, F32_TOLERANCE);
    assert_close(&forward("row_loss"), &got.row_loss, row_loss, F32_TOLERANCE);
    for (side, got, exact, model) in [
        ("dq", &got.dq, &want.dq, &want.model_dq),
        ("dk", &got.dk, &want.dk, &want.model_dk),
    ] {
        let name = format!("info_nce_fused_backward {side} {what}");
        assert_close(&name, got, exact, tolerance(model, exact));
    }
}

/// Runs `check` on every shape and regime, the rows drawn from `seed`.
fn each_case<D: TestDevice>(dev: &D, seed: u64, mut check: impl FnMut(Regime, &mut Rng)) {
    let mut rng = Rng::new(seed);
    for shape in shapes(dev) {
        for (tau, rows) in regimes(dev, &shape) {
            let shape = &shape;
            check(Regime { shape, tau, rows }, &mut rng);
        }
    }
}

fn info_nce_fused_matches_reference<D: TestDevice>(dev: &D) {
    each_case(dev, 16, |case, rng| {
        for_each_dtype!(check_fused(dev, case, rng))
    });
}

/// The fused path against the materialised one on the same device and rows. The logits
/// tiles hold the same bits (both compute them alike per type: logits_tiles.cuh), so the
/// statistics differ by the order of their sums only, and so do the f32 gradients. f16/bf16
/// gradients: by at most the sum of the two paths' tolerances against the reference (the
/// fused one's rounding of G included), as the triangle inequality gives.
fn check_same_as_materialised<T: Dtype, D: TestDevice>(dev: &D, case: Regime, rng: &mut Rng) {
    let Regime { shape, tau, rows } = case;
    let (q, k) = case.unit_rows::<T>(rng);
    let fused = run::<T, D>(dev, Path::Fused, shape, tau, (&q, &k));
    let materialised = run::<T, D>(dev, Path::Materialised, shape, tau, (&q, &k));
    let want = expected::<T>(shape, tau, &q, &k);
    let what = format!("{} {}", T::SUFFIX, label(dev, shape, tau, rows));
    for (name, got, other) in [
        ("lse", &fused.row_lse, &materialised.row_lse),
        ("row_loss", &fused.row_loss, &materialised.row_loss),
    ] {
        let name = format!("fused vs materialised {name} {what}");
        assert_close(&name, got, other, F32_TOLERANCE);
    }
    for (name, got, other, exact, model) in [
        ("dq", &fused.dq, &materialised.dq, &want.dq, &want.model_dq),
        ("dk", &fused.dk, &materialised.dk, &want.dk, &want.model_dk),
    ] {
        let tol = if T::SUFFIX == "f32" {
            F32_TOLERANCE
        } else {
            tolerance(model, exact) + stored_tolerance::<T>(exact)
        };
        let name = format!("fused vs materialised {name} {what}");
        assert_close(&name, got, other, tol);
    }
}

fn info_nce_fused_matches_materialised<D: TestDevice>(dev: &D) {
    each_case(dev, 17, |case, rng| {
        for_each_dtype!(check_same_as_materialised(dev, case, rng))
    });
}

/// The fused backward recomputes the very logits similarity stores: given the same row
/// statistics, its f32 gradients equal the materialised backward's bit for bit (both sum
/// G · other in the same staged order of tile_gemm.cuh). The logit must be rounded on its
/// own: a compiler that fuses `dot * inv_tau - lse` into one FMA (nvcc does, and so does the
/// emulator's host compiler) changes G's last bits unless the kernel spells out __fmul_rn.
fn fused_backward_recomputes_the_stored_logits<D: TestDevice>(dev: &D) {
    each_case(dev, 18, |case, rng| {
        let Regime { shape, tau, rows } = case;
        let (q, k) = case.unit_rows::<f32>(rng);
        let materialised = run::<f32, D>(dev, Path::Materialised, shape, tau, (&q, &k));
        let stats = (&materialised.row_lse, &materialised.row_loss);
        for (side, want) in [(Side::Q, &materialised.dq), (Side::K, &materialised.dk)] {
            let got = run_fused_backward(dev, shape, tau, &q, &k, stats, side);
            let what = format!("{side:?} {}", label(dev, shape, tau, rows));
            let differ = got
                .iter()
                .zip(want)
                .filter(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                differ.count(),
                0,
                "fused and materialised f32 gradients differ: {what}"
            );
        }
    });
}

/// The fused f32 backward of one side from given row statistics (as f64 of f32 values).
fn run_fused_backward<D: TestDevice>(
    dev: &D,
    shape: &RowShape,
    tau: Tau,
    q: &[f64],
    k: &[f64],
    (row_lse, row_loss): (&Vec<f64>, &Vec<f64>),
    side: Side,
) -> Vec<f64> {
    let stats = Some((&row_lse[..], &row_loss[..]));
    Buffers::<f32, D>::upload(dev, shape, (q, k), stats).fused_backward(dev, shape, tau, side)
}

on_every_device!(
    info_nce_fused_matches_reference,
    info_nce_fused_matches_materialised,
    fused_backward_recomputes_the_stored_logits
);
