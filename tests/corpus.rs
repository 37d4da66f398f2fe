//! The corpus API against one call per sequence: greedy decoding and beam search of a corpus
//! in batches sorted by length under a token budget, one at a time or several at once, give each
//! sequence's result decoded alone.

use ndarray::Array2;
use ndtransformer::{
    BeamSearchOptions, CorpusOptions, CorpusProgress, Error, GreedyOptions, MaxLength, Transformer,
    TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

const VOCAB: usize = 23;
const PAD: u32 = 0;

fn model() -> Transformer {
    let config = TransformerConfig {
        d_model: 16,
        num_heads: 4,
        d_ff: 32,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        max_len: 64,
        ..TransformerConfig::base(VOCAB, VOCAB)
    };
    Transformer::new(config, &mut StdRng::seed_from_u64(11)).unwrap()
}

/// `n` sequences of random lengths 1..=30, ids 3.. (0 pads, 1 is BOS, 2 is EOS).
fn sources(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=30);
            (0..len)
                .map(|_| rng.random_range(3..VOCAB as u32))
                .collect()
        })
        .collect()
}

fn alone(source: &[u32]) -> Array2<u32> {
    Array2::from_shape_vec((1, source.len()), source.to_vec()).unwrap()
}

/// Budgets from below the longest sequence (30) to the whole corpus in one batch, with and
/// without a row cap, one batch at a time or three.
fn budgets() -> Vec<CorpusOptions> {
    let mut all: Vec<CorpusOptions> = [17, 64, 300, usize::MAX]
        .into_iter()
        .map(|t| CorpusOptions::new(t, PAD))
        .collect();
    all.push(CorpusOptions {
        max_batch_size: 5,
        ..CorpusOptions::new(1000, PAD)
    });
    all.push(CorpusOptions {
        concurrent_batches: 3,
        ..CorpusOptions::new(64, PAD)
    });
    all
}

/// Checks the progress reports of one corpus run: one a batch, reaching the totals.
fn check_progress(calls: &[CorpusProgress], n: usize, options: &CorpusOptions) {
    let last = calls.last().expect("progress reported");
    assert_eq!((last.sequences_done, last.sequences_total), (n, n));
    assert_eq!(last.batches_done, last.batches_total);
    assert_eq!(calls.len(), last.batches_total);
    for p in calls {
        assert!(p.batch_rows * p.batch_src_len <= options.max_batch_tokens || p.batch_rows == 1);
        assert!(p.batch_rows <= options.max_batch_size);
    }
}

#[test]
fn greedy_corpus_equals_one_call_per_sequence() {
    let model = model();
    let sources = sources(40, 1);
    let options = GreedyOptions {
        bos_id: 1,
        eos_id: Some(2),
        max_len: 12,
    };
    let expected: Vec<Vec<u32>> = sources
        .iter()
        .map(|s| {
            model
                .greedy_decode(alone(s).view(), None, &options)
                .unwrap()[0]
                .clone()
        })
        .collect();
    // Not all outputs run to the maximum length: EOS ends some rows early.
    assert!(expected.iter().any(|e| e.len() < options.max_len));
    for corpus in budgets() {
        let mut calls = Vec::new();
        let out = model
            .greedy_corpus(&sources, &corpus, &options, |p| calls.push(p))
            .unwrap();
        assert_eq!(out, expected, "{corpus:?}");
        check_progress(&calls, sources.len(), &corpus);
    }
}

#[test]
fn beam_search_corpus_equals_one_call_per_sequence() {
    let model = model();
    let sources = sources(24, 2);
    let options = BeamSearchOptions {
        beam_size: 3,
        num_return: 2,
        max_len: MaxLength::SourcePlus(2),
        ..BeamSearchOptions::paper(1, 2)
    };
    let expected: Vec<_> = sources
        .iter()
        .map(|s| model.beam_search(alone(s).view(), None, &options).unwrap()[0].clone())
        .collect();
    let mut worst = 0.0f32;
    for corpus in budgets() {
        let mut calls = Vec::new();
        let out = model
            .beam_search_corpus(&sources, &corpus, &options, |p| calls.push(p))
            .unwrap();
        assert_eq!(out.len(), expected.len());
        for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
            assert_eq!(got.len(), want.len(), "sequence {i}, {corpus:?}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.tokens, w.tokens, "sequence {i}, {corpus:?}");
                assert_eq!(g.finished, w.finished);
                worst = worst
                    .max((g.log_prob - w.log_prob).abs())
                    .max((g.score - w.score).abs());
            }
        }
        check_progress(&calls, sources.len(), &corpus);
    }
    println!("beam corpus vs one call per sequence: max abs score difference {worst:e}");
    assert!(worst <= 1e-5, "{worst:e}");
}

#[test]
fn corpus_errors_name_the_value() {
    let model = model();
    let greedy = GreedyOptions {
        bos_id: 1,
        eos_id: Some(2),
        max_len: 5,
    };
    let e = model
        .greedy_corpus(&[vec![3u32]], &CorpusOptions::new(8, 23), &greedy, |_| {})
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Decoding {
                parameter: "pad_id",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("pad_id 23"), "{e}");
    // A bad id is reported at its index in the corpus, not its row in the sorted batch.
    let sources = [vec![3u32], vec![4, 5, 6], vec![7, 99]];
    let e = model
        .greedy_corpus(&sources, &CorpusOptions::new(100, PAD), &greedy, |_| {})
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TokenOutOfRange {
                id: 99,
                batch: 2,
                position: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let empty: [Vec<u32>; 0] = [];
    assert!(model
        .greedy_corpus(&empty, &CorpusOptions::new(100, PAD), &greedy, |_| {})
        .unwrap()
        .is_empty());
}
