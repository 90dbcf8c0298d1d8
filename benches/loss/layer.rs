//! A `layer` configuration: the crate's `CcpLayer` from two feature maps, and the step as its
//! user pays it.

use super::*;

/// One headline layer step: zero `grad_q`, forward, backward into it.
pub fn layer_step<T: Dtype>(
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

pub fn bench_layer<T: Dtype>(
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
