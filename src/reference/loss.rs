//! The end-to-end CCP loss: of two row matrices (a learned head's outputs), of one layer
//! (identity head), and the sum over layers.

use crate::dtype::Element;
use crate::error::{Error, Result, check_len};
use crate::reference::{
    info_nce_backward, info_nce_forward, neighbor_diff, neighbor_diff_backward, normalize_rows,
    normalize_rows_backward, similarity,
};
use crate::sampling::Centers;
use crate::shape::{FeatureShape, RowShape};
use crate::tau::Tau;

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

/// The loss of two row matrices `(B, S, C)` and its gradients with respect to them (spec steps
/// 5 to 8): what a framework with a learned projection head computes on the head's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct RowsLoss {
    /// The loss.
    pub loss: f64,
    /// Gradient of the loss with respect to `rows_q`, `(B, S, C)`.
    pub grad_rows_q: Vec<f64>,
    /// Gradient with respect to `rows_k` as if it were not detached, when asked for.
    pub grad_rows_k: Option<Vec<f64>>,
}

/// Loss and gradients of two row matrices of `shape`: normalisation, logits, InfoNCE, and back.
pub fn rows_loss<T: Element>(
    rows_q: &[T],
    rows_k: &[T],
    shape: &RowShape,
    tau: Tau,
    want_grad_k: bool,
) -> Result<RowsLoss> {
    check_len("rows_q", shape.len(), rows_q.len())?;
    check_len("rows_k", shape.len(), rows_k.len())?;
    let rows_q: Vec<f64> = rows_q.iter().map(|x| x.to_f64()).collect();
    let rows_k: Vec<f64> = rows_k.iter().map(|x| x.to_f64()).collect();

    // Forward: normalised rows, logits, InfoNCE.
    let q = normalize_rows(&rows_q, shape.width())?;
    let k = normalize_rows(&rows_k, shape.width())?;
    let logits = similarity(&q.rows, &k.rows, shape, tau)?;
    let forward = info_nce_forward(&logits, shape.batch(), shape.rows())?;

    // Backward, from d(loss)/d(loss) = 1, through the InfoNCE and the normalisation.
    let grads = info_nce_backward(
        &logits,
        &forward.row_lse,
        &q.rows,
        &k.rows,
        shape,
        tau,
        1.0,
        want_grad_k,
    )?;
    let grad_rows_k = grads
        .dk
        .as_ref()
        .map(|dk| normalize_rows_backward(&rows_k, dk, shape.width()))
        .transpose()?;
    Ok(RowsLoss {
        loss: forward.loss,
        grad_rows_q: normalize_rows_backward(&rows_q, &grads.dq, shape.width())?,
        grad_rows_k,
    })
}

/// Loss and gradients of one layer: the difference rows of both feature maps, the rows loss
/// of them (identity head), and the scatter of its gradients back to the feature maps.
pub fn ccp_layer_loss<T: Element>(
    feat_q: &[T],
    feat_k: &[T],
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
    want_grad_k: bool,
) -> Result<LayerLoss> {
    check_len("feat_q", shape.len(), feat_q.len())?;
    check_len("feat_k", shape.len(), feat_k.len())?;
    centers.check_shape(shape)?;
    let rows = RowShape::new(shape.batch(), centers.rows(), shape.channels())?;

    let diff_q = neighbor_diff(feat_q, shape, centers)?;
    let diff_k = neighbor_diff(feat_k, shape, centers)?;
    let loss = rows_loss(&diff_q, &diff_k, &rows, tau, want_grad_k)?;
    let grad_feat_k = loss
        .grad_rows_k
        .as_ref()
        .map(|grad_rows| scatter(grad_rows, shape, centers))
        .transpose()?;
    Ok(LayerLoss {
        loss: loss.loss,
        grad_feat_q: scatter(&loss.grad_rows_q, shape, centers)?,
        grad_feat_k,
    })
}

/// The gradient with respect to a feature map, from the gradient of its difference rows.
fn scatter(grad_rows: &[f64], shape: &FeatureShape, centers: &Centers) -> Result<Vec<f64>> {
    let mut grad_feat = vec![0.0; shape.len()];
    neighbor_diff_backward(grad_rows, shape, centers, &mut grad_feat)?;
    Ok(grad_feat)
}

/// The full loss: the unweighted sum of the layers' losses, with each layer's gradients.
///
/// At least one layer is needed: an empty list is a caller's mistake, not a loss of 0.
pub fn ccp_loss<T: Element>(
    layers: &[LayerInput<'_, T>],
    tau: Tau,
    want_grad_k: bool,
) -> Result<(f64, Vec<LayerLoss>)> {
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
