//! The CUDA side the ops share: ccpl's kernels for candle's device, views of candle's
//! storages, and the loss objects ([`CcpRows`], [`CcpLayer`]) a forward keeps for its backward.
//! Everything runs on candle's stream (`CudaDevice::cuda_stream`), so it is ordered with
//! candle's own kernels; nothing is copied to the host and nothing waits.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use ccpl::cuda::{CcpLayer, CcpRows, Kernels, Scatter};

use crate::storage::{ccpl_error, contiguous};

/// A storage type both ccpl's kernels and candle's CUDA backend have: `f32`, `f16`, `bf16`.
pub(crate) trait KernelType: ccpl::Dtype + CudaDType {}
impl<T: ccpl::Dtype + CudaDType> KernelType for T {}

/// Evaluates `$body` with `$t` the Rust type of a CUDA storage's `dtype` (`f32`, `f16`,
/// `bf16`); any other dtype is an error naming `$op`. The public functions reject those first.
macro_rules! with_kernel_type {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {{
        let dtype: candle_core::DType = $dtype;
        ccpl::dispatch_dtype!(dtype.as_str(), $t => $body, _other => Err($crate::storage::error(
            $op,
            format!("the CUDA kernels store f32, f16 or bf16, not {dtype:?}"),
        )))
    }};
}
pub(crate) use with_kernel_type;

/// ccpl's kernels in the context of candle's `stream`, loaded on first use and kept for the
/// life of the process as candle keeps its own modules: a training step's graph, their only
/// user here, is dropped before the next step.
pub(crate) fn kernels(op: &'static str, stream: &Arc<CudaStream>) -> Result<Arc<Kernels>> {
    Kernels::kept_for_context(stream.context()).map_err(ccpl_error(op))
}

/// What a loss's CUDA forward takes: the kernels, candle's stream, and the two inputs on it.
pub(crate) struct Inputs<'a, T> {
    pub kernels: Arc<Kernels>,
    pub stream: Arc<CudaStream>,
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
}

/// The elements of a CUDA storage that `layout` covers, as `T`.
pub(crate) fn elements<'a, T: CudaDType>(
    op: &str,
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    let (start, end) = contiguous(op, layout)?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// A loss a forward left on the device, with what its backward reads.
pub(crate) trait SavedLoss: Send {
    /// The loss: one float32 on the device.
    fn loss(&self) -> &CudaSlice<f32>;
    /// `upstream[0]` times the gradients `asked` for.
    fn backward(
        &mut self,
        upstream: &CudaView<'_, f32>,
        asked: Gradients<'_>,
    ) -> Result<CudaStorage>;
}

/// The gradients a backward is asked for: of the first input, then the second's when
/// `want_k`, in a new storage of the loss's storage type on `device` holding both, of `len`
/// elements each. `op` names the op in errors.
pub(crate) struct Gradients<'a> {
    pub op: &'static str,
    pub device: &'a CudaDevice,
    pub want_k: bool,
    pub len: usize,
}

/// ccpl's loss objects as a forward keeps them: the loss, how its backward starts the
/// gradients' memory, and the backward into them.
trait LossObject: Send {
    type Storage: KernelType;
    /// The rows backward writes every element of each gradient it is given; the layer's adds
    /// into the feature gradients, as a framework accumulates.
    const START: Start;
    fn loss(&self) -> &CudaSlice<f32>;
    fn backward_into<'v>(
        &mut self,
        upstream: &CudaView<'_, f32>,
        grad_q: &mut CudaViewMut<'v, Self::Storage>,
        grad_k: Option<&mut CudaViewMut<'v, Self::Storage>>,
    ) -> ccpl::Result<()>;
}

// The two loss objects differ only in how their backward starts the gradients and in its
// call (the layer's names its scatter), so one impl is written for both.
macro_rules! loss_object {
    ($($object:ident: $start:ident, |$this:ident, $up:ident, $q:ident, $k:ident| $backward:expr;)*) => {$(
        impl<T: KernelType> LossObject for $object<T> {
            type Storage = T;
            const START: Start = Start::$start;
            fn loss(&self) -> &CudaSlice<f32> {
                $object::loss(self)
            }
            fn backward_into<'v>(
                &mut self,
                $up: &CudaView<'_, f32>,
                $q: &mut CudaViewMut<'v, T>,
                $k: Option<&mut CudaViewMut<'v, T>>,
            ) -> ccpl::Result<()> {
                let $this = self;
                $backward
            }
        }
    )*};
}

loss_object! {
    CcpRows: Unset, |rows, upstream, grad_q, grad_k| rows.backward(Some(upstream), grad_q, grad_k);
    CcpLayer: Zeroed, |layer, upstream, grad_q, grad_k|
        layer.backward(Some(upstream), grad_q, grad_k, Scatter::Deterministic);
}

impl<L: LossObject> SavedLoss for L {
    fn loss(&self) -> &CudaSlice<f32> {
        LossObject::loss(self)
    }

    fn backward(
        &mut self,
        upstream: &CudaView<'_, f32>,
        asked: Gradients<'_>,
    ) -> Result<CudaStorage> {
        gradients::<L::Storage>(asked, L::START, |grad_q, grad_k| {
            self.backward_into(upstream, grad_q, grad_k)
        })
    }
}

/// How the gradients' memory starts: what a backward that writes every element may leave
/// unset, one that adds into it needs zeroed.
enum Start {
    Unset,
    Zeroed,
}

/// The gradients `asked` for, written by `backward` into the halves of a new storage of `T`.
fn gradients<T: KernelType>(
    Gradients {
        op,
        device,
        want_k,
        len,
    }: Gradients<'_>,
    start: Start,
    backward: impl for<'v> FnOnce(
        &mut CudaViewMut<'v, T>,
        Option<&mut CudaViewMut<'v, T>>,
    ) -> ccpl::Result<()>,
) -> Result<CudaStorage> {
    let stream = device.cuda_stream();
    let sides = if want_k { 2 } else { 1 };
    let mut grads = match start {
        // SAFETY: device memory, never read on the host here; `Start::Unset` is the caller's
        // word that `backward` writes every element of each half it is given (it is given both
        // halves when there are two), so no unset value reaches candle. Its one user,
        // `CcpRows::backward`, writes (never accumulates) each gradient it is given: on the
        // small-S path `small_s_scale` stores every one of the `len` elements of each side
        // (a grid-stride loop, kernels/small_s.cu); on the fused path the normalisation's
        // backward (kernels/normalize.cu) has a warp store each row's gradient whole, every
        // row. On an error the storage is dropped unread.
        Start::Unset => unsafe { stream.alloc::<T>(sides * len) },
        Start::Zeroed => stream.alloc_zeros::<T>(sides * len),
    }
    .w()?;
    let (mut grad_q, mut grad_k) = grads.split_at_mut(len);
    backward(&mut grad_q, want_k.then_some(&mut grad_k)).map_err(ccpl_error(op))?;
    Ok(CudaStorage::wrap_cuda_slice(grads, device.clone()))
}

/// The loss a forward left on the device, as a new scalar storage of `dtype`.
pub(crate) fn loss_storage(
    saved: &dyn SavedLoss,
    device: &CudaDevice,
    dtype: DType,
) -> Result<CudaStorage> {
    let loss = device.cuda_stream().clone_dtod(saved.loss()).w()?;
    let loss = CudaStorage::wrap_cuda_slice(loss, device.clone());
    if dtype == DType::F32 {
        return Ok(loss);
    }
    loss.to_dtype(&Layout::contiguous(Shape::from(())), dtype)
}
