//! The small-S ops of the package (the rows loss up to `S = 512` on CUDA; the difference rows
//! of every layer at centres drawn on the device) on the CPU emulator, against the host path,
//! over several steps on one workspace as training runs them; and the launches of a training
//! step with learned heads as the package issues them.

use ccpl::loss::multi_layer::LossPlan;
use ccpl::loss::small_s::{SampledRowsPlan, SmallRowsPlan};
use ccpl::{Centers, FeatureShape, Layout, RowShape, Tau};
use ccpl_emu::{buf, buf_mut};
use ccpl_testkit::Rng;

use super::{Recorder, assert_close, emulator, nan, random, raw, table, widen};
use crate::Raw;
use crate::neighbor::{MapArgs, Shape};
use crate::op::Op;
use crate::{layer, loss, rows, sampled, small_rows};

/// A float32 NaN in both halves of a word: a workspace poisoned before its first launch.
const NAN_WORDS: u64 = 0x7fc0_0000_7fc0_0000;

/// A device workspace of `bytes` as the package allocates it (PyTorch's allocations are
/// aligned at least as u64 words): poisoned, its first `zeroed` bytes zero.
fn workspace(bytes: usize, zeroed: usize) -> Vec<u64> {
    assert_eq!(zeroed % 8, 0, "counters end on a word");
    let mut ws = vec![NAN_WORDS; bytes.div_ceil(8)];
    ws[..zeroed / 8].fill(0);
    ws
}

#[test]
fn small_rows_loss_of_several_layers_on_the_emulator_matches_the_host_path_over_two_steps() {
    let mut rng = Rng::new(12);
    let shapes = [
        RowShape::new(3, 40, 7).unwrap(),
        RowShape::new(2, 16, 5).unwrap(),
        RowShape::new(1, 72, 3).unwrap(),
    ];
    let tau = Tau::new(0.1).unwrap();
    let plan = SmallRowsPlan::layers(&shapes, tau).unwrap();
    let (counters, _, bytes) = small_rows::carve(&plan, 0).unwrap();
    assert_eq!(counters.addr, 0, "the counters come first");
    let mut ws = workspace(bytes, 4 * counters.len);
    let ws_raw = Raw(buf(&ws).addr, bytes);
    let total: usize = shapes.iter().map(RowShape::len).sum();
    assert_eq!(plan.total_len(), total);
    let emu = emulator(13);
    // Two steps on one workspace, as training runs them: the forward's count of finished
    // blocks must be back at zero for the second.
    for step in 0..2 {
        let rows: Vec<[Vec<f32>; 2]> = shapes
            .iter()
            .map(|s| [random(&mut rng, s.len()), random(&mut rng, s.len())])
            .collect();
        let mut loss = nan(1);
        small_rows::Forward {
            plan,
            rows: rows
                .iter()
                .map(|r| [raw(buf(&r[0])), raw(buf(&r[1]))])
                .collect(),
            workspace: ws_raw,
            loss: raw(buf_mut(&mut loss)),
        }
        .cuda::<f32, _>(&emu)
        .unwrap();
        let mut host = Vec::new();
        let mut host_loss = 0.0;
        for (shape, [q, k]) in shapes.iter().zip(&rows) {
            let (n, bs) = (shape.len(), shape.count());
            let (mut saved, mut stats) = (vec![0.0; 4 * n], vec![0.0; 4 * bs]);
            host_loss +=
                rows::forward_host(shape, tau, [widen(q), widen(k)], &mut saved, &mut stats)
                    .unwrap();
            host.push((saved, stats));
        }
        assert_close(&format!("summed loss, step {step}"), &loss, &[host_loss]);

        for grad_k in [false, true] {
            let upstream = [0.75f32];
            let (mut grad_q, mut grad_k_rows) = (nan(total), nan(total));
            small_rows::Backward {
                plan,
                workspace: ws_raw,
                upstream: raw(buf(&upstream)),
                grads: (
                    raw(buf_mut(&mut grad_q)),
                    grad_k.then(|| raw(buf_mut(&mut grad_k_rows))),
                ),
            }
            .cuda::<f32, _>(&emu)
            .unwrap();
            let mut at = 0;
            for (shape, (saved, stats)) in shapes.iter().zip(&host) {
                let n = shape.len();
                let (mut want_q, mut want_k) = (vec![0.0f32; n], vec![0.0f32; n]);
                let want = (&mut want_q[..], grad_k.then_some(&mut want_k[..]));
                rows::backward_host(shape, tau, [saved, stats], 0.75, want).unwrap();
                assert_close("grad_q", &grad_q[at..at + n], &widen(&want_q));
                if grad_k {
                    assert_close("grad_k", &grad_k_rows[at..at + n], &widen(&want_k));
                }
                at += n;
            }
            if !grad_k {
                assert!(grad_k_rows.iter().all(|x| x.is_nan()), "grad_k untouched");
            }
        }
    }
    // A workspace one byte short is refused before any launch.
    let short = small_rows::Forward {
        plan,
        rows: shapes.iter().map(|s| [Raw(0, s.len()); 2]).collect(),
        workspace: Raw(buf_mut(&mut ws).addr, bytes - 1),
        loss: Raw(0, 1),
    };
    let err = short.cuda::<f32, _>(&emu).unwrap_err();
    assert!(err.to_string().contains("small-S rows workspace"), "{err}");
}

