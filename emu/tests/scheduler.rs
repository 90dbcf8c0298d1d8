//! The emulator's threads and scheduler: every thread runs once with its coordinates, block
//! reductions are exact, a missing barrier or `__syncwarp` gives wrong results under the seeded
//! scheduler (without the sanitizer, which stops them first: `sanitizer.rs`), and a seed replays
//! its schedule. The kernels are `emu/runtime/selftest.cu`.

use ccpl_emu as emu;

use crate::common::{
    block_reduce_expected, emulator, integer_inputs, lin, run, run_1d, run_1d_on,
    unchecked_emulator,
};

#[test]
fn every_thread_runs_once_with_its_coordinates() {
    let (grid, block) = ((3u32, 2u32, 2u32), (5u32, 3u32, 2u32));
    let threads = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
    let mut out = vec![u32::MAX; 12 * threads];
    run(
        &emulator(1),
        "selftest_coordinates",
        grid,
        block,
        0,
        0,
        emu::buf_mut(&mut out).addr,
        0,
        0,
    )
    .unwrap();
    let mut i = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = [
                                tx, ty, tz, bx, by, bz, block.0, block.1, block.2, grid.0, grid.1,
                                grid.2,
                            ];
                            assert_eq!(out[12 * i..12 * i + 12], want, "thread {i}");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn block_reductions_are_exact_for_every_block_size_and_seed() {
    for (threads, n) in [(32u32, 37i32), (96, 1001), (256, 999), (1024, 3001)] {
        let blocks = 3;
        let input = integer_inputs(blocks * n as usize, threads as u64);
        for seed in 0..4 {
            let mut out = vec![f32::NAN; 3 * blocks];
            run_1d(
                seed,
                "selftest_block_reduce",
                (blocks as u32, threads),
                &input,
                &mut out,
                n,
                0,
            )
            .unwrap();
            for b in 0..blocks {
                let segment = &input[b * n as usize..(b + 1) * n as usize];
                assert_eq!(
                    out[3 * b..3 * b + 3],
                    block_reduce_expected(segment, threads as usize),
                    "{threads} threads, block {b}, seed {seed}"
                );
            }
        }
    }
}

/// Runs `selftest_racy_block_sum` (or the correct reduction) under `seeds` and counts the
/// blocks whose sum is wrong.
fn wrong_sums(kernel: &str, seeds: std::ops::Range<u64>) -> usize {
    let (blocks, threads, n) = (4usize, 256u32, 517i32);
    let input = integer_inputs(blocks * n as usize, 7);
    let mut wrong = 0;
    for seed in seeds {
        let stride = if kernel == "selftest_block_reduce" {
            3
        } else {
            1
        };
        let mut out = vec![f32::NAN; stride * blocks];
        run_1d_on(
            &unchecked_emulator(seed),
            kernel,
            (blocks as u32, threads),
            &input,
            &mut out,
            n,
            0,
        )
        .unwrap();
        for b in 0..blocks {
            let want: f32 = input[b * n as usize..(b + 1) * n as usize].iter().sum();
            if out[stride * b] != want {
                wrong += 1;
            }
        }
    }
    wrong
}

#[test]
fn a_missing_barrier_gives_wrong_sums() {
    assert_eq!(wrong_sums("selftest_block_reduce", 0..8), 0);
    let wrong = wrong_sums("selftest_racy_block_sum", 0..8);
    eprintln!("racy block sum: {wrong} of 32 block sums wrong over 8 seeds");
    assert!(wrong > 0, "the race went unnoticed under 8 seeds");
}

#[test]
fn a_seed_replays_its_schedule() {
    let (threads, n) = (256u32, 999i32);
    let input = integer_inputs(n as usize, 3);
    let results: Vec<Vec<u32>> = [5u64, 5, 6]
        .iter()
        .map(|&seed| {
            let mut out = vec![f32::NAN; 1];
            run_1d_on(
                &unchecked_emulator(seed),
                "selftest_racy_block_sum",
                (1, threads),
                &input,
                &mut out,
                n,
                0,
            )
            .unwrap();
            out.iter().map(|v| v.to_bits()).collect()
        })
        .collect();
    assert_eq!(results[0], results[1], "the same seed gave two results");
    let emu = emulator(40);
    assert_eq!(emu.next_seed(), 40);
    run(
        &emu,
        "selftest_coordinates",
        lin(1),
        lin(1),
        0,
        0,
        emu::buf_mut(&mut [0u32; 12]).addr,
        0,
        0,
    )
    .unwrap();
    assert_eq!(emu.next_seed(), 41, "each launch takes the next seed");
}

#[test]
fn warp_synchronous_code_needs_syncwarp() {
    let input = integer_inputs(32, 11);
    let want: f32 = input.iter().sum();
    let sum_with = |arg: i32, seed: u64| {
        let mut out = vec![f32::NAN];
        run_1d_on(
            &unchecked_emulator(seed),
            "selftest_warp_lockstep",
            (1, 32),
            &input,
            &mut out,
            32,
            arg,
        )
        .unwrap();
        out[0]
    };
    for seed in 0..4 {
        assert_eq!(sum_with(1, seed), want, "with __syncwarp, seed {seed}");
    }
    assert!(
        (0..4).any(|seed| sum_with(0, seed) != want),
        "lockstep assumption went unnoticed"
    );
}
