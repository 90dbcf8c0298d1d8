//! Launch builders of `kernels/small_s.cu`, the small-S path: the whole loss of every layer
//! whose `S = 8N` is at most [`MAX_ROWS`] in three launches per training step, each over
//! every layer ([`gather`], [`rows_forward`], [`scatter`]), and the rows loss of a learned
//! head in one launch forward ([`rows_forward`]) and one or two backward ([`rows_transposed`],
//! [`scale`]). The sequences that run them are [`crate::loss::small_s`] and
//! [`crate::loss::multi_layer`]; `docs/small-s.md` has the design and the arithmetic behind
//! [`MAX_ROWS`].
//!
//! The layers of a launch are described in its parameter struct (at most [`MAX_LAYERS`]), so
//! a launch holds every address it uses: a step captured in a CUDA graph replays as it was
//! captured.

use super::{Buf, CentersBuf, LaunchPlan, WARP, feature_map, i32_of, row_count, row_shape};
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::launch::neighbor;
use crate::shape::{FeatureShape, RowShape};
use crate::tau::Tau;

/// The largest `S` the small-S path takes: a block keeps its 16 rows of float logits against
/// all `S` rows of the other side in static shared memory (32 KB at 512).
pub const MAX_ROWS: usize = ffi::CCPL_SMALL_S_MAX_ROWS as usize;
/// Rows of one image a block of `small_s_rows` owns.
pub const TILE_ROWS: usize = ffi::CCPL_SMALL_S_TILE_ROWS as usize;
/// Layers one launch takes.
pub const MAX_LAYERS: usize = ffi::CCPL_SMALL_S_MAX_LAYERS as usize;
/// Words of the counters buffer (`int32`, read as `uint32` by the kernels): the sampler's
/// seed and step, and the kernels' counts of finished blocks.
pub const COUNTERS: usize = ffi::CCPL_COUNTERS as usize;

const BLOCK: u32 = ffi::CCPL_SMALL_S_BLOCK;
/// Blocks of one layer in the gather and the scatter; more rows or items are covered by a loop.
/// Every block of the gather draws its layer's centres, so fewer, busier blocks draw less.
const MAX_LAYER_BLOCKS: usize = 1024;

/// Whether `S` rows per image take the small-S path.
pub fn takes(rows: usize) -> bool {
    rows <= MAX_ROWS
}

/// The counters of a sampler starting at `step` under `seed`, as the kernels read them (each
/// 64-bit value as two 32-bit words, low first); no block counted.
pub fn counters(seed: u64, step: u64) -> [i32; COUNTERS] {
    let mut words = [0i32; COUNTERS];
    for (at, value) in [
        (ffi::CCPL_COUNTER_SEED, seed),
        (ffi::CCPL_COUNTER_STEP, step),
    ] {
        words[at as usize] = value as u32 as i32;
        words[at as usize + 1] = (value >> 32) as u32 as i32;
    }
    words
}

/// The step the counters `words` (`int32[COUNTERS]`, as downloaded) will draw next.
pub fn counters_step(words: &[i32]) -> Result<u64> {
    check_len("counters", COUNTERS, words.len())?;
    let t = ffi::CCPL_COUNTER_STEP as usize;
    Ok(words[t] as u32 as u64 | (words[t + 1] as u32 as u64) << 32)
}

/// Blocks of [`rows_forward`] for one layer: `B * ceil(S / 16)`.
pub fn rows_blocks(shape: &RowShape) -> usize {
    shape.batch() * shape.rows().div_ceil(TILE_ROWS)
}

fn check_layer_count(n: usize) -> Result<()> {
    if n == 0 || n > MAX_LAYERS {
        return Err(Error::Shape(format!(
            "{n} layers in one small-S launch: 1 to {MAX_LAYERS} are taken"
        )));
    }
    Ok(())
}

/// Blocks for `items` items of 256 threads, at most [`MAX_LAYER_BLOCKS`].
fn layer_blocks(items: usize) -> usize {
    items.div_ceil(BLOCK as usize).clamp(1, MAX_LAYER_BLOCKS)
}

