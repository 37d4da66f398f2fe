//! Generation with the KV cache: greedy decoding and the paper's beam search (§6.1) on a
//! randomly initialised base model, and the per-step time with and without the cache.
//!
//! `cargo run --release --example generate [steps]` (default 32 steps).

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{s, Array1, Array2};
use ndtransformer::{
    BeamSearchOptions, GreedyOptions, KeyPaddingMask, MaxLength, Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32);
    let (batch, src_len, vocab, bos, eos) = (8, 128, 32000, 1u32, 2u32);
    let model = Transformer::new(
        TransformerConfig::base(vocab, vocab),
        &mut StdRng::seed_from_u64(2017),
    )?;
    let mut rng = StdRng::seed_from_u64(7);
    let lengths: Vec<usize> = (0..batch).map(|b| src_len - 9 * b).collect();
    let src = Array2::from_shape_fn((batch, src_len), |(b, j)| {
        if j < lengths[b] {
            rng.random_range(3..vocab as u32)
        } else {
            0
        }
    });
    let padding = KeyPaddingMask::from_lengths(&lengths, src_len)?;
    println!(
        "base model, batch {batch} × {src_len} source tokens (lengths {lengths:?}), {steps} steps"
    );

    // Greedy decoding: the encoder once, then one cached decoder step per token.
    let start = Instant::now();
    let out = model.greedy_decode(
        src.view(),
        Some(&padding),
        &GreedyOptions {
            bos_id: bos,
            eos_id: Some(eos),
            max_len: steps,
        },
    )?;
    let took = start.elapsed();
    println!(
        "greedy: {} tokens per row in {took:.2?} ({:.2} ms per step for the batch)",
        out[0].len(),
        took.as_secs_f64() * 1e3 / steps as f64
    );
    println!("  row 0 starts {:?}", &out[0][..out[0].len().min(8)]);

    // Beam search with the paper's settings, limited to `steps` tokens here.
    let options = BeamSearchOptions {
        max_len: MaxLength::Fixed(steps),
        num_return: 2,
        ..BeamSearchOptions::paper(bos, eos)
    };
    let start = Instant::now();
    let hyps = model.beam_search(
        src.slice(s![..2, ..]),
        Some(&KeyPaddingMask::from_lengths(&lengths[..2], src_len)?),
        &options,
    )?;
    println!(
        "beam search (beam 4, α 0.6), 2 rows: {:.2?}",
        start.elapsed()
    );
    for (row, h) in hyps.iter().enumerate() {
        for (rank, hyp) in h.iter().enumerate() {
            println!(
                "  row {row} #{rank}: score {:.4} (log p {:.3}, {} tokens, finished {})",
                hyp.score,
                hyp.log_prob,
                hyp.tokens.len(),
                hyp.finished
            );
        }
    }

    // One step with the cache versus re-running the decoder on the whole prefix.
    let memory = model.encode(src.view(), Some(&padding))?;
    let tgt = Array2::from_shape_fn(
        (batch, steps),
        |(_, t)| if t == 0 { bos } else { 3 + t as u32 },
    );
    let mut cache = model.start_decoding(memory.view(), Some(&padding))?;
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40.cyan/blue}] step {pos}/{len}",
    )?);
    let mut rows: Vec<(usize, f64, f64)> = Vec::new();
    for t in 0..steps {
        bar.inc(1);
        let start = Instant::now();
        let tokens: Array1<u32> = tgt.column(t).to_owned();
        model.decode_step(tokens.view(), &mut cache)?;
        let cached = start.elapsed();
        if t == 0 || (t + 1) % 8 == 0 {
            let start = Instant::now();
            let decoded =
                model.decode(tgt.slice(s![.., ..=t]), memory.view(), Some(&padding), None)?;
            model.project(decoded.slice(s![.., t.., ..]))?;
            let uncached = start.elapsed();
            rows.push((
                t + 1,
                cached.as_secs_f64() * 1e3,
                uncached.as_secs_f64() * 1e3,
            ));
        }
    }
    bar.finish_and_clear();
    println!("{:>6} {:>12} {:>14}", "step", "cached ms", "uncached ms");
    for (step, cached, uncached) in rows {
        println!("{step:>6} {cached:>12.2} {uncached:>14.2}");
    }
    Ok(())
}
