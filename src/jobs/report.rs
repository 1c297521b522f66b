//! A finished job's result files, built from its recorded `metrics` events: a per-step CSV and
//! an SVG plot of the loss curve.
//!
//! CSV columns: `step,epoch,train_loss,valid_loss,learning_rate,grad_norm,tokens_per_s,trained_tokens,peak_memory_bytes`
//! (`valid_loss` is filled on the step that ends an epoch when a validation file was given).

use crate::store::EventRecord;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

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

/// Training (and validation) loss against step, as a self-contained SVG.
pub fn loss_svg(events: &[EventRecord]) -> String {
    let rows = rows(events);
    let series = |key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|(s, r)| {
                r.get(key)
                    .and_then(Value::as_f64)
                    .filter(|v| v.is_finite())
                    .map(|v| (*s as f64, v))
            })
            .collect()
    };
    let (train, valid) = (series("train_loss"), series("valid_loss"));
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let all: Vec<&(f64, f64)> = train.iter().chain(&valid).collect();
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = all.iter().map(|p| p.1).fold(f64::MIN_POSITIVE, f64::max);
    let min_y = 0.0;
    let span = (max_y - min_y).max(1e-9);
    let point = |(x, y): &(f64, f64)| {
        format!(
            "{:.1},{:.1}",
            pad + x / max_x * (w - 2.0 * pad),
            h - pad - (y - min_y) / span * (h - 2.0 * pad)
        )
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{ly}" text-anchor="middle">step (max {max_x})</text>
<text x="8" y="{pad}">{max_y:.3}</text><text x="8" y="{b}">{min_y:.3}</text>
"##,
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ly = h - 15.0,
    );
    for (points, colour, label, y) in [
        (&train, "#1f77b4", "train loss", 20.0),
        (&valid, "#d62728", "validation loss", 36.0),
    ] {
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points.iter().map(point).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in points.iter().map(point) {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>"#);
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{y}" fill="{colour}">{label}</text>"#,
            w - pad - 110.0
        );
    }
    svg.push_str("</svg>\n");
    svg
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
        let svg = loss_svg(&events);
        assert!(
            svg.starts_with("<svg")
                && svg.contains("polyline")
                && svg.trim_end().ends_with("</svg>")
        );
    }
}
