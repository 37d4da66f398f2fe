//! Parameter initialisation from a caller-supplied random number generator.
//!
//! Matrices use Xavier/Glorot uniform, `U(-a, a)` with `a = √(6 / (fan_in + fan_out))`, as
//! PyTorch's `nn.Transformer` and the reference implementations do; biases start at zero and
//! LayerNorm at the identity (`gamma = 1`, `beta = 0`). Parameters are drawn in a fixed order, so
//! the same seed gives the same model.

use ndarray::Array2;
use rand::{Rng, RngExt};

/// A `[rows, cols]` matrix drawn from Xavier uniform with the given fans.
///
/// The fans are explicit because PyTorch initialises the fused `in_proj_weight` `[3·d_model,
/// d_model]` as one matrix: each of Q, K and V then gets `fan_out = 3·d_model`.
pub(crate) fn xavier_uniform<R: Rng + ?Sized>(
    rows: usize,
    cols: usize,
    fan_in: usize,
    fan_out: usize,
    rng: &mut R,
) -> Array2<f32> {
    let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-a..=a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn bounded_seeded_and_spread() {
        let w = xavier_uniform(64, 32, 32, 64, &mut StdRng::seed_from_u64(7));
        let a = (6.0f32 / 96.0).sqrt();
        assert!(w.iter().all(|v| v.abs() <= a));
        // Uniform on [-a, a] has variance a²/3.
        let var = w.mapv(|v| v * v).mean().unwrap();
        assert!(
            (var - a * a / 3.0).abs() < 0.1 * a * a / 3.0,
            "variance {var}"
        );
        assert_eq!(
            w,
            xavier_uniform(64, 32, 32, 64, &mut StdRng::seed_from_u64(7))
        );
    }
}
