//! The entry points of the emulator's C++ library: the one linked in or, where
//! `CCPL_EMU_LIBRARY` names a shared build of it (`CCPL_EMU_SHARED_LIBRARY=1` when building
//! this crate), that build's. The planted-bug check (`planted-bugs`) builds one from each
//! mutated copy of the kernels and runs the test binaries, built once, against it.

use std::ffi::{OsStr, c_char, c_void};
use std::path::Path;
use std::sync::OnceLock;

type Launch = unsafe extern "C" fn(
    name: *const c_char,
    grid: *const u32,
    block: *const u32,
    shared_bytes: u32,
    shared_opt_in: i32,
    params: *const c_void,
    params_size: usize,
    buffers: *const u64,
    buffer_count: usize,
    checks: u32,
    seed: u64,
    err: *mut c_char,
    err_len: usize,
) -> i32;
type HmmaDot =
    unsafe extern "C" fn(arch: i32, bf16: i32, c: f32, a: *const f64, b: *const f64, k: i32) -> f32;
type KernelCount = unsafe extern "C" fn() -> usize;
type KernelName = unsafe extern "C" fn(i: usize) -> *const c_char;

unsafe extern "C" {
    fn ccpl_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        shared_opt_in: i32,
        params: *const c_void,
        params_size: usize,
        buffers: *const u64,
        buffer_count: usize,
        checks: u32,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn ccpl_emu_hmma_dot(arch: i32, bf16: i32, c: f32, a: *const f64, b: *const f64, k: i32)
    -> f32;
    fn ccpl_emu_kernel_count() -> usize;
    fn ccpl_emu_kernel_name(i: usize) -> *const c_char;
}

/// The C ABI of `runtime/launch.cpp`.
pub(crate) struct Library {
    pub launch: Launch,
    pub hmma_dot: HmmaDot,
    pub kernel_count: KernelCount,
    pub kernel_name: KernelName,
}

/// The library in use, loaded on the first call; the error says why `CCPL_EMU_LIBRARY`'s file
/// does not load.
pub(crate) fn library() -> Result<&'static Library, String> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| match std::env::var_os("CCPL_EMU_LIBRARY") {
            None => Ok(Library {
                launch: ccpl_emu_launch,
                hmma_dot: ccpl_emu_hmma_dot,
                kernel_count: ccpl_emu_kernel_count,
                kernel_name: ccpl_emu_kernel_name,
            }),
            Some(path) => load(&path).map_err(|e| {
                format!(
                    "CCPL_EMU_LIBRARY={}: not a shared build of the emulator: {e}",
                    Path::new(&path).display()
                )
            }),
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn load(path: &OsStr) -> Result<Library, libloading::Error> {
    // SAFETY: a shared build of this crate's own library: its initialisers register kernels
    // and nothing else. It stays loaded for the process (the entry points are kept).
    let library: &'static libloading::Library =
        Box::leak(Box::new(unsafe { libloading::Library::new(path)? }));
    // SAFETY: the symbols are the C ABI above, of the same declarations.
    unsafe {
        Ok(Library {
            launch: *library.get(b"ccpl_emu_launch\0")?,
            hmma_dot: *library.get(b"ccpl_emu_hmma_dot\0")?,
            kernel_count: *library.get(b"ccpl_emu_kernel_count\0")?,
            kernel_name: *library.get(b"ccpl_emu_kernel_name\0")?,
        })
    }
}
