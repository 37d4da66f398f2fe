//! Checkpoint formats as tables over the names of the parameter walk (`parameters.rs`).
//!
//! The walk names a tensor by where it sits in the crate's model,
//! `encoder.layers.0.self_attn.q_proj.weight`; a checkpoint format names it its own way,
//! `transformer.encoder.layers.0.self_attn.in_proj_weight` rows `0..d_model` in PyTorch's
//! `nn.Transformer`, `encoder.layer.0.attention.self.query.weight` in Hugging Face's BERT. A
//! format here is a table of path renames plus the tensors it stores stacked, so that a new
//! format is a new table; loading, saving and the finite check of every format share them.

use ndarray::ArrayViewD;

use crate::error::{Error, Result};
use crate::parameters::{first_non_finite, Parameters};

/// A checkpoint format's names.
#[derive(Debug)]
pub(crate) struct Naming {
    /// Groups of `(walk path, file path)`, searched in order, first match wins: a walk name
    /// that starts with the walk path takes the file path in its place. `*` matches one
    /// segment (a layer index) and is carried over to the `*` of the file path. (Groups let
    /// two formats share their layer tables.)
    pub(crate) renames: &'static [&'static [(&'static str, &'static str)]],
    /// Tensors stored stacked along their first axis: `(leaf, file leaf, part, parts)` turns a
    /// renamed `….{leaf}` into part `part` of `parts` of `….{file leaf}`.
    pub(crate) fused: &'static [(&'static str, &'static str, usize, usize)],
    /// File names of vectors stored as `[1, len]` (a PyTorch buffer kept as a row).
    pub(crate) rows: &'static [&'static str],
}

/// Where a walk tensor lives in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileName {
    /// The tensor's name in the file.
    pub(crate) name: String,
    /// `(part, parts)` when the file tensor stacks `parts` equal walk tensors on its first axis.
    pub(crate) part: Option<(usize, usize)>,
    /// The file stores the walk's vector as a `[1, len]` row.
    pub(crate) row: bool,
}

impl Naming {
    /// The file's name for the walk name `walk`.
    pub(crate) fn file_name(&self, walk: &str) -> FileName {
        let renamed = self
            .renames
            .iter()
            .flat_map(|group| group.iter())
            .find_map(|(from, to)| rename(walk, from, to))
            .unwrap_or_else(|| walk.to_string());
        for &(leaf, file_leaf, part, parts) in self.fused {
            if let Some(stem) = renamed.strip_suffix(leaf) {
                if stem.is_empty() || stem.ends_with('.') {
                    return FileName {
                        name: format!("{stem}{file_leaf}"),
                        part: Some((part, parts)),
                        row: false,
                    };
                }
            }
        }
        FileName {
            row: self.rows.contains(&renamed.as_str()),
            name: renamed,
            part: None,
        }
    }

    /// The first NaN or infinity among `model`'s parameters, named and indexed as in this
    /// format's file (a stacked tensor's row counts from the top of the stack).
    pub(crate) fn check_finite(&self, model: &dyn Parameters) -> Result<()> {
        let mut result = Ok(());
        model.visit(&mut |name, t| {
            if result.is_err() {
                return;
            }
            let file = self.file_name(name);
            let values = t.values();
            result =
                first_non_finite(&file.name, values.view()).map_err(|e| match (e, file.part) {
                    (
                        Error::NonFinite {
                            name,
                            mut index,
                            value,
                        },
                        Some((part, _)),
                    ) => {
                        index[0] += part * values.shape()[0];
                        Error::NonFinite { name, index, value }
                    }
                    (e, _) => e,
                });
        });
        result
    }
}

