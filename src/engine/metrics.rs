//! Server metrics, updated by the HTTP layer and the engine thread and rendered in the
//! Prometheus text exposition format (version 0.0.4) for `GET /metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
const TTFT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];
/// Window over which the tokens/s gauge averages.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Metrics {
    /// (endpoint, HTTP status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub running_seqs: AtomicUsize,
    pub waiting_requests: AtomicUsize,
    pub kv_cache_bytes: AtomicUsize,
    pub kv_cache_reserved_bytes: AtomicUsize,
    pub kv_cache_budget_bytes: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled_requests: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Models whose weights are in memory.
    pub loaded_models: AtomicUsize,
    /// Weight loads, at start and on demand.
    pub model_loads: AtomicU64,
    ttft: Mutex<Histogram>,
    throughput: Mutex<VecDeque<(Instant, u64)>>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    pub fn request_count(&self, endpoint: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .map(|m| m.get(&(endpoint.to_string(), status)).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn observe_ttft(&self, seconds: f64) {
        if let Ok(mut h) = self.ttft.lock() {
            for (count, &bound) in h.counts.iter_mut().zip(&TTFT_BUCKETS) {
                if seconds <= bound {
                    *count += 1;
                }
            }
            h.sum += seconds;
            h.count += 1;
        }
    }

    /// Records the tokens one decode step produced.
    pub fn observe_step(&self, tokens: u64, now: Instant) {
        self.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.generated_tokens.fetch_add(tokens, Ordering::Relaxed);
        if let Ok(mut w) = self.throughput.lock() {
            w.push_back((now, tokens));
            while w
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > THROUGHPUT_WINDOW)
            {
                w.pop_front();
            }
        }
    }

    /// Generated tokens per second over the last few seconds (0 when idle).
    pub fn tokens_per_second(&self, now: Instant) -> f64 {
        let Ok(w) = self.throughput.lock() else {
            return 0.0;
        };
        let recent: u64 = w
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= THROUGHPUT_WINDOW)
            .map(|(_, n)| n)
            .sum();
        recent as f64 / THROUGHPUT_WINDOW.as_secs_f64()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |v: &AtomicUsize| v.load(Ordering::Relaxed);
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);

        header(
            &mut out,
            "rewind_requests_total",
            "counter",
            "HTTP requests by endpoint and status code.",
        );
        if let Ok(map) = self.requests.lock() {
            for ((endpoint, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "rewind_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                    escape(endpoint)
                );
            }
        }
        let gauges = [
            (
                "rewind_running_sequences",
                "Sequences in the running batch.",
                g(&self.running_seqs),
            ),
            (
                "rewind_waiting_requests",
                "Requests queued for a batch slot.",
                g(&self.waiting_requests),
            ),
            (
                "rewind_kv_cache_bytes",
                "Bytes held by the KV caches of running sequences.",
                g(&self.kv_cache_bytes),
            ),
            (
                "rewind_kv_cache_reserved_bytes",
                "Worst-case KV cache bytes reserved by admitted requests.",
                g(&self.kv_cache_reserved_bytes),
            ),
            (
                "rewind_kv_cache_budget_bytes",
                "The KV cache memory budget.",
                g(&self.kv_cache_budget_bytes),
            ),
            (
                "rewind_loaded_models",
                "Models whose weights are in memory.",
                g(&self.loaded_models),
            ),
        ];
        for (name, help, value) in gauges {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
        let counters = [
            (
                "rewind_prompt_tokens_total",
                "Prompt tokens prefilled.",
                c(&self.prompt_tokens),
            ),
            (
                "rewind_generated_tokens_total",
                "Tokens generated.",
                c(&self.generated_tokens),
            ),
            (
                "rewind_cancelled_requests_total",
                "Requests cancelled because the client went away.",
                c(&self.cancelled_requests),
            ),
            (
                "rewind_decode_steps_total",
                "Batched forward steps run.",
                c(&self.decode_steps),
            ),
            (
                "rewind_model_loads_total",
                "Model weight loads (at start, and fine-tuned models loaded on demand).",
                c(&self.model_loads),
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "rewind_generation_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last 10 s.",
        );
        let _ = writeln!(
            out,
            "rewind_generation_tokens_per_second {:.3}",
            self.tokens_per_second(Instant::now())
        );

        header(
            &mut out,
            "rewind_time_to_first_token_seconds",
            "histogram",
            "Time from request arrival to its first token.",
        );
        if let Ok(h) = self.ttft.lock() {
            for (count, bound) in h.counts.iter().zip(TTFT_BUCKETS) {
                let _ = writeln!(
                    out,
                    "rewind_time_to_first_token_seconds_bucket{{le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "rewind_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "rewind_time_to_first_token_seconds_sum {}", h.sum);
            let _ = writeln!(out, "rewind_time_to_first_token_seconds_count {}", h.count);
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.record_request("/v1/chat/completions", 200);
        m.record_request("/v1/chat/completions", 200);
        m.record_request("/v1/chat/completions", 429);
        m.observe_ttft(0.2);
        m.observe_ttft(3.0);
        let now = Instant::now();
        m.observe_step(5, now);
        let text = m.render();
        assert!(
            text.contains(
                "rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text
            .contains("rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"429\"} 1"));
        assert!(text.contains("rewind_time_to_first_token_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("rewind_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("rewind_generated_tokens_total 5"));
        assert!((m.tokens_per_second(now) - 0.5).abs() < 1e-9);
        // Every sample line belongs to a declared metric family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{line}"
            );
        }
    }
}
