//! The rules that reshape next-token logits before a token is chosen: a minimum length,
//! suppressed tokens, the repetition penalty, the no-repeat n-gram ban and a forced EOS at the
//! maximum length.
//!
//! They act on the raw logits of one hypothesis, before the log-softmax of beam search, the
//! argmax of greedy decoding or the softmax of sampling (as CTranslate2 applies them). A token
//! a rule forbids gets `-inf`, so it has probability 0 whatever the search.

use super::GenerateOptions;

/// The logit rules of one generation call, borrowed from its options.
pub(crate) struct LogitRules<'a> {
    eos_id: Option<u32>,
    min_len: usize,
    repetition_penalty: f32,
    no_repeat_ngram_size: usize,
    suppress_tokens: &'a [u32],
    forced_eos: bool,
}

impl<'a> LogitRules<'a> {
    pub(crate) fn new(o: &'a GenerateOptions) -> Self {
        LogitRules {
            eos_id: o.eos_id,
            min_len: o.min_len,
            repetition_penalty: o.repetition_penalty,
            no_repeat_ngram_size: o.no_repeat_ngram_size,
            suppress_tokens: &o.suppress_tokens,
            forced_eos: o.forced_eos && o.eos_id.is_some(),
        }
    }

    /// Whether no rule is set, so the logits can be used as they are.
    pub(crate) fn is_empty(&self) -> bool {
        self.min_len == 0
            && self.repetition_penalty == 1.0
            && self.no_repeat_ngram_size == 0
            && self.suppress_tokens.is_empty()
            && !self.forced_eos
    }

    /// Applies every rule to `logits` `[tgt_vocab]` of a hypothesis whose decoder input so far
    /// is `context` (BOS, then its tokens, a forced prefix included) and which may generate at
    /// most `max_len` tokens.
    pub(crate) fn apply(&self, logits: &mut [f32], context: &[u32], max_len: usize) {
        if self.repetition_penalty != 1.0 {
            repetition_penalty(logits, context, self.repetition_penalty);
        }
        if self.no_repeat_ngram_size > 0 {
            for token in banned_ngram_tokens(context, self.no_repeat_ngram_size) {
                logits[token as usize] = f32::NEG_INFINITY;
            }
        }
        for &token in self.suppress_tokens {
            logits[token as usize] = f32::NEG_INFINITY;
        }
        // `context` starts with BOS, which is not a generated token.
        if let Some(eos) = self.eos_id {
            if context.len() - 1 < self.min_len {
                logits[eos as usize] = f32::NEG_INFINITY;
            }
            // The last token allowed is EOS, whatever the other rules said of it (as
            // `transformers` applies `ForcedEOSTokenLogitsProcessor` after the others).
            if self.forced_eos && context.len() == max_len {
                logits.fill(f32::NEG_INFINITY);
                logits[eos as usize] = 0.0;
            }
        }
    }
}

/// CTRL's repetition penalty (Keskar et al. 2019), as `transformers` and CTranslate2 apply it:
/// every token that occurs in `context` has its logit divided by `penalty` if positive,
/// multiplied by it if negative, once however often it occurs.
fn repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = context.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for token in seen {
        let v = &mut logits[token as usize];
        *v = if *v < 0.0 { *v * penalty } else { *v / penalty };
    }
}

/// The tokens that would complete an `n`-gram already in `context` (the rule of
/// `transformers`' `NoRepeatNGramLogitsProcessor`): for every earlier occurrence of the last
/// `n − 1` tokens, the token that followed it. For `n = 1`, every token of `context`.
pub(crate) fn banned_ngram_tokens(context: &[u32], n: usize) -> Vec<u32> {
    if context.len() + 1 < n {
        return Vec::new();
    }
    let tail = &context[context.len() + 1 - n..];
    context
        .windows(n)
        .filter(|gram| gram[..n - 1] == *tail)
        .map(|gram| gram[n - 1])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_tokens_complete_earlier_ngrams() {
        // Bigrams: after a trailing 5, the tokens that followed 5 before (7 and 9).
        assert_eq!(banned_ngram_tokens(&[1, 5, 7, 5, 9, 5], 2), vec![7, 9]);
        // Trigrams: "5 9" occurred once, followed by 5.
        assert_eq!(banned_ngram_tokens(&[1, 5, 9, 5, 5, 9], 3), vec![5]);
        // Unigrams: everything seen.
        assert_eq!(banned_ngram_tokens(&[1, 4, 4], 1), vec![1, 4, 4]);
        // Too short to hold an n-gram.
        assert!(banned_ngram_tokens(&[1, 2], 4).is_empty());
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut logits = [2.0, -2.0, 3.0, 1.0];
        repetition_penalty(&mut logits, &[0, 1, 1, 0], 2.0);
        assert_eq!(logits, [1.0, -4.0, 3.0, 1.0]);
    }

    #[test]
    fn min_len_hides_eos_until_enough_tokens() {
        let o = GenerateOptions {
            min_len: 2,
            suppress_tokens: vec![3],
            ..GenerateOptions::greedy(0, Some(1), 10)
        };
        let rules = LogitRules::new(&o);
        let mut logits = [0.5f32; 4];
        rules.apply(&mut logits, &[0, 2], 10);
        assert_eq!(logits, [0.5, f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY]);
        let mut logits = [0.5f32; 4];
        rules.apply(&mut logits, &[0, 2, 2], 10);
        assert_eq!(logits, [0.5, 0.5, 0.5, f32::NEG_INFINITY]);
    }

    #[test]
    fn forced_eos_leaves_only_eos_at_the_last_token() {
        let o = GenerateOptions {
            forced_eos: true,
            ..GenerateOptions::greedy(0, Some(1), 3)
        };
        let rules = LogitRules::new(&o);
        assert!(!rules.is_empty());
        let mut logits = [0.5f32, -3.0, 2.0];
        rules.apply(&mut logits, &[0, 2], 3);
        assert_eq!(logits, [0.5, -3.0, 2.0]);
        // Two tokens generated of at most three: the third must be EOS.
        rules.apply(&mut logits, &[0, 2, 2], 3);
        assert_eq!(logits, [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]);
        // Without an EOS there is nothing to force.
        let o = GenerateOptions {
            forced_eos: true,
            ..GenerateOptions::greedy(0, None, 3)
        };
        assert!(LogitRules::new(&o).is_empty());
    }
}
