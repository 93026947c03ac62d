//! The gemma3 architecture, as llama.cpp's `LLM_ARCH_GEMMA3` runs it: embeddings scaled by
//! sqrt(hidden); RMSNorm of each query and key head before RoPE; RMSNorm of the attention and
//! feed-forward outputs before each residual add; GeGLU (tanh GELU); scores scaled by
//! 1/sqrt(head_dim); five sliding-window layers (RoPE base 10 000) for every global one (the
//! file's base, 1e6); RoPE on half-split pairs. The GGUF converter already adds Gemma's +1 to
//! the norm weights, so the norms are plain RMSNorm here.

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::transformer::{Activation, LayerWeights, ModelConfig, Transformer};
use kvcache::{LayerRopes, Rope, RopeLayout};

/// Every sixth layer attends globally; the others see a sliding window.
const SLIDING_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers (fixed by the architecture, not in the file).
const LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Gemma's chat format, for GGUF files that carry no `tokenizer.chat_template` (the 270M file
/// does not). BOS is left to the tokenizer.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<start_of_turn>\
{{ 'model' if message.role == 'assistant' else message.role }}\n{{ message.content | trim }}\
<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

pub fn is_sliding(layer: usize) -> bool {
    layer % SLIDING_PATTERN < SLIDING_PATTERN - 1
}

pub fn load(g: &mut GgufFile) -> Result<Transformer> {
    let mut config = ModelConfig::read_common(g, "gemma3")?;
    let global_base = ModelConfig::rope_base(g, "gemma3", 1_000_000.0)?;
    let window = g.usize("gemma3.attention.sliding_window")?;
    if window == 0 {
        return Err(LlmError::Metadata(
            "gemma3.attention.sliding_window is 0".into(),
        ));
    }
    config.embedding_scale = (config.hidden as f32).sqrt();
    config.activation = Activation::GeluTanh;
    config.windows = (0..config.layers)
        .map(|l| is_sliding(l).then_some(window))
        .collect();
    let (hd, positions) = (config.head_dim, config.context_len);
    let tables = vec![
        Rope::new(hd, LOCAL_ROPE_BASE, positions, RopeLayout::HalfSplit),
        Rope::new(hd, global_base, positions, RopeLayout::HalfSplit),
    ];
    let table_of_layer = (0..config.layers)
        .map(|l| if is_sliding(l) { 0 } else { 1 })
        .collect();
    let weights = LayerWeights {
        qk_norm: true,
        post_norms: true,
        ..LayerWeights::default()
    };
    Transformer::load(
        g,
        config,
        weights,
        LayerRopes::per_layer(tables, table_of_layer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_sliding_layers_per_global_one() {
        let global: Vec<usize> = (0..18).filter(|&l| !is_sliding(l)).collect();
        assert_eq!(global, vec![5, 11, 17]);
    }
}
