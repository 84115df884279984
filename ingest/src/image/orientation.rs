//! EXIF orientation: how stored pixels are turned to be displayed upright.

/// The eight EXIF orientations (tag 0x0112), named by what a viewer does to the
/// stored pixels to display them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Orientation {
    /// 1: as stored.
    #[default]
    Identity,
    /// 2: mirror left-right.
    FlipHorizontal,
    /// 3: rotate 180 degrees.
    Rotate180,
    /// 4: mirror top-bottom.
    FlipVertical,
    /// 5: mirror across the main diagonal (top-left to bottom-right).
    Transpose,
    /// 6: rotate 90 degrees clockwise.
    Rotate90,
    /// 7: mirror across the anti-diagonal (top-right to bottom-left).
    Transverse,
    /// 8: rotate 90 degrees counter-clockwise (270 clockwise).
    Rotate270,
}

impl Orientation {
    /// From the EXIF tag value; values outside 1..=8 (seen in the wild) mean
    /// "as stored", which is also what Pillow and browsers do.
    pub fn from_exif(value: u32) -> Self {
        match value {
            2 => Self::FlipHorizontal,
            3 => Self::Rotate180,
            4 => Self::FlipVertical,
            5 => Self::Transpose,
            6 => Self::Rotate90,
            7 => Self::Transverse,
            8 => Self::Rotate270,
            _ => Self::Identity,
        }
    }

    /// The EXIF tag value (1..=8).
    pub fn exif_value(self) -> u32 {
        match self {
            Self::Identity => 1,
            Self::FlipHorizontal => 2,
            Self::Rotate180 => 3,
            Self::FlipVertical => 4,
            Self::Transpose => 5,
            Self::Rotate90 => 6,
            Self::Transverse => 7,
            Self::Rotate270 => 8,
        }
    }

    /// Whether displaying swaps width and height.
    pub fn swaps_axes(self) -> bool {
        matches!(
            self,
            Self::Transpose | Self::Rotate90 | Self::Transverse | Self::Rotate270
        )
    }

    /// Displayed `(width, height)` of a stored `width x height` image.
    pub fn displayed(self, width: u32, height: u32) -> (u32, u32) {
        if self.swaps_axes() {
            (height, width)
        } else {
            (width, height)
        }
    }

    /// Stored pixel `(x, y)` shown at displayed pixel `(dx, dy)` of a stored
    /// `w x h` image.
    fn source(self, dx: usize, dy: usize, w: usize, h: usize) -> (usize, usize) {
        match self {
            Self::Identity => (dx, dy),
            Self::FlipHorizontal => (w - 1 - dx, dy),
            Self::Rotate180 => (w - 1 - dx, h - 1 - dy),
            Self::FlipVertical => (dx, h - 1 - dy),
            Self::Transpose => (dy, dx),
            Self::Rotate90 => (dy, h - 1 - dx),
            Self::Transverse => (w - 1 - dy, h - 1 - dx),
            Self::Rotate270 => (w - 1 - dy, dx),
        }
    }

    /// Applies the orientation to stored RGB pixels (`w x h x 3`), returning the
    /// displayed pixels (`displayed(w, h)`).
    pub fn apply_rgb(self, rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        assert_eq!(rgb.len(), w * h * 3, "RGB buffer is not {w}x{h}x3");
        if self == Self::Identity {
            return rgb.to_vec();
        }
        let (dw, dh) = if self.swaps_axes() { (h, w) } else { (w, h) };
        let mut out = vec![0u8; rgb.len()];
        for dy in 0..dh {
            let row = &mut out[dy * dw * 3..(dy + 1) * dw * 3];
            for dx in 0..dw {
                let (sx, sy) = self.source(dx, dy, w, h);
                let s = (sy * w + sx) * 3;
                row[dx * 3..dx * 3 + 3].copy_from_slice(&rgb[s..s + 3]);
            }
        }
        out
    }

    /// [`Self::apply_rgb`] for a square image, reusing the buffer when nothing is
    /// to be done.
    pub(crate) fn apply_square(self, rgb: Vec<u8>, side: usize) -> Vec<u8> {
        if self == Self::Identity {
            rgb
        } else {
            self.apply_rgb(&rgb, side, side)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x2 image whose pixel values are their stored index 0..6 (one channel
    /// repeated three times).
    fn stored() -> Vec<u8> {
        (0u8..6).flat_map(|v| [v, v, v]).collect()
    }

    fn first_channel(rgb: &[u8]) -> Vec<u8> {
        rgb.chunks(3).map(|p| p[0]).collect()
    }

    #[test]
    fn all_eight_match_the_exif_specification() {
        // Stored:  0 1 2
        //          3 4 5
        let cases: [(u32, (u32, u32), [u8; 6]); 8] = [
            (1, (3, 2), [0, 1, 2, 3, 4, 5]),
            (2, (3, 2), [2, 1, 0, 5, 4, 3]),
            (3, (3, 2), [5, 4, 3, 2, 1, 0]),
            (4, (3, 2), [3, 4, 5, 0, 1, 2]),
            // Transpose: columns become rows.
            (5, (2, 3), [0, 3, 1, 4, 2, 5]),
            // Rotate 90 clockwise: the left column, read bottom-up, becomes the top row.
            (6, (2, 3), [3, 0, 4, 1, 5, 2]),
            (7, (2, 3), [5, 2, 4, 1, 3, 0]),
            // Rotate 90 counter-clockwise: the right column becomes the top row.
            (8, (2, 3), [2, 5, 1, 4, 0, 3]),
        ];
        for (value, dims, expected) in cases {
            let o = Orientation::from_exif(value);
            assert_eq!(o.exif_value(), value);
            assert_eq!(o.displayed(3, 2), dims, "orientation {value}");
            let out = o.apply_rgb(&stored(), 3, 2);
            assert_eq!(first_channel(&out), expected, "orientation {value}");
        }
        assert_eq!(Orientation::from_exif(0), Orientation::Identity);
        assert_eq!(Orientation::from_exif(9), Orientation::Identity);
    }
}
