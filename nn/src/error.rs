//! The errors of model loading and running. Every variant names what it is about: the
//! file, the tensor (with the files searched), the weights location, the device.

use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weights location could not be resolved to a model directory.
    #[error("weights `{spec}` not found: {why}")]
    WeightsNotFound {
        /// The path or hub id asked for.
        spec: String,
        /// What was tried and how to get the weights.
        why: String,
    },
    /// A file of the model directory could not be read or parsed, or describes a
    /// model this code cannot run.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A tensor is missing from, or has the wrong shape or dtype in, the weights.
    #[error("tensor `{tensor}` in {path}: {why}")]
    BadTensor {
        /// Full tensor name as stored (e.g. `encoder.conv_in.weight`).
        tensor: String,
        /// The safetensors file(s) searched.
        path: String,
        /// Missing, or expected vs found shape / dtype.
        why: String,
    },
    /// A device string could not be parsed, the device is not available, or the
    /// dtype cannot be computed in on it.
    #[error("device `{spec}`: {why}")]
    Device {
        /// The device string.
        spec: String,
        /// Why it is not usable.
        why: String,
    },
    /// Two things that must fit together do not (a Redux adapter and the PixArt or
    /// store widths it sits between, a checkpoint and the model it is saved for).
    #[error("{what}: {why}")]
    Incompatible {
        /// What was being fitted together (e.g. `redux adapter -> pixart`).
        what: String,
        /// The widths or names that disagree.
        why: String,
    },
    /// An error inside candle while building or running a model.
    #[error("{model}: {source}")]
    Candle {
        /// The model (or encoder / feature) concerned.
        model: String,
        /// The candle error.
        #[source]
        source: candle_core::Error,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A closure wrapping candle errors of `model` (for `map_err`).
    pub fn candle(model: &str) -> impl Fn(candle_core::Error) -> Self + '_ {
        move |source| Self::Candle {
            model: model.to_string(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
