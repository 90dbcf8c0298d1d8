//! CPU-side checks of the embedded kernel image: every kernel a launch plan can name is in
//! it for every storage type (PTX and every cubin), nothing else is, and ptxas reported no
//! register spill and no stack frame for any kernel.

use crate::common;

use std::collections::BTreeSet;

use ccpl::cuda::entry_points;
use ccpl::launch::CentersBuf;
use ccpl::launch::info_nce::{self, Side};
use ccpl::launch::neighbor::{self, Scatter};
use ccpl::launch::{info_nce_fused, normalize, similarity, small_s};
use ccpl::loss::layer::LayerWorkspace;
use ccpl::{Dtype, FeatureShape, Layout, RowShape, Tau, ffi};
use common::buf;
use half::{bf16, f16};

/// The kernel names of every plan for storage type `T` (plans are pure: no buffer is read).
fn planned<T: Dtype>() -> Vec<String> {
    let shape = FeatureShape::new(1, 3, 5, 5, Layout::Nchw).unwrap();
    let centers = CentersBuf {
        height: 5,
        width: 5,
        flat: buf(2),
        map: buf(25),
    };
    let lens = LayerWorkspace::lengths(&shape, 2).unwrap();
    let rows = RowShape::new(1, 16, 3).unwrap();
    let r = buf(lens.rows.unit_q);
    let s = buf(lens.rows.norms_q);
    let l = buf(rows.logits_len());
    let mut names = vec![
        neighbor::neighbor_diff::<T>(&shape, &centers, buf(shape.len()), r)
            .unwrap()
            .kernel,
        neighbor::neighbor_diff_normalize::<T>(&shape, &centers, buf(shape.len()), r, s)
            .unwrap()
            .kernel,
        normalize::normalize_rows::<T>(&rows, r, r, s)
            .unwrap()
            .kernel,
        normalize::normalize_rows_backward::<T>(&rows, r, s, r, r)
            .unwrap()
            .kernel,
        similarity::similarity::<T>(&rows, Tau::DEFAULT, r, r, l)
            .unwrap()
            .kernel,
        info_nce::info_nce_forward(&rows, l, s, s).unwrap().kernel,
        info_nce::info_nce_loss(s, buf(1), false).unwrap().kernel,
    ];
    for scatter in [Scatter::Atomic, Scatter::Deterministic] {
        let plan =
            neighbor::neighbor_diff_backward::<T>(&shape, &centers, r, buf(shape.len()), scatter);
        names.push(plan.unwrap().kernel);
    }
    names.push(
        info_nce_fused::info_nce_fused_forward::<T>(&rows, Tau::DEFAULT, r, r, s, s)
            .unwrap()
            .kernel,
    );
    for side in [Side::Q, Side::K] {
        let plan =
            info_nce::info_nce_backward::<T>(&rows, Tau::DEFAULT, side, l, s, s, r, buf(1), r);
        names.push(plan.unwrap().kernel);
        let plan = info_nce_fused::info_nce_fused_backward::<T>(
            &rows,
            Tau::DEFAULT,
            side,
            r,
            r,
            s,
            s,
            buf(1),
            r,
        );
        names.push(plan.unwrap().kernel);
    }
    names.extend(small_s_planned::<T>(&shape, &centers));
    names
}

