//! Devices a kernel test runs on, so that each test is written once: the CPU emulator
//! (always) and the GPU (when there is one; else the test says loudly that it SKIPPED, and
//! fails instead when `CCPL_REQUIRE_GPU=1`). Plus the conversions and the tolerance rule the
//! kernel tests share.

use std::sync::Arc;

use ccpl::cuda::{self, CudaLauncher, Kernels};
use ccpl::launch::CentersBuf;
use ccpl::launch::neighbor::Scatter;
use ccpl::launch::small_s;
use ccpl::launch::{Buf, KernelParams, LaunchPlan, Launcher};
use ccpl::loss::multi_layer::{LossPlan, LossWorkspace};
use ccpl::loss::small_s::{SmallRowsPlan, SmallRowsWorkspace};
use ccpl::{Centers, Dtype, Element, FeatureShape, Result, RowShape, Tau, ffi, reference};
use ccpl_emu::{self as emu, Emulator};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::{Rng, rel_err};

/// An element type a test moves to and from a device (the storage types, f32 and i32).
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {}
impl<T: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static> Elem for T {}

/// Memory and a launcher: what a kernel test needs of a device.
pub trait TestDevice {
    /// A buffer of `T` on the device.
    type Mem<T: Elem>;
    /// What executes plans.
    type Launch<'a>: Launcher
    where
        Self: 'a;
    /// For messages.
    fn name(&self) -> &'static str;
    /// Whether sizes up to S = 8192 are practical (the emulator runs small ones only).
    fn large_sizes(&self) -> bool;
    fn upload<T: Elem>(&self, data: &[T]) -> Self::Mem<T>;
    fn download<T: Elem>(&self, mem: &Self::Mem<T>) -> Vec<T>;
    /// The buffer's address and length for a plan (written or read by the launch).
    fn buf<T: Elem>(&self, mem: &mut Self::Mem<T>) -> Buf;
    fn launcher(&self) -> Self::Launch<'_>;

    /// A buffer of `len` NaNs: an output element the kernel does not write stays NaN.
    fn alloc_nan<T: Elem + Element>(&self, len: usize) -> Self::Mem<T> {
        self.upload(&vec![T::from_f64(f64::NAN); len])
    }
    /// Launches one plan and panics with the device's name on an error.
    fn run<P: KernelParams>(&self, plan: &LaunchPlan<P>) {
        self.launcher()
            .launch(plan)
            .unwrap_or_else(|e| panic!("{} on the {}: {e}", plan.kernel, self.name()));
    }
}

/// The CPU emulator: every launch scheduled by a new seed.
pub struct Emu {
    emulator: Emulator,
}

impl Emu {
    pub fn new(seed: u64) -> Self {
        // SAFETY: every plan the tests launch addresses vectors `Emu::Mem` owns, alive and
        // of the lengths the plans were validated against, for the whole launch.
        Self {
            emulator: unsafe { Emulator::new(seed) },
        }
    }
}

/// A launcher by reference.
pub struct Borrowed<'a, L>(&'a L);
impl<L: Launcher> Launcher for Borrowed<'_, L> {
    type Error = L::Error;
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<(), L::Error> {
        self.0.launch(plan)
    }
}

impl TestDevice for Emu {
    type Mem<T: Elem> = Vec<T>;
    type Launch<'a> = Borrowed<'a, Emulator>;
    fn name(&self) -> &'static str {
        "emulator"
    }
    /// Small sizes only, unless `CCPL_EMU_LARGE=1` (minutes in release mode: a check of the
    /// large sizes where there is no GPU).
    fn large_sizes(&self) -> bool {
        std::env::var("CCPL_EMU_LARGE").as_deref() == Ok("1")
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Vec<T> {
        data.to_vec()
    }
    fn download<T: Elem>(&self, mem: &Vec<T>) -> Vec<T> {
        mem.clone()
    }
    fn buf<T: Elem>(&self, mem: &mut Vec<T>) -> Buf {
        emu::buf_mut(mem)
    }
    fn launcher(&self) -> Borrowed<'_, Emulator> {
        Borrowed(&self.emulator)
    }
}

