//! A tiny model built from the input, then every public entry point with shapes, ids, masks
//! and options derived from the input, valid or not.
//!
//! Every call must return `Ok` or `Err`, never panic. Where the input is valid the results
//! are checked too: shapes, finite logits, the traced forward equal to the plain one.
//! Sizes stay small (batch ≤ 4, lengths ≤ max_len + 2 ≤ 14, d_model ≤ 17) so that each input
//! runs in well under a millisecond.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use ndarray::{Array1, Array2, Array3, Array4};
use ndtransformer::{
    scaled_dot_product_attention_with_weights, Activation, AttnMask, BeamSearchOptions,
    GreedyOptions, KeyPaddingMask, Mask, MaxLength, MultiHeadAttention, NormPosition, Transformer,
    TransformerConfig,
};
use rand::{rngs::StdRng, SeedableRng};

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured) -> Result<()> {
    if let Some(model) = small_model(u)? {
        model_calls(u, &model)?;
    }
    attention(u)?;
    wild_config(u)
}

/// Every public entry point of a built model.
fn model_calls(u: &mut Unstructured, model: &Transformer) -> Result<()> {
    let c = model.config().clone();
    let max = c.max_len + 2;

    let src = ids(u, c.src_vocab, max)?;
    let tgt = if u.ratio(4, 5)? {
        let t = ids(u, c.tgt_vocab, max)?;
        // Mostly the same batch as the source, so the forward pass gets past that check.
        let rows = if u.ratio(4, 5)? {
            src.nrows()
        } else {
            t.nrows()
        };
        resize_rows(t, rows)
    } else {
        ids(u, c.tgt_vocab, max)?
    };
    let src_padding = padding(u, src.dim(), max)?;
    let tgt_padding = padding(u, tgt.dim(), max)?;
    let (sp, tp) = (src_padding.as_ref(), tgt_padding.as_ref());

    let plain = model.forward(src.view(), tgt.view(), sp, tp);
    let traced = model.forward_traced(src.view(), tgt.view(), sp, tp);
    assert_eq!(plain.is_ok(), traced.is_ok(), "{plain:?} vs traced");
    if let (Ok(logits), Ok(trace)) = (&plain, &traced) {
        assert_eq!(logits.dim(), (tgt.nrows(), tgt.ncols(), c.tgt_vocab));
        assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
        assert!(trace.logits == *logits, "the traced forward differs");
    }
    let log_probs = model.log_probs(src.view(), tgt.view(), sp, tp);
    assert_eq!(plain.is_ok(), log_probs.is_ok());

    // Incremental decoding: a cache from the memory, then steps with tokens of any batch size,
    // and row selections, valid or not.
    if let Ok(memory) = model.encode(src.view(), sp) {
        let cache_padding = if u.ratio(3, 4)? {
            src_padding.clone()
        } else {
            padding(u, src.dim(), max)?
        };
        if let Ok(mut cache) = model.start_decoding(memory.view(), cache_padding.as_ref()) {
            for _ in 0..u.int_in_range(0..=max + 1)? {
                if u.ratio(1, 4)? {
                    let rows: Vec<usize> = (0..u.int_in_range(0..=6)?)
                        .map(|_| u.int_in_range(0..=cache.batch()))
                        .collect::<Result<_>>()?;
                    let before = cache.batch();
                    match cache.select_rows(&rows) {
                        Ok(()) => assert_eq!(cache.batch(), rows.len()),
                        Err(_) => assert_eq!(cache.batch(), before),
                    }
                }
                let len = if u.ratio(7, 8)? {
                    cache.batch()
                } else {
                    u.int_in_range(0..=5)?
                };
                let tokens: Array1<u32> = (0..len)
                    .map(|_| id(u, c.tgt_vocab))
                    .collect::<Result<_>>()?;
                let before = cache.len();
                match model.decode_step(tokens.view(), &mut cache) {
                    Ok(step) => {
                        assert_eq!(step.dim(), (cache.batch(), c.tgt_vocab));
                        assert_eq!(cache.len(), before + 1);
                        assert!(step.iter().all(|v| v.is_finite()), "non-finite step logits");
                    }
                    Err(_) => assert_eq!(cache.len(), before, "a failed step changed the cache"),
                }
            }
        }
    }

    // Searches with options of any value.
    let greedy = GreedyOptions {
        bos_id: id(u, c.tgt_vocab)?,
        eos_id: if u.arbitrary()? {
            Some(id(u, c.tgt_vocab)?)
        } else {
            None
        },
        max_len: u.int_in_range(0..=max)?,
    };
    if let Ok(out) = model.greedy_decode(src.view(), sp, &greedy) {
        assert_eq!(out.len(), src.nrows());
        assert!(out.iter().all(|row| row.len() <= greedy.max_len));
    }
    let beam = BeamSearchOptions {
        beam_size: u.int_in_range(0..=4)?,
        length_penalty: *u.choose(&[0.0, 0.6, 1.0, -1.0, f32::NAN, f32::INFINITY])?,
        max_len: if u.arbitrary()? {
            MaxLength::Fixed(u.int_in_range(0..=max)?)
        } else {
            MaxLength::SourcePlus(u.int_in_range(0..=max)?)
        },
        num_return: u.int_in_range(0..=5)?,
        bos_id: id(u, c.tgt_vocab)?,
        eos_id: id(u, c.tgt_vocab)?,
    };
    if let Ok(out) = model.beam_search(src.view(), sp, &beam) {
        assert_eq!(out.len(), src.nrows());
        assert!(out.iter().all(|row| row.len() <= beam.num_return));
    }

    // The stacks on arbitrary embeddings (any floats), with an attention pattern too.
    let x = floats3(u, 4, max, c.d_model + 1)?;
    let pattern = pattern(u, max)?;
    let kp = padding(u, (x.dim().0, x.dim().1), max)?;
    let mut mask = if u.arbitrary()? {
        Mask::causal()
    } else {
        Mask::none()
    };
    mask = mask.with_key_padding_opt(kp.as_ref());
    if let Some(p) = &pattern {
        mask = mask.with_attn_mask(p);
    }
    let _ = model.encoder().forward(x.view(), &mask);
    let _ = model.encoder().forward_traced(x.view(), &mask);
    let y = floats3(u, 4, max, c.d_model + 1)?;
    let _ = model
        .decoder()
        .forward(y.view(), x.view(), &Mask::causal(), &mask);
    let _ = model
        .decoder()
        .forward_traced(y.view(), x.view(), &mask, &Mask::none());
    let _ = model.project(y.view());
    let _ = model.decode_embedded(y.view(), x.view(), kp.as_ref(), None);
    Ok(())
}

