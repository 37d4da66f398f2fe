//! The generation controls: against the `generation` fixture (PyTorch + `transformers`
//! `generate()`, and a plain re-implementation of each rule), and by their defining properties:
//! sampling frequencies against the softmax, top-k/top-p sets, min_len, suppressed tokens,
//! forced prefixes, no-repeat n-grams, streaming, per-token log-probabilities, alignments and
//! the errors of bad options.

mod common;

use common::{assert_close, Fixture};
use ndarray::{s, Array1, Array2, Axis};
use ndtransformer::{
    Error, GenerateOptions, KeyPaddingMask, LengthPenalty, MaxLength, NormPosition, Sampling,
    Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use serde_json::Value;

/// The fixture's model, sources and its `generation` block.
struct Case {
    fx: Fixture,
    model: Transformer,
    src: Array2<u32>,
    padding: KeyPaddingMask,
}

impl Case {
    fn load() -> Case {
        let fx = Fixture::load("generation");
        let model = fx.model();
        let src = fx.ids("io.src_ids");
        let padding = KeyPaddingMask::from_padding_flags(fx.flags("io.src_key_padding_mask"));
        Case {
            fx,
            model,
            src,
            padding,
        }
    }

    fn g(&self) -> &Value {
        &self.fx.json["generation"]
    }

    fn id(&self, key: &str) -> u32 {
        self.g()[key].as_u64().unwrap() as u32
    }

    /// Greedy options of a fixture case block (its `eos_id`, null = none).
    fn greedy(&self, block: &Value) -> GenerateOptions {
        GenerateOptions::greedy(
            self.id("bos_id"),
            block["eos_id"].as_u64().map(|e| e as u32),
            self.g()["max_new_tokens"].as_u64().unwrap() as usize,
        )
    }

    fn run(&self, options: &GenerateOptions) -> Vec<Vec<ndtransformer::Hypothesis>> {
        self.model
            .generate(self.src.view(), Some(&self.padding), options)
            .unwrap()
    }

    fn tokens(&self, options: &GenerateOptions) -> Vec<Vec<u32>> {
        self.run(options)
            .into_iter()
            .map(|mut h| h.swap_remove(0).tokens)
            .collect()
    }

    fn expected(&self, block: &Value) -> Vec<Vec<u32>> {
        self.fx.id_lists(block["ids"].as_str().unwrap())
    }
}

#[test]
fn greedy_ids_and_token_log_probs_match_pytorch() {
    let c = Case::load();
    for key in ["greedy", "greedy_eos"] {
        let block = &c.g()[key];
        let hyps = c.run(&c.greedy(block));
        let expected = c.expected(block);
        for (row, h) in hyps.iter().enumerate() {
            assert_eq!(h[0].tokens, expected[row], "{key} row {row}");
            let sum: f32 = h[0].token_log_probs.iter().sum();
            assert_eq!(h[0].log_prob, sum);
        }
        if let Some(name) = block["log_probs"].as_str() {
            let want = c.fx.f32(name);
            let got = Array2::from_shape_fn((hyps.len(), want.shape()[1]), |(r, t)| {
                hyps[r][0].token_log_probs[t]
            });
            assert_close("generation", key, &got, &want, 1e-5);
        }
    }
}

#[test]
fn repetition_penalty_no_repeat_ngrams_and_min_len_match_the_reference() {
    let c = Case::load();
    let block = &c.g()["repetition_penalty"];
    let options = GenerateOptions {
        repetition_penalty: block["theta"].as_f64().unwrap() as f32,
        ..c.greedy(block)
    };
    assert_eq!(c.tokens(&options), c.expected(block), "repetition penalty");

    for block in c.g()["no_repeat_ngram"].as_array().unwrap() {
        let n = block["n"].as_u64().unwrap() as usize;
        let options = GenerateOptions {
            no_repeat_ngram_size: n,
            ..c.greedy(block)
        };
        assert_eq!(c.tokens(&options), c.expected(block), "no-repeat n = {n}");
    }

    let block = &c.g()["min_length"];
    let options = GenerateOptions {
        min_len: block["min_len"].as_u64().unwrap() as usize,
        ..c.greedy(block)
    };
    assert_eq!(c.tokens(&options), c.expected(block), "min_len");
}

#[test]
fn hugging_face_length_penalty_reproduces_transformers_beam_search() {
    let c = Case::load();
    let beam = &c.g()["beam"];
    let num_beams = beam["num_beams"].as_u64().unwrap() as usize;
    let num_return = beam["num_return_sequences"].as_u64().unwrap() as usize;
    for setting in beam["settings"].as_array().unwrap() {
        let alpha = setting["length_penalty"].as_f64().unwrap() as f32;
        let prefix = setting["prefix"].as_str().unwrap();
        let options = GenerateOptions {
            max_len: MaxLength::Fixed(c.g()["max_new_tokens"].as_u64().unwrap() as usize),
            num_return,
            length_penalty: LengthPenalty::HuggingFace(alpha),
            ..GenerateOptions::beam(
                c.id("bos_id"),
                beam["eos_id"].as_u64().unwrap() as u32,
                num_beams,
            )
        };
        let hyps = c.run(&options);
        let ids = c.fx.id_lists(&format!("{prefix}.ids"));
        let scores = c.fx.f32(&format!("{prefix}.scores"));
        let sums = c.fx.f32(&format!("{prefix}.sum_log_probs"));
        let finished = c.fx.flags(&format!("{prefix}.finished"));
        for (row, row_hyps) in hyps.iter().enumerate() {
            assert_eq!(row_hyps.len(), num_return, "α {alpha} row {row}");
            for (r, h) in row_hyps.iter().enumerate() {
                let at = format!("α {alpha} row {row} hypothesis {r}");
                assert_eq!(h.tokens, ids[row * num_return + r], "{at}");
                assert!((h.score - scores[[row, r]]).abs() <= 1e-5, "{at}: score");
                assert!(
                    (h.log_prob - sums[[row, r]]).abs() <= 5e-5,
                    "{at}: log-prob"
                );
                assert_eq!(h.finished, finished[[row, r]], "{at}: finished");
            }
        }
    }
}

fn random_model(vocab: usize, seed: u64) -> Transformer {
    let config = TransformerConfig {
        d_model: 16,
        num_heads: 2,
        d_ff: 32,
        num_encoder_layers: 1,
        num_decoder_layers: 2,
        max_len: 64,
        norm_position: NormPosition::Pre,
        ..TransformerConfig::base(vocab, vocab)
    };
    Transformer::new(config, &mut StdRng::seed_from_u64(seed)).unwrap()
}

fn random_source(rows: usize, len: usize, vocab: usize, seed: u64) -> Array2<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, len), || rng.random_range(3..vocab as u32))
}