/// The first GPU, its kernels and its default stream.
pub struct Gpu {
    kernels: Arc<Kernels>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// The GPU for `test`, or `None` after saying loudly that the test SKIPPED (a panic instead
/// when `CCPL_REQUIRE_GPU=1`).
pub fn gpu(test: &str) -> Option<Gpu> {
    let found = cuda::context(0).and_then(|ctx| {
        let kernels = Kernels::for_context(&ctx)?;
        Ok(Gpu {
            kernels,
            stream: ctx.default_stream(),
        })
    });
    match found {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("CCPL_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("CCPL_REQUIRE_GPU=1 but {test} cannot run on a GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {test} on the GPU: {e}");
            None
        }
    }
}

impl TestDevice for Gpu {
    type Mem<T: Elem> = CudaSlice<T>;
    type Launch<'a> = CudaLauncher<'a>;
    fn name(&self) -> &'static str {
        "GPU"
    }
    /// Up to S = 8192, except under compute-sanitizer (`CCPL_SANITIZER=1`), whose
    /// instrumentation makes those sizes take minutes.
    fn large_sizes(&self) -> bool {
        std::env::var("CCPL_SANITIZER").as_deref() != Ok("1")
    }
    fn upload<T: Elem>(&self, data: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(data).expect("upload")
    }
    fn download<T: Elem>(&self, mem: &CudaSlice<T>) -> Vec<T> {
        let data = self.stream.clone_dtoh(mem).expect("download");
        self.stream.synchronize().expect("synchronize");
        data
    }
    fn buf<T: Elem>(&self, mem: &mut CudaSlice<T>) -> Buf {
        let len = mem.len();
        // One stream: the guard's event bookkeeping is not needed past this call.
        let (addr, _guard) = mem.device_ptr_mut(&self.stream);
        Buf { addr, len }
    }
    fn launcher(&self) -> CudaLauncher<'_> {
        self.kernels
            .on(&self.stream)
            .expect("the stream is the kernels' context's")
    }
}

/// Runs each named generic test `fn name<D: TestDevice>(dev: &D)` as two tests,
/// `name::emulator` and `name::gpu`.
#[macro_export]
macro_rules! on_every_device {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[test]
            fn emulator() {
                super::$test(&$crate::common::device::Emu::new(0x5eed));
            }
            #[test]
            fn gpu() {
                let name = concat!(module_path!(), "::", stringify!($test));
                if let Some(gpu) = $crate::common::device::gpu(name) {
                    super::$test(&gpu);
                }
            }
        }
    )+};
}

/// Calls `$check::<T, _>($args...)` for every storage type, ccpl's list of them.
#[macro_export]
macro_rules! for_each_dtype {
    ($check:ident($($arg:expr),* $(,)?)) => {
        for name in ccpl::dtype::STORAGE_NAMES {
            ccpl::dispatch_dtype!(name, T => $check::<T, _>($($arg),*),
                other => unreachable!("{other} is a storage type's name"))
        }
    };
}

pub fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

pub fn from_f64<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// `v` rounded to `T` and back: what storing it in `T` does to it.
pub fn rounded<T: Element>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f64(x).to_f64()).collect()
}

/// Values uniform in `[-scale, scale)`, rounded to `T`: a kernel's input and, exactly, the
/// reference's.
pub fn random<T: Element>(rng: &mut super::Rng, len: usize, scale: f64) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f64(scale * rng.symmetric()))
        .collect()
}

/// The largest finite value of `T` (bf16's is float32's, to its rounding).
pub fn largest<T: Dtype>() -> f64 {
    if T::SUFFIX == "f16" {
        65504.0
    } else {
        f32::MAX as f64
    }
}

/// The spec's tolerance for float32 results: relative norm error below 1e-5.
pub const F32_TOLERANCE: f64 = 1e-5;

/// Tolerance of a result stored in `T`, given `model`: the result as the algorithm would give
/// it if every value it stores in `T` were the exact value rounded once (computed by the test
/// from the reference), and `exact`, the reference. Twice the model's measured error (the
/// kernel's float arithmetic can tip a rounding to the other neighbour, and its rounding
/// errors are as many as the model's but not the same ones), plus the spec's float32
/// tolerance for the arithmetic itself. In f32 the model's error is about 1e-7, so the
/// tolerance is the spec's 1e-5, except where the result is ill-conditioned in the values
/// stored: rows of width 1 normalise to +-(1 - eps/|d|), their gradient lives in the eps part,
/// which a float32 normalised row keeps to a few bits.
pub fn tolerance(model: &[f64], exact: &[f64]) -> f64 {
    tolerance_at(model, exact, Tau::DEFAULT)
}

