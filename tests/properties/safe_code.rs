//! What safe code can reach (shapes, centres, plans, the reference's checks, the small-S
//! plans) from inputs a careless or hostile caller might pass: an answer or an error, never a
//! panic.

use super::*;

/// Sizes a careless or hostile caller might pass: small ones, ones around the kernels' i32
/// limit, and any usize.
fn size() -> impl Strategy<Value = usize> {
    let limit = i32::MAX as usize;
    prop_oneof![0usize..12, (limit - 2)..(limit + 3), any::<usize>()]
}

/// Temperatures, good and bad: any float64 bits, and the edges of the rule.
fn any_tau() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(Tau::MIN.get()),
        Just(3e-39),
        Just(f64::MIN_POSITIVE / 2.0),
        1e-45f64..10.0,
    ]
}

/// Executes nothing: plans are only made.
struct Nothing;
impl Launcher for Nothing {
    type Error = ccpl::Error;
    fn launch<P: KernelParams>(&self, _: &LaunchPlan<P>) -> ccpl::Result<()> {
        Ok(())
    }
}

#[test]
fn safe_code_never_panics() {
    let dims = (size(), size(), size(), size(), size(), size());
    let lens = [size(), size(), size(), size()];
    let strategy = (dims, any_tau(), any::<bool>(), any::<u64>(), lens);
    check("safe_code_never_panics", 512, 1, strategy, |input| {
        let ((b, c, h, w, n, s), tau, nhwc, seed, lens) = input;
        let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
        // A bad tau is refused by Tau::new; the plans are probed at a good one.
        let tau = Tau::new(tau).unwrap_or_default();
        let _ = SplitMix64::new(seed).below(n as u64);
        if let Ok(shape) = FeatureShape::new(b, c, h, w, layout) {
            let _ = shape.index(lens[0], lens[1], lens[2], lens[3]);
            let _ = (shape.len(), shape.interior(), neighbor::rows_len(&shape, n));
            let _ = LayerWorkspace::lengths(&shape, n);
            let centers = CentersBuf {
                height: h,
                width: w,
                flat: buf(n),
                map: buf(lens[0]),
            };
            let _ = neighbor::neighbor_diff_normalize::<f32>(
                &shape,
                &centers,
                buf(lens[1]),
                buf(lens[2]),
                buf(lens[3]),
            );
            if let Ok(plan) = LayerPlan::new(shape, n, tau) {
                let ws = LayerWorkspace::lengths(&shape, n)
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let (feat, grad) = (buf(lens[1]), buf(lens[2]));
                let _ = plan.forward::<half::f16, _>(&Nothing, &centers, feat, feat, &ws);
                let scatter = Scatter::Deterministic;
                let _ = plan.backward::<f32, _>(&Nothing, &centers, &ws, None, grad, None, scatter);
            }
        }
        if let Ok(rows) = RowShape::new(b, s, c) {
            let _ = (rows.len(), rows.count(), rows.logits_len());
            let _ = normalize::normalize_rows::<f32>(&rows, buf(lens[0]), buf(lens[1]), buf(n));
            let _ = info_nce::info_nce_forward(&rows, buf(lens[2]), buf(lens[3]), buf(n));
            if let Ok(plan) = RowsPlan::new(rows, tau) {
                let ws = RowsWorkspace::lengths(&rows)
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let _ = plan.forward::<half::bf16, _>(&Nothing, buf(lens[0]), buf(lens[1]), &ws);
                let _ = plan.backward::<f32, _>(&Nothing, &ws, None, buf(lens[2]), None);
            }
        }
        let _ = info_nce::info_nce_loss(buf(lens[0]), buf(lens[1]), nhwc);
        // Centres: drawn (O(N) on any map) and checked, on small counts.
        let _ = Centers::sample(h, w, n % 64, seed);
        let flat: Vec<i64> = lens.iter().map(|&l| l as i64 % 4096 - 8).collect();
        let _ = Centers::from_flat(h % 4096, w % 4096, &flat);
        // The reference's checks, on buffers of the wrong (small) lengths.
        let v = vec![0.5; lens[0] % 64];
        let _ = reference::normalize_rows(&v, c % 8);
        let _ = reference::normalize_rows_backward(&v, &v, c % 8);
        let _ = reference::info_nce_forward(&v, b % 4, s % 8);
        if let Ok(rows) = RowShape::new(b % 4, s % 8, c % 8) {
            let _ = reference::similarity(&v, &v, &rows, tau);
        }
        Ok(())
    });
}

/// The small-S plans from sizes, lengths and temperatures a careless or hostile caller might
/// pass: an answer or an error, never a panic.
#[test]
fn small_s_plans_never_panic() {
    let dims = (size(), size(), size(), size(), size(), size());
    let lens = [size(), size(), size(), size()];
    let strategy = (dims, any_tau(), any::<bool>(), 1usize..10, lens);
    check("small_s_plans_never_panic", 512, 15, strategy, |input| {
        let ((b, c, h, w, n, s), tau, nhwc, layers, lens) = input;
        let tau = Tau::new(tau).unwrap_or_default();
        let layout = if nhwc { Layout::Nhwc } else { Layout::Nchw };
        if let Ok(shape) = FeatureShape::new(b, c, h, w, layout)
            && let Ok(plan) = LossPlan::new(&vec![(shape, n); layers], tau)
        {
            let lengths = plan.workspace().unwrap();
            let _ = lengths.bytes::<half::f16>();
            let ws = lengths
                .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)), |&l| Ok(buf(l)))
                .unwrap();
            let feats = vec![(buf(lens[0]), buf(lens[1])); layers];
            let grads = vec![buf(lens[2]); layers];
            let _ = plan.forward::<f32, _>(&Nothing, &feats, &ws, Draw::Sample);
            let _ = plan.backward::<half::bf16, _>(&Nothing, &ws, None, &grads, None);
        }
        if let Ok(rows) = RowShape::new(b, s, c) {
            let _ = small_s::rows_blocks(&rows);
            if let Ok(plan) = SmallRowsPlan::new(rows, tau) {
                let ws = plan
                    .workspace()
                    .unwrap()
                    .try_map(|&l| Ok::<_, ()>(buf(l)), |&l| Ok(buf(l)))
                    .unwrap();
                let (q, k) = (buf(lens[0]), buf(lens[1]));
                let _ = plan.forward::<half::f16, _>(&Nothing, q, k, &ws, buf(lens[2]));
                let _ = plan.backward::<f32, _>(&Nothing, &ws, None, buf(lens[3]), Some(q));
            }
        }
        let _ = small_s::scale::<f32>(n, buf(lens[0]), (buf(lens[1]), buf(lens[2])), None);
        Ok(())
    });
}