/// Config validation on any values: never a panic (nothing is allocated).
fn wild_config(u: &mut Unstructured) -> Result<()> {
    let config = TransformerConfig {
        d_model: u.arbitrary()?,
        num_heads: u.arbitrary()?,
        d_ff: u.arbitrary()?,
        num_encoder_layers: u.arbitrary()?,
        num_decoder_layers: u.arbitrary()?,
        src_vocab: u.arbitrary()?,
        tgt_vocab: u.arbitrary()?,
        max_len: u.arbitrary()?,
        layer_norm_eps: u.arbitrary()?,
        share_embeddings: u.arbitrary()?,
        tie_output_projection: u.arbitrary()?,
        ..TransformerConfig::base(1, 1)
    };
    let _ = config.validate();
    let _ = config.d_k();
    Ok(())
}

/// A small config, valid or not (a width not divisible by the heads, zero sizes, a bad eps).
fn small_model(u: &mut Unstructured) -> Result<Option<Transformer>> {
    let num_heads = u.int_in_range(0..=4)?;
    let d_model = num_heads * u.int_in_range(0..=4)? + usize::from(u.ratio(1, 8)?);
    let share = u.arbitrary()?;
    let src_vocab = u.int_in_range(0..=12)?;
    let config = TransformerConfig {
        d_model,
        num_heads,
        d_ff: u.int_in_range(0..=12)?,
        num_encoder_layers: u.int_in_range(0..=2)?,
        num_decoder_layers: u.int_in_range(0..=2)?,
        src_vocab,
        tgt_vocab: if share {
            src_vocab
        } else {
            u.int_in_range(0..=12)?
        },
        max_len: u.int_in_range(0..=12)?,
        activation: *u.choose(&[Activation::Relu, Activation::Gelu])?,
        norm_position: *u.choose(&[NormPosition::Post, NormPosition::Pre])?,
        layer_norm_eps: *u.choose(&[1e-5, 1e-12, 0.0, -1.0, f32::NAN, f32::INFINITY])?,
        share_embeddings: share,
        tie_output_projection: u.arbitrary()?,
    };
    let valid = config.validate().is_ok();
    let model = Transformer::new(config, &mut StdRng::seed_from_u64(u.arbitrary()?));
    assert_eq!(valid, model.is_ok(), "new() and validate() disagree");
    Ok(model.ok())
}

/// Multi-head attention and the bare kernel on arbitrary shapes, masks and floats.
fn attention(u: &mut Unstructured) -> Result<()> {
    let num_heads = u.int_in_range(0..=3)?;
    let d_model = num_heads * u.int_in_range(0..=3)? + usize::from(u.ratio(1, 8)?);
    let Ok(mha) = MultiHeadAttention::init(d_model, num_heads, &mut StdRng::seed_from_u64(0))
    else {
        return Ok(());
    };
    let q = floats3(u, 3, 6, d_model + 1)?;
    let k = floats3(u, 3, 6, d_model + 1)?;
    let v = if u.ratio(3, 4)? {
        k.clone()
    } else {
        floats3(u, 3, 6, d_model + 1)?
    };
    let kp = padding(u, (k.dim().0, k.dim().1), 6)?;
    let pattern = pattern(u, 6)?;
    let mut mask = Mask::none().with_key_padding_opt(kp.as_ref());
    if u.arbitrary()? {
        mask = mask.with_causal();
    }
    if let Some(p) = &pattern {
        mask = mask.with_attn_mask(p);
    }
    let plain = mha.forward(q.view(), k.view(), v.view(), &mask);
    let weighted = mha.forward_with_weights(q.view(), k.view(), v.view(), &mask);
    assert_eq!(plain.is_ok(), weighted.is_ok());
    if let Ok((_, w)) = &weighted {
        assert_eq!(w.dim(), (q.dim().0, num_heads, q.dim().1, k.dim().1));
    }

    let dims = |u: &mut Unstructured| -> Result<(usize, usize, usize, usize)> {
        Ok((
            u.int_in_range(0..=2)?,
            u.int_in_range(0..=2)?,
            u.int_in_range(0..=4)?,
            u.int_in_range(0..=3)?,
        ))
    };
    let (qd, kd) = (dims(u)?, dims(u)?);
    let q4 = Array4::from_shape_fn(qd, |_| 0.5f32);
    let k4 = Array4::from_shape_fn(kd, |_| -0.5f32);
    let _ = scaled_dot_product_attention_with_weights(q4.view(), k4.view(), k4.view(), &mask);
    Ok(())
}

