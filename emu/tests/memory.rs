//! The emulator's memory: atomics of every type, and shared memory, NaN-filled in every block.

use ccpl_emu as emu;
use ccpl_emu::{Checks, Error};
use half::{bf16, f16};

use crate::common::{emulator, emulator_error, integer_inputs, lin, run};

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
    checks: Checks,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let input = integer_inputs((blocks * threads) as usize, 17);
    let mut out = vec![f32::NAN; 5 * (blocks * threads) as usize];
    run(
        &emulator(2).with_checks(checks),
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
        // The kernel reads shared memory before writing it, to see the NaN: all initcheck stops.
        let (input, out) =
            shared_run(blocks, threads, shared_bytes, false, Checks::MEMCHECK).unwrap();
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
    let message = emulator_error(shared_run(3, 64, 300, false, Checks::INITCHECK).map(|_| ()));
    assert!(
        message.contains("initcheck: the 4-byte read of shared memory"),
        "{message}"
    );
    assert!(
        message.contains("which no thread of the block wrote"),
        "{message}"
    );
    // An overrun of dynamic shared memory: memcheck stops the write, else the red zone shows it.
    let message = emulator_error(shared_run(2, 64, 300, true, Checks::MEMCHECK).map(|_| ()));
    assert!(
        message.contains("memcheck: the 1-byte write")
            && message.contains("ends past the 300 bytes of shared memory"),
        "{message}"
    );
    let message = emulator_error(shared_run(2, 64, 300, true, Checks::NONE).map(|_| ()));
    assert!(message.contains("wrote past the end"), "{message}");
}
