//! The CCP loss of two row matrices `(B, S, C)`, for a learned projection head between
//! [`neighbor_diff`](crate::neighbor_diff) and the loss (spec steps 5 to 8): on the CPU by the
//! float64 reference, on CUDA by ccpl's [`CcpRows`](ccpl::cuda::CcpRows) (normalisation and the
//! fused InfoNCE: no `(B, S, S)` logits), its backward writing the gradient of the rows.

use candle_core::{Result, Tensor};
use ccpl::{Element, RowShape, Tau, reference};

use crate::op::{Loss, LossOp, Reference};
use crate::storage::{ccpl_error, check_dtype, check_pair, dims};

const OP: &str = "ccpl_candle::rows_loss";

/// The rows loss of one shape and temperature.
struct Rows {
    shape: RowShape,
    tau: Tau,
}

impl Loss for Rows {
    const NAME: &'static str = OP;

    fn cpu<T: Element>(&self, q: &[T], k: &[T], want_k: bool) -> ccpl::Result<Reference> {
        let r = reference::rows_loss(q, k, &self.shape, self.tau, want_k)?;
        Ok((r.loss, r.grad_rows_q, r.grad_rows_k))
    }

    #[cfg(feature = "cuda")]
    fn cuda<T: crate::cuda::KernelType>(
        &self,
        inputs: crate::cuda::Inputs<'_, T>,
    ) -> ccpl::Result<Box<dyn crate::cuda::SavedLoss>> {
        let mut rows =
            ccpl::cuda::CcpRows::<T>::new(inputs.kernels, inputs.stream, self.shape, self.tau)?;
        rows.forward(&inputs.q, &inputs.k)?;
        Ok(Box::new(rows))
    }
}

/// The CCP loss of the rows a projection head made of the generated image's difference rows
/// (`q_rows`) and of the content image's (`k_rows`), both `(B, S, C)` of the same dtype on the
/// same device, at temperature `tau` (the paper's is [`DEFAULT_TAU`](crate::DEFAULT_TAU)): a scalar tensor of
/// their dtype. Each row is normalised; row `i` of `q_rows` must match row `i` of `k_rows`
/// against every other row of the same image of `k_rows` (InfoNCE); the loss is the mean over
/// the `B*S` rows.
///
/// Differentiable: `q_rows` gets its gradient, and `k_rows` too when candle tracks it (the
/// original detaches the content side: pass `k_rows.detach()` for that). Types: `f32`, `f16`,
/// `bf16`, and `f64` on the CPU. On the CPU the float64 reference computes the loss and its
/// gradients; on CUDA, ccpl's kernels on candle's stream, and the backward reuses the
/// forward's workspace (`O(B*S*C)`, kept with the graph).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let q = Var::randn(0f32, 1.0, (2, 64, 32), &Device::Cpu)?; // B = 2, S = 64, C = 32
/// let k = Tensor::randn(0f32, 1.0, (2, 64, 32), &Device::Cpu)?;
/// let loss = ccpl_candle::rows_loss(&q, &k, ccpl_candle::DEFAULT_TAU)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&q).unwrap().dims(), &[2, 64, 32]);
/// # Ok(()) }
/// ```
pub fn rows_loss(q_rows: &Tensor, k_rows: &Tensor, tau: f64) -> Result<Tensor> {
    let [batch, rows, width] = dims(OP, "q_rows", q_rows, "(B, S, C)")?;
    check_pair(OP, ("q_rows", "k_rows"), q_rows, k_rows)?;
    check_dtype(OP, "q_rows", q_rows)?;
    let shape = RowShape::new(batch, rows, width).map_err(ccpl_error(OP))?;
    let tau = Tau::new(tau).map_err(ccpl_error(OP))?;
    LossOp::apply(
        Rows { shape, tau },
        &q_rows.contiguous()?,
        &k_rows.contiguous()?,
    )
}
