//! The whole loss, forward plus backward, on the GPU, at the sizes of `benches/configs.txt`
//! (the same list the PyTorch baselines run). Criterion groups, by the names
//! `tools/bench/run.py` selects (`CCPL_BENCH_GROUPS`) and `tools/bench/report.py` reads:
//!
//! - `step` configurations, the paper's training step of the multi-layer loss (the headline of
//!   the benchmark run), every variant zeroing the gradients first, as a training step does:
//!   - `loss/<step>/<dtype>`: the crate's [`CcpLoss`] on a stream: zero, forward (the centres
//!     drawn on the device), backward (three launches at the paper's sizes, after the memsets);
//!   - `loss_graph/<step>/<dtype>`: the same step captured once in a CUDA graph and replayed;
//!   - `loss_user_step/<step>/<dtype>`: the step as the API's user pays it: the same, and the
//!     loss read back (a host wait every step; the centres cost no upload, being drawn on the
//!     device);
//!   - `loss_layers/<step>/<dtype>`: one [`CcpLayer`] per layer (the fused path, nine launches
//!     a layer), its centres drawn ahead and uploaded, for comparison;
//! - `loss/<config>/<dtype>`: for a `layer` configuration the crate's [`CcpLayer`] from two
//!   feature maps (identity head), one training step's work: zero the gradient buffer,
//!   forward, backward into `d feat_q` (the same work as a PyTorch step, which builds a fresh
//!   gradient); for a `rows` configuration the crate's [`CcpRows`] from head output rows (up to
//!   S = 512 its small-S path, above it normalisation and the fused InfoNCE; memory `O(B*S*C)`
//!   either way; its backward writes the gradient, so there is nothing to zero);
//! - `loss_user_step/<config>/<dtype>` (`layer`): the step as a user of [`CcpLayer`] pays it:
//!   draw the centres on the host, upload them, zero, forward, backward, read the loss back;
//! - `loss_materialised/<config>/<dtype>` (`rows`): the standalone kernels chained with the
//!   `(B, S, S)` logits in memory (benches/common's `RowsLoss`) on the same inputs, or a "does
//!   not fit" status where those logits do not fit.
//!
//! The time is CUDA events around back-to-back steps. Before timing, a size small enough for
//! the float64 CPU reference is checked against it, and a status line (`ccpl-bench {json}`)
//! gives the check, the device memory of a step (measured after a synchronisation) beside the
//! workspace bytes (counted from the loss object's buffers), and the sizes that do not fit.
//! Without a GPU it says SKIPPED and exits 0 (1 with `CCPL_REQUIRE_GPU=1`).
//!
//! `CCPL_BENCH_DRY_RUN=1`: no GPU is looked for; every id above times the float64 CPU
//! reference instead (tiny configurations, `benches/configs-dry-run.txt`), so the benchmark
//! runner's sequence and report can be exercised in CI. Those times say nothing about speed.
//!
//! `cargo bench --bench loss` (on a GPU machine: `scripts/gpu-bench`, BENCHMARKS.md).

mod common;

use std::hint::black_box;

use std::sync::Arc;

use ccpl::cuda::info_nce::Side;
use ccpl::cuda::{CcpLayer, CcpLoss, CcpRows, DeviceCenters, Scatter};
use ccpl::loss::multi_layer::LossPlan;
use ccpl::reference::relative_error as rel_err;
use ccpl::reference::{
    LayerInput, ccp_layer_loss, ccp_loss, info_nce_backward, info_nce_forward, normalize_rows,
    normalize_rows_backward, similarity,
};
use ccpl::{Centers, Dtype, Element, FeatureShape, RowShape, Tau};
use common::{Config, Field, Gpu, Rng, RowsLoss, Suite, status, time_iters};
use criterion::{Bencher, BenchmarkId, Criterion, SamplingMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, sys};

/// The headline: one training step's work (zero, forward, backward).
const LOSS: &str = "loss";
/// A training step captured in a CUDA graph and replayed.
const GRAPH: &str = "loss_graph";
/// A step as the API's user pays it: the loss read back (and for a layer, centres drawn and
/// uploaded).
const USER_STEP: &str = "loss_user_step";
/// A training step of one `CcpLayer` per layer.
const LAYERS: &str = "loss_layers";
/// The rows loss through the materialised logits.
const MATERIALISED: &str = "loss_materialised";

