//! Each kernel on its own, forward and backward, on the GPU, at the sizes of
//! `benches/configs.txt`: for a `layer` configuration every kernel its loss launches (the
//! difference rows, normalised as they are formed or not, and their scatter at the feature
//! map's size, then the row kernels at width C); for a `rows` configuration the row kernels at
//! the head's width D; a `step` configuration is timed through its layers' own lines. The
//! InfoNCE runs both ways: the materialised kernels (`similarity`, `info_nce_forward`,
//! `info_nce_backward_*`, through the `(B, S, S)` logits) and the fused ones
//! (`info_nce_fused_forward`, `info_nce_fused_backward_*`, logits recomputed on the chip).
//!
//! The inputs of each kernel are what the loss would give it (the forward runs once on random
//! feature maps or rows before timing), in enough independent sets to overflow the L2; the
//! time is CUDA events around back-to-back launches. Criterion id: `<kernel>/<config>/<dtype>`.
//! Without a GPU it says SKIPPED and exits 0 (1 with `CCPL_REQUIRE_GPU=1`).
//!
//! `cargo bench --bench kernels` (on a GPU machine: `scripts/gpu-pack`, docs/gpu-run.md).

mod common;

use ccpl::cuda::info_nce::{self as nce, Side};
use ccpl::cuda::info_nce_fused as fused;
use ccpl::cuda::neighbor::{self, DeviceCenters, Scatter};
use ccpl::cuda::{normalize, similarity};
use ccpl::{Centers, Dtype, FeatureShape, RowShape, Tau};
use common::{Config, Field, Gpu, Rng, RowsLoss, Suite, status, time_iters};
use criterion::{BenchmarkId, Criterion, SamplingMode};
use cudarc::driver::CudaSlice;

fn main() {
    let Some(gpu) = common::gpu("kernels") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    for cfg in common::configs() {
        for dtype in &cfg.dtypes {
            let id = format!("kernels/{}/{dtype}", cfg.name);
            // A failure is reported and the next configuration goes on (a panic too).
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ccpl::dispatch_dtype!(dtype.as_str(), T => bench_config::<T>(&mut c, &gpu, &cfg),
                        other => Err(common::unknown_dtype(other)))
            }));
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

/// The feature maps of a `layer` configuration and its centres.
struct Layer {
    shape: FeatureShape,
    centers: DeviceCenters,
}

/// One independent set of every buffer the kernels read and write.
struct Set<T: Dtype> {
    /// `(feat_q, feat_k, grad_feat)` of a layer configuration.
    feat: Option<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)>,
    rows_q: CudaSlice<T>,
    rows_k: CudaSlice<T>,
    grad_rows: CudaSlice<T>,
    loss: RowsLoss<T>,
}

impl<T: Dtype> Set<T> {
    /// Random inputs, then the forward and the backward of `q` once, so that every buffer
    /// holds what the loss would put there.
    fn new(gpu: &Gpu, rows: RowShape, layer: Option<&Layer>, rng: &mut Rng) -> ccpl::Result<Self> {
        let s = &gpu.stream;
        let (feat, rows_q, rows_k) = match layer {
            Some(layer) => {
                let len = layer.shape.len();
                let (_, feat_q) = common::random::<T>(gpu, len, rng)?;
                let (_, feat_k) = common::random::<T>(gpu, len, rng)?;
                let mut rows_q = s.alloc_zeros(rows.len())?;
                let mut rows_k = s.alloc_zeros(rows.len())?;
                let k = &*gpu.kernels;
                neighbor::neighbor_diff(k, s, &layer.shape, &layer.centers, &feat_q, &mut rows_q)?;
                neighbor::neighbor_diff(k, s, &layer.shape, &layer.centers, &feat_k, &mut rows_k)?;
                (Some((feat_q, feat_k, s.alloc_zeros(len)?)), rows_q, rows_k)
            }
            None => (
                None,
                common::random::<T>(gpu, rows.len(), rng)?.1,
                common::random::<T>(gpu, rows.len(), rng)?.1,
            ),
        };
        let mut set = Self {
            feat,
            rows_q,
            rows_k,
            grad_rows: s.alloc_zeros(rows.len())?,
            loss: RowsLoss::new(gpu, rows)?,
        };
        set.loss.forward(gpu, &set.rows_q, &set.rows_k)?;
        set.loss
            .backward(gpu, Side::Q, &set.rows_q, &mut set.grad_rows)?;
        Ok(set)
    }

