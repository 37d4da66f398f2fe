//! Human-written dates to ISO 8601 with the trained model in `assets/dates/` (the task of
//! `tools/dates_task.md`): decodes a few dates with greedy decoding and beam search, then
//! measures exact-match accuracy and throughput on held-out dates the model never saw.
//!
//! ```sh
//! cargo run --release --example translate
//! cargo run --release --example translate -- "3rd of March, 2031" "12.10.1954"
//! cargo run --release --example translate -- --n 20000 --batch-tokens 2048 --seed 7
//! cargo run --release --example translate -- --fixed --batch 256  # fixed batches, input order
//! cargo run --release --example translate -- --int8                  # int8 weights
//! ```
//!
//! The held-out evaluation decodes all its dates through the corpus API
//! ([`Transformer::greedy_corpus`](ndtransformer::Transformer::greedy_corpus)): sorted by
//! length, in batches of at most `--batch-tokens` padded source tokens, one batch per thread
//! at once. On the 2-core machine of `docs/performance.md` that is about twice the sentences
//! per second of batches of 256 dates in input order (`--fixed`), with the same predictions.
//!
//! Options (`--help` lists them too):
//! - `--n N`: held-out dates to evaluate (default 5000; 0 skips the evaluation)
//! - `--batch-tokens T`: padded source tokens per batch, rows × longest (default 1024)
//! - `--batch B`: rows per batch: at most B with the corpus API (default no limit), exactly B
//!   with --fixed (default 256)
//! - `--concurrent C`: batches decoded at once (default one per thread)
//! - `--fixed`: evaluate in fixed batches of --batch in input order instead (the former
//!   evaluation, for comparison)
//! - `--seed S`: seed of the held-out sample (default 2017)
//! - `--assets DIR`: the model's directory (default assets/dates/ of the repository)
//! - `--int8`: convert the model to int8 weights after loading
//!
//! Every other argument is a date to translate.

mod dates;

use std::process::ExitCode;
use std::time::Instant;

use dates::{BoxError, Date, DatesModel, Evaluation, Example, FORMAT_NAMES};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use ndtransformer::CorpusOptions;

struct Args {
    inputs: Vec<String>,
    n: usize,
    batch: Option<usize>,
    batch_tokens: usize,
    fixed: bool,
    concurrent: Option<usize>,
    seed: u64,
    assets: std::path::PathBuf,
    int8: bool,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        inputs: Vec::new(),
        n: 5000,
        batch: None,
        batch_tokens: DEFAULT_BATCH_TOKENS,
        fixed: false,
        concurrent: None,
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
                let batch = value("--batch")?
                    .parse()
                    .map_err(|e| format!("--batch: {e}"))?;
                if batch == 0 {
                    return Err("--batch must be at least 1".into());
                }
                args.batch = Some(batch);
            }
            "--batch-tokens" => {
                args.batch_tokens = value("--batch-tokens")?
                    .parse()
                    .map_err(|e| format!("--batch-tokens: {e}"))?;
                if args.batch_tokens == 0 {
                    return Err("--batch-tokens must be at least 1".into());
                }
            }
            "--fixed" => args.fixed = true,
            "--concurrent" => {
                let concurrent = value("--concurrent")?
                    .parse()
                    .map_err(|e| format!("--concurrent: {e}"))?;
                if concurrent == 0 {
                    return Err("--concurrent must be at least 1".into());
                }
                args.concurrent = Some(concurrent);
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--assets" => args.assets = value("--assets")?.into(),
            "--int8" => args.int8 = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--" => args.inputs.extend(it.by_ref()),
            _ => args.inputs.push(arg),
        }
    }
    Ok(args)
}

/// Padded source tokens per batch of the held-out evaluation: measured flat from 512 to 2048
/// on the 2-core machine of `docs/performance.md` (one batch per thread); 1024 keeps a
/// batch's memory keys and values (`2 · 2 layers · 1024 · 64` floats) at 1 MiB.
const DEFAULT_BATCH_TOKENS: usize = 1024;

