//! Measuring caches on a real model: assets, perplexity, generation, benchmarks, reports.

pub mod allocate;
pub mod assets;
pub mod bench;
pub mod calibrate;
pub mod codec_bench;
pub mod compare;
pub mod generate;
pub mod kld;
pub mod mc;
pub mod needle;
pub mod plot;
pub mod ppl;
pub mod progress;
pub mod report;
pub mod text;
