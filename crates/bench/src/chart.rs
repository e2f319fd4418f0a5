use std::path::Path;

use plotters::prelude::*;

use crate::stats::cdf;

#[derive(Debug, thiserror::Error)]
#[error("drawing chart {path}: {reason}")]
pub struct ChartError {
    pub path: String,
    pub reason: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> ChartError {
    ChartError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Empirical CDFs of several latency series on one log-scale time axis.
pub fn latency_cdf(
    path: &Path,
    title: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), ChartError> {
    let all: Vec<f64> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 1.5);
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1.0)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(|e| err(path, e))?;
    for (i, (label, values)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(cdf(values), color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

/// Horizontal groups of bars, one value each (for memory per sandbox).
pub fn bars(
    path: &Path,
    title: &str,
    unit: &str,
    bars: &[(String, f64)],
) -> Result<(), ChartError> {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let root = SVGBackend::new(path, (760, 120 + 40 * bars.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let n = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..max * 1.15, (0..n).into_segmented())
        .map_err(|e| err(path, e))?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| err(path, e))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            let i = i as i32;
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                COLORS[i as usize % COLORS.len()].filled(),
            );
            r.set_margin(6, 6, 0, 0);
            r
        }))
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_svg_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cdf.svg");
        latency_cdf(
            &p,
            "create",
            &[
                ("c=1".into(), vec![1.0, 2.0, 3.0]),
                ("c=10".into(), vec![2.0, 8.0]),
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("<svg") && text.contains("c=10"));
        let b = dir.path().join("mem.svg");
        bars(
            &b,
            "memory",
            "MiB",
            &[("pss".into(), 30.0), ("private".into(), 25.0)],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&b).unwrap().contains("private"));
    }
}
