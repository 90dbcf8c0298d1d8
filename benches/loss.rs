//! The whole loss of one layer, forward plus backward, on the GPU, at the sizes of
//! `benches/configs.txt` (the same list the PyTorch baselines run). Criterion groups, by the
//! names `tools/bench/run.py` selects (`CCPL_BENCH_GROUPS`) and `tools/bench/report.py` reads:
//!
//! - `loss/<config>/<dtype>`, the headline: for a `layer` configuration the crate's
//!   [`CcpLayer`] from two feature maps (identity head), one training step's work: zero the
//!   gradient buffer, forward, backward into `d feat_q` (the same work as a PyTorch step, which
//!   builds a fresh gradient); for a `rows` configuration the crate's [`CcpRows`] from head
//!   output rows (normalisation and the fused InfoNCE, memory `O(B*S*C)`; its backward writes
//!   the gradient, so there is nothing to zero);
//! - `loss_user_step/<config>/<dtype>` (`layer`): the step as a user of the API pays it:
//!   draw the centres on the host, upload them, zero, forward, backward, read the loss back
//!   (a host wait every step);
//! - `loss_materialised/<config>/<dtype>` (`rows`): the standalone kernels chained with the
//!   `(B, S, S)` logits in memory (benches/common's `RowsLoss`) on the same inputs, or a "does
//!   not fit" status where those logits do not fit.
//!
//! Each step rotates through several input sets; the time is CUDA events around back-to-back
//! steps. Before timing, a size small enough for the float64 CPU reference is checked against
//! it, and a status line (`ccpl-bench {json}`) gives the check, the device memory of a step
//! (measured after a synchronisation) beside the workspace bytes (counted), and the sizes that
//! do not fit. Without a GPU it says SKIPPED and exits 0 (1 with `CCPL_REQUIRE_GPU=1`).
//!
//! `CCPL_BENCH_DRY_RUN=1`: no GPU is looked for; every id above times the float64 CPU
//! reference instead (tiny configurations, `benches/configs-dry-run.txt`), so the benchmark
//! runner's sequence and report can be exercised in CI. Those times say nothing about speed.
//!
//! `cargo bench --bench loss` (on a GPU machine: `scripts/gpu-bench`, BENCHMARKS.md).

mod common;

use std::hint::black_box;

use ccpl::cuda::CcpLayer;
use ccpl::cuda::CcpRows;
use ccpl::cuda::info_nce::Side;
use ccpl::cuda::{DeviceCenters, Scatter};
use ccpl::plan::layer::LayerWorkspace;
use ccpl::plan::rows::RowsWorkspace;
use ccpl::reference::relative_error as rel_err;
use ccpl::reference::{
    ccp_layer_loss, info_nce_backward, info_nce_forward, normalize_rows, normalize_rows_backward,
    similarity,
};
use ccpl::{Centers, DEFAULT_TAU, Dtype, Element, FeatureShape, RowShape};
use common::{Config, Field, Gpu, Rng, RowsLoss, Suite, status, time_iters};
use criterion::{Bencher, BenchmarkId, Criterion, SamplingMode};
use cudarc::driver::CudaSlice;

/// The headline: one training step's work (zero, forward, backward).
const LOSS: &str = "loss";
/// A layer step as the API's user pays it: centres drawn and uploaded, loss read back.
const USER_STEP: &str = "loss_user_step";
/// The rows loss through the materialised logits.
const MATERIALISED: &str = "loss_materialised";

/// The largest `B*S*S*C` checked against the CPU reference before timing (a second or so of
/// float64 on one core).
const CHECK_LIMIT: usize = 1 << 28;

/// The seed of the centres a configuration is timed with (the user step draws its own).
const CENTERS_SEED: u64 = 7;

/// A check fails above these relative errors: a guard against timing a broken build, far
/// above what a correct kernel gives (the tests hold the real tolerances). 16-bit rows carry
/// a relative error near 4e-3 that 1/tau (about 14) amplifies in the logits and the softmax.
fn check_guard<T: Dtype>() -> f64 {
    if std::mem::size_of::<T>() == 4 {
        1e-3
    } else {
        1e-1
    }
}

