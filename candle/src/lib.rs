//! # ccpl-candle
//!
//! The Contrastive Coherence Preserving loss (CCPL, Wu et al., ECCV 2022) as differentiable
//! [candle](https://github.com/huggingface/candle) ops, on candle's CPU backend by ccpl's
//! float64 reference and on its CUDA backend (feature `cuda`) by ccpl's kernels on candle's
//! own stream: nothing is copied to the host and nothing waits. The backward of each op runs
//! ccpl's backward (kernels), so the ops take part in candle's autograd like its own.
//!
//! - [`ccp_layer_loss`]: the loss of one encoder layer from the two feature maps (identity
//!   head), the gradient reaching the generated image's features;
//! - [`neighbor_diff`] and [`rows_loss`]: the same loss in two halves, so that a projection
//!   head written with candle-nn (the paper's `Linear, ReLU, Linear` per layer) sits between
//!   them and gets its gradients from candle's autograd.
//!
//! Centres are a [`Centers`] (distinct interior positions of an `H x W` map, checked when
//! made, drawn by [`Centers::sample`] from a seed or taken from the caller's flat indices by
//! [`Centers::from_flat`]), not a tensor: they are chosen on the host, new for every layer
//! and step, and uploaded by the op that uses them. Feature maps are `(B, C, H, W)`
//! (candle's layout); other strides are made contiguous first. Storage types `f32`, `f16`,
//! `bf16` (float accumulation on CUDA), and `f64` on the CPU; the loss has the inputs' dtype.
//! Bad shapes, dtypes, devices, centres or temperatures give a candle error naming the op and
//! the problem, before anything runs.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap, linear};
//! use ccpl_candle::{Centers, DEFAULT_TAU, neighbor_diff, rows_loss};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let (b, c, h, w) = (2, 32, 16, 16);
//! let feat_q = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?; // generated image's features
//! let feat_k = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?; // content image's
//! let centers = Centers::sample(h, w, 8, /* seed */ 7).map_err(candle_core::Error::wrap)?;
//!
//! // The paper's head for this layer: Linear(C, C), ReLU, Linear(C, C/4), shared by both sides.
//! let vars = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
//! let (l1, l2) = (linear(c, c, vb.pp("l1"))?, linear(c, c / 4, vb.pp("l2"))?);
//! let head = |rows: &Tensor| l2.forward(&l1.forward(rows)?.relu()?);
//!
//! let q = head(&neighbor_diff(&feat_q, &centers)?)?; // (B, 8N, C/4)
//! let k = head(&neighbor_diff(&feat_k, &centers)?)?.detach(); // the content side, detached
//! let loss = rows_loss(&q, &k, DEFAULT_TAU)?;
//! let grads = loss.backward()?; // the head's weights get their gradients
//! assert!(vars.all_vars().iter().all(|v| grads.get(v).is_some()));
//! # Ok(()) }
//! ```
//!
//! With the `cuda` feature, ccpl's version of the CUDA API is the one candle's build picks
//! (from the toolkit's nvcc); the README's "From candle" says what to set.
#![warn(missing_docs)]

#[cfg(feature = "cuda")]
mod cuda;
mod layer;
mod neighbor;
mod op;
mod rows;
mod storage;

pub use ccpl::{self, Centers};

/// The paper's temperature, [`ccpl::Tau::DEFAULT`], as the `f64` this crate's losses take.
pub const DEFAULT_TAU: f64 = ccpl::Tau::DEFAULT.get();
pub use layer::ccp_layer_loss;
pub use neighbor::neighbor_diff;
pub use rows::rows_loss;
