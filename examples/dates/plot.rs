//! PNG heatmaps of the dates model: encoder self-attention, decoder self- and cross-attention
//! per layer and head, and the sinusoidal positional-encoding table.
//!
//! Shared by `examples/attention_maps.rs` and `tests/trained_model.rs`, each of which includes
//! it next to the dates module (`mod dates;` plus `#[path = ".../dates/plot.rs"] mod plot;`).
//! Text is drawn with DejaVu Sans embedded in the binary, so no system font is needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use ndarray::{s, Array2, ArrayView2, Axis};
use ndtransformer::PositionalEncoding;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use crate::dates::{BoxError, DatesModel};

/// The font family every text uses.
const FONT: &str = "sans-serif";

/// Registers the embedded DejaVu Sans as `sans-serif` (once per process).
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let regular =
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let bold = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
        assert!(
            regular.is_ok() && bold.is_ok(),
            "the embedded DejaVu Sans font did not parse"
        );
    });
}

/// How values map to colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorScale {
    /// Viridis from `min` (dark purple) to `max` (yellow): attention weights.
    Sequential {
        /// Value of the darkest colour.
        min: f32,
        /// Value of the brightest colour.
        max: f32,
    },
    /// Blue (−limit), white (0), red (+limit): signed values.
    Diverging {
        /// Magnitude of the saturated colours.
        limit: f32,
    },
}

const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (72, 36, 117),
    (59, 82, 139),
    (44, 114, 142),
    (33, 145, 140),
    (39, 173, 129),
    (94, 201, 98),
    (170, 220, 50),
    (253, 231, 37),
];

const RED_BLUE: [(u8, u8, u8); 5] = [
    (33, 102, 172),
    (146, 197, 222),
    (247, 247, 247),
    (244, 165, 130),
    (178, 24, 43),
];

fn interpolate(stops: &[(u8, u8, u8)], t: f32) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let mix = |a: u8, b: u8| (a as f32 + (b as f32 - a as f32) * f).round() as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

impl ColorScale {
    /// The colour of `v`; values outside the range get the end colours.
    pub fn color(&self, v: f32) -> RGBColor {
        match *self {
            ColorScale::Sequential { min, max } => interpolate(&VIRIDIS, (v - min) / (max - min)),
            ColorScale::Diverging { limit } => interpolate(&RED_BLUE, (v / limit + 1.0) / 2.0),
        }
    }

    /// `(low, high)` ends of the scale.
    pub fn range(&self) -> (f32, f32) {
        match *self {
            ColorScale::Sequential { min, max } => (min, max),
            ColorScale::Diverging { limit } => (-limit, limit),
        }
    }
}

/// One heatmap with its labels.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    /// Shown above the heatmap, e.g. `layer 1 cross-attention, head 2`.
    pub title: String,
    /// `[rows, cols]`, row 0 at the top.
    pub values: ArrayView2<'a, f32>,
    /// Rows to label (index, text), e.g. every character, or every 8th position.
    pub row_ticks: Vec<(usize, String)>,
    /// Columns to label.
    pub col_ticks: Vec<(usize, String)>,
    /// What the columns are, written under the axis.
    pub x_desc: String,
    /// What the rows are, written along the left edge.
    pub y_desc: String,
    /// A horizontal marker line above this row, with a label.
    pub row_marker: Option<(usize, String)>,
}

/// How to lay out a figure of panels.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The figure's title.
    pub title: String,
    /// Panels per row of the grid.
    pub grid_cols: usize,
    /// Side of one heatmap cell in pixels.
    pub cell: u32,
    /// A background-coloured gap between cells, in pixels (0 for a continuous image).
    pub gap: u32,
    /// The colour scale (one, shared by every panel, shown as a colour bar).
    pub scale: ColorScale,
    /// The colour bar's caption.
    pub scale_label: String,
}

/// A PNG that was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    /// Where it is.
    pub path: PathBuf,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The figure's title.
    pub title: String,
}

const TITLE_H: u32 = 48;
const PANEL_TITLE_H: u32 = 30;
const DESC: u32 = 24;
const TICK_H: u32 = 22;
const RIGHT: u32 = 16;
const COLORBAR_W: u32 = 110;
const TICK_FONT: u32 = 15;

const TITLE_FONT: u32 = 22;
const PANEL_TITLE_FONT: u32 = 17;

/// Width in pixels of `text` in the embedded font.
fn text_width(text: &str, size: u32, style: FontStyle) -> u32 {
    register_fonts();
    (FONT, size, style)
        .into_font()
        .box_size(text)
        .map_or(text.chars().count() as u32 * size, |(w, _)| w)
}

