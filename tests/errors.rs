//! The error inventory: every input a caller can get wrong, the [`Error`] variant it gives, and a
//! message that names the offending value. `docs/guarantees.md` lists the same cases.
//!
//! Each test builds a tiny model (d_model 8, one layer each side), so the file runs in well
//! under a second.

mod common;

use common::{f32s, serialize, tensors_of, Tensor};
use half::{bf16, f16};
use ndarray::{array, s, Array1, Array2, Array3};
use ndtransformer::{
    scaled_dot_product_attention_with_weights, AttnMask, BeamSearchOptions, Encoder, Error,
    GreedyOptions, KeyPaddingMask, LoadOptions, Mask, MaxLength, MultiHeadAttention, Precision,
    Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use safetensors::tensor::Dtype;

/// Source vocabulary 10, target vocabulary 12, positions up to 8.
fn tiny() -> TransformerConfig {
    TransformerConfig {
        d_model: 8,
        num_heads: 2,
        d_ff: 16,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        max_len: 8,
        ..TransformerConfig::base(10, 12)
    }
}

fn model() -> Transformer {
    Transformer::new(tiny(), &mut StdRng::seed_from_u64(7)).unwrap()
}

/// The error of `result`, which must be one.
fn err<T: std::fmt::Debug>(result: Result<T, Error>) -> Error {
    result.expect_err("expected an error")
}

/// Asserts that the message of `e` contains every one of `parts`.
fn assert_mentions(e: &Error, parts: &[&str]) {
    let msg = e.to_string();
    for part in parts {
        assert!(msg.contains(part), "`{msg}` does not mention `{part}`");
    }
}

// --- Token ids, empty inputs, lengths -------------------------------------------------------

#[test]
fn source_token_id_at_or_above_the_vocabulary() {
    let e = err(model().forward(
        array![[1u32, 2], [3, 10]].view(),
        array![[1u32], [1]].view(),
        None,
        None,
    ));
    assert!(
        matches!(
            e,
            Error::TokenOutOfRange {
                id: 10,
                vocab: 10,
                batch: 1,
                position: 1
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["token id 10", "batch row 1, position 1", "size 10"]);
}

#[test]
fn target_token_id_at_or_above_the_vocabulary() {
    let m = model();
    let e = err(m.forward(array![[1u32]].view(), array![[1u32, 12]].view(), None, None));
    assert!(
        matches!(
            e,
            Error::TokenOutOfRange {
                id: 12,
                vocab: 12,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["token id 12", "size 12"]);
    // The same check guards one generation step.
    let memory = m.encode(array![[1u32, 2]].view(), None).unwrap();
    let mut cache = m.start_decoding(memory.view(), None).unwrap();
    let e = err(m.decode_step(array![13u32].view(), &mut cache));
    assert!(matches!(e, Error::TokenOutOfRange { id: 13, .. }), "{e:?}");
    assert_mentions(&e, &["token id 13"]);
}

#[test]
fn empty_batch() {
    let m = model();
    let e = err(m.encode(Array2::<u32>::zeros((0, 3)).view(), None));
    assert!(
        matches!(&e, Error::Empty { shape, .. } if shape == &[0, 3]),
        "{e:?}"
    );
    assert_mentions(&e, &["source ids", "[0, 3]"]);
    let memory = m.encode(array![[1u32, 2]].view(), None).unwrap();
    let e = err(m.decode(
        Array2::<u32>::zeros((0, 2)).view(),
        memory.view(),
        None,
        None,
    ));
    assert!(
        matches!(&e, Error::Empty { shape, .. } if shape == &[0, 2]),
        "{e:?}"
    );
    assert_mentions(&e, &["target ids", "[0, 2]"]);
}

#[test]
fn empty_sequence() {
    let m = model();
    let e = err(m.forward(
        Array2::<u32>::zeros((2, 0)).view(),
        array![[1u32], [1]].view(),
        None,
        None,
    ));
    assert!(
        matches!(&e, Error::Empty { shape, .. } if shape == &[2, 0]),
        "{e:?}"
    );
    assert_mentions(&e, &["source ids", "[2, 0]"]);
    let e = err(m.project(Array3::<f32>::zeros((1, 0, 8)).view()));
    assert!(
        matches!(&e, Error::Empty { shape, .. } if shape == &[1, 0, 8]),
        "{e:?}"
    );
}

#[test]
fn sequence_longer_than_the_positional_table() {
    let m = model();
    let long = Array2::<u32>::ones((1, 9));
    let e = err(m.encode(long.view(), None));
    assert!(
        matches!(e, Error::SequenceTooLong { len: 9, max_len: 8 }),
        "{e:?}"
    );
    assert_mentions(&e, &["length 9", "max_len 8"]);
    let e = err(m.forward(array![[1u32]].view(), long.view(), None, None));
    assert!(
        matches!(e, Error::SequenceTooLong { len: 9, max_len: 8 }),
        "{e:?}"
    );
    // Generation stops at the same limit: the ninth step has no position left.
    let memory = m.encode(array![[1u32]].view(), None).unwrap();
    let mut cache = m.start_decoding(memory.view(), None).unwrap();
    for _ in 0..8 {
        m.decode_step(array![1u32].view(), &mut cache).unwrap();
    }
    let e = err(m.decode_step(array![1u32].view(), &mut cache));
    assert!(
        matches!(e, Error::SequenceTooLong { len: 9, max_len: 8 }),
        "{e:?}"
    );
    assert_eq!(cache.len(), 8, "a failed step leaves the cache as it was");
}

#[test]
fn source_and_target_batch_sizes_differ() {
    let e = err(model().forward(
        array![[1u32, 2], [3, 4]].view(),
        array![[1u32]].view(),
        None,
        None,
    ));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[1, 1]),
        "{e:?}"
    );
    assert_mentions(&e, &["target ids", "[1, 1]", "batch 2"]);
}

// --- Masks ---------------------------------------------------------------------------------

#[test]
fn key_padding_mask_of_another_shape() {
    let m = model();
    let src = array![[1u32, 2, 3], [4, 5, 6]];
    let wrong = KeyPaddingMask::from_lengths(&[3], 3).unwrap();
    let e = err(m.encode(src.view(), Some(&wrong)));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[1, 3]),
        "{e:?}"
    );
    assert_mentions(&e, &["source padding mask", "[1, 3]", "[2, 3]"]);
    let wrong_tgt = KeyPaddingMask::from_lengths(&[2, 2], 2).unwrap();
    let e = err(m.forward(
        src.view(),
        array![[1u32, 2, 3], [1, 2, 3]].view(),
        None,
        Some(&wrong_tgt),
    ));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[2, 2]),
        "{e:?}"
    );
    assert_mentions(&e, &["target padding mask", "[2, 2]", "[2, 3]"]);
    let e = err(m.forward_traced(
        src.view(),
        array![[1u32, 2, 3], [1, 2, 3]].view(),
        Some(&wrong),
        None,
    ));
    assert_mentions(&e, &["source padding mask", "[1, 3]"]);
}

