//! The end-to-end CCP loss of one layer (identity head) and the sum over layers.

use crate::dtype::Element;
use crate::error::Result;
use crate::sampling::Centers;
use crate::shape::FeatureShape;

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
    todo!()
}

/// The full loss: the unweighted sum of the layers' losses, with each layer's gradients.
pub fn ccp_loss<T: Element>(
    layers: &[LayerInput<'_, T>],
    tau: f64,
    want_grad_k: bool,
) -> Result<(f64, Vec<LayerLoss>)> {
    todo!()
}
