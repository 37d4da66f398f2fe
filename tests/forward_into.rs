//! `forward_into`, `project_into` and `decode_step_into`: logits written into a buffer the caller keeps equal the
//! ones `forward` and `project` return, in any layout, with tied and untied projections.

use ndarray::{Array1, Array2, Array3};
use ndtransformer::{Transformer, TransformerConfig};
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn logits_into_a_kept_buffer_equal_new_ones() {
    // 3 × 30 = 90 rows take the batch kernels, 2 × 5 the few-row ones; a vocabulary of 300
    // ends in a partial panel; tied output projections use the embedding table as it is.
    for tie in [false, true] {
        let config = TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            max_len: 32,
            share_embeddings: tie,
            tie_output_projection: tie,
            ..TransformerConfig::base(300, 300)
        };
        let model = Transformer::new(config, &mut StdRng::seed_from_u64(3)).unwrap();
        for (batch, len) in [(3, 30), (2, 5)] {
            let ids = Array2::from_shape_fn((batch, len), |(b, t)| (b * 37 + t * 11) as u32 % 300);
            let expected = model.forward(ids.view(), ids.view(), None, None).unwrap();
            let mut logits = Array3::from_elem((batch, len, 300), f32::NAN);
            model
                .forward_into(ids.view(), ids.view(), None, None, logits.view_mut())
                .unwrap();
            assert_eq!(logits, expected, "tie {tie}, {batch} x {len}");
            // A buffer in another layout gets the same values.
            let mut columns = Array3::from_elem((300, len, batch), f32::NAN);
            let mut view = columns.view_mut().reversed_axes();
            model
                .forward_into(ids.view(), ids.view(), None, None, view.view_mut())
                .unwrap();
            assert_eq!(view, expected);
            // The projection alone, into a new array (the kernels' path for fresh memory)
            // and into a kept buffer, from the decoder's output.
            let memory = model.encode(ids.view(), None).unwrap();
            let decoded = model.decode(ids.view(), memory.view(), None, None).unwrap();
            assert_eq!(
                model.project(decoded.view()).unwrap(),
                expected,
                "project, tie {tie}"
            );
            logits.fill(f32::NAN);
            model
                .project_into(decoded.view(), logits.view_mut())
                .unwrap();
            assert_eq!(logits, expected, "project_into, tie {tie}");
            let wrong = model.project_into(
                decoded.view(),
                Array3::zeros((batch, len + 1, 300)).view_mut(),
            );
            assert!(wrong.unwrap_err().to_string().contains("logits"));
            let wrong = model.forward_into(
                ids.view(),
                ids.view(),
                None,
                None,
                Array3::zeros((batch, len, 299)).view_mut(),
            );
            let message = wrong.unwrap_err().to_string();
            assert!(
                message.contains("logits") && message.contains("299"),
                "{message}"
            );
        }
    }
}

/// `decode_step_into` writes what `decode_step` returns, step after step, and leaves a cache
/// that continues as `decode_step`'s does; a buffer of the wrong shape is an error that names
/// it, before the cache moves.
#[test]
fn steps_into_a_kept_buffer_equal_new_ones() {
    for tie in [false, true] {
        let config = TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 16,
            num_encoder_layers: 1,
            num_decoder_layers: 2,
            max_len: 32,
            share_embeddings: tie,
            tie_output_projection: tie,
            ..TransformerConfig::base(300, 300)
        };
        let model = Transformer::new(config, &mut StdRng::seed_from_u64(4)).unwrap();
        // 12 rows take the register tiles where the CPU has them, 3 the few-row kernels.
        for batch in [12, 3] {
            let src = Array2::from_shape_fn((batch, 7), |(b, t)| (b * 13 + t * 5) as u32 % 300);
            let memory = model.encode(src.view(), None).unwrap();
            let mut plain = model.start_decoding(memory.view(), None).unwrap();
            let mut kept = model.start_decoding(memory.view(), None).unwrap();
            let mut buffer = Array2::from_elem((batch, 300), f32::NAN);
            for step in 0..5u32 {
                let tokens = Array1::from_shape_fn(batch, |b| (b as u32 * 7 + step * 3) % 300);
                let expected = model.decode_step(tokens.view(), &mut plain).unwrap();
                let wrong = model.decode_step_into(
                    tokens.view(),
                    &mut kept,
                    Array2::zeros((batch, 299)).view_mut(),
                );
                let message = wrong.unwrap_err().to_string();
                assert!(
                    message.contains("logits") && message.contains("299"),
                    "{message}"
                );
                model
                    .decode_step_into(tokens.view(), &mut kept, buffer.view_mut())
                    .unwrap();
                assert_eq!(buffer, expected, "tie {tie}, batch {batch}, step {step}");
            }
        }
    }
}
