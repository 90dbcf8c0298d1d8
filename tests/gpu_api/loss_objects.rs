//! The loss objects on a real device: `CcpLayer` and `CcpRows` against the CPU reference, and
//! the workspace they hold against the one they count.

use super::*;

/// `CcpLayer`: forward and backward on the device against `reference::ccp_layer_loss`, in f32
/// and bf16, twice with fresh centres (the workspace is reused), and its errors.
#[test]
fn ccp_layer_matches_reference() {
    let gpu = gpu_or_skip!("gpu_api::ccp_layer_matches_reference");
    let (kernels, stream) = (gpu.kernels(), gpu.stream());
    let mut rng = Rng::new(12);
    let shape = FeatureShape::new(2, 9, 13, 15, Layout::Nchw).unwrap();
    let mut layer = CcpLayer::<f32>::new(kernels.clone(), stream.clone(), shape, 21, TAU).unwrap();
    let mut grad_q = stream.alloc_zeros::<f32>(shape.len()).unwrap();
    assert_eq!(
        layer.backward(None, &mut grad_q, None, Scatter::Atomic),
        Err(Error::BackwardBeforeForward)
    );
    let wrong = DeviceCenters::upload(stream, &Centers::sample(13, 15, 20, 1).unwrap()).unwrap();
    let feat_q: Vec<f32> = random(&mut rng, shape.len(), 1.0);
    let feat_k: Vec<f32> = random(&mut rng, shape.len(), 1.0);
    let (feat_q_dev, feat_k_dev) = (
        stream.clone_htod(&feat_q).unwrap(),
        stream.clone_htod(&feat_k).unwrap(),
    );
    assert!(matches!(
        layer.forward(&feat_q_dev, &feat_k_dev, &wrong),
        Err(Error::Shape(_))
    ));

    for (step, scatter) in [(0u64, Scatter::Deterministic), (1, Scatter::Atomic)] {
        let centers = Centers::sample(13, 15, 21, 40 + step).unwrap();
        let device_centers = DeviceCenters::upload(stream, &centers).unwrap();
        layer
            .forward(&feat_q_dev, &feat_k_dev, &device_centers)
            .unwrap();
        let want =
            reference::ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, TAU, true).unwrap();
        let loss = stream.clone_dtoh(layer.loss()).unwrap()[0] as f64;
        assert_close(
            &format!("CcpLayer loss step {step}"),
            &[loss],
            &[want.loss],
            F32_TOLERANCE,
        );

        let start_q: Vec<f32> = random(&mut rng, shape.len(), 1.0);
        let start_k: Vec<f32> = random(&mut rng, shape.len(), 1.0);
        let mut grad_q = stream.clone_htod(&start_q).unwrap();
        let mut grad_k = stream.clone_htod(&start_k).unwrap();
        let upstream = stream.clone_htod(&[0.5f32]).unwrap();
        layer
            .backward(
                Some(&upstream.as_view()),
                &mut grad_q,
                Some(&mut grad_k),
                scatter,
            )
            .unwrap();
        // What the backward added to the start, compared with the gradient itself.
        for (side, got, start, grad) in [
            ("q", &grad_q, &start_q, &want.grad_feat_q),
            ("k", &grad_k, &start_k, want.grad_feat_k.as_ref().unwrap()),
        ] {
            let want: Vec<f64> = grad.iter().map(|g| 0.5 * g).collect();
            let added: Vec<f64> = to_f64(&stream.clone_dtoh(got).unwrap())
                .iter()
                .zip(start)
                .map(|(g, &s)| g - s as f64)
                .collect();
            assert_close(
                &format!("CcpLayer grad_feat_{side} step {step} {scatter:?}"),
                &added,
                &want,
                F32_TOLERANCE,
            );
        }
    }

    // A forward that fails leaves the layer as it was: the same loss, and a backward that
    // gives the same bits as before with the last forward's centres.
    let backward_bits = |layer: &mut CcpLayer<f32>| {
        let mut grad = stream.alloc_zeros::<f32>(shape.len()).unwrap();
        layer
            .backward(None, &mut grad, None, Scatter::Deterministic)
            .unwrap();
        stream.clone_dtoh(&grad).unwrap()
    };
    let (loss_before, bits_before) = (
        stream.clone_dtoh(layer.loss()).unwrap(),
        backward_bits(&mut layer),
    );
    let short = stream.alloc_zeros::<f32>(shape.len() - 1).unwrap();
    let fresh = DeviceCenters::upload(stream, &Centers::sample(13, 15, 21, 99).unwrap()).unwrap();
    let failed = [
        layer.forward(&feat_q_dev, &short, &fresh),
        layer.forward(&short, &feat_k_dev, &fresh),
        layer.forward(&feat_q_dev, &feat_k_dev, &wrong),
    ];
    for err in failed {
        assert!(
            matches!(err, Err(Error::Length { .. } | Error::Shape(_))),
            "{err:?}"
        );
    }
    assert_eq!(stream.clone_dtoh(layer.loss()).unwrap(), loss_before);
    assert_eq!(backward_bits(&mut layer), bits_before);

    // bf16: the loss and grad_feat_q against the reference on the same (rounded) inputs,
    // within the tolerance measured on the rounding model, as the kernel tests do.
    let feat_q: Vec<half::bf16> = random(&mut rng, shape.len(), 1.0);
    let feat_k: Vec<half::bf16> = random(&mut rng, shape.len(), 1.0);
    let centers = Centers::sample(13, 15, 21, 50).unwrap();
    let device_centers = DeviceCenters::upload(stream, &centers).unwrap();
    let mut layer =
        CcpLayer::<half::bf16>::new(kernels.clone(), stream.clone(), shape, 21, TAU).unwrap();
    let feat_q_dev = stream.clone_htod(&feat_q).unwrap();
    let feat_k_dev = stream.clone_htod(&feat_k).unwrap();
    layer
        .forward(&feat_q_dev, &feat_k_dev, &device_centers)
        .unwrap();
    let mut grad_q = stream.alloc_zeros::<half::bf16>(shape.len()).unwrap();
    layer
        .backward(None, &mut grad_q, None, Scatter::Deterministic)
        .unwrap();
    let want = reference::ccp_layer_loss(&feat_q, &feat_k, &shape, &centers, TAU, false).unwrap();
    let (feat_q, feat_k) = (to_f64(&feat_q), to_f64(&feat_k));
    let model = layer_model::<half::bf16>(&feat_q, &feat_k, &shape, &centers, TAU, 1.0);
    let loss = stream.clone_dtoh(layer.loss()).unwrap()[0] as f64;
    let tol = tolerance(&[model.loss], &[want.loss]);
    assert_close("CcpLayer bf16 loss", &[loss], &[want.loss], tol);
    let zeros = vec![0.0; shape.len()];
    let model = scatter_model::<half::bf16>(
        &zeros,
        &model.grad_rows_q,
        &shape,
        &centers,
        Scatter::Deterministic,
    );
    let got = to_f64(&stream.clone_dtoh(&grad_q).unwrap());
    let tol = tolerance(&model, &want.grad_feat_q);
    assert_close("CcpLayer bf16 grad_feat_q", &got, &want.grad_feat_q, tol);
}

