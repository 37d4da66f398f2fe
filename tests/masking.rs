//! The fully-masked-row rule (weights all zero, attention output zero, never NaN) on every code
//! path: the attention kernel, multi-head attention, the encoder, the decoder and the model.

use ndarray::{array, s, Array3, Array4};
use ndtransformer::{
    scaled_dot_product_attention_with_weights, AttnMask, KeyPaddingMask, Mask, MultiHeadAttention,
    Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

fn tiny() -> TransformerConfig {
    TransformerConfig {
        d_model: 8,
        num_heads: 2,
        d_ff: 16,
        num_encoder_layers: 2,
        num_decoder_layers: 2,
        max_len: 16,
        ..TransformerConfig::base(10, 10)
    }
}

#[test]
fn kernel_gives_zero_weights_and_zero_output() {
    let mut rng = StdRng::seed_from_u64(1);
    let q = Array4::from_shape_simple_fn((1, 2, 3, 4), || rng.random_range(-1.0f32..1.0));
    let kv = Array4::from_shape_simple_fn((1, 2, 3, 4), || rng.random_range(-1.0f32..1.0));
    // Query 1 may see no key; the others may.
    let blocked = AttnMask::from_blocked(array![
        [false, true, true],
        [true, true, true],
        [false, false, false]
    ]);
    let (out, w) = scaled_dot_product_attention_with_weights(
        q.view(),
        kv.view(),
        kv.view(),
        &Mask::none().with_attn_mask(&blocked),
    )
    .unwrap();
    assert!(w.slice(s![.., .., 1, ..]).iter().all(|&p| p == 0.0));
    assert!(out.slice(s![.., .., 1, ..]).iter().all(|&o| o == 0.0));
    assert!(out.iter().all(|o| o.is_finite()));
    assert!((w.slice(s![0, 0, 2, ..]).sum() - 1.0).abs() < 1e-6);
}

#[test]
fn multi_head_output_of_a_blind_query_is_the_output_bias() {
    let mha = MultiHeadAttention::init(8, 2, &mut StdRng::seed_from_u64(2)).unwrap();
    let x = Array3::from_elem((2, 3, 8), 0.5f32);
    let padding = KeyPaddingMask::from_lengths(&[3, 0], 3).unwrap();
    let (out, w) = mha
        .forward_with_weights(
            x.view(),
            x.view(),
            x.view(),
            &Mask::none().with_key_padding(&padding),
        )
        .unwrap();
    assert!(w.slice(s![1, .., .., ..]).iter().all(|&p| p == 0.0));
    let bias = mha.projections()[3].bias().unwrap();
    for row in out.slice(s![1, .., ..]).rows() {
        assert_eq!(row, bias);
    }
}

#[test]
fn model_with_an_all_padding_source_row_stays_finite() {
    let model = Transformer::new(tiny(), &mut StdRng::seed_from_u64(3)).unwrap();
    let src = array![[4u32, 5, 6], [0, 0, 0]];
    let tgt = array![[1u32, 2], [1, 3]];
    let src_padding = KeyPaddingMask::from_lengths(&[3, 0], 3).unwrap();
    let trace = model
        .forward_traced(src.view(), tgt.view(), Some(&src_padding), None)
        .unwrap();
    assert!(trace.logits.iter().all(|v| v.is_finite()));
    assert!(trace.encoder.output.iter().all(|v| v.is_finite()));
    for w in trace
        .encoder
        .self_attention
        .iter()
        .chain(&trace.decoder.cross_attention)
    {
        assert!(w.slice(s![1, .., .., ..]).iter().all(|&p| p == 0.0));
    }
    // Row 0 is unaffected by row 1's emptiness.
    let alone = model
        .forward(src.slice(s![0..1, ..]), tgt.slice(s![0..1, ..]), None, None)
        .unwrap();
    let diff = (&trace.logits.slice(s![0..1, .., ..]) - &alone)
        .iter()
        .fold(0.0f32, |m, d| m.max(d.abs()));
    assert!(diff < 1e-5, "{diff}");
}
