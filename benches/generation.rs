//! Generation with the paper's base model: batch 8 × 128 source tokens, greedy steps with the
//! KV cache versus re-running the decoder on the whole prefix (what `nn.Transformer` users do).
//!
//! Reports the time of one decoding step (all 8 rows) at steps 1, 32 and 64, and the whole
//! 64-token cached greedy generation (encoder included).
//!
//! Run with `cargo bench --bench generation`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ndarray::{s, Array2};
use ndtransformer::{GreedyOptions, Transformer, TransformerConfig};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use std::hint::black_box;

const BATCH: usize = 8;
const SRC_LEN: usize = 128;
const STEPS: usize = 64;
const VOCAB: usize = 32000;

fn bench_generation(c: &mut Criterion) {
    let model = Transformer::new(
        TransformerConfig::base(VOCAB, VOCAB),
        &mut StdRng::seed_from_u64(0),
    )
    .expect("valid config");
    let mut rng = StdRng::seed_from_u64(1);
    let src = Array2::from_shape_simple_fn((BATCH, SRC_LEN), || rng.random_range(3..VOCAB as u32));
    // A fixed target prefix (the tokens fed do not change the cost).
    let tgt = Array2::from_shape_simple_fn((BATCH, STEPS), || rng.random_range(3..VOCAB as u32));
    let memory = model.encode(src.view(), None).unwrap();

    let mut group = c.benchmark_group("generation_step");
    group.sample_size(10);
    for step in [1usize, 32, 64] {
        // The cache after `step - 1` tokens; the timed call feeds token `step`.
        let mut cache = model.start_decoding(memory.view(), None).unwrap();
        for t in 0..step - 1 {
            model.decode_step(tgt.column(t), &mut cache).unwrap();
        }
        group.bench_function(format!("cached/step_{step}"), |b| {
            b.iter_batched(
                || cache.clone(),
                |mut cache| black_box(model.decode_step(tgt.column(step - 1), &mut cache).unwrap()),
                BatchSize::LargeInput,
            )
        });
        group.bench_function(format!("uncached/step_{step}"), |b| {
            b.iter(|| {
                let decoded = model
                    .decode(tgt.slice(s![.., ..step]), memory.view(), None, None)
                    .unwrap();
                black_box(
                    model
                        .project(decoded.slice(s![.., step - 1.., ..]))
                        .unwrap(),
                )
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("greedy_generation");
    group.sample_size(10);
    let options = GreedyOptions {
        bos_id: 1,
        eos_id: None,
        max_len: STEPS,
    };
    group.bench_function("cached_64_tokens_with_encoder", |b| {
        b.iter(|| black_box(model.greedy_decode(src.view(), None, &options).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_generation);
criterion_main!(benches);