/// The groups this configuration is timed under, as far as `CCPL_BENCH_GROUPS` asks for them.
fn groups_of(cfg: &Config) -> Vec<&'static str> {
    let groups: &[&'static str] = match cfg.suite {
        Suite::Layer { .. } => &[LOSS, USER_STEP],
        Suite::Rows { .. } => &[LOSS, MATERIALISED],
    };
    groups
        .iter()
        .copied()
        .filter(|g| common::group_wanted(g))
        .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    if common::dry_run() {
        eprintln!(
            "loss: DRY RUN: the float64 CPU reference under the GPU benches' names; no GPU is used"
        );
        each_config(|cfg, dtype| with_dtype!(dtype, T => dry_run::<T>(&mut c, cfg)));
    } else {
        let Some(gpu) = common::gpu("loss") else {
            return;
        };
        each_config(|cfg, dtype| with_dtype!(dtype, T => bench_config::<T>(&mut c, &gpu, cfg)));
    }
    c.final_summary();
}

/// Runs `bench` on every selected configuration and dtype that has a group to time; a failure
/// (a panic too: a launch that fails while timing) is reported and the next one goes on.
fn each_config(mut bench: impl FnMut(&Config, &str) -> ccpl::Result<()>) {
    for cfg in common::configs() {
        if groups_of(&cfg).is_empty() {
            continue;
        }
        for dtype in &cfg.dtypes {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bench(&cfg, dtype)));
            let failure = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => common::panic_message(panic.as_ref()),
            };
            let id = format!("{LOSS}/{}/{dtype}", cfg.name);
            eprintln!("{id}: ERROR: {failure}");
            status(&id, "error", &[("reason", Field::Str(failure))]);
        }
    }
}

fn bench_config<T: Dtype>(c: &mut Criterion, gpu: &Gpu, cfg: &Config) -> ccpl::Result<()> {
    let mut rng = Rng::new(20_220_708);
    match cfg.suite {
        Suite::Layer { shape, num_s } => bench_layer::<T>(c, gpu, cfg, shape, num_s, &mut rng),
        Suite::Rows { rows, grad_k } => bench_rows::<T>(c, gpu, cfg, rows, grad_k, &mut rng),
    }
}

/// `<group>/<config>/<dtype>`.
fn bench_id<T: Dtype>(group: &str, cfg: &Config) -> String {
    format!("{group}/{}/{}", cfg.name, T::SUFFIX)
}

/// Says why `id` is not timed when `bytes` do not fit; `true` when they do.
fn fits(gpu: &Gpu, id: &str, bytes: usize) -> ccpl::Result<bool> {
    let Some(why) = gpu.does_not_fit(bytes)? else {
        return Ok(true);
    };
    eprintln!("{id}: does not fit: {why}");
    status(
        id,
        "does not fit",
        &[
            ("reason", Field::Str(why)),
            ("need_bytes", Field::Num(bytes as f64)),
        ],
    );
    Ok(false)
}

/// Times `step(i)` under `<group>/<config>/<dtype>` with the timing `f` gives the bencher.
fn time_step(
    c: &mut Criterion,
    cfg: &Config,
    group: &str,
    dtype: &str,
    f: impl FnMut(&mut Bencher),
) {
    let mut group = c.benchmark_group(group);
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function(BenchmarkId::new(&cfg.name, dtype), f);
    group.finish();
}

/// Times `step(i)` (input set `i % sets`) on the GPU: CUDA events around back-to-back steps.
fn time_gpu(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    group: &str,
    dtype: &str,
    mut step: impl FnMut(usize),
) {
    time_step(c, cfg, group, dtype, |b| {
        b.iter_custom(|iters| time_iters(&gpu.stream, iters, &mut step))
    });
}

/// Times `step(i)` on the CPU (the dry run), `i` counting the calls from 1.
fn time_cpu(
    c: &mut Criterion,
    cfg: &Config,
    group: &str,
    dtype: &str,
    mut step: impl FnMut(u64) -> ccpl::Result<f64>,
) {
    time_step(c, cfg, group, dtype, |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(step(i).expect("reference step"))
        })
    });
}

