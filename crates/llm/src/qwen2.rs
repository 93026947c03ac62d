//! The qwen2 architecture: llama's block with biases on the q/k/v projections and RoPE on
//! half-split pairs (GPT-NeoX layout, as llama.cpp's `LLM_ARCH_QWEN2`).

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::transformer::{LayerWeights, ModelConfig, Transformer};
use kvcache::{Rope, RopeLayout};

pub fn load(g: &mut GgufFile) -> Result<Transformer> {
    let config = ModelConfig::read_common(g, "qwen2")?;
    let base = ModelConfig::rope_base(g, "qwen2", 10_000.0)?;
    let rope = Rope::new(
        config.head_dim,
        base,
        config.context_len,
        RopeLayout::HalfSplit,
    );
    let weights = LayerWeights {
        qkv_bias: true,
        ..LayerWeights::default()
    };
    Transformer::load(g, config, weights, rope.into())
}
