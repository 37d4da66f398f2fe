//! Thread safety and determinism: the model, its layers and a decoder cache are `Send + Sync`;
//! one model shared by several threads gives, bit for bit, the results of a sequential run; and
//! the results do not depend on the size of the rayon pool.

mod common;

use std::sync::Arc;

use ndarray::{s, Array1, Array2, Array3};
use ndtransformer::{
    AttnMask, BeamSearchOptions, Decoder, DecoderCache, Encoder, Error, GreedyOptions, Hypothesis,
    KeyPaddingMask, LoadReport, Mask, MaxLength, MultiHeadAttention, NormPosition, Transformer,
    TransformerConfig, TransformerTrace,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

const fn assert_send_sync<T: Send + Sync>() {}

// Compile-time: these can be shared between threads (`&T` sent) and moved to other threads.
const _: () = {
    assert_send_sync::<Transformer>();
    assert_send_sync::<DecoderCache>();
    assert_send_sync::<MultiHeadAttention>();
    assert_send_sync::<Encoder>();
    assert_send_sync::<Decoder>();
    assert_send_sync::<KeyPaddingMask>();
    assert_send_sync::<AttnMask>();
    assert_send_sync::<Mask<'static>>();
    assert_send_sync::<TransformerTrace>();
    assert_send_sync::<LoadReport>();
    assert_send_sync::<Error>();
};

/// Large enough that the matrix products take their multi-threaded paths.
fn config() -> TransformerConfig {
    TransformerConfig {
        d_model: 64,
        num_heads: 4,
        d_ff: 256,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        max_len: 64,
        norm_position: NormPosition::Pre,
        ..TransformerConfig::base(300, 300)
    }
}

/// Everything one caller computes: teacher-forced logits, step logits through a cache, greedy
/// and beam-search outputs.
#[derive(Debug, Clone, PartialEq)]
struct Outputs {
    logits: Array3<f32>,
    /// One row of 20 target positions: products of 20 rows, split by columns over threads.
    one_row: Array3<f32>,
    steps: Vec<Array2<f32>>,
    greedy: Vec<Vec<u32>>,
    beams: Vec<Vec<Hypothesis>>,
}

impl Outputs {
    /// Every float as its bits, so that the comparison is exact (NaN and -0.0 included).
    fn bits(&self) -> Vec<u32> {
        let floats = self
            .logits
            .iter()
            .chain(&self.one_row)
            .chain(self.steps.iter().flatten())
            .chain(
                self.beams
                    .iter()
                    .flatten()
                    .flat_map(|h| [&h.log_prob, &h.score]),
            );
        floats.map(|v| v.to_bits()).collect()
    }
}

struct Inputs {
    src: Array2<u32>,
    tgt: Array2<u32>,
    padding: KeyPaddingMask,
}

fn inputs() -> Inputs {
    let mut rng = StdRng::seed_from_u64(9);
    Inputs {
        src: Array2::from_shape_simple_fn((4, 24), || rng.random_range(3..300u32)),
        tgt: Array2::from_shape_simple_fn((4, 20), || rng.random_range(3..300u32)),
        padding: KeyPaddingMask::from_lengths(&[24, 17, 5, 24], 24).unwrap(),
    }
}

fn run(model: &Transformer, x: &Inputs) -> Outputs {
    let logits = model
        .forward(x.src.view(), x.tgt.view(), Some(&x.padding), None)
        .unwrap();
    let one_row = model
        .forward(
            x.src.slice(s![..1, ..]),
            x.tgt.slice(s![..1, ..]),
            None,
            None,
        )
        .unwrap();
    let memory = model.encode(x.src.view(), Some(&x.padding)).unwrap();
    let mut cache = model
        .start_decoding(memory.view(), Some(&x.padding))
        .unwrap();
    let steps = (0..6)
        .map(|t| model.decode_step(x.tgt.column(t), &mut cache).unwrap())
        .collect();
    let greedy = model
        .greedy_decode(
            x.src.view(),
            Some(&x.padding),
            &GreedyOptions {
                bos_id: 1,
                eos_id: Some(2),
                max_len: 12,
            },
        )
        .unwrap();
    let beams = model
        .beam_search(
            x.src.view(),
            Some(&x.padding),
            &BeamSearchOptions {
                max_len: MaxLength::Fixed(6),
                num_return: 2,
                ..BeamSearchOptions::paper(1, 2)
            },
        )
        .unwrap();
    Outputs {
        logits,
        one_row,
        steps,
        greedy,
        beams,
    }
}

#[test]
fn one_model_shared_by_four_threads_gives_the_sequential_results() {
    let model = Transformer::new(config(), &mut StdRng::seed_from_u64(8)).unwrap();
    let x = inputs();
    let sequential = run(&model, &x);
    assert!(sequential.logits.iter().all(|v| v.is_finite()));
    // Four threads borrow the model at once, each running everything twice.
    let concurrent: Vec<Vec<Outputs>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| (0..2).map(|_| run(&model, &x)).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for outputs in concurrent.iter().flatten() {
        assert_eq!(outputs.bits(), sequential.bits());
        assert_eq!(outputs.greedy, sequential.greedy);
        assert_eq!(outputs.beams, sequential.beams);
    }
}

#[test]
fn a_model_in_an_arc_serves_spawned_threads() {
    let model = Arc::new(Transformer::new(config(), &mut StdRng::seed_from_u64(8)).unwrap());
    let src = Arc::new(inputs().src);
    let expected = model.encode(src.view(), None).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (model, src) = (Arc::clone(&model), Arc::clone(&src));
            std::thread::spawn(move || model.encode(src.view(), None).unwrap())
        })
        .collect();
    for h in handles {
        let memory = h.join().unwrap();
        assert!(memory
            .iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// A cache is a plain value: made on one thread, advanced on another.
#[test]
fn a_decoder_cache_moves_between_threads() {
    let model = Transformer::new(config(), &mut StdRng::seed_from_u64(8)).unwrap();
    let x = inputs();
    let memory = model.encode(x.src.view(), Some(&x.padding)).unwrap();
    let mut here = model
        .start_decoding(memory.view(), Some(&x.padding))
        .unwrap();
    let mut there = here.clone();
    let tokens = Array1::from_elem(4, 1u32);
    let expected = model.decode_step(tokens.view(), &mut here).unwrap();
    let (got, there) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let logits = model.decode_step(tokens.view(), &mut there).unwrap();
                (logits, there)
            })
            .join()
            .unwrap()
    });
    assert_eq!(got, expected);
    assert_eq!(there.len(), 1);
}