#[test]
fn attention_mask_of_another_shape() {
    let m = model();
    let x = m.embed_source(array![[1u32, 2, 3]].view()).unwrap();
    let pattern = AttnMask::from_blocked(Array2::from_elem((2, 2), false));
    let e = err(m
        .encoder()
        .forward(x.view(), &Mask::none().with_attn_mask(&pattern)));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[2, 2]),
        "{e:?}"
    );
    assert_mentions(&e, &["attention mask", "[2, 2]", "[3, 3]"]);
    let mha = m.encoder().layers()[0].self_attn();
    let e = err(mha.forward(
        x.view(),
        x.view(),
        x.view(),
        &Mask::none().with_attn_mask(&pattern),
    ));
    assert_mentions(&e, &["attention mask", "[2, 2]", "[3, 3]"]);
}

/// The documented rule: a query that may see no key gets all-zero attention weights and a zero
/// attention output (PyTorch gives NaN); everything downstream stays finite.
#[test]
fn padding_that_hides_every_key_of_a_row_gives_zeros_not_nan() {
    let m = model();
    let src = array![[1u32, 2, 3], [4, 5, 6]];
    let tgt = array![[1u32, 2], [1, 3]];
    // Row 1 is all padding: its encoder queries and its decoder cross-attention see nothing.
    let padding = KeyPaddingMask::from_lengths(&[3, 0], 3).unwrap();
    let trace = m
        .forward_traced(src.view(), tgt.view(), Some(&padding), None)
        .unwrap();
    assert!(trace.logits.iter().all(|v| v.is_finite()));
    assert!(trace.encoder.output.iter().all(|v| v.is_finite()));
    for w in trace
        .encoder
        .self_attention
        .iter()
        .chain(&trace.decoder.cross_attention)
    {
        assert!(w.slice(s![1, .., .., ..]).iter().all(|&v| v == 0.0));
        for row in w.slice(s![0, .., .., ..]).rows() {
            assert!((row.sum() - 1.0).abs() < 1e-5);
        }
    }
    let logits = m
        .forward(src.view(), tgt.view(), Some(&padding), None)
        .unwrap();
    assert_eq!(logits, trace.logits);
    let greedy = m
        .greedy_decode(
            src.view(),
            Some(&padding),
            &GreedyOptions {
                bos_id: 1,
                eos_id: None,
                max_len: 3,
            },
        )
        .unwrap();
    assert_eq!(greedy[1].len(), 3);

    // The kernel: zero weights and a zero output; multi-head attention then returns the output
    // projection's bias (zero heads in, bias out).
    let mut rng = StdRng::seed_from_u64(3);
    let q = ndarray::Array4::from_shape_simple_fn((2, 2, 2, 4), || rng.random_range(-1.0..1.0f32));
    let kv = ndarray::Array4::from_shape_simple_fn((2, 2, 3, 4), || rng.random_range(-1.0..1.0f32));
    let mask = Mask::none().with_key_padding(&padding);
    let (out, w) =
        scaled_dot_product_attention_with_weights(q.view(), kv.view(), kv.view(), &mask).unwrap();
    assert!(out.slice(s![1, .., .., ..]).iter().all(|&v| v == 0.0));
    assert!(w.slice(s![1, .., .., ..]).iter().all(|&v| v == 0.0));
    let mha = m.decoder().layers()[0].cross_attn();
    let x = Array3::from_shape_simple_fn((2, 2, 8), || rng.random_range(-1.0..1.0f32));
    let memory = Array3::from_shape_simple_fn((2, 3, 8), || rng.random_range(-1.0..1.0f32));
    let y = mha
        .forward(x.view(), memory.view(), memory.view(), &mask)
        .unwrap();
    let bias = mha.projections()[3].bias().unwrap();
    for row in y.slice(s![1, .., ..]).rows() {
        assert_eq!(row, bias);
    }
}

