//! `CcpLoss` on a real device: the whole multi-layer loss against the CPU reference (centres
//! given, and drawn on the device: the host model says which), its errors; and a training
//! step captured in a CUDA graph and replayed, each replay drawing new centres and agreeing
//! with the reference. Each test says loudly that it SKIPPED without a GPU, and fails instead
//! when `CCPL_REQUIRE_GPU=1`.

use crate::common;

use ccpl::cuda::{CcpLoss, DeviceCenters};
use ccpl::loss::multi_layer::LossPlan;
use ccpl::reference::{self, LayerInput};
use ccpl::{Centers, Error, FeatureShape, Layout, Tau};
use common::Rng;
use common::assert_close;
use common::fixtures::random;
use common::tolerance::{F32_TOLERANCE, stored_tolerance, to_f64};
use cudarc::driver::{CudaSlice, CudaStream, sys};

const TAU: Tau = Tau::DEFAULT;
const SEED: u64 = 41;

/// The paper's layers (relu2_1, relu3_1, relu4_1 at a 256 crop, num_s = 8) at batch `b`.
fn paper(b: usize) -> Vec<(FeatureShape, usize)> {
    [(128, 128), (256, 64), (512, 32)]
        .iter()
        .map(|&(c, side)| {
            (
                FeatureShape::new(b, c, side, side, Layout::Nchw).unwrap(),
                8,
            )
        })
        .collect()
}

/// Random features of every layer, on the host and the device.
#[allow(clippy::type_complexity)]
fn features<T: ccpl::Dtype>(
    stream: &std::sync::Arc<CudaStream>,
    layers: &[(FeatureShape, usize)],
    rng: &mut Rng,
) -> (Vec<(Vec<T>, Vec<T>)>, Vec<(CudaSlice<T>, CudaSlice<T>)>) {
    let host: Vec<(Vec<T>, Vec<T>)> = layers
        .iter()
        .map(|(s, _)| (random(rng, s.len(), 1.0), random(rng, s.len(), 1.0)))
        .collect();
    let dev = host
        .iter()
        .map(|(q, k)| (stream.clone_htod(q).unwrap(), stream.clone_htod(k).unwrap()))
        .collect();
    (host, dev)
}

/// The loss and the gradients of feat_q against the reference, on centres `centers`.
fn check<T: ccpl::Dtype>(
    what: &str,
    layers: &[(FeatureShape, usize)],
    feats: &[(Vec<T>, Vec<T>)],
    centers: &[Centers],
    loss: f32,
    grads: &[Vec<f64>],
) {
    let inputs: Vec<LayerInput<'_, T>> = layers
        .iter()
        .zip(feats)
        .zip(centers)
        .map(|((&(shape, _), (q, k)), c)| LayerInput {
            feat_q: q,
            feat_k: k,
            shape,
            centers: c.clone(),
        })
        .collect();
    let (want, per_layer) = reference::ccp_loss(&inputs, TAU, false).unwrap();
    assert_close(
        &format!("{what} loss"),
        &[loss as f64],
        &[want],
        F32_TOLERANCE,
    );
    for (l, (got, exact)) in grads.iter().zip(&per_layer).enumerate() {
        let tol = stored_tolerance::<T>(&exact.grad_feat_q);
        assert_close(
            &format!("{what} layer {l} grad_feat_q"),
            got,
            &exact.grad_feat_q,
            tol,
        );
    }
}

/// Eager steps on the default stream: centres given, then drawn on the device (the host
/// model's); f32 with a layer on the fused path (S = 1024) among the paper's (B = 4), bf16 on
/// the paper's (whose only rounding is the gradients' store); errors.
#[test]
fn ccp_loss_matches_reference() {
    let gpu = gpu_or_skip!("gpu_loss::ccp_loss_matches_reference");
    let (kernels, stream) = (gpu.kernels(), gpu.stream());
    let mut rng = Rng::new(3);
    let mut layers = paper(4);
    check_dtype::<half::bf16>(kernels, stream, &layers, &mut rng);
    layers.push((FeatureShape::new(2, 64, 40, 40, Layout::Nhwc).unwrap(), 128));
    check_dtype::<f32>(kernels, stream, &layers, &mut rng);

    let mut loss =
        CcpLoss::<f32>::new(kernels.clone(), stream.clone(), &layers, TAU, SEED).unwrap();
    let mut grads: Vec<CudaSlice<f32>> = layers
        .iter()
        .map(|(s, _)| stream.alloc_zeros(s.len()).unwrap())
        .collect();
    let mut refs: Vec<&mut CudaSlice<f32>> = grads.iter_mut().collect();
    assert_eq!(
        loss.backward(None, &mut refs, None),
        Err(Error::BackwardBeforeForward)
    );
    let (_, feats) = features::<f32>(stream, &layers, &mut rng);
    let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
    assert!(matches!(
        loss.forward(&inputs[..2]),
        Err(Error::Length { .. })
    ));
    let mut swapped = inputs.clone();
    swapped.swap(0, 1);
    assert!(matches!(
        loss.forward(&swapped),
        Err(Error::Length { what: "feat_q", .. })
    ));
    let tiny = [(FeatureShape::new(1, 1, 3, 3, Layout::Nchw).unwrap(), 0)];
    assert_eq!(
        CcpLoss::<f32>::new(kernels.clone(), stream.clone(), &tiny, TAU, SEED).unwrap_err(),
        Error::NoCenters
    );
}

