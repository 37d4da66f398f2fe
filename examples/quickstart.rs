//! Build the paper's base model (Table 3) from a seed, run one batched forward pass, and print
//! the shapes, the parameter count and the time taken.
//!
//! `cargo run --release --example quickstart`, or `… -- --int8` for int8 weights
//! ([`Precision::Int8`](ndtransformer::Precision)).

use std::time::Instant;

use ndarray::Array2;
use ndtransformer::{KeyPaddingMask, Precision, Transformer, TransformerConfig};
use rand::{rngs::StdRng, RngExt, SeedableRng};

fn main() -> Result<(), ndtransformer::Error> {
    let (batch, src_len, tgt_len, vocab) = (8, 64, 48, 32000);
    let config = TransformerConfig::base(vocab, vocab);
    println!(
        "base model: N = {}, d_model = {}, d_ff = {}, h = {}, d_k = {}, vocab = {vocab}",
        config.num_encoder_layers,
        config.d_model,
        config.d_ff,
        config.num_heads,
        config.d_k()
    );

    let start = Instant::now();
    let mut model = Transformer::new(config, &mut StdRng::seed_from_u64(2017))?;
    let f32_mb = model.parameter_bytes() as f64 / 1e6;
    if std::env::args().any(|a| a == "--int8") {
        model.quantize(Precision::Int8)?;
    }
    let weights_mb = model.parameter_bytes() as f64 / 1e6;
    println!(
        "parameters: {} ({:.1} M), initialised in {:.2?}; {} weights: {weights_mb:.0} MB \
         ({f32_mb:.0} MB in f32)",
        model.num_parameters(),
        model.num_parameters() as f64 / 1e6,
        start.elapsed(),
        model.precision(),
    );
    // The peak resident memory from here on: the model as it runs, not its f32 construction.
    reset_peak_rss();

    // A batch of random sentences with different lengths, padded on the right with id 0.
    let mut rng = StdRng::seed_from_u64(7);
    let src_lengths: Vec<usize> = (0..batch).map(|b| src_len - 5 * b).collect();
    let tgt_lengths: Vec<usize> = (0..batch).map(|b| tgt_len - 3 * b).collect();
    let src = Array2::from_shape_fn((batch, src_len), |(b, j)| {
        if j < src_lengths[b] {
            rng.random_range(3..vocab as u32)
        } else {
            0
        }
    });
    let tgt = Array2::from_shape_fn((batch, tgt_len), |(b, j)| {
        if j < tgt_lengths[b] {
            rng.random_range(3..vocab as u32)
        } else {
            0
        }
    });
    let src_padding = KeyPaddingMask::from_lengths(&src_lengths, src_len)?;
    let tgt_padding = KeyPaddingMask::from_lengths(&tgt_lengths, tgt_len)?;
    println!(
        "source ids  [batch, src_len] = {:?}, lengths {src_lengths:?}",
        src.shape()
    );
    println!(
        "target ids  [batch, tgt_len] = {:?}, lengths {tgt_lengths:?}",
        tgt.shape()
    );

    let start = Instant::now();
    let memory = model.encode(src.view(), Some(&src_padding))?;
    let encoded = start.elapsed();
    let decoded = model.decode(
        tgt.view(),
        memory.view(),
        Some(&src_padding),
        Some(&tgt_padding),
    )?;
    let logits = model.project(decoded.view())?;
    let total = start.elapsed();
    println!(
        "memory      [batch, src_len, d_model]   = {:?}",
        memory.shape()
    );
    println!(
        "decoder out [batch, tgt_len, d_model]   = {:?}",
        decoded.shape()
    );
    println!(
        "logits      [batch, tgt_len, tgt_vocab] = {:?}",
        logits.shape()
    );
    println!("time: encoder {encoded:.2?}, whole forward {total:.2?}");

    // Memory: weights, the logits and a few layers' activations; repeated calls do not grow it.
    let logits_mb = logits.len() as f64 * 4.0 / 1e6;
    for call in 1..=3 {
        let again = model.forward(
            src.view(),
            tgt.view(),
            Some(&src_padding),
            Some(&tgt_padding),
        )?;
        assert_eq!(again, logits);
        if let Some(peak) = peak_rss_mb() {
            println!(
                "after forward call {call}: peak RSS {peak:.0} MB since the model was built \
                 ({} weights {weights_mb:.0} MB, logits {logits_mb:.0} MB)",
                model.precision()
            );
        }
    }

    let first = logits.slice(ndarray::s![0, 0, ..]);
    let best =
        first.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        );
    println!(
        "row 0, position 0: highest logit {:.4} for token {} (random weights: no meaning yet)",
        best.1, best.0
    );
    Ok(())
}

/// Resets the peak resident set size to the current one (Linux: `5` into `clear_refs`);
/// elsewhere the peak stays the process's.
fn reset_peak_rss() {
    // Memory the f32 construction freed goes back to the OS first (glibc keeps freed heap).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's heap.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set size in MB, where the OS reports it (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