/// [`tolerance`] at temperature `tau`: the float32 arithmetic's share is the spec's 1e-5 at the
/// paper's tau (0.07) and above, and grows as 1/tau below it. The logits carry float32's
/// relative error times their magnitude, up to 1/tau; the softmax, and so the loss and the
/// gradients, carry that absolute error of the logits.
pub fn tolerance_at(model: &[f64], exact: &[f64], tau: Tau) -> f64 {
    2.0 * rel_err(model, exact) + F32_TOLERANCE * (Tau::DEFAULT.get() / tau.get()).max(1.0)
}

/// Tolerance of a result that is only rounded to `T` when stored: the model is the reference
/// rounded once.
pub fn stored_tolerance<T: Dtype>(exact: &[f64]) -> f64 {
    tolerance(&rounded::<T>(exact), exact)
}

/// Asserts `||got - want|| / ||want|| <= tol` and reports the measured error (run with
/// `--nocapture` to see every measurement).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = rel_err(got, want);
    eprintln!("measured {what}: rel err {err:.3e} (tolerance {tol:.3e})");
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.3e}");
}

/// The backward scatter of `grad_rows` into `initial` with every value it stores rounded to
/// `T` as the kernel stores it. Deterministic: one rounding of the whole sum. Atomic: each
/// neighbour's `-g` added and rounded on its own, each centre's 8 gradients summed, rounded,
/// then added and rounded.
pub fn scatter_model<T: Element>(
    initial: &[f64],
    grad_rows: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    scatter: Scatter,
) -> Vec<f64> {
    let round = |v: f64| T::from_f64(v).to_f64();
    let mut g = initial.to_vec();
    if scatter == Scatter::Deterministic {
        reference::neighbor_diff_backward(grad_rows, shape, centers, &mut g).unwrap();
        return g.into_iter().map(round).collect();
    }
    let (n, c_len, w) = (centers.len(), shape.channels(), shape.width());
    for b in 0..shape.batch() {
        for (x, &p) in centers.flat().iter().enumerate() {
            let (h, wp) = (p as usize / w, p as usize % w);
            for c in 0..c_len {
                let mut centre = 0.0;
                for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
                    let v = grad_rows[(b * 8 * n + k * n + x) * c_len + c];
                    centre += v;
                    let (dh, dw) = ffi::neighbor_delta(k);
                    let (nh, nw) = (h.wrapping_add_signed(dh), wp.wrapping_add_signed(dw));
                    let at = shape.index(b, c, nh, nw).unwrap();
                    g[at] = round(g[at] - v);
                }
                let at = shape.index(b, c, h, wp).unwrap();
                g[at] = round(g[at] + round(centre));
            }
        }
    }
    g
}

/// The workspace of `plan` (`LossPlan`) on a device: NaN wherever a launch writes before it
/// reads; the centre maps without centres (-1), the sampler at step 0 under `seed`, `1.0` where
/// a default upstream gradient lives.
pub fn loss_workspace<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &LossPlan,
    seed: u64,
) -> LossWorkspace<D::Mem<T>, D::Mem<f32>, D::Mem<i32>> {
    let lengths = plan.workspace().unwrap();
    let mut ws = lengths
        .try_map(
            |&n| Ok::<_, ()>(dev.alloc_nan::<T>(n)),
            |&n| Ok(dev.alloc_nan::<f32>(n)),
            |&n| Ok(dev.upload(&vec![0i32; n])),
        )
        .unwrap();
    for (c, len) in ws.centers.iter_mut().zip(&lengths.centers) {
        c.map = dev.upload(&vec![-1i32; len.map]);
    }
    ws.counters = dev.upload(&small_s::counters(seed, 0));
    ws.one = dev.upload(&[1.0f32]);
    for fused in &mut ws.fused {
        fused.rows.one = dev.upload(&[1.0f32]);
    }
    ws
}

/// The small-S rows loss's workspace on a device, all float32.
pub type SmallRowsMem<D> =
    SmallRowsWorkspace<<D as TestDevice>::Mem<f32>, <D as TestDevice>::Mem<f32>>;