/// `CcpLayer` and `CcpRows` (on either of its paths) hold what their `workspace_bytes_for`
/// counts without a device, in f32 and bf16: what the benches report as workspace.
#[test]
fn loss_objects_hold_their_counted_workspace() {
    let gpu = gpu_or_skip!("gpu_api::loss_objects_hold_their_counted_workspace");
    fn check<T: ccpl::Dtype>(gpu: &common::device::Gpu) {
        let (kernels, stream) = (gpu.kernels(), gpu.stream());
        let shape = FeatureShape::new(2, 13, 9, 11, Layout::Nchw).unwrap();
        let layer = CcpLayer::<T>::new(kernels.clone(), stream.clone(), shape, 21, TAU).unwrap();
        assert_eq!(
            layer.workspace_bytes(),
            CcpLayer::<T>::workspace_bytes_for(&shape, 21).unwrap()
        );
        for (rows, small) in [
            (RowShape::new(8, 64, 32).unwrap(), true),
            (RowShape::new(2, 600, 45).unwrap(), false),
        ] {
            let loss = CcpRows::<T>::new(kernels.clone(), stream.clone(), rows, TAU).unwrap();
            assert_eq!(loss.is_small(), small);
            assert_eq!(
                loss.workspace_bytes(),
                CcpRows::<T>::workspace_bytes_for(&rows).unwrap()
            );
        }
    }
    check::<f32>(&gpu);
    check::<half::bf16>(&gpu);
}

