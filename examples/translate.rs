//! Human-written dates to ISO 8601 with the trained model in `assets/dates/` (the task of
//! `tools/dates_task.md`): decodes a few dates with greedy decoding and beam search, then
//! measures exact-match accuracy and throughput on held-out dates the model never saw.
//!
//! ```sh
//! cargo run --release --example translate
//! cargo run --release --example translate -- "3rd of March, 2031" "12.10.1954"
//! cargo run --release --example translate -- --n 20000 --batch 512 --seed 7
//! cargo run --release --example translate -- --int8                  # int8 weights
//! ```
//!
//! Options: `--n N` held-out dates to evaluate (default 5000, 0 skips the evaluation),
//! `--batch B` (default 256), `--seed S` (default 2017), `--assets DIR` (default
//! `assets/dates/` of the repository), `--int8` (convert the model to int8 weights after
//! loading, [`Precision::Int8`](ndtransformer::Precision)). Every other argument is a date to
//! translate.

mod dates;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dates::{BoxError, Date, DatesModel, Evaluation, Example, FORMAT_NAMES};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

struct Args {
    inputs: Vec<String>,
    n: usize,
    batch: usize,
    seed: u64,
    assets: std::path::PathBuf,
    int8: bool,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        inputs: Vec::new(),
        n: 5000,
        batch: 256,
        seed: 2017,
        assets: dates::default_assets_dir(),
        int8: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--n" => args.n = value("--n")?.parse().map_err(|e| format!("--n: {e}"))?,
            "--batch" => {
                args.batch = value("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?;
                if args.batch == 0 {
                    return Err("--batch must be at least 1".into());
                }
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--assets" => args.assets = value("--assets")?.into(),
            "--int8" => args.int8 = true,
            "-h" | "--help" => {
                println!(
                    "usage: translate [--n N] [--batch B] [--seed S] [--assets DIR] [--int8] [DATE...]"
                );
                std::process::exit(0);
            }
            "--" => args.inputs.extend(it.by_ref()),
            _ => args.inputs.push(arg),
        }
    }
    Ok(args)
}

