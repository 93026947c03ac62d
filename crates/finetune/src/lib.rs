//! Light finetuning of a GGUF model with the RVQ KV quantizer in the loop, as the paper does:
//! the model's weights (all, the attention projections, or only k/v) train with AdamW on
//! calibration text while every layer's pre-RoPE keys and values pass through the quantizer
//! with a straight-through estimator; the loss is next-token cross-entropy plus 0.25 × the
//! commitment loss; codebooks keep learning by EMA. The output is the changed weights (a
//! [`llm::delta::WeightsDelta`]) and the updated codebooks.

pub mod adamw;
pub mod net;
pub mod ste;
pub mod trainer;

pub use net::Trainable;
pub use trainer::{FinetuneConfig, StepReport, Trainer};
