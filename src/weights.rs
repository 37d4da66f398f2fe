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
//!
//! A model converted to [`Precision::Int8`] is saved as int8: each int8 matrix under its name
//! with dtype `I8`, `[out, in]`, and its scales, one a row, as `F32` under the name plus
//! `_scale` (`transformer.encoder.layers.0.linear1.weight_scale`, `src_embed.weight_scale`,
//! `…self_attn.in_proj_weight_scale` for the stacked projections, `[3·d_model]`). The file is
//! about a quarter of the f32 one and loads back as the same int8 model; the value of row `o` is
//! `scale[o] · q[o, i]`.
//!
//! Loading and saving go through the model's one walk of its parameters
//! ([`Transformer::named_parameters`] lists its names); the PyTorch names are a table over it
//! (`src/naming.rs`), so a file format is a table of renames and stacked tensors.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use half::{bf16, f16};
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Axis, CowArray, IxDyn, Zip};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};

use crate::attention::MultiHeadAttention;
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::naming::{self, Naming};
use crate::ops::Int8Weight;
use crate::parameters::{first_non_finite, Parameters, Scope, Source, Tensor};
use crate::precision::Precision;
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
    /// The precision the model is converted to once loaded ([`Transformer::quantize`]).
    /// Default `None`: the weights as the file stores them (f32, widened half precision, or
    /// int8 matrices with their scales, which stay int8).
    pub precision: Option<Precision>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            prefix: String::new(),
            strict: true,
            convert_half: true,
            check_finite: false,
            precision: None,
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