/// The small-S path's kernels for `T`: the gather, the rows (as `CcpRows` launches it on rows
/// in `T`), the scatter and the scale.
fn small_s_planned<T: Dtype>(shape: &FeatureShape, centers: &CentersBuf) -> Vec<String> {
    let rows = RowShape::new(1, 16, 3).unwrap();
    let (r, s) = (buf(rows.len()), buf(16));
    let rows_layer = small_s::RowsLayer {
        shape: rows,
        rows_q: r,
        rows_k: r,
        norms: None,
        grad_rows: r,
        row_lse: s,
        row_loss: s,
        copies: None,
    };
    let totals = small_s::RowsTotals {
        counters: buf(small_s::COUNTERS),
        layer_loss: buf(1),
        loss: buf(1),
    };
    let gather = small_s::GatherLayer {
        shape: *shape,
        centers: *centers,
        rows: None,
    };
    let side = small_s::ScatterSide {
        grad_rows: buf(rows.len()),
        grad_feat: buf(shape.len()),
    };
    let scatter = small_s::ScatterLayer {
        shape: *shape,
        centers: *centers,
        q: side,
        k: None,
    };
    vec![
        small_s::gather::<T>(&[gather], buf(small_s::COUNTERS), true)
            .unwrap()
            .kernel,
        small_s::rows_forward::<T>(&[rows_layer], Tau::DEFAULT, &totals)
            .unwrap()
            .kernel,
        small_s::scatter::<T>(&[scatter], buf(1)).unwrap().kernel,
        small_s::scale::<T>(rows.len(), buf(1), (r, r), None)
            .unwrap()
            .kernel,
    ]
}

fn built() -> bool {
    if let Some(why) = ffi::NOT_BUILT {
        assert!(
            std::env::var("CCPL_REQUIRE_GPU").as_deref() != Ok("1"),
            "CCPL_REQUIRE_GPU=1 but the kernels were not built: {why}"
        );
        eprintln!("SKIPPED: the kernels were not built ({why})");
        return false;
    }
    true
}

#[test]
fn every_planned_kernel_is_in_the_image_and_nothing_else() {
    if !built() {
        return;
    }
    let planned: BTreeSet<String> = planned::<f32>()
        .into_iter()
        .chain(planned::<f16>())
        .chain(planned::<bf16>())
        .collect();
    // 14 typed kernels (each backward's two sides or two modes share one) x 3 types + 2
    // float-only ones.
    assert_eq!(planned.len(), 14 * 3 + 2, "{planned:?}");
    let mut in_ptx = BTreeSet::new();
    for image in ffi::IMAGES {
        let entries: BTreeSet<String> = entry_points(image.ptx).map(str::to_string).collect();
        assert!(!entries.is_empty(), "{}.cu defines no kernel", image.family);
        assert!(!image.cubins.is_empty(), "{}.cu has no cubin", image.family);
        for (arch, cubin) in image.cubins {
            for name in &entries {
                let symbol = [name.as_bytes(), b"\0"].concat();
                assert!(
                    cubin.windows(symbol.len()).any(|w| w == symbol.as_slice()),
                    "{name} is in the PTX of {}.cu but not in its sm_{arch} cubin",
                    image.family
                );
            }
        }
        in_ptx.extend(entries);
    }
    let missing: Vec<_> = planned.difference(&in_ptx).collect();
    let unplanned: Vec<_> = in_ptx.difference(&planned).collect();
    assert!(
        missing.is_empty(),
        "planned but not in the image: {missing:?}"
    );
    assert!(
        unplanned.is_empty(),
        "in the image but no plan launches them: {unplanned:?}"
    );
}

#[test]
fn ptxas_reports_no_spill_and_no_stack_frame() {
    if !built() {
        return;
    }
    let report = ffi::PTXAS_REPORT;
    let mut function = "";
    let mut checked = BTreeSet::new();
    for line in report.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            function = name.trim();
        } else if line.contains("bytes stack frame") {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            assert_eq!(numbers.len(), 3, "unexpected ptxas line: {line}");
            assert!(
                numbers.iter().all(|&n| n == 0),
                "{function}: {}",
                line.trim()
            );
            checked.insert(function.to_string());
        }
    }
    let kernels: BTreeSet<String> = ffi::IMAGES
        .iter()
        .flat_map(|image| entry_points(image.ptx))
        .map(str::to_string)
        .collect();
    let unchecked: Vec<_> = kernels.difference(&checked).collect();
    assert!(
        unchecked.is_empty(),
        "ptxas reported nothing for {unchecked:?}"
    );
}
