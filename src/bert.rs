//! Hugging Face BERT checkpoints: `config.json` and `model.safetensors` into an [`EncoderModel`].
//!
//! BERT is the paper's encoder (§3.1) with a learned position table, token-type embeddings, a
//! LayerNorm on the embeddings, unscaled embeddings, exact GELU and no final stack norm — the
//! options of [`EmbeddingConfig::bert`] with `final_norm: false`. The names are those of
//! `transformers.BertModel.state_dict()`:
//!
//! ```text
//! embeddings.word_embeddings.weight              [vocab, d_model]
//! embeddings.position_embeddings.weight          [max_position_embeddings, d_model]
//! embeddings.token_type_embeddings.weight        [type_vocab, d_model]
//! embeddings.LayerNorm.{weight,bias}
//! encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
//! encoder.layer.{i}.attention.output.dense.{weight,bias}       W_O (§3.2.2)
//! encoder.layer.{i}.attention.output.LayerNorm.{weight,bias}   norm after self-attention
//! encoder.layer.{i}.intermediate.dense.{weight,bias}           FFN W_1 (§3.3)
//! encoder.layer.{i}.output.dense.{weight,bias}                 FFN W_2
//! encoder.layer.{i}.output.LayerNorm.{weight,bias}             norm after the FFN
//! ```
//!
//! These are renames of the crate's own parameter names ([`EncoderModel::named_parameters`]),
//! the `BERT` table of `src/naming.rs`.
//!
//! `embeddings.position_ids` (a buffer) and `pooler.dense.*` (a classification head that
//! sentence embeddings do not use) are recognised and skipped, even when loading strictly.

use std::path::Path;

use crate::config::{Activation, EmbeddingConfig, NormPosition, TransformerConfig};
use crate::encoder_model::EncoderModel;
use crate::error::{Error, Result};
use crate::naming;
use crate::parameters::Scope;
use crate::weights::{file_tensors, serialize, LoadOptions, Reader};

/// Tensors a BERT checkpoint may hold that an encoder does not use.
const SKIPPED: [&str; 3] = [
    "embeddings.position_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
];

/// Reads a Hugging Face BERT `config.json` into the crate's configuration.
///
/// `hidden_size` → `d_model`, `num_attention_heads` → `num_heads`, `intermediate_size` → `d_ff`,
/// `num_hidden_layers` → `num_encoder_layers`, `vocab_size` → `src_vocab`,
/// `max_position_embeddings` → `max_len`, `type_vocab_size` → `embedding.type_vocab`,
/// `layer_norm_eps`, `hidden_act` (`gelu` or `relu`). The decoder fields are zero.
///
/// # Errors
/// [`Error::Config`] naming the field for invalid JSON, a missing or non-integer field, a
/// `model_type` other than `bert`, an activation other than exact `gelu`/`relu`, a
/// `position_embedding_type` other than `absolute`, or values `validate_encoder` rejects.
pub fn config_from_json(text: &str) -> Result<TransformerConfig> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config("config.json", format!("not valid JSON: {e}")))?;
    let int = |field: &'static str| -> Result<usize> {
        json.get(field)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                Error::config(
                    field,
                    format!(
                        "{field} is {}, expected a non-negative integer",
                        json.get(field)
                            .map_or("missing".to_string(), |v| v.to_string())
                    ),
                )
            })
    };
    let text_field = |field: &str| json.get(field).and_then(|v| v.as_str());
    if let Some(kind) = text_field("model_type") {
        if kind != "bert" {
            return Err(Error::config(
                "model_type",
                format!("model_type \"{kind}\" is not a BERT model (expected \"bert\")"),
            ));
        }
    }
    let activation = match text_field("hidden_act").unwrap_or("gelu") {
        "gelu" => Activation::Gelu,
        "relu" => Activation::Relu,
        other => {
            return Err(Error::config(
                "hidden_act",
                format!(
                    "hidden_act \"{other}\" is not supported (exact \"gelu\" and \"relu\" are)"
                ),
            ))
        }
    };
    if let Some(kind) = text_field("position_embedding_type") {
        if kind != "absolute" {
            return Err(Error::config(
                "position_embedding_type",
                format!("position_embedding_type \"{kind}\" is not supported (\"absolute\" is)"),
            ));
        }
    }
    let eps = match json.get("layer_norm_eps") {
        None => 1e-12,
        Some(v) => v.as_f64().ok_or_else(|| {
            Error::config(
                "layer_norm_eps",
                format!("layer_norm_eps is {v}, expected a number"),
            )
        })? as f32,
    };
    let config = TransformerConfig {
        d_model: int("hidden_size")?,
        num_heads: int("num_attention_heads")?,
        d_ff: int("intermediate_size")?,
        num_encoder_layers: int("num_hidden_layers")?,
        num_decoder_layers: 0,
        src_vocab: int("vocab_size")?,
        tgt_vocab: 0,
        max_len: int("max_position_embeddings")?,
        activation,
        norm_position: NormPosition::Post,
        layer_norm_eps: eps,
        share_embeddings: false,
        tie_output_projection: false,
        embedding: EmbeddingConfig::bert(match json.get("type_vocab_size") {
            None => 0,
            Some(_) => int("type_vocab_size")?,
        }),
        final_norm: false,
    };
    config.validate_encoder()?;
    Ok(config)
}

