//! Int8 models on real weights: the trained dates model keeps its held-out accuracy,
//! all-MiniLM-L6-v2 keeps its embeddings and their similarity ranking, quantized weights take
//! a fraction of the memory, and the conversion's errors name what is wrong.
//!
//! `cargo test --test int8 -- --nocapture` prints the figures.

mod accuracy;
mod common;
// Shared with the examples; this file uses part of it.
#[allow(dead_code)]
#[path = "../examples/dates/mod.rs"]
mod dates;
#[path = "../examples/minilm/mod.rs"]
mod minilm;

use ndtransformer::{LoadOptions, Precision, Transformer, TransformerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn the_dates_model_stays_at_least_99_5_percent_exact_on_5000_held_out_dates_in_int8() {
    accuracy::dates_model_stays_99_5_percent_exact(Precision::Int8);
}

#[test]
fn minilm_int8_embeddings_keep_cosine_0_995_and_the_similarity_ranking() {
    accuracy::minilm_keeps_cosine_and_ranking(Precision::Int8, 0.995);
}

/// The base model's widths, with one layer a stack and a vocabulary of 8000.
fn base_widths() -> Transformer {
    let config = TransformerConfig {
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        ..TransformerConfig::base(8000, 8000)
    };
    Transformer::new(config, &mut StdRng::seed_from_u64(0)).unwrap()
}

#[test]
fn an_int8_model_takes_at_most_30_percent_of_its_f32_bytes_and_converts_back_exactly() {
    let mut model = base_widths();
    let f32_bytes = model.parameter_bytes();
    let src = ndarray::array![[3u32, 7999, 0, 42]];
    model.quantize(Precision::Int8).unwrap();
    let int8_bytes = model.parameter_bytes();
    println!(
        "base widths, 1 + 1 layers, vocabulary 8000: {f32_bytes} bytes in f32, {int8_bytes} in \
         int8 ({:.1} %)",
        100.0 * int8_bytes as f64 / f32_bytes as f64
    );
    // Every matrix, the embedding tables included, takes a byte a weight plus a scale a row;
    // the tied output projection shares its table's int8 values.
    assert_eq!(model.src_embedding().precision(), Precision::Int8);
    assert_eq!(model.tgt_embedding().precision(), Precision::Int8);
    assert!(
        10 * int8_bytes <= 3 * f32_bytes,
        "{int8_bytes} of {f32_bytes}"
    );
    let embedded = model.embed_source(src.view()).unwrap();
    // Saved as int8 values with their scales, the file is as small and loads back as int8.
    let bytes = model.to_safetensors().unwrap();
    println!("saved: {} bytes", bytes.len());
    assert!(10 * bytes.len() <= 3 * f32_bytes, "{} bytes", bytes.len());
    let loaded =
        Transformer::from_safetensors(model.config().clone(), &bytes, &LoadOptions::default())
            .unwrap();
    assert_eq!(loaded, model);
    // Converting back gives the int8 values' f32 weights; converting again gives the same int8.
    let owned = |m: &Transformer| -> Vec<(String, ndarray::ArrayD<f32>)> {
        m.named_parameters()
            .into_iter()
            .map(|(n, v)| (n, v.into_owned()))
            .collect()
    };
    let once = owned(&model);
    model.quantize(Precision::F32).unwrap();
    assert_eq!(model.precision(), Precision::F32);
    assert_eq!(model.parameter_bytes(), f32_bytes);
    let back = owned(&model);
    assert_eq!(back, once);
    // An int8 table's lookup gives the floats of its f32 copy.
    assert_eq!(model.embed_source(src.view()).unwrap(), embedded);
    model.quantize(Precision::Int8).unwrap();
    let again = owned(&model);
    assert_eq!(again, once);
}

#[test]
fn an_int8_forward_stays_close_to_f32_on_a_fixture_model_at_any_thread_count() {
    let (int8, b) = accuracy::fixture_logits_stay_close(Precision::Int8, 0.05);
    let fixture = common::Fixture::load("tiny_postln_relu");
    let (src, tgt) = (fixture.ids("io.src_ids"), fixture.ids("io.tgt_ids"));
    let c = common::in_pool(1, || {
        int8.forward(src.view(), tgt.view(), None, None).unwrap()
    });
    assert_eq!(b, c);
}
