//! The dates task of `tools/dates_task.md` in Rust: the calendar, the ten source formats, the
//! held-out rule, the vocabulary, and the trained model in `assets/dates/`.
//!
//! Shared by `examples/translate.rs`, `examples/attention_maps.rs` and `tests/trained_model.rs`
//! (each includes this folder as `mod dates;`). It only uses the crate's public API.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use ndtransformer::{
    Activation, BeamSearchOptions, EmbeddingConfig, GreedyOptions, Hypothesis, KeyPaddingMask,
    NormPosition, Transformer, TransformerConfig,
};
use rand::{rngs::StdRng, RngExt, SeedableRng};

/// Any error of this module, as a message naming the file or value at fault.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// The calendar
// ---------------------------------------------------------------------------------------------

/// The first year of the task.
pub const FIRST_YEAR: u32 = 1900;
/// The last year of the task (inclusive).
pub const LAST_YEAR: u32 = 2099;

/// Full month names, January first.
pub const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Weekday names, Monday = 0.
pub const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Whether `year` is a Gregorian leap year.
pub fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// Number of days of `month` (1..=12) in `year`.
pub fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A valid date of the task's calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// 1900..=2099.
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=days_in_month.
    pub day: u32,
}

impl Date {
    /// The date, or `None` if it is not a valid day of 1900–2099.
    pub fn new(year: u32, month: u32, day: u32) -> Option<Date> {
        ((FIRST_YEAR..=LAST_YEAR).contains(&year)
            && (1..=12).contains(&month)
            && (1..=days_in_month(year, month)).contains(&day))
        .then_some(Date { year, month, day })
    }

    /// The held-out rule: `(y·372 + m·31 + d) % 10 == 3`.
    pub fn is_held_out(&self) -> bool {
        (self.year * 372 + self.month * 31 + self.day) % 10 == 3
    }

    /// Day of the week, Monday = 0 (Sakamoto's method).
    pub fn weekday(&self) -> usize {
        const T: [u32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
        let yy = if self.month < 3 {
            self.year - 1
        } else {
            self.year
        };
        let sunday_based =
            (yy + yy / 4 - yy / 100 + yy / 400 + T[self.month as usize - 1] + self.day) % 7;
        ((sunday_based + 6) % 7) as usize
    }

    /// The target string `YYYY-MM-DD`.
    pub fn iso(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// Every date of 1900–2099 in calendar order (73,049 of them).
pub fn all_dates() -> impl Iterator<Item = Date> {
    (FIRST_YEAR..=LAST_YEAR).flat_map(|year| {
        (1..=12u32).flat_map(move |month| {
            (1..=days_in_month(year, month)).map(move |day| Date { year, month, day })
        })
    })
}

/// The held-out dates in calendar order (7,290 of them).
pub fn held_out_dates() -> Vec<Date> {
    all_dates().filter(Date::is_held_out).collect()
}

/// `st`, `nd`, `rd` or `th` for day `d`.
pub fn ordinal_suffix(day: u32) -> &'static str {
    match day {
        1 | 21 | 31 => "st",
        2 | 22 => "nd",
        3 | 23 => "rd",
        _ => "th",
    }
}

// ---------------------------------------------------------------------------------------------
// The ten source formats
// ---------------------------------------------------------------------------------------------

/// Number of source formats.
pub const NUM_FORMATS: usize = 10;

/// The formats' names, by id.
pub const FORMAT_NAMES: [&str; NUM_FORMATS] = [
    "D Month YYYY",
    "D Mon YYYY",
    "Month D, YYYY",
    "Mon D, YYYY",
    "Weekday, D Month YYYY",
    "DD.MM.YYYY",
    "YYYY/MM/DD",
    "Dth of Month, YYYY",
    "month D YYYY",
    "DD MON YYYY",
];

/// `date` written in source format `format` (0..10), e.g. format 7 gives `27th of November, 2026`.
///
/// # Panics
/// If `format >= NUM_FORMATS`.
pub fn format_date(date: Date, format: usize) -> String {
    let Date { year, month, day } = date;
    let month_name = MONTHS[month as usize - 1];
    let mon = &month_name[..3];
    match format {
        0 => format!("{day} {month_name} {year}"),
        1 => format!("{day} {mon} {year}"),
        2 => format!("{month_name} {day}, {year}"),
        3 => format!("{mon} {day}, {year}"),
        4 => format!("{}, {day} {month_name} {year}", WEEKDAYS[date.weekday()]),
        5 => format!("{day:02}.{month:02}.{year}"),
        6 => format!("{year}/{month:02}/{day:02}"),
        7 => format!("{day}{} of {month_name}, {year}", ordinal_suffix(day)),
        8 => format!("{} {day} {year}", month_name.to_ascii_lowercase()),
        9 => format!("{day:02} {} {year}", mon.to_ascii_uppercase()),
        _ => panic!("format {format} is not one of 0..{NUM_FORMATS}"),
    }
}

/// One source/target pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The date.
    pub date: Date,
    /// The source format id.
    pub format: usize,
    /// The date in that format.
    pub source: String,
    /// The date as `YYYY-MM-DD`.
    pub target: String,
}

impl Example {
    /// The pair for `date` in `format`.
    pub fn new(date: Date, format: usize) -> Example {
        Example {
            date,
            format,
            source: format_date(date, format),
            target: date.iso(),
        }
    }
}

/// `n` held-out examples drawn with replacement from the 7,290 held-out dates, each with a
/// uniformly random format; the same seed gives the same sample.
pub fn held_out_sample(n: usize, seed: u64) -> Vec<Example> {
    let dates = held_out_dates();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let date = dates[rng.random_range(0..dates.len())];
            Example::new(date, rng.random_range(0..NUM_FORMATS))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The vocabulary
// ---------------------------------------------------------------------------------------------

/// A character the vocabulary does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownChar {
    /// The character.
    pub ch: char,
    /// Its position in the input, counted in characters from 0.
    pub position: usize,
    /// The input.
    pub text: String,
}

impl fmt::Display for UnknownChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown character {:?} (U+{:04X}) at position {} of {:?}; the model reads only \
             digits, ' ', ',', '-', '.', '/' and the letters of the month and weekday names",
            self.ch, self.ch as u32, self.position, self.text
        )
    }
}

