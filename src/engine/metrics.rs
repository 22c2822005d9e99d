//! Prometheus metrics of the engine, named in the spirit of vLLM's (`mlxd_` prefix).
//!
//! Counters and histograms are recorded by the engine thread as events happen; gauges are read
//! from `EngineStats` when scraped. The metric handles are atomics shared with the scraper.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::EngineStats;
use std::sync::atomic::AtomicU64;

/// Label of `request_success_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabel {
    /// stop, length, abort or error.
    pub finished_reason: &'static str,
}

/// Labels of `cache_config_info`, named as vLLM's `cache_config_info` so that an inference
/// gateway's endpoint picker (which reads `block_size` and `num_gpu_blocks`) understands them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheConfigLabels {
    /// Tokens per KV block.
    pub block_size: String,
    /// Usable KV blocks (on the CPU too: the name is the protocol's).
    pub num_gpu_blocks: String,
    /// Element type of the KV cache (`f16`, `bf16`, `f32`).
    pub cache_dtype: String,
    /// Whether identical prompt prefixes reuse cached KV.
    pub enable_prefix_caching: String,
}

/// Label of `step_phase_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// schedule, prepare, forward, sample or update.
    pub phase: &'static str,
}

/// Step-phase buckets (seconds): 25 µs … ~1.6 s.
fn phase_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000025, 2.0, 17,
    ))
}

/// Latency buckets (seconds) shared by the latency histograms: 1 ms … ~65 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

/// Every metric mlxd exports.
#[derive(Debug)]
pub struct EngineMetrics {
    registry: Registry,
    num_requests_running: Gauge,
    num_requests_waiting: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    cache_config: Family<CacheConfigLabels, Gauge>,
    num_preemptions: Counter,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: Counter,
    /// Prompt tokens found in the prefix cache in memory.
    pub prefix_cache_hits: Counter,
    /// Prompt tokens whose KV was read back from the disk cache.
    pub kv_disk_hits: Counter,
    /// Bytes of KV blocks written to the disk cache.
    pub kv_disk_bytes_written: Counter,
    /// Bytes of KV blocks read from the disk cache.
    pub kv_disk_bytes_read: Counter,
    /// Block files removed to keep the disk cache under its size.
    pub kv_disk_evictions: Counter,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Arrival → first token, seconds.
    pub time_to_first_token: Histogram,
    /// Gap between consecutive tokens of a request, seconds.
    pub inter_token_latency: Histogram,
    /// Arrival → end, seconds.
    pub request_duration: Histogram,
    /// Requests that ended, by reason.
    pub requests_finished: Family<FinishedLabel, Counter>,
    /// Time of each phase of an engine step. `forward` is the time to issue the model's work
    /// (on a GPU, kernel launches); `sample` includes waiting for the device to finish it.
    pub step_phase: Family<PhaseLabel, Histogram, fn() -> Histogram>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineMetrics {
    /// Records that `phase` of a step took `seconds`.
    pub fn step_phase_took(&self, phase: &'static str, seconds: f64) {
        self.step_phase.get_or_create(&PhaseLabel { phase }).observe(seconds);
    }

    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mlxd");
        let m = Self {
            num_requests_running: Gauge::default(),
            num_requests_waiting: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_usage: Gauge::default(),
            cache_config: Family::default(),
            num_preemptions: Counter::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            kv_disk_hits: Counter::default(),
            kv_disk_bytes_written: Counter::default(),
            kv_disk_bytes_read: Counter::default(),
            kv_disk_evictions: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            time_to_first_token: Histogram::new(latency_buckets()),
            inter_token_latency: Histogram::new(latency_buckets()),
            request_duration: Histogram::new(latency_buckets()),
            requests_finished: Family::default(),
            step_phase: Family::new_with_constructor(phase_histogram as fn() -> Histogram),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "num_requests_running",
            "Requests being decoded",
            m.num_requests_running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Requests queued for admission",
            m.num_requests_waiting.clone(),
        );
        r.register(
            "kv_cache_blocks_used",
            "KV blocks held by sequences",
            m.kv_blocks_used.clone(),
        );
        r.register("kv_cache_blocks_total", "Usable KV blocks", m.kv_blocks_total.clone());
        r.register(
            "kv_cache_usage_ratio",
            "Fraction of KV blocks in use (0-1)",
            m.kv_usage.clone(),
        );
        r.register(
            "cache_config_info",
            "The KV cache's layout as labels (value 1), as vLLM's cache_config_info",
            m.cache_config.clone(),
        );
        r.register(
            "num_preemptions",
            "Sequences preempted for lack of KV blocks",
            m.num_preemptions.clone(),
        );
        r.register(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queries.clone(),
        );
        r.register(
            "prefix_cache_hits",
            "Prompt tokens served from the prefix cache in memory (disk hits: kv_disk_hits)",
            m.prefix_cache_hits.clone(),
        );
        r.register(
            "kv_disk_hits",
            "Prompt tokens whose KV was read back from the disk cache",
            m.kv_disk_hits.clone(),
        );
        r.register(
            "kv_disk_written_bytes",
            "Bytes of KV blocks written to the disk cache",
            m.kv_disk_bytes_written.clone(),
        );
        r.register(
            "kv_disk_read_bytes",
            "Bytes of KV blocks read from the disk cache",
            m.kv_disk_bytes_read.clone(),
        );
        r.register(
            "kv_disk_evictions",
            "Block files removed to keep the disk cache under its size",
            m.kv_disk_evictions.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            m.prompt_tokens.clone(),
        );
        r.register("generation_tokens", "Generated tokens", m.generation_tokens.clone());
        r.register(
            "step_phase_seconds",
            "Time of each phase of an engine step (schedule, prepare, forward, sample, update)",
            m.step_phase.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a request",
            m.inter_token_latency.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "Time from arrival to the end of a request",
            m.request_duration.clone(),
        );
        r.register(
            "request_success",
            "Requests that ended, by finish reason",
            m.requests_finished.clone(),
        );
        Self { registry, ..m }
    }

