//! The crate's one error type.
//!
//! Every public function that a caller can misuse returns [`Result<T>`]. Each variant carries the
//! offending values so that the message alone tells what went wrong, e.g.
//! `invalid config: d_model 510 is not divisible by num_heads 8`.

use std::fmt;

/// Shorthand for `std::result::Result<T, ndtransformer::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the public API.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field has a value the model cannot be built with.
    Config {
        /// The field's name, e.g. `"d_model"`.
        field: &'static str,
        /// Why the value is rejected, naming the value.
        reason: String,
    },
    /// An input array has the wrong shape.
    Shape {
        /// Which input, e.g. `"key padding mask"`.
        what: String,
        /// The expected shape, written with the crate's axis names.
        expected: String,
        /// The shape that was passed.
        found: Vec<usize>,
    },
    /// An input that must not be empty is (zero batch rows or zero positions).
    Empty {
        /// Which input, e.g. `"source ids"`.
        what: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A token id is not below the vocabulary size.
    TokenOutOfRange {
        /// The id found.
        id: u32,
        /// The vocabulary size of the embedding it was looked up in.
        vocab: usize,
        /// Batch row of the id.
        batch: usize,
        /// Position of the id in its row.
        position: usize,
    },
    /// A sequence is longer than the precomputed positional-encoding table (§3.5).
    SequenceTooLong {
        /// The sequence length passed.
        len: usize,
        /// The table's length (`max_len` of the config).
        max_len: usize,
    },
    /// A decoder cache does not fit the model or the step it is used with.
    CacheMismatch {
        /// What does not fit, naming the values.
        reason: String,
    },
    /// A decoding parameter makes no sense (beam size 0, maximum length 0, an id outside the
    /// vocabulary, …).
    Decoding {
        /// The parameter's name.
        parameter: &'static str,
        /// Why it is rejected, naming the value.
        reason: String,
    },
    /// A tensor expected in a weights file is not there.
    MissingTensor {
        /// The full tensor name, e.g. `transformer.encoder.layers.0.norm1.weight`.
        name: String,
    },
    /// A tensor in a weights file has the wrong shape.
    TensorShape {
        /// The full tensor name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor in a weights file has a dtype the loader does not read.
    TensorDtype {
        /// The full tensor name.
        name: String,
        /// The dtype expected.
        expected: &'static str,
        /// The dtype in the file.
        found: String,
    },
    /// A weight holds NaN or an infinity (checked on request: [`LoadOptions::check_finite`]
    /// or [`Transformer::check_finite`]).
    ///
    /// [`LoadOptions::check_finite`]: crate::LoadOptions::check_finite
    /// [`Transformer::check_finite`]: crate::Transformer::check_finite
    NonFinite {
        /// The full tensor name, e.g. `transformer.encoder.layers.0.norm1.weight`.
        name: String,
        /// Index of the first non-finite value, in row-major order.
        index: Vec<usize>,
        /// The value there (NaN, inf or -inf).
        value: f32,
    },
    /// A weights file holds tensors the model does not use (strict loading).
    UnexpectedTensors {
        /// The unused names, sorted.
        names: Vec<String>,
    },
    /// The bytes are not a valid safetensors file.
    Safetensors(String),
    /// Reading or writing a file failed.
    Io {
        /// The path involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        found: &[usize],
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            found: found.to_vec(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { field, reason } => write!(f, "invalid config field `{field}`: {reason}"),
            Error::Shape {
                what,
                expected,
                found,
            } => write!(f, "{what} has shape {found:?}, expected {expected}"),
            Error::Empty { what, shape } => {
                write!(f, "{what} is empty (shape {shape:?}): batch and length must be at least 1")
            }
            Error::TokenOutOfRange {
                id,
                vocab,
                batch,
                position,
            } => write!(
                f,
                "token id {id} at batch row {batch}, position {position} is out of range for vocabulary size {vocab}"
            ),
            Error::SequenceTooLong { len, max_len } => write!(
                f,
                "sequence length {len} exceeds the positional-encoding table's max_len {max_len}"
            ),
            Error::CacheMismatch { reason } => write!(f, "decoder cache mismatch: {reason}"),
            Error::Decoding { parameter, reason } => write!(f, "invalid decoding parameter `{parameter}`: {reason}"),
            Error::MissingTensor { name } => write!(f, "weights file has no tensor `{name}`"),
            Error::TensorShape {
                name,
                expected,
                found,
            } => write!(f, "tensor `{name}` has shape {found:?}, expected {expected:?}"),
            Error::TensorDtype {
                name,
                expected,
                found,
            } => write!(f, "tensor `{name}` has dtype {found}, expected {expected}"),
            Error::NonFinite { name, index, value } => write!(
                f,
                "tensor `{name}` holds the non-finite value {value} at index {index:?}"
            ),
            Error::UnexpectedTensors { names } => write!(
                f,
                "weights file has {} tensor(s) the model does not use: {}",
                names.len(),
                names.join(", ")
            ),
            Error::Safetensors(msg) => write!(f, "invalid safetensors data: {msg}"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_values() {
        let e = Error::config("d_model", "d_model 510 is not divisible by num_heads 8");
        assert_eq!(
            e.to_string(),
            "invalid config field `d_model`: d_model 510 is not divisible by num_heads 8"
        );
        let e = Error::TensorShape {
            name: "generator.weight".into(),
            expected: vec![13, 16],
            found: vec![12, 16],
        };
        assert!(e.to_string().contains("generator.weight"));
        assert!(e.to_string().contains("[12, 16]"));
        assert!(e.to_string().contains("[13, 16]"));
    }
}