/// The largest `B*S*S*C` checked against the CPU reference before timing (a second or so of
/// float64 on one core).
const CHECK_LIMIT: usize = 1 << 28;

/// The seed of the centres a configuration is timed with (the user step draws its own), and
/// of the device sampler of a training step.
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
        Suite::Step { .. } => &[LOSS, GRAPH, USER_STEP, LAYERS],
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
        each_config(|cfg, dtype| {
            ccpl::dispatch_dtype!(dtype, T => dry_run::<T>(&mut c, cfg),
                other => Err(common::unknown_dtype(other)))
        });
    } else {
        let Some(gpu) = common::gpu("loss") else {
            return;
        };
        each_config(|cfg, dtype| {
            ccpl::dispatch_dtype!(dtype, T => bench_config::<T>(&mut c, &gpu, cfg),
                other => Err(common::unknown_dtype(other)))
        });
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
    match &cfg.suite {
        Suite::Step { layers } => bench_step::<T>(c, gpu, cfg, layers, &mut rng),
        &Suite::Layer { shape, num_s } => bench_layer::<T>(c, gpu, cfg, shape, num_s, &mut rng),
        &Suite::Rows { rows, grad_k } => bench_rows::<T>(c, gpu, cfg, rows, grad_k, &mut rng),
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

/// Times `step(i)` (input set `i % sets`) on `stream`: CUDA events around back-to-back steps.
fn time_gpu(
    c: &mut Criterion,
    stream: &CudaStream,
    cfg: &Config,
    group: &str,
    dtype: &str,
    mut step: impl FnMut(usize),
) {
    time_step(c, cfg, group, dtype, |b| {
        b.iter_custom(|iters| time_iters(stream, iters, &mut step))
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
    /// Counted: the loss object's workspace, from its buffers (`CcpLoss`, `CcpLayer`,
    /// `CcpRows::workspace_bytes`; `RowsLoss::workspace_bytes`), or without a device, from
    /// their lengths (`workspace_bytes_for`, the dry run).
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

/// `B S^2 C` of a layer of `shape` with `n` centres: what the CPU reference's time grows with.
fn reference_size(shape: &FeatureShape, n: usize) -> usize {
    shape.batch() * 64 * n * n * shape.channels()
}

/// The centres the device sampler of a training step (seeded `CENTERS_SEED`) draws at
/// `step`, for each layer (`Centers::philox`, its model on the host).
fn step_centers(layers: &[(FeatureShape, usize)], step: u64) -> ccpl::Result<Vec<Centers>> {
    (0..layers.len())
        .map(|l| {
            let (shape, num_s) = layers[l];
            Centers::philox(
                shape.height(),
                shape.width(),
                num_s,
                CENTERS_SEED,
                step,
                l as u32,
            )
        })
        .collect()
}

/// The reference's inputs of a training step: each layer's feature maps and centres.
fn step_inputs<'a, T>(
    layers: &[(FeatureShape, usize)],
    feats: &'a [(Vec<T>, Vec<T>)],
    centers: Vec<Centers>,
) -> Vec<LayerInput<'a, T>> {
    layers
        .iter()
        .zip(feats)
        .zip(centers)
        .map(|((&(shape, _), (q, k)), centers)| LayerInput {
            feat_q: q,
            feat_k: k,
            shape,
            centers,
        })
        .collect()
}

/// The loss and each layer's `d feat_q` of a training step, from the float64 reference.
type StepReference = (f64, Vec<Vec<f64>>);

/// A zeroed buffer of each length on `stream`.
fn zeros<T: Dtype>(stream: &Arc<CudaStream>, lens: &[usize]) -> ccpl::Result<Vec<CudaSlice<T>>> {
    lens.iter()
        .map(|&len| Ok(stream.alloc_zeros(len)?))
        .collect()
}

/// One headline training step of the multi-layer loss: zero every layer's gradient, forward
/// (new centres drawn on the device), backward into the gradients.
fn loss_step<T: Dtype>(
    stream: &Arc<CudaStream>,
    loss: &mut CcpLoss<T>,
    feats: &[(CudaSlice<T>, CudaSlice<T>)],
    grads: &mut [CudaSlice<T>],
) -> ccpl::Result<()> {
    for grad in grads.iter_mut() {
        stream.memset_zeros(grad)?;
    }
    let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
    loss.forward(&inputs)?;
    loss.backward(None, &mut grads.iter_mut().collect::<Vec<_>>(), None)
}

/// A training step's loss and gradients (read back from `stream`) against the reference.
fn check_step<T: Dtype>(
    stream: &Arc<CudaStream>,
    loss: f64,
    grads: &[CudaSlice<T>],
    expected: &Option<StepReference>,
) -> ccpl::Result<Check> {
    let Some((want, want_grads)) = expected else {
        return Ok(Check::TooLarge);
    };
    let errs = grads
        .iter()
        .zip(want_grads)
        .map(|(grad, want)| Ok(rel_err(&to_f64(&stream.clone_dtoh(grad)?), want)))
        .collect::<ccpl::Result<_>>()?;
    Ok(Check::Against(rel(loss, *want), errs))
}

/// The paper's training step (a `step` configuration), each variant of the module docs timed
/// under its group. One input set: the device draws new centres every step, so a step does not
/// find the windows of the one before in the L2 (and a paper step's feature maps are 235 MB
/// a set in f32, more than the L2 already).
fn bench_step<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    layers: &[(FeatureShape, usize)],
    rng: &mut Rng,
) -> ccpl::Result<()> {
    let lens: Vec<usize> = layers.iter().map(|(s, _)| s.len()).collect();
    let feat_bytes = lens.iter().sum::<usize>() * size_of::<T>();
    let workspace = LossPlan::new(layers, Tau::DEFAULT)?
        .workspace()?
        .bytes::<T>();
    // The inputs and the gradients, the CUDA graph's own copies of them, and the workspaces of
    // the two CcpLoss objects and of the CcpLayers (about as large).
    if !fits(
        gpu,
        &bench_id::<T>(LOSS, cfg),
        3 * workspace + 6 * feat_bytes,
    )? {
        return Ok(());
    }
    let mut host = Vec::with_capacity(layers.len());
    let mut feats = Vec::with_capacity(layers.len());
    for &len in &lens {
        let (q_host, q) = common::random::<T>(gpu, len, rng)?;
        let (k_host, k) = common::random::<T>(gpu, len, rng)?;
        host.push((q_host, k_host));
        feats.push((q, k));
    }
    let small_enough = layers
        .iter()
        .map(|(s, num_s)| reference_size(s, (*num_s).min(s.interior())))
        .sum::<usize>()
        <= CHECK_LIMIT;
    // The reference of the step that draws the centres of device step `step`.
    let expected = |step: u64| -> ccpl::Result<Option<StepReference>> {
        if !small_enough {
            return Ok(None);
        }
        let inputs = step_inputs(layers, &host, step_centers(layers, step)?);
        let (loss, per_layer) = ccp_loss(&inputs, Tau::DEFAULT, false)?;
        Ok(Some((
            loss,
            per_layer.into_iter().map(|l| l.grad_feat_q).collect(),
        )))
    };
    let first = expected(0)?;

    // CcpLoss on the bench's stream: one step before timing (the centres of step 0), read
    // back (a failed launch shows here, not while timing) and checked; the memory that the
    // object, its gradient buffers and the step took besides the inputs.
    let free = gpu.free_bytes()?;
    let mut loss = CcpLoss::<T>::new(
        gpu.kernels.clone(),
        gpu.stream.clone(),
        layers,
        Tau::DEFAULT,
        CENTERS_SEED,
    )?;
    let mut grads = zeros::<T>(&gpu.stream, &lens)?;
    loss_step(&gpu.stream, &mut loss, &feats, &mut grads)?;
    let value = f64::from(gpu.stream.clone_dtoh(loss.loss())?[0]);
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace: loss.workspace_bytes(),
        gradients: feat_bytes,
    };
    let check = check_step(&gpu.stream, value, &grads, &first)?;

    for group in groups_of(cfg) {
        let id = bench_id::<T>(group, cfg);
        match group {
            LOSS => {
                report(&id, &memory, 1, value, &check, check_guard::<T>());
                time_gpu(c, &gpu.stream, cfg, group, T::SUFFIX, |_| {
                    loss_step(&gpu.stream, &mut loss, &feats, &mut grads).expect("loss step");
                });
            }
            USER_STEP => {
                // The same step, and the loss read back: the centres need no upload.
                report(&id, &memory, 1, value, &check, check_guard::<T>());
                time_gpu(c, &gpu.stream, cfg, group, T::SUFFIX, |_| {
                    loss_step(&gpu.stream, &mut loss, &feats, &mut grads).expect("loss step");
                    black_box(gpu.stream.clone_dtoh(loss.loss()).expect("read the loss"));
                });
            }
            // Its first replay draws the centres of step 1 (step 0 runs before the capture).
            GRAPH => bench_step_graph::<T>(c, gpu, cfg, layers, &host, &expected(1)?)?,
            LAYERS => bench_step_layers::<T>(c, gpu, cfg, layers, &feats, &first)?,
            other => unreachable!("no {other} group for a training step"),
        }
    }
    Ok(())
}

/// cudarc's event tracking off for the buffers allocated while this lives, and back on when it
/// is dropped: declared before those buffers, so that it is dropped after them.
struct Untracked<'a>(&'a CudaContext);

