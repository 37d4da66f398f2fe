//! Sentence embeddings with all-MiniLM-L6-v2: 256 sentences
//! (`tests/fixtures/minilm/bench_sentences.txt`, the list `tools/bench_torch_embed.py` times
//! on PyTorch) in file order, in consecutive batches of 32.
//!
//! - `embed/encode_256`: tokenisation + encoder + pooling + normalisation, every batch
//!   (what `SentenceTransformer.encode` does per batch);
//! - `embed/forward_256`: the same on batches tokenised beforehand;
//! - `embed_int8/encode_256`: `encode_256` with the model in int8 ([`Precision::Int8`]).
//!
//! Throughput is in sentences. The model is fetched into `target/models/` on first use.
//! Run with `cargo bench --bench embed`.

#[path = "../examples/minilm/mod.rs"]
mod minilm;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndtransformer::{Precision, SentenceEncoder};
use std::hint::black_box;

const BATCH: usize = 32;

fn bench_embed(c: &mut Criterion) {
    let dir = minilm::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let encoder = SentenceEncoder::load(&dir).unwrap();
    let tokenizer = minilm::tokenizer(&dir, encoder.max_seq_length().unwrap_or(256)).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm/bench_sentences.txt"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let sentences: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let batches: Vec<minilm::Batch> = sentences
        .chunks(BATCH)
        .map(|chunk| minilm::tokenize(&tokenizer, chunk).unwrap())
        .collect();

    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    group.throughput(Throughput::Elements(sentences.len() as u64));
    let embed = |batch: &minilm::Batch| {
        encoder
            .embed(
                batch.ids.view(),
                batch.attention_mask.view(),
                Some(batch.token_types.view()),
            )
            .unwrap()
    };
    let encode = |encoder: &SentenceEncoder| {
        for chunk in sentences.chunks(BATCH) {
            let batch = minilm::tokenize(&tokenizer, chunk).unwrap();
            let mask = batch.attention_mask.view();
            black_box(
                encoder
                    .embed(batch.ids.view(), mask, Some(batch.token_types.view()))
                    .unwrap(),
            );
        }
    };
    group.bench_function(format!("encode_{}", sentences.len()), |b| {
        b.iter(|| encode(&encoder))
    });
    group.bench_function(format!("forward_{}", sentences.len()), |b| {
        b.iter(|| {
            for batch in &batches {
                black_box(embed(batch));
            }
        })
    });
    group.finish();

    let mut int8 = encoder.clone();
    int8.quantize(Precision::Int8).unwrap();
    let mut group = c.benchmark_group("embed_int8");
    group.sample_size(10);
    group.throughput(Throughput::Elements(sentences.len() as u64));
    group.bench_function(format!("encode_{}", sentences.len()), |b| {
        b.iter(|| encode(&int8))
    });
    group.finish();
}

criterion_group!(benches, bench_embed);
criterion_main!(benches);
