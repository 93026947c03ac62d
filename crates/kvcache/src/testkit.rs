//! Codebook files for tests, benchmarks and fuzzing, one definition for the workspace.

use crate::codebooks::{CodebookMeta, Codebooks, LayerBooks, PartSettings};
use crate::ModelIdentity;
use rvq::{Grouping, Rvq};

/// Codebooks for `model` in the paper's layout (groups of `group_dim`, keys strided, values
/// contiguous, scaled per vector), every layer's keys and then values coded by the next
/// quantizer `quantizer` makes.
pub fn codebooks_for(
    model: ModelIdentity,
    group_dim: usize,
    mut quantizer: impl FnMut() -> Rvq,
) -> Codebooks {
    let part = |grouping| {
        Some(PartSettings {
            group_dim,
            grouping,
            scaled: true,
            rotation: None,
            weighted: false,
        })
    };
    let layers = (0..model.layers)
        .map(|_| LayerBooks {
            keys: Some(quantizer().into()),
            values: Some(quantizer().into()),
            weights: [None, None],
        })
        .collect();
    Codebooks {
        meta: CodebookMeta {
            reports: vec![(None, None); model.layers],
            model,
            keys: part(Grouping::Strided),
            values: part(Grouping::Contiguous),
            skipped_layers: vec![],
            calibration: serde_json::Value::Null,
        },
        layers,
    }
}
