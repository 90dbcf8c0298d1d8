//! The losses as sequences of launch plans ([`crate::launch`]) over buffers, run through a
//! [`Launcher`](crate::launch::Launcher): the rows loss of a learned head ([`rows`], and
//! [`small_s`] for `S` up to [`MAX_ROWS`](crate::launch::small_s::MAX_ROWS)), the loss of one
//! layer ([`layer`]), and the whole multi-layer loss ([`multi_layer`]). The GPU path
//! ([`crate::cuda`]) and the CPU emulator (the `ccpl-emu` crate) run the very same sequences.
//!
//! Each loss keeps its buffers between launches in a workspace defined by the `workspace!`
//! macro below.

pub mod layer;
pub mod multi_layer;
pub mod rows;
pub mod small_s;

/// Defines a workspace: a struct of the buffers a loss keeps between its launches, generic
/// over what holds a buffer (`R` for rows in the storage type, `F` for float32 statistics: a
/// length, a device slice, a [`Buf`](crate::launch::Buf)), with the maps between its forms and, for lengths, its
/// size in bytes. Written once here so that no workspace lists its fields by hand twice.
macro_rules! workspace {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            rows { $($(#[$row_meta:meta])* $row:ident),* $(,)? }
            stats { $($(#[$stat_meta:meta])* $stat:ident),* $(,)? }
            nested { $($(#[$nest_meta:meta])* $nest:ident: $nest_ty:ident),* $(,)? }
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name<R, F> {
            $($(#[$row_meta])* pub $row: R,)*
            $($(#[$stat_meta])* pub $stat: F,)*
            $($(#[$nest_meta])* pub $nest: $nest_ty<R, F>,)*
        }

        impl<R, F> $name<R, F> {
            /// A workspace of something made from each buffer (say, an allocation from its
            /// length).
            pub fn try_map<R2, F2, E>(
                &self,
                mut row: impl FnMut(&R) -> Result<R2, E>,
                mut stat: impl FnMut(&F) -> Result<F2, E>,
            ) -> Result<$name<R2, F2>, E> {
                Ok($name {
                    $($row: row(&self.$row)?,)*
                    $($stat: stat(&self.$stat)?,)*
                    $($nest: self.$nest.try_map(&mut row, &mut stat)?,)*
                })
            }

            /// A workspace of something borrowed mutably from each buffer (say, its address,
            /// with the guard that must live while a launch uses it).
            pub fn map_mut<'a, R2, F2>(
                &'a mut self,
                mut row: impl FnMut(&'a mut R) -> R2,
                mut stat: impl FnMut(&'a mut F) -> F2,
            ) -> $name<R2, F2> {
                $name {
                    $($row: row(&mut self.$row),)*
                    $($stat: stat(&mut self.$stat),)*
                    $($nest: self.$nest.map_mut(&mut row, &mut stat),)*
                }
            }
        }

        impl $name<usize, usize> {
            /// Bytes of a workspace of these lengths whose rows are stored in `T` (the
            /// statistics are float32): what its owner allocates; `usize::MAX` past what an
            /// address space holds (the allocation fails then, with an error).
            pub fn bytes<T: crate::Dtype>(&self) -> usize {
                0usize
                    $(.saturating_add(self.$row.saturating_mul(size_of::<T>())))*
                    $(.saturating_add(self.$stat.saturating_mul(size_of::<f32>())))*
                    $(.saturating_add(self.$nest.bytes::<T>()))*
            }
        }
    };
}
pub(crate) use workspace;