/// The grid of layers with `blocks[l]` blocks each, and the first block of each.
fn first_blocks(blocks: impl Iterator<Item = usize>) -> Result<(u32, Vec<i32>)> {
    let mut firsts = Vec::new();
    let mut total = 0usize;
    for b in blocks {
        firsts.push(total);
        total += b;
    }
    if total > i32::MAX as usize {
        return Err(Error::Shape(format!("{total} blocks exceed the CUDA grid")));
    }
    Ok((
        total as u32,
        firsts.into_iter().map(i32_of).collect::<Result<_>>()?,
    ))
}

/// The rows of one layer the gather writes: both feature maps, and the row matrices
/// `(B, 8N, C)` they become.
#[derive(Debug, Clone, Copy)]
pub struct GatherRows {
    /// The generated image's features (layout of the shape, `T`).
    pub feat_q: Buf,
    /// The content image's features.
    pub feat_k: Buf,
    /// Out: the difference rows of `feat_q`: normalised in float32 when `norms` is given, else
    /// raw in `T`.
    pub rows_q: Buf,
    /// Out: the difference rows of `feat_k`.
    pub rows_k: Buf,
    /// `Some((norms_q, norms_k))`: the rows are written normalised, float32, and these get
    /// their norms, `B*8N` floats each (inf past float's range): the identity head's loss.
    /// `None`: the rows are written raw in the launch's `T`, the values and layout of
    /// [`neighbor_diff`](super::neighbor::neighbor_diff) (formed in float, rounded once): a
    /// learned head's input.
    pub norms: Option<(Buf, Buf)>,
}

/// One layer of a gather: its centres, and its rows when its loss runs on the small-S path
/// (`None`: the centres are only drawn, for a layer on the fused path).
#[derive(Debug, Clone, Copy)]
pub struct GatherLayer {
    /// Shape of the feature maps.
    pub shape: FeatureShape,
    /// The layer's centres: written when drawing, read otherwise.
    pub centers: CentersBuf,
    /// The rows to gather.
    pub rows: Option<GatherRows>,
}

/// `small_s_gather_{T}`: for every layer, its centres (drawn on the device from the seed and
/// step in `counters` when `sample`, the step then advanced by one; else those in the
/// layers' centre buffers) and, for the layers that have rows, their difference rows
/// ([`GatherRows::norms`]): normalised in float (a warp per row, as
/// [`neighbor_diff_normalize`](super::neighbor::neighbor_diff_normalize): no difference row is
/// stored, so none overflows float) with their norms, or raw in `T` (a thread per image,
/// centre and channel, as [`neighbor_diff`](super::neighbor::neighbor_diff)).
pub fn gather<T: Dtype>(
    layers: &[GatherLayer],
    counters: Buf,
    sample: bool,
) -> Result<LaunchPlan<ffi::ccpl_small_s_gather_params>> {
    check_layer_count(layers.len())?;
    check_len("counters", COUNTERS, counters.len)?;
    let mut blocks = Vec::with_capacity(layers.len());
    let mut maps = Vec::with_capacity(layers.len());
    for l in layers {
        maps.push(feature_map(&l.shape, &l.centers)?);
        let n = l.centers.len();
        blocks.push(match &l.rows {
            Some(r) => {
                // Every block of a layer with rows draws its centres into shared memory.
                if n * ffi::CCPL_NUM_NEIGHBORS as usize > MAX_ROWS {
                    return Err(Error::Shape(format!(
                        "{n} centres: the small-S path takes at most {}",
                        MAX_ROWS / ffi::CCPL_NUM_NEIGHBORS as usize
                    )));
                }
                let rows = neighbor::rows_len(&l.shape, n)?;
                check_len("feat_q", l.shape.len(), r.feat_q.len)?;
                check_len("feat_k", l.shape.len(), r.feat_k.len)?;
                check_len("rows_q", rows, r.rows_q.len)?;
                check_len("rows_k", rows, r.rows_k.len)?;
                match r.norms {
                    Some((norms_q, norms_k)) => {
                        let norms = l.shape.batch() * n * ffi::CCPL_NUM_NEIGHBORS as usize;
                        check_len("norms_q", norms, norms_q.len)?;
                        check_len("norms_k", norms, norms_k.len)?;
                        // A warp per row of either side.
                        layer_blocks(2 * norms * WARP)
                    }
                    // A thread per (image, centre, channel) of either side.
                    None => layer_blocks(2 * l.shape.batch() * n * l.shape.channels()),
                }
            }
            None => 1,
        });
    }
    let (grid, firsts) = first_blocks(blocks.into_iter())?;
    let mut params = ffi::ccpl_small_s_gather_params {
        counters: counters.addr,
        num_layers: i32_of(layers.len())?,
        sample: sample.into(),
        ..Default::default()
    };
    let described = layers.iter().zip(maps).zip(firsts);
    for (((l, (map_params, center_params)), first), out) in described.zip(params.layers.iter_mut())
    {
        // A layer drawn only has null feature maps (the kernel's sign to gather nothing).
        let nothing = Buf { addr: 0, len: 0 };
        let r = l.rows.unwrap_or(GatherRows {
            feat_q: nothing,
            feat_k: nothing,
            rows_q: nothing,
            rows_k: nothing,
            norms: None,
        });
        // Null norms: the kernel's sign to write raw rows.
        let (norms_q, norms_k) = r.norms.map_or((0, 0), |(q, k)| (q.addr, k.addr));
        *out = ffi::ccpl_small_s_gather_layer {
            feat_q: r.feat_q.addr,
            feat_k: r.feat_k.addr,
            rows_q: r.rows_q.addr,
            rows_k: r.rows_k.addr,
            norms_q,
            norms_k,
            centers: center_params,
            shape: map_params,
            first_block: first,
        };
    }
    Ok(launch::<T, _>("small_s_gather", (grid, 1, 1), params))
}