/// The workspace of `plan` (`SmallRowsPlan`) on a device, NaN wherever a launch writes before
/// it reads and `1.0` where the default upstream gradient lives, and its launch counters.
pub fn small_rows_workspace<D: TestDevice>(
    dev: &D,
    plan: &SmallRowsPlan,
) -> (SmallRowsMem<D>, D::Mem<i32>) {
    let mut ws = plan
        .workspace()
        .unwrap()
        .try_map(
            |&n| Ok::<_, ()>(dev.alloc_nan::<f32>(n)),
            |&n| Ok(dev.alloc_nan::<f32>(n)),
        )
        .unwrap();
    ws.one = dev.upload(&[1.0f32]);
    (ws, dev.upload(&[0i32; small_s::COUNTERS]))
}

/// Centres in device memory: the flat indices and the inverse map.
pub struct TestCenters<D: TestDevice> {
    height: usize,
    width: usize,
    flat: D::Mem<i32>,
    map: D::Mem<i32>,
}

impl<D: TestDevice> TestCenters<D> {
    pub fn upload(dev: &D, centers: &Centers) -> Self {
        Self {
            height: centers.height(),
            width: centers.width(),
            flat: dev.upload(centers.flat()),
            map: dev.upload(&centers.center_map()),
        }
    }
    /// The plans' view of them; valid while `self` lives.
    pub fn buf(&mut self, dev: &D) -> CentersBuf {
        CentersBuf {
            height: self.height,
            width: self.width,
            flat: dev.buf(&mut self.flat),
            map: dev.buf(&mut self.map),
        }
    }
}

/// The power of two the f16 kernels scale G by before rounding it for their second product
/// (`kGScale` of `kernels/info_nce_fused.cu`); the other types need none.
pub fn g_scale<T: Element>() -> f64 {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<half::f16>() {
        32768.0
    } else {
        1.0
    }
}

/// The fused backward's `(dq, dk)` of unit rows `q`, `k` with `G = softmax(L) - I` rounded as
/// the kernels for `T` store it before their second product (times [`g_scale`]; f32 keeps G
/// in float, f64 is the exact reference), exact otherwise, not rounded at the end.
/// `logits` and `forward` are the reference's.
#[allow(clippy::too_many_arguments)]
pub fn fused_backward_model<T: Element>(
    logits: &[f64],
    forward: &reference::InfoNceForward,
    q: &[f64],
    k: &[f64],
    shape: &RowShape,
    tau: Tau,
    upstream: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (s, c) = (shape.rows(), shape.width());
    let scale = upstream / (shape.batch() * s) as f64 / tau.get();
    let round_g = |g: f64| T::from_f64(g * g_scale::<T>()).to_f64() / g_scale::<T>();
    let mut dq = vec![0.0; shape.len()];
    let mut dk = vec![0.0; shape.len()];
    for b in 0..shape.batch() {
        for i in 0..s {
            let row = b * s + i;
            for j in 0..s {
                // P_ii - 1 as the kernels form it: expm1 of minus the row loss.
                let g = round_g(if i == j {
                    (-forward.row_loss[row]).exp_m1()
                } else {
                    (logits[row * s + j] - forward.row_lse[row]).exp()
                });
                for x in 0..c {
                    dq[row * c + x] += g * k[(b * s + j) * c + x] * scale;
                    dk[(b * s + j) * c + x] += g * q[row * c + x] * scale;
                }
            }
        }
    }
    (dq, dk)
}

/// The rows loss of two row matrices, and its gradients with respect to them, with every
/// value the kernels store in `T` (normalised rows, G for the tensor cores' second product,
/// the gradient of the normalised rows, the result) rounded once, computed stage by stage:
/// what the tolerance of a 16-bit type is measured on. The logits are not rounded: the fused
/// kernels never store them; nor are the norms (float32). The backward through the
/// normalisation starts, as the kernels' does, from the stored (rounded) normalised rows.
/// `rows_model::<f64>` is the exact reference.
pub struct RowsModel {
    pub loss: f64,
    pub grad_rows_q: Vec<f64>,
    pub grad_rows_k: Vec<f64>,
}

