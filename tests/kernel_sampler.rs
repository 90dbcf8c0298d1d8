//! The device sampler of the small-S path (`small_s_gather` drawing, `kernels/philox.cuh`):
//! the centres it draws are the host model's (`Centers::philox`), word for word, on the
//! emulator and the GPU, with the centre map kept in step and the step counter advanced; and,
//! on the emulator, its draws are distinct interior positions, uniform in every slot, in
//! uniformly random order, independent across layers and across steps (chi-square tests at a
//! significance of 0.001 each).

use crate::common;

use std::ops::Range;

use ccpl::launch::Buf;
use ccpl::launch::CentersBuf;
use ccpl::launch::small_s::{self, GatherLayer};
use ccpl::sampling::philox4x32_10;
use ccpl::{Centers, FeatureShape, Layout};
use common::chi_square;
use common::device::{Emu, TestDevice};

/// The draws of a launch at each of `steps` on sample-only layers of maps `(H, W, num_s)`, one
/// set of buffers throughout, the sampler starting at `steps.start`: `draws[step][layer]`,
/// each checked against the host model, with its map, and the counters after each launch (the
/// step advanced by one, no finished block left counted).
pub(crate) fn draws<D: TestDevice>(
    dev: &D,
    maps: &[(usize, usize, usize)],
    seed: u64,
    steps: Range<u64>,
) -> Vec<Vec<Vec<i32>>> {
    let shapes: Vec<FeatureShape> = maps
        .iter()
        .map(|&(h, w, _)| FeatureShape::new(1, 1, h, w, Layout::Nchw).unwrap())
        .collect();
    let counts: Vec<usize> = maps
        .iter()
        .map(|&(h, w, n)| n.min((h - 2) * (w - 2)))
        .collect();
    let mut flat: Vec<D::Mem<i32>> = counts.iter().map(|&n| dev.upload(&vec![0; n])).collect();
    let mut map: Vec<D::Mem<i32>> = shapes
        .iter()
        .map(|s| dev.upload(&vec![-1; s.height() * s.width()]))
        .collect();
    let mut counters = dev.upload(&small_s::counters(seed, steps.start));
    let centers: Vec<CentersBuf> = flat
        .iter_mut()
        .zip(&mut map)
        .zip(&shapes)
        .map(|((f, m), s)| CentersBuf {
            height: s.height(),
            width: s.width(),
            flat: dev.buf(f),
            map: dev.buf(m),
        })
        .collect();
    let layers: Vec<GatherLayer> = shapes
        .iter()
        .zip(&centers)
        .map(|(shape, c)| GatherLayer {
            shape: *shape,
            centers: *c,
            rows: None,
        })
        .collect();
    let counters_buf: Buf = dev.buf(&mut counters);
    let plan = small_s::gather::<f32>(&layers, counters_buf, true).unwrap();
    let mut out = Vec::new();
    for step in steps {
        dev.run(&plan);
        assert_eq!(
            dev.download(&counters),
            small_s::counters(seed, step + 1),
            "the counters after step {step} on the {}",
            dev.name()
        );
        let mut drawn = Vec::new();
        for (l, ((&(h, w, n), f), m)) in maps.iter().zip(&flat).zip(&map).enumerate() {
            let got = dev.download(f);
            let model = Centers::philox(h, w, n, seed, step, l as u32).unwrap();
            assert_eq!(
                got,
                model.flat(),
                "step {step} layer {l} ({h}x{w}, {n}) on the {}",
                dev.name()
            );
            assert_eq!(
                dev.download(m),
                model.center_map(),
                "step {step} layer {l}: the map"
            );
            drawn.push(got);
        }
        out.push(drawn);
    }
    out
}

/// Maps where the draw is the whole interior (3x3, 5x5: every position, in random order),
/// nearly all of it (20x20 with 300 of 324: many draws are repeats, drawn again; more centres
/// than threads in the block), a few centres of a large map, and the paper's layers.
fn device_draws_are_the_host_models<D: TestDevice>(dev: &D) {
    let maps = [
        (3, 3, 1),
        (5, 5, 9),
        (20, 20, 300),
        (7, 9, 20),
        (128, 128, 8),
        (64, 64, 8),
        (32, 32, 64),
    ];
    draws(dev, &maps, 0xdead_beef_0123, 0..3);
}

on_every_device!(device_draws_are_the_host_models);