/// Named f32 tensors read from a safetensors buffer through a format's [`Naming`], tracking
/// which were used: the [`Source`] that models load from.
pub(crate) struct Reader<'a> {
    file: SafeTensors<'a>,
    naming: &'static Naming,
    prefix: String,
    convert_half: bool,
    check_finite: bool,
    used: BTreeSet<String>,
    converted: Vec<String>,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(
        bytes: &'a [u8],
        naming: &'static Naming,
        options: &LoadOptions,
    ) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Safetensors(describe_safetensors_error(&e, bytes)))?;
        Ok(Reader {
            file,
            naming,
            prefix: options.prefix.clone(),
            convert_half: options.convert_half,
            check_finite: options.check_finite,
            used: BTreeSet::new(),
            converted: Vec::new(),
        })
    }

    /// The file tensor `name` (without prefix), which must have `shape` and dtype F32 (or
    /// F16/BF16 when converting).
    fn file_tensor(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .file
            .tensor(&full)
            .map_err(|_| Error::MissingTensor { name: full.clone() })?;
        let dtype = view.dtype();
        if dtype == Dtype::I8 {
            // An int8 matrix read as floats: its values times its scales (an alias check, a
            // table the model keeps in f32).
            let (q, scales) = self.int8_tensor(&full, shape)?;
            let w = Int8Weight::from_parts(q.view(), &scales).dequantize();
            return Ok(w.into_dyn());
        }
        let (width, decode): (usize, fn(&[u8]) -> f32) = match dtype {
            Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F16 if self.convert_half => (2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Dtype::BF16 if self.convert_half => (2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            _ => {
                return Err(Error::TensorDtype {
                    name: full,
                    expected: if self.convert_half {
                        "F32, F16, BF16 or I8 with scales"
                    } else {
                        "F32 or I8 with scales (F16 and BF16 need LoadOptions::convert_half)"
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
        if dtype != Dtype::F32 && !self.converted.contains(&full) {
            self.converted.push(full.clone());
        }
        self.used.insert(full);
        Ok(tensor)
    }

    /// The int8 matrix `full` (prefix included), `shape = [rows, cols]`, and its scales
    /// `{full}_scale`, `[rows]`, F32 and finite.
    fn int8_tensor(&mut self, full: &str, shape: &[usize]) -> Result<(Array2<i8>, Vec<f32>)> {
        let view = self
            .file
            .tensor(full)
            .map_err(|_| Error::MissingTensor { name: full.into() })?;
        if view.shape() != shape || shape.len() != 2 {
            return Err(Error::TensorShape {
                name: full.into(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let values = view.data().iter().map(|&b| b as i8).collect();
        let q = Array2::from_shape_vec((shape[0], shape[1]), values)
            .map_err(|e| Error::Safetensors(format!("tensor `{full}`: {e}")))?;
        let scale_name = format!("{full}_scale");
        let scale = self
            .file
            .tensor(&scale_name)
            .map_err(|_| Error::MissingTensor {
                name: scale_name.clone(),
            })?;
        if scale.dtype() != Dtype::F32 {
            return Err(Error::TensorDtype {
                name: scale_name,
                expected: "F32",
                found: format!("{:?}", scale.dtype()),
            });
        }
        if scale.shape() != [shape[0]] {
            return Err(Error::TensorShape {
                name: scale_name,
                expected: vec![shape[0]],
                found: scale.shape().to_vec(),
            });
        }
        let scales: Vec<f32> = scale
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Scales are checked whatever `check_finite` says: one NaN scale is a row of NaN.
        first_non_finite(
            &scale_name,
            ndarray::ArrayView1::from(&scales[..]).into_dyn(),
        )?;
        self.used.insert(full.into());
        self.used.insert(scale_name);
        Ok((q, scales))
    }

    /// The file tensor `name` (without prefix) if the file has it, read and checked as any
    /// other: a tensor a format may store without the model needing it.
    pub(crate) fn optional_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<ArrayD<f32>>> {
        if self.file.tensor(&format!("{}{name}", self.prefix)).is_err() {
            return Ok(None);
        }
        self.file_tensor(name, shape).map(Some)
    }

    /// The names under the prefix that were not read, except `skipped` (names a format may
    /// hold that no model uses, without the prefix).
    ///
    /// # Errors
    /// [`Error::UnexpectedTensors`] listing them if there are any and `options.strict`.
    pub(crate) fn finish(&self, options: &LoadOptions, skipped: &[&str]) -> Result<Vec<String>> {
        let unused: Vec<String> = self
            .unused()
            .into_iter()
            .filter(|n| {
                !skipped
                    .iter()
                    .any(|s| n.strip_prefix(&options.prefix) == Some(s))
            })
            .collect();
        if options.strict && !unused.is_empty() {
            return Err(Error::UnexpectedTensors { names: unused });
        }
        Ok(unused)
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
}

impl Source for Reader<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let file = self.naming.file_name(name);
        if file.row {
            let row = [&[1], shape].concat();
            let t = self.file_tensor(&file.name, &row)?;
            return t
                .into_shape_with_order(IxDyn(shape))
                .map_err(|e| Error::Safetensors(format!("tensor `{}`: {e}", file.name)));
        }
        let Some((part, parts)) = file.part else {
            return self.file_tensor(&file.name, shape);
        };
        let rows = shape.first().copied().unwrap_or(1);
        let mut stacked = shape.to_vec();
        stacked[0] = rows * parts;
        let t = self.file_tensor(&file.name, &stacked)?;
        Ok(
            t.slice_axis(Axis(0), (part * rows..(part + 1) * rows).into())
                .to_owned(),
        )
    }

    fn int8(&mut self, name: &str, [rows, cols]: [usize; 2]) -> Result<Option<Int8Weight>> {
        let file = self.naming.file_name(name);
        let full = format!("{}{}", self.prefix, file.name);
        if !matches!(self.file.tensor(&full), Ok(v) if v.dtype() == Dtype::I8) {
            return Ok(None);
        }
        let parts = file.part.map_or(1, |(_, parts)| parts);
        let (q, scales) = self.int8_tensor(&full, &[rows * parts, cols])?;
        let part = file.part.map_or(0, |(part, _)| part);
        let range = part * rows..(part + 1) * rows;
        let q = q.slice(ndarray::s![range.clone(), ..]);
        Ok(Some(Int8Weight::from_parts(q, &scales[range])))
    }

    fn check_alias(&mut self, name: &str, of: &str, expected: ArrayView2<f32>) -> Result<()> {
        let file = self.naming.file_name(name).name;
        if self.file.tensor(&format!("{}{file}", self.prefix)).is_err() {
            return Ok(());
        }
        let found = self.tensor(name, expected.shape())?;
        // NaN equals NaN here: the question is whether the file stores the same values twice.
        let same = Zip::from(&found)
            .and(&expected.into_dyn())
            .all(|&a, &b| a == b || (a.is_nan() && b.is_nan()));
        if !same {
            let of = self.naming.file_name(of).name;
            return Err(Error::Safetensors(format!(
                "`{}{file}` differs from `{}{of}`, but the config shares them",
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
        let options = LoadOptions::with_prefix(prefix);
        let mut reader = Reader::new(bytes, &naming::PYTORCH_ATTENTION, &options)?;
        MultiHeadAttention::load(&mut Scope::root(&mut reader), d_model, num_heads)
    }
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
        let mut r = Reader::new(bytes, &naming::PYTORCH, options)?;
        let mut model = Transformer::from_scope(&mut Scope::root(&mut r), config)?;
        let unused = r.finish(options, &[])?;
        if let Some(precision) = options.precision {
            model.quantize(precision)?;
        }
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
        let mut tensors = file_tensors(self, &naming::PYTORCH)?;
        // PyTorch's `state_dict()` lists a shared or tied matrix under each of its names.
        let mut alias = |name: &str, table: &crate::Embedding| {
            table.visit(&mut |_, t| push_tensor(&mut tensors, name.into(), &t));
        };
        if self.config().share_embeddings {
            alias("tgt_embed.weight", self.src_embedding());
        }
        if self.config().tie_output_projection {
            alias("generator.weight", self.tgt_embedding());
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

/// `model`'s parameters under `naming`'s file names, fused tensors stacked. An int8 matrix is
/// written as its I8 values under its name and its f32 scales under `{name}_scale`.
pub(crate) fn file_tensors(
    model: &dyn Parameters,
    naming: &Naming,
) -> Result<Vec<(String, FileTensor)>> {
    let mut tensors = Vec::new();
    let mut stacks: BTreeMap<String, Vec<Option<Tensor>>> = BTreeMap::new();
    model.visit(&mut |name, t| {
        let file = naming.file_name(name);
        match file.part {
            None if file.row => {
                let values = t.values();
                let row = values.to_shape(IxDyn(&[&[1], values.shape()].concat()));
                let row = row.expect("a vector is a row").into_owned();
                tensors.push((file.name, FileTensor::f32(row.into())));
            }
            None => push_tensor(&mut tensors, file.name, &t),
            Some((part, parts)) => {
                let stack = stacks.entry(file.name).or_insert_with(|| vec![None; parts]);
                stack[part] = Some(t);
            }
        }
    });
    for (name, parts) in stacks {
        let parts: Vec<Tensor> = parts.into_iter().collect::<Option<_>>().ok_or_else(|| {
            Error::Safetensors(format!("tensor `{name}`: a stacked part is missing"))
        })?;
        let int8: Option<Vec<&Int8Weight>> = parts
            .iter()
            .map(|t| match t {
                Tensor::Int8(q) => Some(*q),
                _ => None,
            })
            .collect();
        match int8 {
            Some(int8) => {
                let values: Vec<_> = int8.iter().map(|q| q.values()).collect();
                let views: Vec<_> = values.iter().map(|v| v.view()).collect();
                let q = ndarray::concatenate(Axis(0), &views).map_err(|e| {
                    Error::Safetensors(format!("tensor `{name}`: parts do not stack: {e}"))
                })?;
                let scales: Vec<f32> = int8.iter().flat_map(|q| q.scales().to_vec()).collect();
                let stacked = Int8Weight::from_parts(q.view(), &scales);
                push_tensor(&mut tensors, name, &Tensor::Int8(&stacked));
            }
            None => {
                let values: Vec<CowArray<f32, IxDyn>> = parts.iter().map(Tensor::values).collect();
                let views: Vec<ArrayViewD<f32>> = values.iter().map(|v| v.view()).collect();
                let stacked = naming::stack(&name, &views)?;
                tensors.push((name, FileTensor::f32(stacked.into())));
            }
        }
    }
    Ok(tensors)
}

/// Adds `t` under `name` (and its scales under `{name}_scale` when int8).
pub(crate) fn push_tensor(tensors: &mut Vec<(String, FileTensor)>, name: String, t: &Tensor) {
    if let Tensor::Int8(q) = t {
        tensors.push((
            format!("{name}_scale"),
            FileTensor::f32(scales_view(q.scales())),
        ));
        tensors.push((name, FileTensor::int8(q.values().view())));
    } else {
        tensors.push((name, FileTensor::f32(t.values())));
    }
}

fn scales_view(scales: &[f32]) -> CowArray<'_, f32, IxDyn> {
    ndarray::ArrayView1::from(scales).into_dyn().into()
}

/// Named tensors as safetensors bytes, with PyTorch's `format: pt` metadata.
pub(crate) fn serialize(tensors: Vec<(String, FileTensor)>) -> Result<Vec<u8>> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::Safetensors(e.to_string()))
}

/// A tensor in little-endian bytes, as safetensors stores it: f32, or int8 values.
pub(crate) struct FileTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl FileTensor {
    pub(crate) fn f32(t: CowArray<f32, IxDyn>) -> Self {
        let shape = t.shape().to_vec();
        // Iterating in logical order writes row-major bytes whatever the memory layout.
        let bytes = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        FileTensor {
            dtype: Dtype::F32,
            shape,
            bytes,
        }
    }

    fn int8(q: ArrayView2<i8>) -> Self {
        FileTensor {
            dtype: Dtype::I8,
            shape: q.shape().to_vec(),
            bytes: q.iter().map(|&v| v as u8).collect(),
        }
    }
}

impl View for FileTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
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
            let mut model =
                Transformer::new(config.clone(), &mut StdRng::seed_from_u64(9)).unwrap();
            for precision in [Precision::F32, Precision::Int8] {
                model.quantize(precision).unwrap();
                let bytes = model.to_safetensors().unwrap();
                let options = LoadOptions::default();
                let back = Transformer::from_safetensors(config.clone(), &bytes, &options).unwrap();
                assert_eq!(model, back, "{precision}, share {share}, tie {tie}");
            }
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
            "tensor `src_embed.weight` has dtype F64, expected F32, F16, BF16 or I8 with scales"
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
    fn missing_file_is_an_io_error() {
        let err = Transformer::load("/nonexistent/model.safetensors", tiny()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/model.safetensors:"),
            "{err}"
        );
    }
}
