//! The CPU reference: every stage of the loss and its backward in `f64`, written to read like
//! the spec (`shared/ccpl-spec.md`). It is the oracle the kernels are tested against.
//!
//! One module per kernel family, named like its `kernels/*.cu` twin, plus the end-to-end loss.

pub mod info_nce;
pub mod loss;
pub mod neighbor;
pub mod normalize;
pub mod similarity;

pub use info_nce::{InfoNceForward, InfoNceGrads, info_nce_backward, info_nce_forward};
pub use loss::{LayerInput, LayerLoss, ccp_layer_loss, ccp_loss};
pub use neighbor::{neighbor_diff, neighbor_diff_backward};
pub use normalize::{Normalized, normalize_rows, normalize_rows_backward};
pub use similarity::similarity;
