//! Launch plans on the CPU: every argument is checked before anything is launched (the
//! crate's error names the problem), grids cover every output exactly, and the per-layer loss
//! launches its stages in order, or nothing at all when any buffer is wrong.

use crate::common;

use std::cell::RefCell;

use ccpl::launch::CentersBuf;
use ccpl::launch::info_nce::{self, Side};
use ccpl::launch::neighbor::{self, Scatter};
use ccpl::launch::{
    Buf, KernelParams, LaunchPlan, Launcher, info_nce_fused, normalize, similarity,
};
use ccpl::loss::layer::{LayerPlan, LayerWorkspace};
use ccpl::{Error, FeatureShape, Layout, Result, RowShape, Tau};
use common::buf;

mod launches;

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

fn shape() -> FeatureShape {
    FeatureShape::new(2, 3, 7, 9, Layout::Nchw).unwrap()
}

fn centers(n: usize) -> CentersBuf {
    CentersBuf {
        height: 7,
        width: 9,
        flat: buf(n),
        map: buf(63),
    }
}

#[test]
fn neighbor_plans_check_every_buffer_and_the_centres() {
    let (s, c) = (shape(), centers(5));
    let rows = neighbor::rows_len(&s, 5).unwrap();
    assert_eq!(rows, 2 * 40 * 3);
    let plan = neighbor::neighbor_diff::<f32>(&s, &c, buf(s.len()), buf(rows)).unwrap();
    assert_eq!(plan.kernel, "neighbor_diff_f32");
    let err = neighbor::neighbor_diff::<f32>(&s, &c, buf(s.len() - 1), buf(rows));
    assert_eq!(
        err.unwrap_err(),
        Error::Length {
            what: "feat",
            expected: s.len(),
            actual: s.len() - 1
        }
    );
    let err = neighbor::neighbor_diff::<f32>(&s, &c, buf(s.len()), buf(rows + 1));
    assert!(matches!(err, Err(Error::Length { what: "rows", .. })));
    let other_map = CentersBuf {
        height: 9,
        width: 7,
        ..c
    };
    let err = neighbor::neighbor_diff::<f32>(&s, &other_map, buf(s.len()), buf(rows));
    assert!(matches!(err, Err(Error::Shape(_))));
    let err = neighbor::neighbor_diff::<f32>(&s, &centers(0), buf(s.len()), buf(0));
    assert_eq!(err.unwrap_err(), Error::NoCenters);
    // More centres than the 5x7 interior holds.
    let err = neighbor::neighbor_diff::<f32>(&s, &centers(36), buf(s.len()), buf(2 * 288 * 3));
    assert!(matches!(err, Err(Error::Shape(_))));
    let bad_map = CentersBuf { map: buf(62), ..c };
    let err = neighbor::neighbor_diff::<f32>(&s, &bad_map, buf(s.len()), buf(rows));
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "center map",
            ..
        })
    ));

    for (scatter, name) in [
        (Scatter::Atomic, "neighbor_diff_backward_atomic_bf16"),
        (
            Scatter::Deterministic,
            "neighbor_diff_backward_deterministic_bf16",
        ),
    ] {
        let plan = neighbor::neighbor_diff_backward::<half::bf16>(
            &s,
            &c,
            buf(rows),
            buf(s.len()),
            scatter,
        )
        .unwrap();
        assert_eq!(plan.kernel, name);
    }
    let err = neighbor::neighbor_diff_backward::<f32>(&s, &c, buf(rows), buf(1), Scatter::Atomic);
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "grad_feat",
            ..
        })
    ));
}

