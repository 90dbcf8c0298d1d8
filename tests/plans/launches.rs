//! What the losses launch: a layer's stages in order (or nothing when a plan fails), the
//! workspaces they count, the three kernels of a training step of the multi-layer loss.

use super::*;

/// Records the kernels it is asked to launch.
#[derive(Default)]
struct Recorder(RefCell<Vec<String>>);

impl Launcher for Recorder {
    type Error = ccpl::Error;
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        self.0.borrow_mut().push(plan.kernel.clone());
        Ok(())
    }
}

#[test]
fn layer_launches_its_stages_in_order_or_nothing() {
    let s = shape();
    let plan = LayerPlan::new(s, 5, Tau::DEFAULT).unwrap();
    assert_eq!(*plan.rows(), RowShape::new(2, 40, 3).unwrap());
    let lens = LayerWorkspace::lengths(&s, 5).unwrap();
    // O(B*S*C): no (B, S, S) logits buffer.
    assert_eq!(
        (
            lens.rows.unit_q,
            lens.rows.norms_q,
            lens.grad_rows,
            lens.rows.loss
        ),
        (240, 80, 240, 1)
    );
    let ws = lens
        .try_map(|&n| Ok::<_, ()>(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    let c = centers(5);
    let (feat, rec) = (buf(s.len()), Recorder::default());
    plan.forward::<f32, _>(&rec, &c, feat, feat, &ws).unwrap();
    assert_eq!(
        rec.0.take(),
        [
            "neighbor_diff_normalize_f32",
            "neighbor_diff_normalize_f32",
            "info_nce_fused_forward_f32",
            "info_nce_loss"
        ]
    );
    plan.backward::<f32, _>(
        &rec,
        &c,
        &ws,
        None,
        feat,
        Some(feat),
        Scatter::Deterministic,
    )
    .unwrap();
    let side = [
        "info_nce_fused_backward_f32",
        "normalize_rows_backward_f32",
        "neighbor_diff_backward_deterministic_f32",
    ];
    assert_eq!(rec.0.take(), [side, side].concat());

    // A wrong buffer of the last stage: an Err, and no stage launched.
    let mut bad = ws.clone();
    bad.rows.loss = buf(2);
    let err = plan.forward::<f32, _>(&rec, &c, feat, feat, &bad);
    assert!(matches!(err, Err(Error::Length { what: "loss", .. })));
    let err = plan.backward::<f32, _>(&rec, &c, &ws, None, feat, Some(buf(1)), Scatter::Atomic);
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "grad_feat",
            ..
        })
    ));
    assert!(rec.0.take().is_empty());

    // Centres of another count than the layer's, no centres, too many.
    let err = plan.forward::<f32, _>(&rec, &centers(4), feat, feat, &ws);
    assert!(matches!(err, Err(Error::Shape(_))));
    assert_eq!(
        LayerPlan::new(s, 0, Tau::DEFAULT).unwrap_err(),
        Error::NoCenters
    );
    assert!(matches!(
        LayerPlan::new(s, 36, Tau::DEFAULT),
        Err(Error::Shape(_))
    ));
}

/// The workspace of a layer is O(B*S*C): four row matrices in `T` (the normalised rows of
/// both sides and two backward scratches: the difference rows themselves are never stored)
/// and four `B*S` float32 statistics plus two scalars, no `(B, S, S)` logits (the fused
/// InfoNCE recomputes them).
#[test]
fn layer_workspace_is_rows_and_statistics_only() {
    let shape = FeatureShape::new(1, 128, 128, 128, Layout::Nchw).unwrap();
    let n = 8192; // S = 65,536: materialised logits would be 17 GB
    let (rows, stats) = (8 * n * 128, 8 * n);
    let lengths = LayerWorkspace::lengths(&shape, n).unwrap();
    assert_eq!(
        lengths.bytes::<half::bf16>(),
        4 * rows * 2 + (4 * stats + 2) * 4
    );
    assert_eq!(lengths.bytes::<f32>(), 4 * rows * 4 + (4 * stats + 2) * 4);
    assert!(lengths.bytes::<half::bf16>() < 110 << 20);
    // CcpLayer holds that and its copy of the centres and their map (int32).
    assert_eq!(
        ccpl::cuda::CcpLayer::<half::bf16>::workspace_bytes_for(&shape, n).unwrap(),
        lengths.bytes::<half::bf16>() + (n + 128 * 128) * 4
    );
}

/// What `CcpRows` allocates, counted without a device, by its path: up to S = 512 the small-S
/// path's float32 copies of both row matrices and their gradients, four `B*S` statistics (the
/// row logsumexp and losses, and both sides' norms, which raw rows leave unused), the layer's
/// loss, the loss, the default upstream, and its
/// launch counters (int32), whatever the storage type; above, the fused path's three row
/// matrices in `T` and four `B*S` statistics plus two scalars.
#[test]
fn rows_loss_workspace_is_counted_by_path() {
    use ccpl::cuda::CcpRows;
    use ccpl::launch::small_s::COUNTERS;
    // The paper's relu2_1 head rows at num_s = 8: B = 8, S = 64, D = 32.
    let small = RowShape::new(8, 64, 32).unwrap();
    let (rows, stats) = (8 * 64 * 32, 8 * 64);
    let expected = 4 * rows * 4 + (4 * stats + 3) * 4 + COUNTERS * 4;
    assert_eq!(
        CcpRows::<f32>::workspace_bytes_for(&small).unwrap(),
        expected
    );
    assert_eq!(
        CcpRows::<half::bf16>::workspace_bytes_for(&small).unwrap(),
        expected
    );
    let fused = RowShape::new(2, 513, 40).unwrap();
    let (rows, stats) = (2 * 513 * 40, 2 * 513);
    assert_eq!(
        CcpRows::<half::bf16>::workspace_bytes_for(&fused).unwrap(),
        3 * rows * 2 + (4 * stats + 2) * 4
    );
    assert_eq!(
        CcpRows::<f32>::workspace_bytes_for(&fused).unwrap(),
        3 * rows * 4 + (4 * stats + 2) * 4
    );
}

