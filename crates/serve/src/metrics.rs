//! What the server counts, read by `GET /metrics` in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Gauges and counters the scheduler writes and the HTTP side reads, without locks.
#[derive(Debug, Default)]
pub struct Metrics {
    pub active: AtomicU64,
    pub queued: AtomicU64,
    pub peak_active: AtomicU64,
    /// Bytes the active sequences' caches hold now (their `MemoryReport`s).
    pub kv_bytes_in_use: AtomicU64,
    /// Bytes reserved for the active sequences at their full length (prompt + max_tokens).
    pub kv_bytes_reserved: AtomicU64,
    pub kv_budget_bytes: AtomicU64,
    /// Bytes every sequence shares (codebooks), counted once.
    pub codebook_bytes: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Decode tokens per second over the last second of decode steps (f64 bits).
    decode_rate_bits: AtomicU64,
}

impl Metrics {
    pub fn set_decode_rate(&self, tokens_per_s: f64) {
        self.decode_rate_bits
            .store(tokens_per_s.to_bits(), Ordering::Relaxed);
    }

    pub fn decode_rate(&self) -> f64 {
        f64::from_bits(self.decode_rate_bits.load(Ordering::Relaxed))
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Release);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Acquire)
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let g = Self::get;
        let rows: [(&str, &str, &str, f64); 15] = [
            (
                "rvq_kv_sequences_active",
                "gauge",
                "Sequences admitted and decoding",
                g(&self.active) as f64,
            ),
            (
                "rvq_kv_sequences_queued",
                "gauge",
                "Requests waiting for KV memory",
                g(&self.queued) as f64,
            ),
            (
                "rvq_kv_sequences_active_peak",
                "gauge",
                "Most sequences admitted at once",
                g(&self.peak_active) as f64,
            ),
            (
                "rvq_kv_cache_bytes_in_use",
                "gauge",
                "Bytes the active sequences' KV caches hold",
                g(&self.kv_bytes_in_use) as f64,
            ),
            (
                "rvq_kv_cache_bytes_reserved",
                "gauge",
                "Bytes reserved for the active sequences at prompt + max_tokens",
                g(&self.kv_bytes_reserved) as f64,
            ),
            (
                "rvq_kv_cache_budget_bytes",
                "gauge",
                "The KV budget (--kv-budget)",
                g(&self.kv_budget_bytes) as f64,
            ),
            (
                "rvq_kv_codebook_bytes",
                "gauge",
                "Codebook bytes all sequences share, counted once",
                g(&self.codebook_bytes) as f64,
            ),
            (
                "rvq_kv_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled",
                g(&self.prompt_tokens) as f64,
            ),
            (
                "rvq_kv_generated_tokens_total",
                "counter",
                "Tokens generated",
                g(&self.generated_tokens) as f64,
            ),
            (
                "rvq_kv_requests_finished_total",
                "counter",
                "Requests answered in full",
                g(&self.requests_finished) as f64,
            ),
            (
                "rvq_kv_requests_cancelled_total",
                "counter",
                "Requests whose client went away first",
                g(&self.requests_cancelled) as f64,
            ),
            (
                "rvq_kv_requests_rejected_total",
                "counter",
                "Requests refused: queue full or larger than the budget",
                g(&self.requests_rejected) as f64,
            ),
            (
                "rvq_kv_requests_failed_total",
                "counter",
                "Requests ended by an internal error",
                g(&self.requests_failed) as f64,
            ),
            (
                "rvq_kv_decode_tokens_per_second",
                "gauge",
                "Decode tokens per second over the last second",
                self.decode_rate(),
            ),
            ("rvq_kv_up", "gauge", "1 while the server runs", 1.0),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_help_type_and_value() {
        let m = Metrics::default();
        Metrics::add(&m.generated_tokens, 42);
        m.set_decode_rate(12.5);
        let text = m.render();
        assert!(text.contains(
            "# TYPE rvq_kv_generated_tokens_total counter\nrvq_kv_generated_tokens_total 42\n"
        ));
        assert!(text.contains("\nrvq_kv_decode_tokens_per_second 12.5\n"));
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 15);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("rvq_kv_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
