//! The whole CCP loss on the GPU, every layer (identity head), mirroring
//! [`crate::reference::ccp_loss`]: one call for the forward of every layer, one for the
//! backward, the centres drawn on the device, the sum over layers on the device. The launches
//! are [`crate::loss::multi_layer`]'s.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use super::neighbor::DeviceCenters;
use super::resident::{Resident, alloc, length};
use super::{CudaLauncher, Kernels};
use crate::dtype::Dtype;
use crate::error::{Result, check_len};
use crate::launch::{Buf, small_s};
use crate::loss::multi_layer::{Draw, LossPlan, LossWorkspace};
use crate::shape::FeatureShape;
use crate::tau::Tau;

/// The CCP loss of several encoder layers on one stream, with its workspace, allocated once by
/// [`new`](Self::new) and reused by every step. `T` is the storage type of the feature maps
/// (`f32`, `f16` or `bf16`).
///
/// A training step is [`forward`](Self::forward) then [`backward`](Self::backward). Layers
/// whose `S = 8N` is at most 512 (`num_s` up to 64: the paper's sizes) run on the small-S
/// path: the whole step is three kernel launches whatever the number of layers (the
/// centres drawn on the device and the difference rows gathered; the loss and the gradient of
/// the rows; the scatter into the gradients), in float from the inputs in `T`. Larger layers
/// run the fused path of [`CcpLayer`](super::CcpLayer), their centres drawn by the same first
/// launch and their losses added to the same total.
///
/// Nothing in a step allocates, copies from the host or waits for it, so a step can be
/// captured in a CUDA graph and replayed (on a stream other than the legacy default one,
/// with cudarc's event tracking disabled, and with the same buffers: every address is fixed
/// at capture). The centres of each step are drawn on the device from a seed and a step
/// counter held there; [`crate::Centers::philox`] gives the same centres on the host.
///
/// ```no_run
/// use ccpl::cuda::{self, CcpLoss, Kernels};
/// use ccpl::{FeatureShape, Layout, Tau};
/// # fn main() -> ccpl::Result<()> {
/// let ctx = cuda::context(0)?;
/// let stream = ctx.default_stream();
/// // The paper: relu2_1, relu3_1, relu4_1 of VGG-19 at a 256 crop, batch 8, num_s = 8.
/// let layers = [(128, 128), (256, 64), (512, 32)]
///     .map(|(c, side)| (FeatureShape::new(8, c, side, side, Layout::Nchw).unwrap(), 8));
/// let mut loss = CcpLoss::<f32>::new(Kernels::for_context(&ctx)?, stream.clone(), &layers, Tau::DEFAULT, 7)?;
///
/// let feats: Vec<_> = layers
///     .iter()
///     .map(|(s, _)| Ok((stream.alloc_zeros::<f32>(s.len())?, stream.alloc_zeros::<f32>(s.len())?)))
///     .collect::<ccpl::Result<_>>()?;
/// let mut grads: Vec<_> = layers
///     .iter()
///     .map(|(s, _)| stream.alloc_zeros::<f32>(s.len()))
///     .collect::<Result<_, _>>()?;
///
/// let inputs: Vec<_> = feats.iter().map(|(q, k)| (q, k)).collect();
/// loss.forward(&inputs)?; // new centres drawn on the device
/// loss.backward(None, &mut grads.iter_mut().collect::<Vec<_>>(), None)?; // grads += d loss
/// let value = stream.clone_dtoh(loss.loss())?; // the only wait on the host
/// # let _ = value; Ok(()) }
/// ```
#[derive(Debug)]
pub struct CcpLoss<T: Dtype> {
    plan: LossPlan,
    resident: Resident<Workspace<T>>,
}

type Workspace<T> = LossWorkspace<CudaSlice<T>, CudaSlice<f32>, CudaSlice<i32>>;

impl<T: Dtype> CcpLoss<T> {
    /// The loss of `layers` (each a feature-map shape and the `num_s` centres asked for; the
    /// layer takes `N = min(num_s, (H-2)(W-2))`) at temperature `tau`, its centres drawn from
    /// `seed` starting at step 0. Allocates the workspace on `stream` (its size:
    /// `LossPlan::new(..)?.workspace()?.bytes::<T>()`), and sets the sampler's state there.
    pub fn new(
        kernels: Arc<Kernels>,
        stream: Arc<CudaStream>,
        layers: &[(FeatureShape, usize)],
        tau: Tau,
        seed: u64,
    ) -> Result<Self> {
        let plan = LossPlan::new(layers, tau)?;
        let mut ws: Workspace<T> = plan.workspace()?.try_map(
            alloc::<T>(&stream),
            alloc::<f32>(&stream),
            alloc::<i32>(&stream),
        )?;
        // No centre anywhere yet; the fused layers' default upstream gradient.
        for c in &mut ws.centers {
            stream.memcpy_htod(&vec![-1i32; c.map.len()], &mut c.map)?;
        }
        for fused in &mut ws.fused {
            stream.memcpy_htod(&[1.0f32], &mut fused.rows.one)?;
        }
        stream.memcpy_htod(&small_s::counters(seed, 0), &mut ws.counters)?;
        Ok(Self {
            plan,
            resident: Resident::new(kernels, stream, ws, |ws| &mut ws.one)?,
        })
    }

    /// The bytes of device memory this object holds, counted from its buffers: its
    /// workspace, `LossPlan::new(..)?.workspace()?.bytes::<T>()` for its layers (the
    /// gradients are the caller's).
    pub fn workspace_bytes(&self) -> usize {
        let Ok(lengths) = self.resident.workspace().try_map(length, length, length);
        lengths.bytes::<T>()
    }