/// The whole loss: small-S layers share three launches a training step (draw and gather, the
/// rows' loss and gradient, the scatter), a layer above S = 512 adds its fused launches and
/// one for its share of the total; any wrong buffer is an Err before anything is launched.
#[test]
fn loss_launches_three_kernels_a_step_or_nothing() {
    use ccpl::loss::multi_layer::{Draw, LossPlan};
    let small = FeatureShape::new(2, 3, 7, 9, Layout::Nchw).unwrap();
    let large = FeatureShape::new(1, 2, 12, 12, Layout::Nhwc).unwrap();
    let plan = LossPlan::new(&[(small, 5), (large, 65), (small, 100)], Tau::DEFAULT).unwrap();
    // 65 centres: S = 520, the fused path; 100 clamped to the 35 interior positions: S = 280.
    assert_eq!(
        (0..3)
            .map(|l| (plan.is_small(l), plan.num_centers(l)))
            .collect::<Vec<_>>(),
        [(true, 5), (false, 65), (true, 35)]
    );
    let lens = plan.workspace().unwrap();
    let ws = lens
        .try_map(|&n| Ok::<_, ()>(buf(n)), |&n| Ok(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    let feats = [
        (buf(small.len()), buf(small.len())),
        (buf(large.len()), buf(large.len())),
        (buf(small.len()), buf(small.len())),
    ];
    let grads = [buf(small.len()), buf(large.len()), buf(small.len())];
    let rec = Recorder::default();
    plan.forward::<f32, _>(&rec, &feats, &ws, Draw::Sample)
        .unwrap();
    let fused_forward = [
        "neighbor_diff_normalize_f32",
        "neighbor_diff_normalize_f32",
        "info_nce_fused_forward_f32",
        "info_nce_loss",
        "info_nce_loss",
    ];
    let forward = [
        &["small_s_gather_f32", "small_s_rows_f32"][..],
        &fused_forward,
    ]
    .concat();
    assert_eq!(rec.0.take(), forward);
    plan.backward::<f32, _>(&rec, &ws, None, &grads, None)
        .unwrap();
    let fused_backward = [
        "info_nce_fused_backward_f32",
        "normalize_rows_backward_f32",
        "neighbor_diff_backward_deterministic_f32",
    ];
    let backward = [&["small_s_scatter_f32"][..], &fused_backward].concat();
    assert_eq!(rec.0.take(), backward);
    plan.backward::<half::bf16, _>(&rec, &ws, None, &grads, Some(&grads))
        .unwrap();
    assert_eq!(
        rec.0.take()[..2],
        ["small_s_rows_f32", "small_s_scatter_bf16"],
        "the content side: the transposed rows launch, then one scatter for both sides"
    );

    // Only small-S layers: three launches a step.
    let paper = LossPlan::new(&[(small, 5), (small, 8)], Tau::DEFAULT).unwrap();
    let pws = paper
        .workspace()
        .unwrap()
        .try_map(|&n| Ok::<_, ()>(buf(n)), |&n| Ok(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    let two = [feats[0], feats[0]];
    paper
        .forward::<f32, _>(&rec, &two, &pws, Draw::Given)
        .unwrap();
    paper
        .backward::<f32, _>(&rec, &pws, None, &[grads[0]; 2], None)
        .unwrap();
    assert_eq!(
        rec.0.take(),
        [
            "small_s_gather_f32",
            "small_s_rows_f32",
            "small_s_scatter_f32"
        ]
    );

    // Wrong buffers, anywhere: an Err naming it, nothing launched.
    let mut bad = ws.clone();
    bad.loss = buf(2);
    let err = plan.forward::<f32, _>(&rec, &feats, &bad, Draw::Sample);
    assert!(matches!(err, Err(Error::Length { what: "loss", .. })));
    let mut bad = ws.clone();
    bad.fused[0].rows.row_loss = buf(3);
    let err = plan.forward::<f32, _>(&rec, &feats, &bad, Draw::Sample);
    assert!(matches!(err, Err(Error::Length { .. })));
    let short = [feats[0], feats[1], (buf(small.len()), buf(small.len() - 1))];
    let err = plan.forward::<f32, _>(&rec, &short, &ws, Draw::Sample);
    assert!(matches!(err, Err(Error::Length { what: "feat_k", .. })));
    let err = plan.forward::<f32, _>(&rec, &feats[..2], &ws, Draw::Sample);
    assert!(matches!(err, Err(Error::Length { .. })));
    let err = plan.backward::<f32, _>(&rec, &ws, None, &[grads[0], grads[1], buf(1)], None);
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "grad_feat",
            ..
        })
    ));
    let err = plan.backward::<f32, _>(&rec, &ws, Some(buf(2)), &grads, None);
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "upstream",
            ..
        })
    ));
    let mut bad = ws.clone();
    bad.counters = buf(5);
    let err = plan.forward::<f32, _>(&rec, &feats, &bad, Draw::Sample);
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "counters",
            ..
        })
    ));
    assert!(rec.0.take().is_empty());

    // No layer, too many, no centres.
    assert!(matches!(
        LossPlan::new(&[], Tau::DEFAULT),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        LossPlan::new(&[(small, 5); 9], Tau::DEFAULT),
        Err(Error::Shape(_))
    ));
    assert_eq!(
        LossPlan::new(&[(small, 0)], Tau::DEFAULT).unwrap_err(),
        Error::NoCenters
    );
}
