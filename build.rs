//! Build script: the Rust bindings of the shared header `kernels/ccpl.h` (committed in
//! `src/ffi/bindings.rs`, checked against the header where libclang is: `build/bindings.rs`),
//! and the kernels compiled and embedded: a cubin per target architecture, plus PTX that the
//! driver compiles for newer GPUs. Nothing else: the CPU emulator is the `ccpl-emu` crate's.
//!
//! The compiler, in this order: a CUDA toolkit's nvcc (`CCPL_NVCC`, else `CUDA_HOME`/
//! `CUDA_PATH`, else nvcc on `PATH`); else the CUDA 12.9 compilers that `scripts/bootstrap`
//! installs from PyPI (NVRTC to PTX, ptxas to cubins: the wheels have no nvcc), whose output
//! loads on every driver from R525 on (CUDA 12.0's minor-version compatibility).
//!
//! Environment it reads:
//! - `CCPL_NVCC`, `CUDA_HOME`, `CUDA_PATH`, `PATH`: a CUDA toolkit, as above.
//! - `CCPL_PINNED_COMPILER=1`: the wheels' compilers even where a toolkit is (`build/compiler.rs`).
//! - `CCPL_TOOLCHAIN`: where `scripts/bootstrap` installed the compilers (default `.toolchain/`).
//! - `CCPL_CUDA_ARCH`: comma-separated compute capabilities to build, e.g. `90` for a quick
//!   build; default every architecture of `DEFAULT_ARCHS` (`build/archs.rs`) the compiler knows.
//! - `CCPL_REQUIRE_NVCC=1`: fail the build instead of building without kernels.
//! - `LIBCLANG_PATH`, `CCPL_REQUIRE_BINDGEN`, `CCPL_UPDATE_BINDINGS`: see `build/bindings.rs`.
//!
//! The steps, one file each under `build/`: `compiler` (which compiler), `archs` (which
//! architectures, from which PTX), `compile` (PTX and cubins, on every core: `parallel`),
//! `embed` (the generated Rust source), `spills` (ptxas's spill warnings).

#[path = "build/archs.rs"]
mod archs;
#[path = "build/bindings.rs"]
mod bindings;
#[path = "build/compile.rs"]
mod compile;
#[path = "build/compiler.rs"]
mod compiler;
#[path = "build/embed.rs"]
mod embed;
#[path = "build/files.rs"]
mod files;
#[path = "build/nvrtc.rs"]
mod nvrtc;
#[path = "build/parallel.rs"]
mod parallel;
#[path = "build/spills.rs"]
mod spills;

use files::files_under;

use std::env;
use std::fs;
use std::path::PathBuf;

const ENV_VARS: &[&str] = &[
    "CCPL_NVCC",
    "CCPL_CUDA_ARCH",
    "CCPL_REQUIRE_NVCC",
    "CCPL_PINNED_COMPILER",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels = manifest.join("kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    for file in files_under(&kernels) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    bindings::check_committed(
        &manifest,
        &kernels.join("ccpl.h"),
        &manifest.join("src/ffi/bindings.rs"),
        "(ccpl|CCPL)_.*",
    );

    let sources: Vec<PathBuf> = files_under(&kernels)
        .into_iter()
        .filter(|p| {
            p.parent() == Some(kernels.as_path()) && p.extension().is_some_and(|e| e == "cu")
        })
        .collect();
    let embedded = match compiler::find_compiler(&manifest) {
        Ok(compiler) => {
            let compiled = compile::compile_kernels(&compiler, &kernels, &sources, &out);
            // Read by dependents' build scripts as DEP_CCPL_KERNELS (the Python package's
            // refuses to build without kernels unless asked to).
            println!("cargo:kernels=built");
            embed::embedded(&compiler, &compiled)
        }
        Err(why) => {
            if env::var("CCPL_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
                panic!("CCPL_REQUIRE_NVCC=1 but {why}");
            }
            println!("cargo:warning=ccpl: building without CUDA kernels: {why}");
            println!("cargo:kernels=missing");
            embed::not_built(&why)
        }
    };
    fs::write(out.join("kernels.rs"), embedded).unwrap();
}
