//! Generation: the KV cache against full recomputation, greedy decoding against PyTorch's
//! fixture, beam search against greedy and against exhaustive enumeration, and decoding errors.

mod common;

use common::{assert_close, Fixture, GreedyCase};
use ndarray::{array, s, Array1, Array2, Axis};
use ndtransformer::{
    BeamSearchOptions, Error, GreedyOptions, KeyPaddingMask, MaxLength, NormPosition, Transformer,
    TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

fn tiny(norm_position: NormPosition, vocab: usize) -> TransformerConfig {
    TransformerConfig {
        d_model: 16,
        num_heads: 4,
        d_ff: 32,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        max_len: 64,
        norm_position,
        ..TransformerConfig::base(vocab, vocab)
    }
}

/// Step logits with the cache equal `forward` on the whole prefix, at every step and position.
fn check_cache_against_full_recomputation(model: &Transformer, name: &str) {
    let mut rng = StdRng::seed_from_u64(5);
    let (batch, src_len, steps) = (3, 7, 9);
    let vocab = model.config().tgt_vocab as u32;
    let src = Array2::from_shape_simple_fn((batch, src_len), || {
        rng.random_range(1..model.config().src_vocab as u32)
    });
    let src_padding = KeyPaddingMask::from_lengths(&[7, 4, 1], src_len).unwrap();
    let tgt = Array2::from_shape_simple_fn((batch, steps), || rng.random_range(0..vocab));
    let memory = model.encode(src.view(), Some(&src_padding)).unwrap();
    let mut cache = model
        .start_decoding(memory.view(), Some(&src_padding))
        .unwrap();
    let full = model
        .forward(src.view(), tgt.view(), Some(&src_padding), None)
        .unwrap();
    let mut worst = 0.0f32;
    for t in 0..steps {
        let step = model.decode_step(tgt.column(t), &mut cache).unwrap();
        let prefix = model
            .forward(
                src.view(),
                tgt.slice(s![.., ..=t]),
                Some(&src_padding),
                None,
            )
            .unwrap();
        for expected in [prefix.index_axis(Axis(1), t), full.index_axis(Axis(1), t)] {
            let err = (&step - &expected)
                .iter()
                .fold(0.0f32, |m, d| m.max(d.abs()));
            worst = worst.max(err);
        }
    }
    assert_eq!(cache.len(), steps);
    println!("{name:>24} cached vs full recomputation: max abs err {worst:.2e}");
    assert!(worst <= 1e-5, "{name}: {worst:e}");
}

#[test]
fn cached_steps_equal_full_recomputation_post_and_pre_ln() {
    for norm in [NormPosition::Post, NormPosition::Pre] {
        let model = Transformer::new(tiny(norm, 23), &mut StdRng::seed_from_u64(1)).unwrap();
        check_cache_against_full_recomputation(&model, &format!("random {norm:?}-LN"));
    }
    for fx in Fixture::all_of_kind("transformer") {
        check_cache_against_full_recomputation(&fx.model(), &fx.name);
    }
}

#[test]
fn greedy_reproduces_pytorch_fixture_ids_and_step_logits() {
    for fx in Fixture::all_of_kind("greedy") {
        let model = fx.model();
        let case = fx.greedy_case();
        let steps = case.steps();
        let GreedyCase {
            src,
            src_padding,
            expected_ids,
            step_logits,
            bos,
            eos,
        } = case;

        let out = model
            .greedy_decode(
                src.view(),
                Some(&src_padding),
                &GreedyOptions {
                    bos_id: bos,
                    eos_id: eos,
                    max_len: steps,
                },
            )
            .unwrap();
        for (row, tokens) in out.iter().enumerate() {
            assert_eq!(
                tokens.as_slice(),
                expected_ids.slice(s![row, 1..]).as_slice().unwrap(),
                "{} row {row}",
                fx.name
            );
        }

        // The same steps by hand, to compare every step's logits.
        let memory = model.encode(src.view(), Some(&src_padding)).unwrap();
        let mut cache = model
            .start_decoding(memory.view(), Some(&src_padding))
            .unwrap();
        for step in 0..steps {
            let logits = model
                .decode_step(expected_ids.column(step), &mut cache)
                .unwrap();
            assert_close(
                &fx.name,
                &format!("cached step_logits[{step}]"),
                &logits,
                &step_logits.index_axis(Axis(1), step).to_owned(),
                1e-5,
            );
        }
    }
}

#[test]
fn greedy_rows_stop_at_their_own_eos() {
    let model =
        Transformer::new(tiny(NormPosition::Post, 11), &mut StdRng::seed_from_u64(3)).unwrap();
    let src = array![[3u32, 4, 5, 6], [7, 8, 9, 10]];
    let free = model
        .greedy_decode(
            src.view(),
            None,
            &GreedyOptions {
                bos_id: 1,
                eos_id: None,
                max_len: 12,
            },
        )
        .unwrap();
    // Pick as EOS a token row 0 produces, at its first occurrence.
    let eos = free[0][2];
    let first = free[0].iter().position(|&t| t == eos).unwrap();
    let stopped = model
        .greedy_decode(
            src.view(),
            None,
            &GreedyOptions {
                bos_id: 1,
                eos_id: Some(eos),
                max_len: 12,
            },
        )
        .unwrap();
    assert_eq!(stopped[0], free[0][..=first].to_vec());
    for row in 0..2 {
        let end = free[row]
            .iter()
            .position(|&t| t == eos)
            .map_or(free[row].len(), |p| p + 1);
        assert_eq!(stopped[row], free[row][..end].to_vec(), "row {row}");
    }
}

#[test]
fn selecting_cache_rows_equals_decoding_those_rows() {
    let model =
        Transformer::new(tiny(NormPosition::Pre, 13), &mut StdRng::seed_from_u64(4)).unwrap();
    let src = array![[3u32, 4, 5], [6, 7, 0], [8, 0, 0]];
    let padding = KeyPaddingMask::from_lengths(&[3, 2, 1], 3).unwrap();
    let memory = model.encode(src.view(), Some(&padding)).unwrap();
    let mut cache = model.start_decoding(memory.view(), Some(&padding)).unwrap();
    model
        .decode_step(array![1u32, 1, 1].view(), &mut cache)
        .unwrap();
    model
        .decode_step(array![5u32, 6, 7].view(), &mut cache)
        .unwrap();
    cache.select_rows(&[2, 0, 2]).unwrap();
    let selected = model
        .decode_step(array![9u32, 4, 9].view(), &mut cache)
        .unwrap();
    let tgt = array![[1u32, 7, 9], [1, 5, 4]];
    let sub_src = src.select(Axis(0), &[2, 0]);
    let sub_padding = KeyPaddingMask::from_lengths(&[1, 3], 3).unwrap();
    let full = model
        .forward(sub_src.view(), tgt.view(), Some(&sub_padding), None)
        .unwrap();
    for (slot, row) in [(0, 0), (1, 1), (2, 0)] {
        let err = (&selected.row(slot) - &full.slice(s![row, 2, ..]))
            .iter()
            .fold(0.0f32, |m, d| m.max(d.abs()));
        assert!(err <= 1e-5, "slot {slot}: {err:e}");
    }
    assert!(cache.select_rows(&[3]).is_err());
    assert!(cache.select_rows(&[]).is_err());
}

#[test]
fn a_truncated_cache_decodes_like_one_that_never_saw_the_dropped_tokens() {
    let model =
        Transformer::new(tiny(NormPosition::Post, 13), &mut StdRng::seed_from_u64(6)).unwrap();
    let src = array![[3u32, 4, 5], [6, 7, 0]];
    let padding = KeyPaddingMask::from_lengths(&[3, 2], 3).unwrap();
    let memory = model.encode(src.view(), Some(&padding)).unwrap();
    let prefix = [array![1u32, 1], array![5, 6]];
    let mut fresh = model.start_decoding(memory.view(), Some(&padding)).unwrap();
    let mut rewound = fresh.clone();
    for tokens in &prefix {
        model.decode_step(tokens.view(), &mut fresh).unwrap();
        model.decode_step(tokens.view(), &mut rewound).unwrap();
    }
    // Three draft tokens decoded, then dropped again.
    for tokens in [array![9u32, 4], array![2, 3], array![7, 7]] {
        model.decode_step(tokens.view(), &mut rewound).unwrap();
    }
    rewound.truncate(prefix.len()).unwrap();
    assert_eq!(rewound.len(), prefix.len());
    let next = array![8u32, 10];
    let want = model.decode_step(next.view(), &mut fresh).unwrap();
    let got = model.decode_step(next.view(), &mut rewound).unwrap();
    assert_eq!(got, want);
    let err = rewound.truncate(10).unwrap_err();
    assert!(matches!(err, Error::CacheMismatch { .. }), "{err}");
    assert!(err.to_string().contains("truncate to 10"), "{err}");
}

#[test]
fn beam_size_one_without_length_penalty_equals_greedy() {
    for seed in 0..4 {
        let model = Transformer::new(
            tiny(NormPosition::Post, 9),
            &mut StdRng::seed_from_u64(10 + seed),
        )
        .unwrap();
        let src = array![[3u32, 4, 5, 6, 7], [8, 6, 4, 0, 0]];
        let padding = KeyPaddingMask::from_lengths(&[5, 3], 5).unwrap();
        let greedy = model
            .greedy_decode(
                src.view(),
                Some(&padding),
                &GreedyOptions {
                    bos_id: 1,
                    eos_id: Some(2),
                    max_len: 10,
                },
            )
            .unwrap();
        let options = BeamSearchOptions {
            beam_size: 1,
            length_penalty: 0.0,
            max_len: MaxLength::Fixed(10),
            ..BeamSearchOptions::paper(1, 2)
        };
        let beams = model
            .beam_search(src.view(), Some(&padding), &options)
            .unwrap();
        for row in 0..2 {
            assert_eq!(beams[row][0].tokens, greedy[row], "seed {seed} row {row}");
        }
    }
}

/// Every output the search space allows: sequences ending with EOS at any length up to
/// `max_len`, and sequences of exactly `max_len` tokens without EOS.
fn enumerate(vocab: u32, eos: u32, max_len: usize) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    let mut prefixes: Vec<Vec<u32>> = vec![vec![]];
    for len in 1..=max_len {
        let mut next = Vec::new();
        for p in &prefixes {
            for t in 0..vocab {
                let mut y = p.clone();
                y.push(t);
                if t == eos || len == max_len {
                    out.push(y);
                } else {
                    next.push(y);
                }
            }
        }
        prefixes = next;
    }
    out
}