/// A few dates across the formats: (year, month, day, format).
const DEMO: [(u32, u32, u32, usize); 10] = [
    (2026, 11, 27, 7),
    (1999, 11, 3, 3),
    (2026, 11, 27, 4),
    (1999, 11, 3, 5),
    (2000, 2, 29, 8),
    (1969, 7, 20, 0),
    (2084, 1, 9, 6),
    (1900, 1, 1, 9),
    (2025, 9, 24, 2),
    (1907, 3, 16, 1),
];

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, BoxError> {
    let args = parse_args()?;
    let start = Instant::now();
    let mut m = DatesModel::load(&args.assets)?;
    let f32_bytes = m.model.parameter_bytes();
    if args.int8 {
        m.model.quantize(ndtransformer::Precision::Int8)?;
    }
    let c = &m.config;
    println!(
        "model: {} ({} parameters, {}: {} bytes of weights, {f32_bytes} in f32; d_model {}, {} heads, \
         {}+{} layers, vocabulary {}), loaded in {:.1?}",
        args.assets.display(),
        m.model.num_parameters(),
        m.model.precision(),
        m.model.parameter_bytes(),
        c.d_model,
        c.num_heads,
        c.num_encoder_layers,
        c.num_decoder_layers,
        m.vocab.len(),
        start.elapsed()
    );

    let inputs: Vec<String> = if args.inputs.is_empty() {
        DEMO.iter()
            .map(|&(y, mo, d, f)| dates::format_date(Date::new(y, mo, d).expect("valid"), f))
            .collect()
    } else {
        args.inputs.clone()
    };
    let rejected = translate_inputs(&m, &inputs)?;

    if args.n > 0 {
        evaluate(&m, &args)?;
    }
    Ok(if rejected > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints `source → greedy` and the best beam hypothesis of every input; returns how many
/// inputs were rejected (unknown characters, too long).
fn translate_inputs(m: &DatesModel, inputs: &[String]) -> Result<usize, BoxError> {
    let (good, bad): (Vec<&String>, Vec<&String>) =
        inputs.iter().partition(|s| m.encode_source(s).is_ok());
    for s in &bad {
        eprintln!("error: {}", m.encode_source(s).unwrap_err());
    }
    if good.is_empty() {
        return Ok(bad.len());
    }
    let greedy = m.translate(&good)?;
    let beams = m.beam(&good, 2)?;
    let width = good.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    println!(
        "\n{:>width$}    {:<10}  beam search (4 beams, α 0.6): best, log p, score; runner-up",
        "source", "greedy",
    );
    for ((source, out), hyps) in good.iter().zip(&greedy).zip(&beams) {
        let best = &hyps[0];
        let runner_up = hyps
            .get(1)
            .map(|h| format!("{} {:.2}", m.vocab.decode(&h.tokens), h.score))
            .unwrap_or_default();
        let seen = match parse_iso(out) {
            Some(d) if d.is_held_out() => "  (held-out date)",
            Some(_) => "",
            None => "  (not a valid date)",
        };
        println!(
            "{source:>width$} →  {out:<10}  {} {:>6.3} {:>6.3}; {runner_up}{seen}",
            m.vocab.decode(&best.tokens),
            best.log_prob,
            best.score,
        );
    }
    Ok(bad.len())
}

/// `YYYY-MM-DD` back into a date of the task, if it is one.
fn parse_iso(s: &str) -> Option<Date> {
    let mut parts = s.split('-');
    let (y, mo, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || mo.len() != 2 || d.len() != 2 {
        return None;
    }
    Date::new(y.parse().ok()?, mo.parse().ok()?, d.parse().ok()?)
}

/// Greedy exact match on `args.n` held-out dates in random formats, in batches.
fn evaluate(m: &DatesModel, args: &Args) -> Result<(), BoxError> {
    let examples = dates::held_out_sample(args.n, args.seed);
    println!(
        "\nheld-out evaluation: {} dates (of the 7,290 never seen in training) in random formats, \
         seed {}, greedy, batches of {}, {} threads",
        examples.len(),
        args.seed,
        args.batch,
        rayon::current_num_threads()
    );
    let bar = ProgressBar::new(examples.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} dates, {rate}, eta {eta}",
        )?
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} dates/s", state.per_sec());
            },
        )
        .progress_chars("=> "),
    );
    let mut eval = Evaluation::default();
    let mut decoding = Duration::ZERO;
    let mut batches = 0;
    for chunk in examples.chunks(args.batch) {
        let sources: Vec<&str> = chunk.iter().map(|e: &Example| e.source.as_str()).collect();
        let t = Instant::now();
        let outputs = m.translate(&sources)?;
        decoding += t.elapsed();
        batches += 1;
        eval.record(chunk, &outputs);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    println!(
        "exact match: {}/{} = {:.2} % (target ≥ 99 %)",
        eval.correct,
        eval.total,
        100.0 * eval.accuracy()
    );
    for (f, &(total, correct)) in eval.per_format.iter().enumerate() {
        println!(
            "  format {f} {:<22} {correct:>5}/{total:<5} {:>7.2} %",
            FORMAT_NAMES[f],
            100.0 * correct as f64 / total.max(1) as f64
        );
    }
    for (source, expected, got) in eval.failures.iter().take(10) {
        println!("  miss: {source:?} → {got:?}, expected {expected:?}");
    }
    println!(
        "throughput: {:.0} dates/s; {:.2} ms per batch of {} (mean over {batches} batches, \
         encoding, padding and greedy decoding included); {:.2?} in all",
        eval.total as f64 / decoding.as_secs_f64(),
        decoding.as_secs_f64() * 1e3 / batches as f64,
        args.batch,
        decoding
    );
    Ok(())
}
