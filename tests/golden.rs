//! The CPU reference against the PyTorch goldens of `tools/make_goldens.py`: every case file of
//! the golden folder (`$CCPL_GOLDEN_DIR`, else `tests/golden`), loss and both gradients. Also
//! checks that the loader fails, naming file and tensor, on a folder or file it cannot use.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ccpl::Tau;
use ccpl::reference::ccp_layer_loss;
use common::golden::{self, GoldenCase};
use common::rel_err;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Relative error of the loss. Measured at most 9.9e-16 on the committed cases and 4.2e-15 on
/// 40 random ones (`make_goldens.py DIR --random 40 --seed 7 --max-elements 100000`): the same
/// float64 sums in another order.
const TOL_LOSS: f64 = 1e-13;
/// Relative norm error of either gradient. Measured at most 1.4e-15 on the committed cases; on
/// the 40 random ones 3.4e-15, except up to 7.5e-12 for grad_feat_q where rows are exactly zero
/// on both sides over a dense patch of centres: there a position's gradient is the sum of
/// `+-g/eps` terms (spec step 5) that cancel to ~1e-8 of their size, so float64 rounding of
/// terms 1e7 times the result shows (the NumPy form of the spec differs from PyTorch as much).
const TOL_GRAD: f64 = 1e-10;

/// What [`errors`] compares, in its order.
const QUANTITIES: [&str; 3] = ["loss", "grad_feat_q", "grad_feat_k"];

/// The reference's loss and gradients for one case, and their errors against the golden.
fn errors(case: &GoldenCase) -> Result<[f64; 3], String> {
    let (shape, centers) = case.inputs().map_err(|e| format!("inputs: {e}"))?;
    let out = ccp_layer_loss(&case.feat_q, &case.feat_k, &shape, &centers, case.tau, true)
        .map_err(|e| format!("ccp_layer_loss: {e}"))?;
    let grad_k = out
        .grad_feat_k
        .ok_or("ccp_layer_loss gave no grad_feat_k though asked")?;
    Ok([
        rel_err(&[out.loss], &[case.loss]),
        rel_err(&out.grad_feat_q, &case.grad_feat_q),
        rel_err(&grad_k, &case.grad_feat_k),
    ])
}