impl std::error::Error for UnknownChar {}

/// The character vocabulary of `vocab.json`: `<pad>`, `<bos>`, `<eos>`, then one token per
/// character.
#[derive(Debug, Clone)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<char, u32>,
}

impl Vocab {
    /// Parses the JSON list of tokens.
    pub fn from_json(json: &str) -> Result<Vocab, BoxError> {
        let tokens: Vec<String> = serde_json::from_str(json)
            .map_err(|e| format!("vocab.json is not a JSON list of strings: {e}"))?;
        let specials = ["<pad>", "<bos>", "<eos>"];
        if tokens.len() < 3 || tokens[..3] != specials {
            return Err(format!("vocab.json must start with {specials:?}").into());
        }
        let mut ids = HashMap::new();
        for (id, token) in tokens.iter().enumerate().skip(3) {
            let mut chars = token.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => {
                    if ids.insert(c, id as u32).is_some() {
                        return Err(format!("vocab.json lists {c:?} twice").into());
                    }
                }
                _ => {
                    return Err(
                        format!("vocab.json token {id} {token:?} is not one character").into(),
                    )
                }
            }
        }
        Ok(Vocab { tokens, ids })
    }

    /// Reads `vocab.json`.
    pub fn load(path: &Path) -> Result<Vocab, BoxError> {
        Vocab::from_json(&read_asset(path)?)
    }

    /// Number of tokens (59).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        0
    }

    /// The begin-of-sequence id.
    pub fn bos_id(&self) -> u32 {
        1
    }

    /// The end-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        2
    }

    /// The token of `id` (`<eos>` for 2, `"a"` for 38), or `None` outside the vocabulary.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// One id per character, no BOS or EOS.
    ///
    /// # Errors
    /// [`UnknownChar`] naming the first character the vocabulary lacks.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, UnknownChar> {
        text.chars()
            .enumerate()
            .map(|(position, ch)| {
                self.ids.get(&ch).copied().ok_or_else(|| UnknownChar {
                    ch,
                    position,
                    text: text.to_string(),
                })
            })
            .collect()
    }

    /// The characters of `ids`, stopping at the first EOS; BOS and padding are skipped and an
    /// id outside the vocabulary is written `�`.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .take_while(|&&id| id != self.eos_id())
            .filter(|&&id| id != self.bos_id() && id != self.pad_id())
            .map(|&id| self.token(id).unwrap_or("\u{FFFD}"))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// `assets/dates/` of this repository (an absolute path, so the examples run from anywhere).
