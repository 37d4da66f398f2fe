//! Attention (§3.2): the scaled dot-product kernel and the multi-head layer built on it.

pub(crate) mod cache;
pub(crate) mod multi_head;
mod scaled_dot_product;

pub use cache::DecoderCache;
pub use multi_head::MultiHeadAttention;
pub use scaled_dot_product::{
    scaled_dot_product_attention, scaled_dot_product_attention_with_weights,
};
