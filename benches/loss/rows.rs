//! A `rows` configuration: the crate's `CcpRows` from head output rows, and the same loss
//! composed of the standalone kernels with the logits in memory.

use super::*;

/// The float64 reference of the loss from rows: the loss, `d rows_q`, and `d rows_k` when asked.
pub fn reference_rows(
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

/// Both sides' rows, `(q, k)`.
type RowPair<'a, T> = (&'a CudaSlice<T>, &'a CudaSlice<T>);
/// What a step writes: the gradient of `q`, and of `k` when given.
type GradPair<'a, T> = (&'a mut CudaSlice<T>, Option<&'a mut CudaSlice<T>>);

/// One implementation of the loss from rows, timed under its own criterion group.
trait RowsVariant<T: Dtype> {
    /// One forward plus backward: `d rows_q` into `grad_q`, and `d rows_k` into `grad_k`
    /// when given.
    fn step(&mut self, rows: RowPair<'_, T>, grads: GradPair<'_, T>) -> ccpl::Result<()>;
    /// The loss of the last step, on the device.
    fn loss(&self) -> &CudaSlice<f32>;
    /// The bytes of its workspace.
    fn workspace_bytes(&self) -> usize;
}

/// The crate's rows loss: normalisation and the fused InfoNCE (no logits in memory).
impl<T: Dtype> RowsVariant<T> for CcpRows<T> {
    fn step(
        &mut self,
        (q, k): RowPair<'_, T>,
        (grad_q, grad_k): GradPair<'_, T>,
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
        (q, k): RowPair<'_, T>,
        (grad_q, grad_k): GradPair<'_, T>,
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
pub fn bench_rows<T: Dtype>(
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
    variant.step((q, k), (&mut grad_q, grad_k.then_some(&mut grad_k_buf)))?;
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
            .step((q, k), (&mut grad_q, grad_k.then_some(&mut grad_k_buf)))
            .expect("loss step");
    });
    Ok(())
}
