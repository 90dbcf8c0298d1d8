//! `kernels/similarity.cu` against the CPU reference, on the emulator and the GPU, for every
//! storage type, at sizes that are multiples of neither the 64-row tile nor the 32-deep stage.

use crate::common;

use ccpl::launch::similarity;
use ccpl::{Dtype, RowShape, Tau, reference};
use common::Rng;
use common::assert_close;
use common::device::TestDevice;
use common::fixtures::{random, row_shapes};
use common::tolerance::{F32_TOLERANCE, to_f64};

/// `(B, S, C)`: odd sizes, S = 8 with C = 1, one row and one column past a tile and a stage;
/// on the GPU S = 8192 and a deep C.
fn shapes<D: TestDevice>(dev: &D) -> Vec<RowShape> {
    row_shapes(
        dev,
        &[(2, 104, 37), (1, 8, 1), (1, 65, 33), (3, 136, 70)],
        &[(1, 8192, 3), (2, 1000, 129), (1, 1030, 515)],
    )
}

fn check_similarity<T: Dtype, D: TestDevice>(dev: &D, shape: &RowShape, rng: &mut Rng) {
    let tau = Tau::DEFAULT;
    let q: Vec<T> = random(rng, shape.len(), 1.0);
    let k: Vec<T> = random(rng, shape.len(), 1.0);
    let want = reference::similarity(&to_f64(&q), &to_f64(&k), shape, tau).unwrap();
    let mut q_dev = dev.upload(&q);
    let mut k_dev = dev.upload(&k);
    let mut logits_dev = dev.alloc_nan::<f32>(shape.logits_len());
    let plan = similarity::similarity::<T>(
        shape,
        tau,
        dev.buf(&mut q_dev),
        dev.buf(&mut k_dev),
        dev.buf(&mut logits_dev),
    );
    let got = dev.run_and_read(plan, &logits_dev);
    let what = format!(
        "similarity {} B={} S={} C={} on the {}",
        T::SUFFIX,
        shape.batch(),
        shape.rows(),
        shape.width(),
        dev.name()
    );
    // The inputs are exact in T and the logits are float32 whatever T: the float32 tolerance.
    assert_close(&what, &got, &want, F32_TOLERANCE);
}

fn similarity_matches_reference<D: TestDevice>(dev: &D) {
    let mut rng = Rng::new(5);
    for shape in shapes(dev) {
        for_each_dtype!(check_similarity(dev, &shape, &mut rng));
    }
}

on_every_device!(similarity_matches_reference);
