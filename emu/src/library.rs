//! The entry points of the emulator's C++ library: the one linked in or, where
//! `CCPL_EMU_LIBRARY` names a shared build of it (`CCPL_EMU_SHARED_LIBRARY=1` when building
//! this crate), that build's. The planted-bug check (`planted-bugs`) builds one from each
//! mutated copy of the kernels and runs the test binaries, built once, against it.

use std::ffi::{OsStr, c_char, c_void};
use std::path::Path;
use std::sync::OnceLock;

// Each entry point is declared once: the library linked in and a shared build loaded at run
// time are the same C ABI, and a second list of it could drift from the first.
macro_rules! entry_points {
    ($($field:ident: fn $symbol:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {
        unsafe extern "C" {
            $(fn $symbol($($arg: $ty),*) -> $ret;)*
        }

        /// The C ABI of `runtime/launch.cpp`.
        pub(crate) struct Library {
            $(pub $field: unsafe extern "C" fn($($arg: $ty),*) -> $ret,)*
        }

        /// The library linked into this crate.
        const LINKED: Library = Library { $($field: $symbol,)* };

        /// The same entry points of a loaded shared build.
        ///
        /// # Safety
        /// `library` must be a build of this crate's C++ library (the same declarations).
        unsafe fn symbols(library: &libloading::Library) -> Result<Library, libloading::Error> {
            // SAFETY: the caller's: the symbols are the C ABI declared above.
            unsafe {
                Ok(Library {
                    $($field: *library.get(concat!(stringify!($symbol), "\0").as_bytes())?,)*
                })
            }
        }
    };
}

entry_points! {
    launch: fn ccpl_emu_launch(
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
    hmma_dot: fn ccpl_emu_hmma_dot(arch: i32, bf16: i32, c: f32, a: *const f64, b: *const f64, k: i32) -> f32;
    kernel_count: fn ccpl_emu_kernel_count() -> usize;
    kernel_name: fn ccpl_emu_kernel_name(i: usize) -> *const c_char;
}

/// The library in use, loaded on the first call; the error says why `CCPL_EMU_LIBRARY`'s file
/// does not load.
pub(crate) fn library() -> Result<&'static Library, String> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| match std::env::var_os("CCPL_EMU_LIBRARY") {
            None => Ok(LINKED),
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
    // SAFETY: a build of this crate's library, as `CCPL_EMU_LIBRARY` promises.
    unsafe { symbols(library) }
}