/// The device workspace of `sampled_neighbor_diff` as the package makes it: zeroed, the centre
/// maps empty (-1), the seed in the counters.
fn sampled_workspace(plan: &SampledRowsPlan, seed: u64) -> (Vec<u64>, usize) {
    let (ws, bytes) = sampled::carve(plan, 0).unwrap();
    let mut words = vec![0u64; bytes.div_ceil(8)];
    let base = buf_mut(&mut words).addr as *mut u8;
    // SAFETY: both ranges lie inside `words` (the carved layout spans `bytes`).
    unsafe {
        std::slice::from_raw_parts_mut(base.add(ws.maps.addr as usize) as *mut i32, ws.maps.len)
            .fill(-1);
        std::slice::from_raw_parts_mut(base.add(ws.counters.addr as usize), 8)
            .copy_from_slice(&seed.to_le_bytes());
    }
    (words, bytes)
}

#[test]
fn sampled_rows_on_the_emulator_match_the_host_path_on_the_sampler_centres() {
    let mut rng = Rng::new(14);
    // Odd sizes, both layouts; 9 centres of the first layer's 35 interior positions, of the
    // second's 12, and all 6 of the third's (clamped).
    let shapes = [
        FeatureShape::new(2, 5, 7, 9, Layout::Nchw).unwrap(),
        FeatureShape::new(3, 4, 5, 6, Layout::Nhwc).unwrap(),
        FeatureShape::new(1, 3, 4, 5, Layout::Nchw).unwrap(),
    ];
    let plan = SampledRowsPlan::new(&shapes.map(|s| (s, 9))).unwrap();
    assert_eq!(plan.num_centers(2), 6);
    let layers = shapes.len();
    let feats: Vec<[Vec<f32>; 2]> = shapes
        .iter()
        .map(|s| [random(&mut rng, s.len()), random(&mut rng, s.len())])
        .collect();
    let feat_raws: Vec<[Raw; 2]> = feats
        .iter()
        .map(|f| [0, 1].map(|i| raw(buf(&f[i]))))
        .collect();
    let seed: u64 = 0xfedc_ba98_7654_3210;
    let (device_ws, bytes) = sampled_workspace(&plan, seed);
    let device_raw = Raw(buf(&device_ws).addr, bytes);
    let host_seed = seed.to_le_bytes();
    let emu = emulator(15);

    let rows_len = |l: usize| plan.rows_shape(l).len();
    let mut rows: [Vec<[Vec<f32>; 2]>; 2] = [0, 1].map(|_| {
        (0..layers)
            .map(|l| [nan(rows_len(l)), nan(rows_len(l))])
            .collect()
    });
    let [device_rows, host_rows] = &mut rows;
    let forward = |workspace: Raw, rows: &mut Vec<[Vec<f32>; 2]>| sampled::Forward {
        plan: plan.clone(),
        feats: feat_raws.clone(),
        rows: rows
            .iter_mut()
            .map(|r| r.each_mut().map(|side| raw(buf_mut(side))))
            .collect(),
        workspace,
    };
    forward(device_raw, device_rows)
        .cuda::<f32, _>(&emu)
        .unwrap();
    // SAFETY: host buffers of the named types, alive for the call.
    unsafe { forward(raw(buf(&host_seed)), host_rows).cpu::<f32>() }.unwrap();
    for l in 0..layers {
        for side in 0..2 {
            let what = format!("difference rows of side {side}, layer {l}");
            assert_close(&what, &device_rows[l][side], &widen(&host_rows[l][side]));
        }
    }

    let grad_rows: Vec<[Vec<f32>; 2]> = (0..layers)
        .map(|l| [random(&mut rng, rows_len(l)), random(&mut rng, rows_len(l))])
        .collect();
    let initial: Vec<Vec<f32>> = shapes.iter().map(|s| random(&mut rng, s.len())).collect();
    let one = [1.0f32];
    let mut grads = [0, 1].map(|_| [initial.clone(), initial.clone()]);
    let [device_grads, host_grads] = &mut grads;
    let backward = |workspace: Raw, grads: &mut [Vec<Vec<f32>>; 2]| {
        let [q, k] = grads
            .each_mut()
            .map(|g| g.iter_mut().map(|g| raw(buf_mut(g))).collect());
        let rows = |side: usize| grad_rows.iter().map(|r| raw(buf(&r[side]))).collect();
        sampled::Backward {
            plan: plan.clone(),
            workspace,
            one: raw(buf(&one)),
            grad_rows: (rows(0), Some(rows(1))),
            grad_feats: (q, Some(k)),
        }
    };
    backward(device_raw, device_grads)
        .cuda::<f32, _>(&emu)
        .unwrap();
    // SAFETY: as above.
    unsafe { backward(raw(buf(&host_seed)), host_grads).cpu::<f32>() }.unwrap();
    for side in 0..2 {
        for l in 0..layers {
            let what = format!("feature gradient of side {side}, layer {l}");
            assert_close(&what, &device_grads[side][l], &widen(&host_grads[side][l]));
        }
    }
}