#[test]
fn row_plans_check_lengths_temperature_and_grid_limits() {
    let rows = RowShape::new(3, 65, 33).unwrap();
    let (n, stats) = (rows.len(), 3 * 65);
    let plan = normalize::normalize_rows::<half::f16>(&rows, buf(n), buf(n), buf(stats)).unwrap();
    assert_eq!(plan.kernel, "normalize_rows_f16");
    // One warp per row: 8 rows per block of 256.
    assert_eq!(
        (plan.grid, plan.block),
        ((stats.div_ceil(8) as u32, 1, 1), (256, 1, 1))
    );
    let err = normalize::normalize_rows::<f32>(&rows, buf(n), buf(n), buf(stats + 1));
    assert!(matches!(err, Err(Error::Length { what: "norms", .. })));
    let err = normalize::normalize_rows_backward::<f32>(&rows, buf(n), buf(stats), buf(n), buf(0));
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "grad_rows",
            ..
        })
    ));

    // A 64x64 tile per block, any S: 65 rows need 2 tiles a side.
    let l = rows.logits_len();
    let plan = similarity::similarity::<f32>(&rows, Tau::DEFAULT, buf(n), buf(n), buf(l)).unwrap();
    assert_eq!((plan.grid, plan.block), ((2, 2, 3), (256, 1, 1)));
    assert!((plan.params.inv_tau - 1.0 / 0.07).abs() < 1e-5);
    let err = similarity::similarity::<f32>(&rows, Tau::DEFAULT, buf(n), buf(n), buf(l - 1));
    assert!(matches!(err, Err(Error::Length { what: "logits", .. })));
    // grid.z is the image: at most 65535.
    let wide = RowShape::new(65_536, 8, 1).unwrap();
    let (wn, wl) = (wide.len(), wide.logits_len());
    let err = similarity::similarity::<f32>(&wide, Tau::DEFAULT, buf(wn), buf(wn), buf(wl));
    assert!(matches!(err, Err(Error::Shape(_))), "{err:?}");

    let plan = info_nce::info_nce_forward(&rows, buf(l), buf(stats), buf(stats)).unwrap();
    assert_eq!(plan.kernel, "info_nce_forward");
    assert_eq!(plan.grid, (stats.div_ceil(8) as u32, 1, 1));
    let err = info_nce::info_nce_forward(&rows, buf(l), buf(stats), buf(stats - 1));
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "row_loss",
            ..
        })
    ));
    let plan = info_nce::info_nce_loss(buf(stats), buf(1), true).unwrap();
    assert_eq!((plan.grid, plan.params.accumulate), ((1, 1, 1), 1));
    assert!(matches!(
        info_nce::info_nce_loss(buf(0), buf(1), false),
        Err(Error::Shape(_))
    ));
    let err = info_nce::info_nce_loss(buf(stats), buf(2), false);
    assert!(matches!(err, Err(Error::Length { what: "loss", .. })));

    let backward = |side, upstream| {
        info_nce::info_nce_backward::<f32>(
            &rows,
            Tau::DEFAULT,
            side,
            buf(l),
            buf(stats),
            buf(stats),
            buf(n),
            buf(upstream),
            buf(n),
        )
    };
    let dq = backward(Side::Q, 1).unwrap();
    let dk = backward(Side::K, 1).unwrap();
    assert_eq!((dq.params.grad.transpose, dk.params.grad.transpose), (0, 1));
    // Tiles of the (S, C) gradient: 33 columns need 1, 65 rows 2.
    assert_eq!(dq.grid, (1, 2, 3));
    assert!(matches!(
        backward(Side::Q, 0),
        Err(Error::Length {
            what: "upstream",
            ..
        })
    ));

    // Fused: the forward one block per 64 rows of an image, the backward one per 64x64 tile
    // of the (S, C) gradient; no logits buffer at all.
    let plan = info_nce_fused::info_nce_fused_forward::<half::bf16>(
        &rows,
        Tau::DEFAULT,
        buf(n),
        buf(n),
        buf(stats),
        buf(stats),
    )
    .unwrap();
    assert_eq!(plan.kernel, "info_nce_fused_forward_bf16");
    assert_eq!((plan.grid, plan.block), ((1, 2, 3), (256, 1, 1)));
    let err = info_nce_fused::info_nce_fused_forward::<f32>(
        &rows,
        Tau::DEFAULT,
        buf(n),
        buf(n - 1),
        buf(stats),
        buf(stats),
    );
    assert!(
        matches!(err, Err(Error::Length { what: "k", .. })),
        "{err:?}"
    );
    let fused_backward = |side, upstream, grad| {
        info_nce_fused::info_nce_fused_backward::<f32>(
            &rows,
            Tau::DEFAULT,
            side,
            buf(n),
            buf(n),
            buf(stats),
            buf(stats),
            buf(upstream),
            buf(grad),
        )
    };
    let dq = fused_backward(Side::Q, 1, n).unwrap();
    let dk = fused_backward(Side::K, 1, n).unwrap();
    assert_eq!((dq.params.grad.transpose, dk.params.grad.transpose), (0, 1));
    assert_eq!(
        (dq.kernel.as_str(), dq.grid),
        ("info_nce_fused_backward_f32", (1, 2, 3))
    );
    let err = fused_backward(Side::Q, 0, n);
    assert!(
        matches!(
            err,
            Err(Error::Length {
                what: "upstream",
                ..
            })
        ),
        "{err:?}"
    );
    let err = fused_backward(Side::K, 1, n + 1);
    assert!(
        matches!(err, Err(Error::Length { what: "grad", .. })),
        "{err:?}"
    );
}