#[test]
fn wide_beam_finds_the_exhaustive_optimum() {
    let (vocab, eos, bos, max_len) = (4u32, 2u32, 1u32, 4usize);
    for (seed, alpha) in [(20u64, 0.6f32), (21, 0.0), (22, 1.0)] {
        let model = Transformer::new(
            tiny(NormPosition::Post, vocab as usize),
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap();
        let src = array![[0u32, 3, 1, 3]];
        // Score every sequence with the full (uncached) model.
        let mut best: Option<(f32, Vec<u32>)> = None;
        let all = enumerate(vocab, eos, max_len);
        for y in &all {
            let mut dec_in = vec![bos];
            dec_in.extend(&y[..y.len() - 1]);
            let tgt = Array2::from_shape_vec((1, dec_in.len()), dec_in).unwrap();
            let lp = model.log_probs(src.view(), tgt.view(), None, None).unwrap();
            let log_prob: f32 = y
                .iter()
                .enumerate()
                .map(|(t, &tok)| lp[[0, t, tok as usize]])
                .sum();
            let score = log_prob / ndtransformer::length_penalty(y.len(), alpha);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, y.clone()));
            }
        }
        let (best_score, best_tokens) = best.unwrap();
        let options = BeamSearchOptions {
            beam_size: all.len(),
            length_penalty: alpha,
            max_len: MaxLength::Fixed(max_len),
            num_return: 3,
            bos_id: bos,
            eos_id: eos,
        };
        let hyps = model.beam_search(src.view(), None, &options).unwrap();
        let top = &hyps[0][0];
        assert_eq!(top.tokens, best_tokens, "alpha {alpha}");
        assert!(
            (top.score - best_score).abs() < 1e-5,
            "alpha {alpha}: {} vs {best_score}",
            top.score
        );
        assert!(
            (top.score - top.log_prob / ndtransformer::length_penalty(top.tokens.len(), alpha))
                .abs()
                < 1e-6
        );
        assert!(hyps[0].windows(2).all(|w| w[0].score >= w[1].score));
        assert_eq!(hyps[0].len(), 3);
    }
}

