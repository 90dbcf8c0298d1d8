//! The CPU emulator of `ccpl`'s kernels (for tests): the same `kernels/*.cu` sources,
//! compiled by the host C++ compiler against `runtime/cuda_emu.h`, executing the same
//! [`LaunchPlan`]s as the GPU, with host addresses in place of device ones. `ccpl`'s kernel
//! tests use it as a dev-dependency; it is not published.
//!
//! Each thread of a block is a fiber; a scheduler seeded per launch runs them in random order,
//! switching at every barrier, warp collective, atomic and fence, and shared memory starts as
//! NaN in every block. So a missing `__syncthreads()` or a read of shared memory before it is
//! written changes the result rather than passing by luck. Barriers and warp collectives
//! keep CUDA's per-thread rules: a barrier some thread cannot reach, a shuffle whose mask
//! leaves out the calling lane or names a lane that exited, and a deadlock all end the launch
//! with [`Error::Launch`], never a hang.
//!
//! ```
//! use ccpl::launch::{LaunchPlan, Launcher};
//! use ccpl_emu::{self as emu, Emulator};
//! # fn main() -> Result<(), emu::Error> {
//! let input: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
//! let mut sums = vec![f32::NAN; 3];
//! let plan = LaunchPlan {
//!     kernel: "selftest_block_reduce".into(),
//!     grid: (1, 1, 1),
//!     block: (64, 1, 1),
//!     shared_bytes: 0,
//!     shared_opt_in: false,
//!     params: emu::selftest::ccpl_emu_selftest_params {
//!         in_: emu::buf(&input).addr,
//!         out: emu::buf_mut(&mut sums).addr,
//!         n: 100,
//!         arg: 0,
//!     },
//! };
//! // SAFETY: the plan addresses `input` and `sums`, alive and of the lengths it uses.
//! let emulator = unsafe { Emulator::new(1) };
//! emulator.launch(&plan)?;
//! assert_eq!(sums[0], input.iter().sum::<f32>());
//! # Ok(()) }
//! ```
//!
//! What it models of the hardware, so that a test that would fail on a GPU fails here first
//! (`docs/hardware.md` has the sources and the limits):
//! - tensor-core arithmetic: `wmma::mma_sync` adds as the tensor cores of [`ARCH`] do
//!   (`runtime/hmma.h`, [`hmma_dot`]: blocks of products aligned to the largest, truncated
//!   toward zero, rounded toward zero), not as `fmaf` would;
//! - FMA contraction: the kernels are compiled with `-ffp-contract=fast` (and `-mfma`), so
//!   `a*b+c` is fused as nvcc fuses it by default; `__fmul_rn` and `__fadd_rn` are not fused;
//! - alignment: every WMMA load and store checks the CUDA C++ rules (32-byte pointer, ldm a
//!   multiple of 16 bytes), every typed access its type's alignment, and each static
//!   `__shared__` variable sits at no more than its declared alignment, as ptxas may place it;
//! - shared memory: 48 KiB per block (static and dynamic) unless the plan opts in
//!   ([`LaunchPlan::shared_opt_in`](ccpl::launch::LaunchPlan)), then the maximum of [`ARCH`];
//!   at most 48 KiB of static shared memory.
//!
//! The sanitizer (`docs/sanitizer.md`, [`Checks`]; `CCPL_EMU_SANITIZE=1` turns it on for every
//! launch) checks every memory access the kernels make: memcheck (a global access inside a
//! buffer the launch was given, a shared one inside the block's shared memory), initcheck (no
//! read of shared memory nothing wrote, nor of a buffer's byte nothing wrote since
//! [`mark_unwritten`]) and racecheck (no two threads of a launch on one byte
//! without an order between them, in shared and global memory, between blocks too, with the
//! order of fences and atomics the kernels rely on).
//!
//! What only a GPU checks:
//! - code behind `#ifdef CCPL_EMULATOR` in the kernels (inline PTX such as mma, cp.async,
//!   ldmatrix, with a portable fallback here); [`GPU_ONLY_PATHS`] lists it;
//! - without racecheck, races on global memory without a synchronisation point between the
//!   read and the write (threads switch only at barriers, warp collectives, atomics and
//!   fences, so a non-atomic read-modify-write runs whole) and anything between blocks (they
//!   run one after another, so two blocks racing on an element agree); with it, what
//!   `docs/sanitizer.md` lists; and a block that waits for another one would never end;
//! - the rest of the GPU's own rounding: `__expf` and friends are exact here, and the host
//!   compiler fuses `a*b+c` where it can, which is not always where ptxas does (kernels whose
//!   bits must match spell out `__fmul_rn`); the tensor-core model of sm_75 is inferred, not
//!   validated (`tests/hmma_hardware.rs` compares it with a GPU's);
//! - without memcheck, out-of-bounds global accesses (host memory, unchecked); static shared
//!   memory a block declares but never reaches (it counts towards the limits on a GPU),
//!   registers, spills and speed.

