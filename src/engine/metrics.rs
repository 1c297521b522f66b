//! Server metrics, updated by the HTTP layer and the engine thread and rendered for
//! `GET /metrics` by `prometheus-client`, in the OpenMetrics text format or the Prometheus text
//! format (version 0.0.4).

use prometheus_client::encoding::{
    prometheus_text, text, EncodeLabelSet, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
const TTFT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];
/// Upper bounds (seconds) of the inter-token latency histogram buckets.
const INTER_TOKEN_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the queue wait histogram buckets.
const QUEUE_WAIT_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds (seconds) of the engine step time histogram buckets.
const STEP_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Window over which the tokens/s gauge averages.
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// The exposition formats `GET /metrics` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 text, for a scraper that asks for it (Prometheus does).
    OpenMetrics,
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
}

impl Exposition {
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Prometheus => prometheus_text::CONTENT_TYPE,
        }
    }
}

/// The labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: u16,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    pub running_seqs: Gauge,
    pub waiting_requests: Gauge,
    pub kv_cache_bytes: Gauge,
    pub kv_cache_reserved_bytes: Gauge,
    pub kv_cache_budget_bytes: Gauge,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub cancelled_requests: Counter,
    pub decode_steps: Counter,
    /// Models whose weights are in memory.
    pub loaded_models: Gauge,
    /// Weight loads, at start and on demand.
    pub model_loads: Counter,
    ttft: Histogram,
    inter_token: Histogram,
    queue_wait: Histogram,
    step_time: Histogram,
    throughput: Throughput,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rewind");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status code",
            requests.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
            let gauge = Gauge::default();
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, gauge.clone()),
                None => registry.register(name, help, gauge.clone()),
            }
            gauge
        };
        let running_seqs = gauge(
            &mut registry,
            "running_sequences",
            "Sequences in the running batch",
            None,
        );
        let waiting_requests = gauge(
            &mut registry,
            "waiting_requests",
            "Requests queued for a batch slot",
            None,
        );
        let kv_cache_bytes = gauge(
            &mut registry,
            "kv_cache",
            "Bytes held by the KV caches of running sequences",
            Some(Unit::Bytes),
        );
        let kv_cache_reserved_bytes = gauge(
            &mut registry,
            "kv_cache_reserved",
            "Worst-case KV cache bytes reserved by admitted requests",
            Some(Unit::Bytes),
        );
        let kv_cache_budget_bytes = gauge(
            &mut registry,
            "kv_cache_budget",
            "The KV cache memory budget",
            Some(Unit::Bytes),
        );
        let loaded_models = gauge(
            &mut registry,
            "loaded_models",
            "Models whose weights are in memory",
            None,
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let prompt_tokens = counter(&mut registry, "prompt_tokens", "Prompt tokens prefilled");
        let generated_tokens = counter(&mut registry, "generated_tokens", "Tokens generated");
        let cancelled_requests = counter(
            &mut registry,
            "cancelled_requests",
            "Requests cancelled because the client went away",
        );
        let decode_steps = counter(&mut registry, "decode_steps", "Batched forward steps run");
        let model_loads = counter(
            &mut registry,
            "model_loads",
            "Model weight loads (at start, and fine-tuned models loaded on demand)",
        );
        let throughput = Throughput::default();
        registry.register(
            "generation_tokens_per_second",
            "Generated tokens per second over the last 10 s",
            throughput.clone(),
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let histogram = Histogram::new(buckets.iter().copied());
            registry.register_with_unit(name, help, Unit::Seconds, histogram.clone());
            histogram
        };
        let ttft = histogram(
            &mut registry,
            "time_to_first_token",
            "Time from request arrival to its first token",
            &TTFT_BUCKETS,
        );
        let inter_token = histogram(
            &mut registry,
            "inter_token_latency",
            "Time between consecutive tokens of one sequence",
            &INTER_TOKEN_BUCKETS,
        );
        let queue_wait = histogram(
            &mut registry,
            "queue_wait",
            "Time from request arrival to its admission into the running batch",
            &QUEUE_WAIT_BUCKETS,
        );
        let step_time = histogram(
            &mut registry,
            "decode_step_duration",
            "Time of one engine step: a batched forward per model served, and sampling",
            &STEP_BUCKETS,
        );
        Self {
            registry,
            requests,
            running_seqs,
            waiting_requests,
            kv_cache_bytes,
            kv_cache_reserved_bytes,
            kv_cache_budget_bytes,
            prompt_tokens,
            generated_tokens,
            cancelled_requests,
            decode_steps,
            loaded_models,
            model_loads,
            ttft,
            inter_token,
            queue_wait,
            step_time,
            throughput,
        }
    }
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.ttft.observe(seconds);
    }

    /// The time since the previous token of the same sequence.
    pub fn observe_inter_token(&self, seconds: f64) {
        self.inter_token.observe(seconds);
    }

    /// The time a request waited between its arrival and its admission.
    pub fn observe_queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds);
    }

    /// Records one engine step, which ran from `started` to `finished` and produced `tokens`.
    pub fn observe_step(&self, tokens: u64, started: Instant, finished: Instant) {
        self.decode_steps.inc();
        self.generated_tokens.inc_by(tokens);
        self.step_time
            .observe(finished.duration_since(started).as_secs_f64());
        self.throughput.record(tokens, finished);
    }

    pub fn render(&self, format: Exposition) -> String {
        let mut out = String::new();
        let encoded = match format {
            Exposition::OpenMetrics => text::encode(&mut out, &self.registry),
            Exposition::Prometheus => prometheus_text::encode(&mut out, &self.registry),
        };
        if encoded.is_err() {
            tracing::error!("encoding the metrics failed");
        }
        out
    }
}