/// What a step holds on the device besides its inputs.
struct Memory {
    /// Measured: the drop of free device memory from before the loss object, its gradient
    /// buffers and one step to after them, both read after a synchronisation (the stream's
    /// memory pool takes and gives back memory at a synchronisation).
    device: Option<usize>,
    /// Counted: the loss object's workspace (`LayerWorkspace::bytes`, `RowsWorkspace::bytes`,
    /// `RowsLoss::workspace_bytes`).
    workspace: usize,
    /// Counted: the gradient buffers the step writes.
    gradients: usize,
}

/// How the step before timing was checked.
enum Check {
    /// Relative errors of the loss and of each gradient against the float64 reference.
    Against(f64, Vec<f64>),
    /// Larger than the reference's limit.
    TooLarge,
    /// Nothing to check: the text says why.
    Unchecked(String),
}

/// Reports the check and the memory of `id` before it is timed.
///
/// `loss`: the value of the step run before timing.
fn report(id: &str, memory: &Memory, sets: usize, loss: f64, check: &Check, guard: f64) {
    let mut fields = vec![
        ("workspace_bytes", Field::Num(memory.workspace as f64)),
        ("gradient_bytes", Field::Num(memory.gradients as f64)),
        ("input_sets", Field::Num(sets as f64)),
        ("loss", Field::Num(loss)),
    ];
    if let Some(device) = memory.device {
        fields.push(("device_bytes", Field::Num(device as f64)));
    }
    let mut state = "ok";
    if !loss.is_finite() {
        state = "non-finite loss";
        eprintln!("{id}: NON-FINITE LOSS {loss}");
    }
    match check {
        Check::Against(loss_err, grad_errs) => {
            let worst = grad_errs.iter().copied().fold(*loss_err, f64::max);
            let ok = worst <= guard; // rel_err gives infinity for NaN
            if !ok {
                state = "check FAILED";
                eprintln!(
                    "{id}: CHECK FAILED: relative error {worst:.3e} against the CPU reference (guard {guard:e})"
                );
            }
            let grads = grad_errs
                .iter()
                .map(|e| format!("{e:.2e}"))
                .collect::<Vec<_>>()
                .join(", ");
            fields.push((
                "check",
                Field::Str(format!(
                    "loss rel. err. {loss_err:.2e}, gradient rel. err. {grads}"
                )),
            ));
            fields.push(("check_ok", Field::Bool(ok)));
        }
        Check::TooLarge => fields.push((
            "check",
            Field::Str("not checked (larger than the CPU reference's limit)".into()),
        )),
        Check::Unchecked(why) => fields.push(("check", Field::Str(why.clone()))),
    }
    status(id, state, &fields);
}

fn to_f64<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    rel_err(&[a], &[b])
}

/// One headline layer step: zero `grad_q`, forward, backward into it.
fn layer_step<T: Dtype>(
    gpu: &Gpu,
    layer: &mut CcpLayer<T>,
    centers: &DeviceCenters,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    grad_q: &mut CudaSlice<T>,
) -> ccpl::Result<()> {
    gpu.stream.memset_zeros(grad_q)?;
    layer.forward(q, k, centers)?;
    layer.backward(None, grad_q, None, Scatter::default())
}