fn check_dtype<T: ccpl::Dtype>(
    kernels: &std::sync::Arc<ccpl::cuda::Kernels>,
    stream: &std::sync::Arc<CudaStream>,
    layers: &[(FeatureShape, usize)],
    rng: &mut Rng,
) {
    let mut loss = CcpLoss::<T>::new(kernels.clone(), stream.clone(), layers, TAU, SEED).unwrap();
    // It holds what its plan counts (the workspace the benches report).
    let counted = LossPlan::new(layers, TAU).unwrap().workspace().unwrap();
    assert_eq!(loss.workspace_bytes(), counted.bytes::<T>());
    let (host, feats) = features::<T>(stream, layers, rng);
    let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
    let mut grads: Vec<CudaSlice<T>> = layers
        .iter()
        .map(|(s, _)| stream.alloc_zeros(s.len()).unwrap())
        .collect();
    let run = |loss: &mut CcpLoss<T>, grads: &mut Vec<CudaSlice<T>>| {
        for g in grads.iter_mut() {
            stream.memset_zeros(g).unwrap();
        }
        let mut refs: Vec<&mut CudaSlice<T>> = grads.iter_mut().collect();
        loss.backward(None, &mut refs, None).unwrap();
        let value = stream.clone_dtoh(loss.loss()).unwrap()[0];
        let got: Vec<Vec<f64>> = grads
            .iter()
            .map(|g| to_f64(&stream.clone_dtoh(g).unwrap()))
            .collect();
        (value, got)
    };

    // Given centres.
    let given: Vec<Centers> = layers
        .iter()
        .enumerate()
        .map(|(l, (s, n))| Centers::sample(s.height(), s.width(), *n, 90 + l as u64).unwrap())
        .collect();
    let uploaded: Vec<DeviceCenters> = given
        .iter()
        .map(|c| DeviceCenters::upload(stream, c).unwrap())
        .collect();
    loss.forward_with_centers(&inputs, &uploaded.iter().collect::<Vec<_>>())
        .unwrap();
    let (value, got) = run(&mut loss, &mut grads);
    check::<T>(
        &format!("{} given", T::SUFFIX),
        layers,
        &host,
        &given,
        value,
        &got,
    );

    // Drawn on the device: step 0 (forward_with_centers did not advance it), then step 1.
    for step in 0..2 {
        loss.forward(&inputs).unwrap();
        let drawn: Vec<Centers> = layers
            .iter()
            .enumerate()
            .map(|(l, (s, n))| {
                Centers::philox(s.height(), s.width(), *n, SEED, step, l as u32).unwrap()
            })
            .collect();
        let (value, got) = run(&mut loss, &mut grads);
        check::<T>(
            &format!("{} drawn, step {step}", T::SUFFIX),
            layers,
            &host,
            &drawn,
            value,
            &got,
        );
    }
}

/// A training step at the paper's configuration (B = 8), captured in a CUDA graph: zero the
/// gradients, forward (new centres drawn on the device), backward. Replayed three times, each
/// replay draws the next step's centres and agrees with the reference on them; nothing in the
/// step waits for the host, allocates or copies from it (the capture would fail).
#[test]
fn captured_step_replays_against_the_reference() {
    let gpu = gpu_or_skip!("gpu_loss::captured_step_replays_against_the_reference");
    let ctx = gpu.kernels().context().clone();
    // A capture needs a stream other than the legacy default one, and no cudarc event
    // tracking (its waits on events recorded before the capture would end it): off for every
    // buffer allocated from here on.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let layers = paper(8);
    let mut rng = Rng::new(8);
    let mut loss =
        CcpLoss::<f32>::new(gpu.kernels().clone(), stream.clone(), &layers, TAU, SEED).unwrap();
    let (host, feats) = features::<f32>(&stream, &layers, &mut rng);
    let mut grads: Vec<CudaSlice<f32>> = layers
        .iter()
        .map(|(s, _)| stream.alloc_zeros(s.len()).unwrap())
        .collect();
    let step = |loss: &mut CcpLoss<f32>, grads: &mut Vec<CudaSlice<f32>>| {
        for g in grads.iter_mut() {
            stream.memset_zeros(g).unwrap();
        }
        let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
        loss.forward(&inputs).unwrap();
        let mut refs: Vec<&mut CudaSlice<f32>> = grads.iter_mut().collect();
        loss.backward(None, &mut refs, None).unwrap();
    };
    step(&mut loss, &mut grads); // eager, step 0: modules loaded, first launches done
    stream.synchronize().unwrap();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step(&mut loss, &mut grads);
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the step was captured");
    for replay in 0..3u64 {
        graph.launch().unwrap();
        stream.synchronize().unwrap();
        let drawn: Vec<Centers> = layers
            .iter()
            .enumerate()
            .map(|(l, (s, n))| {
                Centers::philox(s.height(), s.width(), *n, SEED, 1 + replay, l as u32).unwrap()
            })
            .collect();
        let value = stream.clone_dtoh(loss.loss()).unwrap()[0];
        let got: Vec<Vec<f64>> = grads
            .iter()
            .map(|g| to_f64(&stream.clone_dtoh(g).unwrap()))
            .collect();
        check::<f32>(
            &format!("replay {replay}"),
            &layers,
            &host,
            &drawn,
            value,
            &got,
        );
    }
}
