//! Bf16 models on real weights: the trained dates model keeps its held-out accuracy,
//! all-MiniLM-L6-v2 keeps its embeddings and their similarity ranking, bf16 linear weights take
//! half of their f32 bytes, conversions and files round-trip, and results do not depend on the
//! thread count.
//!
//! `cargo test --test bf16 -- --nocapture` prints the figures.

mod accuracy;
mod common;
// Shared with the examples; this file uses part of it.
#[allow(dead_code)]
#[path = "../examples/dates/mod.rs"]
mod dates;
#[path = "../examples/minilm/mod.rs"]
mod minilm;

use ndarray::{Array2, ArrayD};
use ndtransformer::{LoadOptions, Precision, Transformer, TransformerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn the_dates_model_stays_at_least_99_5_percent_exact_on_5000_held_out_dates_in_bf16() {
    accuracy::dates_model_stays_99_5_percent_exact(Precision::Bf16);
}

#[test]
fn minilm_bf16_embeddings_keep_cosine_0_999_and_the_similarity_ranking() {
    accuracy::minilm_keeps_cosine_and_ranking(Precision::Bf16, 0.999);
}

/// The base model's widths, with one layer a stack and a vocabulary of 8000.
fn base_widths(tie_output_projection: bool) -> Transformer {
    let config = TransformerConfig {
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        tie_output_projection,
        ..TransformerConfig::base(8000, 8000)
    };
    Transformer::new(config, &mut StdRng::seed_from_u64(0)).unwrap()
}

/// Every parameter, owned, in walk order.
fn owned(m: &Transformer) -> Vec<(String, ArrayD<f32>)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, v)| (n, v.into_owned()))
        .collect()
}

/// Bytes the linear layers' weights take in f32 panels: `[out, in]` with `out` padded to
/// whole panels of 128 columns. The embedding tables are the only other matrices.
fn linear_weight_bytes(m: &Transformer) -> usize {
    m.named_parameters()
        .iter()
        .filter(|(name, v)| v.ndim() == 2 && !name.contains("embed"))
        .map(|(_, v)| 4 * v.shape()[0].next_multiple_of(128) * v.shape()[1])
        .sum()
}