/// `CcpRows`: the rows loss of a projection head's outputs on the device against the
/// reference composed stage by stage, in f32 and bf16, rows passed as views (read by the
/// forward only: overwritten before the backward), the gradients written over NaN; its errors,
/// after which the object is as it was.
#[test]
fn ccp_rows_matches_reference() {
    let gpu = gpu_or_skip!("gpu_api::ccp_rows_matches_reference");
    let (kernels, stream) = (gpu.kernels(), gpu.stream());
    let mut rng = Rng::new(13);
    let shape = RowShape::new(2, 300, 45).unwrap();
    let mut loss = CcpRows::<f32>::new(kernels.clone(), stream.clone(), shape, TAU).unwrap();
    let mut grad_q = stream.alloc_zeros::<f32>(shape.len()).unwrap();
    assert_eq!(
        loss.backward(None, &mut grad_q, None),
        Err(Error::BackwardBeforeForward)
    );
    let short = stream.alloc_zeros::<f32>(shape.len() - 1).unwrap();
    assert!(matches!(
        loss.forward(&short, &grad_q),
        Err(Error::Length { what: "rows_q", .. })
    ));

    let rows_q: Vec<f32> = random(&mut rng, shape.len() + 2 * PAD, 2.0);
    let rows_k: Vec<f32> = random(&mut rng, shape.len(), 2.0);
    let rows_q_dev = stream.clone_htod(&rows_q).unwrap();
    let rows_k_dev = stream.clone_htod(&rows_k).unwrap();
    let rows_q = &rows_q[PAD..PAD + shape.len()];
    loss.forward(&rows_q_dev.slice(PAD..PAD + shape.len()), &rows_k_dev)
        .unwrap();
    let (q, k) = (to_f64(rows_q), to_f64(&rows_k));
    let want = rows_model::<f64>(&q, &k, &shape, TAU, 0.5);
    let got = stream.clone_dtoh(loss.loss()).unwrap()[0] as f64;
    assert_close("CcpRows loss", &[got], &[want.loss], F32_TOLERANCE);
    // The backward does not read the input rows: the caller may reuse them.
    let (mut rows_q_dev, mut rows_k_dev) = (rows_q_dev, rows_k_dev);
    stream.memset_zeros(&mut rows_q_dev).unwrap();
    stream.memset_zeros(&mut rows_k_dev).unwrap();
    let upstream = stream.clone_htod(&[0.5f32]).unwrap();
    let mut grad_q = stream.clone_htod(&vec![f32::NAN; shape.len()]).unwrap();
    let mut grad_k = stream.clone_htod(&vec![f32::NAN; shape.len()]).unwrap();
    loss.backward(Some(&upstream.as_view()), &mut grad_q, Some(&mut grad_k))
        .unwrap();
    let bits_before = stream.clone_dtoh(&grad_q).unwrap();
    // A forward that fails leaves the object as it was.
    assert!(matches!(
        loss.forward(&rows_k_dev, &short),
        Err(Error::Length { what: "rows_k", .. })
    ));
    let mut again = stream.clone_htod(&vec![f32::NAN; shape.len()]).unwrap();
    loss.backward(Some(&upstream.as_view()), &mut again, None)
        .unwrap();
    assert_eq!(stream.clone_dtoh(&again).unwrap(), bits_before);
    for (side, got, want) in [
        ("q", &grad_q, &want.grad_rows_q),
        ("k", &grad_k, &want.grad_rows_k),
    ] {
        let got = to_f64(&stream.clone_dtoh(got).unwrap());
        assert_close(
            &format!("CcpRows grad_rows_{side}"),
            &got,
            want,
            F32_TOLERANCE,
        );
    }

    // bf16, within the tolerance measured on the rounding model.
    let rows_q: Vec<half::bf16> = random(&mut rng, shape.len(), 2.0);
    let rows_k: Vec<half::bf16> = random(&mut rng, shape.len(), 2.0);
    let mut loss = CcpRows::<half::bf16>::new(kernels.clone(), stream.clone(), shape, TAU).unwrap();
    loss.forward(
        &stream.clone_htod(&rows_q).unwrap(),
        &stream.clone_htod(&rows_k).unwrap(),
    )
    .unwrap();
    let mut grad_q = stream.alloc_zeros::<half::bf16>(shape.len()).unwrap();
    loss.backward(None, &mut grad_q, None).unwrap();
    let (q, k) = (to_f64(&rows_q), to_f64(&rows_k));
    let want = rows_model::<f64>(&q, &k, &shape, TAU, 1.0);
    let model = rows_model::<half::bf16>(&q, &k, &shape, TAU, 1.0);
    let got = stream.clone_dtoh(loss.loss()).unwrap()[0] as f64;
    let tol = tolerance(&[model.loss], &[want.loss]);
    assert_close("CcpRows bf16 loss", &[got], &[want.loss], tol);
    let got = to_f64(&stream.clone_dtoh(&grad_q).unwrap());
    let tol = tolerance(&model.grad_rows_q, &want.grad_rows_q);
    assert_close("CcpRows bf16 grad_rows_q", &got, &want.grad_rows_q, tol);
}
