//! Text generation with any cache: greedy or seeded temperature / top-p sampling.

use anyhow::{bail, Result};
use llm::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub cache: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub text: String,
    /// Stopped at EOS or an end-of-turn token.
    pub stopped_at_eos: bool,
    /// Why generation ended: `eos` (an end-of-sequence or end-of-turn token), `length`
    /// (the requested tokens), or `context` (the model's context was full first).
    pub finish_reason: &'static str,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub cache_bytes: u64,
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / s.temperature).exp()))
        .collect();
    let z: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // Smallest prefix whose mass reaches top_p.
    let mut mass = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        mass += p.1;
        if mass >= s.top_p {
            keep = i + 1;
            break;
        }
    }
    let probs = &probs[..keep];
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * total;
    for p in probs {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    probs[probs.len() - 1].0
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_text` with each decoded piece.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    spec: &str,
    max_new: usize,
    sampling: &Sampling,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if !(sampling.top_p > 0.0 && sampling.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1]", sampling.top_p);
    }
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        bail!(
            "--temperature {} must be finite and >= 0",
            sampling.temperature
        );
    }
    let limit = model.context_len();
    if prompt.len() >= limit {
        bail!(
            "the prompt has {} tokens; the model's context is {limit}",
            prompt.len()
        );
    }
    let room = limit - prompt.len();
    let max_new = max_new.min(room);
    let mut cache = model.new_cache(spec)?;
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut stream = llm::tokenizer::TokenStream::new();
    let t0 = Instant::now();
    let mut logits = model.forward(prompt, 0, cache.as_mut(), Some(1))?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut text = String::new();
    let mut generated = 0;
    let mut stopped = false;
    let mut pos = prompt.len();
    while generated < max_new {
        if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
            bail!(
                "the model's logits hold {bad} at position {}: its weights or the cache are corrupt",
                pos - 1
            );
        }
        let next = sample(&logits, sampling, &mut rng);
        generated += 1;
        if model.tokenizer.stop_tokens.contains(&next) {
            stopped = true;
            break;
        }
        let piece = stream.push(&model.tokenizer, next)?;
        on_text(&piece);
        text.push_str(&piece);
        if generated == max_new {
            break;
        }
        logits = model.forward(&[next], pos, cache.as_mut(), Some(1))?;
        pos += 1;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Generation {
        cache: spec.to_string(),
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        text,
        stopped_at_eos: stopped,
        finish_reason: if stopped {
            "eos"
        } else if generated == room {
            "context"
        } else {
            "length"
        },
        prefill_tokens_per_s: prompt.len() as f64 / prefill_s,
        decode_tokens_per_s: generated as f64 / decode_s.max(1e-9),
        cache_bytes: cache.memory().bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_p_tiny_is_greedy() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = StdRng::seed_from_u64(1);
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 0,
        };
        for _ in 0..20 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.75 / 0.25 at temperature 1.
        let logits = [3f32.ln(), 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
        };
        let mut rng = StdRng::seed_from_u64(42);
        let n = 20_000;
        let zeros = (0..n)
            .filter(|_| sample(&logits, &s, &mut rng) == 0)
            .count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }
}
