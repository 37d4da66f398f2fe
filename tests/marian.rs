//! Hugging Face Marian (OPUS-MT) checkpoints against `transformers` on PyTorch.
//!
//! `tests/fixtures/marian/{shared,separate}/` each hold a small trained `MarianMTModel` saved with
//! `save_pretrained` and the outputs `transformers` gave for it (`expected.safetensors`,
//! `expected.json`), made by `tools/make_marian_fixture.py`. `shared` has opus-mt-en-de's
//! layout (swish, scaled embeddings, one table for source, target and output); `separate` has
//! its own target vocabulary and table, GELU and unscaled embeddings. Every expected value is
//! read from the fixture files.

mod common;

use std::path::PathBuf;

use common::{fixtures_dir, serialize, tensors_of, Tensor, TensorFile};
use ndarray::{s, Array2, Ix3};
use ndtransformer::marian::{self, MarianCheckpoint};
use ndtransformer::{
    CorpusOptions, Error, GenerateOptions, KeyPaddingMask, LoadOptions, Precision, Transformer,
};
use serde_json::Value;

const VARIANTS: [&str; 2] = ["shared", "separate"];

struct Reference {
    dir: PathBuf,
    checkpoint: MarianCheckpoint,
    json: Value,
    tensors: TensorFile,
}

fn reference(variant: &str) -> Reference {
    Reference::at(fixtures_dir().join("marian").join(variant))
}

impl Reference {
    fn at(dir: PathBuf) -> Reference {
        let checkpoint = MarianCheckpoint::load(&dir)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let tensors = TensorFile::read(&dir.join("expected.safetensors"));
        Reference {
            dir,
            checkpoint,
            json,
            tensors,
        }
    }

    /// The checkpoint's generation options with the reference's `max_length` (counted with
    /// the decoder start token, as `transformers` counts it) and beam size.
    fn options(&self, kind: &str) -> GenerateOptions {
        let max_length = self.json[kind]["max_length"].as_u64().unwrap() as usize;
        GenerateOptions {
            beam_size: self.json[kind]["num_beams"].as_u64().unwrap() as usize,
            max_len: ndtransformer::MaxLength::Fixed(max_length - 1),
            ..self.checkpoint.generation.clone()
        }
    }
}

impl Reference {
    fn source(&self) -> (Array2<u32>, KeyPaddingMask) {
        let mask = self.tensors.ids("attention_mask");
        (
            self.tensors.ids("input_ids"),
            KeyPaddingMask::from_attention_mask(mask.view()),
        )
    }

    /// `transformers`' output rows (decoder start first, padded after EOS) as the crate's
    /// generated tokens: the start token dropped, cut after the first EOS.
    fn generated(&self, name: &str) -> Vec<Vec<u32>> {
        let eos = self.checkpoint.config.eos_id;
        let start = self.checkpoint.config.decoder_start_id;
        self.tensors
            .ids(name)
            .rows()
            .into_iter()
            .map(|row| {
                assert_eq!(row[0], start, "{name} starts with the decoder start token");
                let mut out = Vec::new();
                for &t in row.iter().skip(1) {
                    out.push(t);
                    if t == eos {
                        break;
                    }
                }
                out
            })
            .collect()
    }
}

#[test]
fn the_config_is_read_as_transformers_reads_it() {
    for variant in VARIANTS {
        let r = reference(variant);
        let (c, expected) = (&r.checkpoint.config, &r.json["config"]);
        let t = &c.transformer;
        let int = |k: &str| expected[k].as_u64().unwrap() as usize;
        assert_eq!(
            (t.d_model, t.num_heads, t.d_ff),
            (
                int("d_model"),
                int("encoder_attention_heads"),
                int("encoder_ffn_dim")
            )
        );
        assert_eq!(
            (t.src_vocab, t.tgt_vocab),
            (int("vocab_size"), int("decoder_vocab_size"))
        );
        assert_eq!(
            t.share_embeddings,
            expected["share_encoder_decoder_embeddings"]
                .as_bool()
                .unwrap()
        );
        assert_eq!(
            t.embedding.scale,
            expected["scale_embedding"].as_bool().unwrap()
        );
        assert_eq!(c.pad_id as usize, int("pad_token_id"));
        assert_eq!(c.decoder_start_id as usize, int("decoder_start_token_id"));
        let g = &r.checkpoint.generation;
        let gc = &r.json["generation_config"];
        assert_eq!(g.beam_size, gc["num_beams"].as_u64().unwrap() as usize);
        assert_eq!(
            g.suppress_tokens,
            vec![gc["bad_words_ids"][0][0].as_u64().unwrap() as u32]
        );
        assert!(g.forced_eos);
    }
}

