//! The whole loss, forward plus backward, on the GPU, at the sizes of `benches/configs.txt`
//! (the same list the PyTorch baselines run):
//!
//! - the paper's training step: the `layer` configurations tagged `paper` with the same batch
//!   and `num_s` make one step of the three-layer loss (`paper-step-n8`, `paper-step-n64`),
//!   timed first, three ways: the crate's [`CcpLoss`] (three launches a step, the centres
//!   drawn on the device) on a stream, `loss_step/<step>/<dtype>`; the same step captured once
//!   in a CUDA graph and replayed, `loss_step_graph/<step>/<dtype>`; and three [`CcpLayer`]s
//!   (the fused path, nine launches a layer, the centres uploaded), `loss_step_layers/...`.
//!   Every variant zeroes the gradients first, as a training step does;
//! - `layer` configurations, one layer: the crate's [`CcpLayer`] from two feature maps (identity head;
//!   difference rows, the rows loss with the fused InfoNCE, scatter), forward, then the
//!   backward into `d feat_q`: `loss/<config>/<dtype>`;
//! - `rows` configurations: the loss from head output rows, two ways on the same inputs: the
//!   crate's [`CcpRows`] (up to S = 512 the small-S path, one launch forward and a scale
//!   backward; above, normalisation and the fused InfoNCE; memory `O(B*S*C)` either way):
//!   `loss/<config>/<dtype>`; and the standalone kernels chained with the `(B, S, S)` logits
//!   in memory (benches/common's `RowsLoss`): `loss_materialised/<config>/<dtype>`, or a
//!   "does not fit" status where those logits do not fit.
//!
//! Each step rotates through enough input sets to overflow the L2; the time is CUDA events
//! around back-to-back steps. Before timing, a size small enough for the float64 CPU reference
//! is checked against it, and a status line (`ccpl-bench {json}`) gives the check, the device
//! memory and the sizes that do not fit. Without a GPU it says SKIPPED and exits 0 (1 with
//! `CCPL_REQUIRE_GPU=1`).
//!
//! `cargo bench --bench loss` (on a GPU machine: `scripts/gpu-bench`, BENCHMARKS.md).

mod common;

use ccpl::cuda::CcpRows;
use ccpl::cuda::info_nce::Side;
use ccpl::cuda::{self as gpu_api, CcpLayer, CcpLoss};
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
use criterion::{BenchmarkId, Criterion, SamplingMode};
use cudarc::driver::{CudaSlice, CudaStream, sys};

/// The largest `B*S*S*C` checked against the CPU reference before timing (a second or so of
/// float64 on one core).
const CHECK_LIMIT: usize = 1 << 28;

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

fn main() {
    let Some(gpu) = common::gpu("loss") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    for step in paper_steps() {
        for dtype in &step.dtypes {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || with_dtype!(dtype.as_str(), T => bench_step::<T>(&mut c, &gpu, &step)),
            ));
            let failure = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => common::panic_message(panic.as_ref()),
            };
            let id = format!("loss_step/{}/{dtype}", step.name);
            eprintln!("{id}: ERROR: {failure}");
            status(&id, "error", &[("reason", Field::Str(failure))]);
        }
    }
    for cfg in common::configs() {
        for dtype in &cfg.dtypes {
            let id = format!("loss/{}/{dtype}", cfg.name);
            // A failure is reported and the next configuration goes on (a panic too: a
            // launch that fails while timing).
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || with_dtype!(dtype.as_str(), T => bench_config::<T>(&mut c, &gpu, &cfg, &id)),
            ));
            let failure = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => common::panic_message(panic.as_ref()),
            };
            eprintln!("{id}: ERROR: {failure}");
            status(&id, "error", &[("reason", Field::Str(failure))]);
        }
    }
    c.final_summary();
}

fn bench_config<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    id: &str,
) -> ccpl::Result<()> {
    let mut rng = Rng::new(20_220_708);
    match cfg.suite {
        Suite::Layer { shape, num_s } => bench_layer::<T>(c, gpu, cfg, id, shape, num_s, &mut rng),
        Suite::Rows { rows, grad_k } => bench_rows::<T>(c, gpu, cfg, id, rows, grad_k, &mut rng),
    }
}