/// The small-S kernels' own limits: S at most 512, at most 8 layers a launch, every buffer's
/// length, normalised rows only in float32 and in every layer of a launch, a part of a buffer
/// within it.
#[test]
fn small_s_plans_check_their_limits() {
    use ccpl::launch::small_s::{self, RowsLayer, RowsTotals};
    use ccpl::loss::small_s::SmallRowsPlan;
    let rows = |s: usize| RowShape::new(2, s, 3).unwrap();
    assert!(SmallRowsPlan::new(rows(512), Tau::DEFAULT).is_ok());
    assert!(matches!(
        SmallRowsPlan::new(rows(513), Tau::DEFAULT),
        Err(Error::Shape(_))
    ));
    let layer = |shape: RowShape| RowsLayer {
        shape,
        rows_q: buf(shape.len()),
        rows_k: buf(shape.len()),
        norms: None,
        grad_rows: buf(shape.len()),
        row_lse: buf(shape.batch() * shape.rows()),
        row_loss: buf(shape.batch() * shape.rows()),
        copies: None,
    };
    let totals = |layers: usize| RowsTotals {
        counters: buf(small_s::COUNTERS),
        layer_loss: buf(layers),
        loss: buf(1),
    };
    // One block per 16 rows of an image: 2 * ceil(520/16) would be 66, but 520 is refused.
    let plan = small_s::rows_forward::<f32>(&[layer(rows(40))], Tau::DEFAULT, &totals(1)).unwrap();
    assert_eq!((plan.grid, plan.block), ((6, 1, 1), (256, 1, 1)));
    assert_eq!(plan.params.normalized, 0);
    let err = small_s::rows_forward::<f32>(&[layer(rows(520))], Tau::DEFAULT, &totals(1));
    assert!(matches!(err, Err(Error::Shape(_))));
    let err = small_s::rows_forward::<f32>(&[layer(rows(40))], Tau::DEFAULT, &totals(2));
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "layer_loss",
            ..
        })
    ));
    // Normalised rows (the gather's): float32, with norms of B*S floats, in every layer of the
    // launch, never copied.
    let normalised = |shape: RowShape, norms: usize| RowsLayer {
        norms: Some((buf(norms), buf(norms))),
        ..layer(shape)
    };
    let plan = small_s::rows_forward::<f32>(&[normalised(rows(40), 80)], Tau::DEFAULT, &totals(1))
        .unwrap();
    assert_eq!(plan.params.normalized, 1);
    let err = small_s::rows_forward::<f32>(&[normalised(rows(40), 79)], Tau::DEFAULT, &totals(1));
    assert!(matches!(
        err,
        Err(Error::Length {
            what: "norms_q",
            ..
        })
    ));
    let mixed = [normalised(rows(40), 80), layer(rows(8))];
    let err = small_s::rows_forward::<f32>(&mixed, Tau::DEFAULT, &totals(2));
    assert!(matches!(err, Err(Error::Shape(_))));
    let err = small_s::rows_transposed::<half::bf16>(&[normalised(rows(40), 80)], Tau::DEFAULT);
    assert!(matches!(err, Err(Error::Shape(_))));
    let copied = RowsLayer {
        copies: Some((buf(240), buf(240))),
        ..normalised(rows(40), 80)
    };
    let err = small_s::rows_forward::<f32>(&[copied], Tau::DEFAULT, &totals(1));
    assert!(matches!(err, Err(Error::Shape(_))));
    let nine = [layer(rows(8)); 9];
    let err = small_s::rows_forward::<f32>(&nine, Tau::DEFAULT, &totals(9));
    assert!(matches!(err, Err(Error::Shape(_))));
    let err = small_s::rows_transposed::<f32>(
        &[RowsLayer {
            copies: Some((buf(240), buf(240))),
            ..layer(rows(40))
        }],
        Tau::DEFAULT,
    );
    assert!(matches!(err, Err(Error::Shape(_))));
    assert!(matches!(
        small_s::scale::<f32>(10, buf(1), (buf(10), buf(9)), None),
        Err(Error::Length { what: "out", .. })
    ));
    assert!(matches!(
        buf(10).part::<f32>("rows_q", 8, 3),
        Err(Error::Shape(_))
    ));
    assert_eq!(
        buf(10).part::<f32>("rows_q", 8, 2).unwrap(),
        Buf {
            addr: 0x1000 + 32,
            len: 2
        }
    );
}

