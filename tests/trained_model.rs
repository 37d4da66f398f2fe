//! The trained dates model of `assets/dates/` (task: `tools/dates_task.md`): the Rust task code
//! reproduces the PyTorch reference inputs, the crate reproduces PyTorch's logits and greedy
//! decodes, the model is ≥ 99 % exact on held-out dates, and the attention maps render.
//!
//! `cargo test --test trained_model -- --nocapture` prints the errors and timings.

mod common;
#[path = "../examples/dates/mod.rs"]
mod dates;
#[path = "../examples/dates/plot.rs"]
mod plot;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use common::TensorFile;
use dates::{Date, DatesModel};
use ndarray::{s, Array2, Array3};
use ndtransformer::KeyPaddingMask;
use serde_json::Value;

fn model() -> &'static DatesModel {
    static MODEL: OnceLock<DatesModel> = OnceLock::new();
    MODEL.get_or_init(|| DatesModel::load(&dates::default_assets_dir()).unwrap())
}

/// `assets/dates/reference.safetensors`, written by `tools/train_dates.py`.
struct Reference(TensorFile);

impl Reference {
    fn load() -> Reference {
        Reference(TensorFile::read(
            &dates::default_assets_dir().join("reference.safetensors"),
        ))
    }

    fn ids(&self, name: &str) -> Array2<u32> {
        self.0.ids(name)
    }

    /// A uint8 mask (1 = padding).
    fn padding(&self, name: &str) -> KeyPaddingMask {
        KeyPaddingMask::from_padding_flags(self.0.flags(name))
    }

    fn logits(&self, name: &str) -> Array3<f32> {
        self.0.f32(name).into_dimensionality().unwrap()
    }

    fn meta(&self, key: &str) -> Value {
        self.0.metadata_json(key)
    }

    fn strings(&self, key: &str) -> Vec<String> {
        serde_json::from_value(self.meta(key)).unwrap()
    }
}

#[test]
fn calendar_formats_and_held_out_rule_follow_the_spec() {
    let all: Vec<Date> = dates::all_dates().collect();
    assert_eq!(all.len(), 73_049);
    assert_eq!(dates::held_out_dates().len(), 7_290);
    assert!(Date::new(1900, 2, 29).is_none() && Date::new(2000, 2, 29).is_some());
    assert!(Date::new(2100, 1, 1).is_none() && Date::new(1999, 4, 31).is_none());
    for (y, m, d, weekday) in [(1900, 1, 1, 0), (2000, 2, 29, 1), (2026, 11, 27, 4)] {
        assert_eq!(
            Date::new(y, m, d).unwrap().weekday(),
            weekday,
            "{y}-{m}-{d}"
        );
    }
    // The equivalent form of the held-out rule.
    for d in &all {
        assert_eq!(d.is_held_out(), (2 * d.year + d.month + d.day) % 10 == 3);
    }
    let suffixes: Vec<&str> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 30, 31]
        .into_iter()
        .map(dates::ordinal_suffix)
        .collect();
    assert_eq!(
        suffixes,
        ["st", "nd", "rd", "th", "th", "th", "th", "st", "nd", "rd", "th", "st"]
    );

    // The spec's table of formats, for 2026-11-27 and 1999-11-03.
    let expected = [
        ("27 November 2026", "3 November 1999"),
        ("27 Nov 2026", "3 Nov 1999"),
        ("November 27, 2026", "November 3, 1999"),
        ("Nov 27, 2026", "Nov 3, 1999"),
        ("Friday, 27 November 2026", "Wednesday, 3 November 1999"),
        ("27.11.2026", "03.11.1999"),
        ("2026/11/27", "1999/11/03"),
        ("27th of November, 2026", "3rd of November, 1999"),
        ("november 27 2026", "november 3 1999"),
        ("27 NOV 2026", "03 NOV 1999"),
    ];
    let (a, b) = (
        Date::new(2026, 11, 27).unwrap(),
        Date::new(1999, 11, 3).unwrap(),
    );
    for (f, (ea, eb)) in expected.iter().enumerate() {
        assert_eq!(dates::format_date(a, f), *ea, "format {f}");
        assert_eq!(dates::format_date(b, f), *eb, "format {f}");
    }
    assert_eq!(a.iso(), "2026-11-27");
    // The format names are those of the training summary in config.json.
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dates::default_assets_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    let mut trained: Vec<&str> = config["training_summary"]
        ["held_out_all_formats_failures_by_format"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut ours = dates::FORMAT_NAMES.to_vec();
    trained.sort_unstable();
    ours.sort_unstable();
    assert_eq!(ours, trained);

    // Every source of every date is 10 to 28 characters of the vocabulary.
    let vocab = &model().vocab;
    let (mut shortest, mut longest) = (usize::MAX, 0);
    for d in dates::all_dates() {
        for f in 0..dates::NUM_FORMATS {
            let s = dates::format_date(d, f);
            let ids = vocab.encode(&s).unwrap();
            shortest = shortest.min(ids.len());
            longest = longest.max(ids.len());
            assert_eq!(vocab.decode(&ids), s);
        }
    }
    assert_eq!((shortest, longest), (10, 28));
    assert_eq!(
        dates::format_date(Date::new(2025, 9, 24).unwrap(), 4).len(),
        28
    );
}

