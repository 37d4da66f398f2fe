//! Sentence embeddings: an encoder, pooling and normalisation, as sentence-transformers runs
//! them.
//!
//! A sentence-transformers model directory holds a Hugging Face BERT checkpoint
//! (`config.json`, `model.safetensors`) plus `modules.json`, which lists the steps after the
//! encoder: a `Pooling` module (its `config.json` says which mode) and usually `Normalize`.
//! [`SentenceEncoder::load`] reads them all, so any BERT-style sentence model works, not one
//! model hard-coded. Tokenisation stays outside the crate: pass the ids and attention mask of
//! the model's `tokenizer.json` (for example with Hugging Face's `tokenizers` crate, as
//! `examples/embed.rs` does), truncated to [`max_seq_length`](SentenceEncoder::max_seq_length).

use std::collections::HashMap;
use std::path::Path;

use ndarray::{Array2, ArrayView2};

use crate::bert::read_text;
use crate::encoder_model::EncoderModel;
use crate::error::{Error, Result};
use crate::mask::KeyPaddingMask;
use crate::pooling::{l2_normalize, pool, Pooling};

/// An [`EncoderModel`] followed by pooling and optional L2 normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceEncoder {
    model: EncoderModel,
    pooling: Vec<Pooling>,
    normalize: bool,
    max_seq_length: Option<usize>,
}

impl SentenceEncoder {
    /// From its parts.
    ///
    /// # Errors
    /// [`Error::Empty`] if `pooling` is empty.
    pub fn new(
        model: EncoderModel,
        pooling: Vec<Pooling>,
        normalize: bool,
        max_seq_length: Option<usize>,
    ) -> Result<Self> {
        if pooling.is_empty() {
            return Err(Error::Empty {
                what: "pooling modes".into(),
                shape: vec![0],
            });
        }
        Ok(SentenceEncoder {
            model,
            pooling,
            normalize,
            max_seq_length,
        })
    }

    /// Loads a sentence-transformers model directory: the BERT checkpoint
    /// ([`EncoderModel::load_hf_bert`]), `modules.json`, the pooling config and
    /// `sentence_bert_config.json` (for `max_seq_length`, optional).
    ///
    /// # Errors
    /// [`Error::Io`] naming a missing file (for a missing directory, the path that was
    /// looked for); [`Error::Config`] for a file that does not say what it must, or a module
    /// this crate does not run; then as [`EncoderModel::load_hf_bert`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model directory (tools/fetch_model.py downloads all-MiniLM-L6-v2)",
                ),
            });
        }
        let files = SentenceTransformersFiles::read(dir)?;
        let model = EncoderModel::load_hf_bert(dir)?;
        let pooling = Pooling::from_sentence_transformers_json(&files.pooling_config)?;
        Self::new(model, pooling, files.normalize, files.max_seq_length)
    }

    /// The encoder.
    pub fn model(&self) -> &EncoderModel {
        &self.model
    }

    /// Converts the encoder's linear layers to `precision`, in place
    /// ([`EncoderModel::quantize`]).
    ///
    /// # Errors
    /// As [`EncoderModel::quantize`]; the model is unchanged then.
    pub fn quantize(&mut self, precision: crate::Precision) -> Result<()> {
        self.model.quantize(precision)
    }

    /// The pooling modes, concatenated in this order.
    pub fn pooling(&self) -> &[Pooling] {
        &self.pooling
    }

    /// Whether embeddings are scaled to unit length.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// The longest input the model was trained for (tokens, special ones included); truncate
    /// to it when tokenising. `None` if the directory does not say.
    pub fn max_seq_length(&self) -> Option<usize> {
        self.max_seq_length
    }

    /// Width of an embedding: `d_model` times the number of pooling modes.
    pub fn dim(&self) -> usize {
        self.model.config().d_model * self.pooling.len()
    }

    /// Embeds a batch of tokenised sentences.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]`, padded
    /// - `attention_mask`: `[batch, seq]`, non-zero for real tokens (the tokenizer's)
    /// - `token_types`: `[batch, seq]`, `None` for type 0 everywhere
    /// - returns `[batch, dim]`
    ///
    /// # Errors
    /// [`Error::Shape`] if the mask's shape differs from the ids'; then as
    /// [`EncoderModel::forward`].
    pub fn embed(
        &self,
        ids: ArrayView2<u32>,
        attention_mask: ArrayView2<u32>,
        token_types: Option<ArrayView2<u32>>,
    ) -> Result<Array2<f32>> {
        if attention_mask.dim() != ids.dim() {
            return Err(Error::shape(
                "attention mask",
                format!("[batch, seq] = {:?}", [ids.nrows(), ids.ncols()]),
                attention_mask.shape(),
            ));
        }
        let padding = KeyPaddingMask::from_attention_mask(attention_mask);
        let hidden = self.model.forward(ids, token_types, Some(&padding))?;
        let mut out = pool(hidden.view(), Some(&padding), &self.pooling)?;
        if self.normalize {
            l2_normalize(out.view_mut());
        }
        Ok(out)
    }
}

/// Reads the sentence-transformers files of a model directory: `modules.json` (which modules
/// follow the encoder), the pooling module's `config.json`, and `sentence_bert_config.json`.
struct SentenceTransformersFiles {
    pooling_config: String,
    normalize: bool,
    max_seq_length: Option<usize>,
}

impl SentenceTransformersFiles {
    fn read(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules: serde_json::Value = serde_json::from_str(&read_text(&modules_path)?)
            .map_err(|e| Error::config("modules.json", format!("not valid JSON: {e}")))?;
        let modules: HashMap<String, String> = modules
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let kind = m.get("type")?.as_str()?;
                let path = m.get("path")?.as_str()?;
                Some((kind.to_string(), path.to_string()))
            })
            .collect();
        let pooling_path = modules
            .iter()
            .find(|(kind, _)| kind.ends_with(".Pooling"))
            .map(|(_, path)| path.clone())
            .ok_or_else(|| {
                Error::config(
                    "modules.json",
                    format!(
                        "{} lists no sentence_transformers.models.Pooling module",
                        modules_path.display()
                    ),
                )
            })?;
        let normalize = modules.keys().any(|kind| kind.ends_with(".Normalize"));
        if let Some(kind) = modules.keys().find(|kind| {
            !(kind.ends_with(".Transformer")
                || kind.ends_with(".Pooling")
                || kind.ends_with(".Normalize"))
        }) {
            return Err(Error::config(
                "modules.json",
                format!("module {kind} is not supported (Transformer, Pooling, Normalize are)"),
            ));
        }
        let pooling_config = read_text(&dir.join(&pooling_path).join("config.json"))?;
        let st_config = dir.join("sentence_bert_config.json");
        let max_seq_length = if st_config.exists() {
            let json: serde_json::Value =
                serde_json::from_str(&read_text(&st_config)?).map_err(|e| {
                    Error::config("sentence_bert_config.json", format!("not valid JSON: {e}"))
                })?;
            json.get("max_seq_length")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        } else {
            None
        };
        Ok(SentenceTransformersFiles {
            pooling_config,
            normalize,
            max_seq_length,
        })
    }
}
