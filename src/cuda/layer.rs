//! The loss of one layer on the GPU (identity head), mirroring
//! [`crate::reference::ccp_layer_loss`]: the forward leaves the loss on the device and keeps
//! what the backward needs; the backward accumulates the gradient into the caller's buffers.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use super::Kernels;
use super::neighbor::{DeviceCenters, Scatter};
use super::resident::{Resident, alloc, length};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::loss::layer::{LayerPlan, LayerWorkspace};
use crate::shape::FeatureShape;
use crate::tau::Tau;

/// One layer of the CCP loss on one stream, with its workspace (normalised difference rows,
/// norms, row statistics, the loss): allocated once by [`new`](Self::new) for a shape
/// and a number of centres, reused by every step. `T` is the storage type of the feature maps
/// (`f32`, `f16` or `bf16`).
///
/// ```no_run
/// use std::sync::Arc;
/// use ccpl::cuda::{self, CcpLayer, DeviceCenters, Kernels, Scatter};
/// use ccpl::{Centers, FeatureShape, Layout};
/// # fn main() -> ccpl::Result<()> {
/// let ctx = cuda::context(0)?;
/// let kernels = Kernels::for_context(&ctx)?;
/// let stream = ctx.default_stream();
/// let shape = FeatureShape::new(8, 256, 64, 64, Layout::Nchw)?;
/// let mut layer = CcpLayer::<f32>::new(kernels, stream.clone(), shape, 64, ccpl::Tau::DEFAULT)?;
///
/// let feat_q = stream.alloc_zeros::<f32>(shape.len())?; // the generated image's features
/// let feat_k = stream.alloc_zeros::<f32>(shape.len())?; // the content image's features
/// let mut grad_q = stream.alloc_zeros::<f32>(shape.len())?;
///
/// let centers = DeviceCenters::upload(&stream, &Centers::sample(64, 64, 64, 7)?)?;
/// layer.forward(&feat_q, &feat_k, &centers)?;
/// layer.backward(None, &mut grad_q, None, Scatter::Deterministic)?; // grad_q += dloss/dfeat_q
/// let loss = stream.clone_dtoh(layer.loss())?; // the only wait on the host
/// # let _ = loss; Ok(()) }
/// ```
#[derive(Debug)]
pub struct CcpLayer<T: Dtype> {
    plan: LayerPlan,
    resident: Resident<LayerWorkspace<CudaSlice<T>, CudaSlice<f32>>>,
    /// The forward's centres, copied so that the backward scatters with the same ones.
    centers: DeviceCenters,
}

impl<T: Dtype> CcpLayer<T> {
    /// A layer for feature maps of `shape` with `num_centers` centres per step and
    /// temperature `tau`; allocates its workspace on `stream`: four `B*S*C` row matrices of `T`
    /// and four `B*S` float32 statistics (`S = 8N`), no `(B, S, S)` logits.
    pub fn new(
        kernels: Arc<Kernels>,
        stream: Arc<CudaStream>,
        shape: FeatureShape,
        num_centers: usize,
        tau: Tau,
    ) -> Result<Self> {
        let plan = LayerPlan::new(shape, num_centers, tau)?;
        let workspace = LayerWorkspace::lengths(&shape, num_centers)?
            .try_map(alloc::<T>(&stream), alloc::<f32>(&stream))?;
        let centers = DeviceCenters::alloc(&stream, shape.height(), shape.width(), num_centers)?;
        Ok(Self {
            plan,
            resident: Resident::new(kernels, stream, workspace, |ws| &mut ws.rows.one)?,
            centers,
        })
    }

    /// The bytes of device memory [`new`](Self::new) allocates for feature maps of `shape`
    /// with `num_centers` centres, without allocating: its workspace
    /// (`LayerWorkspace::lengths(..)?.bytes::<T>()`) and its copy of the centres (`N + H*W`
    /// int32). What [`workspace_bytes`](Self::workspace_bytes) then counts.
    pub fn workspace_bytes_for(shape: &FeatureShape, num_centers: usize) -> Result<usize> {
        Ok(LayerWorkspace::lengths(shape, num_centers)?.bytes::<T>()
            + (num_centers + shape.height() * shape.width()) * size_of::<i32>())
    }

    /// The bytes of device memory this object holds, counted from its buffers: its workspace
    /// and its copy of the centres (the gradients are the caller's).
    pub fn workspace_bytes(&self) -> usize {
        let Ok(lengths) = self.resident.workspace().try_map(length, length);
        lengths.bytes::<T>() + self.centers.bytes()
    }

    /// The layer's shape, number of centres and temperature.
    pub fn plan(&self) -> &LayerPlan {
        &self.plan
    }

    /// The forward on `feat_q` (the generated image's features) and `feat_k` (the content
    /// image's), both of the layer's shape, with this step's `centers` (`N` of them, for the
    /// layer's map; the layer keeps a copy for the backward). The loss stays on the device:
    /// [`loss`](Self::loss). Nothing is allocated and nothing waits. A call that returns an
    /// error before enqueuing leaves the layer as it was: the last forward's backward still
    /// runs, with the last forward's centres.
    pub fn forward(
        &mut self,
        feat_q: &impl DevicePtr<T>,
        feat_k: &impl DevicePtr<T>,
        centers: &DeviceCenters,
    ) -> Result<()> {
        let stream = self.resident.stream().clone();
        let (launcher, ws, forward_done) = self.resident.forward_parts()?;
        let centers_buf = centers.buf(&launcher);
        let (feat_q, feat_k) = (launcher.read(feat_q), launcher.read(feat_k));
        let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
        let plans = self
            .plan
            .forward_plans::<T>(&centers_buf, feat_q, feat_k, &bufs)?;
        self.centers.check_same_map(centers)?;
        *forward_done = false;
        self.centers.copy_from(&stream, centers)?;
        plans.launch(&launcher)?;
        *forward_done = true;
        Ok(())
    }

    /// The loss of the last forward: one float32 on the device.
    pub fn loss(&self) -> &CudaSlice<f32> {
        &self.resident.workspace().rows.loss
    }

    /// The backward of the last forward: adds `upstream[0]` (one float32 on the device, `1.0`
    /// when `None`) times the gradient of the loss to `grad_feat_q`, and to `grad_feat_k` when
    /// given (the original detaches the content side, so it is optional). The gradient
    /// buffers have the layer's shape and layout and are accumulated into, as a framework's
    /// gradients are. Nothing is allocated and nothing waits.
    pub fn backward<G: DevicePtrMut<T>>(
        &mut self,
        upstream: Option<&CudaView<'_, f32>>,
        grad_feat_q: &mut G,
        grad_feat_k: Option<&mut G>,
        scatter: Scatter,
    ) -> Result<()> {
        let (launcher, ws) = self.resident.backward()?;
        let grad_feat_q = launcher.write(grad_feat_q);
        let grad_feat_k = grad_feat_k.map(|g| launcher.write(g));
        let upstream = upstream.map(|u| launcher.read(u));
        let centers = self.centers.buf(&launcher);
        let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
        self.plan.backward::<T, _>(
            &launcher,
            &centers,
            &bufs,
            upstream,
            grad_feat_q,
            grad_feat_k,
            scatter,
        )
    }
}
