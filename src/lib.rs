//! # ccpl
//!
//! CUDA kernels, with a float64 CPU reference, for the Contrastive Coherence Preserving loss
//! (CCPL, Wu et al., ECCV 2022): the loss that makes style-transfer networks temporally
//! coherent on video while training on single images. The contract, the loss step by step,
//! is [`contract`] (`docs/ccpl-loss.md` in the repository); the README has the two commands
//! and the API in brief.
//!
//! - [`reference`](mod@reference): every stage and its backward in `f64`, the oracle;
//! - [`launch`]: the launch builders, one per kernel: pure functions from shapes and buffers
//!   to the launch plans both the GPU and the CPU emulator (crate `ccpl-emu`) execute;
//! - [`loss`]: the losses as sequences of those plans run through a [`launch::Launcher`],
//!   with their workspaces;
//! - [`cuda`]: the kernels on the caller's context and stream, and the loss objects
//!   [`cuda::CcpLayer`] and [`cuda::CcpRows`].
#![warn(missing_docs)]

pub mod cuda;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod launch;
pub mod loss;
pub mod reference;
pub mod sampling;
pub mod shape;
pub mod tau;

pub use dtype::{Dtype, Element};
pub use error::{Error, Result, check_len};
/// The `half` crate whose `f16` and `bf16` the kernels store, for [`dispatch_dtype!`]'s users.
pub use half;
pub use sampling::Centers;
pub use shape::{FeatureShape, Layout, RowShape};
pub use tau::Tau;

#[doc = include_str!("../docs/ccpl-loss.md")]
pub mod contract {}

/// The README's example compiles (it needs a GPU to run, so it is `no_run`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;
