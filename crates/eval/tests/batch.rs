//! Continuous batching: sequences stepped together get the logits each gets alone.

mod common;

use kvcache::KvCache;
use llm::Sequence;

/// Three prompts of different lengths from the evaluation text.
fn prompts() -> Vec<Vec<u32>> {
    let tokens = common::eval_tokens();
    vec![
        tokens[..9].to_vec(),
        tokens[100..131].to_vec(),
        tokens[500..517].to_vec(),
    ]
}

#[test]
fn a_batch_of_decode_steps_gives_each_sequence_its_own_logits_to_the_bit() {
    let model = common::model();
    for spec in ["f16", "q4_0,rot"] {
        let prompts = prompts();
        // Alone: prefill, then three greedy decode steps fed with fixed tokens.
        let steps = [[17u32, 4, 900], [5, 77, 1234], [3000, 12, 8]];
        let mut alone = Vec::new();
        for (p, fed) in prompts.iter().zip(&steps) {
            let mut cache = model.new_cache(spec).unwrap();
            model.forward(p, 0, cache.as_mut(), Some(1)).unwrap();
            let mut logits = Vec::new();
            for (i, &t) in fed.iter().enumerate() {
                logits.push(
                    model
                        .forward(&[t], p.len() + i, cache.as_mut(), Some(1))
                        .unwrap(),
                );
            }
            alone.push(logits);
        }
        // Together: each prefilled alone, then the decode steps as one batch per step.
        let mut caches: Vec<Box<dyn KvCache>> = prompts
            .iter()
            .map(|p| {
                let mut c = model.new_cache(spec).unwrap();
                model.forward(p, 0, c.as_mut(), Some(1)).unwrap();
                c
            })
            .collect();
        for i in 0..3 {
            let fed: Vec<[u32; 1]> = steps.iter().map(|s| [s[i]]).collect();
            let mut batch: Vec<Sequence> = caches
                .iter_mut()
                .zip(&prompts)
                .zip(&fed)
                .map(|((c, p), t)| Sequence {
                    tokens: t,
                    first_pos: p.len() + i,
                    cache: c.as_mut(),
                })
                .collect();
            let logits = model.forward_batch(&mut batch).unwrap();
            for (s, l) in logits.iter().enumerate() {
                assert!(*l == alone[s][i], "{spec}: sequence {s}, step {i}");
            }
        }
    }
}

#[test]
fn a_prefill_chunk_batched_beside_decode_steps_changes_nobody() {
    let model = common::model();
    let prompts = prompts();
    let (short, long) = (&prompts[0], &prompts[1]);
    // Alone: `short` prefilled, then one step; `long` prefilled in two chunks.
    let mut c = model.new_cache("f16").unwrap();
    model.forward(short, 0, c.as_mut(), Some(1)).unwrap();
    let short_step = model
        .forward(&[42], short.len(), c.as_mut(), Some(1))
        .unwrap();
    let mut c = model.new_cache("f16").unwrap();
    model.forward(&long[..10], 0, c.as_mut(), Some(1)).unwrap();
    let long_last = model.forward(&long[10..], 10, c.as_mut(), Some(1)).unwrap();
    // Together: the second chunk of `long` beside the decode step of `short`.
    let (mut a, mut b) = (
        model.new_cache("f16").unwrap(),
        model.new_cache("f16").unwrap(),
    );
    model.forward(short, 0, a.as_mut(), Some(1)).unwrap();
    model.forward(&long[..10], 0, b.as_mut(), Some(1)).unwrap();
    let logits = model
        .forward_batch(&mut [
            Sequence {
                tokens: &[42],
                first_pos: short.len(),
                cache: a.as_mut(),
            },
            Sequence {
                tokens: &long[10..],
                first_pos: 10,
                cache: b.as_mut(),
            },
        ])
        .unwrap();
    assert!(logits[0] == short_step);
    assert!(logits[1] == long_last);
    assert_eq!(a.len(0), short.len() + 1);
    assert_eq!(b.len(0), long.len());
}

#[test]
fn a_bad_sequence_fails_the_batch_before_any_cache_changes() {
    let model = common::model();
    let (mut a, mut b) = (
        model.new_cache("f16").unwrap(),
        model.new_cache("f16").unwrap(),
    );
    model.forward(&[1, 2, 3], 0, a.as_mut(), Some(1)).unwrap();
    let err = model
        .forward_batch(&mut [
            Sequence {
                tokens: &[4],
                first_pos: 3,
                cache: a.as_mut(),
            },
            Sequence {
                tokens: &[5],
                first_pos: 7, // b holds nothing
                cache: b.as_mut(),
            },
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("forward starts at 7"), "{err}");
    assert_eq!(a.len(0), 3);
}

#[test]
fn sequences_of_any_lengths_in_one_pass_give_the_rows_each_gives_alone() {
    let model = common::model();
    let prompts = prompts(); // 9 + 31 + 17 = 57 rows, below the dequantized-tile threshold
    let rows = [9usize, 5, 1];
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .zip(rows)
        .map(|(p, r)| {
            let mut cache = model.new_cache("f16").unwrap();
            model.forward(p, 0, cache.as_mut(), Some(r)).unwrap()
        })
        .collect();
    let mut caches: Vec<Box<dyn KvCache>> = prompts
        .iter()
        .map(|_| model.new_cache("f16").unwrap())
        .collect();
    let mut batch: Vec<Sequence> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| Sequence {
            tokens: p,
            first_pos: 0,
            cache: c.as_mut(),
        })
        .collect();
    let together = model.forward_many(&mut batch, &rows).unwrap();
    assert_eq!(together, alone);
    // Asking more rows than a sequence has, or a count per sequence missing, is an error.
    let e = model.forward_many(&mut batch, &[1, 99, 1]).unwrap_err();
    assert!(e.to_string().contains("99 logit rows"), "{e}");
    let e = model.forward_many(&mut batch, &[1]).unwrap_err();
    assert!(e.to_string().contains("1 logit row counts for 3"), "{e}");
}