// --- Memory and decoder cache ----------------------------------------------------------------

#[test]
fn memory_of_another_batch_size() {
    let m = model();
    let memory = Array3::<f32>::zeros((3, 4, 8));
    let e = err(m.decode(array![[1u32], [2]].view(), memory.view(), None, None));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[3, 4, 8]),
        "{e:?}"
    );
    assert_mentions(&e, &["memory", "[3, 4, 8]", "batch 2"]);
}

#[test]
fn memory_of_another_width() {
    let m = model();
    let memory = Array3::<f32>::zeros((2, 4, 6));
    let e = err(m.decode(array![[1u32], [2]].view(), memory.view(), None, None));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[2, 4, 6]),
        "{e:?}"
    );
    assert_mentions(&e, &["memory", "[2, 4, 6]", "d_model 8"]);
    let e = err(m.start_decoding(memory.view(), None));
    assert_mentions(&e, &["memory", "[2, 4, 6]", "d_model 8"]);
}

#[test]
fn memory_padding_of_another_shape() {
    let m = model();
    let memory = Array3::<f32>::zeros((2, 4, 8));
    let padding = KeyPaddingMask::from_lengths(&[5, 5], 5).unwrap();
    let e = err(m.decode(
        array![[1u32], [2]].view(),
        memory.view(),
        Some(&padding),
        None,
    ));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[2, 5]),
        "{e:?}"
    );
    assert_mentions(&e, &["source padding mask", "[2, 5]", "[2, 4]"]);
    let e = err(m.start_decoding(memory.view(), Some(&padding)));
    assert_mentions(&e, &["source padding mask", "[2, 5]", "[2, 4]"]);
}

