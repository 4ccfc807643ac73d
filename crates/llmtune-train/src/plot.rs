//! Loss/reward curves as PNG, as the reference's `plot_loss`.
//!
//! For each key, the values logged under that key in `trainer_state.json`'s
//! `log_history` are drawn against `step`: the raw curve faint (alpha 0.4,
//! label `original`) and its EMA (weight 0.9, seeded by the first value,
//! label `smoothed`), titled `training {key} of {output_dir}`, into
//! `training_{key}.png` (`/` in a key written `_`; 640x480, matplotlib's default size at 100 dpi).
//!
//! Text is rendered with the bundled DejaVu Sans (assets/, Bitstream Vera
//! license) through `ab_glyph`, so no system fonts or fontconfig are needed.
//! DejaVu Sans has no CJK glyphs: CJK characters in a path show as boxes.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::{Error, Result};
use crate::io::tmp_sibling;
use crate::state::{TrainerState, TRAINER_STATE_NAME};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER_FONT: Once = Once::new();

/// Image size of a plot, in pixels.
pub const PLOT_SIZE: (u32, u32) = (640, 480);

/// The EMA smoothing weight of the reference's `smooth()`.
pub const SMOOTH_WEIGHT: f64 = 0.9;

/// The reference's `smooth()`: TensorBoard-style EMA seeded by the first
/// value: `s_0 = x_0`, `s_i = 0.9 s_{i-1} + 0.1 x_i`.
pub fn smooth(scalars: &[f64]) -> Vec<f64> {
    let Some(&first) = scalars.first() else {
        return Vec::new();
    };
    let mut last = first;
    scalars
        .iter()
        .map(|&x| {
            last = last * SMOOTH_WEIGHT + (1.0 - SMOOTH_WEIGHT) * x;
            last
        })
        .collect()
}

/// Draw `training_{key}.png` in `output_dir` for each key from its
/// `trainer_state.json`. A key without values is skipped with a warning.
/// Returns the files written.
pub fn plot_loss(output_dir: &Path, keys: &[&str]) -> Result<Vec<PathBuf>> {
    let state = TrainerState::load(&output_dir.join(TRAINER_STATE_NAME))?;
    let mut written = Vec::new();
    for key in keys {
        let points = state.history(key);
        if points.is_empty() {
            tracing::warn!("No metric {key} to plot.");
            continue;
        }
        // `eval_rewards/accuracies` -> `training_eval_rewards_accuracies.png` (LLaMA-Factory's
        // name for such keys).
        let path = output_dir.join(format!("training_{}.png", key.replace('/', "_")));
        let title = format!("training {key} of {}", output_dir.display());
        plot_curve(&path, &title, key, &points)?;
        tracing::info!("Figure saved: {}", path.display());
        written.push(path);
    }
    Ok(written)
}

/// Draw one curve (`(step, value)` points, at least one) with its EMA into
/// the PNG `path`, atomically (drawn to a temporary, then renamed).
pub fn plot_curve(path: &Path, title: &str, y_label: &str, points: &[(u64, f64)]) -> Result<()> {
    REGISTER_FONT.call_once(|| {
        if register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the bundled plot font could not be loaded");
        }
    });
    let plot_err = |message: String| Error::Plot {
        path: path.to_path_buf(),
        message,
    };
    if points.is_empty() {
        return Err(plot_err("no points to draw".into()));
    }
    // The image encoder picks the format from the extension: keep `.png` last.
    let tmp = {
        let t = tmp_sibling(path);
        let name = t
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        t.with_file_name(format!("{name}.png"))
    };
    let result = draw(&tmp, title, y_label, points)
        .map_err(plot_err)
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("fsync", &tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn draw(file: &Path, title: &str, y_label: &str, points: &[(u64, f64)]) -> Result<(), String> {
    let xs: Vec<f64> = points.iter().map(|p| p.0 as f64).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    let smoothed = smooth(&ys);
    let (x0, x1) = padded_range(&xs);
    let (y0, y1) = padded_range(
        ys.iter()
            .chain(&smoothed)
            .copied()
            .collect::<Vec<_>>()
            .as_slice(),
    );

    let original_color = RGBColor(0x1f, 0x77, 0xb4); // matplotlib C0
    let smoothed_color = RGBColor(0xff, 0x7f, 0x0e); // matplotlib C1

    let root = BitMapBackend::new(file, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x}"))
        .y_desc(y_label)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;

    let raw: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
    let ema: Vec<(f64, f64)> = xs.iter().copied().zip(smoothed.iter().copied()).collect();
    let faint = original_color.mix(0.4).stroke_width(2);
    chart
        .draw_series(LineSeries::new(raw.clone(), faint))
        .map_err(|e| e.to_string())?
        .label("original")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], faint));
    let solid = smoothed_color.stroke_width(2);
    chart
        .draw_series(LineSeries::new(ema.clone(), solid))
        .map_err(|e| e.to_string())?
        .label("smoothed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], solid));
    if raw.len() == 1 {
        // A single point draws no line: mark it.
        chart
            .draw_series(
                raw.iter()
                    .map(|&p| Circle::new(p, 3, original_color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// `[min, max]` widened by 5% on each side (matplotlib's default margins),
/// or by 1 around a single value.
fn padded_range(values: &[f64]) -> (f64, f64) {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= 0.0 {
        let pad = if lo.abs() > 0.0 { lo.abs() * 0.05 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_is_the_reference_ema() {
        // smooth([1, 2, 3]) with weight 0.9:
        // s0 = 0.9*1 + 0.1*1 = 1; s1 = 0.9*1 + 0.1*2 = 1.1; s2 = 0.9*1.1 + 0.1*3 = 1.29
        let s = smooth(&[1.0, 2.0, 3.0]);
        assert_eq!(s.len(), 3);
        assert!((s[0] - 1.0).abs() < 1e-15);
        assert!((s[1] - 1.1).abs() < 1e-15);
        assert!((s[2] - 1.29).abs() < 1e-15);
        assert!(smooth(&[]).is_empty());
    }

    #[test]
    fn ranges_are_padded() {
        assert_eq!(padded_range(&[0.0, 10.0]), (-0.5, 10.5));
        assert_eq!(padded_range(&[2.0]), (1.9, 2.1));
        assert_eq!(padded_range(&[0.0]), (-1.0, 1.0));
    }
}
