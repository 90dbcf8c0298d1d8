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
//! `cargo bench --bench loss` (on a GPU machine: `scripts/gpu-pack`, docs/gpu-run.md).

#[path = "../common/mod.rs"]
mod common;
mod dry_run;
mod layer;
mod rows;
mod step;

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
use dry_run::dry_run;
use layer::bench_layer;
use rows::bench_rows;
use step::bench_step;

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

/// `B S^2 C` of a layer of `shape` with `n` centres: what the CPU reference's time grows with.
fn reference_size(shape: &FeatureShape, n: usize) -> usize {
    shape.batch() * 64 * n * n * shape.channels()
}
