//! Hugging Face Marian checkpoints (the Helsinki-NLP OPUS-MT translation models):
//! `config.json`, `generation_config.json` and `model.safetensors` into a [`Transformer`] and
//! its [`GenerateOptions`].
//!
//! Marian is the paper's encoder-decoder (§3.1) in the post-LN order, with these differences,
//! each an option of the existing configuration:
//!
//! - positions are §3.5's sinusoids laid out as all sines, then all cosines
//!   ([`Positions::SinusoidalHalves`]); decoder positions count from 0 at the start token;
//! - embeddings are scaled by √d_model only if `scale_embedding` (opus-mt: yes);
//! - the feed-forward activation is `activation_function`: `swish`/`silu` (opus-mt),
//!   `gelu`, `gelu_new` (GELU's tanh form) or `relu`;
//! - the logits get a bias, `final_logits_bias`;
//! - neither stack ends with a LayerNorm (`final_norm: false`);
//! - source and target share one table (`share_encoder_decoder_embeddings`, opus-mt) or have
//!   their own, and the output projection is tied to the target table
//!   (`tie_word_embeddings`);
//! - decoding starts from `decoder_start_token_id` (the `<pad>` id in opus-mt), not a BOS.
//!
//! The tensor names are those of `transformers.MarianMTModel.state_dict()`:
//!
//! ```text
//! model.shared.weight                                  [vocab, d_model]   (shared tables)
//! model.encoder.embed_tokens.weight                    [vocab, d_model]   (separate tables)
//! model.decoder.embed_tokens.weight                    [decoder_vocab, d_model]
//! model.{encoder,decoder}.embed_positions.weight       [max_position_embeddings, d_model]
//! model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
//! model.encoder.layers.{i}.self_attn_layer_norm.{weight,bias}
//! model.encoder.layers.{i}.fc1.{weight,bias}           FFN W₁ (§3.3)
//! model.encoder.layers.{i}.fc2.{weight,bias}           FFN W₂
//! model.encoder.layers.{i}.final_layer_norm.{weight,bias}
//! model.decoder.layers.{i}.self_attn.*, self_attn_layer_norm.*
//! model.decoder.layers.{i}.encoder_attn.{q,k,v,out}_proj.*, encoder_attn_layer_norm.*
//! model.decoder.layers.{i}.fc1.*, fc2.*, final_layer_norm.*
//! lm_head.weight                                       [decoder_vocab, d_model] (when untied)
//! final_logits_bias                                    [1, decoder_vocab]
//! ```
//!
//! Copies of a shared or tied table (`model.encoder.embed_tokens.weight`, `lm_head.weight`, …)
//! may be present and must then hold the same values. The position tables, when present, are
//! checked against the sinusoids the crate computes (within 1e-6) and not stored.
//!
//! ```no_run
//! use ndtransformer::marian::MarianCheckpoint;
//! let opus = MarianCheckpoint::load("opus-mt-en-de")?;
//! // Source ids from the checkpoint's SentencePiece model, `</s>` last, padded with
//! // `opus.pad_id`; then beam search with the checkpoint's own settings.
//! let src = ndarray::array![[38u32, 2108, 3, 0]];
//! let best = opus.model.generate(src.view(), None, &opus.generation)?;
//! # Ok::<(), ndtransformer::Error>(())
//! ```

use std::path::Path;

use ndarray::Array2;
use serde_json::Value;

use crate::bert::read_text;
use crate::config::{Activation, EmbeddingConfig, NormPosition, Positions, TransformerConfig};
use crate::decoding::{GenerateOptions, LengthPenalty, MaxLength};
use crate::error::{Error, Result};
use crate::naming::{self, Naming};
use crate::parameters::Scope;
use crate::positional::PositionalEncoding;
use crate::transformer::Transformer;
use crate::weights::{file_tensors, serialize, LoadOptions, Reader};

/// What a Marian `config.json` says: the model's configuration and its special tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct MarianConfig {
    /// The architecture, in the crate's terms.
    pub transformer: TransformerConfig,
    /// The id that pads source rows (`pad_token_id`).
    pub pad_id: u32,
    /// The id that ends a sequence (`eos_token_id`); the tokenizer appends it to every source.
    pub eos_id: u32,
    /// The token the decoder starts from (`decoder_start_token_id`).
    pub decoder_start_id: u32,
    /// Whether an output that reaches the maximum length ends with EOS
    /// (`forced_eos_token_id` equal to `eos_token_id`).
    pub forced_eos: bool,
}

