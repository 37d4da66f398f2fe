//! Loading and saving weights as safetensors, under PyTorch's `nn.Transformer` state-dict names.
//!
//! The names are those of this PyTorch module's `state_dict()`:
//!
//! ```text
//! class Seq2Seq(nn.Module):
//!     src_embed   = nn.Embedding(src_vocab, d_model)
//!     tgt_embed   = nn.Embedding(tgt_vocab, d_model)
//!     transformer = nn.Transformer(d_model, nhead, ..., batch_first=True)
//!     generator   = nn.Linear(d_model, tgt_vocab)
//! ```
//!
//! so `transformer.encoder.layers.0.self_attn.in_proj_weight` is the Q, K and V projections
//! stacked as `[3·d_model, d_model]` (split on load, stacked again on save), `norm1`/`norm2`/
//! `norm3` are the self-attention, cross-attention and feed-forward norms, and
//! `transformer.encoder.norm` / `transformer.decoder.norm` the final stack norms.
//!
//! A config that departs from the paper's embedding recipe ([`EmbeddingConfig`](crate::EmbeddingConfig))
//! adds `pos_embed.weight` (learned positions, `[max_len, d_model]`), `type_embed.weight`
//! (`[type_vocab, d_model]`) and `embed_norm.{weight,bias}`; one set serves source and target.
//! Without `final_norm` the two stack norms are absent. BERT checkpoints in Hugging Face's
//! names load into an [`EncoderModel`](crate::EncoderModel) through [`crate::bert`].

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use half::{bf16, f16};
use ndarray::{
    concatenate, s, Array1, Array2, ArrayD, ArrayView2, ArrayViewD, Axis, CowArray, IxDyn,
    ShapeBuilder, Zip,
};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};

use crate::attention::MultiHeadAttention;
use crate::config::{Positions, TransformerConfig};
use crate::decoder::{Decoder, DecoderLayer};
use crate::embedding::Embedding;
use crate::encoder::{Encoder, EncoderLayer};
use crate::error::{Error, Result};
use crate::feed_forward::FeedForward;
use crate::input_embedding::InputEmbedding;
use crate::layer_norm::LayerNorm;
use crate::linear::Linear;
use crate::positional::PositionalEncoding;
use crate::transformer::Transformer;

/// How to read a weights file.
///
/// ```
/// use ndtransformer::LoadOptions;
/// let options = LoadOptions { check_finite: true, ..LoadOptions::with_prefix("model.") };
/// assert!(options.strict && options.convert_half);
/// ```
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Prepended to every tensor name, e.g. `"weights."` for the crate's parity fixtures or
    /// `"model."` for a module nested one level down. Tensors without it are ignored.
    pub prefix: String,
    /// Whether a tensor under `prefix` that the model does not use is an error (PyTorch's
    /// `load_state_dict(strict=True)`). Default `true`. When `false` the unused names are
    /// listed in the [`LoadReport`] of [`Transformer::from_safetensors_with_report`].
    pub strict: bool,
    /// Whether `F16` and `BF16` tensors are widened to f32 on load, as PyTorch's
    /// `load_state_dict` and Candle's `VarBuilder` do. Every half-precision value (subnormals,
    /// infinities and NaN included) is exactly representable in f32, so the model computes with
    /// exactly the stored weights. Default `true`; with `false` they are an
    /// [`Error::TensorDtype`]. Other dtypes (`F64`, integers, …) are always an error: narrowing
    /// them would round silently.
    pub convert_half: bool,
    /// Whether every loaded value is checked to be finite: the first NaN or infinity is an
    /// [`Error::NonFinite`] naming the tensor, the index and the value. Default `false` (the
    /// check is one extra pass over the weights); [`Transformer::check_finite`] runs it on a
    /// model already built.
    pub check_finite: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            prefix: String::new(),
            strict: true,
            convert_half: true,
            check_finite: false,
        }
    }
}

impl LoadOptions {
    /// Options with a name prefix, otherwise the defaults (strict, half precision converted,
    /// no finite check).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        LoadOptions {
            prefix: prefix.into(),
            ..Self::default()
        }
    }
}