    /// The layers, their centre counts and paths, and the temperature.
    pub fn plan(&self) -> &LossPlan {
        &self.plan
    }

    /// Sets the sampler's seed and the step it draws next (a copy from the host: not a part of
    /// a step, and not of a captured graph).
    pub fn reseed(&mut self, seed: u64, step: u64) -> Result<()> {
        let stream = self.resident.stream().clone();
        let counters = &mut self.resident.workspace_mut().counters;
        stream.memcpy_htod(&small_s::counters(seed, step), counters)?;
        Ok(())
    }

    /// The forward of every layer on `feats`: for each layer in order, `(feat_q, feat_k)`,
    /// the generated and the content image's features in the layer's shape. New centres are
    /// drawn on the device (the step advances). The loss, the sum over layers, stays on the
    /// device: [`loss`](Self::loss). Nothing is allocated and nothing waits. A call that
    /// returns an error before enqueuing leaves the object as it was.
    pub fn forward<F: DevicePtr<T>>(&mut self, feats: &[(&F, &F)]) -> Result<()> {
        self.run_forward(feats, Draw::Sample)
    }

    /// The forward with the caller's centres, one [`DeviceCenters`] per layer (drawn for the
    /// layer's map, `N` of them): copied on the device, so that the backward scatters with
    /// them; the device's step does not advance. For comparing with the reference. Every
    /// argument is checked before the copies: a call refused leaves the object as it was
    /// (the last forward's backward still runs); a copy that fails leaves no forward.
    pub fn forward_with_centers<F: DevicePtr<T>>(
        &mut self,
        feats: &[(&F, &F)],
        centers: &[&DeviceCenters],
    ) -> Result<()> {
        check_len("centres (layers)", self.plan.len(), centers.len())?;
        for (l, c) in centers.iter().enumerate() {
            let shape = self.plan.shape(l);
            c.check_map(shape.height(), shape.width(), self.plan.num_centers(l))?;
        }
        // The forward's plans, made to check the features (their guards dropped unused)
        // before the copies change the workspace's centres.
        {
            let (launcher, ws, _) = self.resident.forward_parts()?;
            let feats = Self::read_feats(&launcher, feats);
            let bufs = Self::write_workspace(&launcher, ws);
            self.plan.forward_plans::<T>(&feats, &bufs, Draw::Given)?;
        }
        let stream = self.resident.stream().clone();
        let (_, ws, forward_done) = self.resident.forward_parts()?;
        *forward_done = false;
        for (c, own) in centers.iter().zip(&mut ws.centers) {
            c.copy_into(&stream, &mut own.flat, &mut own.map)?;
        }
        self.run_forward(feats, Draw::Given)
    }

    fn read_feats<'a, F: DevicePtr<T>>(
        launcher: &CudaLauncher<'a>,
        feats: &[(&'a F, &'a F)],
    ) -> Vec<(Buf, Buf)> {
        feats
            .iter()
            .map(|(q, k)| (launcher.read(*q), launcher.read(*k)))
            .collect()
    }

    fn write_workspace<'a>(
        launcher: &CudaLauncher<'a>,
        ws: &'a mut Workspace<T>,
    ) -> LossWorkspace<Buf, Buf, Buf> {
        ws.map_mut(
            |s| launcher.write(s),
            |s| launcher.write(s),
            |s| launcher.write(s),
        )
    }

    /// Makes every plan of the forward (which checks every argument), then launches them.
    fn run_forward<F: DevicePtr<T>>(&mut self, feats: &[(&F, &F)], draw: Draw) -> Result<()> {
        let (launcher, ws, forward_done) = self.resident.forward_parts()?;
        let feats = Self::read_feats(&launcher, feats);
        let bufs = Self::write_workspace(&launcher, ws);
        let plans = self.plan.forward_plans::<T>(&feats, &bufs, draw)?;
        *forward_done = false;
        plans.launch(&launcher)?;
        *forward_done = true;
        Ok(())
    }

    /// The loss of the last forward, the sum over layers: one float32 on the device.
    pub fn loss(&self) -> &CudaSlice<f32> {
        &self.resident.workspace().loss
    }

    /// The backward of the last forward: adds `upstream[0]` (one float32 on the device, `1.0`
    /// when `None`) times the gradient of the loss to each layer's `grads_q[l]` (the generated
    /// image's feature gradients, the layer's shape and layout), and to `grads_k[l]` when
    /// given (the original detaches the content side). Deterministic: the same bits on every
    /// run. Nothing is allocated and nothing waits.
    pub fn backward<G: DevicePtrMut<T>>(
        &mut self,
        upstream: Option<&CudaView<'_, f32>>,
        grads_q: &mut [&mut G],
        grads_k: Option<&mut [&mut G]>,
    ) -> Result<()> {
        let (launcher, ws) = self.resident.backward()?;
        let grads_q: Vec<_> = grads_q.iter_mut().map(|g| launcher.write(*g)).collect();
        let grads_k: Option<Vec<_>> =
            grads_k.map(|k| k.iter_mut().map(|g| launcher.write(*g)).collect());
        let upstream = upstream.map(|u| launcher.read(u));
        let bufs = ws.map_mut(
            |s| launcher.write(s),
            |s| launcher.write(s),
            |s| launcher.write(s),
        );
        self.plan
            .backward::<T, _>(&launcher, &bufs, upstream, &grads_q, grads_k.as_deref())
    }
}
