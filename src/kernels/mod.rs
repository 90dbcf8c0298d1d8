//! Launch plans: for each kernel, a pure function from validated shapes and buffer addresses
//! to the kernel's name, grid, block, shared memory and parameter struct. The GPU path
//! ([`crate::cuda`]) and the CPU emulator ([`crate::emu`]) execute the very same plans.
//!
//! One module per kernel family, named like its `kernels/*.cu` source.

pub mod neighbor;

use crate::error::Result;

/// One kernel launch, ready to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan<P> {
    /// Entry point, e.g. `neighbor_diff_f32`.
    pub kernel: String,
    /// Grid dimensions.
    pub grid: (u32, u32, u32),
    /// Block dimensions.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// The kernel's one argument, a struct of `kernels/ccpl.h`.
    pub params: P,
}

/// A buffer as a kernel sees it: its address (device, or host under the emulator) and its
/// length in elements, which the plan checks against the shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Address of element 0.
    pub addr: u64,
    /// Number of elements.
    pub len: usize,
}

/// A launch parameter struct of `kernels/ccpl.h`.
pub trait KernelParams: cudarc::driver::DeviceRepr + Copy + std::fmt::Debug {}
impl<P: cudarc::driver::DeviceRepr + Copy + std::fmt::Debug> KernelParams for P {}

/// Something that executes launch plans in order: a CUDA stream or the CPU emulator.
pub trait Launcher {
    /// Enqueues one launch (the GPU does not wait for it; the emulator runs it to completion).
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()>;
}

/// Blocks of `block` threads for a grid-stride loop over `total` items, capped so the grid
/// stays small enough to keep every block busy (the loop covers the rest).
pub(crate) fn grid_stride_blocks(total: usize, block: u32) -> u32 {
    const MAX_BLOCKS: usize = 65_535;
    total.div_ceil(block as usize).clamp(1, MAX_BLOCKS) as u32
}

/// `usize` to the kernels' `i32`; shapes are validated to fit before plans are made.
pub(crate) fn i32_of(n: usize) -> i32 {
    i32::try_from(n).expect("shape validated to fit i32")
}
