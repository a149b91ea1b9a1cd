//! `--plot FILE.png`: the latency-by-percentile curve, x axis in "nines"
//! (90%, 99%, 99.9% equally spaced) as HdrHistogram plots do. Text is drawn
//! with ab_glyph from a TrueType file found on the host, so no fontconfig or
//! freetype library is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use thiserror::Error;

/// Where Debian (fonts-dejavu-core, fonts-liberation, fonts-freefont-ttf) and
/// other distributions install a sans-serif TrueType font.
pub const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];
const FONT_FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 720;
/// Beyond 6 nines no run here has enough samples to mean anything.
const MAX_NINES: f64 = 6.0;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("no TrueType font found (tried {}); install Debian's fonts-dejavu-core or pass --plot-font", FONT_CANDIDATES.join(", "))]
    NoFont,
    #[error("cannot read font {path}: {source}")]
    ReadFont {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a usable TrueType font")]
    BadFont(PathBuf),
    #[error("a font was already registered from {0}; one font per process")]
    FontAlreadySet(PathBuf),
    #[error("no successful responses to plot")]
    Empty,
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// One curve.
pub struct Series<'a> {
    pub label: &'a str,
    pub histogram: &'a Histogram<u64>,
}

static REGISTERED_FONT: OnceLock<PathBuf> = OnceLock::new();

/// Loads `explicit` or the first font candidate that exists and registers it
/// for plotters (once per process).
pub fn load_font(explicit: Option<&Path>) -> Result<PathBuf, PlotError> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => FONT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or(PlotError::NoFont)?,
    };
    if let Some(registered) = REGISTERED_FONT.get() {
        return if *registered == path {
            Ok(path)
        } else {
            Err(PlotError::FontAlreadySet(registered.clone()))
        };
    }
    let bytes = std::fs::read(&path).map_err(|source| PlotError::ReadFont {
        path: path.clone(),
        source,
    })?;
    // plotters keeps fonts for the process lifetime; leaking once is the intent.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| PlotError::BadFont(path.clone()))?;
    let _ = REGISTERED_FONT.set(path.clone());
    Ok(path)
}

/// Converts a percentile position in nines back to a label ("99.9%").
fn nines_label(nines: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    let decimals = (nines.round() as i32 - 2).clamp(0, 6) as usize;
    format!("{percent:.decimals$}%")
}

/// (nines, latency ms) points of one histogram.
pub fn curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let top = (histogram.len() as f64).log10().clamp(1.0, MAX_NINES);
    let steps = (top * 100.0).ceil() as usize;
    let mut points: Vec<(f64, f64)> = (0..=steps)
        .map(|step| {
            let nines = top * step as f64 / steps as f64;
            let quantile = 1.0 - 10f64.powf(-nines);
            (nines, histogram.value_at_quantile(quantile) as f64 / 1000.0)
        })
        .collect();
    points.push((top, histogram.max() as f64 / 1000.0));
    points
}

/// Draws the percentile curves of `series` into a PNG at `path`.
pub fn render(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    font: Option<&Path>,
) -> Result<(), PlotError> {
    load_font(font)?;
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.label, curve(s.histogram)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if curves.is_empty() {
        return Err(PlotError::Empty);
    }
    let draw_error = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let x_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        .ceil();
    let y_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.08;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, 24))
        .margin(20)
        .margin_right(40)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|nines| nines_label(*nines))
        .y_label_formatter(&|ms| format!("{ms:.2}"))
        .label_style((FONT_FAMILY, 16))
        .axis_desc_style((FONT_FAMILY, 18))
        .draw()
        .map_err(|e| draw_error(&e))?;
    let colors = [
        RGBColor(200, 40, 40),
        RGBColor(40, 80, 200),
        RGBColor(30, 150, 60),
        RGBColor(150, 90, 20),
    ];
    for (i, (label, points)) in curves.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| draw_error(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 16))
        .draw()
        .map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
    }

    #[test]
    fn curve_is_monotonic_and_ends_at_max() {
        let mut histogram = crate::stats::new_histogram();
        for us in 1..=10_000u64 {
            histogram.record(us).unwrap();
        }
        let points = curve(&histogram);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = points.last().unwrap();
        assert!((last.0 - 4.0).abs() < 1e-9);
        assert!((last.1 - 10.0).abs() < 0.01, "{last:?}");
        // p90 sits at x = 1.
        let p90 = points.iter().find(|p| (p.0 - 1.0).abs() < 1e-9).unwrap();
        assert!((p90.1 - 9.0).abs() < 0.01, "{p90:?}");
    }
}
