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
    /// Index of element `(b, c, h, w)` in a buffer of this layout.
    pub fn index(&self, b: usize, c: usize, h: usize, w: usize) -> usize {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowShape {
    /// Batch size `B`.
    pub batch: usize,
    /// Rows per image `S`.
    pub rows: usize,
    /// Row width `C`.
    pub width: usize,
}

impl RowShape {
    /// Validates `B >= 1`, `S >= 1`, `C >= 1`, each within `i32`.
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
    /// Elements of the row matrices, `B*S*C`.
    pub fn len(&self) -> usize {
        self.batch * self.rows * self.width
    }
    /// Never true for a valid shape.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Elements of the logits, `B*S*S`.
    pub fn logits_len(&self) -> usize {
        self.batch * self.rows * self.rows
    }
}
