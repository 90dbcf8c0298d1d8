//! What [`CcpLayer`](super::CcpLayer) and [`CcpRows`](super::CcpRows) share: their kernels and
//! stream, a workspace allocated once on that stream, and whether a forward has filled it.

use std::convert::Infallible;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::{CudaLauncher, Kernels};
use crate::error::{Error, Result};

/// A loss object's state on its stream; `W` is its workspace of device slices.
#[derive(Debug)]
pub(crate) struct Resident<W> {
    kernels: Arc<Kernels>,
    stream: Arc<CudaStream>,
    workspace: W,
    forward_done: bool,
}

/// Allocates a zeroed buffer of `T` of each length it is given: with `T` the storage type for
/// a workspace's rows and `f32` for its statistics, the workspace of a shape's lengths.
pub(crate) fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
) -> impl FnMut(&usize) -> Result<CudaSlice<T>> + '_ {
    |&n| Ok(stream.alloc_zeros::<T>(n)?)
}

/// The length of a buffer, never an error: a workspace's lengths from what was allocated,
/// `let Ok(lengths) = workspace.try_map(length, length);`, whose bytes count its memory.
pub(crate) fn length<T>(slice: &CudaSlice<T>) -> std::result::Result<usize, Infallible> {
    Ok(slice.len())
}

impl<W> Resident<W> {
    /// `workspace` on `stream`, after checking that the stream is the kernels' context's.
    /// `one` picks the workspace's `1.0` (the default upstream gradient), set here.
    pub(crate) fn new(
        kernels: Arc<Kernels>,
        stream: Arc<CudaStream>,
        mut workspace: W,
        one: impl FnOnce(&mut W) -> &mut CudaSlice<f32>,
    ) -> Result<Self> {
        kernels.on(&stream)?;
        stream.memcpy_htod(&[1.0f32], one(&mut workspace))?;
        Ok(Self {
            kernels,
            stream,
            workspace,
            forward_done: false,
        })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn workspace(&self) -> &W {
        &self.workspace
    }

    /// The workspace, for a change that leaves what a forward filled as it was (the
    /// sampler's state).
    pub(crate) fn workspace_mut(&mut self) -> &mut W {
        &mut self.workspace
    }

    /// For a forward: a launcher on the stream, the workspace to name its buffers with, and
    /// whether the workspace holds a forward's results. Used in this order, so that a failed
    /// forward leaves the object as it was: make every launch of the forward (which checks
    /// every argument); only then set the flag to `false`, enqueue, and set it to `true` when
    /// everything is enqueued (a forward that fails half way leaves no backward to run on a
    /// half-written workspace).
    pub(crate) fn forward_parts(&mut self) -> Result<(CudaLauncher<'_>, &mut W, &mut bool)> {
        let launcher = self.kernels.on(&self.stream)?;
        Ok((launcher, &mut self.workspace, &mut self.forward_done))
    }

    /// A launcher and the workspace a forward filled, or `Err(BackwardBeforeForward)`.
    pub(crate) fn backward(&mut self) -> Result<(CudaLauncher<'_>, &mut W)> {
        if !self.forward_done {
            return Err(Error::BackwardBeforeForward);
        }
        Ok((self.kernels.on(&self.stream)?, &mut self.workspace))
    }
}
