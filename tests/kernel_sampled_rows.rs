//! A learned head's input on the small-S path (`loss::small_s::SampledRowsPlan`): the gather's
//! raw difference rows at the centres the device draws, against the reference's
//! `neighbor_diff` at the host model's centres (`Centers::philox(.., seed, step, layer)`), over
//! consecutive steps on one workspace; the scatter of their gradient against the reference's
//! backward; and the plans it refuses. (The identity head's loss on the same kernels is
//! `kernel_small_s`.)
//!
//! Tolerances: the raw rows are formed in float and rounded to `T` once, and so are the
//! gradients the scatter adds: the rounding model is the exact result rounded once
//! (`stored_tolerance`).

use crate::common;
use crate::kernel_small_s::Counting;

use ccpl::launch::Buf;
use ccpl::launch::neighbor::Scatter;
use ccpl::launch::small_s::{self, ScatterSide};
use ccpl::loss::small_s::{SampledRowsPlan, SampledRowsWorkspace};
use ccpl::{Centers, Dtype, Error, FeatureShape, Layout, RowShape, reference};
use common::device::{Elem, Emu, TestDevice};
use common::fixtures::{random, sampled_rows_workspace};
use common::models::scatter_model;
use common::tolerance::{stored_tolerance, to_f64};
use common::{Rng, assert_close, buf};

const SEED: u64 = 0x5eed_4ead;

/// The step just below 2^32: two steps from it cross the 32-bit boundary of the counter.
const NEAR_2_32: u64 = (1 << 32) - 1;

/// The layers of the cases: odd sizes, both layouts, a layer whose draw is its whole interior
/// (12 positions: windows overlap everywhere), and one at S = 512.
fn layers() -> Vec<(FeatureShape, usize)> {
    [
        ((2, 5, 9, 11), 7, Layout::Nchw),
        ((1, 3, 6, 5), 12, Layout::Nhwc),
        ((3, 4, 7, 8), 9, Layout::Nhwc),
        ((1, 2, 10, 10), 64, Layout::Nchw),
    ]
    .into_iter()
    .map(|((b, c, h, w), num_s, layout)| (FeatureShape::new(b, c, h, w, layout).unwrap(), num_s))
    .collect()
}

/// Two consecutive training steps on one workspace, from step 0 and from 2^32 - 1, for every
/// storage type: each step's gather (one launch) against the reference, and a scatter into
/// random starts, upstream 2.5: q only after the first step, q and k after the second.
fn sampled_rows_match_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(53);
    let plan = SampledRowsPlan::new(&layers()).unwrap();
    for first in [0, NEAR_2_32] {
        for_each_dtype!(check_steps_of(dev, &plan, first, &mut rng));
    }
}

fn check_steps_of<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &SampledRowsPlan,
    first: u64,
    rng: &mut Rng,
) {
    let mut ws = sampled_rows_workspace(dev, plan, SEED, first);
    for (step, both) in [(first, false), (first + 1, true)] {
        let label = format!("{} step {step} on the {}", T::SUFFIX, dev.name());
        let centers = gather_step::<T, D>(dev, plan, &mut ws, step, rng, &label);
        scatter_step::<T, D>(dev, plan, &mut ws, &centers, both, rng, &label);
    }
}

