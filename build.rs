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
//! - `CCPL_TOOLCHAIN`: where `scripts/bootstrap` installed the compilers (default `.toolchain/`).
//! - `CCPL_CUDA_ARCH`: comma-separated compute capabilities to build, e.g. `90` for a quick
//!   build; default every architecture of [`DEFAULT_ARCHS`] the compiler knows.
//! - `CCPL_REQUIRE_NVCC=1`: fail the build instead of building without kernels.
//! - `LIBCLANG_PATH`, `CCPL_REQUIRE_BINDGEN`, `CCPL_UPDATE_BINDINGS`: see `build/bindings.rs`.

#[path = "build/bindings.rs"]
mod bindings;
#[path = "build/files.rs"]
mod files;
#[path = "build/nvrtc.rs"]
mod nvrtc;

use files::files_under;
use nvrtc::{Nvrtc, Wheels};

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

const ENV_VARS: &[&str] = &[
    "CCPL_NVCC",
    "CCPL_CUDA_ARCH",
    "CCPL_REQUIRE_NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
];

/// The architectures built by default: Turing (T4), Ampere (A100; RTX 30, A40), Ada (RTX 40,
/// L4, L40), Hopper (H100, H200), Blackwell (B200; RTX 50) where the compiler has them.
const DEFAULT_ARCHS: &[u32] = &[75, 80, 86, 89, 90, 100, 120];
/// Of those, the ones every supported compiler (CUDA 12.0 on) must build.
const REQUIRED_ARCHS: &[u32] = &[75, 80, 86, 89, 90];
/// The architectures where the kernels' code changes (`CCPL_ARCH` in kernels/common.cuh):
/// sm_80 brings bf16 tensor cores. A kernel path for a newer one must add it here.
const CODE_PATH_ARCHS: &[u32] = &[75, 80];
/// The oldest architecture whose PTX has every feature of the kernels: the PTX embedded for
/// GPUs newer than every cubin is for it (the driver compiles it for any newer GPU), or for
/// the oldest built when the list has nothing from it on.
const PTX_FEATURE_ARCH: u32 = 80;

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
    let embedded = match find_compiler(&manifest) {
        Ok(compiler) => compile_kernels(&compiler, &kernels, &sources, &out),
        Err(why) => {
            if env::var("CCPL_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
                panic!("CCPL_REQUIRE_NVCC=1 but {why}");
            }
            println!("cargo:warning=ccpl: building without CUDA kernels: {why}");
            format!(
                "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = Some({why:?});\n\
                 {IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[];\n\
                 {REPORT_DOC}pub const PTXAS_REPORT: &str = \"\";\n\
                 {TOOLCHAIN_DOC}pub const TOOLCHAIN: Option<Toolchain> = None;\n"
            )
        }
    };
    fs::write(out.join("kernels.rs"), embedded).unwrap();
}

// Doc comments of the generated constants (`src/ffi` includes them).
const NOT_BUILT_DOC: &str = "/// Why the kernels were not built, or `None` when they were.\n";
const IMAGES_DOC: &str = "/// Every kernel family as it was compiled.\n";
const REPORT_DOC: &str =
    "/// The whole `ptxas -v` report of the build (registers, shared memory, spills).\n";
const TOOLCHAIN_DOC: &str = "/// What compiled the kernels, when they were built.\n";

/// The compiler of the kernels.
enum Compiler {
    /// A CUDA toolkit's nvcc.
    Nvcc { path: PathBuf, version: (u32, u32) },
    /// NVRTC and ptxas of the CUDA 12 wheels.
    Nvrtc {
        nvrtc: Nvrtc,
        wheels: Wheels,
        version: (u32, u32),
    },
}

