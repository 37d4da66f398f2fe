//! The paper's base model (Table 3) on batches of 8 × 128 tokens: the encoder alone and the
//! full forward pass to logits (vocabulary 32000).
//!
//! Run with `cargo bench --bench forward`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::Array2;
use ndtransformer::{Transformer, TransformerConfig};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use std::hint::black_box;

const BATCH: usize = 8;
const LEN: usize = 128;
const VOCAB: usize = 32000;

/// FLOPs (2·M·N·K per matrix product) of one encoder layer on `tokens` tokens in rows of `len`.
fn encoder_layer_flops(c: &TransformerConfig, tokens: usize, len: usize) -> u64 {
    let (d, ff) = (c.d_model as u64, c.d_ff as u64);
    let t = tokens as u64;
    let projections = 2 * t * d * d * 4;
    let attention = 2 * 2 * t * len as u64 * d;
    let ffn = 2 * 2 * t * d * ff;
    projections + attention + ffn
}

fn bench_forward(c: &mut Criterion) {
    let config = TransformerConfig::base(VOCAB, VOCAB);
    let model =
        Transformer::new(config.clone(), &mut StdRng::seed_from_u64(0)).expect("valid config");
    let mut rng = StdRng::seed_from_u64(1);
    let src = Array2::from_shape_simple_fn((BATCH, LEN), || rng.random_range(0..VOCAB as u32));
    let tgt = Array2::from_shape_simple_fn((BATCH, LEN), || rng.random_range(0..VOCAB as u32));
    let tokens = BATCH * LEN;
    let enc_flops = config.num_encoder_layers as u64 * encoder_layer_flops(&config, tokens, LEN);
    let (d, t) = (config.d_model as u64, tokens as u64);
    // Decoder layer: self-attention block + cross-attention block + FFN; the output projection.
    let dec_flops = config.num_decoder_layers as u64
        * (encoder_layer_flops(&config, tokens, LEN)
            + 2 * t * d * d * 4
            + 2 * 2 * t * LEN as u64 * d);
    let full_flops = enc_flops + dec_flops + 2 * t * d * VOCAB as u64;

    let mut group = c.benchmark_group("base_model");
    group.sample_size(10);
    group.throughput(Throughput::Elements(enc_flops));
    group.bench_function("encoder_8x128", |b| {
        b.iter(|| black_box(model.encode(src.view(), None).unwrap()))
    });
    group.throughput(Throughput::Elements(full_flops));
    group.bench_function("forward_logits_8x128", |b| {
        b.iter(|| black_box(model.forward(src.view(), tgt.view(), None, None).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
