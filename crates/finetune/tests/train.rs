//! Finetuning on a tiny random llama (written by `llm::tiny`): the training graph against the
//! inference forward pass, one step lowering the loss, resume reproducing the next step, and
//! the outputs loading back as a weights delta.

use finetune::{FinetuneConfig, Trainable, Trainer};
use kvcache::codebooks::Codebooks;
use llm::tiny::TinySpec;
use llm::Model;
use rvq::rng::SplitMix64;
use rvq::testkit::random_rvq;

struct Setup {
    _dir: tempfile::TempDir,
    model: Model,
    books: Codebooks,
    books_path: std::path::PathBuf,
    tokens: Vec<u32>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    llm::tiny::write(&TinySpec::new("llama"), &path).unwrap();
    let model = Model::load(&path).unwrap();
    // 3 stages × 16 codewords over groups of 8 (head_dim 16: 2 groups).
    let mut rng = SplitMix64::new(5);
    let books = kvcache::testkit::codebooks_for(model.identity().unwrap(), 8, || {
        random_rvq(&mut rng, 8, 16, 3)
    });
    let books_path = dir.path().join("books.safetensors");
    books.save(&books_path).unwrap();
    // Text the tiny vocabulary covers: bytes of a repeated English sentence.
    let text = "the cat sat on the mat and the dog sat on the log. ".repeat(20);
    let tokens = model.tokenizer.encode(&text, false).unwrap();
    Setup {
        _dir: dir,
        model,
        books,
        books_path,
        tokens,
    }
}

fn config(trainable: Trainable) -> FinetuneConfig {
    FinetuneConfig {
        steps: 10,
        seq_len: 48,
        accum: 2,
        lr: 3e-3,
        warmup: 1,
        ..FinetuneConfig::paper(trainable)
    }
}

fn trainer(s: &Setup, c: FinetuneConfig) -> Trainer {
    Trainer::new(
        &s.model.path,
        s.model.file_sha256().unwrap(),
        s.books.clone(),
        s.tokens.clone(),
        c,
    )
    .unwrap()
}

/// Mean next-token cross-entropy from the inference forward pass through a cache `spec`.
fn inference_loss(model: &Model, tokens: &[u32], spec: &str) -> f64 {
    let mut cache = model.new_cache(spec).unwrap();
    let logits = model.forward(tokens, 0, cache.as_mut(), None).unwrap();
    let vocab = model.vocab();
    let n = tokens.len() - 1;
    (0..n)
        .map(|i| -llm::ops::log_prob(&logits[i * vocab..(i + 1) * vocab], tokens[i + 1] as usize))
        .sum::<f64>()
        / n as f64
}

/// The training graph (candle autograd) computes the loss the inference path computes with
/// the RVQ cache: same quantized keys and values, same attention, same logits.
#[test]
fn training_graph_matches_inference_with_the_rvq_cache() {
    let s = setup();
    let mut t = trainer(&s, config(Trainable::All));
    let seq = &s.tokens[..48];
    let (ce, commitment) = t.evaluate(seq).unwrap();
    // books=f32: the codebooks as the graph holds them (i8 books may break near ties otherwise).
    let spec = format!("rvq:{},books=f32", s.books_path.display());
    let want = inference_loss(&s.model, seq, &spec);
    // Measured 1e-7 apart (f32 sums in two orders).
    assert!(
        (ce - want).abs() < 1e-4 * want,
        "training {ce} vs inference {want}"
    );
    assert!(commitment > 0.0);
    // And the quantizer matters: the f32 cache gives another loss.
    let exact = inference_loss(&s.model, seq, "f32");
    assert!((exact - want).abs() > 1e-3, "{exact} vs {want}");
}