/// One gather at `step` into rows poisoned with NaN, checked: the counters (seed, the next
/// step, no block counted), each layer's centres and map (the host model's), and both sides'
/// raw rows. Returns the step's centres.
fn gather_step<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &SampledRowsPlan,
    ws: &mut SampledRowsWorkspace<D::Mem<i32>>,
    step: u64,
    rng: &mut Rng,
    label: &str,
) -> Vec<Centers> {
    let feats: Vec<(Vec<T>, Vec<T>)> = (0..plan.len())
        .map(|l| {
            let n = plan.shape(l).len();
            (random(rng, n, 1.0), random(rng, n, 1.0))
        })
        .collect();
    let mut feats_dev: Vec<_> = feats
        .iter()
        .map(|(q, k)| (dev.upload(q), dev.upload(k)))
        .collect();
    let mut rows_dev: Vec<(D::Mem<T>, D::Mem<T>)> = (0..plan.len())
        .map(|l| {
            let n = plan.rows_shape(l).len();
            (dev.alloc_nan::<T>(n), dev.alloc_nan::<T>(n))
        })
        .collect();
    let feat_bufs: Vec<_> = feats_dev
        .iter_mut()
        .map(|(q, k)| (dev.buf(q), dev.buf(k)))
        .collect();
    let row_bufs: Vec<_> = rows_dev
        .iter_mut()
        .map(|(q, k)| (dev.buf(q), dev.buf(k)))
        .collect();
    let launcher = Counting::new(dev.launcher());
    let bufs = ws.map_mut(|m| dev.buf(m));
    plan.gather::<T, _>(&launcher, &feat_bufs, &row_bufs, &bufs)
        .unwrap_or_else(|e| panic!("gather {label}: {e}"));
    assert_eq!(
        launcher.take(),
        [format!("small_s_gather_{}", T::SUFFIX)],
        "{label}: the gather is one launch"
    );
    assert_eq!(
        dev.download(&ws.counters),
        small_s::counters(SEED, step.wrapping_add(1)),
        "{label}: the counters after the gather (seed, the next step, no block counted)"
    );
    let (all_centers, all_maps) = (dev.download(&ws.centers), dev.download(&ws.maps));
    let (mut centers_at, mut map_at) = (0, 0);
    let mut centers = Vec::new();
    for l in 0..plan.len() {
        let s = plan.shape(l);
        let n = plan.num_centers(l);
        let drawn = Centers::philox(s.height(), s.width(), n, SEED, step, l as u32).unwrap();
        let map_len = s.height() * s.width();
        assert_eq!(
            &all_centers[centers_at..centers_at + n],
            drawn.flat(),
            "{label}: layer {l}: the device drew the host model's centres"
        );
        assert_eq!(
            all_maps[map_at..map_at + map_len],
            drawn.center_map(),
            "{label}: layer {l}: the map follows the centres"
        );
        (centers_at, map_at) = (centers_at + n, map_at + map_len);
        for (side, feat, rows) in [
            ("q", &feats[l].0, &rows_dev[l].0),
            ("k", &feats[l].1, &rows_dev[l].1),
        ] {
            let want = reference::neighbor_diff(feat, s, &drawn).unwrap();
            let got = to_f64(&dev.download(rows));
            let what = format!("layer {l} raw rows of {side} {:?} {label}", s.layout());
            assert_close(&what, &got, &want, stored_tolerance::<T>(&want));
        }
        centers.push(drawn);
    }
    centers
}

/// One side of a layer's scatter on a device: the gradient of its rows, its feature gradient.
type SideMem<T, D> = (<D as TestDevice>::Mem<f32>, <D as TestDevice>::Mem<T>);

/// One scatter after a gather: random float gradients of the rows, upstream 2.5 from device
/// memory, into random starts of q's feature gradients (and of k's when `both`; else k's stay
/// as they were), against the reference's backward rounded once.
fn scatter_step<T: Dtype + Elem, D: TestDevice>(
    dev: &D,
    plan: &SampledRowsPlan,
    ws: &mut SampledRowsWorkspace<D::Mem<i32>>,
    centers: &[Centers],
    both: bool,
    rng: &mut Rng,
    label: &str,
) {
    let upstream = 2.5f32;
    // Per layer and side: the gradient of the rows and the start of the feature gradient.
    let inputs: Vec<[(Vec<f32>, Vec<T>); 2]> = (0..plan.len())
        .map(|l| {
            let (rows, feat) = (plan.rows_shape(l).len(), plan.shape(l).len());
            [(); 2].map(|_| (random(rng, rows, 1.0), random(rng, feat, 1.0)))
        })
        .collect();
    let mut mem: Vec<[SideMem<T, D>; 2]> = inputs
        .iter()
        .map(|sides| {
            sides
                .each_ref()
                .map(|(g, f)| (dev.upload(g), dev.upload(f)))
        })
        .collect();
    let sides: Vec<[ScatterSide; 2]> = mem
        .iter_mut()
        .map(|sides| {
            sides.each_mut().map(|(g, f)| ScatterSide {
                grad_rows: dev.buf(g),
                grad_feat: dev.buf(f),
            })
        })
        .collect();
    let q: Vec<_> = sides.iter().map(|s| s[0]).collect();
    let k: Vec<_> = sides.iter().map(|s| s[1]).collect();
    let mut upstream_dev = dev.upload(&[upstream]);
    let launcher = Counting::new(dev.launcher());
    let bufs = ws.map_mut(|m| dev.buf(m));
    plan.scatter::<T, _>(
        &launcher,
        &bufs,
        dev.buf(&mut upstream_dev),
        &q,
        both.then_some(&k[..]),
    )
    .unwrap_or_else(|e| panic!("scatter {label}: {e}"));
    assert_eq!(
        launcher.take(),
        [format!("small_s_scatter_{}", T::SUFFIX)],
        "{label}: the scatter is one launch"
    );
    for l in 0..plan.len() {
        for (side, ((grad_rows, start), (_, got))) in inputs[l].iter().zip(&mem[l]).enumerate() {
            let (start, got) = (to_f64(start), to_f64(&dev.download(got)));
            let what = format!("layer {l} grad_feat side {side} (both: {both}) {label}");
            if side == 1 && !both {
                assert_eq!(got, start, "{what}: written without being asked for");
                continue;
            }
            let scaled: Vec<f64> = grad_rows
                .iter()
                .map(|&g| upstream as f64 * g as f64)
                .collect();
            let want = scatter_model::<f64>(
                &start,
                &scaled,
                plan.shape(l),
                &centers[l],
                Scatter::Deterministic,
            );
            assert_close(&what, &got, &want, stored_tolerance::<T>(&want));
        }
    }
}