/// `walk` with its leading `from` path replaced by `to`, or `None` if it does not start so.
fn rename(walk: &str, from: &str, to: &str) -> Option<String> {
    let mut segments = walk.split('.');
    let mut captured = Vec::new();
    for pattern in from.split('.') {
        let segment = segments.next()?;
        if pattern == "*" {
            captured.push(segment);
        } else if pattern != segment {
            return None;
        }
    }
    let mut captured = captured.into_iter();
    let head = to.split('.').filter(|s| !s.is_empty()).map(|s| {
        if s == "*" {
            captured.next().unwrap_or(s)
        } else {
            s
        }
    });
    Some(head.chain(segments).collect::<Vec<_>>().join("."))
}

/// The Q, K and V projections of `nn.MultiheadAttention`, stacked into `in_proj_*`
/// `[3·d_model, …]`.
const IN_PROJ: &[(&str, &str, usize, usize)] = &[
    ("q_proj.weight", "in_proj_weight", 0, 3),
    ("k_proj.weight", "in_proj_weight", 1, 3),
    ("v_proj.weight", "in_proj_weight", 2, 3),
    ("q_proj.bias", "in_proj_bias", 0, 3),
    ("k_proj.bias", "in_proj_bias", 1, 3),
    ("v_proj.bias", "in_proj_bias", 2, 3),
];

/// `torch.nn.MultiheadAttention.state_dict()` on its own.
pub(crate) const PYTORCH_ATTENTION: Naming = Naming {
    renames: &[],
    fused: IN_PROJ,
    rows: &[],
};

/// The `state_dict()` of `src_embed`, `tgt_embed`, `transformer = nn.Transformer(…)` and
/// `generator = nn.Linear(…)` (see `weights.rs`); `pos_embed`, `type_embed` and `embed_norm`
/// for the embedding options PyTorch's module does not have.
pub(crate) const PYTORCH: Naming = Naming {
    renames: &[&[
        ("input.positions", "pos_embed"),
        ("input.token_types", "type_embed"),
        ("input.norm", "embed_norm"),
        (
            "encoder.layers.*.feed_forward",
            "transformer.encoder.layers.*",
        ),
        (
            "encoder.layers.*.self_attn_norm",
            "transformer.encoder.layers.*.norm1",
        ),
        (
            "encoder.layers.*.ffn_norm",
            "transformer.encoder.layers.*.norm2",
        ),
        ("encoder", "transformer.encoder"),
        (
            "decoder.layers.*.feed_forward",
            "transformer.decoder.layers.*",
        ),
        (
            "decoder.layers.*.cross_attn",
            "transformer.decoder.layers.*.multihead_attn",
        ),
        (
            "decoder.layers.*.self_attn_norm",
            "transformer.decoder.layers.*.norm1",
        ),
        (
            "decoder.layers.*.cross_attn_norm",
            "transformer.decoder.layers.*.norm2",
        ),
        (
            "decoder.layers.*.ffn_norm",
            "transformer.decoder.layers.*.norm3",
        ),
        ("decoder", "transformer.decoder"),
        ("output", "generator"),
    ]],
    fused: IN_PROJ,
    rows: &[],
};

/// `transformers.BertModel.state_dict()` (see `bert.rs`).
pub(crate) const BERT: Naming = Naming {
    renames: &[&[
        ("tokens", "embeddings.word_embeddings"),
        ("input.positions", "embeddings.position_embeddings"),
        ("input.token_types", "embeddings.token_type_embeddings"),
        ("input.norm", "embeddings.LayerNorm"),
        (
            "encoder.layers.*.self_attn.q_proj",
            "encoder.layer.*.attention.self.query",
        ),
        (
            "encoder.layers.*.self_attn.k_proj",
            "encoder.layer.*.attention.self.key",
        ),
        (
            "encoder.layers.*.self_attn.v_proj",
            "encoder.layer.*.attention.self.value",
        ),
        (
            "encoder.layers.*.self_attn.out_proj",
            "encoder.layer.*.attention.output.dense",
        ),
        (
            "encoder.layers.*.self_attn_norm",
            "encoder.layer.*.attention.output.LayerNorm",
        ),
        (
            "encoder.layers.*.feed_forward.linear1",
            "encoder.layer.*.intermediate.dense",
        ),
        (
            "encoder.layers.*.feed_forward.linear2",
            "encoder.layer.*.output.dense",
        ),
        (
            "encoder.layers.*.ffn_norm",
            "encoder.layer.*.output.LayerNorm",
        ),
    ]],
    fused: &[],
    rows: &[],
};