#[test]
fn decoder_cache_of_another_batch_size() {
    let m = model();
    let memory = m.encode(array![[1u32, 2], [3, 4]].view(), None).unwrap();
    let mut cache = m.start_decoding(memory.view(), None).unwrap();
    let e = err(m.decode_step(array![1u32, 1, 1].view(), &mut cache));
    assert!(matches!(e, Error::CacheMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["3 tokens", "batch 2"]);
    // After keeping one row, two tokens no longer fit.
    cache.select_rows(&[1]).unwrap();
    let e = err(m.decode_step(array![1u32, 1].view(), &mut cache));
    assert_mentions(&e, &["2 tokens", "batch 1"]);
    let e = err(cache.select_rows(&[1]));
    assert!(matches!(e, Error::CacheMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["row index 1", "batch 1"]);
    let e = err(cache.select_rows(&[]));
    assert!(matches!(e, Error::Empty { .. }), "{e:?}");
}

#[test]
fn decoder_cache_of_another_model() {
    let m = model();
    let other = Transformer::new(tiny(), &mut StdRng::seed_from_u64(8)).unwrap();
    let memory = m.encode(array![[1u32, 2]].view(), None).unwrap();
    let mut cache = m.start_decoding(memory.view(), None).unwrap();
    let e = err(other.decode_step(array![1u32].view(), &mut cache));
    assert!(matches!(e, Error::CacheMismatch { .. }), "{e:?}");
    assert_mentions(&e, &["another model"]);
    let wider = Transformer::new(
        TransformerConfig {
            d_model: 16,
            ..tiny()
        },
        &mut StdRng::seed_from_u64(7),
    )
    .unwrap();
    assert!(matches!(
        wider.decode_step(array![1u32].view(), &mut cache),
        Err(Error::CacheMismatch { .. })
    ));
}

// --- Configuration ---------------------------------------------------------------------------

#[test]
fn d_model_not_divisible_by_num_heads() {
    let config = TransformerConfig {
        d_model: 510,
        ..TransformerConfig::base(10, 10)
    };
    let e = err(Transformer::new(config, &mut StdRng::seed_from_u64(0)));
    assert!(
        matches!(
            e,
            Error::Config {
                field: "d_model",
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["d_model 510 is not divisible by num_heads 8"]);
    let e = err(MultiHeadAttention::init(
        10,
        4,
        &mut StdRng::seed_from_u64(0),
    ));
    assert_mentions(&e, &["d_model 10 is not divisible by num_heads 4"]);
}

/// Sets one config field to 0 and checks the error names that field.
fn zero_field_is_named(field: &str, set: impl FnOnce(&mut TransformerConfig)) {
    let mut config = tiny();
    set(&mut config);
    let e = err(Transformer::new(config, &mut StdRng::seed_from_u64(0)));
    assert!(
        matches!(&e, Error::Config { field: f, .. } if *f == field),
        "{e:?}"
    );
    assert_mentions(&e, &[&format!("{field} is 0")]);
}

#[test]
fn zero_layers() {
    zero_field_is_named("num_encoder_layers", |c| c.num_encoder_layers = 0);
    zero_field_is_named("num_decoder_layers", |c| c.num_decoder_layers = 0);
    let e = err(Encoder::new(Vec::new(), None));
    assert!(
        matches!(
            e,
            Error::Config {
                field: "num_encoder_layers",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn zero_heads() {
    zero_field_is_named("num_heads", |c| c.num_heads = 0);
    let e = err(MultiHeadAttention::init(
        8,
        0,
        &mut StdRng::seed_from_u64(0),
    ));
    assert_mentions(&e, &["num_heads is 0"]);
}

#[test]
fn zero_widths() {
    zero_field_is_named("d_model", |c| c.d_model = 0);
    zero_field_is_named("d_ff", |c| c.d_ff = 0);
    zero_field_is_named("src_vocab", |c| c.src_vocab = 0);
    zero_field_is_named("tgt_vocab", |c| c.tgt_vocab = 0);
    zero_field_is_named("max_len", |c| c.max_len = 0);
}

#[test]
fn other_config_values() {
    let e = err(Transformer::new(
        TransformerConfig {
            layer_norm_eps: f32::NAN,
            ..tiny()
        },
        &mut StdRng::seed_from_u64(0),
    ));
    assert!(
        matches!(
            e,
            Error::Config {
                field: "layer_norm_eps",
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["layer_norm_eps NaN"]);
    let e = err(Transformer::new(
        TransformerConfig {
            share_embeddings: true,
            ..tiny()
        },
        &mut StdRng::seed_from_u64(0),
    ));
    assert_mentions(&e, &["src_vocab 10", "tgt_vocab 12"]);
}

/// Sizes whose arrays could not exist are errors, not panics inside ndarray.
#[test]
fn sizes_beyond_what_an_array_can_hold() {
    let e = err(Transformer::new(
        TransformerConfig {
            max_len: usize::MAX,
            ..tiny()
        },
        &mut StdRng::seed_from_u64(0),
    ));
    assert!(
        matches!(
            e,
            Error::Config {
                field: "max_len",
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &[&format!("[{}, 8]", usize::MAX)]);
    let e = err(Transformer::new(
        TransformerConfig {
            src_vocab: 1 << 62,
            ..tiny()
        },
        &mut StdRng::seed_from_u64(0),
    ));
    assert!(
        matches!(
            e,
            Error::Config {
                field: "src_vocab",
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(KeyPaddingMask::from_lengths(&[1, 1], usize::MAX));
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    assert_mentions(&e, &[&format!("[2, {}]", usize::MAX)]);
}

// --- Weights files ---------------------------------------------------------------------------

fn model_bytes() -> Vec<u8> {
    model().to_safetensors().unwrap()
}

fn load(bytes: &[u8]) -> Result<Transformer, Error> {
    Transformer::from_safetensors(tiny(), bytes, &LoadOptions::default())
}

#[test]
fn truncated_weights_file() {
    let bytes = model_bytes();
    // The tensor data is cut short: the header's byte ranges run past the end.
    let cut = &bytes[..bytes.len() - 3];
    let e = err(load(cut));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(&e, &[&format!("{}-byte", cut.len()), "truncated"]);
    // The header itself is cut short: its length field claims more bytes than there are.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let e = err(load(&bytes[..20]));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(
        &e,
        &[&format!("says {header_len} bytes"), "data is 20 bytes"],
    );
    // A length field far beyond any file.
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(load(&huge));
    assert_mentions(&e, &[&format!("says {} bytes", u64::MAX)]);
}

#[test]
fn weights_file_that_is_not_safetensors() {
    let mut rng = StdRng::seed_from_u64(11);
    let random: Vec<u8> = (0..64).map(|_| rng.random()).collect();
    let e = err(load(&random));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(&e, &["64 bytes"]);
    let e = err(load(b"{\"not\": \"safetensors\"}"));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    // Eight bytes of header length 0: then the header is not JSON.
    let e = err(load(&[0u8; 8]));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(&e, &["8 bytes"]);
}

#[test]
fn empty_weights_file() {
    let e = err(load(&[]));
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(&e, &["0 bytes"]);
    let path = std::env::temp_dir().join(format!(
        "ndtransformer-empty-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, b"").unwrap();
    let e = err(Transformer::load(&path, tiny()));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(e, Error::Safetensors(_)), "{e:?}");
    assert_mentions(&e, &["0 bytes"]);
    let e = err(Transformer::load(
        "/nonexistent/weights.safetensors",
        tiny(),
    ));
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_mentions(&e, &["/nonexistent/weights.safetensors"]);
}

#[test]
fn weights_file_missing_a_tensor() {
    let mut tensors = tensors_of(&model_bytes());
    tensors.retain(|t| t.name != "transformer.decoder.layers.0.norm3.bias");
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::MissingTensor { name } if name == "transformer.decoder.layers.0.norm3.bias"),
        "{e:?}"
    );
    assert_mentions(&e, &["transformer.decoder.layers.0.norm3.bias"]);
}

#[test]
fn weights_file_with_an_unexpected_tensor() {
    let mut tensors = tensors_of(&model_bytes());
    tensors.push(Tensor {
        name: "transformer.encoder.layers.0.extra".into(),
        dtype: Dtype::F32,
        shape: vec![2],
        data: vec![0; 8],
    });
    let bytes = serialize(&tensors);
    let e = err(load(&bytes));
    assert!(
        matches!(&e, Error::UnexpectedTensors { names } if names == &["transformer.encoder.layers.0.extra"]),
        "{e:?}"
    );
    assert_mentions(&e, &["transformer.encoder.layers.0.extra"]);
    // Not strict: the model loads and the report lists what was ignored.
    let lenient = LoadOptions {
        strict: false,
        ..LoadOptions::default()
    };
    let (loaded, report) =
        Transformer::from_safetensors_with_report(tiny(), &bytes, &lenient).unwrap();
    assert_eq!(loaded, model());
    assert_eq!(
        report.unexpected,
        vec!["transformer.encoder.layers.0.extra"]
    );
    assert!(report.converted.is_empty());
    // Tensors outside the prefix are not the model's business, strict or not.
    let prefixed = LoadOptions::with_prefix("transformer.encoder.layers.0.extra");
    assert!(matches!(
        Transformer::from_safetensors(tiny(), &bytes, &prefixed),
        Err(Error::MissingTensor { .. })
    ));
}

#[test]
fn weights_file_with_a_wrong_shape() {
    let mut tensors = tensors_of(&model_bytes());
    let bias = tensors
        .iter_mut()
        .find(|t| t.name == "generator.bias")
        .unwrap();
    bias.shape = vec![13];
    bias.data = vec![0; 13 * 4];
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::TensorShape { name, expected, found }
            if name == "generator.bias" && expected == &[12] && found == &[13]),
        "{e:?}"
    );
    assert_mentions(&e, &["generator.bias", "[13]", "[12]"]);
}

#[test]
fn weights_file_with_a_wrong_dtype() {
    for (dtype, width) in [
        (Dtype::F64, 8),
        (Dtype::I64, 8),
        (Dtype::I32, 4),
        (Dtype::U8, 1),
    ] {
        let mut tensors = tensors_of(&model_bytes());
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "src_embed.weight")
            .unwrap();
        t.dtype = dtype;
        t.data = vec![0; 10 * 8 * width];
        let e = err(load(&serialize(&tensors)));
        let dtype_name = format!("{dtype:?}");
        assert!(
            matches!(&e, Error::TensorDtype { name, found, .. } if name == "src_embed.weight" && *found == dtype_name),
            "{e:?}"
        );
        assert_mentions(&e, &["src_embed.weight", &dtype_name]);
    }
}

/// A 16-bit float format: its dtype and its conversions from and to f32.
struct HalfFormat {
    dtype: Dtype,
    to_bits: fn(f32) -> u16,
    from_bits: fn(u16) -> f32,
}

/// Every F32 tensor of `bytes` stored in `format`, and the same values (rounded to it) stored
/// as F32.
fn as_half(bytes: &[u8], format: &HalfFormat) -> (Vec<u8>, Vec<u8>) {
    let HalfFormat {
        dtype,
        to_bits,
        from_bits,
    } = *format;
    let tensors = tensors_of(bytes);
    let mut half_tensors = Vec::new();
    let mut rounded = Vec::new();
    for t in tensors {
        let values = f32s(&t.data);
        let bits: Vec<u16> = values.iter().map(|&v| to_bits(v)).collect();
        half_tensors.push(Tensor {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
            data: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        });
        rounded.push(Tensor {
            data: bits
                .iter()
                .flat_map(|&b| from_bits(b).to_le_bytes())
                .collect(),
            ..t
        });
    }
    (serialize(&half_tensors), serialize(&rounded))
}

#[test]
fn f16_and_bf16_weights_are_converted_exactly() {
    let bytes = model_bytes();
    let formats = [
        HalfFormat {
            dtype: Dtype::F16,
            to_bits: |v| f16::from_f32(v).to_bits(),
            from_bits: |b| f16::from_bits(b).to_f32(),
        },
        HalfFormat {
            dtype: Dtype::BF16,
            to_bits: |v| bf16::from_f32(v).to_bits(),
            from_bits: |b| bf16::from_bits(b).to_f32(),
        },
    ];
    for format in &formats {
        let dtype = format.dtype;
        let (half_bytes, rounded_bytes) = as_half(&bytes, format);
        let (from_half, report) =
            Transformer::from_safetensors_with_report(tiny(), &half_bytes, &LoadOptions::default())
                .unwrap();
        assert_eq!(from_half, load(&rounded_bytes).unwrap(), "{dtype:?}");
        assert_eq!(report.converted.len(), tensors_of(&bytes).len());
        // Refused on request, naming the dtype.
        let no_half = LoadOptions {
            convert_half: false,
            ..LoadOptions::default()
        };
        let e = err(Transformer::from_safetensors(tiny(), &half_bytes, &no_half));
        let dtype_name = format!("{dtype:?}");
        assert!(
            matches!(&e, Error::TensorDtype { found, .. } if *found == dtype_name),
            "{e:?}"
        );
        assert_mentions(&e, &[&dtype_name, "convert_half"]);
    }
}

#[test]
fn f16_subnormals_and_infinities_convert_exactly() {
    let mut tensors = tensors_of(&model_bytes());
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "src_embed.weight")
        .unwrap();
    let mut bits = [0x3c00u16; 10 * 8]; // 1.0
    bits[0] = 0x0001; // the smallest subnormal, 2⁻²⁴
    bits[1] = 0x7c00; // +inf
    bits[2] = 0x8400; // the smallest negative normal, -2⁻¹⁴
    t.dtype = Dtype::F16;
    t.data = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let bytes = serialize(&tensors);
    let m = load(&bytes).unwrap();
    let w = m.src_embedding().weight();
    assert_eq!(w[[0, 0]], 2f32.powi(-24));
    assert_eq!(w[[0, 1]], f32::INFINITY);
    assert_eq!(w[[0, 2]], -(2f32.powi(-14)));
    assert_eq!(w[[1, 0]], 1.0);
    // The infinity is caught by the finite check, after conversion.
    let checked = LoadOptions {
        check_finite: true,
        ..LoadOptions::default()
    };
    let e = err(Transformer::from_safetensors(tiny(), &bytes, &checked));
    assert!(
        matches!(&e, Error::NonFinite { name, index, value }
            if name == "src_embed.weight" && index == &[0, 1] && *value == f32::INFINITY),
        "{e:?}"
    );
}

#[test]
fn nan_or_infinity_in_weights() {
    let checked = LoadOptions {
        check_finite: true,
        ..LoadOptions::default()
    };
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
        let mut tensors = tensors_of(&model_bytes());
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "transformer.encoder.layers.0.linear1.weight")
            .unwrap();
        assert_eq!(t.shape, [16, 8]);
        // Row 3, column 5 of the [d_ff, d_model] weight.
        let at = (3 * 8 + 5) * 4;
        t.data[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        let bytes = serialize(&tensors);
        let e = err(Transformer::from_safetensors(tiny(), &bytes, &checked));
        assert!(
            matches!(&e, Error::NonFinite { name, index, .. }
                if name == "transformer.encoder.layers.0.linear1.weight" && index == &[3, 5]),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "transformer.encoder.layers.0.linear1.weight",
                "[3, 5]",
                shown,
            ],
        );
        // Off by default; the same check then runs on the built model.
        let m = load(&bytes).unwrap();
        let e = err(m.check_finite());
        assert!(
            matches!(&e, Error::NonFinite { name, index, .. }
                if name == "transformer.encoder.layers.0.linear1.weight" && index == &[3, 5]),
            "{e:?}"
        );
        assert_mentions(&e, &[shown]);
    }
    model().check_finite().unwrap();
}

#[test]
fn nan_in_the_stacked_projection_is_named_by_its_pytorch_index() {
    let mut tensors = tensors_of(&model_bytes());
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "transformer.decoder.layers.0.multihead_attn.in_proj_weight")
        .unwrap();
    assert_eq!(t.shape, [24, 8]);
    // Row 17 is in the value projection (rows 16..24).
    let at = (17 * 8 + 2) * 4;
    t.data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let m = load(&serialize(&tensors)).unwrap();
    let e = err(m.check_finite());
    assert!(
        matches!(&e, Error::NonFinite { name, index, value }
            if name == "transformer.decoder.layers.0.multihead_attn.in_proj_weight"
                && index == &[17, 2] && value.is_nan()),
        "{e:?}"
    );
}

#[test]
fn quantizing_a_nan_weight_names_it_and_leaves_the_model_in_f32() {
    let mut tensors = tensors_of(&model_bytes());
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "transformer.decoder.layers.0.linear2.weight")
        .unwrap();
    let cols = t.shape[1];
    let at = (3 * cols + 5) * 4;
    t.data[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let mut m = load(&serialize(&tensors)).unwrap();
    let e = err(m.quantize(Precision::Int8));
    assert!(
        matches!(&e, Error::NonFinite { name, index, value }
            if name == "transformer.decoder.layers.0.linear2.weight"
                && index == &[3, 5] && *value == f32::INFINITY),
        "{e:?}"
    );
    assert_eq!(m.precision(), Precision::F32);
    // Loading with int8 asked for fails the same way.
    let options = LoadOptions {
        precision: Some(Precision::Int8),
        ..LoadOptions::default()
    };
    let e = err(Transformer::from_safetensors(
        tiny(),
        &serialize(&tensors),
        &options,
    ));
    assert!(
        matches!(&e, Error::NonFinite { index, .. } if index == &[3, 5]),
        "{e:?}"
    );
}

/// The tiny model in int8, as safetensors bytes, split into its tensors.
fn int8_tensors() -> Vec<Tensor> {
    let mut m = model();
    m.quantize(Precision::Int8).unwrap();
    tensors_of(&m.to_safetensors().unwrap())
}

const SCALE: &str = "transformer.encoder.layers.0.self_attn.in_proj_weight_scale";

#[test]
fn an_int8_file_without_a_scale_names_the_missing_scale() {
    let mut tensors = int8_tensors();
    tensors.retain(|t| t.name != SCALE);
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::MissingTensor { name } if name == SCALE),
        "{e:?}"
    );
}

#[test]
fn an_int8_file_with_a_wrong_shaped_scale_names_both_shapes() {
    let mut tensors = int8_tensors();
    let t = tensors.iter_mut().find(|t| t.name == SCALE).unwrap();
    assert_eq!(
        t.shape,
        [24],
        "one scale for each of the 3 · 8 stacked rows"
    );
    t.shape = vec![23];
    t.data.truncate(23 * 4);
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::TensorShape { name, expected, found }
            if name == SCALE && expected == &[24] && found == &[23]),
        "{e:?}"
    );
    assert_mentions(&e, &[SCALE, "[23]", "[24]"]);
}

#[test]
fn an_int8_file_with_a_nan_scale_names_it_whatever_check_finite_says() {
    let mut tensors = int8_tensors();
    let t = tensors.iter_mut().find(|t| t.name == SCALE).unwrap();
    t.data[5 * 4..6 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::NonFinite { name, index, value }
            if name == SCALE && index == &[5] && value.is_nan()),
        "{e:?}"
    );
}

#[test]
fn an_int8_file_with_scales_in_half_precision_names_the_dtype() {
    let mut tensors = int8_tensors();
    let t = tensors.iter_mut().find(|t| t.name == SCALE).unwrap();
    t.dtype = Dtype::F16;
    t.data.truncate(t.data.len() / 2);
    let e = err(load(&serialize(&tensors)));
    assert!(
        matches!(&e, Error::TensorDtype { name, found, .. } if name == SCALE && found == "F16"),
        "{e:?}"
    );
}

#[test]
fn an_int8_file_loads_as_int8_and_equals_the_model_saved() {
    let mut m = model();
    m.quantize(Precision::Int8).unwrap();
    let tensors = int8_tensors();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&SCALE) && names.contains(&"src_embed.weight_scale"));
    let back = load(&serialize(&tensors)).unwrap();
    assert_eq!(back.precision(), Precision::Int8);
    assert_eq!(back, m);
}

