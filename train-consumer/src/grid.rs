//! Sample grids: one row per prompt, the prompt (its image, or its caption drawn as
//! text) on the left, its variations to the right, thin borders between cells; PNG.

use crate::draw::{CELL, Canvas, wrap};

/// An RGB8 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB8.
    pub pixels: Vec<u8>,
}

impl Image {
    /// Resized to `w` x `h` (bilinear; unchanged when already that size).
    #[must_use]
    pub fn resized(&self, w: u32, h: u32) -> Self {
        if (self.width, self.height) == (w, h) {
            return self.clone();
        }
        let src = image::RgbImage::from_raw(self.width, self.height, self.pixels.clone())
            .unwrap_or_else(|| image::RgbImage::new(self.width, self.height));
        let out = image::imageops::resize(&src, w, h, image::imageops::FilterType::Triangle);
        Self {
            width: w,
            height: h,
            pixels: out.into_raw(),
        }
    }
}

/// What a row shows on its left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The prompt image.
    Image(Image),
    /// The caption, drawn as text.
    Caption(String),
}

/// Border and background colors of a grid.
const BORDER: [u8; 3] = [40, 40, 40];
const PAPER: [u8; 3] = [245, 245, 240];

/// Lays out `rows` (prompt, variations) in cells of `cell` x `cell` pixels with a
/// `border`-pixel frame; the prompt column is set off by a double border.
#[must_use]
pub fn grid(rows: &[(Prompt, Vec<Image>)], cell: u32, border: u32) -> Canvas {
    let cols = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0) as u32 + 1;
    let n_rows = rows.len().max(1) as u32;
    let gap = border;
    let width = cols * cell + (cols + 2) * gap;
    let height = n_rows * cell + (n_rows + 1) * gap;
    let mut c = Canvas::new(width, height, BORDER);
    for (r, (prompt, images)) in rows.iter().enumerate() {
        let y = i64::from(gap + r as u32 * (cell + gap));
        let x0 = i64::from(gap);
        match prompt {
            Prompt::Image(img) => {
                let im = img.resized(cell, cell);
                c.blit(x0, y, cell, cell, &im.pixels);
            }
            Prompt::Caption(text) => {
                c.fill(x0, y, cell, cell, PAPER);
                let scale = if cell >= 256 { 2 } else { 1 };
                let pad = 4;
                let max_chars = ((cell - 2 * pad) / (CELL.0 * scale)).max(1) as usize;
                let max_lines = ((cell - 2 * pad) / (CELL.1 * scale)).max(1) as usize;
                for (k, line) in wrap(text, max_chars).iter().take(max_lines).enumerate() {
                    c.text(
                        x0 + i64::from(pad),
                        y + i64::from(pad + k as u32 * CELL.1 * scale),
                        line,
                        scale,
                        [20, 20, 20],
                    );
                }
            }
        }
        for (k, img) in images.iter().enumerate() {
            let x = i64::from(2 * gap + (k as u32 + 1) * (cell + gap));
            let im = img.resized(cell, cell);
            c.blit(x, y, cell, cell, &im.pixels);
        }
    }
    c
}

/// A decoded image tensor `[3, H, W]` in [-1, 1] as RGB8, as diffusers' image
/// processor does (`(x / 2 + 0.5).clamp(0, 1) * 255`, rounded).
///
/// # Errors
/// A tensor of another shape.
pub fn to_image(t: &candle_core::Tensor) -> candle_core::Result<Image> {
    let t = t
        .to_dtype(candle_core::DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    let (ch, h, w) = t.dims3()?;
    if ch != 3 {
        candle_core::bail!("to_image: {ch} channels, expected 3");
    }
    let v: Vec<f32> = t.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let pixels = v
        .iter()
        .map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(Image {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, c: [u8; 3]) -> Image {
        Image {
            width: w,
            height: h,
            pixels: (0..w * h).flat_map(|_| c).collect(),
        }
    }

    #[test]
    fn rows_and_columns_land_in_their_cells() {
        let rows = vec![
            (
                Prompt::Image(solid(10, 10, [255, 0, 0])),
                vec![solid(16, 16, [0, 255, 0]); 3],
            ),
            (
                Prompt::Caption("a red bicycle".into()),
                vec![solid(16, 16, [0, 0, 255]); 2],
            ),
        ];
        let g = grid(&rows, 32, 2);
        // 4 columns (prompt + 3), 2 rows
        assert_eq!((g.width, g.height), (4 * 32 + 6 * 2, 2 * 32 + 3 * 2));
        assert_eq!(g.get(2 + 16, 2 + 16), [255, 0, 0]); // prompt image, resized
        assert_eq!(g.get(4 + 34 + 16, 2 + 16), [0, 255, 0]); // first variation
        assert_eq!(g.get(4 + 2 * 34 + 16, 36 + 16), [0, 0, 255]); // row 2, second
        assert_eq!(g.get(4 + 3 * 34 + 16, 36 + 16), BORDER); // row 2 has only two
        assert_eq!(g.get(0, 0), BORDER);
        // the caption cell has paper and ink
        let mut ink = 0;
        for y in 36..68 {
            for x in 2..34 {
                if g.get(x, y) == [20, 20, 20] {
                    ink += 1;
                }
            }
        }
        assert!(ink > 20, "{ink}");
    }

    #[test]
    fn decoded_tensors_map_like_diffusers() -> candle_core::Result<()> {
        let t = candle_core::Tensor::new(
            &[[[-1.0f32, 0.0]], [[1.0, 2.0]], [[-3.0, 0.5]]],
            &candle_core::Device::Cpu,
        )?;
        let im = to_image(&t)?;
        assert_eq!((im.width, im.height), (2, 1));
        assert_eq!(im.pixels, [0, 255, 0, 128, 255, 191]);
        Ok(())
    }
}
