//! Launch plans: for each kernel, a pure function from validated shapes and buffer addresses
//! to the kernel's name, grid, block, shared memory and parameter struct. The GPU path
//! ([`crate::cuda`]) and the CPU emulator ([`crate::emu`]) execute the very same plans.
//!
//! One module per kernel family, named like its `kernels/*.cu` source.

pub mod info_nce;
pub mod info_nce_fused;
pub mod loss;
pub mod neighbor;
pub mod normalize;
pub mod rows_loss;
pub mod similarity;

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

/// Threads per warp: the kernels that give a row to a warp are planned with it.
pub(crate) const WARP: usize = 32;

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

/// `1/tau` as the kernels take it: `tau` checked, and its inverse finite in `f32`.
pub(crate) fn inv_tau(tau: f64) -> Result<f32> {
    crate::error::check_tau(tau)?;
    let inv = (1.0 / tau) as f32;
    if inv.is_finite() {
        Ok(inv)
    } else {
        Err(crate::error::Error::Tau(tau))
    }
}

/// Grid of the tiled products (`kernels/tile_gemm.cuh`): one block per
/// `CCPL_SIMILARITY_TILE`-square tile of an `m x n` output, `grid.z` the image.
pub(crate) fn tile_grid(batch: usize, m: usize, n: usize) -> Result<(u32, u32, u32)> {
    const MAX_YZ: usize = 65_535;
    let tile = crate::ffi::CCPL_SIMILARITY_TILE as usize;
    let (x, y) = (n.div_ceil(tile), m.div_ceil(tile));
    if batch > MAX_YZ || y > MAX_YZ || x > i32::MAX as usize {
        return Err(crate::error::Error::Shape(format!(
            "a batch of {batch} {m}x{n} products exceeds the CUDA grid (batch and rows/{tile} at most {MAX_YZ})"
        )));
    }
    Ok((x as u32, y as u32, batch as u32))
}

/// The number of rows `B*S` of a row matrix, which the kernels count in `i32`.
pub(crate) fn row_count(shape: &crate::shape::RowShape) -> Result<usize> {
    let n = shape.batch * shape.rows;
    if n > i32::MAX as usize {
        return Err(crate::error::Error::Shape(format!(
            "{n} rows exceed the i32 range of the kernels"
        )));
    }
    Ok(n)
}