// --- Decoding parameters ---------------------------------------------------------------------

fn greedy(options: GreedyOptions) -> Result<Vec<Vec<u32>>, Error> {
    model().greedy_decode(array![[1u32, 2, 3]].view(), None, &options)
}

fn beam(
    change: impl FnOnce(&mut BeamSearchOptions),
) -> Result<Vec<Vec<ndtransformer::Hypothesis>>, Error> {
    let mut options = BeamSearchOptions {
        max_len: MaxLength::Fixed(4),
        ..BeamSearchOptions::paper(1, 2)
    };
    change(&mut options);
    model().beam_search(array![[1u32, 2, 3]].view(), None, &options)
}

fn assert_decoding(e: &Error, parameter: &str, parts: &[&str]) {
    assert!(
        matches!(e, Error::Decoding { parameter: p, .. } if *p == parameter),
        "{e:?}"
    );
    assert_mentions(e, parts);
}

#[test]
fn beam_size_zero() {
    let e = err(beam(|o| o.beam_size = 0));
    assert_decoding(&e, "beam_size", &["beam_size is 0"]);
}

#[test]
fn maximum_length_zero() {
    let e = err(greedy(GreedyOptions {
        bos_id: 1,
        eos_id: Some(2),
        max_len: 0,
    }));
    assert_decoding(&e, "max_len", &["max_len is 0"]);
    let e = err(beam(|o| o.max_len = MaxLength::Fixed(0)));
    assert_decoding(&e, "max_len", &["max_len is 0"]);
}

