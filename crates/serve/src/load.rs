//! A load generator: concurrent streaming clients over HTTP, measuring what users of a server
//! see (time to first token, time between tokens) and what its operator sees (output tokens per
//! second, sequences admitted at once, KV bytes), the last two read from the server's `/metrics`.

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::time::Instant as Deadline;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Clients, each sending its next request when the last one ends.
    pub clients: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub duration: Duration,
    /// Token ids the prompts are cut from, a different slice per request.
    pub text: Arc<Vec<u32>>,
    /// Also send, one at a time, prompts of this many tokens asking for one token, timing their
    /// first token: the latency a newcomer sees while the clients decode.
    pub probe_prompt_tokens: Option<usize>,
}

/// 50th and 99th percentiles, milliseconds, over `samples` values.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            samples: ms.len(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub seconds: f64,
    pub requests_completed: usize,
    /// Requests answered with an error (503s included).
    pub requests_failed: usize,
    /// Output tokens per second over all sequences (the server's count).
    pub output_tokens_per_s: f64,
    /// The same from the last client request's first token to the end, when that is at least
    /// [`STEADY_MIN`]: every admitted sequence decoding, no prompt being prefilled (a run's
    /// start is an admission burst; with long requests it can be most of the run).
    pub steady_output_tokens_per_s: Option<f64>,
    pub time_to_first_token: Percentiles,
    pub inter_token_latency: Percentiles,
    /// The probe's time to first token (see [`LoadOptions::probe_prompt_tokens`]).
    pub probe_time_to_first_token: Option<Percentiles>,
    pub peak_sequences: f64,
    pub peak_kv_bytes: f64,
}

/// The shortest window [`LoadReport::steady_output_tokens_per_s`] is measured over.
pub const STEADY_MIN: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Timings {
    completed: usize,
    failed: usize,
    first_token_ms: Vec<f64>,
    /// When each first token arrived.
    first_token_at: Vec<Instant>,
    between_tokens_ms: Vec<f64>,
}

/// Output tokens per second between the first of `samples` (when, the server's count) at or
/// after `from` and the last one, if they are at least [`STEADY_MIN`] apart.
fn rate_after(samples: &[(Instant, f64)], from: Instant) -> Option<f64> {
    let first = samples.iter().find(|(t, _)| *t >= from)?;
    let last = samples.last()?;
    let seconds = (last.0 - first.0).as_secs_f64();
    (seconds >= STEADY_MIN.as_secs_f64()).then(|| (last.1 - first.1) / seconds)
}

