//! What the emulator's tests share: an emulator, a launch of a self-test kernel
//! (`emu/runtime/selftest.cu`), exact inputs, and the tensor-core vectors.

pub mod hmma_vectors;

use ccpl::launch::{LaunchPlan, Launcher};
use ccpl_emu::{
    self as emu, Checks, Emulator, Error, selftest::ccpl_emu_selftest_params as Params,
};
use ccpl_testkit::Rng;

pub fn emulator(seed: u64) -> Emulator {
    // SAFETY: every plan the tests launch addresses vectors that outlive its launch, at the lengths the
    // self-test kernels use (each test sizes them from the same grid and block).
    unsafe { Emulator::new(seed) }
}

/// Launches a self-test kernel with a 1-D or 3-D grid and block.
#[allow(clippy::too_many_arguments)]
pub fn run(
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
pub const SELFTEST_STATIC_SHARED: u32 = 4096;

pub fn lin(x: u32) -> (u32, u32, u32) {
    (x, 1, 1)
}

pub fn emulator_error(result: Result<(), Error>) -> String {
    match result {
        Err(Error::Launch(message)) => message,
        other => panic!("expected Error::Launch, got {other:?}"),
    }
}

/// Integer-valued inputs, so that float sums are exact in any order.
pub fn integer_inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.int(-8, 8) as f32).collect()
}

/// The expectation of `selftest_block_reduce` for one block's segment.
pub fn block_reduce_expected(segment: &[f32], threads: usize) -> [f32; 3] {
    let partials: Vec<f32> = (0..threads)
        .map(|t| segment.iter().skip(t).step_by(threads).sum())
        .collect();
    let sum: f32 = partials.iter().sum();
    let max = partials.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    [sum, max, 2.0 * sum]
}

/// Launches a self-test kernel on a fresh emulator scheduled by `seed`: a 1-D grid of
/// `blocks` blocks of `threads`, no dynamic shared memory, reading `input` and writing `out`.
pub fn run_1d<I, O>(
    seed: u64,
    kernel: &str,
    shape: (u32, u32),
    input: &[I],
    out: &mut [O],
    n: i32,
    arg: i32,
) -> Result<(), Error> {
    run_1d_on(&emulator(seed), kernel, shape, input, out, n, arg)
}

/// An emulator without the sanitizer, for the self-tests that observe what it would stop: a
/// race's wrong result, shared memory's NaN before it is written.
pub fn unchecked_emulator(seed: u64) -> Emulator {
    emulator(seed).with_checks(Checks::NONE)
}

/// [`run_1d`] on `emu`.
pub fn run_1d_on<I, O>(
    emu: &Emulator,
    kernel: &str,
    (blocks, threads): (u32, u32),
    input: &[I],
    out: &mut [O],
    n: i32,
    arg: i32,
) -> Result<(), Error> {
    let (input, out) = (emu::buf(input).addr, emu::buf_mut(out).addr);
    run(
        emu,
        kernel,
        lin(blocks),
        lin(threads),
        0,
        input,
        out,
        n,
        arg,
    )
}