/// Max |a − b| over each row's first `lengths[row]` positions of `[batch, len, width]` arrays.
fn max_err_on_real_positions(
    a: ndarray::ArrayView3<f32>,
    b: ndarray::ArrayView3<f32>,
    lengths: &[usize],
) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let mut worst = 0f32;
    for (row, &len) in lengths.iter().enumerate() {
        let (x, y) = (a.slice(s![row, ..len, ..]), b.slice(s![row, ..len, ..]));
        for (p, q) in x.iter().zip(y.iter()) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// The encoder output and the logits of a teacher-forced pass are within 1e-5 of
/// `transformers`' float32 values. The float64 pass is printed beside them to show each
/// side's own rounding (`f32_rounding` in `expected.json`: transformers' distance to it).
#[test]
fn encoder_output_and_logits_equal_transformers() {
    for variant in VARIANTS {
        check_forward_pass(&reference(variant), variant);
    }
}

fn check_forward_pass(r: &Reference, variant: &str) {
    let model = &r.checkpoint.model;
    let (src, padding) = r.source();
    let tgt = r.tensors.ids("decoder_input_ids");
    let tgt_mask = r.tensors.ids("decoder_attention_mask");
    let tgt_padding = KeyPaddingMask::from_attention_mask(tgt_mask.view());
    let memory = model.encode(src.view(), Some(&padding)).unwrap();
    let logits = model
        .forward(src.view(), tgt.view(), Some(&padding), Some(&tgt_padding))
        .unwrap();
    // Padded source positions are computed by both and compared; logits are compared where
    // the target is real (later positions see only padding, which the causal mask hides).
    let every_source_position = vec![src.ncols(); src.nrows()];
    for (what, got, lengths) in [
        ("encoder_output", memory.view(), every_source_position),
        ("logits", logits.view(), tgt_padding.lengths()),
    ] {
        let hf = r.tensors.f32(what).into_dimensionality::<Ix3>().unwrap();
        let exact = r
            .tensors
            .f32(&format!("{what}_f64"))
            .into_dimensionality::<Ix3>()
            .unwrap();
        let vs_hf = max_err_on_real_positions(got, hf.view(), &lengths);
        let ours = max_err_on_real_positions(got, exact.view(), &lengths);
        let theirs = r.json["f32_rounding"][what].as_f64().unwrap() as f32;
        let largest = hf.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!(
            "{variant:>9} {what:<15} |ours - transformers| {vs_hf:.1e}; to float64: ours \
             {ours:.1e}, transformers {theirs:.1e} (largest |value| {largest:.1})"
        );
        assert!(
            vs_hf <= 1e-5,
            "{variant} {what}: {vs_hf:e} from transformers, {ours:e} from float64 \
             (transformers: {theirs:e})"
        );
    }
}

#[test]
fn greedy_and_beam_search_reproduce_generate() {
    for variant in VARIANTS {
        let r = reference(variant);
        // The fixture's generation config is what the reference ran.
        assert_eq!(r.options("greedy").max_len, r.checkpoint.generation.max_len);
        assert_eq!(r.options("beam"), r.checkpoint.generation);
        check_generation(&r, variant);
    }
}

fn check_generation(r: &Reference, variant: &str) {
    let model = &r.checkpoint.model;
    let (src, padding) = r.source();
    let hyps = model
        .generate(src.view(), Some(&padding), &r.options("greedy"))
        .unwrap();
    let got: Vec<Vec<u32>> = hyps.iter().map(|h| h[0].tokens.clone()).collect();
    assert_eq!(
        got,
        r.generated("greedy_sequences"),
        "{variant}: greedy ids"
    );

    let hyps = model
        .generate(src.view(), Some(&padding), &r.options("beam"))
        .unwrap();
    let got: Vec<Vec<u32>> = hyps.iter().map(|h| h[0].tokens.clone()).collect();
    assert_eq!(got, r.generated("beam_sequences"), "{variant}: beam ids");
    let scores = r.tensors.f32("beam_sequences_scores");
    for (row, (h, &want)) in hyps.iter().zip(scores.iter()).enumerate() {
        let err = (h[0].score - want).abs();
        assert!(
            err <= 1e-5,
            "{variant} row {row}: score {} vs {want}",
            h[0].score
        );
    }
    // Some rows end with EOS before the limit and some are cut there by the forced EOS,
    // so both rules are exercised.
    let lengths: Vec<usize> = got.iter().map(Vec::len).collect();
    println!("{variant:>10} beam output lengths {lengths:?}");
}

/// The same checks at opus-mt-en-de's size (d_model 512, 6 + 6 layers, 8 heads, FFN 2048,
/// vocabulary 58101, transformers' random init). Its 296 MB checkpoint and reference are
/// made by `python3 tools/make_marian_fixture.py --full` (about 3 minutes, needs
/// `tools/requirements.txt`) into `target/models/opus-mt-en-de-random`, or the directory in
/// `NDTRANSFORMER_MARIAN_FULL`; then
/// `cargo test --release --test marian -- --ignored`.
#[test]
#[ignore = "needs the 296 MB checkpoint of `tools/make_marian_fixture.py --full`"]
fn full_size_checkpoint_equals_transformers() {
    let dir = std::env::var_os("NDTRANSFORMER_MARIAN_FULL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/opus-mt-en-de-random")
        });
    assert!(
        dir.join("expected.safetensors").is_file(),
        "{} has no reference outputs: run `python3 tools/make_marian_fixture.py --full`",
        dir.display()
    );
    let r = Reference::at(dir);
    let t = &r.checkpoint.config.transformer;
    assert_eq!(
        (
            t.d_model,
            t.num_heads,
            t.d_ff,
            t.num_encoder_layers,
            t.src_vocab
        ),
        (512, 8, 2048, 6, 58101)
    );
    check_forward_pass(&r, "full");
    check_generation(&r, "full");
}