#[test]
fn one_step_lowers_the_loss_on_its_batch() {
    let s = setup();
    for trainable in [Trainable::All, Trainable::KeyValue] {
        let mut t = trainer(
            &s,
            FinetuneConfig {
                accum: 1,
                update_codebooks: false,
                ..config(trainable)
            },
        );
        let seq = &s.tokens[..48]; // the first step's sequence
        let (before, _) = t.evaluate(seq).unwrap();
        let report = t.train_step().unwrap();
        assert!((report.loss - before).abs() < 1e-6);
        let (after, _) = t.evaluate(seq).unwrap();
        assert!(after < before, "{trainable:?}: {before} → {after}");
    }
}

#[test]
fn resume_takes_the_same_next_step() {
    let s = setup();
    let sha = s.model.file_sha256().unwrap();
    let mut straight = trainer(&s, config(Trainable::Attention));
    straight.train_step().unwrap();
    straight.train_step().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(&s, config(Trainable::Attention));
    first.train_step().unwrap();
    first.save_checkpoint(dir.path()).unwrap();
    drop(first);
    let mut resumed =
        Trainer::resume(&s.model.path, sha, s.tokens.clone(), dir.path(), None).unwrap();
    assert_eq!(resumed.step, 1);
    resumed.train_step().unwrap();

    let (a, b) = (straight.delta().unwrap(), resumed.delta().unwrap());
    assert_eq!(a.tensors.len(), 4 * 2); // q, k, v, o of 2 layers
    for (name, ta) in &a.tensors {
        let va = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = b.tensors[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(va, vb, "{name}");
    }
    let (ca, cb) = (straight.codebooks(), resumed.codebooks());
    for (la, lb) in ca.layers.iter().zip(&cb.layers) {
        assert_eq!(
            la.keys.as_ref().unwrap().codebook(2),
            lb.keys.as_ref().unwrap().codebook(2)
        );
    }
}

/// The outputs load back: the delta into the model (changed weights, same file check), the
/// codebooks into an RVQ cache; and the finetuned model scores its training text better.
#[test]
fn outputs_load_as_weights_delta_and_codebooks() {
    let s = setup();
    let mut t = trainer(&s, config(Trainable::All));
    let spec = format!("rvq:{}", s.books_path.display());
    let seq = &s.tokens[..48];
    let before = inference_loss(&s.model, seq, &spec);
    for _ in 0..5 {
        t.train_step().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let delta_path = dir.path().join("delta.safetensors");
    let books_path = dir.path().join("books.safetensors");
    t.delta().unwrap().save(&delta_path).unwrap();
    t.codebooks().save(&books_path).unwrap();

    let delta = llm::delta::WeightsDelta::load(&delta_path).unwrap();
    let tuned = Model::load_with_delta(&s.model.path, Some(&delta)).unwrap();
    let after = inference_loss(&tuned, seq, &format!("rvq:{}", books_path.display()));
    assert!(after < before, "{before} → {after}");

    // A delta refuses another model file.
    let other = dir.path().join("other.gguf");
    let spec2 = TinySpec {
        seed: 9,
        ..TinySpec::new("llama")
    };
    llm::tiny::write(&spec2, &other).unwrap();
    let e = Model::load_with_delta(&other, Some(&delta))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("was trained from the model file"), "{e}");
    // A corrupted delta is refused with its path named.
    let bytes = std::fs::read(&delta_path).unwrap();
    std::fs::write(&delta_path, &bytes[..bytes.len() / 2]).unwrap();
    let e = llm::delta::WeightsDelta::load(&delta_path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("delta.safetensors"), "{e}");
}

/// Codebooks with channel weights (`calibrate --query-aware`) would be trained through
/// unweighted quantizers: refused with the way out named.
#[test]
fn weighted_codebooks_are_refused() {
    let s = setup();
    let mut books = s.books.clone();
    let (heads, hd) = (books.meta.model.kv_heads, books.meta.model.head_dim);
    books.meta.keys.as_mut().unwrap().weighted = true;
    for layer in &mut books.layers {
        layer.weights[0] = Some(vec![1.0; heads * hd].into());
    }
    let sha = s.model.file_sha256().unwrap();
    let e = Trainer::new(
        &s.model.path,
        sha,
        books,
        s.tokens.clone(),
        config(Trainable::All),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("calibrate without --query-aware"), "{e}");
}
