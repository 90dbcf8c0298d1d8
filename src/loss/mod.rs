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
/// over what holds a buffer (`R` for rows in the storage type, `F` for float32 statistics,
/// `I` for int32 words: a length, a device slice, a [`Buf`](crate::launch::Buf)), with the
/// maps between its forms and, for lengths, its size in bytes. Written once here so that no
/// workspace lists its fields by hand twice.
///
/// A workspace is `<R, F>`, `<I>` or `<R, F, I>`. Its `parts` are other workspaces: one
/// `Part<R, F>`, an `Option<Part<F, F>>` (rows kept in float32 whatever the storage type), or
/// a `Vec` (in layer order) of `Part<R, F>` or of `Part<I>`; each followed by a comma.
macro_rules! workspace {
    (
        $(#[$meta:meta])*
        pub struct $name:ident<$($kind:ident),*> {
            $(rows { $($(#[$row_meta:meta])* $row:ident),* $(,)? })?
            $(stats { $($(#[$stat_meta:meta])* $stat:ident),* $(,)? })?
            $(ints { $($(#[$int_meta:meta])* $int:ident),* $(,)? })?
            $(parts { $($parts:tt)* })?
        }
    ) => {
        workspace!(@parts {
            [$($kind),*] [$(#[$meta])*] $name
            [$($($(#[$row_meta])* $row)*)?]
            [$($($(#[$stat_meta])* $stat)*)?]
            [$($($(#[$int_meta])* $int)*)?]
        } [] [$($($parts)*)?]);
    };

    // The parts, one at a time: each with how it is held and which kinds it maps.
    (@parts $whole:tt [$($done:tt)*] []) => { workspace!(@define $whole [$($done)*]); };
    (@parts $whole:tt [$($done:tt)*]
        [$(#[$m:meta])* $part:ident: $ty:ident<R, F>, $($rest:tt)*]
    ) => {
        workspace!(@parts $whole [$($done)* {[$(#[$m])*] $part [$ty<R, F>] one same}] [$($rest)*]);
    };
    (@parts $whole:tt [$($done:tt)*]
        [$(#[$m:meta])* $part:ident: Option<$ty:ident<F, F>>, $($rest:tt)*]
    ) => {
        workspace!(@parts $whole
            [$($done)* {[$(#[$m])*] $part [Option<$ty<F, F>>] optional float}] [$($rest)*]);
    };
    (@parts $whole:tt [$($done:tt)*]
        [$(#[$m:meta])* $part:ident: Vec<$ty:ident<R, F>>, $($rest:tt)*]
    ) => {
        workspace!(@parts $whole
            [$($done)* {[$(#[$m])*] $part [Vec<$ty<R, F>>] per_layer same}] [$($rest)*]);
    };
    (@parts $whole:tt [$($done:tt)*]
        [$(#[$m:meta])* $part:ident: Vec<$ty:ident<I>>, $($rest:tt)*]
    ) => {
        workspace!(@parts $whole
            [$($done)* {[$(#[$m])*] $part [Vec<$ty<I>>] per_layer int}] [$($rest)*]);
    };

    // The struct and its maps, by its kinds. The maps' closures are named where they are
    // declared and handed on: `[$r $s $i]` names those of rows, statistics and words (another
    // one where the workspace has no buffer of that kind).
    (@define {[R, F] $meta:tt $name:ident $rows:tt $stats:tt $ints:tt} $parts:tt) => {
        workspace!(@struct [R, F] $meta $name $rows $stats $ints $parts);
        workspace!(@bytes [usize, usize] $name $rows $stats $ints $parts);

        impl<R, F> $name<R, F> {
            /// A workspace of something made from each buffer (say, an allocation from its
            /// length).
            pub fn try_map<R2, F2, E>(
                &self,
                row: impl FnMut(&R) -> Result<R2, E>,
                stat: impl FnMut(&F) -> Result<F2, E>,
            ) -> Result<$name<R2, F2>, E> {
                workspace!(@try_map self [row stat] [row stat stat] $name $rows $stats $ints $parts)
            }

            /// A workspace of something borrowed mutably from each buffer (say, its address,
            /// with the guard that must live while a launch uses it).
            pub fn map_mut<'a, R2, F2>(
                &'a mut self,
                row: impl FnMut(&'a mut R) -> R2,
                stat: impl FnMut(&'a mut F) -> F2,
            ) -> $name<R2, F2> {
                workspace!(@map_mut self 'a [row stat] [row stat stat]
                    $name $rows $stats $ints $parts)
            }
        }
    };
    (@define {[I] $meta:tt $name:ident $rows:tt $stats:tt $ints:tt} $parts:tt) => {
        workspace!(@struct [I] $meta $name $rows $stats $ints $parts);
        workspace!(@bytes [usize] $name $rows $stats $ints $parts);

        impl<I> $name<I> {
            /// These buffers made into something else (say, allocations from lengths).
            pub fn try_map<I2, E>(
                &self,
                int: impl FnMut(&I) -> Result<I2, E>,
            ) -> Result<$name<I2>, E> {
                workspace!(@try_map self [int] [int int int] $name $rows $stats $ints $parts)
            }

            /// Something borrowed mutably from each buffer.
            pub fn map_mut<'a, I2>(&'a mut self, int: impl FnMut(&'a mut I) -> I2) -> $name<I2> {
                workspace!(@map_mut self 'a [int] [int int int] $name $rows $stats $ints $parts)
            }
        }
    };
    (@define {[R, F, I] $meta:tt $name:ident $rows:tt $stats:tt $ints:tt} $parts:tt) => {
        workspace!(@struct [R, F, I] $meta $name $rows $stats $ints $parts);
        workspace!(@bytes [usize, usize, usize] $name $rows $stats $ints $parts);

        impl<R, F, I> $name<R, F, I> {
            /// A workspace of something made from each buffer (say, an allocation from its
            /// length).
            pub fn try_map<R2, F2, I2, E>(
                &self,
                row: impl FnMut(&R) -> Result<R2, E>,
                stat: impl FnMut(&F) -> Result<F2, E>,
                int: impl FnMut(&I) -> Result<I2, E>,
            ) -> Result<$name<R2, F2, I2>, E> {
                workspace!(@try_map self [row stat int] [row stat int]
                    $name $rows $stats $ints $parts)
            }

            /// A workspace of something borrowed mutably from each buffer (say, its address,
            /// with the guard that must live while a launch uses it).
            pub fn map_mut<'a, R2, F2, I2>(
                &'a mut self,
                row: impl FnMut(&'a mut R) -> R2,
                stat: impl FnMut(&'a mut F) -> F2,
                int: impl FnMut(&'a mut I) -> I2,
            ) -> $name<R2, F2, I2> {
                workspace!(@map_mut self 'a [row stat int] [row stat int]
                    $name $rows $stats $ints $parts)
            }
        }
    };

    (@struct [$($kind:ident),*] [$($meta:tt)*] $name:ident
        [$($(#[$row_meta:meta])* $row:ident)*] [$($(#[$stat_meta:meta])* $stat:ident)*]
        [$($(#[$int_meta:meta])* $int:ident)*]
        [$({[$($part_meta:tt)*] $part:ident [$($part_ty:tt)*] $holder:ident $spec:ident})*]
    ) => {
        $($meta)*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name<$($kind),*> {
            $($(#[$row_meta])* pub $row: R,)*
            $($(#[$stat_meta])* pub $stat: F,)*
            $($(#[$int_meta])* pub $int: I,)*
            $($($part_meta)* pub $part: $($part_ty)*,)*
        }
    };

    // The maps. Each closure is shared (through a RefCell) by the buffers of its kind and the
    // parts, some of which take one closure for two kinds (`float`).
    (@try_map $this:ident [$($map:ident)*] [$r:ident $s:ident $i:ident] $name:ident
        [$($(#[$row_meta:meta])* $row:ident)*] [$($(#[$stat_meta:meta])* $stat:ident)*]
        [$($(#[$int_meta:meta])* $int:ident)*]
        [$({$part_meta:tt $part:ident $part_ty:tt $holder:ident $spec:ident})*]
    ) => {{
        $(
            let $map = ::std::cell::RefCell::new($map);
            let $map = |x: &_| ($map.borrow_mut())(x);
        )*
        Ok($name {
            $($row: $r(&$this.$row)?,)*
            $($stat: $s(&$this.$stat)?,)*
            $($int: $i(&$this.$int)?,)*
            $($part: workspace!(@try_map_part $holder [&$this.$part] [$spec try_map $r $s $i]),)*
        })
    }};
    (@try_map_part one [$v:expr] $call:tt) => { workspace!(@call $call $v)? };
    (@try_map_part optional [$v:expr] $call:tt) => {
        $v.as_ref().map(|p| workspace!(@call $call p)).transpose()?
    };
    (@try_map_part per_layer [$v:expr] $call:tt) => {
        $v.iter().map(|p| workspace!(@call $call p)).collect::<Result<Vec<_>, _>>()?
    };
    (@map_mut $this:ident $a:lifetime [$($map:ident)*] [$r:ident $s:ident $i:ident] $name:ident
        [$($(#[$row_meta:meta])* $row:ident)*] [$($(#[$stat_meta:meta])* $stat:ident)*]
        [$($(#[$int_meta:meta])* $int:ident)*]
        [$({$part_meta:tt $part:ident $part_ty:tt $holder:ident $spec:ident})*]
    ) => {{
        $(
            let $map = ::std::cell::RefCell::new($map);
            let $map = |x: &$a mut _| ($map.borrow_mut())(x);
        )*
        $name {
            $($row: $r(&mut $this.$row),)*
            $($stat: $s(&mut $this.$stat),)*
            $($int: $i(&mut $this.$int),)*
            $($part: workspace!(@map_mut_part $holder [&mut $this.$part]
                [$spec map_mut $r $s $i]),)*
        }
    }};
    (@map_mut_part one [$v:expr] $call:tt) => { workspace!(@call $call $v) };
    (@map_mut_part optional [$v:expr] $call:tt) => {
        $v.as_mut().map(|p| workspace!(@call $call p))
    };
    (@map_mut_part per_layer [$v:expr] $call:tt) => {
        $v.iter_mut().map(|p| workspace!(@call $call p)).collect()
    };
    // A part's map with the closures of the kinds it holds.
    (@call [same $method:ident $r:ident $s:ident $i:ident] $p:expr) => { $p.$method($r, $s) };
    (@call [float $method:ident $r:ident $s:ident $i:ident] $p:expr) => { $p.$method($s, $s) };
    (@call [int $method:ident $r:ident $s:ident $i:ident] $p:expr) => { $p.$method($i) };

    // The size: rows in `T`, statistics in float32, words in int32; `float` parts in float32.
    (@bytes [$($len:ty),*] $name:ident
        [$($(#[$row_meta:meta])* $row:ident)*] [$($(#[$stat_meta:meta])* $stat:ident)*]
        [$($(#[$int_meta:meta])* $int:ident)*]
        [$({$part_meta:tt $part:ident $part_ty:tt $holder:ident $spec:ident})*]
    ) => {
        impl $name<$($len),*> {
            /// Bytes of a workspace of these lengths whose rows are stored in `T`: what its
            /// owner allocates; `usize::MAX` past what an address space holds (the allocation
            /// fails then, with an error).
            pub fn bytes<T: crate::Dtype>(&self) -> usize {
                0usize
                    $(.saturating_add(self.$row.saturating_mul(size_of::<T>())))*
                    $(.saturating_add(self.$stat.saturating_mul(size_of::<f32>())))*
                    $(.saturating_add(self.$int.saturating_mul(size_of::<i32>())))*
                    $(.saturating_add(workspace!(@bytes_part $holder [&self.$part] $spec)))*
            }
        }
    };
    (@bytes_part one [$v:expr] $spec:ident) => { workspace!(@bytes_of $spec $v) };
    (@bytes_part optional [$v:expr] $spec:ident) => {
        $v.as_ref().map_or(0, |p| workspace!(@bytes_of $spec p))
    };
    (@bytes_part per_layer [$v:expr] $spec:ident) => {
        $v.iter().map(|p| workspace!(@bytes_of $spec p)).fold(0, usize::saturating_add)
    };
    (@bytes_of same $p:expr) => { $p.bytes::<T>() };
    (@bytes_of float $p:expr) => { $p.bytes::<f32>() };
    (@bytes_of int $p:expr) => { $p.bytes::<T>() };
}
pub(crate) use workspace;