#[test]
fn paper_settings_return_n_best_per_row() {
    let model =
        Transformer::new(tiny(NormPosition::Post, 17), &mut StdRng::seed_from_u64(30)).unwrap();
    let src = array![[3u32, 4, 5, 6], [7, 8, 0, 0]];
    let padding = KeyPaddingMask::from_lengths(&[4, 2], 4).unwrap();
    let options = BeamSearchOptions {
        num_return: 4,
        ..BeamSearchOptions::paper(1, 2)
    };
    let hyps = model
        .beam_search(src.view(), Some(&padding), &options)
        .unwrap();
    for (row, src_len) in [(0, 4), (1, 2)] {
        assert_eq!(hyps[row].len(), 4);
        for h in &hyps[row] {
            assert!(h.tokens.len() <= src_len + 50);
            assert_eq!(h.finished, h.tokens.last() == Some(&2));
            assert!(h.log_prob <= 0.0);
        }
    }
}

#[test]
fn nonsense_decoding_parameters_are_errors() {
    let model =
        Transformer::new(tiny(NormPosition::Post, 9), &mut StdRng::seed_from_u64(40)).unwrap();
    let src = array![[3u32, 4]];
    let beam = |f: &dyn Fn(&mut BeamSearchOptions)| {
        let mut o = BeamSearchOptions::paper(1, 2);
        f(&mut o);
        model.beam_search(src.view(), None, &o).unwrap_err()
    };
    let param = |e: Error| match e {
        Error::Decoding { parameter, .. } => parameter,
        other => panic!("expected a decoding error, got {other}"),
    };
    assert_eq!(param(beam(&|o| o.beam_size = 0)), "beam_size");
    assert_eq!(param(beam(&|o| o.max_len = MaxLength::Fixed(0))), "max_len");
    assert_eq!(
        param(beam(&|o| o.max_len = MaxLength::Fixed(65))),
        "max_len"
    );
    assert_eq!(param(beam(&|o| o.eos_id = 9)), "eos_id");
    assert_eq!(param(beam(&|o| o.bos_id = 100)), "bos_id");
    assert_eq!(param(beam(&|o| o.num_return = 5)), "num_return");
    assert_eq!(
        param(beam(&|o| o.length_penalty = f32::NAN)),
        "length_penalty"
    );
    let greedy = |o: GreedyOptions| param(model.greedy_decode(src.view(), None, &o).unwrap_err());
    assert_eq!(
        greedy(GreedyOptions {
            bos_id: 1,
            eos_id: Some(2),
            max_len: 0
        }),
        "max_len"
    );
    assert_eq!(
        greedy(GreedyOptions {
            bos_id: 9,
            eos_id: Some(2),
            max_len: 3
        }),
        "bos_id"
    );
    assert_eq!(
        greedy(GreedyOptions {
            bos_id: 1,
            eos_id: Some(12),
            max_len: 3
        }),
        "eos_id"
    );
    let msg = beam(&|o| o.beam_size = 0).to_string();
    assert!(msg.contains("beam_size is 0"), "{msg}");
}

#[test]
fn a_cache_rejects_another_model_and_another_batch_size() {
    let model =
        Transformer::new(tiny(NormPosition::Post, 9), &mut StdRng::seed_from_u64(50)).unwrap();
    let other =
        Transformer::new(tiny(NormPosition::Post, 9), &mut StdRng::seed_from_u64(51)).unwrap();
    let memory = model
        .encode(array![[3u32, 4], [5, 6]].view(), None)
        .unwrap();
    let mut cache = model.start_decoding(memory.view(), None).unwrap();
    assert!(matches!(
        other.decode_step(array![1u32, 1].view(), &mut cache),
        Err(Error::CacheMismatch { .. })
    ));
    let err = model
        .decode_step(Array1::from_elem(3, 1u32).view(), &mut cache)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "decoder cache mismatch: 3 tokens were fed to a cache of batch 2"
    );
    assert!(matches!(
        model.decode_step(array![1u32, 9].view(), &mut cache),
        Err(Error::TokenOutOfRange { .. })
    ));
    // A clone has the same weights, so its caches are interchangeable.
    let clone = model.clone();
    assert!(clone
        .decode_step(array![1u32, 1].view(), &mut cache)
        .is_ok());
}