/// Says why `id` is not timed when `bytes` do not fit; `true` when they do.
fn fits(gpu: &Gpu, id: &str, bytes: usize) -> bool {
    match gpu.fits(bytes) {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{id}: does not fit: {why}");
            status(
                id,
                "does not fit",
                &[
                    ("reason", Field::Str(why)),
                    ("need_bytes", Field::Num(bytes as f64)),
                ],
            );
            false
        }
    }
}

/// Times `step(i)` (input set `i % sets`) under `<group>/<config>/<dtype>`.
fn time_step(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    group: &str,
    dtype: &str,
    step: impl FnMut(usize),
) {
    time_on(c, &gpu.stream, group, &cfg.name, dtype, step);
}

/// Times `step(i)` on `stream` under `<group>/<name>/<dtype>`.
fn time_on(
    c: &mut Criterion,
    stream: &CudaStream,
    group: &str,
    name: &str,
    dtype: &str,
    mut step: impl FnMut(usize),
) {
    let mut group = c.benchmark_group(group);
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function(BenchmarkId::new(name, dtype), |b| {
        b.iter_custom(|iters| time_iters(stream, iters, &mut step))
    });
    group.finish();
}

/// Reports the check and the memory of `id` before it is timed.
///
/// `loss`: the value of the step run before timing.
fn report(
    id: &str,
    device_bytes: usize,
    sets: usize,
    loss: f64,
    check: Option<(f64, Vec<f64>)>,
    guard: f64,
) {
    let mut fields = vec![
        ("device_bytes", Field::Num(device_bytes as f64)),
        ("input_sets", Field::Num(sets as f64)),
        ("loss", Field::Num(loss)),
    ];
    let mut state = "ok";
    if !loss.is_finite() {
        state = "non-finite loss";
        eprintln!("{id}: NON-FINITE LOSS {loss}");
    }
    match check {
        Some((loss_err, grad_errs)) => {
            let worst = grad_errs.iter().copied().fold(loss_err, f64::max);
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
        None => fields.push((
            "check",
            Field::Str("not checked (larger than the CPU reference's limit)".into()),
        )),
    }
    status(id, state, &fields);
}

fn to_f64<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

fn rel(a: f64, b: f64) -> f64 {
    rel_err(&[a], &[b])
}

#[allow(clippy::too_many_arguments)]
fn bench_layer<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    id: &str,
    shape: FeatureShape,
    num_s: usize,
    rng: &mut Rng,
) -> ccpl::Result<()> {
    let n = num_s.min(shape.interior());
    let e = std::mem::size_of::<T>();
    let workspace = LayerWorkspace::lengths(&shape, n)?.bytes::<T>();
    let set_bytes = 2 * shape.len() * e;
    if !fits(gpu, id, workspace + set_bytes + shape.len() * e) {
        return Ok(());
    }
    let free = gpu.free_bytes();
    let mut layer = CcpLayer::<T>::new(
        gpu.kernels.clone(),
        gpu.stream.clone(),
        shape,
        n,
        DEFAULT_TAU,
    )?;
    gpu.stream.synchronize()?;
    let device_bytes = free.saturating_sub(gpu.free_bytes());

    let centers = Centers::sample(shape.height(), shape.width(), num_s, 7)?;
    let device_centers = DeviceCenters::upload(&gpu.stream, &centers)?;
    let sets = gpu.input_sets(set_bytes);
    let mut inputs = Vec::with_capacity(sets);
    for _ in 0..sets {
        inputs.push((
            common::random::<T>(gpu, shape.len(), rng)?,
            common::random::<T>(gpu, shape.len(), rng)?,
        ));
    }
    let mut grad_q: CudaSlice<T> = gpu.stream.alloc_zeros(shape.len())?;
    let scatter = Scatter::default();

    // One step before timing, read back (a failed launch shows here, not while timing), then
    // checked against the CPU reference when small enough.
    let ((q_host, q), (k_host, k)) = &inputs[0];
    layer.forward(q, k, &device_centers)?;
    layer.backward(None, &mut grad_q, None, scatter)?;
    let loss = f64::from(gpu.stream.clone_dtoh(layer.loss())?[0]);
    let check = if shape.batch() * 64 * n * n * shape.channels() <= CHECK_LIMIT {
        let grad = to_f64(&gpu.stream.clone_dtoh(&grad_q)?);
        let expected = ccp_layer_loss(q_host, k_host, &shape, &centers, DEFAULT_TAU, false)?;
        Some((
            rel(loss, expected.loss),
            vec![rel_err(&grad, &expected.grad_feat_q)],
        ))
    } else {
        None
    };
    report(id, device_bytes, sets, loss, check, check_guard::<T>());

    time_step(c, gpu, cfg, "loss", T::SUFFIX, |i| {
        let ((_, q), (_, k)) = &inputs[i % sets];
        layer.forward(q, k, &device_centers).expect("forward");
        layer
            .backward(None, &mut grad_q, None, scatter)
            .expect("backward");
    });
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

/// The crate's rows loss: the small-S path or the fused InfoNCE (no logits in memory).
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

/// The input sets of a rows configuration, the gradients' buffers, and the reference of the
/// first set when it is small enough to check.
struct RowsInputs<T: Dtype> {
    grad_k: bool,
    sets: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    grad_q: CudaSlice<T>,
    grad_k_buf: CudaSlice<T>,
    expected: Option<(f64, Vec<f64>, Option<Vec<f64>>)>,
}

/// The rows suite: the fused [`CcpRows`] (`loss/<config>/<dtype>`), then the materialised
/// composition (`loss_materialised/<config>/<dtype>`) where its logits fit, on the same
/// inputs.
#[allow(clippy::too_many_arguments)]
fn bench_rows<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    id: &str,
    shape: RowShape,
    grad_k: bool,
    rng: &mut Rng,
) -> ccpl::Result<()> {
    let e = size_of::<T>();
    let set_bytes = 2 * shape.len() * e;
    let grads_bytes = 2 * shape.len() * e;
    if !fits(
        gpu,
        id,
        RowsWorkspace::lengths(&shape)?.bytes::<T>() + set_bytes + grads_bytes,
    ) {
        return Ok(());
    }
    let count = gpu.input_sets(set_bytes);
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
    let mut inputs = RowsInputs {
        grad_k,
        sets,
        grad_q: gpu.stream.alloc_zeros(shape.len())?,
        grad_k_buf: gpu.stream.alloc_zeros(shape.len())?,
        expected,
    };

    let free = gpu.free_bytes();
    let mut fused = CcpRows::<T>::new(gpu.kernels.clone(), gpu.stream.clone(), shape, DEFAULT_TAU)?;
    gpu.stream.synchronize()?;
    let fused_bytes = free.saturating_sub(gpu.free_bytes());
    bench_rows_variant(c, gpu, cfg, "loss", &mut fused, fused_bytes, &mut inputs)?;
    drop(fused);
    gpu.stream.synchronize()?; // the fused workspace freed before measuring what is free

    let id = format!("loss_materialised/{}/{}", cfg.name, T::SUFFIX);
    if !fits(gpu, &id, RowsLoss::<T>::workspace_bytes(&shape)) {
        return Ok(());
    }
    let free = gpu.free_bytes();
    let mut materialised = Materialised {
        gpu,
        loss: RowsLoss::<T>::new(gpu, shape)?,
    };
    gpu.stream.synchronize()?;
    let materialised_bytes = free.saturating_sub(gpu.free_bytes());
    bench_rows_variant(
        c,
        gpu,
        cfg,
        "loss_materialised",
        &mut materialised,
        materialised_bytes,
        &mut inputs,
    )
}

