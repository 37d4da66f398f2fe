//! The Marian tokenizer (`examples/marian/mod.rs`) against `transformers.MarianTokenizer` on
//! the fixtures of `tools/make_marian_fixture.py` (`tests/fixtures/marian/<variant>/`). Every
//! expected value comes from the fixture files.

#[path = "../examples/marian/mod.rs"]
mod marian;

use std::path::{Path, PathBuf};

use marian::{pad_batch, MarianTokenizer};
use ndarray::Array2;
use safetensors::SafeTensors;
use serde_json::Value;

const VARIANTS: [&str; 2] = ["shared", "separate"];

fn dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/marian")
        .join(variant)
}

fn expected(variant: &str) -> Value {
    let path = dir(variant).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tokenizer(variant: &str) -> MarianTokenizer {
    MarianTokenizer::from_dir(&dir(variant)).unwrap_or_else(|e| panic!("{variant}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("list of id lists")
        .iter()
        .map(ids)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("list of strings")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn grid(rows: &[Vec<u32>]) -> Array2<u32> {
    let width = rows.first().map_or(0, Vec::len);
    Array2::from_shape_fn((rows.len(), width), |(r, c)| rows[r][c])
}

/// An int64 tensor of `expected.safetensors` as u32.
fn tensor_u32(variant: &str, name: &str) -> Array2<u32> {
    let path = dir(variant).join("expected.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    let shape = t.shape();
    let values: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
        .collect();
    Array2::from_shape_vec((shape[0], shape[1]), values).unwrap()
}

#[test]
fn special_ids_and_vocab_sizes() {
    for variant in VARIANTS {
        let e = expected(variant);
        let tok = tokenizer(variant);
        let special = &e["special"];
        let id = |k: &str| special[k].as_u64().unwrap() as u32;
        assert_eq!(tok.eos_id(), id("eos_id"), "{variant}");
        assert_eq!(tok.unk_id(), id("unk_id"), "{variant}");
        assert_eq!(tok.pad_id(), id("pad_id"), "{variant}");
        assert_eq!(tok.target_pad_id(), Some(id("target_pad_id")), "{variant}");
        let config = &e["config"];
        assert_eq!(
            tok.source_vocab_size() as u64,
            config["vocab_size"].as_u64().unwrap(),
            "{variant}"
        );
        assert_eq!(
            tok.target_vocab_size() as u64,
            config["decoder_vocab_size"].as_u64().unwrap(),
            "{variant}"
        );
        assert_eq!(
            tok.separate_vocabs(),
            !config["share_encoder_decoder_embeddings"]
                .as_bool()
                .unwrap(),
            "{variant}"
        );
    }
}

#[test]
fn source_sentences_encode_as_python() {
    for variant in VARIANTS {
        let e = expected(variant);
        let tok = tokenizer(variant);
        let sentences = strings(&e["sentences"]);
        let want = rows(&e["source_ids"]);
        assert_eq!(sentences.len(), want.len());
        let mut got = Vec::new();
        for (s, w) in sentences.iter().zip(&want) {
            let ids = tok.encode_source(s).unwrap();
            assert_eq!(&ids, w, "{variant}: {s:?}");
            got.push(ids);
        }
        let (ids, mask) = pad_batch(&got, tok.pad_id());
        assert_eq!(
            ids,
            grid(&rows(&e["input_ids"])),
            "{variant}: padded input_ids"
        );
        assert_eq!(
            mask,
            grid(&rows(&e["attention_mask"])),
            "{variant}: attention_mask"
        );
        assert_eq!(ids, tensor_u32(variant, "input_ids"), "{variant}");
        assert_eq!(mask, tensor_u32(variant, "attention_mask"), "{variant}");
    }
}

#[test]
fn target_texts_encode_as_python() {
    for variant in VARIANTS {
        let e = expected(variant);
        let tok = tokenizer(variant);
        let texts = strings(&e["target_texts"]);
        let want = rows(&e["target_ids"]);
        assert_eq!(texts.len(), want.len());
        let start = e["special"]["decoder_start_token_id"].as_u64().unwrap() as u32;
        let mut decoder_rows = Vec::new();
        for (t, w) in texts.iter().zip(&want) {
            let ids = tok.encode_target(t).unwrap();
            assert_eq!(&ids, w, "{variant}: {t:?}");
            decoder_rows.push(std::iter::once(start).chain(ids).collect::<Vec<u32>>());
        }
        let (ids, mask) = pad_batch(&decoder_rows, tok.target_pad_id().unwrap());
        assert_eq!(ids, grid(&rows(&e["decoder_input_ids"])), "{variant}");
        assert_eq!(mask, grid(&rows(&e["decoder_attention_mask"])), "{variant}");
        assert_eq!(ids, tensor_u32(variant, "decoder_input_ids"), "{variant}");
        assert_eq!(
            mask,
            tensor_u32(variant, "decoder_attention_mask"),
            "{variant}"
        );
    }
}

#[test]
fn generated_rows_decode_as_python() {
    for variant in VARIANTS {
        let e = expected(variant);
        let tok = tokenizer(variant);
        for (kind, tensor) in [("greedy", "greedy_sequences"), ("beam", "beam_sequences")] {
            let sequences = rows(&e[kind]["sequences"]);
            let texts = strings(&e[kind]["texts"]);
            assert_eq!(sequences.len(), texts.len());
            assert_eq!(
                grid(&sequences),
                tensor_u32(variant, tensor),
                "{variant} {kind}"
            );
            for (row, text) in sequences.iter().zip(&texts) {
                assert_eq!(
                    &tok.decode_target(row).unwrap(),
                    text,
                    "{variant} {kind}: {row:?}"
                );
            }
        }
    }
}

#[test]
fn tokenizer_edge_cases_as_python() {
    for variant in VARIANTS {
        let e = expected(variant);
        let tok = tokenizer(variant);
        let cases = &e["tokenizer_cases"];
        for case in cases["source"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode_source(text).unwrap(),
                ids(&case["ids"]),
                "{variant} source {text:?}"
            );
        }
        for case in cases["target"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode_target(text).unwrap(),
                ids(&case["ids"]),
                "{variant} target {text:?}"
            );
        }
        for case in cases["decode"].as_array().unwrap() {
            let row = ids(&case["ids"]);
            assert_eq!(
                tok.decode_target(&row).unwrap(),
                case["text"].as_str().unwrap(),
                "{variant} decode {row:?}"
            );
        }
    }
}

#[test]
fn errors_name_the_file() {
    let missing =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/marian/no-such-variant");
    let err = MarianTokenizer::from_dir(&missing)
        .err()
        .expect("a missing directory is an error");
    assert!(err.contains("tokenizer_config.json"), "{err}");
    let tok = tokenizer("shared");
    let too_big = u32::try_from(tok.target_vocab_size() * 10).unwrap();
    let err = tok.decode_target(&[too_big]).unwrap_err();
    assert!(
        err.contains(&too_big.to_string()) && err.contains("source.spm"),
        "{err}"
    );
}
