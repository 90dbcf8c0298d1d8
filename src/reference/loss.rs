//! The end-to-end CCP loss of one layer (identity head) and the sum over layers.

use crate::dtype::Element;
use crate::error::{Error, Result, check_len, check_tau};
use crate::reference::{
    info_nce_backward, info_nce_forward, neighbor_diff, neighbor_diff_backward, normalize_rows,
    normalize_rows_backward, similarity,
};
use crate::sampling::Centers;
use crate::shape::{FeatureShape, RowShape};

/// Loss of one layer and its gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLoss {
    /// The layer's loss.
    pub loss: f64,
    /// Gradient of the loss with respect to `feat_q`, in `feat_q`'s layout.
    pub grad_feat_q: Vec<f64>,
    /// Gradient with respect to `feat_k` as if it were not detached, when asked for.
    pub grad_feat_k: Option<Vec<f64>>,
}

/// One layer's inputs.
#[derive(Debug, Clone)]
pub struct LayerInput<'a, T> {
    /// Features of the generated image (receive the gradient).
    pub feat_q: &'a [T],
    /// Features of the content image.
    pub feat_k: &'a [T],
    /// Their shape (both the same).
    pub shape: FeatureShape,
    /// This layer's centres.
    pub centers: Centers,
}

/// Loss and gradients of one layer: difference rows, normalisation, logits, InfoNCE, and back.
pub fn ccp_layer_loss<T: Element>(
    feat_q: &[T],
    feat_k: &[T],
    shape: &FeatureShape,
    centers: &Centers,
    tau: f64,
    want_grad_k: bool,
) -> Result<LayerLoss> {
    check_tau(tau)?;
    check_len("feat_q", shape.len(), feat_q.len())?;
    check_len("feat_k", shape.len(), feat_k.len())?;
    centers.check_shape(shape)?;
    let rows = RowShape::new(shape.batch(), centers.rows(), shape.channels())?;

    // Forward: difference rows, normalised rows, logits, InfoNCE.
    let diff_q = neighbor_diff(feat_q, shape, centers)?;
    let diff_k = neighbor_diff(feat_k, shape, centers)?;
    let q = normalize_rows(&diff_q, rows.width())?;
    let k = normalize_rows(&diff_k, rows.width())?;
    let logits = similarity(&q.rows, &k.rows, &rows, tau)?;
    let forward = info_nce_forward(&logits, rows.batch(), rows.rows())?;

    // Backward, from d(loss)/d(loss) = 1.
    let grads = info_nce_backward(
        &logits,
        &forward.row_lse,
        &q.rows,
        &k.rows,
        &rows,
        tau,
        1.0,
        want_grad_k,
    )?;
    let grad_feat_q = feature_grad(&diff_q, &grads.dq, shape, centers)?;
    let grad_feat_k = match &grads.dk {
        Some(dk) => Some(feature_grad(&diff_k, dk, shape, centers)?),
        None => None,
    };
    Ok(LayerLoss {
        loss: forward.loss,
        grad_feat_q,
        grad_feat_k,
    })
}

/// The gradient with respect to a feature map, from the gradient of its normalised rows:
/// back through the normalisation, then the difference rows.
fn feature_grad(
    diff: &[f64],
    grad_normalized: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
) -> Result<Vec<f64>> {
    let grad_diff = normalize_rows_backward(diff, grad_normalized, shape.channels())?;
    let mut grad_feat = vec![0.0; shape.len()];
    neighbor_diff_backward(&grad_diff, shape, centers, &mut grad_feat)?;
    Ok(grad_feat)
}

/// The full loss: the unweighted sum of the layers' losses, with each layer's gradients.
///
/// At least one layer is needed: an empty list is a caller's mistake, not a loss of 0.
pub fn ccp_loss<T: Element>(
    layers: &[LayerInput<'_, T>],
    tau: f64,
    want_grad_k: bool,
) -> Result<(f64, Vec<LayerLoss>)> {
    check_tau(tau)?;
    if layers.is_empty() {
        return Err(Error::Shape("ccp_loss needs at least one layer".into()));
    }
    let per_layer = layers
        .iter()
        .map(|l| ccp_layer_loss(l.feat_q, l.feat_k, &l.shape, &l.centers, tau, want_grad_k))
        .collect::<Result<Vec<_>>>()?;
    let total = per_layer.iter().map(|l| l.loss).sum();
    Ok((total, per_layer))
}