fn bench_layer<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    shape: FeatureShape,
    num_s: usize,
    rng: &mut Rng,
) -> ccpl::Result<()> {
    let n = num_s.min(shape.interior());
    let e = std::mem::size_of::<T>();
    let workspace = LayerWorkspace::lengths(&shape, n)?.bytes::<T>();
    let set_bytes = 2 * shape.len() * e;
    if !fits(
        gpu,
        &bench_id::<T>(LOSS, cfg),
        workspace + set_bytes + shape.len() * e,
    )? {
        return Ok(());
    }
    let sets = gpu.input_sets(set_bytes)?;
    let mut inputs = Vec::with_capacity(sets);
    for _ in 0..sets {
        inputs.push((
            common::random::<T>(gpu, shape.len(), rng)?,
            common::random::<T>(gpu, shape.len(), rng)?,
        ));
    }
    let centers = Centers::sample(shape.height(), shape.width(), num_s, CENTERS_SEED)?;

    // One step before timing, read back (a failed launch shows here, not while timing), then
    // checked against the CPU reference when small enough; the memory it took besides the
    // inputs, as PyTorch's peak of a step is measured.
    let free = gpu.free_bytes()?;
    let mut layer = CcpLayer::<T>::new(
        gpu.kernels.clone(),
        gpu.stream.clone(),
        shape,
        n,
        DEFAULT_TAU,
    )?;
    let device_centers = DeviceCenters::upload(&gpu.stream, &centers)?;
    let mut grad_q: CudaSlice<T> = gpu.stream.alloc_zeros(shape.len())?;
    let ((q_host, q), (k_host, k)) = &inputs[0];
    layer_step(gpu, &mut layer, &device_centers, q, k, &mut grad_q)?;
    let loss = f64::from(gpu.stream.clone_dtoh(layer.loss())?[0]);
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace,
        gradients: shape.len() * e,
    };
    let check = if shape.batch() * 64 * n * n * shape.channels() <= CHECK_LIMIT {
        let grad = to_f64(&gpu.stream.clone_dtoh(&grad_q)?);
        let expected = ccp_layer_loss(q_host, k_host, &shape, &centers, DEFAULT_TAU, false)?;
        Check::Against(
            rel(loss, expected.loss),
            vec![rel_err(&grad, &expected.grad_feat_q)],
        )
    } else {
        Check::TooLarge
    };

    for group in groups_of(cfg) {
        let id = bench_id::<T>(group, cfg);
        match group {
            LOSS => {
                report(&id, &memory, sets, loss, &check, check_guard::<T>());
                time_gpu(c, gpu, cfg, group, T::SUFFIX, |i| {
                    let ((_, q), (_, k)) = &inputs[i % sets];
                    layer_step(gpu, &mut layer, &device_centers, q, k, &mut grad_q)
                        .expect("loss step");
                });
            }
            USER_STEP => {
                // The same step (its first run is the one checked), with centres drawn.
                report(&id, &memory, sets, loss, &check, check_guard::<T>());
                time_gpu(c, gpu, cfg, group, T::SUFFIX, |i| {
                    let ((_, q), (_, k)) = &inputs[i % sets];
                    let drawn = Centers::sample(shape.height(), shape.width(), num_s, i as u64)
                        .expect("centres");
                    let centers = DeviceCenters::upload(&gpu.stream, &drawn).expect("upload");
                    layer_step(gpu, &mut layer, &centers, q, k, &mut grad_q).expect("loss step");
                    black_box(gpu.stream.clone_dtoh(layer.loss()).expect("read the loss"));
                });
            }
            other => unreachable!("no {other} group for a layer"),
        }
    }
    Ok(())
}

/// The float64 reference of the loss from rows: the loss, `d rows_q`, and `d rows_k` when asked.
fn reference_rows(
    q: &[f64],
    k: &[f64],
    shape: &RowShape,
    grad_k: bool,
) -> ccpl::Result<(f64, Vec<f64>, Option<Vec<f64>>)> {
    let unit_q = normalize_rows(q, shape.width())?;
    let unit_k = normalize_rows(k, shape.width())?;
    let logits = similarity(&unit_q.rows, &unit_k.rows, shape, DEFAULT_TAU)?;
    let forward = info_nce_forward(&logits, shape.batch(), shape.rows())?;
    let grads = info_nce_backward(
        &logits,
        &forward.row_lse,
        &unit_q.rows,
        &unit_k.rows,
        shape,
        DEFAULT_TAU,
        1.0,
        grad_k,
    )?;
    let dq = normalize_rows_backward(q, &grads.dq, shape.width())?;
    let dk = grads
        .dk
        .map(|dk| normalize_rows_backward(k, &dk, shape.width()))
        .transpose()?;
    Ok((forward.loss, dq, dk))
}

/// One implementation of the loss from rows, timed under its own criterion group.
trait RowsVariant<T: Dtype> {
    /// One forward plus backward: `d rows_q` into `grad_q`, and `d rows_k` into `grad_k`
    /// when given.
    fn step(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        grad_q: &mut CudaSlice<T>,
        grad_k: Option<&mut CudaSlice<T>>,
    ) -> ccpl::Result<()>;
    /// The loss of the last step, on the device.
    fn loss(&self) -> &CudaSlice<f32>;
}

