//! tensorbake-store errors as Python exceptions.
//!
//! The classes live in `tensorbake/errors.py` (Python, so that they can also derive
//! from `IndexError`, `KeyError` and `OSError`); this module picks the class for a
//! [`StoreError`] variant, keeps its whole message (the store error's text names the
//! store, part and array; causes that the text does not already include are
//! appended) and sets the `store`, `part`, `array` and `key` attributes.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tensorbake_store::StoreError;
use zarrs::array::{ArrayCreateError, ArrayError, CodecError};

/// What a Python exception carries besides its message.
#[derive(Default)]
struct Fields {
    class: &'static str,
    store: Option<String>,
    part: Option<String>,
    array: Option<String>,
    key: Option<String>,
}

/// Part and array of a store key such as `parts/<part>/<array>/c/0/0`.
fn key_fields(key: &str) -> (Option<String>, Option<String>) {
    let mut it = key.trim_start_matches('/').split('/');
    match (it.next(), it.next(), it.next()) {
        (Some("parts"), Some(part), array) => (
            Some(part.to_string()),
            array.filter(|a| !a.is_empty()).map(str::to_string),
        ),
        (Some("null"), Some(array), _) => (None, Some(format!("null/{array}"))),
        _ => (None, None),
    }
}

/// A storage failure (not damaged bytes). A codec's own `IOError` is its decoder
/// failing on the bytes (zstd: "Data corruption detected"), so it counts as damage.
fn array_error_is_io(e: &ArrayError) -> bool {
    matches!(
        e,
        ArrayError::StorageError(_) | ArrayError::CodecError(CodecError::StorageError(_))
    )
}

fn array_create_error_is_io(e: &ArrayCreateError) -> bool {
    matches!(
        e,
        ArrayCreateError::StorageError(_) | ArrayCreateError::MissingMetadata
    )
}

fn fields(e: &StoreError) -> Fields {
    let at = |class, location: &str| Fields {
        class,
        store: Some(location.to_string()),
        ..Fields::default()
    };
    let with = |class, location: &str, part: &str, array: &str| Fields {
        class,
        store: Some(location.to_string()),
        part: Some(part.to_string()),
        array: Some(array.to_string()),
        key: None,
    };
    let keyed = |class, location: &str, key: &str| {
        let (part, array) = key_fields(key);
        Fields {
            class,
            store: Some(location.to_string()),
            part,
            array,
            key: Some(key.to_string()),
        }
    };
    match e {
        StoreError::Location { location, .. } => at("InvalidLocationError", location),
        StoreError::ObjectStore { location, .. } => at("StoreIOError", location),
        StoreError::Storage { location, key, .. } => keyed("StoreIOError", location, key),
        StoreError::Io { path, .. } => Fields {
            class: "StoreIOError",
            key: Some(path.clone()),
            ..Fields::default()
        },
        StoreError::NotAStore { location, .. } => at("NotAStoreError", location),
        StoreError::Metadata { location, key, .. } => keyed("MetadataError", location, key),
        StoreError::Array {
            location,
            part,
            array,
            source,
        } => with(
            if array_error_is_io(source) {
                "StoreIOError"
            } else {
                "CorruptDataError"
            },
            location,
            part,
            array,
        ),
        StoreError::ArrayCreate {
            location,
            part,
            array,
            source,
        } => with(
            if array_create_error_is_io(source) {
                "StoreIOError"
            } else {
                "MetadataError"
            },
            location,
            part,
            array,
        ),
        StoreError::IndexOutOfRange { location, .. } => at("SampleIndexError", location),
        StoreError::UnknownArray { location, name, .. } => Fields {
            array: Some(name.clone()),
            ..at("UnknownArrayError", location)
        },
        StoreError::NullEmbedding {
            location, array, ..
        } => Fields {
            array: Some(format!("null/{array}")),
            ..at("StoreError", location)
        },
        _ => Fields {
            class: "StoreError",
            ..Fields::default()
        },
    }
}

/// The error's text followed by every cause whose text it does not already contain
/// (object_store's "connection refused" sits a few levels down).
fn message(e: &StoreError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

fn build(py: Python<'_>, f: &Fields, text: &str) -> PyResult<PyErr> {
    let module = py.import("tensorbake.errors")?;
    let class = module.getattr(f.class)?;
    let value = class.call1((text,))?;
    for (name, v) in [
        ("store", &f.store),
        ("part", &f.part),
        ("array", &f.array),
        ("key", &f.key),
    ] {
        if let Some(v) = v {
            value.setattr(name, v)?;
        }
    }
    Ok(PyErr::from_value(value))
}

/// The Python exception for a store error.
pub(crate) fn store_err(py: Python<'_>, e: StoreError) -> PyErr {
    let f = fields(&e);
    let text = message(&e);
    build(py, &f, &text).unwrap_or_else(|import_error| {
        let err = PyRuntimeError::new_err(text);
        err.set_cause(py, Some(import_error));
        err
    })
}
