//! `synth` GGUFs: they load with the shapes of their preset, in the block type asked, and run,
//! native weights against the f32 reference, at head_dim 64 and 128 with every dense and scalar
//! cache.

use llm::gguf::WeightsMode;
use llm::synth::{self, Arch, Preset};
use llm::tiny::TinySpec;
use llm::Model;

fn synth_model(arch: Arch, preset: &str, ty: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer.gguf");
    llm::tiny::write(&TinySpec::new("llama"), &tokenizer).unwrap();
    let out = dir.path().join(format!("synth-{preset}-{ty}.gguf"));
    let p = Preset::by_name(arch, preset).unwrap();
    synth::write(&p, ty, &tokenizer, &out, 1, |_, _| {}).unwrap();
    (dir, out)
}

#[test]
fn presets_have_the_published_parameter_counts() {
    // Llama 3.1 8B: 8,030,261,248 parameters, of which 65 norm vectors (266,240) are not
    // weight matrices or embeddings.
    assert_eq!(
        Preset::by_name(Arch::Llama, "8b").unwrap().parameters(),
        8_029_995_008
    );
    // Qwen2.5 0.5B: 494,032,768 with its q/k/v biases and norms.
    let q = Preset::by_name(Arch::Qwen2, "0.5b").unwrap();
    let (q_dim, kv_dim) = (q.heads * q.head_dim, q.kv_heads * q.head_dim);
    let biases = q.layers * (q_dim + 2 * kv_dim);
    let norms = (2 * q.layers + 1) * q.hidden;
    assert_eq!(q.parameters() + biases + norms, 494_032_768);
    assert!(Preset::by_name(Arch::Llama, "70b").is_err());
    assert!(Preset::by_name(Arch::Llama, "0.5b").is_err());
    assert!(Arch::by_name("mistral").is_err());
    assert!(synth::weight_type("q3_k").is_err());
}

#[test]
fn synthesised_models_load_in_the_asked_type_and_match_the_f32_reference() {
    for (arch, preset, ty) in [
        (Arch::Llama, "tiny", "q4_k"),
        (Arch::Llama, "tiny", "q4_0"),
        (Arch::Llama, "tiny128", "q8_0"),
        (Arch::Llama, "tiny128", "q6_k"),
        (Arch::Qwen2, "tiny", "q4_k"),
    ] {
        let (_dir, path) = synth_model(arch, preset, ty);
        let p = Preset::by_name(arch, preset).unwrap();
        let native = Model::load(&path).unwrap();
        let c = native.config();
        assert_eq!(
            (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab),
            (p.layers, p.hidden, p.heads, p.kv_heads, p.head_dim, p.ffn, p.vocab)
        );
        assert_eq!(native.architecture, arch.name());
        assert!(native.dequantized.is_empty());
        let (wt, _) = synth::weight_type(ty).unwrap();
        // qwen2's tiny preset has 6 heads × 64: its output projections' 384 columns are not
        // whole 256-weight blocks, and go to Q5_0 as llama.cpp's quantizer does.
        let fallback = if arch == Arch::Qwen2 {
            p.layers * p.hidden * p.heads * p.head_dim
        } else {
            0
        };
        let expected = wt.bytes_for(p.parameters() - fallback).unwrap()
            + quant::WeightType::Q5_0.bytes_for(fallback).unwrap();
        assert_eq!(native.net.weight_bytes(), expected, "{preset} {ty}");
        let reference = Model::load_with(&path, None, WeightsMode::F32).unwrap();
        let tokens = [5u32, 17, 300, 41, 7];
        let run = |m: &Model| {
            let mut cache = m.new_cache("f32").unwrap();
            m.forward(&tokens, 0, cache.as_mut(), Some(1)).unwrap()
        };
        let (a, b) = (run(&native), run(&reference));
        assert!(
            a.iter().all(|v| v.is_finite()),
            "{preset} {ty}: non-finite logits"
        );
        // The same weights; only the activations' 8-bit rounding differs.
        let span =
            b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            span > 0.0 && d <= 0.05 * span,
            "{preset} {ty}: max |Δ| {d} of span {span}"
        );
    }
}

#[test]
fn head_dim_128_runs_through_every_dense_and_scalar_cache() {
    let (_dir, path) = synth_model(Arch::Llama, "tiny128", "q4_k");
    let m = Model::load(&path).unwrap();
    assert_eq!(m.config().head_dim, 128);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 1000).collect();
    let logits = |spec: &str| {
        let mut cache = m.new_cache(spec).unwrap();
        let mut out = m
            .forward(&tokens[..32], 0, cache.as_mut(), Some(1))
            .unwrap();
        for (i, &t) in tokens.iter().enumerate().skip(32) {
            out = m.forward(&[t], i, cache.as_mut(), Some(1)).unwrap();
        }
        out
    };
    let reference = logits("f32");
    let span = reference.iter().cloned().fold(f32::MIN, f32::max)
        - reference.iter().cloned().fold(f32::MAX, f32::min);
    for spec in [
        "f16", "q8_0", "q8_0,rot", "q4_0", "q4_0,rot", "int8", "fp8", "kivi4", "kivi2",
    ] {
        let l = logits(spec);
        assert!(l.iter().all(|v| v.is_finite()), "{spec}");
        let d = l
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // A compressed cache moves the logits, never by a sizeable part of their span.
        assert!(d <= 0.25 * span, "{spec}: max |Δ| {d} of span {span}");
    }
}
