//! Tokenising for Hugging Face Marian (OPUS-MT) checkpoints exactly as `transformers`'
//! `MarianTokenizer` does, shared by examples and tests
//! (`#[path = "../examples/marian/mod.rs"] mod marian;`).
//!
//! A Marian model directory holds two SentencePiece models (`source.spm`, `target.spm`), the
//! id vocabulary `vocab.json` (piece -> id; shared by both sides unless the tokenizer was saved
//! with `separate_vocabs`, in which case `target_vocab.json` holds the target side's ids) and
//! `tokenizer_config.json` (special tokens and their ids).
//!
//! What `MarianTokenizer` (transformers 5.25) does, and this module reproduces:
//!
//! * **Encoding** (`tokenizer(text)` / `tokenizer(text_target=text)`): the text is first split on
//!   the added special tokens of `tokenizer_config.json` (`</s>`, `<unk>`, `<pad>`), which map
//!   straight to their ids. Each other chunk loses a leading language code `>>xx<<` (kept as one
//!   token, looked up in the vocabulary like any piece), then goes through the source (or
//!   target) SentencePiece model as piece *strings*; each string is looked up in `vocab.json`
//!   (target side with separate vocabularies: `target_vocab.json`), a missing one becomes
//!   `<unk>` (SentencePiece's own ids are never used). Finally `</s>` is appended. A run of
//!   characters the SentencePiece model does not know is one piece (SentencePiece fuses
//!   unknown characters), whose string may still be in the Marian vocabulary when the other
//!   side's model has it as a piece.
//! * **Decoding** with `skip_special_tokens=True`: ids that are added special tokens (the ids
//!   of `tokenizer_config.json`, which are *source* vocabulary ids) are dropped; the others
//!   become strings through the target vocabulary (shared: `vocab.json`). Runs of pieces
//!   between remaining special-token strings are joined by SentencePiece's `decode_pieces` of
//!   the *source* model when the vocabulary is shared (`use_source_tokenizer` defaults to
//!   `not separate_vocabs`) and of the target model otherwise; a special-token string is copied
//!   followed by a space. Then every `▁` becomes a space and the result is stripped. With
//!   separate vocabularies the target `<pad>` id differs from the source one, so it is *not*
//!   skipped and decodes to the text `<pad>`.
//!
//! The SentencePiece side uses the `tokenizers` crate: a `Unigram` model over the `.spm`'s
//! NORMAL pieces and scores, the `.spm`'s `precompiled_charsmap` as a `Precompiled`
//! normaliser followed by SentencePiece's `remove_extra_whitespaces` (collapse runs of spaces,
//! trim) and `add_dummy_prefix`, and a `Metaspace` pre-tokeniser that only turns spaces into
//! `▁` (no splitting, so the Viterbi search sees the whole text as SentencePiece does). The
//! `.spm` protobuf is read with the `sentencepiece-model` crate.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use sentencepiece_model::{SentencePieceModel, Type};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{NormalizerWrapper, Tokenizer};

/// SentencePiece's whitespace symbol.
const SPACE: char = '\u{2581}';
/// What SentencePiece decodes its `<unk>` piece to.
const UNK_SURFACE: &str = " \u{2047} ";

/// One `.spm` model: its encoder as a `tokenizers::Tokenizer` and what decoding needs.
struct Spm {
    path: PathBuf,
    tokenizer: Tokenizer,
    /// Every piece of the model with its type.
    kinds: HashMap<String, Type>,
    /// The model's `<unk>` piece string.
    unk_piece: String,
    /// Piece strings by SentencePiece id (for ids missing from the Marian vocabulary).
    pieces: Vec<String>,
}

