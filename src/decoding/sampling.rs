//! Sampling the next token: temperature, top-k and top-p (nucleus, Holtzman et al. 2020).
//!
//! The distribution is `softmax(logits / T)` restricted to the `top_k` most probable tokens,
//! then to the smallest set of the most probable ones whose mass reaches `top_p`, renormalised.
//! Draws come from the caller's random number generator, one `u64` per sampled token, in batch
//! row order: the same seed gives the same tokens, whatever the thread count (the logits do not
//! depend on it).

use rand::Rng;

use crate::error::{Error, Result};

/// How [`Transformer::sample`](crate::Transformer::sample) draws each token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Divides the logits: below 1 sharpens the distribution, above 1 flattens it (> 0).
    pub temperature: f32,
    /// Keep only the `top_k` most probable tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most probable tokens whose probability reaches `top_p`
    /// (in `(0, 1]`; 1 keeps all).
    pub top_p: f32,
}

impl Default for Sampling {
    /// Plain sampling from the model's distribution: temperature 1, no top-k, no top-p.
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl Sampling {
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::Decoding {
                parameter: "temperature",
                reason: format!(
                    "temperature {} must be finite and above 0 (greedy decoding is the limit 0)",
                    self.temperature
                ),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Decoding {
                parameter: "top_p",
                reason: format!("top_p {} must be in (0, 1]", self.top_p),
            });
        }
        Ok(())
    }

    /// Draws one token from `logits` `[tgt_vocab]` (after the logit rules).
    pub(crate) fn draw(&self, logits: &[f32], rng: &mut dyn Rng) -> u32 {
        let inv_t = 1.0 / f64::from(self.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Every token forbidden: the lowest id, as the argmax of greedy decoding.
            return 0;
        }
        let weight = |v: f32| ((f64::from(v) - f64::from(max)) * inv_t).exp();
        let u = unit_interval(rng);
        let restricted = (self.top_k > 0 && self.top_k < logits.len()) || self.top_p < 1.0;
        if !restricted {
            // The whole vocabulary in id order: no sort needed.
            let total: f64 = logits.iter().map(|&v| weight(v)).sum();
            return pick(
                logits
                    .iter()
                    .enumerate()
                    .map(|(t, &v)| (t as u32, weight(v))),
                total * u,
            )
            .unwrap_or(0);
        }
        // Most probable first, ties to the lower id.
        let mut order: Vec<(f32, u32)> = if self.top_k > 0 && self.top_k < logits.len() {
            super::beam::top_tokens(logits, self.top_k)
        } else {
            let mut all: Vec<(f32, u32)> = logits
                .iter()
                .enumerate()
                .map(|(t, &v)| (v, t as u32))
                .collect();
            all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            all
        };
        order.retain(|&(v, _)| v > f32::NEG_INFINITY);
        let weights: Vec<f64> = order.iter().map(|&(v, _)| weight(v)).collect();
        let mut kept = weights.len();
        if self.top_p < 1.0 {
            // Mass of the renormalised top-k distribution: top-p applies after top-k, as in
            // `transformers`.
            let total: f64 = weights.iter().sum();
            let target = f64::from(self.top_p) * total;
            let mut mass = 0.0;
            kept = weights
                .iter()
                .position(|&w| {
                    mass += w;
                    mass >= target
                })
                .map_or(weights.len(), |i| i + 1);
        }
        let total: f64 = weights[..kept].iter().sum();
        let candidates = order[..kept]
            .iter()
            .zip(&weights[..kept])
            .map(|(&(_, t), &w)| (t, w));
        pick(candidates, total * u).unwrap_or(order[0].1)
    }
}

/// A uniform draw from `[0, 1)` with 53 random bits.
fn unit_interval(rng: &mut dyn Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The first token whose cumulative weight exceeds `target`; the last positive one if rounding
/// leaves `target` beyond the total.
fn pick(weights: impl Iterator<Item = (u32, f64)>, target: f64) -> Option<u32> {
    let mut mass = 0.0;
    let mut last = None;
    for (token, w) in weights {
        if w <= 0.0 {
            continue;
        }
        mass += w;
        last = Some(token);
        if mass > target {
            return last;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn frequencies(s: &Sampling, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[s.draw(logits, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn top_k_and_top_p_keep_only_their_set() {
        let logits = [0.0, 3.0, 1.0, 2.0, f32::NEG_INFINITY, 2.5];
        let top2 = Sampling {
            top_k: 2,
            ..Sampling::default()
        };
        let counts = frequencies(&top2, &logits, 2000);
        assert!(counts
            .iter()
            .enumerate()
            .all(|(t, &c)| (c > 0) == (t == 1 || t == 5)));
        // softmax: token 1 has ~0.42, 5 ~0.26, 3 ~0.15: top-p 0.6 keeps {1, 5}.
        let nucleus = Sampling {
            top_p: 0.6,
            ..Sampling::default()
        };
        let counts = frequencies(&nucleus, &logits, 2000);
        assert!(counts
            .iter()
            .enumerate()
            .all(|(t, &c)| (c > 0) == (t == 1 || t == 5)));
        // A forbidden token is never drawn, whatever the temperature.
        let hot = Sampling {
            temperature: 50.0,
            ..Sampling::default()
        };
        assert_eq!(frequencies(&hot, &logits, 2000)[4], 0);
    }

    #[test]
    fn parameters_out_of_range_are_errors() {
        for (s, name) in [
            (
                Sampling {
                    temperature: 0.0,
                    ..Sampling::default()
                },
                "temperature",
            ),
            (
                Sampling {
                    temperature: f32::NAN,
                    ..Sampling::default()
                },
                "temperature",
            ),
            (
                Sampling {
                    top_p: 0.0,
                    ..Sampling::default()
                },
                "top_p",
            ),
            (
                Sampling {
                    top_p: 1.5,
                    ..Sampling::default()
                },
                "top_p",
            ),
        ] {
            match s.check() {
                Err(Error::Decoding { parameter, .. }) => assert_eq!(parameter, name),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }
}