/// One JSON object's fields, read with `transformers`' defaults and errors that name the field.
struct Fields<'a> {
    json: &'a Value,
}

impl Fields<'_> {
    fn get(&self, field: &'static str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    fn wrong(&self, field: &'static str, expected: &str) -> Error {
        let found = self
            .get(field)
            .map_or("missing".to_string(), |v| v.to_string());
        Error::config(field, format!("{field} is {found}, expected {expected}"))
    }

    fn int(&self, field: &'static str, default: Option<u64>) -> Result<u64> {
        match self.get(field) {
            None => default.ok_or_else(|| self.wrong(field, "a non-negative integer")),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.wrong(field, "a non-negative integer")),
        }
    }

    fn usize(&self, field: &'static str, default: u64) -> Result<usize> {
        Ok(self.int(field, Some(default))? as usize)
    }

    fn id(&self, field: &'static str, default: Option<u64>) -> Result<u32> {
        let v = self.int(field, default)?;
        u32::try_from(v).map_err(|_| self.wrong(field, "a token id below 2³²"))
    }

    /// A token id given as an integer or a list of one integer (`eos_token_id: [0]`).
    fn single_id(&self, field: &'static str, default: Option<u64>) -> Result<Option<u32>> {
        match self.get(field) {
            None => default.map(|d| self.id(field, Some(d))).transpose(),
            Some(Value::Array(ids)) => match ids.as_slice() {
                [one] => one
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| self.wrong(field, "a token id")),
                _ => Err(Error::config(
                    field,
                    format!(
                        "{field} lists {} ids; the crate ends outputs on one EOS id",
                        ids.len()
                    ),
                )),
            },
            Some(_) => self.id(field, None).map(Some),
        }
    }

    fn bool(&self, field: &'static str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(field, "true or false")),
        }
    }

    fn float(&self, field: &'static str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.wrong(field, "a number")),
        }
    }

    fn text(&self, field: &'static str, default: &'static str) -> Result<String> {
        match self.get(field) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.wrong(field, "a string")),
        }
    }
}

