//! The paper's base model (Table 3) and its kernels.
//!
//! Workloads (medians go into the README's table, next to PyTorch's from
//! `tools/bench_torch_forward.py`):
//! - `model/encoder_8x128`: the encoder stack (6 layers + final norm) on 8 × 128 embedded tokens;
//! - `model/forward_logits_8x128`: ids to logits, 8 × 128 source and target, vocabulary 32000;
//! - `model/encoder_1x32`: the encoder stack on one 32-token sequence (latency);
//! - `model_bf16/*`, `model_int8/*`: both encoder workloads with bf16 or int8 linear layers;
//! - `ops/*`: one linear layer, attention, softmax and LayerNorm at the model's shapes, and a
//!   large square product that gives the matrix-multiply ceiling.
//!
//! Throughput is in FLOPs (2·M·N·K per product) or bytes. Run with `cargo bench --bench forward`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ndarray::{Array1, Array2, Array3, Array4};
use ndtransformer::{
    scaled_dot_product_attention, LayerNorm, Linear, Mask, MultiHeadAttention, Precision,
    Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use std::hint::black_box;

const VOCAB: usize = 32000;

/// FLOPs of one encoder layer on `batch` sequences of `len` tokens.
fn encoder_layer_flops(c: &TransformerConfig, batch: usize, len: usize) -> u64 {
    let (d, ff, t, l) = (
        c.d_model as u64,
        c.d_ff as u64,
        (batch * len) as u64,
        len as u64,
    );
    let projections = 4 * 2 * t * d * d;
    let attention = 2 * 2 * t * l * d; // QKᵀ and PV over all heads
    let ffn = 2 * 2 * t * d * ff;
    projections + attention + ffn
}

/// FLOPs of the whole model: encoder, decoder (self- and cross-attention, FFN) and output projection.
fn forward_flops(c: &TransformerConfig, batch: usize, src_len: usize, tgt_len: usize) -> u64 {
    let (d, t) = (c.d_model as u64, (batch * tgt_len) as u64);
    let encoder = c.num_encoder_layers as u64 * encoder_layer_flops(c, batch, src_len);
    let cross = 2 * 2 * t * d * d
        + 2 * 2 * (batch * src_len) as u64 * d * d
        + 2 * 2 * t * src_len as u64 * d;
    let decoder = c.num_decoder_layers as u64 * (encoder_layer_flops(c, batch, tgt_len) + cross);
    encoder + decoder + 2 * t * d * VOCAB as u64
}

fn random3(shape: (usize, usize, usize), rng: &mut StdRng) -> Array3<f32> {
    Array3::from_shape_simple_fn(shape, || rng.random_range(-1.0..1.0))
}

fn bench_model(c: &mut Criterion) {
    let config = TransformerConfig::base(VOCAB, VOCAB);
    let model =
        Transformer::new(config.clone(), &mut StdRng::seed_from_u64(0)).expect("valid config");
    let mut rng = StdRng::seed_from_u64(1);
    let x = random3((8, 128, 512), &mut rng);
    let x1 = random3((1, 32, 512), &mut rng);
    let src = Array2::from_shape_simple_fn((8, 128), || rng.random_range(0..VOCAB as u32));
    let tgt = Array2::from_shape_simple_fn((8, 128), || rng.random_range(0..VOCAB as u32));
    let layers = config.num_encoder_layers as u64;

    let mut group = c.benchmark_group("model");
    group.sample_size(20);
    group.throughput(Throughput::Elements(
        layers * encoder_layer_flops(&config, 8, 128),
    ));
    group.bench_function("encoder_8x128", |b| {
        b.iter(|| black_box(model.encoder().forward(x.view(), &Mask::none()).unwrap()))
    });
    group.throughput(Throughput::Elements(forward_flops(&config, 8, 128, 128)));
    group.bench_function("forward_logits_8x128", |b| {
        b.iter(|| black_box(model.forward(src.view(), tgt.view(), None, None).unwrap()))
    });
    let mut logits = Array3::zeros((8, 128, VOCAB));
    group.bench_function("forward_logits_into_8x128", |b| {
        b.iter(|| {
            model
                .forward_into(src.view(), tgt.view(), None, None, logits.view_mut())
                .unwrap();
            black_box(&logits);
        })
    });
    group.throughput(Throughput::Elements(
        layers * encoder_layer_flops(&config, 1, 32),
    ));
    group.bench_function("encoder_1x32", |b| {
        b.iter(|| black_box(model.encoder().forward(x1.view(), &Mask::none()).unwrap()))
    });
    group.finish();

    // The same model with bf16 linear weights (`Precision::Bf16`).
    let mut bf16 = model.clone();
    bf16.quantize(Precision::Bf16).expect("finite weights");
    let mut group = c.benchmark_group("model_bf16");
    group.sample_size(20);
    group.bench_function("encoder_8x128", |b| {
        b.iter(|| black_box(bf16.encoder().forward(x.view(), &Mask::none()).unwrap()))
    });
    group.bench_function("encoder_1x32", |b| {
        b.iter(|| black_box(bf16.encoder().forward(x1.view(), &Mask::none()).unwrap()))
    });
    group.finish();
    drop(bf16);

    // The same model with int8 linear layers (`Precision::Int8`).
    let mut int8 = model;
    int8.quantize(Precision::Int8).expect("finite weights");
    let mut group = c.benchmark_group("model_int8");
    group.sample_size(20);
    group.bench_function("encoder_8x128", |b| {
        b.iter(|| black_box(int8.encoder().forward(x.view(), &Mask::none()).unwrap()))
    });
    group.bench_function("encoder_1x32", |b| {
        b.iter(|| black_box(int8.encoder().forward(x1.view(), &Mask::none()).unwrap()))
    });
    group.finish();
}

fn bench_ops(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let mut group = c.benchmark_group("ops");
    group.sample_size(20);

    let x = random3((8, 128, 512), &mut rng);
    let ffn_in = Linear::init(512, 2048, true, &mut rng);
    group.throughput(Throughput::Elements(2 * 1024 * 512 * 2048));
    group.bench_function("linear_1024x512_to_2048", |b| {
        b.iter(|| black_box(ffn_in.forward(x.view()).unwrap()))
    });

    let short = random3((1, 32, 512), &mut rng);
    group.throughput(Throughput::Elements(2 * 32 * 512 * 2048));
    group.bench_function("linear_32x512_to_2048", |b| {
        b.iter(|| black_box(ffn_in.forward(short.view()).unwrap()))
    });
    let mut ffn_in_int8 = ffn_in.clone();
    ffn_in_int8
        .quantize(Precision::Int8)
        .expect("finite weights");
    group.throughput(Throughput::Elements(2 * 1024 * 512 * 2048));
    group.bench_function("linear_1024x512_to_2048_int8", |b| {
        b.iter(|| black_box(ffn_in_int8.forward(x.view()).unwrap()))
    });
    group.throughput(Throughput::Elements(2 * 32 * 512 * 2048));
    group.bench_function("linear_32x512_to_2048_int8", |b| {
        b.iter(|| black_box(ffn_in_int8.forward(short.view()).unwrap()))
    });
    let short_small = random3((1, 32, 256), &mut rng);
    let small = Linear::init(256, 256, true, &mut rng);
    group.throughput(Throughput::Elements(2 * 32 * 256 * 256));
    group.bench_function("linear_32x256_to_256", |b| {
        b.iter(|| black_box(small.forward(short_small.view()).unwrap()))
    });

    let mha = MultiHeadAttention::init(512, 8, &mut rng).unwrap();
    group.throughput(Throughput::Elements(
        4 * 2 * 1024 * 512 * 512 + 2 * 2 * 1024 * 128 * 512,
    ));
    group.bench_function("multi_head_self_attention_8x128", |b| {
        b.iter(|| {
            black_box(
                mha.forward(x.view(), x.view(), x.view(), &Mask::none())
                    .unwrap(),
            )
        })
    });

    let q = Array4::from_shape_simple_fn((8, 8, 128, 64), || rng.random_range(-1.0f32..1.0));
    group.throughput(Throughput::Elements(2 * 2 * 8 * 8 * 128 * 128 * 64));
    group.bench_function("scaled_dot_product_8x8x128x64", |b| {
        b.iter(|| {
            black_box(
                scaled_dot_product_attention(q.view(), q.view(), q.view(), &Mask::causal())
                    .unwrap(),
            )
        })
    });

    let scores =
        Array2::from_shape_simple_fn((8 * 8 * 128, 128), || rng.random_range(-4.0f32..4.0));
    group.throughput(Throughput::Bytes((scores.len() * 4) as u64));
    group.bench_function("softmax_8192x128", |b| {
        b.iter_batched_ref(
            || scores.clone(),
            |s| ndtransformer::ops::softmax_rows_inplace(s.view_mut()),
            criterion::BatchSize::LargeInput,
        )
    });

    let norm = LayerNorm::new(
        Array1::from_elem(512, 1.1),
        Array1::from_elem(512, 0.1),
        1e-5,
    )
    .unwrap();
    group.throughput(Throughput::Bytes((x.len() * 4) as u64));
    group.bench_function("layer_norm_8x128x512", |b| {
        b.iter(|| black_box(norm.forward(x.view()).unwrap()))
    });

    // The matrix-multiply ceiling: a large square product through the same kernel.
    let n = 2048;
    let a = Array2::from_shape_simple_fn((n, n), || rng.random_range(-1.0f32..1.0));
    let square = Linear::new(a.clone(), None).unwrap();
    group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    group.bench_function("sgemm_2048", |b| {
        b.iter(|| black_box(square.forward(a.view()).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench_model, bench_ops);
criterion_main!(benches);
