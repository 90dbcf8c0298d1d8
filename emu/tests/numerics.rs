//! The emulator's arithmetic: half conversions round as CUDA's, the portable WMMA multiplies
//! exactly, and its tensor-core model adds as the modelled architecture's tensor cores do.

use ccpl_emu as emu;
use ccpl_testkit::Rng;
use half::{bf16, f16};

use crate::common::hmma_vectors;
use crate::common::run_1d;

#[test]
fn half_conversions_round_to_nearest_even_like_cuda() {
    let mut rng = Rng::new(99);
    let mut input: Vec<f32> = (0..200_000)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .collect();
    // Ties, overflow, subnormals, signed zeros and infinities of both formats.
    input.extend([
        0.0,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        5.960_464_5e-8,
        2.980_232_2e-8,
        2.980_233e-8,
        6.103_515_6e-5,
        1.0 + 1.0 / 256.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        f32::NAN,
        -f32::NAN,
    ]);
    let n = input.len();
    let mut out = vec![0u32; 4 * n];
    run_1d(
        0,
        "selftest_conversions",
        (n.div_ceil(256) as u32, 256),
        &input,
        &mut out,
        n as i32,
        0,
    )
    .unwrap();
    for (i, &x) in input.iter().enumerate() {
        let (h, b) = (out[4 * i] as u16, out[4 * i + 1] as u16);
        if x.is_nan() {
            assert_eq!((h, b), (0x7fff, 0x7fff), "NaN {:#x}", x.to_bits());
            assert!(
                f32::from_bits(out[4 * i + 2]).is_nan() && f32::from_bits(out[4 * i + 3]).is_nan()
            );
            continue;
        }
        assert_eq!(
            h,
            f16::from_f32(x).to_bits(),
            "half of {x:e} ({:#x})",
            x.to_bits()
        );
        assert_eq!(
            b,
            bf16::from_f32(x).to_bits(),
            "bfloat16 of {x:e} ({:#x})",
            x.to_bits()
        );
        assert_eq!(
            out[4 * i + 2],
            f16::from_bits(h).to_f32().to_bits(),
            "half {h:#x} to float"
        );
        assert_eq!(
            out[4 * i + 3],
            bf16::from_bits(b).to_f32().to_bits(),
            "bfloat16 {b:#x} to float"
        );
    }
}

/// `selftest_wmma` on `input` (A, B and C, 16x16 each), in __half (`arg` 0) or
/// __nv_bfloat16 (1): A B + C.
fn wmma(input: &[f32], arg: i32) -> Vec<f32> {
    let mut out = vec![f32::NAN; 256];
    run_1d(
        arg as u64,
        "selftest_wmma",
        (1, 32),
        input,
        &mut out,
        256,
        arg,
    )
    .unwrap();
    out
}

/// The portable WMMA: A B + C of 16x16 matrices of small integers (exact in both 16-bit types
/// and in every float sum), in __half and __nv_bfloat16, through row- and column-major loads
/// and stores.
#[test]
fn wmma_multiplies_exactly() {
    let mut rng = 0x1234_5678u64;
    let mut next = || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        ((rng >> 33) % 17) as f32 - 8.0
    };
    let input: Vec<f32> = (0..768).map(|_| next()).collect();
    let (a, b, c) = (&input[..256], &input[256..512], &input[512..]);
    let want: Vec<f32> = (0..256)
        .map(|i| {
            let (m, n) = (i / 16, i % 16);
            c[i] + (0..16).map(|k| a[m * 16 + k] * b[k * 16 + n]).sum::<f32>()
        })
        .collect();
    for arg in [0, 1] {
        let out = wmma(&input, arg);
        assert_eq!(
            out,
            want,
            "wmma in {}",
            ["__half", "__nv_bfloat16"][arg as usize]
        );
    }
}

/// The tensor-core model (runtime/hmma.h) on the vectors that tell the architectures apart:
/// extra alignment bits, the final rounding toward zero, the block size and order, the
/// unnormalised product exponent, truncation in sign-magnitude, a bf16 subnormal result.
#[test]
fn hmma_model_gives_each_architectures_bits() {
    for v in hmma_vectors::vectors() {
        let (a, b) = v.factors();
        for arch in [75, 80, 86, 89, 90, 100] {
            let got = emu::hmma_dot(arch, v.bf16, v.c, &a, &b);
            assert_eq!(
                Some(got),
                v.expected_on(arch),
                "{} on sm_{arch}: {got:e}",
                v.name
            );
        }
    }
}

/// The emulator's mma_sync adds as the modelled architecture's tensor cores do: every element
/// of a product of random inputs of mixed magnitudes equals the model's, bit for bit, and
/// differs from float fmaf somewhere (which a test of the model would otherwise not notice).
#[test]
fn wmma_adds_as_the_tensor_cores_of_the_modelled_architecture() {
    let mut rng = 0x9e37_79b9u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1442695040888963407);
        let unit = (rng >> 11) as f64 / (1u64 << 53) as f64;
        let magnitude = 2f64.powi((rng % 9) as i32 - 4);
        ((unit - 0.5) * magnitude) as f32
    };
    let input: Vec<f32> = (0..768).map(|_| next()).collect();
    for (arg, bf16) in [(0, false), (1, true)] {
        let exact = |x: f32| {
            if bf16 {
                half::bf16::from_f32(x).to_f64()
            } else {
                half::f16::from_f32(x).to_f64()
            }
        };
        let out = wmma(&input, arg);
        let mut differs_from_fmaf = 0;
        for i in 0..256 {
            let (m, n) = (i / 16, i % 16);
            let a: Vec<f64> = (0..16).map(|k| exact(input[m * 16 + k])).collect();
            let b: Vec<f64> = (0..16).map(|k| exact(input[256 + k * 16 + n])).collect();
            let c = input[512 + i];
            let want = emu::hmma_dot(emu::ARCH, bf16, c, &a, &b);
            assert_eq!(
                out[i].to_bits(),
                want.to_bits(),
                "element {i} ({})",
                ["f16", "bf16"][arg as usize]
            );
            let fmaf = (0..16).fold(c, |acc, k| (a[k] as f32).mul_add(b[k] as f32, acc));
            differs_from_fmaf += usize::from(fmaf != want);
        }
        assert!(
            differs_from_fmaf > 0,
            "the model never differs from fmaf on these inputs"
        );
    }
}
