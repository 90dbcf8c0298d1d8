//! The sanitizer (`runtime/memcheck.cpp`, `runtime/shadow.cpp`): each check stops what it
//! must, names the access, and lets correct kernels through. The kernels are
//! `emu/runtime/selftest.cu`'s.

use ccpl_emu::{Checks, Emulator, Error};

use crate::common::{emulator, emulator_error, integer_inputs, run_1d_on};

/// `selftest_sanitizer` in mode `arg` on `blocks` blocks of 64 threads over `n` inputs, under
/// `checks`; returns the output.
fn sanitizer_run(arg: i32, blocks: u32, n: usize, checks: Checks) -> Result<Vec<f32>, Error> {
    let input = integer_inputs(n, 5);
    let mut out = vec![0.0f32; n.max(blocks as usize + 2)];
    let emu = emulator(9).with_checks(checks);
    run_1d_on(
        &emu,
        "selftest_sanitizer",
        (blocks, 64),
        &input,
        &mut out,
        n as i32,
        arg,
    )?;
    Ok(out)
}

/// `selftest_sanitizer`'s copy (mode 0) of 100 inputs into `out`, on 2 blocks of 64 threads.
fn copy_100(emu: &Emulator, input: &[f32], out: &mut [f32]) -> Result<(), Error> {
    run_1d_on(emu, "selftest_sanitizer", (2, 64), input, out, 100, 0)
}