impl Spm {
    fn load(path: &Path) -> Result<Self, String> {
        let name = path.display();
        let model = SentencePieceModel::from_file(path).map_err(|e| format!("{name}: {e}"))?;
        let proto = model.model();
        if let Some(trainer) = model.trainer() {
            if trainer.model_type() != sentencepiece_model::ModelType::Unigram {
                return Err(format!(
                    "{name}: model type {:?}; only unigram SentencePiece models are supported",
                    trainer.model_type()
                ));
            }
            if trainer.treat_whitespace_as_suffix() {
                return Err(format!(
                    "{name}: treat_whitespace_as_suffix is not supported"
                ));
            }
        }
        let mut vocab: Vec<(String, f64)> = Vec::with_capacity(proto.pieces.len() + 1);
        // The unknown entry first; its string contains a space, which no text reaches the
        // model with (the pre-tokeniser turns every space into `▁`), so it is never matched.
        vocab.push(("<unk> ".to_string(), 0.0));
        let mut kinds = HashMap::new();
        let mut pieces = Vec::with_capacity(proto.pieces.len());
        let mut unk_piece = None;
        for (id, p) in proto.pieces.iter().enumerate() {
            let piece = p.piece().to_string();
            let kind = p.r#type();
            match kind {
                Type::Normal => vocab.push((piece.clone(), f64::from(p.score()))),
                Type::Unknown => unk_piece = Some(piece.clone()),
                Type::Control | Type::Unused => {}
                Type::UserDefined | Type::Byte => {
                    return Err(format!(
                        "{name}: piece {id} {piece:?} is of type {kind:?}, which is not supported"
                    ))
                }
            }
            kinds.insert(piece.clone(), kind);
            pieces.push(piece);
        }
        let unk_piece = unk_piece.ok_or_else(|| format!("{name}: no unknown piece"))?;
        let unigram = Unigram::from(vocab, Some(0), false).map_err(|e| format!("{name}: {e}"))?;

        let spec = proto.normalizer_spec.clone().unwrap_or_default();
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        let charsmap = spec.precompiled_charsmap();
        if !charsmap.is_empty() {
            let precompiled = Precompiled::from(charsmap)
                .map_err(|e| format!("{name}: precompiled_charsmap: {e}"))?;
            normalizers.push(precompiled.into());
        }
        let replace = |pattern: &str, content: &str| {
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(pattern.to_string()),
                content,
            )
            .map(NormalizerWrapper::from)
            .map_err(|e| format!("{name}: {e}"))
        };
        if spec.remove_extra_whitespaces() {
            normalizers.push(replace(" {2,}", " ")?);
            normalizers.push(replace(r"\A | \z", "")?);
        }
        if spec.add_dummy_prefix() {
            normalizers.push(Prepend::new(" ".to_string()).into());
        }
        let mut tokenizer = Tokenizer::new(unigram);
        tokenizer.with_normalizer(Some(Sequence::new(normalizers)));
        if spec.escape_whitespaces() {
            tokenizer.with_pre_tokenizer(Some(Metaspace::new(SPACE, PrependScheme::Never, false)));
        }
        Ok(Spm {
            path: path.to_path_buf(),
            tokenizer,
            kinds,
            unk_piece,
            pieces,
        })
    }

    /// `SentencePieceProcessor.encode(text, out_type=str)`.
    fn encode(&self, text: &str) -> Result<Vec<String>, String> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("{}: encoding {text:?}: {e}", self.path.display()))?;
        Ok(encoding.get_tokens().to_vec())
    }

    /// `SentencePieceProcessor.decode_pieces(pieces)`: control pieces vanish, the `<unk>`
    /// piece is ` ⁇ `, pieces the model does not have are copied unchanged, and the `▁` that
    /// starts the first visible normal piece is dropped.
    fn decode_pieces(&self, pieces: &[&str]) -> String {
        let mut out = String::new();
        let mut at_start = true;
        for &piece in pieces {
            let surface = match self.kinds.get(piece) {
                Some(Type::Control) => continue,
                Some(Type::Normal) | Some(Type::UserDefined) => {
                    let p = if at_start {
                        piece.strip_prefix(SPACE).unwrap_or(piece)
                    } else {
                        piece
                    };
                    p.replace(SPACE, " ")
                }
                _ if piece == self.unk_piece => UNK_SURFACE.to_string(),
                _ => piece.to_string(),
            };
            if !surface.is_empty() {
                at_start = false;
            }
            out.push_str(&surface);
        }
        out
    }
}

