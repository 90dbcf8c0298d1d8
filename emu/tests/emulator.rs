//! The CPU emulator itself: thread coordinates, barriers, every warp collective, atomics,
//! shared memory, the seeded scheduler catching races, the misuses it must report, and a real
//! kernel family run through its launch plan. The kernels are `emu/runtime/selftest.cu`.

#[path = "common/hmma_vectors.rs"]
mod hmma_vectors;

use std::time::Instant;

use ccpl::launch::{CentersBuf, LaunchPlan, Launcher, neighbor};
use ccpl::{Centers, Dtype, FeatureShape, Layout};
use ccpl_emu::Error;
use ccpl_emu::{self as emu, Emulator, selftest::ccpl_emu_selftest_params as Params};
use half::{bf16, f16};

/// SplitMix64: deterministic test inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// An integer in `lo..=hi`.
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

fn emulator(seed: u64) -> Emulator {
    // SAFETY: every plan below addresses vectors that outlive its launch, at the lengths the
    // self-test kernels use (each test sizes them from the same grid and block).
    unsafe { Emulator::new(seed) }
}

/// Launches a self-test kernel with a 1-D or 3-D grid and block.
#[allow(clippy::too_many_arguments)]
fn run(
    emu: &Emulator,
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    input: u64,
    output: u64,
    n: i32,
    arg: i32,
) -> Result<(), Error> {
    let plan = LaunchPlan {
        kernel: kernel.into(),
        grid,
        block,
        shared_bytes: 0,
        shared_opt_in: false,
        params: Params {
            in_: input,
            out: output,
            n,
            arg,
        },
    };
    emu.launch(&plan.with_dynamic_shared(SELFTEST_STATIC_SHARED, shared_bytes))
}

/// An upper bound of the static shared memory of any self-test kernel but
/// `selftest_large_static` (selftest.cu), for their plans' opt-in.
const SELFTEST_STATIC_SHARED: u32 = 4096;

fn lin(x: u32) -> (u32, u32, u32) {
    (x, 1, 1)
}

fn emulator_error(result: Result<(), Error>) -> String {
    match result {
        Err(Error::Launch(message)) => message,
        other => panic!("expected Error::Launch, got {other:?}"),
    }
}

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

/// Integer-valued inputs, so that float sums are exact in any order.
fn integer_inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..len).map(|_| rng.int(-8, 8) as f32).collect()
}

/// The expectation of `selftest_block_reduce` for one block's segment.
fn block_reduce_expected(segment: &[f32], threads: usize) -> [f32; 3] {
    let partials: Vec<f32> = (0..threads)
        .map(|t| segment.iter().skip(t).step_by(threads).sum())
        .collect();
    let sum: f32 = partials.iter().sum();
    let max = partials.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    [sum, max, 2.0 * sum]
}