/// One layer of [`rows_forward`] or [`rows_transposed`].
#[derive(Debug, Clone, Copy)]
pub struct RowsLayer {
    /// `(B, S, C)`, `S` at most [`MAX_ROWS`].
    pub shape: RowShape,
    /// The generated side's rows `(B, S, C)`, in the launch's storage type.
    pub rows_q: Buf,
    /// The content side's rows.
    pub rows_k: Buf,
    /// `None`: the rows are raw, normalised by the launch (at their scale, so that rows of any
    /// magnitude are right). `Some((norms_q, norms_k))`: the rows are normalised already (the
    /// gather's, float), and these are their norms, `B*S` floats each. Every layer of a launch
    /// is one or the other.
    pub norms: Option<(Buf, Buf)>,
    /// Out: the gradient of the loss (upstream 1) with respect to the rows of one side,
    /// float `(B, S, C)`.
    pub grad_rows: Buf,
    /// Per row of q, `B*S` floats: written by the forward, read by the transposed launch.
    pub row_lse: Buf,
    /// Per row of q, `B*S` floats: the row losses.
    pub row_loss: Buf,
    /// Out (forward only, or `None`): float copies of `rows_q` and `rows_k`, for a later
    /// transposed launch when the caller may change its rows in between.
    pub copies: Option<(Buf, Buf)>,
}

/// Where [`rows_forward`] puts the loss: the last block to finish sums each layer's row losses
/// in double.
#[derive(Debug, Clone, Copy)]
pub struct RowsTotals {
    /// The counters (`int32[COUNTERS]`): the count of finished blocks.
    pub counters: Buf,
    /// Out: each layer's loss, one float a layer.
    pub layer_loss: Buf,
    /// Out: the sum of the layers' losses, one float.
    pub loss: Buf,
}