/// A token id: mostly in range, sometimes just past it, now and then any `u32`.
fn id(u: &mut Unstructured, vocab: usize) -> Result<u32> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => u.arbitrary()?,
        1 => vocab as u32 + u.int_in_range(0..=1)?,
        _ => u.int_in_range(0..=vocab.saturating_sub(1) as u32)?,
    })
}

/// `[batch, len]` ids with batch ≤ 4 and len ≤ `max_len` (either may be 0).
fn ids(u: &mut Unstructured, vocab: usize, max_len: usize) -> Result<Array2<u32>> {
    let (rows, cols) = (u.int_in_range(0..=4)?, u.int_in_range(0..=max_len)?);
    let v = (0..rows * cols)
        .map(|_| id(u, vocab))
        .collect::<Result<Vec<_>>>()?;
    Ok(Array2::from_shape_vec((rows, cols), v).unwrap())
}

/// The first `rows` rows of `a`, repeating its last row (or zeros) to reach `rows`.
fn resize_rows(a: Array2<u32>, rows: usize) -> Array2<u32> {
    Array2::from_shape_fn((rows, a.ncols()), |(r, c)| {
        a.nrows()
            .checked_sub(1)
            .map_or(0, |last| a[[r.min(last), c]])
    })
}

/// No mask, a mask of the right shape `dim`, or one of any small shape; built from lengths
/// (which may be longer than the mask), padding flags or valid flags.
fn padding(
    u: &mut Unstructured,
    dim: (usize, usize),
    max_len: usize,
) -> Result<Option<KeyPaddingMask>> {
    if u.ratio(1, 4)? {
        return Ok(None);
    }
    let (rows, cols) = if u.ratio(7, 8)? {
        dim
    } else {
        (u.int_in_range(0..=4)?, u.int_in_range(0..=max_len)?)
    };
    Ok(match u.int_in_range(0..=2)? {
        0 => {
            let lengths = (0..rows)
                .map(|_| u.int_in_range(0..=cols + 1))
                .collect::<Result<Vec<_>>>()?;
            KeyPaddingMask::from_lengths(&lengths, cols).ok()
        }
        1 => Some(KeyPaddingMask::from_padding_flags(flags(u, rows, cols)?)),
        _ => Some(KeyPaddingMask::from_valid_flags(
            flags(u, rows, cols)?.view(),
        )),
    })
}

fn flags(u: &mut Unstructured, rows: usize, cols: usize) -> Result<Array2<bool>> {
    let v = (0..rows * cols)
        .map(|_| u.arbitrary())
        .collect::<Result<Vec<bool>>>()?;
    Ok(Array2::from_shape_vec((rows, cols), v).unwrap())
}

/// An optional `[tgt_len, src_len]` blocking pattern of any small shape.
fn pattern(u: &mut Unstructured, max_len: usize) -> Result<Option<AttnMask>> {
    if u.ratio(2, 3)? {
        return Ok(None);
    }
    let (rows, cols) = (u.int_in_range(0..=max_len)?, u.int_in_range(0..=max_len)?);
    Ok(Some(AttnMask::from_blocked(flags(u, rows, cols)?)))
}

/// A `[batch, len, width]` array of any floats (NaN and infinities included) with each
/// dimension up to the given bound.
fn floats3(
    u: &mut Unstructured,
    max_batch: usize,
    max_len: usize,
    max_width: usize,
) -> Result<Array3<f32>> {
    let dim = (
        u.int_in_range(0..=max_batch)?,
        u.int_in_range(0..=max_len)?,
        // Mostly `max_width - 1`: callers pass the width they expect plus one.
        if u.ratio(3, 4)? {
            max_width.saturating_sub(1)
        } else {
            u.int_in_range(0..=max_width)?
        },
    );
    let v = (0..dim.0 * dim.1 * dim.2)
        .map(|_| {
            Ok(if u.ratio(15, 16)? {
                f32::from(u.int_in_range(-100i16..=100)?) / 25.0
            } else {
                u.arbitrary()?
            })
        })
        .collect::<Result<Vec<f32>>>()?;
    Ok(Array3::from_shape_vec(dim, v).unwrap())
}
