//! Build script: the Rust bindings of the shared header `kernels/ccpl.h` (committed in
//! `src/ffi/bindings.rs`, checked against the header where libclang is: `build/bindings.rs`),
//! and the kernels compiled by nvcc and embedded (a cubin per target architecture plus PTX
//! for the newest one). Nothing else: the CPU emulator is the `ccpl-emu` crate's.
//!
//! Environment it reads:
//! - `CCPL_NVCC`: path of nvcc to use; else `CUDA_HOME`/`CUDA_PATH`, else nvcc on `PATH`,
//!   else the toolchain that `scripts/bootstrap` installs under `.toolchain/`.
//! - `CCPL_CUDA_ARCH`: comma-separated compute capabilities, default `90` (e.g. `80,90`).
//! - `CCPL_REQUIRE_NVCC=1`: fail the build instead of building without kernels.
//! - `LIBCLANG_PATH`, `CCPL_REQUIRE_BINDGEN`, `CCPL_UPDATE_BINDINGS`: see `build/bindings.rs`.

#[path = "build/bindings.rs"]
mod bindings;
#[path = "build/files.rs"]
mod files;

use files::files_under;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ENV_VARS: &[&str] = &[
    "CCPL_NVCC",
    "CCPL_CUDA_ARCH",
    "CCPL_REQUIRE_NVCC",
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
    let embedded = match find_nvcc(&manifest) {
        Ok(nvcc) => compile_kernels(&nvcc, &kernels, &sources, &out),
        Err(why) => {
            if env::var("CCPL_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
                panic!("CCPL_REQUIRE_NVCC=1 but {why}");
            }
            println!("cargo:warning=ccpl: building without CUDA kernels: {why}");
            format!(
                "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = Some({why:?});\n\
                 {IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[];\n\
                 {REPORT_DOC}pub const PTXAS_REPORT: &str = \"\";\n"
            )
        }
    };
    fs::write(out.join("kernels.rs"), embedded).unwrap();
}

// Doc comments of the generated constants (`src/ffi` includes them).
const NOT_BUILT_DOC: &str = "/// Why the kernels were not built, or `None` when they were.\n";
const IMAGES_DOC: &str = "/// Every kernel family as nvcc compiled it.\n";
const REPORT_DOC: &str =
    "/// The whole `-Xptxas -v` report of the build (registers, shared memory, spills).\n";

fn find_nvcc(manifest: &Path) -> Result<PathBuf, String> {
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(p) = env::var_os("CCPL_NVCC") {
        let p = PathBuf::from(p);
        return if works(&p) {
            Ok(p)
        } else {
            Err(format!("CCPL_NVCC={} does not run", p.display()))
        };
    }
    let mut candidates: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .collect();
    candidates.push(PathBuf::from("nvcc"));
    candidates.push(manifest.join(".toolchain/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| works(p)).ok_or_else(|| {
        "nvcc was not found (set CCPL_NVCC or CUDA_HOME, put nvcc on PATH, or run scripts/bootstrap)".into()
    })
}

fn cuda_archs() -> Vec<u32> {
    let spec = env::var("CCPL_CUDA_ARCH").unwrap_or_else(|_| "90".into());
    let mut archs: Vec<u32> = spec
        .split(',')
        .map(|s| {
            s.trim()
                .trim_start_matches("sm_")
                .trim_start_matches("compute_")
        })
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                panic!("CCPL_CUDA_ARCH: {s:?} is not a compute capability like 90")
            })
        })
        .collect();
    archs.sort();
    archs.dedup();
    assert!(!archs.is_empty(), "CCPL_CUDA_ARCH names no architecture");
    archs
}

fn nvcc(nvcc: &Path, kernels: &Path, args: &[&str], source: &Path) -> String {
    let output = Command::new(nvcc)
        .args(["-std=c++17", "-O3", "-lineinfo", "-I"])
        .arg(kernels)
        .args(args)
        .arg(source)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{log}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    log
}

/// Compiles every kernel family to a cubin per architecture and PTX for the newest; returns
/// the Rust source that embeds them.
fn compile_kernels(nvcc_path: &Path, kernels: &Path, sources: &[PathBuf], out: &Path) -> String {
    let archs = cuda_archs();
    let newest = *archs.last().unwrap();
    let mut report = String::new();
    let mut code = format!(
        "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = None;\n{IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[\n"
    );
    for source in sources {
        let family = source.file_stem().unwrap().to_string_lossy().into_owned();
        let mut cubins = String::new();
        for arch in &archs {
            let cubin = out.join(format!("{family}.sm_{arch}.cubin"));
            let log = nvcc(
                nvcc_path,
                kernels,
                &[
                    "-cubin",
                    &format!("-arch=sm_{arch}"),
                    "-Xptxas",
                    "-v",
                    "-o",
                    cubin.to_str().unwrap(),
                ],
                source,
            );
            for warning in spill_warnings(&log) {
                println!("cargo:warning=ccpl: {family}.cu sm_{arch}: {warning}");
            }
            report.push_str(&log);
            write!(
                cubins,
                "({arch}, include_bytes!({:?})), ",
                cubin.to_str().unwrap()
            )
            .unwrap();
        }
        let ptx = out.join(format!("{family}.ptx"));
        nvcc(
            nvcc_path,
            kernels,
            &[
                "-ptx",
                &format!("-arch=compute_{newest}"),
                "-o",
                ptx.to_str().unwrap(),
            ],
            source,
        );
        writeln!(
            code,
            "    KernelImage {{ family: {family:?}, ptx_arch: {newest}, ptx: include_str!({:?}), cubins: &[{cubins}] }},",
            ptx.to_str().unwrap()
        )
        .unwrap();
    }
    code.push_str("];\n");
    writeln!(
        code,
        "{REPORT_DOC}pub const PTXAS_REPORT: &str = {report:?};"
    )
    .unwrap();
    code
}

/// Register spills or local-memory stack frames in an `-Xptxas -v` report, one line each.
fn spill_warnings(log: &str) -> Vec<String> {
    let mut function = String::new();
    let mut warnings = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim().to_string();
        } else if line.contains("bytes stack frame") {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if numbers.iter().any(|&n| n > 0) {
                warnings.push(format!("{function}: {}", line.trim()));
            }
        }
    }
    warnings
}