    fn bytes(rows: &RowShape, layer: Option<&Layer>) -> usize {
        let feat = layer.map_or(0, |l| 3 * l.shape.len());
        (feat + 3 * rows.len()) * std::mem::size_of::<T>() + RowsLoss::<T>::workspace_bytes(rows)
    }
}

/// One kernel launch on one set.
type Launch<T> = fn(&Gpu, Option<&Layer>, &mut Set<T>) -> ccpl::Result<()>;

/// The kernels, by the names the report knows them by (tools/bench/common.py, KERNELS).
fn kernels<T: Dtype>() -> Vec<(&'static str, Launch<T>)> {
    vec![
        ("neighbor_diff", |gpu, layer, set| {
            let (layer, (feat_q, _, _)) =
                layer.zip(set.feat.as_ref()).expect("a layer configuration");
            neighbor::neighbor_diff(
                &gpu.kernels,
                &gpu.stream,
                &layer.shape,
                &layer.centers,
                feat_q,
                &mut set.rows_q,
            )
        }),
        ("neighbor_diff_normalize", |gpu, layer, set| {
            let (layer, (feat_q, _, _)) =
                layer.zip(set.feat.as_ref()).expect("a layer configuration");
            let l = &mut set.loss;
            neighbor::neighbor_diff_normalize(
                &gpu.kernels,
                &gpu.stream,
                &layer.shape,
                &layer.centers,
                feat_q,
                &mut l.unit_q,
                &mut l.norms_q,
            )
        }),
        ("neighbor_diff_backward_atomic", |gpu, layer, set| {
            scatter(gpu, layer, set, Scatter::Atomic)
        }),
        ("neighbor_diff_backward_deterministic", |gpu, layer, set| {
            scatter(gpu, layer, set, Scatter::Deterministic)
        }),
        ("normalize_rows", |gpu, _, set| {
            let l = &mut set.loss;
            normalize::normalize_rows(
                &gpu.kernels,
                &gpu.stream,
                &l.shape,
                &set.rows_q,
                &mut l.unit_q,
                &mut l.norms_q,
            )
        }),
        ("normalize_rows_backward", |gpu, _, set| {
            let l = &set.loss;
            normalize::normalize_rows_backward(
                &gpu.kernels,
                &gpu.stream,
                &l.shape,
                &set.rows_q,
                &l.norms_q,
                &l.grad_unit,
                &mut set.grad_rows,
            )
        }),
        ("similarity", |gpu, _, set| {
            let l = &mut set.loss;
            similarity::similarity(
                &gpu.kernels,
                &gpu.stream,
                &l.shape,
                Tau::DEFAULT,
                &l.unit_q,
                &l.unit_k,
                &mut l.logits,
            )
        }),
        ("info_nce_forward", |gpu, _, set| {
            let l = &mut set.loss;
            nce::info_nce_forward(
                &gpu.kernels,
                &gpu.stream,
                &l.shape,
                &l.logits,
                &mut l.row_lse,
                &mut l.row_loss,
            )
        }),
        ("info_nce_backward_dq", |gpu, _, set| {
            info_nce_backward(gpu, set, Side::Q)
        }),
        ("info_nce_backward_dk", |gpu, _, set| {
            info_nce_backward(gpu, set, Side::K)
        }),
        ("info_nce_fused_forward", |gpu, _, set| {
            let l = &mut set.loss;
            fused::info_nce_fused_forward(
                &gpu.kernels,
                &gpu.stream,
                &l.shape,
                Tau::DEFAULT,
                &l.unit_q,
                &l.unit_k,
                &mut l.row_lse,
                &mut l.row_loss,
            )
        }),
        ("info_nce_fused_backward_dq", |gpu, _, set| {
            info_nce_fused_backward(gpu, set, Side::Q)
        }),
        ("info_nce_fused_backward_dk", |gpu, _, set| {
            info_nce_fused_backward(gpu, set, Side::K)
        }),
    ]
}

fn scatter<T: Dtype>(
    gpu: &Gpu,
    layer: Option<&Layer>,
    set: &mut Set<T>,
    how: Scatter,
) -> ccpl::Result<()> {
    let (layer, (_, _, grad_feat)) = layer.zip(set.feat.as_mut()).expect("a layer configuration");
    neighbor::neighbor_diff_backward(
        &gpu.kernels,
        &gpu.stream,
        &layer.shape,
        &layer.centers,
        &set.grad_rows,
        grad_feat,
        how,
    )
}

