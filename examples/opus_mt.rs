//! Translates sentences with a Hugging Face Marian (OPUS-MT) checkpoint directory: tokenizes
//! them as `MarianTokenizer` does, decodes with the checkpoint's own generation settings
//! (`generation_config.json`: beams, maximum length, bad words, forced EOS) through the corpus
//! API, and prints the translations and tokens per second.
//!
//! ```sh
//! cargo run --release --example opus_mt                               # the test checkpoint
//! cargo run --release --example opus_mt -- --model path/to/opus-mt-en-de "Hello world."
//! cargo run --release --example opus_mt -- --model DIR --beam 1 --int8 --repeat 8 < lines.txt
//! ```
//!
//! A directory holds `config.json`, `generation_config.json`, `model.safetensors` (for a
//! checkpoint with only `pytorch_model.bin`, save it again with
//! `model.save_pretrained(dir, safe_serialization=True)`), `source.spm`, `target.spm` and
//! `vocab.json`. Without `--model` the example uses the tiny Marian checkpoint of the tests
//! (`tests/fixtures/marian/shared`, which `tools/make_marian_fixture.py` trains on a few hundred
//! template sentences): it translates sentences like its training ones and garbles the others,
//! but every step is the one a real OPUS-MT model takes.
//! `python3 tools/make_marian_fixture.py --full` writes a random checkpoint of opus-mt-en-de's
//! size to `target/models/opus-mt-en-de-random` for timing.
//!
//! Options:
//! - `--model DIR`: the checkpoint directory
//! - `--beam K`: beam size (default: the checkpoint's `num_beams`)
//! - `--max-len N`: most generated tokens (default: the checkpoint's `max_length` − 1)
//! - `--int8` / `--bf16`: convert the weights after loading
//! - `--batch-tokens T`: padded source tokens per batch (default 4096)
//! - `--repeat R`: translate the sentences R times (a bigger corpus for timing)
//! - `--exact N`: every output has exactly N tokens (EOS suppressed before, no forced EOS), so
//!   that engines compare on equal work (`tools/bench_marian.py`)
//! - `--runs R` / `--warmup W`: decode R timed times after W untimed ones and print the median
//!   (default 1 / 0)
//! - `--quiet`: print only the configuration and the timing, not the translations
//!
//! Other arguments are sentences; with none, the lines of standard input if it is not a
//! terminal, else (or if it is empty) a few built-in ones.

mod marian;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use marian::MarianTokenizer;
use ndtransformer::marian::MarianCheckpoint;
use ndtransformer::{CorpusOptions, LoadOptions, MaxLength, Precision};

type BoxError = Box<dyn std::error::Error>;

/// Two sentences in the style of the test checkpoint's training text, then two outside it.
const DEMO: [&str; 4] = [
    "The old man reads an old book.",
    "My neighbour opens the window every week.",
    "We translate sentences on the CPU, in Rust.",
    "How long does the train to Berlin take?",
];

struct Args {
    model: PathBuf,
    beam: Option<usize>,
    max_len: Option<usize>,
    precision: Option<Precision>,
    batch_tokens: usize,
    repeat: usize,
    exact: Option<usize>,
    runs: usize,
    warmup: usize,
    quiet: bool,
    sentences: Vec<String>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/marian/shared"),
        beam: None,
        max_len: None,
        precision: None,
        batch_tokens: 4096,
        repeat: 1,
        exact: None,
        runs: 1,
        warmup: 0,
        quiet: false,
        sentences: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> Result<usize, BoxError> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|_| format!("{flag} {v:?} is not a non-negative integer").into())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => args.model = it.next().ok_or("--model needs a directory")?.into(),
            "--beam" => args.beam = Some(number("--beam", it.next())?),
            "--max-len" => args.max_len = Some(number("--max-len", it.next())?),
            "--int8" => args.precision = Some(Precision::Int8),
            "--bf16" => args.precision = Some(Precision::Bf16),
            "--batch-tokens" => args.batch_tokens = number("--batch-tokens", it.next())?,
            "--repeat" => args.repeat = number("--repeat", it.next())?,
            "--exact" => args.exact = Some(number("--exact", it.next())?),
            "--runs" => args.runs = number("--runs", it.next())?.max(1),
            "--warmup" => args.warmup = number("--warmup", it.next())?,
            "--quiet" => args.quiet = true,
            "--help" | "-h" => {
                println!("usage: opus_mt [--model DIR] [--beam K] [--max-len N] [--int8|--bf16] [--batch-tokens T] [--repeat R] [--exact N] [--runs R] [--warmup W] [--quiet] [SENTENCE ...]");
                std::process::exit(0);
            }
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}").into()),
            _ => args.sentences.push(a),
        }
    }
    if args.sentences.is_empty() {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            for line in stdin.lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    args.sentences.push(line);
                }
            }
        }
        if args.sentences.is_empty() {
            args.sentences = DEMO.iter().map(|s| s.to_string()).collect();
        }
    }
    Ok(args)
}

