//! What the emulator must refuse: misuse that would hang or corrupt a GPU (an error, not a hang),
//! shared memory over 48 KiB without the opt-in, misaligned accesses, bad launches.

use ccpl::launch::{LaunchPlan, Launcher};
use ccpl_emu::{self as emu, selftest::ccpl_emu_selftest_params as Params};

use crate::common::{
    SELFTEST_STATIC_SHARED, emulator, emulator_error, integer_inputs, lin, run, run_1d,
    unchecked_emulator,
};

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
    let result = run_1d(0, "selftest_block_reduce", (1, 48), &input, &mut out, 48, 0);
    let message = emulator_error(result);
    assert!(message.contains("do not exist"), "{message}");
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
        // The kernel reads its shared memory unwritten, on purpose (memory.rs).
        unchecked_emulator(7).launch(&plan)
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