/// What loading found besides the weights it used, like the `_IncompatibleKeys` that PyTorch's
/// `load_state_dict(strict=False)` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadReport {
    /// Tensors under the prefix that the model does not use, sorted. Always empty after a
    /// strict load (they are an [`Error::UnexpectedTensors`] then).
    pub unexpected: Vec<String>,
    /// Tensors stored as `F16` or `BF16` and widened to f32, in the order they were read.
    pub converted: Vec<String>,
}

/// Named f32 tensors read from a safetensors buffer, tracking which were used.
pub(crate) struct Reader<'a> {
    file: SafeTensors<'a>,
    prefix: String,
    convert_half: bool,
    check_finite: bool,
    used: BTreeSet<String>,
    converted: Vec<String>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], options: &LoadOptions) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Safetensors(describe_safetensors_error(&e, bytes)))?;
        Ok(Reader {
            file,
            prefix: options.prefix.clone(),
            convert_half: options.convert_half,
            check_finite: options.check_finite,
            used: BTreeSet::new(),
            converted: Vec::new(),
        })
    }

    /// The tensor `name` (without prefix), which must have `shape` and dtype F32 (or F16/BF16
    /// when converting).
    pub(crate) fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .file
            .tensor(&full)
            .map_err(|_| Error::MissingTensor { name: full.clone() })?;
        let dtype = view.dtype();
        let (width, decode): (usize, fn(&[u8]) -> f32) = match dtype {
            Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 if self.convert_half => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 if self.convert_half => (2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => {
                return Err(Error::TensorDtype {
                    name: full,
                    expected: if self.convert_half {
                        "F32, F16 or BF16"
                    } else {
                        "F32 (F16 and BF16 need LoadOptions::convert_half)"
                    },
                    found: format!("{dtype:?}"),
                })
            }
        };
        if view.shape() != shape {
            return Err(Error::TensorShape {
                name: full,
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let values: Vec<f32> = view.data().chunks_exact(width).map(decode).collect();
        // safetensors has checked that the bytes are exactly the shape's element count.
        let tensor = ArrayD::from_shape_vec(IxDyn(shape), values)
            .map_err(|e| Error::Safetensors(format!("tensor `{full}`: {e}")))?;
        if self.check_finite {
            first_non_finite(&full, tensor.view())?;
        }
        if dtype != Dtype::F32 {
            self.converted.push(full.clone());
        }
        self.used.insert(full);
        Ok(tensor)
    }

    pub(crate) fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>> {
        let t = self.tensor(name, &[rows, cols])?;
        // The shape was checked to be [rows, cols], so the conversion cannot fail.
        t.into_dimensionality()
            .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
    }

    pub(crate) fn vector(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let t = self.tensor(name, &[len])?;
        t.into_dimensionality()
            .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.file.tensor(&format!("{}{name}", self.prefix)).is_ok()
    }

    /// Names under the prefix that were not read.
    pub(crate) fn unused(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .file
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix) && !self.used.contains(*n))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    pub(crate) fn linear(
        &mut self,
        name: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<Linear> {
        let weight = self.matrix(&format!("{name}.weight"), out_features, in_features)?;
        let bias = self.vector(&format!("{name}.bias"), out_features)?;
        Ok(Linear::from_parts(weight, Some(bias)))
    }

    pub(crate) fn layer_norm(&mut self, name: &str, d_model: usize, eps: f32) -> Result<LayerNorm> {
        let gamma = self.vector(&format!("{name}.weight"), d_model)?;
        let beta = self.vector(&format!("{name}.bias"), d_model)?;
        LayerNorm::new(gamma, beta, eps)
    }

    /// `nn.MultiheadAttention`: the stacked `in_proj_*` split into Q, K, V.
    fn attention(
        &mut self,
        name: &str,
        d_model: usize,
        num_heads: usize,
    ) -> Result<MultiHeadAttention> {
        let d = d_model;
        let w = self.matrix(&child(name, "in_proj_weight"), 3 * d, d)?;
        let b = self.vector(&child(name, "in_proj_bias"), 3 * d)?;
        let part = |i: usize| {
            Linear::from_parts(
                w.slice(s![i * d..(i + 1) * d, ..]).to_owned(),
                Some(b.slice(s![i * d..(i + 1) * d]).to_owned()),
            )
        };
        let out_proj = self.linear(&child(name, "out_proj"), d, d)?;
        MultiHeadAttention::new(part(0), part(1), part(2), out_proj, num_heads)
    }

    fn feed_forward(&mut self, name: &str, config: &TransformerConfig) -> Result<FeedForward> {
        let linear1 = self.linear(&format!("{name}.linear1"), config.d_ff, config.d_model)?;
        let linear2 = self.linear(&format!("{name}.linear2"), config.d_model, config.d_ff)?;
        FeedForward::new(linear1, linear2, config.activation)
    }

    /// A stack's final norm when `config.final_norm` asks for one.
    pub(crate) fn final_norm(
        &mut self,
        config: &TransformerConfig,
        name: &str,
    ) -> Result<Option<LayerNorm>> {
        config
            .final_norm
            .then(|| self.layer_norm(name, config.d_model, config.layer_norm_eps))
            .transpose()
    }

    /// The parts of [`InputEmbedding`] that `config.embedding` asks for, under the given names
    /// (`{positions}.weight`, `{types}.weight`, `{norm}.weight`/`.bias`).
    pub(crate) fn input_embedding(
        &mut self,
        config: &TransformerConfig,
        positions: &str,
        types: &str,
        norm: &str,
    ) -> Result<InputEmbedding> {
        let (e, d) = (&config.embedding, config.d_model);
        let positions = match e.positions {
            Positions::Sinusoidal => PositionalEncoding::new(config.max_len, d),
            Positions::Learned => PositionalEncoding::learned(self.matrix(
                &format!("{positions}.weight"),
                config.max_len,
                d,
            )?)?,
        };
        let token_types = if e.type_vocab > 0 {
            Some(Embedding::new(self.matrix(
                &format!("{types}.weight"),
                e.type_vocab,
                d,
            )?)?)
        } else {
            None
        };
        let norm = if e.norm {
            Some(self.layer_norm(norm, d, config.layer_norm_eps)?)
        } else {
            None
        };
        InputEmbedding::new(positions, token_types, norm, e.scale)
    }

    /// A tensor that must equal one already loaded (a shared or tied matrix saved twice).
    fn alias(&mut self, name: &str, of: &str, expected: &Array2<f32>) -> Result<()> {
        if !self.has(name) {
            return Ok(());
        }
        let found = self.matrix(name, expected.nrows(), expected.ncols())?;
        // NaN equals NaN here: the question is whether the file stores the same values twice.
        let same = Zip::from(&found)
            .and(expected)
            .all(|&a, &b| a == b || (a.is_nan() && b.is_nan()));
        if !same {
            return Err(Error::Safetensors(format!(
                "`{}{name}` differs from `{}{of}`, but the config shares them",
                self.prefix, self.prefix
            )));
        }
        Ok(())
    }
}

impl MultiHeadAttention {
    /// Reads an `nn.MultiheadAttention` state dict (`{prefix}in_proj_weight`,
    /// `{prefix}in_proj_bias`, `{prefix}out_proj.weight`, `{prefix}out_proj.bias`) from
    /// safetensors bytes, splitting the stacked Q/K/V projection.
    ///
    /// # Errors
    /// [`Error::Safetensors`], [`Error::MissingTensor`], [`Error::TensorShape`],
    /// [`Error::TensorDtype`], or [`Error::Config`] if `d_model % num_heads != 0`. `F16` and
    /// `BF16` tensors are widened to f32 as with [`LoadOptions::default`].
    pub fn from_safetensors(
        bytes: &[u8],
        prefix: &str,
        d_model: usize,
        num_heads: usize,
    ) -> Result<Self> {
        crate::config::validate_heads(d_model, num_heads)?;
        Reader::new(bytes, &LoadOptions::with_prefix(prefix))?.attention("", d_model, num_heads)
    }
}

/// `{name}.{leaf}`, or just `leaf` at the top level.
fn child(name: &str, leaf: &str) -> String {
    if name.is_empty() {
        leaf.to_string()
    } else {
        format!("{name}.{leaf}")
    }
}

/// The first NaN or infinity of `tensor` (in row-major order) as an [`Error::NonFinite`].
pub(crate) fn first_non_finite(name: &str, tensor: ArrayViewD<f32>) -> Result<()> {
    let Some((flat, &value)) = tensor.iter().enumerate().find(|(_, v)| !v.is_finite()) else {
        return Ok(());
    };
    // Row-major unravelling of the logical position (iter() runs in logical order).
    let mut index = vec![0; tensor.ndim()];
    let mut rest = flat;
    for (i, &len) in tensor.shape().iter().enumerate().rev() {
        index[i] = rest % len;
        rest /= len;
    }
    Err(Error::NonFinite {
        name: name.to_string(),
        index,
        value,
    })
}

/// A safetensors parse error, with the numbers that tell what is wrong with the bytes.
fn describe_safetensors_error(error: &SafeTensorError, bytes: &[u8]) -> String {
    let len = bytes.len();
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    match (error, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => format!(
            "the data is {len} bytes, too short for the 8-byte header length that starts a safetensors file"
        ),
        (SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength, Some(n)) => {
            format!(
                "the header length field says {n} bytes, but the data is {len} bytes (truncated, or not safetensors)"
            )
        }
        (SafeTensorError::MetadataIncompleteBuffer, _) => format!(
            "the tensors' byte ranges do not end where the {len}-byte data ends (truncated, or trailing bytes)"
        ),
        (other, _) => format!("{other} (in {len} bytes)"),
    }
}

impl Transformer {
    /// Builds a model from safetensors bytes in PyTorch's names (see [the module docs](crate::weights)).
    ///
    /// `F16` and `BF16` tensors are widened to f32 unless `options.convert_half` is off; with
    /// `options.check_finite` a NaN or infinity is an error. To learn which tensors were
    /// ignored (non-strict) or converted, use
    /// [`from_safetensors_with_report`](Self::from_safetensors_with_report).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; [`Error::Safetensors`] for bytes that are not
    /// safetensors (empty, truncated, random) or a shared matrix saved with different values;
    /// [`Error::MissingTensor`], [`Error::TensorShape`] and [`Error::TensorDtype`] naming the
    /// tensor; with `options.strict`, [`Error::UnexpectedTensors`] listing unused names; with
    /// `options.check_finite`, [`Error::NonFinite`] naming the tensor, index and value.
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{LoadOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 8, num_heads: 2, d_ff: 16, num_encoder_layers: 1,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(10, 10) };
    /// let model = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(0))?;
    /// let bytes = model.to_safetensors()?;
    /// let back = Transformer::from_safetensors(config, &bytes, &LoadOptions::default())?;
    /// assert_eq!(model, back);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn from_safetensors(
        config: TransformerConfig,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::from_safetensors_with_report(config, bytes, options).map(|(model, _)| model)
    }

    /// As [`from_safetensors`](Self::from_safetensors), also returning what the loader found
    /// besides the weights it used: the unused tensor names (non-strict loading) and the
    /// tensors widened from half precision.
    ///
    /// # Errors
    /// As [`from_safetensors`](Self::from_safetensors).
    ///
    /// ```
    /// use rand::{rngs::StdRng, SeedableRng};
    /// use ndtransformer::{LoadOptions, Transformer, TransformerConfig};
    /// let config = TransformerConfig { d_model: 8, num_heads: 2, d_ff: 16, num_encoder_layers: 2,
    ///     num_decoder_layers: 1, ..TransformerConfig::base(10, 10) };
    /// let bytes = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(0))?.to_safetensors()?;
    /// // A one-layer encoder leaves the second layer's tensors unused.
    /// let shallower = TransformerConfig { num_encoder_layers: 1, ..config };
    /// let lenient = LoadOptions { strict: false, ..LoadOptions::default() };
    /// let (_, report) = Transformer::from_safetensors_with_report(shallower, &bytes, &lenient)?;
    /// assert!(report.unexpected.iter().all(|n| n.starts_with("transformer.encoder.layers.1.")));
    /// assert_eq!(report.unexpected.len(), 12);
    /// # Ok::<(), ndtransformer::Error>(())
    /// ```
    pub fn from_safetensors_with_report(
        config: TransformerConfig,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<(Self, LoadReport)> {
        config.validate()?;
        let c = &config;
        let (d, eps) = (c.d_model, c.layer_norm_eps);
        let mut r = Reader::new(bytes, options)?;
        let src_embed = Embedding::new(r.matrix("src_embed.weight", c.src_vocab, d)?)?;
        let tgt_embed = if c.share_embeddings {
            r.alias(
                "tgt_embed.weight",
                "src_embed.weight",
                &src_embed.weight().to_owned(),
            )?;
            None
        } else {
            Some(Embedding::new(r.matrix(
                "tgt_embed.weight",
                c.tgt_vocab,
                d,
            )?)?)
        };
        let input = r.input_embedding(c, "pos_embed", "type_embed", "embed_norm")?;
        let mut encoder_layers = Vec::with_capacity(c.num_encoder_layers);
        for i in 0..c.num_encoder_layers {
            let p = format!("transformer.encoder.layers.{i}");
            encoder_layers.push(EncoderLayer::new(
                r.attention(&format!("{p}.self_attn"), d, c.num_heads)?,
                r.feed_forward(&p, c)?,
                r.layer_norm(&format!("{p}.norm1"), d, eps)?,
                r.layer_norm(&format!("{p}.norm2"), d, eps)?,
                c.norm_position,
            )?);
        }
        let encoder = Encoder::new(encoder_layers, r.final_norm(c, "transformer.encoder.norm")?)?;
        let mut decoder_layers = Vec::with_capacity(c.num_decoder_layers);
        for i in 0..c.num_decoder_layers {
            let p = format!("transformer.decoder.layers.{i}");
            decoder_layers.push(DecoderLayer::new(
                r.attention(&format!("{p}.self_attn"), d, c.num_heads)?,
                r.attention(&format!("{p}.multihead_attn"), d, c.num_heads)?,
                r.feed_forward(&p, c)?,
                [
                    r.layer_norm(&format!("{p}.norm1"), d, eps)?,
                    r.layer_norm(&format!("{p}.norm2"), d, eps)?,
                    r.layer_norm(&format!("{p}.norm3"), d, eps)?,
                ],
                c.norm_position,
            )?);
        }
        let decoder = Decoder::new(decoder_layers, r.final_norm(c, "transformer.decoder.norm")?)?;
        let generator_weight = if c.tie_output_projection {
            let tied = tgt_embed.as_ref().unwrap_or(&src_embed).weight().to_owned();
            r.alias("generator.weight", "tgt_embed.weight", &tied)?;
            None
        } else {
            Some(r.matrix("generator.weight", c.tgt_vocab, d)?)
        };
        let generator_bias = r.vector("generator.bias", c.tgt_vocab)?;
        let unused = r.unused();
        if options.strict && !unused.is_empty() {
            return Err(Error::UnexpectedTensors { names: unused });
        }
        let model = Transformer::from_parts(
            config,
            src_embed,
            tgt_embed,
            input,
            encoder,
            decoder,
            (generator_weight, generator_bias),
        )?;
        let report = LoadReport {
            unexpected: unused,
            converted: r.converted,
        };
        Ok((model, report))
    }

    /// Reads a `.safetensors` file with [`LoadOptions::default`] (no prefix, strict).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, then as [`from_safetensors`](Self::from_safetensors).
    pub fn load(path: impl AsRef<Path>, config: TransformerConfig) -> Result<Self> {
        Self::load_with_options(path, config, &LoadOptions::default())
    }

    /// Reads a `.safetensors` file with the given options.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, then as [`from_safetensors`](Self::from_safetensors).
    pub fn load_with_options(
        path: impl AsRef<Path>,
        config: TransformerConfig,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors(config, &bytes, options)
    }

    /// The weights as safetensors bytes in PyTorch's names. A shared or tied matrix is written
    /// under each of its names, as PyTorch's `state_dict()` lists it.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, F32Tensor)> = Vec::new();
        visit_parameters(self, true, &mut |name, t| {
            tensors.push((name, F32Tensor::new(t)))
        });
        let src = self.src_embedding().weight();
        if self.config().share_embeddings {
            tensors.push((
                "tgt_embed.weight".into(),
                F32Tensor::new(src.into_dyn().into()),
            ));
        }
        if self.config().tie_output_projection {
            tensors.push((
                "generator.weight".into(),
                F32Tensor::new(self.output_weight().into_dyn()),
            ));
        }
        serialize(tensors)
    }

    /// Writes [`to_safetensors`](Self::to_safetensors) to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_safetensors()?).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Calls `f` with every distinct parameter under its PyTorch name (a shared or tied matrix
/// once, under its first name).
///
/// With `values` false the weights stored in panels come as shape-only views ([`stored_weight`]),
/// for callers that only count.
pub(crate) fn visit_parameters(
    model: &Transformer,
    values: bool,
    f: &mut dyn FnMut(String, CowArray<f32, IxDyn>),
) {
    let mut put = |name: String, t: CowArray<f32, IxDyn>| f(name, t);
    put(
        "src_embed.weight".into(),
        model.src_embed.weight().into_dyn().into(),
    );
    if let Some(t) = &model.tgt_embed {
        put("tgt_embed.weight".into(), t.weight().into_dyn().into());
    }
    let linear = |f: &mut Visitor, name: &str, l: &Linear| visit_linear(f, values, name, l);
    let norm = visit_norm;
    visit_input(
        &mut put,
        &model.input,
        model.config().embedding.positions,
        ["pos_embed", "type_embed", "embed_norm"],
    );
    let attention =
        |put: &mut dyn FnMut(String, CowArray<f32, IxDyn>), name: &str, a: &MultiHeadAttention| {
            let [q, k, v, out] = a.projections();
            let rows = q.out_features() + k.out_features() + v.out_features();
            let w = stored_weight(values, (rows, q.in_features()), || {
                let (q_w, k_w, v_w) = (q.weight(), k.weight(), v.weight());
                concatenate(Axis(0), &[q_w.view(), k_w.view(), v_w.view()]).expect("equal widths")
            });
            put(format!("{name}.in_proj_weight"), w);
            let bias = |l: &Linear| {
                l.bias()
                    .map(|b| b.to_owned())
                    .unwrap_or_else(|| Array1::zeros(l.out_features()))
            };
            let b = concatenate(Axis(0), &[bias(q).view(), bias(k).view(), bias(v).view()])
                .expect("1-D");
            put(format!("{name}.in_proj_bias"), b.into_dyn().into());
            linear(put, &format!("{name}.out_proj"), out);
        };
    for (i, layer) in model.encoder.layers.iter().enumerate() {
        let p = format!("transformer.encoder.layers.{i}");
        attention(&mut put, &format!("{p}.self_attn"), &layer.self_attn);
        linear(
            &mut put,
            &format!("{p}.linear1"),
            &layer.feed_forward.linear1,
        );
        linear(
            &mut put,
            &format!("{p}.linear2"),
            &layer.feed_forward.linear2,
        );
        norm(&mut put, &format!("{p}.norm1"), &layer.self_attn_norm);
        norm(&mut put, &format!("{p}.norm2"), &layer.ffn_norm);
    }
    if let Some(n) = &model.encoder.norm {
        norm(&mut put, "transformer.encoder.norm", n);
    }
    for (i, layer) in model.decoder.layers.iter().enumerate() {
        let p = format!("transformer.decoder.layers.{i}");
        attention(&mut put, &format!("{p}.self_attn"), &layer.self_attn);
        attention(&mut put, &format!("{p}.multihead_attn"), &layer.cross_attn);
        linear(
            &mut put,
            &format!("{p}.linear1"),
            &layer.feed_forward.linear1,
        );
        linear(
            &mut put,
            &format!("{p}.linear2"),
            &layer.feed_forward.linear2,
        );
        norm(&mut put, &format!("{p}.norm1"), &layer.self_attn_norm);
        norm(&mut put, &format!("{p}.norm2"), &layer.cross_attn_norm);
        norm(&mut put, &format!("{p}.norm3"), &layer.ffn_norm);
    }
    if let Some(n) = &model.decoder.norm {
        norm(&mut put, "transformer.decoder.norm", n);
    }
    if !model.config().tie_output_projection {
        let shape = (model.config().tgt_vocab, model.config().d_model);
        let weight = stored_weight(values, shape, || model.output_weight().into_owned());
        put("generator.weight".into(), weight);
    }
    put(
        "generator.bias".into(),
        model.generator_bias.view().into_dyn().into(),
    );
}

/// A weight stored in panels (`ops::pack_panels`) as a visit hands it over: its values from
/// `copy` (in PyTorch's layout), or with `values` false a zero-stride view of `shape` that
/// copies nothing, for visits that only count.
fn stored_weight(
    values: bool,
    shape: (usize, usize),
    copy: impl FnOnce() -> Array2<f32>,
) -> CowArray<'static, f32, IxDyn> {
    static ZERO: [f32; 1] = [0.0];
    if values {
        copy().into_dyn().into()
    } else {
        ArrayView2::from_shape(shape.strides((0, 0)), &ZERO[..])
            .expect("zero strides address the one value")
            .into_dyn()
            .into()
    }
}

/// Named tensors as safetensors bytes, with PyTorch's `format: pt` metadata.
pub(crate) fn serialize(tensors: Vec<(String, F32Tensor)>) -> Result<Vec<u8>> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::Safetensors(e.to_string()))
}

