//! The emulator's warp collectives: shuffles read the lanes CUDA defines, in every width, and
//! votes and counting barriers.

use ccpl_testkit::Rng;

use crate::common::run_1d;

/// The lane a shuffle reads, from CUDA's definitions (own lane when out of the segment).
fn shuffle_source(j: usize, lane: usize, arg: usize) -> usize {
    let (width, kind) = match j {
        0 => (32, 0),
        1 => (32, 1),
        2 => (32, 2),
        3 => (32, 3),
        4 => (8, 0),
        5 => (16, 1),
        6 => (4, 2),
        _ => (8, 3),
    };
    let segment = lane / width * width;
    match kind {
        0 => segment + arg % width,
        1 if lane % width >= arg => lane - arg,
        2 if lane % width + arg < width => lane + arg,
        3 if (lane ^ arg) < segment + width => lane ^ arg,
        _ => lane,
    }
}

#[test]
fn shuffles_read_the_lanes_cuda_defines() {
    let threads = 64usize;
    let mut rng = Rng::new(5);
    let input: Vec<i32> = (0..2 * threads)
        .map(|_| rng.int(-1000, 1000) as i32)
        .collect();
    for arg in [0usize, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31] {
        let mut out = vec![i32::MIN; 8 * 2 * threads];
        run_1d(
            arg as u64,
            "selftest_shuffles",
            (2, threads as u32),
            &input,
            &mut out,
            0,
            arg as i32,
        )
        .unwrap();
        for t in 0..2 * threads {
            let warp_base = t / 32 * 32;
            for j in 0..8 {
                let want = input[warp_base + shuffle_source(j, t % 32, arg)];
                assert_eq!(out[8 * t + j], want, "thread {t}, shuffle {j}, arg {arg}");
            }
        }
    }
}

#[test]
fn shuffles_move_eight_byte_values() {
    let threads = 64usize;
    let input: Vec<i32> = (0..threads as i32).map(|i| i * 37 - 900).collect();
    for arg in [1usize, 6, 31] {
        let mut out = vec![0u64; 2 * threads];
        run_1d(
            9,
            "selftest_shuffle_wide",
            (1, threads as u32),
            &input,
            &mut out,
            0,
            arg as i32,
        )
        .unwrap();
        for t in 0..threads {
            let v = input[t / 32 * 32 + ((t % 32) ^ arg)];
            assert_eq!(f64::from_bits(out[2 * t]), v as f64 * 0.25 + 1e10);
            assert_eq!(out[2 * t + 1] as i64, (v as i64) << 33 | 5);
        }
    }
}

#[test]
fn votes_and_counting_barriers() {
    let threads = 96usize;
    for (seed, density) in [(1u64, 2i64), (2, 10), (3, 0), (4, 1)] {
        let mut rng = Rng::new(seed);
        // density 0: all false; 1: all true; else about 1 in density true.
        let input: Vec<i32> = (0..threads)
            .map(|_| match density {
                0 => 0,
                1 => 1,
                d => (rng.int(0, d - 1) == 0) as i32,
            })
            .collect();
        let mut out = vec![i32::MIN; 8 * threads];
        run_1d(
            seed,
            "selftest_votes",
            (1, threads as u32),
            &input,
            &mut out,
            0,
            0,
        )
        .unwrap();
        let count = input.iter().filter(|&&p| p != 0).count() as i32;
        for t in 0..threads {
            let warp = &input[t / 32 * 32..t / 32 * 32 + 32];
            let ballot = (0..32)
                .filter(|&l| warp[l] != 0)
                .fold(0u32, |b, l| b | 1 << l);
            let even = ballot & 0x5555_5555;
            let want = [
                ballot as i32,
                (ballot != 0) as i32,
                (ballot == u32::MAX) as i32,
                if t % 2 == 0 { even as i32 } else { -1 },
                count,
                (count == threads as i32) as i32,
                (count > 0) as i32,
                ballot.count_ones() as i32,
            ];
            assert_eq!(out[8 * t..8 * t + 8], want, "thread {t}, seed {seed}");
        }
    }
}
