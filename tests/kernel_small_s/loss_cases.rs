//! The multi-layer loss's cases: odd sizes, the edges of float's range, the paper's
//! configuration with its launches counted, and determinism.

use super::*;

/// Odd sizes on the small-S path, centres given: S = 8 with C = 1; S past one 16-row tile and
/// C past one 64-column tile; S = 512, the largest; one launch for all of them, every type.
/// S = 240 with a flat patch (NHWC), f32 and bf16. Then the centres drawn on the device, with a
/// layer of S = 520 on the fused path in the same loss: f32 (the fused path's 16-bit numerics
/// are kernel_layer's), every type where large sizes are practical, with larger maps too.
fn loss_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(11);
    let small = [
        layer((2, 5, 9, 11), 7, Layout::Nchw, false),
        layer((1, 1, 3, 3), 1, Layout::Nhwc, false),
        layer((1, 70, 12, 9), 9, Layout::Nchw, false),
        layer((3, 4, 10, 10), 64, Layout::Nchw, false),
    ];
    check_case_all(
        dev,
        &small,
        Draw::Given,
        &mut rng,
        "small-S layers, centres given",
    );
    let flat = [layer((2, 6, 8, 7), 30, Layout::Nhwc, true)];
    check_case_all(
        dev,
        &flat,
        Draw::Given,
        &mut rng,
        "a flat patch, centres given",
    );
    let mixed = [
        layer((1, 3, 11, 11), 65, Layout::Nchw, false),
        layer((2, 5, 9, 11), 7, Layout::Nhwc, false),
    ];
    let name = "a fused and a small-S layer, drawn";
    if dev.large_sizes() {
        check_case_all(dev, &mixed, Draw::Sample, &mut rng, name);
        let large = [
            layer((4, 96, 40, 40), 64, Layout::Nchw, false),
            layer((2, 300, 20, 24), 33, Layout::Nhwc, false),
            layer((1, 64, 60, 60), 200, Layout::Nchw, false),
        ];
        check_case_all(dev, &large, Draw::Sample, &mut rng, "larger maps, drawn");
    } else {
        check_case::<f32, D>(dev, &mixed, Draw::Sample, &BACKWARDS, &mut rng, name);
    }
}

/// Features at the edges of float's range, every layer in one launch: near `f32::MAX`, where
/// centre minus neighbour exceeds it; of 1e20, whose difference rows' raw products exceed it;
/// of 1e-25, far below eps (their rows normalise to about 0, their gradients are g/eps). f32
/// and bf16 (which share float's range); f16 at its own edges (features near 65504, whose
/// differences exceed it, and of 1e-3).
fn extreme_magnitudes<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(23);
    let float_range = [
        layer((1, 3, 5, 6), 3, Layout::Nchw, false).at(3e38),
        layer((2, 5, 6, 5), 4, Layout::Nhwc, false).at(1e20),
        layer((1, 4, 7, 5), 5, Layout::Nchw, false).at(1e-25),
    ];
    let name = "features at the edges of float's range";
    check_case::<f32, D>(dev, &float_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
    check_case::<half::bf16, D>(dev, &float_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
    let f16_range = [
        layer((1, 3, 5, 6), 3, Layout::Nchw, false).at(6e4),
        layer((1, 4, 7, 5), 5, Layout::Nhwc, false).at(1e-3),
    ];
    let name = "features at the edges of f16's range";
    check_case::<half::f16, D>(dev, &f16_range, Draw::Given, &BOTH_SIDES, &mut rng, name);
}

/// The paper's configuration: B = 8, num_s = 8, relu2_1 128x128x128, relu3_1 256x64x64,
/// relu4_1 512x32x32 (NCHW), tau 0.07. A training step (the centres drawn on the device, the
/// forward, the backward into zeroed gradients) is three launches; against the reference in
/// f32, and in bf16 where large sizes are practical (the GPU; the emulator with
/// `CCPL_EMU_LARGE=1`): the odd sizes check every type and every backward.
fn paper_configuration<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(2022);
    let cases = [(128, 128), (256, 64), (512, 32)]
        .map(|(c, side)| layer((8, c, side, side), 8, Layout::Nchw, false));
    let name = "paper configuration";
    let f32_run = check_case::<f32, D>(dev, &cases, Draw::Sample, &TRAINING_STEP, &mut rng, name);
    if dev.large_sizes() {
        check_case::<half::bf16, D>(dev, &cases, Draw::Sample, &TRAINING_STEP, &mut rng, name);
    }
    let step: Vec<&String> = f32_run.kernels[0]
        .iter()
        .chain(&f32_run.kernels[1])
        .collect();
    println!(
        "launches per step at the paper configuration: {}",
        step.len()
    );
    assert_eq!(
        step,
        [
            "small_s_gather_f32",
            "small_s_rows_f32",
            "small_s_scatter_f32"
        ],
        "a training step: draw and gather, the rows' loss and gradient, the scatter"
    );
    assert!(step.len() <= 4);
    let plan = LossPlan::new(&cases.map(|c| (c.shape, c.num_s)), TAU).unwrap();
    let bytes = plan.workspace().unwrap().bytes::<f32>();
    println!("workspace at the paper configuration: {bytes} bytes");
    // Four float row matrices (B, S, C) per layer (rows and gradients of both sides), the
    // centres and their maps, the row statistics and both sides' norms.
    let (b, s, channels) = (8, 64, 128 + 256 + 512);
    let maps = 128 * 128 + 64 * 64 + 32 * 32;
    let expected = 4 * (4 * b * s * channels)
        + 4 * (4 * b * s * 3)
        + 4 * 3
        + 4 * (3 * 8 + maps)
        + 4 * small_s::COUNTERS
        + 4 * 2;
    assert_eq!(bytes, expected);
}

/// The same step twice, scheduled differently (the emulator draws a new schedule for every
/// launch): the same bits.
fn step_is_deterministic<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(5);
    let cases = [
        layer((2, 37, 13, 17), 20, Layout::Nchw, false),
        layer((3, 9, 7, 7), 25, Layout::Nhwc, false),
    ];
    let plan = LossPlan::new(&cases.map(|c| (c.shape, c.num_s)), TAU).unwrap();
    let feats: Vec<(Vec<f32>, Vec<f32>)> = cases.iter().map(|c| features(&mut rng, c)).collect();
    let centers = case_centers(&cases, Draw::Sample, 0);
    let starts = starts::<f32>(&mut rng, &cases, &BACKWARDS);
    let label = format!("determinism on the {}", dev.name());
    let inputs = Inputs {
        feats: &feats,
        centers: &centers,
        draw: Draw::Sample,
        backwards: &BACKWARDS,
        starts: &starts,
    };
    let run_once = || {
        let mut ws = loss_workspace::<f32, D>(dev, &plan, SEED);
        run::<f32, D>(dev, &plan, &mut ws, 0, &inputs, &label)
    };
    let (a, b) = (run_once(), run_once());
    assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{label}: loss");
    let bits = |r: &Run| -> Vec<u64> {
        r.grads
            .iter()
            .flatten()
            .flat_map(|(q, k)| q.iter().chain(k))
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&a) == bits(&b),
        "{label}: gradients differ between runs"
    );
}

on_every_device!(
    loss_matches_reference,
    extreme_magnitudes,
    paper_configuration,
    step_is_deterministic
);
