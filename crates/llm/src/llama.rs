//! The llama architecture (SmolLM2, Llama 2/3, …): RMSNorm, SwiGLU, RoPE on interleaved pairs
//! (llama.cpp's converter permutes q/k weights for that layout), tied or separate output.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::transformer::{LayerWeights, ModelConfig, Transformer};
use kvcache::{Rope, RopeLayout};

pub fn load(g: &mut GgufFile) -> Result<Transformer> {
    let (config, rope) = read(g)?;
    Transformer::load(g, config, LayerWeights::default(), rope.into())
}

/// The shapes and the RoPE table of a llama GGUF (what training builds its graph from, too).
pub fn read(g: &GgufFile) -> Result<(ModelConfig, Rope)> {
    let config = ModelConfig::read_common(g, "llama")?;
    let base = ModelConfig::rope_base(g, "llama", 10_000.0)?;
    let rope = Rope::new(
        config.head_dim,
        base,
        config.context_len,
        RopeLayout::Interleaved,
    );
    Ok((config, rope))
}
