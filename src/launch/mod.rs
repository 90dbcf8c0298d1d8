//! Launch builders: for each kernel, a pure function from validated shapes and buffer
//! addresses to the kernel's name, grid, block, shared memory and parameter struct (a
//! [`LaunchPlan`]). They launch nothing: the sequences that make a loss out of them are
//! [`crate::loss`]'s. The GPU path ([`crate::cuda`]) and the CPU emulator (the `ccpl-emu`
//! crate) execute the very same plans through a [`Launcher`].
//!
//! One module per kernel family, named like its `kernels/*.cu` source.

pub mod info_nce;
pub mod info_nce_fused;
pub mod neighbor;
pub mod normalize;
pub mod similarity;
pub mod small_s;

use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::shape::{FeatureShape, RowShape};

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
    /// Whether the launch raises the kernel's limit of dynamic shared memory to
    /// `shared_bytes` (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`). A block may use
    /// [`SHARED_WITHOUT_OPT_IN`] bytes of shared memory, static and dynamic together, without
    /// it, and its architecture's maximum with it (99 KiB on sm_86 and sm_89, 163 KiB on sm_80,
    /// 227 KiB on sm_90). [`LaunchPlan::with_dynamic_shared`] sets both fields.
    pub shared_opt_in: bool,
    /// The kernel's one argument, a struct of `kernels/ccpl.h`.
    pub params: P,
}

/// Shared memory a block may use without opting in: 48 KiB, static and dynamic together.
pub const SHARED_WITHOUT_OPT_IN: u32 = 48 * 1024;

impl<P> LaunchPlan<P> {
    /// The launch of `kernel` on `grid` with blocks of `threads` threads (a 1-D block), no
    /// dynamic shared memory: what every kernel takes unless its plan says otherwise
    /// ([`with_dynamic_shared`](Self::with_dynamic_shared)).
    pub fn new(kernel: impl Into<String>, grid: (u32, u32, u32), threads: u32, params: P) -> Self {
        Self {
            kernel: kernel.into(),
            grid,
            block: (threads, 1, 1),
            shared_bytes: 0,
            shared_opt_in: false,
            params,
        }
    }

    /// The launch of `kernel`'s `T` variant, a tiled product (`kernels/tile_gemm.cuh`) with an
    /// output of `columns` columns per row of `shape`: a block of `CCPL_TILE_THREADS` per tile
    /// ([`tile_grid`]).
    pub(crate) fn tiled<T: Dtype>(
        kernel: &str,
        shape: &RowShape,
        columns: usize,
        params: P,
    ) -> Result<Self> {
        Ok(Self::new(
            format!("{kernel}_{}", T::SUFFIX),
            tile_grid(shape.batch(), shape.rows(), columns)?,
            ffi::CCPL_TILE_THREADS,
            params,
        ))
    }

    /// The plan with `bytes` of dynamic shared memory, for a kernel that declares
    /// `static_bytes` of static shared memory: it opts in when the two exceed
    /// [`SHARED_WITHOUT_OPT_IN`]. The one place plans decide it.
    pub fn with_dynamic_shared(mut self, static_bytes: u32, bytes: u32) -> Self {
        self.shared_bytes = bytes;
        self.shared_opt_in = static_bytes.saturating_add(bytes) > SHARED_WITHOUT_OPT_IN;
        self
    }
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

impl Buf {
    /// Elements `offset .. offset + len` of the buffer `what` of `E`: the part of a workspace
    /// buffer that one layer of a multi-layer launch uses. Callers check the lengths first; a
    /// part past the end, or past the address space, is refused naming the buffer.
    pub fn part<E>(self, what: &str, offset: usize, len: usize) -> Result<Buf> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::Shape(format!(
                "elements {offset}..{} of {what}, a buffer of {}",
                offset.saturating_add(len),
                self.len
            )));
        }
        let addr = offset
            .checked_mul(size_of::<E>())
            .and_then(|bytes| self.addr.checked_add(u64::try_from(bytes).ok()?))
            .ok_or_else(|| {
                Error::Shape(format!(
                    "element {offset} of {what} is past the address space"
                ))
            })?;
        Ok(Buf { addr, len })
    }
}

/// A launch parameter struct of `kernels/ccpl.h`.
pub trait KernelParams: cudarc::driver::DeviceRepr + Copy + std::fmt::Debug {}
impl<P: cudarc::driver::DeviceRepr + Copy + std::fmt::Debug> KernelParams for P {}

/// Something that executes launch plans in order: a CUDA stream or the CPU emulator.
pub trait Launcher {
    /// What a failed launch reports. A plan refused before any launch (bad shapes, lengths,
    /// tau) reports a crate [`Error`], which converts into it.
    type Error: std::error::Error + From<Error>;
    /// Enqueues one launch (the GPU does not wait for it; the emulator runs it to completion).
    fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<(), Self::Error>;
}

/// Threads per warp: the kernels that give a row to a warp are planned with it.
pub(crate) const WARP: usize = 32;