/// χ² of observed counts against probabilities, over the tokens with probability > 0.
fn chi_squared(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

/// The first-step distribution of `model` on one source, under `sampling`, by its definition:
/// softmax(logits / T), top-k, then top-p, renormalised.
fn first_step_distribution(model: &Transformer, src: &Array2<u32>, s: &Sampling) -> Vec<f64> {
    let tgt = Array2::from_elem((1, 1), 1u32);
    let logits = model.forward(src.view(), tgt.view(), None, None).unwrap();
    let logits = logits.slice(s![0, 0, ..]);
    let max = logits.fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let mut p: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - max) / s.temperature as f64).exp())
        .collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let k = if s.top_k == 0 { p.len() } else { s.top_k };
    for &t in &order[k..] {
        p[t] = 0.0;
    }
    let total: f64 = p.iter().sum();
    let mut mass = 0.0;
    let mut reached = false;
    for &t in &order[..k] {
        if reached {
            p[t] = 0.0;
        }
        mass += p[t] / total;
        reached = reached || mass >= s.top_p as f64;
    }
    let total: f64 = p.iter().sum();
    p.iter().map(|v| v / total).collect()
}

#[test]
fn sampled_frequencies_follow_the_softmax_and_stay_inside_top_k_and_top_p() {
    let vocab = 8;
    let model = random_model(vocab, 11);
    let src = random_source(1, 5, vocab, 12);
    let draws = 4000;
    // One step for many copies of the same source: every row draws from the same distribution.
    let batch = src.broadcast((draws, 5)).unwrap().to_owned();
    let options = GenerateOptions::greedy(1, None, 1);
    for (i, sampling) in [
        Sampling::default(),
        Sampling {
            temperature: 0.6,
            ..Sampling::default()
        },
        Sampling {
            temperature: 1.5,
            top_k: 3,
            ..Sampling::default()
        },
        Sampling {
            top_p: 0.7,
            ..Sampling::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let probs = first_step_distribution(&model, &src, &sampling);
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let hyps = model
            .sample(batch.view(), None, &options, &sampling, &mut rng)
            .unwrap();
        let mut counts = vec![0usize; vocab];
        for h in &hyps {
            counts[h.tokens[0] as usize] += 1;
        }
        for (t, (&c, &p)) in counts.iter().zip(&probs).enumerate() {
            assert!(
                p > 0.0 || c == 0,
                "{sampling:?}: token {t} outside the set drawn {c}×"
            );
        }
        let support = probs.iter().filter(|&&p| p > 0.0).count();
        let chi2 = chi_squared(&counts, &probs);
        // The 0.1% critical values of χ² for 1..=7 degrees of freedom.
        let critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32];
        println!(
            "{sampling:?}: χ² {chi2:.2} on {} degrees of freedom",
            support - 1
        );
        if support > 1 {
            assert!(chi2 < critical[support - 2], "{sampling:?}: χ² {chi2}");
        }
    }
}

