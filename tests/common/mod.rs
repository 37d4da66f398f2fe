//! Reading the PyTorch parity fixtures in `tests/fixtures/` (format: `tests/fixtures/FORMAT.md`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};
use ndtransformer::{
    Activation, EmbeddingConfig, LoadOptions, NormPosition, Transformer, TransformerConfig,
};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

/// The fixture folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Named tensors of a safetensors file, read as the tests need them.
pub struct TensorFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl TensorFile {
    pub fn read(path: &Path) -> TensorFile {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TensorFile {
            name: path.display().to_string(),
            bytes,
        }
    }

    /// Safetensors bytes made in memory (e.g. by `to_safetensors`).
    pub fn from_bytes(bytes: Vec<u8>) -> TensorFile {
        TensorFile {
            name: "in-memory safetensors".into(),
            bytes,
        }
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    pub fn f32(&self, name: &str) -> ArrayD<f32> {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.name));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
    }

    /// An int64 id tensor as u32 token ids.
    pub fn ids(&self, name: &str) -> Array2<u32> {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.name));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
            .collect();
        Array2::from_shape_vec((t.shape()[0], t.shape()[1]), v).unwrap()
    }

    /// A `[rows, width]` int64 id matrix padded with -1, as one list per row (up to its
    /// first -1).
    pub fn id_lists(&self, name: &str) -> Vec<Vec<u32>> {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.name));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let width = t.shape()[1];
        let v: Vec<i64> = t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        v.chunks(width)
            .map(|row| {
                row.iter()
                    .take_while(|&&id| id >= 0)
                    .map(|&id| u32::try_from(id).unwrap())
                    .collect()
            })
            .collect()
    }

    /// A uint8 mask (1 = True) as bools.
    pub fn flags(&self, name: &str) -> Array2<bool> {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("{}: no tensor {name}", self.name));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        Array2::from_shape_vec(
            (t.shape()[0], t.shape()[1]),
            t.data().iter().map(|&b| b != 0).collect(),
        )
        .unwrap()
    }

    /// A header metadata entry, parsed as JSON.
    pub fn metadata_json(&self, key: &str) -> Value {
        let (_, metadata) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let text = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .unwrap_or_else(|| panic!("{}: no metadata {key}", self.name));
        serde_json::from_str(text).unwrap()
    }
}

/// One fixture: the JSON sidecar and the safetensors file.
pub struct Fixture {
    pub name: String,
    pub json: Value,
    pub tensors: TensorFile,
}

impl std::ops::Deref for Fixture {
    type Target = TensorFile;
    fn deref(&self) -> &TensorFile {
        &self.tensors
    }
}

impl Fixture {
    pub fn load(stem: &str) -> Fixture {
        let dir = fixtures_dir();
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        let tensors = TensorFile::read(&dir.join(format!("{stem}.safetensors")));
        Fixture {
            name: stem.to_string(),
            json,
            tensors,
        }
    }

    /// Every fixture whose sidecar has `"kind": kind`, sorted by name.
    pub fn all_of_kind(kind: &str) -> Vec<Fixture> {
        let mut stems: Vec<String> = std::fs::read_dir(fixtures_dir())
            .unwrap()
            .filter_map(|e| {
                let path = e.unwrap().path();
                (path.extension()? == "safetensors")
                    .then(|| path.file_stem().unwrap().to_string_lossy().into_owned())
            })
            .collect();
        stems.sort();
        let found: Vec<Fixture> = stems
            .iter()
            .map(|s| Fixture::load(s))
            .filter(|f| f.json["kind"] == kind)
            .collect();
        assert!(
            !found.is_empty(),
            "no fixture of kind {kind} in {}",
            fixtures_dir().display()
        );
        found
    }

