//! # ndtransformer
//!
//! The Transformer of *Attention Is All You Need* (Vaswani et al., 2017) on the CPU, built on
//! [`ndarray`], giving the same numbers as PyTorch's `nn.Transformer` on the same weights.
//!
//! ## The architecture, file by file (Figure 1)
//!
//! ```text
//!  source ids [batch, src_len]               target ids [batch, tgt_len]
//!        │ embedding.rs  (× √d_model, §3.4)        │
//!        │ positional.rs (sinusoids, §3.5)         │
//!        ▼                                         ▼
//!  ┌ encoder.rs (§3.1) ×N ┐              ┌ decoder.rs (§3.1) ×N ──────────┐
//!  │ self-attention       │              │ masked self-attention (mask.rs) │
//!  │ feed_forward.rs      │── memory ──▶ │ cross-attention over memory     │
//!  └──────────────────────┘              │ feed_forward.rs                 │
//!                                        └─────────────────────────────────┘
//!                                                  │ transformer.rs: output projection
//!                                                  ▼
//!                                       logits [batch, tgt_len, tgt_vocab]
//! ```
//!
//! - [`attention`]: scaled dot-product attention (§3.2.1, Eq. 1) and multi-head attention (§3.2.2).
//! - [`mask`]: causal and padding masks, one convention (true = hidden).
//! - [`LayerNorm`] and the residual connections wrap every sub-layer, post-LN (the paper) or
//!   pre-LN ([`NormPosition`]).
//! - [`weights`]: safetensors in PyTorch's state-dict names.
//! - [`ops`] holds every matrix product, softmax and norm kernel.
//!
//! ## Encoder-only models and sentence embeddings
//!
//! The encoder half runs on its own as an [`EncoderModel`]. [`EmbeddingConfig`] and
//! `final_norm` choose between the paper's input recipe (scaled embeddings, sinusoids) and
//! BERT's (learned positions, token types, an embedding norm), so [`bert`] loads Hugging Face
//! BERT checkpoints and [`SentenceEncoder`] reproduces sentence-transformers models such as
//! all-MiniLM-L6-v2 ([`pool`] then [`l2_normalize`]); see `examples/embed.rs`.
//!
//! ## Quick start
//!
//! ```
//! use ndarray::array;
//! use rand::{rngs::StdRng, SeedableRng};
//! use ndtransformer::{KeyPaddingMask, Transformer, TransformerConfig};
//!
//! let config = TransformerConfig { num_encoder_layers: 1, num_decoder_layers: 1, ..TransformerConfig::base(100, 100) };
//! let model = Transformer::new(config, &mut StdRng::seed_from_u64(42))?;
//! let src = array![[5u32, 17, 42, 3], [8, 9, 0, 0]];
//! let src_padding = KeyPaddingMask::from_lengths(&[4, 2], 4)?;
//! let memory = model.encode(src.view(), Some(&src_padding))?;          // [2, 4, 512]
//! let tgt = array![[1u32, 7], [1, 4]];
//! let hidden = model.decode(tgt.view(), memory.view(), Some(&src_padding), None)?;
//! let logits = model.project(hidden.view())?;                           // [2, 2, 100]
//! assert_eq!(logits.shape(), &[2, 2, 100]);
//! # Ok::<(), ndtransformer::Error>(())
//! ```
//!
//! ## Threads
//!
//! Every parallel loop — the large matrix products, attention over batch rows and heads, and
//! the row-wise kernels — runs on the current [rayon](https://docs.rs/rayon) pool, one level at
//! a time (a product inside the per-head loop runs on its own thread), so the threads never
//! oversubscribe the cores. During a pass (an encoder or decoder stack, a decoding step, a
//! greedy or beam search's steps) the pool's idle threads poll for the pass's next loop instead of
//! sleeping between loops, and stop when it ends. Choose the count with the `RAYON_NUM_THREADS`
//! environment variable, or run the model inside your own pool:
//!
//! ```
//! # use ndarray::array;
//! # use rand::{rngs::StdRng, SeedableRng};
//! # use ndtransformer::{Transformer, TransformerConfig};
//! # let config = TransformerConfig { d_model: 16, num_heads: 2, d_ff: 32, num_encoder_layers: 1,
//! #     num_decoder_layers: 1, ..TransformerConfig::base(50, 50) };
//! # let model = Transformer::new(config, &mut StdRng::seed_from_u64(0))?;
//! let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
//! let memory = pool.install(|| model.encode(array![[4u32, 5, 6]].view(), None))?;
//! # Ok::<(), ndtransformer::Error>(())
//! ```
//!
//! Results do not depend on the thread count: a pool of any size, and any number of threads
//! calling one shared `&Transformer` at once, give the same bits (threads split a product's
//! rows and columns, never a sum, and the kernel is chosen by the shapes and the CPU alone).
//! The crate has no global setting a caller can change: what it keeps per process (whether
//! the AMX tiles may be used) and per thread (reusable scratch memory, the warm-pool pass
//! count) is listed in [`cpu`], with CPU-feature detection and every environment variable the
//! crate reads. `docs/guarantees.md` and `docs/threads.md` in the repository have the details.
#![warn(missing_docs)]

pub mod attention;
pub mod bert;
mod config;
mod corpus;
pub mod cpu;
mod decoder;
mod decoding;
mod embedding;
mod encoder;
mod encoder_model;
mod error;
mod feed_forward;
mod huge_pages;
pub mod init;
mod input_embedding;
mod layer_norm;
mod linear;
pub mod marian;
pub mod mask;
mod naming;
pub mod ops;
mod parameters;
mod pooling;
mod positional;
mod precision;
mod residual;
mod sentence;
mod transformer;
pub mod weights;

pub use attention::{
    scaled_dot_product_attention, scaled_dot_product_attention_with_weights, DecoderCache,
    MultiHeadAttention,
};
pub use config::{Activation, EmbeddingConfig, NormPosition, Positions, TransformerConfig};
pub use corpus::{decode_corpus, CorpusOptions, CorpusProgress};
pub use decoder::{Decoder, DecoderLayer, DecoderTrace};
pub use decoding::{
    length_penalty, BeamSearchOptions, GenerateOptions, GreedyOptions, Hypothesis, LengthPenalty,
    MaxLength, Sampling, StreamedToken, TokenStream,
};
pub use embedding::Embedding;
pub use encoder::{Encoder, EncoderLayer, EncoderTrace};
pub use encoder_model::EncoderModel;
pub use error::{Error, Result};
pub use feed_forward::FeedForward;
pub use input_embedding::InputEmbedding;
pub use layer_norm::LayerNorm;
pub use linear::Linear;
pub use mask::{AttnMask, KeyPaddingMask, Mask};
pub use pooling::{l2_normalize, pool, Pooling};
pub use positional::PositionalEncoding;
pub use precision::Precision;
pub use sentence::SentenceEncoder;
pub use transformer::{Transformer, TransformerTrace};
pub use weights::{LoadOptions, LoadReport};
