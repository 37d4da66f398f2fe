//! Arbitrary bytes as a safetensors weights file, for a tiny model.
//!
//! Loading must return `Ok` or `Err`, never panic, strict or not, and a model that loads must
//! run and save back to the same bytes. Purely random bytes seldom get past the 8-byte header
//! length and the JSON header, so half the inputs instead edit a valid file of the same tiny
//! model: the edits land in the header (names, dtypes, shapes, offsets) and in the data.
//!
//! Input: byte 0 chooses the config (shared/tied matrices, pre-LN, GELU), strictness, a name
//! prefix and the mode; the rest is the file (raw mode) or a list of 4-byte edits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ndarray::array;
use ndtransformer::{
    Activation, GreedyOptions, LoadOptions, MultiHeadAttention, NormPosition, Transformer,
    TransformerConfig,
};
use rand::{rngs::StdRng, SeedableRng};

fn config(flags: u8) -> TransformerConfig {
    let share = flags & 1 != 0;
    TransformerConfig {
        d_model: 4,
        num_heads: 2,
        d_ff: 6,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        max_len: 8,
        share_embeddings: share,
        tie_output_projection: flags & 2 != 0,
        norm_position: if flags & 4 != 0 {
            NormPosition::Pre
        } else {
            NormPosition::Post
        },
        activation: if flags & 8 != 0 {
            Activation::Gelu
        } else {
            Activation::Relu
        },
        ..TransformerConfig::base(5, if share { 5 } else { 6 })
    }
}

/// A valid file for each config, to edit.
fn valid_file(flags: u8) -> &'static [u8] {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let files = FILES.get_or_init(|| {
        (0..16)
            .map(|f| {
                Transformer::new(config(f), &mut StdRng::seed_from_u64(u64::from(f)))
                    .unwrap()
                    .to_safetensors()
                    .unwrap()
            })
            .collect()
    });
    &files[usize::from(flags & 15)]
}

/// Applies 4-byte edits `[op, offset_lo, offset_hi, value]` to a copy of `file`.
fn edit(file: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut bytes = file.to_vec();
    for e in edits.chunks_exact(4) {
        if bytes.is_empty() {
            break;
        }
        let at = usize::from(u16::from_le_bytes([e[1], e[2]])) % bytes.len();
        match e[0] % 4 {
            0 => bytes[at] = e[3],
            1 => bytes[at] ^= e[3],
            2 => bytes.truncate(at),
            _ => bytes.insert(at, e[3]),
        }
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let strict = flags & 16 != 0;
    let prefix = if flags & 32 != 0 { "weights." } else { "" };
    let bytes = if flags & 64 != 0 {
        edit(valid_file(flags), rest)
    } else {
        rest.to_vec()
    };

    let _ = MultiHeadAttention::from_safetensors(&bytes, "", 4, 2);
    let options = LoadOptions {
        prefix: prefix.to_string(),
        strict,
    };
    let Ok(model) = Transformer::from_safetensors(config(flags), &bytes, &options) else {
        return;
    };

    // Whatever the weights (NaN and infinities included), a loaded model runs.
    let src = array![[1u32, 2, 3], [4, 0, 0]];
    let tgt = array![[1u32, 2], [3, 4]];
    let logits = model
        .forward(src.view(), tgt.view(), None, None)
        .expect("valid input to a loaded model");
    assert_eq!(logits.shape(), &[2, 2, model.config().tgt_vocab]);
    let options = GreedyOptions {
        bos_id: 1,
        eos_id: Some(2),
        max_len: 3,
    };
    model
        .greedy_decode(src.view(), None, &options)
        .expect("valid greedy options");

    // Saving and loading again gives back the same bytes.
    let saved = model.to_safetensors().expect("a loaded model saves");
    let again = Transformer::from_safetensors(config(flags), &saved, &LoadOptions::default())
        .expect("a saved model loads");
    assert!(
        again.to_safetensors().unwrap() == saved,
        "round trip changed the file"
    );
});
