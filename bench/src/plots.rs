//! Latency-by-percentile curves of kvmfork and its peers in one chart. The
//! latencies span orders of magnitude (microsecond forks, 100 ms process
//! spawns), so the y axis is logarithmic; the x axis is in "nines" like
//! loadgen's own `--plot`, whose font loading and curve math this reuses.

use std::path::Path;

use hdrhistogram::Histogram;
use loadgen::plot::{curve, load_font};
use plotters::prelude::*;

use crate::BenchError;

const FONT_FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 720);
const COLORS: [RGBColor; 6] = [
    RGBColor(200, 40, 40),
    RGBColor(40, 80, 200),
    RGBColor(30, 150, 60),
    RGBColor(150, 90, 20),
    RGBColor(130, 40, 160),
    RGBColor(20, 140, 150),
];

pub struct Curve<'a> {
    pub label: String,
    pub histogram: &'a Histogram<u64>,
}

/// "99.9%" for 3 nines.
fn nines_label(nines: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    let decimals = (nines.round() as i32 - 2).clamp(0, 6) as usize;
    format!("{percent:.decimals$}%")
}

/// "250µs", "1.5ms", "120ms", "2.0s".
fn latency_label(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

pub fn render(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<(), BenchError> {
    let plot_error = |message: String| BenchError::Plot {
        path: path.to_path_buf(),
        message,
    };
    load_font(None).map_err(|e| plot_error(e.to_string()))?;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|c| (c.label.as_str(), curve(c.histogram)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(plot_error("no measurements to plot".into()));
    }
    let points = || lines.iter().flat_map(|(_, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max).ceil();
    // Decade bounds so the log axis has round labels.
    let y_min = 10f64.powf(
        points()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .max(0.001)
            .log10()
            .floor(),
    );
    let y_max = 10f64.powf(
        points()
            .map(|p| p.1)
            .fold(0.0, f64::max)
            .max(y_min * 10.0)
            .log10()
            .ceil(),
    );

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| plot_error(e.to_string());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, 24))
        .margin(20)
        .margin_right(40)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (log scale)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|nines| nines_label(*nines))
        .y_label_formatter(&|ms| latency_label(*ms))
        .label_style((FONT_FAMILY, 16))
        .axis_desc_style((FONT_FAMILY, 18))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, (label, points)) in lines.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        // Curves rise to the right: the lower right corner is the emptiest.
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 16))
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(latency_label(0.25), "250µs");
        assert_eq!(latency_label(1.5), "1.5ms");
        assert_eq!(latency_label(120.0), "120ms");
        assert_eq!(latency_label(2000.0), "2.0s");
    }

    #[test]
    fn draws_a_png_with_several_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let mut fast = loadgen::stats::new_histogram();
        let mut slow = loadgen::stats::new_histogram();
        for i in 1..=1000u64 {
            fast.record(100 + i).unwrap();
            slow.record(20_000 + 50 * i).unwrap();
        }
        let curves = [
            Curve {
                label: "fast".into(),
                histogram: &fast,
            },
            Curve {
                label: "slow".into(),
                histogram: &slow,
            },
        ];
        render(&path, "test", &curves).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = loadgen::stats::new_histogram();
        let err = render(
            &dir.path().join("x.png"),
            "t",
            &[Curve {
                label: "e".into(),
                histogram: &empty,
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no measurements"), "{err}");
    }
}