fn tick_width(panel: &Panel) -> u32 {
    let widest = panel
        .row_ticks
        .iter()
        .map(|(_, t)| text_width(t, TICK_FONT, FontStyle::Normal))
        .max()
        .unwrap_or(0);
    12 + widest
}

/// The pixel size of one panel: `(width, height)`. The panel is at least as wide as its title.
fn panel_size(panel: &Panel, cell: u32) -> (u32, u32) {
    let (rows, cols) = panel.values.dim();
    let title = text_width(&panel.title, PANEL_TITLE_FONT, FontStyle::Normal) + 24;
    (
        (DESC + tick_width(panel) + cols as u32 * cell + RIGHT).max(title),
        PANEL_TITLE_H + rows as u32 * cell + TICK_H + DESC,
    )
}

/// The pixel size of the figure [`render`] draws for these panels: `(width, height)`.
///
/// # Panics
/// If the panels do not all have the same shape, or there are none.
pub fn figure_size(panels: &[Panel], layout: &Layout) -> (u32, u32) {
    assert!(!panels.is_empty(), "a figure needs at least one panel");
    let (pw, ph) = grid_cell_size(panels, layout);
    let cols = layout.grid_cols.clamp(1, panels.len()) as u32;
    let rows = panels.len().div_ceil(cols as usize) as u32;
    let title = text_width(&layout.title, TITLE_FONT, FontStyle::Bold) + 32;
    ((cols * pw + COLORBAR_W).max(title), TITLE_H + rows * ph + 8)
}

/// The size of the largest panel, which every panel of the grid gets.
fn grid_cell_size(panels: &[Panel], layout: &Layout) -> (u32, u32) {
    assert!(
        panels
            .iter()
            .all(|p| p.values.dim() == panels[0].values.dim()),
        "every panel of a figure has the same shape"
    );
    panels
        .iter()
        .map(|p| panel_size(p, layout.cell))
        .fold((0, 0), |(w, h), (pw, ph)| (w.max(pw), h.max(ph)))
}

