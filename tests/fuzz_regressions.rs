//! Inputs that crashed, or came close, while fuzzing (see `docs/fuzzing.md`), kept as tests.
//!
//! The smoke runs of `fuzz/fuzz_targets/load_weights.rs` and `forward.rs` found no panic. Their
//! configs are bounded so that a run allocates little; the one crash below lies past those
//! bounds and was found while choosing them. `TransformerConfig::validate` now bounds the
//! tensor sizes a config implies, and this test keeps it that way.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ndtransformer::{Error, LoadOptions, Result, Transformer, TransformerConfig};
use rand::{rngs::StdRng, SeedableRng};

fn tiny() -> TransformerConfig {
    TransformerConfig {
        d_model: 4,
        num_heads: 2,
        d_ff: 4,
        num_encoder_layers: 1,
        num_decoder_layers: 1,
        max_len: 8,
        ..TransformerConfig::base(5, 5)
    }
}

/// What a call did: returned, or panicked with this message.
fn outcome<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<Result<T>, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// A config whose tables cannot exist once passed `validate()`, and building the model then
/// panicked inside ndarray ("Shape too large, product of non-zero axis lengths overflows isize")
/// instead of returning [`Error::Config`]: a `max_len` of `usize::MAX / 2` (someone meaning
/// "unbounded") overflows the `[max_len, d_model]` positional table, a `d_model` of 2⁶² the
/// embedding. Loading weights for such a config panicked the same way, after reading the file.
///
/// Each of these overflows before anything is allocated, so the test is cheap. (Sizes that fit
/// in `isize` but not in memory abort on allocation failure instead; only a limit in
/// `validate()` could turn those into errors.)
#[test]
fn configs_with_impossible_tensor_sizes_are_errors_not_panics() {
    let configs = [
        TransformerConfig {
            max_len: usize::MAX / 2,
            ..tiny()
        },
        TransformerConfig {
            d_model: 1 << 62,
            num_heads: 1,
            ..tiny()
        },
    ];
    for config in configs {
        let built = outcome(|| Transformer::new(config.clone(), &mut StdRng::seed_from_u64(0)));
        assert!(
            matches!(built, Ok(Err(Error::Config { .. }))),
            "Transformer::new with {config:?}: {:?}",
            built.map(|r| r.map(|_| ()))
        );
    }

    let bytes = Transformer::new(tiny(), &mut StdRng::seed_from_u64(0))
        .unwrap()
        .to_safetensors()
        .unwrap();
    let config = TransformerConfig {
        max_len: usize::MAX / 2,
        ..tiny()
    };
    let loaded = outcome(|| Transformer::from_safetensors(config, &bytes, &LoadOptions::default()));
    assert!(
        matches!(loaded, Ok(Err(Error::Config { .. }))),
        "from_safetensors: {:?}",
        loaded.map(|r| r.map(|_| ()))
    );
}