#[test]
fn block_reductions_are_exact_for_every_block_size_and_seed() {
    for (threads, n) in [(32u32, 37i32), (96, 1001), (256, 999), (1024, 3001)] {
        let blocks = 3;
        let input = integer_inputs(blocks * n as usize, threads as u64);
        for seed in 0..4 {
            let mut out = vec![f32::NAN; 3 * blocks];
            run(
                &emulator(seed),
                "selftest_block_reduce",
                lin(blocks as u32),
                lin(threads),
                0,
                emu::buf(&input).addr,
                emu::buf_mut(&mut out).addr,
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
        run(
            &emulator(seed),
            kernel,
            lin(blocks as u32),
            lin(threads),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
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
            run(
                &emulator(seed),
                "selftest_racy_block_sum",
                lin(1),
                lin(threads),
                0,
                emu::buf(&input).addr,
                emu::buf_mut(&mut out).addr,
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
        run(
            &emulator(seed),
            "selftest_warp_lockstep",
            lin(1),
            lin(32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
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
    let mut rng = Rng(5);
    let input: Vec<i32> = (0..2 * threads)
        .map(|_| rng.int(-1000, 1000) as i32)
        .collect();
    for arg in [0usize, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31] {
        let mut out = vec![i32::MIN; 8 * 2 * threads];
        run(
            &emulator(arg as u64),
            "selftest_shuffles",
            lin(2),
            lin(threads as u32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
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
        run(
            &emulator(9),
            "selftest_shuffle_wide",
            lin(1),
            lin(threads as u32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
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
        let mut rng = Rng(seed);
        // density 0: all false; 1: all true; else about 1 in density true.
        let input: Vec<i32> = (0..threads)
            .map(|_| match density {
                0 => 0,
                1 => 1,
                d => (rng.int(0, d - 1) == 0) as i32,
            })
            .collect();
        let mut out = vec![i32::MIN; 8 * threads];
        run(
            &emulator(seed),
            "selftest_votes",
            lin(1),
            lin(threads as u32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
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

#[test]
fn atomics_of_every_type() {
    let (blocks, threads) = (2u32, 96u32);
    let total = blocks * threads;
    let mut slots = [0u64; 8];
    slots[5] = i32::MIN as u32 as u64;
    slots[6] = u32::MAX as u64;
    run(
        &emulator(3),
        "selftest_atomics",
        lin(blocks),
        lin(threads),
        0,
        0,
        emu::buf_mut(&mut slots).addr,
        0,
        0,
    )
    .unwrap();
    assert_eq!(slots[0] as u32, total, "int");
    assert_eq!(f32::from_bits(slots[1] as u32), total as f32, "float");
    assert_eq!(f64::from_bits(slots[2]), total as f64, "double");
    assert_eq!(
        f16::from_bits(slots[3] as u16),
        f16::from_f32(total as f32),
        "__half"
    );
    assert_eq!(
        bf16::from_bits(slots[4] as u16),
        bf16::from_f32(total as f32),
        "__nv_bfloat16"
    );
    assert_eq!(slots[5] as u32, total - 1, "atomicMax");
    assert_eq!(slots[6] as u32, 0, "atomicMin");
    assert_eq!(slots[7] as u32, total, "atomicCAS loop");
}

/// Runs `selftest_shared`; returns the flags and values it wrote.
fn shared_run(
    blocks: u32,
    threads: u32,
    shared_bytes: u32,
    overrun: bool,
    seed: u64,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let input = integer_inputs((blocks * threads) as usize, 17);
    let mut out = vec![f32::NAN; 5 * (blocks * threads) as usize];
    run(
        &emulator(seed),
        "selftest_shared",
        lin(blocks),
        lin(threads),
        shared_bytes,
        emu::buf(&input).addr,
        emu::buf_mut(&mut out).addr,
        shared_bytes as i32,
        overrun as i32,
    )?;
    Ok((input, out))
}

#[test]
fn shared_memory_is_nan_in_every_block() {
    // 63 KiB: over the 48 KiB without opt-in, within every architecture's maximum.
    for (blocks, threads, shared_bytes) in [(3u32, 64u32, 64 * 4 + 13), (2, 1024, 63 * 1024)] {
        let (input, out) = shared_run(blocks, threads, shared_bytes, false, 2).unwrap();
        for b in 0..blocks as usize {
            for t in 0..threads as usize {
                let g = b * threads as usize + t;
                let flags = &out[5 * g..5 * g + 4];
                assert_eq!(
                    flags, [1.0; 4],
                    "block {b}, thread {t}: [dynamic, 2-D, declarators, namespace/inline]"
                );
                let next = b * threads as usize + (t + 1) % threads as usize;
                assert_eq!(out[5 * g + 4], input[next], "block {b}, thread {t}");
            }
        }
    }
    let message = emulator_error(shared_run(2, 64, 300, true, 2).map(|_| ()));
    assert!(message.contains("wrote past the end"), "{message}");
}

#[test]
fn half_conversions_round_to_nearest_even_like_cuda() {
    let mut rng = Rng(99);
    let mut input: Vec<f32> = (0..200_000)
        .map(|_| f32::from_bits(rng.next() as u32))
        .collect();
    // Ties, overflow, subnormals, signed zeros and infinities of both formats.
    input.extend([
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        5.960_464_5e-8,
        2.980_232_2e-8,
        2.980_233e-8,
        6.103_515_6e-5,
        1.0 + 1.0 / 256.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        f32::NAN,
        -f32::NAN,
    ]);
    let n = input.len();
    let mut out = vec![0u32; 4 * n];
    run(
        &emulator(0),
        "selftest_conversions",
        lin(n.div_ceil(256) as u32),
        lin(256),
        0,
        emu::buf(&input).addr,
        emu::buf_mut(&mut out).addr,
        n as i32,
        0,
    )
    .unwrap();
    for (i, &x) in input.iter().enumerate() {
        let (h, b) = (out[4 * i] as u16, out[4 * i + 1] as u16);
        if x.is_nan() {
            assert_eq!((h, b), (0x7fff, 0x7fff), "NaN {:#x}", x.to_bits());
            assert!(
                f32::from_bits(out[4 * i + 2]).is_nan() && f32::from_bits(out[4 * i + 3]).is_nan()
            );
            continue;
        }
        assert_eq!(
            h,
            f16::from_f32(x).to_bits(),
            "half of {x:e} ({:#x})",
            x.to_bits()
        );
        assert_eq!(
            b,
            bf16::from_f32(x).to_bits(),
            "bfloat16 of {x:e} ({:#x})",
            x.to_bits()
        );
        assert_eq!(
            out[4 * i + 2],
            f16::from_bits(h).to_f32().to_bits(),
            "half {h:#x} to float"
        );
        assert_eq!(
            out[4 * i + 3],
            bf16::from_bits(b).to_f32().to_bits(),
            "bfloat16 {b:#x} to float"
        );
    }
}

#[test]
fn misuse_is_an_error_not_a_hang() {
    let cases = [
        (0, "divergent __syncthreads"),
        (1, "exited"),
        (2, "deadlock"),
        (3, "leaves out the calling lane"),
        (4, "not in the mask"),
        (5, "__trap()"),
        (6, "exited"),
        (7, "exited"),
    ];
    for (arg, expected) in cases {
        for seed in 0..3 {
            let mut out = vec![0i32; 64];
            let result = run(
                &emulator(seed),
                "selftest_misuse",
                lin(1),
                lin(64),
                0,
                0,
                emu::buf_mut(&mut out).addr,
                0,
                arg,
            );
            let message = emulator_error(result);
            assert!(message.contains(expected), "case {arg}: {message}");
            assert!(
                message.contains("selftest_misuse") && message.contains("seed"),
                "{message}"
            );
        }
    }
    // A full mask in a partial warp (48 threads) names lanes that do not exist.
    let input = vec![1.0f32; 48];
    let mut out = vec![0.0f32; 3];
    let result = run(
        &emulator(0),
        "selftest_block_reduce",
        lin(1),
        lin(48),
        0,
        emu::buf(&input).addr,
        emu::buf_mut(&mut out).addr,
        48,
        0,
    );
    let message = emulator_error(result);
    assert!(message.contains("do not exist"), "{message}");
}

/// The portable WMMA: A B + C of 16x16 matrices of small integers (exact in both 16-bit types
/// and in every float sum), in __half and __nv_bfloat16, through row- and column-major loads
/// and stores.
#[test]
fn wmma_multiplies_exactly() {
    let mut rng = 0x1234_5678u64;
    let mut next = || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        ((rng >> 33) % 17) as f32 - 8.0
    };
    let input: Vec<f32> = (0..768).map(|_| next()).collect();
    let (a, b, c) = (&input[..256], &input[256..512], &input[512..]);
    let want: Vec<f32> = (0..256)
        .map(|i| {
            let (m, n) = (i / 16, i % 16);
            c[i] + (0..16).map(|k| a[m * 16 + k] * b[k * 16 + n]).sum::<f32>()
        })
        .collect();
    for arg in [0, 1] {
        let mut out = vec![f32::NAN; 256];
        run(
            &emulator(arg as u64),
            "selftest_wmma",
            lin(1),
            lin(32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
            256,
            arg,
        )
        .unwrap();
        assert_eq!(
            out,
            want,
            "wmma in {}",
            ["__half", "__nv_bfloat16"][arg as usize]
        );
    }
}

/// Shared memory a block may have with the opt-in on the modelled architecture (CUDA C++
/// Programming Guide, compute capabilities).
fn shared_max() -> u32 {
    1024 * match emu::ARCH {
        75 => 64,
        80 => 163,
        86 | 89 => 99,
        _ => 227,
    }
}

/// The 48 KiB a block may use without opting in count static and dynamic shared memory
/// together, and the plan's opt-in (`LaunchPlan::with_dynamic_shared`) lifts them to the
/// architecture's maximum; a kernel may not declare over 48 KiB of static shared memory.
#[test]
fn shared_memory_over_48_kib_needs_the_opt_in() {
    let mut out = vec![f32::NAN; 5 * 64];
    let input = integer_inputs(64, 3);
    let mut launch = |dynamic: u32, opt_in: Option<bool>| {
        let plan = LaunchPlan {
            kernel: "selftest_shared".into(),
            grid: lin(1),
            block: lin(64),
            shared_bytes: 0,
            shared_opt_in: false,
            params: Params {
                in_: emu::buf(&input).addr,
                out: emu::buf_mut(&mut out).addr,
                n: dynamic as i32,
                arg: 0,
            },
        };
        let mut plan = plan.with_dynamic_shared(SELFTEST_STATIC_SHARED, dynamic);
        if let Some(forced) = opt_in {
            plan.shared_opt_in = forced;
        }
        emulator(7).launch(&plan)
    };
    launch(40 * 1024, None).unwrap();
    // 48 KiB of dynamic and the kernel's static shared memory: over the limit without opt-in.
    let message = emulator_error(launch(48 * 1024, Some(false)));
    assert!(message.contains("without opting in"), "{message}");
    launch(48 * 1024, None).expect("the plan opts in");
    launch(shared_max() - SELFTEST_STATIC_SHARED, None).unwrap();
    let message = emulator_error(launch(shared_max() - 16, None));
    assert!(message.contains("a block may have on sm_"), "{message}");

    let message = emulator_error(run(
        &emulator(0),
        "selftest_large_static",
        lin(1),
        lin(32),
        0,
        0,
        emu::buf_mut(&mut out).addr,
        0,
        0,
    ));
    assert!(message.contains("static shared memory"), "{message}");
}

/// WMMA operands not aligned as CUDA requires, and a misaligned float access, end the launch
/// with an error naming the rule; a tile declared without __align__(32) is one of them.
#[test]
fn misaligned_accesses_are_errors() {
    let mut out = vec![f32::NAN; 32];
    let launch = |arg: i32, out: &mut Vec<f32>| {
        run(
            &emulator(arg as u64),
            "selftest_misaligned",
            lin(1),
            lin(32),
            0,
            0,
            emu::buf_mut(out).addr,
            0,
            arg,
        )
    };
    for (arg, expected) in [
        (0, "is not 32-byte (256-bit) aligned"),
        (1, "is not a multiple of 16 bytes"),
        (2, "misaligned access"),
        (3, "is not 32-byte (256-bit) aligned"),
    ] {
        let message = emulator_error(launch(arg, &mut out));
        assert!(message.contains(expected), "case {arg}: {message}");
        assert!(
            message.contains("selftest.cu:"),
            "case {arg} names the line: {message}"
        );
    }
    launch(4, &mut out).unwrap();
}

/// The tensor-core model (runtime/hmma.h) on the vectors that tell the architectures apart:
/// extra alignment bits, the final rounding toward zero, the block size and order, the
/// unnormalised product exponent, truncation in sign-magnitude, a bf16 subnormal result.
#[test]
fn hmma_model_gives_each_architectures_bits() {
    for v in hmma_vectors::vectors() {
        let (a, b) = v.factors();
        for arch in [75, 80, 86, 89, 90, 100] {
            let got = emu::hmma_dot(arch, v.bf16, v.c, &a, &b);
            assert_eq!(
                Some(got),
                v.expected_on(arch),
                "{} on sm_{arch}: {got:e}",
                v.name
            );
        }
    }
}

/// The emulator's mma_sync adds as the modelled architecture's tensor cores do: every element
/// of a product of random inputs of mixed magnitudes equals the model's, bit for bit, and
/// differs from float fmaf somewhere (which a test of the model would otherwise not notice).
#[test]
fn wmma_adds_as_the_tensor_cores_of_the_modelled_architecture() {
    let mut rng = 0x9e37_79b9u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1442695040888963407);
        let unit = (rng >> 11) as f64 / (1u64 << 53) as f64;
        let magnitude = 2f64.powi((rng % 9) as i32 - 4);
        ((unit - 0.5) * magnitude) as f32
    };
    let input: Vec<f32> = (0..768).map(|_| next()).collect();
    for (arg, bf16) in [(0, false), (1, true)] {
        let exact = |x: f32| {
            if bf16 {
                half::bf16::from_f32(x).to_f64()
            } else {
                half::f16::from_f32(x).to_f64()
            }
        };
        let mut out = vec![f32::NAN; 256];
        run(
            &emulator(arg as u64),
            "selftest_wmma",
            lin(1),
            lin(32),
            0,
            emu::buf(&input).addr,
            emu::buf_mut(&mut out).addr,
            256,
            arg,
        )
        .unwrap();
        let mut differs_from_fmaf = 0;
        for i in 0..256 {
            let (m, n) = (i / 16, i % 16);
            let a: Vec<f64> = (0..16).map(|k| exact(input[m * 16 + k])).collect();
            let b: Vec<f64> = (0..16).map(|k| exact(input[256 + k * 16 + n])).collect();
            let c = input[512 + i];
            let want = emu::hmma_dot(emu::ARCH, bf16, c, &a, &b);
            assert_eq!(
                out[i].to_bits(),
                want.to_bits(),
                "element {i} ({})",
                ["f16", "bf16"][arg as usize]
            );
            let fmaf = (0..16).fold(c, |acc, k| (a[k] as f32).mul_add(b[k] as f32, acc));
            differs_from_fmaf += usize::from(fmaf != want);
        }
        assert!(
            differs_from_fmaf > 0,
            "the model never differs from fmaf on these inputs"
        );
    }
}

#[test]
fn bad_launches_are_rejected() {
    let mut out = vec![0u32; 12];
    let addr = emu::buf_mut(&mut out).addr;
    let emu = emulator(0);
    for (grid, block, shared, expected) in [
        ((0, 1, 1), (1, 1, 1), 0, "is 0"),
        ((1, 1, 1), (1025, 1, 1), 0, "exceeds the limits"),
        ((1, 1, 1), (32, 32, 2), 0, "exceeds the limits"),
        ((1, 1, 1), (1, 1, 65), 0, "exceeds the limits"),
        ((1, 65536, 1), (1, 1, 1), 0, "exceeds the limits"),
        (
            (1, 1, 1),
            (1, 1, 1),
            shared_max() + 1,
            "a block may have on sm_",
        ),
    ] {
        let message = emulator_error(run(
            &emu,
            "selftest_coordinates",
            grid,
            block,
            shared,
            0,
            addr,
            0,
            0,
        ));
        assert!(
            message.contains(expected),
            "{grid:?} {block:?} {shared}: {message}"
        );
    }
    let message = emulator_error(run(
        &emu,
        "no_such_kernel",
        lin(1),
        lin(1),
        0,
        0,
        addr,
        0,
        0,
    ));
    assert!(
        message.contains("no kernel named no_such_kernel"),
        "{message}"
    );
    // The parameter struct of another kernel: its size is checked.
    let plan = LaunchPlan {
        kernel: "selftest_coordinates".into(),
        grid: lin(1),
        block: lin(1),
        shared_bytes: 0,
        shared_opt_in: false,
        params: ccpl::ffi::ccpl_neighbor_diff_params::default(),
    };
    let message = emulator_error(emu.launch(&plan));
    assert!(message.contains("parameter struct"), "{message}");
}

/// `kernels/*.cu` files and `common.cuh` with text from `needle`.
fn kernel_files_containing(needle: &str) -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|text| text.contains(needle)))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

#[test]
fn gpu_only_paths_are_listed() {
    let mut listed: Vec<String> = emu::GPU_ONLY_PATHS
        .iter()
        .map(|(file, _)| file.to_string())
        .collect();
    listed.sort();
    listed.dedup();
    assert_eq!(
        kernel_files_containing("CCPL_EMULATOR"),
        listed,
        "update ccpl::emu::GPU_ONLY_PATHS"
    );
    for (file, what) in emu::GPU_ONLY_PATHS {
        eprintln!("checked on a GPU only: {file}: {what}");
    }
    if emu::GPU_ONLY_PATHS.is_empty() {
        eprintln!("no GPU-only kernel paths: the emulator runs every kernel whole");
    }
}

#[test]
fn the_emulator_has_every_kernel_the_gpu_image_has() {
    let emulated: Vec<&str> = emu::kernel_names();
    for family in ["neighbor_diff"] {
        for suffix in ["f32", "f16", "bf16"] {
            let name = format!("{family}_{suffix}");
            assert!(
                emulated.contains(&name.as_str()),
                "{name} is not in the emulator"
            );
        }
    }
    if ccpl::ffi::NOT_BUILT.is_some() {
        eprintln!("SKIPPED comparison with the GPU images: kernels not built");
        return;
    }
    let mut gpu: Vec<&str> = ccpl::ffi::IMAGES
        .iter()
        .flat_map(|i| ccpl::cuda::entry_points(i.ptx))
        .collect();
    let mut cpu: Vec<&str> = emulated
        .into_iter()
        .filter(|n| !n.starts_with("selftest_"))
        .collect();
    gpu.sort();
    cpu.sort();
    assert_eq!(cpu, gpu);
}

/// `neighbor_diff` through its launch plan, exactly as the kernel must compute it: the
/// difference in f32 of the two stored values, stored in T.
fn check_neighbor_diff<T: Dtype>(layout: Layout) {
    let shape = FeatureShape::new(2, 5, 7, 9, layout).unwrap();
    let centers = Centers::sample(7, 9, 11, 3).unwrap();
    let mut rng = Rng(21);
    let feat: Vec<T> = (0..shape.len())
        .map(|_| T::from_f64(rng.int(-1000, 1000) as f64 / 37.0))
        .collect();
    let map = centers.center_map();
    let buf = CentersBuf {
        height: 7,
        width: 9,
        flat: emu::buf(centers.flat()),
        map: emu::buf(&map),
    };
    let n = centers.len();
    let mut rows = vec![T::from_f64(f64::NAN); neighbor::rows_len(&shape, n).unwrap()];
    let plan = neighbor::neighbor_diff::<T>(&shape, &buf, emu::buf(&feat), emu::buf_mut(&mut rows))
        .unwrap();
    emulator(4).launch(&plan).unwrap();
    for b in 0..2 {
        for k in 0..8 {
            let (dh, dw) = ccpl::ffi::neighbor_delta(k);
            for (x, &p) in centers.flat().iter().enumerate() {
                let (h, w) = (p as usize / 9, p as usize % 9);
                let (nh, nw) = ((h as isize + dh) as usize, (w as isize + dw) as usize);
                for c in 0..5 {
                    let centre = feat[shape.index(b, c, h, w).unwrap()].to_f64() as f32;
                    let neighbour = feat[shape.index(b, c, nh, nw).unwrap()].to_f64() as f32;
                    let want = T::from_f64((centre - neighbour) as f64);
                    let got = rows[((b * 8 + k) * n + x) * 5 + c];
                    assert_eq!(
                        got.to_f64().to_bits(),
                        want.to_f64().to_bits(),
                        "{} b{b} k{k} x{x} c{c}",
                        T::SUFFIX
                    );
                }
            }
        }
    }
}

#[test]
fn neighbor_diff_runs_through_its_launch_plan() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        check_neighbor_diff::<f32>(layout);
        check_neighbor_diff::<f16>(layout);
        check_neighbor_diff::<bf16>(layout);
    }
}

#[test]
fn a_large_launch_is_right_and_its_speed_is_reported() {
    let (blocks, threads, n) = (64usize, 256u32, 4099i32);
    let input = integer_inputs(blocks * n as usize, 1);
    let mut out = vec![f32::NAN; 3 * blocks];
    let start = Instant::now();
    run(
        &emulator(0),
        "selftest_block_reduce",
        lin(blocks as u32),
        lin(threads),
        0,
        emu::buf(&input).addr,
        emu::buf_mut(&mut out).addr,
        n,
        0,
    )
    .unwrap();
    let elapsed = start.elapsed();
    for b in 0..blocks {
        let segment = &input[b * n as usize..(b + 1) * n as usize];
        assert_eq!(
            out[3 * b..3 * b + 3],
            block_reduce_expected(segment, threads as usize)
        );
    }
    // Per thread: 3 reductions of 2 barriers and 10 shuffles each.
    let switches = blocks as f64 * threads as f64 * 36.0;
    eprintln!(
        "{blocks} blocks x {threads} threads, 3 block reductions: {elapsed:?} ({:.0} ns per synchronisation)",
        elapsed.as_nanos() as f64 / switches
    );
}
