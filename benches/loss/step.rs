//! The paper's training step of the multi-layer loss (`step` configurations): the crate's
//! `CcpLoss` on a stream, captured in a CUDA graph, as the API's user pays it, and as one
//! `CcpLayer` per layer.

use super::layer::layer_step;
use super::*;

/// The centres the device sampler of a training step (seeded `CENTERS_SEED`) draws at
/// `step`, for each layer (`Centers::philox`, its model on the host).
pub fn step_centers(layers: &[(FeatureShape, usize)], step: u64) -> ccpl::Result<Vec<Centers>> {
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
pub fn step_inputs<'a, T>(
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
pub fn bench_step<T: Dtype>(
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