#[test]
fn vocab_rejects_unknown_characters_by_name() {
    let vocab = &model().vocab;
    assert_eq!(vocab.len(), 59);
    assert_eq!(
        vocab.encode(" ,-./09AYay").unwrap(),
        [3, 4, 5, 6, 7, 8, 17, 18, 37, 38, 58]
    );
    let err = vocab.encode("27 Novémber").unwrap_err();
    assert_eq!((err.ch, err.position), ('é', 6));
    assert!(
        err.to_string().contains("'é' (U+00E9) at position 6"),
        "{err}"
    );
    let err = model().encode_source("tomorrow").unwrap_err().to_string();
    assert!(err.contains("'w'"), "{err}");
    let err = model()
        .encode_source(&"1".repeat(40))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 32"), "{err}");
    assert_eq!(vocab.decode(&[1, 10, 8, 2, 9]), "20");
}

#[test]
fn rust_task_code_reproduces_the_reference_inputs() {
    let r = Reference::load();
    let m = model();
    let sources = r.strings("sources");
    let targets = r.strings("targets");
    let when: Vec<[u32; 3]> = serde_json::from_value(r.meta("dates")).unwrap();
    let formats: Vec<usize> = serde_json::from_value(r.meta("formats")).unwrap();
    assert_eq!(sources.len(), 6);
    for i in 0..sources.len() {
        let [y, mo, d] = when[i];
        let date = Date::new(y, mo, d).unwrap();
        assert_eq!(dates::format_date(date, formats[i]), sources[i], "row {i}");
        assert_eq!(date.iso(), targets[i], "row {i}");
        // The spec: the first three rows are held out.
        assert_eq!(date.is_held_out(), i < 3, "row {i}");
    }
    // Encoding and right padding give the stored ids and mask.
    let batch = m.batch(&sources).unwrap();
    assert_eq!(batch.ids, r.ids("src_ids"));
    assert_eq!(batch.padding, r.padding("src_key_padding_mask"));
    let tgt = r.ids("tgt_ids");
    for (i, target) in targets.iter().enumerate() {
        let mut expected = vec![m.vocab.bos_id()];
        expected.extend(m.vocab.encode(target).unwrap());
        assert_eq!(tgt.row(i).to_vec(), expected, "row {i}");
    }
}

/// Max |a − b| over the positions where `keep(row, position)`.
fn max_err(a: &Array3<f32>, b: &Array3<f32>, keep: impl Fn(usize, usize) -> bool) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let mut err = 0.0f32;
    for ((i, j, _), (x, y)) in a.indexed_iter().map(|(ix, x)| (ix, (x, &b[ix]))) {
        if keep(i, j) {
            err = err.max((x - y).abs());
        }
    }
    err
}

#[test]
fn logits_match_pytorch() {
    let r = Reference::load();
    let m = &model().model;
    let src = r.ids("src_ids");
    let src_pad = r.padding("src_key_padding_mask");

    // The reference is PyTorch in float64 rounded to float32; PyTorch's own float32 forward
    // is within 2.4e-6 of it (logits) and 2.4e-6 / 1.2e-5 at real / padded query positions
    // (prefix_logits). A correct float32 forward is held to the same bounds with headroom:
    // 1e-5 at real positions, 2e-5 at padded query positions (computed but never used).
    let logits = m
        .forward(
            src.view(),
            r.ids("tgt_ids").view(),
            Some(&src_pad),
            Some(&r.padding("tgt_key_padding_mask")),
        )
        .unwrap();
    let err = max_err(&logits, &r.logits("logits"), |_, _| true);
    println!("logits: max abs err {err:.2e} (PyTorch f32: 2.4e-6)");
    assert!(err <= 1e-5, "logits: max abs err {err:e}");

    let prefix_pad = r.padding("prefix_tgt_key_padding_mask");
    let prefix_logits = m
        .forward(
            src.view(),
            r.ids("prefix_tgt_ids").view(),
            Some(&src_pad),
            Some(&prefix_pad),
        )
        .unwrap();
    let expected = r.logits("prefix_logits");
    let is_pad = prefix_pad.is_padding();
    let real = max_err(&prefix_logits, &expected, |i, j| !is_pad[[i, j]]);
    let padded = max_err(&prefix_logits, &expected, |i, j| is_pad[[i, j]]);
    println!(
        "prefix_logits: max abs err {real:.2e} at real positions, {padded:.2e} at padded query \
         positions (PyTorch f32: 2.4e-6, 1.2e-5)"
    );
    assert!(real <= 1e-5, "prefix_logits, real positions: {real:e}");
    assert!(
        padded <= 2e-5,
        "prefix_logits, padded positions: {padded:e}"
    );
    // A row's real positions do not depend on its padding: they equal the full-target logits.
    let lengths = prefix_pad.lengths();
    for (i, &len) in lengths.iter().enumerate() {
        let a = prefix_logits.slice(s![i, ..len, ..]);
        let b = logits.slice(s![i, ..len, ..]);
        let d = (&a - &b).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v));
        assert!(d <= 1e-5, "row {i}: prefix vs full target differ by {d:e}");
    }
}

