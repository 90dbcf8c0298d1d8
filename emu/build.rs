//! Build script of the CPU emulator: the product's kernel sources (`../kernels/*.cu`) and the
//! emulator's own self-test kernels (`runtime/selftest.cu`) compiled by the host C++ compiler
//! against `runtime/cuda_emu.h`, with the runtime, into the static library `ccpl_emu`; and the
//! committed bindings of `runtime/selftest.h` checked as the product's are.
//!
//! Every translation unit is preprocessed and its static `__shared__` declarations rewritten
//! (`build/shared.rs`: they need one copy per block, which the compiler cannot collect), then
//! compiled unless the same text was compiled before (`build/objects.rs`).
//!
//! The kernels are compiled as the GPU compiles them where it matters to their results: with
//! the architecture `CCPL_EMU_ARCH` models, FMA contraction, and alignment checks.
//!
//! `CCPL_KERNEL_DIR` replaces `kernels/` for this library only (never for nvcc), and
//! `CCPL_EMU_RUNTIME_DIR` replaces `runtime/`; `CCPL_EMU_SHARED_LIBRARY=1` also links the
//! library as `OUT_DIR/libccpl_emu.so`, which `CCPL_EMU_LIBRARY` makes the emulator run instead
//! of its own. The planted-bug check (`planted-bugs`) builds one from each mutated copy.

#[path = "../build/bindings.rs"]
mod bindings;
#[path = "../build/files.rs"]
mod files;
#[path = "build/objects.rs"]
mod objects;
#[path = "../build/parallel.rs"]
mod parallel;
#[path = "build/shared.rs"]
mod shared;

use files::files_under;

use std::env;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let workspace = manifest.parent().unwrap();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build");
    let kernels = source_dir("CCPL_KERNEL_DIR", workspace.join("kernels"));
    let emu = source_dir("CCPL_EMU_RUNTIME_DIR", manifest.join("runtime"));
    bindings::check_committed(
        workspace,
        &manifest.join("runtime/selftest.h"),
        &manifest.join("src/selftest_bindings.rs"),
        "ccpl_emu_.*",
    );
    // The families (kernels/*.cu, as nvcc builds them) and the emulator's own test kernels.
    let families: Vec<PathBuf> = files_under(&kernels)
        .into_iter()
        .filter(|p| {
            p.parent() == Some(kernels.as_path()) && p.extension().is_some_and(|e| e == "cu")
        })
        .collect();
    let selftest = emu.join("selftest.cu");

    let arch = modelled_arch();
    let mut base = cc::Build::new();
    base.cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(&kernels)
        .include(&emu)
        .define("CCPL_EMU_ARCH", arch.to_string().as_str())
        .flag("-x")
        .flag("c++")
        .flag("-Wall")
        .flag("-Wno-unknown-pragmas");
    // Every typed load and store checks its alignment (the handler is runtime/misaligned.cpp's).
    base.flag("-fsanitize=alignment");
    // a*b+c contracted into one fused multiply-add, as nvcc and NVRTC do by default (--fmad):
    // the host compiler fuses within and across statements (after inlining), as ptxas does,
    // though not always the same pairs. Kernels whose bits must not depend on it spell out
    // __fmul_rn or __fadd_rn. Needs a host with FMA (x86-64-v3, any aarch64).
    base.flag("-ffp-contract=fast");
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        base.flag("-mfma");
    }
    // With the sanitizer, the kernels' every load and store calls its hooks (runtime/memcheck.cpp):
    // GCC's thread-sanitizer instrumentation, which calls __tsan_read4 and the like with each
    // access's address, every read and write apart (the address sanitizer's drops a check the
    // same statement already made, such as the read of a read-modify-write: racecheck needs it).
    // The calls cost even with every check off (the kernel tests took 96 s instead of 63 s), so
    // the families are instrumented only in a build for the sanitizer (CCPL_EMU_SANITIZE set and
    // not `0`/`none`); the emulator's own test kernels always are (its sanitizer tests run
    // them), and a launch that asks for checks of an uninstrumented kernel is refused.
    let mut instrumented = base.clone();
    instrumented
        .flag("-fsanitize=thread")
        .flag("--param=tsan-instrument-func-entry-exit=0");
    // The runtime first: its objects are the same in every build of one architecture.
    let mut units: Vec<(PathBuf, &cc::Build)> = files_under(&emu)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .map(|p| (p, &base))
        .collect();
    let families_build = if sanitizer_build() {
        &instrumented
    } else {
        &base
    };
    units.extend(families.into_iter().map(|p| (p, families_build)));
    units.push((selftest, &instrumented));
    // Each unit preprocessed by its own build: an instrumented one sees __SANITIZE_THREAD__.
    let objects = objects::compile(&units, &out, |source, build| {
        let expanded = build.clone().file(source).expand();
        let text = String::from_utf8(expanded).unwrap_or_else(|e| {
            panic!("{}: preprocessed text is not UTF-8: {e}", source.display())
        });
        shared::rewrite_shared(&text).unwrap_or_else(|e| panic!("{}: {e}", source.display()))
    });
    // Nothing refers to the kernels' objects but their static registrations: link them all.
    base.clone()
        .objects(&objects)
        .link_lib_modifier("+whole-archive")
        .compile("ccpl_emu");
    println!("cargo:rerun-if-env-changed=CCPL_EMU_SHARED_LIBRARY");
    if env::var("CCPL_EMU_SHARED_LIBRARY").is_ok_and(|v| v == "1") {
        objects::link_shared(&base, &objects, &out.join("libccpl_emu.so"));
    }
}

/// Whether this build is for the sanitizer: `CCPL_EMU_SANITIZE` set to any checks (the value
/// `src/checks.rs` reads at run time; `0`, `none` and the empty value ask for none).
fn sanitizer_build() -> bool {
    println!("cargo:rerun-if-env-changed=CCPL_EMU_SANITIZE");
    env::var("CCPL_EMU_SANITIZE").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "none"))
}

/// The architecture the emulator models: `CCPL_EMU_ARCH` (a compute capability), default 90
/// (H100, H200). It decides the tensor cores' arithmetic (runtime/hmma.h), the shared memory
/// maximum and the kernels' CCPL_ARCH (bf16 takes the FMA tile on 75).
fn modelled_arch() -> u32 {
    const MODELLED: &[u32] = &[75, 80, 86, 89, 90, 100];
    println!("cargo:rerun-if-env-changed=CCPL_EMU_ARCH");
    let arch = env::var("CCPL_EMU_ARCH").map_or(90, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CCPL_EMU_ARCH={v:?} is not a compute capability like 90"))
    });
    assert!(
        MODELLED.contains(&arch),
        "CCPL_EMU_ARCH={arch}: the emulator models {MODELLED:?}"
    );
    println!("cargo:rustc-env=CCPL_EMU_ARCH={arch}");
    arch
}

/// `default`, or the folder `var` names; every file in it reruns the build when it changes.
fn source_dir(var: &str, default: PathBuf) -> PathBuf {
    println!("cargo:rerun-if-env-changed={var}");
    let dir = env::var_os(var).map_or(default, PathBuf::from);
    for file in files_under(&dir) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    dir
}