/// The crate's rows loss: normalisation and the fused InfoNCE (no logits in memory).
impl<T: Dtype> RowsVariant<T> for CcpRows<T> {
    fn step(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        grad_q: &mut CudaSlice<T>,
        grad_k: Option<&mut CudaSlice<T>>,
    ) -> ccpl::Result<()> {
        self.forward(q, k)?;
        self.backward(None, grad_q, grad_k)
    }
    fn loss(&self) -> &CudaSlice<f32> {
        CcpRows::loss(self)
    }
}

/// The same loss composed of the standalone kernels, the `(B, S, S)` logits in memory.
struct Materialised<'a, T: Dtype> {
    gpu: &'a Gpu,
    loss: RowsLoss<T>,
}

impl<T: Dtype> RowsVariant<T> for Materialised<'_, T> {
    fn step(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        grad_q: &mut CudaSlice<T>,
        grad_k: Option<&mut CudaSlice<T>>,
    ) -> ccpl::Result<()> {
        self.loss.forward(self.gpu, q, k)?;
        self.loss.backward(self.gpu, Side::Q, q, grad_q)?;
        match grad_k {
            Some(grad_k) => self.loss.backward(self.gpu, Side::K, k, grad_k),
            None => Ok(()),
        }
    }
    fn loss(&self) -> &CudaSlice<f32> {
        &self.loss.loss
    }
}

/// The input sets of a rows configuration and the reference of the first set when it is
/// small enough to check.
struct RowsInputs<T: Dtype> {
    shape: RowShape,
    grad_k: bool,
    sets: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    expected: Option<(f64, Vec<f64>, Option<Vec<f64>>)>,
}

/// The rows suite: the fused [`CcpRows`] (`loss`), then the materialised composition
/// (`loss_materialised`) where its logits fit, on the same inputs.
fn bench_rows<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    shape: RowShape,
    grad_k: bool,
    rng: &mut Rng,
) -> ccpl::Result<()> {
    let e = size_of::<T>();
    let set_bytes = 2 * shape.len() * e;
    let grads_bytes = 2 * shape.len() * e;
    let fused_workspace = RowsWorkspace::lengths(&shape)?.bytes::<T>();
    if !fits(
        gpu,
        &bench_id::<T>(LOSS, cfg),
        fused_workspace + set_bytes + grads_bytes,
    )? {
        return Ok(());
    }
    let count = gpu.input_sets(set_bytes)?;
    let mut sets = Vec::with_capacity(count);
    let mut first = None;
    for _ in 0..count {
        let (q_host, q) = common::random::<T>(gpu, shape.len(), rng)?;
        let (k_host, k) = common::random::<T>(gpu, shape.len(), rng)?;
        first.get_or_insert((q_host, k_host));
        sets.push((q, k));
    }
    let expected = match first {
        Some((q, k))
            if shape.batch() * shape.rows() * shape.rows() * shape.width() <= CHECK_LIMIT =>
        {
            Some(reference_rows(&to_f64(&q), &to_f64(&k), &shape, grad_k)?)
        }
        _ => None,
    };
    let inputs = RowsInputs {
        shape,
        grad_k,
        sets,
        expected,
    };

    for group in groups_of(cfg) {
        match group {
            LOSS => bench_rows_variant(c, gpu, cfg, group, fused_workspace, &inputs, || {
                CcpRows::<T>::new(gpu.kernels.clone(), gpu.stream.clone(), shape, DEFAULT_TAU)
            })?,
            MATERIALISED => {
                let workspace = RowsLoss::<T>::workspace_bytes(&shape);
                if fits(gpu, &bench_id::<T>(group, cfg), workspace + grads_bytes)? {
                    bench_rows_variant(c, gpu, cfg, group, workspace, &inputs, || {
                        Ok(Materialised {
                            gpu,
                            loss: RowsLoss::<T>::new(gpu, shape)?,
                        })
                    })?;
                }
            }
            other => unreachable!("no {other} group for rows"),
        }
    }
    Ok(())
}

