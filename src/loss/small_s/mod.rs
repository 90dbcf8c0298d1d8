//! The sequences of the small-S path (`kernels/small_s.cu`, launch builders in
//! [`crate::launch::small_s`]): its workspace, shared by every small-S layer of the
//! multi-layer loss ([`crate::loss::multi_layer`]); the rows loss of a learned head's layers
//! ([`SmallRowsPlan`]); and a learned head's input, the raw difference rows at centres drawn
//! on the device, with the scatter of their gradient ([`SampledRowsPlan`]). `docs/small-s.md`
//! has the design.

mod rows;
mod sampled;
mod workspace;

pub use rows::{SmallRowsPlan, SmallRowsWorkspace};
pub use sampled::{SampledRowsPlan, SampledRowsWorkspace};
pub use workspace::SmallSWorkspace;
pub(crate) use workspace::{RowsIn, SmallOffsets};
