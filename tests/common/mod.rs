//! Helpers shared by the test files: the workspace's test kit, layouts, and the device,
//! golden and plan helpers below.

#[macro_use]
pub mod device;
pub mod fixtures;
pub mod golden;
pub mod models;
pub mod tolerance;

use ccpl::launch::Buf;
pub use ccpl_testkit::{
    Rng, SPEC_DIRECTIONS, assert_close, chi_square, chi_square_uniform, rel_err,
};

/// The NHWC copy of an NCHW buffer of shape `(b, c, h, w)`.
pub fn nchw_to_nhwc(x: &[f64], b: usize, c: usize, h: usize, w: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    out[((bi * h + hi) * w + wi) * c + ci] = x[((bi * c + ci) * h + hi) * w + wi];
                }
            }
        }
    }
    out
}

/// A buffer of `len` elements at an address nothing reads: plans are pure data, and these
/// tests only build them.
pub fn buf(len: usize) -> Buf {
    Buf { addr: 0x1000, len }
}