#[test]
fn maximum_length_beyond_the_positional_table() {
    let e = err(greedy(GreedyOptions {
        bos_id: 1,
        eos_id: Some(2),
        max_len: 9,
    }));
    assert_decoding(&e, "max_len", &["9", "max_len 8"]);
    // Source length 3 + 6 = 9.
    let e = err(beam(|o| o.max_len = MaxLength::SourcePlus(6)));
    assert_decoding(&e, "max_len", &["9", "max_len 8"]);
    // An absurd addend saturates instead of overflowing.
    let e = err(beam(|o| o.max_len = MaxLength::SourcePlus(usize::MAX)));
    assert_decoding(&e, "max_len", &[&usize::MAX.to_string()]);
}

#[test]
fn bos_or_eos_outside_the_vocabulary() {
    let e = err(greedy(GreedyOptions {
        bos_id: 12,
        eos_id: Some(2),
        max_len: 3,
    }));
    assert_decoding(&e, "bos_id", &["bos_id 12", "size 12"]);
    let e = err(greedy(GreedyOptions {
        bos_id: 1,
        eos_id: Some(40),
        max_len: 3,
    }));
    assert_decoding(&e, "eos_id", &["eos_id 40", "size 12"]);
    let e = err(beam(|o| o.bos_id = 12));
    assert_decoding(&e, "bos_id", &["bos_id 12"]);
    let e = err(beam(|o| o.eos_id = u32::MAX));
    assert_decoding(&e, "eos_id", &[&format!("eos_id {}", u32::MAX)]);
}

