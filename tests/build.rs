//! What build.rs embedded: real compiler output (no stub), a cubin for every architecture of
//! the support matrix, in a form the drivers of the CUDA 12 line (R525 on) take.

use ccpl::cuda::{self, entry_points};
use ccpl::ffi::{IMAGES, NOT_BUILT, TOOLCHAIN};

/// `kernels/*.cu`, the families build.rs must have compiled: this crate's, else (a packed test
/// binary on another machine, run from the repository root) `./kernels`.
fn kernel_sources() -> Vec<String> {
    let built_from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let dir = if built_from.is_dir() {
        built_from
    } else {
        std::path::PathBuf::from("kernels")
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn kernels_were_built_when_nvcc_is_required() {
    if std::env::var("CCPL_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
        assert_eq!(
            NOT_BUILT, None,
            "CCPL_REQUIRE_NVCC=1 but the kernels were not built"
        );
    }
    match NOT_BUILT {
        None => assert!(cuda::kernels_built().is_ok()),
        Some(why) => {
            eprintln!("SKIPPED image checks: kernels not built ({why})");
            assert_eq!(
                cuda::kernels_built(),
                Err(ccpl::Error::KernelsNotBuilt(why))
            );
        }
    }
}

#[test]
fn every_kernel_source_is_embedded_as_cubin_and_ptx() {
    if NOT_BUILT.is_some() {
        eprintln!("SKIPPED: kernels not built");
        return;
    }
    let families: Vec<&str> = IMAGES.iter().map(|i| i.family).collect();
    assert_eq!(families, kernel_sources());
    for image in IMAGES {
        assert!(!image.cubins.is_empty(), "{}: no cubin", image.family);
        for (arch, cubin) in image.cubins {
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{} sm_{arch}: not an ELF cubin",
                image.family
            );
        }
        assert!(
            image
                .ptx
                .contains(&format!(".target sm_{}", image.ptx_arch)),
            "{}",
            image.family
        );
        assert!(
            entry_points(image.ptx).count() > 0,
            "{}: PTX defines no kernel",
            image.family
        );
    }
}

/// The support matrix (README): a cubin for Turing, Ampere, Ada and Hopper (and Blackwell
/// where the compiler has it), and PTX for sm_80, which the driver compiles for any newer GPU
/// with every feature of the kernels (bf16 tensor cores). `CCPL_CUDA_ARCH` narrows it.
#[test]
fn the_default_build_covers_the_support_matrix() {
    let Some(toolchain) = TOOLCHAIN else {
        eprintln!("SKIPPED: kernels not built");
        return;
    };
    if let Some(list) = toolchain.arch_list {
        eprintln!("SKIPPED: CCPL_CUDA_ARCH={list} narrowed the architectures");
        return;
    }
    let mut required = vec![75, 80, 86, 89, 90];
    if toolchain.cuda >= (12, 8) {
        required.extend([100, 120]); // Blackwell, from CUDA 12.8 on
    }
    for image in IMAGES {
        let archs: Vec<u32> = image.cubins.iter().map(|(a, _)| *a).collect();
        assert_eq!(archs, required, "{}: cubins", image.family);
        assert_eq!(image.ptx_arch, 80, "{}: PTX", image.family);
    }
}

/// The PTX ISA each CUDA release writes (and its driver reads at most), or `None` for a
/// release this table does not know yet.
fn ptx_isa_of(cuda: (u32, u32)) -> Option<(u32, u32)> {
    match cuda {
        (12, minor @ 0..=5) => Some((8, minor)),
        (12, 6) => Some((8, 5)),
        (12, 8) => Some((8, 7)),
        (12, 9) => Some((8, 8)),
        (13, 0) => Some((9, 0)),
        _ => None,
    }
}

#[test]
fn ptx_isa_of_knows_the_pinned_releases_and_not_others() {
    assert_eq!(ptx_isa_of((12, 9)), Some((8, 8)));
    assert_eq!(ptx_isa_of((13, 0)), Some((9, 0)));
    assert_eq!(ptx_isa_of((14, 2)), None);
}

/// The compiler matches its own PTX ISA (wheels of mixed releases, such as a newer nvvm, would
/// build fine here and fail to load on the GPU), and the default toolchain is CUDA 12's, so
/// the cubins load on every driver from R525 on. A CUDA 13 toolkit (set by CCPL_NVCC or
/// CUDA_HOME) is the user's choice, for drivers from R580 on. A release missing from
/// [`ptx_isa_of`] is reported and its ISA left unchecked.
#[test]
fn ptx_isa_is_the_toolchains_and_cuda_12_by_default() {
    let Some(toolchain) = TOOLCHAIN else {
        eprintln!("SKIPPED: kernels not built");
        return;
    };
    if toolchain.compiler.starts_with("NVRTC") {
        assert_eq!(toolchain.cuda.0, 12, "{toolchain:?}");
    }
    let Some(writable) = ptx_isa_of(toolchain.cuda) else {
        eprintln!(
            "SKIPPED: CUDA {}.{} is not in ptx_isa_of's table; add the PTX ISA it writes",
            toolchain.cuda.0, toolchain.cuda.1
        );
        return;
    };
    for image in IMAGES {
        let version = image
            .ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
            .unwrap_or_else(|| panic!("{}: PTX without .version", image.family));
        let (major, minor) = version.trim().split_once('.').unwrap();
        let isa: (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        assert!(
            isa <= writable,
            "{}: PTX ISA {version} is newer than CUDA {:?} writes",
            image.family,
            toolchain.cuda
        );
    }
}

/// sm_90's cubins come from compute_90 PTX, where `atomicAdd` on bf16 is one native
/// instruction instead of a compare-and-swap loop (build/archs.rs, `CODE_PATH_ARCHS`). The PTX
/// is build.rs's, in this package's `OUT_DIR`: checked where it was built, skipped elsewhere
/// (a packed test binary on another machine).
#[test]
fn sm_90_is_built_from_compute_90_with_native_bf16_atomics() {
    if !IMAGES
        .iter()
        .any(|i| i.cubins.iter().any(|(arch, _)| *arch == 90))
    {
        eprintln!("SKIPPED: no sm_90 cubin in this build");
        return;
    }
    let ptx = std::path::Path::new(env!("OUT_DIR")).join("neighbor.compute_90.ptx");
    let Ok(text) = std::fs::read_to_string(&ptx) else {
        eprintln!("SKIPPED: {} is not on this machine", ptx.display());
        return;
    };
    assert!(
        text.contains("atom.add.noftz.bf16"),
        "{}: no native bf16 atomicAdd",
        ptx.display()
    );
    assert!(
        !text.contains("atom.global.cas.b16") && !text.contains("atom.cas.b16"),
        "{}: a compare-and-swap loop is left",
        ptx.display()
    );
}
