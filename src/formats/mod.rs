//! Weight files and how they load: Hugging Face safetensors folders (`weights`), GGUF files
//! (`gguf`, their block layouts in `ggml`), MLX affine-quantized weights (`mlx`), all addressed
//! by Hugging Face tensor names through one `WeightSource` (`source`), from which
//! `formats::layers` builds compute's layer types (which in-memory form each format takes on
//! each device). Also what every loader shares: `LoadError`, `LoadProgress`, `read_text`.
//!
//! Owner: the engine thread while a model loads (and the catalog or `mlxd list` reading
//! headers). Nothing here knows a family: `models` decides which tensors a family needs.

pub mod ggml;
pub mod gguf;
pub mod gguf_header;
pub mod layers;
pub mod mlx;
pub mod mxfp4;
pub mod ollama_layout;
pub mod source;
pub mod weights;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a model folder could not be loaded; every variant names the file or feature involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is absent.
    #[error("{path}: file not found ({what})")]
    Missing {
        /// The path looked for.
        path: PathBuf,
        /// What the file is for.
        what: String,
    },
    /// A file exists but cannot be parsed or is inconsistent.
    #[error("{file}: {reason}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The model uses something mlxd does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Reports load progress (a terminal bar when stderr is a TTY, nothing otherwise).
pub struct LoadProgress {
    bar: indicatif::ProgressBar,
}

impl LoadProgress {
    /// A progress reporter drawing to stderr only when it is a terminal.
    pub fn stderr() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("loading layers {bar:30} {pos}/{len}") {
            bar.set_style(style);
        }
        Self { bar }
    }

    /// A reporter that draws nothing (tests).
    pub fn hidden() -> Self {
        Self {
            bar: indicatif::ProgressBar::hidden(),
        }
    }

    /// Sets the number of steps (layers) loading takes.
    pub fn set_length(&self, n: u64) {
        self.bar.set_length(n);
    }

    /// One more step done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// Removes the bar once loading is done.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// True for a path that names a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    // Ollama's blobs have no extension: the magic says.
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Reads a UTF-8 file, naming it and its role on failure.
pub fn read_text(path: &Path, what: &str) -> Result<String, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LoadError::Missing {
            path: path.to_path_buf(),
            what: what.to_string(),
        }),
        Err(source) => Err(LoadError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a token id or list of ids from a JSON value (`eos_token_id` may be either).
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}