pub fn default_assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/dates")
}

fn read_asset(path: &Path) -> Result<String, BoxError> {
    std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e} (the trained model ships in assets/dates/ of the repository: \
             config.json, vocab.json, model.safetensors)",
            path.display()
        )
        .into()
    })
}

/// What `config.json` says besides the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// Padding id.
    pub pad: u32,
    /// Begin-of-sequence id.
    pub bos: u32,
    /// End-of-sequence id.
    pub eos: u32,
}

/// The architecture and special ids of a `config.json` written by `tools/train_dates.py`.
pub fn parse_config(json: &str) -> Result<(TransformerConfig, SpecialIds), BoxError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("config.json is not JSON: {e}"))?;
    let n = |key: &str| -> Result<usize, BoxError> {
        v[key]
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| format!("config.json: {key} is missing or not a whole number").into())
    };
    let activation = match v["activation"].as_str() {
        Some("relu") => Activation::Relu,
        Some("gelu") => Activation::Gelu,
        other => {
            return Err(format!("config.json: activation {other:?} is not relu or gelu").into())
        }
    };
    let norm_position = match v["norm_first"].as_bool() {
        Some(true) => NormPosition::Pre,
        Some(false) => NormPosition::Post,
        None => return Err("config.json: norm_first is missing or not a boolean".into()),
    };
    let layer_norm_eps = v["layer_norm_eps"]
        .as_f64()
        .ok_or("config.json: layer_norm_eps is missing or not a number")?
        as f32;
    let config = TransformerConfig {
        d_model: n("d_model")?,
        num_heads: n("nhead")?,
        d_ff: n("dim_feedforward")?,
        num_encoder_layers: n("num_encoder_layers")?,
        num_decoder_layers: n("num_decoder_layers")?,
        src_vocab: n("src_vocab")?,
        tgt_vocab: n("tgt_vocab")?,
        max_len: n("max_len")?,
        activation,
        norm_position,
        layer_norm_eps,
        share_embeddings: false,
        tie_output_projection: false,
        embedding: EmbeddingConfig::paper(),
        final_norm: true,
    };
    let id = |key: &str| -> Result<u32, BoxError> { Ok(u32::try_from(n(key)?)?) };
    let special = SpecialIds {
        pad: id("pad_id")?,
        bos: id("bos_id")?,
        eos: id("eos_id")?,
    };
    Ok((config, special))
}

/// The trained model with its vocabulary: strings in, strings out.
pub struct DatesModel {
    /// The Transformer loaded from `model.safetensors`.
    pub model: Transformer,
    /// The vocabulary of `vocab.json`.
    pub vocab: Vocab,
    /// The architecture of `config.json`.
    pub config: TransformerConfig,
}

/// A right-padded batch of sources.
pub struct Batch {
    /// `[batch, longest]`, padded with 0.
    pub ids: Array2<u32>,
    /// `[batch, longest]`, true = padding.
    pub padding: KeyPaddingMask,
}