/// The layers, output projection and logits bias of `transformers.MarianMTModel.state_dict()`
/// (see `marian.rs`), shared by its two embedding layouts.
const MARIAN_LAYERS: &[(&str, &str)] = &[
    (
        "encoder.layers.*.self_attn_norm",
        "model.encoder.layers.*.self_attn_layer_norm",
    ),
    (
        "encoder.layers.*.feed_forward.linear1",
        "model.encoder.layers.*.fc1",
    ),
    (
        "encoder.layers.*.feed_forward.linear2",
        "model.encoder.layers.*.fc2",
    ),
    (
        "encoder.layers.*.ffn_norm",
        "model.encoder.layers.*.final_layer_norm",
    ),
    ("encoder", "model.encoder"),
    (
        "decoder.layers.*.self_attn_norm",
        "model.decoder.layers.*.self_attn_layer_norm",
    ),
    (
        "decoder.layers.*.cross_attn_norm",
        "model.decoder.layers.*.encoder_attn_layer_norm",
    ),
    (
        "decoder.layers.*.cross_attn",
        "model.decoder.layers.*.encoder_attn",
    ),
    (
        "decoder.layers.*.feed_forward.linear1",
        "model.decoder.layers.*.fc1",
    ),
    (
        "decoder.layers.*.feed_forward.linear2",
        "model.decoder.layers.*.fc2",
    ),
    (
        "decoder.layers.*.ffn_norm",
        "model.decoder.layers.*.final_layer_norm",
    ),
    ("decoder", "model.decoder"),
    ("output.bias", "final_logits_bias"),
    ("output", "lm_head"),
];

/// Marian with one embedding table for source and target (`model.shared`, opus-mt-en-de's
/// layout); the copies under `model.{encoder,decoder}.embed_tokens` are checked when present.
pub(crate) const MARIAN_SHARED: Naming = Naming {
    renames: &[
        &[
            ("src_embed", "model.shared"),
            ("tgt_embed", "model.decoder.embed_tokens"),
        ],
        MARIAN_LAYERS,
    ],
    fused: &[],
    rows: &["final_logits_bias"],
};

/// Marian with separate source and target tables (`share_encoder_decoder_embeddings: false`).
pub(crate) const MARIAN_SEPARATE: Naming = Naming {
    renames: &[
        &[
            ("src_embed", "model.encoder.embed_tokens"),
            ("tgt_embed", "model.decoder.embed_tokens"),
        ],
        MARIAN_LAYERS,
    ],
    fused: &[],
    rows: &["final_logits_bias"],
};