/// Runs `variant` once on the first input set, reads back and checks it (against the
/// reference when there is one), reports it as `<group>/<config>/<dtype>`, then times it.
fn bench_rows_variant<T: Dtype>(
    c: &mut Criterion,
    gpu: &Gpu,
    cfg: &Config,
    group: &str,
    variant: &mut impl RowsVariant<T>,
    device_bytes: usize,
    inputs: &mut RowsInputs<T>,
) -> ccpl::Result<()> {
    let id = format!("{group}/{}/{}", cfg.name, T::SUFFIX);
    let RowsInputs {
        grad_k,
        sets,
        grad_q,
        grad_k_buf,
        expected,
    } = inputs;
    // The gradients' buffers hold the previous variant's results: NaN first, so that an
    // element this variant does not write fails the check.
    let nan = vec![T::from_f64(f64::NAN); grad_q.len()];
    gpu.stream.memcpy_htod(&nan, grad_q)?;
    gpu.stream.memcpy_htod(&nan, grad_k_buf)?;
    let (q, k) = &sets[0];
    variant.step(q, k, grad_q, grad_k.then_some(&mut *grad_k_buf))?;
    let value = f64::from(gpu.stream.clone_dtoh(variant.loss())?[0]);
    let check = match expected {
        Some((expected, dq, dk)) => {
            let mut errs = vec![rel_err(&to_f64(&gpu.stream.clone_dtoh(grad_q)?), dq)];
            if let Some(dk) = dk {
                errs.push(rel_err(&to_f64(&gpu.stream.clone_dtoh(grad_k_buf)?), dk));
            }
            Some((rel(value, *expected), errs))
        }
        None => None,
    };
    let count = sets.len();
    report(&id, device_bytes, count, value, check, check_guard::<T>());

    time_step(c, gpu, cfg, group, T::SUFFIX, |i| {
        let (q, k) = &sets[i % count];
        variant
            .step(q, k, grad_q, grad_k.then_some(&mut *grad_k_buf))
            .expect("loss step");
    });
    Ok(())
}

