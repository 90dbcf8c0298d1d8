//! The kernels compiled: PTX per kernel family and code path (nvcc, or NVRTC), then a cubin per
//! architecture from its code path's PTX (nvcc, or ptxas), every job on every core.

use crate::archs::{PTX_FEATURE_ARCH, cuda_archs, virtual_arch};
use crate::compiler::{Compiler, run};
use crate::parallel::parallel;

use std::fs;
use std::path::{Path, PathBuf};

/// The kernels as compiled: the architecture of the embedded PTX and every family's files.
pub struct Compiled {
    pub ptx_arch: u32,
    pub families: Vec<Family>,
}

/// One kernel family (`kernels/<name>.cu`): its PTX for `ptx_arch` and its cubins.
pub struct Family {
    pub name: String,
    pub ptx: PathBuf,
    pub cubins: Vec<Cubin>,
}

/// The image of a family for one architecture, with the `ptxas -v` report of its build.
pub struct Cubin {
    pub arch: u32,
    pub path: PathBuf,
    pub report: String,
}

/// Compiles every kernel family to a cubin per architecture (PTX per code path first), and the
/// PTX to embed: for [`PTX_FEATURE_ARCH`] (or the oldest built).
pub fn compile_kernels(
    compiler: &Compiler,
    kernels: &Path,
    sources: &[PathBuf],
    out: &Path,
) -> Compiled {
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
    // NVRTC is thread-safe.
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
    let reports = parallel(&cubin_jobs, |(source, arch, cubin)| {
        compile_cubin(
            compiler,
            kernels,
            source,
            ptx_of(source, virtual_arch(*arch)),
            *arch,
            cubin,
        )
    });
    // The jobs go family by family, each over every architecture.
    let mut cubins = cubin_jobs
        .iter()
        .zip(reports)
        .map(|((_, arch, path), report)| Cubin {
            arch: *arch,
            path: path.clone(),
            report,
        });
    let families = sources
        .iter()
        .map(|source| Family {
            name: source.file_stem().unwrap().to_string_lossy().into_owned(),
            ptx: ptx_of(source, ptx_arch).clone(),
            cubins: cubins.by_ref().take(archs.len()).collect(),
        })
        .collect();
    Compiled { ptx_arch, families }
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