impl<'a> Untracked<'a> {
    fn new(ctx: &'a CudaContext) -> Self {
        // SAFETY: the buffers allocated while this lives are used on one stream only and
        // freed before it is dropped: there is nothing between streams to synchronise.
        unsafe { ctx.disable_event_tracking() };
        Self(ctx)
    }
}

impl Drop for Untracked<'_> {
    fn drop(&mut self) {
        // SAFETY: every buffer allocated without tracking is gone (see `new`).
        unsafe { self.0.enable_event_tracking() };
    }
}

/// The training step captured once in a CUDA graph and replayed, on a stream of its own (a
/// capture needs a stream other than the legacy default one) whose buffers cudarc does not
/// event-track (its waits on events recorded before the capture would end it), with its own
/// copies of the inputs, gradients and `CcpLoss`: a captured step replays on the buffers it
/// was captured with. The first replay is read back and checked against `expected`.
fn bench_step_graph<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    layers: &[(FeatureShape, usize)],
    host: &[(Vec<T>, Vec<T>)],
    expected: &Option<StepReference>,
) -> ccpl::Result<()> {
    let _untracked = Untracked::new(&gpu.ctx);
    let stream = gpu.ctx.new_stream()?;
    let feats = host
        .iter()
        .map(|(q, k)| Ok((stream.clone_htod(q)?, stream.clone_htod(k)?)))
        .collect::<ccpl::Result<Vec<_>>>()?;
    let lens: Vec<usize> = host.iter().map(|(q, _)| q.len()).collect();
    let free = gpu.free_bytes()?;
    let mut loss = CcpLoss::<T>::new(
        gpu.kernels.clone(),
        stream.clone(),
        layers,
        Tau::DEFAULT,
        CENTERS_SEED,
    )?;
    let mut grads = zeros::<T>(&stream, &lens)?;
    // The first launches (the modules' loading) outside the capture.
    loss_step(&stream, &mut loss, &feats, &mut grads)?;
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = loss_step(&stream, &mut loss, &feats, &mut grads);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?; // ended either way
    captured?;
    let graph = graph.ok_or_else(|| ccpl::Error::Cuda("the capture recorded no work".into()))?;
    graph.launch()?;
    let value = f64::from(stream.clone_dtoh(loss.loss())?[0]);
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace: loss.workspace_bytes(),
        gradients: lens.iter().sum::<usize>() * size_of::<T>(),
    };
    let check = check_step(&stream, value, &grads, expected)?;
    let id = bench_id::<T>(GRAPH, cfg);
    report(&id, &memory, 1, value, &check, check_guard::<T>());
    time_gpu(c, &stream, cfg, GRAPH, T::SUFFIX, |_| {
        graph.launch().expect("graph replay");
    });
    Ok(())
}