#[test]
fn bf16_linear_weights_take_half_their_f32_bytes_and_convert_back_exactly() {
    let mut model = base_widths(false);
    let f32_bytes = model.parameter_bytes();
    let weights = linear_weight_bytes(&model);
    model.quantize(Precision::Bf16).unwrap();
    let bf16_bytes = model.parameter_bytes();
    println!(
        "base widths, 1 + 1 layers: {f32_bytes} bytes in f32, {bf16_bytes} in bf16 ({:.1} %); \
         linear weights {weights} → {} bytes",
        100.0 * bf16_bytes as f64 / f32_bytes as f64,
        weights / 2
    );
    // Two bytes a weight, in the same panels; tables, biases and norms stay f32.
    assert_eq!(bf16_bytes, f32_bytes - weights / 2);

    // Back to f32 gives the bf16 values widened; converting again gives the same bf16.
    let once = owned(&model);
    model.quantize(Precision::F32).unwrap();
    assert_eq!(model.precision(), Precision::F32);
    assert_eq!(model.parameter_bytes(), f32_bytes);
    assert_eq!(owned(&model), once);
    model.quantize(Precision::Bf16).unwrap();
    assert_eq!(owned(&model), once);

    // A saved bf16 model holds the f32 values of its bf16 weights: loaded in bf16 it is the
    // same model, loaded in f32 it has the same values.
    let bytes = model.to_safetensors().unwrap();
    let config = model.config().clone();
    let load = |precision| {
        Transformer::from_safetensors(
            config.clone(),
            &bytes,
            &LoadOptions {
                precision,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let reloaded = load(Some(Precision::Bf16));
    assert_eq!(reloaded.precision(), Precision::Bf16);
    assert_eq!(owned(&reloaded), once);
    assert_eq!(owned(&load(None)), once);

    // Int8 → bf16 rounds the dequantized int8 weights: the same as through f32.
    let mut direct = base_widths(false);
    direct.quantize(Precision::Int8).unwrap();
    let mut through_f32 = direct.clone();
    direct.quantize(Precision::Bf16).unwrap();
    through_f32.quantize(Precision::F32).unwrap();
    through_f32.quantize(Precision::Bf16).unwrap();
    assert_eq!(direct.precision(), Precision::Bf16);
    assert_eq!(owned(&direct), owned(&through_f32));

    // A tied output projection keeps a copy of the table in panels for its products: f32 at
    // f32, its own bf16 copy at bf16, while the table stays f32.
    let mut tied = base_widths(true);
    let (tied_f32, tied_weights) = (tied.parameter_bytes(), linear_weight_bytes(&tied));
    let panels = 8000usize.next_multiple_of(128) * 512;
    let table = tied.tgt_embedding().weight().to_owned();
    tied.quantize(Precision::Bf16).unwrap();
    assert_eq!(tied.tgt_embedding().weight(), table);
    assert_eq!(
        tied.parameter_bytes(),
        tied_f32 - tied_weights / 2 - 4 * panels + 2 * panels
    );
    tied.quantize(Precision::F32).unwrap();
    assert_eq!(tied.parameter_bytes(), tied_f32);
    assert_eq!(tied.tgt_embedding().weight(), table);
}

#[test]
fn a_bf16_forward_stays_close_to_f32_and_does_not_depend_on_the_thread_count() {
    accuracy::fixture_logits_stay_close(Precision::Bf16, 0.02);

    // The base widths, large enough for both kernels to split their work: a batch of 80 rows
    // (the batch kernel) and a decoding step of 2 rows (the few-row kernel), on 1 and 2
    // threads.
    let mut model = base_widths(false);
    model.quantize(Precision::Bf16).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let ids = |rng: &mut StdRng| {
        use rand::RngExt;
        Array2::from_shape_simple_fn((2, 40), || rng.random_range(0..8000u32))
    };
    let (src, tgt) = (ids(&mut rng), ids(&mut rng));
    let run = |threads: usize| {
        common::in_pool(threads, || {
            let logits = model.forward(src.view(), tgt.view(), None, None).unwrap();
            let memory = model.encode(src.view(), None).unwrap();
            let mut cache = model.start_decoding(memory.view(), None).unwrap();
            let step = model.decode_step(tgt.column(0), &mut cache).unwrap();
            (logits, step)
        })
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn weights_bf16_cannot_hold_are_errors_that_name_them_and_leave_the_layer_unchanged() {
    use ndtransformer::{Error, Linear};
    let mut w = Array2::from_shape_fn((3, 4), |(o, i)| (o * 4 + i) as f32 * 0.1);
    w[[1, 2]] = f32::NAN;
    let mut nan = Linear::new(w.clone(), None).unwrap();
    let err = nan.quantize(Precision::Bf16).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { index, .. } if index == &[1, 2]),
        "{err}"
    );
    // Finite, but beyond bf16's largest value (3.39e38): it would round to infinity.
    w[[1, 2]] = f32::MAX;
    let mut huge = Linear::new(w.clone(), None).unwrap();
    let err = huge.quantize(Precision::Bf16).unwrap_err();
    assert!(
        matches!(&err, Error::Config { .. }) && err.to_string().contains("[1, 2]"),
        "{err}"
    );
    assert_eq!(huge.precision(), Precision::F32);
    assert_eq!(huge.weight(), w);
    // bf16's largest finite value converts, and stays.
    w[[1, 2]] = f32::from_bits(0x7F7F_0000);
    let mut largest = Linear::new(w.clone(), None).unwrap();
    largest.quantize(Precision::Bf16).unwrap();
    assert_eq!(largest.weight()[[1, 2]], w[[1, 2]]);
}