#[test]
fn the_corpus_api_gives_each_sentence_what_generate_gives_it() {
    let r = reference("shared");
    let model = &r.checkpoint.model;
    let (src, padding) = r.source();
    let lengths = padding.lengths();
    let sources: Vec<Vec<u32>> = src
        .rows()
        .into_iter()
        .zip(&lengths)
        .map(|(row, &len)| row.iter().take(len).copied().collect())
        .collect();
    let options = &r.checkpoint.generation;
    let corpus = CorpusOptions::new(24, r.checkpoint.config.pad_id);
    let outputs = model
        .generate_corpus(&sources, &corpus, options, |_| {})
        .unwrap();
    for (source, got) in sources.iter().zip(&outputs) {
        let one = Array2::from_shape_vec((1, source.len()), source.clone()).unwrap();
        let alone = model.generate(one.view(), None, options).unwrap();
        assert_eq!(got[0].tokens, alone[0][0].tokens);
    }
    let prefixed = GenerateOptions {
        prefix: vec![vec![5]; sources.len()],
        ..options.clone()
    };
    let err = model
        .generate_corpus(&sources, &corpus, &prefixed, |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("prefix holds 6 rows"), "{err}");
}

/// A precision in `LoadOptions` converts on load exactly as `quantize` after loading does.
#[test]
fn a_precision_on_load_equals_quantizing_after_loading() {
    let r = reference("shared");
    let (src, padding) = r.source();
    let tgt = r.tensors.ids("decoder_input_ids");
    for precision in [Precision::Bf16, Precision::Int8] {
        let options = LoadOptions {
            precision: Some(precision),
            ..LoadOptions::default()
        };
        let on_load = MarianCheckpoint::load_with_options(&r.dir, &options).unwrap();
        assert_eq!(on_load.model.precision(), precision);
        let mut after = r.checkpoint.model.clone();
        after.quantize(precision).unwrap();
        let logits = |m: &Transformer| m.forward(src.view(), tgt.view(), Some(&padding), None);
        assert_eq!(logits(&on_load.model).unwrap(), logits(&after).unwrap());
        assert!(on_load.model.parameter_bytes() * 10 < r.checkpoint.model.parameter_bytes() * 7);
    }
}

