//! The CCP loss of one encoder layer with the identity head (spec steps 1 to 8): on the CPU by
//! the float64 reference, on CUDA by ccpl's [`CcpLayer`](ccpl::cuda::CcpLayer) (neighbour
//! differences, normalisation, the fused InfoNCE; no `(B, S, S)` logits), its backward
//! scattering the gradient into the feature maps.

use candle_core::{Result, Tensor};
use ccpl::{Centers, Element, FeatureShape, Layout, Tau, reference};

use crate::op::{Loss, LossOp, Reference};
use crate::storage::{ccpl_error, check_dtype, check_pair, dims};

const OP: &str = "ccpl_candle::ccp_layer_loss";

/// One layer's loss: its feature maps' shape, this step's centres, the temperature.
struct LayerLoss {
    shape: FeatureShape,
    centers: Centers,
    tau: Tau,
}

impl Loss for LayerLoss {
    const NAME: &'static str = OP;

    fn cpu<T: Element>(&self, q: &[T], k: &[T], want_k: bool) -> ccpl::Result<Reference> {
        let r = reference::ccp_layer_loss(q, k, &self.shape, &self.centers, self.tau, want_k)?;
        Ok((r.loss, r.grad_feat_q, r.grad_feat_k))
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: crate::cuda::KernelType>(
        &self,
        inputs: crate::cuda::Inputs<'_, T>,
    ) -> ccpl::Result<Box<dyn crate::cuda::SavedLoss>> {
        let centers = ccpl::cuda::DeviceCenters::upload(&inputs.stream, &self.centers)?;
        let (n, tau) = (self.centers.len(), self.tau);
        let mut layer =
            ccpl::cuda::CcpLayer::<T>::new(inputs.kernels, inputs.stream, self.shape, n, tau)?;
        layer.forward(&inputs.q, &inputs.k, &centers)?;
        Ok(Box::new(layer))
    }
}

/// The CCP loss of one encoder layer: `feat_q`, the generated (stylised) image's features,
/// and `feat_k`, the content image's, both `(B, C, H, W)` of the same dtype on the same
/// device; `centers`, this step's centres for an `H x W` map
/// ([`Centers::sample`](ccpl::Centers::sample) draws them; draw new ones per layer and step);
/// temperature `tau` (the paper's is [`DEFAULT_TAU`](crate::DEFAULT_TAU)). The projection head is the
/// identity: for a learned head, compose [`neighbor_diff`](crate::neighbor_diff), the head and
/// [`rows_loss`](crate::rows_loss). Returns a scalar tensor of the inputs' dtype.
///
/// Differentiable: `feat_q` gets its gradient, and `feat_k` too when candle tracks it (the
/// original detaches the content side: pass `feat_k.detach()`, or a tensor that is not a
/// variable). Types: `f32`, `f16`, `bf16`, and `f64` on the CPU. On the CPU the float64
/// reference computes the loss and its gradients; on CUDA, ccpl's kernels on candle's stream,
/// the backward with the deterministic scatter (the same bits on every run) and reusing the
/// forward's workspace (`O(B*8N*C)`, kept with the graph).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use ccpl_candle::{Centers, DEFAULT_TAU, ccp_layer_loss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let feat_q = Var::randn(0f32, 1.0, (2, 16, 12, 12), &dev)?; // (B, C, H, W)
/// let feat_k = Tensor::randn(0f32, 1.0, (2, 16, 12, 12), &dev)?;
/// let centers = Centers::sample(12, 12, 8, /* seed */ 1).map_err(candle_core::Error::wrap)?;
/// let loss = ccp_layer_loss(&feat_q, &feat_k, &centers, DEFAULT_TAU)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&feat_q).unwrap().dims(), feat_q.dims());
/// # Ok(()) }
/// ```
pub fn ccp_layer_loss(
    feat_q: &Tensor,
    feat_k: &Tensor,
    centers: &Centers,
    tau: f64,
) -> Result<Tensor> {
    let [batch, channels, height, width] = dims(OP, "feat_q", feat_q, "(B, C, H, W)")?;
    check_pair(OP, ("feat_q", "feat_k"), feat_q, feat_k)?;
    check_dtype(OP, "feat_q", feat_q)?;
    let shape =
        FeatureShape::new(batch, channels, height, width, Layout::Nchw).map_err(ccpl_error(OP))?;
    centers.check_shape(&shape).map_err(ccpl_error(OP))?;
    let tau = Tau::new(tau).map_err(ccpl_error(OP))?;
    let loss = LayerLoss {
        shape,
        centers: centers.clone(),
        tau,
    };
    LossOp::apply(loss, &feat_q.contiguous()?, &feat_k.contiguous()?)
}
