//! Streaming and sampling on the trained date model of `assets/dates/`.
//!
//! ```sh
//! cargo run --release --example sample
//! cargo run --release --example sample -- "3/4/21" "March 2031" --temperature 1.5 --top-k 5
//! ```
//!
//! - **Streaming** (`Transformer::stream`): each character is printed as soon as the decoder
//!   chooses it, with its probability, so one sees where the model hesitates. The stream is an
//!   iterator over the steps; dropping it stops decoding, as the year-only line shows (4 steps
//!   instead of 11).
//! - **Sampling** (`Transformer::sample`): `--draws` outputs drawn for each source from
//!   `softmax(logits / T)`, restricted to the `--top-k` most probable tokens and the
//!   `--top-p` nucleus, with a seeded `rand` generator. All draws of a source run as one batch
//!   (the source repeated), and the same seed gives the same draws on any thread count. With
//!   the defaults (T = 1, no top-k or top-p) the share of each distinct output is its
//!   probability under the model, which is printed beside it.
//!
//! The model was trained with label smoothing 0.1 (§5.4), so even a character it is sure of
//! gets p ≈ 0.92 and the other 8% is spread over the whole vocabulary: plain sampling writes
//! a malformed date more often than not. Nucleus sampling with `top_p` 0.9 cuts that tail and
//! keeps only the real alternatives, such as the year of `2031 March 3rd`, an order the
//! training never used. Without options the example runs both; `--temperature`, `--top-k`
//! and `--top-p` choose one setting instead.
//!
//! Options: `--temperature T` (default 1), `--top-k K` (default 0: all), `--top-p P` (default
//! 1: all), `--draws N` (default 1000), `--seed S` (default 7), `--assets DIR`.

#[allow(dead_code)]
mod dates;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use dates::{BoxError, DatesModel};
use ndarray::{Array2, Axis};
use ndtransformer::{GenerateOptions, KeyPaddingMask, Sampling};
use rand::{rngs::StdRng, SeedableRng};

/// Sources shown when none are given: two in trained formats, three outside them.
const DEMO: [&str; 5] = [
    "27th of November, 2026",
    "12.10.1954",
    "3/4/21",
    "March 2031",
    "2031 March 3rd",
];

struct Args {
    inputs: Vec<String>,
    /// `None` runs plain sampling and then nucleus sampling (top-p 0.9).
    sampling: Option<Sampling>,
    draws: usize,
    seed: u64,
    assets: std::path::PathBuf,
}

const USAGE: &str = "\
usage: sample [OPTIONS] [SOURCE...]

  --temperature T  divides the logits before the softmax (default 1)
  --top-k K        sample among the K most probable tokens only (default 0: all)
  --top-p P        sample within the smallest set of tokens of mass P (default 1: all)
  --draws N        outputs drawn per source (default 1000)
  --seed S         seed of the random generator (default 7)
  --assets DIR     the model's directory (default assets/dates/ of the repository)
";

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        inputs: Vec::new(),
        sampling: None,
        draws: 1000,
        seed: 7,
        assets: dates::default_assets_dir(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--temperature" => {
                args.sampling
                    .get_or_insert_with(Sampling::default)
                    .temperature = value("--temperature")?
                    .parse()
                    .map_err(|e| format!("--temperature: {e}"))?
            }
            "--top-k" => {
                args.sampling.get_or_insert_with(Sampling::default).top_k = value("--top-k")?
                    .parse()
                    .map_err(|e| format!("--top-k: {e}"))?
            }
            "--top-p" => {
                args.sampling.get_or_insert_with(Sampling::default).top_p = value("--top-p")?
                    .parse()
                    .map_err(|e| format!("--top-p: {e}"))?
            }
            "--draws" => {
                args.draws = value("--draws")?
                    .parse()
                    .map_err(|e| format!("--draws: {e}"))?;
                if args.draws == 0 {
                    return Err("--draws must be at least 1".into());
                }
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--assets" => args.assets = value("--assets")?.into(),
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}").into()),
            _ => args.inputs.push(arg),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), BoxError> {
    let args = parse_args()?;
    let m = DatesModel::load(&args.assets)?;
    let inputs: Vec<String> = if args.inputs.is_empty() {
        DEMO.iter().map(|s| s.to_string()).collect()
    } else {
        args.inputs.clone()
    };
    // At most the 10 characters of `YYYY-MM-DD` and EOS.
    let options = GenerateOptions::greedy(m.vocab.bos_id(), Some(m.vocab.eos_id()), 11);

    println!("Streaming greedy decoding: each character as it is chosen, with its probability\n");
    for source in &inputs {
        stream_one(&m, source, &options)?;
    }
    stream_year(&m, &inputs[0], &options)?;

    let settings = match args.sampling {
        Some(s) => vec![s],
        None => vec![
            Sampling::default(),
            Sampling {
                top_p: 0.9,
                ..Sampling::default()
            },
        ],
    };
    for s in &settings {
        println!(
            "\nSampling {} outputs per source (temperature {}, top-k {}, top-p {}, seed {})",
            args.draws,
            s.temperature,
            if s.top_k == 0 {
                "all".to_string()
            } else {
                s.top_k.to_string()
            },
            s.top_p,
            args.seed
        );
        for source in &inputs {
            sample_one(&m, source, &options, s, &args)?;
        }
    }
    Ok(())
}

