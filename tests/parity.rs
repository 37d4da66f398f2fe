//! Parity with PyTorch: every fixture in `tests/fixtures/`, every intermediate, max abs error ≤ 1e-5.
//!
//! All expected values come from the fixture files; run with `--nocapture` to see the errors.

mod common;

use common::{assert_close, Fixture, GreedyCase};
use ndarray::{s, Array2, Axis};
use ndtransformer::{AttnMask, KeyPaddingMask, Mask, MultiHeadAttention};

const TOL: f32 = 1e-5;

#[test]
fn transformer_fixtures_match_pytorch_layer_by_layer() {
    for fx in Fixture::all_of_kind("transformer") {
        let model = fx.model();
        let name = fx.name.as_str();
        let src = fx.ids("io.src_ids");
        let tgt = fx.ids("io.tgt_ids");
        let src_padding = KeyPaddingMask::from_padding_flags(fx.flags("io.src_key_padding_mask"));
        let tgt_padding = KeyPaddingMask::from_padding_flags(fx.flags("io.tgt_key_padding_mask"));

        let pe = fx.f32("io.pe");
        let table = model
            .positional_encoding()
            .table(pe.shape()[0])
            .unwrap()
            .to_owned();
        assert_close(name, "pe", &table, &pe, TOL);

        let trace = model
            .forward_traced(
                src.view(),
                tgt.view(),
                Some(&src_padding),
                Some(&tgt_padding),
            )
            .unwrap();
        assert_close(
            name,
            "src_embedded",
            &trace.src_embedded,
            &fx.f32("io.src_embedded"),
            TOL,
        );
        assert_close(
            name,
            "tgt_embedded",
            &trace.tgt_embedded,
            &fx.f32("io.tgt_embedded"),
            TOL,
        );
        for (i, out) in trace.encoder.layer_outputs.iter().enumerate() {
            assert_close(
                name,
                &format!("encoder_layer_out.{i}"),
                out,
                &fx.f32(&format!("io.encoder_layer_out.{i}")),
                TOL,
            );
        }
        assert!(!fx.has(&format!(
            "io.encoder_layer_out.{}",
            trace.encoder.layer_outputs.len()
        )));
        assert_close(
            name,
            "memory",
            &trace.encoder.output,
            &fx.f32("io.memory"),
            TOL,
        );
        for (i, out) in trace.decoder.layer_outputs.iter().enumerate() {
            assert_close(
                name,
                &format!("decoder_layer_out.{i}"),
                out,
                &fx.f32(&format!("io.decoder_layer_out.{i}")),
                TOL,
            );
        }
        assert_close(
            name,
            "decoder_out",
            &trace.decoder.output,
            &fx.f32("io.decoder_out"),
            TOL,
        );
        assert_close(name, "logits", &trace.logits, &fx.f32("io.logits"), TOL);

        // The plain entry points give the traced numbers.
        let logits = model
            .forward(
                src.view(),
                tgt.view(),
                Some(&src_padding),
                Some(&tgt_padding),
            )
            .unwrap();
        assert_eq!(logits, trace.logits);
        let memory = model.encode(src.view(), Some(&src_padding)).unwrap();
        assert_eq!(memory, trace.encoder.output);
        let decoded = model
            .decode(
                tgt.view(),
                memory.view(),
                Some(&src_padding),
                Some(&tgt_padding),
            )
            .unwrap();
        assert_eq!(decoded, trace.decoder.output);
    }
}

#[test]
fn mha_fixture_matches_pytorch_output_and_per_head_weights() {
    for fx in Fixture::all_of_kind("mha") {
        let c = &fx.json["config"];
        let (d_model, num_heads) = (
            c["embed_dim"].as_u64().unwrap() as usize,
            c["num_heads"].as_u64().unwrap() as usize,
        );
        let mha =
            MultiHeadAttention::from_safetensors(&fx.bytes, "weights.mha.", d_model, num_heads)
                .unwrap();
        let q = fx.f32("io.mha.query").into_dimensionality().unwrap();
        let k = fx.f32("io.mha.key").into_dimensionality().unwrap();
        let v = fx.f32("io.mha.value").into_dimensionality().unwrap();
        let key_padding = KeyPaddingMask::from_padding_flags(fx.flags("io.mha.key_padding_mask"));
        let attn_mask = AttnMask::from_blocked(fx.flags("io.mha.attn_mask"));
        let mask = Mask::none()
            .with_key_padding(&key_padding)
            .with_attn_mask(&attn_mask);
        let (out, weights) = mha
            .forward_with_weights(q.view(), k.view(), v.view(), &mask)
            .unwrap();
        assert_close(
            &fx.name,
            "attn_output",
            &out,
            &fx.f32("io.mha.attn_output"),
            TOL,
        );
        assert_close(
            &fx.name,
            "attn_weights",
            &weights,
            &fx.f32("io.mha.attn_weights"),
            TOL,
        );
        // Masked entries are exactly zero, as in PyTorch.
        let expected = fx.f32("io.mha.attn_weights");
        for (w, e) in weights.iter().zip(expected.iter()) {
            assert_eq!(*w == 0.0, *e == 0.0);
        }
    }
}

/// The fixture's procedure: re-run the whole model on the growing prefix, take the argmax.
#[test]
fn greedy_fixture_ids_and_step_logits_by_full_recomputation() {
    for fx in Fixture::all_of_kind("greedy") {
        let model = fx.model();
        let case = fx.greedy_case();
        let steps = case.steps();
        let GreedyCase {
            src,
            src_padding,
            expected_ids,
            step_logits,
            bos,
            ..
        } = case;
        let memory = model.encode(src.view(), Some(&src_padding)).unwrap();
        let mut ys = Array2::from_elem((src.nrows(), 1), bos);
        for step in 0..steps {
            let decoded = model
                .decode(ys.view(), memory.view(), Some(&src_padding), None)
                .unwrap();
            let logits = model
                .project(decoded.slice(s![.., -1.., ..]).to_owned().view())
                .unwrap()
                .index_axis_move(Axis(1), 0);
            let expected = step_logits.index_axis(Axis(1), step).to_owned();
            assert_close(
                &fx.name,
                &format!("step_logits[{step}]"),
                &logits,
                &expected,
                TOL,
            );
            let next: Vec<u32> = logits
                .rows()
                .into_iter()
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        )
                        .0 as u32
                })
                .collect();
            ys.push_column(ndarray::ArrayView1::from(&next)).unwrap();
        }
        assert_eq!(ys, expected_ids, "{}: greedy ids", fx.name);
    }
}