/// Stacks the parts of a fused tensor in order (`parts[i]` is part `i`).
pub(crate) fn stack(name: &str, parts: &[ArrayViewD<f32>]) -> Result<ndarray::ArrayD<f32>> {
    ndarray::concatenate(ndarray::Axis(0), parts)
        .map_err(|e| Error::Safetensors(format!("tensor `{name}`: parts do not stack: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marian_names() {
        let cases = [
            (
                "src_embed.weight",
                "model.shared.weight",
                "model.encoder.embed_tokens.weight",
            ),
            (
                "encoder.layers.1.self_attn.q_proj.bias",
                "model.encoder.layers.1.self_attn.q_proj.bias",
                "model.encoder.layers.1.self_attn.q_proj.bias",
            ),
            (
                "decoder.layers.0.cross_attn.out_proj.weight",
                "model.decoder.layers.0.encoder_attn.out_proj.weight",
                "model.decoder.layers.0.encoder_attn.out_proj.weight",
            ),
            (
                "decoder.layers.5.cross_attn_norm.bias",
                "model.decoder.layers.5.encoder_attn_layer_norm.bias",
                "model.decoder.layers.5.encoder_attn_layer_norm.bias",
            ),
            (
                "encoder.layers.2.feed_forward.linear2.weight",
                "model.encoder.layers.2.fc2.weight",
                "model.encoder.layers.2.fc2.weight",
            ),
            ("output.weight", "lm_head.weight", "lm_head.weight"),
        ];
        for (walk, shared, separate) in cases {
            assert_eq!(
                file(&MARIAN_SHARED, walk),
                (shared.to_string(), None),
                "{walk}"
            );
            assert_eq!(
                file(&MARIAN_SEPARATE, walk),
                (separate.to_string(), None),
                "{walk}"
            );
        }
        let bias = MARIAN_SHARED.file_name("output.bias");
        assert_eq!((bias.name.as_str(), bias.row), ("final_logits_bias", true));
        assert!(!MARIAN_SHARED.file_name("output.weight").row);
    }

    fn file(naming: &Naming, walk: &str) -> (String, Option<(usize, usize)>) {
        let f = naming.file_name(walk);
        (f.name, f.part)
    }

    #[test]
    fn pytorch_names() {
        let cases = [
            ("src_embed.weight", "src_embed.weight", None),
            ("input.positions.weight", "pos_embed.weight", None),
            (
                "encoder.layers.3.self_attn.k_proj.weight",
                "transformer.encoder.layers.3.self_attn.in_proj_weight",
                Some((1, 3)),
            ),
            (
                "encoder.layers.0.self_attn.out_proj.bias",
                "transformer.encoder.layers.0.self_attn.out_proj.bias",
                None,
            ),
            (
                "encoder.layers.11.feed_forward.linear2.weight",
                "transformer.encoder.layers.11.linear2.weight",
                None,
            ),
            (
                "decoder.layers.1.cross_attn.v_proj.bias",
                "transformer.decoder.layers.1.multihead_attn.in_proj_bias",
                Some((2, 3)),
            ),
            (
                "decoder.layers.1.cross_attn_norm.weight",
                "transformer.decoder.layers.1.norm2.weight",
                None,
            ),
            ("decoder.norm.bias", "transformer.decoder.norm.bias", None),
            ("output.weight", "generator.weight", None),
        ];
        for (walk, name, part) in cases {
            assert_eq!(file(&PYTORCH, walk), (name.to_string(), part), "{walk}");
        }
        assert_eq!(
            file(&PYTORCH_ATTENTION, "q_proj.bias"),
            ("in_proj_bias".to_string(), Some((0, 3)))
        );
    }

    #[test]
    fn bert_names() {
        let cases = [
            ("tokens.weight", "embeddings.word_embeddings.weight"),
            ("input.norm.bias", "embeddings.LayerNorm.bias"),
            (
                "encoder.layers.2.self_attn.v_proj.weight",
                "encoder.layer.2.attention.self.value.weight",
            ),
            (
                "encoder.layers.2.self_attn_norm.weight",
                "encoder.layer.2.attention.output.LayerNorm.weight",
            ),
            (
                "encoder.layers.5.feed_forward.linear1.bias",
                "encoder.layer.5.intermediate.dense.bias",
            ),
            ("encoder.norm.weight", "encoder.norm.weight"),
        ];
        for (walk, name) in cases {
            assert_eq!(file(&BERT, walk), (name.to_string(), None), "{walk}");
        }
    }

    #[test]
    fn a_pattern_matches_whole_segments_only() {
        assert_eq!(rename("encoders.x", "encoder", "t"), None);
        assert_eq!(rename("encoder.x", "encoder", "t.e"), Some("t.e.x".into()));
        assert_eq!(rename("a.7.b.c", "a.*.b", "z.*"), Some("z.7.c".into()));
        assert_eq!(rename("a", "a.*", "z"), None);
    }
}
