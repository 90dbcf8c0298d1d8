//! The emulator's tests, one binary: the emulator itself (its threads and scheduler, warp
//! collectives, memory, arithmetic, the misuse it must report, the sanitizer's checks, the crate's kernels run through
//! their launch plans), and its tensor-core model against a GPU's (`hmma_hardware`, which says
//! SKIPPED without one).

mod collectives;
mod common;
mod hmma_hardware;
mod kernels;
mod memory;
mod misuse;
mod numerics;
mod sanitizer;
mod scheduler;