/// Receives every parameter of a model under its name in the weights file.
pub(crate) type Visitor<'a> = dyn FnMut(String, CowArray<f32, IxDyn>) + 'a;

/// `{name}.weight` and `{name}.bias` of a linear layer (the weight as [`stored_weight`] gives it).
pub(crate) fn visit_linear(f: &mut Visitor, values: bool, name: &str, l: &Linear) {
    let shape = (l.out_features(), l.in_features());
    f(
        format!("{name}.weight"),
        stored_weight(values, shape, || l.weight()),
    );
    if let Some(b) = l.bias() {
        f(format!("{name}.bias"), b.into_dyn().into());
    }
}

/// `{name}.weight` (γ) and `{name}.bias` (β) of a LayerNorm.
pub(crate) fn visit_norm(f: &mut Visitor, name: &str, n: &LayerNorm) {
    f(format!("{name}.weight"), n.gamma().into_dyn().into());
    f(format!("{name}.bias"), n.beta().into_dyn().into());
}

/// The parameters of an [`InputEmbedding`] under `[positions, types, norm]` names: the position
/// table when learned, the token-type table and the norm when present.
pub(crate) fn visit_input(
    f: &mut Visitor,
    input: &InputEmbedding,
    positions: Positions,
    [pos_name, types_name, norm_name]: [&str; 3],
) {
    if positions == Positions::Learned {
        let p = input.positions();
        let table = p.table(p.max_len()).expect("the whole table");
        f(format!("{pos_name}.weight"), table.into_dyn().into());
    }
    if let Some(t) = input.token_types() {
        f(format!("{types_name}.weight"), t.weight().into_dyn().into());
    }
    if let Some(n) = input.norm() {
        visit_norm(f, norm_name, n);
    }
}

