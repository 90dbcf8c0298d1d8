//! The crate's kernels on the emulator: every kernel of the GPU image is there, the paths only a
//! GPU takes are listed, and a real kernel family runs through its launch plan, at a large size
//! too.

use std::time::Instant;

use ccpl::launch::{CentersBuf, Launcher, neighbor};
use ccpl::{Centers, Dtype, FeatureShape, Layout};
use ccpl_emu as emu;
use ccpl_testkit::Rng;
use half::{bf16, f16};

use crate::common::{block_reduce_expected, emulator, integer_inputs, run_1d};

/// `kernels/*.cu` files and `common.cuh` with text from `needle`.
fn kernel_files_containing(needle: &str) -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|text| text.contains(needle)))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

#[test]
fn gpu_only_paths_are_listed() {
    let mut listed: Vec<String> = emu::GPU_ONLY_PATHS
        .iter()
        .map(|(file, _)| file.to_string())
        .collect();
    listed.sort();
    listed.dedup();
    assert_eq!(
        kernel_files_containing("CCPL_EMULATOR"),
        listed,
        "update ccpl::emu::GPU_ONLY_PATHS"
    );
    for (file, what) in emu::GPU_ONLY_PATHS {
        eprintln!("checked on a GPU only: {file}: {what}");
    }
    if emu::GPU_ONLY_PATHS.is_empty() {
        eprintln!("no GPU-only kernel paths: the emulator runs every kernel whole");
    }
}

#[test]
fn the_emulator_has_every_kernel_the_gpu_image_has() {
    let emulated: Vec<&str> = emu::kernel_names();
    for family in ["neighbor_diff"] {
        for suffix in ["f32", "f16", "bf16"] {
            let name = format!("{family}_{suffix}");
            assert!(
                emulated.contains(&name.as_str()),
                "{name} is not in the emulator"
            );
        }
    }
    if ccpl::ffi::NOT_BUILT.is_some() {
        eprintln!("SKIPPED comparison with the GPU images: kernels not built");
        return;
    }
    let mut gpu: Vec<&str> = ccpl::ffi::IMAGES
        .iter()
        .flat_map(|i| ccpl::cuda::entry_points(i.ptx))
        .collect();
    let mut cpu: Vec<&str> = emulated
        .into_iter()
        .filter(|n| !n.starts_with("selftest_"))
        .collect();
    gpu.sort();
    cpu.sort();
    assert_eq!(cpu, gpu);
}

/// `neighbor_diff` through its launch plan, exactly as the kernel must compute it: the
/// difference in f32 of the two stored values, stored in T.
fn check_neighbor_diff<T: Dtype>(layout: Layout) {
    let shape = FeatureShape::new(2, 5, 7, 9, layout).unwrap();
    let centers = Centers::sample(7, 9, 11, 3).unwrap();
    let mut rng = Rng::new(21);
    let feat: Vec<T> = (0..shape.len())
        .map(|_| T::from_f64(rng.int(-1000, 1000) as f64 / 37.0))
        .collect();
    let map = centers.center_map();
    let buf = CentersBuf {
        height: 7,
        width: 9,
        flat: emu::buf(centers.flat()),
        map: emu::buf(&map),
    };
    let n = centers.len();
    let mut rows = vec![T::from_f64(f64::NAN); neighbor::rows_len(&shape, n).unwrap()];
    let plan = neighbor::neighbor_diff::<T>(&shape, &buf, emu::buf(&feat), emu::buf_mut(&mut rows))
        .unwrap();
    emulator(4).launch(&plan).unwrap();
    for b in 0..2 {
        for k in 0..8 {
            let (dh, dw) = ccpl::ffi::neighbor_delta(k);
            for (x, &p) in centers.flat().iter().enumerate() {
                let (h, w) = (p as usize / 9, p as usize % 9);
                let (nh, nw) = ((h as isize + dh) as usize, (w as isize + dw) as usize);
                for c in 0..5 {
                    let centre = feat[shape.index(b, c, h, w).unwrap()].to_f64() as f32;
                    let neighbour = feat[shape.index(b, c, nh, nw).unwrap()].to_f64() as f32;
                    let want = T::from_f64((centre - neighbour) as f64);
                    let got = rows[((b * 8 + k) * n + x) * 5 + c];
                    assert_eq!(
                        got.to_f64().to_bits(),
                        want.to_f64().to_bits(),
                        "{} b{b} k{k} x{x} c{c}",
                        T::SUFFIX
                    );
                }
            }
        }
    }
}

#[test]
fn neighbor_diff_runs_through_its_launch_plan() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        check_neighbor_diff::<f32>(layout);
        check_neighbor_diff::<f16>(layout);
        check_neighbor_diff::<bf16>(layout);
    }
}

#[test]
fn a_large_launch_is_right_and_its_speed_is_reported() {
    let (blocks, threads, n) = (64usize, 256u32, 4099i32);
    let input = integer_inputs(blocks * n as usize, 1);
    let mut out = vec![f32::NAN; 3 * blocks];
    let start = Instant::now();
    run_1d(
        0,
        "selftest_block_reduce",
        (blocks as u32, threads),
        &input,
        &mut out,
        n,
        0,
    )
    .unwrap();
    let elapsed = start.elapsed();
    for b in 0..blocks {
        let segment = &input[b * n as usize..(b + 1) * n as usize];
        assert_eq!(
            out[3 * b..3 * b + 3],
            block_reduce_expected(segment, threads as usize)
        );
    }
    // Per thread: 3 reductions of 2 barriers and 10 shuffles each.
    let switches = blocks as f64 * threads as f64 * 36.0;
    eprintln!(
        "{blocks} blocks x {threads} threads, 3 block reductions: {elapsed:?} ({:.0} ns per synchronisation)",
        elapsed.as_nanos() as f64 / switches
    );
}
