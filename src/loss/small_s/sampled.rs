//! The difference rows of a learned head on the small-S path, at centres drawn on the device:
//! per training step, one launch draws every layer's centres and gathers both sides' raw
//! difference rows (the head runs on them, then the rows loss, [`SmallRowsPlan`]), and one
//! launch scatters the gradient of the rows into the feature-map gradients of every layer.
//! Nothing is built on the host and nothing waits for the device: the seed and the step live
//! in the workspace's counters, and every address in the launches' parameters, so that a
//! captured CUDA graph replays a step, each replay drawing new centres.
//!
//! [`SmallRowsPlan`]: super::SmallRowsPlan

use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::launch::small_s::{
    self, GatherLayer, GatherRows, MAX_LAYERS, MAX_ROWS, ScatterLayer, ScatterSide,
};
use crate::launch::{Buf, CentersBuf, LaunchPlan, Launcher};
use crate::loss::workspace;
use crate::shape::{FeatureShape, RowShape};

workspace! {
    /// The workspace of [`SampledRowsPlan`], int32 throughout. Its owner allocates it once and
    /// sets it before the first step: `counters` to [`small_s::counters`]`(seed, step)` (the
    /// step the first gather draws), `centers` to zeros and every entry of `maps` to -1 (no
    /// centre anywhere). The launches keep it so from then on: each gather advances the step
    /// and leaves the counts of finished blocks at 0.
    pub struct SampledRowsWorkspace<I> {
        ints {
            /// The sampler's seed and step and the gather's count of finished blocks,
            /// `int32[COUNTERS]` ([`small_s::COUNTERS`]).
            counters,
            /// Every layer's centres, `N` flat indices a layer, the layers one after another.
            centers,
            /// Every layer's inverse map, `H*W` a layer (the centre index at each position, or
            /// -1), the layers one after another.
            maps,
        }
    }
}

/// One layer: its shape, centres and where its part of the workspace starts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Layer {
    shape: FeatureShape,
    num_centers: usize,
    rows: RowShape,
    /// Offsets of the layer's centres and map in the workspace, in elements.
    centers_at: usize,
    map_at: usize,
}

/// The raw difference rows of every layer at centres the device draws, and the scatter of
/// their gradient: the learned heads' path for layers whose `S = 8N` is at most
/// [`MAX_ROWS`] (up to [`MAX_LAYERS`] layers). A training step is [`gather`](Self::gather),
/// the head and the rows loss on the rows, then [`scatter`](Self::scatter) of the gradient of
/// the rows through the head.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRowsPlan {
    layers: Vec<Layer>,
}