/// Draws `panels` in a grid with a title and a colour bar into the PNG `path`.
pub fn render(path: &Path, layout: &Layout, panels: &[Panel]) -> Result<Figure, BoxError> {
    register_fonts();
    let (width, height) = figure_size(panels, layout);
    {
        let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        root.draw(&Text::new(
            layout.title.clone(),
            (width as i32 / 2, TITLE_H as i32 / 2),
            (FONT, TITLE_FONT, FontStyle::Bold)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        let (pw, ph) = grid_cell_size(panels, layout);
        let cols = layout.grid_cols.clamp(1, panels.len());
        // Centre the grid (and its colour bar) when the title is the widest thing.
        let x_offset = (width - (cols as u32 * pw + COLORBAR_W)) / 2;
        for (i, panel) in panels.iter().enumerate() {
            let x = x_offset + (i % cols) as u32 * pw;
            let y = TITLE_H + (i / cols) as u32 * ph;
            draw_panel(&root, (x as i32, y as i32), panel, layout)?;
        }
        // The colour bar spans the first row of heatmaps (at most 420 px).
        let rows = panels[0].values.nrows() as u32;
        let top = (TITLE_H + PANEL_TITLE_H) as i32;
        let bar_h = (rows * layout.cell).clamp(160, 420) as i32;
        let left = (x_offset + cols as u32 * pw + 24) as i32;
        draw_colorbar(&root, (left, top), bar_h, layout)?;
        root.present()?;
    }
    Ok(Figure {
        path: path.to_path_buf(),
        width,
        height,
        title: layout.title.clone(),
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    root: &Area,
    (x0, y0): (i32, i32),
    panel: &Panel,
    layout: &Layout,
) -> Result<(), BoxError> {
    let (rows, cols) = panel.values.dim();
    let cell = layout.cell as i32;
    let (pw, _) = panel_size(panel, layout.cell);
    let left = x0 + (DESC + tick_width(panel)) as i32;
    let top = y0 + PANEL_TITLE_H as i32;
    let grid_w = cols as i32 * cell;
    let grid_h = rows as i32 * cell;
    let gap = layout.gap as i32;

    root.draw(&Text::new(
        panel.title.clone(),
        (left + grid_w / 2, y0 + PANEL_TITLE_H as i32 / 2),
        (FONT, PANEL_TITLE_FONT)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    for ((r, c), &v) in panel.values.indexed_iter() {
        let (cx, cy) = (left + c as i32 * cell, top + r as i32 * cell);
        root.draw(&Rectangle::new(
            [(cx, cy), (cx + cell - gap, cy + cell - gap)],
            layout.scale.color(v).filled(),
        ))?;
    }
    if gap == 0 {
        root.draw(&Rectangle::new(
            [(left - 1, top - 1), (left + grid_w, top + grid_h)],
            BLACK.stroke_width(1),
        ))?;
    }
    let tick = (FONT, TICK_FONT).into_font().color(&BLACK);
    for (r, label) in &panel.row_ticks {
        root.draw(&Text::new(
            label.clone(),
            (left - 6, top + *r as i32 * cell + cell / 2),
            tick.pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    // The room of a column label: the distance to the next labelled column.
    let spacing = panel
        .col_ticks
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0))
        .min()
        .unwrap_or(1)
        .max(1) as u32;
    for (c, label) in &panel.col_ticks {
        // A label wider than its room (`BOS` under one character) gets a smaller font.
        let mut size = TICK_FONT;
        while size > 9 && text_width(label, size, FontStyle::Normal) + 2 > spacing * cell as u32 {
            size -= 1;
        }
        root.draw(&Text::new(
            label.clone(),
            (left + *c as i32 * cell + cell / 2, top + grid_h + 4),
            (FONT, size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    if let Some((r, label)) = &panel.row_marker {
        let y = top + *r as i32 * cell;
        root.draw(&PathElement::new(
            vec![(left - 2, y), (left + grid_w + 2, y)],
            BLACK.stroke_width(2),
        ))?;
        let w = text_width(label, 14, FontStyle::Normal) as i32;
        let (x1, y1) = (left + grid_w - 6, y - 4);
        root.draw(&Rectangle::new(
            [(x1 - w - 6, y1 - 18), (x1 + 4, y1)],
            WHITE.filled(),
        ))?;
        root.draw(&Text::new(
            label.clone(),
            (x1, y1 - 9),
            (FONT, 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    let desc = (FONT, 15).into_font().color(&RGBColor(60, 60, 60));
    root.draw(&Text::new(
        panel.x_desc.clone(),
        (
            left + grid_w / 2,
            top + grid_h + TICK_H as i32 + DESC as i32 / 2,
        ),
        desc.pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    root.draw(&Text::new(
        panel.y_desc.clone(),
        (x0 + DESC as i32 / 2, top + grid_h / 2),
        desc.transform(FontTransform::Rotate270)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    debug_assert!(left + grid_w <= x0 + pw as i32);
    Ok(())
}

fn draw_colorbar(
    root: &Area,
    (left, top): (i32, i32),
    height: i32,
    layout: &Layout,
) -> Result<(), BoxError> {
    let (lo, hi) = layout.scale.range();
    let w = 22;
    for y in 0..height {
        let v = hi - (hi - lo) * y as f32 / (height - 1) as f32;
        root.draw(&Rectangle::new(
            [(left, top + y), (left + w, top + y + 1)],
            layout.scale.color(v).filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(left, top), (left + w, top + height)],
        BLACK.stroke_width(1),
    ))?;
    let tick = (FONT, 14).into_font().color(&BLACK);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f32 / 4.0;
        let y = top + height - 1 - (height - 1) * k / 4;
        root.draw(&PathElement::new(
            vec![(left + w, y), (left + w + 5, y)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            trim_number(v),
            (left + w + 8, y),
            tick.pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    root.draw(&Text::new(
        layout.scale_label.clone(),
        (left + w / 2, top - 10),
        (FONT, 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom)),
    ))?;
    Ok(())
}

fn trim_number(v: f32) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// How a token is shown on an axis: the space as `␣`, `<bos>` as `BOS` and so on.
pub fn axis_label(token: &str) -> String {
    match token {
        " " => "␣".into(),
        "<bos>" => "BOS".into(),
        "<eos>" => "EOS".into(),
        "<pad>" => "PAD".into(),
        _ => token.into(),
    }
}

/// What [`render_attention_maps`] wrote.
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    /// The input.
    pub source: String,
    /// The greedy output, e.g. `2026-11-27`.
    pub output: String,
    /// Every PNG, encoder layers first, then decoder self- and cross-attention per layer.
    pub figures: Vec<Figure>,
}

/// Greedy-decodes `source`, runs `forward_traced` on (source, `<bos>` + output) and writes one
/// PNG per attention kind and layer with a panel per head into `out_dir`:
/// `encoder_self_attention_layer{l}.png`, `decoder_self_attention_layer{l}.png` and
/// `decoder_cross_attention_layer{l}.png` (layers counted from 1).
pub fn render_attention_maps(
    m: &DatesModel,
    source: &str,
    out_dir: &Path,
) -> Result<AttentionMaps, BoxError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let batch = m.batch(&[source])?;
    let generated =
        m.model
            .greedy_decode(batch.ids.view(), Some(&batch.padding), &m.greedy_options())?;
    let generated = &generated[0];
    let output = m.vocab.decode(generated);
    // Decoder input: <bos> and every generated token but the last; row i of a decoder map
    // is the step that wrote generated[i].
    let mut tgt = vec![m.vocab.bos_id()];
    tgt.extend_from_slice(&generated[..generated.len() - 1]);
    let tgt = Array2::from_shape_vec((1, tgt.len()), tgt)?;
    let trace = m
        .model
        .forward_traced(batch.ids.view(), tgt.view(), Some(&batch.padding), None)?;

    let label = |id: u32| axis_label(m.vocab.token(id).unwrap_or("?"));
    let ticks = |ids: &[u32]| -> Vec<(usize, String)> {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| (i, label(id)))
            .collect()
    };
    let src_ticks = ticks(batch.ids.row(0).as_slice().expect("standard layout"));
    let out_ticks = ticks(generated);
    let in_ticks = ticks(tgt.row(0).as_slice().expect("standard layout"));
    let attention_layout = |title: String| Layout {
        title,
        grid_cols: 2,
        cell: 24,
        gap: 1,
        scale: ColorScale::Sequential { min: 0.0, max: 1.0 },
        scale_label: "weight".into(),
    };

    let mut figures = Vec::new();
    let kinds = [
        (
            "encoder_self_attention",
            "self-attention",
            &trace.encoder.self_attention,
        ),
        (
            "decoder_self_attention",
            "masked self-attention",
            &trace.decoder.self_attention,
        ),
        (
            "decoder_cross_attention",
            "cross-attention",
            &trace.decoder.cross_attention,
        ),
    ];
    for (file, what, layers) in kinds {
        let (rows, cols, x_desc, y_desc) = match file {
            "encoder_self_attention" => (&src_ticks, &src_ticks, "source (key)", "source (query)"),
            "decoder_self_attention" => (
                &out_ticks,
                &in_ticks,
                "decoder input (key)",
                "character being written",
            ),
            _ => (
                &out_ticks,
                &src_ticks,
                "source (key)",
                "character being written",
            ),
        };
        for (l, weights) in layers.iter().enumerate() {
            // [batch, heads, queries, keys] → one panel per head.
            let weights = weights.index_axis(Axis(0), 0);
            let panels: Vec<Panel> = weights
                .axis_iter(Axis(0))
                .enumerate()
                .map(|(h, w)| Panel {
                    title: format!("layer {} {what}, head {}", l + 1, h + 1),
                    values: w,
                    row_ticks: rows.clone(),
                    col_ticks: cols.clone(),
                    x_desc: x_desc.into(),
                    y_desc: y_desc.into(),
                    row_marker: None,
                })
                .collect();
            let stack = if file == "encoder_self_attention" {
                "encoder"
            } else {
                "decoder"
            };
            let title = format!("{stack} layer {} {what}: \"{source}\" → {output}", l + 1);
            let path = out_dir.join(format!("{file}_layer{}.png", l + 1));
            figures.push(render(&path, &attention_layout(title), &panels)?);
        }
    }
    Ok(AttentionMaps {
        source: source.to_string(),
        output,
        figures,
    })
}

/// The sinusoidal table of §3.5 for `positions` × `d_model` as a heatmap, with a line at
/// `used` (the positions the model's table covers).
pub fn render_positional_encoding(
    positions: usize,
    d_model: usize,
    used: usize,
    path: &Path,
) -> Result<Figure, BoxError> {
    let pe = PositionalEncoding::new(positions, d_model);
    let table = pe.table(positions)?;
    let every = |n: usize| -> Vec<(usize, String)> {
        (0..n).step_by(8).map(|i| (i, i.to_string())).collect()
    };
    let values = table.slice(s![.., ..]);
    let panel = Panel {
        title: format!("PE[pos, 2i] = sin(pos / 10000^(2i/{d_model})), PE[pos, 2i+1] = cos(…)"),
        values,
        row_ticks: every(positions),
        col_ticks: every(d_model),
        x_desc: "dimension".into(),
        y_desc: "position".into(),
        row_marker: (used < positions).then(|| (used, format!("max_len {used}"))),
    };
    let layout = Layout {
        title: format!("Sinusoidal positional encoding, {positions} positions × d_model {d_model}"),
        grid_cols: 1,
        cell: 9,
        gap: 0,
        scale: ColorScale::Diverging { limit: 1.0 },
        scale_label: "value".into(),
    };
    render(path, &layout, &[panel])
}
