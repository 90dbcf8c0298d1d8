//! The difference rows of a feature map (spec steps 2 and 3), for a learned projection head
//! between them and [`rows_loss`](crate::rows_loss): on the CPU by the float64 reference, on
//! CUDA by ccpl's `neighbor_diff` kernel; the backward scatters the rows' gradient into the
//! feature map (ccpl's deterministic scatter on CUDA).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use ccpl::{Centers, FeatureShape, reference};

use crate::storage::{ccpl_error, check_dtype, cpu_elements, cpu_storage, dims, with_cpu_type};

const OP: &str = "ccpl_candle::neighbor_diff";

/// The forward op: `(B, C, H, W)` to `(B, 8N, C)`.
struct NeighborDiff {
    shape: FeatureShape,
    centers: Centers,
    dtype: DType,
    /// The centres on the device, uploaded by the forward, read again by the backward.
    #[cfg(feature = "cuda")]
    device_centers: std::sync::Mutex<Option<ccpl::cuda::DeviceCenters>>,
}

impl NeighborDiff {
    fn rows_shape(&self) -> Shape {
        Shape::from((
            self.shape.batch(),
            self.centers.rows(),
            self.shape.channels(),
        ))
    }

    fn feat_shape(&self) -> Shape {
        let s = &self.shape;
        Shape::from((s.batch(), s.channels(), s.height(), s.width()))
    }
}

impl CustomOp1 for NeighborDiff {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, feat: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = with_cpu_type!(self.dtype, OP, |T| {
            let feat = cpu_elements::<T>(OP, feat, layout)?;
            let rows = reference::neighbor_diff(feat, &self.shape, &self.centers)
                .map_err(ccpl_error(OP))?;
            Ok(cpu_storage::<T>(rows.into_iter()))
        })?;
        Ok((rows, self.rows_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        feat: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{elements, kernels, with_kernel_type};
        use candle_core::cuda_backend::WrapErr;
        let device = &feat.device;
        let stream = device.cuda_stream();
        let kernels = kernels(OP, &stream)?;
        let mut device_centers = self
            .device_centers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let centers =
            ccpl::cuda::DeviceCenters::upload(&stream, &self.centers).map_err(ccpl_error(OP))?;
        let centers = device_centers.insert(centers);
        let rows = with_kernel_type!(self.dtype, OP, |T| {
            let feat = elements::<T>(OP, feat, layout)?;
            // Unzeroed, as the kernel writes every element before anything reads one: its
            // grid-stride loop visits each (b, x, c) of the B*N*C and writes channel c of all 8
            // rows of centre x (kernels/neighbor.cu), B*8N*C elements in all; on an error the
            // buffer is dropped unread.
            // SAFETY: device memory, never read on the host here, fully written as above.
            let mut rows = unsafe { stream.alloc::<T>(self.rows_shape().elem_count()) }.w()?;
            ccpl::cuda::neighbor::neighbor_diff::<T>(
                &kernels,
                &stream,
                &self.shape,
                centers,
                &feat,
                &mut rows,
            )
            .map_err(ccpl_error(OP))?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                rows,
                device.clone(),
            ))
        })?;
        Ok((rows, self.rows_shape()))
    }

    fn bwd(&self, _feat: &Tensor, _rows: &Tensor, grad_rows: &Tensor) -> Result<Option<Tensor>> {
        let grad_feat = grad_rows
            .contiguous()?
            .apply_op1_no_bwd(&NeighborDiffBackward { op: self })?;
        Ok(Some(grad_feat))
    }
}

/// The backward op: the rows' gradient `(B, 8N, C)` scattered into the feature map's
/// `(B, C, H, W)` (a centre gets `+g`, its neighbour `-g`, overlaps add up).
struct NeighborDiffBackward<'a> {
    op: &'a NeighborDiff,
}

impl CustomOp1 for NeighborDiffBackward<'_> {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, grad_rows: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.op;
        let grad_feat = with_cpu_type!(op.dtype, OP, |T| {
            let grad_rows: Vec<f64> = cpu_elements::<T>(OP, grad_rows, layout)?
                .iter()
                .map(|&g| candle_core::WithDType::to_f64(g))
                .collect();
            let mut grad_feat = vec![0.0; op.shape.len()];
            reference::neighbor_diff_backward(&grad_rows, &op.shape, &op.centers, &mut grad_feat)
                .map_err(ccpl_error(OP))?;
            Ok(cpu_storage::<T>(grad_feat.into_iter()))
        })?;
        Ok((grad_feat, op.feat_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        grad_rows: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{elements, kernels, with_kernel_type};
        use candle_core::cuda_backend::WrapErr;
        let op = self.op;
        let device = &grad_rows.device;
        let stream = device.cuda_stream();
        let kernels = kernels(OP, &stream)?;
        let device_centers = op.device_centers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(centers) = device_centers.as_ref() else {
            return Err(crate::storage::error(OP, "backward without a CUDA forward"));
        };
        let grad_feat = with_kernel_type!(op.dtype, OP, |T| {
            let grad_rows = elements::<T>(OP, grad_rows, layout)?;
            // The scatter adds into the feature map's gradient.
            let mut grad_feat = stream.alloc_zeros::<T>(op.shape.len()).w()?;
            ccpl::cuda::neighbor::neighbor_diff_backward::<T>(
                &kernels,
                &stream,
                &op.shape,
                centers,
                &grad_rows,
                &mut grad_feat,
                ccpl::cuda::Scatter::Deterministic,
            )
            .map_err(ccpl_error(OP))?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(
                grad_feat,
                device.clone(),
            ))
        })?;
        Ok((grad_feat, op.feat_shape()))
    }
}

/// The difference rows of `feat` `(B, C, H, W)` at `centers` (drawn for an `H x W` map): a
/// `(B, 8N, C)` tensor of `feat`'s dtype whose row `k*N + x` of image `b` is
/// `feat[b, :, p_x] - feat[b, :, p_x + off_k]`, centre `x` minus its neighbour in direction
/// `k` (ccpl's contract, steps 2 and 3). Feed them, and those of the content image at the same
/// centres, through a projection head and into [`rows_loss`](crate::rows_loss).
///
/// Differentiable: the backward scatters the rows' gradient into `feat`'s (on CUDA with
/// ccpl's deterministic scatter). Types: `f32`, `f16`, `bf16`, and `f64` on the CPU.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ccpl_candle::{Centers, neighbor_diff};
/// # fn main() -> candle_core::Result<()> {
/// let feat = Tensor::randn(0f32, 1.0, (2, 16, 12, 12), &Device::Cpu)?; // (B, C, H, W)
/// let centers = Centers::sample(12, 12, 8, /* seed */ 1).map_err(candle_core::Error::wrap)?;
/// let rows = neighbor_diff(&feat, &centers)?;
/// assert_eq!(rows.dims(), &[2, 64, 16]); // (B, 8N, C)
/// # Ok(()) }
/// ```
pub fn neighbor_diff(feat: &Tensor, centers: &Centers) -> Result<Tensor> {
    let [batch, channels, height, width] = dims(OP, "feat", feat, "(B, C, H, W)")?;
    check_dtype(OP, "feat", feat)?;
    let shape = FeatureShape::new(batch, channels, height, width, ccpl::Layout::Nchw)
        .map_err(ccpl_error(OP))?;
    centers.check_shape(&shape).map_err(ccpl_error(OP))?;
    feat.contiguous()?.apply_op1(NeighborDiff {
        shape,
        centers: centers.clone(),
        dtype: feat.dtype(),
        #[cfg(feature = "cuda")]
        device_centers: std::sync::Mutex::new(None),
    })
}
