//! Shapes of feature maps and row matrices, validated once.

use crate::error::{Error, Result};
use crate::ffi;

/// Memory layout of a `(B, C, H, W)` feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `(B, C, H, W)`, row-major: PyTorch's default.
    #[default]
    Nchw,
    /// `(B, H, W, C)`, row-major: channels last.
    Nhwc,
}

impl Layout {
    /// The `CCPL_LAYOUT_*` code of the shared header.
    pub fn code(self) -> i32 {
        match self {
            Layout::Nchw => ffi::CCPL_LAYOUT_NCHW as i32,
            Layout::Nhwc => ffi::CCPL_LAYOUT_NHWC as i32,
        }
    }
}

/// Shape of one layer's feature map: batch, channels, height, width and layout.
///
/// ```
/// use ccpl::{FeatureShape, Layout};
/// let shape = FeatureShape::new(8, 128, 128, 128, Layout::Nchw).unwrap();
/// assert_eq!(shape.len(), 8 * 128 * 128 * 128);
/// assert!(FeatureShape::new(8, 128, 2, 128, Layout::Nchw).is_err()); // no interior
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureShape {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    layout: Layout,
}

impl FeatureShape {
    /// Validates a shape: `B >= 1`, `C >= 1`, `H >= 3`, `W >= 3`, every dimension and `H*W`
    /// within `i32` (the kernels' index type for positions).
    pub fn new(
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        layout: Layout,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(Error::EmptyBatch);
        }
        if channels == 0 {
            return Err(Error::Shape("C must be at least 1".into()));
        }
        if height < 3 || width < 3 {
            return Err(Error::NoInterior { height, width });
        }
        let max = i32::MAX as usize;
        if batch > max || channels > max || height.checked_mul(width).is_none_or(|hw| hw > max) {
            return Err(Error::Shape(format!(
                "({batch}, {channels}, {height}, {width}) exceeds the i32 range of the kernels"
            )));
        }
        batch
            .checked_mul(channels)
            .and_then(|n| n.checked_mul(height * width))
            .ok_or_else(|| Error::Shape("feature map size overflows usize".into()))?;
        Ok(Self {
            batch,
            channels,
            height,
            width,
            layout,
        })
    }

    /// Batch size `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Channels `C`.
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Height `H`.
    pub fn height(&self) -> usize {
        self.height
    }
    /// Width `W`.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Number of elements, `B*C*H*W`.
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.height * self.width
    }
    /// Never true: a valid shape has at least `1*1*3*3` elements.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Number of interior positions, `(H-2)(W-2)`: the most centres a layer can have.
    pub fn interior(&self) -> usize {
        (self.height - 2) * (self.width - 2)
    }
    /// Index of element `(b, c, h, w)` in a buffer of this layout, or `None` when a
    /// coordinate is out of range.
    ///
    /// ```
    /// use ccpl::{FeatureShape, Layout};
    /// let shape = FeatureShape::new(2, 3, 4, 5, Layout::Nhwc).unwrap();
    /// assert_eq!(shape.index(1, 2, 3, 4), Some(shape.len() - 1));
    /// assert_eq!(shape.index(2, 0, 0, 0), None);
    /// ```
    pub fn index(&self, b: usize, c: usize, h: usize, w: usize) -> Option<usize> {
        let inside = b < self.batch && c < self.channels && h < self.height && w < self.width;
        inside.then(|| self.offset(b, c, h, w))
    }
    /// [`index`](Self::index) of coordinates known to be in range (below `len()`, so the
    /// arithmetic cannot overflow).
    pub(crate) fn offset(&self, b: usize, c: usize, h: usize, w: usize) -> usize {
        match self.layout {
            Layout::Nchw => ((b * self.channels + c) * self.height + h) * self.width + w,
            Layout::Nhwc => ((b * self.height + h) * self.width + w) * self.channels + c,
        }
    }
    /// The same shape in another layout.
    pub fn with_layout(&self, layout: Layout) -> Self {
        Self { layout, ..*self }
    }
}

/// Shape of a batch of row matrices `(B, S, C)`: difference rows, normalised rows.
///
/// Made only by [`RowShape::new`], which validates it, so every size it reports fits the
/// kernels; its fields are private:
///
/// ```compile_fail,E0451
/// let unchecked = ccpl::RowShape { batch: usize::MAX, rows: 8, width: 4 };
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowShape {
    batch: usize,
    rows: usize,
    width: usize,
}

impl RowShape {
    /// Validates `B >= 1`, `S >= 1`, `C >= 1`, each within `i32`, and the sizes of the row
    /// matrices and the logits (`B*S*max(S, C)`) within `usize`.
    pub fn new(batch: usize, rows: usize, width: usize) -> Result<Self> {
        if batch == 0 {
            return Err(Error::EmptyBatch);
        }
        if rows == 0 || width == 0 {
            return Err(Error::Shape(format!(
                "rows ({rows}) and width ({width}) must be at least 1"
            )));
        }
        let max = i32::MAX as usize;
        if batch > max || rows > max || width > max {
            return Err(Error::Shape(format!(
                "({batch}, {rows}, {width}) exceeds the i32 range of the kernels"
            )));
        }
        batch
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(rows.max(width)))
            .ok_or_else(|| Error::Shape("row matrix size overflows usize".into()))?;
        Ok(Self { batch, rows, width })
    }
    /// Batch size `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Rows per image `S`.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row width `C`.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Rows of the whole batch, `B*S` (within `usize`: validated by [`new`](Self::new)).
    pub fn count(&self) -> usize {
        self.batch * self.rows
    }
    /// Elements of the row matrices, `B*S*C` (within `usize`: validated).
    pub fn len(&self) -> usize {
        self.batch * self.rows * self.width
    }
    /// Never true for a valid shape.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Elements of the logits, `B*S*S` (within `usize`: validated).
    pub fn logits_len(&self) -> usize {
        self.batch * self.rows * self.rows
    }
}
