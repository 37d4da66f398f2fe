//! The accuracy of a reduced precision on the real models, the same checks for each precision
//! (`tests/int8.rs`, `tests/bf16.rs`).

use std::time::Instant;

use ndarray::{Array2, Array3};
use ndtransformer::{LoadOptions, Precision, SentenceEncoder, Transformer};

use crate::common::{self, cosine, fixtures_dir, rankings, TensorFile};
use crate::{dates, minilm};

/// The trained dates model in `precision` keeps at least 99.5% exact matches on the 5000
/// held-out dates (f32: all of them); prints the count and the weights' bytes.
pub fn dates_model_stays_99_5_percent_exact(precision: Precision) {
    let mut m = dates::DatesModel::load(&dates::default_assets_dir()).unwrap();
    let f32_bytes = m.model.parameter_bytes();
    m.model.quantize(precision).unwrap();
    assert_eq!(m.model.precision(), precision);
    let examples = dates::held_out_sample(5000, 2017);
    let start = Instant::now();
    let mut eval = dates::Evaluation::default();
    for chunk in examples.chunks(500) {
        let sources: Vec<&str> = chunk.iter().map(|e| e.source.as_str()).collect();
        eval.record(chunk, &m.translate(&sources).unwrap());
    }
    println!(
        "dates model, {precision}: {}/{} = {:.2} % exact in {:.2?}; weights {} of {} bytes in f32; \
         misses {:?}",
        eval.correct,
        eval.total,
        100.0 * eval.accuracy(),
        start.elapsed(),
        m.model.parameter_bytes(),
        f32_bytes,
        eval.failures
    );
    assert!(eval.accuracy() >= 0.995, "{:?}", eval.failures);
}

/// all-MiniLM-L6-v2 in `precision`: every fixture sentence's embedding has cosine at least
/// `min_cosine` with f32's, and the embed example's ranking and nearest neighbours are f32's;
/// prints the lowest cosine and the weights' bytes.
pub fn minilm_keeps_cosine_and_ranking(precision: Precision, min_cosine: f32) {
    let dir = minilm::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let f32_model = SentenceEncoder::load(&dir).unwrap();
    let mut reduced = SentenceEncoder::load(&dir).unwrap();
    reduced.quantize(precision).unwrap();
    assert_eq!(reduced.model().precision(), precision);

    // The fixture's 21 sentences, tokenised by Python.
    let r = TensorFile::read(&fixtures_dir().join("minilm/reference.safetensors"));
    let (ids, mask, types) = (
        r.ids("input_ids"),
        r.ids("attention_mask"),
        r.ids("token_type_ids"),
    );
    let exact = f32_model
        .embed(ids.view(), mask.view(), Some(types.view()))
        .unwrap();
    let embeddings = reduced
        .embed(ids.view(), mask.view(), Some(types.view()))
        .unwrap();
    let worst = exact
        .rows()
        .into_iter()
        .zip(embeddings.rows())
        .map(|(a, b)| cosine(a, b))
        .fold(1.0f32, f32::min);
    println!(
        "all-MiniLM-L6-v2 {precision}: lowest cosine with f32 over {} sentences {worst:.6}; weights {} \
         of {} bytes",
        exact.nrows(),
        reduced.model().parameter_bytes(),
        f32_model.model().parameter_bytes()
    );
    assert!(worst >= min_cosine, "lowest cosine {worst}");

    // The embed example's sentences and query: the query's ranking of the sentences and each
    // sentence's nearest neighbour are those of f32.
    let tokenizer = minilm::tokenizer(&dir, 256).unwrap();
    let mut texts = minilm::DEMO.to_vec();
    texts.push(minilm::DEMO_QUERY);
    let batch = minilm::tokenize(&tokenizer, &texts).unwrap();
    let embed = |m: &SentenceEncoder| -> Array2<f32> {
        m.embed(
            batch.ids.view(),
            batch.attention_mask.view(),
            Some(batch.token_types.view()),
        )
        .unwrap()
    };
    let (exact, ours) = (
        rankings(embed(&f32_model).view()),
        rankings(embed(&reduced).view()),
    );
    let query = texts.len() - 1;
    assert_eq!(ours[query], exact[query], "the query's ranking");
    for i in 0..query {
        assert_eq!(
            ours[i][0], exact[i][0],
            "nearest neighbour of {:?}",
            texts[i]
        );
    }
}

/// The fixture model `tiny_postln_relu` loaded in `precision`: its logits are within
/// `tolerance` times the largest f32 logit of f32's; returns the model and those logits.
pub fn fixture_logits_stay_close(
    precision: Precision,
    tolerance: f32,
) -> (Transformer, Array3<f32>) {
    let fixture = common::Fixture::load("tiny_postln_relu");
    let exact = fixture.model();
    let reduced = Transformer::from_safetensors(
        fixture.config(),
        &fixture.bytes,
        &LoadOptions {
            precision: Some(precision),
            ..LoadOptions::with_prefix("weights.")
        },
    )
    .unwrap();
    assert_eq!(reduced.precision(), precision);
    let (src, tgt) = (fixture.ids("io.src_ids"), fixture.ids("io.tgt_ids"));
    let a: Array3<f32> = exact.forward(src.view(), tgt.view(), None, None).unwrap();
    let b = reduced.forward(src.view(), tgt.view(), None, None).unwrap();
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    println!(
        "tiny fixture model: {precision} logits within {err:e} of f32 (largest |logit| {scale})"
    );
    assert!(
        err <= tolerance * scale,
        "{precision} error {err} against logits up to {scale}"
    );
    (reduced, b)
}
