//! What build.rs embedded: real nvcc output (no stub), in a form the GPU machines' driver takes.

use ccpl::cuda::{self, entry_points};
use ccpl::ffi::{IMAGES, NOT_BUILT};

/// `kernels/*.cu`, the families build.rs must have compiled.
fn kernel_sources() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
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

/// The GPU machines run driver 580 (CUDA 13.0), which takes PTX ISA 9.0 at most: a newer nvvm
/// (13.5 writes `.version 9.5`) would build fine here and fail to load there.
#[test]
fn ptx_isa_is_one_the_cuda_13_0_driver_loads() {
    for image in IMAGES {
        let version = image
            .ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
            .unwrap_or_else(|| panic!("{}: PTX without .version", image.family));
        let (major, minor) = version.trim().split_once('.').unwrap();
        let (major, minor): (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        assert!(
            (major, minor) <= (9, 0),
            "{}: PTX ISA {version} is newer than CUDA 13.0's 9.0",
            image.family
        );
    }
}