fn parse(text: &str, file: &'static str) -> Result<Value> {
    let json: Value = serde_json::from_str(text)
        .map_err(|e| Error::config(file, format!("not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(Error::config(file, format!("{file} is not a JSON object")));
    }
    Ok(json)
}

/// The feed-forward activation named by `activation_function` (`transformers`' `ACT2FN`).
fn activation(name: &str) -> Result<Activation> {
    match name {
        "relu" => Ok(Activation::Relu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "swish" | "silu" => Ok(Activation::Silu),
        other => Err(Error::config(
            "activation_function",
            format!(
                "activation_function \"{other}\" is not supported (\"swish\", \"silu\", \
                 \"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\", \"gelu_fast\" and \"relu\" are)"
            ),
        )),
    }
}

/// Reads a Hugging Face `MarianConfig` (`config.json`), with `transformers`' defaults for
/// absent fields.
///
/// `d_model`, `encoder_attention_heads` (= `decoder_attention_heads`) → `num_heads`,
/// `encoder_ffn_dim` (= `decoder_ffn_dim`) → `d_ff`, `encoder_layers` / `decoder_layers`,
/// `vocab_size` → `src_vocab`, `decoder_vocab_size` (default `vocab_size`) → `tgt_vocab`,
/// `max_position_embeddings` → `max_len`, `activation_function`, `scale_embedding`,
/// `share_encoder_decoder_embeddings` → `share_embeddings`, `tie_word_embeddings` →
/// `tie_output_projection`; post-LN, LayerNorm ε 1e-5, no final stack norm, sinusoids in
/// halves. Special tokens: `pad_token_id`, `eos_token_id`, `decoder_start_token_id`,
/// `forced_eos_token_id`.
///
/// # Errors
/// [`Error::Config`] naming the field for invalid JSON, a field of the wrong type, a
/// `model_type` other than `marian`, an unsupported activation, encoder and decoder widths or
/// head counts that differ, shared embeddings over two vocabulary sizes, a special token
/// outside its vocabulary, or values [`TransformerConfig::validate`] rejects.
pub fn config_from_json(text: &str) -> Result<MarianConfig> {
    let json = parse(text, "config.json")?;
    let f = Fields { json: &json };
    let kind = f.text("model_type", "marian")?;
    if kind != "marian" {
        return Err(Error::config(
            "model_type",
            format!("model_type \"{kind}\" is not a Marian model (expected \"marian\")"),
        ));
    }
    let same = |a: &'static str, b: &'static str, default: u64| -> Result<usize> {
        let (x, y) = (f.usize(a, default)?, f.usize(b, default)?);
        if x != y {
            return Err(Error::config(
                b,
                format!("{b} {y} differs from {a} {x}; the crate's stacks share one value"),
            ));
        }
        Ok(x)
    };
    let src_vocab = f.usize("vocab_size", 58101)?;
    let tgt_vocab = f.usize("decoder_vocab_size", src_vocab as u64)?;
    let share_embeddings = f.bool("share_encoder_decoder_embeddings", true)?;
    if share_embeddings && tgt_vocab != src_vocab {
        return Err(Error::config(
            "decoder_vocab_size",
            format!(
                "decoder_vocab_size {tgt_vocab} differs from vocab_size {src_vocab}, but \
                 share_encoder_decoder_embeddings is true"
            ),
        ));
    }
    let transformer = TransformerConfig {
        d_model: f.usize("d_model", 1024)?,
        num_heads: same("encoder_attention_heads", "decoder_attention_heads", 16)?,
        d_ff: same("encoder_ffn_dim", "decoder_ffn_dim", 4096)?,
        num_encoder_layers: f.usize("encoder_layers", 12)?,
        num_decoder_layers: f.usize("decoder_layers", 12)?,
        src_vocab,
        tgt_vocab,
        max_len: f.usize("max_position_embeddings", 1024)?,
        activation: activation(&f.text("activation_function", "gelu")?)?,
        norm_position: NormPosition::Post,
        layer_norm_eps: 1e-5,
        share_embeddings,
        tie_output_projection: f.bool("tie_word_embeddings", true)?,
        embedding: EmbeddingConfig {
            scale: f.bool("scale_embedding", false)?,
            positions: Positions::SinusoidalHalves,
            type_vocab: 0,
            norm: false,
        },
        final_norm: false,
    };
    transformer.validate()?;
    let tgt = |field: &'static str, id: u32| -> Result<u32> {
        if id as usize >= tgt_vocab {
            return Err(Error::config(
                field,
                format!("{field} {id} is outside the target vocabulary of {tgt_vocab}"),
            ));
        }
        Ok(id)
    };
    let pad_id = f.id("pad_token_id", Some(58100))?;
    if pad_id as usize >= src_vocab {
        return Err(Error::config(
            "pad_token_id",
            format!("pad_token_id {pad_id} is outside the source vocabulary of {src_vocab}"),
        ));
    }
    let eos_id = tgt(
        "eos_token_id",
        f.single_id("eos_token_id", Some(0))?.unwrap_or(0),
    )?;
    let decoder_start_id = tgt(
        "decoder_start_token_id",
        f.id("decoder_start_token_id", Some(58100))?,
    )?;
    let forced_eos = f.single_id("forced_eos_token_id", Some(0))? == Some(eos_id);
    Ok(MarianConfig {
        transformer,
        pad_id,
        eos_id,
        decoder_start_id,
        forced_eos,
    })
}

/// The generation defaults of a checkpoint, as `transformers`' `generate()` would use them:
/// `generation_config.json` (if given) over `config.json`'s special tokens.
///
/// Read: `decoder_start_token_id` → `bos_id`, `eos_token_id`, `max_length` (counting the start
/// token, default 20) or `max_new_tokens` → `max_len`, `min_length` (counting the start token)
/// or `min_new_tokens` → `min_len`, `num_beams` → `beam_size`, `num_return_sequences`,
/// `length_penalty` (Hugging Face's convention, default 1.0), `repetition_penalty`,
/// `no_repeat_ngram_size`, `bad_words_ids` (lists of one id) and `suppress_tokens` →
/// `suppress_tokens`, `forced_eos_token_id` → `forced_eos`. Sampling settings (`do_sample`,
/// `temperature`, `top_k`, `top_p`) are not part of [`GenerateOptions`]: pass a
/// [`Sampling`](crate::Sampling) to [`Transformer::sample`] instead. The crate applies its
/// logit rules before the log-softmax, which is `renormalize_logits: true` (opus-mt's
/// setting); without it, `transformers`' beam scores of a banned token's neighbours differ.
///
/// # Errors
/// [`Error::Config`] naming the field for invalid JSON, a field of the wrong type, a bad-words
/// entry of more than one token, `early_stopping` other than `false` (the only stopping rule
/// the crate's Hugging Face beam search implements), or `max_length` below 2.
pub fn generation_options(
    config: &MarianConfig,
    generation_config: Option<&str>,
) -> Result<GenerateOptions> {
    let json = match generation_config {
        Some(text) => parse(text, "generation_config.json")?,
        None => Value::Object(Default::default()),
    };
    let f = Fields { json: &json };
    let bos_id = f.id(
        "decoder_start_token_id",
        Some(config.decoder_start_id.into()),
    )?;
    let eos_id = f.single_id("eos_token_id", Some(config.eos_id.into()))?;
    let max_len = match f.get("max_new_tokens") {
        Some(_) => f.usize("max_new_tokens", 0)?,
        None => {
            let max_length = f.usize("max_length", 20)?;
            if max_length < 2 {
                return Err(Error::config(
                    "max_length",
                    format!(
                        "max_length {max_length} leaves no token after the decoder start token"
                    ),
                ));
            }
            max_length - 1
        }
    };
    let min_len = match f.get("min_new_tokens") {
        Some(_) => f.usize("min_new_tokens", 0)?,
        None => f.usize("min_length", 0)?.saturating_sub(1),
    };
    match f.get("early_stopping") {
        None | Some(Value::Bool(false)) => {}
        Some(other) => {
            return Err(Error::config(
                "early_stopping",
                format!(
                    "early_stopping {other} is not supported; the crate's Hugging Face beam \
                     search stops as early_stopping false does"
                ),
            ))
        }
    }
    let mut suppress_tokens = Vec::new();
    if let Some(bad) = f.get("bad_words_ids") {
        let lists = bad
            .as_array()
            .ok_or_else(|| f.wrong("bad_words_ids", "a list of id lists"))?;
        for list in lists {
            match list.as_array().map(Vec::as_slice) {
                Some([id]) => suppress_tokens.push(
                    id.as_u64()
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| f.wrong("bad_words_ids", "lists of token ids"))?,
                ),
                _ => {
                    return Err(Error::config(
                        "bad_words_ids",
                        format!(
                            "bad_words_ids entry {list} is not a single token; the crate \
                             suppresses single tokens only"
                        ),
                    ))
                }
            }
        }
    }
    if let Some(list) = f.get("suppress_tokens") {
        let ids = list
            .as_array()
            .ok_or_else(|| f.wrong("suppress_tokens", "a list of token ids"))?;
        for id in ids {
            suppress_tokens.push(
                id.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| f.wrong("suppress_tokens", "a list of token ids"))?,
            );
        }
    }
    let forced_eos = match f.get("forced_eos_token_id") {
        None => config.forced_eos,
        Some(_) => f.single_id("forced_eos_token_id", None)? == eos_id && eos_id.is_some(),
    };
    let beam_size = f.usize("num_beams", 1)?;
    Ok(GenerateOptions {
        bos_id,
        eos_id,
        max_len: MaxLength::Fixed(max_len),
        min_len,
        beam_size,
        num_return: f.usize("num_return_sequences", 1)?,
        length_penalty: LengthPenalty::HuggingFace(f.float("length_penalty", 1.0)? as f32),
        repetition_penalty: f.float("repetition_penalty", 1.0)? as f32,
        no_repeat_ngram_size: f.usize("no_repeat_ngram_size", 0)?,
        suppress_tokens,
        prefix: Vec::new(),
        alignment_layer: None,
        forced_eos,
    })
}

