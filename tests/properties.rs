//! Properties that must hold for every small model and every valid input, checked with
//! [proptest](https://docs.rs/proptest) over random configs (width, heads, `d_ff`, depth,
//! vocabularies, post-LN and pre-LN, ReLU and GELU, shared and tied matrices), batch sizes,
//! lengths and paddings:
//!
//! - the model returns `Ok` exactly when the input is valid, and `Err` (never a panic) otherwise,
//!   naming an out-of-range token id where it is;
//! - a batch row's output does not depend on the other rows;
//! - a padded sequence gives the same outputs as the sequence alone, at its real positions;
//! - without positional encoding the encoder is permutation-equivariant, and cross-attention
//!   does not depend on the order of the memory;
//! - attention weights are non-negative and each row sums to 1, or is all zeros when the mask
//!   hides every key (the rule of [`ndtransformer::mask`]);
//! - cached decoding (`start_decoding` + `decode_step`) equals decoding the whole prefix.
//!
//! Each property runs 64 cases by default (the whole file takes well under a second on top of
//! the build). Set proptest's own `PROPTEST_CASES` environment variable for a longer search,
//! e.g. `PROPTEST_CASES=50000 cargo test --test properties` (about 2.5 minutes on 2 cores);
//! proptest reads it at run time and it overrides the count set here. Each run draws new
//! random cases; a failing case is shrunk to a small one, printed, and its seed saved in
//! `tests/properties.proptest-regressions`, which is replayed first on later runs (commit it).
//!
//! Numbers agree within 1e-5 rather than exactly: the matrix products pick their kernel and
//! blocking by the number of rows, so the same row in a batch of another size is summed in
//! another order.

use ndarray::{s, Array1, Array2, Array3, ArrayView4, Axis};
use ndtransformer::{
    Activation, AttnMask, Error, KeyPaddingMask, Mask, MultiHeadAttention, NormPosition,
    Transformer, TransformerConfig,
};
use proptest::prelude::*;
use proptest::sample::Index;
use rand::{rngs::StdRng, RngExt, SeedableRng};

/// Longest source or target in the generated inputs (the model's table is a little longer).
const MAX_LEN: usize = 9;
/// Largest batch in the generated inputs.
const MAX_BATCH: usize = 4;
/// Agreement between two computations of the same numbers in different orders.
const TOL: f32 = 1e-5;

fn cases() -> ProptestConfig {
    ProptestConfig::with_cases(64)
}

/// A small random config; `d_model = num_heads · d_k` so it always validates.
///
/// `d_model` is at least 8. A LayerNorm divides by the spread of its `d_model` inputs; with 2
/// to 4 features that spread is now and then tiny (a position whose features are all about
/// equal), and rounding differences of 1e-7 in the input come out 10-100 times larger — about
/// one case in 5,000 exceeded 1e-5 at `d_model` 4. That is float conditioning, not a bug (each
/// sub-layer was checked to agree to 1e-7 on equal inputs), and allowing for it would mean a
/// tolerance loose enough to hide real differences.
fn configs() -> impl Strategy<Value = TransformerConfig> {
    // Every (num_heads, d_k) with 8 <= d_model <= 16 and up to 8 heads: d_k from 1 to 16.
    fn head_shapes() -> Vec<(usize, usize)> {
        (1..=8usize)
            .flat_map(|h| (1..=16usize).map(move |d_k| (h, d_k)))
            .filter(|(h, d_k)| (8..=16).contains(&(h * d_k)))
            .collect()
    }
    (
        (proptest::sample::select(head_shapes()), 1usize..=24)
            .prop_map(|((h, d_k), d_ff)| (h, d_k, d_ff)),
        (1usize..=2, 1usize..=2),
        (2usize..=20, 2usize..=20),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (num_heads, d_k, d_ff),
                (enc, dec),
                (src_vocab, tgt_vocab),
                (gelu, pre, share, tie),
            )| {
                TransformerConfig {
                    d_model: num_heads * d_k,
                    num_heads,
                    d_ff,
                    num_encoder_layers: enc,
                    num_decoder_layers: dec,
                    src_vocab,
                    tgt_vocab: if share { src_vocab } else { tgt_vocab },
                    max_len: MAX_LEN + 2,
                    activation: if gelu {
                        Activation::Gelu
                    } else {
                        Activation::Relu
                    },
                    norm_position: if pre {
                        NormPosition::Pre
                    } else {
                        NormPosition::Post
                    },
                    share_embeddings: share,
                    tie_output_projection: tie,
                    ..TransformerConfig::base(src_vocab, tgt_vocab)
                }
            },
        )
}

