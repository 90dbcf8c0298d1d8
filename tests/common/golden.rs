//! Golden cases written by `tools/make_goldens.py`: PyTorch float64 autograd of the loss built
//! the original's way (with the spec's fixes), one safetensors file per case, NCHW. The loader
//! checks every tensor's presence, dtype and shape and names the file and tensor when one is
//! wrong, so that a broken or empty golden folder fails instead of passing vacuously. It serves
//! every suite that compares against the goldens (the CPU reference, the kernels).

use std::fmt::Display;
use std::path::{Path, PathBuf};

use ccpl::{Centers, FeatureShape, Layout, Tau};
use safetensors::{Dtype, SafeTensors};

/// Environment variable naming another folder of golden cases (e.g. a larger generated set).
pub const GOLDEN_DIR_VAR: &str = "CCPL_GOLDEN_DIR";

/// One golden case: the inputs and PyTorch's float64 results.
#[derive(Debug, Clone)]
pub struct GoldenCase {
    /// The file it was read from.
    pub path: PathBuf,
    /// Batch `B`.
    pub batch: usize,
    /// Channels `C`.
    pub channels: usize,
    /// Height `H`.
    pub height: usize,
    /// Width `W`.
    pub width: usize,
    /// Features of the generated image, `(B, C, H, W)`.
    pub feat_q: Vec<f32>,
    /// Features of the content image, `(B, C, H, W)`.
    pub feat_k: Vec<f32>,
    /// Flat interior indices `h*W + w`, in sampling order.
    pub centers: Vec<i64>,
    /// Temperature.
    pub tau: Tau,
    /// The loss.
    pub loss: f64,
    /// `d loss / d feat_q` (feat_k detached), `(B, C, H, W)`.
    pub grad_feat_q: Vec<f64>,
    /// `d loss / d feat_k` as if feat_k were not detached, `(B, C, H, W)`.
    pub grad_feat_k: Vec<f64>,
}

impl GoldenCase {
    /// The case's feature maps (NCHW) and centres, as the crate takes them.
    pub fn inputs(&self) -> ccpl::Result<(FeatureShape, Centers)> {
        let (b, c, h, w) = (self.batch, self.channels, self.height, self.width);
        let shape = FeatureShape::new(b, c, h, w, Layout::Nchw)?;
        Ok((shape, Centers::from_flat(h, w, &self.centers)?))
    }

    /// The file name, for messages.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// The golden folder: `$CCPL_GOLDEN_DIR`, else this crate's `tests/golden`.
pub fn golden_dir() -> PathBuf {
    std::env::var_os(GOLDEN_DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join("golden")
        })
}

/// Every `*.safetensors` file of `dir`, in name order. An error when the folder cannot be read,
/// holds no case, or any case is malformed.
pub fn load_dir(dir: &Path) -> Result<Vec<GoldenCase>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read golden folder {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot list golden folder {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "safetensors") {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(format!(
            "golden folder {} holds no *.safetensors case",
            dir.display()
        ));
    }
    paths.sort();
    paths.iter().map(|path| load_case(path)).collect()
}

/// One case file.
pub fn load_case(path: &Path) -> Result<GoldenCase, String> {
    let file = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{file}: not a safetensors file: {e:?}"))?;
    let fail = |name: &str, problem: &dyn Display| format!("{file}: tensor `{name}` {problem}");

    let (feat_q, dims) = read::<f32>(&tensors, "feat_q", None, &fail)?;
    let [batch, channels, height, width] = dims[..] else {
        return Err(fail(
            "feat_q",
            &format_args!("has shape {dims:?}, expected 4 dimensions [B, C, H, W]"),
        ));
    };
    let (feat_k, _) = read::<f32>(&tensors, "feat_k", Some(&dims), &fail)?;
    let (centers, center_dims) = read::<i64>(&tensors, "centers", None, &fail)?;
    if center_dims.len() != 1 {
        return Err(fail(
            "centers",
            &format_args!("has shape {center_dims:?}, expected [N]"),
        ));
    }
    let (tau, _) = read::<f64>(&tensors, "tau", Some(&[1]), &fail)?;
    let (loss, _) = read::<f64>(&tensors, "loss", Some(&[1]), &fail)?;
    let (grad_feat_q, _) = read::<f64>(&tensors, "grad_feat_q", Some(&dims), &fail)?;
    let (grad_feat_k, _) = read::<f64>(&tensors, "grad_feat_k", Some(&dims), &fail)?;
    for (name, values) in [
        ("loss", &loss),
        ("grad_feat_q", &grad_feat_q),
        ("grad_feat_k", &grad_feat_k),
    ] {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(fail(
                name,
                &"holds a value that is not finite: the golden is broken",
            ));
        }
    }
    Ok(GoldenCase {
        path: path.to_path_buf(),
        batch,
        channels,
        height,
        width,
        feat_q,
        feat_k,
        centers,
        tau: Tau::new(tau[0]).map_err(|e| fail("tau", &e))?,
        loss: loss[0],
        grad_feat_q,
        grad_feat_k,
    })
}

/// A tensor element type the golden files use, read little-endian.
trait Stored: Sized {
    const DTYPE: Dtype;
    fn from_le(bytes: &[u8]) -> Self;
}

macro_rules! stored {
    ($($ty:ty => $dtype:ident),*) => {$(
        impl Stored for $ty {
            const DTYPE: Dtype = Dtype::$dtype;
            fn from_le(bytes: &[u8]) -> Self {
                <$ty>::from_le_bytes(bytes.try_into().expect("chunks_exact gives the type's size"))
            }
        }
    )*};
}
stored!(f32 => F32, f64 => F64, i64 => I64);

/// Tensor `name` as `T`, checking its dtype and, when `shape` is given, its shape.
fn read<T: Stored>(
    tensors: &SafeTensors,
    name: &str,
    shape: Option<&[usize]>,
    fail: &dyn Fn(&str, &dyn Display) -> String,
) -> Result<(Vec<T>, Vec<usize>), String> {
    let view = tensors
        .tensor(name)
        .map_err(|_| fail(name, &"is missing"))?;
    if view.dtype() != T::DTYPE {
        return Err(fail(
            name,
            &format_args!("has dtype {:?}, expected {:?}", view.dtype(), T::DTYPE),
        ));
    }
    let dims = view.shape().to_vec();
    if let Some(expected) = shape
        && dims != expected
    {
        return Err(fail(
            name,
            &format_args!("has shape {dims:?}, expected {expected:?}"),
        ));
    }
    let size = std::mem::size_of::<T>();
    let count: usize = dims.iter().product();
    if view.data().len() != count * size {
        return Err(fail(
            name,
            &format_args!(
                "holds {} bytes, its shape {dims:?} needs {}",
                view.data().len(),
                count * size
            ),
        ));
    }
    Ok((
        view.data().chunks_exact(size).map(T::from_le).collect(),
        dims,
    ))
}
