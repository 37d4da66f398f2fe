//! Generation with the paper's base model: batch 8 × 128 source tokens, greedy steps with the
//! KV cache versus re-running the decoder on the whole prefix (what `nn.Transformer` users do).
//!
//! Reports the time of one decoding step (all 8 rows) at steps 1, 32 and 64, and the whole
//! 64-token cached greedy generation (encoder included).
//!
//! `greedy_generation/beam_4_64_tokens_with_encoder` runs §6.1's beam search (4 beams) to 64
//! tokens. `generation_int8` repeats the cached step and both generations with int8 linear
//! layers, `generation_bf16` the cached step with bf16 linear weights.
//!
//! The `memory/read_1GiB` bench measures the read bandwidth that bounds a cached step, which
//! streams the decoder's weights and the output projection once.
//!
//! Run with `cargo bench --bench generation`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{s, Array2};
use ndtransformer::{
    BeamSearchOptions, GreedyOptions, MaxLength, Precision, Transformer, TransformerConfig,
};
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
        // Each iteration decodes token `step` and rewinds the cache: steady-state generation,
        // with no copy of the cache between steps.
        group.bench_function(format!("cached/step_{step}"), |b| {
            b.iter(|| {
                let logits = model.decode_step(tgt.column(step - 1), &mut cache).unwrap();
                cache.truncate(step - 1).unwrap();
                black_box(logits)
            })
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
    // Beam search to 64 tokens; the end token is one a random model rarely ranks first.
    let beam = BeamSearchOptions {
        max_len: MaxLength::Fixed(STEPS),
        ..BeamSearchOptions::paper(1, VOCAB as u32 - 1)
    };
    group.bench_function("cached_64_tokens_with_encoder", |b| {
        b.iter(|| black_box(model.greedy_decode(src.view(), None, &options).unwrap()))
    });
    group.bench_function("beam_4_64_tokens_with_encoder", |b| {
        b.iter(|| black_box(model.beam_search(src.view(), None, &beam).unwrap()))
    });
    group.finish();

    // The same model with bf16 linear weights: a cached step streams half of the bytes.
    let mut bf16 = model.clone();
    bf16.quantize(Precision::Bf16).expect("finite weights");
    let memory = bf16.encode(src.view(), None).unwrap();
    let mut group = c.benchmark_group("generation_bf16");
    group.sample_size(10);
    let step = 32;
    let mut cache = bf16.start_decoding(memory.view(), None).unwrap();
    for t in 0..step - 1 {
        bf16.decode_step(tgt.column(t), &mut cache).unwrap();
    }
    group.bench_function(format!("cached/step_{step}"), |b| {
        b.iter(|| {
            let logits = bf16.decode_step(tgt.column(step - 1), &mut cache).unwrap();
            cache.truncate(step - 1).unwrap();
            black_box(logits)
        })
    });
    group.finish();
    drop((cache, bf16));

    // The same model with int8 linear layers: a cached step streams a quarter of the bytes.
    let mut int8 = model;
    int8.quantize(Precision::Int8).expect("finite weights");
    let memory = int8.encode(src.view(), None).unwrap();
    let mut group = c.benchmark_group("generation_int8");
    group.sample_size(10);
    let step = 32;
    let mut cache = int8.start_decoding(memory.view(), None).unwrap();
    for t in 0..step - 1 {
        int8.decode_step(tgt.column(t), &mut cache).unwrap();
    }
    group.bench_function(format!("cached/step_{step}"), |b| {
        b.iter(|| {
            let logits = int8.decode_step(tgt.column(step - 1), &mut cache).unwrap();
            cache.truncate(step - 1).unwrap();
            black_box(logits)
        })
    });
    group.bench_function("cached_64_tokens_with_encoder", |b| {
        b.iter(|| black_box(int8.greedy_decode(src.view(), None, &options).unwrap()))
    });
    group.bench_function("beam_4_64_tokens_with_encoder", |b| {
        b.iter(|| black_box(int8.beam_search(src.view(), None, &beam).unwrap()))
    });
    group.finish();
}

/// Read bandwidth: a parallel sum over a buffer far larger than the caches, read the way a
/// decoding step reads the weights (once, sequentially, split over the threads).
fn bench_memory(c: &mut Criterion) {
    use rayon::prelude::*;
    let data = vec![1.0f32; 1 << 28]; // 1 GiB
    let mut group = c.benchmark_group("memory");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((data.len() * 4) as u64));
    group.bench_function("read_1GiB", |b| {
        b.iter(|| black_box(data.par_chunks(1 << 16).map(lane_sum).sum::<f32>()))
    });
    group.finish();
}

/// A sum in 16 independent lanes, so the loop vectorises and memory, not the adder, bounds it.
fn lane_sum(chunk: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for block in chunk.chunks_exact(16) {
        for (a, x) in acc.iter_mut().zip(block) {
            *a += x;
        }
    }
    acc.iter().sum()
}

criterion_group!(benches, bench_generation, bench_memory);
criterion_main!(benches);