impl DatesModel {
    /// Reads `config.json`, `vocab.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<DatesModel, BoxError> {
        let (config, special) = parse_config(&read_asset(&dir.join("config.json"))?)?;
        let vocab = Vocab::load(&dir.join("vocab.json"))?;
        let expected = SpecialIds {
            pad: vocab.pad_id(),
            bos: vocab.bos_id(),
            eos: vocab.eos_id(),
        };
        if special != expected {
            return Err(format!(
                "config.json has special ids {special:?}, vocab.json {expected:?}"
            )
            .into());
        }
        if vocab.len() != config.src_vocab || vocab.len() != config.tgt_vocab {
            return Err(format!(
                "vocab.json has {} tokens but config.json says src_vocab {}, tgt_vocab {}",
                vocab.len(),
                config.src_vocab,
                config.tgt_vocab
            )
            .into());
        }
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(format!(
                "{} does not exist (the trained weights ship in assets/dates/ of the repository)",
                weights.display()
            )
            .into());
        }
        let model = Transformer::load(&weights, config.clone())
            .map_err(|e| format!("loading {}: {e}", weights.display()))?;
        Ok(DatesModel {
            model,
            vocab,
            config,
        })
    }

    /// Checks one source: known characters, not empty, not longer than the positional table.
    pub fn encode_source(&self, source: &str) -> Result<Vec<u32>, BoxError> {
        let ids = self.vocab.encode(source)?;
        if ids.is_empty() {
            return Err("the input is empty".into());
        }
        if ids.len() > self.config.max_len {
            return Err(format!(
                "{source:?} has {} characters; the model reads at most {} (max_len)",
                ids.len(),
                self.config.max_len
            )
            .into());
        }
        Ok(ids)
    }

    /// Encodes and right-pads `sources` into one batch.
    pub fn batch<S: AsRef<str>>(&self, sources: &[S]) -> Result<Batch, BoxError> {
        let rows = sources
            .iter()
            .map(|s| self.encode_source(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        pad_batch(&rows)
    }

    /// Greedy decoding options: at most 11 generated tokens, the 10 characters and EOS (the
    /// spec's 12 counts BOS too).
    pub fn greedy_options(&self) -> GreedyOptions {
        GreedyOptions {
            bos_id: self.vocab.bos_id(),
            eos_id: Some(self.vocab.eos_id()),
            max_len: 11,
        }
    }

    /// Beam search with the paper's beam 4 and α 0.6, at most 11 generated tokens.
    pub fn beam_options(&self, num_return: usize) -> BeamSearchOptions {
        BeamSearchOptions {
            max_len: ndtransformer::MaxLength::Fixed(11),
            num_return,
            ..BeamSearchOptions::paper(self.vocab.bos_id(), self.vocab.eos_id())
        }
    }

    /// Greedy decodes of `sources`, as token ids (without BOS, with EOS).
    pub fn greedy_ids<S: AsRef<str>>(&self, sources: &[S]) -> Result<Vec<Vec<u32>>, BoxError> {
        let batch = self.batch(sources)?;
        Ok(self.model.greedy_decode(
            batch.ids.view(),
            Some(&batch.padding),
            &self.greedy_options(),
        )?)
    }

    /// Greedy decodes of `sources`, as strings.
    pub fn translate<S: AsRef<str>>(&self, sources: &[S]) -> Result<Vec<String>, BoxError> {
        Ok(self
            .greedy_ids(sources)?
            .iter()
            .map(|ids| self.vocab.decode(ids))
            .collect())
    }

    /// The `num_return` best beam-search hypotheses of each source.
    pub fn beam<S: AsRef<str>>(
        &self,
        sources: &[S],
        num_return: usize,
    ) -> Result<Vec<Vec<Hypothesis>>, BoxError> {
        let batch = self.batch(sources)?;
        Ok(self.model.beam_search(
            batch.ids.view(),
            Some(&batch.padding),
            &self.beam_options(num_return),
        )?)
    }
}

/// Right-pads token rows with 0 into `[batch, longest]` ids and their padding mask.
pub fn pad_batch(rows: &[Vec<u32>]) -> Result<Batch, BoxError> {
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let ids = Array2::from_shape_fn((rows.len(), longest), |(b, j)| {
        rows[b].get(j).copied().unwrap_or(0)
    });
    let padding = KeyPaddingMask::from_lengths(&lengths, longest)?;
    Ok(Batch { ids, padding })
}

/// Exact-match results of a greedy evaluation.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Examples decoded.
    pub total: usize,
    /// Examples whose output equals the target.
    pub correct: usize,
    /// `(total, correct)` per format id.
    pub per_format: [(usize, usize); NUM_FORMATS],
    /// `(source, expected, got)` of every miss.
    pub failures: Vec<(String, String, String)>,
}

impl Evaluation {
    /// Adds one batch's outputs.
    pub fn record(&mut self, examples: &[Example], outputs: &[String]) {
        for (e, out) in examples.iter().zip(outputs) {
            self.total += 1;
            self.per_format[e.format].0 += 1;
            if *out == e.target {
                self.correct += 1;
                self.per_format[e.format].1 += 1;
            } else {
                self.failures
                    .push((e.source.clone(), e.target.clone(), out.clone()));
            }
        }
    }

    /// `correct / total`.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}