/// An added token of `tokenizer_config.json` (`added_tokens_decoder`).
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
    special: bool,
}

/// A Marian tokenizer read from a model directory; see the module documentation for the rules.
pub struct MarianTokenizer {
    source: Spm,
    target: Spm,
    /// `vocab.json`: piece -> id (both sides unless `separate`).
    vocab: HashMap<String, u32>,
    /// `target_vocab.json` when `separate_vocabs` is set.
    target_vocab: Option<HashMap<String, u32>>,
    /// Target ids -> strings (the inverse of the target side's vocabulary).
    decoder: HashMap<u32, String>,
    added: Vec<AddedToken>,
    special_ids: HashSet<u32>,
    special_strings: HashSet<String>,
    separate: bool,
    clean_up_tokenization_spaces: bool,
    eos: u32,
    unk: u32,
    pad: u32,
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>, String> {
    let value = read_json(path)?;
    let object = value
        .as_object()
        .ok_or_else(|| format!("{}: not a JSON object", path.display()))?;
    object
        .iter()
        .map(|(k, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (k.clone(), id))
                .ok_or_else(|| format!("{}: id of {k:?} is {v}, not a u32", path.display()))
        })
        .collect()
}

/// The `str.strip()` of Python (Unicode whitespace plus the separators U+001C..U+001F).
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

impl MarianTokenizer {
    /// Reads `source.spm`, `target.spm`, `vocab.json`, `tokenizer_config.json` and, when the
    /// config sets `separate_vocabs`, `target_vocab.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let cfg_name = config_path.display();
        let separate = config
            .get("separate_vocabs")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let clean_up_tokenization_spaces = config
            .get("clean_up_tokenization_spaces")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let source = Spm::load(&dir.join("source.spm"))?;
        let target = Spm::load(&dir.join("target.spm"))?;
        let vocab_path = dir.join("vocab.json");
        let vocab = read_vocab(&vocab_path)?;
        let target_vocab = if separate {
            Some(read_vocab(&dir.join("target_vocab.json"))?)
        } else {
            None
        };
        let decoder = target_vocab
            .as_ref()
            .unwrap_or(&vocab)
            .iter()
            .map(|(k, &v)| (v, k.clone()))
            .collect();