/// Random123's known answers for Philox-4x32-10 (its tests/kat_vectors), which the host model
/// and, through it, the device's draws follow.
#[test]
fn philox_gives_the_known_answers() {
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

/// The statistic of independence of a contingency table of pairs (row, column).
fn independence(pairs: &[(usize, usize)], k: usize) -> f64 {
    let mut table = vec![0.0; k * k];
    let (mut rows, mut cols) = (vec![0.0; k], vec![0.0; k]);
    for &(a, b) in pairs {
        table[a * k + b] += 1.0;
        rows[a] += 1.0;
        cols[b] += 1.0;
    }
    let n = pairs.len() as f64;
    let expected: Vec<f64> = (0..k * k).map(|i| rows[i / k] * cols[i % k] / n).collect();
    chi_square(&table, &expected)
}

/// Upper 0.001 quantiles of the chi-square distribution (standard tables), by degrees of
/// freedom: a correct sampler exceeds one with probability 0.001.
const CHI2_999: [(usize, f64); 3] = [(3, 16.266), (16, 39.252), (24, 51.179)];

fn critical(dof: usize) -> f64 {
    CHI2_999.iter().find(|(k, _)| *k == dof).unwrap().1
}

/// 8 layers of 7x7 maps (25 interior positions), 4 centres each, 1000 steps on the emulator:
/// 8000 draws. Every draw: distinct interior positions. Each of the 4 slots uniform over the
/// 25 positions (24 degrees of freedom, 320 expected a cell); the order uniform: the rank of
/// slot 0 among the draw's 4 positions (3 dof, 2000 a cell); independence of layer l and
/// l + 1 at a step, and of a layer at steps t and t + 1 (the first centre's position mod 5,
/// a 5x5 table: 16 dof, about 300 a cell). 10 tests at 0.001: a correct sampler fails one of them
/// with probability under 1%; the seed is fixed, so the outcome is the same every run.
#[test]
fn draws_are_uniform_distinct_and_independent() {
    const LAYERS: usize = 8;
    const STEPS: u64 = 1000;
    const N: usize = 4;
    const SIDE: usize = 7;
    let interior = (SIDE - 2) * (SIDE - 2);
    let dev = Emu::new(3);
    let all = draws(&dev, &[(SIDE, SIDE, N); LAYERS], 20_220_708, 0..STEPS);
    // The interior index of a position.
    let index = |p: i32| {
        let (h, w) = (p as usize / SIDE, p as usize % SIDE);
        assert!(
            (1..SIDE - 1).contains(&h) && (1..SIDE - 1).contains(&w),
            "{p} is off the interior"
        );
        (h - 1) * (SIDE - 2) + (w - 1)
    };
    let draws: Vec<&Vec<i32>> = all.iter().flatten().collect();
    for d in &draws {
        let mut sorted = d.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), N, "centres repeat in {d:?}");
    }
    let total = draws.len() as f64;
    for slot in 0..N {
        let mut counts = vec![0.0; interior];
        for d in &draws {
            counts[index(d[slot])] += 1.0;
        }
        let stat = chi_square(&counts, &vec![total / interior as f64; interior]);
        eprintln!(
            "slot {slot} uniformity: chi-square {stat:.1} (24 dof, critical {})",
            critical(24)
        );
        assert!(
            stat < critical(24),
            "slot {slot} is not uniform: chi-square {stat:.1}"
        );
    }
    let mut ranks = vec![0.0; N];
    for d in &draws {
        ranks[d.iter().filter(|&&p| p < d[0]).count()] += 1.0;
    }
    let stat = chi_square(&ranks, &[total / N as f64; N]);
    eprintln!(
        "order: chi-square {stat:.1} (3 dof, critical {})",
        critical(3)
    );
    assert!(stat < critical(3), "the order is not uniform: {ranks:?}");

    let bucket = |d: &Vec<i32>| index(d[0]) % 5;
    let across_layers: Vec<(usize, usize)> = all
        .iter()
        .flat_map(|step| step.windows(2).map(|w| (bucket(&w[0]), bucket(&w[1]))))
        .collect();
    let across_steps: Vec<(usize, usize)> = all
        .windows(2)
        .flat_map(|w| (0..LAYERS).map(move |l| (bucket(&w[0][l]), bucket(&w[1][l]))))
        .collect();
    for (what, pairs) in [("layers", across_layers), ("steps", across_steps)] {
        let stat = independence(&pairs, 5);
        eprintln!(
            "independence across {what}: chi-square {stat:.1} (16 dof, critical {})",
            critical(16)
        );
        assert!(
            stat < critical(16),
            "draws depend on each other across {what}: {stat:.1}"
        );
    }
}
