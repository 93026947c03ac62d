//! Passkey retrieval (Mohtashami & Jaggi, 2023): a five-digit number hidden at a chosen depth of
//! repeated filler sentences, then asked for. Perplexity at ctx 512 never asks for a key from
//! thousands of tokens back; this does, so a cache that blurs old keys shows here first.

use crate::generate::{generate, Sampling};
use anyhow::{bail, Result};
use llm::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it \
                     and memorize it. I will quiz you about the important information there.\n\n";
/// One unit of filler; the haystack is whole units, so no sentence is cut.
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// Tokens generated for the answer: the key and a little after it.
pub const ANSWER_TOKENS: usize = 8;

fn needle(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key. ")
}

#[derive(Clone, Debug)]
pub struct NeedleConfig {
    /// Prompt lengths in tokens (each at most the model's context less [`ANSWER_TOKENS`]).
    pub lengths: Vec<usize>,
    /// Where the needle sits, as a fraction of the haystack before it: 0 = first, 1 = last.
    pub depths: Vec<f64>,
    /// Keys tried per length and depth.
    pub trials: usize,
    pub seed: u64,
}

/// One haystack: its tokens, the key hidden in it, and where.
pub struct Haystack {
    pub tokens: Vec<u32>,
    pub key: u32,
    /// Token index where the needle starts.
    pub needle_at: usize,
}

/// The prompt of `length` tokens with `key` after `depth` of the filler.
pub fn haystack(model: &Model, length: usize, depth: f64, key: u32) -> Result<Haystack> {
    if !(0.0..=1.0).contains(&depth) {
        bail!("depth {depth} must be in [0, 1]");
    }
    let tok = &model.tokenizer;
    let intro = tok.encode(INTRO, tok.add_bos)?;
    let unit = tok.encode(FILLER, false)?;
    let needle = tok.encode(&needle(key), false)?;
    let question = tok.encode(QUESTION, false)?;
    let fixed = intro.len() + needle.len() + question.len();
    if length < fixed + unit.len() {
        bail!(
            "a {length}-token haystack holds no filler: the intro, needle and question take {fixed} tokens"
        );
    }
    let units = (length - fixed) / unit.len();
    let before = (depth * units as f64).round() as usize;
    let mut tokens = intro;
    for _ in 0..before {
        tokens.extend_from_slice(&unit);
    }
    let needle_at = tokens.len();
    tokens.extend_from_slice(&needle);
    for _ in before..units {
        tokens.extend_from_slice(&unit);
    }
    tokens.extend_from_slice(&question);
    Ok(Haystack {
        tokens,
        key,
        needle_at,
    })
}

/// The first number in `answer`, if it is `key`.
pub fn answered(answer: &str, key: u32) -> bool {
    let digits: String = answer
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits == key.to_string()
}

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Prompt tokens (the asked length, or the model's context less the answer).
    pub length: usize,
    pub depth: f64,
    pub correct: usize,
    pub trials: usize,
    /// What the model answered in each trial.
    pub answers: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NeedleReport {
    pub cache: String,
    pub cells: Vec<Cell>,
    /// Correct answers over all cells.
    pub accuracy: f64,
    pub seconds: f64,
}

impl NeedleReport {
    /// Accuracy over the cells of one prompt length.
    pub fn at_length(&self, length: usize) -> f64 {
        let cells = self.cells.iter().filter(|c| c.length == length);
        let (right, all) = cells.fold((0, 0), |(r, a), c| (r + c.correct, a + c.trials));
        right as f64 / all.max(1) as f64
    }
}

impl NeedleConfig {
    pub fn validate(&self, model: &Model) -> Result<()> {
        if self.lengths.is_empty() || self.depths.is_empty() || self.trials == 0 {
            bail!("needle: give at least one length, one depth and one trial");
        }
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            bail!("--depths {d}: a depth is a fraction of the haystack, in [0, 1]");
        }
        let most = model.context_len().saturating_sub(ANSWER_TOKENS);
        if let Some(l) = self.lengths.iter().find(|&&l| l > model.context_len()) {
            bail!(
                "--lengths {l}: longer than the model's context ({}; the longest prompt is {most} tokens, with the answer)",
                model.context_len()
            );
        }
        Ok(())
    }

    /// The keys of every (length, depth, trial), the same for every cache.
    fn keys(&self) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let n = self.lengths.len() * self.depths.len() * self.trials;
        (0..n).map(|_| rng.random_range(10_000..100_000)).collect()
    }
}

/// Hides and asks for a key at every length, depth and trial with the cache `spec`; greedy.
pub fn run(model: &Model, spec: &str, cfg: &NeedleConfig, quiet: bool) -> Result<NeedleReport> {
    cfg.validate(model)?;
    let most = model.context_len() - ANSWER_TOKENS;
    let keys = cfg.keys();
    let steps = (cfg.lengths.len() * cfg.depths.len() * cfg.trials) as u64;
    let pb = crate::progress::bar(steps, "prompt", quiet);
    pb.set_message(spec.to_string());
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let t0 = Instant::now();
    let mut cells = Vec::new();
    let mut keys = keys.into_iter();
    for &asked in &cfg.lengths {
        let length = asked.min(most);
        for &depth in &cfg.depths {
            let mut cell = Cell {
                length,
                depth,
                correct: 0,
                trials: cfg.trials,
                answers: Vec::new(),
            };
            for key in keys.by_ref().take(cfg.trials) {
                let hay = haystack(model, length, depth, key)?;
                let g = generate(model, &hay.tokens, spec, ANSWER_TOKENS, &greedy, |_| {})?;
                cell.correct += answered(&g.text, key) as usize;
                cell.answers.push(g.text);
                pb.inc(1);
            }
            cells.push(cell);
        }
    }
    pb.finish_and_clear();
    let correct: usize = cells.iter().map(|c| c.correct).sum();
    Ok(NeedleReport {
        cache: spec.to_string(),
        accuracy: correct as f64 / steps as f64,
        cells,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_the_first_number() {
        assert!(answered(" 71432. Remember", 71432));
        assert!(answered("71432", 71432));
        assert!(!answered(" 7143. Remember", 71432));
        assert!(!answered(" 714321", 71432));
        assert!(!answered(" 12 then 71432", 71432));
        assert!(!answered(" nothing", 71432));
    }
}
