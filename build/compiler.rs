//! The compiler of the kernels, found in this order: a CUDA toolkit's nvcc (`CCPL_NVCC`, else
//! `CUDA_HOME`/`CUDA_PATH`, else nvcc on `PATH`); else the CUDA 12.9 compilers that
//! `scripts/bootstrap` installs from PyPI (NVRTC to PTX, ptxas to cubins: the wheels have no nvcc).
//! `CCPL_PINNED_COMPILER=1` takes those wheels even where a toolkit is: the tested build, whose
//! cubins load on every driver from R525 on (a toolkit newer than the driver makes them
//! unloadable).

use crate::bindings;
use crate::nvrtc::{Nvrtc, Wheels};

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The compiler of the kernels.
pub enum Compiler {
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
    pub fn version(&self) -> (u32, u32) {
        match self {
            Compiler::Nvcc { version, .. } | Compiler::Nvrtc { version, .. } => *version,
        }
    }
    pub fn describe(&self) -> String {
        let (major, minor) = self.version();
        match self {
            Compiler::Nvcc { path, .. } => format!("nvcc {major}.{minor} ({})", path.display()),
            Compiler::Nvrtc { .. } => format!("NVRTC {major}.{minor} + ptxas {major}.{minor}"),
        }
    }
    /// The compute capabilities it builds for.
    pub fn archs(&self) -> Vec<u32> {
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

/// The compiler of the kernels, or why there is none.
pub fn find_compiler(manifest: &Path) -> Result<Compiler, String> {
    let nvcc_at =
        |path: PathBuf| nvcc_version(&path).map(|version| Compiler::Nvcc { path, version });
    if pinned_compiler_required() {
        return pinned_wheels(manifest).map_err(|why| format!("CCPL_PINNED_COMPILER=1 but {why}"));
    }
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
    pinned_wheels(manifest)
}

/// Whether `CCPL_PINNED_COMPILER=1` asks for the pinned wheels whatever toolkit is installed.
fn pinned_compiler_required() -> bool {
    env::var("CCPL_PINNED_COMPILER").is_ok_and(|v| v == "1")
}

/// NVRTC and ptxas of the wheels `scripts/bootstrap` installs, or why they do not run.
fn pinned_wheels(manifest: &Path) -> Result<Compiler, String> {
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

/// Runs a compiler tool; its stderr (ptxas's -v report) on success, a panic with it otherwise.
pub fn run(tool: &Path, args: &[&str], what: &Path) -> String {
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