fn rows_plan<T: Dtype>(
    layers: &[RowsLayer],
    tau: Tau,
    transpose: bool,
    totals: Option<&RowsTotals>,
) -> Result<LaunchPlan<ffi::ccpl_small_s_rows_params>> {
    check_layer_count(layers.len())?;
    let inv_tau = tau.inverse();
    let normalized = layers[0].norms.is_some();
    if layers.iter().any(|l| l.norms.is_some() != normalized) {
        return Err(Error::Shape(
            "a small-S launch takes normalised rows (with norms) or raw rows, not both".into(),
        ));
    }
    if normalized && T::SUFFIX != f32::SUFFIX {
        return Err(Error::Shape(format!(
            "normalised rows are float32 (the gather's), not {}",
            T::SUFFIX
        )));
    }
    for l in layers {
        if !takes(l.shape.rows()) {
            return Err(Error::Shape(format!(
                "S = {} rows: the small-S path takes at most {MAX_ROWS}",
                l.shape.rows()
            )));
        }
        let stats = row_count(&l.shape)?;
        check_len("rows_q", l.shape.len(), l.rows_q.len)?;
        check_len("rows_k", l.shape.len(), l.rows_k.len)?;
        check_len("grad_rows", l.shape.len(), l.grad_rows.len)?;
        check_len("row_lse", stats, l.row_lse.len)?;
        check_len("row_loss", stats, l.row_loss.len)?;
        if let Some((q, k)) = l.norms {
            check_len("norms_q", stats, q.len)?;
            check_len("norms_k", stats, k.len)?;
        }
        if let Some((q, k)) = l.copies {
            if normalized {
                return Err(Error::Shape(
                    "normalised rows are not copied (their copies are the raw rows')".into(),
                ));
            }
            check_len("copy of rows_q", l.shape.len(), q.len)?;
            check_len("copy of rows_k", l.shape.len(), k.len)?;
        }
    }
    let (grid, firsts) = first_blocks(layers.iter().map(|l| rows_blocks(&l.shape)))?;
    let mut params = ffi::ccpl_small_s_rows_params {
        num_layers: i32_of(layers.len())?,
        transpose: transpose.into(),
        normalized: normalized.into(),
        inv_tau,
        ..Default::default()
    };
    if let Some(t) = totals {
        check_len("counters", COUNTERS, t.counters.len)?;
        check_len("layer_loss", layers.len(), t.layer_loss.len)?;
        check_len("loss", 1, t.loss.len)?;
        params.counters = t.counters.addr;
        params.layer_loss = t.layer_loss.addr;
        params.loss = t.loss.addr;
    }
    for ((l, first), out) in layers.iter().zip(firsts).zip(params.layers.iter_mut()) {
        let (copy_q, copy_k) = l.copies.map_or((0, 0), |(q, k)| (q.addr, k.addr));
        let (norms_q, norms_k) = l.norms.map_or((0, 0), |(q, k)| (q.addr, k.addr));
        *out = ffi::ccpl_small_s_rows_layer {
            rows_q: l.rows_q.addr,
            rows_k: l.rows_k.addr,
            norms_q,
            norms_k,
            grad_rows: l.grad_rows.addr,
            row_lse: l.row_lse.addr,
            row_loss: l.row_loss.addr,
            copy_q,
            copy_k,
            shape: row_shape(&l.shape)?,
            first_block: first,
        };
    }
    Ok(launch::<T, _>("small_s_rows", (grid, 1, 1), params))
}

/// `small_s_rows_{T}`, forward: for every layer, the rows loss of `rows_q` against `rows_k`
/// (both in `T`) and its gradient with respect to `rows_q` for an upstream gradient of 1,
/// float, in `grad_rows`; the row statistics; each layer's loss and their sum in `totals`
/// (the row losses summed in double). One block per 16 rows of an image.
pub fn rows_forward<T: Dtype>(
    layers: &[RowsLayer],
    tau: Tau,
    totals: &RowsTotals,
) -> Result<LaunchPlan<ffi::ccpl_small_s_rows_params>> {
    rows_plan::<T>(layers, tau, false, Some(totals))
}

/// `small_s_rows_{T}`, transposed: the gradient with respect to `rows_k` into `grad_rows`,
/// from the row statistics [`rows_forward`] left.
pub fn rows_transposed<T: Dtype>(
    layers: &[RowsLayer],
    tau: Tau,
) -> Result<LaunchPlan<ffi::ccpl_small_s_rows_params>> {
    if let Some(l) = layers.iter().find(|l| l.copies.is_some()) {
        return Err(Error::Shape(format!(
            "a transposed launch copies no rows ({:?} given)",
            l.copies
        )));
    }
    rows_plan::<T>(layers, tau, true, None)
}

/// The gradient of one side of one layer for [`scatter`]: the float gradient of its
/// difference rows `(B, 8N, C)`, and the feature-map gradient it is added to (`T`).
#[derive(Debug, Clone, Copy)]
pub struct ScatterSide {
    /// In: float `(B, 8N, C)`.
    pub grad_rows: Buf,
    /// In/out: layout of the feature map, `T`, accumulated into.
    pub grad_feat: Buf,
}