/// The fixture checkpoint's files, to damage one at a time.
fn files(variant: &str) -> (String, String, Vec<u8>) {
    let dir = fixtures_dir().join("marian").join(variant);
    (
        std::fs::read_to_string(dir.join("config.json")).unwrap(),
        std::fs::read_to_string(dir.join("generation_config.json")).unwrap(),
        std::fs::read(dir.join("model.safetensors")).unwrap(),
    )
}

/// `bytes` with tensor `name` replaced by an f32 one (`Some`) or removed (`None`).
fn edit(bytes: &[u8], name: &str, replacement: Option<ndarray::ArrayD<f32>>) -> Vec<u8> {
    let mut tensors: Vec<Tensor> = tensors_of(bytes)
        .into_iter()
        .filter(|t| t.name != name)
        .collect();
    if let Some(t) = replacement {
        tensors.push(Tensor {
            name: name.to_string(),
            dtype: safetensors::Dtype::F32,
            shape: t.shape().to_vec(),
            data: t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }
    serialize(&tensors)
}

#[test]
fn malformed_configs_and_checkpoints_are_errors_naming_the_culprit() {
    let (config_text, generation_text, bytes) = files("shared");
    let config = marian::config_from_json(&config_text).unwrap();
    let c = config.transformer.clone();
    let load = |bytes: &[u8]| {
        Transformer::from_hf_marian(c.clone(), bytes, &LoadOptions::default())
            .unwrap_err()
            .to_string()
    };
    let bias_len = c.tgt_vocab;
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            "a missing layer weight".into(),
            edit(&bytes, "model.encoder.layers.1.fc1.weight", None),
            "model.encoder.layers.1.fc1.weight",
        ),
        (
            "final_logits_bias as a plain vector".into(),
            edit(
                &bytes,
                "final_logits_bias",
                Some(ndarray::ArrayD::zeros(vec![bias_len])),
            ),
            "final_logits_bias",
        ),
        (
            "a tied output head with other values".into(),
            edit(
                &bytes,
                "lm_head.weight",
                Some(ndarray::ArrayD::from_elem(
                    vec![c.tgt_vocab, c.d_model],
                    0.5,
                )),
            ),
            "`lm_head.weight` differs from `model.shared.weight`",
        ),
        (
            "the paper's interleaved position table".into(),
            edit(
                &bytes,
                "model.encoder.embed_positions.weight",
                Some(
                    ndtransformer::PositionalEncoding::new(c.max_len, c.d_model)
                        .table(c.max_len)
                        .unwrap()
                        .to_owned()
                        .into_dyn(),
                ),
            ),
            "is not Marian's sinusoidal table",
        ),
        (
            "an extra tensor".into(),
            edit(
                &bytes,
                "model.encoder.layer_norm.weight",
                Some(ndarray::ArrayD::zeros(vec![c.d_model])),
            ),
            "model.encoder.layer_norm.weight",
        ),
        (
            "truncated bytes".into(),
            bytes[..bytes.len() / 2].to_vec(),
            "safetensors",
        ),
    ];
    for (what, damaged, expected) in cases {
        let err = load(&damaged);
        println!("{what}: {err}");
        assert!(
            err.contains(expected),
            "{what}: {err} should name {expected}"
        );
    }
    // A separate-vocabulary checkpoint read as a shared one misses `model.shared.weight`.
    let (_, _, separate) = files("separate");
    let err = load(&separate);
    assert!(err.contains("model.shared.weight"), "{err}");
    // The configuration's own errors, through a directory.
    let dir = std::env::temp_dir().join(format!("ndtransformer-marian-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |config: &str, generation: &str| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        std::fs::write(dir.join("generation_config.json"), generation).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        MarianCheckpoint::load(&dir).unwrap_err()
    };
    let err = write(
        &config_text.replace("\"swish\"", "\"mish\""),
        &generation_text,
    );
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(
        err.to_string().contains("activation_function \"mish\""),
        "{err}"
    );
    let err = write(
        &config_text,
        &generation_text.replace("\"num_beams\": 4", "\"num_beams\": \"4\""),
    );
    assert!(err.to_string().contains("num_beams is \"4\""), "{err}");
    std::fs::write(dir.join("generation_config.json"), &generation_text).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = MarianCheckpoint::load(&dir).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
