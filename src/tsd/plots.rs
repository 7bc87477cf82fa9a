//! PNG figures of the TSD study, drawn with plotters' bitmap backend and written atomically:
//! δ over the spectrum of one layer (log scale, TSD marked), a layers × spectrum-position
//! heatmap of where TSD sit and where the change rate lies, and per-layer agreement of two
//! sources. As in `train::plot`, text needs a system font; without one the figure is drawn
//! without labels.

use std::error::Error as StdError;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, IoContext, Result};

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Drawn = std::result::Result<(), Box<dyn StdError>>;

/// One δ curve of [`plot_delta_spectrum`].
pub struct SpectrumSeries<'a> {
    pub label: &'a str,
    /// δ per singular-value index (descending σ).
    pub delta: &'a [f32],
    pub tsd: &'a [usize],
}

/// One row of [`plot_tsd_heatmap`].
pub struct HeatRow<'a> {
    pub layer: &'a str,
    pub tsd: &'a [usize],
    pub delta: &'a [f32],
}

const PALETTE: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// `model.layers.3.self_attn.q_proj` → `3.q`.
pub fn short_name(layer: &str) -> String {
    let parts: Vec<&str> = layer.split('.').collect();
    match parts.iter().position(|p| *p == "layers") {
        Some(i) if i + 1 < parts.len() => {
            let last = parts.last().copied().unwrap_or("");
            format!(
                "{}.{}",
                parts[i + 1],
                last.strip_suffix("_proj").unwrap_or(last)
            )
        }
        _ => layer.to_string(),
    }
}

/// Every `step`-th name, drawn at absolute pixel positions `at(i)` on `canvas` (whose origin
/// is the bitmap's), anchored by `pos`.
fn draw_names(
    canvas: &Area<'_>,
    names: &[String],
    step: usize,
    pos: Pos,
    at: impl Fn(usize) -> (i32, i32),
) -> Drawn {
    let style = TextStyle::from(("sans-serif", 11).into_font())
        .color(&BLACK)
        .pos(pos);
    for (i, n) in names.iter().enumerate().step_by(step.max(1)) {
        canvas.draw(&Text::new(n.clone(), at(i), style.clone()))?;
    }
    Ok(())
}

fn render(path: &Path, size: (u32, u32), draw: impl Fn(&Area<'_>, bool) -> Drawn) -> Result<()> {
    // The backend picks the encoder from the extension, so the temporary name ends in .png.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}.png", std::process::id()));
    let attempt = |text: bool| -> Drawn {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root, text)?;
        root.present()?;
        Ok(())
    };
    if let Err(e) = attempt(true).or_else(|_| attempt(false)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(path, format!("cannot draw the figure: {e}")));
    }
    std::fs::rename(&tmp, path).at(path)
}