/// A model from a config and a seed for its weights.
#[derive(Debug, Clone)]
struct ModelSpec {
    config: TransformerConfig,
    seed: u64,
}

impl ModelSpec {
    fn build(&self) -> Transformer {
        Transformer::new(self.config.clone(), &mut StdRng::seed_from_u64(self.seed))
            .expect("generated configs are valid")
    }
}

fn models() -> impl Strategy<Value = ModelSpec> {
    (configs(), any::<u64>()).prop_map(|(config, seed)| ModelSpec { config, seed })
}

/// Valid model inputs: ids in range and right-padding given by each row's real length.
#[derive(Debug, Clone)]
struct Batch {
    src: Array2<u32>,
    tgt: Array2<u32>,
    src_lengths: Vec<usize>,
    tgt_lengths: Vec<usize>,
}

impl Batch {
    fn src_padding(&self) -> KeyPaddingMask {
        KeyPaddingMask::from_lengths(&self.src_lengths, self.src.ncols()).unwrap()
    }

    fn tgt_padding(&self) -> KeyPaddingMask {
        KeyPaddingMask::from_lengths(&self.tgt_lengths, self.tgt.ncols()).unwrap()
    }
}

/// `rows × cols` ids below `vocab`.
fn ids(rows: usize, cols: usize, vocab: usize) -> impl Strategy<Value = Array2<u32>> {
    proptest::collection::vec(0..vocab as u32, rows * cols)
        .prop_map(move |v| Array2::from_shape_vec((rows, cols), v).unwrap())
}

/// A batch for `config`; every real length is at least `min_len` (0 allows rows that are all
/// padding).
fn batches(config: &TransformerConfig, min_len: usize) -> impl Strategy<Value = Batch> {
    let (src_vocab, tgt_vocab) = (config.src_vocab, config.tgt_vocab);
    (1..=MAX_BATCH, 1..=MAX_LEN, 1..=MAX_LEN).prop_flat_map(move |(batch, src_len, tgt_len)| {
        let lengths = |len: usize| proptest::collection::vec(min_len.min(len)..=len, batch);
        (
            ids(batch, src_len, src_vocab),
            ids(batch, tgt_len, tgt_vocab),
            lengths(src_len),
            lengths(tgt_len),
        )
            .prop_map(|(src, tgt, src_lengths, tgt_lengths)| Batch {
                src,
                tgt,
                src_lengths,
                tgt_lengths,
            })
    })
}

fn models_and_batches(min_len: usize) -> impl Strategy<Value = (ModelSpec, Batch)> {
    models().prop_flat_map(move |m| {
        let b = batches(&m.config, min_len);
        (Just(m), b)
    })
}

/// `[rows, cols]` padding flags, any pattern.
fn flags(rows: usize, cols: usize) -> impl Strategy<Value = Array2<bool>> {
    proptest::collection::vec(any::<bool>(), rows * cols)
        .prop_map(move |v| Array2::from_shape_vec((rows, cols), v).unwrap())
}

fn max_abs_diff<D: ndarray::Dimension>(
    a: ndarray::ArrayView<f32, D>,
    b: ndarray::ArrayView<f32, D>,
) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn random_array3(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    Array3::from_shape_simple_fn(shape, || rng.random_range(-2.0f32..2.0))
}