/// Makes a variant and its gradient buffers, runs it once on the first input set, reads back
/// and checks it (against the reference when there is one), reports it as
/// `<group>/<config>/<dtype>` with the memory that took, then times it. The variant and its
/// buffers are freed on return, before the next variant is measured.
fn bench_rows_variant<T: Dtype, V: RowsVariant<T>>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    group: &str,
    workspace: usize,
    inputs: &RowsInputs<T>,
    make: impl FnOnce() -> ccpl::Result<V>,
) -> ccpl::Result<()> {
    let RowsInputs {
        shape,
        grad_k,
        sets,
        expected,
    } = inputs;
    let free = gpu.free_bytes()?;
    let mut variant = make()?;
    // NaN first, so that an element this variant does not write fails the check.
    let nan = vec![T::from_f64(f64::NAN); shape.len()];
    let mut grad_q = gpu.stream.clone_htod(&nan)?;
    let mut grad_k_buf = gpu.stream.clone_htod(&nan)?;
    let (q, k) = &sets[0];
    variant.step(q, k, &mut grad_q, grad_k.then_some(&mut grad_k_buf))?;
    let value = f64::from(gpu.stream.clone_dtoh(variant.loss())?[0]);
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace,
        gradients: (1 + usize::from(*grad_k)) * shape.len() * size_of::<T>(),
    };
    let check = match expected {
        Some((expected, dq, dk)) => {
            let mut errs = vec![rel_err(&to_f64(&gpu.stream.clone_dtoh(&grad_q)?), dq)];
            if let Some(dk) = dk {
                errs.push(rel_err(&to_f64(&gpu.stream.clone_dtoh(&grad_k_buf)?), dk));
            }
            Check::Against(rel(value, *expected), errs)
        }
        None => Check::TooLarge,
    };
    let count = sets.len();
    report(
        &bench_id::<T>(group, cfg),
        &memory,
        count,
        value,
        &check,
        check_guard::<T>(),
    );

    time_gpu(c, gpu, cfg, group, T::SUFFIX, |i| {
        let (q, k) = &sets[i % count];
        variant
            .step(q, k, &mut grad_q, grad_k.then_some(&mut grad_k_buf))
            .expect("loss step");
    });
    Ok(())
}

/// The dry run: each group of `cfg` times the float64 CPU reference of its step under the
/// group's own id (the user step draws its centres each step), and says so in its status.
fn dry_run<T: Dtype>(c: &mut Criterion, cfg: &Config) -> ccpl::Result<()> {
    let mut rng = Rng::new(20_220_708);
    let unchecked = Check::Unchecked("dry run: the float64 CPU reference itself".into());
    let memory = |workspace, gradients| Memory {
        device: None,
        workspace,
        gradients,
    };
    match cfg.suite {
        Suite::Layer { shape, num_s } => {
            let q: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let k: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let fixed = Centers::sample(shape.height(), shape.width(), num_s, CENTERS_SEED)?;
            let n = fixed.len();
            let mem = memory(
                LayerWorkspace::lengths(&shape, n)?.bytes::<T>(),
                shape.len() * size_of::<T>(),
            );
            let loss = ccp_layer_loss(&q, &k, &shape, &fixed, DEFAULT_TAU, false)?.loss;
            for group in groups_of(cfg) {
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                let user_step = group == USER_STEP;
                time_cpu(c, cfg, group, T::SUFFIX, |i| {
                    let drawn;
                    let centers = if user_step {
                        drawn = Centers::sample(shape.height(), shape.width(), num_s, i)?;
                        &drawn
                    } else {
                        &fixed
                    };
                    Ok(ccp_layer_loss(&q, &k, &shape, centers, DEFAULT_TAU, false)?.loss)
                });
            }
        }
        Suite::Rows { rows, grad_k } => {
            let round = |v: Vec<f64>| v.into_iter().map(|x| T::from_f64(x).to_f64()).collect();
            let q: Vec<f64> = round(rng.vec(rows.len()));
            let k: Vec<f64> = round(rng.vec(rows.len()));
            let gradients = (1 + usize::from(grad_k)) * rows.len() * size_of::<T>();
            let loss = reference_rows(&q, &k, &rows, grad_k)?.0;
            for group in groups_of(cfg) {
                let workspace = match group {
                    LOSS => RowsWorkspace::lengths(&rows)?.bytes::<T>(),
                    _ => RowsLoss::<T>::workspace_bytes(&rows),
                };
                let mem = memory(workspace, gradients);
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                time_cpu(c, cfg, group, T::SUFFIX, |_| {
                    Ok(reference_rows(&q, &k, &rows, grad_k)?.0)
                });
            }
        }
    }
    Ok(())
}