        let mut added = Vec::new();
        if let Some(map) = config
            .get("added_tokens_decoder")
            .and_then(|v| v.as_object())
        {
            for (id, tok) in map {
                let id: u32 = id
                    .parse()
                    .map_err(|_| format!("{cfg_name}: added token id {id:?} is not a u32"))?;
                let content = tok
                    .get("content")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| format!("{cfg_name}: added token {id} has no content"))?;
                let flag = |k: &str| tok.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                if flag("single_word") {
                    return Err(format!(
                        "{cfg_name}: added token {content:?} sets single_word, which is not supported"
                    ));
                }
                added.push(AddedToken {
                    content: content.to_string(),
                    id,
                    lstrip: flag("lstrip"),
                    rstrip: flag("rstrip"),
                    special: flag("special"),
                });
            }
        }
        // The special tokens named in the config, found by content (as the Python tokenizer
        // resolves them: added tokens first, else the source vocabulary).
        let special_id = |key: &str, default: &str| -> Result<(String, u32), String> {
            let content = match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|v| v.as_str())
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            };
            let id = added
                .iter()
                .find(|a| a.content == content)
                .map(|a| a.id)
                .or_else(|| vocab.get(&content).copied())
                .ok_or_else(|| {
                    format!(
                        "{cfg_name}: {key} {content:?} is neither an added token nor in {}",
                        vocab_path.display()
                    )
                })?;
            Ok((content, id))
        };
        let (eos_s, eos) = special_id("eos_token", "</s>")?;
        let (unk_s, unk) = special_id("unk_token", "<unk>")?;
        let (pad_s, pad) = special_id("pad_token", "<pad>")?;
        let mut special_ids: HashSet<u32> = [eos, unk, pad].into_iter().collect();
        let mut special_strings: HashSet<String> = [eos_s, unk_s, pad_s].into_iter().collect();
        if let Some(extra) = config
            .get("additional_special_tokens")
            .or_else(|| config.get("extra_special_tokens"))
            .and_then(|v| v.as_array())
        {
            for t in extra {
                let content = t
                    .as_str()
                    .or_else(|| t.get("content").and_then(|c| c.as_str()))
                    .ok_or_else(|| format!("{cfg_name}: additional special token {t}"))?;
                if let Some(a) = added.iter().find(|a| a.content == content) {
                    special_ids.insert(a.id);
                }
                special_strings.insert(content.to_string());
            }
        }
        // Longest contents first, so that at one position the longest added token wins.
        added.sort_by(|a, b| b.content.len().cmp(&a.content.len()).then(a.id.cmp(&b.id)));
        Ok(MarianTokenizer {
            source,
            target,
            vocab,
            target_vocab,
            decoder,
            added,
            special_ids,
            special_strings,
            separate,
            clean_up_tokenization_spaces,
            eos,
            unk,
            pad,
        })
    }

    /// Source text -> ids, `</s>` appended (`tokenizer(text)["input_ids"]`).
    pub fn encode_source(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode(text, &self.source, &self.vocab)
    }

    /// Target text -> ids, `</s>` appended (`tokenizer(text_target=text)["input_ids"]`).
    pub fn encode_target(&self, text: &str) -> Result<Vec<u32>, String> {
        let vocab = self.target_vocab.as_ref().unwrap_or(&self.vocab);
        self.encode(text, &self.target, vocab)
    }

    /// Target ids -> text as `tokenizer.decode(ids, skip_special_tokens=True)`.
    pub fn decode_target(&self, ids: &[u32]) -> Result<String, String> {
        let spm = if self.separate {
            &self.target
        } else {
            &self.source
        };
        let mut tokens: Vec<&str> = Vec::with_capacity(ids.len());
        for &id in ids {
            if self.special_ids.contains(&id) {
                continue;
            }
            let token = if let Some(a) = self.added.iter().find(|a| a.id == id) {
                a.content.as_str()
            } else if let Some(s) = self.decoder.get(&id) {
                s.as_str()
            } else if let Some(s) = spm.pieces.get(id as usize) {
                s.as_str()
            } else {
                return Err(format!(
                    "id {id} is in neither the target vocabulary nor {}",
                    spm.path.display()
                ));
            };
            tokens.push(token);
        }
        let mut out = String::new();
        let mut run: Vec<&str> = Vec::new();
        for token in tokens {
            if self.special_strings.contains(token) {
                out.push_str(&spm.decode_pieces(&run));
                out.push_str(token);
                out.push(' ');
                run.clear();
            } else {
                run.push(token);
            }
        }
        out.push_str(&spm.decode_pieces(&run));
        let out = out.replace(SPACE, " ");
        let out = out.trim_matches(py_is_space);
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(out)
        } else {
            out.to_string()
        })
    }

    /// The id of `<pad>` as the tokenizer pads source batches (`tokenizer.pad_token_id`, a
    /// source vocabulary id).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id of `<unk>`.
    pub fn unk_id(&self) -> u32 {
        self.unk
    }

    /// `<pad>` in the target vocabulary (differs from [`Self::pad_id`] only with separate
    /// vocabularies; it is then the model's `pad_token_id` and `decoder_start_token_id`).
    pub fn target_pad_id(&self) -> Option<u32> {
        match &self.target_vocab {
            Some(v) => v.get("<pad>").copied(),
            None => Some(self.pad),
        }
    }

    /// Entries of `vocab.json`.
    pub fn source_vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Entries of the target vocabulary (`target_vocab.json`, else `vocab.json`).
    pub fn target_vocab_size(&self) -> usize {
        self.target_vocab.as_ref().unwrap_or(&self.vocab).len()
    }

    /// Whether the tokenizer has separate source and target vocabularies.
    pub fn separate_vocabs(&self) -> bool {
        self.separate
    }

    fn encode(
        &self,
        text: &str,
        spm: &Spm,
        vocab: &HashMap<String, u32>,
    ) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        for chunk in self.split_added(text) {
            match chunk {
                Chunk::Added(id) => ids.push(id),
                Chunk::Text(t) => {
                    let mut rest = t.as_str();
                    let lookup = |piece: &str| -> u32 {
                        self.added
                            .iter()
                            .find(|a| a.content == piece)
                            .map(|a| a.id)
                            .or_else(|| vocab.get(piece).copied())
                            .unwrap_or(self.unk)
                    };
                    if rest.starts_with(">>") {
                        if let Some(end) = rest.find("<<") {
                            ids.push(lookup(&rest[..end + 2]));
                            rest = &rest[end + 2..];
                        }
                    }
                    for piece in spm.encode(rest)? {
                        ids.push(lookup(&piece));
                    }
                }
            }
        }
        ids.push(self.eos);
        Ok(ids)
    }

    /// Splits `text` on added tokens as `PreTrainedTokenizer.tokenize` does (earliest match,
    /// longest at one position), applying their `lstrip`/`rstrip`; empty chunks are dropped.
    fn split_added(&self, text: &str) -> Vec<Chunk> {
        let mut parts: Vec<Chunk> = Vec::new();
        let mut rest = text;
        loop {
            let found = self
                .added
                .iter()
                .filter_map(|a| rest.find(a.content.as_str()).map(|at| (at, a)))
                .min_by_key(|(at, a)| (*at, std::cmp::Reverse(a.content.len())));
            match found {
                Some((at, a)) => {
                    parts.push(Chunk::Text(rest[..at].to_string()));
                    parts.push(Chunk::Added(a.id));
                    rest = &rest[at + a.content.len()..];
                }
                None => {
                    parts.push(Chunk::Text(rest.to_string()));
                    break;
                }
            }
        }
        for i in 0..parts.len() {
            if let Chunk::Added(id) = parts[i] {
                let a = self.added.iter().find(|a| a.id == id).cloned();
                if let Some(a) = a {
                    if a.rstrip {
                        if let Some(Chunk::Text(t)) = parts.get_mut(i + 1) {
                            *t = t.trim_start_matches(py_is_space).to_string();
                        }
                    }
                    if a.lstrip && i > 0 {
                        if let Chunk::Text(t) = &mut parts[i - 1] {
                            *t = t.trim_end_matches(py_is_space).to_string();
                        }
                    }
                }
            }
        }
        parts.retain(|p| !matches!(p, Chunk::Text(t) if t.is_empty()));
        parts
    }
}

enum Chunk {
    Text(String),
    Added(u32),
}

/// Pads a batch of id lists with `pad_id`: (`[batch, max_len]` ids, `[batch, max_len]`
/// attention mask with 1 on real tokens and 0 on padding), as `tokenizer(..., padding=True)`.
pub fn pad_batch(rows: &[Vec<u32>], pad_id: u32) -> (Array2<u32>, Array2<u32>) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Array2::from_elem((rows.len(), len), pad_id);
    let mut mask = Array2::zeros((rows.len(), len));
    for (r, row) in rows.iter().enumerate() {
        for (c, &id) in row.iter().enumerate() {
            ids[[r, c]] = id;
            mask[[r, c]] = 1;
        }
    }
    (ids, mask)
}