/// Pools of 1 to 4 threads give the same bits: work is split over output rows, columns and
/// heads, never over a sum, and which kernel runs depends on the shapes alone.
#[test]
fn results_do_not_depend_on_the_pool_size() {
    let model = Transformer::new(config(), &mut StdRng::seed_from_u64(8)).unwrap();
    let x = inputs();
    let in_pool = |threads: usize| common::in_pool(threads, || run(&model, &x));
    let one = in_pool(1);
    for threads in 2..=4 {
        let many = in_pool(threads);
        assert_eq!(many.bits(), one.bits(), "{threads} threads");
        assert_eq!(many.greedy, one.greedy, "{threads} threads");
    }
}

/// The edge of the few-rows kernel: a decoding step of 4 rows through 256 × 256 projections is
/// exactly the work at which products start to be split over threads.
#[test]
fn decoding_steps_at_the_threading_threshold_do_not_depend_on_the_pool_size() {
    let config = TransformerConfig {
        d_model: 256,
        num_heads: 4,
        d_ff: 256,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        max_len: 16,
        ..TransformerConfig::base(64, 256)
    };
    let model = Transformer::new(config, &mut StdRng::seed_from_u64(3)).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let src = Array2::from_shape_simple_fn((4, 6), || rng.random_range(0..64u32));
    let steps = |threads: usize| {
        common::in_pool(threads, || {
            let memory = model.encode(src.view(), None).unwrap();
            let mut cache = model.start_decoding(memory.view(), None).unwrap();
            (0..3)
                .flat_map(|t| {
                    let tokens = Array1::from_elem(4, 1 + t as u32);
                    model.decode_step(tokens.view(), &mut cache).unwrap()
                })
                .map(f32::to_bits)
                .collect::<Vec<u32>>()
        })
    };
    let one = steps(1);
    for threads in [2, 4] {
        assert!(steps(threads) == one, "{threads} threads differ from one");
    }
}
