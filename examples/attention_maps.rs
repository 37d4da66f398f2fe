//! Where the trained dates model looks: PNG heatmaps of the encoder self-attention, the decoder
//! self- and cross-attention (one figure per layer, one panel per head) and the sinusoidal
//! positional-encoding table, for one input.
//!
//! ```sh
//! cargo run --release --example attention_maps
//! cargo run --release --example attention_maps -- "Nov 3, 1999" --out /tmp/maps
//! ```
//!
//! The default input is `27th of November, 2026` and the default output directory
//! `target/attention_maps/`; `--assets DIR` reads the model from elsewhere than `assets/dates/`.

// The held-out sampler, beam-search and evaluation helpers are for the translate example and
// the tests.
#[allow(dead_code)]
mod dates;
#[path = "dates/plot.rs"]
mod plot;

use std::path::PathBuf;
use std::process::ExitCode;

use dates::{BoxError, DatesModel};

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
    let mut source = None;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/attention_maps");
    let mut assets = dates::default_assets_dir();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().ok_or("--out needs a directory")?.into(),
            "--assets" => assets = args.next().ok_or("--assets needs a directory")?.into(),
            "-h" | "--help" => {
                println!("usage: attention_maps [--out DIR] [--assets DIR] [DATE]");
                return Ok(());
            }
            _ if source.is_none() => source = Some(arg),
            _ => return Err(format!("one input at a time (got {arg:?} after {source:?})").into()),
        }
    }
    let source = source.unwrap_or_else(|| "27th of November, 2026".into());

    let m = DatesModel::load(&assets)?;
    let maps = plot::render_attention_maps(&m, &source, &out)?;
    println!("{:?} → {}", maps.source, maps.output);
    let pe = plot::render_positional_encoding(
        64,
        m.config.d_model,
        m.config.max_len,
        &out.join("positional_encoding.png"),
    )?;
    for figure in maps.figures.iter().chain([&pe]) {
        println!(
            "wrote {} ({}×{}): {}",
            figure.path.display(),
            figure.width,
            figure.height,
            figure.title
        );
    }
    Ok(())
}