/// The checkpoint's names for `config`'s embedding layout.
fn names(config: &TransformerConfig) -> &'static Naming {
    if config.share_embeddings {
        &naming::MARIAN_SHARED
    } else {
        &naming::MARIAN_SEPARATE
    }
}

/// The position tables a checkpoint may store; they must equal the crate's sinusoids.
const POSITION_TABLES: [&str; 2] = [
    "model.encoder.embed_positions.weight",
    "model.decoder.embed_positions.weight",
];

/// Checks a stored position table against Marian's sinusoids.
fn check_positions(name: &str, stored: &Array2<f32>, config: &TransformerConfig) -> Result<()> {
    let expected = PositionalEncoding::halves(config.max_len, config.d_model);
    let expected = expected.table(config.max_len)?;
    // The first entry off by more than 1e-6 (NaN included).
    let worst = stored
        .indexed_iter()
        .zip(expected.iter())
        .find(|&((_, &a), &b)| {
            let close = (a - b).abs() <= 1e-6;
            !close
        })
        .map(|((at, _), _)| at);
    match worst {
        None => Ok(()),
        Some((pos, col)) => Err(Error::Safetensors(format!(
            "`{name}` is not Marian's sinusoidal table: [{pos}, {col}] is {}, expected {}",
            stored[[pos, col]],
            expected[[pos, col]]
        ))),
    }
}