/// `rows_q` and `rows_k` are the rows the kernels normalise, exactly (their input rows, or
/// the difference rows the layer forms in float).
pub fn rows_model<T: Element>(
    rows_q: &[f64],
    rows_k: &[f64],
    rows: &RowShape,
    tau: Tau,
    upstream: f64,
) -> RowsModel {
    let c = rows.width();
    let normalized_q = reference::normalize_rows(rows_q, c).unwrap();
    let normalized_k = reference::normalize_rows(rows_k, c).unwrap();
    let unit_q = rounded::<T>(&normalized_q.rows);
    let unit_k = rounded::<T>(&normalized_k.rows);
    let logits = reference::similarity(&unit_q, &unit_k, rows, tau).unwrap();
    let forward = reference::info_nce_forward(&logits, rows.batch(), rows.rows()).unwrap();
    let (dq, dk) =
        fused_backward_model::<T>(&logits, &forward, &unit_q, &unit_k, rows, tau, upstream);
    let back = |unit: &[f64], norms: &[f64], grad_unit: &[f64]| {
        let grad_unit = rounded::<T>(grad_unit);
        rounded::<T>(&normalize_backward_from_normalized(
            unit, norms, &grad_unit, c,
        ))
    };
    RowsModel {
        loss: forward.loss,
        grad_rows_q: back(&unit_q, &normalized_q.norms, &dq),
        grad_rows_k: back(&unit_k, &normalized_k.norms, &dk),
    }
}

/// The normalisation backward of the spec, `g/(n+eps) - u (u.g) n/(n+eps)^2` with `u = d/n`,
/// taking `u` from the normalised rows `v = d/(n+eps)` as the kernels do (`u = v/||v||`): exact
/// on exact `v`, and the kernels' model on `v` rounded to their storage type.
pub fn normalize_backward_from_normalized(
    unit: &[f64],
    norms: &[f64],
    grad: &[f64],
    width: usize,
) -> Vec<f64> {
    let eps = ffi::CCPL_NORM_EPS;
    let directions = reference::normalize_rows(unit, width).unwrap();
    let mut out = vec![0.0; unit.len()];
    for (row, (&n, &v_norm)) in norms.iter().zip(&directions.norms).enumerate() {
        let range = row * width..(row + 1) * width;
        let (v, g) = (&unit[range.clone()], &grad[range.clone()]);
        let u: Vec<f64> = v
            .iter()
            .map(|x| {
                if n > 0.0 && v_norm > 0.0 {
                    x / v_norm
                } else {
                    0.0
                }
            })
            .collect();
        let along: f64 = u.iter().zip(g).map(|(u, g)| u * g).sum();
        for (o, (u, g)) in out[range].iter_mut().zip(u.iter().zip(g)) {
            *o = (g - u * along * n / (n + eps)) / (n + eps);
        }
    }
    out
}

/// A layer's loss, and its gradients with respect to the difference rows, by the rounding
/// model of [`rows_model`] on the exact difference rows (the kernels form them in float and
/// store only their normalised rows). Scatter `grad_rows_*` with [`scatter_model`] for the
/// feature maps.
pub fn layer_model<T: Element>(
    feat_q: &[f64],
    feat_k: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
    upstream: f64,
) -> RowsModel {
    let rows = RowShape::new(shape.batch(), centers.rows(), shape.channels()).unwrap();
    let rows_q = reference::neighbor_diff(feat_q, shape, centers).unwrap();
    let rows_k = reference::neighbor_diff(feat_k, shape, centers).unwrap();
    rows_model::<T>(&rows_q, &rows_k, &rows, tau, upstream)
}

/// How the rows of an InfoNCE test relate: independent (the loss is about log S), or k close
/// to q (the diagonal dominates its row by about 10: the row losses are about S e^-10, and
/// P_ii - 1 is that small too, which a float `exp(L_ii - lse) - 1` would get wrong).
#[derive(Debug, Clone, Copy)]
pub enum Rows {
    Random,
    Aligned,
}

/// Unit rows `q` and `k` as f64 of values exact in `T`.
pub fn unit_rows<T: Dtype>(rng: &mut Rng, shape: &RowShape, rows: Rows) -> (Vec<f64>, Vec<f64>) {
    let q = rng.vec(shape.len());
    let k: Vec<f64> = match rows {
        Rows::Random => rng.vec(shape.len()),
        Rows::Aligned => q.iter().map(|v| v + 0.3 * rng.symmetric()).collect(),
    };
    let unit = |v: &[f64]| {
        let n = reference::normalize_rows(v, shape.width()).unwrap().rows;
        to_f64(&from_f64::<T>(&n))
    };
    (unit(&q), unit(&k))
}

/// A test case's name in failure messages.
pub fn label<D: TestDevice>(dev: &D, shape: &RowShape, tau: Tau, rows: Rows) -> String {
    format!(
        "B={} S={} C={} tau={tau} {rows:?} on the {}",
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    )
}