/// Runs `options` against the server at `url` (e.g. `http://127.0.0.1:8080`).
pub async fn run(url: &str, options: &LoadOptions) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        options.text.len()
            > options
                .prompt_tokens
                .max(options.probe_prompt_tokens.unwrap_or(0)),
        "the prompt text has {} tokens, too few to cut prompts from",
        options.text.len()
    );
    let client = reqwest::Client::new();
    let generated_before = metric(&client, url, "rvq_kv_generated_tokens_total").await?;
    let start = Instant::now();
    let deadline = Deadline::now() + options.duration;
    let mut tasks = Vec::new();
    for c in 0..options.clients {
        let (client, url, options) = (client.clone(), url.to_string(), options.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Timings::default();
            let mut i = 0;
            while Deadline::now() < deadline {
                let prompt = slice(&options.text, options.prompt_tokens, c * 7919 + i * 104_729);
                request(&client, &url, prompt, options.max_tokens, deadline, &mut t).await;
                i += 1;
            }
            t
        }));
    }
    let probe = options.probe_prompt_tokens.map(|tokens| {
        let (client, url, text) = (client.clone(), url.to_string(), options.text.clone());
        tokio::spawn(async move {
            let mut t = Timings::default();
            let mut i = 0;
            while Deadline::now() < deadline {
                let prompt = slice(&text, tokens, 31 + i * 65_537);
                request(&client, &url, prompt, 1, deadline, &mut t).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                i += 1;
            }
            t
        })
    });
    let watcher = {
        let (client, url) = (client.clone(), url.to_string());
        tokio::spawn(async move {
            let (mut peak, mut generated): (f64, Vec<(Instant, f64)>) = (0.0, vec![]);
            while Deadline::now() < deadline {
                // One read of /metrics for both.
                if let Ok(text) = metrics_text(&client, &url).await {
                    if let Ok(b) = metric_in(&text, &url, "rvq_kv_cache_bytes_in_use") {
                        peak = peak.max(b);
                    }
                    if let Ok(g) = metric_in(&text, &url, "rvq_kv_generated_tokens_total") {
                        generated.push((Instant::now(), g));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, generated)
        })
    };
    let mut all = Timings::default();
    for task in tasks {
        let t = task.await?;
        all.completed += t.completed;
        all.failed += t.failed;
        all.first_token_ms.extend(t.first_token_ms);
        all.first_token_at.extend(t.first_token_at);
        all.between_tokens_ms.extend(t.between_tokens_ms);
    }
    let probe = match probe {
        Some(p) => {
            let t = p.await?;
            all.failed += t.failed;
            Some(Percentiles::of(t.first_token_ms))
        }
        None => None,
    };
    let seconds = start.elapsed().as_secs_f64();
    let generated = metric(&client, url, "rvq_kv_generated_tokens_total").await? - generated_before;
    let (peak_kv_bytes, samples) = watcher.await?;
    let last_first_token = all.first_token_at.iter().max().copied();
    Ok(LoadReport {
        clients: options.clients,
        prompt_tokens: options.prompt_tokens,
        max_tokens: options.max_tokens,
        seconds,
        requests_completed: all.completed,
        requests_failed: all.failed,
        output_tokens_per_s: generated / seconds,
        steady_output_tokens_per_s: last_first_token.and_then(|t| rate_after(&samples, t)),
        time_to_first_token: Percentiles::of(all.first_token_ms),
        inter_token_latency: Percentiles::of(all.between_tokens_ms),
        probe_time_to_first_token: probe,
        peak_sequences: metric(&client, url, "rvq_kv_sequences_active_peak").await?,
        peak_kv_bytes,
    })
}

/// `len` tokens of `text` from a position `seed` picks.
fn slice(text: &[u32], len: usize, seed: usize) -> Vec<u32> {
    let start = seed % (text.len() - len);
    text[start..start + len].to_vec()
}

/// One streaming request; its timings go to `t`. Cut off (not counted) at the deadline.
async fn request(
    client: &reqwest::Client,
    url: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
    deadline: Deadline,
    t: &mut Timings,
) {
    let body = json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
    });
    let sent = Instant::now();
    // Latencies are kept as they come, so a request the deadline cuts off still counts them.
    let work = async {
        let response = client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|_| ())?;
        if !response.status().is_success() {
            return Err(());
        }
        let mut last: Option<Instant> = None;
        let mut stream = response.bytes_stream();
        let mut buffer = Vec::new();
        while let Some(chunk) = stream.next().await {
            buffer.extend_from_slice(&chunk.map_err(|_| ())?);
            // Each event is one piece of text (or the end).
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buffer.drain(..end + 2).collect();
                if !event.starts_with(b"data: ") {
                    continue; // a keep-alive comment
                }
                if event.starts_with(b"data: [DONE]") {
                    return Ok(());
                }
                if event.windows(7).any(|w| w == b"\"error\"") {
                    return Err(());
                }
                let now = Instant::now();
                match last {
                    None => {
                        t.first_token_ms.push((now - sent).as_secs_f64() * 1e3);
                        t.first_token_at.push(now);
                    }
                    Some(l) => t.between_tokens_ms.push((now - l).as_secs_f64() * 1e3),
                }
                last = Some(now);
            }
        }
        Err(())
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(Ok(())) => t.completed += 1,
        Ok(Err(())) => t.failed += 1,
        Err(_) => {} // the run ended first: neither done nor failed
    }
}

/// The value of one metric on the server's `/metrics`.
pub async fn metric(client: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<f64> {
    metric_in(&metrics_text(client, url).await?, url, name)
}

/// The server's `/metrics` page.
async fn metrics_text(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// The value of metric `name` on a `/metrics` page read from `url`.
fn metric_in(text: &str, url: &str, name: &str) -> anyhow::Result<f64> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| anyhow::anyhow!("{url}/metrics has no {name}"))?;
    Ok(value.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_rate_starts_at_the_first_sample_after_the_last_admission() {
        let t0 = Instant::now();
        let at = |ms: u64, tokens: f64| (t0 + Duration::from_millis(ms), tokens);
        // 10 tokens/s while prompts are prefilled, then 100 tokens/s.
        let samples = [
            at(0, 0.0),
            at(1000, 10.0),
            at(2000, 20.0),
            at(4000, 220.0),
            at(5000, 320.0),
        ];
        let rate = rate_after(&samples, t0 + Duration::from_millis(1500)).unwrap();
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
        // Under STEADY_MIN of samples after it: no rate.
        assert_eq!(rate_after(&samples, t0 + Duration::from_millis(3500)), None);
        assert_eq!(rate_after(&samples, t0 + Duration::from_millis(6000)), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((p.p50_ms, p.p99_ms, p.samples), (50.0, 99.0, 100));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]).samples, 0);
    }
}