#[test]
fn memcheck_stops_a_read_one_past_a_buffer() {
    sanitizer_run(0, 2, 100, Checks::ALL).expect("in bounds");
    let message = emulator_error(sanitizer_run(1, 1, 100, Checks::MEMCHECK).map(|_| ()));
    for part in [
        "selftest_sanitizer: memcheck: the 4-byte read at 0x",
        "by thread (0,0,0) of block (0,0,0)",
        "is outside every buffer the launch was given",
        "the nearest is the buffer of the pointer at byte 0 of the parameters",
        "400 bytes), 0 bytes past its end",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    assert!(
        message.contains("selftest.cu:"),
        "the access's source line: {message}"
    );
    // Without memcheck the read goes unnoticed (it lands in the allocator's padding).
    sanitizer_run(1, 1, 100, Checks::NONE).expect("unchecked");
}

#[test]
fn initcheck_stops_a_read_of_a_buffer_nothing_wrote_and_keeps_what_launches_wrote() {
    let emu = emulator(3).with_checks(Checks::INITCHECK);
    // The copy (mode 0) of an input marked unwritten reads it: an error, whatever it holds.
    let input = integer_inputs(100, 5);
    let mut copy = vec![f32::NAN; 100];
    ccpl_emu::mark_unwritten(&input);
    let result = copy_100(&emu, &input, &mut copy);
    let message = emulator_error(result);
    for part in [
        "selftest_sanitizer: initcheck: the 4-byte read at 0x",
        "of block (",
        "selftest.cu:",
        "of the buffer of the pointer at byte 0 of the parameters",
        "400 bytes), which nothing wrote since its allocation",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // Marked written (uploaded), it copies into an unwritten output, which a later launch may
    // then read: the copy's bytes stay written.
    ccpl_emu::mark_written(&input);
    ccpl_emu::mark_unwritten(&copy);
    copy_100(&emu, &input, &mut copy).expect("written");
    let mut again = vec![0.0f32; 100];
    copy_100(&emu, &copy, &mut again).expect("copied");
    assert_eq!(again, input);
    // An atomic reads the bytes it adds to (mode 3 adds into out[0]).
    let mut sum = vec![f32::NAN; 100];
    ccpl_emu::mark_unwritten(&sum);
    let result = run_1d_on(&emu, "selftest_sanitizer", (1, 64), &input, &mut sum, 64, 3);
    assert!(emulator_error(result).contains("the 4-byte atomic at 0x"));
    // Without initcheck the same launch runs (its NaN reaches the output, as it happens).
    run_1d_on(
        &emulator(3).with_checks(Checks::NONE),
        "selftest_sanitizer",
        (1, 64),
        &input,
        &mut sum,
        64,
        3,
    )
    .expect("unchecked");
}

/// A slice another thread marked unwritten is, to this thread, a new buffer: written. (Tests
/// run side by side, and the allocator hands a slice one of them marked, then freed, to another
/// at the same address and length: it must not be read as unwritten there.)
#[test]
fn initcheck_takes_a_slice_another_thread_marked_as_new() {
    let emu = emulator(3).with_checks(Checks::INITCHECK);
    let input = integer_inputs(100, 5);
    std::thread::scope(|s| {
        s.spawn(|| ccpl_emu::mark_unwritten(&input));
    });
    let mut copy = vec![f32::NAN; 100];
    let copied = copy_100(&emu, &input, &mut copy);
    copied.expect("a slice another thread marked");
    assert_eq!(copy, input);
    // Marked by this thread, the same slice is unwritten.
    ccpl_emu::mark_unwritten(&input);
    let result = copy_100(&emu, &input, &mut copy);
    assert!(emulator_error(result).contains("which nothing wrote since its allocation"));
    ccpl_emu::mark_written(&input);
}

#[test]
fn racecheck_stops_a_scatter_without_its_atomic() {
    let want: f32 = integer_inputs(200, 5).iter().sum();
    let out = sanitizer_run(3, 4, 200, Checks::ALL).expect("atomic");
    assert_eq!(out[0], want);
    // Threads run whole between switches, so the plain sum is right, and only racecheck sees it.
    let out = sanitizer_run(2, 4, 200, Checks::NONE).expect("unchecked");
    assert_eq!(out[0], want);
    let message = emulator_error(sanitizer_run(2, 4, 200, Checks::RACECHECK).map(|_| ()));
    assert!(
        message.contains("racecheck: read-after-write hazard on global memory"),
        "{message}"
    );
    assert!(
        message.contains("is not ordered after the write by thread"),
        "{message}"
    );
}

#[test]
fn racecheck_models_the_last_block_with_and_without_its_fence() {
    let input = integer_inputs(6, 5);
    let out = sanitizer_run(4, 6, 6, Checks::ALL).expect("fenced");
    assert_eq!(out[0], input.iter().sum::<f32>());
    let message = emulator_error(sanitizer_run(5, 6, 6, Checks::RACECHECK).map(|_| ()));
    assert!(
        message.contains("racecheck: read-after-write hazard on global memory"),
        "{message}"
    );
    assert!(
        message.contains("of block (5,0,0)"),
        "the last block reads: {message}"
    );
}

#[test]
fn racecheck_stops_a_missing_barrier_and_a_missing_syncwarp() {
    let input = integer_inputs(4 * 517, 7);
    let mut out = vec![0.0f32; 3 * 4];
    let racecheck = emulator(0).with_checks(Checks::RACECHECK);
    for (kernel, threads, n) in [
        ("selftest_racy_block_sum", 256, 517),
        ("selftest_warp_lockstep", 32, 32),
    ] {
        let result = run_1d_on(&racecheck, kernel, (1, threads), &input, &mut out, n, 0);
        let message = emulator_error(result);
        assert!(message.contains("hazard on shared memory"), "{message}");
    }
    // Its reads of scratch before any write are initcheck's, too.
    let all = emulator(0).with_checks(Checks::ALL);
    let result = run_1d_on(
        &all,
        "selftest_racy_block_sum",
        (1, 256),
        &input,
        &mut out,
        517,
        0,
    );
    assert!(emulator_error(result).contains("initcheck"));
    run_1d_on(
        &all,
        "selftest_warp_lockstep",
        (1, 32),
        &input,
        &mut out,
        32,
        1,
    )
    .expect("__syncwarp");
    run_1d_on(
        &all,
        "selftest_block_reduce",
        (4, 256),
        &input,
        &mut out,
        517,
        0,
    )
    .expect("barriers");
}

#[test]
fn checks_come_from_the_environment_by_name() {
    assert!(Checks::ALL.contains(Checks::RACECHECK));
    assert_eq!(
        Checks::DEFAULT,
        Checks::NONE,
        "the checks cost: CCPL_EMU_SANITIZE turns them on"
    );
    assert_eq!(
        Checks::ALL
            .without(Checks::RACECHECK)
            .with(Checks::RACECHECK),
        Checks::ALL
    );
}