#[test]
fn same_seed_same_samples_on_one_and_two_threads_and_the_stream_yields_them() {
    let vocab = 30;
    let model = random_model(vocab, 3);
    let src = random_source(4, 9, vocab, 4);
    let padding = KeyPaddingMask::from_lengths(&[9, 5, 2, 7], 9).unwrap();
    let options = GenerateOptions {
        repetition_penalty: 1.3,
        ..GenerateOptions::greedy(1, Some(2), 20)
    };
    let sampling = Sampling {
        temperature: 0.9,
        top_k: 10,
        top_p: 0.95,
    };
    let run = |threads: usize| {
        common::in_pool(threads, || {
            let mut rng = StdRng::seed_from_u64(77);
            model
                .sample(src.view(), Some(&padding), &options, &sampling, &mut rng)
                .unwrap()
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));

    let mut rng = StdRng::seed_from_u64(77);
    let stream = model
        .stream_sampled(src.view(), Some(&padding), &options, &sampling, &mut rng)
        .unwrap();
    let mut streamed = vec![Vec::new(); 4];
    for step in stream {
        for t in step.unwrap() {
            streamed[t.row].push(t.token);
            assert_eq!(t.is_last, streamed[t.row].len() == one[t.row].tokens.len());
        }
    }
    let want: Vec<Vec<u32>> = one.iter().map(|h| h.tokens.clone()).collect();
    assert_eq!(streamed, want);

    // Greedy streams too, and stopping early leaves what was yielded.
    let greedy = model
        .generate(src.view(), Some(&padding), &options)
        .unwrap();
    let mut stream = model.stream(src.view(), Some(&padding), &options).unwrap();
    let first = stream.next().unwrap().unwrap();
    assert_eq!(first.len(), 4);
    for t in &first {
        assert_eq!(t.token, greedy[t.row][0].tokens[0]);
    }
    assert_eq!(stream.tokens(1), &greedy[1][0].tokens[..1]);
    let rest = stream.finish().unwrap();
    for (row, h) in rest.iter().enumerate() {
        assert_eq!(h, &greedy[row][0]);
    }
}

#[test]
fn constraints_hold_on_greedy_sampling_and_beam_search() {
    let vocab = 12;
    let model = random_model(vocab, 21);
    let src = random_source(3, 6, vocab, 22);
    let (eos, min_len, n) = (2u32, 5usize, 2usize);
    let prefix = vec![vec![7, 7, 4], vec![], vec![9]];
    let base = GenerateOptions {
        min_len,
        no_repeat_ngram_size: n,
        suppress_tokens: vec![3, 5],
        prefix: prefix.clone(),
        ..GenerateOptions::greedy(1, Some(eos), 14)
    };
    let mut outputs = Vec::new();
    outputs.extend(model.generate(src.view(), None, &base).unwrap());
    let beam = GenerateOptions {
        beam_size: 4,
        num_return: 4,
        ..base.clone()
    };
    outputs.extend(model.generate(src.view(), None, &beam).unwrap());
    let mut rng = StdRng::seed_from_u64(5);
    let sampled = model
        .sample(src.view(), None, &base, &Sampling::default(), &mut rng)
        .unwrap();
    outputs.extend(sampled.into_iter().map(|h| vec![h]));
    for (i, row_hyps) in outputs.iter().enumerate() {
        let row = i % 3;
        for h in row_hyps {
            let t = &h.tokens;
            assert!(
                t.starts_with(&prefix[row]),
                "{t:?} lacks prefix {:?}",
                prefix[row]
            );
            assert!(
                !t.contains(&3) && !t.contains(&5),
                "suppressed token in {t:?}"
            );
            if let Some(at) = t.iter().position(|&x| x == eos) {
                assert!(at >= min_len, "EOS at {at} < min_len in {t:?}");
            }
            // No n-gram twice, counting BOS before the generated tokens.
            let context: Vec<u32> = std::iter::once(1).chain(t.iter().copied()).collect();
            // The forced prefix may repeat itself; check the n-grams that end after it.
            let free = prefix[row].len() + 1;
            let grams: Vec<&[u32]> = context.windows(n).collect();
            for (j, g) in grams.iter().enumerate() {
                if j + n > free {
                    assert!(!grams[..j].contains(g), "n-gram {g:?} repeated in {t:?}");
                }
            }
            assert_eq!(h.token_log_probs.len(), t.len());
        }
    }
}

#[test]
fn token_log_probs_and_alignments_equal_a_teacher_forced_pass() {
    let vocab = 20;
    let model = random_model(vocab, 31);
    let src = random_source(2, 7, vocab, 32);
    let padding = KeyPaddingMask::from_lengths(&[7, 4], 7).unwrap();
    for beam_size in [1, 3] {
        let options = GenerateOptions {
            beam_size,
            num_return: beam_size,
            alignment_layer: Some(1),
            prefix: vec![vec![6], vec![8, 9]],
            ..GenerateOptions::greedy(1, Some(2), 9)
        };
        let hyps = model
            .generate(src.view(), Some(&padding), &options)
            .unwrap();
        for (row, row_hyps) in hyps.iter().enumerate() {
            for h in row_hyps {
                let len = h.tokens.len();
                let tgt: Array1<u32> = std::iter::once(1)
                    .chain(h.tokens[..len - 1].iter().copied())
                    .collect();
                let tgt = tgt.insert_axis(Axis(0));
                let one_src = src.slice(s![row..=row, ..]).to_owned();
                let one_pad = KeyPaddingMask::from_padding_flags(
                    padding.is_padding().slice(s![row..=row, ..]).to_owned(),
                );
                let trace = model
                    .forward_traced(one_src.view(), tgt.view(), Some(&one_pad), None)
                    .unwrap();
                let mut log_probs = trace.logits.index_axis(Axis(0), 0).to_owned();
                ndtransformer::ops::log_softmax_rows_inplace(log_probs.view_mut());
                for (t, &token) in h.tokens.iter().enumerate() {
                    let want = log_probs[[t, token as usize]];
                    assert!(
                        (h.token_log_probs[t] - want).abs() <= 1e-5,
                        "beam {beam_size} row {row} token {t}"
                    );
                }
                let want = trace.decoder.cross_attention[1]
                    .index_axis(Axis(0), 0)
                    .mean_axis(Axis(0))
                    .unwrap();
                let got = h.alignment.as_ref().expect("alignment asked for");
                assert_eq!(got.dim(), (len, 7));
                assert_close("random", "alignment", got, &want.into_dyn(), 1e-5);
                for a in got.rows() {
                    assert!((a.sum() - 1.0).abs() < 1e-5);
                    assert!(a
                        .slice(s![padding.lengths()[row]..])
                        .iter()
                        .all(|&w| w == 0.0));
                }
            }
        }
    }
}

#[test]
fn bad_generation_options_are_errors_naming_the_option() {
    let model = random_model(10, 1);
    let src = random_source(2, 4, 10, 2);
    let param = |o: GenerateOptions| match model.generate(src.view(), None, &o) {
        Err(Error::Decoding { parameter, reason }) => {
            println!("{parameter}: {reason}");
            parameter
        }
        other => panic!("{o:?}: {other:?}"),
    };
    let base = GenerateOptions::greedy(1, Some(2), 8);
    let with = |f: &dyn Fn(&mut GenerateOptions)| {
        let mut o = base.clone();
        f(&mut o);
        param(o)
    };
    assert_eq!(with(&|o| o.repetition_penalty = 0.0), "repetition_penalty");
    assert_eq!(
        with(&|o| o.repetition_penalty = f32::NAN),
        "repetition_penalty"
    );
    assert_eq!(with(&|o| o.suppress_tokens = vec![10]), "suppress_tokens");
    assert_eq!(with(&|o| o.prefix = vec![vec![3]]), "prefix");
    assert_eq!(with(&|o| o.prefix = vec![vec![3], vec![11]]), "prefix");
    assert_eq!(with(&|o| o.prefix = vec![vec![3; 8], vec![]]), "prefix");
    assert_eq!(with(&|o| o.alignment_layer = Some(2)), "alignment_layer");
    assert_eq!(
        with(&|o| o.length_penalty = LengthPenalty::HuggingFace(-1.0)),
        "length_penalty"
    );
    assert_eq!(with(&|o| o.num_return = 2), "num_return");
    let mut rng = StdRng::seed_from_u64(0);
    let sample = |s: Sampling, o: &GenerateOptions, rng: &mut StdRng| match model.sample(
        src.view(),
        None,
        o,
        &s,
        rng,
    ) {
        Err(Error::Decoding { parameter, .. }) => parameter,
        other => panic!("{s:?}: {other:?}"),
    };
    let s = Sampling::default();
    assert_eq!(
        sample(
            Sampling {
                temperature: -1.0,
                ..s
            },
            &base,
            &mut rng
        ),
        "temperature"
    );
    assert_eq!(
        sample(Sampling { top_p: 1.01, ..s }, &base, &mut rng),
        "top_p"
    );
    let beam = GenerateOptions {
        beam_size: 2,
        ..base.clone()
    };
    assert_eq!(sample(s, &beam, &mut rng), "beam_size");
    assert!(model.stream(src.view(), None, &beam).is_err());
}