    /// The `TransformerConfig` of a transformer or greedy fixture's `config` block.
    pub fn config(&self) -> TransformerConfig {
        let c = &self.json["config"];
        let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
        TransformerConfig {
            d_model: n("d_model"),
            num_heads: n("nhead"),
            d_ff: n("dim_feedforward"),
            num_encoder_layers: n("num_encoder_layers"),
            num_decoder_layers: n("num_decoder_layers"),
            src_vocab: n("src_vocab"),
            tgt_vocab: n("tgt_vocab"),
            max_len: 512,
            activation: match c["activation"].as_str().unwrap() {
                "relu" => Activation::Relu,
                "gelu" => Activation::Gelu,
                other => panic!("activation {other}"),
            },
            norm_position: if c["norm_first"].as_bool().unwrap() {
                NormPosition::Pre
            } else {
                NormPosition::Post
            },
            layer_norm_eps: c["layer_norm_eps"].as_f64().unwrap() as f32,
            share_embeddings: false,
            tie_output_projection: false,
            embedding: EmbeddingConfig::paper(),
            final_norm: true,
        }
    }

    /// The model from the fixture's `weights.*` tensors (strict: every weight is used).
    pub fn model(&self) -> Transformer {
        Transformer::from_safetensors(
            self.config(),
            &self.bytes,
            &LoadOptions::with_prefix("weights."),
        )
        .unwrap()
    }
}

/// A greedy fixture's inputs and expected outputs.
pub struct GreedyCase {
    pub src: Array2<u32>,
    pub src_padding: ndtransformer::KeyPaddingMask,
    /// `[batch, 1 + steps]`, BOS first.
    pub expected_ids: Array2<u32>,
    /// `[batch, steps, tgt_vocab]`.
    pub step_logits: ArrayD<f32>,
    pub bos: u32,
    pub eos: Option<u32>,
}

impl Fixture {
    pub fn greedy_case(&self) -> GreedyCase {
        let greedy = &self.json["greedy"];
        GreedyCase {
            src: self.ids("io.src_ids"),
            src_padding: ndtransformer::KeyPaddingMask::from_padding_flags(
                self.flags("io.src_key_padding_mask"),
            ),
            expected_ids: self.ids("io.greedy_ids"),
            step_logits: self.f32("io.step_logits"),
            bos: greedy["bos_id"].as_u64().unwrap() as u32,
            eos: greedy["eos"].as_u64().map(|e| e as u32),
        }
    }
}

impl GreedyCase {
    pub fn steps(&self) -> usize {
        self.step_logits.shape()[1]
    }
}

/// Max |a - b|, after checking the shapes agree.
pub fn max_abs_err<D: ndarray::Dimension>(
    what: &str,
    got: &ndarray::Array<f32, D>,
    expected: &ArrayD<f32>,
) -> f32 {
    assert_eq!(got.shape(), expected.shape(), "{what}: shape");
    got.iter()
        .zip(expected.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Asserts the max abs error is within `tol`, printing it.
pub fn assert_close<D: ndarray::Dimension>(
    fixture: &str,
    what: &str,
    got: &ndarray::Array<f32, D>,
    expected: &ArrayD<f32>,
    tol: f32,
) {
    let err = max_abs_err(what, got, expected);
    println!("{fixture:>18} {what:<24} max abs err {err:.2e}");
    assert!(
        err <= tol,
        "{fixture} {what}: max abs err {err:e} > {tol:e}"
    );
}

/// Cosine similarity of two unit-length or arbitrary rows.
pub fn cosine(a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>) -> f32 {
    a.dot(&b) / (a.dot(&a).sqrt() * b.dot(&b).sqrt())
}

/// For each row of embeddings, the other rows ordered from most to least similar (the
/// query, the last row, ranks only the sentences).
pub fn rankings(e: ndarray::ArrayView2<f32>) -> Vec<Vec<usize>> {
    let sim = e.dot(&e.t());
    (0..e.nrows())
        .map(|i| {
            let last = e.nrows() - 1;
            let mut others: Vec<usize> = (0..last).filter(|&j| j != i).collect();
            others.sort_by(|&a, &b| sim[[i, b]].total_cmp(&sim[[i, a]]));
            others
        })
        .collect()
}

/// `f` run on a fresh rayon pool of `threads` threads (results must not depend on the count).
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}

// --- Editing safetensors files ---------------------------------------------------------------

/// One tensor of a safetensors file, owned.
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a safetensors file, sorted by name.
pub fn tensors_of(bytes: &[u8]) -> Vec<Tensor> {
    let file = SafeTensors::deserialize(bytes).unwrap();
    let mut out: Vec<Tensor> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| Tensor {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The tensors as safetensors bytes.
pub fn serialize(tensors: &[Tensor]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

/// Little-endian f32 bytes as values.
pub fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