    /// Describes the KV cache once the engine sized it (`cache_config_info`).
    pub fn describe_cache(&self, block_size: usize, num_blocks: usize, dtype: &str, prefix_caching: bool) {
        let labels = CacheConfigLabels {
            block_size: block_size.to_string(),
            num_gpu_blocks: num_blocks.to_string(),
            cache_dtype: dtype.to_string(),
            enable_prefix_caching: prefix_caching.to_string(),
        };
        self.cache_config.get_or_create(&labels).set(1);
    }

    /// Counts one ended request.
    pub fn finished(&self, reason: &'static str) {
        self.requests_finished
            .get_or_create(&FinishedLabel {
                finished_reason: reason,
            })
            .inc();
    }

    /// The Prometheus text exposition, gauges read from `stats` now.
    pub fn render(&self, stats: &EngineStats) -> String {
        let total = stats.kv_blocks_total.load(Ordering::Relaxed);
        let used = total.saturating_sub(stats.kv_blocks_free.load(Ordering::Relaxed));
        self.num_requests_running
            .set(stats.num_running.load(Ordering::Relaxed) as i64);
        self.num_requests_waiting
            .set(stats.num_waiting.load(Ordering::Relaxed) as i64);
        self.kv_blocks_used.set(used as i64);
        self.kv_blocks_total.set(total as i64);
        self.kv_usage
            .set(if total == 0 { 0.0 } else { used as f64 / total as f64 });
        let preemptions = stats.num_preemptions.load(Ordering::Relaxed);
        self.num_preemptions
            .inc_by(preemptions.saturating_sub(self.num_preemptions.get()));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One exposition of several engines' metrics (`(model, exposition)` pairs, each as `render`
/// wrote it): every family once, its samples labelled `model="…"` per engine, one `# EOF`.
pub fn merge_by_model(parts: &[(String, String)]) -> String {
    // family name → (header lines, samples), in first-seen order.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (model, text) in parts {
        let label = format!("model=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut current = usize::MAX;
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.split_whitespace().nth(1).unwrap_or_default().to_string();
                current = match families.iter().position(|(n, _, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        families.push((name, Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                let headers = &mut families[current].1;
                if !headers.iter().any(|h| h == line) {
                    headers.push(line.to_string());
                }
            } else if let Some((_, _, samples)) = families.get_mut(current) {
                samples.push(match line.find('{') {
                    Some(i) => format!("{}{{{label},{}", &line[..i], &line[i + 1..]),
                    None => line.replacen(' ', &format!("{{{label}}} "), 1),
                });
            }
        }
    }
    let mut out = String::new();
    for (_, headers, samples) in families {
        for line in headers.iter().chain(&samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_merge_into_one_labelled_exposition() {
        let a = "# HELP mlxd_x Things.\n# TYPE mlxd_x counter\nmlxd_x_total 1\n# HELP mlxd_y Y.\n# TYPE mlxd_y histogram\nmlxd_y_bucket{le=\"1\"} 2\n# EOF\n";
        let b = "# HELP mlxd_x Things.\n# TYPE mlxd_x counter\nmlxd_x_total 5\n# EOF\n";
        let merged = merge_by_model(&[("a".into(), a.into()), ("q\"b".into(), b.into())]);
        assert_eq!(
            merged,
            "# HELP mlxd_x Things.\n# TYPE mlxd_x counter\nmlxd_x_total{model=\"a\"} 1\nmlxd_x_total{model=\"q\\\"b\"} 5\n\
             # HELP mlxd_y Y.\n# TYPE mlxd_y histogram\nmlxd_y_bucket{model=\"a\",le=\"1\"} 2\n# EOF\n"
        );
    }
}