/// One training step of the multi-layer loss: layers with the same batch and `num_s`.
struct PaperStep {
    name: String,
    layers: Vec<(FeatureShape, usize)>,
    dtypes: Vec<String>,
}

/// The paper's steps: the `layer` configurations tagged `paper`, grouped by batch and
/// `num_s` in file order, the dtypes they all list.
fn paper_steps() -> Vec<PaperStep> {
    let mut steps: Vec<PaperStep> = Vec::new();
    for cfg in common::configs().into_iter().filter(|c| c.tag == "paper") {
        let Suite::Layer { shape, num_s } = cfg.suite else {
            continue;
        };
        let name = format!("paper-step-n{num_s}");
        match steps
            .iter_mut()
            .find(|s| s.name == name && s.layers[0].0.batch() == shape.batch())
        {
            Some(step) => {
                step.layers.push((shape, num_s));
                step.dtypes.retain(|d| cfg.dtypes.contains(d));
            }
            None => steps.push(PaperStep {
                name,
                layers: vec![(shape, num_s)],
                dtypes: cfg.dtypes.clone(),
            }),
        }
    }
    steps
}

const STEP_SEED: u64 = 7;

/// The three variants of one paper step in `T` (module docs). One input set: the centres
/// change every step, so a step does not find the previous one's windows in the L2.
fn bench_step<T: Dtype>(c: &mut Criterion, gpu: &Gpu, step: &PaperStep) -> ccpl::Result<()> {
    let id = format!("loss_step/{}/{}", step.name, T::SUFFIX);
    let mut rng = Rng::new(20_220_708);
    let e = size_of::<T>();
    let inputs_bytes: usize = step.layers.iter().map(|(s, _)| 3 * s.len() * e).sum();
    let workspace = ccpl::plan::loss::LossPlan::new(&step.layers, DEFAULT_TAU)?
        .workspace()?
        .bytes::<T>();
    if !fits(gpu, &id, workspace + inputs_bytes) {
        return Ok(());
    }
    let mut host = Vec::new();
    let mut feats = Vec::new();
    for (shape, _) in &step.layers {
        let ((q_host, q), (k_host, k)) = (
            common::random::<T>(gpu, shape.len(), &mut rng)?,
            common::random::<T>(gpu, shape.len(), &mut rng)?,
        );
        host.push((q_host, k_host));
        feats.push((q, k));
    }
    let mut grads: Vec<CudaSlice<T>> = step
        .layers
        .iter()
        .map(|(s, _)| gpu.stream.alloc_zeros(s.len()))
        .collect::<Result<_, _>>()?;
    let zero =
        |grads: &mut [CudaSlice<T>], stream: &std::sync::Arc<CudaStream>| -> ccpl::Result<()> {
            for g in grads {
                stream.memset_zeros(g)?;
            }
            Ok(())
        };

    // CcpLoss on the bench's stream: checked against the reference on the centres of step 0.
    let free = gpu.free_bytes();
    let mut loss = CcpLoss::<T>::new(
        gpu.kernels.clone(),
        gpu.stream.clone(),
        &step.layers,
        DEFAULT_TAU,
        STEP_SEED,
    )?;
    gpu.stream.synchronize()?;
    let device_bytes = free.saturating_sub(gpu.free_bytes());
    let run = |loss: &mut CcpLoss<T>,
               grads: &mut [CudaSlice<T>],
               stream: &std::sync::Arc<CudaStream>,
               feats: &[(CudaSlice<T>, CudaSlice<T>)]|
     -> ccpl::Result<()> {
        zero(grads, stream)?;
        let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
        loss.forward(&inputs)?;
        loss.backward(None, &mut grads.iter_mut().collect::<Vec<_>>(), None)
    };
    run(&mut loss, &mut grads, &gpu.stream, &feats)?;
    let value = f64::from(gpu.stream.clone_dtoh(loss.loss())?[0]);
    let (mut expected, mut grad_errs) = (0.0, Vec::new());
    for (l, ((shape, num_s), (q, k))) in step.layers.iter().zip(&host).enumerate() {
        let centers = Centers::philox(
            shape.height(),
            shape.width(),
            *num_s,
            STEP_SEED,
            0,
            l as u32,
        )?;
        let want = ccp_layer_loss(q, k, shape, &centers, DEFAULT_TAU, false)?;
        expected += want.loss;
        grad_errs.push(rel_err(
            &to_f64(&gpu.stream.clone_dtoh(&grads[l])?),
            &want.grad_feat_q,
        ));
    }
    report(
        &id,
        device_bytes,
        1,
        value,
        Some((rel(value, expected), grad_errs)),
        check_guard::<T>(),
    );
    time_on(c, &gpu.stream, "loss_step", &step.name, T::SUFFIX, |_| {
        run(&mut loss, &mut grads, &gpu.stream, &feats).expect("loss step");
    });
    drop(loss);

    // The same step captured in a CUDA graph, on a stream of a context handle of its own
    // whose buffers are not event-tracked (what a capture needs), replayed.
    let ctx = gpu_api::context(0)?;
    // SAFETY: every buffer of the captured step is used on this one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let graph_feats: Vec<(CudaSlice<T>, CudaSlice<T>)> = host
        .iter()
        .map(|(q, k)| Ok((stream.clone_htod(q)?, stream.clone_htod(k)?)))
        .collect::<ccpl::Result<_>>()?;
    let mut graph_grads: Vec<CudaSlice<T>> = step
        .layers
        .iter()
        .map(|(s, _)| stream.alloc_zeros(s.len()))
        .collect::<Result<_, _>>()?;
    let mut loss = CcpLoss::<T>::new(
        gpu.kernels.clone(),
        stream.clone(),
        &step.layers,
        DEFAULT_TAU,
        STEP_SEED,
    )?;
    run(&mut loss, &mut graph_grads, &stream, &graph_feats)?; // first launches, outside the graph
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    run(&mut loss, &mut graph_grads, &stream, &graph_feats)?;
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))?
        .ok_or_else(|| ccpl::Error::Cuda("the capture recorded no work".into()))?;
    graph.launch()?;
    let replayed = f64::from(stream.clone_dtoh(loss.loss())?[0]);
    status(
        &format!("loss_step_graph/{}/{}", step.name, T::SUFFIX),
        if replayed.is_finite() {
            "ok"
        } else {
            "non-finite loss"
        },
        &[("loss", Field::Num(replayed))],
    );
    time_on(c, &stream, "loss_step_graph", &step.name, T::SUFFIX, |_| {
        graph.launch().expect("graph replay");
    });
    drop(graph);
    drop(loss);

    // Three CcpLayers, the fused path, the centres of step 0 uploaded once.
    let mut layers = Vec::new();
    for (shape, num_s) in &step.layers {
        let n = (*num_s).min(shape.interior());
        layers.push(CcpLayer::<T>::new(
            gpu.kernels.clone(),
            gpu.stream.clone(),
            *shape,
            n,
            DEFAULT_TAU,
        )?);
    }
    let centers = step
        .layers
        .iter()
        .enumerate()
        .map(|(l, (s, n))| {
            DeviceCenters::upload(
                &gpu.stream,
                &Centers::philox(s.height(), s.width(), *n, STEP_SEED, 0, l as u32)?,
            )
        })
        .collect::<ccpl::Result<Vec<_>>>()?;
    time_on(
        c,
        &gpu.stream,
        "loss_step_layers",
        &step.name,
        T::SUFFIX,
        |_| {
            zero(&mut grads, &gpu.stream).expect("zero");
            for (((layer, (q, k)), centers), grad) in
                layers.iter_mut().zip(&feats).zip(&centers).zip(&mut grads)
            {
                layer.forward(q, k, centers).expect("forward");
                layer
                    .backward(None, grad, None, Scatter::default())
                    .expect("backward");
            }
        },
    );
    Ok(())
}
