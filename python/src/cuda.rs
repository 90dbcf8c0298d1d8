//! The kernels on PyTorch's stream: a launcher on a borrowed `CUstream`, with the kernels of
//! each device's primary context (the one PyTorch uses) loaded once and kept for the life of
//! the process by ccpl's cache ([`Kernels::kept_for_device`]).

use ccpl::Result;
use ccpl::cuda::{CudaLauncher, Kernels};
use cudarc::driver::sys::CUstream;

/// Runs `launch` with a launcher on the borrowed `stream` of device `ordinal`: the launches
/// are enqueued behind PyTorch's work on that stream, and nothing waits for them.
///
/// # Safety
///
/// `stream` is a live stream of device `ordinal`'s primary context (PyTorch's current stream
/// of the tensors' device), and every address the plans take is a live device buffer there,
/// of the length the plan is given, until the launches have run: PyTorch's caching allocator
/// keeps a tensor's memory for its stream's later work, so tensors alive during the call are.
pub unsafe fn on_stream<R>(
    ordinal: usize,
    stream: usize,
    launch: impl FnOnce(&CudaLauncher<'_>) -> Result<R>,
) -> Result<R> {
    let kernels = Kernels::kept_for_device(ordinal)?;
    // SAFETY: the stream belongs to this context and outlives the call (the caller's
    // contract); the wrapper never destroys it.
    let stream = unsafe { kernels.context().wrap_borrowed_stream(stream as CUstream) };
    let launcher = kernels.on(&stream)?;
    launch(&launcher)
}