#[test]
fn more_hypotheses_asked_than_the_beam_keeps() {
    let e = err(beam(|o| o.num_return = 5));
    assert_decoding(&e, "num_return", &["num_return 5", "beam_size 4"]);
    let e = err(beam(|o| o.num_return = 0));
    assert_decoding(&e, "num_return", &["num_return 0"]);
}

#[test]
fn negative_or_nan_length_penalty() {
    let e = err(beam(|o| o.length_penalty = -0.5));
    assert_decoding(&e, "length_penalty", &["-0.5"]);
    let e = err(beam(|o| o.length_penalty = f32::NAN));
    assert_decoding(&e, "length_penalty", &["NaN"]);
    let e = err(beam(|o| o.length_penalty = f32::INFINITY));
    assert_decoding(&e, "length_penalty", &["inf"]);
}

#[test]
fn beam_search_padding_of_another_shape() {
    let wrong = KeyPaddingMask::from_lengths(&[3, 3], 3).unwrap();
    let e = err(model().beam_search(
        array![[1u32, 2, 3]].view(),
        Some(&wrong),
        &BeamSearchOptions::paper(1, 2),
    ));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[2, 3]),
        "{e:?}"
    );
    assert_mentions(&e, &["source padding mask", "[2, 3]", "[1, 3]"]);
}