fn info_nce_backward<T: Dtype>(gpu: &Gpu, set: &mut Set<T>, side: Side) -> ccpl::Result<()> {
    let l = &mut set.loss;
    let other = match side {
        Side::Q => &l.unit_k,
        Side::K => &l.unit_q,
    };
    nce::info_nce_backward(
        &gpu.kernels,
        &gpu.stream,
        &l.shape,
        Tau::DEFAULT,
        side,
        &l.logits,
        &l.row_lse,
        &l.row_loss,
        other,
        &l.one,
        &mut l.grad_unit,
    )
}

fn info_nce_fused_backward<T: Dtype>(gpu: &Gpu, set: &mut Set<T>, side: Side) -> ccpl::Result<()> {
    let l = &mut set.loss;
    fused::info_nce_fused_backward(
        &gpu.kernels,
        &gpu.stream,
        &l.shape,
        Tau::DEFAULT,
        side,
        &l.unit_q,
        &l.unit_k,
        &l.row_lse,
        &l.row_loss,
        &l.one,
        &mut l.grad_unit,
    )
}

/// Whether `kernel` is part of `cfg`'s loss (as tools/bench/common.py's kernels_of says).
fn runs(kernel: &str, cfg: &Config) -> bool {
    match kernel {
        k if k.starts_with("neighbor") => matches!(cfg.suite, Suite::Layer { .. }),
        "info_nce_backward_dk" | "info_nce_fused_backward_dk" => cfg.grad_k(),
        _ => true,
    }
}

fn bench_config<T: Dtype>(c: &mut Criterion, gpu: &Gpu, cfg: &Config) -> ccpl::Result<()> {
    let id = format!("kernels/{}/{}", cfg.name, T::SUFFIX);
    // A training step's kernels are its layers', timed on the layers' own lines.
    let Some(rows) = cfg.rows() else {
        return Ok(());
    };
    let layer = match cfg.suite {
        Suite::Layer { shape, num_s } => {
            let centers = Centers::sample(shape.height(), shape.width(), num_s, 7)?;
            Some(Layer {
                shape,
                centers: DeviceCenters::upload(&gpu.stream, &centers)?,
            })
        }
        Suite::Step { .. } | Suite::Rows { .. } => None,
    };
    let set_bytes = Set::<T>::bytes(&rows, layer.as_ref());
    if let Some(why) = gpu.does_not_fit(set_bytes)? {
        eprintln!("{id}: does not fit: {why}");
        status(
            &id,
            "does not fit",
            &[
                ("reason", Field::Str(why)),
                ("need_bytes", Field::Num(set_bytes as f64)),
            ],
        );
        return Ok(());
    }
    let mut rng = Rng::new(20_221_026);
    let count = gpu.input_sets(set_bytes)?;
    let mut sets = (0..count)
        .map(|_| Set::<T>::new(gpu, rows, layer.as_ref(), &mut rng))
        .collect::<ccpl::Result<Vec<_>>>()?;
    gpu.stream.synchronize()?;
    status(
        &id,
        "ok",
        &[
            ("input_sets", Field::Num(count as f64)),
            ("set_bytes", Field::Num(set_bytes as f64)),
        ],
    );

    for (kernel, launch) in kernels::<T>() {
        if !runs(kernel, cfg) {
            continue;
        }
        // One launch and a wait before timing: a failure is reported here, not while timing.
        let trial = launch(gpu, layer.as_ref(), &mut sets[0])
            .and_then(|()| Ok(gpu.stream.synchronize()?));
        if let Err(e) = trial {
            let id = format!("{kernel}/{}/{}", cfg.name, T::SUFFIX);
            eprintln!("{id}: ERROR: {e}");
            status(&id, "error", &[("reason", Field::Str(e.to_string()))]);
            continue;
        }
        let mut group = c.benchmark_group(kernel);
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function(BenchmarkId::new(&cfg.name, T::SUFFIX), |b| {
            b.iter_custom(|iters| {
                time_iters(&gpu.stream, iters, |i| {
                    launch(gpu, layer.as_ref(), &mut sets[i % count]).expect(kernel)
                })
            })
        });
        group.finish();
    }
    Ok(())
}