/// The training step as one `CcpLayer` per layer on the bench's stream (the fused path): zero,
/// forward, backward, layer by layer. Its centres are drawn ahead (the device sampler's draws
/// of steps 0 to 7, uploaded once; a step uses the next) so that no upload is timed and a step
/// does not find the windows of the one before in the L2; the first step, on the centres of
/// step 0, is checked against `expected`.
fn bench_step_layers<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    layers: &[(FeatureShape, usize)],
    feats: &[(CudaSlice<T>, CudaSlice<T>)],
    expected: &Option<StepReference>,
) -> ccpl::Result<()> {
    const DRAWS: usize = 8;
    let draws = (0..DRAWS as u64)
        .map(|step| {
            step_centers(layers, step)?
                .iter()
                .map(|c| DeviceCenters::upload(&gpu.stream, c))
                .collect::<ccpl::Result<Vec<_>>>()
        })
        .collect::<ccpl::Result<Vec<_>>>()?;
    let lens: Vec<usize> = layers.iter().map(|(s, _)| s.len()).collect();
    let free = gpu.free_bytes()?;
    let mut objects = layers
        .iter()
        .map(|&(shape, num_s)| {
            let n = num_s.min(shape.interior());
            CcpLayer::<T>::new(
                gpu.kernels.clone(),
                gpu.stream.clone(),
                shape,
                n,
                Tau::DEFAULT,
            )
        })
        .collect::<ccpl::Result<Vec<_>>>()?;
    let mut grads = zeros::<T>(&gpu.stream, &lens)?;
    let step =
        |objects: &mut [CcpLayer<T>], grads: &mut [CudaSlice<T>], i: usize| -> ccpl::Result<()> {
            let each = objects.iter_mut().zip(feats).zip(&draws[i % DRAWS]);
            for (((layer, (q, k)), centers), grad) in each.zip(grads) {
                layer_step(gpu, layer, centers, q, k, grad)?;
            }
            Ok(())
        };
    step(&mut objects, &mut grads, 0)?;
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace: objects.iter().map(CcpLayer::workspace_bytes).sum(),
        gradients: lens.iter().sum::<usize>() * size_of::<T>(),
    };
    let mut value = 0.0;
    for layer in &objects {
        value += f64::from(gpu.stream.clone_dtoh(layer.loss())?[0]);
    }
    let check = check_step(&gpu.stream, value, &grads, expected)?;
    let id = bench_id::<T>(LAYERS, cfg);
    report(&id, &memory, 1, value, &check, check_guard::<T>());
    time_gpu(c, &gpu.stream, cfg, LAYERS, T::SUFFIX, |i| {
        step(&mut objects, &mut grads, i).expect("loss step")
    });
    Ok(())
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
    let workspace = CcpLayer::<T>::workspace_bytes_for(&shape, n)?;
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
        Tau::DEFAULT,
    )?;
    let device_centers = DeviceCenters::upload(&gpu.stream, &centers)?;
    let mut grad_q: CudaSlice<T> = gpu.stream.alloc_zeros(shape.len())?;
    let ((q_host, q), (k_host, k)) = &inputs[0];
    layer_step(gpu, &mut layer, &device_centers, q, k, &mut grad_q)?;
    let loss = f64::from(gpu.stream.clone_dtoh(layer.loss())?[0]);
    let memory = Memory {
        device: Some(free.saturating_sub(gpu.free_bytes()?)),
        workspace: layer.workspace_bytes(),
        gradients: shape.len() * e,
    };
    let check = if reference_size(&shape, n) <= CHECK_LIMIT {
        let grad = to_f64(&gpu.stream.clone_dtoh(&grad_q)?);
        let expected = ccp_layer_loss(q_host, k_host, &shape, &centers, Tau::DEFAULT, false)?;
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
                time_gpu(c, &gpu.stream, cfg, group, T::SUFFIX, |i| {
                    let ((_, q), (_, k)) = &inputs[i % sets];
                    layer_step(gpu, &mut layer, &device_centers, q, k, &mut grad_q)
                        .expect("loss step");
                });
            }
            USER_STEP => {
                // The same step (its first run is the one checked), with centres drawn.
                report(&id, &memory, sets, loss, &check, check_guard::<T>());
                time_gpu(c, &gpu.stream, cfg, group, T::SUFFIX, |i| {
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
    let logits = similarity(&unit_q.rows, &unit_k.rows, shape, Tau::DEFAULT)?;
    let forward = info_nce_forward(&logits, shape.batch(), shape.rows())?;
    let grads = info_nce_backward(
        &logits,
        &forward.row_lse,
        &unit_q.rows,
        &unit_k.rows,
        shape,
        Tau::DEFAULT,
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
    /// The bytes of its workspace.
    fn workspace_bytes(&self) -> usize;
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
    fn workspace_bytes(&self) -> usize {
        CcpRows::workspace_bytes(self)
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
    fn workspace_bytes(&self) -> usize {
        RowsLoss::<T>::workspace_bytes(&self.loss.shape)
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
    if !fits(
        gpu,
        &bench_id::<T>(LOSS, cfg),
        CcpRows::<T>::workspace_bytes_for(&shape)? + set_bytes + grads_bytes,
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
            LOSS => bench_rows_variant(c, gpu, cfg, group, &inputs, || {
                CcpRows::<T>::new(gpu.kernels.clone(), gpu.stream.clone(), shape, Tau::DEFAULT)
            })?,
            MATERIALISED => {
                let workspace = RowsLoss::<T>::workspace_bytes(&shape);
                if fits(gpu, &bench_id::<T>(group, cfg), workspace + grads_bytes)? {
                    bench_rows_variant(c, gpu, cfg, group, &inputs, || {
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
/// `<group>/<config>/<dtype>` with the memory that took and its workspace, then times it. The
/// variant and its buffers are freed on return, before the next variant is measured.
fn bench_rows_variant<T: Dtype, V: RowsVariant<T>>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    group: &str,
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
        workspace: variant.workspace_bytes(),
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

    time_gpu(c, &gpu.stream, cfg, group, T::SUFFIX, |i| {
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
    match &cfg.suite {
        Suite::Step { layers } => {
            let feats: Vec<(Vec<T>, Vec<T>)> = layers
                .iter()
                .map(|(shape, _)| {
                    let mut draw = || rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
                    (draw(), draw())
                })
                .collect();
            let gradients = layers.iter().map(|(s, _)| s.len()).sum::<usize>() * size_of::<T>();
            let one_object = LossPlan::new(layers, Tau::DEFAULT)?
                .workspace()?
                .bytes::<T>();
            let per_layer = layers
                .iter()
                .map(|(s, num_s)| CcpLayer::<T>::workspace_bytes_for(s, (*num_s).min(s.interior())))
                .sum::<ccpl::Result<usize>>()?;
            // Every variant draws new centres each step, as the device sampler does.
            let step = |i: u64| -> ccpl::Result<f64> {
                let centers = step_centers(layers, i)?;
                Ok(ccp_loss(&step_inputs(layers, &feats, centers), Tau::DEFAULT, false)?.0)
            };
            let loss = step(0)?;
            for group in groups_of(cfg) {
                let workspace = if group == LAYERS {
                    per_layer
                } else {
                    one_object
                };
                let mem = memory(workspace, gradients);
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                time_cpu(c, cfg, group, T::SUFFIX, step);
            }
        }
        &Suite::Layer { shape, num_s } => {
            let q: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let k: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let fixed = Centers::sample(shape.height(), shape.width(), num_s, CENTERS_SEED)?;
            let n = fixed.len();
            let mem = memory(
                CcpLayer::<T>::workspace_bytes_for(&shape, n)?,
                shape.len() * size_of::<T>(),
            );
            let loss = ccp_layer_loss(&q, &k, &shape, &fixed, Tau::DEFAULT, false)?.loss;
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
                    Ok(ccp_layer_loss(&q, &k, &shape, centers, Tau::DEFAULT, false)?.loss)
                });
            }
        }
        &Suite::Rows { rows, grad_k } => {
            let round = |v: Vec<f64>| v.into_iter().map(|x| T::from_f64(x).to_f64()).collect();
            let q: Vec<f64> = round(rng.vec(rows.len()));
            let k: Vec<f64> = round(rng.vec(rows.len()));
            let gradients = (1 + usize::from(grad_k)) * rows.len() * size_of::<T>();
            let loss = reference_rows(&q, &k, &rows, grad_k)?.0;
            for group in groups_of(cfg) {
                let workspace = match group {
                    LOSS => CcpRows::<T>::workspace_bytes_for(&rows)?,
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
