//! Results do not depend on the thread count: the same forward pass and generation in pools of
//! 1 and 2 threads agree bit for bit (threads split a product's rows and columns, never its
//! sums). tests/concurrency.rs checks more pool sizes and concurrent callers.

mod common;

use ndarray::Array2;
use ndtransformer::{GreedyOptions, KeyPaddingMask, NormPosition, Transformer, TransformerConfig};
use rand::{rngs::StdRng, RngExt, SeedableRng};

#[test]
fn one_and_two_threads_agree() {
    let config = TransformerConfig {
        d_model: 64,
        num_heads: 4,
        d_ff: 256,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        max_len: 64,
        norm_position: NormPosition::Pre,
        ..TransformerConfig::base(300, 300)
    };
    let model = Transformer::new(config, &mut StdRng::seed_from_u64(8)).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let src = Array2::from_shape_simple_fn((6, 40), || rng.random_range(3..300u32));
    let tgt = Array2::from_shape_simple_fn((6, 30), || rng.random_range(3..300u32));
    let padding = KeyPaddingMask::from_lengths(&[40, 33, 20, 40, 7, 1], 40).unwrap();
    let run = |threads: usize| {
        common::in_pool(threads, || {
            let logits = model
                .forward(src.view(), tgt.view(), Some(&padding), None)
                .unwrap();
            let greedy = model
                .greedy_decode(
                    src.view(),
                    Some(&padding),
                    &GreedyOptions {
                        bos_id: 1,
                        eos_id: Some(2),
                        max_len: 20,
                    },
                )
                .unwrap();
            (logits, greedy)
        })
    };
    let (one, greedy_one) = run(1);
    let (two, greedy_two) = run(2);
    let diff = (&one - &two).iter().fold(0.0f32, |m, d| m.max(d.abs()));
    println!("max abs difference between 1 and 2 threads: {diff:e}");
    assert!(
        one.iter()
            .zip(&two)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{diff:e}"
    );
    assert_eq!(greedy_one, greedy_two);
}