/// The first NaN or infinity among the parameters `visit` reports, as [`Error::NonFinite`].
pub(crate) fn check_finite_parameters(visit: impl FnOnce(&mut Visitor)) -> Result<()> {
    let mut result = Ok(());
    visit(&mut |name, t| {
        if result.is_ok() {
            result = first_non_finite(&name, t.view());
        }
    });
    result
}

/// An f32 tensor in little-endian bytes, as safetensors stores it.
pub(crate) struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl F32Tensor {
    pub(crate) fn new(t: CowArray<f32, IxDyn>) -> Self {
        let shape = t.shape().to_vec();
        // Iterating in logical order writes row-major bytes whatever the memory layout.
        let bytes = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        F32Tensor { shape, bytes }
    }
}

impl View for F32Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Activation, NormPosition};
    use rand::{rngs::StdRng, SeedableRng};

    fn tiny() -> TransformerConfig {
        TransformerConfig {
            d_model: 8,
            num_heads: 2,
            d_ff: 12,
            num_encoder_layers: 2,
            num_decoder_layers: 1,
            max_len: 32,
            activation: Activation::Gelu,
            norm_position: NormPosition::Pre,
            ..TransformerConfig::base(10, 11)
        }
    }

    #[test]
    fn round_trip_is_exact() {
        for (share, tie) in [(false, false), (true, true), (false, true)] {
            let config = TransformerConfig {
                share_embeddings: share,
                tie_output_projection: tie,
                tgt_vocab: if share { 10 } else { 11 },
                ..tiny()
            };
            let model = Transformer::new(config.clone(), &mut StdRng::seed_from_u64(9)).unwrap();
            let bytes = model.to_safetensors().unwrap();
            let back =
                Transformer::from_safetensors(config, &bytes, &LoadOptions::default()).unwrap();
            assert_eq!(model, back);
        }
    }

    #[test]
    fn file_errors_name_the_tensor() {
        let model = Transformer::new(tiny(), &mut StdRng::seed_from_u64(9)).unwrap();
        let bytes = model.to_safetensors().unwrap();
        // A config that disagrees with the file: the first mismatching tensor is named.
        let wider = TransformerConfig { d_ff: 16, ..tiny() };
        let err =
            Transformer::from_safetensors(wider, &bytes, &LoadOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `transformer.encoder.layers.0.linear1.weight` has shape [12, 8], expected [16, 8]"
        );
        let deeper = TransformerConfig {
            num_decoder_layers: 2,
            ..tiny()
        };
        let err =
            Transformer::from_safetensors(deeper, &bytes, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::MissingTensor { name } if name == "transformer.decoder.layers.1.self_attn.in_proj_weight"),
            "{err}"
        );
        let shallower = TransformerConfig {
            num_encoder_layers: 1,
            ..tiny()
        };
        let err = Transformer::from_safetensors(shallower.clone(), &bytes, &LoadOptions::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::UnexpectedTensors { names } if names.len() == 12),
            "{err}"
        );
        let lenient = LoadOptions {
            strict: false,
            ..LoadOptions::default()
        };
        assert!(Transformer::from_safetensors(shallower, &bytes, &lenient).is_ok());
        let err = Transformer::from_safetensors(
            tiny(),
            &bytes[..bytes.len() - 3],
            &LoadOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Safetensors(_)), "{err}");
        let err = Transformer::from_safetensors(
            tiny(),
            b"not a safetensors file",
            &LoadOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Safetensors(_)), "{err}");
    }

    #[test]
    fn wrong_dtype_is_named() {
        let data = vec![0u8; 8 * 10 * 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F64, vec![10, 8], &data).unwrap();
        let bytes = safetensors::serialize([("src_embed.weight", view)], None).unwrap();
        let err =
            Transformer::from_safetensors(tiny(), &bytes, &LoadOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor `src_embed.weight` has dtype F64, expected F32, F16 or BF16"
        );
        let data = vec![0u8; 2 * 10 * 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F16, vec![10, 8], &data).unwrap();
        let bytes = safetensors::serialize([("src_embed.weight", view)], None).unwrap();
        let no_half = LoadOptions {
            convert_half: false,
            ..LoadOptions::default()
        };
        let err = Transformer::from_safetensors(tiny(), &bytes, &no_half).unwrap_err();
        assert!(
            matches!(&err, Error::TensorDtype { found, .. } if found == "F16"),
            "{err}"
        );
    }

    #[test]
    fn first_non_finite_gives_the_row_major_index() {
        let mut t = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4]));
        assert!(first_non_finite("t", t.view()).is_ok());
        t[[1, 2, 0]] = f32::INFINITY;
        t[[1, 2, 3]] = f32::NAN;
        let err = first_non_finite("t", t.view()).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { index, value, .. } if index == &[1, 2, 0] && *value == f32::INFINITY),
            "{err}"
        );
        // A transposed view reports the index in its own (logical) shape.
        let err = first_non_finite("t", t.view().reversed_axes()).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { index, .. } if index == &[0, 2, 1]),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = Transformer::load("/nonexistent/model.safetensors", tiny()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/model.safetensors:"),
            "{err}"
        );
    }
}