mod checks;
mod library;

pub use checks::Checks;

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ccpl::launch::{Buf, KernelParams, LaunchPlan, Launcher};

/// The parameter struct of the emulator's self-test kernels (`runtime/selftest.h`; bindgen's
/// output, committed and checked by the build script as `ccpl`'s own bindings are).
pub mod selftest {
    #![allow(non_camel_case_types, missing_docs, clippy::all)]
    use ccpl::ffi_layout;
    include!("selftest_bindings.rs");
    // SAFETY: plain `repr(C)` data, as the kernels' own parameter structs.
    unsafe impl cudarc::driver::DeviceRepr for ccpl_emu_selftest_params {}
}

/// What an emulated launch reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The plan was refused before any launch: a `ccpl` error (a bad shape, length, tau).
    Plan(ccpl::Error),
    /// The emulator rejected or stopped the launch: an unknown kernel, bad dimensions, a
    /// deadlock, a barrier or warp collective used against CUDA's rules. The message names
    /// the launch's seed, to replay it.
    Launch(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Plan(e) => write!(f, "{e}"),
            Error::Launch(msg) => write!(f, "emulated launch failed: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<ccpl::Error> for Error {
    fn from(e: ccpl::Error) -> Self {
        Error::Plan(e)
    }
}

/// The architecture the emulator models, as a compute capability (`CCPL_EMU_ARCH` when the
/// emulator was built, default 90: H100, H200): its tensor cores' arithmetic, its shared
/// memory maximum and the kernel paths compiled for it (`CCPL_ARCH`).
pub const ARCH: u32 = parse_arch(env!("CCPL_EMU_ARCH"));

const fn parse_arch(digits: &str) -> u32 {
    let bytes = digits.as_bytes();
    let mut value = 0;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

/// Kernel code that the emulator does not run, as `(source, what)`: the GPU side of every
/// `#ifdef CCPL_EMULATOR` in `kernels/`. Empty while every kernel runs whole on the CPU.
pub const GPU_ONLY_PATHS: &[(&str, &str)] = &[];

/// Executes launch plans on the CPU, one after another, each to completion. Launches are
/// serialised process-wide (static shared memory is one copy per kernel).
#[derive(Debug)]
pub struct Emulator {
    next_seed: AtomicU64,
    checks: Checks,
}

impl Emulator {
    /// An emulator whose first launch is scheduled by `seed`, the next by `seed + 1`, and so on.
    ///
    /// # Safety
    ///
    /// Every plan launched on it must address host memory that is alive, and as long as the
    /// plan's shapes say, for the whole launch: the kernels read and write those addresses.
    /// Plans made from [`buf`] and [`buf_mut`] of slices the caller still holds satisfy this.
    ///
    /// # Panics
    ///
    /// When `CCPL_EMU_SANITIZE` names a check that does not exist ([`Checks::from_env`]).
    pub unsafe fn new(seed: u64) -> Self {
        Self {
            next_seed: AtomicU64::new(seed),
            checks: Checks::from_env().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// This emulator with the sanitizer's `checks` in place of those `CCPL_EMU_SANITIZE` chose.
    pub fn with_checks(self, checks: Checks) -> Self {
        Self { checks, ..self }
    }

    /// The sanitizer's checks every launch runs.
    pub fn checks(&self) -> Checks {
        self.checks
    }

    /// The seed the next launch will use.
    pub fn next_seed(&self) -> u64 {
        self.next_seed.load(Ordering::Relaxed)
    }
}

impl Launcher for Emulator {
    type Error = Error;

    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<(), Error> {
        let seed = self.next_seed.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(plan.kernel.as_str())
            .map_err(|_| Error::Launch(format!("kernel name {:?} has a NUL byte", plan.kernel)))?;
        let grid = [plan.grid.0, plan.grid.1, plan.grid.2];
        let block = [plan.block.0, plan.block.1, plan.block.2];
        let library = library::library().map_err(Error::Launch)?;
        // SAFETY: a `repr(C)` struct of plain data, read as the bytes the kernel receives.
        let param_bytes = unsafe {
            std::slice::from_raw_parts((&plan.params as *const P).cast::<u8>(), size_of::<P>())
        };
        let buffers = checks::given(param_bytes, self.checks.contains(Checks::INITCHECK));
        let mut err = [0 as c_char; 1024];
        // SAFETY: the arrays and the parameter struct outlive the call; the runtime checks the
        // struct's size against the kernel's; the addresses inside it are valid by the
        // contract of `Emulator::new`.
        let status = unsafe {
            (library.launch)(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                plan.shared_bytes,
                plan.shared_opt_in.into(),
                (&plan.params as *const P).cast(),
                size_of::<P>(),
                buffers.quadruples.as_ptr(),
                buffers.quadruples.len() / 4,
                self.checks.bits(),
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the runtime writes a NUL-terminated message into `err` on every error.
        let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        Err(Error::Launch(format!("{message} (launch seed {seed})")))
    }
}

/// A slice as a kernel input: its host address and length. The sanitizer's memcheck takes it
/// as a buffer a launch whose parameters point into it may access; initcheck, as written
/// unless [`mark_unwritten`] marked it so and no launch wrote it since.
pub fn buf<T>(data: &[T]) -> Buf {
    checks::register(
        data.as_ptr() as u64,
        size_of_val(data),
        checks::Contents::Kept,
    );
    Buf {
        addr: data.as_ptr() as u64,
        len: data.len(),
    }
}

/// A slice as a kernel output (written through the address while the launch runs); a buffer
/// for the sanitizer as [`buf`]'s.
pub fn buf_mut<T>(data: &mut [T]) -> Buf {
    checks::register(
        data.as_ptr() as u64,
        size_of_val(data),
        checks::Contents::Kept,
    );
    Buf {
        addr: data.as_mut_ptr() as u64,
        len: data.len(),
    }
}

/// Marks `data` as memory whose every byte was written, as a GPU buffer the caller uploaded,
/// zeroed or filled: what [`buf`] assumes of a slice it has not seen before, and what a slice
/// at the address of one [`mark_unwritten`] marked (its memory freed and reused) must say.
pub fn mark_written<T>(data: &[T]) {
    checks::register(
        data.as_ptr() as u64,
        size_of_val(data),
        checks::Contents::Written,
    );
}

/// Marks `data` as memory nothing wrote, as a fresh GPU allocation: the sanitizer's initcheck
/// reports a launch reading one of its bytes before a launch wrote it, whatever the slice
/// holds (an output poisoned with NaN counts as unwritten, so a kernel that reads its own
/// output before writing it fails even where the value never reaches a result). Bytes a
/// launch writes under initcheck stay written for later launches (one without it records
/// nothing: a test checks all of its launches or none).
pub fn mark_unwritten<T>(data: &[T]) {
    checks::register(
        data.as_ptr() as u64,
        size_of_val(data),
        checks::Contents::Unwritten,
    );
}

/// Names of the kernels the emulator has, in registration order.
///
/// # Panics
///
/// When `CCPL_EMU_LIBRARY` names a file that is not a shared build of the emulator.
pub fn kernel_names() -> Vec<&'static str> {
    let library = library::library().unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: the names are string literals of the kernel sources, registered before main.
    unsafe {
        (0..(library.kernel_count)())
            .filter_map(|i| {
                let name = (library.kernel_name)(i);
                (!name.is_null()).then(|| CStr::from_ptr(name).to_str().ok())?
            })
            .collect()
    }
}

/// One element of a WMMA `mma_sync` (m16n16k16, float accumulator) as the tensor cores of
/// `sm_{arch}` compute it, by the model the emulator's `mma_sync` uses (`runtime/hmma.h`):
/// `c + sum_k a[k] b[k]` over `K = a.len()` products, the factors values of `f16` (or of
/// `bf16` when `bf16`), exact in `f64`. For tests of the model against its published
/// vectors and, on a GPU, against the hardware.
///
/// # Panics
///
/// When `a` and `b` differ in length, or `CCPL_EMU_LIBRARY` names a file that is not a shared
/// build of the emulator.
pub fn hmma_dot(arch: u32, bf16: bool, c: f32, a: &[f64], b: &[f64]) -> f32 {
    assert_eq!(a.len(), b.len(), "as many factors on both sides");
    let k = i32::try_from(a.len()).expect("a WMMA product is short");
    let library = library::library().unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: two arrays of `k` doubles; the model reads them and nothing else.
    unsafe { (library.hmma_dot)(arch as i32, bf16.into(), c, a.as_ptr(), b.as_ptr(), k) }
}