/// The launches of a training step through `ccpl.CCPL` with learned heads at the paper's
/// configuration (B = 8, num_s = 8, relu2_1 128x128x128, relu3_1 256x64x64, relu4_1
/// 512x32x32, heads `C -> C/4`, float32; the content side detached): the forward and
/// backward halves of `sampled_neighbor_diff` and of `rows_loss_sum` over the three heads, as
/// the package calls them. Counted, not run (the tests above run these halves on the emulator).
#[test]
fn heads_step_launches_at_the_paper_configuration() {
    let layers = [(128, 128), (256, 64), (512, 32)]
        .map(|(c, side)| FeatureShape::new(8, c, side, side, Layout::Nchw).unwrap());
    let plan = SampledRowsPlan::new(&layers.map(|s| (s, 8))).unwrap();
    let (_, bytes) = sampled::carve(&plan, 0).unwrap();
    // Placeholder addresses of the right lengths: nothing is launched.
    let nowhere = |len: usize| Raw(0, len);
    let recorder = Recorder::default();
    let pairs = |len: &dyn Fn(usize) -> usize| -> Vec<[Raw; 2]> {
        (0..3).map(|l| [nowhere(len(l)); 2]).collect()
    };
    sampled::Forward {
        plan: plan.clone(),
        feats: pairs(&|l| layers[l].len()),
        rows: pairs(&|l| plan.rows_shape(l).len()),
        workspace: nowhere(bytes),
    }
    .cuda::<f32, _>(&recorder)
    .unwrap();
    let heads: Vec<RowShape> = (0..3)
        .map(|l| {
            let rows = plan.rows_shape(l);
            RowShape::new(rows.batch(), rows.rows(), rows.width() / 4).unwrap()
        })
        .collect();
    let rows_plan = SmallRowsPlan::layers(&heads, Tau::DEFAULT).unwrap();
    let (_, _, rows_bytes) = small_rows::carve(&rows_plan, 0).unwrap();
    small_rows::Forward {
        plan: rows_plan,
        rows: heads.iter().map(|h| [nowhere(h.len()); 2]).collect(),
        workspace: nowhere(rows_bytes),
        loss: nowhere(1),
    }
    .cuda::<f32, _>(&recorder)
    .unwrap();
    // The backward: the rows loss of every layer, then the heads in PyTorch, then the scatter.
    small_rows::Backward {
        plan: rows_plan,
        workspace: nowhere(rows_bytes),
        upstream: nowhere(1),
        grads: (nowhere(rows_plan.total_len()), None),
    }
    .cuda::<f32, _>(&recorder)
    .unwrap();
    sampled::Backward {
        plan: plan.clone(),
        workspace: nowhere(bytes),
        one: nowhere(1),
        grad_rows: (
            (0..3).map(|l| nowhere(plan.rows_shape(l).len())).collect(),
            None,
        ),
        grad_feats: ((0..3).map(|l| nowhere(layers[l].len())).collect(), None),
    }
    .cuda::<f32, _>(&recorder)
    .unwrap();
    let launched = recorder.0.into_inner();
    println!(
        "ccpl launches per training step from PyTorch at the paper configuration with heads: {}",
        launched.len()
    );
    assert_eq!(
        launched,
        [
            "small_s_gather_f32",
            "small_s_rows_f32",
            "small_s_scale_f32",
            "small_s_scatter_f32"
        ]
    );
}