impl SampledRowsPlan {
    /// The plan of `layers`, each a feature-map shape and the `num_s` centres asked for (the
    /// layer takes `N = min(num_s, (H-2)(W-2))`, as [`LossPlan`]); every layer's `8N` at most
    /// [`MAX_ROWS`], 1 to [`MAX_LAYERS`] layers.
    ///
    /// [`LossPlan`]: crate::loss::multi_layer::LossPlan
    pub fn new(layers: &[(FeatureShape, usize)]) -> Result<Self> {
        if layers.is_empty() || layers.len() > MAX_LAYERS {
            return Err(Error::Shape(format!(
                "{} layers: sampled rows take 1 to {MAX_LAYERS}",
                layers.len()
            )));
        }
        let mut planned = Vec::with_capacity(layers.len());
        let (mut centers_at, mut map_at) = (0usize, 0usize);
        for (index, &(shape, num_s)) in layers.iter().enumerate() {
            if num_s == 0 {
                return Err(Error::NoCenters);
            }
            let num_centers = num_s.min(shape.interior());
            let rows = num_centers * ffi::CCPL_NUM_NEIGHBORS as usize;
            if !small_s::takes(rows) {
                return Err(Error::Shape(format!(
                    "layer {index}: S = 8 x {num_centers} = {rows} rows: sampled rows take at \
                     most {MAX_ROWS}"
                )));
            }
            planned.push(Layer {
                shape,
                num_centers,
                rows: RowShape::new(shape.batch(), rows, shape.channels())?,
                centers_at,
                map_at,
            });
            centers_at += num_centers;
            map_at += shape.height() * shape.width();
        }
        let plan = Self { layers: planned };
        // Both launches made once on placeholder buffers of the right lengths, so that layers
        // the kernels cannot run (a grid past CUDA's limits) are refused here.
        let nowhere = |len: usize| Buf { addr: 0, len };
        let ws = plan.workspace()?.try_map(|&n| Ok::<_, Error>(nowhere(n)))?;
        let feats: Vec<_> = plan
            .layers
            .iter()
            .map(|l| (nowhere(l.shape.len()), nowhere(l.shape.len())))
            .collect();
        let rows: Vec<_> = plan
            .layers
            .iter()
            .map(|l| (nowhere(l.rows.len()), nowhere(l.rows.len())))
            .collect();
        let sides: Vec<_> = plan
            .layers
            .iter()
            .map(|l| ScatterSide {
                grad_rows: nowhere(l.rows.len()),
                grad_feat: nowhere(l.shape.len()),
            })
            .collect();
        plan.gather_plan::<f32>(&feats, &rows, &ws)?;
        plan.scatter_plan::<f32>(&ws, nowhere(1), &sides, Some(&sides))?;
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
    /// Shape of layer `layer`'s feature maps. Panics when `layer >= len()`, as indexing does.
    pub fn shape(&self, layer: usize) -> &FeatureShape {
        &self.layers[layer].shape
    }
    /// Number of centres `N` of layer `layer`. Panics when `layer >= len()`.
    pub fn num_centers(&self, layer: usize) -> usize {
        self.layers[layer].num_centers
    }
    /// Shape of layer `layer`'s difference rows of one side, `(B, 8N, C)`. Panics when
    /// `layer >= len()`.
    pub fn rows_shape(&self, layer: usize) -> RowShape {
        self.layers[layer].rows
    }

    /// The lengths of the workspace's buffers, in int32 elements.
    pub fn workspace(&self) -> Result<SampledRowsWorkspace<usize>> {
        Ok(SampledRowsWorkspace {
            counters: small_s::COUNTERS,
            centers: self.layers.iter().map(|l| l.num_centers).sum(),
            maps: self
                .layers
                .iter()
                .map(|l| l.shape.height() * l.shape.width())
                .sum(),
        })
    }

    /// Layer `layer`'s centres in `ws`: those the last [`gather`](Self::gather) drew (for a
    /// caller's own launches on them, say
    /// [`neighbor_diff`](crate::launch::neighbor::neighbor_diff)).
    pub fn centers(&self, ws: &SampledRowsWorkspace<Buf>, layer: usize) -> Result<CentersBuf> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::Shape(format!(
                "layer {layer} of a plan of {} layers",
                self.layers.len()
            ))
        })?;
        let map_len = l.shape.height() * l.shape.width();
        Ok(CentersBuf {
            height: l.shape.height(),
            width: l.shape.width(),
            flat: ws
                .centers
                .part::<i32>("centers", l.centers_at, l.num_centers)?,
            map: ws.maps.part::<i32>("maps", l.map_at, map_len)?,
        })
    }

    /// Every layer's centres in `ws`, checked: the workspace holds every layer's part.
    fn all_centers(&self, ws: &SampledRowsWorkspace<Buf>) -> Result<Vec<CentersBuf>> {
        let lengths = self.workspace()?;
        check_len("centers", lengths.centers, ws.centers.len)?;
        check_len("maps", lengths.maps, ws.maps.len)?;
        (0..self.layers.len())
            .map(|l| self.centers(ws, l))
            .collect()
    }

    /// ONE launch, `small_s_gather_{T}`: draws every layer's centres on the device from the
    /// seed and step in `ws.counters` (advancing the step by one) into `ws`, and writes the raw
    /// difference rows of `feats[l].0` into `rows[l].0` and of `feats[l].1` into `rows[l].1`
    /// (`T`, `(B, 8N, C)` of [`rows_shape`](Self::rows_shape)`(l)`; the values and layout of
    /// [`neighbor_diff`](crate::launch::neighbor::neighbor_diff) at those centres). `feats`:
    /// each layer's `(feat_q, feat_k)` in its shape and layout, `T`.
    pub fn gather<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        feats: &[(Buf, Buf)],
        rows: &[(Buf, Buf)],
        ws: &SampledRowsWorkspace<Buf>,
    ) -> Result<(), L::Error> {
        launcher.launch(&self.gather_plan::<T>(feats, rows, ws)?)
    }

    /// The gather's launch, checked, not launched.
    pub(crate) fn gather_plan<T: Dtype>(
        &self,
        feats: &[(Buf, Buf)],
        rows: &[(Buf, Buf)],
        ws: &SampledRowsWorkspace<Buf>,
    ) -> Result<LaunchPlan<ffi::ccpl_small_s_gather_params>> {
        check_len("feature maps (layers)", self.layers.len(), feats.len())?;
        check_len("difference rows (layers)", self.layers.len(), rows.len())?;
        let layers = self
            .layers
            .iter()
            .zip(self.all_centers(ws)?)
            .zip(feats.iter().zip(rows))
            .map(
                |((l, centers), (&(feat_q, feat_k), &(rows_q, rows_k)))| GatherLayer {
                    shape: l.shape,
                    centers,
                    rows: Some(GatherRows {
                        feat_q,
                        feat_k,
                        rows_q,
                        rows_k,
                        norms: None,
                    }),
                },
            )
            .collect::<Vec<_>>();
        small_s::gather::<T>(&layers, ws.counters, true)
    }

    /// ONE launch, `small_s_scatter_{T}`: for every layer `l`, `q[l].grad_feat += upstream[0]
    /// *` the scatter of `q[l].grad_rows` (float32 `(B, 8N, C)`, the gradient of the rows
    /// [`gather`](Self::gather) wrote into `rows[l].0`) at the centres of that gather, and the
    /// same of `k[l]` when given. `upstream`: one float32 on the device. Deterministic: the
    /// same bits on every run.
    pub fn scatter<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &SampledRowsWorkspace<Buf>,
        upstream: Buf,
        q: &[ScatterSide],
        k: Option<&[ScatterSide]>,
    ) -> Result<(), L::Error> {
        launcher.launch(&self.scatter_plan::<T>(ws, upstream, q, k)?)
    }

    /// The scatter's launch, checked, not launched.
    pub(crate) fn scatter_plan<T: Dtype>(
        &self,
        ws: &SampledRowsWorkspace<Buf>,
        upstream: Buf,
        q: &[ScatterSide],
        k: Option<&[ScatterSide]>,
    ) -> Result<LaunchPlan<ffi::ccpl_small_s_scatter_params>> {
        check_len(
            "gradients of the q side (layers)",
            self.layers.len(),
            q.len(),
        )?;
        if let Some(k) = k {
            check_len(
                "gradients of the k side (layers)",
                self.layers.len(),
                k.len(),
            )?;
        }
        let layers = self
            .layers
            .iter()
            .zip(self.all_centers(ws)?)
            .enumerate()
            .map(|(i, (l, centers))| ScatterLayer {
                shape: l.shape,
                centers,
                q: q[i],
                k: k.map(|k| k[i]),
            })
            .collect::<Vec<_>>();
        small_s::scatter::<T>(&layers, upstream)
    }
}