/// δ against singular-value index for one layer, log-scale y, each series' TSD circled.
pub fn plot_delta_spectrum(path: &Path, layer: &str, series: &[SpectrumSeries<'_>]) -> Result<()> {
    let k = series
        .iter()
        .map(|s| s.delta.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let positive = series
        .iter()
        .flat_map(|s| s.delta.iter().copied())
        .filter(|d| *d > 0.0 && d.is_finite());
    let (lo, hi) = positive.fold((f64::INFINITY, 0f64), |(lo, hi), d| {
        (lo.min(d as f64), hi.max(d as f64))
    });
    // Headroom above the largest δ keeps the legend off the curves.
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (lo * 0.5, hi * 30.0)
    } else {
        (1e-6, 1.0)
    };
    // log axes cannot show 0: zeros are drawn at the bottom edge.
    let clamp = |d: f32| (d as f64).max(lo);
    render(path, (1000, 600), |root, text| {
        let mut b = ChartBuilder::on(root);
        b.margin(15);
        if text {
            b.caption(
                format!("change rate δ over the spectrum: {layer}"),
                ("sans-serif", 22),
            )
            .x_label_area_size(45)
            .y_label_area_size(70);
        }
        let mut chart = b.build_cartesian_2d(0f64..(k - 1).max(1) as f64, (lo..hi).log_scale())?;
        if text {
            chart
                .configure_mesh()
                .x_desc("singular-value index i (descending σ)")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc("δ_i = |u_iᵀ ΔW v_i| / σ_i")
                .y_label_formatter(&|y| format!("{y:.0e}"))
                .light_line_style(BLACK.mix(0.04))
                .draw()?;
        }
        for (n, s) in series.iter().enumerate() {
            let c = PALETTE[n % PALETTE.len()];
            let line = chart.draw_series(LineSeries::new(
                s.delta
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| (i as f64, clamp(d))),
                c.mix(0.8).stroke_width(1),
            ))?;
            if text {
                line.label(s.label.to_string()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            }
            let marks =
                chart.draw_series(s.tsd.iter().filter(|&&i| i < s.delta.len()).map(|&i| {
                    Circle::new(
                        (i as f64, clamp(s.delta[i])),
                        6 + 2 * n as i32,
                        c.stroke_width(2),
                    )
                }))?;
            if text {
                marks
                    .label(format!("{} TSD", s.label))
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.stroke_width(2)));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        Ok(())
    })
}

/// Two panels, rows = layers, columns = `bins` equal slices of the spectrum position i/k:
/// left the number of TSD in each slice, right the share of the layer's total δ in it.
pub fn plot_tsd_heatmap(path: &Path, title: &str, rows: &[HeatRow<'_>], bins: usize) -> Result<()> {
    let bins = bins.max(1);
    let n = rows.len().max(1);
    let mut counts = vec![vec![0f64; bins]; rows.len()];
    let mut mass = vec![vec![0f64; bins]; rows.len()];
    for (r, row) in rows.iter().enumerate() {
        let k = row.delta.len().max(1);
        let bin = |i: usize| (i * bins / k).min(bins - 1);
        for &i in row.tsd {
            counts[r][bin(i)] += 1.0;
        }
        let total: f64 = row
            .delta
            .iter()
            .filter(|d| d.is_finite())
            .map(|&d| d as f64)
            .sum();
        if total > 0.0 {
            for (i, &d) in row.delta.iter().enumerate().filter(|(_, d)| d.is_finite()) {
                mass[r][bin(i)] += d as f64 / total;
            }
        }
    }
    let cmax = counts
        .iter()
        .flatten()
        .copied()
        .fold(0f64, f64::max)
        .max(1.0);
    let mmax = mass
        .iter()
        .flatten()
        .copied()
        .fold(0f64, f64::max)
        .max(1e-12);
    let height = (12 * n as u32 + 160).clamp(400, 2400);
    let names: Vec<String> = rows.iter().map(|r| short_name(r.layer)).collect();
    render(path, (1400, height), |root, text| {
        let canvas = root;
        let root = if text {
            root.titled(title, ("sans-serif", 24))?
        } else {
            root.clone()
        };
        let (left, right) = root.split_horizontally(700);
        let panels = [
            (&left, &counts, cmax, "TSD per spectrum slice"),
            (&right, &mass, mmax, "share of Σδ per spectrum slice"),
        ];
        for (area, grid, max, caption) in panels {
            let mut b = ChartBuilder::on(area);
            b.margin(10);
            if text {
                b.caption(caption, ("sans-serif", 18))
                    .x_label_area_size(40)
                    .y_label_area_size(90);
            }
            let mut chart = b.build_cartesian_2d(0f64..1f64, n as f64..0f64)?;
            if text {
                chart
                    .configure_mesh()
                    .disable_mesh()
                    .disable_y_axis()
                    .x_desc("position i/k in W's spectrum (0 = largest σ)")
                    .draw()?;
                // One label per row while rows are tall enough to read, else every few rows.
                let row_px = (chart.backend_coord(&(0.0, 1.0)).1
                    - chart.backend_coord(&(0.0, 0.0)).1)
                    .max(1);
                let step = (12 / row_px).max(1) as usize;
                draw_names(
                    canvas,
                    &names,
                    step,
                    Pos::new(HPos::Right, VPos::Center),
                    |i| {
                        let (x, y) = chart.backend_coord(&(0.0, i as f64 + 0.5));
                        (x - 6, y)
                    },
                )?;
            }
            chart.draw_series(grid.iter().enumerate().flat_map(|(r, row)| {
                row.iter().enumerate().map(move |(c, &v)| {
                    let colour = if v > 0.0 {
                        ViridisRGB.get_color((v / max) as f32)
                    } else {
                        WHITE
                    };
                    let x0 = c as f64 / bins as f64;
                    Rectangle::new(
                        [(x0, r as f64), (x0 + 1.0 / bins as f64, r as f64 + 1.0)],
                        colour.filled(),
                    )
                })
            }))?;
        }
        Ok(())
    })
}

/// Per layer: |∩|/s of the two TSD sets as bars, Spearman's ρ of the δ vectors as a line,
/// the isotropic-ΔW baseline of |∩|/s per layer as a black line, and the chance level s/k
/// as a dashed line.
pub fn plot_overlap(
    path: &Path,
    layers: &[String],
    overlap: &[f64],
    spearman: &[f64],
    null: &[f64],
    chance: f64,
) -> Result<()> {
    let n = layers.len().max(1);
    let lo = spearman
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f64, f64::min)
        - 0.05;
    let names: Vec<String> = layers.iter().map(|l| short_name(l)).collect();
    render(path, (1400, 600), |root, text| {
        let mut b = ChartBuilder::on(root);
        b.margin(15);
        if text {
            b.caption(
                "agreement of the two sources' TSD per layer",
                ("sans-serif", 22),
            )
            .x_label_area_size(60)
            .y_label_area_size(60);
        }
        // Headroom above 1 keeps the legend off the bars.
        let mut chart = b.build_cartesian_2d(0f64..n as f64, lo..1.3f64)?;
        if text {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .x_desc("layer")
                .light_line_style(BLACK.mix(0.04))
                .draw()?;
            let bar_px =
                (chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0).max(1);
            let step = (48 / bar_px).max(1) as usize;
            draw_names(root, &names, step, Pos::new(HPos::Center, VPos::Top), |i| {
                let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo));
                (x, y + 6)
            })?;
        }
        let bars = chart.draw_series(overlap.iter().enumerate().map(|(i, &v)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v)],
                PALETTE[0].mix(0.8).filled(),
            )
        }))?;
        if text {
            bars.label("|∩| / s").legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 20, y + 5)], PALETTE[0].filled())
            });
        }
        let rho = chart.draw_series(LineSeries::new(
            spearman
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as f64 + 0.5, v)),
            PALETTE[1].stroke_width(2),
        ))?;
        if text {
            rho.label("Spearman ρ of δ").legend(|(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], PALETTE[1].stroke_width(2))
            });
        }
        let nl = chart.draw_series(LineSeries::new(
            null.iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as f64 + 0.5, v)),
            BLACK.stroke_width(2),
        ))?;
        if text {
            nl.label("|∩| / s for an isotropic random ΔW")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2))
                });
        }
        let ch = chart.draw_series(DashedLineSeries::new(
            vec![(0.0, chance), (n as f64, chance)],
            8,
            6,
            BLACK.stroke_width(1),
        ))?;
        if text {
            ch.label("chance |∩| / s = s/k")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        Ok(())
    })
}