on_every_device!(sampled_rows_match_reference);

/// The layers whose rows the plan cannot hold, and buffers that do not fit it: errors that
/// name them.
#[test]
fn sampled_rows_refuse_what_they_cannot_run() {
    let shape = |h, w| FeatureShape::new(1, 3, h, w, Layout::Nchw).unwrap();
    let small = (shape(6, 6), 4);
    // 8 x 65 = 520 rows.
    let err = SampledRowsPlan::new(&[small, (shape(12, 12), 65)]).unwrap_err();
    assert!(
        matches!(&err, Error::Shape(m) if m.contains("layer 1") && m.contains("520")),
        "{err}"
    );
    // 65 asked of a 9x10 map: its 56 interior positions, 448 rows.
    let plan = SampledRowsPlan::new(&[(shape(9, 10), 65)]).unwrap();
    assert_eq!(plan.num_centers(0), 56);
    assert_eq!(plan.rows_shape(0), RowShape::new(1, 448, 3).unwrap());
    let err = SampledRowsPlan::new(&[small; small_s::MAX_LAYERS + 1]).unwrap_err();
    assert!(
        matches!(&err, Error::Shape(m) if m.contains("9 layers")),
        "{err}"
    );
    assert!(SampledRowsPlan::new(&[]).is_err());
    assert!(matches!(
        SampledRowsPlan::new(&[(shape(6, 6), 0)]),
        Err(Error::NoCenters)
    ));

    let plan = SampledRowsPlan::new(&[small, small]).unwrap();
    let lengths = plan.workspace().unwrap();
    assert_eq!((lengths.centers, lengths.maps), (8, 72));
    let ws = lengths.try_map(|&n| Ok::<_, Error>(buf(n))).unwrap();
    let feat = (buf(108), buf(108));
    let rows = (buf(96), buf(96));
    let emu = Emu::new(1);
    let launcher = Counting::new(emu.launcher());
    let gather = |feats: &[(Buf, Buf)], rows: &[(Buf, Buf)], ws: &SampledRowsWorkspace<Buf>| {
        plan.gather::<f32, _>(&launcher, feats, rows, ws)
            .unwrap_err()
            .to_string()
    };
    let message = gather(&[feat], &[rows, rows], &ws);
    assert!(message.contains("feature maps (layers)"), "{message}");
    let message = gather(&[feat, feat], &[rows, (buf(96), buf(95))], &ws);
    assert!(message.contains("rows_k"), "{message}");
    let short = SampledRowsWorkspace {
        maps: buf(71),
        ..ws.clone()
    };
    let message = gather(&[feat, feat], &[rows, rows], &short);
    assert!(message.contains("maps"), "{message}");
    let short = SampledRowsWorkspace {
        counters: buf(small_s::COUNTERS - 1),
        ..ws.clone()
    };
    let message = gather(&[feat, feat], &[rows, rows], &short);
    assert!(message.contains("counters"), "{message}");
    let side = ScatterSide {
        grad_rows: buf(96),
        grad_feat: buf(108),
    };
    let message = plan
        .scatter::<f32, _>(&launcher, &ws, buf(1), &[side, side], Some(&[side]))
        .unwrap_err()
        .to_string();
    assert!(message.contains("k side"), "{message}");
    assert!(plan.centers(&ws, 2).is_err());
    assert!(
        launcher.take().is_empty(),
        "nothing launched on bad buffers"
    );
}