impl Transformer {
    /// Builds a model from safetensors bytes in Hugging Face Marian's names (see
    /// [the module docs](crate::marian)); `config` from [`config_from_json`].
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; [`Error::Safetensors`] for bytes that are not
    /// safetensors, a shared table stored twice with different values or a position table
    /// that is not Marian's; [`Error::MissingTensor`], [`Error::TensorShape`] and
    /// [`Error::TensorDtype`] naming the tensor; with `options.strict`,
    /// [`Error::UnexpectedTensors`] listing unused names.
    pub fn from_hf_marian(
        config: TransformerConfig,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        let mut r = Reader::new(bytes, names(&config), options)?;
        for name in POSITION_TABLES {
            let shape = [config.max_len, config.d_model];
            if let Some(table) = r.optional_tensor(name, &shape)? {
                let table = table
                    .into_dimensionality()
                    .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))?;
                check_positions(name, &table, &config)?;
            }
        }
        let mut model = Transformer::from_scope(&mut Scope::root(&mut r), config)?;
        r.finish(options, &[])?;
        if let Some(precision) = options.precision {
            model.quantize(precision)?;
        }
        Ok(model)
    }

    /// The weights as safetensors bytes in Hugging Face Marian's names (shared and tied tables
    /// once, under `model.shared` or the embedding names), which
    /// [`from_hf_marian`](Self::from_hf_marian) reads back exactly.
    ///
    /// # Errors
    /// [`Error::Safetensors`] if serialisation fails.
    pub fn to_hf_marian_safetensors(&self) -> Result<Vec<u8>> {
        let naming = names(self.config());
        let mut tensors = file_tensors(self, naming)?;
        // The walk lists a shared or tied matrix under each of its names; as
        // `save_pretrained`, the file keeps one copy.
        let (shared, tied) = (
            self.config().share_embeddings,
            self.config().tie_output_projection,
        );
        tensors.retain(|(name, _)| {
            !(tied && name == "lm_head.weight"
                || shared && name == "model.decoder.embed_tokens.weight")
        });
        serialize(tensors)
    }
}

/// A Marian checkpoint directory, loaded: the model, its generation defaults and its special
/// tokens.
#[derive(Debug, Clone)]
pub struct MarianCheckpoint {
    /// The encoder-decoder.
    pub model: Transformer,
    /// What `generate()` would do with this checkpoint: beams, lengths, bad words, forced EOS.
    pub generation: GenerateOptions,
    /// Special tokens and the configuration as `config.json` gives them.
    pub config: MarianConfig,
}