const USAGE: &str = "\
usage: translate [OPTIONS] [DATE...]

  --n N             held-out dates to evaluate (default 5000; 0 skips the evaluation)
  --batch-tokens T  padded source tokens per batch, rows × longest (default 1024)
  --batch B         rows per batch: at most B with the corpus API (default no limit),
                    exactly B with --fixed (default 256)
  --concurrent C    batches decoded at once (default one per thread)
  --fixed           evaluate in fixed batches of --batch in input order instead
                    (the former evaluation, for comparison)
  --seed S          seed of the held-out sample (default 2017)
  --assets DIR      the model's directory (default assets/dates/ of the repository)
  --int8            convert the model to int8 weights after loading
";

/// Rows per batch of `--fixed` (`--batch`, default 256).
fn fixed_batch(args: &Args) -> usize {
    args.batch.unwrap_or(256)
}

/// Batches decoded at once (`--concurrent`, default one per thread of the pool).
fn concurrent(args: &Args) -> usize {
    args.concurrent.unwrap_or_else(rayon::current_num_threads)
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

/// Greedy exact match on `args.n` held-out dates in random formats: through the corpus API
/// (sorted by length, batches under a token budget), or with `--fixed` in batches of `--batch`
/// in input order.
fn evaluate(m: &DatesModel, args: &Args) -> Result<(), BoxError> {
    let examples = dates::held_out_sample(args.n, args.seed);
    let batching = if args.fixed {
        format!("fixed batches of {} in input order", fixed_batch(args))
    } else {
        let rows = args
            .batch
            .map(|b| format!(" and {b} rows"))
            .unwrap_or_default();
        format!(
            "sorted by length, batches of at most {} tokens{rows}, {} at once",
            args.batch_tokens,
            concurrent(args)
        )
    };
    println!(
        "\nheld-out evaluation: {} dates (of the 7,290 never seen in training) in random formats, \
         seed {}, greedy, {batching}, {} threads",
        examples.len(),
        args.seed,
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
    let sources: Vec<&str> = examples
        .iter()
        .map(|e: &Example| e.source.as_str())
        .collect();
    let t = Instant::now();
    let (outputs, batches) = if args.fixed {
        let mut outputs = Vec::with_capacity(sources.len());
        let mut batches = 0;
        for chunk in sources.chunks(fixed_batch(args)) {
            outputs.extend(m.translate(chunk)?);
            batches += 1;
            bar.inc(chunk.len() as u64);
        }
        (outputs, batches)
    } else {
        let ids = sources
            .iter()
            .map(|s| m.encode_source(s))
            .collect::<Result<Vec<_>, _>>()?;
        let corpus = CorpusOptions {
            max_batch_size: args.batch.unwrap_or(usize::MAX),
            concurrent_batches: concurrent(args),
            ..CorpusOptions::new(args.batch_tokens, m.vocab.pad_id())
        };
        let mut batches = 0;
        let outputs = m
            .model
            .greedy_corpus(&ids, &corpus, &m.greedy_options(), |p| {
                bar.set_position(p.sequences_done as u64);
                batches = p.batches_total;
            })?
            .iter()
            .map(|ids| m.vocab.decode(ids))
            .collect();
        (outputs, batches)
    };
    let decoding = t.elapsed();
    bar.finish_and_clear();
    let mut eval = Evaluation::default();
    eval.record(&examples, &outputs);

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
        "throughput: {:.0} sentences/s; {batches} batches, {:.2} ms of wall time a batch (encoding, \
         padding and greedy decoding included); {:.2?} in all",
        eval.total as f64 / decoding.as_secs_f64(),
        decoding.as_secs_f64() * 1e3 / batches.max(1) as f64,
        decoding
    );
    Ok(())
}