fn run() -> Result<(), BoxError> {
    let args = parse_args()?;
    let started = Instant::now();
    let options = LoadOptions {
        precision: args.precision,
        ..LoadOptions::default()
    };
    let checkpoint = MarianCheckpoint::load_with_options(&args.model, &options)?;
    let tokenizer = MarianTokenizer::from_dir(&args.model)?;
    let mut generation = checkpoint.generation.clone();
    if let Some(beam) = args.beam {
        generation.beam_size = beam;
        generation.num_return = 1;
    }
    if let Some(max_len) = args.max_len {
        generation.max_len = MaxLength::Fixed(max_len);
    }
    if let Some(n) = args.exact {
        generation.max_len = MaxLength::Fixed(n);
        generation.min_len = n;
        generation.forced_eos = false;
    }
    let c = checkpoint.model.config();
    println!(
        "{}: d_model {}, {} + {} layers, {} heads, vocabulary {} / {}, {:?}, {} weights",
        args.model.display(),
        c.d_model,
        c.num_encoder_layers,
        c.num_decoder_layers,
        c.num_heads,
        c.src_vocab,
        c.tgt_vocab,
        c.activation,
        checkpoint.model.precision(),
    );
    println!(
        "generation: beam {}, at most {:?} tokens, length penalty {:?}, suppressed {:?}, forced EOS {} (loaded in {:.0} ms)",
        generation.beam_size,
        generation.max_len,
        generation.length_penalty,
        generation.suppress_tokens,
        generation.forced_eos,
        started.elapsed().as_secs_f64() * 1e3
    );

    let sources = args
        .sentences
        .iter()
        .map(|s| tokenizer.encode_source(s))
        .collect::<Result<Vec<_>, _>>()?;
    let corpus: Vec<&Vec<u32>> = (0..args.repeat).flat_map(|_| sources.iter()).collect();
    let corpus_options = CorpusOptions::new(args.batch_tokens, checkpoint.config.pad_id);
    let decode = || {
        checkpoint
            .model
            .generate_corpus(&corpus, &corpus_options, &generation, |_| {})
    };
    for _ in 0..args.warmup {
        decode()?;
    }
    let mut times = Vec::with_capacity(args.runs);
    let mut outputs = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        outputs = decode()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];

    let shown = if args.quiet { 0 } else { args.sentences.len() };
    for ((sentence, source), best) in args
        .sentences
        .iter()
        .zip(&sources)
        .zip(&outputs)
        .take(shown)
    {
        let best = &best[0];
        println!("\n{sentence}");
        println!("  source ids {source:?}");
        println!("→ {}", tokenizer.decode_target(&best.tokens)?);
        println!("  target ids {:?} (score {:.3})", best.tokens, best.score);
    }
    let generated: usize = outputs.iter().map(|h| h[0].tokens.len()).sum();
    let source_tokens: usize = corpus.iter().map(|s| s.len()).sum();
    println!(
        "\n{} sentences ({} source tokens) → {} generated tokens, median {:.1} ms of {}: {:.0} tokens/s, {:.1} sentences/s ({} threads)",
        corpus.len(),
        source_tokens,
        generated,
        seconds * 1e3,
        args.runs,
        generated as f64 / seconds,
        corpus.len() as f64 / seconds,
        rayon::current_num_threads()
    );
    Ok(())
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
