//! The shared header `kernels/ccpl.h` as Rust (bindgen's output, committed in `bindings.rs`
//! and checked against the header by the build script), and the kernel images that the build
//! script embedded.

/// The layout checks of one struct of a header, as the build script writes bindgen's into the
/// bindings (`build/bindings.rs`, one line a struct): the size, the alignment and every field's
/// offset that clang gave the C struct, checked against the Rust struct's when the crate
/// compiles. Exported for the emulator's bindings, which the same build script writes.
#[doc(hidden)]
#[macro_export]
macro_rules! ffi_layout {
    ($name:ident: size $size:literal, align $align:literal; $($field:ident $offset:literal),* $(,)?) => {
        const _: () = {
            assert!(size_of::<$name>() == $size, concat!("size of ", stringify!($name)));
            assert!(align_of::<$name>() == $align, concat!("alignment of ", stringify!($name)));
            $(assert!(
                ::std::mem::offset_of!($name, $field) == $offset,
                concat!("offset of ", stringify!($name), "::", stringify!($field))
            );)*
        };
    };
}

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_docs,
    clippy::all
)]
mod bindings;
pub use bindings::*;

/// One kernel family (one `kernels/*.cu`) as compiled.
#[derive(Debug)]
pub struct KernelImage {
    /// The source file's stem, e.g. `"neighbor"`.
    pub family: &'static str,
    /// Compute capability the PTX targets: the oldest built from sm_80 on (every feature
    /// of the kernels), so that the driver compiles it for any newer GPU.
    pub ptx_arch: u32,
    /// PTX text: the fallback for devices without a matching cubin.
    pub ptx: &'static str,
    /// `(compute capability, cubin)` for every architecture built.
    pub cubins: &'static [(u32, &'static [u8])],
}

/// What compiled the embedded kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Toolchain {
    /// The compiler, e.g. `"NVRTC 12.9 + ptxas 12.9"` or `"nvcc 13.0 (/usr/local/cuda/bin/nvcc)"`.
    pub compiler: &'static str,
    /// `(major, minor)` of its CUDA release: a driver of that major line loads the cubins
    /// (CUDA 12: R525 on; CUDA 13: R580 on).
    pub cuda: (u32, u32),
    /// `CCPL_CUDA_ARCH` when it narrowed the architectures, else `None` (the default matrix).
    pub arch_list: Option<&'static str>,
}

mod embedded {
    use super::{KernelImage, Toolchain};
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub use embedded::{IMAGES, NOT_BUILT, PTXAS_REPORT, TOOLCHAIN};

/// Direction `k` (0..7) of the neighbour convention as `(dh, dw)`, decoded from
/// `CCPL_NEIGHBOR_SLOTS` exactly as the kernels decode it.
pub fn neighbor_delta(k: usize) -> (isize, isize) {
    let slot = ((CCPL_NEIGHBOR_SLOTS >> (4 * k)) & 0xF) as isize;
    (slot / 3 - 1, slot % 3 - 1)
}

// The launch parameter structs cross to the GPU by value: plain `repr(C)` data of integers and floats.
macro_rules! device_repr {
    ($($t:ty),* $(,)?) => { $(unsafe impl cudarc::driver::DeviceRepr for $t {})* };
}
device_repr!(
    ccpl_neighbor_diff_params,
    ccpl_neighbor_diff_backward_params,
    ccpl_neighbor_diff_normalize_params,
    ccpl_normalize_rows_params,
    ccpl_normalize_rows_backward_params,
    ccpl_similarity_params,
    ccpl_info_nce_forward_params,
    ccpl_info_nce_loss_params,
    ccpl_info_nce_backward_params,
    ccpl_info_nce_fused_forward_params,
    ccpl_info_nce_fused_backward_params,
    ccpl_small_s_gather_params,
    ccpl_small_s_rows_params,
    ccpl_small_s_scatter_params,
    ccpl_small_s_scale_params,
);