/// Blocks of `block` threads for a grid-stride loop over `total` items, capped so the grid
/// stays small enough to keep every block busy (the loop covers the rest).
pub(crate) fn grid_stride_blocks(total: usize, block: u32) -> u32 {
    const MAX_BLOCKS: usize = 65_535;
    total.div_ceil(block as usize).clamp(1, MAX_BLOCKS) as u32
}

/// `usize` to the kernels' `i32` (validated shapes fit; an error, never a panic, if not).
pub(crate) fn i32_of(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Shape(format!("{n} exceeds the i32 range of the kernels")))
}

/// Grid of the tiled products (`kernels/tile_gemm.cuh`): one block per
/// `CCPL_TILE_SIDE`-square tile of an `m x n` output, `grid.z` the image.
pub(crate) fn tile_grid(batch: usize, m: usize, n: usize) -> Result<(u32, u32, u32)> {
    const MAX_YZ: usize = 65_535;
    let tile = ffi::CCPL_TILE_SIDE as usize;
    let (x, y) = (n.div_ceil(tile), m.div_ceil(tile));
    if batch > MAX_YZ || y > MAX_YZ || x > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "a batch of {batch} {m}x{n} products exceeds the CUDA grid (batch and rows/{tile} at most {MAX_YZ})"
        )));
    }
    Ok((x as u32, y as u32, batch as u32))
}

/// The number of rows `B*S` of a row matrix, which the kernels count in `i32`.
pub(crate) fn row_count(shape: &RowShape) -> Result<usize> {
    let n = shape.count();
    if n > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "{n} rows exceed the i32 range of the kernels"
        )));
    }
    Ok(n)
}

/// Checks that each named buffer holds a row matrix of `shape`, `B*S*C` elements.
pub(crate) fn check_row_matrices(shape: &RowShape, buffers: &[(&'static str, Buf)]) -> Result<()> {
    buffers
        .iter()
        .try_for_each(|(what, buf)| check_len(what, shape.len(), buf.len))
}

/// The row matrices of `shape` as the tiled products take them (`ccpl_row_shape`): the one
/// place a plan fills it.
pub(crate) fn row_shape(shape: &RowShape) -> Result<ffi::ccpl_row_shape> {
    Ok(ffi::ccpl_row_shape {
        batch: i32_of(shape.batch())?,
        rows: i32_of(shape.rows())?,
        width: i32_of(shape.width())?,
    })
}

/// The per-row statistics of an InfoNCE forward (`ccpl_row_stats`), `row_lse` and `row_loss`
/// (float32, one per row), checked against the number of rows ([`row_count`]): the one place
/// a plan fills them.
pub(crate) fn row_stats(rows: usize, row_lse: Buf, row_loss: Buf) -> Result<ffi::ccpl_row_stats> {
    check_len("row_lse", rows, row_lse.len)?;
    check_len("row_loss", rows, row_loss.len)?;
    Ok(ffi::ccpl_row_stats {
        row_lse: row_lse.addr,
        row_loss: row_loss.addr,
    })
}

/// Centres as the kernels see them: the flat indices (`int32[N]`) and the inverse map
/// (`int32[H*W]`, the centre index at each position or -1), wherever they live.
#[derive(Debug, Clone, Copy)]
pub struct CentersBuf {
    /// Height of the map the centres were drawn for.
    pub height: usize,
    /// Width of that map.
    pub width: usize,
    /// `int32[N]`.
    pub flat: Buf,
    /// `int32[H*W]`.
    pub map: Buf,
}

/// The feature map of `shape` and its `centers` as every kernel of feature maps takes them
/// (`ccpl_feature_map`, `ccpl_centers`), checked against each other: the one place a plan
/// fills them.
pub(crate) fn feature_map(
    shape: &FeatureShape,
    centers: &CentersBuf,
) -> Result<(ffi::ccpl_feature_map, ffi::ccpl_centers)> {
    centers.check(shape)?;
    Ok((
        ffi::ccpl_feature_map {
            batch: i32_of(shape.batch())?,
            channels: i32_of(shape.channels())?,
            height: i32_of(shape.height())?,
            width: i32_of(shape.width())?,
            layout: shape.layout().code(),
        },
        ffi::ccpl_centers {
            flat: centers.flat.addr,
            map: centers.map.addr,
            count: i32_of(centers.len())?,
        },
    ))
}

impl CentersBuf {
    /// Number of centres `N`.
    pub fn len(&self) -> usize {
        self.flat.len
    }
    /// Never true for centres made from a [`crate::Centers`].
    pub fn is_empty(&self) -> bool {
        self.flat.len == 0
    }
    pub(crate) fn check(&self, shape: &FeatureShape) -> Result<()> {
        if (self.height, self.width) != (shape.height(), shape.width()) {
            return Err(Error::Shape(format!(
                "centres were drawn for a {}x{} map, the feature map is {}x{}",
                self.height,
                self.width,
                shape.height(),
                shape.width()
            )));
        }
        if self.flat.len == 0 {
            return Err(Error::NoCenters);
        }
        if self.flat.len > shape.interior() {
            return Err(Error::Shape(format!(
                "{} centres, but a {}x{} map has only {} interior positions",
                self.flat.len,
                shape.height(),
                shape.width(),
                shape.interior()
            )));
        }
        check_len("center map", self.height * self.width, self.map.len)
    }
}
