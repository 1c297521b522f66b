//! A finished job's result files, built from its recorded `metrics` events: a per-step CSV and
//! an SVG plot of the loss curve (drawn with plotters).
//!
//! CSV columns: `step,epoch,train_loss,valid_loss,learning_rate,grad_norm,tokens_per_s,trained_tokens,peak_memory_bytes`
//! (`valid_loss` is filled on the step that ends an epoch when a validation file was given).

use crate::store::EventRecord;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;

const COLUMNS: [&str; 9] = [
    "step",
    "epoch",
    "train_loss",
    "valid_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "trained_tokens",
    "peak_memory_bytes",
];

/// One row per step, merging the training and validation metrics of that step.
fn rows(events: &[EventRecord]) -> BTreeMap<u64, serde_json::Map<String, Value>> {
    let mut rows: BTreeMap<u64, serde_json::Map<String, Value>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == "metrics") {
        let (Some(step), Some(data)) = (
            e.data.get("step").and_then(Value::as_u64),
            e.data.as_object(),
        ) else {
            continue;
        };
        let row = rows.entry(step).or_default();
        for (k, v) in data {
            row.insert(k.clone(), v.clone());
        }
    }
    rows
}

pub fn metrics_csv(events: &[EventRecord]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for row in rows(events).values() {
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|c| {
                row.get(*c)
                    .filter(|v| !v.is_null())
                    .map(Value::to_string)
                    .unwrap_or_default()
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// One series of the loss plot: (step, loss) of each step that recorded a finite `key`.
fn series(rows: &BTreeMap<u64, serde_json::Map<String, Value>>, key: &str) -> Vec<(u64, f64)> {
    rows.iter()
        .filter_map(|(step, row)| {
            row.get(key)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite())
                .map(|v| (*step, v))
        })
        .collect()
}

const TRAIN_COLOUR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const VALID_COLOUR: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// Training (and, when recorded, validation) loss against step, as a self-contained SVG drawn by
/// plotters: axes with ticks, a line with a marker per step for each series, and a legend. Text
/// is emitted as SVG `<text>` (plotters' SVG backend needs no font files).
pub fn loss_svg(events: &[EventRecord]) -> anyhow::Result<String> {
    let rows = rows(events);
    let (train, valid) = (series(&rows, "train_loss"), series(&rows, "valid_loss"));
    let all = || train.iter().chain(&valid);
    let max_step = all().map(|p| p.0).max().unwrap_or(0).max(1);
    let max_loss = all().map(|p| p.1).fold(0.0, f64::max);
    // Headroom above the highest point; a flat zero curve still gets a range.
    let top = if max_loss > 0.0 { max_loss * 1.05 } else { 1.0 };
    let bottom = all().map(|p| p.1).fold(0.0, f64::min) * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Fine-tuning loss", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0..max_step, bottom..top)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_labels(10)
            .y_labels(8)
            .y_label_formatter(&|y| format!("{y:.3}"))
            .light_line_style(TRANSPARENT)
            .draw()?;
        for (points, colour, label) in [
            (&train, TRAIN_COLOUR, "train loss"),
            (&valid, VALID_COLOUR, "validation loss"),
        ] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 2, colour.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    svg.push('\n');
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metrics(data: Value) -> EventRecord {
        EventRecord {
            id: "e".into(),
            job_id: "j".into(),
            created_at: 0,
            level: "info".into(),
            message: String::new(),
            kind: "metrics".into(),
            data,
        }
    }

    #[test]
    fn csv_merges_training_and_validation_rows() {
        let events = [
            metrics(json!({"step": 1, "epoch": 0, "train_loss": 2.5})),
            metrics(json!({"step": 2, "epoch": 0, "train_loss": 1.5})),
            metrics(json!({"step": 2, "epoch": 0, "valid_loss": 1.75})),
        ];
        let csv = metrics_csv(&events);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2], "2,0,1.5,1.75,,,,,");
    }

    /// An SVG read as XML (failing unless it is well-formed): its elements with their
    /// attributes, in order, and its text.
    struct Svg {
        elements: Vec<(String, BTreeMap<String, String>)>,
        text: Vec<String>,
    }

    impl Svg {
        fn parse(svg: &str) -> Self {
            use quick_xml::events::Event;
            let mut reader = quick_xml::Reader::from_str(svg);
            let (mut elements, mut text, mut open) = (Vec::new(), Vec::new(), 0usize);
            loop {
                let event = reader
                    .read_event()
                    .unwrap_or_else(|e| panic!("not XML ({e}):\n{svg}"));
                let element = match &event {
                    Event::Start(e) | Event::Empty(e) => e,
                    Event::End(_) => {
                        open -= 1;
                        continue;
                    }
                    Event::Text(t) if !t.trim().is_empty() => {
                        text.push(t.trim().to_string());
                        continue;
                    }
                    Event::Eof => break,
                    _ => continue,
                };
                let attributes = element
                    .attributes()
                    .map(|a| {
                        let a = a.unwrap();
                        (
                            a.key.as_ref().to_string(),
                            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .unwrap()
                                .into_owned(),
                        )
                    })
                    .collect();
                elements.push((element.name().as_ref().to_string(), attributes));
                open += usize::from(matches!(event, Event::Start(_)));
            }
            assert_eq!(open, 0, "unclosed elements:\n{svg}");
            Self { elements, text }
        }

        /// The elements named `name` whose `attribute` is `colour` (any case).
        fn count(&self, name: &str, attribute: &str, colour: RGBColor) -> usize {
            let hex = format!("#{:02x}{:02x}{:02x}", colour.0, colour.1, colour.2);
            self.elements
                .iter()
                .filter(|(n, a)| {
                    n == name
                        && a.get(attribute)
                            .is_some_and(|v| v.eq_ignore_ascii_case(&hex))
                })
                .count()
        }
    }

    fn losses(steps: u64, valid_every: u64) -> Vec<EventRecord> {
        let mut events = Vec::new();
        for step in 1..=steps {
            events.push(metrics(
                json!({"step": step, "epoch": (step - 1) / valid_every, "train_loss": 3.0 / step as f64}),
            ));
            if step % valid_every == 0 {
                events.push(metrics(
                    json!({"step": step, "valid_loss": 3.5 / step as f64}),
                ));
            }
        }
        events
    }

    #[test]
    fn the_loss_plot_is_an_svg_with_both_series_axes_and_a_legend() {
        let svg = loss_svg(&losses(12, 4)).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        let plot = Svg::parse(&svg);
        assert_eq!(plot.elements[0].0, "svg");
        assert_eq!(plot.elements[0].1["width"], "640");
        // Each series: its line and its legend sample, and a marker per step it has.
        assert_eq!(plot.count("polyline", "stroke", TRAIN_COLOUR), 2, "{svg}");
        assert_eq!(plot.count("polyline", "stroke", VALID_COLOUR), 2, "{svg}");
        assert_eq!(plot.count("circle", "fill", TRAIN_COLOUR), 12, "{svg}");
        assert_eq!(plot.count("circle", "fill", VALID_COLOUR), 3, "{svg}");
        for label in [
            "Fine-tuning loss",
            "train loss",
            "validation loss",
            "step",
            "loss",
        ] {
            assert!(
                plot.text.iter().any(|t| t == label),
                "no `{label}` in {:?}",
                plot.text
            );
        }
        // Tick labels on both axes: steps, and losses with three decimals.
        assert!(plot.text.iter().any(|t| t == "10"), "{:?}", plot.text);
        assert!(
            plot.text
                .iter()
                .any(|t| t.starts_with("3.") && t.len() == 5),
            "{:?}",
            plot.text
        );
    }

    #[test]
    fn without_validation_the_plot_has_the_training_series_only() {
        let svg = loss_svg(&losses(5, u64::MAX)).unwrap();
        let plot = Svg::parse(&svg);
        assert_eq!(plot.count("polyline", "stroke", TRAIN_COLOUR), 2, "{svg}");
        assert_eq!(plot.count("polyline", "stroke", VALID_COLOUR), 0, "{svg}");
        assert!(plot.text.iter().any(|t| t == "train loss"));
        assert!(!plot.text.iter().any(|t| t == "validation loss"));
        // No metrics at all (a job with no recorded step) still draws empty axes.
        Svg::parse(&loss_svg(&[]).unwrap());
    }
}