/// The batch of one source repeated `copies` times.
fn repeated(m: &DatesModel, source: &str, copies: usize) -> Result<dates::Batch, BoxError> {
    let ids = m.encode_source(source)?;
    let row = ndarray::aview1(&ids);
    let mut batch = Array2::zeros((copies, ids.len()));
    batch
        .axis_iter_mut(Axis(0))
        .for_each(|mut r| r.assign(&row));
    Ok(dates::Batch {
        padding: KeyPaddingMask::from_lengths(&vec![ids.len(); copies], ids.len())?,
        ids: batch,
    })
}

/// Prints `source → ` and then each token the stream yields, as it comes.
fn stream_one(m: &DatesModel, source: &str, options: &GenerateOptions) -> Result<(), BoxError> {
    let batch = repeated(m, source, 1)?;
    print!("{source:>24} → ");
    std::io::stdout().flush()?;
    let mut least = (1.0f32, String::new());
    for step in m
        .model
        .stream(batch.ids.view(), Some(&batch.padding), options)?
    {
        for t in step? {
            let p = t.log_prob.exp();
            let text = if t.token == m.vocab.eos_id() {
                "⏎".to_string()
            } else {
                m.vocab.decode(&[t.token])
            };
            if p < least.0 {
                least = (p, text.clone());
            }
            print!("{text}");
            std::io::stdout().flush()?;
        }
    }
    println!("   (least sure: {:?} at p {:.3})", least.1, least.0);
    Ok(())
}

/// Stops the stream once the year is written: the remaining steps never run.
fn stream_year(m: &DatesModel, source: &str, options: &GenerateOptions) -> Result<(), BoxError> {
    let batch = repeated(m, source, 1)?;
    let start = Instant::now();
    let mut stream = m
        .model
        .stream(batch.ids.view(), Some(&batch.padding), options)?;
    let mut steps = 0;
    while stream.tokens(0).len() < 4 {
        match stream.next() {
            Some(step) => {
                step?;
                steps += 1;
            }
            None => break,
        }
    }
    let year = m.vocab.decode(stream.tokens(0));
    drop(stream);
    println!(
        "\nThe year of {source:?} alone: {year} after {steps} of at most {} steps ({:.2?}); \
         dropping the stream ends decoding.",
        11,
        start.elapsed()
    );
    Ok(())
}

/// Draws `args.draws` outputs for `source` in one batch and prints the distinct ones by count.
fn sample_one(
    m: &DatesModel,
    source: &str,
    options: &GenerateOptions,
    sampling: &Sampling,
    args: &Args,
) -> Result<(), BoxError> {
    let plain = *sampling == Sampling::default();
    let batch = repeated(m, source, args.draws)?;
    let draw = |seed: u64| {
        m.model.sample(
            batch.ids.view(),
            Some(&batch.padding),
            options,
            sampling,
            &mut StdRng::seed_from_u64(seed),
        )
    };
    let start = Instant::now();
    let hyps = draw(args.seed)?;
    let took = start.elapsed();
    let again = draw(args.seed)?;

    // Distinct outputs: count, and the model's probability of the whole output.
    let mut seen: HashMap<Vec<u32>, (usize, f32)> = HashMap::new();
    for h in &hyps {
        seen.entry(h.tokens.clone()).or_insert((0, h.log_prob)).0 += 1;
    }
    let mut distinct: Vec<(Vec<u32>, usize, f32)> =
        seen.into_iter().map(|(t, (n, lp))| (t, n, lp)).collect();
    distinct.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    println!(
        "\n{source:?}: {} distinct output{} in {took:.2?}; the same seed again gives the same \
         draws: {}",
        distinct.len(),
        if distinct.len() == 1 { "" } else { "s" },
        hyps == again
    );
    let shown = distinct.len().min(4);
    println!(
        "  {:<12} {:>7}  {}",
        "output",
        "share",
        if plain {
            "model probability"
        } else {
            "model probability (T = 1, before top-k/top-p)"
        }
    );
    for (tokens, n, log_prob) in &distinct[..shown] {
        let ends = tokens.last() == Some(&m.vocab.eos_id());
        println!(
            "  {:<12} {:>6.1}%  {:.4}{}",
            m.vocab.decode(tokens),
            100.0 * *n as f64 / args.draws as f64,
            log_prob.exp(),
            if ends { "" } else { "  (no EOS)" }
        );
    }
    if distinct.len() > shown {
        let rest: usize = distinct[shown..].iter().map(|d| d.1).sum();
        println!(
            "  {} others     {:>6.1}%",
            distinct.len() - shown,
            100.0 * rest as f64 / args.draws as f64
        );
    }
    Ok(())
}
