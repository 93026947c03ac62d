//! `Model::extend_context` (behind `rvq-kv bench --beyond-context`) on a tiny llama GGUF this
//! test writes itself: positions past the trained context are refused, then accepted after the
//! extension, with RoPE tables that continue the trained ones exactly.

use llm::tiny::TinySpec;
use llm::Model;

#[test]
fn positions_past_the_context_work_only_after_extending_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    llm::tiny::write(&TinySpec::new("llama"), &path).unwrap();
    let mut m = Model::load(&path).unwrap();
    let trained = m.context_len();
    let tokens: Vec<u32> = (0..trained as u32 + 8)
        .map(|i| (i * 37 + 5) % 256)
        .collect();
    let mut cache = m.new_cache("f16").unwrap();
    let err = m.forward(&tokens, 0, cache.as_mut(), Some(1)).unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");

    let before = m.cache_config(false).unwrap().rope;
    m.extend_context(trained + 8);
    assert_eq!(m.context_len(), trained + 8);
    let after = m.cache_config(false).unwrap().rope;
    // The extended table is the trained one, continued.
    let (old, new) = (before.layer(0), after.layer(0));
    assert_eq!(new.max_positions(), trained + 8);
    for pos in [0, 1, trained - 1] {
        assert_eq!(old.angles(pos), new.angles(pos));
    }
    let mut cache = m.new_cache("f16").unwrap();
    let logits = m.forward(&tokens, 0, cache.as_mut(), Some(1)).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    // Extending to less than the context changes nothing.
    m.extend_context(4);
    assert_eq!(m.context_len(), trained + 8);
}