/// One layer of [`scatter`].
#[derive(Debug, Clone, Copy)]
pub struct ScatterLayer {
    /// Shape of the feature maps.
    pub shape: FeatureShape,
    /// The centres of the forward.
    pub centers: CentersBuf,
    /// The generated side.
    pub q: ScatterSide,
    /// The content side, when it gets a gradient.
    pub k: Option<ScatterSide>,
}

/// `small_s_scatter_{T}`: `grad_feat += upstream[0] *` the scatter of each side's row
/// gradient (a centre gets `+g`, its neighbour `-g`), every layer in one launch,
/// deterministic.
pub fn scatter<T: Dtype>(
    layers: &[ScatterLayer],
    upstream: Buf,
) -> Result<LaunchPlan<ffi::ccpl_small_s_scatter_params>> {
    check_layer_count(layers.len())?;
    check_len("upstream", 1, upstream.len)?;
    let mut maps = Vec::with_capacity(layers.len());
    for l in layers {
        maps.push(feature_map(&l.shape, &l.centers)?);
        let rows = neighbor::rows_len(&l.shape, l.centers.len())?;
        for side in std::iter::once(&l.q).chain(&l.k) {
            check_len("grad_rows", rows, side.grad_rows.len)?;
            check_len("grad_feat", l.shape.len(), side.grad_feat.len)?;
        }
    }
    let (grid, firsts) = first_blocks(
        layers
            .iter()
            .map(|l| layer_blocks(l.shape.batch() * l.centers.len() * l.shape.channels())),
    )?;
    let sides = if layers.iter().any(|l| l.k.is_some()) {
        2
    } else {
        1
    };
    let mut params = ffi::ccpl_small_s_scatter_params {
        upstream: upstream.addr,
        num_layers: i32_of(layers.len())?,
        ..Default::default()
    };
    let described = layers.iter().zip(maps).zip(firsts);
    for (((l, (map_params, center_params)), first), out) in described.zip(params.layers.iter_mut())
    {
        let k = l.k.map_or((0, 0), |k| (k.grad_rows.addr, k.grad_feat.addr));
        *out = ffi::ccpl_small_s_scatter_layer {
            grad_rows_q: l.q.grad_rows.addr,
            grad_rows_k: k.0,
            grad_feat_q: l.q.grad_feat.addr,
            grad_feat_k: k.1,
            centers: center_params,
            shape: map_params,
            first_block: first,
        };
    }
    Ok(launch::<T, _>("small_s_scatter", (grid, sides, 1), params))
}

/// `small_s_scale_{T}`: `out = upstream[0] * grad_rows`, rounded to `T`, for the q side and,
/// when given, the k side (`(grad_rows, out)` pairs of `count` elements).
pub fn scale<T: Dtype>(
    count: usize,
    upstream: Buf,
    q: (Buf, Buf),
    k: Option<(Buf, Buf)>,
) -> Result<LaunchPlan<ffi::ccpl_small_s_scale_params>> {
    if count == 0 || count > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "{count} elements to scale: at least 1 and within i32"
        )));
    }
    check_len("upstream", 1, upstream.len)?;
    for (grad, out) in std::iter::once(q).chain(k) {
        check_len("grad_rows", count, grad.len)?;
        check_len("out", count, out.len)?;
    }
    let (k_grad, k_out) = k.map_or((0, 0), |(g, o)| (g.addr, o.addr));
    let params = ffi::ccpl_small_s_scale_params {
        grad_rows_q: q.0.addr,
        grad_rows_k: k_grad,
        out_q: q.1.addr,
        out_k: k_out,
        upstream: upstream.addr,
        count: i32_of(count)?,
    };
    let sides = if k.is_some() { 2 } else { 1 };
    let grid = (super::grid_stride_blocks(count, BLOCK), sides, 1);
    Ok(launch::<T, _>("small_s_scale", grid, params))
}

/// The launch of the `T` variant of the small-S kernel `kernel` on `grid`, in blocks of
/// [`BLOCK`] threads.
fn launch<T: Dtype, P>(kernel: &str, grid: (u32, u32, u32), params: P) -> LaunchPlan<P> {
    LaunchPlan::new(format!("{kernel}_{}", T::SUFFIX), grid, BLOCK, params)
}
