//! The architecture matrix: which compute capabilities are built, and which PTX each cubin is
//! compiled from.

use crate::compiler::Compiler;

use std::env;

/// The architectures built by default: Turing (T4), Ampere (A100; RTX 30, A40), Ada (RTX 40,
/// L4, L40), Hopper (H100, H200), Blackwell (B200; RTX 50) where the compiler has them.
pub const DEFAULT_ARCHS: &[u32] = &[75, 80, 86, 89, 90, 100, 120];
/// Of those, the ones every supported compiler (CUDA 12.0 on) must build.
pub const REQUIRED_ARCHS: &[u32] = &[75, 80, 86, 89, 90];
/// The architectures where the kernels' code changes: sm_80 brings bf16 tensor cores
/// (`CCPL_ARCH` in kernels/common.cuh), sm_90 a native bf16 `atomicAdd` (cuda_bf16.hpp's
/// `NV_PROVIDES_SM_90`; compare-and-swap loops before it). A kernel path for a newer one must
/// add it here.
pub const CODE_PATH_ARCHS: &[u32] = &[75, 80, 90];
/// The oldest architecture whose PTX has every feature of the kernels: the PTX embedded for
/// GPUs newer than every cubin is for it (the driver compiles it for any newer GPU), or for
/// the oldest built when the list has nothing from it on.
pub const PTX_FEATURE_ARCH: u32 = 80;

/// `CCPL_CUDA_ARCH`, or the default matrix as far as `compiler` builds it.
pub fn cuda_archs(compiler: &Compiler) -> Vec<u32> {
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

/// The virtual architecture (PTX) a cubin for `arch` is compiled from: the newest of
/// [`CODE_PATH_ARCHS`] not above it. The kernels' code changes only there, so one PTX per path
/// serves every cubin of it (as `nvcc -gencode arch=compute_80,code=sm_90` does), at half the
/// build time of one front-end run per architecture.
pub fn virtual_arch(arch: u32) -> u32 {
    CODE_PATH_ARCHS
        .iter()
        .copied()
        .filter(|&v| v <= arch)
        .max()
        .unwrap_or(arch)
}
