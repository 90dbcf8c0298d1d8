//! The one custom op behind the two losses ([`crate::rows_loss`], [`crate::ccp_layer_loss`]):
//! each loss is a [`Loss`] (its CPU half and its CUDA half), and [`LossOp`] is the candle op of
//! two inputs `q` (the generated side) and `k` (the content side) whose output is the scalar
//! loss, and whose forward keeps what the backward reads (the reference's gradients on the
//! CPU; ccpl's loss object with its workspace on CUDA), as PyTorch keeps saved tensors. The
//! backward is a second custom op on the upstream gradient that writes the gradients of both
//! inputs into one tensor `(sides, *input)`; candle gets them as views of it.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use ccpl::Element;

use crate::storage::{ccpl_error, cpu_elements, cpu_scalar, cpu_storage, error, with_cpu_type};

/// One loss: its CPU forward (the reference) and its CUDA forward (ccpl's loss object).
pub(crate) trait Loss: Send + Sync + 'static {
    /// The op's name in errors and in candle's graph.
    const NAME: &'static str;

    /// The loss of `q` and `k` and its gradients at upstream 1 (`k`'s when `want_k`), by the
    /// float64 reference.
    fn cpu<T: Element>(&self, q: &[T], k: &[T], want_k: bool) -> ccpl::Result<Reference>;

    /// The forward on the device, on candle's stream: ccpl's loss object after its forward.
    #[cfg(feature = "cuda")]
    fn cuda<T: crate::cuda::KernelType>(
        &self,
        inputs: crate::cuda::Inputs<'_, T>,
    ) -> ccpl::Result<Box<dyn crate::cuda::SavedLoss>>;
}

/// A loss and its gradients by the reference: the loss, `q`'s gradient, `k`'s when asked for.
pub(crate) type Reference = (f64, Vec<f64>, Option<Vec<f64>>);

/// What a forward keeps for the backward.
enum Saved {
    /// The reference's gradients at upstream 1: `q`'s, then `k`'s when asked for.
    Cpu(Vec<f64>),
    /// ccpl's loss object, its workspace filled by the forward.
    #[cfg(feature = "cuda")]
    Cuda(Box<dyn crate::cuda::SavedLoss>),
}

/// The forward op of loss `L` on inputs of `dims`.
pub(crate) struct LossOp<L> {
    loss: L,
    dtype: DType,
    dims: Vec<usize>,
    /// Whether the backward computes `k`'s gradient too (`k` is tracked by candle's graph);
    /// `q`'s is always computed.
    want_k: bool,
    saved: Mutex<Option<Saved>>,
}

impl<L: Loss> LossOp<L> {
    /// The loss of `q` and `k`, which the caller has checked to agree in shape, dtype and
    /// device, and to be contiguous.
    pub(crate) fn apply(loss: L, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let op = Self {
            loss,
            dtype: q.dtype(),
            dims: q.dims().to_vec(),
            want_k: k.track_op(),
            saved: Mutex::new(None),
        };
        q.apply_op2(k, op)
    }

    fn save(&self, saved: Saved) {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
    }

    #[cfg(feature = "cuda")]
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

impl<L: Loss> CustomOp2 for LossOp<L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (loss, grads) = with_cpu_type!(self.dtype, L::NAME, |T| {
            let q = cpu_elements::<T>(L::NAME, q, q_layout)?;
            let k = cpu_elements::<T>(L::NAME, k, k_layout)?;
            let (loss, mut grads, grad_k) = self
                .loss
                .cpu(q, k, self.want_k)
                .map_err(ccpl_error(L::NAME))?;
            grads.extend(grad_k.into_iter().flatten());
            Ok((cpu_storage::<T>(std::iter::once(loss)), grads))
        })?;
        self.save(Saved::Cpu(grads));
        Ok((loss, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_layout: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{Inputs, elements, kernels, loss_storage, with_kernel_type};
        let device = &q.device;
        let stream = device.cuda_stream();
        let kernels = kernels(L::NAME, &stream)?;
        let saved = with_kernel_type!(self.dtype, L::NAME, |T| {
            let inputs = Inputs {
                kernels,
                stream,
                q: elements::<T>(L::NAME, q, q_layout)?,
                k: elements::<T>(L::NAME, k, k_layout)?,
            };
            self.loss.cuda(inputs).map_err(ccpl_error(L::NAME))
        })?;
        let loss = loss_storage(saved.as_ref(), device, self.dtype)?;
        self.save(Saved::Cuda(saved));
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        _k: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The kernels read the upstream gradient as one float32 on the device; the float64
        // reference (the CPU path of float64 inputs) keeps it in float64.
        let upstream_dtype = match self.dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let upstream = grad_loss.to_dtype(upstream_dtype)?;
        let grads = upstream.apply_op1_no_bwd(&LossBackward { op: self })?;
        let grad_q = q.track_op().then(|| grads.get(0)).transpose()?;
        let grad_k = self.want_k.then(|| grads.get(1)).transpose()?;
        Ok((grad_q, grad_k))
    }
}

/// The backward of a [`LossOp`], on the upstream gradient (a scalar: float64 for float64
/// inputs, float32 otherwise): the gradients
/// of `q` and, when asked for, `k`, stacked: `(sides, *input)`.
struct LossBackward<'a, L> {
    op: &'a LossOp<L>,
}

impl<L: Loss> LossBackward<'_, L> {
    fn sides(&self) -> usize {
        if self.op.want_k { 2 } else { 1 }
    }

    fn shape(&self) -> Shape {
        Shape::from([&[self.sides()], self.op.dims.as_slice()].concat())
    }
}

impl<L: Loss> CustomOp1 for LossBackward<'_, L> {
    fn name(&self) -> &'static str {
        L::NAME
    }

    fn cpu_fwd(&self, upstream: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let upstream = cpu_scalar(L::NAME, upstream, layout)?;
        let saved = self.op.saved.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Saved::Cpu(grads)) = saved.as_ref() else {
            return Err(error(L::NAME, "backward without a CPU forward"));
        };
        let grads = grads.iter().map(|g| g * upstream);
        let storage = with_cpu_type!(self.op.dtype, L::NAME, |T| Ok(cpu_storage::<T>(grads)))?;
        Ok((storage, self.shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        upstream: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let view = crate::cuda::elements::<f32>(L::NAME, upstream, layout)?;
        let mut saved = self.op.saved.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Saved::Cuda(saved)) = saved.as_mut() else {
            return Err(error(L::NAME, "backward without a CUDA forward"));
        };
        let asked = crate::cuda::Gradients {
            op: L::NAME,
            device: &upstream.device,
            want_k: self.op.want_k,
            len: self.op.len(),
        };
        let grads = saved.backward(&view, asked)?;
        Ok((grads, self.shape()))
    }
}
