//! How a native op's workspace lies in one byte tensor that PyTorch allocates and autograd
//! keeps between the forward and the backward: the crate's workspace buffers one after
//! another, each aligned to [`ALIGN`] bytes.

use std::cell::Cell;

use ccpl::Result;
use ccpl::launch::Buf;

/// Where each buffer of a workspace starts in its byte tensor: a multiple of this (the widest
/// access of any kernel, and the caching allocator's own alignment of the tensor).
pub const ALIGN: usize = 256;

/// Places buffers one after another from `base`, each at the next multiple of [`ALIGN`].
pub struct Carver {
    base: u64,
    end: Cell<usize>,
}

impl Carver {
    /// Buffers from the byte address `base` (0: offsets, for a layout Python reads).
    pub fn new(base: u64) -> Self {
        Self {
            base,
            end: Cell::new(0),
        }
    }

    /// A placer of buffers of elements of `size` bytes, for a workspace's `try_map`.
    pub fn place(&self, size: usize) -> impl Fn(&usize) -> Result<Buf> + '_ {
        move |&len| {
            let at = self.end.get().next_multiple_of(ALIGN);
            self.end.set(at + len * size);
            Ok(Buf {
                addr: self.base + at as u64,
                len,
            })
        }
    }

    /// The bytes the buffers placed so far span.
    pub fn bytes(&self) -> usize {
        self.end.get()
    }
}
