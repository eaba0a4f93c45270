//! Charts of the benchmark reports, each written as SVG and PNG beside its table: the Pareto
//! view of a sweep (tok/s/GPU against tok/s/user, one labelled curve per run, as the seed's
//! guide plots them) and grouped bars for per-policy comparisons.
//!
//! Text is laid out with a TrueType font read at run time (DejaVu Sans, which
//! `scripts/setup-system` installs; `BATON_PLOT_FONT` names another), so the binary carries
//! no font and needs no fontconfig.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Where DejaVu Sans lives on Debian/Ubuntu (`fonts-dejavu-core`) and Fedora.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 640);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "no font for the chart's text: tried {0} (install fonts-dejavu-core, or set \
         BATON_PLOT_FONT to a .ttf)"
    )]
    NoFont(String),
    #[error("cannot draw {path}: {reason}")]
    Draw { path: PathBuf, reason: String },
    #[error("nothing to plot: {0}")]
    Empty(String),
}

/// One labelled series of (x, y) points, drawn in the order given.
#[derive(Clone, Debug)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Markers only, no line: published points read off a plot, say.
    pub markers_only: bool,
}

impl Curve {
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Curve {
            label: label.into(),
            points,
            markers_only: false,
        }
    }

    pub fn markers(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Curve {
            markers_only: true,
            ..Curve::line(label, points)
        }
    }
}

fn register_font() -> Result<(), PlotError> {
    static FONT_BYTES: OnceLock<Result<(), String>> = OnceLock::new();
    FONT_BYTES
        .get_or_init(|| {
            let candidates: Vec<String> = std::env::var("BATON_PLOT_FONT")
                .into_iter()
                .chain(FONT_PATHS.iter().map(|p| p.to_string()))
                .collect();
            for path in &candidates {
                if let Ok(bytes) = std::fs::read(path) {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(candidates.join(", "))
        })
        .clone()
        .map_err(PlotError::NoFont)
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |reason| PlotError::Draw {
        path: path.to_path_buf(),
        reason,
    }
}

/// Upper end of an axis: a little above the largest value, never zero.
fn axis_max(values: impl Iterator<Item = f64>) -> f64 {
    let m = values.filter(|v| v.is_finite()).fold(0.0_f64, f64::max);
    if m > 0.0 {
        m * 1.1
    } else {
        1.0
    }
}

/// A Pareto chart: x tok/s/user, y tok/s/GPU, one curve per run.
pub fn pareto(stem: &Path, title: &str, curves: &[Curve]) -> Result<Vec<PathBuf>, PlotError> {
    xy(stem, title, "tok/s/user", "tok/s/GPU", curves)
}

/// A line chart of labelled curves.
pub fn xy(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[Curve],
) -> Result<Vec<PathBuf>, PlotError> {
    if curves.iter().all(|c| c.points.is_empty()) {
        return Err(PlotError::Empty(format!("{title}: every curve is empty")));
    }
    let x_max = axis_max(curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)));
    let y_max = axis_max(curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)));
    macro_rules! paint {
        () => {
            |root| -> Result<(), String> {
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 22))
                    .margin(16)
                    .x_label_area_size(44)
                    .y_label_area_size(64)
                    .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .label_style((FONT, 14))
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (i, c) in curves.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    let points: Vec<(f64, f64)> = c
                        .points
                        .iter()
                        .copied()
                        .filter(|(x, y)| x.is_finite() && y.is_finite())
                        .collect();
                    if !c.markers_only {
                        chart
                            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                            .map_err(|e| e.to_string())?;
                    }
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(|e| e.to_string())?
                        .label(c.label.as_str())
                        .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 14))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| e.to_string())
            }
        };
    }
    both_with(stem, paint!(), paint!())
}

/// Grouped bars: one group per category, one bar per series in each group.
pub fn bars(
    stem: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<Vec<PathBuf>, PlotError> {
    if categories.is_empty() || series.is_empty() {
        return Err(PlotError::Empty(format!(
            "{title}: no categories or series"
        )));
    }
    let y_max = axis_max(series.iter().flat_map(|s| s.1.iter().copied()));
    let n = series.len() as f64;
    let groups = categories.len() as f64;
    macro_rules! paint {
        () => {
            |root| -> Result<(), String> {
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 22))
                    .margin(16)
                    .x_label_area_size(44)
                    .y_label_area_size(64)
                    .build_cartesian_2d(0.0..groups, 0.0..y_max)
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(categories.len() * 2 + 1)
                    .x_label_formatter(&|x: &f64| {
                        let i = x.floor() as usize;
                        // Labels at the middle of each group only.
                        if (x - x.floor() - 0.5).abs() < 1e-6 && i < categories.len() {
                            categories[i].clone()
                        } else {
                            String::new()
                        }
                    })
                    .y_desc(y_label)
                    .label_style((FONT, 14))
                    .draw()
                    .map_err(|e| e.to_string())?;
                let width = 0.8 / n;
                for (s, (label, values)) in series.iter().enumerate() {
                    let color = Palette99::pick(s).to_rgba();
                    chart
                        .draw_series(values.iter().enumerate().map(|(g, &v)| {
                            let x0 = g as f64 + 0.1 + s as f64 * width;
                            Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
                        }))
                        .map_err(|e| e.to_string())?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 14))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(|e| e.to_string())
            }
        };
    }
    both_with(stem, paint!(), paint!())
}

/// Draws into `{stem}.svg` and `{stem}.png`, one closure per backend (plotters' areas differ
/// in type); returns both paths.
fn both_with<S, B>(stem: &Path, svg_paint: S, png_paint: B) -> Result<Vec<PathBuf>, PlotError>
where
    S: Fn(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    B: Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
{
    register_font()?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| draw_err(stem)(e.to_string()))?;
    }
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        svg_paint(&root).map_err(draw_err(&svg))?;
        root.present().map_err(|e| draw_err(&svg)(e.to_string()))?;
    }
    let png = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        png_paint(&root).map_err(draw_err(&png))?;
        root.present().map_err(|e| draw_err(&png)(e.to_string()))?;
    }
    Ok(vec![svg, png])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pareto_chart_and_a_bar_chart_are_written_as_svg_and_png() {
        let dir = std::env::temp_dir().join(format!("baton-plot-{}", std::process::id()));
        let files = pareto(
            &dir.join("pareto"),
            "test",
            &[
                Curve::line("run a", vec![(10.0, 100.0), (20.0, 80.0)]),
                Curve::markers("published", vec![(15.0, 90.0)]),
            ],
        )
        .unwrap();
        for f in &files {
            assert!(
                std::fs::metadata(f).unwrap().len() > 1000,
                "{}",
                f.display()
            );
        }
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.contains("run a") && svg.contains("published"));
        let files = bars(
            &dir.join("bars"),
            "policies",
            "ms",
            &["kv".into(), "round-robin".into()],
            &[
                ("p50".into(), vec![1.0, 2.0]),
                ("p90".into(), vec![3.0, 4.0]),
            ],
        )
        .unwrap();
        assert!(std::fs::read_to_string(&files[0])
            .unwrap()
            .contains("round-robin"));
        assert!(matches!(
            pareto(&dir.join("none"), "t", &[Curve::line("x", vec![])]),
            Err(PlotError::Empty(_))
        ));
        std::fs::remove_dir_all(dir).ok();
    }
}