impl EncoderModel {
    /// Builds a model from safetensors bytes in Hugging Face's BERT names (see
    /// [the module docs](crate::bert)).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; [`Error::Safetensors`] for bytes that are not
    /// safetensors; [`Error::MissingTensor`], [`Error::TensorShape`] and
    /// [`Error::TensorDtype`] naming the tensor; with `options.strict`,
    /// [`Error::UnexpectedTensors`] listing unused names.
    pub fn from_hf_bert(
        config: TransformerConfig,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        let mut r = Reader::new(bytes, &naming::BERT, options)?;
        let mut model = EncoderModel::from_scope(&mut Scope::root(&mut r), config)?;
        r.finish(options, &SKIPPED)?;
        if let Some(precision) = options.precision {
            model.quantize(precision)?;
        }
        Ok(model)
    }

    /// Loads a Hugging Face BERT directory: `config.json` and `model.safetensors`, strictly.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file if one cannot be read, then as
    /// [`config_from_json`] and [`from_hf_bert`](Self::from_hf_bert).
    pub fn load_hf_bert(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = config_from_json(&read_text(&dir.join("config.json"))?)?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_hf_bert(config, &bytes, &LoadOptions::default())
    }

    /// The weights as safetensors bytes in Hugging Face's BERT names, which
    /// [`from_hf_bert`](Self::from_hf_bert) reads back exactly.
    ///
    /// # Errors
    /// [`Error::Safetensors`] if serialisation fails.
    pub fn to_hf_bert_safetensors(&self) -> Result<Vec<u8>> {
        serialize(file_tensors(self, &naming::BERT)?)
    }
}

/// Reads a UTF-8 file, naming it in the error.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::{rngs::StdRng, SeedableRng};

    const MINI: &str = r#"{"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
        "intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 30,
        "max_position_embeddings": 12, "type_vocab_size": 2, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12}"#;

    #[test]
    fn reads_a_bert_config() {
        let c = config_from_json(MINI).unwrap();
        assert_eq!((c.d_model, c.num_heads, c.d_ff), (8, 2, 16));
        assert_eq!((c.num_encoder_layers, c.src_vocab, c.max_len), (2, 30, 12));
        assert_eq!(c.embedding, EmbeddingConfig::bert(2));
        assert_eq!(c.activation, Activation::Gelu);
        assert!(!c.final_norm && c.layer_norm_eps == 1e-12);
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                MINI.replace("\"hidden_size\": 8", "\"hidden_size\": 9"),
                "d_model 9 is not divisible by num_heads 2",
            ),
            (
                MINI.replace("\"hidden_size\": 8,", ""),
                "hidden_size is missing",
            ),
            (
                MINI.replace("\"gelu\"", "\"gelu_new\""),
                "hidden_act \"gelu_new\"",
            ),
            (
                MINI.replace("\"bert\"", "\"roberta\""),
                "model_type \"roberta\"",
            ),
            ("{".to_string(), "not valid JSON"),
        ];
        for (text, expected) in cases {
            let err = config_from_json(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }

    #[test]
    fn damaged_files_are_errors() {
        let config = config_from_json(MINI).unwrap();
        let bytes = EncoderModel::new(config.clone(), &mut StdRng::seed_from_u64(6))
            .unwrap()
            .to_hf_bert_safetensors()
            .unwrap();
        for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
            let err =
                EncoderModel::from_hf_bert(config.clone(), &bytes[..cut], &LoadOptions::default())
                    .unwrap_err();
            assert!(matches!(err, Error::Safetensors(_)), "cut at {cut}: {err}");
        }
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert!(EncoderModel::from_hf_bert(config, &noise, &LoadOptions::default()).is_err());
    }

    #[test]
    fn hf_names_round_trip_exactly() {
        let config = config_from_json(MINI).unwrap();
        let model = EncoderModel::new(config.clone(), &mut StdRng::seed_from_u64(5)).unwrap();
        let bytes = model.to_hf_bert_safetensors().unwrap();
        let back =
            EncoderModel::from_hf_bert(config.clone(), &bytes, &LoadOptions::default()).unwrap();
        assert_eq!(back, model);
        let ids = array![[1u32, 2, 3]];
        assert_eq!(
            back.forward(ids.view(), None, None).unwrap(),
            model.forward(ids.view(), None, None).unwrap()
        );
        // An int8 model is written as int8 values with their scales and read back as it was.
        let mut int8 = model.clone();
        int8.quantize(crate::Precision::Int8).unwrap();
        let int8_bytes = int8.to_hf_bert_safetensors().unwrap();
        let back = EncoderModel::from_hf_bert(config.clone(), &int8_bytes, &LoadOptions::default())
            .unwrap();
        assert_eq!(back, int8);
        // A bigger vocabulary in the config than in the file names the tensor and shapes.
        let other = TransformerConfig {
            src_vocab: 31,
            ..config
        };
        let err = EncoderModel::from_hf_bert(other, &bytes, &LoadOptions::default()).unwrap_err();
        match err {
            Error::TensorShape {
                name,
                expected,
                found,
            } => {
                assert_eq!(name, "embeddings.word_embeddings.weight");
                assert_eq!((expected, found), (vec![31, 8], vec![30, 8]));
            }
            other => panic!("expected a shape error, got {other:?}"),
        }
    }
}