impl Compiler {
    fn version(&self) -> (u32, u32) {
        match self {
            Compiler::Nvcc { version, .. } | Compiler::Nvrtc { version, .. } => *version,
        }
    }
    fn describe(&self) -> String {
        let (major, minor) = self.version();
        match self {
            Compiler::Nvcc { path, .. } => format!("nvcc {major}.{minor} ({})", path.display()),
            Compiler::Nvrtc { .. } => format!("NVRTC {major}.{minor} + ptxas {major}.{minor}"),
        }
    }
    /// The compute capabilities it builds for.
    fn archs(&self) -> Vec<u32> {
        match self {
            Compiler::Nvcc { path, .. } => Command::new(path)
                .arg("--list-gpu-code")
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter_map(|l| l.trim().strip_prefix("sm_")?.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
            Compiler::Nvrtc { nvrtc, .. } => nvrtc.supported_archs().unwrap_or_default(),
        }
    }
}

/// `(major, minor)` from nvcc's `--version` ("... release 12.9, V12.9.86").
fn nvcc_version(nvcc: &Path) -> Option<(u32, u32)> {
    let output = Command::new(nvcc).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let release = text.split("release ").nth(1)?.split(',').next()?;
    let (major, minor) = release.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn find_compiler(manifest: &Path) -> Result<Compiler, String> {
    let nvcc_at =
        |path: PathBuf| nvcc_version(&path).map(|version| Compiler::Nvcc { path, version });
    if let Some(p) = env::var_os("CCPL_NVCC") {
        let p = PathBuf::from(p);
        return nvcc_at(p.clone()).ok_or_else(|| format!("CCPL_NVCC={} does not run", p.display()));
    }
    let toolkits = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .chain([PathBuf::from("nvcc")]);
    if let Some(nvcc) = toolkits.into_iter().find_map(nvcc_at) {
        return Ok(nvcc);
    }
    let wheels = Wheels::at(&bindings::toolchain_dir(manifest).join("cuda12"));
    let not_found = "no CUDA compiler was found (run scripts/bootstrap, or set CCPL_NVCC or CUDA_HOME to a CUDA toolkit)";
    if !wheels.nvrtc.exists() {
        return Err(not_found.into());
    }
    let nvrtc = Nvrtc::load(&wheels.nvrtc)?;
    let version = nvrtc.version()?;
    let ptxas_runs = Command::new(&wheels.ptxas)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ptxas_runs {
        return Err(format!(
            "{} does not run ({not_found})",
            wheels.ptxas.display()
        ));
    }
    Ok(Compiler::Nvrtc {
        nvrtc,
        wheels,
        version,
    })
}

/// `CCPL_CUDA_ARCH`, or the default matrix as far as `compiler` builds it.
fn cuda_archs(compiler: &Compiler) -> Vec<u32> {
    let Ok(spec) = env::var("CCPL_CUDA_ARCH") else {
        let known = compiler.archs();
        let missing: Vec<_> = REQUIRED_ARCHS
            .iter()
            .filter(|a| !known.contains(a))
            .collect();
        assert!(
            missing.is_empty(),
            "{} cannot build sm_{missing:?}, which the default build needs (set CCPL_CUDA_ARCH)",
            compiler.describe()
        );
        return DEFAULT_ARCHS
            .iter()
            .copied()
            .filter(|a| known.contains(a))
            .collect();
    };
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

/// Runs a compiler tool; its stderr (ptxas's -v report) on success, a panic with it otherwise.
fn run(tool: &Path, args: &[&str], what: &Path) -> String {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!(
            "{} failed on {}:\n{log}{}",
            tool.display(),
            what.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    log
}

/// The virtual architecture (PTX) a cubin for `arch` is compiled from: the newest of
/// [`CODE_PATH_ARCHS`] not above it. The kernels' code changes only there, so one PTX per path
/// serves every cubin of it (as `nvcc -gencode arch=compute_80,code=sm_90` does), at half the
/// build time of one front-end run per architecture.
fn virtual_arch(arch: u32) -> u32 {
    CODE_PATH_ARCHS
        .iter()
        .copied()
        .filter(|&v| v <= arch)
        .max()
        .unwrap_or(arch)
}

/// `f` of every job, on every core; the results in the jobs' order. NVRTC is thread-safe.
fn parallel<J: Sync, R: Send>(jobs: &[J], f: impl Fn(&J) -> R + Sync) -> Vec<R> {
    let next = Mutex::new(0usize);
    let results = Mutex::new((0..jobs.len()).map(|_| None).collect::<Vec<Option<R>>>());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers.min(jobs.len()) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut next = next.lock().unwrap();
                        *next += 1;
                        *next - 1
                    };
                    let Some(job) = jobs.get(i) else { break };
                    let result = f(job);
                    results.lock().unwrap()[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(Option::unwrap)
        .collect()
}

/// PTX of `source` for `compute_{arch}`, written to `out`.
fn compile_ptx(
    compiler: &Compiler,
    kernels: &Path,
    source: &Path,
    arch: u32,
    out: &Path,
) -> PathBuf {
    let family = source.file_stem().unwrap().to_string_lossy();
    let ptx = out.join(format!("{family}.compute_{arch}.ptx"));
    let include = format!("-I{}", kernels.display());
    match compiler {
        Compiler::Nvcc { path, .. } => {
            let arch_arg = format!("-arch=compute_{arch}");
            let args = [
                "-std=c++17",
                "-O3",
                "-lineinfo",
                &include,
                &arch_arg,
                "-ptx",
                "-o",
            ];
            run(
                path,
                &[
                    &args[..],
                    &[ptx.to_str().unwrap(), source.to_str().unwrap()],
                ]
                .concat(),
                source,
            );
        }
        Compiler::Nvrtc { nvrtc, wheels, .. } => {
            // -default-device: the kernels' lambdas are device code (nvcc infers it).
            let options: Vec<String> = ["-std=c++17", "-default-device", "-lineinfo"]
                .map(String::from)
                .into_iter()
                .chain([include])
                .chain(
                    wheels
                        .include
                        .iter()
                        .map(|dir| format!("-I{}", dir.display())),
                )
                .collect();
            let text = nvrtc
                .compile_ptx(source, arch, &options)
                .unwrap_or_else(|log| {
                    panic!(
                        "NVRTC failed on {} (compute_{arch}): {log}",
                        source.display()
                    )
                });
            fs::write(&ptx, text).unwrap();
        }
    }
    ptx
}

/// The cubin of `source` for `sm_{arch}` (from `ptx`, its virtual architecture's PTX, with
/// ptxas), written to `cubin`; returns the `ptxas -v` report.
fn compile_cubin(
    compiler: &Compiler,
    kernels: &Path,
    source: &Path,
    ptx: &Path,
    arch: u32,
    cubin: &Path,
) -> String {
    let code = format!("sm_{arch}");
    match compiler {
        Compiler::Nvcc { path, .. } => {
            let include = format!("-I{}", kernels.display());
            let gencode = format!("arch=compute_{},code={code}", virtual_arch(arch));
            let args = [
                "-std=c++17",
                "-O3",
                "-lineinfo",
                &include,
                "-gencode",
                &gencode,
                "-cubin",
            ];
            let rest = [
                "-Xptxas",
                "-v",
                "-o",
                cubin.to_str().unwrap(),
                source.to_str().unwrap(),
            ];
            run(path, &[&args[..], &rest[..]].concat(), source)
        }
        Compiler::Nvrtc { wheels, .. } => {
            let arch_arg = format!("-arch={code}");
            let args = [
                &arch_arg,
                "-O3",
                "-lineinfo",
                "-v",
                "-o",
                cubin.to_str().unwrap(),
                ptx.to_str().unwrap(),
            ];
            run(&wheels.ptxas, &args, source)
        }
    }
}

/// Compiles every kernel family to a cubin per architecture (PTX per code path first), embeds
/// them and the PTX of [`PTX_FEATURE_ARCH`] (or the oldest built); returns the Rust source.
fn compile_kernels(compiler: &Compiler, kernels: &Path, sources: &[PathBuf], out: &Path) -> String {
    let archs = cuda_archs(compiler);
    let ptx_arch = virtual_arch(
        archs
            .iter()
            .copied()
            .find(|&a| a >= PTX_FEATURE_ARCH)
            .unwrap_or(archs[0]),
    );
    let mut virtuals: Vec<u32> = archs
        .iter()
        .map(|&a| virtual_arch(a))
        .chain([ptx_arch])
        .collect();
    virtuals.sort();
    virtuals.dedup();
    let ptx_jobs: Vec<(&PathBuf, u32)> = sources
        .iter()
        .flat_map(|s| virtuals.iter().map(move |&v| (s, v)))
        .collect();
    let ptx_files = parallel(&ptx_jobs, |&(source, v)| {
        compile_ptx(compiler, kernels, source, v, out)
    });
    let ptx_of = |source: &PathBuf, v: u32| {
        &ptx_files[ptx_jobs
            .iter()
            .position(|&(s, w)| s == source && w == v)
            .unwrap()]
    };
    let cubin_jobs: Vec<(&PathBuf, u32, PathBuf)> = sources
        .iter()
        .flat_map(|s| archs.iter().map(move |&a| (s, a)))
        .map(|(s, a)| {
            let family = s.file_stem().unwrap().to_string_lossy();
            (s, a, out.join(format!("{family}.sm_{a}.cubin")))
        })
        .collect();
    let logs = parallel(&cubin_jobs, |(source, arch, cubin)| {
        compile_cubin(
            compiler,
            kernels,
            source,
            ptx_of(source, virtual_arch(*arch)),
            *arch,
            cubin,
        )
    });

    let mut report = String::new();
    let mut code = format!(
        "{NOT_BUILT_DOC}pub const NOT_BUILT: Option<&str> = None;\n{IMAGES_DOC}pub const IMAGES: &[KernelImage] = &[\n"
    );
    for source in sources {
        let family = source.file_stem().unwrap().to_string_lossy().into_owned();
        let mut cubins = String::new();
        for ((_, arch, cubin), log) in cubin_jobs
            .iter()
            .zip(&logs)
            .filter(|((s, ..), _)| *s == source)
        {
            for warning in spill_warnings(log) {
                println!("cargo:warning=ccpl: {family}.cu sm_{arch}: {warning}");
            }
            report.push_str(log);
            write!(
                cubins,
                "({arch}, include_bytes!({:?})), ",
                cubin.to_str().unwrap()
            )
            .unwrap();
        }
        writeln!(
            code,
            "    KernelImage {{ family: {family:?}, ptx_arch: {ptx_arch}, ptx: include_str!({:?}), cubins: &[{cubins}] }},",
            ptx_of(source, ptx_arch).to_str().unwrap()
        )
        .unwrap();
    }
    code.push_str("];\n");
    writeln!(
        code,
        "{REPORT_DOC}pub const PTXAS_REPORT: &str = {report:?};"
    )
    .unwrap();
    let (major, minor) = compiler.version();
    let narrowed = env::var("CCPL_CUDA_ARCH").ok();
    writeln!(
        code,
        "{TOOLCHAIN_DOC}pub const TOOLCHAIN: Option<Toolchain> = Some(Toolchain {{ compiler: {:?}, cuda: ({major}, {minor}), arch_list: {narrowed:?} }});",
        compiler.describe()
    )
    .unwrap();
    code
}

/// Register spills or local-memory stack frames in a `ptxas -v` report, one line each.
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