#[test]
fn small_layer_loss_on_the_emulator_matches_the_host_path() {
    let mut rng = Rng::new(16);
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let shape = FeatureShape::new(2, 5, 7, 6, layout).unwrap();
        let centers = Centers::sample(7, 6, 11, 17).unwrap();
        let table = table(&centers);
        // The caller's int64 centres, as the package passes them.
        let flat: Vec<i64> = centers.flat().iter().map(|&x| x.into()).collect();
        let map = MapArgs(
            Shape(2, 5, 7, 6, layout == Layout::Nhwc),
            raw(buf(&flat)),
            Some(raw(buf(&table))),
        )
        .checked()
        .unwrap();
        let tau = Tau::new(0.2).unwrap();
        let (feat_q, feat_k) = (random(&mut rng, shape.len()), random(&mut rng, shape.len()));
        let plan = LossPlan::new(&[(shape, centers.len())], tau).unwrap();
        let (ws, bytes) = loss::carve(&plan, 4, 0).unwrap();
        let counters = ws.counters.addr as usize;
        assert_eq!(
            (counters % 8, ws.counters.len % 2),
            (0, 0),
            "counters on whole words"
        );
        let mut device_ws = workspace(bytes, 0);
        device_ws[counters / 8..(counters + 4 * ws.counters.len) / 8].fill(0);
        let ws_raw = Raw(buf(&device_ws).addr, bytes);
        let emu = emulator(18);

        let mut loss = nan(1);
        layer::SmallForward {
            map,
            tau,
            feat: [raw(buf(&feat_q)), raw(buf(&feat_k))],
            workspace: ws_raw,
            loss: raw(buf_mut(&mut loss)),
        }
        .cuda::<f32, _>(&emu)
        .unwrap();
        let rows = shape.batch() * centers.rows() * shape.channels();
        let bs = shape.batch() * centers.rows();
        let (mut host_rows, mut host_stats) = (vec![0.0; 4 * rows], vec![0.0; 4 * bs]);
        let host_loss = layer::forward_host(
            &shape,
            &centers,
            tau,
            &feat_q,
            &feat_k,
            &mut host_rows,
            &mut host_stats,
        )
        .unwrap();
        assert_close("small-S layer loss", &loss, &[host_loss]);

        let upstream = [1.25f32];
        let initial = random(&mut rng, shape.len());
        let (mut grad_q, mut grad_k) = (initial.clone(), initial.clone());
        layer::SmallBackward {
            map,
            tau,
            workspace: ws_raw,
            upstream: raw(buf(&upstream)),
            grads: (raw(buf_mut(&mut grad_q)), Some(raw(buf_mut(&mut grad_k)))),
        }
        .cuda::<f32, _>(&emu)
        .unwrap();
        let (mut want_q, mut want_k) = (initial.clone(), initial);
        layer::backward_host::<f32>(
            &shape,
            &centers,
            tau,
            [&host_rows, &host_stats],
            1.25,
            (&mut want_q[..], Some(&mut want_k[..])),
        )
        .unwrap();
        assert_close("small-S grad_q", &grad_q, &widen(&want_q));
        assert_close("small-S grad_k", &grad_k, &widen(&want_k));
    }
}