/// Checks attention weights `[batch, num_heads, tgt_len, src_len]` against the mask that made
/// them: every weight is non-negative and a hidden key's exactly 0; a row sums to 1 if the query
/// sees some key, and is all zeros if it sees none.
fn check_attention_weights(
    what: &str,
    weights: ArrayView4<f32>,
    mask: &Mask,
) -> Result<(), TestCaseError> {
    let (batch, _, tgt_len, src_len) = weights.dim();
    for b in 0..batch {
        for (h, head) in weights.index_axis(Axis(0), b).outer_iter().enumerate() {
            for (i, row) in head.outer_iter().enumerate() {
                let visible: Vec<bool> = (0..src_len)
                    .map(|j| !mask.is_blocked(b, i, j, tgt_len, src_len))
                    .collect();
                for (j, &w) in row.iter().enumerate() {
                    prop_assert!(
                        w >= 0.0 && (visible[j] || w == 0.0),
                        "{what}: weight [{b}, {h}, {i}, {j}] = {w} (visible: {})",
                        visible[j]
                    );
                }
                let sum = row.sum();
                if visible.contains(&true) {
                    prop_assert!(
                        (sum - 1.0).abs() <= TOL,
                        "{what}: row [{b}, {h}, {i}] sums to {sum}"
                    );
                } else {
                    prop_assert!(
                        sum == 0.0,
                        "{what}: fully masked row [{b}, {h}, {i}] sums to {sum}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Inputs for the validity property: any sizes (empty and too long included), ids up to two
/// past the vocabulary, masks of any size or none.
#[derive(Debug, Clone)]
struct AnyInput {
    src: Array2<u32>,
    tgt: Array2<u32>,
    src_padding: Option<Array2<bool>>,
    tgt_padding: Option<Array2<bool>>,
}

fn any_inputs(config: &TransformerConfig) -> impl Strategy<Value = AnyInput> {
    let (src_vocab, tgt_vocab) = (config.src_vocab, config.tgt_vocab);
    let max_len = config.max_len;
    // Sizes mostly valid, sometimes 0 or past the positional table, so that valid and invalid
    // inputs are both common (about half each).
    let batch = || prop_oneof![9 => 1..=3usize, 1 => Just(0)];
    let len = move || prop_oneof![18 => 1..=max_len, 1 => Just(0), 1 => max_len + 1..=max_len + 2];
    let dims = move || (batch(), len());
    let fit = || prop_oneof![9 => Just(true), 1 => Just(false)];
    (
        (dims(), dims(), dims(), dims()),
        (fit(), fit(), fit()),
        any::<(bool, bool)>(),
    )
        .prop_flat_map(
            move |(
                (src_dim, tgt_dim, sp_dim, tp_dim),
                (same_batch, sp_fits, tp_fits),
                (sp_some, tp_some),
            )| {
                let tgt_dim = if same_batch {
                    (src_dim.0, tgt_dim.1)
                } else {
                    tgt_dim
                };
                let sp_dim = if sp_fits { src_dim } else { sp_dim };
                let tp_dim = if tp_fits { tgt_dim } else { tp_dim };
                // Now and then an id up to 2 past the vocabulary.
                let id =
                    |vocab: usize| prop_oneof![199 => 0..vocab as u32, 1 => 0..vocab as u32 + 2];
                let grid = move |(r, c): (usize, usize), vocab: usize| {
                    proptest::collection::vec(id(vocab), r * c)
                        .prop_map(move |v| Array2::from_shape_vec((r, c), v).unwrap())
                };
                (
                    grid(src_dim, src_vocab),
                    grid(tgt_dim, tgt_vocab),
                    flags(sp_dim.0, sp_dim.1),
                    flags(tp_dim.0, tp_dim.1),
                )
                    .prop_map(move |(src, tgt, sp, tp)| AnyInput {
                        src,
                        tgt,
                        src_padding: sp_some.then_some(sp),
                        tgt_padding: tp_some.then_some(tp),
                    })
            },
        )
}

proptest! {
    #![proptest_config(cases())]

    /// `forward` is `Ok` with finite logits of the right shape exactly when every documented
    /// precondition holds, and `Err` otherwise; it never panics.
    #[test]
    fn forward_is_ok_exactly_on_valid_input(
        (spec, input) in models().prop_flat_map(|m| {
            let i = any_inputs(&m.config);
            (Just(m), i)
        })
    ) {
        let model = spec.build();
        let c = model.config();
        let AnyInput { src, tgt, src_padding, tgt_padding } = &input;
        let src_padding = src_padding.clone().map(KeyPaddingMask::from_padding_flags);
        let tgt_padding = tgt_padding.clone().map(KeyPaddingMask::from_padding_flags);
        let fits = |ids: &Array2<u32>, vocab: usize| {
            !ids.is_empty() && ids.ncols() <= c.max_len && ids.iter().all(|&id| (id as usize) < vocab)
        };
        let valid = fits(src, c.src_vocab)
            && fits(tgt, c.tgt_vocab)
            && src.nrows() == tgt.nrows()
            && src_padding.as_ref().is_none_or(|m| m.dim() == src.dim())
            && tgt_padding.as_ref().is_none_or(|m| m.dim() == tgt.dim());
        let result = model.forward(src.view(), tgt.view(), src_padding.as_ref(), tgt_padding.as_ref());
        match result {
            Ok(logits) => {
                prop_assert!(valid, "accepted invalid input");
                prop_assert_eq!(logits.shape(), &[tgt.nrows(), tgt.ncols(), c.tgt_vocab]);
                prop_assert!(logits.iter().all(|v| v.is_finite()));
            }
            Err(e) => prop_assert!(!valid, "rejected valid input: {e}"),
        }
    }

    /// One id outside the vocabulary, in the source or the target, is reported with its value,
    /// row and position; in `decode_step` too.
    #[test]
    fn an_out_of_range_id_is_an_error_naming_it(
        (spec, batch, row, pos, offset, in_target) in models_and_batches(0).prop_flat_map(|(m, b)| {
            (Just(m), Just(b), any::<Index>(), any::<Index>(), 0u32..1000, any::<bool>())
        }),
    ) {
        let model = spec.build();
        let (mut src, mut tgt) = (batch.src.clone(), batch.tgt.clone());
        let (ids, vocab) = if in_target {
            (&mut tgt, model.config().tgt_vocab)
        } else {
            (&mut src, model.config().src_vocab)
        };
        let (r, p) = (row.index(ids.nrows()), pos.index(ids.ncols()));
        // Offsets near u32::MAX too: the check must not overflow.
        let bad = if offset % 2 == 0 { vocab as u32 + offset } else { u32::MAX - offset };
        ids[[r, p]] = bad;
        match model.forward(src.view(), tgt.view(), None, None) {
            Err(Error::TokenOutOfRange { id, vocab: v, batch, position }) => {
                prop_assert_eq!((id, v, batch, position), (bad, vocab, r, p));
            }
            other => prop_assert!(false, "expected TokenOutOfRange, got {:?}", other.map(|l| l.dim())),
        }
        let memory = model.encode(batch.src.view(), None).unwrap();
        let mut cache = model.start_decoding(memory.view(), None).unwrap();
        let mut step = Array1::zeros(batch.src.nrows());
        step[row.index(batch.src.nrows())] = bad.max(model.config().tgt_vocab as u32);
        let is_token_error = matches!(
            model.decode_step(step.view(), &mut cache),
            Err(Error::TokenOutOfRange { .. })
        );
        prop_assert!(is_token_error);
        prop_assert_eq!(cache.len(), 0, "a failed step leaves the cache as it was");
    }

    /// Row `i` of a batched forward equals row `i` run alone (with its own padding).
    #[test]
    fn batch_rows_do_not_depend_on_each_other((spec, batch) in models_and_batches(0)) {
        let model = spec.build();
        let (sp, tp) = (batch.src_padding(), batch.tgt_padding());
        let batched = model
            .forward(batch.src.view(), batch.tgt.view(), Some(&sp), Some(&tp))
            .unwrap();
        for i in 0..batch.src.nrows() {
            let one = |m: &KeyPaddingMask| {
                KeyPaddingMask::from_padding_flags(m.is_padding().slice(s![i..=i, ..]).to_owned())
            };
            let alone = model
                .forward(
                    batch.src.slice(s![i..=i, ..]),
                    batch.tgt.slice(s![i..=i, ..]),
                    Some(&one(&sp)),
                    Some(&one(&tp)),
                )
                .unwrap();
            let err = max_abs_diff(batched.slice(s![i..=i, .., ..]), alone.view());
            prop_assert!(err <= TOL, "row {i}: max abs diff {err:e}");
        }
    }

    /// A padded row equals the same sequence without padding, at its real target positions,
    /// whatever ids sit in the padding.
    #[test]
    fn padding_equals_no_padding((spec, batch) in models_and_batches(1)) {
        let model = spec.build();
        let (sp, tp) = (batch.src_padding(), batch.tgt_padding());
        let batched = model
            .forward(batch.src.view(), batch.tgt.view(), Some(&sp), Some(&tp))
            .unwrap();
        for (i, (&ls, &lt)) in batch.src_lengths.iter().zip(&batch.tgt_lengths).enumerate() {
            let alone = model
                .forward(
                    batch.src.slice(s![i..=i, ..ls]),
                    batch.tgt.slice(s![i..=i, ..lt]),
                    None,
                    None,
                )
                .unwrap();
            let err = max_abs_diff(batched.slice(s![i..=i, ..lt, ..]), alone.view());
            prop_assert!(err <= TOL, "row {i} (src {ls}, tgt {lt}): max abs diff {err:e}");
        }
    }

    /// The encoder stack alone (`Encoder::forward` on embeddings, which adds no positional
    /// encoding) is permutation-equivariant: permuting the source positions, and their padding,
    /// permutes the memory the same way. And the decoder does not depend on the order of the
    /// memory: cross-attention is a weighted sum over it.
    #[test]
    fn without_positions_order_does_not_matter(
        (spec, batch, perm, padding, seed) in models().prop_flat_map(|m| {
            (Just(m), 1..=MAX_BATCH, 1..=MAX_LEN).prop_flat_map(|(m, b, len)| {
                (
                    Just(m),
                    Just(b),
                    Just((0..len).collect::<Vec<usize>>()).prop_shuffle(),
                    flags(b, len),
                    any::<u64>(),
                )
            })
        }),
    ) {
        let model = spec.build();
        let d_model = model.config().d_model;
        let len = perm.len();
        let x = random_array3((batch, len, d_model), seed);
        let padding = KeyPaddingMask::from_padding_flags(padding);
        let x_perm = x.select(Axis(1), &perm);
        let padding_perm =
            KeyPaddingMask::from_padding_flags(padding.is_padding().select(Axis(1), &perm));

        let encoder = model.encoder();
        let memory = encoder.forward(x.view(), &Mask::none().with_key_padding(&padding)).unwrap();
        let memory_perm = encoder
            .forward(x_perm.view(), &Mask::none().with_key_padding(&padding_perm))
            .unwrap();
        let err = max_abs_diff(memory_perm.view(), memory.select(Axis(1), &perm).view());
        prop_assert!(err <= TOL, "encoder: max abs diff {err:e}");

        let y = random_array3((batch, 3, d_model), seed ^ 1);
        let decoder = model.decoder();
        let decoded = decoder
            .forward(y.view(), memory.view(), &Mask::causal(), &Mask::none().with_key_padding(&padding))
            .unwrap();
        let decoded_perm = decoder
            .forward(
                y.view(),
                memory_perm.view(),
                &Mask::causal(),
                &Mask::none().with_key_padding(&padding_perm),
            )
            .unwrap();
        let err = max_abs_diff(decoded_perm.view(), decoded.view());
        prop_assert!(err <= TOL, "decoder: max abs diff {err:e}");
    }

    /// The attention maps of a traced forward pass (encoder self-attention, decoder masked
    /// self-attention, cross-attention), with rows that are all padding.
    #[test]
    fn traced_attention_weights_are_distributions((spec, batch) in models_and_batches(0)) {
        let model = spec.build();
        let (sp, tp) = (batch.src_padding(), batch.tgt_padding());
        let trace = model
            .forward_traced(batch.src.view(), batch.tgt.view(), Some(&sp), Some(&tp))
            .unwrap();
        let src_mask = Mask::none().with_key_padding(&sp);
        let self_mask = Mask::causal().with_key_padding(&tp);
        for (l, w) in trace.encoder.self_attention.iter().enumerate() {
            check_attention_weights(&format!("encoder layer {l}"), w.view(), &src_mask)?;
        }
        for (l, w) in trace.decoder.self_attention.iter().enumerate() {
            check_attention_weights(&format!("decoder self layer {l}"), w.view(), &self_mask)?;
        }
        for (l, w) in trace.decoder.cross_attention.iter().enumerate() {
            check_attention_weights(&format!("decoder cross layer {l}"), w.view(), &src_mask)?;
        }
        let plain = model
            .forward(batch.src.view(), batch.tgt.view(), Some(&sp), Some(&tp))
            .unwrap();
        prop_assert_eq!(trace.logits, plain, "the trace changes nothing");
    }

    /// `MultiHeadAttention::forward_with_weights` under any combination of causal rule, key
    /// padding and attention pattern, fully masked queries included.
    #[test]
    fn multi_head_weights_are_distributions(
        (heads, d_k, batch, tgt_len, src_len, causal, padding, pattern, seed) in
            (1usize..=3, 1usize..=4, 1..=MAX_BATCH, 1..=MAX_LEN, 1..=MAX_LEN, any::<bool>())
                .prop_flat_map(|(h, d, b, t, s, causal)| {
                    (
                        Just(h), Just(d), Just(b), Just(t), Just(s), Just(causal),
                        proptest::option::of(flags(b, s)),
                        proptest::option::of(flags(t, s)),
                        any::<u64>(),
                    )
                }),
    ) {
        let d_model = heads * d_k;
        let mha = MultiHeadAttention::init(d_model, heads, &mut StdRng::seed_from_u64(seed)).unwrap();
        let q = random_array3((batch, tgt_len, d_model), seed ^ 1);
        let kv = random_array3((batch, src_len, d_model), seed ^ 2);
        let padding = padding.map(KeyPaddingMask::from_padding_flags);
        let pattern = pattern.map(AttnMask::from_blocked);
        let mut mask = if causal { Mask::causal() } else { Mask::none() };
        mask = mask.with_key_padding_opt(padding.as_ref());
        if let Some(p) = &pattern {
            mask = mask.with_attn_mask(p);
        }
        let (out, weights) = mha.forward_with_weights(q.view(), kv.view(), kv.view(), &mask).unwrap();
        prop_assert_eq!(weights.dim(), (batch, heads, tgt_len, src_len));
        prop_assert!(out.iter().all(|v| v.is_finite()));
        check_attention_weights("multi-head", weights.view(), &mask)?;
        let without = mha.forward(q.view(), kv.view(), kv.view(), &mask).unwrap();
        prop_assert_eq!(out, without);
    }

    /// Each cached step's logits equal those of decoding the whole prefix, at every step.
    #[test]
    fn cached_decoding_equals_full_recomputation(
        (spec, batch) in models_and_batches(0),
    ) {
        let model = spec.build();
        let sp = batch.src_padding();
        let memory = model.encode(batch.src.view(), Some(&sp)).unwrap();
        let mut cache = model.start_decoding(memory.view(), Some(&sp)).unwrap();
        for t in 0..batch.tgt.ncols() {
            let step = model.decode_step(batch.tgt.column(t), &mut cache).unwrap();
            let prefix = model
                .decode(batch.tgt.slice(s![.., ..=t]), memory.view(), Some(&sp), None)
                .unwrap();
            let full = model.project(prefix.view()).unwrap();
            let err = max_abs_diff(step.view(), full.index_axis(Axis(1), t));
            prop_assert!(err <= TOL, "step {t}: max abs diff {err:e}");
        }
        prop_assert_eq!(cache.len(), batch.tgt.ncols());
    }
}