/// A beam wider than there are hypotheses is an exhaustive search, not an allocation of
/// `beam_size` slots.
#[test]
fn huge_beam_is_exhaustive_not_a_panic() {
    let out = beam(|o| {
        o.beam_size = usize::MAX;
        o.max_len = MaxLength::Fixed(2);
    })
    .unwrap();
    assert_eq!(out[0].len(), 1);
    let narrow = beam(|o| {
        o.beam_size = 144;
        o.max_len = MaxLength::Fixed(2);
    })
    .unwrap();
    assert_eq!(out, narrow);
}

#[test]
fn layers_reject_inputs_of_another_width() {
    let m = model();
    let e = err(m.project(Array3::<f32>::zeros((1, 2, 6)).view()));
    assert!(
        matches!(&e, Error::Shape { found, .. } if found == &[1, 2, 6]),
        "{e:?}"
    );
    assert_mentions(&e, &["[1, 2, 6]", "d_model 8"]);
    let e = err(m
        .src_embedding()
        .forward(Array2::<u32>::from_elem((1, 1), 10).view()));
    assert!(matches!(e, Error::TokenOutOfRange { id: 10, .. }), "{e:?}");
    let e = err(ndtransformer::Linear::new(
        Array2::zeros((3, 2)),
        Some(Array1::zeros(4)),
    ));
    assert_mentions(&e, &["[4]", "[out] = [3]"]);
    let q = ndarray::Array4::<f32>::zeros((1, 1, 2, 0));
    let e = err(ndtransformer::scaled_dot_product_attention(
        q.view(),
        q.view(),
        q.view(),
        &Mask::none(),
    ));
    assert!(
        matches!(&e, Error::Empty { shape, .. } if shape == &[1, 1, 2, 0]),
        "{e:?}"
    );
}