/// The largest loss the plans take: a workspace's size in bytes, past what any memory holds,
/// is `usize::MAX` (saturated), never an overflow.
#[test]
fn workspace_bytes_of_the_largest_plans_saturate() {
    use ccpl::loss::multi_layer::LossPlan;
    use ccpl::loss::small_s::SmallRowsPlan;
    // B*S = 2^31 - 8 rows (the i32 limit) of C = 2^31 - 1 channels: each row matrix is about
    // 2^62 elements, 2^64 bytes.
    let (b, c) = ((1 << 28) - 1, i32::MAX as usize);
    let shape = FeatureShape::new(b, c, 3, 3, Layout::Nchw).unwrap();
    let plan = LossPlan::new(&[(shape, 1)], Tau::DEFAULT).unwrap();
    assert_eq!(plan.workspace().unwrap().bytes::<f32>(), usize::MAX);
    let rows = SmallRowsPlan::new(RowShape::new(b, 8, c).unwrap(), Tau::DEFAULT).unwrap();
    assert_eq!(rows.workspace().unwrap().bytes::<f32>(), usize::MAX);
}

/// Sizes and buffers a hostile caller can pass: layers whose sizes add up past usize, a part
/// of a buffer past the address space, counters of another length, a centres buffer of
/// N + 1. Each is an error naming the buffer or the sum, never a panic or a wrapped offset.
#[test]
fn hostile_sizes_and_buffers_are_refused_by_name() {
    use ccpl::launch::small_s;
    use ccpl::loss::multi_layer::{Draw, LossPlan};
    use ccpl::loss::small_s::SmallSWorkspace;
    // Layers of just under 2^62 elements (the largest the shapes take): three put the third
    // layer's part past 2^64 bytes, five add up past usize.
    let (b, c) = ((1 << 28) - 1, i32::MAX as usize);
    let huge = FeatureShape::new(b, c, 3, 3, Layout::Nchw).unwrap();
    for (layers, words) in [(3, "past the address space"), (5, "past usize")] {
        let err = LossPlan::new(&vec![(huge, 1); layers], Tau::DEFAULT).unwrap_err();
        assert!(
            matches!(&err, Error::Shape(m) if m.contains(words)),
            "{layers} layers: {err:?}"
        );
    }
    let rows = RowShape::new(b, 8, c).unwrap();
    let err = SmallSWorkspace::lengths(&[rows; 5]).unwrap_err();
    assert!(
        matches!(&err, Error::Shape(m) if m.contains("past usize")),
        "{err:?}"
    );
    // A part names its buffer.
    let err = buf(95).part::<f32>("norms_q", 0, 96).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad shape: elements 0..96 of norms_q, a buffer of 95"
    );
    let err = buf(usize::MAX)
        .part::<f32>("rows_q", 1 << 62, 1)
        .unwrap_err();
    assert!(err.to_string().contains("rows_q"), "{err}");
    // Counters of another length, and the step of the right ones.
    for len in [0, 3, small_s::COUNTERS + 1] {
        assert_eq!(
            small_s::counters_step(&vec![0; len]),
            Err(Error::Length {
                what: "counters",
                expected: small_s::COUNTERS,
                actual: len
            })
        );
    }
    assert_eq!(
        small_s::counters_step(&small_s::counters(7, 1 << 40)),
        Ok(1 << 40)
    );
    // A centres buffer of N + 1 is the centres' error, not the rows'; nothing launched.
    let small = FeatureShape::new(2, 3, 7, 9, Layout::Nchw).unwrap();
    let plan = LossPlan::new(&[(small, 5)], Tau::DEFAULT).unwrap();
    let mut ws = plan
        .workspace()
        .unwrap()
        .try_map(|&n| Ok::<_, ()>(buf(n)), |&n| Ok(buf(n)), |&n| Ok(buf(n)))
        .unwrap();
    ws.centers[0].flat = buf(6);
    let feats = [(buf(small.len()), buf(small.len()))];
    let rec = Recorder::default();
    for draw in [Draw::Sample, Draw::Given] {
        let err = plan.forward::<f32, _>(&rec, &feats, &ws, draw).unwrap_err();
        assert_eq!(
            err,
            Error::Length {
                what: "centers",
                expected: 5,
                actual: 6
            }
        );
    }
    assert!(rec.0.take().is_empty());
}