impl MarianCheckpoint {
    /// Loads `config.json`, `generation_config.json` (if present) and `model.safetensors` from
    /// `dir`, strictly.
    ///
    /// # Errors
    /// [`Error::Io`] naming a file that cannot be read, then as [`config_from_json`],
    /// [`generation_options`] and [`Transformer::from_hf_marian`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_options(dir, &LoadOptions::default())
    }

    /// As [`load`](Self::load), with loading options (a precision, half-precision files, …).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_with_options(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = config_from_json(&read_text(&dir.join("config.json"))?)?;
        let generation_path = dir.join("generation_config.json");
        let generation_text = if generation_path.exists() {
            Some(read_text(&generation_path)?)
        } else {
            None
        };
        let generation = generation_options(&config, generation_text.as_deref())?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let model = Transformer::from_hf_marian(config.transformer.clone(), &bytes, options)?;
        Ok(MarianCheckpoint {
            model,
            generation,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use rand::{rngs::StdRng, SeedableRng};

    const MINI: &str = r#"{"model_type": "marian", "d_model": 8, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 16, "decoder_ffn_dim": 16,
        "encoder_layers": 2, "decoder_layers": 1, "vocab_size": 30,
        "max_position_embeddings": 12, "activation_function": "swish", "scale_embedding": true,
        "pad_token_id": 29, "eos_token_id": 0, "decoder_start_token_id": 29,
        "forced_eos_token_id": 0, "share_encoder_decoder_embeddings": true}"#;

    #[test]
    fn reads_a_marian_config() {
        let m = config_from_json(MINI).unwrap();
        let c = &m.transformer;
        assert_eq!((c.d_model, c.num_heads, c.d_ff), (8, 2, 16));
        assert_eq!((c.num_encoder_layers, c.num_decoder_layers), (2, 1));
        assert_eq!((c.src_vocab, c.tgt_vocab, c.max_len), (30, 30, 12));
        assert_eq!(c.activation, Activation::Silu);
        assert_eq!(c.embedding.positions, Positions::SinusoidalHalves);
        assert!(c.embedding.scale && c.share_embeddings && c.tie_output_projection);
        assert!(!c.final_norm && c.layer_norm_eps == 1e-5);
        assert_eq!((m.pad_id, m.eos_id, m.decoder_start_id), (29, 0, 29));
        assert!(m.forced_eos);
        // transformers' defaults where config.json is silent.
        let g = generation_options(&m, None).unwrap();
        assert_eq!((g.bos_id, g.eos_id, g.beam_size), (29, Some(0), 1));
        assert_eq!(g.max_len, MaxLength::Fixed(19));
        assert_eq!(g.length_penalty, LengthPenalty::HuggingFace(1.0));
        assert!(g.forced_eos && g.suppress_tokens.is_empty());
    }

    #[test]
    fn reads_a_generation_config() {
        let m = config_from_json(MINI).unwrap();
        let text = r#"{"bad_words_ids": [[29]], "num_beams": 4, "max_length": 512,
            "min_length": 3, "length_penalty": 0.6, "suppress_tokens": [5],
            "no_repeat_ngram_size": 3, "repetition_penalty": 1.2, "renormalize_logits": true}"#;
        let g = generation_options(&m, Some(text)).unwrap();
        assert_eq!(
            (g.beam_size, g.max_len, g.min_len),
            (4, MaxLength::Fixed(511), 2)
        );
        assert_eq!(g.length_penalty, LengthPenalty::HuggingFace(0.6));
        assert_eq!(g.suppress_tokens, vec![29, 5]);
        assert_eq!((g.no_repeat_ngram_size, g.repetition_penalty), (3, 1.2));
        let g = generation_options(&m, Some(r#"{"max_new_tokens": 7, "min_new_tokens": 2}"#));
        let g = g.unwrap();
        assert_eq!((g.max_len, g.min_len), (MaxLength::Fixed(7), 2));
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                MINI.replace("\"d_model\": 8", "\"d_model\": 9"),
                "d_model 9 is not divisible by num_heads 2",
            ),
            (
                MINI.replace("\"d_model\": 8", "\"d_model\": \"8\""),
                "d_model is \"8\", expected a non-negative integer",
            ),
            (
                MINI.replace("\"swish\"", "\"mish\""),
                "activation_function \"mish\" is not supported",
            ),
            (
                MINI.replace("\"decoder_ffn_dim\": 16", "\"decoder_ffn_dim\": 32"),
                "decoder_ffn_dim 32 differs from encoder_ffn_dim 16",
            ),
            (
                MINI.replace("\"marian\"", "\"bart\""),
                "model_type \"bart\" is not a Marian model",
            ),
            (
                MINI.replace(
                    "\"vocab_size\": 30,",
                    "\"vocab_size\": 30, \"decoder_vocab_size\": 31,",
                ),
                "decoder_vocab_size 31 differs from vocab_size 30",
            ),
            (
                MINI.replace("\"pad_token_id\": 29", "\"pad_token_id\": 30"),
                "pad_token_id 30 is outside the source vocabulary of 30",
            ),
            (
                MINI.replace(
                    "\"decoder_start_token_id\": 29",
                    "\"decoder_start_token_id\": 40",
                ),
                "decoder_start_token_id 40 is outside the target vocabulary of 30",
            ),
            (
                MINI.replace("\"eos_token_id\": 0", "\"eos_token_id\": [0, 1]"),
                "eos_token_id lists 2 ids",
            ),
            (
                MINI.replace("\"scale_embedding\": true", "\"scale_embedding\": 1"),
                "scale_embedding is 1, expected true or false",
            ),
            ("[1]".to_string(), "config.json is not a JSON object"),
            ("{".to_string(), "not valid JSON"),
        ];
        for (text, expected) in cases {
            let err = config_from_json(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
        let m = config_from_json(MINI).unwrap();
        let cases = [
            (
                r#"{"bad_words_ids": [[3, 4]]}"#,
                "bad_words_ids entry [3,4] is not a single token",
            ),
            (
                r#"{"early_stopping": true}"#,
                "early_stopping true is not supported",
            ),
            (r#"{"max_length": 1}"#, "max_length 1 leaves no token"),
            (
                r#"{"num_beams": -1}"#,
                "num_beams is -1, expected a non-negative integer",
            ),
            (
                r#"{"length_penalty": "x"}"#,
                "length_penalty is \"x\", expected a number",
            ),
        ];
        for (text, expected) in cases {
            let err = generation_options(&m, Some(text)).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }

    #[test]
    fn marian_names_round_trip_exactly_in_both_layouts() {
        let shared = config_from_json(MINI).unwrap().transformer;
        let separate = TransformerConfig {
            share_embeddings: false,
            tgt_vocab: 20,
            ..shared.clone()
        };
        for config in [shared, separate] {
            let model = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(4)).unwrap();
            let bytes = model.to_hf_marian_safetensors().unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let bias = file.tensor("final_logits_bias").unwrap();
            assert_eq!(bias.shape(), [1, config.tgt_vocab]);
            assert!(
                file.tensor("lm_head.weight").is_err(),
                "a tied head is stored once"
            );
            let back = Transformer::from_hf_marian(config.clone(), &bytes, &Default::default());
            let back = back.unwrap();
            assert_eq!(back, model);
            let (src, tgt) = (array![[1u32, 2, 3]], array![[4u32, 5]]);
            assert_eq!(
                back.forward(src.view(), tgt.view(), None, None).unwrap(),
                model.forward(src.view(), tgt.view(), None, None).unwrap()
            );
        }
    }

    #[test]
    fn stored_position_tables_are_checked() {
        let config = config_from_json(MINI).unwrap().transformer;
        let model = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(4)).unwrap();
        let bytes = model.to_hf_marian_safetensors().unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let with_table = |table: Array2<f32>| {
            let mut tensors: Vec<(String, crate::weights::FileTensor)> = file
                .tensors()
                .into_iter()
                .map(|(name, view)| {
                    let values: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    let t = ndarray::ArrayD::from_shape_vec(view.shape(), values).unwrap();
                    (name, crate::weights::FileTensor::f32(t.into()))
                })
                .collect();
            tensors.push((
                POSITION_TABLES[0].to_string(),
                crate::weights::FileTensor::f32(table.into_dyn().into()),
            ));
            serialize(tensors).unwrap()
        };
        let good = PositionalEncoding::halves(12, 8)
            .table(12)
            .unwrap()
            .to_owned();
        let bytes = with_table(good.clone());
        let back = Transformer::from_hf_marian(config.clone(), &bytes, &Default::default());
        assert_eq!(back.unwrap(), model);
        // The paper's interleaved table is not Marian's.
        let interleaved = PositionalEncoding::new(12, 8).table(12).unwrap().to_owned();
        let err =
            Transformer::from_hf_marian(config, &with_table(interleaved), &Default::default())
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("`model.encoder.embed_positions.weight` is not Marian's sinusoidal table"),
            "{err}"
        );
    }
}
