//! SVG plots of reports: quality (Δ PPL vs f16) against bits per cached element.

use crate::compare::{pareto_front, short_label, CompareReport, CompareRow};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Renders Δ PPL (%) vs bits/element, one point per cache, one colour per context length, each
/// context's Pareto front joined by a line; writes the SVG atomically.
pub fn quality_vs_bits(report: &CompareReport, path: &Path) -> Result<()> {
    let svg = render(report)?;
    rvq::io::write_atomic(path, svg.as_bytes())
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

fn render(report: &CompareReport) -> Result<String> {
    let rows = &report.rows;
    if rows.is_empty() {
        return Err(anyhow!("nothing to plot: the report has no rows"));
    }
    let max_bits = rows.iter().map(|r| r.bits_per_element).fold(1.0, f64::max) * 1.08;
    let (lo, hi) = rows.iter().fold((0f64, 0f64), |(lo, hi), r| {
        (lo.min(r.delta_pct), hi.max(r.delta_pct))
    });
    let pad = (hi - lo).max(1.0) * 0.08;
    let mut contexts: Vec<usize> = rows.iter().map(|r| r.ctx).collect();
    contexts.dedup();

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("KV cache quality vs size ({} tokens)", report.tokens),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..max_bits, (lo - pad)..(hi + pad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("bits per cached element (codes + scales)")
            .y_desc("Δ perplexity vs f16 (%)")
            .draw()
            .map_err(plot_err)?;
        for (i, &ctx) in contexts.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let these: Vec<&CompareRow> = rows.iter().filter(|r| r.ctx == ctx).collect();
            let front: Vec<(f64, f64)> = pareto_front(&these)
                .into_iter()
                .map(|j| (these[j].bits_per_element, these[j].delta_pct))
                .collect();
            chart
                .draw_series(LineSeries::new(front, color.stroke_width(1)))
                .map_err(plot_err)?
                .label(format!("ctx {ctx} (line: Pareto front)"))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            chart
                .draw_series(these.iter().map(|r| {
                    EmptyElement::at((r.bits_per_element, r.delta_pct))
                        + Circle::new((0, 0), 4, color.filled())
                        + Text::new(short_label(&r.spec), (6, -12), ("sans-serif", 12))
                }))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ppl::Protocol;

    #[test]
    fn renders_every_point_and_refuses_an_empty_report() {
        let row = crate::compare::test_row;
        let mut report = CompareReport {
            model: "m".into(),
            text: "t".into(),
            protocol: Protocol::Windows,
            tokens: 100,
            rows: vec![
                row("f16", 512, 16.0, 0.0),
                row("q4_0,rot", 512, 4.5, 4.2),
                row("rvq:/x/paper.safetensors", 2048, 3.0, 4.3),
            ],
        };
        let svg = render(&report).unwrap();
        assert!(svg.starts_with("<svg"));
        for label in ["q4_0,rot", "rvq:paper", "ctx 2048"] {
            assert!(svg.contains(label), "{label} missing");
        }
        report.rows.clear();
        assert!(render(&report).is_err());
    }
}