/// Generated tokens per second over the last [`THROUGHPUT_WINDOW`], a gauge computed when it is
/// scraped (so it falls to 0 when the engine is idle).
#[derive(Debug, Clone, Default)]
struct Throughput(Arc<Mutex<VecDeque<(Instant, u64)>>>);

impl Throughput {
    fn record(&self, tokens: u64, now: Instant) {
        if let Ok(mut w) = self.0.lock() {
            w.push_back((now, tokens));
            while w
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > THROUGHPUT_WINDOW)
            {
                w.pop_front();
            }
        }
    }

    /// 0 when idle.
    fn per_second(&self, now: Instant) -> f64 {
        let Ok(w) = self.0.lock() else {
            return 0.0;
        };
        let recent: u64 = w
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= THROUGHPUT_WINDOW)
            .map(|(_, n)| n)
            .sum();
        recent as f64 / THROUGHPUT_WINDOW.as_secs_f64()
    }
}

impl EncodeMetric for Throughput {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.per_second(Instant::now()))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_text_formats() {
        let m = Metrics::default();
        m.record_request("/v1/chat/completions", 200);
        m.record_request("/v1/chat/completions", 200);
        m.record_request("/v1/chat/completions", 429);
        m.observe_ttft(0.2);
        m.observe_ttft(3.0);
        m.observe_inter_token(0.02);
        m.observe_queue_wait(0.003);
        let now = Instant::now();
        m.observe_step(5, now - Duration::from_millis(30), now);
        m.kv_cache_budget_bytes.set(1 << 20);
        assert!((m.throughput.per_second(now) - 0.5).abs() < 1e-9);

        for format in [Exposition::Prometheus, Exposition::OpenMetrics] {
            let text = m.render(format);
            for line in [
                "rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2",
                "rewind_requests_total{endpoint=\"/v1/chat/completions\",status=\"429\"} 1",
                "rewind_time_to_first_token_seconds_bucket{le=\"0.25\"} 1",
                "rewind_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
                "rewind_inter_token_latency_seconds_count 1",
                "rewind_queue_wait_seconds_bucket{le=\"0.005\"} 1",
                "rewind_decode_step_duration_seconds_bucket{le=\"0.05\"} 1",
                "rewind_decode_step_duration_seconds_bucket{le=\"0.025\"} 0",
                "rewind_generated_tokens_total 5",
                "rewind_decode_steps_total 1",
                "rewind_kv_cache_budget_bytes 1048576",
                "rewind_running_sequences 0",
            ] {
                assert!(
                    text.lines().any(|l| l == line),
                    "{format:?}: {line}\n{text}"
                );
            }
            assert!(text.contains("rewind_generation_tokens_per_second "));
            let eof = text.lines().last() == Some("# EOF");
            assert_eq!(eof, format == Exposition::OpenMetrics, "{text}");
        }
    }
}
