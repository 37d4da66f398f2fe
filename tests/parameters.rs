//! The one walk of the parameters: every tensor once, under names that the checkpoint formats
//! map onto PyTorch's own `state_dict()` names, value for value.

mod common;

use std::collections::BTreeSet;

use common::{Fixture, TensorFile};
use ndtransformer::TransformerConfig;

/// The walk's names are unique and its tensors add up to the parameter count.
fn assert_each_once(named: &[(String, ndarray::CowArray<f32, ndarray::IxDyn>)], total: usize) {
    let names: BTreeSet<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), named.len(), "a name is visited twice");
    assert_eq!(named.iter().map(|(_, t)| t.len()).sum::<usize>(), total);
}

#[test]
fn the_walk_covers_every_pytorch_tensor_once_under_its_state_dict_name() {
    let fixtures = Fixture::all_of_kind("transformer");
    assert!(!fixtures.is_empty());
    for fixture in fixtures {
        let model = fixture.model();
        assert_each_once(&model.named_parameters(), model.num_parameters());
        // Saved under PyTorch's names: exactly the fixture's weights, bit for bit.
        let saved = TensorFile::from_bytes(model.to_safetensors().unwrap());
        let expected: BTreeSet<String> = fixture
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix("weights.").map(str::to_string))
            .collect();
        assert_eq!(saved.names().into_iter().collect::<BTreeSet<_>>(), expected);
        for name in &expected {
            let (a, b) = (saved.f32(name), fixture.f32(&format!("weights.{name}")));
            assert!(
                a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs after the round trip"
            );
        }
    }
}

#[test]
fn shared_and_tied_tables_are_walked_once() {
    use rand::{rngs::StdRng, SeedableRng};
    let config = TransformerConfig {
        d_model: 8,
        num_heads: 2,
        d_ff: 16,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        share_embeddings: true,
        tie_output_projection: true,
        ..TransformerConfig::base(10, 10)
    };
    let model = ndtransformer::Transformer::new(config, &mut StdRng::seed_from_u64(1)).unwrap();
    let named = model.named_parameters();
    assert_each_once(&named, model.num_parameters());
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"tgt_embed.weight") && !names.contains(&"output.weight"));
    assert!(names.contains(&"output.bias"));
}
