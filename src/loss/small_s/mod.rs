//! The sequences of the small-S path (`kernels/small_s.cu`, launch builders in
//! [`crate::launch::small_s`]): its workspace, shared by every small-S layer of the
//! multi-layer loss ([`crate::loss::multi_layer`]), and the rows loss of a learned head
//! ([`SmallRowsPlan`]). `docs/small-s.md` has the design.

mod rows;
mod workspace;

pub use rows::{SmallRowsPlan, SmallRowsWorkspace};
pub use workspace::SmallSWorkspace;
pub(crate) use workspace::{RowsIn, SmallOffsets};
