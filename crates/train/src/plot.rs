//! Line plots as PNG (loss curves, quality against steps), with a bundled font so they render
//! the same on a bare machine.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans-LICENSE.txt).
        let _ =
            plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../assets/DejaVuSans.ttf"));
    });
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw the points alone, unjoined (a scatter).
    pub markers_only: bool,
}

impl Series {
    /// Points joined by a line, in the order given.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, markers_only: false }
    }

    pub fn scatter(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, markers_only: true }
    }
}

pub struct PlotSpec<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Data { path: path.to_path_buf(), message: format!("plotting failed: {e}") }
}

/// Draw `series` as lines with markers into a 900x600 PNG.
pub fn line_plot(path: &Path, spec: &PlotSpec, series: &[Series]) -> Result<()> {
    register_font();
    let finite = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&(x, y)| finite(x, spec.log_x) && finite(y, spec.log_y))
        .collect();
    if points.is_empty() {
        return Err(plot_err(path, "no finite points"));
    }
    let tf = |v: f64, log: bool| if log { v.log10() } else { v };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in &points {
        let (x, y) = (tf(x, spec.log_x), tf(y, spec.log_y));
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = |lo: f64, hi: f64| {
        let d = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - d, hi + d)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(spec.title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_err(path, e))?;
    let fmt = |log: bool| {
        move |v: &f64| {
            let v = if log { 10f64.powf(*v) } else { *v };
            match v.abs() {
                0.0 => "0".to_string(),
                a if a >= 100.0 => format!("{v:.0}"),
                a if a >= 0.01 => format!("{v:.3}"),
                _ => format!("{v:.1e}"),
            }
        }
    };
    chart
        .configure_mesh()
        .x_desc(spec.x_label)
        .y_desc(spec.y_label)
        .x_label_formatter(&fmt(spec.log_x))
        .y_label_formatter(&fmt(spec.log_y))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|&&(x, y)| finite(x, spec.log_x) && finite(y, spec.log_y))
            .map(|&(x, y)| (tf(x, spec.log_x), tf(y, spec.log_y)))
            .collect();
        if s.markers_only {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| plot_err(path, e))?
                .label(s.name.clone())
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if pts.len() <= 40 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| plot_err(path, e))?;
        }
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))?;
    Ok(())
}

/// loss.csv -> loss.png (every column but step and lr, log scale).
pub fn plot_loss_csv(csv: &Path, png: &Path, title: &str) -> Result<()> {
    let (header, rows) = crate::log::read_csv(csv)?;
    let series: Vec<Series> = header
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, name)| name.contains("loss") || name.as_str() == "mse")
        .map(|(col, name)| {
            Series::line(name.clone(), rows.iter().filter(|r| r.len() > col).map(|r| (r[0], r[col])).collect())
        })
        .collect();
    line_plot(png, &PlotSpec { title, x_label: "step", y_label: "loss", log_x: false, log_y: true }, &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("loss.csv");
        std::fs::write(&csv, "step,loss,grad_norm,lr\n1,1.0,0.5,0.1\n2,0.5,0.4,0.1\n3,0.25,0.3,0.1\n").unwrap();
        let png = dir.path().join("loss.png");
        plot_loss_csv(&csv, &png, "test").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        let (image, _) = flowgen_engine::image::Image::from_png(&bytes).unwrap();
        assert_eq!((image.width, image.height), (900, 600));
        // Not a blank canvas: some pixels are drawn.
        assert!(image.pixels.iter().any(|&p| p < 128));
    }
}
