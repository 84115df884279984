//! `OUT/loss.png`: the loss curve, raw (light) and smoothed (dark, TensorBoard-style
//! debiased exponential moving average), on a log axis when the loss spans more than
//! a decade.

use std::path::Path;

use crate::draw::{CELL, Canvas};

/// Debiased exponential moving average with weight `w` on the past (0 = raw).
#[must_use]
pub fn smooth(values: &[f64], w: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut norm = 0.0;
    values
        .iter()
        .map(|&v| {
            acc = acc * w + (1.0 - w) * v;
            norm = norm * w + (1.0 - w);
            acc / norm
        })
        .collect()
}

/// A round number near `x` for axis ticks (1, 2 or 5 times a power of ten).
fn nice(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    let f = x / p;
    p * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.0e}")
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws `(step, loss)` points into a PNG at `path`; `title` above the plot.
///
/// # Errors
/// I/O errors writing the file.
pub fn loss_png(points: &[(u64, f64)], title: &str, path: &Path) -> std::io::Result<()> {
    let (w, h) = (800u32, 480u32);
    let (left, right, top, bottom) = (70.0, 20.0, 34.0, 44.0);
    let mut c = Canvas::new(w, h, [255, 255, 255]);
    c.text(left as i64, 10, title, 2, [20, 20, 20]);
    let pts: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .collect();
    let (pw, ph) = (f64::from(w) - left - right, f64::from(h) - top - bottom);
    let axis = [120, 120, 120];
    c.line((left, top), (left, top + ph), axis, 1);
    c.line((left, top + ph), (left + pw, top + ph), axis, 1);
    if pts.is_empty() {
        c.text(
            left as i64 + 10,
            (top + ph / 2.0) as i64,
            "no steps yet",
            2,
            axis,
        );
        return c.save_png(path);
    }
    let losses: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let smoothed = smooth(&losses, if pts.len() > 20 { 0.9 } else { 0.0 });
    let (lo, hi) = losses
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let log = hi / lo > 10.0;
    let tf = |v: f64| if log { v.log10() } else { v };
    let (ylo, yhi) = if log {
        (lo.log10().floor(), hi.log10().ceil())
    } else {
        let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
        ((lo - pad).max(0.0), hi + pad)
    };
    let (s0, s1) = (
        pts[0].0 as f64,
        pts[pts.len() - 1].0.max(pts[0].0 + 1) as f64,
    );
    let x_of = |s: f64| left + (s - s0) / (s1 - s0) * pw;
    let y_of = |v: f64| top + ph - (tf(v) - ylo) / (yhi - ylo).max(1e-12) * ph;
    // y ticks
    let grid = [232, 232, 232];
    let ticks: Vec<f64> = if log {
        (ylo as i32..=yhi as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let step = nice((yhi - ylo) / 5.0);
        let mut v = (ylo / step).ceil() * step;
        let mut t = Vec::new();
        while v <= yhi + 1e-12 {
            t.push(v);
            v += step;
        }
        t
    };
    for t in ticks {
        let y = y_of(t);
        c.line((left + 1.0, y), (left + pw, y), grid, 1);
        let s = label(t);
        let tw = f64::from(Canvas::text_width(&s, 1));
        c.text(
            (left - 6.0 - tw) as i64,
            (y - 3.0) as i64,
            &s,
            1,
            [60, 60, 60],
        );
    }
    // x ticks
    let step = nice((s1 - s0) / 6.0).max(1.0);
    let mut s = (s0 / step).ceil() * step;
    while s <= s1 {
        let x = x_of(s);
        c.line((x, top + ph), (x, top + ph + 4.0), axis, 1);
        let t = label(s);
        let tw = f64::from(Canvas::text_width(&t, 1));
        c.text(
            (x - tw / 2.0) as i64,
            (top + ph + 8.0) as i64,
            &t,
            1,
            [60, 60, 60],
        );
        s += step;
    }
    c.text(
        (left + pw / 2.0 - 12.0) as i64,
        i64::from(h) - i64::from(CELL.1) - 4,
        "step",
        1,
        [60, 60, 60],
    );
    let draw = |c: &mut Canvas, vals: &[f64], color, thick| {
        for k in 1..pts.len() {
            let a = (x_of(pts[k - 1].0 as f64), y_of(vals[k - 1]));
            let b = (x_of(pts[k].0 as f64), y_of(vals[k]));
            c.line(a, b, color, thick);
        }
        if pts.len() == 1 {
            c.fill(
                x_of(pts[0].0 as f64) as i64 - 2,
                y_of(vals[0]) as i64 - 2,
                5,
                5,
                color,
            );
        }
    };
    draw(&mut c, &losses, [170, 200, 235], 1);
    draw(&mut c, &smoothed, [20, 70, 160], 2);
    c.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_debiased() {
        assert_eq!(smooth(&[2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0]);
        let s = smooth(&[1.0, 0.0], 0.5);
        assert!((s[1] - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(smooth(&[1.0, 5.0], 0.0), [1.0, 5.0]);
    }

    #[test]
    fn the_plot_has_its_curve() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let pts: Vec<(u64, f64)> = (1..=200).map(|s| (s, 1.0 / s as f64)).collect();
        loss_png(&pts, "loss", &p).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 480));
        // the smoothed curve's dark blue is there, near the top-left (high loss first)
        let dark = img.pixels().filter(|px| px.0 == [20, 70, 160]).count();
        assert!(dark > 300, "{dark}");
        assert_eq!(nice(0.7), 0.5);
        assert_eq!(label(0.25), "0.25");
        loss_png(&[], "empty", &p).unwrap();
    }
}
