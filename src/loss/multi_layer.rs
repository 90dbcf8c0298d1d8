//! The whole CCP loss, every layer (identity head), as launch plans over buffers: the plan
//! of [`CcpLoss`](crate::cuda::CcpLoss), generic over the [`Launcher`] so the GPU and the CPU
//! emulator run the very same launch code; the loss of [`crate::reference::ccp_loss`].
//!
//! Layers whose `S = 8N` is at most [`small_s::MAX_ROWS`] run on the small-S path, all of
//! them in the same launches: a training step is three launches (draw the centres and gather
//! the rows; the loss and the gradient of the rows; the scatter into the feature-map
//! gradients), whatever the number of layers. Larger layers run the fused (flash) path of
//! [`LayerPlan`], each with its own launches; their centres are drawn by the same first
//! launch, and their losses are added to the same total on the device.

use super::layer::{LayerForward, LayerPlan, LayerWorkspace};
use super::small_s::{RowsIn, SmallOffsets, SmallSWorkspace};
use super::workspace;
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::launch::neighbor::Scatter;
use crate::launch::small_s::{self, GatherLayer, RowsTotals, ScatterLayer, ScatterSide};
use crate::launch::{Buf, CentersBuf, KernelParams, LaunchPlan, Launcher, info_nce};
use crate::shape::{FeatureShape, RowShape};
use crate::tau::Tau;

/// Where a layer's centres come from in a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// Drawn on the device from the workspace's seed and step ([`small_s::counters`]); the
    /// step advances by one. What a training step does.
    Sample,
    /// Those already in the workspace's centre buffers (the caller's own draw, e.g. to compare
    /// with the reference); the step does not advance.
    Given,
}

workspace! {
    /// The centre buffers of one layer: `int32[N]` and the inverse map `int32[H*W]`.
    pub struct CenterBuffers<I> {
        ints {
            /// The flat indices.
            flat,
            /// The centre index at each position, or -1.
            map,
        }
    }
}

workspace! {
    /// The workspace of the whole loss, generic over what holds a buffer (`R`: rows in the
    /// storage type, `F`: float32, `I`: int32), as the other workspaces.
    pub struct LossWorkspace<R, F, I> {
        rows {}
        stats {
            /// The loss, the sum over the layers: one float32.
            loss,
            /// One float32, `1.0`: the upstream gradient when the caller gives none. Its owner
            /// sets it.
            one,
        }
        ints {
            /// The sampler's seed and step and the kernels' counts (`int32[small_s::COUNTERS]`).
            counters,
        }
        parts {
            /// The small-S layers' buffers (float32 throughout), when there are such layers.
            small: Option<SmallSWorkspace<F, F>>,
            /// The workspace of each layer on the fused path, in layer order.
            fused: Vec<LayerWorkspace<R, F>>,
            /// Every layer's centres, in layer order.
            centers: Vec<CenterBuffers<I>>,
        }
    }
}

/// How a layer's loss runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// In the small-S launches: the layer's part of the workspace.
    Small { at: SmallOffsets },
    /// On the fused path: the layer's plan and its index among the fused layers.
    Fused { plan: LayerPlan, index: usize },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Layer {
    shape: FeatureShape,
    num_centers: usize,
    path: Path,
}

impl Layer {
    fn rows(&self) -> Result<RowShape> {
        RowShape::new(
            self.shape.batch(),
            ffi::CCPL_NUM_NEIGHBORS as usize * self.num_centers,
            self.shape.channels(),
        )
    }
}

/// The whole loss: the layers' shapes and centre counts and one temperature, validated once.
/// Its forward and backward validate every buffer, then launch.
#[derive(Debug, Clone, PartialEq)]
pub struct LossPlan {
    layers: Vec<Layer>,
    tau: Tau,
}