#[test]
fn cpu_reference_matches_pytorch_goldens() {
    let dir = golden::golden_dir();
    let cases = golden::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let tolerances = [TOL_LOSS, TOL_GRAD, TOL_GRAD];
    let mut worst = [0.0f64; 3];
    let mut failures = Vec::new();
    for case in &cases {
        match errors(case) {
            Ok(errs) => {
                println!(
                    "{}: loss {:.1e}, grad_feat_q {:.1e}, grad_feat_k {:.1e}",
                    case.name(),
                    errs[0],
                    errs[1],
                    errs[2]
                );
                for (((worst, err), tol), what) in
                    worst.iter_mut().zip(errs).zip(tolerances).zip(QUANTITIES)
                {
                    *worst = worst.max(err);
                    if err.is_nan() || err > tol {
                        failures.push(format!(
                            "{}: {what} relative error {err:.2e} over {tol:.0e}",
                            case.name()
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.name())),
        }
    }
    println!(
        "worst relative errors: loss {:.1e}, grad_feat_q {:.1e}, grad_feat_k {:.1e}",
        worst[0], worst[1], worst[2]
    );
    assert!(
        failures.is_empty(),
        "golden cases failed:\n{}",
        failures.join("\n")
    );
    println!(
        "checked {} golden cases from {}",
        cases.len(),
        dir.display()
    );
}

// ---------------------------------------------------------------------------------------------
// The loader fails on what it cannot use
// ---------------------------------------------------------------------------------------------

/// A tensor of a case file: name, dtype, shape, little-endian bytes.
type Tensor = (&'static str, Dtype, Vec<usize>, Vec<u8>);

/// The tensor names a case file must hold.
const NAMES: [&str; 7] = [
    "feat_q",
    "feat_k",
    "centers",
    "tau",
    "loss",
    "grad_feat_q",
    "grad_feat_k",
];

fn bytes_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
fn bytes_f64(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A well-formed case, `(B, C, H, W) = (1, 2, 3, 4)`, with distinct values to check the reading.
fn valid_case() -> Vec<Tensor> {
    let dims = vec![1, 2, 3, 4];
    let feat: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
    let grad: Vec<f64> = (0..24).map(|i| i as f64 * -0.25).collect();
    vec![
        ("feat_q", Dtype::F32, dims.clone(), bytes_f32(&feat)),
        (
            "feat_k",
            Dtype::F32,
            dims.clone(),
            bytes_f32(&feat.iter().map(|v| v + 1.0).collect::<Vec<_>>()),
        ),
        (
            "centers",
            Dtype::I64,
            vec![2],
            [5i64, 6].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        ("tau", Dtype::F64, vec![1], bytes_f64(&[0.07])),
        ("loss", Dtype::F64, vec![1], bytes_f64(&[2.5])),
        ("grad_feat_q", Dtype::F64, dims.clone(), bytes_f64(&grad)),
        (
            "grad_feat_k",
            Dtype::F64,
            dims,
            bytes_f64(&grad.iter().map(|v| v * 2.0).collect::<Vec<_>>()),
        ),
    ]
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ccpl-golden-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Self(dir)
    }
    /// Writes `tensors` as safetensors file `name`, returning its path.
    fn write(&self, name: &str, tensors: &[Tensor]) -> PathBuf {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|(n, dtype, shape, data)| {
                (
                    *n,
                    TensorView::new(*dtype, shape.clone(), data).expect("consistent view"),
                )
            })
            .collect();
        let bytes = safetensors::tensor::serialize(views, &None::<HashMap<String, String>>)
            .expect("serialize");
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write case");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Asserts that loading `path` fails with a message naming the file and each of `words`.
fn assert_rejected(path: &Path, words: &[&str]) {
    let err = golden::load_case(path).expect_err("a malformed case must not load");
    let file = path.file_name().unwrap().to_string_lossy();
    for word in std::iter::once(file.as_ref()).chain(words.iter().copied()) {
        assert!(err.contains(word), "message {err:?} should name {word:?}");
    }
}

#[test]
fn loader_reads_every_tensor() {
    let scratch = Scratch::new("valid");
    scratch.write("case.safetensors", &valid_case());
    std::fs::write(scratch.0.join("README.md"), "not a case").unwrap();
    let cases = golden::load_dir(&scratch.0).unwrap();
    assert_eq!(cases.len(), 1, "only *.safetensors files are cases");
    let case = &cases[0];
    assert_eq!(
        (case.batch, case.channels, case.height, case.width),
        (1, 2, 3, 4)
    );
    assert_eq!(case.feat_q[23], 11.5);
    assert_eq!(case.feat_k[1], 1.5);
    assert_eq!(case.centers, [5, 6]);
    assert_eq!((case.tau, case.loss), (Tau::DEFAULT, 2.5));
    assert_eq!(case.grad_feat_q[3], -0.75);
    assert_eq!(case.grad_feat_k[3], -1.5);
}

#[test]
fn loader_fails_on_a_folder_without_cases() {
    let scratch = Scratch::new("empty");
    std::fs::write(scratch.0.join("README.md"), "not a case").unwrap();
    let err = golden::load_dir(&scratch.0).expect_err("an empty folder must fail");
    assert!(err.contains("no *.safetensors case"), "{err}");
    let missing = scratch.0.join("absent");
    let err = golden::load_dir(&missing).expect_err("a missing folder must fail");
    assert!(err.contains("absent"), "{err}");
}

#[test]
fn loader_fails_on_a_missing_tensor() {
    let scratch = Scratch::new("missing");
    for name in NAMES {
        let tensors: Vec<Tensor> = valid_case().into_iter().filter(|t| t.0 != name).collect();
        let path = scratch.write(&format!("without_{name}.safetensors"), &tensors);
        assert_rejected(&path, &[&format!("`{name}`"), "missing"]);
    }
}

#[test]
fn loader_fails_on_a_wrong_dtype() {
    let scratch = Scratch::new("dtype");
    for name in NAMES {
        let mut tensors = valid_case();
        let tensor = tensors.iter_mut().find(|t| t.0 == name).unwrap();
        // Same element size, other type: only the dtype check can catch it.
        tensor.1 = match tensor.1 {
            Dtype::F32 => Dtype::I32,
            Dtype::F64 => Dtype::I64,
            _ => Dtype::F64,
        };
        let path = scratch.write(&format!("dtype_{name}.safetensors"), &tensors);
        assert_rejected(&path, &[&format!("`{name}`"), "dtype"]);
    }
}

#[test]
fn loader_fails_on_a_wrong_shape() {
    let scratch = Scratch::new("shape");
    let reshaped: [(&str, Vec<usize>); 7] = [
        ("feat_q", vec![2, 3, 4]),
        ("feat_k", vec![1, 2, 4, 3]),
        ("centers", vec![1, 2]),
        ("tau", vec![]),
        ("loss", vec![1, 1]),
        ("grad_feat_q", vec![2, 1, 3, 4]),
        ("grad_feat_k", vec![1, 2, 12]),
    ];
    for (name, shape) in reshaped {
        let mut tensors = valid_case();
        tensors.iter_mut().find(|t| t.0 == name).unwrap().2 = shape;
        let path = scratch.write(&format!("shape_{name}.safetensors"), &tensors);
        assert_rejected(&path, &[&format!("`{name}`"), "shape"]);
    }
}

#[test]
fn loader_fails_on_a_golden_that_is_not_finite() {
    let scratch = Scratch::new("finite");
    for name in ["loss", "grad_feat_q", "grad_feat_k"] {
        let mut tensors = valid_case();
        let data = &mut tensors.iter_mut().find(|t| t.0 == name).unwrap().3;
        data[..8].copy_from_slice(&f64::NAN.to_le_bytes());
        let path = scratch.write(&format!("nan_{name}.safetensors"), &tensors);
        assert_rejected(&path, &[&format!("`{name}`"), "not finite"]);
    }
}

#[test]
fn loader_fails_on_a_file_that_is_not_safetensors() {
    let scratch = Scratch::new("garbage");
    let path = scratch.0.join("garbage.safetensors");
    std::fs::write(&path, b"\x10\0\0\0\0\0\0\0{not json}").unwrap();
    assert_rejected(&path, &["not a safetensors file"]);
}