#[test]
fn greedy_and_beam_search_match_the_reference_decodes() {
    let r = Reference::load();
    let m = model();
    let sources = r.strings("sources");
    let expected_ids = r.ids("greedy_ids");
    let got = m.greedy_ids(&sources).unwrap();
    for (i, ids) in got.iter().enumerate() {
        // Stored as BOS, the tokens, EOS, then 0-padding to width 12.
        let mut row = vec![m.vocab.bos_id()];
        row.extend(ids);
        row.resize(expected_ids.ncols(), m.vocab.pad_id());
        assert_eq!(
            row,
            expected_ids.row(i).to_vec(),
            "row {i} ({:?})",
            sources[i]
        );
    }
    let strings: Vec<String> = got.iter().map(|ids| m.vocab.decode(ids)).collect();
    assert_eq!(strings, r.strings("greedy_decoded"));
    assert_eq!(strings, r.strings("targets"));

    let beams = m.beam(&sources, 4).unwrap();
    for (i, hyps) in beams.iter().enumerate() {
        assert_eq!(hyps.len(), 4);
        assert!(
            hyps[0].finished && hyps[0].tokens == got[i],
            "row {i}: {hyps:?}"
        );
        assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score));
    }
}

#[test]
fn held_out_exact_match_is_at_least_99_percent() {
    let m = model();
    let examples = dates::held_out_sample(500, 2017);
    assert!(examples.iter().all(|e| e.date.is_held_out()));
    assert_eq!(
        examples,
        dates::held_out_sample(500, 2017),
        "same seed, same sample"
    );
    let start = Instant::now();
    let mut eval = dates::Evaluation::default();
    for chunk in examples.chunks(250) {
        let sources: Vec<&str> = chunk.iter().map(|e| e.source.as_str()).collect();
        eval.record(chunk, &m.translate(&sources).unwrap());
    }
    println!(
        "held-out exact match: {}/{} = {:.2} % in {:.2?}; per format {:?}; misses {:?}",
        eval.correct,
        eval.total,
        100.0 * eval.accuracy(),
        start.elapsed(),
        eval.per_format,
        eval.failures
    );
    assert!(eval.per_format.iter().all(|&(total, _)| total > 0));
    assert!(eval.accuracy() >= 0.99, "{:?}", eval.failures);
}

/// Width and height of a PNG, after decoding every pixel.
fn decode_png(path: &Path) -> (u32, u32, usize) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let pixels = &buf[..info.buffer_size()];
    let step = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = pixels.chunks_exact(step).collect();
    (info.width, info.height, colours.len())
}

#[test]
fn attention_maps_render_to_png() {
    let m = model();
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "ndtransformer-attention-maps-{}-{unique}",
        std::process::id()
    ));
    let source = "27th of November, 2026";
    let maps = plot::render_attention_maps(m, source, &dir).unwrap();
    assert_eq!(
        (maps.source.as_str(), maps.output.as_str()),
        (source, "2026-11-27")
    );
    let pe =
        plot::render_positional_encoding(64, 64, 32, &dir.join("positional_encoding.png")).unwrap();

    let c = &m.config;
    assert_eq!(
        maps.figures.len(),
        c.num_encoder_layers + 2 * c.num_decoder_layers
    );
    let (src_len, out_len) = (source.len() as u32, 11);
    for figure in maps.figures.iter().chain([&pe]) {
        let (w, h, colours) = decode_png(&figure.path);
        assert_eq!(
            (w, h),
            (figure.width, figure.height),
            "{}",
            figure.path.display()
        );
        assert!(colours > 20, "{}: {colours} colours", figure.path.display());
        let name = figure.path.file_name().unwrap().to_string_lossy();
        // Attention: a 2 × 2 grid of heads at 24 px per weight; the positional encoding: one
        // 64 × 64 panel at 9 px per value. Labels, titles and the colour bar add a margin.
        let (grid, rows, cols, cell) = if name.starts_with("encoder") {
            (2, src_len, src_len, 24)
        } else if name.starts_with("decoder_self") {
            (2, out_len, out_len, 24)
        } else if name.starts_with("decoder_cross") {
            (2, out_len, src_len, 24)
        } else {
            assert_eq!(name, "positional_encoding.png");
            (1, 64, 64, 9)
        };
        let (grid_w, grid_h) = (grid * cols * cell, grid * rows * cell);
        assert!(w > grid_w && w < grid_w + 500, "{name}: width {w}");
        assert!(h > grid_h && h < grid_h + 300, "{name}: height {h}");
        println!("{name}: {w}×{h}, {colours} colours");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