impl LossPlan {
    /// The loss of `layers`, each a feature-map shape and the `num_s` centres asked for (the
    /// layer takes `N = min(num_s, (H-2)(W-2))`, as [`crate::Centers::sample`]), at
    /// temperature `tau`. At most [`small_s::MAX_LAYERS`] layers.
    pub fn new(layers: &[(FeatureShape, usize)], tau: Tau) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Shape("the loss needs at least one layer".into()));
        }
        if layers.len() > small_s::MAX_LAYERS {
            return Err(Error::Shape(format!(
                "{} layers: at most {} are taken",
                layers.len(),
                small_s::MAX_LAYERS
            )));
        }
        let mut fused = 0;
        let mut at = SmallOffsets::START;
        let mut planned = Vec::with_capacity(layers.len());
        for &(shape, num_s) in layers {
            if num_s == 0 {
                return Err(Error::NoCenters);
            }
            let num_centers = num_s.min(shape.interior());
            let rows = num_centers * ffi::CCPL_NUM_NEIGHBORS as usize;
            let path = if small_s::takes(rows) {
                let row_shape = RowShape::new(shape.batch(), rows, shape.channels())?;
                let path = Path::Small { at };
                at = at.after(&row_shape)?;
                path
            } else {
                let path = Path::Fused {
                    plan: LayerPlan::new(shape, num_centers, tau)?,
                    index: fused,
                };
                fused += 1;
                path
            };
            planned.push(Layer {
                shape,
                num_centers,
                path,
            });
        }
        let plan = Self {
            layers: planned,
            tau,
        };
        // Every launch of a step made once, on placeholder buffers of the right lengths, so
        // that a loss the kernels cannot run (a grid past CUDA's limits) is refused here.
        let nowhere = |len: usize| Buf { addr: 0, len };
        let ws = plan.workspace()?.try_map(
            |&n| Ok::<_, Error>(nowhere(n)),
            |&n| Ok(nowhere(n)),
            |&n| Ok(nowhere(n)),
        )?;
        let feats: Vec<_> = plan
            .layers
            .iter()
            .map(|l| (nowhere(l.shape.len()), nowhere(l.shape.len())))
            .collect();
        let grads: Vec<_> = feats.iter().map(|f| f.0).collect();
        plan.forward::<f32, _>(&Unlaunched, &feats, &ws, Draw::Sample)?;
        plan.backward::<f32, _>(&Unlaunched, &ws, None, &grads, Some(&grads))?;
        Ok(plan)
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Never true: there is at least one layer.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// Shape of layer `l`'s feature maps.
    pub fn shape(&self, l: usize) -> &FeatureShape {
        &self.layers[l].shape
    }
    /// Number of centres `N` of layer `l`.
    pub fn num_centers(&self, l: usize) -> usize {
        self.layers[l].num_centers
    }
    /// Whether layer `l` runs on the small-S path (else the fused path).
    pub fn is_small(&self, l: usize) -> bool {
        matches!(self.layers[l].path, Path::Small { .. })
    }
    /// Temperature.
    pub fn tau(&self) -> Tau {
        self.tau
    }

    fn small_layers(&self) -> impl Iterator<Item = (&Layer, SmallOffsets)> {
        self.layers.iter().filter_map(|l| match l.path {
            Path::Small { at } => Some((l, at)),
            Path::Fused { .. } => None,
        })
    }

    /// The length in elements of every buffer.
    pub fn workspace(&self) -> Result<LossWorkspace<usize, usize, usize>> {
        let small_rows = self
            .small_layers()
            .map(|(l, _)| l.rows())
            .collect::<Result<Vec<_>>>()?;
        let fused = self
            .layers
            .iter()
            .filter(|l| !matches!(l.path, Path::Small { .. }))
            .map(|l| LayerWorkspace::lengths(&l.shape, l.num_centers))
            .collect::<Result<_>>()?;
        Ok(LossWorkspace {
            small: if small_rows.is_empty() {
                None
            } else {
                Some(SmallSWorkspace::lengths(&small_rows)?)
            },
            fused,
            centers: self
                .layers
                .iter()
                .map(|l| CenterBuffers {
                    flat: l.num_centers,
                    map: l.shape.height() * l.shape.width(),
                })
                .collect(),
            counters: small_s::COUNTERS,
            loss: 1,
            one: 1,
        })
    }

    fn centers(&self, ws: &LossWorkspace<Buf, Buf, Buf>) -> Result<Vec<CentersBuf>> {
        check_len("centre buffers", self.layers.len(), ws.centers.len())?;
        self.layers
            .iter()
            .zip(&ws.centers)
            .map(|(l, c)| {
                // Checked here, by name: a launch reads N from the buffer, and would blame
                // the rows, sized for the plan's N. (Each launch checks the map.)
                check_len("centers", l.num_centers, c.flat.len)?;
                Ok(CentersBuf {
                    height: l.shape.height(),
                    width: l.shape.width(),
                    flat: c.flat,
                    map: c.map,
                })
            })
            .collect()
    }

    fn small_ws<'w>(
        &self,
        ws: &'w LossWorkspace<Buf, Buf, Buf>,
    ) -> Result<&'w SmallSWorkspace<Buf, Buf>> {
        ws.small
            .as_ref()
            .ok_or_else(|| Error::Shape("the workspace has no small-S part".into()))
    }

    fn fused_ws<'w>(
        &self,
        ws: &'w LossWorkspace<Buf, Buf, Buf>,
        index: usize,
    ) -> Result<&'w LayerWorkspace<Buf, Buf>> {
        ws.fused
            .get(index)
            .ok_or_else(|| Error::Shape(format!("the workspace has no fused layer {index}")))
    }

    /// The forward of every layer on `feats` (`(feat_q, feat_k)` of each layer, in its shape
    /// and layout): the centres (drawn on the device, or given), the loss of each layer and
    /// their sum in `ws.loss`, and everything the backward reads. Every plan is made (and so
    /// every buffer checked) before the first launch.
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        feats: &[(Buf, Buf)],
        ws: &LossWorkspace<Buf, Buf, Buf>,
        draw: Draw,
    ) -> Result<(), L::Error> {
        self.forward_plans::<T>(feats, ws, draw)?.launch(launcher)
    }

    /// The forward's plans, checked, not launched.
    pub(crate) fn forward_plans<T: Dtype>(
        &self,
        feats: &[(Buf, Buf)],
        ws: &LossWorkspace<Buf, Buf, Buf>,
        draw: Draw,
    ) -> Result<LossForward> {
        check_len("feature maps (layers)", self.layers.len(), feats.len())?;
        check_len("loss", 1, ws.loss.len)?;
        let centers = self.centers(ws)?;
        let any_small = self.small_layers().next().is_some();
        let gather = if draw == Draw::Sample || any_small {
            let mut layers = Vec::with_capacity(self.layers.len());
            for ((l, c), &(feat_q, feat_k)) in self.layers.iter().zip(&centers).zip(feats) {
                let rows = match l.path {
                    Path::Small { at } => {
                        Some(
                            self.small_ws(ws)?
                                .gather_rows(&l.rows()?, at, feat_q, feat_k)?,
                        )
                    }
                    Path::Fused { .. } => None,
                };
                layers.push(GatherLayer {
                    shape: l.shape,
                    centers: *c,
                    rows,
                });
            }
            Some(small_s::gather::<T>(
                &layers,
                ws.counters,
                draw == Draw::Sample,
            )?)
        } else {
            None
        };
        let rows = if any_small {
            let small = self.small_ws(ws)?;
            let layers = self
                .small_layers()
                .map(|(l, at)| small.rows_layer(&l.rows()?, at, RowsIn::Gathered, false))
                .collect::<Result<Vec<_>>>()?;
            let totals = RowsTotals {
                counters: ws.counters,
                layer_loss: small.layer_loss,
                loss: ws.loss,
            };
            // The rows are float (the gather's normalised rows), whatever T the maps are.
            Some(small_s::rows_forward::<f32>(&layers, self.tau, &totals)?)
        } else {
            None
        };
        // Each fused layer: its own launches, then its loss added to the total (the first
        // writes it when no small-S launch did).
        let mut fused = Vec::new();
        for (l, (c, &(feat_q, feat_k))) in self.layers.iter().zip(centers.iter().zip(feats)) {
            if let Path::Fused { plan, index } = &l.path {
                let lws = self.fused_ws(ws, *index)?;
                let accumulate = any_small || *index > 0;
                let add = info_nce::info_nce_loss(lws.rows.row_loss, ws.loss, accumulate)?;
                fused.push((plan.forward_plans::<T>(c, feat_q, feat_k, lws)?, add));
            }
        }
        Ok(LossForward {
            gather,
            rows,
            fused,
        })
    }

    /// The backward after [`forward`](Self::forward) with the same `ws`: adds `upstream[0]`
    /// (one float32 on the device; `ws.one` when `None`) times the gradient of the loss to
    /// each layer's `grads_q[l]` (the generated image's feature gradients), and to
    /// `grads_k[l]` when given (as if the content side were not detached). Deterministic:
    /// the same bits on every run. Every plan is made before the first launch.
    pub fn backward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &LossWorkspace<Buf, Buf, Buf>,
        upstream: Option<Buf>,
        grads_q: &[Buf],
        grads_k: Option<&[Buf]>,
    ) -> Result<(), L::Error> {
        check_len(
            "gradients of feat_q (layers)",
            self.layers.len(),
            grads_q.len(),
        )?;
        if let Some(k) = grads_k {
            check_len("gradients of feat_k (layers)", self.layers.len(), k.len())?;
        }
        let upstream = upstream.unwrap_or(ws.one);
        let centers = self.centers(ws)?;
        let mut transposed = None;
        let mut scatter = None;
        if self.small_layers().next().is_some() {
            let small = self.small_ws(ws)?;
            if grads_k.is_some() {
                let layers = self
                    .small_layers()
                    .map(|(l, at)| small.rows_layer(&l.rows()?, at, RowsIn::Gathered, true))
                    .collect::<Result<Vec<_>>>()?;
                transposed = Some(small_s::rows_transposed::<f32>(&layers, self.tau)?);
            }
            let mut layers = Vec::new();
            for (i, (l, c)) in self.layers.iter().zip(&centers).enumerate() {
                let Path::Small { at } = l.path else {
                    continue;
                };
                let len = l.rows()?.len();
                layers.push(ScatterLayer {
                    shape: l.shape,
                    centers: *c,
                    q: ScatterSide {
                        grad_rows: small.grad_rows_q.part::<f32>("grad_rows_q", at.rows, len)?,
                        grad_feat: grads_q[i],
                    },
                    k: match grads_k {
                        Some(k) => Some(ScatterSide {
                            grad_rows: small.grad_rows_k.part::<f32>(
                                "grad_rows_k",
                                at.rows,
                                len,
                            )?,
                            grad_feat: k[i],
                        }),
                        None => None,
                    },
                });
            }
            scatter = Some(small_s::scatter::<T>(&layers, upstream)?);
        }
        let mut fused = Vec::new();
        for (i, (l, c)) in self.layers.iter().zip(&centers).enumerate() {
            if let Path::Fused { plan, index } = &l.path {
                fused.push(plan.backward_plans::<T>(
                    c,
                    self.fused_ws(ws, *index)?,
                    upstream,
                    (grads_q[i], grads_k.map(|k| k[i])),
                    Scatter::Deterministic,
                )?);
            }
        }
        if let Some(plan) = &transposed {
            launcher.launch(plan)?;
        }
        if let Some(plan) = &scatter {
            launcher.launch(plan)?;
        }
        for layer in &fused {
            layer.launch(launcher)?;
        }
        Ok(())
    }
}

/// The forward's launches: the centres and the small-S layers' rows, their loss, then each
/// fused layer's launches and the addition of its loss to the total.
pub(crate) struct LossForward {
    gather: Option<LaunchPlan<ffi::ccpl_small_s_gather_params>>,
    rows: Option<LaunchPlan<ffi::ccpl_small_s_rows_params>>,
    fused: Vec<(LayerForward, LaunchPlan<ffi::ccpl_info_nce_loss_params>)>,
}

impl LossForward {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        if let Some(plan) = &self.gather {
            launcher.launch(plan)?;
        }
        if let Some(plan) = &self.rows {
            launcher.launch(plan)?;
        }
        for (layer, add) in &self.fused {
            layer.launch(launcher)?;
            launcher.launch(add)?;
        }
        Ok(())
    }
}

/// Makes plans and launches nothing: the checks of [`LossPlan::new`].
struct Unlaunched;

impl Launcher for Unlaunched {
    type Error = Error;
    fn launch<P: KernelParams>(&self, _: &LaunchPlan<P>) -> Result<()> {
        Ok(())
    }
}
